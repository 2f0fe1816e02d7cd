"""Online prediction without Spark: a saved PipelineModel read as plain files.

``canestra train`` saves ``PipelineModel[ImageFeaturizer -> PCA -> LR -> IndexToString]``.
Its stage parameters are JSON (``stages/*/metadata/part-*``) and the fitted matrices
are Parquet (``stages/*/data/*.parquet``), so this module reads them with ``json`` and
``pyarrow`` and replays the pipeline in numpy:

- featurizer: ``images.decode_rgb`` + ``backbone.embed`` (the very functions the Spark
  UDF calls, so pixels and embeddings are the same);
- PCA: Spark's ``PCAModel`` computes ``pc^T x`` (no centring) in float64;
- LR: margins ``W x + b``, probabilities = softmax(margins) (binomial: sigmoid), the
  prediction is the first arg-max, as in Spark;
- labels: the ``IndexToString`` stage.

No JVM, no SparkSession: one process loads this in well under a second.
"""

from __future__ import annotations

import datetime as dt
import glob
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import backbone
from .errors import InputError
from .images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, decode_rgb, pixel_id

TOP_K = 5  # same as prediction.TOP_K (not imported: that module pulls in Spark helpers)
METRICS_JSON = "metrics.json"  # written by `canestra train` next to model/

_FEATURIZER = "canestra.featurizer.ImageFeaturizer"
_PCA = "org.apache.spark.ml.feature.PCAModel"
_LR = "org.apache.spark.ml.classification.LogisticRegressionModel"
_LABELS = "org.apache.spark.ml.feature.IndexToString"


# ---------------------------------------------------------------------------- reading Spark ML files


def _read_metadata(folder: str) -> dict[str, Any]:
    parts = sorted(glob.glob(os.path.join(folder, "metadata", "part-*")))
    if not parts:
        raise InputError(f"{folder} has no metadata/part-* file: the model is incomplete, re-run `canestra train`")
    try:
        with open(parts[0], encoding="utf-8") as fh:
            return json.loads(fh.readline())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the model metadata in {folder} ({exc}): re-run `canestra train`") from None


def _params(meta: dict[str, Any]) -> dict[str, Any]:
    """Effective parameters: explicitly set values override defaults, as in Spark."""
    return {**meta.get("defaultParamMap", {}), **meta.get("paramMap", {})}


def _read_data_row(folder: str) -> dict[str, Any]:
    import pyarrow.parquet as pq

    files = sorted(glob.glob(os.path.join(folder, "data", "*.parquet")))
    if not files:
        raise InputError(f"{folder} has no data/*.parquet file: the model is incomplete, re-run `canestra train`")
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    if len(rows) != 1:
        raise InputError(f"{folder}/data holds {len(rows)} rows instead of 1: re-run `canestra train`")
    return rows[0]


def spark_vector(v: dict[str, Any]) -> np.ndarray:
    """A Spark ML Vector as saved in Parquet: type 0 = sparse (size, indices, values), 1 = dense."""
    values = np.asarray(v["values"], dtype=np.float64)
    if v["type"] == 1:
        return values
    out = np.zeros(int(v["size"]), dtype=np.float64)
    out[np.asarray(v["indices"], dtype=np.int64)] = values
    return out


def spark_matrix(m: dict[str, Any]) -> np.ndarray:
    """A Spark ML Matrix as saved in Parquet, as a (numRows, numCols) float64 array.

    Dense (type 1): ``values`` column-major, or row-major when ``isTransposed``.
    Sparse (type 0): CSC (``colPtrs``, ``rowIndices``), or CSR when ``isTransposed``.
    """
    rows, cols = int(m["numRows"]), int(m["numCols"])
    values = np.asarray(m["values"], dtype=np.float64)
    if m["type"] == 1:
        if m["isTransposed"]:
            return values.reshape(rows, cols)
        return values.reshape(cols, rows).T.copy()
    out = np.zeros((rows, cols), dtype=np.float64)
    ptrs, idx = m["colPtrs"], m["rowIndices"]
    outer = rows if m["isTransposed"] else cols
    for o in range(outer):
        for k in range(ptrs[o], ptrs[o + 1]):
            if m["isTransposed"]:
                out[o, idx[k]] = values[k]
            else:
                out[idx[k], o] = values[k]
    return out


def model_files_sha256(model_dir: str) -> str:
    """Hash of the model's own files (metadata + fitted data), in a stable order.

    Spark's ``.crc``/``_SUCCESS`` files and the training-id list (rewritten by
    ``canestra erase``) are left out: they do not change what the model predicts.
    """
    h = hashlib.sha256()
    for sub in ("metadata", "stages"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(model_dir, sub)):
            dirnames.sort()
            for name in sorted(filenames):
                if name.startswith((".", "_")):
                    continue
                path = os.path.join(dirpath, name)
                h.update(os.path.relpath(path, model_dir).encode() + b"\0")
                with open(path, "rb") as fh:
                    h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


