"""The feedback store: photos users corrected in the app (``POST /v1/feedback``), each with the right answer.

Layout (a local folder or an ``s3://`` prefix: ``serve --feedback-dir`` / ``CANESTRA_FEEDBACK_DIR``)::

    STORE/_canestra_feedback.json          marks the folder as a feedback store (format, created_at; nothing personal)
    STORE/family/<Family>/<image_id>.jpg   a photo whose right answer is a family ("Apple")
    STORE/variety/<Class>/<image_id>.png   ... a variety the served model knows ("Apple Granny Smith")

- The image is the metadata-free copy ingest would keep (``vision.images.clean_image``: EXIF, GPS, XMP,
  ICC and comments dropped, JPEG data kept byte for byte, anything else a bare PNG of the pixels).
- Its name is its ``image_id`` (SHA-256 of the pixels): the pseudonymous id ``/v1/predict`` answered and
  that the catalog, the feature store and predictions use, so ``erase --image-id`` finds it everywhere.
  Never the uploader, a file name or a path.
- Each file is written whole or not at all (``storage.files.write_bytes_atomic``: a local temp file renamed
  into place, mode 0600; on S3 one PutObject with the storage layer's server-side encryption).
- The folder names are the labels ``train --feedback`` reads (``feedback.training``); a file's age (its
  modification time, S3's LastModified) is what ``purge`` expires it by.

Spark-free: ``canestra serve`` writes here.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import time
import unicodedata
from dataclasses import dataclass

from canestra.errors import InputError, OutputError
from canestra.storage import files as storage
from canestra.storage import s3

__all__ = ["LEVELS", "MARKER", "Entry", "add", "check_label", "ensure_store", "entries", "erase", "is_store",
           "purge", "require_store", "summary"]

MARKER = "_canestra_feedback.json"
FORMAT = 1
LEVELS = ("family", "variety")
DAY = 86400.0
_ID = re.compile(r"^[0-9a-f]{64}$")
_EXTENSIONS = {"jpeg": "jpg", "png": "png"}  # CleanImage.format -> file name suffix
_LABEL_MAX = 100


@dataclass(frozen=True)
class Entry:
    """One stored correction: where, at which level, its label and image id, size and age."""

    uri: str
    level: str
    label: str
    image_id: str
    size: int
    mtime: float

    @property
    def name(self) -> str:
        """``family/Apple/<image_id>.jpg``: the entry relative to the store."""
        return f"{self.level}/{self.label}/{self.uri.rsplit('/', 1)[-1]}"


def _root(uri: str) -> str:
    return str(uri).rstrip("/") if s3.is_s3(uri) else storage.local_path(uri)


def _join(root: str, *parts: str) -> str:
    return s3.join(root, *parts) if s3.is_s3(root) else os.path.join(root, *parts)


def check_label(label: str) -> str:
    """A label usable as one folder name: printable text without a path separator; InputError otherwise."""
    text = unicodedata.normalize("NFC", str(label)).strip()
    if (not text or len(text) > _LABEL_MAX or text in (".", "..") or "/" in text or "\\" in text
            or text.startswith((".", "_")) or any(unicodedata.category(c)[0] == "C" for c in text)):
        raise InputError(f"label {label!r} cannot name a class: use a family or variety name such as Apple")
    return text


def is_store(uri: str) -> bool:
    return storage.exists(_join(_root(uri), MARKER))


def require_store(uri: str) -> str:
    """The store's root; InputError when ``uri`` is no feedback store (a mistyped path deletes nothing)."""
    root = _root(uri)
    if not is_store(root):
        raise InputError(f"{storage.display(root)} is not a canestra feedback store (no {MARKER} in it): pass the "
                         "folder `canestra serve --feedback-dir` writes to")
    return root


