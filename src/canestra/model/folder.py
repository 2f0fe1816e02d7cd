"""What a saved canestra model folder must hold: one check for predict, evaluate and serve.

``canestra train`` writes ``model/canestra_model.json`` (canestra version, model format
version, stage classes) next to Spark's ``metadata/`` and ``stages/``. Models written
before it existed (canestra 0.1.0) have no such file and are still accepted; a model
whose format is newer than this canestra reads is refused with both versions named.
The checks read only small files (JSON lines, Parquet footers), so a broken model
fails in well under a second, before any JVM starts, naming the missing stage or the
unreadable file.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable
from typing import Any

from canestra import __version__
from canestra.errors import InputError
from canestra.layout import MODEL_INFO, TRAINING_IDS
from canestra.storage import files as storage

# Bump when a saved model stops being readable by older canestra versions. 2: a studio-only model's answer head
# (a second LogisticRegressionModel, on the graph's block output); models without one are still written as 1.
MODEL_FORMAT = 2
# Inside a model folder: its held-out answers in summary and the drift thresholds (canestra.drift.stats);
# aggregates only, no image id. Models trained before it have none (canestra monitor says so).
DRIFT_REFERENCE = "canestra_drift_reference.json"
_RETRAIN = "re-run `canestra train`"
# Stage classes that hold fitted data (Spark writes it under stages/<i>_<uid>/data/).
_WITH_DATA = ("PCAModel", "LogisticRegressionModel")


def write_model_info(model_dir: str, stages: list[Any]) -> str:
    """Write ``canestra_model.json`` into a (staging) model folder; returns its path."""
    heads = sum(type(s).__name__ == "LogisticRegressionModel" for s in stages)
    info = {
        "canestra_version": __version__,
        "model_format": MODEL_FORMAT if heads > 1 else 1,  # older canestra versions still read one-head models
        "stages": [f"{type(s).__module__}.{type(s).__name__}" for s in stages],
    }
    path = os.path.join(model_dir, MODEL_INFO)
    storage.write_text_atomic(path, json.dumps(info, indent=2) + "\n")
    return path


def _read_info(text: str, where: str) -> dict[str, Any]:
    try:
        info = json.loads(text)
        fmt = int(info["model_format"])
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"{where} is unreadable ({type(exc).__name__}: {str(exc)[:120]}): the model folder is "
                         f"damaged; {_RETRAIN}") from None
    if fmt > MODEL_FORMAT:
        raise InputError(
            f"the model in {os.path.dirname(where)} was written by canestra {info.get('canestra_version', '?')} "
            f"(model format {fmt}); this canestra {__version__} reads model format {MODEL_FORMAT} at most: "
            f"upgrade canestra, or {_RETRAIN} with this version")
    info["model_format"] = fmt
    return info


def model_info(path: str) -> dict[str, Any] | None:
    """The model's ``canestra_model.json`` (checked), or None for models written before it existed."""
    where = path.rstrip("/") + "/" + MODEL_INFO
    text = storage.read_text(where)
    return None if text is None else _read_info(text, where)


def _json_line(folder: str, what: str) -> dict[str, Any]:
    """The first line of Spark's ``<folder>/metadata/part-*`` as JSON; InputError naming the file."""
    parts = sorted(glob.glob(os.path.join(folder, "metadata", "part-*")))
    if not parts:
        raise InputError(f"{what} is incomplete: {os.path.join(folder, 'metadata')} has no part-* file; {_RETRAIN}")
    try:
        with open(parts[0], encoding="utf-8") as fh:
            meta = json.loads(fh.readline())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        return meta
    except (OSError, ValueError) as exc:
        raise InputError(f"{what}: {parts[0]} is unreadable ({str(exc)[:120]}); {_RETRAIN}") from None


def _check_data(stage_dir: str, what: str) -> None:
    import pyarrow.parquet as pq

    data = sorted(glob.glob(os.path.join(stage_dir, "data", "*.parquet")))
    if not data:
        raise InputError(f"{what} has no fitted data ({os.path.join(stage_dir, 'data')} holds no .parquet file): "
                         f"{_RETRAIN}")
    for f in data:
        try:
            pq.read_metadata(f)
        except Exception as exc:  # truncated or overwritten file: pyarrow says ArrowInvalid/OSError
            raise InputError(f"{what}: {f} is unreadable ({str(exc).splitlines()[0][:120]}); {_RETRAIN}") from None


