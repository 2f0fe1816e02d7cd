"""The Python API for notebooks and scripts: ``import canestra; run = canestra.train("fruits/", "runs/1", pca_k=32)``.

Each function takes plain arguments with the CLI's defaults (keyword overrides of the ``Settings``
concerns it uses, e.g. ``pca_k=32``, ``image_sizes=100`` for ``train``, typed by ``TrainOptions``
and friends, a keyword of another concern refused with an ``InputError`` that says where it
belongs; or a whole ``settings=``), starts a local SparkSession when none is given, and returns a
typed result. Every call appends the same GDPR audit record as the matching ``canestra`` command
(privacy/audit.py); the CLI calls these functions too, so the two never drift apart.

Importing this module is cheap: Spark, ONNX Runtime and MLflow are imported when a function runs.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from canestra import config, layout
from canestra.config import CONCERNS, Settings
from canestra.errors import InputError
from canestra.privacy import audit

if sys.version_info >= (3, 11):  # at run time too, so typing.get_type_hints resolves the signatures
    from typing import Unpack
elif TYPE_CHECKING:
    from typing_extensions import Unpack

if TYPE_CHECKING:  # the heavy types, for annotations only
    import pandas as pd
    from pyspark.ml import PipelineModel
    from pyspark.sql import SparkSession

    from canestra.drift.monitor import DriftReport
    from canestra.feedback.promote import Promotion
    from canestra.pipeline.ingest import Listing
    from canestra.progress import Progress
    from canestra.tracking import TrackedRun

__all__ = [
    "ingest", "train", "predict", "evaluate", "watch", "load_model", "monitor", "keywords",
    "IngestRun", "TrainRun", "Predictions", "WatchRun", "Evaluation", "DriftReport",
    "IngestOptions", "TrainOptions", "RunOptions", "TAKES", "OPTIONS",
    "promote",  # docs/feedback.md
    # the command line's hooks
    "spark_session", "configure_storage", "monitor_run_folder", "precheck", "out_lock", "gdpr_locks", "spark_log_path",
    "tune_driver_process", "log_offset", "notices", "format_summary", "feedback_store", "erase_feedback",
    "purge_feedback",
]

_PREDICTIONS = "predictions"  # predict's Parquet table (pipeline.predict.PREDICTIONS; that module is heavy)


# ---------------------------------------------------------------------------- keywords
# The Settings concerns (config.CONCERNS) each function uses. Anything else would be silently
# ignored (a serving port, or a PCA size for a saved model), so it is refused.
TAKES: dict[str, tuple[str, ...]] = {
    "ingest": ("spark", "data", "storage", "output"),
    "train": ("spark", "featurizer", "data", "model", "storage", "output"),
    # the saved model carries its featurizer and model settings, and its class -> family table
    "predict": ("spark", "storage", "output"),
    "evaluate": ("spark", "storage", "output"),
    "watch": ("spark", "storage", "output"),
}


class IngestOptions(config.SparkOptions, config.DataOptions, config.StorageOptions, config.OutputOptions,
                    total=False):
    """The Settings keywords of ``ingest``."""


class TrainOptions(config.SparkOptions, config.FeaturizerOptions, config.DataOptions, config.ModelOptions,
                   config.StorageOptions, config.OutputOptions, total=False):
    """The Settings keywords of ``train``."""


class RunOptions(config.SparkOptions, config.StorageOptions, config.OutputOptions, total=False):
    """The Settings keywords of ``predict``, ``evaluate`` and ``watch``."""


OPTIONS: dict[str, type] = {"ingest": IngestOptions, "train": TrainOptions, "predict": RunOptions,
                            "evaluate": RunOptions, "watch": RunOptions}


def keywords(function: str) -> tuple[str, ...]:
    """The Settings fields ``canestra.<function>`` takes as keywords, concern by concern."""
    return tuple(name for concern in TAKES[function] for name in CONCERNS[concern])


def _check_keywords(function: str, overrides: dict[str, Any]) -> None:
    """One plain line for a keyword ``function`` would not use: a misspelling, or another concern's."""
    taken = keywords(function)
    for name in overrides:
        if name in taken:
            continue
        concern = next((c for c, keys in CONCERNS.items() if name in keys), None)
        if concern is None:
            import inspect

            params = [p for p in inspect.signature(globals()[function]).parameters if p != "overrides"]
            raise InputError(config.unknown_setting(name, [*taken, *params, *(f.name for f in fields(Settings))]))
        takers = [f"canestra.{fn}" for fn in TAKES if concern in TAKES[fn]]
        where = ", ".join(takers) + " or " if takers else ""
        carried = " (the saved model carries it)" if concern in ("featurizer", "model") and function in (
            "predict", "evaluate", "watch") else ""
        raise InputError(f"{name} is a {concern} setting, which canestra.{function} does not take{carried}: "
                         f"it is for {where}{config.cli_home(name)}")


