"""canestra: fruit-image classification on Apache Spark.

The Python API (docs/python-api.md)::

    import canestra
    run = canestra.train("fruits-360", "runs/1", pca_k=32)   # TrainRun: .metrics, .model_path, .load()
    canestra.predict(run.model_path, "new-photos", "runs/1-pred").to_pandas()

``import canestra`` stays cheap: the names below are resolved on first use (module
``__getattr__``), so Spark, ONNX Runtime and pandas load only when a function runs.
The CLI (``canestra <command>``) is a thin layer over the same functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "train": "canestra.api",
    "predict": "canestra.api",
    "evaluate": "canestra.api",
    "ingest": "canestra.api",
    "load_model": "canestra.api",
    "watch": "canestra.api",
    "WatchRun": "canestra.api",
    "TrainRun": "canestra.api",
    "Predictions": "canestra.api",
    "Evaluation": "canestra.api",
    "IngestRun": "canestra.api",
    "ImageFeaturizer": "canestra.featurizer",
    "OnlinePredictor": "canestra.serve.predictor",
    "Prediction": "canestra.serve.predictor",
    "Settings": "canestra.config",
    "CanestraError": "canestra.errors",
    "InputError": "canestra.errors",
    "OutputError": "canestra.errors",
    "EnvironmentProblem": "canestra.errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # static type checkers and IDEs see the real objects ("X as X": a re-export)
    from canestra.api import Evaluation as Evaluation
    from canestra.api import IngestRun as IngestRun
    from canestra.api import Predictions as Predictions
    from canestra.api import TrainRun as TrainRun
    from canestra.api import WatchRun as WatchRun
    from canestra.api import evaluate as evaluate
    from canestra.api import ingest as ingest
    from canestra.api import load_model as load_model
    from canestra.api import predict as predict
    from canestra.api import train as train
    from canestra.api import watch as watch
    from canestra.config import Settings as Settings
    from canestra.errors import CanestraError as CanestraError
    from canestra.errors import EnvironmentProblem as EnvironmentProblem
    from canestra.errors import InputError as InputError
    from canestra.errors import OutputError as OutputError
    from canestra.featurizer import ImageFeaturizer as ImageFeaturizer
    from canestra.serve.predictor import OnlinePredictor as OnlinePredictor
    from canestra.serve.predictor import Prediction as Prediction


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'canestra' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
