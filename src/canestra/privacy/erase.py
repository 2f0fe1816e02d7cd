"""GDPR Art. 17 (right to erasure): remove an image and everything derived from it.

``erase(out_dir, image_ids=…, sources=…)`` finds every Parquet table, CSV, model
and image copy under ``out_dir`` and removes what belongs to the erased images:

* Parquet tables (catalog, features, each feature-store part, predictions, …) with an ``image_id`` or a
  ``source_path``/``path`` column are rewritten without those rows, part file by part
  file with pyarrow (no Spark), into a staging folder that is then renamed into
  place (``storage.publish_dir``): a table is always either the complete old one or
  the complete new one, never half-written.
* CSVs (predictions.csv, quarantine.csv) lose the matching rows (atomic rewrite).
* Image files under ``out_dir`` whose pixels have an erased id are deleted, and so
  are ``_staging`` leftovers of crashed runs (never a complete output).
* The error gallery: thumbnails named after an erased id (``gallery/<image_id>.jpg``,
  a resized copy, so its pixels have another id) are deleted wherever they are under
  ``out_dir``; every ``metrics.json`` loses the matching ``worst_errors`` entries
  (atomic rewrite) and its sibling ``report.html`` is re-rendered from it.
* A model keeps the ids it was trained on (``model/canestra_training_ids.txt``):
  erased ids are removed from that list and counted in ``canestra_erasures.json``,
  and the caller is told to retrain (the fitted weights still reflect the image).
* ``canestra watch`` state: the path lists in ``_checkpoints/`` (Spark's file-source log) and
  ``_watch/`` (S3 listings) lose the erased files' entries (an image watched without
  --include-paths is found there by its pixels); hidden temp files a crashed write left in a
  table folder (``.batch-*.tmp``) are deleted when they hold an erased image.
* MLflow: runs that trainings here logged (their audit records name them) are rewritten when
  MLFLOW_TRACKING_URI is their local file store; a store canestra cannot rewrite that still holds
  an erased image fails the erasure with the manual step; one it was not told about is noted.
  (Runs logged since issue 20 hold no image ids: ``tracking`` logs metrics.json without them.)
* Optionally the source files themselves are deleted (local files or s3:// objects), only those
  a table of ``out_dir`` lists by path (``_plan_deletion``), never through a link out of the tree;
  each file deleted or kept is noted on stderr.

Finally every file is searched for the erased ids and source paths (contents, decoded Parquet
included, and file names): an erasure that left a trace raises instead of claiming success.
Run it when no other canestra command writes into ``out_dir`` (the CLI holds the --out locks).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import errno
import io
import json
import os
import re
import shutil
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from canestra.errors import CanestraError, InputError, OutputError
from canestra.layout import ERASURES, GOVERNANCE_DIRS, MANIFEST, METRICS_JSON, REPORT_HTML, STAGING
from canestra.model import read_training_ids, write_training_ids
from canestra.pipeline.report import write_report
from canestra.storage import files as storage
from canestra.storage import s3

ID_COLUMN = "image_id"
PATH_COLUMNS = ("source_path", "path")
WORST_ERRORS = "worst_errors"
_IMAGE_ID = re.compile(r"^[0-9a-f]{64}$")
_SKIP_DIRS = GOVERNANCE_DIRS  # governance records: they hold no image ids or paths
_SMALL_FILE = 64 * 1024 * 1024  # larger non-Parquet files are not searched for traces


@dataclass
class EraseResult:
    out_dir: str
    image_ids: int  # distinct image ids erased
    # table, CSV or metrics.json (relative path) -> rows (for metrics.json: worst_errors entries)
    rows_removed: dict[str, int] = field(default_factory=dict)
    files_deleted: list[str] = field(default_factory=list)  # image copies, thumbnails, staging leftovers (relative)
    sources_deleted: int = 0
    deleted_sources: list[str] = field(default_factory=list)  # exactly the source files/objects deleted
    kept_sources: list[tuple[str, str]] = field(default_factory=list)  # (path, why it was not deleted)
    retrain: list[tuple[str, int]] = field(default_factory=list)  # (model dir, erased images it was trained on)
    unknown_models: list[str] = field(default_factory=list)  # model dirs that do not list their training ids

    @property
    def total_rows(self) -> int:
        return sum(self.rows_removed.values())


# ---------------------------------------------------------------------------- training ids (model side)


def read_erasures(model_dir: str) -> dict:
    try:
        with open(os.path.join(model_dir, ERASURES), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def is_model_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "metadata")) and os.path.isdir(os.path.join(path, "stages"))


# ---------------------------------------------------------------------------- walking the output folder


def walk_outputs(out_dir: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk without governance folders; model dirs are yielded but not descended into."""
    for dirpath, dirnames, filenames in os.walk(out_dir):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        if is_model_dir(dirpath):
            dirnames[:] = []
        yield dirpath, dirnames, filenames


