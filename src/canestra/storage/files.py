"""Where bytes live: listing image trees, reading image bytes, publishing outputs.

The one module that touches storage. Local paths and ``file://`` are handled here;
``s3://bucket/prefix`` dispatches to ``s3.py`` (boto3, also on the executors).
Tables are published atomically: written to a staging directory, then renamed into
place, so a crashed run never leaves a half-written table under its final name
(on S3, which has no rename, publishing is copy-then-delete; see docs/storage.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from canestra.storage import s3
from canestra.errors import InputError, OutputError
from canestra.layout import STAGING

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class ListedFile:
    path: str  # absolute path (or URI for remote storage)
    label: str | None  # class folder name; None for files directly under the root
    size: int
    mtime: float


_s3_options: s3.S3Options | None = None


def configure_s3(options: s3.S3Options | None) -> None:
    """Set the S3 options of this process (the CLI does, from its flags); None = from env."""
    global _s3_options
    _s3_options = options


def s3_options() -> s3.S3Options:
    """The driver's S3 options: configured, else from ``CANESTRA_*``/``AWS_*`` env vars."""
    if _s3_options is not None:
        return _s3_options
    from canestra.config import Settings

    return s3.S3Options.from_settings(Settings.load())


def s3_options_for(files: list["ListedFile"]) -> s3.S3Options | None:
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

    Hidden files are skipped; every other regular file or link is listed, so that
    non-images are reported in quarantine rather than silently ignored.
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

    def add(entry: os.DirEntry, label: str | None) -> None:
        try:
            st = entry.stat()
            size, mtime = st.st_size, st.st_mtime
        except OSError:  # dangling link or vanished file: list it, reading will quarantine it
            size, mtime = -1, 0.0
        out.append(ListedFile(os.path.abspath(entry.path), label, size, mtime))

    with os.scandir(root) as top:
        for entry in sorted(top, key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                # Class folders may nest sub-folders (e.g. per-session captures): label = top folder.
                for dirpath, dirnames, filenames in os.walk(entry.path):
                    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                    with os.scandir(dirpath) as files:
                        for f in sorted(files, key=lambda e: e.name):
                            if not f.name.startswith(".") and not f.is_dir():
                                add(f, entry.name)
            else:
                add(entry, None)
    return out


def _list_s3(uri: str, opts: s3.S3Options) -> list[ListedFile]:
    out = []
    for obj_uri, rel, size, mtime in s3.list_objects(uri, opts):
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts):
            continue
        out.append(ListedFile(obj_uri, parts[0] if len(parts) > 1 else None, size, mtime))
    return sorted(out, key=lambda f: (f.label is not None, f.label or "", f.path))


def read_bytes(path: str, s3_opts: s3.S3Options | None = None) -> bytes:
    """An image's bytes. Runs on the executors: pass the driver's ``s3_opts`` along for S3."""
    if s3.is_s3(path):
        return s3.read_bytes(path, s3_opts or s3_options())
    with open(local_path(path) if path.startswith("file://") else path, "rb") as fh:
        return fh.read()


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
    return out


def staging_dir(final: str) -> str:
    """A fresh sibling directory to write a table into before publishing it."""
    parent = os.path.dirname(final.rstrip("/"))
    return os.path.join(parent, STAGING, f"{os.path.basename(final.rstrip('/'))}-{uuid.uuid4().hex[:12]}")


def publish_dir(staging: str, final: str) -> None:
    """Move a complete staging directory to its final name, replacing the old one.

    The old version is first renamed aside, so at every instant the final name is
    either the complete old table or the complete new one.
    """
    if s3.is_s3(final):
        s3.replace_tree(staging, final, s3_options())
        return
    trash = None
    if os.path.exists(final):
        trash = staging + ".old"
        os.replace(final, trash)
    try:
        os.replace(staging, final)
    except BaseException:
        if trash:  # put the old table back rather than leave no table at all
            os.replace(trash, final)
        raise
    if trash:
        shutil.rmtree(trash, ignore_errors=True)
    parent = os.path.dirname(staging)
    try:
        os.rmdir(parent)  # remove _staging/ when empty
    except OSError:
        pass


def write_text_atomic(path: str, text: str) -> None:
    """Write a small file whole or not at all (on S3: one encrypted PutObject)."""
    if s3.is_s3(path):
        s3.write_bytes(path, text.encode("utf-8"), s3_options())
        return
    path = local_path(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
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