# ---------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelSpec:
    """Everything a saved canestra PipelineModel holds, as numpy arrays; no ONNX session yet."""

    model_dir: str
    labels: list[str]
    image_sizes: tuple[int, ...]
    onnx_path: str  # "" = the built-in EfficientNet-Lite0 graph
    precision: str  # "fp32" or "int8": which built-in graph, as the Spark featurizer used
    pca: np.ndarray  # (input_dim, k): Spark's principal components, one per column
    coefficients: np.ndarray  # (n_classes, k); binomial: (1, k)
    intercepts: np.ndarray  # (n_classes,); binomial: (1,)
    multinomial: bool
    created_at: str | None
    spark_version: str | None
    version: str  # sha256 of the model files
    metrics: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def model_version(self) -> str:
        return self.version[:12]


def check_model_dir(path: str) -> str:
    local = os.path.abspath(os.path.expanduser(path[len("file://"):] if path.startswith("file://") else path))
    if "://" in path and not path.startswith("file://"):
        raise InputError(f"{path}: serve a local model folder (copy it from object storage first)")
    if not os.path.isdir(local):
        raise InputError(f"model folder {local} does not exist: pass the model/ folder written by `canestra train`")
    if not os.path.isdir(os.path.join(local, "metadata")) or not os.path.isdir(os.path.join(local, "stages")):
        raise InputError(f"{local} is not a saved canestra model (no metadata/ and stages/): "
                         "pass the model/ folder written by `canestra train`")
    return local


def load_model_spec(path: str) -> ModelSpec:
    """Read a saved canestra PipelineModel without Spark; InputError when it is not one."""
    model_dir = check_model_dir(path)
    top = _read_metadata(model_dir)
    uids = top.get("paramMap", {}).get("stageUids") or []
    stage_dirs = {os.path.basename(d).split("_", 1)[1]: d for d in glob.glob(os.path.join(model_dir, "stages", "*_*"))}
    missing = [u for u in uids if u not in stage_dirs]
    if not uids or missing:
        raise InputError(f"{model_dir} lists stages it does not hold ({', '.join(missing) or 'none listed'}): "
                         "re-run `canestra train`")
    by_class: dict[str, tuple[str, dict]] = {}
    for uid in uids:
        meta = _read_metadata(stage_dirs[uid])
        by_class.setdefault(meta.get("class", ""), (stage_dirs[uid], meta))
    need = {_FEATURIZER: "ImageFeaturizer", _PCA: "PCA", _LR: "LogisticRegression", _LABELS: "IndexToString"}
    absent = [name for cls, name in need.items() if cls not in by_class]
    if absent or len(uids) != 4:
        raise InputError(f"{model_dir} is not a canestra model (expected ImageFeaturizer, PCA, LogisticRegression, "
                         f"IndexToString; missing {', '.join(absent) or 'none'}): serve a model from `canestra train`")

    feat = _params(by_class[_FEATURIZER][1])
    sizes = tuple(int(s) for s in feat.get("imageSizes") or [160])
    onnx_path = str(feat.get("modelPath") or "")
    precision = str(feat.get("precision") or "fp32")

    pca_dir, pca_meta = by_class[_PCA]
    pc = spark_matrix(_read_data_row(pca_dir)["pc"])
    lr_dir, lr_meta = by_class[_LR]
    lr_params = _params(lr_meta)
    if lr_params.get("thresholds"):
        raise InputError(f"{model_dir}: logistic regression with class thresholds is not supported by `canestra serve`")
    lr = _read_data_row(lr_dir)
    coef = spark_matrix(lr["coefficientMatrix"])
    intercepts = spark_vector(lr["interceptVector"])
    multinomial = bool(lr["isMultinomial"])
    labels = [str(x) for x in _params(by_class[_LABELS][1]).get("labels") or []]

    n_classes = coef.shape[0] if multinomial else 2
    if pc.shape[0] != backbone.FEATURE_DIM * len(sizes) or coef.shape[1] != pc.shape[1] or len(labels) != n_classes \
            or intercepts.shape[0] != coef.shape[0]:
        raise InputError(f"{model_dir}: the stages do not fit together (PCA {pc.shape}, coefficients {coef.shape}, "
                         f"{len(labels)} labels): re-run `canestra train`")

    ts = top.get("timestamp")
    created = dt.datetime.fromtimestamp(ts / 1000, dt.timezone.utc).isoformat(timespec="seconds") if ts else None
    return ModelSpec(
        model_dir=model_dir, labels=labels, image_sizes=sizes, onnx_path=onnx_path, precision=precision, pca=pc,
        coefficients=coef, intercepts=intercepts, multinomial=multinomial, created_at=created,
        spark_version=top.get("sparkVersion"), version=model_files_sha256(model_dir),
        metrics=_read_metrics(model_dir),
    )


