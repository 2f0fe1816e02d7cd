"""train / evaluate: catalog -> features table -> PCA + classifier -> one PipelineModel.

Features are computed once, written as a table, and read back (cached) for the
PCA and classifier fits: the CNN, the expensive part, never runs twice.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from canestra import __version__
from canestra.answer.taxonomy import OTHER_LABEL, is_family_label, is_variety_label
from canestra.config import Settings
from canestra.errors import InputError
from canestra.layout import FEATURES, METRICS_JSON, MODEL, REPORT_HTML
from canestra.pipeline.ingest import balanced_partitions, ingest, read_manifest
from canestra.pipeline.metrics import classification_metrics
from canestra.pipeline.pca import fit_pca
from canestra.pipeline.report import write_report
from canestra.pipeline.split import DEFAULT_BLOCKS, METHOD
from canestra.progress import Progress
from canestra.storage import files as storage
from canestra.vision import backbone
from canestra.vision.featurizer import ImageFeaturizer

if TYPE_CHECKING:  # pandas loads with Spark, not at import
    import pandas as pd

# featurize_table, make_classifier and make_featurizer are hooks for the benches (bench/*.py).
__all__ = ["featurize_table", "make_classifier", "make_featurizer", "train"]

PREDICTION_COL = "predicted_label"  # written by the AnswerModel stage
# The answer head's output columns (``_fit_answer_head``); its margins stay apart from the main head's rawPrediction.
ANSWER_COLUMNS = {"rawPredictionCol": "answer_raw", "probabilityCol": "answer_probability",
                  "predictionCol": "answer_prediction"}


@dataclass
class TrainResult:
    out_dir: str
    metrics: dict
    timings: dict = field(default_factory=dict)


def make_featurizer(cfg: Settings) -> ImageFeaturizer:
    return ImageFeaturizer(
        inputCol="content",
        outputCol="features",
        batchSize=cfg.batch_size,
        imageSizes=list(cfg.image_sizes),
        threads=cfg.threads,
        precision=backbone.resolve_precision(cfg.precision),  # the model records the concrete one
    )


def featurize_table(spark, catalog_path: str, out_path: str, featurizer: ImageFeaturizer) -> str:
    """Write the features table (image_id, label, split, features) atomically."""
    catalog = spark.read.parquet(catalog_path)
    # Spark packs the catalog's files into as many splits as it likes (3 for 13,680 images on
    # 2 cores: one core idle for the last third). Equal partitions in full waves keep both busy.
    rows = (read_manifest(catalog_path) or {}).get("images")
    if rows:
        catalog = catalog.repartition(balanced_partitions(spark, rows))
    staging = storage.staging_dir(out_path)
    (
        featurizer.transform(catalog.select("image_id", "label", "split", "content"))
        .drop("content")
        .write.mode("overwrite")
        .parquet(staging)
    )
    storage.publish_dir(staging, out_path)
    return out_path


def make_classifier(cfg: Settings, features_col: str):
    from pyspark.ml.classification import LogisticRegression

    return LogisticRegression(
        featuresCol=features_col,
        labelCol="label_index",
        predictionCol="prediction",
        family="multinomial",
        regParam=cfg.reg_param,
        elasticNetParam=cfg.elastic_net,
        maxIter=cfg.max_iter,
        tol=1e-6,
        # PCA output is already on the scale of the embedding's variance; re-standardising
        # each component would amplify the low-variance (noisy) tail (measured: -0.3 points).
        standardization=False,
    )


def _fit_studio_check(projected, pca, labels: list[str], cfg: Settings, taxonomy) -> tuple[dict, str]:
    """The studio second opinion (``answer.rule`` module doc): the classifier refitted on the studio frames
    only, its PCA folded into one linear map of the embedding; its threshold calibrated on the real
    training photos (``answer.rule.studio_check_threshold``). Only for a model that has both studio
    varieties and family-labelled photos: ({} and why not) otherwise; (spec, its note) when on."""
    import numpy as np
    from pyspark.sql import functions as F

    from canestra.answer.rule import STUDIO_CHECK_MIN, STUDIO_CHECK_SHARE, studio_check_spec, studio_check_threshold

    varieties = [i for i, lb in enumerate(labels) if is_variety_label(lb)]
    real = [i for i, lb in enumerate(labels) if is_family_label(lb)]
    if len(varieties) < 2 or not real:
        return {}, ""
    # label_index -> index among the varieties (-1: not a studio row)
    lookup = F.array(*[F.lit(varieties.index(i) if i in varieties else -1) for i in range(len(labels))])
    studio = (projected.withColumn("studio_index", F.element_at(lookup, F.col("label_index").cast("int") + 1))
              .where("studio_index >= 0").withColumn("studio_index", F.col("studio_index").cast("double")))
    lr = make_classifier(cfg, "pca").setLabelCol("studio_index").fit(studio)
    coef, bias = lr.coefficientMatrix.toArray(), lr.interceptVector.toArray()  # [varieties, k], [varieties]
    if coef.shape[0] != len(varieties):  # a variety with no training row: no opinion rather than a wrong one
        return {}, ""
    # The real training photos (not their augmented views), which the probe never saw: how sure is it
    # of a wrong family on them? Capped: the rule needs a quantile, not every row.
    photos = projected.where((F.col("view") == 0) & F.col("label_index").isin(real))
    n = photos.count()
    if n > _STUDIO_CHECK_ROWS:
        photos = photos.sample(fraction=_STUDIO_CHECK_ROWS / n, seed=cfg.seed)
    rows = photos.select("pca", "label_index").collect()
    m = np.array([r["pca"].toArray() for r in rows]) @ coef.T + bias
    probs = np.exp(m - m.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    families = taxonomy.families_of(list(labels))
    studio_families = [families[i] for i in varieties]
    truth = [families[int(r["label_index"])] for r in rows]
    tau = studio_check_threshold(probs, studio_families, truth, {families[i] for i in real}, STUDIO_CHECK_MIN,
                                 STUDIO_CHECK_SHARE)
    if tau > 1.0:
        return {}, (f"no studio second opinion: on its {len(varieties)} varieties it would name a wrong family for "
                    f"more than {STUDIO_CHECK_SHARE:.0%} of the real training photos, however sure")
    weights = pca.pc.toArray() @ coef.T  # Spark's PCA does not centre: margins = (x . pc) coef^T + b
    return (studio_check_spec([labels[i] for i in varieties], weights, bias, tau),
            f"a studio second opinion on its {len(varieties)} varieties (from p >= {tau:.3f})")


_STUDIO_CHECK_ROWS = 20_000  # real photos the studio check's threshold is calibrated on, at most


def _fit_answer_head(train_idx, labels: list[str], cfg: Settings):
    """The answer head of a studio-only model: a logistic regression on the CNN's last block, pooled (``block``,
    320-d: no PCA, which would only rotate it). Half the answer's probabilities come from it
    (``answer.rule.answer_probabilities``, figures there), the "unknown" rule's energy and ImageNet checks from the
    main head (the ImageNet head reads the embedding the network was trained with). A model with real photos keeps
    one head (the last block reads other sources' photos worse: grocery -> real-photos 73.1 -> 48.4 % on the
    cross-source bench). None when off or not applicable."""
    from canestra.pipeline.features import BLOCK

    if not cfg.answer_head or BLOCK not in train_idx.columns or len(labels) < 2 \
            or any(is_family_label(lb) for lb in labels):
        return None
    rows = train_idx.where(f"{BLOCK} IS NOT NULL").select(BLOCK, "label_index").localCheckpoint(eager=True)
    return make_classifier(cfg, BLOCK).setParams(**ANSWER_COLUMNS).fit(rows)


def _answer_rule(labels: list[str], taxonomy, cfg: Settings, imagenet_classes=(), te=None, tf=None,
                 profiles=None, profile_thresholds=None, studio_check=None, profile_rescue_energy=None,
                 head_weight=0.0):
    from canestra.answer.rule import AnswerRule

    sizes = list(cfg.image_sizes)
    # The ImageNet head reads the block of the embedding closest to the network's native 224 px.
    block = min(range(len(sizes)), key=lambda i: abs(sizes[i] - 224))
    return AnswerRule(labels=list(labels), families=taxonomy.families_of(list(labels)), energy_threshold=te,
                      fruitness_threshold=tf, imagenet_classes=list(imagenet_classes),
                      imagenet_offset=block * backbone.FEATURE_DIM, profiles=dict(profiles or {}),
                      profile_thresholds=dict(profile_thresholds or {}), studio_check=dict(studio_check or {}),
                      profile_rescue_energy=profile_rescue_energy, head_weight=head_weight)


def _scored_rows(stages, df, pca) -> pd.DataFrame:
    """``df`` through ``stages``: the SCORED_COLUMNS plus ``pca_head`` (the first PCA components of ``pca``'s
    output, which the drift reference reads: one pass for both)."""
    from pyspark.ml import PipelineModel

    from canestra.pipeline.evaluation import SCORED_COLUMNS
    from canestra.pipeline.reference import pca_head_column

    return (PipelineModel(stages=stages).transform(df)
            .select(*SCORED_COLUMNS, pca_head_column(pca.getOutputCol()).alias("pca_head")).toPandas())


@dataclass
class _Fitted:
    """What the fit step hands to evaluation and saving."""
    feats: Any  # features table (all rows with a vector)
    train_idx: Any  # training rows with label_index
    test_df: Any
    n_train: int
    pca: Any  # PCAModel
    clf: Any  # LogisticRegressionModel
    labels: list[str]
    imagenet_classes: list
    profiles: dict
    profile_thr: dict
    train_scores: Any  # training photos (not their views): label, fruitness (evaluation.training_scores)
    studio_check: dict  # the studio second opinion (answer.rule), {} when the model has no use for one
    answer_clf: Any = None  # the answer head (_fit_answer_head), None: the answer comes from ``clf``

    def heads(self) -> list:
        """The stages between the featurizer and the answer stage."""
        return [self.pca, self.clf] + ([self.answer_clf] if self.answer_clf is not None else [])

    def answer_stage(self, rule):
        from canestra.answer.stage import AnswerModel

        head = ANSWER_COLUMNS["probabilityCol"] if self.answer_clf is not None else ""
        return AnswerModel(rule=rule.to_json(), headProbabilityCol=head)


def _ingest_step(spark, images, out_dir: str, cfg: Settings, taxonomy, st, unknown_images=(), listing=None,
                 family_images=()):
    res = ingest(spark, images, out_dir, test_fraction=cfg.test_fraction, seed=cfg.seed, taxonomy=taxonomy,
                 unknown_images=unknown_images or (), listing=listing, family_images=family_images or ())
    st.note(res.note() + res.roots_note())
    return res


_BROADCAST_MAX_IMAGES = 500_000  # (id, label, split) rows, ~100 bytes each: at most ~50 MB to each executor


def _featurize_step(spark, catalog_path: str, out_dir: str, featurizer: ImageFeaturizer, cfg: Settings, st):
    """Embed the catalog's images the feature store lacks, then write the features table
    (image_id, label, split, view, features) from the catalog's labels and the store's vectors;
    with ``cfg.augment_views``, each family-labelled training photo adds that many augmented views
    (``view`` 1..N; 0 is the photo itself)."""
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql import functions as F
    from pyspark.sql.functions import broadcast

    from canestra.answer.taxonomy import FAMILY_SUFFIX
    from canestra.pipeline.features import BLOCK, update_store, update_views

    catalog = spark.read.parquet(catalog_path)
    store_df, update = update_store(spark, catalog, out_dir, featurizer)
    final = os.path.join(out_dir, FEATURES)
    staging = storage.staging_dir(final)
    labels = catalog.select("image_id", "label", "split")
    small = update.featurized + update.reused <= _BROADCAST_MAX_IMAGES
    if small:
        labels = broadcast(labels)  # the vectors then stay where they are: no shuffle of the big side
    block = [BLOCK] if BLOCK in store_df.columns else []  # the answer head's input (features.py)
    table = store_df.join(labels, "image_id", "inner").select("image_id", "label", "split", F.lit(0).alias("view"),
                                                              "features", *block)
    note = ""
    if cfg.augment_views:
        photos = catalog.where((F.col("split") == "train") & F.col("label").endswith(FAMILY_SUFFIX))
        views_df, vupdate = update_views(spark, photos.select("image_id", "content"), out_dir, featurizer,
                                         cfg.augment_views)
        if vupdate.featurized + vupdate.reused:  # none when no family-labelled photo is trained on
            plabels = photos.select("image_id", "label", "split")
            # Views exist for family-labelled photos only, whose models have no answer head: no block.
            no_block = [F.lit(None).cast(VectorUDT()).alias(BLOCK)] if block else []
            table = table.unionByName(views_df.join(broadcast(plabels) if small else plabels, "image_id", "inner")
                                      .select("image_id", "label", "split", "view", "features", *no_block))
            note = (f"; {cfg.augment_views} augmented views of each family-labelled training photo "
                    f"({vupdate.featurized} embedded, {vupdate.reused} reused)")
    table.write.mode("overwrite").parquet(staging)
    storage.publish_dir(staging, final)
    st.note(f"{update.note()}; {featurizer.featureDim()}-d EfficientNet-Lite0 embeddings at "
            f"{'+'.join(map(str, cfg.image_sizes))} px{note}")
    return update


def _fit_step(spark, out_dir: str, featurizer: ImageFeaturizer, cfg: Settings, taxonomy, st) -> _Fitted:
    from pyspark.ml.feature import StringIndexer

    from canestra.answer.rule import FRUIT_MIN_MASS, PROFILE_MIN_MASS, PROFILE_QUANTILE, imagenet_class_set
    from canestra.pipeline import evaluation

    # Not cached: each pass (count, covariance, projection, class means, scoring) reads the Parquet
    # table again. Cached, 136,800 rows of 2,560 doubles (2.8 GB) crowded the 4 GB local driver
    # out of memory, and a cache that spills to disk is no faster than the table itself.
    feats = spark.read.parquet(os.path.join(out_dir, FEATURES)).where("features IS NOT NULL")
    train_df = feats.where("split = 'train'")
    indexer = StringIndexer(inputCol="label", outputCol="label_index", stringOrderType="alphabetAsc").fit(train_df)
    train_idx = indexer.transform(train_df)
    n_train = train_idx.count()
    if n_train == 0:
        raise InputError("no training images left after the split: add images or lower --test-fraction")
    pca = fit_pca(train_idx, cfg, featurizer.featureDim(), n_train)
    # Cut the lineage before the iterative fit: otherwise every L-BFGS iteration ships
    # the PCA matrix inside its task binary (measured 1.7 s -> 0.3 s per iteration).
    projected = pca.transform(train_idx).select("pca", "label_index", "view").localCheckpoint(eager=True)
    clf = make_classifier(cfg, "pca").fit(projected)
    labels = list(indexer.labels)
    rule0 = _answer_rule(labels, taxonomy, cfg)
    mean_labels, means = evaluation.imagenet_class_means(train_df, rule0.imagenet_offset)
    profiles = {lb: imagenet_class_set(means[i], PROFILE_MIN_MASS) for i, lb in enumerate(mean_labels)
                if is_family_label(lb)}
    # Fruitness counts the ImageNet classes of fruit: the "none of the families" photos add none.
    fruit_classes = imagenet_class_set(means[[i for i, lb in enumerate(mean_labels) if lb != OTHER_LABEL]], FRUIT_MIN_MASS)
    # One pass gives the profile checks' thresholds and the training photos' fruitness (calibration, below).
    scores = evaluation.training_scores(train_df, rule0.imagenet_offset, profiles, fruit_classes)
    studio_check, check_note = _fit_studio_check(projected, pca, labels, cfg, taxonomy)
    answer_clf = _fit_answer_head(train_idx, labels, cfg)
    fitted = _Fitted(feats, train_idx, feats.where("split = 'test'"), n_train, pca, clf, labels,
                     fruit_classes, profiles, evaluation.profile_thresholds(scores, profiles, PROFILE_QUANTILE),
                     scores[scores["view"] == 0], studio_check, answer_clf)
    capped = " (capped at training images - 1)" if cfg.pca_variance is None and pca.getK() < min(
        cfg.pca_k or featurizer.featureDim(), featurizer.featureDim()) else ""
    st.note(f"PCA {featurizer.featureDim()} -> {pca.getK()} dims{capped}, logistic regression on {n_train} images"
            + (f"; {check_note}" if check_note else "")
            + (f"; the answer mixed with a second one on the last block ({answer_clf.numFeatures}-d)"
               if answer_clf else ""))
    return fitted


def _evaluate_step(spark, catalog_path: str, out_dir: str, featurizer: ImageFeaturizer, fit: _Fitted,
                   cfg: Settings, taxonomy, st):
    """Score the held-out rows, calibrate the unknown rule on them; (model, rule, scored rows, metrics)."""
    from pyspark.ml import PipelineModel

    from canestra.answer.rule import HEAD_WEIGHT
    from canestra.pipeline import evaluation

    # Held-out rows scored from the cached features (the same stages minus the CNN), without
    # the unknown rule: its thresholds are calibrated on these very scores.
    # The family-level profile check (fitted on training photos) stays on: held-out photos it
    # refuses come back as "unknown" and count as such below.
    labels = fit.labels

    def rule_with(te=None, tf=None, rescue=None):
        return _answer_rule(labels, taxonomy, cfg, fit.imagenet_classes, te, tf, fit.profiles, fit.profile_thr,
                            fit.studio_check, rescue, HEAD_WEIGHT if fit.answer_clf is not None else 0.0)

    plain = fit.answer_stage(rule_with())
    rows = _scored_rows([*fit.heads(), plain], fit.test_df, fit.pca)
    rescue = evaluation.profile_rescue(rows) if fit.profile_thr else None
    if rescue is not None and evaluation.rescued(rows, rescue).any():
        # The held-out figures are those of the rule the model ships: score again with the rescue on.
        plain = fit.answer_stage(rule_with(rescue=rescue))
        rows = _scored_rows([*fit.heads(), plain], fit.test_df, fit.pca)
    energy = evaluation.energy_applies(labels)
    # Fruitness is calibrated on the training photos too (original photos, not their augmented views).
    te, tf = evaluation.thresholds(rows, cfg.unknown_quantile, energy, fruit_rows=fit.train_scores)
    rule = rule_with(te, tf, rescue)
    if fit.answer_clf is not None:  # the model's own featurizer also writes the answer head's input
        from canestra.pipeline.features import BLOCK

        featurizer = featurizer.copy({featurizer.blockCol: BLOCK})
    model = PipelineModel(stages=[featurizer, *fit.heads(), fit.answer_stage(rule)])
    variety_rows = rows[rows["label"].map(is_variety_label)]
    counts = [(t, p, int(n)) for (t, p), n in
              variety_rows.groupby(["label", "predicted_label"]).size().items()]
    metrics = classification_metrics(counts, classes=[lb for lb in labels if is_variety_label(lb)])
    metrics.update(evaluation.held_out_report(rows, taxonomy, cfg.unknown_quantile, te, tf, energy,
                                              fit.studio_check.get("min_probability"), rule.profile_rescue_energy))
    fam_held = metrics.pop("family_roots_held_out", None)
    shift = {"held_out_blocks": {"n": metrics["n"], "accuracy": metrics["accuracy"],
                                 "family_accuracy": (metrics.get("family") or {}).get("accuracy")},
             "family_roots_held_out": fam_held}
    benign: Any = None  # the perturbed held-out rows, scored (shift evaluation on)
    if cfg.shift_eval:
        catalog_test = spark.read.parquet(catalog_path).where("split = 'test'").select(
            "image_id", "label", "content")
        shifted = evaluation.perturbed(catalog_test)
        # One CNN pass over the perturbed copies serves both this report and the drift reference's
        # second calibration (pca_head: the PCA components the drift statistics read).
        benign = _scored_rows([featurizer, *fit.heads(), plain], shifted, fit.pca)
        shift["perturbed_held_out"] = evaluation.shift_report(benign[evaluation.SCORED_COLUMNS], taxonomy, te, tf)
    metrics["shift"] = shift
    evaluation.write_gallery(spark, catalog_path, out_dir, metrics.get("worst_errors") or [])
    unk = metrics.get("unknown") or {}
    st.note(f"top-1 accuracy {metrics['accuracy'] * 100:.2f}% on {metrics['n']} held-out images"
            + (f"; perturbed {shift['perturbed_held_out']['accuracy'] * 100:.2f}%"
               if shift.get("perturbed_held_out", {}).get("accuracy") is not None else "")
            + (f"; family-labelled photos {fam_held['family_accuracy'] * 100:.1f}% (held out from the training "
               "sources: other sources read lower, measure them with --eval-images)" if fam_held else "")
            + (f"; unknown refuses {(1 - unk['coverage']) * 100:.2f}% of held-out" if unk else ""))
    return model, rule, rows, metrics, benign


def _save_model(out_dir: str, model, train_idx, drift_ref: dict | None = None) -> str:
    model_path = os.path.join(out_dir, MODEL)
    staging = storage.staging_dir(model_path)
    model.write().overwrite().save(staging)
    from canestra.model import write_drift_reference, write_model_info

    write_model_info(staging, model.stages)  # version + format: a later canestra can refuse it plainly
    if drift_ref is not None:  # what `canestra monitor` and `serve`'s /v1/drift compare new answers with
        write_drift_reference(staging, drift_ref)
    # GDPR Art. 17: the model lists the images it was fitted on, so `erase` can say when to retrain.
    from canestra.model import write_training_ids

    # Sorted by Spark and streamed a partition at a time: the driver never holds all the ids.
    ids = train_idx.select("image_id").distinct().orderBy("image_id").toLocalIterator()
    write_training_ids(staging, (r.image_id for r in ids), sorted_unique=True)
    storage.publish_dir(staging, model_path)
    return model_path


def _run_metrics(res, cfg: Settings, featurizer: ImageFeaturizer, fit: _Fitted, rule, n_held_out: int,
                 n_test: int, update, timings: dict) -> dict:
    """The run's description in metrics.json besides the held-out scores."""
    ev = [float(v) for v in fit.pca.explainedVariance.toArray()]
    return {
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "canestra_version": __version__,
        "n_train": fit.n_train,
        "pca": {
            "k": fit.pca.getK(),
            "input_dim": featurizer.featureDim(),
            "explained_variance": sum(ev),
            "explained_variance_ratio": ev,
        },
        "counts": {
            "images": res.images,
            "train": fit.n_train,
            "test": n_test,
            "held_out": n_held_out,
            "quarantined": res.quarantined,
            "classes": len(fit.labels),
            "families": len(set(rule.families)),
        },
        # Files ingest read and cleaned this run vs. catalog rows kept for unchanged files.
        "ingest": {"catalog_reused": res.reused, "read": res.read, "unchanged": res.unchanged},
        # Images the CNN embedded in this run vs. embeddings reused from OUT/feature_store/<key>.
        "feature_store": {"key": os.path.basename(update.store), "featurized": update.featurized,
                          "reused": update.reused},
        # GDPR Art. 25: no source paths in shared outputs, so roots are listed by order only.
        "roots": [{"level": r["level"], "files": r["files"], "folders": r["folders"]} for r in res.roots],
        "split": {
            "method": METHOD,
            "test_fraction": cfg.test_fraction,
            "seed": cfg.seed,
            "blocks_per_class": DEFAULT_BLOCKS,
        },
        "model": {
            "backbone": backbone.MODEL_NAME + " (ImageNet, ONNX Runtime)",
            "image_sizes": list(cfg.image_sizes),
            "precision": backbone.resolve_precision(cfg.precision),
            "input_fit": "crop",
            "classifier": "multinomial logistic regression (Spark ML)",
            # half the answer's probabilities from a second one on the CNN's last block (studio-only models)
            "answer_head": (f"multinomial logistic regression on the last block ({fit.answer_clf.numFeatures}-d), "
                            f"weight {rule.head_weight:g}" if fit.answer_clf is not None else None),
            "reg_param": cfg.reg_param,
            "max_iter": cfg.max_iter,
            "taxonomy": cfg.taxonomy or "shipped Fruits-360 table",
        },
        "timings_s": timings,
    }


