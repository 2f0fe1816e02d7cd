"""Content-addressed feature store: CNN embeddings kept per image, reused by later runs.

The CNN is the expensive part of every run, and an image's embedding depends only on its
pixels and on the featurizer. So embeddings are keyed by ``image_id`` (the SHA-256 of the
pixels, the catalog's id) inside a folder named after the featurizer's identity (network,
weights, graph version, image sizes, precision, input fit: a short hash):

    OUT/feature_store/<featurizer-key>/part-<utc>-<uuid>/   Parquet (image_id, features, block)
                                                     /_canestra.json   manifest (created_at, rows, identity)

``block`` is the graph's second pooled output (``backbone``), kept for every image whatever model is
trained (it costs no extra CNN pass): a studio-only model's answer head reads it, and a store shared by
both kinds of model then never re-embeds. A custom ONNX graph without that output stores none.

Each run featurizes only the ids not stored yet and appends them as one new part. A part is
written under ``_staging/`` and renamed into place with its manifest already inside (locally
a directory rename: atomic), so a killed run leaves no visible part, only a ``_staging``
leftover that ``erase``/``purge`` clean up. Readers only use parts that have a manifest (on
S3, where publishing is a copy, the manifest is written last and marks the part complete).
Every run appends ids the store lacks, so an id is stored once per key.

Parts are separate Parquet tables on purpose: ``erase`` rewrites the ones holding an erased
id like any other table, and ``purge`` ages each part by its manifest's ``created_at``, so
old embeddings expire with the retention period even while new runs keep appending.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

from canestra.layout import MANIFEST
from canestra.storage import files as storage

__all__ = ["BLOCK", "PART_PREFIX", "STORE", "store_of", "update_store", "update_views"]

STORE = "feature_store"
BLOCK = "block"  # the column of the graph's ``block`` output
PART_PREFIX = "part-"
KEY_CHARS = 16  # 64 bits of the identity hash: collisions between featurizers are not a concern


@functools.lru_cache(maxsize=4)
def _file_digest(path: str) -> str:
    from canestra.vision import backbone

    return backbone.model_sha256(path)[:KEY_CHARS]


def featurizer_identity(featurizer) -> dict:
    """What determines an embedding besides the pixels (batch size and threads do not)."""
    from canestra.vision import backbone

    get = featurizer.getOrDefault
    precision = get(featurizer.precision)
    custom = get(featurizer.modelPath)
    ident = {
        "backbone": get(featurizer.backboneName),
        "graph_version": backbone.GRAPH_VERSION,
        # A custom ONNX file is named by its bytes; the built-in graph by the weights it is built from.
        "weights": _file_digest(custom) if custom else _file_digest(backbone.weights_path()),
        "custom_graph": bool(custom),
        "precision": precision,
        "image_sizes": [int(s) for s in get(featurizer.imageSizes)],
        "input_fit": get(featurizer.inputFit),
    }
    if precision == "int8" and not custom:
        # The int8 graph depends on the quantization recipe and on the CPU (uint8 weights without VNNI).
        ident["quantization"] = f"q{backbone.QUANT_VERSION}{'' if backbone.has_vnni() else '-u8u8'}"
    return ident


def featurizer_key(featurizer) -> str:
    blob = json.dumps(featurizer_identity(featurizer), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:KEY_CHARS]


def store_dir(out_dir: str, featurizer) -> str:
    return os.path.join(out_dir, STORE, featurizer_key(featurizer))


def list_parts(store: str) -> list[str]:
    """Complete parts of a store (those with a manifest), oldest first."""
    from canestra.storage import s3

    if s3.is_s3(store):
        if not storage.is_dir(store):
            return []
        names = {rel.split("/", 1)[0] for _, rel, _, _ in s3.list_objects(store, storage.s3_options())
                 if rel.count("/") == 1 and rel.endswith("/" + MANIFEST)}
    else:
        local = storage.local_path(store)
        if not os.path.isdir(local):
            return []
        names = {n for n in os.listdir(local) if os.path.isfile(os.path.join(local, n, MANIFEST))}
    return [os.path.join(store, n) for n in sorted(names) if n.startswith(PART_PREFIX)]


def read_store(spark, store: str, columns=("image_id", "features")):
    """The stored (image_id, features) rows, or None when the store is empty."""
    parts = list_parts(store)
    return spark.read.parquet(*parts).select(*columns) if parts else None


def stores_block(featurizer) -> bool:
    """Whether the store keeps the ``block`` output beside the embedding: the built-in graphs have it, a custom
    ONNX file may not."""
    from canestra.vision import backbone

    custom = featurizer.getOrDefault(featurizer.modelPath)
    return not custom or backbone.has_block(custom)


@dataclass
class StoreUpdate:
    store: str
    featurized: int  # images the CNN embedded in this run
    reused: int  # distinct images whose embedding was already stored
    part: str | None  # the part this run appended, if any

    def note(self) -> str:
        return f"{self.featurized} images featurized, {self.reused} reused from the feature store"


def update_store(spark, images, out_dir: str, featurizer) -> tuple[Any, StoreUpdate]:
    """Embed the images of ``images`` (columns image_id, content) that the store lacks, append
    them as one part, and return (the whole store as a DataFrame of image_id, features[, block]; counts)."""
    from pyspark.sql import functions as F

    from canestra.pipeline.ingest import balanced_partitions

    store = store_dir(out_dir, featurizer)
    block = stores_block(featurizer)
    columns = ("image_id", "features", BLOCK) if block else ("image_id", "features")
    # The store's rows are the same whatever the caller's featurizer writes besides the embedding.
    featurizer = featurizer.copy({featurizer.blockCol: BLOCK if block else ""})
    ids = images.select("image_id").where("image_id IS NOT NULL").distinct()
    stored = read_store(spark, store)
    # One pass over the ids tells both how many are stored and which are new (Spark jobs, not
    # the CNN, are what a run with few new images spends its featurize time on).
    flag = F.lit(False) if stored is None else F.col("_stored").isNotNull()
    if stored is not None:
        ids = ids.join(stored.select("image_id").withColumn("_stored", F.lit(True)), "image_id", "left")
    ids = ids.select("image_id", flag.alias("stored")).cache()
    try:
        counts = {r["stored"]: r["count"] for r in ids.groupBy("stored").count().collect()}
        n_new, n_reused = counts.get(False, 0), counts.get(True, 0)
        part = None
        if n_new:
            todo = (images.select("image_id", "content")
                    .join(ids.where(~F.col("stored")).select("image_id"), "image_id", "left_semi")
                    .dropDuplicates(["image_id"])
                    # Equal partitions in full waves keep every core busy on the CNN to the end.
                    .repartition(balanced_partitions(spark, n_new)))
            part = _append_part(store, featurizer.transform(todo).select(*columns), n_new, featurizer)
    finally:
        ids.unpersist()
    return read_store(spark, store, columns), StoreUpdate(store, n_new, n_reused, part)


def _append_part(store: str, rows, n: int, featurizer) -> str:
    """Write ``rows`` as a new part and publish it whole (see the module docstring)."""
    from canestra.storage import s3

    now = dt.datetime.now(dt.timezone.utc)
    name = f"{PART_PREFIX}{now.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:8]}"
    final = os.path.join(store, name)
    staging = storage.staging_dir(final)
    rows.write.mode("overwrite").parquet(staging)
    manifest = json.dumps({
        # purge dates the part by this, not by file mtimes an erasure rewrite refreshes
        "created_at": now.isoformat(timespec="seconds"),
        "images": n,
        "featurizer": featurizer_identity(featurizer),
    }, indent=2)
    if s3.is_s3(final):
        storage.publish_dir(staging, final)  # a copy on S3: the manifest, written last, marks it complete
        storage.write_text_atomic(os.path.join(final, MANIFEST), manifest)
    else:
        storage.write_text_atomic(os.path.join(staging, MANIFEST), manifest)
        storage.publish_dir(staging, final)
    return final


def store_of(table: str) -> str | None:
    """The store folder (``…/feature_store/<key>``) a table path is a part of, or None."""
    parent = os.path.dirname(table.rstrip("/"))
    if os.path.basename(os.path.dirname(parent)) == STORE and os.path.basename(table).startswith(PART_PREFIX):
        return parent
    return None


# ----------------------------------------------------------------------------- augmented views

VIEWS_SCHEMA = "image_id string, view int, content binary"


def views_dir(out_dir: str, featurizer) -> str:
    """Store of augmented-view embeddings (rows image_id, view, features): keyed by the featurizer
    and the view recipe. Rows carry the *source* image's id, so erasing that id erases its views."""
    from canestra.vision import views

    return os.path.join(out_dir, STORE, f"{featurizer_key(featurizer)}-views-{views.RECIPE}")