def ensure_store(uri: str) -> str:
    """The store's root, made (with its marker) when new; OutputError when it cannot be written."""
    if not s3.is_s3(uri) and not os.path.exists(storage.local_path(uri)):
        try:  # a new local store is private to the service's user: its photos are personal data
            os.makedirs(storage.local_path(uri), mode=0o700)
        except OSError:
            pass  # ensure_output_dir says why, plainly
    root = storage.ensure_output_dir(uri)  # local: made and probed; S3: an encrypted write is probed
    marker = _join(root, MARKER)
    if not storage.exists(marker):
        info = {"canestra": "feedback store", "format": FORMAT, "levels": list(LEVELS),
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        storage.write_text_atomic(marker, json.dumps(info, indent=2) + "\n")
    return root


def add(uri: str, content: bytes, fmt: str, image_id: str, level: str, label: str) -> str:
    """Store one cleaned image under ``<level>/<label>/<image_id>.<ext>``; its URI.

    The same image corrected again to the same label replaces its own file (same name); to another
    label it is stored there too, and ``train --feedback`` keeps the newest (``feedback.training``)."""
    if level not in LEVELS:
        raise InputError(f"feedback level {level!r} is not one of {', '.join(LEVELS)}")
    if not _ID.match(image_id):
        raise InputError(f"{image_id!r} is not a canestra image_id (64 hex characters)")
    path = _join(_root(uri), level, check_label(label), f"{image_id}.{_EXTENSIONS.get(fmt, 'img')}")
    try:
        storage.write_bytes_atomic(path, content)
    except OSError as exc:
        raise OutputError(f"cannot write to the feedback store {storage.display(uri)} "
                          f"({exc.strerror or type(exc).__name__})") from None
    return path


def entries(uri: str) -> list[Entry]:
    """Every stored correction; files the store did not write (not named by an image id) are left out."""
    root = _root(uri)
    out: list[Entry] = []
    for level in LEVELS:
        base = _join(root, level)
        if not storage.is_dir(base):
            continue
        for f in storage.list_images(base):
            stem, _, _ = f.path.rsplit("/", 1)[-1].rpartition(".")
            if f.label is not None and f.error is None and _ID.match(stem):
                out.append(Entry(f.path, level, f.label, stem, f.size, f.mtime))
    return out


def _delete(uri: str) -> None:
    if s3.is_s3(uri):
        s3.delete(uri, storage.s3_options())
    else:
        try:
            os.remove(uri)
        except FileNotFoundError:
            pass
        try:  # an emptied label folder goes too (never the level folder or the store)
            os.rmdir(os.path.dirname(uri))
        except OSError:
            pass


def erase(uri: str, image_ids: set[str]) -> list[str]:
    """Delete every stored copy of ``image_ids`` (any label; locally also a crashed write's temp file
    named after one); the entries removed. OutputError when a copy is still there afterwards."""
    root = require_store(uri)
    removed = []
    for e in entries(root):
        if e.image_id in image_ids:
            _delete(e.uri)
            removed.append(e.name)
    if not s3.is_s3(root):
        for dirpath, _, filenames in os.walk(root):
            for name in filenames:
                if name.startswith(".tmp-") and any(i in name for i in image_ids):
                    os.remove(os.path.join(dirpath, name))
    left = [e.name for e in entries(root) if e.image_id in image_ids]
    if left:
        raise OutputError(f"erasure incomplete: the feedback store {storage.display(root)} still holds "
                          f"{', '.join(left[:3])}: delete them by hand or re-run erase")
    return removed


def purge(uri: str, older_than_days: float, *, dry_run: bool = False, now: float | None = None
          ) -> list[tuple[Entry, float]]:
    """Delete (``dry_run``: only list) corrections stored more than ``older_than_days`` ago; (entry, age in days)."""
    if older_than_days is None or older_than_days < 0:
        raise InputError("--older-than must be a number of days >= 0 (or set CANESTRA_RETENTION_DAYS)")
    root = require_store(uri)
    now = time.time() if now is None else now
    expired = [(e, (now - e.mtime) / DAY) for e in entries(root) if now - e.mtime > older_than_days * DAY]
    if not dry_run:
        for e, _ in expired:
            _delete(e.uri)
    return expired


def summary(uri: str, now: float | None = None) -> dict:
    """Counts for the record of processing: images by level, labels, the oldest one's age; no id, no name."""
    root = _root(uri)
    if not is_store(root):
        return {"store": storage.display(root), "exists": False, "images": 0}
    found = entries(root)
    now = time.time() if now is None else now
    return {"store": storage.display(root), "exists": True, "images": len(found),
            "by_level": {level: sum(e.level == level for e in found) for level in LEVELS},
            "labels": len({(e.level, e.label) for e in found}),
            "oldest_days": round(max((now - e.mtime) / DAY for e in found), 2) if found else None}
