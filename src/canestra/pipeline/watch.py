"""``canestra watch``: Spark Structured Streaming from an image folder (or S3 prefix) to OUT/predictions.

Exactly once (docs/streaming.md):
* Spark's file source records which files make up each micro-batch in the checkpoint
  (``OUT/_checkpoints/watch``) *before* the batch runs, and commits the batch only after
  ``foreachBatch`` returns. A crash re-runs the last uncommitted batch with the same id and
  the same files.
* ``foreachBatch`` is idempotent per batch id: the batch's predictions become one file,
  ``OUT/predictions/batch-<id>.parquet``, written beside it and renamed into place (a re-run
  replaces it); quarantine.csv rows are keyed by path, so a re-run replaces them too.

S3 (``--images s3://…``): there are no s3a jars here, so Spark's file source cannot list
S3. A driver thread lists the prefix with boto3 every poll and writes the keys it has not
listed before into a local listing file (``OUT/_watch/s3-listing``); Spark streams those
listing files with the same file source, checkpoint and ``foreachBatch``, and the
executors read the objects with boto3 as batch ``predict`` does.
"""

from __future__ import annotations

import contextvars
import csv
import io
import json
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field

from canestra.errors import CanestraError, InputError
from canestra.pipeline.ingest import QUARANTINE_CSV, cleaned_frame, write_quarantine_csv
from canestra.pipeline.predict import PREDICTIONS, load_model, score_images
from canestra.progress import Progress
from canestra.storage import files as storage
from canestra.storage import s3

__all__ = ["check_images_root", "parse_trigger", "watch"]

CHECKPOINT = os.path.join("_checkpoints", "watch")
WATCH_DIR = "_watch"  # staging and the S3 listing; never read by users
# Columns: those of `canestra predict` on a tree of class folders (score_images, labelled=True);
# label is null for files directly under the watched root (a stream's schema cannot depend on
# what arrives later).
# Bounds the work a crash can make Spark redo, and the driver's per-batch path list.
MAX_FILES_PER_BATCH = 10_000
_BINARY_FILE_SCHEMA = "path string, modificationTime timestamp, length long, content binary"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_trigger(text: str | float) -> float:
    """``10s``, ``2s``, ``500ms``, ``1m``, ``1h`` or plain seconds -> seconds."""
    m = _DURATION.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise InputError(f"--trigger {text!r} is not a duration: write e.g. 10s, 2s, 500ms or 1m")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2) or "s"]


@dataclass
class WatchResult:
    out_dir: str
    predictions_path: str
    batches: int = 0
    predicted: int = 0
    quarantined: int = 0
    stopped_by: str | None = None  # signal name, or None when --once ran out of files
    abandoned_batch: bool = False  # a batch was in flight at the stop: the next run redoes it
    batch_seconds: list[float] = field(default_factory=list)


def _local(path: str) -> str:
    """A file-source path (``file:/x`` or ``file:///x``) -> ``/x``."""
    if path.startswith("file:"):
        path = path[len("file:"):]
        if path.startswith("//"):
            path = path[2:]
    return path


def _label(path: str, root: str) -> str | None:
    """The class folder (first folder under the root), as `predict` labels it; None at the root."""
    rel = path[len(root):].lstrip("/") if path.startswith(root) else os.path.basename(path)
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 else None


def _batch_name(query_id: str, batch_id: int) -> str:
    # The query id (fixed in the checkpoint) keeps a new checkpoint's batch 0 from replacing an old one's.
    return f"batch-{query_id[:8]}-{batch_id:09d}.parquet"


def _query_id(checkpoint: str) -> str:
    """The id Spark stores in ``<checkpoint>/metadata`` when the query first starts; same on every restart."""
    with open(os.path.join(checkpoint, "metadata"), encoding="utf-8") as fh:
        return json.loads(fh.readline())["id"]


def _merge_quarantine(qpath: str, batch_paths: list[str], bad: list[tuple[str, str]]) -> int:
    """Replace this batch's rows in quarantine.csv (keyed by path: a re-run adds nothing); total rows."""
    rows: dict[str, str] = {}
    text = storage.read_text(qpath)
    if text:
        for rec in csv.DictReader(io.StringIO(text)):
            rows[rec["path"]] = rec["reason"]
    for p in batch_paths:
        rows.pop(p, None)
    rows.update(bad)
    write_quarantine_csv(qpath, list(rows.items()))
    return len(rows)


