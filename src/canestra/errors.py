"""User-facing errors: one plain sentence saying what is wrong and what to do."""

from __future__ import annotations

EXIT_USER_ERROR = 2


class CanestraError(Exception):
    """An error the user can fix. The CLI prints ``str(err)`` on one line and exits 2."""

    exit_code = EXIT_USER_ERROR


class InputError(CanestraError):
    """Missing, empty or malformed input (images, catalog, model)."""


class OutputError(CanestraError):
    """The output location cannot be written."""


class NotAnOutput(InputError):
    """``--out`` names a folder canestra did not write (e.g. a photo folder): nothing may be written
    into it, not even the audit record."""


class EnvironmentProblem(CanestraError):
    """The machine lacks something canestra needs (Java, model weights)."""


class OutOfMemory(EnvironmentProblem):
    """A Spark worker (JVM or Python) ran out of memory."""


class SparkStopped(EnvironmentProblem):
    """Spark's Java process died during the job (killed, or out of memory)."""


class DiskFull(OutputError):
    """No space left on the device a job writes to (--out, or Spark's scratch folder)."""


def causes(exc: BaseException):
    """``exc`` and every exception in its cause/context chain, each once."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def jvm_gone(exc: BaseException) -> bool:
    """True when ``exc`` says the connection to Spark's JVM broke (the JVM was killed or crashed)."""
    return any(isinstance(e, (ConnectionRefusedError, ConnectionResetError, BrokenPipeError))
               or type(e).__name__ == "Py4JNetworkError" or "Answer from Java side is empty" in str(e)
               for e in causes(exc))