# ---------------------------------------------------------------------------- results


@dataclass(frozen=True)
class IngestRun:
    """A curated catalog table (Parquet) and the files that were quarantined."""

    catalog_path: str
    images: int
    classes: int
    quarantined: int
    quarantine_csv: str
    reused: bool = False  # same listing as last time: the catalog was kept whole
    read: int | None = None  # files read this run (None when reused)
    unchanged: int = 0  # rows kept for files whose path, size and modification time did not change

    def quarantine(self) -> pd.DataFrame:
        """quarantine.csv as a DataFrame (path, reason): the files to fix."""
        return _read_csv(self.quarantine_csv)

    def to_spark(self, spark: SparkSession | None = None):
        """The catalog as a Spark DataFrame (image_id, label, split, content, …)."""
        return _spark(Settings.load(), spark).read.parquet(self.catalog_path)


@dataclass(frozen=True)
class TrainRun:
    """A finished training: its held-out metrics and where the model and report are."""

    out_dir: str
    metrics: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    mlflow: TrackedRun | None = None  # the MLflow run, when tracking was on

    @property
    def model_path(self) -> str:
        return os.path.join(self.out_dir, layout.MODEL)

    @property
    def report_path(self) -> str:
        return os.path.join(self.out_dir, layout.REPORT_HTML)

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy on the held-out images."""
        return float(self.metrics["accuracy"])

    def load(self, spark: SparkSession | None = None) -> PipelineModel:
        """The fitted Spark ``PipelineModel`` (featurizer, PCA, logistic regression, answer stage)."""
        return load_model(self.model_path, spark=spark)

    def predictor(self, threads: int | None = None):
        """An ``OnlinePredictor`` on this model: one image at a time, no Spark."""
        from canestra.serve.predictor import OnlinePredictor

        return OnlinePredictor.from_model_dir(self.model_path, threads)


@dataclass(frozen=True)
class Predictions:
    """Predictions written under ``out_dir``: predictions/ (Parquet), predictions.csv, quarantine.csv."""

    out_dir: str
    predicted: int  # images scored
    quarantined: int  # files that could not be used (quarantine.csv says why)
    classes: list[str]  # the model's classes
    labelled: bool = False  # the images sat in class folders: the table has a label column
    added: int | None = None  # with incremental=True: rows this run added

    @property
    def predictions_path(self) -> str:
        """The predictions table (Parquet): read it with Spark, or use ``to_pandas()``."""
        return os.path.join(self.out_dir, _PREDICTIONS)

    @property
    def csv_path(self) -> str:
        return os.path.join(self.out_dir, layout.PREDICTIONS_CSV)

    def to_pandas(self) -> pd.DataFrame:
        """One row per image: image_id, prediction, probability, family, family_probability,
        top5 (JSON) and label when the images sat in class folders; read from predictions.csv."""
        return _read_csv(self.csv_path)

    def quarantine(self) -> pd.DataFrame:
        return _read_csv(os.path.join(self.out_dir, layout.QUARANTINE_CSV))


@dataclass(frozen=True)
class WatchRun:
    """What a ``watch`` call predicted into ``out_dir``/predictions before it returned."""

    out_dir: str
    batches: int  # micro-batches committed
    predicted: int
    quarantined: int
    stopped_by: str | None = None  # "stop" (or the signal) when ``stop`` ended it; None when ``once`` ran out of files
    abandoned_batch: bool = False  # a batch was in flight at the stop: the next call redoes it

    @property
    def predictions_path(self) -> str:
        """The predictions table (Parquet, the columns ``predict`` writes), one row per image."""
        return os.path.join(self.out_dir, _PREDICTIONS)


@dataclass(frozen=True)
class Evaluation:
    """Metrics of a model on a labelled folder, with the predictions they were computed from."""

    metrics: dict[str, Any]
    predictions: Predictions

    @property
    def accuracy(self) -> float:
        return float(self.metrics["accuracy"])

    @property
    def report_path(self) -> str:
        return os.path.join(self.predictions.out_dir, layout.REPORT_HTML)


def _read_csv(path: str) -> pd.DataFrame:
    import pandas as pd

    from canestra.storage import files as storage

    text = storage.read_text(path)
    if text is None:
        from canestra.errors import InputError

        raise InputError(f"{path} does not exist: it is written by the call that returned this result")
    return pd.read_csv(io.StringIO(text), keep_default_na=False, na_values=[""])


# ---------------------------------------------------------------------------- plumbing


def _settings(function: str, settings: Settings | None, overrides: dict[str, Any]) -> Settings:
    """Keyword overrides on top of ``settings`` (else env vars and defaults), validated like CLI flags;
    only the keywords of ``function``'s concerns (``settings`` itself is a whole configuration, as the CLI
    passes it, and is taken as it is)."""
    _check_keywords(function, overrides)
    if settings is not None and not overrides:
        cfg = settings
    else:
        base = {} if settings is None else {f.name: getattr(settings, f.name) for f in fields(settings)}
        cfg = Settings.load(**{**base, **overrides})
    from canestra.storage import files as storage
    from canestra.storage import s3

    storage.configure_s3(s3.S3Options.from_settings(cfg))  # S3 endpoint/encryption/region, as the CLI does
    return cfg


def _audit_log(settings: Settings | None, overrides: dict[str, Any]) -> str | None:
    # Known before the settings are validated: a call with bad arguments is audited too, as in the CLI.
    return overrides.get("audit_log") or (settings.audit_log if settings is not None else None)


@contextlib.contextmanager
def _boundary(command: str, out: str | None, settings: Settings | None, overrides: dict[str, Any]):
    """Around every API call: its audit record, its own S3 options (restored after the call, so two
    calls with different settings never see each other's), and failures from Spark, the JVM or a
    worker raised as canestra's typed errors (``canestra._faults``), as the CLI prints them."""
    from canestra._faults import typed_error
    from canestra.storage import files as storage

    before = storage.current_s3()
    with audit.audited(command, out=out, audit_log=_audit_log(settings, overrides)):
        try:
            yield
        except Exception as exc:
            typed = typed_error(exc)
            if typed is None or typed is exc:
                raise
            raise typed from exc
        finally:
            storage.configure_s3(before)


def spark_session(cfg: Settings, log_file: str | None = None) -> SparkSession:
    """canestra's SparkSession for ``cfg`` (reused when one is running); JVM output to ``log_file`` if given."""
    from canestra.sparkctx import get_spark

    return get_spark(cfg.master, conf={"spark.sql.execution.arrow.maxRecordsPerBatch": str(cfg.arrow_batch)},
                     log_file=log_file, driver_memory=cfg.driver_memory)


def _spark(cfg: Settings, spark: SparkSession | None, out: str | None = None) -> SparkSession:
    if spark is not None:
        return spark
    # A session started here sends the JVM's output to a log file, as the CLI does: a notebook shows
    # canestra's lines and typed errors, not log4j lines (``debug=True`` keeps them on the terminal).
    return spark_session(cfg, log_file=None if cfg.debug else spark_log_path(out) if out else _temp_log())


def _temp_log() -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), "canestra-logs", f"spark-{os.getpid()}.log")


