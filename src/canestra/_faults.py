"""Failures that surface from Spark, the JVM or a Python worker, read into canestra's typed errors.

A job failing inside Spark reaches the driver as a ``Py4JJavaError`` (or a socket error when the
JVM died) whose text holds the real cause. ``canestra.api`` turns it into a ``CanestraError``
subclass at its boundary, so a notebook and the CLI see the same one-line cause; the CLI only
maps error types to exit codes.
"""

from __future__ import annotations

import errno
import re

from canestra.errors import (
    CanestraError,
    DiskFull,
    EnvironmentProblem,
    InputError,
    OutOfMemory,
    OutputError,
    SparkStopped,
    causes,
    jvm_gone,
)

# A canestra error raised inside a Spark Python worker arrives as text in the Java trace.
_WORKER_ERROR = re.compile(r"canestra\.errors\.(EnvironmentProblem|InputError|OutputError|[A-Za-z]+): (.+)")
_BY_NAME: dict[str, type[CanestraError]] = {"EnvironmentProblem": EnvironmentProblem, "InputError": InputError,
                                            "OutputError": OutputError}


def _errno_in_chain(exc: BaseException) -> int | None:
    """The errno of the first OSError in ``exc``'s cause/context chain."""
    return next((e.errno for e in causes(exc) if isinstance(e, OSError) and e.errno), None)


def typed_error(exc: BaseException) -> CanestraError | None:
    """The typed, one-line reading of a Spark/Java/Python-worker failure, or None when it is not one
    canestra knows (then it is a bug to report, and stays as it is)."""
    if isinstance(exc, CanestraError):
        return exc
    text = str(exc)
    found = _WORKER_ERROR.search(text)
    if found:
        cls = _BY_NAME.get(found.group(1), EnvironmentProblem)
        return cls(found.group(2).strip())
    if "MemoryError" in text or "java.lang.OutOfMemoryError" in text or (
            "Python worker exited unexpectedly" in text and ("137" in text or "Killed" in text or "signal 9" in text)):
        return OutOfMemory("a Spark worker ran out of memory: lower --batch-size or --arrow-batch, or give Spark "
                           "more memory (CANESTRA_DRIVER_MEMORY, spark.executor.memory)")
    if "Python worker exited unexpectedly (crashed)" in text:
        # A native library (ONNX Runtime, OpenBLAS) that cannot allocate aborts the worker without a
        # Python MemoryError: memory is the usual cause, and the log has the worker's last words.
        return OutOfMemory("a Spark Python worker crashed, most often for lack of memory: lower --batch-size, give "
                           "the workers more memory (spark.executor.memory, spark.executor.pyspark.memory), and see "
                           "the Spark log")
    if jvm_gone(exc):
        return SparkStopped("Spark's Java process stopped during the job (killed, or out of memory: the system log "
                            "says which); outputs already published are complete: run the command again")
    if "InvalidProtobuf" in text or "INVALID_PROTOBUF" in text or ("onnxruntime" in text and "Load model" in text):
        return EnvironmentProblem("the cached CNN model file is corrupt: delete the canestra cache folder "
                                  "(CANESTRA_CACHE_DIR, default ~/.cache/canestra) and run again")
    if "Permission denied" in text or "AccessDeniedException" in text:
        return OutputError("permission denied while Spark wrote or read a file: check the --out folder's permissions")
    if "No space left on device" in text or "Disk quota exceeded" in text or _errno_in_chain(exc) in (
            errno.ENOSPC, errno.EDQUOT):
        # Python (OSError 28), the JVM (java.io.IOException) and Spark's worker traces all say it so.
        if "DiskBlockObjectWriter" in text or "blockmgr-" in text or "ShuffleWriter" in text:
            # Spark's scratch space (shuffle and spill files), not --out, is full.
            return DiskFull("no space left on device in Spark's scratch folder (spark.local.dir, default /tmp): "
                            "free space there or point SPARK_LOCAL_DIRS at a bigger disk")
        return DiskFull("no space left on device: free disk space or choose another --out")
    if "Could not parse Master URL" in text or "Invalid master URL" in text:
        return InputError("invalid --master URL: use local[*] or spark://HOST:PORT")
    if "JAVA_GATEWAY_EXITED" in text or "Java gateway process exited" in text:
        return EnvironmentProblem("Spark's Java process failed to start: check that Java 17+ is installed and "
                                  "JAVA_HOME is right")
    return None
