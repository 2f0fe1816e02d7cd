"""Ingest: image tree -> curated catalog table (Parquet) + quarantine.csv.

The driver only lists files (one directory walk); reading, decoding, validating
and metadata stripping run on the executors in ``mapInPandas``. Rows that fail
become quarantine records with their reason; the run goes on.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import pandas as pd

from canestra.errors import InputError
from canestra.layout import CATALOG, MANIFEST, QUARANTINE_CSV
from canestra.pipeline.split import assign_splits, frame_number
from canestra.storage import files as storage

__all__ = ["QUARANTINE_CSV", "Listing", "as_roots", "as_uris", "balanced_partitions", "cleaned_frame", "ingest",
           "list_roots", "listed", "make_listing", "read_manifest", "write_quarantine_csv"]

# Columns of the catalog table. source_size and source_mtime let the next ingest of a changed
# tree keep the rows of files that did not change instead of reading them again.
CATALOG_COLUMNS = ["image_id", "label", "split", "frame", "width", "height", "format", "content", "source_path",
                   "source_size", "source_mtime"]
_LISTING_SCHEMA = ("source_path string, label string, split string, frame int, size long, mtime double, "
                   "listing_error string")
_SCHEMA = (
    "source_path string, label string, split string, frame int, image_id string, "
    "width int, height int, format string, content binary, source_size long, source_mtime double, error string"
)


@dataclass
class IngestResult:
    catalog_path: str
    images: int
    quarantined: int
    classes: int
    quarantine_csv: str
    reused: bool = False  # the whole catalog was kept (same listing)
    roots: list[dict] = field(default_factory=list)  # per --images root: uri, level (variety|family), files
    read: int | None = None  # files read and cleaned this run (None when the catalog was reused whole)
    unchanged: int = 0  # rows kept from the previous catalog: same path, size and modification time

    def note(self) -> str:
        """The progress line: counts, and how much of the tree was read this run."""
        done = (" (catalog reused)" if self.reused else
                f" ({self.read} files read, {self.unchanged} unchanged since the last catalog)" if self.unchanged else "")
        return f"{self.images} images, {self.classes} classes, {self.quarantined} quarantined{done}"

    def roots_note(self) -> str:
        """How the family-level and "none of the families" roots were read (empty when there are none)."""
        return ("".join(f"; {storage.display(r['uri'])}: family-level ({r['folders']} families)"
                        for r in self.roots if r["level"] == "family")
                + "".join(f"; {storage.display(r['uri'])}: none of the families ({r['files']} files, answered unknown)"
                          for r in self.roots if r["level"] == "unknown"))


def _clean_partition(max_pixels: int, s3_options=None):
    # s3_options travels in the closure: executors must not depend on the driver's env.
    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from canestra.storage import files as st
        from canestra.vision.images import DEFAULT_MAX_BYTES, BadImage, clean_image

        for pdf in batches:
            rows = []
            for rec in pdf.itertuples(index=False):
                row = {
                    "source_path": rec.source_path,
                    "label": rec.label,
                    "split": rec.split,
                    "frame": rec.frame,
                    "image_id": None,
                    "width": None,
                    "height": None,
                    "format": None,
                    "content": None,
                    "source_size": rec.size,
                    "source_mtime": rec.mtime,
                    "error": None,
                }
                # The name never decides: the bytes say whether (and which) image it is.
                data = None
                try:
                    if isinstance(rec.listing_error, str):
                        raise BadImage(rec.listing_error)
                    if st.is_remote(rec.source_path) and rec.size > DEFAULT_MAX_BYTES:  # S3: listed size, no GET
                        raise BadImage(f"file too large: {rec.size} bytes exceeds the {DEFAULT_MAX_BYTES}-byte limit")
                    try:
                        data = st.read_bytes(rec.source_path, s3_options, max_bytes=DEFAULT_MAX_BYTES)
                    except OSError as exc:
                        raise BadImage(st.unreadable_reason(exc, rec.source_path)) from exc
                    img = clean_image(data, max_pixels=max_pixels)
                    row.update(image_id=img.image_id, width=img.width, height=img.height,
                               format=img.format, content=img.content)
                except BadImage as exc:
                    row["error"] = str(exc)
                    if data is not None and rec.size >= 0 and len(data) != rec.size:
                        row["error"] += " (the file changed after it was listed: was it still being written?)"
                except Exception as exc:  # never lose the run to one odd file
                    row["error"] = f"unexpected error: {type(exc).__name__}: {exc}"
                rows.append(row)
            out = pd.DataFrame(rows, columns=list(row.keys()) if rows else None)
            if not rows:
                continue
            out["frame"] = out["frame"].astype("Int32")
            out["source_size"] = out["source_size"].astype("Int64")
            out["width"] = out["width"].astype("Int32")
            out["height"] = out["height"].astype("Int32")
            yield out

    return run


def balanced_partitions(spark, rows: int, rows_per_task: int = 1000) -> int:
    """How many equal partitions to cut ``rows`` into: a multiple of the task slots.

    Equal tasks in full waves keep every core busy to the end; e.g. 13 tasks on 2 cores
    would leave one core idle for the last wave.
    """
    slots = spark.sparkContext.defaultParallelism
    return slots * max(2, -(-rows // (slots * rows_per_task)))


def listing_frame(spark, files: list[storage.ListedFile], splits: list[str], frames: list[int | None]):
    """The driver's listing as a DataFrame (schema ``_LISTING_SCHEMA``), one row per listed file."""
    listing = pd.DataFrame(
        {
            "source_path": [f.path for f in files],
            "label": [f.label for f in files],
            "split": splits,
            "frame": pd.array(frames, dtype="Int32"),
            "size": pd.array([f.size for f in files], dtype="Int64"),
            "mtime": [float(f.mtime) for f in files],
            "listing_error": pd.array([f.error for f in files], dtype="string"),
        }
    )
    return spark.createDataFrame(listing, schema=_LISTING_SCHEMA)


