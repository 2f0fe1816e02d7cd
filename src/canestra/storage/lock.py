"""One run at a time per output folder: ``OUT/.canestra.lock``.

Two runs writing the same ``--out`` would interleave their tables (one publishes
``predictions/`` while the other rewrites ``predictions.csv``). The lock file is created
with ``O_CREAT | O_EXCL`` (atomic on local filesystems and NFSv3+) and holds the
holder's pid, host, process start time, command and start time, so the second run can
say who has the folder. A lock whose holder is gone (same host, pid dead or reused by
another process) is taken over with a note: a run killed with ``kill -9`` never blocks
the next one; taking it over also clears the ``_staging/`` folders the dead run left.

On ``s3://`` outputs the lock is an object written with a conditional put
(``If-None-Match: *``), which S3 (since 2024) and moto honour; a lock left by a run
that died on another machine cannot be proven stale and must be removed by hand
(the error says which object).

Use::

    with out_lock(out, "predict"):
        ...  # write tables under out
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import socket
import sys
import time
from typing import Iterator

from canestra.errors import OutputError
from canestra.layout import STAGING
from canestra.storage import files as storage
from canestra.storage import s3

LOCK_NAME = ".canestra.lock"
_UNREADABLE_GRACE_S = 10.0


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime), counted after the comm field
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    now = _proc_start(pid)
    return not (start and now and now != start)


def _holder(command: str) -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "proc_start": _proc_start(pid), "command": command,
            "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def describe(holder: dict) -> str:
    return (f"canestra {holder.get('command') or '?'} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"started {holder.get('started_at', '?')})")


def _read(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written by a run killed while creating it: no holder to name


def _is_stale(holder: dict, path: str) -> bool:
    if not holder:
        # Unreadable: its writer died between creating and filling it (microseconds apart),
        # unless that is happening right now.
        try:
            return time.time() - os.stat(path).st_mtime > _UNREADABLE_GRACE_S
        except FileNotFoundError:
            return True
    if holder.get("host") != socket.gethostname():
        return False  # cannot see another machine's processes
    try:
        pid = int(holder["pid"])
    except (KeyError, TypeError, ValueError):
        return True  # unreadable lock on this host: its writer died while writing it
    return not _alive(pid, holder.get("proc_start"))


def _busy(where: str, holder: dict) -> OutputError:
    return OutputError(f"{where} is in use by {describe(holder)}: wait for it to finish or use another --out "
                       f"(if that run is gone, remove {where.rstrip('/')}/{LOCK_NAME})")


def _acquire_local(out_dir: str, holder: dict, note) -> str:
    path = os.path.join(out_dir, LOCK_NAME)
    body = json.dumps(holder).encode("utf-8")
    stale = False
    for _ in range(5):  # bounded: a takeover race with another starting run ends in one clear error
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            other = _read(path)
            if other is None:
                continue  # released meanwhile: try again
            if not _is_stale(other, path):
                raise _busy(out_dir, other) from None
            # Rename, not unlink: of two runs taking over the same stale lock only one wins.
            aside = f"{path}.stale-{os.getpid()}"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            if _read(aside) != other:  # a live run's fresh lock was moved by mistake: put it back
                os.rename(aside, path)
                continue
            os.unlink(aside)
            note(f"took over the lock of {describe(other)}, which is no longer running")
            stale = True
            continue
        except OSError as exc:
            raise OutputError(f"cannot create the lock file {path} ({exc.strerror or exc}): check --out") from exc
        try:
            try:
                os.write(fd, body)
            finally:
                os.close(fd)
        except OSError as exc:  # e.g. a full disk: no empty lock may outlive this run
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise OutputError(f"cannot write the lock file {path} ({exc.strerror or exc}): "
                              "free disk space or choose another --out") from exc
        if stale:
            _clear_staging(out_dir)
        return path
    raise _busy(out_dir, _read(path) or {})


def _clear_staging(out_dir: str) -> None:
    """Remove the staging folders a dead run left (we now hold its lock, so no live run owns them)."""
    staging = os.path.join(out_dir, STAGING)
    if os.path.isdir(staging):
        shutil.rmtree(staging, ignore_errors=True)


def _release_local(path: str, holder: dict) -> None:
    if _read(path) == holder:  # never remove a lock that was taken over from us
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _acquire_s3(out: str, holder: dict) -> str:
    opts = storage.s3_options()
    uri = s3.join(out, LOCK_NAME)
    if not s3.put_if_absent(uri, json.dumps(holder).encode("utf-8"), opts):
        text = storage.read_text(uri)
        try:
            other = json.loads(text) if text else {}
        except ValueError:
            other = {}
        raise _busy(out, other if isinstance(other, dict) else {})
    return uri


def _stderr_note(message: str) -> None:
    print(f"canestra: note: {message}", file=sys.stderr)


@contextlib.contextmanager
def out_lock(out: str, command: str, note=_stderr_note) -> Iterator[str]:
    """Hold ``OUT/.canestra.lock`` for the block; OutputError naming the holder when it is taken.

    ``note`` receives the one-line notice printed when a dead run's lock is taken over.
    Yields the lock's path (or URI).
    """
    holder = _holder(command)
    if s3.is_s3(out):
        uri = _acquire_s3(out, holder)
        try:
            yield uri
        finally:
            with contextlib.suppress(Exception):
                s3.delete(uri, storage.s3_options())
        return
    out_dir = storage.local_path(out)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {out_dir} ({exc.strerror or exc}): choose another --out") from exc
    path = _acquire_local(out_dir, holder, note)
    try:
        yield path
    except BaseException:
        # A failed run (full disk, Spark error, Ctrl-C) leaves no partial staging tables behind:
        # published tables are untouched, and the space goes back to the next run.
        _clear_staging(out_dir)
        raise
    finally:
        _release_local(path, holder)