def _progress(progress: Progress | None, quiet: bool) -> Progress:
    from canestra.progress import Progress

    return progress or Progress(quiet=quiet)


def _joined(images: str | list[str] | None, more: str | list[str] | None) -> list[str]:
    """``images`` then the roots of ``more`` it lacks."""
    from canestra.pipeline.ingest import as_uris

    roots = list(as_uris(images))
    return roots + [r for r in as_uris(more) if r not in roots]


def _with_family_roots(images: str | list[str], family_images: str | list[str] | None) -> tuple[Any, list[str]]:
    """(``images`` with the ``family_images`` roots joined, those roots): they are training roots too."""
    from canestra.pipeline.ingest import as_uris

    family = list(as_uris(family_images))
    return (_joined(images, family) if family else images), family


def _ready(cfg: Settings, spark: SparkSession | None, images: str | list[str] | None, labelled: bool,
           cnn: bool = True, out: str | None = None, listing: Listing | None = None, families: bool = False,
           unknown_images: str | list[str] | None = None,
           family_images: list[str] | None = None) -> tuple[SparkSession, Listing | None]:
    """The session to run on, after the cheap checks: bad image paths fail before a JVM starts
    (the CLI runs the same checks before it starts its own session), and the listing they made
    goes on to the run, which lists nothing again. ``images=None``: no listing check.
    ``families``: read family-level roots through the taxonomy (ingest, train)."""
    if listing is None and spark is None and images is not None:
        from canestra.answer.taxonomy import load_taxonomy
        from canestra.pipeline.ingest import make_listing

        listing = make_listing(images, require_labels=labelled,
                               taxonomy=load_taxonomy(cfg.taxonomy) if families else None,
                               unknown_uris=unknown_images or (), family_uris=family_images or ())
    if cnn:
        # The CNN graph is built once here, so that local Spark workers find it instead of racing to build it.
        from canestra.vision import backbone

        backbone.model_path(cfg.precision)
    return _spark(cfg, spark, out), listing


def _model_dir(model: str, registry: str | bool | None = None) -> str:
    """A model folder, or ``models:/NAME/ALIAS|VERSION`` fetched from the MLflow registry."""
    from canestra.model import check_model_dir
    from canestra.tracking import local_model_dir

    return check_model_dir(local_model_dir(str(model), registry))


def _ints(counts: dict) -> dict[str, Any]:
    return {k: v for k, v in (counts or {}).items() if isinstance(v, int) and not isinstance(v, bool)}


def _eval_counts(metrics: dict) -> dict[str, Any]:
    """Images of the --eval-images roots, for the audit record (none when there were none)."""
    ev = _ints(metrics.get("eval_counts", {}))
    return {f"eval_{k}": v for k, v in ev.items()}


# ---------------------------------------------------------------------------- the API


def ingest(images: str | list[str], out: str, *, spark: SparkSession | None = None,
           settings: Settings | None = None, reuse: bool = False, quiet: bool = False,
           progress: Progress | None = None, listing: Listing | None = None,
           family_images: str | list[str] | None = None, unknown_images: str | list[str] | None = None,
           **overrides: Unpack[IngestOptions]) -> IngestRun:
    """Scan ``<root>/<Class>/<image>`` folders into ``out/catalog`` (Parquet, metadata stripped) and
    ``out/quarantine.csv``. ``family_images`` and ``unknown_images`` are read as ``train`` reads them:
    roots of family folders whatever their names, and photos of none of the families.

    Settings keywords (``IngestOptions``; any other raises ``InputError``): Spark ``master``,
    ``driver_memory``, ``arrow_batch``; data ``test_fraction``, ``seed``, ``taxonomy``; storage
    ``s3_endpoint_url``, ``allow_http_endpoint``, ``allow_non_eu_region``, ``sse_kms_key_id``,
    ``s3_max_attempts``; output ``debug``, ``audit_log``.
    """
    with _boundary("ingest", out, settings, dict(overrides)):
        cfg = _settings("ingest", settings, dict(overrides))
        from canestra.answer.taxonomy import load_taxonomy
        from canestra.pipeline.ingest import ingest as _ingest
        from canestra.storage.files import ensure_output_dir

        images, family = _with_family_roots(images, family_images)
        spark, listing = _ready(cfg, spark, images, True, cnn=False, out=out, listing=listing, families=True,
                                unknown_images=unknown_images, family_images=family)
        with _progress(progress, quiet).stage("ingest") as st:
            res = _ingest(spark, images, ensure_output_dir(out, spark), test_fraction=cfg.test_fraction,
                          seed=cfg.seed, reuse=reuse, taxonomy=load_taxonomy(cfg.taxonomy), listing=listing,
                          unknown_images=unknown_images or (), family_images=family)
            st.note(res.note() + res.roots_note())
        audit.note(images=res.images, classes=res.classes, quarantined=res.quarantined,
                   outputs=[res.catalog_path, res.quarantine_csv])
        return IngestRun(res.catalog_path, res.images, res.classes, res.quarantined, res.quarantine_csv, res.reused,
                         res.read, res.unchanged)