def _read_metrics(model_dir: str) -> dict[str, Any] | None:
    path = os.path.join(os.path.dirname(model_dir.rstrip(os.sep)), METRICS_JSON)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------- predicting


@dataclass(frozen=True)
class Prediction:
    image_id: str  # pixel SHA-256, the same id `canestra predict` writes
    label: str
    probability: float
    top5: list[tuple[str, float]]
    probabilities: np.ndarray  # one per class, in label order


def default_threads(workers: int = 1) -> int:
    """ONNX Runtime intra-op threads per worker so that workers x threads ~ cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


class OnlinePredictor:
    """Decode -> EfficientNet-Lite0 -> PCA -> LR in one process, with one ONNX Runtime session.

    Thread-safe for concurrent calls (ONNX Runtime sessions are); callers bound the
    concurrency so that threads x concurrent calls stay within the cores.
    """

    def __init__(self, spec: ModelSpec, threads: int | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        self.spec = spec
        self.threads = threads or default_threads()
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.onnx_path = spec.onnx_path or backbone.model_path(spec.precision)
        self._session = backbone.session(self.onnx_path, self.threads)
        self._labels = np.array(spec.labels, dtype=object)
        # Two products, as Spark does them (PCA, then LR), rather than one folded matrix:
        # the float64 results then differ from Spark's by rounding noise only.
        self._pc = np.ascontiguousarray(spec.pca)
        self._coef_t = np.ascontiguousarray(spec.coefficients.T)

    @classmethod
    def from_model_dir(cls, path: str, threads: int | None = None, **limits: int) -> "OnlinePredictor":
        return cls(load_model_spec(path), threads, **limits)

    @property
    def labels(self) -> list[str]:
        return list(self.spec.labels)

    def decode(self, data: bytes) -> np.ndarray:
        """Validated RGB pixels (raises images.BadImage), with the same limits as ingest."""
        return decode_rgb(data, max_pixels=self.max_pixels, max_bytes=self.max_bytes)

    def features(self, rgbs: list[np.ndarray]) -> np.ndarray:
        """CNN embeddings (float32, as the Spark featurizer produces them)."""
        return backbone.embed(rgbs, self.spec.image_sizes, self.onnx_path, self.threads)

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities from embeddings, computed as Spark's PCAModel + LogisticRegressionModel do."""
        x = np.asarray(features, dtype=np.float64)
        reduced = x @ self._pc  # row i = pc^T x_i
        margins = reduced @ self._coef_t + self.spec.intercepts
        if not self.spec.multinomial:  # binomial: P(1) = sigmoid(margin)
            p1 = 1.0 / (1.0 + np.exp(-margins[:, 0]))
            return np.stack([1.0 - p1, p1], axis=1)
        margins = margins - margins.max(axis=1, keepdims=True)
        e = np.exp(margins)
        return e / e.sum(axis=1, keepdims=True)

    def predict_rgb(self, rgbs: list[np.ndarray]) -> list[Prediction]:
        if not rgbs:
            return []
        probs = self.probabilities(self.features(rgbs))
        out = []
        for rgb, p in zip(rgbs, probs):
            order = np.argsort(-p, kind="stable")[:TOP_K]  # ties: lowest index first, like Spark's argmax
            top = [(str(self._labels[i]), float(p[i])) for i in order]
            out.append(Prediction(pixel_id(rgb), top[0][0], top[0][1], top, p))
        return out

    def predict_bytes(self, data: bytes) -> Prediction:
        """One encoded image -> Prediction; raises images.BadImage for unusable bytes."""
        return self.predict_rgb([self.decode(data)])[0]

    def warm_up(self) -> float:
        """One inference on a blank image so the first request does not pay ORT's lazy set-up; seconds."""
        t0 = time.perf_counter()
        self.predict_rgb([np.full((100, 100, 3), 255, np.uint8)])
        return time.perf_counter() - t0

    def info(self) -> dict[str, Any]:
        s = self.spec
        return {
            "classes": list(s.labels),
            "created_at": s.created_at,
            "version": s.version,
            "model_version": s.model_version,
            "image_sizes": list(s.image_sizes),
            "precision": s.precision,
            "pca_k": int(s.pca.shape[1]),
            "backbone": backbone.MODEL_NAME if not s.onnx_path else os.path.basename(s.onnx_path),
            "spark_version": s.spark_version,
            "metrics": s.metrics,
        }