def clean_listing(spark, listing, rows: int, max_pixels: int, s3_options=None):
    """Read, decode and clean the listed files on the executors (schema ``_SCHEMA``).

    Bad files come back as rows with ``error`` set, so callers can quarantine them.
    """
    return listing.repartition(balanced_partitions(spark, rows)).mapInPandas(
        _clean_partition(max_pixels, s3_options), schema=_SCHEMA)


def cleaned_frame(spark, files: list[storage.ListedFile], splits: list[str], frames: list[int | None],
                  max_pixels: int, s3_options=None):
    """The listing as a DataFrame whose rows the executors read, decode and clean (schema ``_SCHEMA``)."""
    return clean_listing(spark, listing_frame(spark, files, splits, frames), len(files), max_pixels,
                         s3_options or storage.s3_options_for(files))


def _previous_catalog(spark, final: str, manifest: dict | None, params: dict):
    """The last catalog when its rows can be kept for unchanged files: same cleaning and split
    parameters, and it records each source file's size and modification time."""
    if not manifest or manifest.get("params") != params:
        return None
    try:
        old = spark.read.parquet(final)
    except Exception:  # an unreadable old table is rebuilt, never trusted
        return None
    return old if {"source_size", "source_mtime"} <= set(old.columns) else None


def _reuse_unchanged(spark, listing, old, rows: int, max_pixels: int, s3_options):
    """Cleaned rows for the listing: files whose (path, size, mtime) the old catalog holds keep
    its cleaned row (label, split and frame from the new listing); the rest are read and cleaned."""
    from pyspark.sql import functions as F

    kept = old.select("source_path", F.col("source_size").alias("size"), F.col("source_mtime").alias("mtime"),
                      "image_id", "width", "height", "format", "content").dropDuplicates(["source_path"])
    keys = ["source_path", "size", "mtime"]
    same = listing.where("listing_error IS NULL").join(kept, keys, "inner")
    unchanged = same.select(
        "source_path", "label", "split", "frame", "image_id", "width", "height", "format", "content",
        F.col("size").alias("source_size"), F.col("mtime").alias("source_mtime"), F.lit(None).cast("string").alias("error"),
        F.lit(True).alias("unchanged"))
    fresh = listing.join(kept.select(*keys), keys, "left_anti")
    return clean_listing(spark, fresh, rows, max_pixels, s3_options).withColumn("unchanged", F.lit(False)) \
        .unionByName(unchanged)