def train(images: str | list[str], out: str, *, spark: SparkSession | None = None,
          settings: Settings | None = None, quiet: bool = False, progress: Progress | None = None,
          mlflow: str | bool | None = None, register_model: str | None = None,
          eval_images: str | list[str] | None = None, unknown_images: str | list[str] | None = None,
          listing: Listing | None = None, feedback: str | None = None,
          family_images: str | list[str] | None = None,
          **overrides: Unpack[TrainOptions]) -> TrainRun:
    """Ingest, featurize, fit PCA + logistic regression, calibrate "unknown", evaluate and save.

    ``mlflow``: True (MLFLOW_TRACKING_URI, else ./mlruns), a tracking URI or folder, False (off);
    None logs only when MLFLOW_TRACKING_URI is set. ``register_model="NAME"`` also registers the
    model in MLflow's registry. ``eval_images``: labelled roots never trained on, scored by the
    final model into ``metrics["by_source"]`` (one entry per root, in order). ``unknown_images``:
    roots of photos that are none of the families, trained as a class answered ``unknown``.
    ``feedback``: a feedback store (``serve --feedback-dir``): the corrections users sent are trained
    on too, at the level they were given (docs/feedback.md). ``family_images``: roots of family folders
    trained at family level whatever their names (``Banana/`` and ``Orange/`` alone would read as
    Fruits-360 varieties); they join ``images``.

    Settings keywords (``TrainOptions``; any other raises ``InputError``), e.g. ``pca_k=32,
    image_sizes=100``: Spark ``master``, ``driver_memory``, ``arrow_batch``; featurizer
    ``image_sizes``, ``batch_size``, ``threads``, ``precision``; data ``test_fraction``, ``seed``,
    ``taxonomy``; model ``pca_k``, ``pca_variance``, ``reg_param``, ``elastic_net``, ``max_iter``,
    ``augment_views``, ``unknown_quantile``, ``shift_eval``, ``answer_head``; storage ``s3_endpoint_url``,
    ``allow_http_endpoint``, ``allow_non_eu_region``, ``sse_kms_key_id``, ``s3_max_attempts``;
    output ``debug``, ``audit_log``.
    """
    with _boundary("train", out, settings, dict(overrides)):
        cfg = _settings("train", settings, dict(overrides))
        from canestra import tracking
        from canestra.pipeline.train import train as _train

        if register_model and mlflow is False:
            from canestra.errors import InputError

            raise InputError("register_model needs MLflow tracking: drop mlflow=False, or register_model")
        track = tracking.train_option(mlflow, register_model)
        tracking.require(track)  # a missing mlflow fails here, before Spark starts
        images, family = _with_family_roots(images, family_images)
        if feedback:  # the store's corrections join the run as labelled roots (feedback/training.py)
            from canestra.answer.taxonomy import load_taxonomy
            from canestra.feedback.training import with_feedback

            images, listing, kept, waiting = with_feedback(feedback, images, listing, load_taxonomy(cfg.taxonomy),
                                                           unknown_images or (), _progress(progress, quiet).say,
                                                           family)
            audit.note(feedback_images=kept, feedback_waiting=waiting)
        if spark is None and eval_images:  # bad evaluation roots fail before a JVM starts, as bad --images
            from canestra.answer.taxonomy import load_taxonomy
            from canestra.pipeline.eval_sources import check_eval_roots

            check_eval_roots(eval_images, images, load_taxonomy(cfg.taxonomy))
        spark, listing = _ready(cfg, spark, images, True, out=out, listing=listing, families=True,
                                unknown_images=unknown_images, family_images=family)
        with tracking.tracked_run(track) as tracked:
            res = _train(spark, images, out, cfg, _progress(progress, quiet), eval_images=eval_images,
                         unknown_images=unknown_images, listing=listing, family_images=family)
            logged = tracked.log_training(res.out_dir, res.metrics, cfg, register_model) if tracked else None
        written = (layout.MODEL, layout.CATALOG, layout.FEATURES, layout.METRICS_JSON, layout.REPORT_HTML,
                   layout.QUARANTINE_CSV) + ((layout.EVAL_CATALOG, layout.EVAL_QUARANTINE_CSV) if eval_images else ())
        audit.note(**_ints(res.metrics.get("counts", {})), **_eval_counts(res.metrics),
                   outputs=[os.path.join(res.out_dir, n) for n in written],
                   details={"mlflow_run_id": logged.run_id} if logged else None)
        return TrainRun(res.out_dir, res.metrics, dict(res.timings), logged)


def predict(model: str, images: str, out: str, *, spark: SparkSession | None = None,
            settings: Settings | None = None, include_paths: bool = False, quiet: bool = False,
            progress: Progress | None = None, incremental: bool = False, listing: Listing | None = None,
            **overrides: Unpack[RunOptions]) -> Predictions:
    """Classify every image under ``images`` with a saved model (a ``model/`` folder or
    ``models:/NAME/ALIAS``); writes ``out/predictions.csv`` and returns a handle to it
    (``.to_pandas()``). ``include_paths`` adds the source path column (GDPR Art. 25: off by default).
    ``incremental`` scores only images not yet in ``out``'s predictions and adds them (``.added``).

    Settings keywords (``RunOptions``; any other raises ``InputError``: the saved model carries
    its featurizer and model settings): Spark ``master``, ``driver_memory``, ``arrow_batch``;
    storage ``s3_endpoint_url``, ``allow_http_endpoint``, ``allow_non_eu_region``,
    ``sse_kms_key_id``, ``s3_max_attempts``; output ``debug``, ``audit_log``.
    """
    with _boundary("predict", out, settings, dict(overrides)):
        cfg = _settings("predict", settings, dict(overrides))
        from canestra.pipeline.predict import predict as _predict

        model_dir = _model_dir(model)
        spark, listing = _ready(cfg, spark, images, False, out=out, listing=listing)
        res = _predict(spark, model_dir, images, out, _progress(progress, quiet), include_paths=include_paths,
                       incremental=incremental, listing=listing)
        csv_path = os.path.join(res.out_dir, layout.PREDICTIONS_CSV)
        audit.note(predicted=res.predicted, quarantined=res.quarantined, details={"include_paths": include_paths},
                   outputs=[res.predictions_path, csv_path, os.path.join(res.out_dir, layout.QUARANTINE_CSV)])
        return Predictions(res.out_dir, res.predicted, res.quarantined, list(res.classes), res.labelled, res.added)