def _view_partition(batches):
    import pandas as pd

    from canestra.vision.views import view_jpeg

    for pdf in batches:
        out = []
        for rec in pdf.itertuples(index=False):
            try:
                out.append((rec.image_id, int(rec.view), view_jpeg(bytes(rec.content), rec.image_id, int(rec.view) - 1)))
            except Exception:  # a cleaned image always decodes; never lose the run to one odd view
                continue
        if out:
            yield pd.DataFrame(out, columns=["image_id", "view", "content"])


def update_views(spark, images, out_dir: str, featurizer, n_views: int) -> tuple[Any, StoreUpdate]:
    """Embed views 1..``n_views`` of ``images`` (image_id, content) that the views store lacks;
    return (the store's rows image_id, view, features for views <= n_views; counts in views)."""
    from pyspark.sql import functions as F

    from canestra.pipeline.ingest import balanced_partitions

    store = views_dir(out_dir, featurizer)
    wanted = images.select("image_id").where("image_id IS NOT NULL").distinct() \
        .crossJoin(spark.range(1, n_views + 1).select(F.col("id").cast("int").alias("view")))
    stored = read_store(spark, store, ("image_id", "view", "features"))
    # One pass over the wanted (id, view) pairs tells how many are stored and which are new, as update_store.
    flag = F.lit(False) if stored is None else F.col("_stored").isNotNull()
    if stored is not None:
        wanted = wanted.join(stored.select("image_id", "view").withColumn("_stored", F.lit(True)),
                             ["image_id", "view"], "left")
    wanted = wanted.select("image_id", "view", flag.alias("stored")).cache()
    try:
        counts = {r["stored"]: r["count"] for r in wanted.groupBy("stored").count().collect()}
        n_new, n_reused = counts.get(False, 0), counts.get(True, 0)
        part = None
        if n_new:
            todo = (images.select("image_id", "content").dropDuplicates(["image_id"])
                    .join(wanted.where(~F.col("stored")).select("image_id", "view"), "image_id", "inner")
                    .repartition(balanced_partitions(spark, n_new))
                    .mapInPandas(_view_partition, schema=VIEWS_SCHEMA))
            part = _append_part(store, featurizer.transform(todo).select("image_id", "view", "features"), n_new,
                                featurizer)
    finally:
        wanted.unpersist()
    rows = read_store(spark, store, ("image_id", "view", "features"))
    rows = rows.where(F.col("view") <= n_views) if rows is not None else None
    return rows, StoreUpdate(store, n_new, n_reused, part)
