"""Where bytes live: listing image trees, reading image bytes, publishing outputs.

The one module that touches storage. Local paths and ``file://`` are handled here;
``s3://bucket/prefix`` dispatches to ``s3.py`` (boto3, also on the executors).
Tables are published atomically: written to a staging directory, then renamed into
place, so a crashed run never leaves a half-written table under its final name
(on S3, which has no rename, publishing is copy-then-delete; see docs/storage.md).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from canestra.errors import InputError, OutputError
from canestra.layout import STAGING
from canestra.storage import s3

__all__ = ["ListedFile", "append_parts", "configure_s3", "current_s3", "discard_dir", "display", "ensure_output_dir",
           "exists", "is_dir", "is_junk", "is_remote", "list_images", "local_path", "publish_dir", "read_bytes",
           "read_text", "recover_publishes", "s3_options", "s3_options_for", "staging_dir", "unreadable_reason",
           "write_bytes_atomic", "write_lines_atomic", "write_text_atomic"]

# OS leftovers that are never images and must not flood quarantine.csv (besides dot-files
# such as .DS_Store and AppleDouble ._x): compared in lower case, files and folders alike.
JUNK_NAMES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "__macosx", "@eadir", "$recycle.bin",
                        "system volume information", "icon\r"})


def is_junk(name: str) -> bool:
    """Hidden dot-files/folders and OS junk: skipped by listings (names never decide what an image is)."""
    return name.startswith(".") or name.lower() in JUNK_NAMES


@dataclass(frozen=True, slots=True)  # slots: ~100 bytes less per listed file on the driver
class ListedFile:
    path: str  # absolute path (or URI for remote storage)
    label: str | None  # class folder name; None for files directly under the root
    size: int
    mtime: float
    error: str | None = None  # set when the entry could not be listed: it goes to quarantine unread


class ReadRefused(OSError):
    """A file not read on purpose (not a regular file, too large); ``str()`` is the plain reason."""


def unreadable_reason(exc: OSError, path: str | None = None, what: str = "file") -> str:
    """The plain quarantine reason for an OSError met while listing or reading ``path``."""
    if isinstance(exc, ReadRefused):
        return str(exc)
    code = exc.errno
    link = path is not None and path != "" and not is_remote(path) and os.path.islink(local_path(path))
    if code == errno.ELOOP:
        return "unreadable: symbolic link loop (the link points back to itself)"
    if link and code in (errno.ENOENT, errno.ENOTDIR):
        return "unreadable: broken symbolic link (its target does not exist)"
    if code in (errno.EACCES, errno.EPERM):
        return f"unreadable: permission denied (the user running canestra may not read this {what})"
    if isinstance(exc, FileNotFoundError) or code == errno.ENOENT:
        return f"unreadable: the {what} vanished after listing (deleted or moved while the job ran)"
    return f"unreadable {what}: {exc.strerror or exc}"


# The S3 options of the running call: a context variable, so each thread (and each API call, which
# restores the previous value when it ends) has its own; executors get them explicitly (s3_options_for).
_s3_options: contextvars.ContextVar[s3.S3Options | None] = contextvars.ContextVar("canestra_s3_options",
                                                                                  default=None)


def configure_s3(options: s3.S3Options | None) -> None:
    """Set the S3 options of the running call (the CLI's command, or an API call); None = from env."""
    _s3_options.set(options)


def current_s3() -> s3.S3Options | None:
    """The options ``configure_s3`` set in this context, or None."""
    return _s3_options.get()


def s3_options() -> s3.S3Options:
    """The driver's S3 options: configured, else from ``CANESTRA_*``/``AWS_*`` env vars."""
    configured = _s3_options.get()
    if configured is not None:
        return configured
    from canestra.config import Settings

    return s3.S3Options.from_settings(Settings.load())


def s3_options_for(files: list[ListedFile]) -> s3.S3Options | None:
    """The options the executors need to read ``files``: None when none is on S3."""
    return s3_options() if any(s3.is_s3(f.path) for f in files) else None


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def display(uri: str) -> str:
    """How to show a location in messages: the URI for remote storage, else the absolute path."""
    return str(uri).rstrip("/") if s3.is_s3(uri) else local_path(uri)


def local_path(uri: str) -> str:
    """``file:///x`` or ``/x`` or ``x`` -> absolute local path."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        scheme = uri.split("://", 1)[0]
        if s3.is_s3(uri):
            raise InputError(f"{uri}: this needs a local path or file:// (s3:// works for --images and --out "
                             "of ingest, train, predict and evaluate)")
        raise InputError(f"storage scheme {scheme}:// is not supported: use a local path, file:// or s3://")
    return os.path.abspath(os.path.expanduser(uri))


def list_images(uri: str, s3_opts: s3.S3Options | None = None) -> list[ListedFile]:
    """List ``<root>/<Class>/<file>`` (label = folder) and ``<root>/<file>`` (no label).

    Every regular file is listed whatever its name (the reader decides by content), except
    hidden dot-files and OS junk (``is_junk``). An entry that cannot be listed (link loop,
    broken link, unreadable folder, pipe or device) is listed with ``error`` set, so it is
    quarantined with its reason while the job goes on. Links to folders are followed, except
    one leading back to a folder above it.
    """
    if s3.is_s3(uri):
        return _list_s3(uri, s3_opts or s3_options())
    root = local_path(uri)
    if not os.path.exists(root):
        raise InputError(f"images folder {root} does not exist: check the --images path")
    if os.path.isfile(root):
        st = os.stat(root)
        return [ListedFile(root, None, st.st_size, st.st_mtime)]
    if not os.access(root, os.R_OK | os.X_OK):
        raise InputError(f"images folder {root} is not readable: check its permissions")
    out: list[ListedFile] = []
    _walk(root, None, frozenset({_dir_key(root)}), out)
    return out


def _dir_key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _walk(folder: str, label: str | None, above: frozenset, out: list[ListedFile]) -> None:
    """Depth first, in name order: at the root files and class folders mixed, below files then sub-folders."""
    try:
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not is_junk(e.name)), key=lambda e: e.name)
    except OSError as exc:
        out.append(ListedFile(folder, label, -1, 0.0, unreadable_reason(exc, folder, "folder")))
        return
    later: list[tuple[str, str | None, frozenset]] = []
    for entry in entries:
        path = os.path.abspath(entry.path)
        try:
            st = os.stat(path)  # follows links: ELOOP, ENOENT (broken link), EACCES land here
        except OSError as exc:
            out.append(ListedFile(path, label, -1, 0.0, unreadable_reason(exc, path)))
            continue
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            sub_label = entry.name if label is None else label  # nested folders keep the class folder
            if key in above:
                out.append(ListedFile(path, sub_label, -1, 0.0,
                                      "unreadable: folder link loop (it links back to a folder above it)"))
            elif label is None:
                _walk(path, sub_label, above | {key}, out)
            else:
                later.append((path, sub_label, above | {key}))
        elif stat.S_ISREG(st.st_mode):
            out.append(ListedFile(path, label, st.st_size, st.st_mtime))
        else:
            out.append(ListedFile(path, label, -1, st.st_mtime, f"not a regular file ({_kind(st.st_mode)})"))
    for sub_path, sub_folder_label, keys in later:
        _walk(sub_path, sub_folder_label, keys, out)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device")):
        if test(mode):
            return name
    return "a special file"


def _list_s3(uri: str, opts: s3.S3Options) -> list[ListedFile]:
    out = []
    for obj_uri, rel, size, mtime in s3.list_objects(uri, opts):
        parts = rel.split("/")
        if any(is_junk(p) for p in parts):
            continue
        out.append(ListedFile(obj_uri, parts[0] if len(parts) > 1 else None, size, mtime))
    return sorted(out, key=lambda f: (f.label is not None, f.label or "", f.path))


def read_bytes(path: str, s3_opts: s3.S3Options | None = None, max_bytes: int | None = None) -> bytes:
    """An image's bytes. Runs on the executors: pass the driver's ``s3_opts`` along for S3.

    A local path that is no longer a regular file (a pipe would block forever) or holds more
    than ``max_bytes`` raises ReadRefused without being read.
    """
    if s3.is_s3(path):
        return s3.read_bytes(path, s3_opts or s3_options())
    # O_NONBLOCK: opening a FIFO must not wait for a writer; regular files ignore it.
    fd = os.open(local_path(path) if path.startswith("file://") else path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ReadRefused(f"not a regular file ({_kind(st.st_mode)})")
        too_large = max_bytes is not None and st.st_size > max_bytes
        data = b"" if too_large else fh.read(-1 if max_bytes is None else max_bytes + 1)
        if too_large or (max_bytes is not None and len(data) > max_bytes):
            raise ReadRefused(f"file too large: {max(st.st_size, len(data))} bytes exceeds the {max_bytes}-byte limit")
        return data


def check_spark_filesystem(spark, uri: str) -> None:
    """Refuse a remote table location Spark has no Hadoop filesystem for, before anything is written."""
    scheme = str(uri).split("://", 1)[0]
    try:
        jvm, conf = spark._jvm, spark._jsc.hadoopConfiguration()
    except Exception:  # Spark Connect: no JVM to ask, let Spark report it
        return
    try:
        jvm.org.apache.hadoop.fs.FileSystem.getFileSystemClass(scheme, conf)
    except Exception:
        if s3.is_s3(uri):
            raise OutputError(
                f"writing tables to {scheme}:// needs EMRFS (on EMR) or the hadoop-aws jars: use a local/HDFS --out "
                f"here (--images {scheme}://… works without them)"
            ) from None
        raise OutputError(f"Spark has no filesystem for {scheme}:// ({uri}): use a local or HDFS --out") from None


def ensure_output_dir(uri: str, spark=None) -> str:
    """Create the output folder and prove it is writable; return its local path (or URI).

    With ``spark``, a remote ``uri`` is also checked against Spark's Hadoop filesystems,
    so a run that could not write its tables fails before writing anything.
    """
    if s3.is_s3(uri):
        if spark is not None:
            check_spark_filesystem(spark, uri)
        s3.probe_writable(uri, s3_options())
        return str(uri).rstrip("/")
    out = local_path(uri)
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".canestra-write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OutputError(f"cannot write to output folder {out} ({reason}): choose another --out or fix its permissions") from exc
    recover_publishes(out)  # a table a killed run left renamed aside comes back before anything reads it
    return out


def staging_dir(final: str) -> str:
    """A fresh sibling directory to write a table into before publishing it."""
    parent = os.path.dirname(final.rstrip("/"))
    return os.path.join(parent, STAGING, f"{os.path.basename(final.rstrip('/'))}-{uuid.uuid4().hex[:12]}")


def publish_dir(staging: str, final: str) -> None:
    """Move a complete staging directory to its final name, replacing the old one.

    Locally the two directories swap names in one atomic step (``renameat2`` with
    ``RENAME_EXCHANGE``, Linux), so a crash at any instant leaves the complete old table or
    the complete new one under the final name, never neither. Where the filesystem cannot
    swap (NFS, macOS), the old table is first renamed aside to ``.<name>-<id>.canestra-old``
    beside ``final`` (not under ``_staging/``, which lock takeovers clear), Ctrl-C is held
    back until the new one is in, and a kill in between is repaired by ``recover_publishes``
    (run by the next run's ``ensure_output_dir``, by the next publish of that table and by
    ``erase``).
    """
    if s3.is_s3(final):
        s3.replace_tree(staging, final, s3_options())
        return
    final = final.rstrip("/")
    parent = os.path.dirname(final)
    recover_publishes(parent, os.path.basename(final))  # an earlier publish of this table killed halfway
    if not os.path.lexists(final):
        os.replace(staging, final)
    elif _exchange(staging, final):
        shutil.rmtree(staging, ignore_errors=True)  # the old table, now under the staging name
    else:
        aside = _aside_name(staging)
        with _signals_held():
            os.replace(final, aside)
            try:
                os.replace(staging, final)
            except BaseException:
                os.replace(aside, final)  # put the old table back rather than leave no table at all
                raise
        shutil.rmtree(aside, ignore_errors=True)
    discard_dir(staging)  # gone already: this removes _staging/ when empty


_OLD_SUFFIX = ".canestra-old"
_ASIDE = re.compile(r"^\.(?P<name>.+)-(?P<tag>[0-9a-f]{12})" + re.escape(_OLD_SUFFIX) + "$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2: list = []  # [libc function or None], looked up once


def _aside_name(staging: str) -> str:
    """Where the old table waits during a two-rename publish: beside the final name, hidden."""
    parent = os.path.dirname(os.path.dirname(staging))  # staging is <parent>/_staging/<name>-<tag>
    return os.path.join(parent, f".{os.path.basename(staging)}{_OLD_SUFFIX}")


def _exchange(a: str, b: str) -> bool:
    """Swap two existing paths atomically; False where the OS or filesystem cannot."""
    if not _renameat2:
        func = None
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                func = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.4
        if func is not None:
            func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            func.restype = ctypes.c_int
        _renameat2.append(func)
    func = _renameat2[0]
    if func is None:
        return False
    if func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # this filesystem cannot swap: the caller falls back to two renames
    raise OSError(code, os.strerror(code), b)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C/SIGTERM back for a few renames and deliver them right after.

    Python-level handlers, not a signal mask: a mask covers one thread, and the kernel hands a
    process-wide signal to any thread that does not block it (Arrow's, Spark's)."""
    caught: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not None:  # None: set outside Python, cannot be put back
                previous[sig] = signal.signal(sig, lambda s, _f: caught.append(s))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in caught:
            os.kill(os.getpid(), signum)  # now, with the program's own handlers


def recover_publishes(folder: str, name: str | None = None) -> list[str]:
    """Repair the two-rename publishes that a kill interrupted in ``folder`` (only table ``name``
    when given): finish the publish when its complete new table is still in ``_staging/``, else
    put the old table back. Returns the tables repaired; call it while holding the --out lock."""
    repaired: list[str] = []
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        return repaired
    for entry in entries:
        m = _ASIDE.match(entry)
        if not m or (name is not None and m["name"] != name):
            continue
        aside, final = os.path.join(folder, entry), os.path.join(folder, m["name"])
        staging = os.path.join(folder, STAGING, f"{m['name']}-{m['tag']}")
        if os.path.lexists(final):  # the publish got through: this is the replaced table
            shutil.rmtree(aside, ignore_errors=True)
            continue
        if os.path.isdir(staging):
            # The old table is only renamed aside once the new one is complete: finish the publish.
            os.replace(staging, final)
            shutil.rmtree(aside, ignore_errors=True)
            discard_dir(staging)
        else:  # the new table is gone (a lock takeover cleared _staging/): the old one comes back
            os.replace(aside, final)
        repaired.append(final)
    return repaired


def append_parts(staging: str, final: str) -> int:
    """Move the data files of a complete staging table into the existing local table ``final``.

    Each file arrives by one rename (atomic), so readers see a new file whole or not at all; a
    run killed halfway has added some of its files, and callers that skip rows already in the
    table add the rest next time. Returns the number of files moved.
    """
    tag = uuid.uuid4().hex[:8]
    moved = 0
    for name in sorted(os.listdir(staging)):
        if name.startswith(("_", ".")):  # _SUCCESS, checksum files: not data
            continue
        os.replace(os.path.join(staging, name), os.path.join(final, f"{tag}-{name}"))
        moved += 1
    discard_dir(staging)
    return moved


def discard_dir(staging: str) -> None:
    """Remove a local staging directory (and ``_staging/`` when it is left empty)."""
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(staging))