def train(spark, images: str | list[str], out: str, cfg: Settings, progress: Progress | None = None,
          eval_images: str | list[str] | None = None, unknown_images: str | list[str] | None = None,
          listing=None, family_images: str | list[str] | None = None) -> TrainResult:
    """Ingest one or several roots, featurize (only images the feature store lacks), fit PCA +
    logistic regression, calibrate the "unknown" rule on held-out images, evaluate (also under
    shift, and on the ``eval_images`` roots, never trained on) and save one PipelineModel.
    ``family_images``: roots of ``images`` read at family level whatever their folder names."""
    from canestra.answer.taxonomy import load_taxonomy
    from canestra.pipeline import eval_sources

    progress = progress or Progress()
    taxonomy = load_taxonomy(cfg.taxonomy)
    eval_roots = eval_sources.check_eval_roots(eval_images, images, taxonomy)  # before any Spark work
    out_dir = storage.ensure_output_dir(out, spark)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    with progress.stage("ingest") as st:
        res = _ingest_step(spark, images, out_dir, cfg, taxonomy, st, unknown_images, listing, family_images)
    timings["ingest"] = st.seconds

    featurizer = make_featurizer(cfg)
    with progress.stage("featurize") as st:
        update = _featurize_step(spark, res.catalog_path, out_dir, featurizer, cfg, st)
    timings["featurize"] = st.seconds

    with progress.stage("fit") as st:
        fit = _fit_step(spark, out_dir, featurizer, cfg, taxonomy, st)
    timings["fit"] = st.seconds

    with progress.stage("evaluate") as st:
        model, rule, rows, metrics, benign = _evaluate_step(spark, res.catalog_path, out_dir, featurizer, fit, cfg,
                                                    taxonomy, st)
    timings["evaluate"] = st.seconds

    sources: dict = {}
    if eval_roots:
        with progress.stage("evaluate sources") as st:
            sources, warning = eval_sources.evaluate_sources(spark, eval_roots, out_dir, featurizer, model,
                                                             res.catalog_path, taxonomy, metrics, st)
        timings["evaluate_sources"] = st.seconds
        if warning:
            progress.say(f"canestra: warning: {warning}")

    with progress.stage("save") as st:
        from canestra.pipeline.reference import drift_reference

        _save_model(out_dir, model, fit.train_idx,
                    drift_reference(rows, rule, cfg.seed, benign))
        timings["total"] = time.perf_counter() - t_start
        # every held-out row was scored: no extra pass over the table for n_test
        metrics.update(_run_metrics(res, cfg, featurizer, fit, rule, len(rows), metrics["n"], update, timings))
        metrics.update(sources)
        storage.write_text_atomic(os.path.join(out_dir, METRICS_JSON), json.dumps(metrics, indent=2, allow_nan=False))
        write_report(metrics, os.path.join(out_dir, REPORT_HTML))
    timings["save"] = st.seconds
    return TrainResult(out_dir, metrics, timings)
