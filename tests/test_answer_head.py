"""The answer head of a studio-only model (``train._fit_answer_head``): a second classifier on the CNN's last block
answers; the "unknown" rule stays on the main head. Models with family-labelled photos, and ``answer_head=False``,
keep one head; both kinds share one feature store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from canestra.config import Settings
from canestra.progress import Progress
from canestra.serve.predictor import OnlinePredictor


def _classifiers(model_dir: str) -> list:
    from pyspark.ml import PipelineModel
    from pyspark.ml.classification import LogisticRegressionModel

    return [s for s in PipelineModel.load(model_dir).stages if isinstance(s, LogisticRegressionModel)]


def test_studio_only_model_answers_from_the_block_head_in_spark_and_online(spark, trained, sample_dir):
    from pyspark.ml import PipelineModel

    model_dir = str(Path(trained.out_dir) / "model")
    model = PipelineModel.load(model_dir)
    assert [c.getFeaturesCol() for c in _classifiers(model_dir)] == ["pca", "block"]
    assert model.stages[-1].getOrDefault("headProbabilityCol") == "answer_probability"
    assert model.stages[-1].getRule().head_weight == 0.5
    assert "last block" in trained.metrics["model"]["answer_head"]
    assert json.loads((Path(model_dir) / "canestra_model.json").read_text())["model_format"] == 2

    files = sorted(sample_dir.glob("*/*.jpg"))[::8]
    df = spark.createDataFrame([(str(f), f.read_bytes()) for f in files], "path string, content binary")
    rows = model.transform(df).select("path", "predicted_label", "predicted_probability", "answer_probability",
                                      "probability").collect()
    answered = [r for r in rows if r.predicted_label != "unknown"]
    assert len(answered) >= 0.9 * len(rows)
    # The answer is the most probable variety of the two heads' probabilities averaged (every class is a variety)
    # ... which are not the main head's alone: the two heads differ.
    mixed = [(r.answer_probability.toArray() + r.probability.toArray()) / 2 for r in answered]
    for r, p in zip(answered, mixed):
        assert r.predicted_probability == pytest.approx(float(p.max()), abs=1e-12)
    assert any(abs(r.predicted_probability - float(np.max(r.probability.toArray()))) > 1e-6 for r in answered)
    assert sum(Path(r.path).parent.name == r.predicted_label for r in rows) >= 0.9 * len(rows)

    online = OnlinePredictor.from_model_dir(model_dir, threads=1)
    for r in rows:
        p = online.predict_bytes(Path(r.path).read_bytes())
        assert p.label == r.predicted_label
        assert p.probability == pytest.approx(r.predicted_probability, abs=1e-9)


def test_without_the_answer_head_one_classifier_and_the_same_feature_store(spark, trained, sample_dir, tmp_path):
    """The studio sample with answer_head=False, its feature store copied from the two-head run: no image is
    embedded again (the store keeps the block output for every model). A model with family-labelled photos has
    one head too (tests/test_outside_studio.py)."""
    from canestra.pipeline.train import train

    out = tmp_path / "one-head"
    out.mkdir()
    shutil.copytree(Path(trained.out_dir) / "feature_store", out / "feature_store")
    res = train(spark, str(sample_dir), str(out), Settings.load(pca_k=32, max_iter=30, answer_head=False),
                Progress(quiet=True))
    assert res.metrics["feature_store"]["featurized"] == 0 and res.metrics["feature_store"]["reused"] > 0
    model_dir = str(out / "model")
    assert [c.getFeaturesCol() for c in _classifiers(model_dir)] == ["pca"]
    assert res.metrics["model"]["answer_head"] is None
    assert json.loads((Path(model_dir) / "canestra_model.json").read_text())["model_format"] == 1
    image = sorted((sample_dir / "Lemon").glob("*.jpg"))[0].read_bytes()
    assert OnlinePredictor.from_model_dir(model_dir, threads=1).predict_bytes(image).label == "Lemon"


def test_an_answer_stage_that_does_not_read_the_head_is_refused_plainly(trained, tmp_path):
    from canestra.errors import InputError
    from canestra.serve.predictor import load_model_spec

    model = tmp_path / "model"
    shutil.copytree(Path(trained.out_dir) / "model", model)
    meta = next(next((model / "stages").glob("4_AnswerModel*")).glob("metadata/part-*"))
    doc = json.loads(meta.read_text())
    doc["paramMap"]["headProbabilityCol"] = ""  # the head is there, the answer stage no longer mixes it in
    meta.write_text(json.dumps(doc) + "\n")
    with pytest.raises(InputError, match="the stages do not fit together .*answer head"):
        load_model_spec(str(model))
