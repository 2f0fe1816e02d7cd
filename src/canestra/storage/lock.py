"""One run at a time per output folder: ``OUT/.canestra.lock``.

Two runs writing the same ``--out`` would interleave their tables (one publishes
``predictions/`` while the other rewrites ``predictions.csv``). The lock file is created
with ``O_CREAT | O_EXCL`` (atomic on local filesystems and NFSv3+) and holds the
holder's pid, host, process start time, boot id, PID namespace, command and start time,
so the second run can say who has the folder. A lock whose holder is provably gone (same
host, boot and PID namespace; pid dead or reused by another process) is taken over with a
note: a run killed with ``kill -9`` never blocks the next one; taking it over also clears
the ``_staging/`` folders the dead run left. A holder in another PID namespace (a container
sharing the volume under the same host name) or another boot cannot be checked from here:
its pid means nothing in ours, so such a lock is never taken over; the error says which
file to remove once that run is known to be gone.

On ``s3://`` outputs the lock is an object written with a conditional put
(``If-None-Match: *``), which S3 (since 2024) and moto honour; a lock left by a run
that died on another machine cannot be proven stale and must be removed by hand
(the error says which object). A run releases an s3:// lock only if the object is still
its own (same token, deleted with ``If-Match`` on the ETag it read): a lock removed by hand
and taken by another run meanwhile survives the first run's exit.

Use::

    with out_lock(out, "predict"):
        ...  # write tables under out
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterable, Iterator

from canestra.errors import OutputError
from canestra.layout import STAGING
from canestra.storage import files as storage
from canestra.storage import s3

__all__ = ["out_lock", "out_locks"]

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


@functools.lru_cache(maxsize=1)
def _boot_id() -> str | None:
    """This boot of the kernel (Linux): proc_start counts ticks from it, so pids compare only within one."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def _pid_ns() -> str | None:
    """This process's PID namespace (``pid:[4026531836]``): pids of another one mean nothing here."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _holder(command: str) -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "proc_start": _proc_start(pid), "boot_id": _boot_id(),
            "pid_ns": _pid_ns(), "command": command,
            "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "token": uuid.uuid4().hex}  # tells this run's lock from any other, even one with the same pid


def _elsewhere(holder: dict) -> str | None:
    """Why the holder's pid cannot be checked from this process, or None when it can."""
    if holder.get("host") != socket.gethostname():
        return "on another host"
    # A field missing on one side only is as unknown as a different one; missing on both sides
    # (no /proc) leaves pid + host, as before.
    if "pid_ns" not in holder and _pid_ns():
        return "by a canestra that did not record its PID namespace"
    if holder.get("pid_ns") != _pid_ns():
        return "in another PID namespace (a container sharing this folder?)"
    if holder.get("boot_id") != _boot_id():
        return "in another boot of this host, or on another machine with the same host name"
    return None


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
    if _elsewhere(holder):
        return False  # cannot see that process: only proof of death may take a lock over
    try:
        pid = int(holder["pid"])
    except (KeyError, TypeError, ValueError):
        return True  # unreadable lock on this host: its writer died while writing it
    return not _alive(pid, holder.get("proc_start"))


def _busy(where: str, holder: dict) -> OutputError:
    unsure = _elsewhere(holder) if holder and "host" in holder else None
    seen = f" {unsure}, which this run cannot check" if unsure and unsure != "on another host" else ""
    return OutputError(f"{where} is in use by {describe(holder)}{seen}: wait for it to finish or use another "
                       f"--out (if that run is gone, remove {where.rstrip('/')}/{LOCK_NAME})")


def _acquire_local(out_dir: str, holder: dict, note, clear_stale_staging: bool = True) -> str:
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
        if stale and clear_stale_staging:
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


def _release_s3(uri: str, holder: dict) -> None:
    """Delete the lock object only while it is still ours: read it back, then delete on its ETag."""
    opts = storage.s3_options()
    bucket, key = s3.split_uri(uri)
    c = s3.client(opts)
    try:
        got = c.get_object(Bucket=bucket, Key=key)
        ours = json.loads(got["Body"].read()) == holder
    except Exception:  # gone, or unreadable: either way not provably ours
        return
    if not ours:
        return  # removed by hand and taken by another run meanwhile: that run's lock stays
    try:
        c.delete_object(Bucket=bucket, Key=key, IfMatch=got["ETag"])
    except Exception as exc:
        code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code")
        # A store (or a botocore older than 1.35) without conditional deletes: compared just above.
        if code == "NotImplemented" or type(exc).__name__ == "ParamValidationError":
            c.delete_object(Bucket=bucket, Key=key)
        # else PreconditionFailed: replaced since we read it, so not ours any more


def _stderr_note(message: str) -> None:
    print(f"canestra: note: {message}", file=sys.stderr)


def _acquire(out: str, holder: dict, note, clear_stale_staging: bool) -> tuple[str, str | None]:
    """(lock path or URI, local output folder or None for s3://)."""
    if s3.is_s3(out):
        return _acquire_s3(out, holder), None
    out_dir = storage.local_path(out)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {out_dir} ({exc.strerror or exc}): choose another --out") from exc
    return _acquire_local(out_dir, holder, note, clear_stale_staging), out_dir


def _release(path: str, out_dir: str | None, holder: dict) -> None:
    if out_dir is None:
        with contextlib.suppress(Exception):
            _release_s3(path, holder)
    else:
        _release_local(path, holder)


@contextlib.contextmanager
def out_locks(outs: Iterable[str], command: str, note=_stderr_note,
              clear_stale_staging: bool = True) -> Iterator[list[str]]:
    """Hold the lock of every folder in ``outs`` for the block, or none of them.

    For commands that work on a folder of runs (purge, erase): each run folder under it may
    have a run of its own going. All are taken before the block starts; one held by another
    run is an OutputError naming it, and the ones taken so far are released untouched.
    ``clear_stale_staging=False`` (a dry run) leaves a dead run's staging folders in place.
    Yields the locks' paths (or URIs).
    """
    holder = _holder(command)
    held: list[tuple[str, str | None]] = []
    try:
        for out in dict.fromkeys(outs):
            held.append(_acquire(out, holder, note, clear_stale_staging))
    except BaseException:
        for path, out_dir in reversed(held):
            _release(path, out_dir, holder)
        raise
    try:
        yield [path for path, _ in held]
    except BaseException:
        # A failed run (full disk, Spark error, Ctrl-C) leaves no partial staging tables behind:
        # published tables are untouched, and the space goes back to the next run.
        for _, out_dir in held:
            if out_dir is not None:
                _clear_staging(out_dir)
        raise
    finally:
        for path, out_dir in reversed(held):
            _release(path, out_dir, holder)


@contextlib.contextmanager
def out_lock(out: str, command: str, note=_stderr_note) -> Iterator[str]:
    """Hold ``OUT/.canestra.lock`` for the block; OutputError naming the holder when it is taken.

    ``note`` receives the one-line notice printed when a dead run's lock is taken over.
    Yields the lock's path (or URI).
    """
    with out_locks([out], command, note) as paths:
        yield paths[0]
