"""Where bytes live: listing image trees, reading image bytes, publishing outputs.

The one module that touches storage, so S3 (s3fs/boto3 from the executors) can
slot in behind the same functions. Tables are published atomically: written to a
staging directory, then renamed into place, so a crashed run never leaves a
half-written table under its final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, OutputError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class ListedFile:
    path: str  # absolute path (or URI for remote storage)
    label: str | None  # class folder name; None for files directly under the root
    size: int
    mtime: float


def local_path(uri: str) -> str:
    """``file:///x`` or ``/x`` or ``x`` -> absolute local path."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise InputError(f"storage scheme {scheme}:// is not supported yet: use a local path or file://")
    return os.path.abspath(os.path.expanduser(uri))


def list_images(uri: str) -> list[ListedFile]:
    """List ``<root>/<Class>/<file>`` (label = folder) and ``<root>/<file>`` (no label).

    Hidden files are skipped; every other regular file or link is listed, so that
    non-images are reported in quarantine rather than silently ignored.
    """
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


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def ensure_output_dir(uri: str) -> str:
    """Create the output folder and prove it is writable; return its local path."""
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
    return os.path.join(parent, "_staging", f"{os.path.basename(final.rstrip('/'))}-{uuid.uuid4().hex[:12]}")


def publish_dir(staging: str, final: str) -> None:
    """Move a complete staging directory to its final name, replacing the old one.

    The old version is first renamed aside, so at every instant the final name is
    either the complete old table or the complete new one.
    """
    trash = None
    if os.path.exists(final):
        trash = staging + ".old"
        os.replace(final, trash)
    os.replace(staging, final)
    if trash:
        shutil.rmtree(trash, ignore_errors=True)
    parent = os.path.dirname(staging)
    try:
        os.rmdir(parent)  # remove _staging/ when empty
    except OSError:
        pass


def write_text_atomic(path: str, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=os.path.basename(path))
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
    os.replace(tmp, path)