def listing_fingerprint(files: list[storage.ListedFile], **params) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for f in files:
        h.update(f"{f.path}\0{f.label}\0{f.size}\0{f.mtime}\n".encode())
        if f.error:  # only then, so fingerprints of clean listings stay as they were
            h.update(f"{f.error}\n".encode())
    return h.hexdigest()


def read_manifest(table_dir: str) -> dict | None:
    try:
        return json.loads(storage.read_text(os.path.join(table_dir, MANIFEST)) or "null")
    except (OSError, ValueError):
        return None


def write_quarantine_csv(path: str, rows: list[tuple[str, str]]) -> None:
    # GDPR Art. 25: unlike predictions, quarantine.csv keeps source paths on purpose. It is the
    # operator's list of files to fix or remove, never shared; rejected files have no image_id
    # (they could not be decoded), so the path is the only way to find them. `canestra erase
    # --source` removes rows from it.
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["path", "reason"])
    writer.writerows(sorted(rows))
    storage.write_text_atomic(path, buf.getvalue())


def as_roots(images_uri: str | list[str] | tuple[str, ...]) -> list[str]:
    roots = [images_uri] if isinstance(images_uri, str) else list(images_uri)
    if not roots:
        raise InputError("no --images given: pass at least one image folder")
    return roots


def list_roots(images_uri: str | list[str], require_labels: bool, taxonomy=None,
               unknown_uris: str | list[str] | tuple[str, ...] = (),
               family_uris: str | list[str] | tuple[str, ...] = ()) -> tuple[list[storage.ListedFile], list[dict]]:
    """List one or several roots. With a taxonomy, a root whose folders are all family names
    (``real-photos/Apple/...``) is family-level: its labels become ``"Apple (family)"``.
    A ``family_uris`` root (one of ``images_uri``) is family-level whatever its folder names
    (``Banana/``, ``Orange/`` are Fruits-360 class names too); each folder must name a family.
    Every image under an ``unknown_uris`` root (any folder, or none) is labelled
    ``OTHER_LABEL``: a photo of none of the families, which the model learns to refuse."""
    from canestra.answer.taxonomy import OTHER_LABEL, family_label

    roots = as_roots(images_uri)
    unknown = list(as_uris(unknown_uris))
    forced = as_uris(family_uris)
    files: list[storage.ListedFile] = []
    info: list[dict] = []
    for uri in roots + unknown:
        listed = storage.list_images(uri)
        if not listed:
            where = storage.display(uri)
            raise InputError(f"no files found under {where}: put images in class folders, e.g. {where}/Banana/0_100.jpg")
        folders = sorted({f.label for f in listed if f.label is not None})
        level = "family" if taxonomy is not None and taxonomy.is_family_root(folders) else "variety"
        if uri in forced:
            level = "family"
            _check_family_folders(uri, folders, taxonomy)
        if uri in unknown and uri not in roots:
            level = "unknown"
            listed = [replace(f, label=OTHER_LABEL) for f in listed]
        elif level == "family":
            listed = [replace(f, label=family_label(taxonomy.canonical_family(f.label))) if f.label is not None else f
                      for f in listed]
        files += listed
        info.append({"uri": uri, "level": level, "files": len(listed), "folders": len(folders)})
    if require_labels:
        _check_labelled(files, ", ".join(storage.display(r) for r in roots))
    return files, info