class _BatchWriter:
    """The ``foreachBatch`` function: score one micro-batch, publish it under its batch id."""

    def __init__(self, spark, model, out_dir: str, root: str, include_paths: bool, progress: Progress,
                 result: WatchResult):
        self.spark, self.model, self.out_dir, self.root = spark, model, out_dir, root
        self.include_paths, self.progress, self.result = include_paths, progress, result
        self.s3_opts = storage.s3_options() if s3.is_s3(root) else None
        self.final = os.path.join(out_dir, PREDICTIONS)
        self.lock = threading.Lock()
        self.stopping = False
        self.error: BaseException | None = None
        # Spark calls foreachBatch on its own thread: run each batch in the starting call's context
        # (its S3 options), not in that thread's empty one.
        self.context = contextvars.copy_context()

    def __call__(self, batch_df, batch_id: int) -> None:
        self.context.copy().run(self._locked, batch_df, batch_id)

    def _locked(self, batch_df, batch_id: int) -> None:
        with self.lock:
            if self.stopping:  # never return normally here: Spark would commit a batch we did not write
                raise _Stopped()
            try:
                self._run(batch_df, int(batch_id))
            except BaseException as exc:
                self.error = exc
                raise

    def _run(self, batch_df, batch_id: int) -> None:
        from canestra.vision.images import DEFAULT_MAX_PIXELS

        t0 = time.perf_counter()
        # The listed size lets the cleaner tell a file caught mid-write ("changed after it was listed").
        sizes = {_local(r[0]): -1 if r[1] is None else int(r[1]) for r in batch_df.collect()}
        paths = sorted(sizes)
        if not paths:
            return
        files = [storage.ListedFile(p, _label(p, self.root), sizes[p], 0.0) for p in paths]
        cleaned = cleaned_frame(self.spark, files, ["predict"] * len(files), [None] * len(files),
                                DEFAULT_MAX_PIXELS, self.s3_opts).persist()
        staging = os.path.join(self.out_dir, WATCH_DIR, "staging", f"{batch_id:09d}-{uuid.uuid4().hex[:8]}")
        try:
            # No feature store (out_dir=None): a store update per micro-batch would add to every image's latency.
            rows, _ = score_images(self.model, cleaned.where("error IS NULL")
                                   .select("source_path", "label", "image_id", "content"),
                                   None, self.include_paths, labelled=True)
            rows.write.mode("overwrite").parquet(staging)
            bad = [(r.source_path, r.error) for r in cleaned.where("error IS NOT NULL")
                   .select("source_path", "error").collect()]
        finally:
            cleaned.unpersist()
        n = self._publish(staging, batch_id)
        shutil.rmtree(staging, ignore_errors=True)
        _merge_quarantine(os.path.join(self.out_dir, QUARANTINE_CSV), paths, bad)
        took = time.perf_counter() - t0
        self.result.batches += 1
        self.result.predicted += n
        self.result.quarantined += len(bad)
        self.result.batch_seconds.append(took)
        self.progress.say(f"canestra ✓ watch batch {batch_id}: {n} predicted, {len(bad)} quarantined "
                          f"({took:.1f}s)")

    def _publish(self, staging: str, batch_id: int) -> int:
        """The batch's Spark parts as one Parquet file, renamed into place (replacing a crashed try's)."""
        import pyarrow.parquet as pq

        table = pq.read_table(staging)
        os.makedirs(self.final, exist_ok=True)
        name = _batch_name(_query_id(os.path.join(self.out_dir, CHECKPOINT)), batch_id)
        tmp = os.path.join(self.final, f".{name}.{uuid.uuid4().hex[:8]}.tmp")  # hidden: readers skip it
        pq.write_table(table, tmp, compression="snappy")
        os.replace(tmp, os.path.join(self.final, name))
        return table.num_rows


class _Stopped(Exception):
    """Raised in a batch that starts after a stop was requested, so Spark does not commit it."""


class _S3Lister(threading.Thread):
    """Lists the S3 prefix every ``period`` s; keys not listed before go to a new listing file.

    Each listing file is written whole (temp name, then rename), so the file source sees it
    complete or not at all; the set of keys already listed is read back from those files, so
    a restart neither repeats nor skips a key.
    """

    def __init__(self, root: str, listing_dir: str, period: float, progress: Progress):
        super().__init__(name="canestra-s3-lister", daemon=True)
        self.root, self.listing_dir, self.period, self.progress = root, listing_dir, period, progress
        self.halt = threading.Event()
        self.known: set[str] = set()
        os.makedirs(listing_dir, exist_ok=True)
        for name in os.listdir(listing_dir):
            if name.endswith(".json") and not name.startswith("."):
                with open(os.path.join(listing_dir, name), encoding="utf-8") as fh:
                    self.known.update(json.loads(line)["path"] for line in fh if line.strip())
        self._warned = False
        self.context = contextvars.copy_context()  # the starting call's S3 options, for this thread too

    def list_once(self) -> int:
        new = [f for f in storage.list_images(self.root) if f.path not in self.known]
        if new:
            name = f"listing-{time.time_ns():020d}.json"  # the writer's temp name is hidden: Spark skips it
            storage.write_text_atomic(os.path.join(self.listing_dir, name),
                                      "".join(json.dumps({"path": f.path, "size": f.size}) + "\n" for f in new))
            self.known.update(f.path for f in new)
        return len(new)

    def run(self) -> None:
        self.context.copy().run(self._poll)

    def _poll(self) -> None:
        while not self.halt.wait(self.period):
            try:
                self.list_once()
                self._warned = False
            except CanestraError as exc:  # S3 unreachable for a while: say so once, keep trying
                if not self._warned:
                    self.progress.say(f"canestra: warning: listing {self.root} failed ({exc}); retrying")
                    self._warned = True


