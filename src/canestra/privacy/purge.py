"""GDPR Art. 5(1)(e) storage limitation: remove run outputs older than a retention period.

``purge(out_dir, older_than_days)`` walks an output folder (one run, or a folder of
runs) and removes every output unit older than the limit: a Parquet table, a model
folder, a run's error gallery (``gallery/``, the worst-error thumbnails report.html
shows), a file (predictions.csv, quarantine.csv, metrics.json, report.html, …) or a
``_staging`` leftover. A unit's age is its newest file's mtime, or the ``created_at``
of its ``_canestra.json`` manifest when it has one: a table is as young as its
newest part. The feature store (``feature_store/<key>/part-*/``) is appended to by every
run: each part is a unit of its own with a manifest, so old embeddings expire while newer
parts stay (a later run re-embeds any image it still needs). Units go whole (a table is
never left half-deleted), folders left empty
are removed, and ``dry_run`` only lists. The governance records (``_audit/``,
``_gdpr/``) are kept: they hold no image data and prove what was done.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from canestra.errors import InputError
from canestra.layout import GALLERY, GOVERNANCE_DIRS, MANIFEST, STAGING
from canestra.storage import files as storage

KEEP = GOVERNANCE_DIRS
DAY = 86400.0


@dataclass
class Expired:
    path: str  # relative to the output folder
    kind: str  # table, model, gallery, staging or file
    age_days: float
    bytes: int


@dataclass
class PurgeResult:
    out_dir: str
    older_than_days: float
    dry_run: bool
    removed: list[Expired] = field(default_factory=list)
    kept: int = 0

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.removed)


def _kind(path: str) -> str | None:
    """The kind of an output unit, or None for a plain folder (a run, or a folder of runs)."""
    if os.path.basename(path) == STAGING:
        return "staging"
    if os.path.basename(path) == GALLERY:
        return "gallery"
    if os.path.isdir(os.path.join(path, "metadata")) and os.path.isdir(os.path.join(path, "stages")):
        return "model"
    names = os.listdir(path)
    if MANIFEST in names or "_SUCCESS" in names or any(n.endswith(".parquet") for n in names):
        return "table"
    return None


def output_units(out_dir: str) -> Iterator[tuple[str, str]]:
    """(path, kind) of every unit under ``out_dir``, governance folders excluded."""
    for entry in sorted(os.scandir(out_dir), key=lambda e: e.name):
        if entry.name in KEEP:
            continue
        if entry.is_dir(follow_symlinks=False):
            kind = _kind(entry.path)
            if kind:
                yield entry.path, kind
            else:
                yield from output_units(entry.path)
        else:
            yield entry.path, "file"


def _tree(path: str) -> Iterator[os.stat_result]:
    if not os.path.isdir(path) or os.path.islink(path):
        yield os.lstat(path)
        return
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                yield os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                pass


def created_at(path: str, kind: str) -> float:
    """When a unit was written (seconds since the epoch)."""
    if kind == "table":
        try:
            with open(os.path.join(path, MANIFEST), encoding="utf-8") as fh:
                stamp = json.load(fh).get("created_at")
            if stamp:
                return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        except (OSError, ValueError, AttributeError, TypeError):
            pass
    stats = list(_tree(path))
    return max((s.st_mtime for s in stats), default=os.lstat(path).st_mtime)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def _remove_empty_dirs(root: str) -> None:
    for dirpath, _, _ in sorted(os.walk(root, topdown=False), key=lambda w: -len(w[0])):
        if dirpath != root and os.path.basename(dirpath) not in KEEP:
            try:
                os.rmdir(dirpath)
            except OSError:
                pass


def purge(out_dir: str, older_than_days: float | None, *, dry_run: bool = False, now: float | None = None) -> PurgeResult:
    """Remove (or, with ``dry_run``, list) every output unit older than ``older_than_days``."""
    if older_than_days is None or older_than_days < 0:
        raise InputError("--older-than must be a number of days >= 0 (or set CANESTRA_RETENTION_DAYS)")
    root = storage.local_path(out_dir)
    if not os.path.isdir(root):
        raise InputError(f"output folder {root} does not exist: pass the --out folder whose old runs to purge")
    now = time.time() if now is None else now
    limit = now - older_than_days * DAY
    res = PurgeResult(root, older_than_days, dry_run)
    for path, kind in list(output_units(root)):
        born = created_at(path, kind)
        if born >= limit:
            res.kept += 1
            continue
        size = sum(s.st_size for s in _tree(path))
        res.removed.append(Expired(os.path.relpath(path, root), kind, round((now - born) / DAY, 2), size))
        if not dry_run:
            _remove(path)
    if not dry_run:
        _remove_empty_dirs(root)
    return res
