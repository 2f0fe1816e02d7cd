"""MLflow experiment tracking and the model registry (optional extra: ``pip install 'canestra[mlflow]'``).

``canestra train --mlflow [URI]`` / ``canestra.train(..., mlflow=True)``, or ``MLFLOW_TRACKING_URI``
set in the environment, logs one MLflow run per training: the settings as parameters, the
held-out figures as metrics, ``report.html`` and ``metrics.json`` (without image ids) and the saved model folder
(artifact ``model/``, a Spark ``PipelineModel`` directory, without its list of training image ids). ``register_model="NAME"`` adds it to
the registry as a new version of NAME. ``canestra serve --model models:/NAME/ALIAS`` (or
``models:/NAME/VERSION``, ``models:/NAME@ALIAS``) downloads that version into canestra's cache
and serves it from there.

MLflow's client is used without its global state (no ``mlflow.set_tracking_uri``): a notebook's
own MLflow set-up is left as it was. Nothing here logs image paths or image content (GDPR
Art. 25): parameters and metrics are settings and aggregate figures only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from canestra.errors import EnvironmentProblem, InputError
from canestra.layout import METRICS_JSON, MODEL, REPORT_HTML

ENV_URI = "MLFLOW_TRACKING_URI"
ENV_REGISTRY = "MLFLOW_REGISTRY_URI"
ENV_EXPERIMENT = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_URI = "mlruns"  # ./mlruns, MLflow's classic local file store
DEFAULT_EXPERIMENT = "canestra"
REGISTRY_PREFIX = "models:/"

# Settings logged as run parameters: what shapes the model, never paths to images.
PARAMS = ("image_sizes", "precision", "batch_size", "pca_k", "pca_variance", "test_fraction", "seed", "reg_param",
          "elastic_net", "max_iter", "unknown_quantile", "shift_eval", "answer_head", "taxonomy")
_METRIC_KEY = re.compile(r"[^0-9A-Za-z_\-. /]")


def _mlflow():
    try:
        import mlflow  # noqa: F401
        from mlflow import MlflowClient
    except ImportError:
        raise EnvironmentProblem("MLflow tracking was asked for (--mlflow, mlflow=... or MLFLOW_TRACKING_URI) but "
                                 "mlflow is not installed: pip install 'canestra[mlflow]'") from None
    return MlflowClient


def resolve_uri(option: str | bool | None = None) -> str | None:
    """The tracking URI to log to, or None when tracking is off.

    ``option``: None = only if ``MLFLOW_TRACKING_URI`` is set; True or "" = that variable, else ./mlruns;
    False = off; a string = that URI or local folder.
    """
    if option is False:
        return None
    if option is None or option is True or option == "":
        uri = os.environ.get(ENV_URI) or (None if option is None else DEFAULT_URI)
    else:
        uri = str(option)
    return None if uri is None else _store_uri(uri)


def train_option(mlflow: str | bool | None, register_model: str | None) -> str | bool | None:
    """Registering a model implies tracking (MLFLOW_TRACKING_URI, else ./mlruns) unless asked otherwise."""
    return True if register_model and mlflow is None else mlflow


def require(option: str | bool | None) -> str | None:
    """The tracking URI for ``option``, after checking that mlflow is installed: callers check
    before the expensive work starts, not after it."""
    uri = resolve_uri(option)
    if uri is not None:
        _mlflow()
    return uri


def _store_uri(uri: str) -> str:
    """A plain folder becomes an absolute file: URI. MLflow 3 refuses file stores unless
    MLFLOW_ALLOW_FILE_STORE is set; a local folder is what canestra documents, so it is allowed."""
    if "://" not in uri and not uri.startswith(("file:", "sqlite:", "databricks")):
        uri = "file://" + os.path.abspath(os.path.expanduser(uri))
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def _flat_metrics(d: dict, prefix: str = "", depth: int = 0) -> dict[str, float]:
    """Numeric scalars of metrics.json, nested keys joined by '.'; lists (per-class rows, matrices) left out."""
    out: dict[str, float] = {}
    for key, value in d.items():
        name = _METRIC_KEY.sub("_", f"{prefix}{key}")
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[name] = float(value)
        elif isinstance(value, dict) and depth < 3:
            out.update(_flat_metrics(value, name + ".", depth + 1))
    return out


def _params(cfg) -> dict[str, str]:
    return {k: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
            for k in PARAMS for v in [getattr(cfg, k, None)]}


@dataclass
class TrackedRun:
    """The MLflow run of one training: ids to find it, and the registered version if any."""

    tracking_uri: str
    experiment_id: str
    run_id: str
    artifact_uri: str
    model_version: str | None = None

    @property
    def model_uri(self) -> str:
        """``runs:/<run_id>/model``: MLflow's address of the logged model folder."""
        return f"runs:/{self.run_id}/model"


