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

from .backbone import cpu_flags
from .errors import EnvironmentProblem

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


def get_spark(master: str = "local[*]", app_name: str = "canestra", conf: dict[str, str] | None = None):
    """Create (or reuse) the SparkSession with canestra's defaults."""
    java_version()
    # Spark's Python workers must use this interpreter (the venv), not whatever
    # `python3` is first on PATH; on one machine, keep Spark on loopback.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if master.startswith("local") or "127.0.0.1" in master or "localhost" in master:
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    log_opt = f"-Dlog4j2.configurationFile=file:{log4j_config()} -Dlog4j.configurationFile=file:{log4j_config()}"
    on_this_machine = master.startswith("local") or "127.0.0.1" in master or "localhost" in master
    if on_this_machine and "avx512f" in cpu_flags() and os.environ.get("CANESTRA_JVM_AVX512") != "1":
        # Seen once here (OpenJDK 17.0.15, AMD EPYC with AVX-512, no native BLAS), not reproduced
        # since: Spark ML's PCA came out wrong with its Java BLAS loops JIT-compiled to AVX-512.
        # Capping the JIT at AVX2 cost nothing measurable; CANESTRA_JVM_AVX512=1 lifts it.
        log_opt += " -XX:UseAVX=2"
    builder = (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.driver.extraJavaOptions", log_opt)
        .config("spark.executor.extraJavaOptions", log_opt)
        # Spark's progress bar only where a person watches; CI logs get our stage lines.
        .config("spark.ui.showConsoleProgress", "true" if sys.stderr.isatty() else "false")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.python.worker.reuse", "true")
        .config("spark.sql.shuffle.partitions", str(max(4, 2 * (os.cpu_count() or 2))))
        .config("spark.driver.memory", os.environ.get("CANESTRA_DRIVER_MEMORY", "4g"))
        .config("spark.sql.parquet.compression.codec", "snappy")
    )
    if master.startswith("local"):
        builder = builder.config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark
