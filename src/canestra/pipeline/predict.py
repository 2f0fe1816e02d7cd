"""predict / evaluate with a saved PipelineModel on a folder of images."""


import csv
import datetime as dt
import io
import json
import os
from dataclasses import dataclass

from canestra.errors import InputError, jvm_gone
from canestra.layout import METRICS_JSON, PREDICTIONS_CSV, REPORT_HTML
from canestra.model import check_model_dir  # noqa: F401  (one check for predict, evaluate, serve)
from canestra.pipeline.ingest import QUARANTINE_CSV, Listing, cleaned_frame, listed, write_quarantine_csv
from canestra.pipeline.metrics import classification_metrics
from canestra.pipeline.report import write_report
from canestra.progress import Progress
from canestra.storage import files as storage

__all__ = ["PREDICTIONS", "evaluate", "load_model", "predict", "score_images"]

PREDICTIONS = "predictions"
# Columns of the predictions table and CSV; ``path`` comes first with --include-paths, ``label`` last
# for images in class folders.
PREDICTION_COLUMNS = ["image_id", "prediction", "probability", "family", "family_probability", "top5"]
# Columns `canestra monitor` reads (docs/monitoring.md), in the Parquet table only (not predictions.csv): the
# two scores of the "unknown" rule, the first PCA components and when the row was predicted (UTC, ISO 8601;
# the rows of one predict run or one watch batch share it).
MONITOR_COLUMNS = ["energy", "fruitness", "pca_head", "predicted_at"]


@dataclass
class PredictResult:
    out_dir: str
    predicted: int
    quarantined: int
    labelled: bool
    predictions_path: str
    classes: list[str]
    added: int | None = None  # with --incremental: rows this run added


def load_model(path: str):
    """Load a canestra PipelineModel, with a plain error when ``path`` is not one."""
    from pyspark.ml import PipelineModel

    local = check_model_dir(path)
    try:
        return PipelineModel.load(local)
    except Exception as exc:  # corrupt or foreign model folder
        if jvm_gone(exc):  # the model is not at fault: say what happened to Spark instead
            raise
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot load the model in {local} ({first}): re-run `canestra train`") from exc


def model_labels(model) -> list[str]:
    from canestra.answer.stage import AnswerModel

    for stage in model.stages:
        if isinstance(stage, AnswerModel):
            return stage.labels()
    raise InputError("the model has no answer stage: it was written by an older canestra or not by "
                     "`canestra train`; re-run `canestra train`")


def predict_dataframe(model, df):
    """Score a DataFrame with a ``content`` column; adds prediction (a variety or ``unknown``),
    probability, family, family_probability and top5 (JSON)."""
    model_labels(model)  # a plain error for models without the answer stage
    return (model.transform(df)
            .withColumnRenamed("predicted_label", "prediction_label")
            .withColumnRenamed("predicted_probability", "max_probability"))


def score_images(model, images, out_dir: str | None = None, include_paths: bool = False,
                 labelled: bool = False):
    """Score a DataFrame of cleaned images into prediction rows; (rows, feature-store counts or None).

    ``images`` has ``image_id`` and ``content`` (plus ``source_path`` with ``include_paths``,
    ``label`` with ``labelled``); rows have ``PREDICTION_COLUMNS`` and ``MONITOR_COLUMNS`` (plus ``path``
    first and ``label`` last), the columns of the predictions table. With ``out_dir`` (batch DataFrames
    only), embeddings come from ``out_dir``'s feature store: only images it lacks run the CNN.
    """
    from pyspark.ml import PipelineModel

    from canestra.vision.featurizer import ImageFeaturizer

    stages = list(model.stages)
    update = None
    if out_dir is not None and stages and isinstance(stages[0], ImageFeaturizer):
        from canestra.pipeline.features import update_store

        store_df, update = update_store(images.sparkSession, images, out_dir, stages[0])
        scored = predict_dataframe(PipelineModel(stages=stages[1:]),
                                   images.drop("content").join(store_df, "image_id", "inner"))
    else:
        scored = predict_dataframe(model, images)
    # The classifier's own numeric "prediction" column is left behind by the select.
    named = {"path": "source_path", "prediction": "prediction_label", "probability": "max_probability"}
    cols = (["path"] if include_paths else []) + PREDICTION_COLUMNS
    return scored.select(*(scored[named.get(c, c)].alias(c) for c in cols), *_monitor_columns(scored, stages),
                         *([scored["label"]] if labelled else [])), update


def _monitor_columns(scored, stages) -> list:
    from pyspark.sql import functions as F

    from canestra.pipeline.reference import pca_head_column

    pca = next((s for s in stages if type(s).__name__ == "PCAModel"), None)
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # fixed width: sorts as text
    return [scored["energy"], scored["fruitness"],
            (pca_head_column(pca.getOutputCol()) if pca is not None else F.lit(None).cast("array<float>"))
            .alias("pca_head"), F.lit(now).alias("predicted_at")]


def _not_predicted_yet(spark, valid, final: str, include_paths: bool):
    """(images of ``valid`` whose id is not in the predictions table yet, the table or None)."""
    done = spark.read.parquet(final) if storage.is_dir(final) else None
    if done is not None:
        if ("path" in done.columns) != include_paths:
            had = "with" if "path" in done.columns else "without"
            raise InputError(f"the predictions in {final} were written {had} --include-paths: repeat that choice "
                             "with --incremental, or use another --out")
        valid = valid.join(done.select("image_id"), "image_id", "left_anti")
    # One row per image: the same pixels under two names are one image, predicted once.
    return valid.dropDuplicates(["image_id"]), done


def predict(spark, model_path: str, images: str, out: str, progress: Progress | None = None,
            include_paths: bool = False, incremental: bool = False, listing: Listing | None = None) -> PredictResult:
    """Score every image under ``images``; write predictions/ + predictions.csv (+ quarantine.csv).

    GDPR Art. 25: predictions are shared beyond the catalog, so they carry the
    pseudonymous ``image_id`` only; ``include_paths`` adds the source ``path`` column.
    quarantine.csv keeps source paths: it is the operator's to-do list of files to fix.

    ``incremental``: images whose id is already in ``out``'s predictions table are not scored
    again; the new rows are added to the table and predictions.csv (a re-run adds nothing).
    """
    progress = progress or Progress()
    model = load_model(model_path)
    out_dir = storage.ensure_output_dir(out, spark)
    with progress.stage("read images") as st:
        files = listed(listing, images, require_labels=False)[0]  # the pre-checks' listing when it fits
        labelled = any(f.label is not None for f in files)
        from canestra.vision.images import DEFAULT_MAX_PIXELS

        cleaned = cleaned_frame(spark, files, ["predict"] * len(files), [None] * len(files),
                                DEFAULT_MAX_PIXELS).persist()
        st.note(f"{len(files)} files")
    final = os.path.join(out_dir, PREDICTIONS)
    try:
        with progress.stage("predict") as st:
            valid = cleaned.where("error IS NULL").select("source_path", "label", "image_id", "content")
            done = None
            if incremental:
                valid, done = _not_predicted_yet(spark, valid, final, include_paths)
            rows, update = score_images(model, valid, out_dir, include_paths, labelled)
            # Locally the new rows are written as new files of the table (append_parts); the old
            # rows are not rewritten. On S3, or when the columns differ (e.g. labels appeared), the
            # table is rewritten whole (old rows + new) and published by rename.
            append = done is not None and not storage.is_remote(final) and rows.dtypes == done.dtypes
            if done is not None and not append:
                rows = done.unionByName(rows, allowMissingColumns=True)
            staging = storage.staging_dir(final)
            rows.write.mode("overwrite").parquet(staging)
            bad = [(r.source_path, r.error) for r in cleaned.where("error IS NOT NULL").collect()]
            if update is not None:
                st.note(update.note())
    finally:
        cleaned.unpersist()
    with progress.stage("write") as st:
        if append:
            added = spark.read.parquet(staging).count()
            if added:
                storage.append_parts(staging, final)
            else:  # nothing new: no empty file added to the table
                storage.discard_dir(staging)
            table = spark.read.parquet(final)
        else:
            table = spark.read.parquet(staging)
            added = table.count() - (done.count() if done is not None else 0) if incremental else None
        labelled = "label" in table.columns
        header = (["path"] if include_paths else []) + PREDICTION_COLUMNS + (["label"] if labelled else [])
        order = ["path"] if include_paths else (["label"] if labelled else []) + ["image_id"]
        written = [0]
        write_quarantine_csv(os.path.join(out_dir, QUARANTINE_CSV), bad)
        # Streamed a partition at a time: the driver never holds the whole table as text.
        storage.write_lines_atomic(os.path.join(out_dir, PREDICTIONS_CSV),
                                   _csv_lines(table.orderBy(*order).toLocalIterator(), header, written))
        n = written[0]
        if not append:
            storage.publish_dir(staging, final)
        st.note(f"{n} predictions" + (f" ({added} new)" if incremental else "")
                + f", {len(bad)} quarantined -> {out_dir}")
    return PredictResult(out_dir, n, len(bad), labelled, final, model_labels(model), added)


def _csv_lines(rows, header: list[str], written: list[int]):
    """predictions.csv line by line; counts the rows in ``written[0]``."""
    buf = io.StringIO()
    writer = csv.writer(buf)

    def line(values) -> str:
        buf.seek(0)
        buf.truncate()
        writer.writerow(values)
        return buf.getvalue()

    yield line(header)
    for row in rows:
        written[0] += 1
        yield line([f"{row[c]:.6f}" if c in ("probability", "family_probability") else row[c] for c in header])


def evaluate(spark, model_path: str, images: str, out: str, progress: Progress | None = None,
             listing: Listing | None = None) -> dict:
    progress = progress or Progress()
    res = predict(spark, model_path, images, out, progress, listing=listing)
    if not res.labelled:
        raise InputError("evaluate needs labelled images: put them in class folders, e.g. <root>/Banana/x.jpg")
    table = spark.read.parquet(res.predictions_path).where("label IS NOT NULL")
    rows = table.groupBy("label", "prediction").count().collect()
    metrics = classification_metrics([(r["label"], r["prediction"], int(r["count"])) for r in rows],
                                     classes=res.classes)
    metrics["counts"] = {"images": res.predicted, "test": res.predicted, "quarantined": res.quarantined}
    storage.write_text_atomic(os.path.join(res.out_dir, METRICS_JSON), json.dumps(metrics, indent=2, allow_nan=False))
    write_report(metrics, os.path.join(res.out_dir, REPORT_HTML))
    return metrics