def parquet_parts(table_dir: str) -> list[str]:
    return sorted(
        os.path.join(table_dir, f)
        for f in os.listdir(table_dir)
        if f.endswith(".parquet") and not f.startswith((".", "_"))
    )


def find_tables(out_dir: str) -> list[str]:
    """Folders holding Parquet part files (Spark tables), outside models and staging leftovers."""
    tables = []
    for dirpath, dirnames, filenames in walk_outputs(out_dir):
        if STAGING in dirpath.split(os.sep) or is_model_dir(dirpath):
            continue
        if any(f.endswith(".parquet") and not f.startswith((".", "_")) for f in filenames):
            tables.append(dirpath)
            dirnames[:] = []
    return tables


def find_models(out_dir: str) -> list[str]:
    return [d for d, _, _ in walk_outputs(out_dir) if is_model_dir(d) and STAGING not in d.split(os.sep)]


# ---------------------------------------------------------------------------- matching rows


def normalise_source(source: str) -> str:
    if "://" in source and not source.startswith("file://"):
        return source  # remote URIs are matched as written
    return storage.local_path(source)


class _Matcher:
    """Which rows belong to the erased images: by image id or by source path (file or folder prefix)."""

    def __init__(self, ids: set[str], sources: set[str]):
        self.ids = ids
        self.paths = set(sources)
        for s in sources:
            if "://" not in s:
                self.paths.add(os.path.realpath(s))
        # Folder sources erase everything under them (a file source is matched exactly).
        self.prefixes = tuple(p.rstrip("/") + "/" for p in self.paths if p.endswith("/") or os.path.isdir(p))

    def path_matches(self, value: str | None) -> bool:
        return value is not None and value != "" and (value in self.paths or value.startswith(self.prefixes))

    def count(self, table) -> int:
        """How many rows of ``table`` belong to erased images."""
        import pyarrow.compute as pc

        return int(pc.sum(self.mask(table)).as_py() or 0)

    def mask(self, table):
        """pyarrow boolean mask of the rows to drop."""
        import pyarrow as pa
        import pyarrow.compute as pc

        mask = pa.repeat(pa.scalar(False), table.num_rows)
        names = table.column_names
        if ID_COLUMN in names and self.ids:
            mask = pc.or_(mask, pc.fill_null(pc.is_in(table[ID_COLUMN], value_set=pa.array(sorted(self.ids))), False))
        for col in PATH_COLUMNS:
            if col in names and self.paths:
                hit = pc.is_in(table[col], value_set=pa.array(sorted(self.paths)))
                for prefix in self.prefixes:
                    hit = pc.or_(hit, pc.starts_with(table[col], prefix))
                mask = pc.or_(mask, pc.fill_null(hit, False))
        return mask


def _key_columns(pf) -> list[str]:
    names = pf.schema_arrow.names
    return [c for c in (ID_COLUMN, *PATH_COLUMNS) if c in names]


def keyed_tables(out_dir: str) -> list:
    """The (image_id, path columns) of every table that maps a path to an image id, as pyarrow tables."""
    import pyarrow.parquet as pq

    keyed = []
    for table in find_tables(out_dir):
        for part in parquet_parts(table):
            pf = pq.ParquetFile(part)
            keys = _key_columns(pf)
            if ID_COLUMN in keys and len(keys) > 1:
                keyed.append(pf.read(columns=keys))
    return keyed