def evaluate(model: str, images: str, out: str = "canestra-evaluation", *, spark: SparkSession | None = None,
             settings: Settings | None = None, quiet: bool = False, progress: Progress | None = None,
             listing: Listing | None = None, **overrides: Unpack[RunOptions]) -> Evaluation:
    """Metrics of a saved model on labelled images (``<root>/<Class>/<image>``); writes
    predictions, metrics.json and report.html under ``out``.

    Settings keywords (``RunOptions``; any other raises ``InputError``: the saved model carries
    its featurizer and model settings): Spark ``master``, ``driver_memory``, ``arrow_batch``;
    storage ``s3_endpoint_url``, ``allow_http_endpoint``, ``allow_non_eu_region``,
    ``sse_kms_key_id``, ``s3_max_attempts``; output ``debug``, ``audit_log``.
    """
    with _boundary("evaluate", out, settings, dict(overrides)):
        cfg = _settings("evaluate", settings, dict(overrides))
        from canestra.answer.taxonomy import UNKNOWN
        from canestra.pipeline.predict import evaluate as _evaluate

        model_dir = _model_dir(model)
        spark, listing = _ready(cfg, spark, images, True, out=out, listing=listing)
        metrics = _evaluate(spark, model_dir, images, out, _progress(progress, quiet), listing=listing)
        audit.note(**_ints(metrics.get("counts", {})),
                   outputs=[os.path.join(out, n) for n in (_PREDICTIONS, layout.METRICS_JSON, layout.REPORT_HTML)])
        from canestra.storage.files import is_remote, local_path

        out_dir = out if is_remote(out) else local_path(out)
        counts = metrics.get("counts", {})
        # The model's classes lead the confusion matrix's labels; "unknown" follows when it was answered.
        classes = [c for c in metrics["confusion_matrix"]["labels"] if c != UNKNOWN]
        preds = Predictions(out_dir, int(counts.get("images", 0)), int(counts.get("quarantined", 0)), classes, True)
        return Evaluation(metrics, preds)


def watch(model: str, images: str, out: str, *, once: bool = False, trigger: str | float = "10s",
          stop: threading.Event | None = None, include_paths: bool = False, spark: SparkSession | None = None,
          settings: Settings | None = None, quiet: bool = False, progress: Progress | None = None,
          **overrides: Unpack[RunOptions]) -> WatchRun:
    """Predict images as they land under ``images`` (a folder or ``s3://`` prefix) into
    ``out/predictions``, each exactly once (Spark Structured Streaming, checkpointed in ``out``).

    ``once=True`` predicts what is there and returns (cron, EMR steps, a notebook cell). Otherwise
    it runs, a micro-batch every ``trigger``, until another thread calls ``stop.set()``; a later
    call with the same ``out`` resumes where it stopped.

    Settings keywords (``RunOptions``; any other raises ``InputError``: the saved model carries
    its featurizer and model settings): Spark ``master``, ``driver_memory``, ``arrow_batch``;
    storage ``s3_endpoint_url``, ``allow_http_endpoint``, ``allow_non_eu_region``,
    ``sse_kms_key_id``, ``s3_max_attempts``; output ``debug``, ``audit_log``.
    """
    with _boundary("watch", out, settings, dict(overrides)):
        cfg = _settings("watch", settings, dict(overrides))
        from canestra.errors import InputError
        from canestra.pipeline.watch import check_images_root, parse_trigger
        from canestra.pipeline.watch import watch as _watch

        if not once and stop is None:
            raise InputError("watch(once=False) runs until stopped: pass stop=threading.Event() and call "
                             "stop.set() from another thread, or use once=True")
        check_images_root(images)  # an empty folder is fine: images may land later
        model_dir = _model_dir(model)
        res = _watch(_ready(cfg, spark, None, False, out=out)[0], model_dir, images, out, trigger=parse_trigger(trigger),
                     once=once, include_paths=include_paths, progress=_progress(progress, quiet), stop_event=stop)
        audit.note(predicted=res.predicted, quarantined=res.quarantined, batches=res.batches,
                   details={"include_paths": include_paths, "once": once, "trigger": str(trigger)},
                   outputs=[res.predictions_path, os.path.join(res.out_dir, layout.QUARANTINE_CSV)])
        return WatchRun(res.out_dir, res.batches, res.predicted, res.quarantined, res.stopped_by, res.abandoned_batch)


