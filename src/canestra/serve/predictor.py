"""Online prediction without Spark: a saved PipelineModel read as plain files.

``canestra train`` saves ``PipelineModel[ImageFeaturizer -> PCA -> LR -> AnswerModel]``, or for a
studio-only model ``[ImageFeaturizer -> PCA -> LR -> LR on the block -> AnswerModel]`` (the answer head,
``train._fit_answer_head``) (models saved before the answer stage existed end with ``IndexToString``
instead; they are still served). Its stage parameters are JSON (``stages/*/metadata/part-*``) and the
fitted matrices are Parquet (``stages/*/data/*.parquet``), so this module reads them with
``json`` and ``pyarrow`` and replays the pipeline in numpy:

- featurizer: ``images.decode_rgb`` + ``backbone.embed`` with the stage's ``inputFit``
  (the very functions the Spark UDF calls, so pixels and embeddings are the same);
- PCA: Spark's ``PCAModel`` computes ``pc^T x`` (no centring) in float64;
- LR: margins ``W x + b`` (Spark's ``rawPrediction``; binomial: ``[-m, m]``),
  probabilities = softmax(margins) (binomial: sigmoid), as in Spark; with an answer head, mixed with
  its own (softmax of its margins on the graph's ``block`` output) by ``answer.answer_probabilities``;
- answer: :func:`canestra.answer.rule.decide` with the ``AnswerModel`` stage's rule (variety,
  family, ``unknown``), the function that stage itself calls in Spark. Old models: a
  rule built from the ``IndexToString`` labels and the shipped taxonomy, without
  ``unknown`` thresholds.

No JVM, no SparkSession: one process loads this in well under a second.
"""

from __future__ import annotations

import atexit
import datetime as dt
import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from canestra.answer import rule as answer
from canestra.answer.rule import AnswerRule
from canestra.errors import EnvironmentProblem, InputError
from canestra.layout import METRICS_JSON, MODEL_INFO
from canestra.model import DRIFT_REFERENCE
from canestra.vision import backbone
from canestra.vision.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, decode_rgb, pixel_id

_FEATURIZER = "canestra.vision.featurizer.ImageFeaturizer"
_PCA = "org.apache.spark.ml.feature.PCAModel"
_LR = "org.apache.spark.ml.classification.LogisticRegressionModel"
_ANSWER = answer.ANSWER_STAGE  # canestra.answer.stage.AnswerModel: the last stage of current models
_LABELS = "org.apache.spark.ml.feature.IndexToString"  # the last stage of models saved before it
# Class names written by canestra 0.1.0 (flat package layout) -> where those stages live now.
_MOVED = {"canestra.featurizer.ImageFeaturizer": _FEATURIZER, "canestra.answer_stage.AnswerModel": _ANSWER}


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
    rule: AnswerRule  # labels, their families, the `unknown` thresholds (answer.decide)
    image_sizes: tuple[int, ...]
    input_fit: str  # "crop" or "squash": how the featurizer makes non-square photos square
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
    # the answer head (studio-only models): (n_classes, block dim) coefficients and intercepts on the graph's
    # ``block`` output; its softmax is mixed into the answer's probabilities (rule.head_weight); None: no head
    answer_coefficients: np.ndarray | None = field(default=None, compare=False)
    answer_intercepts: np.ndarray | None = field(default=None, compare=False)

    @property
    def model_version(self) -> str:
        return self.version[:12]

    @property
    def families(self) -> list[str]:
        """The distinct families the model can answer, sorted."""
        return sorted(set(self.rule.families))


def check_model_dir(path: str) -> str:
    """The shared model-folder check (canestra.model), local folders only."""
    from canestra.model import check_model_dir as check

    return check(path, local_only=True)


# What serving needs of an S3 model folder (the drift reference for GET /v1/drift); the rest
# (canestra_training_ids.txt: which photos it was fitted on, for erasure) stays in the bucket.
_MODEL_PARTS = ("metadata/", "stages/", MODEL_INFO, DRIFT_REFERENCE)