def check_model_dir(path: str, *, local_only: bool = False) -> str:
    """Check a model folder before loading it; return its local path (or its s3:// URI).

    ``local_only`` (serving reads the files itself): refuse object-storage URIs.
    """
    if storage.is_remote(path):
        if local_only:
            raise InputError(f"{path}: serve a local model folder (copy it from object storage first)")
        # s3://: Spark loads it (EMRFS on EMR); check what can be checked cheaply.
        if not storage.is_dir(path.rstrip("/") + "/metadata"):
            raise InputError(f"{path} is not a saved canestra model (no metadata/): pass the model/ folder "
                             "written by `canestra train`")
        model_info(path)
        return path.rstrip("/")
    local = storage.local_path(path)
    if not os.path.isdir(local):
        raise InputError(f"model folder {local} does not exist: pass the model/ folder written by `canestra train`")
    absent = [d for d in ("metadata", "stages") if not os.path.isdir(os.path.join(local, d))]
    if len(absent) == 2:
        raise InputError(f"{local} is not a saved canestra model (no metadata/ and stages/): "
                         "pass the model/ folder written by `canestra train`")
    if absent:
        raise InputError(f"the model in {local} is incomplete: {absent[0]}/ is missing; {_RETRAIN}")
    info = model_info(local)
    uids = (_json_line(local, f"the model in {local}").get("paramMap") or {}).get("stageUids") or []
    if not uids:
        raise InputError(f"the model in {local} lists no stages in metadata/; {_RETRAIN}")
    listed = (info or {}).get("stages") or []
    for i, uid in enumerate(uids):
        name = listed[i].rsplit(".", 1)[-1] if i < len(listed) else uid.split("_", 1)[0]
        what = f"the model in {local}: stage {i} ({name})"
        # Spark names stage folders <index>_<uid>, the index zero-padded in long pipelines.
        found = [d for d in glob.glob(os.path.join(local, "stages", f"*_{uid}")) if os.path.isdir(d)]
        if not found:
            raise InputError(f"{what} is missing (no stages/{i}_{uid}/); {_RETRAIN}")
        stage_dir = found[0]
        cls = str(_json_line(stage_dir, what).get("class", ""))
        if cls.rsplit(".", 1)[-1] in _WITH_DATA:
            _check_data(stage_dir, what)
    return local


def write_training_ids(model_dir: str, image_ids: Iterable[str], sorted_unique: bool = False) -> str:
    """List the ids a model was fitted on inside its folder, so erasure can say when to retrain.

    ``sorted_unique``: the ids already come sorted without repeats (e.g. from a Spark sort) and
    are streamed to the file, never all held in memory."""
    path = os.path.join(model_dir, TRAINING_IDS)
    ids = image_ids if sorted_unique else sorted(set(image_ids))
    storage.write_lines_atomic(path, (i + "\n" for i in ids))
    return path


def read_training_ids(model_dir: str) -> set[str] | None:
    """The ids a model was trained on; None when the model does not list them (older models)."""
    try:
        with open(os.path.join(model_dir, TRAINING_IDS), encoding="ascii") as fh:
            return {line.strip() for line in fh if line.strip()}
    except FileNotFoundError:
        return None


def write_drift_reference(model_dir: str, reference: dict[str, Any]) -> str:
    """Write the drift reference (a JSON object, ``canestra.drift.stats.Reference.to_json()``) into a model folder."""
    path = model_dir.rstrip("/") + "/" + DRIFT_REFERENCE
    storage.write_text_atomic(path, json.dumps(reference, indent=1, allow_nan=False) + "\n")
    return path


def read_drift_reference(model_dir: str) -> dict[str, Any] | None:
    """The model's drift reference as JSON, None when it has none (trained before canestra stored it);
    InputError when the file is there but unreadable."""
    where = model_dir.rstrip("/") + "/" + DRIFT_REFERENCE
    text = storage.read_text(where)
    if text is None:
        return None
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{where} is unreadable (not JSON: {str(exc)[:120]}): {_RETRAIN}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{where} is unreadable (not a JSON object): {_RETRAIN}")
    return raw