def monitor(model: str, predictions: str, *, window: int | None = None, report: str | None = None,
            audit_log: str | None = None) -> DriftReport:
    """Drift of new predictions from the model's held-out images, window by window (no Spark).

    ``predictions``: the ``--out`` folder of ``predict`` or ``watch`` (or its ``predictions/``); its rows
    are taken in time order (``predicted_at``, then ``image_id`` within one run or batch) in consecutive
    windows of ``window`` predictions (default 100, at least 25), each scored on six statistics against
    the model's drift reference (written by ``train``) and flagged when one is over its threshold
    calibrated at training time. ``report``: also write an HTML page plotting the scores over time.
    Returns a ``DriftReport`` (``.drift``, ``.windows``, ``.first_drift``, ``.to_dict()``, ``.text()``);
    docs/monitoring.md.
    """
    with _boundary("monitor", monitor_run_folder(predictions), None, {"audit_log": audit_log}):
        from canestra.drift.monitor import monitor as _monitor

        res = _monitor(_model_dir(model), predictions, window)
        written = []
        if report:
            from canestra.drift.report import write_report

            written.append(write_report(res, report))
        audit.note(predictions=res.scored + res.pending, windows=len(res.windows),
                   windows_flagged=sum(w.drift for w in res.windows), outputs=written, details={"window": res.window})
        return res


def promote(candidate: str, to: str, eval_images: str | list[str], *, current: str | None = None,
            unknown_images: str | list[str] | None = None, target: str | None = None, tolerance: float = 0.01,
            min_gain: float = 0.0, report_dir: str | None = None, registry: str | None = None,
            settings: Settings | None = None, audit_log: str | None = None) -> Promotion:
    """Compare ``candidate`` with the current model on the same photo sets and promote it only if it is
    better (docs/feedback.md): the ``target`` set (default the first ``eval_images``) must improve by more
    than ``min_gain`` and no set may lose more than ``tolerance`` (shares). ``to``: a pointer file
    (``serve --model FILE`` follows it) or ``models:/NAME@ALIAS``. No Spark: both models are scored with the
    serving predictor. Returns the ``Promotion`` (``.promoted``, ``.reason``, ``.sets``, ``.table()``,
    the report's paths); ``.raise_if_refused()`` raises ``PromotionRefused`` (exit code 3 in the CLI).
    """
    local = not (":/" in to or "://" in to)
    out = os.path.dirname(os.path.abspath(os.path.expanduser(to))) if local else None
    with _boundary("promote", out, settings, {"audit_log": audit_log} if audit_log else {}):
        cfg = settings or Settings.load()
        configure_storage(cfg)
        from canestra.feedback.promote import promote as _promote

        as_list = [eval_images] if isinstance(eval_images, str) else list(eval_images)
        unknown = [unknown_images] if isinstance(unknown_images, str) else list(unknown_images or [])
        res = _promote(candidate, to, as_list, current=current, unknown_images=unknown, target=target,
                       tolerance=tolerance, min_gain=min_gain, report_dir=report_dir, registry=registry,
                       taxonomy=cfg.taxonomy)
        audit.note(sets=len(res.sets), images=sum(s.images for s in res.sets), promoted=int(res.promoted),
                   outputs=[res.report_md, res.report_json] + ([to] if res.promoted and local else []),
                   details={"candidate": res.candidate_version[:12], "tolerance": tolerance, "min_gain": min_gain,
                            "current": res.current_version[:12] if res.current_version else None})
        return res


def feedback_store(store: str) -> str:
    """The root of a feedback store; InputError when ``store`` is none (train --feedback checks it before Spark)."""
    from canestra.feedback.store import require_store

    return require_store(store)


def erase_feedback(store: str, image_ids: list[str]) -> list[str]:
    """Delete every copy of ``image_ids`` from a feedback store (``erase --feedback-dir``); the entries removed."""
    from canestra.feedback.store import erase
    from canestra.privacy.erase import validate_ids

    return erase(store, set(validate_ids(image_ids)))


def purge_feedback(store: str, older_than_days: float | None, *, dry_run: bool = False) -> list:
    """Delete (``dry_run``: list) the corrections of a feedback store older than the period; (entry, age) pairs."""
    from canestra.errors import InputError
    from canestra.feedback.store import purge

    if older_than_days is None:
        raise InputError("--older-than must be a number of days >= 0 (or set CANESTRA_RETENTION_DAYS)")
    return purge(store, older_than_days, dry_run=dry_run)


def load_model(path: str, *, spark: SparkSession | None = None,
               registry: str | bool | None = None) -> PipelineModel:
    """A saved canestra model as a Spark ``PipelineModel`` (``model/`` folder, s3:// or ``models:/NAME/ALIAS``).

    ``registry``: the MLflow registry for ``models:/`` (default MLFLOW_TRACKING_URI, else ./mlruns).
    """
    from canestra.pipeline.predict import load_model as _load

    model_dir = _model_dir(path, registry)
    _spark(Settings.load(), spark)  # PipelineModel.load needs a running session
    return _load(model_dir)


# ---------------------------------------------------------------------------- the command line's hooks
# canestra.cli parses, calls these and the functions above, and formats; it imports no pipeline,
# vision, storage or Spark module itself (tests/test_architecture.py).