def fetch_model(uri: str) -> str:
    """``s3://BUCKET/PREFIX/model/`` -> a local copy to serve; its path.

    The copy goes to a new private temporary folder (``TMPDIR``; a tmpfs in the container image),
    made once in the process that starts the service (workers get the local path) and removed when
    that process exits. ``metrics.json`` beside the model comes too (``GET /v1/model`` shows it).
    Listing and reads go through the storage layer: its credentials chain, endpoint rules and EU
    region check apply.
    """
    from canestra.storage import files, s3

    opts = files.s3_options()
    root = uri.rstrip("/")
    listed = [(obj, rel) for obj, rel, _, _ in s3.list_objects(root, opts)
              if rel.startswith(_MODEL_PARTS) and not rel.endswith(".crc")]
    if not any(rel.startswith("metadata/part-") for _, rel in listed):
        raise InputError(f"{root} is not a saved canestra model (no metadata/ under it): pass the model/ folder "
                         "written by `canestra train`")
    try:
        dest = tempfile.mkdtemp(prefix="canestra-model-")  # 0700: only this user reads the copy
    except OSError as exc:
        raise EnvironmentProblem(f"cannot copy {root} to a temporary folder ({exc.strerror or exc}): set TMPDIR "
                                 "to a writable folder") from None
    atexit.register(shutil.rmtree, dest, True)
    local = os.path.join(dest, "model")

    def write(target: str, data: bytes) -> None:
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as fh:
                fh.write(data)
        except OSError as exc:
            raise EnvironmentProblem(f"cannot copy {root} to {dest} ({exc.strerror or exc}): set TMPDIR to a "
                                     "folder with room") from None

    for obj, rel in listed:
        target = os.path.normpath(os.path.join(local, rel))
        if not target.startswith(local + os.sep):  # a key with ../ in it
            raise InputError(f"{obj}: the key leaves the model folder; serve a model written by `canestra train`")
        try:
            data = s3.read_bytes(obj, opts)
        except OSError as exc:  # read_bytes says which object and why, without credentials
            raise InputError(f"cannot copy the model {root}: {exc}") from None
        write(target, data)
    try:  # held-out figures for GET /v1/model only: a role that may read just model/ still serves
        write(os.path.join(dest, METRICS_JSON), s3.read_bytes(s3.join(root.rpartition("/")[0], METRICS_JSON), opts))
    except OSError:
        pass
    return local


