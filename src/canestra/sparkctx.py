"""Starting Spark: Java check, quiet logs, sane local defaults.

Everything Spark-specific about *starting* lives here so that a missing Java or
a bad master URL becomes one plain sentence, not a JVM stack trace.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib import resources

from canestra.errors import EnvironmentProblem
from canestra.vision.backbone import cpu_flags

_JAVA_VERSION = re.compile(r'version "(\d+)(?:\.(\d+))?')


def required_java() -> int:
    import pyspark

    return 17 if int(pyspark.__version__.split(".")[0]) >= 4 else 8


def java_version() -> tuple[str, int]:
    """(java executable, major version); raises EnvironmentProblem when unusable."""
    java_home = os.environ.get("JAVA_HOME")
    java = os.path.join(java_home, "bin", "java") if java_home else shutil.which("java")
    need = required_java()
    if not java or not os.path.exists(java):
        where = f" (JAVA_HOME={java_home} has no bin/java)" if java_home else ""
        raise EnvironmentProblem(
            f"Java is not installed{where}: Spark needs Java {need} or newer; "
            f"install it (e.g. `apt-get install openjdk-17-jre-headless`) or set JAVA_HOME"
        )
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnvironmentProblem(f"cannot run {java}: {exc}; install Java {need}+ or fix JAVA_HOME") from exc
    m = _JAVA_VERSION.search(out.stderr + out.stdout)
    if not m:
        raise EnvironmentProblem(f"cannot tell the Java version of {java}; install Java {need}+ or set JAVA_HOME")
    major = int(m.group(1))
    if major == 1 and m.group(2):  # "1.8.0" style
        major = int(m.group(2))
    if major < need:
        raise EnvironmentProblem(
            f"Java {major} found at {java} but this Spark needs Java {need} or newer: "
            f"install Java {need} and point JAVA_HOME at it"
        )
    return java, major


def log4j_config() -> str:
    return str(resources.files("canestra").joinpath("conf/log4j2.properties"))


def get_spark(master: str = "local[*]", app_name: str = "canestra", conf: dict[str, str] | None = None,
              log_file: str | None = None, driver_memory: str | None = None):
    """Create (or reuse) the SparkSession with canestra's defaults.

    With ``log_file``, everything the JVM and its Python workers print (log4j at any level,
    native-library notices, worker tracebacks) goes to that file instead of the terminal:
    the JVM is started with its stdout/stderr redirected there. Users see canestra's own
    lines; a failure names the file.

    A session canestra started is reused; one with another driver memory (fixed when its JVM
    starts) is stopped with its JVM and a new one started, so each call runs with the memory it
    was given. A session the caller started is always reused as it is.
    """
    # Library use (notebooks, scripts): CANESTRA_SPARK_LOG=FILE sends the JVM's output there too.
    log_file = log_file or os.environ.get("CANESTRA_SPARK_LOG") or None
    java_version()
    # Spark's Python workers must use this interpreter (the venv), not whatever
    # `python3` is first on PATH; on one machine, keep Spark on loopback.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if master.startswith("local") or "127.0.0.1" in master or "localhost" in master:
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark import SparkConf, SparkContext
    from pyspark.sql import SparkSession

    memory = driver_memory or "4g"
    running = SparkContext._active_spark_context
    if running is not None and running.getConf().get(_OWNED) == "1" and (
            running.getConf().get("spark.driver.memory") != memory):
        _stop_with_jvm(running)

    log_opt = f"-Dlog4j2.configurationFile=file:{log4j_config()} -Dlog4j.configurationFile=file:{log4j_config()}"
    on_this_machine = master.startswith("local") or "127.0.0.1" in master or "localhost" in master
    if on_this_machine and "avx512f" in cpu_flags() and os.environ.get("CANESTRA_JVM_AVX512") != "1":
        # Seen once here (OpenJDK 17.0.15, AMD EPYC with AVX-512, no native BLAS), not reproduced
        # since: Spark ML's PCA came out wrong with its Java BLAS loops JIT-compiled to AVX-512.
        # Capping the JIT at AVX2 cost nothing measurable; CANESTRA_JVM_AVX512=1 lifts it.
        log_opt += " -XX:UseAVX=2"
    settings = {
        "spark.driver.extraJavaOptions": log_opt,
        "spark.executor.extraJavaOptions": log_opt,
        # Spark's progress bar only where a person watches and the JVM writes to the terminal.
        "spark.ui.showConsoleProgress": "true" if sys.stderr.isatty() and not log_file else "false",
        "spark.ui.enabled": "false",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.python.worker.reuse": "true",
        "spark.sql.shuffle.partitions": str(max(4, 2 * (os.cpu_count() or 2))),
        "spark.driver.memory": memory,
        _OWNED: "1",
        "spark.sql.parquet.compression.codec": "snappy",
        # A features row is ~20 KB (2,560 doubles): the default 4,096-row columnar batch asks the
        # vectorized reader for 80+ MB per task, which ran a 4 GB driver out of heap at 136,800 images.
        "spark.sql.parquet.columnarReaderBatchSize": "256",
    }
    if master.startswith("local"):
        settings.update({"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1"})
    settings.update(conf or {})
    if log_file and SparkContext._active_spark_context is None:
        from pyspark.java_gateway import launch_gateway

        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        sconf = SparkConf().setMaster(master).setAppName(app_name).setAll(list(settings.items()))
        with open(log_file, "ab") as sink:  # the child keeps its own copy of the descriptor
            gateway = launch_gateway(sconf, popen_kwargs={"stdout": sink, "stderr": sink})
        SparkContext(conf=sconf, gateway=gateway)
    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    _quiet_accumulator_server(spark.sparkContext)
    if log_file:
        _py4j_log_to(log_file)
    return spark


_OWNED = "spark.canestra.owned"  # marks sessions canestra started (and may restart)


def _stop_with_jvm(sc) -> None:
    """Stop a SparkContext and its JVM: driver memory is fixed when the JVM starts, so a call that
    needs another gets a new JVM (PySpark starts one when its gateway is gone)."""
    from pyspark import SparkContext

    sc.stop()
    gateway = SparkContext._gateway
    if gateway is None:
        return
    proc = getattr(gateway, "proc", None)
    try:
        gateway.shutdown()
    finally:
        SparkContext._gateway = None
        SparkContext._jvm = None
        if proc is not None:  # the JVM exits when its stdin closes (PythonGatewayServer)
            if proc.stdin:
                proc.stdin.close()
            try:
                proc.wait(timeout=60)
            except Exception:
                proc.kill()


def _quiet_accumulator_server(sc) -> None:
    # When the JVM dies mid-job, PySpark's accumulator server thread prints an EOFError trace to the
    # user's terminal (socketserver's handle_error) before the job's own error arrives. The job's
    # error says what happened; the trace goes to the log instead.
    server = getattr(sc, "_accumulatorServer", None)
    if server is None or getattr(server, "_canestra_quiet", False):
        return
    import logging

    def handle_error(request, client_address) -> None:
        logging.getLogger("canestra.spark").debug("accumulator connection from %s ended", client_address,
                                                  exc_info=True)

    server.handle_error = handle_error
    server._canestra_quiet = True


class _Py4JToFile:
    """A root-logger filter: py4j logs a broken gateway (the JVM killed mid-job) with
    ``logging.exception`` on the root logger, which prints a trace on the terminal ahead of the
    job's own plain error. Its records go to the run's Spark log instead; others pass."""

    def __init__(self, path: str) -> None:
        self.path = path

    def filter(self, record) -> bool:
        if f"{os.sep}py4j{os.sep}" not in (record.pathname or ""):
            return True
        import logging

        try:
            with open(self.path, "a", encoding="utf-8") as sink:
                sink.write(logging.Formatter("%(asctime)s %(levelname)s py4j: %(message)s").format(record) + "\n")
        except OSError:
            pass
        return False


def _py4j_log_to(log_file: str) -> None:
    import logging

    root = logging.getLogger()
    mine = [f for f in root.filters if isinstance(f, _Py4JToFile)]
    if mine:
        mine[0].path = log_file  # a reused session: this command's log
    else:
        root.addFilter(_Py4JToFile(log_file))


def driver_arrow_pool() -> None:
    """Use the system allocator for this process's Arrow buffers: for the CLI, which owns its process;
    a library call never changes the allocator of the user's notebook."""
    # The driver converts listings and held-out scores to Arrow once per run. PyArrow's default
    # pool (mimalloc) keeps what it freed: +39 MB of RSS for the rest of a 136,800-image run.
    # The system allocator hands large buffers back (see trim_driver_memory). Workers keep theirs.
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())