def write_text_atomic(path: str, text: str) -> None:
    """Write a small file whole or not at all (on S3: one encrypted PutObject)."""
    write_lines_atomic(path, (text,))


def write_lines_atomic(path: str, chunks: Iterable[str]) -> None:
    """Write the concatenated ``chunks`` whole or not at all. Locally they are streamed to a temp
    file, so a long listing never sits in memory as one string; on S3 one encrypted PutObject."""
    _write_atomic(path, (chunk.encode("utf-8") for chunk in chunks))


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write a small binary file (an image of the feedback store) whole or not at all, as
    ``write_lines_atomic``: a local temp file (mode 0600) renamed into place, or one encrypted PutObject."""
    _write_atomic(path, (data,))


def _write_atomic(path: str, chunks: Iterable[bytes]) -> None:
    if s3.is_s3(path):
        s3.write_bytes(path, b"".join(chunks), s3_options())
        return
    path = local_path(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:  # e.g. disk full: leave no partial temp file beside the intact old one
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_text(path: str) -> str | None:
    """A small file's text, or None when it does not exist."""
    try:
        if s3.is_s3(path):
            return s3.read_bytes(path, s3_options()).decode("utf-8")
        with open(local_path(path), encoding="utf-8") as fh:
            return fh.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


def exists(path: str) -> bool:
    if s3.is_s3(path):
        return s3.exists(path, s3_options())
    return os.path.exists(local_path(path))


def is_dir(path: str) -> bool:
    """A local folder, or an S3 prefix with objects under it."""
    if s3.is_s3(path):
        return s3.exists(path, s3_options())
    return os.path.isdir(local_path(path))
