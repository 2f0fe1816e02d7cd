"""A model saved by canestra 0.1.0, before the package re-layout, still loads and predicts.

tests/fixtures/model-0.1.0 was written by `canestra train --images sample/fruits-360 --pca-k 8
--image-size 100` with the flat layout: its metadata names `canestra.featurizer.ImageFeaturizer`
and `canestra.answer_stage.AnswerModel`.
"""

from __future__ import annotations

import json
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "model-0.1.0"


def _stage_classes() -> list[str]:
    return [json.loads(p.read_text().splitlines()[0])["class"]
            for p in sorted(FIXTURE.glob("stages/*/metadata/part-*"))]


def test_fixture_names_the_old_module_paths():
    classes = _stage_classes()
    assert "canestra.featurizer.ImageFeaturizer" in classes
    assert "canestra.answer_stage.AnswerModel" in classes


def test_old_model_loads_and_predicts_in_spark(spark, sample_dir):
    from pyspark.ml import PipelineModel

    model = PipelineModel.load(str(FIXTURE))
    df = spark.read.format("binaryFile").load(str(sample_dir / "Kiwi"))
    rows = model.transform(df).select("predicted_label").collect()
    assert len(rows) == 32
    assert sum(r.predicted_label == "Kiwi" for r in rows) >= 28


def test_old_model_serves_online(sample_dir):
    from canestra.serve.predictor import OnlinePredictor

    predictor = OnlinePredictor.from_model_dir(str(FIXTURE), threads=1)
    images = sorted((sample_dir / "Banana").glob("*.jpg"))[:8]
    answers = [predictor.predict_bytes(p.read_bytes()) for p in images]
    assert sum(a.label == "Banana" for a in answers) >= 7