def _check_family_folders(uri: str, folders: list[str], taxonomy) -> None:
    where = storage.display(uri)
    bad = [n for n in folders if taxonomy is None or not taxonomy.canonical_family(n)]
    if bad or not folders:
        raise InputError(f"--family-images {where}: put photos in family folders ({where}/Banana/photo.jpg); "
                         + (f"{', '.join(bad[:3])} name{'s' if len(bad) == 1 else ''} no family of the taxonomy "
                            "(add yours with --taxonomy FILE.csv, columns class,family)" if bad else "it has none"))


@dataclass(frozen=True)
class Listing:
    """One listing of image roots: made by the pre-checks, then reused by the run, so an ``s3://``
    tree is listed once, not twice. It fits a later request only for the same roots, unknown roots,
    family-level reading (a taxonomy or not) and forced family roots; otherwise the run lists again."""

    roots: tuple[str, ...]
    unknown: tuple[str, ...]
    families: bool
    files: list[storage.ListedFile]
    info: list[dict]
    family: tuple[str, ...] = ()  # roots read at family level whatever their folder names (--family-images)

    def fits(self, images_uri: str | list[str], unknown_uris=(), taxonomy=None, family_uris=()) -> bool:
        return ((self.roots, self.unknown, self.families, self.family)
                == (tuple(as_roots(images_uri)), as_uris(unknown_uris), taxonomy is not None, as_uris(family_uris)))