def resolve_ids(out_dir: str, image_ids: Iterable[str],
                sources: Iterable[str], keyed: list | None = None) -> tuple[set[str], set[str], set[str]]:
    """(image ids to erase, source paths to erase, source files of the ids given explicitly).

    Ids come from the arguments, from tables that map a source path to an id (the
    catalog; predictions written with --include-paths) and, for source files that
    still exist, from their pixels (the id is the SHA-256 of the pixels), so
    images that were only predicted are found too. Source paths known for the ids
    (catalog ``source_path``) are added, for the CSVs and path columns. Only the
    named sources and the sources of explicitly named ids are candidates for
    --delete-source: another file that merely has the same pixels is not deleted
    (``_plan_deletion`` decides which are deleted).
    """
    import pyarrow.compute as pc

    ids = set(image_ids)
    named = set(ids)
    srcs = {normalise_source(s) for s in sources}
    of_named: set[str] = set()
    for src in list(srcs):
        for path in _image_files(src):
            found = _pixel_id(path)
            if found:
                ids.add(found)
    if keyed is None:
        keyed = keyed_tables(out_dir)
    if srcs:
        by_path = _Matcher(set(), srcs)
        for t in keyed:
            ids.update(v for v in t.filter(by_path.mask(t))[ID_COLUMN].to_pylist() if v)
    if ids:
        for t in keyed:
            hit = t.filter(pc.fill_null(pc.is_in(t[ID_COLUMN], value_set=_id_array(ids)), False))
            named_hit = hit.filter(pc.is_in(hit[ID_COLUMN], value_set=_id_array(named))) if named else hit.slice(0, 0)
            for col in hit.column_names[1:]:
                srcs.update(v for v in hit[col].to_pylist() if v)
                of_named.update(v for v in named_hit[col].to_pylist() if v)
    return ids, srcs, of_named


def _id_array(ids: set[str]):
    import pyarrow as pa

    return pa.array(sorted(ids), type=pa.string())


def _image_files(source: str) -> list[str]:
    if "://" in source:
        return []
    if os.path.isfile(source):
        return [source]
    found = []
    if os.path.isdir(source):
        for dirpath, _, filenames in os.walk(source):
            # Any name: ingest judges images by content (a .jfif, .heic or extension-less photo counts).
            found += [os.path.join(dirpath, f) for f in filenames if not storage.is_junk(f)]
    return found


def _looks_like_image(path: str) -> bool:
    """Image magic bytes at the start of the file (cheap: outputs also hold large Parquet files)."""
    from canestra.vision.images import sniff_format

    try:
        with open(path, "rb") as fh:
            return sniff_format(fh.read(64)) is not None
    except OSError:
        return False


def _pixel_id(path: str) -> str | None:
    try:
        return _bytes_id(storage.read_bytes(path))
    except OSError:
        return None


def _bytes_id(data: bytes) -> str | None:
    from canestra.vision.images import BadImage, clean_image

    try:
        return clean_image(data).image_id
    except BadImage:
        return None


# ---------------------------------------------------------------------------- rewriting


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # parts are never modified in place, so sharing the inode is safe and instant
    except OSError:
        shutil.copy2(src, dst)