def load_model_spec(path: str) -> ModelSpec:
    """Read a saved canestra PipelineModel without Spark (an ``s3://`` one from a local copy); InputError when it
    is not one."""
    from canestra.storage.s3 import is_s3

    model_dir = check_model_dir(fetch_model(path) if is_s3(path) else path)
    top = _read_metadata(model_dir)
    uids = top.get("paramMap", {}).get("stageUids") or []
    stage_dirs = {os.path.basename(d).split("_", 1)[1]: d for d in glob.glob(os.path.join(model_dir, "stages", "*_*"))}
    missing = [u for u in uids if u not in stage_dirs]
    if not uids or missing:
        raise InputError(f"{model_dir} lists stages it does not hold ({', '.join(missing) or 'none listed'}): "
                         "re-run `canestra train`")
    by_class: dict[str, tuple[str, dict]] = {}
    answer_lr: tuple[str, dict] | None = None  # the answer head: a second LR, on the block (train._fit_answer_head)
    for uid in uids:
        meta = _read_metadata(stage_dirs[uid])
        cls = _MOVED.get(meta.get("class", ""), meta.get("class", ""))
        if cls == _LR and _params(meta).get("featuresCol") == "block":
            answer_lr = answer_lr or (stage_dirs[uid], meta)
        else:
            by_class.setdefault(cls, (stage_dirs[uid], meta))
    last = _ANSWER if _ANSWER in by_class else _LABELS
    need = {_FEATURIZER: "ImageFeaturizer", _PCA: "PCA", _LR: "LogisticRegression", last: "AnswerModel"}
    absent = [name for cls, name in need.items() if cls not in by_class]
    if absent or len(uids) != 4 + (answer_lr is not None):
        raise InputError(f"{model_dir} is not a canestra model (expected ImageFeaturizer, PCA, LogisticRegression, "
                         f"AnswerModel; missing {', '.join(absent) or 'none'}): serve a model from `canestra train`")

    feat = _params(by_class[_FEATURIZER][1])
    sizes = tuple(int(s) for s in feat.get("imageSizes") or [160])
    onnx_path = str(feat.get("modelPath") or "")
    precision = str(feat.get("precision") or "fp32")
    input_fit = str(feat.get("inputFit") or "crop")  # models saved before the Param: Spark's default too
    if input_fit not in backbone.INPUT_FITS:
        raise InputError(f"{model_dir}: the featurizer's inputFit {input_fit!r} is not one of "
                         f"{', '.join(backbone.INPUT_FITS)}: re-run `canestra train`")

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
    rule = _answer_rule(model_dir, last, _params(by_class[last][1]))
    labels = list(rule.labels)

    n_classes = coef.shape[0] if multinomial else 2
    answer_coef = answer_b = None
    if answer_lr is not None:
        head = _read_data_row(answer_lr[0])
        answer_coef, answer_b = spark_matrix(head["coefficientMatrix"]), spark_vector(head["interceptVector"])
    # The answer stage reads the answer head's probabilities exactly when there is one, and mixes them in.
    reads = str(_params(by_class[last][1]).get("headProbabilityCol") or "")
    head_col = str(_params(answer_lr[1]).get("probabilityCol")) if answer_lr is not None else ""
    if pc.shape[0] != backbone.FEATURE_DIM * len(sizes) or coef.shape[1] != pc.shape[1] or len(labels) != n_classes \
            or intercepts.shape[0] != coef.shape[0] \
            or (bool(rule.imagenet_classes) and rule.imagenet_offset + backbone.FEATURE_DIM > pc.shape[0]) \
            or (last == _ANSWER and (reads != head_col or bool(rule.head_weight) != bool(head_col))) \
            or (answer_coef is not None and (not multinomial or answer_coef.shape[0] != n_classes
                                             or answer_b is None or answer_b.shape != (n_classes,))):
        raise InputError(f"{model_dir}: the stages do not fit together (PCA {pc.shape}, coefficients {coef.shape}, "
                         f"{len(labels)} labels"
                         + (f", answer head {answer_coef.shape}" if answer_coef is not None else "")
                         + "): re-run `canestra train`")

    ts = top.get("timestamp")
    created = dt.datetime.fromtimestamp(ts / 1000, dt.timezone.utc).isoformat(timespec="seconds") if ts else None
    return ModelSpec(
        model_dir=model_dir, labels=labels, rule=rule, image_sizes=sizes, input_fit=input_fit, onnx_path=onnx_path,
        precision=precision, pca=pc,
        coefficients=coef, intercepts=intercepts, multinomial=multinomial, created_at=created,
        spark_version=top.get("sparkVersion"), version=model_files_sha256(model_dir),
        metrics=_read_metrics(model_dir), answer_coefficients=answer_coef, answer_intercepts=answer_b,
    )


