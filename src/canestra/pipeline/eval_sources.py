"""``train --eval-images``: the model scored on roots it never trains on (``by_source`` in metrics.json).

The held-out split is cut from the training roots themselves (frame blocks), so it shares their
camera, light and background, and reads higher than photos from anywhere else (by ~15 points
on photos from other sources, as reported when this was asked for). Each ``--eval-images`` root is a labelled
folder (``<root>/<Folder>/<file>``, folders being family names, as for ``--images``, or variety
names). The roots are

* ingested into their own table (``OUT/eval_catalog``, ``OUT/eval_quarantine.csv``), never the
  training catalog, so they are not trained on, not used to calibrate "unknown" and not counted
  in the held-out figures; an image whose pixels are also in a training root is left out (and
  counted as ``left_out_trained_on``);
* embedded through the training feature store (a re-run embeds nothing new);
* scored by the final model minus the CNN (PCA, classifier, answer stage with its calibrated
  thresholds): what ``canestra predict`` would answer.

``source_metrics`` (pure pandas) turns one root's scored rows into its figures.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from canestra.answer.taxonomy import UNKNOWN
from canestra.errors import InputError
from canestra.layout import EVAL_CATALOG, EVAL_QUARANTINE_CSV
from canestra.storage import files as storage

if TYPE_CHECKING:  # pandas loads with Spark, not at import
    import pandas as pd

__all__ = ["check_eval_roots", "evaluate_sources"]

FLAG = "--eval-images"
GAP_POINTS = 3.0  # the held-out figure more than this above the other sources' mean: say so
_BROADCAST_MAX_IMAGES = 500_000  # (id, label, path) rows sent to each executor: at most ~100 MB


# ----------------------------------------------------------------------------- roots, before Spark


def as_eval_roots(eval_images: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[str]:
    if eval_images is None:
        return []
    if isinstance(eval_images, (str, os.PathLike)):
        return [os.fspath(eval_images)]
    return [os.fspath(r) for r in eval_images]


def _key(uri: str) -> str:
    """A root as compared with others: the S3 URI, or the real local path."""
    return storage.display(uri) if storage.is_remote(uri) else os.path.realpath(storage.local_path(uri))


def _within(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/")


def check_eval_roots(eval_images, images, taxonomy) -> list[str]:
    """The evaluation roots, after the listing checks that need no Spark: each exists, holds class
    folders with files, is given once, and is neither a training root nor inside or above one.
    One plain InputError otherwise."""
    from canestra.pipeline.ingest import as_roots, list_roots

    roots = as_eval_roots(eval_images)
    train = [(r, _key(r)) for r in as_roots(images)]
    seen: dict[str, str] = {}
    for uri in roots:
        where = storage.display(uri)
        if not storage.is_remote(uri) and not os.path.exists(storage.local_path(uri)):
            raise InputError(f"{FLAG} folder {where} does not exist: check the path")
        key = _key(uri)
        for okey, other in seen.items():
            if _within(key, okey) or _within(okey, key):
                how = "is given twice" if key == okey else f"overlaps {FLAG} {storage.display(other)}"
                raise InputError(f"{FLAG} {where} {how}: pass each evaluation root once, none inside another")
        seen[key] = uri
        for turi, tkey in train:
            if _within(key, tkey) or _within(tkey, key):
                how = "is" if key == tkey else "overlaps"
                raise InputError(f"{FLAG} {where} {how} the --images root {storage.display(turi)}: evaluation "
                                 "roots are never trained on, so pass a folder outside the training roots")
        files, _ = list_roots([uri], require_labels=False, taxonomy=taxonomy)
        if not any(f.label is not None and f.error is None for f in files):
            raise InputError(f"no class folders under {where}: {FLAG} needs one sub-folder per family or variety, "
                             f"e.g. {where}/Apple/photo_1.jpg")
    return roots


def source_names(roots: Sequence[str]) -> list[str]:
    """What metrics.json calls each root: its folder's name (GDPR Art. 25: no full paths in shared
    outputs), numbered when two roots share a name."""
    names: list[str] = []
    for uri in roots:
        shown = storage.display(uri).rstrip("/")
        base = shown.rsplit("/", 1)[-1] or shown
        name, i = base, 2
        while name in names:
            name, i = f"{base} ({i})", i + 1
        names.append(name)
    return names


# ----------------------------------------------------------------------------- figures (pure pandas)


def _shares(right, unknown, wrong) -> dict[str, float]:
    return {"family_top1": float(right.mean()), "unknown": float(unknown.mean()),
            "confidently_wrong": float(wrong.mean())}


def source_metrics(rows: pd.DataFrame, taxonomy, model_families, level: str) -> dict[str, Any]:
    """Figures of one evaluation root from its scored rows (columns ``label``, ``predicted_label``,
    ``family``: the answered family, empty or null for ``unknown``).

    ``family_top1``: share whose answered family is the true one (``unknown`` counts wrong); for
    a true family the model does not know (not in ``model_families``), ``unknown`` is the right
    answer. ``unknown``: share answered unknown. ``confidently_wrong``: share answered a wrong
    family. ``top1`` (variety roots only): share whose answered variety is the label.
    """
    out: dict[str, Any] = {"level": level, "n": int(len(rows))}
    if rows.empty:
        out.update(family_top1=None, unknown=None, confidently_wrong=None, families={})
        if level == "variety":
            out["top1"] = None
        return out
    true = rows["label"].astype(str).map(taxonomy.family)
    answered = rows["family"].fillna("").astype(str)
    unknown = (rows["predicted_label"] == UNKNOWN) | (answered == "")
    known = true.isin(set(model_families))
    right = (known & ~unknown & (answered == true)) | (~known & unknown)
    wrong = ~unknown & (answered != true)
    out.update(_shares(right, unknown, wrong))
    if level == "variety":
        out["top1"] = float((rows["predicted_label"] == rows["label"]).mean())
    families = {}
    for fam, idx in true.groupby(true).groups.items():
        families[str(fam)] = {"n": int(len(idx)), **_shares(right[idx], unknown[idx], wrong[idx]),
                              "in_model": bool(known[idx].iloc[0])}
    out["families"] = dict(sorted(families.items()))
    return out


def source_gap(metrics: dict, by_source: list[dict]) -> dict[str, Any] | None:
    """The held-out family figure against the mean ``family_top1`` of the evaluation roots.

    The held-out side is the family-labelled held-out photos when the training had such a root,
    else every held-out image; both answered (``unknown`` counts wrong), as ``family_top1``."""
    scored = [s["family_top1"] for s in by_source if s.get("n")]
    fam_roots = (metrics.get("shift") or {}).get("family_roots_held_out")
    if fam_roots:
        held, what = fam_roots.get("answered_family_accuracy"), "family-labelled held-out photos"
    else:
        held, what = (metrics.get("family") or {}).get("answered_accuracy"), "held-out images"
    if not scored or held is None:
        return None
    other = sum(scored) / len(scored)
    gap = (held - other) * 100
    return {"held_out": what, "held_out_family_top1": float(held), "by_source_mean_family_top1": float(other),
            "gap_points": float(gap), "threshold_points": GAP_POINTS, "flatters": bool(gap > GAP_POINTS)}


def gap_warning(gap: dict | None) -> str | None:
    if not gap or not gap["flatters"]:
        return None
    what = "real photos" if gap["held_out"].startswith("family") else "images"
    return (f"held-out {what} read {gap['held_out_family_top1'] * 100:.1f}%, other sources "
            f"{gap['by_source_mean_family_top1'] * 100:.1f}%: the held-out split flatters; trust by_source")


def source_note(s: dict) -> str:
    """The progress line of one root, e.g. ``grocery: family top-1 72.6% (unknown 5.1%, …, 187 images)``."""
    if not s["n"]:
        return f"{s['name']}: no usable image"
    top1 = f", variety top-1 {s['top1'] * 100:.1f}%" if s.get("top1") is not None else ""
    return (f"{s['name']}: family top-1 {s['family_top1'] * 100:.1f}% (unknown {s['unknown'] * 100:.1f}%, "
            f"confidently wrong {s['confidently_wrong'] * 100:.1f}%, {s['n']} images{top1})")


# ----------------------------------------------------------------------------- the step


def _root_of(paths: pd.Series, roots: Sequence[str]) -> pd.Series:
    """Index (into ``roots``) of the root each source path lies under: the longest matching one."""
    prefixes = sorted(((storage.display(r).rstrip("/") + "/", i) for i, r in enumerate(roots)),
                      key=lambda p: -len(p[0]))

    def find(path) -> int:
        return next((i for p, i in prefixes if isinstance(path, str) and path.startswith(p)), -1)

    return paths.map(find)


def evaluate_sources(spark, eval_images, out_dir: str, featurizer, model, catalog_path: str, taxonomy,
                     held_out: dict, st) -> tuple[dict[str, Any], str | None]:
    """Ingest, embed and score the evaluation roots; (metrics.json additions, warning line or None)."""
    import pandas as pd
    from pyspark.ml import PipelineModel
    from pyspark.sql import functions as F

    from canestra.pipeline.evaluation import SCORED_COLUMNS
    from canestra.pipeline.features import update_store
    from canestra.pipeline.ingest import ingest, list_roots

    roots = as_eval_roots(eval_images)
    names = source_names(roots)
    try:
        # The split is irrelevant here ("predict" rows); single-class roots are fine.
        res = ingest(spark, roots, out_dir, require_labels=False, table_name=EVAL_CATALOG,
                     quarantine_name=EVAL_QUARANTINE_CSV, taxonomy=taxonomy)
    except InputError as exc:  # no usable image at all: the model just trained is still saved
        st.note(f"{FLAG}: {exc}")
        infos = list_roots(roots, require_labels=False, taxonomy=taxonomy)[1]
        none = pd.DataFrame({"label": [], "predicted_label": [], "family": []})
        return {"by_source": [{"name": n, **source_metrics(none, taxonomy, (), r["level"]), "left_out_trained_on": 0}
                              for n, r in zip(names, infos)]}, None
    levels = [r["level"] for r in res.roots]
    catalog = spark.read.parquet(res.catalog_path).where("label IS NOT NULL")
    store_df, update = update_store(spark, catalog, out_dir, featurizer)
    trained_on = spark.read.parquet(catalog_path).select("image_id").distinct().withColumn("_train", F.lit(True))
    labels = catalog.select("image_id", "label", "source_path").join(trained_on, "image_id", "left")
    if res.images <= _BROADCAST_MAX_IMAGES:
        labels = F.broadcast(labels)
    feats = store_df.join(labels, "image_id", "inner")
    # The final model minus the CNN: its PCA, classifier and answer stage with the calibrated thresholds.
    scored = PipelineModel(stages=model.stages[1:]).transform(feats)
    rows: pd.DataFrame = scored.select(*SCORED_COLUMNS, "source_path",
                                       F.coalesce("_train", F.lit(False)).alias("_train")).toPandas()
    rows["_root"] = _root_of(rows["source_path"], roots)
    model_families = set(model.stages[-1].getRule().families)

    by_source = []
    for i, (name, level) in enumerate(zip(names, levels)):
        mine = rows[rows["_root"] == i]
        left_out = int(mine["_train"].sum())
        s = {"name": name, **source_metrics(mine[~mine["_train"]].reset_index(drop=True), taxonomy,
                                            model_families, level)}
        s["left_out_trained_on"] = left_out
        by_source.append(s)
        st.note(source_note(s) + (f"; {left_out} images also in the training roots left out" if left_out else ""))
    st.note(f"{EVAL_CATALOG}: {res.note()}; {update.note()}")
    gap = source_gap(held_out, by_source)
    added: dict[str, Any] = {"by_source": by_source,
                             "eval_feature_store": {"featurized": update.featurized, "reused": update.reused},
                             "eval_counts": {"images": res.images, "quarantined": res.quarantined}}
    if gap:
        added["by_source_gap"] = gap
    return added, gap_warning(gap)