def check_images_root(images: str) -> str:
    """The watched root as a path/URI; a plain error when it cannot be watched."""
    if s3.is_s3(images):
        s3.check_bucket(images, storage.s3_options())
        return images.rstrip("/")
    root = storage.local_path(images)
    if not os.path.isdir(root):
        raise InputError(f"images folder {root} does not exist or is not a folder: `canestra watch` needs a "
                         "folder to watch (it may be empty)")
    return root


def watch(spark, model_path: str, images: str, out: str, *, trigger: float = 10.0, once: bool = False,
          include_paths: bool = False, progress: Progress | None = None,
          stop_event: threading.Event | None = None) -> WatchResult:
    """Predict every image that lands under ``images`` into ``out/predictions``, each exactly once.

    Runs until ``stop_event`` is set (the CLI sets it on SIGINT/SIGTERM) or, with ``once``,
    until what was there at the start is done (Spark's availableNow trigger).
    """
    progress = progress or Progress()
    stop_event = stop_event or threading.Event()
    root = check_images_root(images)
    out_dir = storage.ensure_output_dir(out, spark)
    if storage.is_remote(out_dir):
        raise InputError("`canestra watch` writes its predictions and checkpoint to a local (or mounted) --out; "
                         "s3:// --out is not supported for watch (see docs/streaming.md)")
    model = load_model(model_path)
    result = WatchResult(out_dir, os.path.join(out_dir, PREDICTIONS))
    os.makedirs(result.predictions_path, exist_ok=True)
    # Left by a batch that died mid-write; the --out lock means no other run is using them.
    shutil.rmtree(os.path.join(out_dir, WATCH_DIR, "staging"), ignore_errors=True)
    writer = _BatchWriter(spark, model, out_dir, root, include_paths, progress, result)
    lister = None
    if s3.is_s3(root):
        listing_dir = os.path.join(out_dir, WATCH_DIR, "s3-listing")
        # Poll faster than the trigger, so an object waits at most ~1.25 triggers in all.
        lister = _S3Lister(root, listing_dir, max(0.5, trigger / 4), progress)
        lister.list_once()
        stream = (spark.readStream.format("json").schema("path string, size long")
                  .option("maxFilesPerTrigger", 1000).load(listing_dir))
    else:
        stream = (spark.readStream.format("binaryFile").schema(_BINARY_FILE_SCHEMA)
                  .option("recursiveFileLookup", "true")
                  # Files copied in with an old mtime (cp -p, unzip) must not be skipped as "too old".
                  .option("maxFileAge", "36500d")
                  .option("maxFilesPerTrigger", MAX_FILES_PER_BATCH)
                  .load(root).select("path", "length"))  # not content: the executors read each file once
    w = stream.writeStream.foreachBatch(writer).option("checkpointLocation", os.path.join(out_dir, CHECKPOINT))
    w = w.trigger(availableNow=True) if once else w.trigger(processingTime=f"{trigger} seconds")
    progress.say(f"canestra ▸ watch {storage.display(root)} -> {result.predictions_path} "
                 + ("(once)" if once else f"(every {trigger:g}s; Ctrl-C stops)"))
    query = w.start()
    if lister and not once:
        lister.start()
    try:
        while not stop_event.is_set():
            try:
                if query.awaitTermination(0.5):
                    break
            except Exception as exc:
                if stop_event.is_set():
                    break
                if isinstance(writer.error, CanestraError):  # the batch writer's plain reason, not Spark's wrapper
                    raise writer.error from exc
                raise
    finally:
        if lister:
            lister.halt.set()
        if query.isActive:
            with writer.lock:  # waits for a batch in flight to publish, then no batch may commit
                writer.stopping = True
            try:
                query.stop()
            except Exception:  # the query may already have failed on the stop; nothing was committed
                pass
    if stop_event.is_set():
        result.stopped_by = getattr(stop_event, "reason", "stop")
        result.abandoned_batch = isinstance(writer.error, Exception) and not isinstance(writer.error, _Stopped)
    return result
