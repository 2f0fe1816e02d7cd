"""GDPR Art. 5(1)(e) storage limitation: remove run outputs older than a retention period.

``purge(out_dir, older_than_days)`` works on a canestra output folder (one run, or a folder
of runs) and removes every output unit older than the limit. It only ever removes what
canestra writes, by name, inside a *run folder* (a folder holding something only canestra
writes: a table manifest, ``model/canestra_model.json``, a ``watch`` checkpoint or batch,
``_logs/spark.log``, or an audit log of a run that wrote there). A folder with no run folder
in it is refused whole: a photo folder passed by mistake loses nothing. The user's own files,
the lock, ``watch``'s checkpoint and work folders (``_checkpoints/``, ``_watch/``) and the
governance records (``_audit/``, ``_gdpr/``: no image data, and they prove what was done)
are never touched, and no folder is removed that canestra did not create.

Units: a table with a manifest (``catalog``, ``features``, ``eval_catalog``, one feature
store part) goes whole, dated by the manifest's ``created_at``; a table written in
batches (``predictions/``: ``watch`` adds one file per micro-batch, ``predict --incremental``
adds part files) expires file by file, each dated by its own mtime, so a live stream's old
rows go while its new ones stay; the rows of expired batches also leave ``predictions.csv``.
A model folder, a run's error gallery (``gallery/``, the worst-error thumbnails report.html
shows), a known file (predictions.csv, quarantine.csv, metrics.json, report.html,
``_logs/spark.log``, …) or a ``_staging`` leftover goes whole, as old as its newest file.

Every run folder's ``OUT/.canestra.lock`` is held while purging (a running ``watch``, or any
run, makes purge refuse), so no live run's files or staging are touched; ``dry_run`` only lists.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from canestra.errors import InputError, NotAnOutput
from canestra.layout import (
    AUDIT_DIR,
    AUDIT_FILE,
    CATALOG,
    EVAL_CATALOG,
    EVAL_QUARANTINE_CSV,
    FEATURES,
    GALLERY,
    GDPR_DIR,
    LOGS_DIR,
    MANIFEST,
    METRICS_JSON,
    MODEL,
    MODEL_INFO,
    PREDICTIONS_CSV,
    QUARANTINE_CSV,
    REPORT_HTML,
    SPARK_LOG,
    STAGING,
    TRAINING_IDS,
)
from canestra.pipeline.features import PART_PREFIX, STORE
from canestra.privacy import erase
from canestra.storage import files as storage

DAY = 86400.0
PREDICTIONS = "predictions"  # pipeline.predict.PREDICTIONS (that module needs Spark)
CHECKPOINTS, WATCH_DIR = "_checkpoints", "_watch"  # pipeline.watch's checkpoint and work folders
TABLES = (CATALOG, FEATURES, EVAL_CATALOG, PREDICTIONS)
FILES = (METRICS_JSON, REPORT_HTML, QUARANTINE_CSV, EVAL_QUARANTINE_CSV, PREDICTIONS_CSV)
# Commands whose successful audit record says they wrote outputs into that folder.
_WRITERS = frozenset({"ingest", "train", "predict", "evaluate", "watch", "purge"})
_WATCH_BATCH = re.compile(r"^batch-[0-9a-f]{8}-\d{9}\.parquet$")
# Never descended into looking for runs: canestra's own folders and the governance records.
_NOT_RUNS = frozenset({*TABLES, MODEL, GALLERY, STORE, STAGING, LOGS_DIR, CHECKPOINTS, WATCH_DIR, AUDIT_DIR,
                       GDPR_DIR})
EXPECTED = (f"{CATALOG}/, {MODEL}/{MODEL_INFO}, {PREDICTIONS}/, {STORE}/, {CHECKPOINTS}/watch, "
            f"{LOGS_DIR}/{SPARK_LOG} or {AUDIT_DIR}/{AUDIT_FILE}")


@dataclass
class Expired:
    path: str  # relative to the output folder
    kind: str  # table, batch, model, gallery, staging or file
    age_days: float
    bytes: int


@dataclass
class PurgeResult:
    out_dir: str
    older_than_days: float
    dry_run: bool
    removed: list[Expired] = field(default_factory=list)
    kept: int = 0
    trimmed: list[tuple[str, int]] = field(default_factory=list)  # (csv relative path, rows of expired batches)

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.removed)


# ----------------------------------------------------------------------------- what canestra wrote


def _isdir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def _isfile(path: str) -> bool:
    return os.path.isfile(path) and not os.path.islink(path)


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _audited_writes(folder: str) -> bool:
    """The folder's audit log records a successful run that wrote outputs there."""
    try:
        with open(os.path.join(folder, AUDIT_DIR, AUDIT_FILE), encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                # A refused command (status error) also leaves a record: that makes no folder an output.
                if isinstance(rec, dict) and rec.get("status") == "ok" and rec.get("command") in _WRITERS:
                    return True
    except OSError:
        pass
    return False


def is_run_folder(folder: str) -> bool:
    """Whether ``folder`` holds something only canestra writes (it is some run's --out)."""
    j = os.path.join
    if _isfile(j(folder, MODEL, MODEL_INFO)) or _isfile(j(folder, MODEL, TRAINING_IDS)):
        return True
    if any(_isfile(j(folder, t, MANIFEST)) for t in TABLES):
        return True
    if any(_WATCH_BATCH.match(n) for n in _listdir(j(folder, PREDICTIONS))):
        return True
    if _isfile(j(folder, CHECKPOINTS, "watch", "metadata")) or _isfile(j(folder, LOGS_DIR, SPARK_LOG)):
        return True
    if any(_isfile(j(part, MANIFEST)) for _, part in _store_parts(folder)):
        return True
    return _audited_writes(folder)


def run_folders(root: str) -> list[str]:
    """``root`` and every folder under it that is a run folder (symlinks are not followed)."""
    found: list[str] = []

    def visit(folder: str) -> None:
        if is_run_folder(folder):
            found.append(folder)
        for name in _listdir(folder):
            path = os.path.join(folder, name)
            if name not in _NOT_RUNS and not name.startswith(".") and _isdir(path):
                visit(path)

    visit(root)
    return found


def _store_parts(run: str) -> Iterator[tuple[str, str]]:
    store = os.path.join(run, STORE)
    for key in _listdir(store):
        for part in _listdir(os.path.join(store, key)):
            path = os.path.join(store, key, part)
            if part.startswith(PART_PREFIX) and _isdir(path):
                yield os.path.join(store, key), path


def _data_files(table: str) -> list[str]:
    return [os.path.join(table, n) for n in _listdir(table)
            if not n.startswith(("_", ".")) and _isfile(os.path.join(table, n))]


def _manifest_time(table: str) -> float | None:
    try:
        with open(os.path.join(table, MANIFEST), encoding="utf-8") as fh:
            stamp = json.load(fh).get("created_at")
        if stamp:
            return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return None


def _units_of(run: str) -> Iterator[tuple[str, str]]:
    """(path, kind) of every output unit canestra wrote directly in the run folder ``run``."""
    for name in TABLES:
        table = os.path.join(run, name)
        if not _isdir(table):
            continue
        if name == PREDICTIONS and not os.path.isfile(os.path.join(table, MANIFEST)):
            # Appended to in batches (watch, predict --incremental): each file has its own age.
            for part in _data_files(table):
                yield part, "batch"
        else:  # written whole by one run
            yield table, "table"
    for _, part in _store_parts(run):
        yield part, "table"
    for name, kind in ((MODEL, "model"), (GALLERY, "gallery"), (STAGING, "staging")):
        if _isdir(os.path.join(run, name)):
            yield os.path.join(run, name), kind
    for name in (*FILES, os.path.join(LOGS_DIR, SPARK_LOG)):
        if _isfile(os.path.join(run, name)):
            yield os.path.join(run, name), "file"


def output_units(out_dir: str) -> Iterator[tuple[str, str]]:
    """(path, kind) of every unit canestra wrote under ``out_dir``, in every run folder there."""
    for run in run_folders(out_dir):
        yield from _units_of(run)


def _tree(path: str) -> Iterator[os.stat_result]:
    if not _isdir(path):
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
        stamp = _manifest_time(path)
        if stamp is not None:
            return stamp
    stats = list(_tree(path))
    return max((s.st_mtime for s in stats), default=os.lstat(path).st_mtime)


# ----------------------------------------------------------------------------- removing


def _remove(path: str) -> None:
    if _isdir(path):
        shutil.rmtree(path)
    else:
        os.remove(path)
        # Hadoop's checksum of the part: Spark would look for its data file.
        crc = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.crc")
        with contextlib.suppress(FileNotFoundError):
            os.remove(crc)


def _expired_ids(table: str, expired: list[str]) -> set[str]:
    """Image ids of the expired batch files that no kept file of ``table`` still holds."""
    import pyarrow.parquet as pq

    def ids(parts) -> set[str]:
        out: set[str] = set()
        for part in parts:
            try:
                pf = pq.ParquetFile(part)
                if "image_id" in pf.schema_arrow.names:
                    out.update(v for v in pf.read(columns=["image_id"]).column(0).to_pylist() if v)
            except Exception:  # not Parquet after all: it names no rows
                continue
        return out

    gone = set(expired)
    return ids(expired) - ids(p for p in _data_files(table) if p not in gone)


def _remove_emptied(folders: list[str], root: str) -> None:
    """Remove folders canestra created that the purge left empty (never ``root``, never a user's)."""
    for folder in sorted(folders, key=lambda f: -len(f)):
        if folder != root:
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def _check(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise InputError(f"output folder {root} does not exist: pass the --out folder whose old runs to purge")
    runs = run_folders(root)
    if not runs:
        raise NotAnOutput(f"{root} is not a canestra output (no {EXPECTED} in it or in a folder under it): "
                         "purge only removes what canestra wrote; pass the --out of a canestra run")
    return runs


def purge(out_dir: str, older_than_days: float | None, *, dry_run: bool = False,
          now: float | None = None) -> PurgeResult:
    """Remove (or, with ``dry_run``, list) every output unit older than ``older_than_days``.

    InputError for a folder that is not a canestra output; OutputError (naming the holder)
    while a run holds the lock of the folder or of a run folder in it.
    """
    from canestra.storage import lock

    if older_than_days is None or older_than_days < 0:
        raise InputError("--older-than must be a number of days >= 0 (or set CANESTRA_RETENTION_DAYS)")
    root = os.path.abspath(storage.local_path(out_dir))
    runs = _check(root)
    now = time.time() if now is None else now
    limit = now - older_than_days * DAY
    res = PurgeResult(root, older_than_days, dry_run)
    emptied: list[str] = []
    # A dry run lists only: taking over a dead run's lock then leaves its staging folders to the next run.
    with lock.out_locks([root, *runs], "purge", clear_stale_staging=not dry_run):
        for run in runs:
            if not dry_run:  # a table a killed publish left renamed aside is a table again, dated as such
                storage.recover_publishes(run)
            batches: dict[str, list[str]] = {}
            for path, kind in list(_units_of(run)):
                born = created_at(path, kind)
                if born >= limit:
                    res.kept += 1
                    continue
                size = sum(s.st_size for s in _tree(path))
                res.removed.append(Expired(os.path.relpath(path, root), kind, round((now - born) / DAY, 2), size))
                if kind == "batch":
                    batches.setdefault(os.path.dirname(path), []).append(path)
                elif not dry_run:
                    _remove(path)
            for table, expired in batches.items():
                csv_path = os.path.join(run, PREDICTIONS_CSV)
                # A predictions.csv that expired itself goes whole; a young one loses the expired rows.
                if os.path.basename(table) == PREDICTIONS and _isfile(csv_path) and \
                        created_at(csv_path, "file") >= limit:
                    dropped = erase.rewrite_csv(csv_path, erase.id_matcher(_expired_ids(table, expired)), dry_run=dry_run)
                    if dropped:
                        res.trimmed.append((os.path.relpath(csv_path, root), dropped))
                if dry_run:
                    continue
                if len(expired) == len(_data_files(table)):
                    shutil.rmtree(table)  # every batch expired: the table goes whole (_SUCCESS, temp files)
                else:
                    for part in expired:
                        _remove(part)
            store = os.path.join(run, STORE)
            emptied += [run, os.path.join(run, LOGS_DIR), store, *(os.path.join(store, k) for k in _listdir(store))]
    if not dry_run:
        # After the locks are released: a run folder is empty only without its lock file.
        _remove_emptied(emptied, root)
    return res
