"""GDPR Art. 30 / accountability: one JSON Lines audit record per command.

Every ``canestra`` command, and every call of the Python API's ``canestra.train``,
``predict``, ``evaluate`` and ``ingest`` (canestra.api), appends one record, success or failure, to
``<out>/_audit/audit.jsonl`` and to the log named by ``--audit-log`` /
``CANESTRA_AUDIT_LOG``. A command with no such log and no existing local ``--out``
(it failed before creating it, has none, or writes to s3://) writes to
``$XDG_STATE_HOME/canestra/audit.jsonl`` (default ``~/.local/state``).

A record says who ran what, when, with which outcome and how many items it
touched, and where its outputs went. It never holds image content, image source
paths, image ids, error messages (they may quote paths) or credentials: URIs are
stripped of user info, query strings and fragments before they are recorded.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import fcntl
import getpass
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from canestra import __version__
from canestra.errors import NotAnOutput
from canestra.layout import AUDIT_DIR, AUDIT_FILE

ENV_LOG = "CANESTRA_AUDIT_LOG"
ENV_ACTOR = "CANESTRA_ACTOR"

_current: contextvars.ContextVar[AuditRecord | None] = contextvars.ContextVar("canestra_audit", default=None)


def redact_uri(uri: str) -> str:
    """``s3://key:secret@bucket/x?X-Amz-Signature=…`` -> ``s3://bucket/x``: no credentials in the log."""
    uri = str(uri)
    if "://" not in uri:
        return os.path.abspath(os.path.expanduser(uri))
    parts = urlsplit(uri)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def actor() -> str:
    """Who runs the command: ``CANESTRA_ACTOR`` (e.g. a ticket or service identity), else the OS user."""
    name = os.environ.get(ENV_ACTOR, "").strip()
    if name:
        return name
    try:
        return getpass.getuser()
    except Exception:  # containers without a passwd entry for the uid
        return f"uid:{os.getuid()}"


def default_user_log() -> str:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "canestra", AUDIT_FILE)


def log_paths(out: str | None, audit_log: str | None = None) -> list[str]:
    """Where a command's record goes: ``<out>/_audit/audit.jsonl`` and the configured log, if any."""
    paths: list[str] = []
    explicit = audit_log or os.environ.get(ENV_LOG) or None
    if explicit:
        paths.append(os.path.abspath(os.path.expanduser(explicit)))
    if out and ("://" not in out or out.startswith("file://")):
        local = os.path.abspath(os.path.expanduser(out[len("file://"):] if out.startswith("file://") else out))
        # Only into an existing output folder: a command that failed before creating it must not create it.
        if os.path.isdir(local):
            paths.append(os.path.join(local, AUDIT_DIR, AUDIT_FILE))
    # Remote --out (s3://): objects cannot be appended to, so the record goes to the local log.
    if not paths:
        paths.append(default_user_log())
    return list(dict.fromkeys(paths))


def append_record(path: str, record: dict[str, Any]) -> None:
    """Append one JSON line; an exclusive lock keeps concurrent writers' lines whole."""
    line = (json.dumps(record, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
    finally:
        os.close(fd)  # closing releases the lock


def read_records(path: str) -> list[dict[str, Any]]:
    """All records of a log (for tests and the record of processing); [] when there is none."""
    try:
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except FileNotFoundError:
        return []


@dataclass
class AuditRecord:
    """The record being built while a command runs; commands add counts and outputs."""

    command: str
    counts: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def note(self, *, outputs: list[str] | tuple[str, ...] = (), details: dict[str, Any] | None = None,
             **counts: Any) -> None:
        self.counts.update(counts)
        self.outputs.extend(redact_uri(o) for o in outputs if o)
        self.details.update(details or {})


def note(*, outputs: list[str] | tuple[str, ...] = (), details: dict[str, Any] | None = None, **counts: Any) -> None:
    """Add counts (plain numbers), output URIs and non-personal details to the running command's record."""
    rec = _current.get()
    if rec is not None:
        rec.note(outputs=outputs, details=details, **counts)


def _exit_code(exc: BaseException) -> int:
    from canestra.errors import CanestraError

    if isinstance(exc, CanestraError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return 1


@contextlib.contextmanager
def audited(command: str, out: str | None = None, audit_log: str | None = None) -> Iterator[AuditRecord]:
    """Run a command body; append its record (outcome, counts, outputs) whether it succeeds or fails.

    A failure is recorded by error class only: messages may quote input paths.
    Writing the record never masks the command's own result; a log that cannot be
    written is reported on stderr.

    Nested calls join the running record and write nothing: the library functions
    (canestra.api) audit themselves, and the CLI's wrapper around them (which also covers
    failures before the library is reached) must not write the record twice.
    """
    running = _current.get()
    if running is not None:
        yield running
        return
    rec = AuditRecord(command)
    token = _current.set(rec)
    started = time.time()
    status, error, code = "ok", None, 0
    foreign = False
    try:
        yield rec
    except BaseException as exc:
        status, error, code = "error", type(exc).__name__, _exit_code(exc)
        foreign = isinstance(exc, NotAnOutput)  # refused as not ours: leave no file in it
        raise
    finally:
        _current.reset(token)
        record = {
            "time": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "command": command,
            "actor": actor(),
            "status": status,
            "exit_code": code,
            "duration_s": round(time.time() - started, 3),
            "counts": rec.counts,
            "outputs": list(dict.fromkeys(rec.outputs)),
            "canestra_version": __version__,
        }
        if error:
            record["error"] = error
        if rec.details:
            record["details"] = rec.details
        for path in log_paths(None if foreign else out, audit_log):
            try:
                append_record(path, record)
            except OSError as exc:
                print(f"canestra: warning: cannot write the audit record to {path} ({exc.strerror or exc})",
                      file=sys.stderr)