def as_uris(uris: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """One root or several, as a tuple (empty for None)."""
    return (uris,) if isinstance(uris, str) else tuple(uris or ())


def make_listing(images_uri: str | list[str], require_labels: bool, taxonomy=None,
                 unknown_uris: str | list[str] | tuple[str, ...] = (),
                 family_uris: str | list[str] | tuple[str, ...] = ()) -> Listing:
    """``list_roots`` kept as a ``Listing`` for the run to reuse."""
    files, info = list_roots(images_uri, require_labels, taxonomy, unknown_uris, family_uris)
    return Listing(tuple(as_roots(images_uri)), as_uris(unknown_uris), taxonomy is not None, files, info,
                   as_uris(family_uris))


def listed(listing: Listing | None, images_uri: str | list[str], require_labels: bool, taxonomy=None,
           unknown_uris: str | list[str] | tuple[str, ...] = (),
           family_uris: str | list[str] | tuple[str, ...] = ()) -> tuple[list[storage.ListedFile], list[dict]]:
    """The pre-checks' listing when it fits this request, else a new one."""
    if listing is not None and listing.fits(images_uri, unknown_uris, taxonomy, family_uris):
        if require_labels:
            _check_labelled(listing.files, ", ".join(storage.display(r) for r in listing.roots))
        return listing.files, listing.info
    return list_roots(images_uri, require_labels, taxonomy, unknown_uris, family_uris)


def _check_labelled(files: list[storage.ListedFile], root: str) -> None:
    labelled = [f for f in files if f.label is not None and f.error is None]
    if not labelled:
        raise InputError(
            f"no class folders under {root}: training needs one sub-folder per class, e.g. {root}/Banana/0_100.jpg"
        )
    classes = {f.label for f in labelled}
    if len(classes) < 2:
        raise InputError(
            f"only one class ({next(iter(classes))!r}) under {root}: a classifier needs at least 2 class folders"
        )


def ingest(
    spark,
    images_uri: str | list[str],
    out_dir: str,
    *,
    test_fraction: float = 0.2,
    seed: int = 42,
    require_labels: bool = True,
    max_pixels: int | None = None,
    reuse: bool = True,
    table_name: str = CATALOG,
    quarantine_name: str = QUARANTINE_CSV,
    taxonomy=None,
    unknown_images: str | list[str] | tuple[str, ...] = (),
    listing: Listing | None = None,
    family_images: str | list[str] | tuple[str, ...] = (),
) -> IngestResult:
    """Build (or reuse, when the listing is unchanged) ``out_dir/<table_name>``.

    ``images_uri`` may list several roots; with a ``taxonomy``, family-level roots are
    recognised (see ``list_roots``; ``family_images``: roots of ``images_uri`` read at family level whatever
    their folder names); ``unknown_images`` roots hold photos of none of the families.
    ``listing``: the pre-checks' listing of the same roots (``make_listing``), reused when it fits.
    """
    from pyspark.sql import functions as F

    from canestra.vision.images import DEFAULT_MAX_PIXELS

    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    files, roots = listed(listing, images_uri, require_labels, taxonomy, unknown_images, family_images)
    if require_labels:
        files_unlabelled = [f for f in files if f.label is None]
        files = [f for f in files if f.label is not None]
    else:
        files_unlabelled = []
    final = os.path.join(out_dir, table_name)
    qpath = os.path.join(out_dir, quarantine_name)
    from canestra.pipeline.split import DEFAULT_BLOCKS

    params = {"test_fraction": test_fraction, "seed": seed, "max_pixels": max_pixels, "blocks": DEFAULT_BLOCKS}
    fp = listing_fingerprint(files, **params)
    manifest = read_manifest(final)
    if reuse and manifest and manifest.get("fingerprint") == fp and storage.exists(qpath):
        return IngestResult(final, manifest["images"], manifest["quarantined"], manifest["classes"], qpath,
                            reused=True, roots=roots)

    labels = [f.label or "" for f in files]
    names = [os.path.basename(f.path) for f in files]
    splits = assign_splits(labels, names, test_fraction, seed) if require_labels else ["predict"] * len(files)
    frames = [frame_number(n) for n in names]
    listing = listing_frame(spark, files, splits, frames)  # from here on Spark holds the listing
    n_files, s3_opts = len(files), storage.s3_options_for(files)
    del files, labels, names, splits, frames
    from canestra.sparkctx import trim_driver_memory

    trim_driver_memory()  # the driver's RSS must not keep what the listing took (flat with the image count)
    old = _previous_catalog(spark, final, manifest, params) if reuse else None
    if old is None:
        cleaned = clean_listing(spark, listing, n_files, max_pixels, s3_opts).withColumn("unchanged", F.lit(False))
    else:
        cleaned = _reuse_unchanged(spark, listing, old, n_files, max_pixels, s3_opts)
    cleaned = cleaned.persist()
    try:
        staging = storage.staging_dir(final)
        (
            cleaned.where("error IS NULL")
            .select(*CATALOG_COLUMNS)
            .write.mode("overwrite")
            .parquet(staging)
        )
        bad = [(r.source_path, r.error) for r in cleaned.where("error IS NOT NULL").select("source_path", "error").collect()]
        counts = cleaned.where("error IS NULL").groupBy("label").agg(
            F.count("*").alias("n"), F.sum(F.col("unchanged").cast("long")).alias("kept")).collect()
        per_class = {r["label"]: r["n"] for r in counts}
        n_unchanged = int(sum(r["kept"] or 0 for r in counts))
    finally:
        cleaned.unpersist()
    n_ok = int(sum(per_class.values()))
    bad += [(f.path, f.error or "not in a class folder: training images must sit in <root>/<Class>/")
            for f in files_unlabelled]
    if n_ok == 0:
        storage.publish_dir(staging, final)  # keep the empty table for inspection
        write_quarantine_csv(qpath, bad)
        raise InputError(
            f"none of the {n_files} files under {', '.join(storage.display(r) for r in as_roots(images_uri))} is a usable image: see {qpath}"
        )
    classes = len([c for c in per_class if c is not None])
    info = {
        # Retention (purge) dates the table by this, not by file mtimes an erasure rewrite refreshes.
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": fp,
        "params": params,
        "source": images_uri if isinstance(images_uri, str) else list(images_uri),
        "images": n_ok,
        "quarantined": len(bad),
        "classes": classes,
        "test_fraction": test_fraction,
        "seed": seed,
    }
    storage.write_text_atomic(os.path.join(staging, MANIFEST), json.dumps(info, indent=2))
    write_quarantine_csv(qpath, bad)
    storage.publish_dir(staging, final)
    return IngestResult(final, n_ok, len(bad), classes, qpath, roots=roots, read=n_files - n_unchanged,
                        unchanged=n_unchanged)