class _Run:
    def __init__(self, client, tracked: TrackedRun):
        self.client = client
        self.tracked = tracked

    def log_training(self, out_dir: str, metrics: dict, cfg, register_model: str | None = None) -> TrackedRun:
        from mlflow.entities import Metric, Param

        run_id = self.tracked.run_id
        import time

        now = int(time.time() * 1000)
        params = dict(_params(cfg), pca_k_fitted=str((metrics.get("pca") or {}).get("k")))
        flat = _flat_metrics(metrics)
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        items = [Metric(k, v, now, 0) for k, v in flat.items()]
        for i in range(0, len(items), 900):  # MLflow caps a batch at 1,000 metrics
            self.client.log_batch(run_id, metrics=items[i:i + 900])
        self._log_redacted_report(out_dir)
        from canestra.layout import TRAINING_IDS

        # GDPR Art. 5(1)(c): the model's list of training image ids serves `canestra erase` in the run
        # folder; the tracking store, another place with other readers, gets the model without it.
        with tempfile.TemporaryDirectory(prefix="canestra-mlflow-") as tmp:
            model = os.path.join(tmp, "model")
            shutil.copytree(os.path.join(out_dir, MODEL), model, ignore=shutil.ignore_patterns(TRAINING_IDS))
            self.client.log_artifacts(run_id, model, artifact_path="model")
        if register_model:
            self.tracked.model_version = register(self.client, register_model, self.tracked)
        return self.tracked


    def _log_redacted_report(self, out_dir: str) -> None:
        """metrics.json and report.html without image ids: the tracking store has other readers, and
        ``canestra erase`` rewrites the run folder, not a store it may not reach (GDPR Art. 17, 25).
        The worst errors keep their labels and scores; their ids and thumbnails stay in the run folder."""
        import json

        from canestra.pipeline.report import write_report

        try:
            with open(os.path.join(out_dir, METRICS_JSON), encoding="utf-8") as fh:
                metrics = json.load(fh)
        except FileNotFoundError:
            return
        metrics = redact_metrics(metrics)
        with tempfile.TemporaryDirectory(prefix="canestra-mlflow-") as tmp:
            with open(os.path.join(tmp, METRICS_JSON), "w", encoding="utf-8") as fh:
                json.dump(metrics, fh, indent=2)
            if os.path.exists(os.path.join(out_dir, REPORT_HTML)):
                write_report(metrics, os.path.join(tmp, REPORT_HTML))
            for name in (REPORT_HTML, METRICS_JSON):
                if os.path.exists(os.path.join(tmp, name)):
                    self.client.log_artifact(self.tracked.run_id, os.path.join(tmp, name))


def redact_metrics(metrics: dict) -> dict:
    """A copy of metrics.json without image ids (worst_errors' image_id and thumbnail)."""
    out = dict(metrics)
    errors = out.get("worst_errors")
    if isinstance(errors, list):
        out["worst_errors"] = [{k: v for k, v in e.items() if k not in ("image_id", "thumbnail")}
                               if isinstance(e, dict) else e for e in errors]
    return out