def trim_driver_memory() -> None:
    """Give memory freed by a driver-side step (e.g. ingest's listing) back to the OS, so that the
    driver's RSS does not grow with the number of images (glibc only; elsewhere a no-op)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# Native-library notices the JVM prints on every start, that a user can act on: kept in the
# Spark log, and said once per machine as one plain line. (pattern, key, line; {0} = the match)
_NOTICES = [
    (re.compile(r"netlib-blas: JNI_OnLoad: dlopen\(([^)]+)\) failed"), "no-native-blas",
     "no native BLAS library ({0}) was found, so Spark ML fits use its slower Java code; "
     "install one for faster training (e.g. `apt-get install libopenblas0`). Said once; details in the Spark log"),
]


def log_size(log_file: str | None) -> int:
    """Where this run's part of an (appended) Spark log starts."""
    try:
        return os.path.getsize(log_file) if log_file else 0
    except OSError:
        return 0


def once_notices(log_file: str | None, start: int = 0) -> list[str]:
    """Plain lines for the known notices in ``log_file`` after ``start`` not yet said on this machine."""
    if not log_file:
        return []
    try:
        with open(log_file, "rb") as fh:
            fh.seek(start)
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    from canestra.vision.backbone import cache_dir

    lines = []
    for pattern, key, line in _NOTICES:
        found = pattern.search(text)
        if not found:
            continue
        try:
            marker = cache_dir() / "notices" / key
            if marker.exists():
                continue
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except Exception:  # no writable cache: say it on each run rather than never
            pass
        lines.append(line.format(found.group(1)))
    return lines
