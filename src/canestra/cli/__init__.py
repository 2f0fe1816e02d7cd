"""The `canestra` command line: a thin layer over the library."""

from canestra.cli.commands import main

__all__ = ["main"]