def register(client, name: str, tracked: TrackedRun) -> str:
    """A new version of registered model ``name`` pointing at the run's ``model/`` artifact."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, tags={"created_by": "canestra"})
    mv = client.create_model_version(name, source=f"{tracked.artifact_uri}/model", run_id=tracked.run_id)
    return str(mv.version)


@contextlib.contextmanager
def tracked_run(option: str | bool | None, run_name: str | None = None) -> Iterator[_Run | None]:
    """An MLflow run around a training (None when tracking is off); FAILED if the body raises."""
    uri = resolve_uri(option)
    if uri is None:
        yield None
        return
    client_cls = _mlflow()
    from mlflow.exceptions import MlflowException

    from canestra import __version__

    try:
        client = client_cls(tracking_uri=uri, registry_uri=uri)
        name = os.environ.get(ENV_EXPERIMENT) or DEFAULT_EXPERIMENT
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else client.create_experiment(name)
        run = client.create_run(exp_id, run_name=run_name,
                                tags={"mlflow.source.name": "canestra train", "canestra_version": __version__})
    except MlflowException as exc:
        raise EnvironmentProblem(f"cannot log to MLflow at {uri}: {_first_line(exc)}") from None
    tracked = TrackedRun(uri, exp_id, run.info.run_id, run.info.artifact_uri)
    status = "FAILED"
    try:
        yield _Run(client, tracked)
        status = "FINISHED"
    finally:
        client.set_terminated(tracked.run_id, status)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


# ---------------------------------------------------------------------------- registry -> local folder


def is_registry_uri(path: str) -> bool:
    return str(path).startswith(REGISTRY_PREFIX)


def _parse(uri: str) -> tuple[str, str]:
    rest = uri[len(REGISTRY_PREFIX):].strip("/")
    if "@" in rest and "/" not in rest:
        name, ref = rest.split("@", 1)
    elif "/" in rest:
        name, ref = rest.rsplit("/", 1)
    else:
        name, ref = rest, ""
    if not name or not ref:
        raise InputError(f"{uri} is not a registered-model address: use models:/NAME/ALIAS or models:/NAME/VERSION")
    return name, ref


def local_model_dir(path: str, registry: str | bool | None = None) -> str:
    """``models:/NAME/ALIAS|VERSION`` -> a local copy of that version's model folder; other paths unchanged.

    The registry is ``registry`` (a URI or folder), else MLFLOW_REGISTRY_URI / MLFLOW_TRACKING_URI,
    else ./mlruns. A version never changes once registered, so its copy is cached by version.
    """
    if not is_registry_uri(path):
        return path
    name, ref = _parse(path)
    client_cls = _mlflow()
    from mlflow.exceptions import MlflowException

    uri = _store_uri(registry if isinstance(registry, str) and registry else
                     os.environ.get(ENV_REGISTRY) or os.environ.get(ENV_URI) or DEFAULT_URI)
    client = client_cls(tracking_uri=uri, registry_uri=uri)
    try:
        if ref.isdigit():
            mv = client.get_model_version(name, ref)
        else:
            mv = client.get_model_version_by_alias(name, ref)
    except MlflowException as exc:
        raise InputError(f"no registered model {name!r} with {'version' if ref.isdigit() else 'alias'} {ref!r} in "
                         f"the MLflow registry at {uri} ({_first_line(exc)}): check the name, or pass the registry "
                         "with --mlflow URI / MLFLOW_TRACKING_URI") from None
    from canestra.vision.backbone import cache_dir

    key = hashlib.sha256(f"{uri}|{name}|{mv.version}".encode()).hexdigest()[:16]
    dest = os.path.join(str(cache_dir()), "registry", f"{_safe(name)}-v{mv.version}-{key}")
    if os.path.isdir(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".download-", dir=os.path.dirname(dest))
    try:
        import mlflow.artifacts

        got = mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=staging, tracking_uri=uri)
        try:
            os.rename(got, dest)  # whole or not at all: a reader never sees half a model
        except OSError:
            if not os.path.isdir(dest):  # another process published the same version first
                raise
    except MlflowException as exc:
        raise InputError(f"cannot download {path} ({_first_line(exc)}) from the MLflow registry at {uri}") from None
    except OSError as exc:
        raise EnvironmentProblem(f"cannot copy {path} into {os.path.dirname(dest)} ({exc.strerror or exc}): set "
                                 "CANESTRA_CACHE_DIR to a writable folder") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _registry(registry: str | bool | None):
    """(MLflow client, URI) of ``registry`` (a URI or folder), else MLFLOW_REGISTRY_URI / MLFLOW_TRACKING_URI, ./mlruns."""
    client_cls = _mlflow()
    uri = _store_uri(registry if isinstance(registry, str) and registry else
                     os.environ.get(ENV_REGISTRY) or os.environ.get(ENV_URI) or DEFAULT_URI)
    return client_cls(tracking_uri=uri, registry_uri=uri), uri


def alias_of(path: str) -> tuple[str, str]:
    """``models:/NAME@ALIAS`` (or ``models:/NAME/ALIAS``) -> (NAME, ALIAS); InputError for a version number."""
    name, ref = _parse(path)
    if ref.isdigit():
        raise InputError(f"{path} names version {ref}, not an alias: use models:/{name}@ALIAS")
    return name, ref


def version_of(path: str) -> tuple[str, str]:
    """``models:/NAME/VERSION`` -> (NAME, VERSION); InputError for an alias."""
    name, ref = _parse(path)
    if not ref.isdigit():
        raise InputError(f"{path} names an alias, not a version: pass models:/{name}/VERSION")
    return name, ref


def alias_version(path: str, registry: str | bool | None = None) -> str | None:
    """The version number ``models:/NAME@ALIAS`` points at now; None when the alias is not set."""
    from mlflow.exceptions import MlflowException

    name, alias = alias_of(path)
    client, _ = _registry(registry)
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def set_alias(path: str, version: str, registry: str | bool | None = None) -> None:
    """Point ``models:/NAME@ALIAS`` at ``version`` of NAME (canestra promote)."""
    from mlflow.exceptions import MlflowException

    name, alias = alias_of(path)
    client, uri = _registry(registry)
    try:
        client.set_registered_model_alias(name, alias, str(version))
    except MlflowException as exc:
        raise InputError(f"cannot set {path} to version {version} in the MLflow registry at {uri} "
                         f"({_first_line(exc)})") from None


def _safe(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]", "_", name)[:64]


def describe(tracked: TrackedRun | None) -> dict[str, Any]:
    return {} if tracked is None else {"mlflow_run_id": tracked.run_id, "mlflow_model_version": tracked.model_version}
