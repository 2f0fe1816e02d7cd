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


class EnvironmentProblem(CanestraError):
    """The machine lacks something canestra needs (Java, model weights)."""