def _answer_rule(model_dir: str, stage_class: str, params: dict[str, Any]) -> AnswerRule:
    """The decision rule: the AnswerModel's ``rule`` Param, or (old models) one built from IndexToString."""
    if stage_class == _LABELS:
        from canestra.answer.taxonomy import load_taxonomy

        labels = [str(x) for x in params.get("labels") or []]
        return AnswerRule(labels=labels, families=load_taxonomy().families_of(labels))
    broken = f"{model_dir}: the AnswerModel stage has no usable decision rule"
    try:
        raw = json.loads(params.get("rule") or "")
    except ValueError as exc:
        raise InputError(f"{broken} (not JSON: {str(exc)[:120]}): re-run `canestra train`") from None

    def is_num(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    ok = (isinstance(raw, dict) and isinstance(raw.get("labels"), list) and isinstance(raw.get("families"), list)
          and raw["labels"] and len(raw["families"]) == len(raw["labels"])
          and all(isinstance(x, str) for x in raw["labels"] + raw["families"])
          and isinstance(raw.get("imagenet_classes", []), list)
          and all(isinstance(j, int) and 0 <= j < 1000 for j in raw.get("imagenet_classes", []))
          and isinstance(raw.get("imagenet_offset", 0), int) and raw.get("imagenet_offset", 0) >= 0
          and all(raw.get(t) is None or is_num(raw[t])
                  for t in ("energy_threshold", "fruitness_threshold", "profile_rescue_energy"))
          and is_num(raw.get("head_weight", 0.0)) and 0.0 <= raw.get("head_weight", 0.0) <= 1.0
          and isinstance(raw.get("studio_check", {}), dict))
    if not ok:
        raise InputError(f"{broken} (labels, families, thresholds or ImageNet classes malformed): "
                         "re-run `canestra train`")
    try:
        return AnswerRule(**raw)
    except TypeError as exc:  # fields this canestra does not know: a model from a newer version
        raise InputError(f"{broken} ({str(exc)[:160]}): serve it with the canestra version that trained it") from None
    except (ValueError, KeyError) as exc:  # e.g. a studio check whose weights do not fit its labels
        raise InputError(f"{broken} ({type(exc).__name__}: {str(exc)[:160]}): re-run `canestra train`") from None


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
    label: str  # the variety, or "unknown" (taxonomy.UNKNOWN) when the image resembles no training class
    probability: float  # of the most probable variety (reported for "unknown" too)
    top5: list[tuple[str, float]]  # [(class, probability rounded to 6 decimals)], as `canestra predict` writes
    probabilities: np.ndarray  # one per class, in label order
    family: str  # family of the answer ("Apple"), "" when unknown
    family_probability: float  # probabilities of the most probable family's classes, summed
    unknown: bool
    energy: float  # the scores `unknown` is decided on (answer.energy, answer.fruitness)
    fruitness: float
    projection: np.ndarray | None = None  # the PCA projection (Spark's `pca` column): for drift monitoring


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
        if spec.rule.imagenet_classes:
            answer.imagenet_head()  # read the ImageNet head now: a missing weights file fails the load, not a request
        # Two products, as Spark does them (PCA, then LR), rather than one folded matrix:
        # the float64 results then differ from Spark's by rounding noise only.
        self._pc = np.ascontiguousarray(spec.pca)
        self._coef_t = np.ascontiguousarray(spec.coefficients.T)
        self._answer_t = None if spec.answer_coefficients is None else np.ascontiguousarray(spec.answer_coefficients.T)
        if self._answer_t is not None and self._answer_t.shape[0] not in [
                o.shape[1] for o in self._session.get_outputs() if o.name == "block"]:
            raise InputError(f"the model's answer head reads the graph's block output, which {self.onnx_path} lacks: "
                             "re-run `canestra train`")

    @classmethod
    def from_model_dir(cls, path: str, threads: int | None = None, **limits: int) -> OnlinePredictor:
        return cls(load_model_spec(path), threads, **limits)

    @property
    def labels(self) -> list[str]:
        return list(self.spec.labels)

    def decode(self, data: bytes) -> np.ndarray:
        """Validated RGB pixels (raises images.BadImage), with the same limits as ingest."""
        return decode_rgb(data, max_pixels=self.max_pixels, max_bytes=self.max_bytes)

    def features(self, rgbs: list[np.ndarray]) -> np.ndarray:
        """CNN embeddings (float32, as the Spark featurizer produces them)."""
        return backbone.embed(rgbs, self.spec.image_sizes, self.onnx_path, self.threads, fit=self.spec.input_fit)

    def embed(self, rgbs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """(embeddings, the graph's block output where the model has an answer head, else None): one CNN pass."""
        if self._answer_t is None:
            return self.features(rgbs), None
        return backbone.embed(rgbs, self.spec.image_sizes, self.onnx_path, self.threads, fit=self.spec.input_fit,
                              with_block=True)

    def project(self, features: np.ndarray) -> np.ndarray:
        """The PCA projection, as Spark's ``PCAModel`` (row i = pc^T x_i, no centring)."""
        return np.asarray(features, dtype=np.float64) @ self._pc

    def margins(self, features: np.ndarray, projected: np.ndarray | None = None) -> np.ndarray:
        """The classifier's raw margins, as Spark's ``rawPrediction`` (binomial: ``[-m, m]``)."""
        reduced = self.project(features) if projected is None else projected
        margins = reduced @ self._coef_t + self.spec.intercepts
        if not self.spec.multinomial:
            margins = np.concatenate([-margins, margins], axis=1)
        return margins

    def probabilities_from_margins(self, margins: np.ndarray) -> np.ndarray:
        if not self.spec.multinomial:  # binomial: P(1) = sigmoid(margin)
            p1 = 1.0 / (1.0 + np.exp(-margins[:, 1]))
            return np.stack([1.0 - p1, p1], axis=1)
        shifted = margins - margins.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        return e / e.sum(axis=1, keepdims=True)

    def probabilities(self, features: np.ndarray, block: np.ndarray | None = None) -> np.ndarray:
        """The answer's class probabilities, computed as the Spark stages do: from the embeddings (PCA + LR),
        where the model has an answer head mixed with its own on the block output (``embed``'s second value)."""
        return self._answer_probabilities(self.margins(features), block)

    def _answer_probabilities(self, margins: np.ndarray, block: np.ndarray | None) -> np.ndarray:
        probs = self.probabilities_from_margins(margins)
        if self._answer_t is None:
            return probs
        if block is None:
            raise ValueError("this model's answer head reads the graph's block output: pass embed()'s second value")
        head = self.probabilities_from_margins(np.asarray(block, np.float64) @ self._answer_t
                                               + self.spec.answer_intercepts)
        return answer.answer_probabilities(probs, head, self.spec.rule)

    def answers(self, features: np.ndarray, block: np.ndarray | None = None):
        """(PCA projection, class probabilities, ``answer.Answers``) of ``embed``'s output: the decision the Spark
        AnswerModel makes."""
        projected = self.project(features)
        margins = self.margins(features, projected)
        probs = self._answer_probabilities(margins, block)
        return projected, probs, answer.decide(probs, margins, features, self.spec.rule)

    def predict_rgb(self, rgbs: list[np.ndarray]) -> list[Prediction]:
        if not rgbs:
            return []
        projected, probs, a = self.answers(*self.embed(rgbs))
        return [
            Prediction(image_id=pixel_id(rgb), label=a.prediction[i], probability=float(a.probability[i]),
                       top5=[(str(c), float(p)) for c, p in a.top5[i]], probabilities=probs[i],
                       family=a.family[i], family_probability=float(a.family_probability[i]),
                       unknown=bool(a.unknown[i]), energy=float(a.energy[i]), fruitness=float(a.fruitness[i]),
                       projection=projected[i])
            for i, rgb in enumerate(rgbs)
        ]

    def predict_bytes(self, data: bytes) -> Prediction:
        """One encoded image -> Prediction; raises images.BadImage for unusable bytes."""
        return self.predict_rgb([self.decode(data)])[0]

    def warm_up(self) -> float:
        """One inference on a blank image so the first request does not pay ORT's lazy set-up; seconds."""
        t0 = time.perf_counter()
        self.predict_rgb([np.full((100, 100, 3), 255, np.uint8)])
        return time.perf_counter() - t0