def monitor_run_folder(predictions: str) -> str:
    """The run folder ``monitor``'s audit record goes to: ``OUT`` for ``OUT`` or ``OUT/predictions``."""
    local = predictions if "://" in predictions else os.path.abspath(os.path.expanduser(predictions)).rstrip("/")
    return os.path.dirname(local) if os.path.basename(local) == _PREDICTIONS else local


def configure_storage(cfg: Settings) -> None:
    """Apply ``cfg``'s S3 endpoint, encryption and region settings to the storage layer."""
    from canestra.storage import files as storage
    from canestra.storage import s3

    storage.configure_s3(s3.S3Options.from_settings(cfg))


def precheck(command: str, cfg: Settings, *, out: str, images: str | list[str] | None = None,
             model: str | None = None, eval_images: list[str] | None = None,
             unknown_images: list[str] | None = None, trigger: str | float | None = None,
             family_images: list[str] | None = None) -> Listing | None:
    """Fail fast on bad paths before paying for a JVM start (the CLI's checks, in this order).

    Returns the listing of ``images`` it made (ingest, train, predict, evaluate): pass it on as
    ``listing=`` and the run lists the tree once, not twice (one S3 listing)."""
    from canestra.errors import InputError
    from canestra.pipeline.ingest import make_listing
    from canestra.storage.files import ensure_output_dir

    if images is None and command in ("ingest", "train", "predict", "evaluate", "watch"):
        raise InputError(f"{command} needs images (--images)")
    if model is None and command in ("predict", "evaluate", "watch"):
        raise InputError(f"{command} needs a model (--model)")
    roots: str | list[str] = images if images is not None else []
    listing = None
    if command in ("ingest", "train"):
        from canestra.answer.taxonomy import load_taxonomy

        taxonomy = load_taxonomy(cfg.taxonomy)
        if family_images:  # --family-images roots are training roots too
            roots = _joined(roots, family_images)
        listing = make_listing(roots, require_labels=True, taxonomy=taxonomy, unknown_uris=unknown_images or (),
                               family_uris=family_images or ())
        if eval_images:
            from canestra.pipeline.eval_sources import check_eval_roots

            check_eval_roots(eval_images, roots, taxonomy)
    if command in ("predict", "evaluate", "watch"):
        from canestra.model import check_model_dir

        check_model_dir(str(model))
    if command in ("predict", "evaluate"):
        listing = make_listing(roots, require_labels=command == "evaluate")
    if command == "watch":  # an empty folder is fine: images may land later
        from canestra.pipeline.watch import check_images_root, parse_trigger

        check_images_root(str(roots))
        parse_trigger(trigger if trigger is not None else "10s")
    ensure_output_dir(out)
    if command in ("train", "predict", "evaluate", "watch"):
        # Build (or find) the CNN graph once here: a cache problem is one plain line before Spark
        # starts, and local workers then find the file instead of racing to build it.
        from canestra.vision import backbone

        backbone.model_path(cfg.precision)
    return listing


def out_lock(out: str, command: str):
    """``OUT/.canestra.lock`` for the run (a context manager): one run per --out at a time."""
    from canestra.storage.lock import out_lock as lock

    return lock(out, command)


def gdpr_locks(out: str, command: str):
    """The lock of OUT and of every run folder under it: erase and gdpr record read or rewrite them all."""
    import contextlib

    from canestra.privacy.purge import run_folders
    from canestra.storage import files as storage
    from canestra.storage.lock import out_locks

    root = None if storage.is_remote(out) else os.path.abspath(storage.local_path(out))
    if root is None or not os.path.isdir(root):  # the command's own error says so; no lock may create OUT
        return contextlib.nullcontext()
    return out_locks([root, *run_folders(root)], command)


def spark_log_path(out: str) -> str:
    """``OUT/_logs/spark.log`` for a local --out; a local temp file for s3:// outputs."""
    from canestra.storage.files import is_remote, local_path

    if is_remote(out):
        return _temp_log()
    return os.path.join(local_path(out), layout.LOGS_DIR, layout.SPARK_LOG)


def tune_driver_process() -> None:
    """Process-wide tuning for a process canestra owns (the CLI): Arrow's system allocator, so the
    driver's RSS does not keep what a large run freed. Never called for library use."""
    from canestra.sparkctx import driver_arrow_pool

    driver_arrow_pool()


def log_offset(log_file: str | None) -> int:
    """Where a run's lines start in an (appended) Spark log."""
    from canestra.sparkctx import log_size

    return log_size(log_file)


def notices(log_file: str | None, start: int = 0) -> list[str]:
    """Plain lines for JVM notices a user can act on (said once per machine), from a run's log."""
    from canestra.sparkctx import once_notices

    return once_notices(log_file, start)


def format_summary(metrics: dict) -> str:
    """The few lines ``train`` and ``evaluate`` print about a metrics.json."""
    from canestra.pipeline.metrics import format_summary as fmt

    return fmt(metrics)