def rewrite_table(table_dir: str, matcher: _Matcher) -> int:
    """Rewrite a Parquet table without the matching rows (staging + atomic publish); rows removed."""
    import pyarrow.parquet as pq

    hits: dict[str, int] = {}
    for part in parquet_parts(table_dir):
        pf = pq.ParquetFile(part)
        keys = _key_columns(pf)
        if keys:
            n = matcher.count(pf.read(columns=keys))
            if n:
                hits[part] = n
    if not hits:
        return 0
    staging = storage.staging_dir(table_dir)
    os.makedirs(staging)
    try:
        rewritten = {os.path.basename(p) for p in hits}
        for name in sorted(os.listdir(table_dir)):
            src, dst = os.path.join(table_dir, name), os.path.join(staging, name)
            if name in rewritten:
                _write_filtered(src, dst, matcher)
            elif name.startswith(".") and name.endswith(".crc") and name[1:-4] in rewritten:
                continue  # Hadoop checksum of the old bytes: Spark would reject the new part
            elif name == MANIFEST:
                _update_manifest(src, dst, sum(hits.values()))
            elif os.path.isdir(src):
                shutil.copytree(src, dst, copy_function=_link_or_copy)
            else:
                _link_or_copy(src, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _rmdir_if_empty(os.path.dirname(staging))
        raise
    storage.publish_dir(staging, table_dir)
    return sum(hits.values())


def _write_filtered(src: str, dst: str, matcher: _Matcher) -> None:
    """Copy one part without the matching rows, row group by row group (bounded memory).

    The Arrow schema carries Spark's row metadata, so Spark reads vectors etc. back as before.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(src)
    with pq.ParquetWriter(dst, pf.schema_arrow, compression="snappy") as writer:
        for i in range(pf.num_row_groups):
            group = pf.read_row_group(i)
            writer.write_table(group.filter(pc.invert(matcher.mask(group))))
    # A stream's batches expire by their own age (privacy/purge.py): the rewrite keeps the part's
    # times, or an erase would make an old batch young again and retention would keep its other rows.
    st = os.stat(src)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _update_manifest(src: str, dst: str, removed: int) -> None:
    try:
        with open(src, encoding="utf-8") as fh:
            info = json.load(fh)
    except (OSError, ValueError):
        shutil.copy2(src, dst)
        return
    if isinstance(info.get("images"), int):
        info["images"] = max(0, info["images"] - removed)
    info["erased"] = int(info.get("erased", 0)) + removed
    with open(dst, "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=2)


def id_matcher(ids: set[str]) -> _Matcher:
    """Rows of these image ids only (retention drops expired batches' rows with it)."""
    return _Matcher(ids, set())


def rewrite_csv(path: str, matcher: _Matcher, *, dry_run: bool = False) -> int:
    """Drop CSV rows whose image_id / path / source_path matches; atomic rewrite; rows removed
    (``dry_run``: counted, nothing written)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return 0
    header = rows[0]
    id_col = header.index(ID_COLUMN) if ID_COLUMN in header else None
    path_cols = [header.index(c) for c in PATH_COLUMNS if c in header]
    if id_col is None and not path_cols:
        return 0

    def erased(row: list[str]) -> bool:
        if id_col is not None and id_col < len(row) and row[id_col] in matcher.ids:
            return True
        return any(c < len(row) and matcher.path_matches(row[c]) for c in path_cols)

    kept = [header] + [r for r in rows[1:] if not erased(r)]
    removed = len(rows) - len(kept)
    if removed and not dry_run:
        buf = io.StringIO()
        csv.writer(buf).writerows(kept)
        storage.write_text_atomic(path, buf.getvalue())
    return removed


def _named_after(name: str, ids: set[str]) -> bool:
    """An image file named after an erased id: a gallery thumbnail ``<image_id>.jpg``."""
    stem, ext = os.path.splitext(name)
    return ext.lower() in (".jpg", ".jpeg", ".png") and stem.lower() in ids


def _erased_entry(entry, ids: set[str]) -> bool:
    if not isinstance(entry, dict):
        return False
    image_id = entry.get(ID_COLUMN)
    if isinstance(image_id, str) and image_id.strip().lower() in ids:
        return True
    thumb = entry.get("thumbnail")
    return isinstance(thumb, str) and _named_after(thumb.replace("\\", "/").rsplit("/", 1)[-1], ids)


def rewrite_metrics(path: str, matcher: _Matcher) -> int:
    """Drop erased images from a metrics.json's ``worst_errors`` (atomic rewrite) and re-render the
    ``report.html`` beside it; how many entries were removed. Unreadable JSON is left to the trace check."""
    try:
        with open(path, encoding="utf-8") as fh:
            metrics = json.load(fh)
    except (OSError, ValueError):
        return 0
    errors = metrics.get(WORST_ERRORS) if isinstance(metrics, dict) else None
    if not isinstance(errors, list):
        return 0
    kept = [e for e in errors if not _erased_entry(e, matcher.ids)]
    removed = len(errors) - len(kept)
    if removed:
        metrics[WORST_ERRORS] = kept
        storage.write_text_atomic(path, json.dumps(metrics, indent=2))
        report = os.path.join(os.path.dirname(path), REPORT_HTML)
        if os.path.exists(report):
            write_report(metrics, report)
    return removed


def _rmdir_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def _update_model(model_dir: str, ids: set[str]) -> int | None:
    """Drop erased ids from the model's training list; how many it was trained on (None: unknown)."""
    trained_on = read_training_ids(model_dir)
    if trained_on is None:
        return None
    hit = trained_on & ids
    if hit:
        write_training_ids(model_dir, trained_on - hit)
        log = read_erasures(model_dir)
        log["erased_since_training"] = int(log.get("erased_since_training", 0)) + len(hit)
        log["last_erasure"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        log["action"] = "retrain this model: it was fitted on images that have since been erased"
        storage.write_text_atomic(os.path.join(model_dir, ERASURES), json.dumps(log, indent=2))
    return len(hit)


# ---------------------------------------------------------------------------- watch's stream state, temp files

_STREAM_DIRS = ("_checkpoints", "_watch")  # Spark's checkpoint (file-source path logs), S3 listing files


def _is_stream_state(root: str, dirpath: str) -> bool:
    return any(p in _STREAM_DIRS for p in os.path.relpath(dirpath, root).split(os.sep))


def _is_write_leftover(name: str) -> bool:
    """A hidden temp file of a write that never finished (``.batch-….parquet.<tag>.tmp``, ``.tmp-…``)."""
    return name.startswith(".") and (name.endswith(".tmp") or name.startswith(".tmp-"))


def _holds_erased(path: str, matcher: _Matcher, unreadable: bool = True) -> bool:
    """A file holds an erased image: Parquet is decoded (its pages may be compressed), else its bytes
    are searched. A Parquet file cut short by a crash cannot be decoded: it counts as holding the
    image when ``unreadable`` (a temp file to delete), else its bytes are searched."""
    import pyarrow.parquet as pq

    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    if head == b"PAR1":
        try:
            pf = pq.ParquetFile(path)
            keys = _key_columns(pf)
            return bool(keys) and matcher.count(pf.read(columns=keys)) > 0
        except Exception:  # unreadable: a write cut short
            if unreadable:
                return True
    if os.path.getsize(path) > _SMALL_FILE:
        return False
    with open(path, "rb") as fh:
        data = fh.read()
    return any(n in data for n in _needles(matcher))


def _stream_path(value: object) -> str | None:
    """A path as Spark's file source logs it (``file:///x/a%20b.jpg``) -> ``/x/a b.jpg``; URIs unchanged."""
    if not isinstance(value, str) or not value:
        return None
    if value.startswith("file:"):
        from urllib.parse import unquote

        value = unquote(value[len("file:"):])
        if value.startswith("//"):
            value = value[2:]
    return value


def _path_list(path: str) -> tuple[str | None, list[tuple[str, dict]]] | None:
    """A JSON-lines path list (Spark's file-source log ``v1`` + one object per file, watch's S3
    listing): (header line, [(line, object)]); None for any other file."""
    try:
        if os.path.getsize(path) > _SMALL_FILE:
            return None
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    header = lines[0] if lines and not lines[0].startswith("{") else None
    entries = []
    for line in lines[1:] if header is not None else lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            return None
        if not isinstance(obj, dict) or "path" not in obj:
            return None
        entries.append((line, obj))
    return header, entries


def rewrite_path_list(path: str, matcher: _Matcher) -> list[str]:
    """Drop erased files from a watch path list (atomic rewrite); the paths removed.

    Spark reads its checkpoint through Hadoop's checksummed filesystem, so the stale ``.<name>.crc``
    beside a rewritten file is removed (a missing checksum is accepted, a wrong one is not)."""
    parsed = _path_list(path)
    if parsed is None:
        return []
    header, entries = parsed
    kept, removed = [], []
    for line, obj in entries:
        value = _stream_path(obj["path"])
        if matcher.path_matches(value):
            removed.append(str(value))
        else:
            kept.append(line)
    if removed:
        text = "".join(line + "\n" for line in ([header] if header is not None else []) + kept)
        storage.write_text_atomic(path, text)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.crc"))
    return removed


def _stream_listed(root: str) -> Iterator[tuple[str, str]]:
    """(path list file, local path it lists) for every watch path list under ``root``."""
    for dirpath, _, filenames in walk_outputs(root):
        if not _is_stream_state(root, dirpath):
            continue
        for name in filenames:
            if name.startswith(".") or name.endswith(".parquet"):
                continue
            parsed = _path_list(os.path.join(dirpath, name))
            for _, obj in parsed[1] if parsed else ():
                value = _stream_path(obj["path"])
                if value and "://" not in value:
                    yield os.path.join(dirpath, name), value


def _stream_paths_of(root: str, ids: set[str], known: set[str]) -> set[str]:
    """Local files a watch checkpoint lists whose pixels are an erased image (their path is kept nowhere
    else when watch ran without --include-paths)."""
    found: set[str] = set()
    if not ids:
        return found
    seen = set(known)
    for _, path in _stream_listed(root):
        if path not in seen:
            seen.add(path)
            if os.path.isfile(path) and _pixel_id(path) in ids:
                found.add(path)
    return found


# ---------------------------------------------------------------------------- MLflow runs


def _mlflow_runs(root: str) -> list[str]:
    """Ids of the MLflow runs that trainings under ``root`` logged (their audit records say)."""
    from canestra.layout import AUDIT_DIR, AUDIT_FILE
    from canestra.privacy.audit import read_records

    runs: list[str] = []
    for dirpath, dirnames, _ in os.walk(root):
        if AUDIT_DIR in dirnames:
            for rec in read_records(os.path.join(dirpath, AUDIT_DIR, AUDIT_FILE)):
                run_id = (rec.get("details") or {}).get("mlflow_run_id")
                if rec.get("command") == "train" and isinstance(run_id, str) and run_id not in runs:
                    runs.append(run_id)
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and d != STAGING]
    return runs


def _erase_mlflow(root: str, matcher: _Matcher, res: EraseResult, note: Callable[[str], None]) -> list[str]:
    """Rewrite the metrics.json/report.html artifacts of the MLflow runs trained from ``root`` when
    the store is a local folder (MLFLOW_TRACKING_URI, as `train` used it). Returns what could not be
    reached yet holds an erased image, each with the manual step; a store it cannot check is noted."""
    runs = _mlflow_runs(root)
    if not runs:
        return []
    from canestra import tracking

    uri = tracking.resolve_uri(None)
    shown = ", ".join(runs)
    if uri is None:
        note(f"MLflow run(s) {shown} were logged by trainings here and not checked: set MLFLOW_TRACKING_URI "
             "to their store and run erase again (canestra logs no image ids there since issue 20)")
        return []
    try:
        client = tracking._mlflow()(tracking_uri=uri)
    except CanestraError as exc:  # mlflow not installed
        note(f"MLflow run(s) {shown} at {uri} not checked: {exc}")
        return []
    from mlflow.exceptions import MlflowException

    unreached = []
    for run_id in runs:
        manual = (f"delete it by hand: MLFLOW_TRACKING_URI={uri} mlflow runs delete --run-id {run_id}, then "
                  f"mlflow gc --backend-store-uri {uri} --run-ids {run_id}")
        try:
            artifacts = client.get_run(run_id).info.artifact_uri
        except MlflowException:
            note(f"MLflow run {run_id} is not in the store at {uri}: not checked")
            continue
        local = storage.local_path(artifacts) if artifacts.startswith(("file:", "/")) else None
        if local is None:
            if _remote_run_holds(client, run_id, matcher):
                unreached.append(f"MLflow run {run_id} at {uri} keeps an erased image in artifacts canestra cannot "
                                 f"rewrite ({artifacts}): {manual}")
            continue
        path = os.path.join(local, METRICS_JSON)
        if os.path.exists(path):
            n = rewrite_metrics(path, matcher)
            if n:
                res.rows_removed[f"mlflow run {run_id}: {METRICS_JSON}"] = n
        left = [os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs
                if _holds_erased(os.path.join(d, f), matcher, unreadable=False)
                or (f == REPORT_HTML and _holds_short_id(os.path.join(d, f), matcher))]
        if left:
            unreached.append(f"MLflow run {run_id} at {uri} still holds an erased image in {', '.join(left[:3])}: "
                             f"{manual}")
    return unreached


def _remote_run_holds(client, run_id: str, matcher: _Matcher) -> bool:
    """Whether a run in a store canestra cannot rewrite holds an erased image in its metrics.json or
    report.html (both downloaded and searched)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="canestra-erase-") as tmp:
        for name in (METRICS_JSON, REPORT_HTML):
            try:
                got = client.download_artifacts(run_id, name, tmp)
            except Exception:  # absent from the run, or unreachable: nothing to search
                continue
            if _holds_erased(got, matcher, unreadable=False) or _holds_short_id(got, matcher):
                return True
    return False


def _holds_short_id(path: str, matcher: _Matcher) -> bool:
    """report.html shows ids shortened to 12 characters."""
    with open(path, "rb") as fh:
        data = fh.read()
    return any(i[:12].encode() in data for i in matcher.ids)


# ---------------------------------------------------------------------------- verification


def _needles(matcher: _Matcher) -> list[bytes]:
    # Folder sources are not searched for: a manifest may name the ingest root without naming an image.
    return [i.encode() for i in matcher.ids] + [p.encode() for p in matcher.paths if not os.path.isdir(p)]


def _traces(out_dir: str, matcher: _Matcher) -> list[str]:
    """Files under out_dir that still mention an erased id or source path, in their bytes or their
    name (a thumbnail is named after its id), as relative paths. Every file is read, table folders'
    hidden ones included; Parquet is decoded."""
    left = []
    for dirpath, _, filenames in os.walk(out_dir):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if any(i in name.lower() for i in matcher.ids) or _holds_erased(path, matcher, unreadable=False):
                left.append(os.path.relpath(path, out_dir))
    return left


# ---------------------------------------------------------------------------- the operation


def validate_ids(image_ids: Iterable[str]) -> list[str]:
    ids = [i.strip().lower() for i in image_ids]
    for i in ids:
        if not _IMAGE_ID.match(i):
            raise InputError(f"{i!r} is not a canestra image_id (64 hex characters, as in predictions.csv)")
    return ids


def _stderr_note(message: str) -> None:
    print(f"canestra: note: {message}", file=sys.stderr)


def erase(out_dir: str, image_ids: Iterable[str] = (), sources: Iterable[str] = (),
          delete_source: bool = False, note: Callable[[str], None] = _stderr_note) -> EraseResult:
    """Erase images (by id and/or source path) and everything derived from them under ``out_dir``.

    ``note`` receives one line per source file deleted or kept (with the reason)."""
    ids_in = validate_ids(image_ids)
    sources = list(sources)
    if not ids_in and not sources:
        raise InputError("nothing to erase: pass --image-id ID… and/or --source PATH…")
    root = storage.local_path(out_dir)
    if not os.path.isdir(root):
        raise InputError(f"output folder {root} does not exist: pass the --out folder of the runs to erase from")
    if delete_source:
        remote = [s for s in sources if storage.is_remote(s) and not s3.is_s3(s)]
        if remote:
            raise InputError(f"--delete-source deletes local files and s3:// objects; delete {remote[0]} "
                             "with your storage tools")
        for src in sources:
            if s3.is_s3(src):  # wrong keys or a dead endpoint fail here, before any table is rewritten
                s3.exists(src, storage.s3_options())
    for dirpath, _, _ in os.walk(root):
        # A table a killed publish left renamed aside comes back (or its publish is finished) before
        # _staging/ leftovers are cleared below: otherwise both copies would go.
        storage.recover_publishes(dirpath)
    keyed = keyed_tables(root)
    ids, srcs, _ = resolve_ids(root, ids_in, sources, keyed)
    # watch without --include-paths keeps an image's path only in its checkpoint: found by pixels.
    srcs |= _stream_paths_of(root, ids, srcs)
    matcher = _Matcher(ids, srcs)
    watched: set[str] = set()  # erased paths dropped from watch checkpoints
    res = EraseResult(root, len(ids))
    # Planned before the tables are rewritten: they are what says which files canestra read where.
    plan = _plan_deletion(keyed, [normalise_source(s) for s in sources], set(ids_in), root) if delete_source else None

    tables = find_tables(root)
    for table in tables:
        n = rewrite_table(table, matcher)
        if n:
            res.rows_removed[os.path.relpath(table, root)] = n
    for dirpath, _, filenames in walk_outputs(root):
        if STAGING in dirpath.split(os.sep):
            continue
        stream_state = _is_stream_state(root, dirpath)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if _is_write_leftover(name) and _holds_erased(path, matcher):
                os.remove(path)  # a crashed write's temp file (watch's .batch-*.tmp): no reader ever sees it
                res.files_deleted.append(os.path.relpath(path, root))
            elif stream_state and not name.startswith(".") and not name.endswith(".parquet"):
                gone = rewrite_path_list(path, matcher)
                if gone:
                    res.rows_removed[os.path.relpath(path, root)] = len(gone)
                    watched.update(p for p in gone if "://" not in p)
            elif name.endswith(".csv"):
                n = rewrite_csv(path, matcher)
                if n:
                    res.rows_removed[os.path.relpath(path, root)] = n
            elif name == METRICS_JSON:
                n = rewrite_metrics(path, matcher)
                if n:
                    res.rows_removed[os.path.relpath(path, root)] = n
            elif _named_after(name, ids) or (
                    _looks_like_image(path) and _pixel_id(path) in ids):
                os.remove(path)  # a thumbnail (gallery/<id>.jpg) or a copy of an erased image inside the outputs
                res.files_deleted.append(os.path.relpath(path, root))
    for dirpath, dirnames, _ in os.walk(root):
        if STAGING in dirnames:  # leftovers of crashed runs may hold the image: never complete outputs
            shutil.rmtree(os.path.join(dirpath, STAGING))
            res.files_deleted.append(os.path.relpath(os.path.join(dirpath, STAGING), root))
            dirnames.remove(STAGING)
    for model in find_models(root):
        trained_on = _update_model(model, ids)
        if trained_on is None:
            res.unknown_models.append(model)
        elif trained_on:
            res.retrain.append((model, trained_on))

    if plan is not None:
        _delete_sources(plan, res, note)
    for path in sorted(p for p in watched if p not in res.deleted_sources and os.path.exists(p)):
        note(f"{path} is still in a watched folder and no longer in the watch checkpoint: `canestra watch` "
             "will predict it again unless it is deleted or moved out")
    unreached = _erase_mlflow(root, matcher, res, note)
    left = _traces(root, matcher)
    if unreached:
        raise OutputError("erasure incomplete: " + "; ".join(unreached))
    if left:
        shown = ", ".join(left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
        raise OutputError(f"erasure incomplete: {len(left)} file(s) under {root} still mention an erased image "
                          f"({shown}): remove them by hand or re-run erase")
    return res


@dataclass
class _Plan:
    delete: list[tuple[str, str, set[str]]]  # (path, the tree it must not leave, the ids listed for it)
    kept: list[tuple[str, str]]  # (path, why)


def _plan_deletion(keyed: list, sources: list[str], named_ids: set[str], root: str) -> _Plan:
    """Which source files --delete-source may delete: only paths a table of ``root`` lists.

    A ``--source`` file is deleted when a table lists exactly that path (the catalog's
    ``source_path``, or predictions written with --include-paths); a ``--source`` folder deletes
    the listed paths under it and nothing else in it. ``--image-id`` names an image, not a
    file: it deletes the files ingested as that image (catalog ``source_path``), never a copy
    that was only predicted. Nothing is resolved through links here (see ``_unlink_inside``).
    """
    listed: dict[str, tuple[set[str], bool]] = {}  # path -> (ids listed for it, ingested)
    for t in keyed:
        for col in t.column_names[1:]:
            for image_id, path in zip(t[ID_COLUMN].to_pylist(), t[col].to_pylist()):
                if image_id and path:
                    ids, ingested = listed.get(path, (set(), False))
                    ids.add(image_id)
                    listed[path] = (ids, ingested or col == "source_path")
    plan = _Plan([], [])
    chosen: set[str] = set()
    for src in sources:
        folder = src.rstrip("/") + "/"
        under = sorted(p for p in listed if p.startswith(folder))
        if src in listed:
            hits, tree = [src], (src.rsplit("/", 1)[0] if s3.is_s3(src) else os.path.dirname(src))
        elif under:
            hits, tree = under, src.rstrip("/")
        else:
            plan.kept.append((src, f"no table under {root} lists it"))
            continue
        for path in hits:
            if path not in chosen:
                chosen.add(path)
                plan.delete.append((path, tree, listed[path][0]))
    for path, (ids, ingested) in sorted(listed.items()):
        if not ids & named_ids or path in chosen:
            continue
        if ingested:
            chosen.add(path)
            plan.delete.append((path, path.rsplit("/", 1)[0] if s3.is_s3(path) else os.path.dirname(path), ids))
        else:
            plan.kept.append((path, "predicted, not ingested (name it with --source to delete it)"))
    return plan


def _delete_sources(plan: _Plan, res: EraseResult, note: Callable[[str], None]) -> None:
    """Delete the planned source files or S3 objects whose pixels are still the listed image."""
    kept = list(plan.kept)
    for path, tree, ids in plan.delete:
        if s3.is_s3(path):
            if _pixel_id(path) not in ids:
                kept.append((path, "its pixels are no longer the catalogued image (or it is gone)"))
            elif s3.delete(path, storage.s3_options()):  # DeleteObject on exactly this key
                res.deleted_sources.append(path)
            continue
        if "://" in path:
            kept.append((path, "not a local file or s3:// object: delete it with your storage tools"))
            continue
        why = _unlink_inside(tree, path, ids)
        if why is None:
            res.deleted_sources.append(path)
        elif why:
            kept.append((path, why))
    res.sources_deleted = len(res.deleted_sources)
    res.kept_sources = kept
    for path in res.deleted_sources:
        note(f"deleted source {path}")
    for path, why in kept:
        note(f"kept {path}: {why}")


def _unlink_inside(tree: str, path: str, ids: set[str]) -> str | None:
    """Delete ``path`` without following a symbolic link out of ``tree``: each folder below ``tree``
    is opened with O_NOFOLLOW and the file is removed relative to it, so a folder swapped for a link
    meanwhile is refused too. None when deleted, "" when already gone, else why it was kept."""
    rel = os.path.relpath(path, tree)
    parts = rel.split(os.sep)
    if rel == os.curdir or ".." in parts:
        return f"outside {tree}"
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(tree, flags)
    except OSError:
        return ""  # its folder is gone, and the file with it
    try:
        for part in parts[:-1]:
            try:
                sub = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                return ""
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    return f"reached through a symbolic link ({os.path.join(tree, part)}): its target was left alone"
                raise
            os.close(fd)
            fd = sub
        name = parts[-1]
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return ""
        if stat.S_ISLNK(st.st_mode):
            return "a symbolic link: neither it nor its target was deleted (delete the target by hand)"
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        try:
            file_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        except OSError as exc:
            return f"unreadable ({exc.strerror or exc})"
        with os.fdopen(file_fd, "rb") as fh:
            current = _bytes_id(fh.read())
        if current not in ids:
            return "its pixels are no longer the catalogued image"
        os.unlink(name, dir_fd=fd)
        return None
    finally:
        os.close(fd)
