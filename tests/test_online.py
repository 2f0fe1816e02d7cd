"""The Spark-free predictor gives the same answers as `canestra predict` on Spark."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from canestra.answer.taxonomy import UNKNOWN
from canestra.errors import InputError
from canestra.progress import Progress
from canestra.serve.predictor import OnlinePredictor, Prediction, load_model_spec, spark_matrix, spark_vector
from canestra.vision import backbone

ROOT = Path(__file__).resolve().parents[1]
SKIMAGE_PHOTOS = ("chelsea.png", "rocket.jpg", "motorcycle_left.png", "coffee.png")  # cat, rocket, motorbike, cup


def skimage_photo(name: str) -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data" / name


NON_FRUIT = {*SKIMAGE_PHOTOS, "gradient.png", "checkerboard.png"}


def non_fruit_pngs() -> dict[str, bytes]:
    """Made-up pictures: a colour gradient and a checkerboard (PNG bytes)."""
    ramp = np.linspace(0, 255, 240).astype(np.uint8)
    gradient = np.stack([np.tile(ramp, (180, 1)), np.tile(ramp[::-1], (180, 1)),
                         np.tile(np.linspace(0, 255, 180).astype(np.uint8)[:, None], (1, 240))], axis=-1)
    board = ((np.indices((160, 160)) // 20).sum(axis=0) % 2 * 255).astype(np.uint8)
    out = {}
    for name, pixels in (("gradient.png", gradient), ("checkerboard.png", np.stack([board] * 3, axis=-1))):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        out[name] = buf.getvalue()
    return out


def assert_same_answer(online: Prediction, row: dict, rule, where) -> None:
    """The online answer equals Spark's predictions row: prediction (variety or unknown), family and
    family_probability. The `unknown` decision may only differ for an image whose score lies within
    rounding noise of its threshold (the two sides compute the margins with different BLAS)."""
    near = ((rule.energy_threshold is not None and abs(online.energy - rule.energy_threshold) < 1e-6)
            or (rule.fruitness_threshold is not None and abs(online.fruitness - rule.fruitness_threshold) < 1e-6))
    if (row["prediction"] == UNKNOWN) != online.unknown and near:
        return
    assert online.unknown == (row["prediction"] == UNKNOWN), (where, online, row)
    assert online.label == row["prediction"], where
    assert online.family == row["family"], where
    assert (online.family == "") == online.unknown, where
    assert abs(online.family_probability - row["family_probability"]) <= 1e-4, where
    assert abs(online.probability - row["probability"]) <= 1e-4, where


@pytest.fixture(scope="module")
def model_dir(trained) -> str:
    return os.path.join(trained.out_dir, "model")


@pytest.fixture(scope="module")
def spark_predictions(spark, trained, sample_dir, tmp_path_factory, model_dir) -> dict[str, dict]:
    """`canestra predict` (Spark) on the 320 real sample images, keyed by image_id."""
    import pyarrow.parquet as pq

    from canestra.pipeline.predict import predict

    out = tmp_path_factory.mktemp("spark-predict")
    res = predict(spark, model_dir, str(sample_dir), str(out), Progress(quiet=True))
    rows = pq.read_table(res.predictions_path).to_pylist()
    assert res.predicted == 320 and res.quarantined == 0
    return {r["image_id"]: r for r in rows}


def sample_files(sample_dir: Path) -> list[Path]:
    return sorted(p for p in sample_dir.rglob("*") if p.is_file() and not p.name.startswith("."))


def test_same_answers_as_spark_predict(spark_predictions, sample_dir, model_dir):
    """Every image: same image_id, same answer (variety or unknown), family and family probability;
    probabilities within 1e-4 (top-1, family and the top-5 list)."""
    predictor = OnlinePredictor.from_model_dir(model_dir, threads=1)
    rule = predictor.spec.rule
    files = sample_files(sample_dir)
    assert len(files) == 320
    max_delta, agree_with_folder, unknown = 0.0, 0, 0
    for path in files:
        online = predictor.predict_bytes(path.read_bytes())
        spark_row = spark_predictions[online.image_id]  # KeyError = a different image_id
        assert {"prediction", "probability", "family", "family_probability", "top5"} <= set(spark_row)
        assert_same_answer(online, spark_row, rule, path)
        max_delta = max(max_delta, abs(online.probability - spark_row["probability"]),
                        abs(online.family_probability - spark_row["family_probability"]))
        spark_top5 = json.loads(spark_row["top5"])
        if [c for c, _ in online.top5] != [c for c, _ in spark_top5]:  # only allowed between near-ties
            assert np.allclose([p for _, p in online.top5], [p for _, p in spark_top5], atol=1e-4), path
        spark_p = dict(spark_top5)
        for cls, p in online.top5:
            if cls in spark_p:  # both round top5 to 6 decimals
                max_delta = max(max_delta, abs(p - spark_p[cls]))
        assert abs(online.probabilities.sum() - 1) < 1e-9
        agree_with_folder += online.label == path.parent.name
        unknown += online.unknown
        if not online.unknown:  # the bundled classes are each their own family's only class here
            assert online.family == predictor.spec.rule.families[predictor.labels.index(online.label)]
    print(f"\nonline vs Spark on {len(files)} images: same answers on all ({unknown} unknown), "
          f"max |dp| = {max_delta:.2e}")
    assert max_delta <= 1e-4
    assert agree_with_folder >= 0.9 * len(files)  # and the answers are right, not just equal
    assert unknown <= 0.05 * len(files)  # the unknown rule refuses few real fruit photos


@pytest.fixture(scope="module")
def odd_photos(tmp_path_factory, sample_dir) -> Path:
    """Non-square photos (the featurizer crops them) and non-fruit pictures, unlabelled, in one folder."""
    folder = tmp_path_factory.mktemp("odd-photos")
    for name in SKIMAGE_PHOTOS:
        shutil.copy(skimage_photo(name), folder / name)
    for name, data in non_fruit_pngs().items():
        (folder / name).write_bytes(data)
    # Fruit photos made non-square: a wide strip (white margins) and a tall one (squashed).
    for cls, size in (("Banana", (180, 100)), ("Kiwi", (100, 150)), ("Strawberry", (100, 160))):
        src = sorted((sample_dir / cls).glob("*.jpg"))[7]
        im = Image.open(src).convert("RGB")
        canvas = Image.new("RGB", (max(size[0], 100), max(size[1], 100)), "white")
        canvas.paste(im, ((canvas.width - 100) // 2, (canvas.height - 100) // 2))
        canvas.resize(size).save(folder / f"{cls}-{size[0]}x{size[1]}.png")
    return folder


def test_same_answers_as_spark_on_non_square_and_non_fruit_images(spark, model_dir, odd_photos, tmp_path):
    """Spark `canestra predict` and the online predictor on non-square photos (inputFit = crop on both
    sides) and on pictures of no fruit: same answers, and the non-fruit ones are `unknown`."""
    import pyarrow.parquet as pq

    from canestra.pipeline.predict import predict

    res = predict(spark, model_dir, str(odd_photos), str(tmp_path / "pred"), Progress(quiet=True))
    rows = {r["image_id"]: r for r in pq.read_table(res.predictions_path).to_pylist()}
    predictor = OnlinePredictor.from_model_dir(model_dir, threads=1)
    assert predictor.spec.input_fit == "crop"
    files = sorted(odd_photos.iterdir())
    assert res.predicted == len(files) == 9
    for path in files:
        online = predictor.predict_bytes(path.read_bytes())
        assert_same_answer(online, rows[online.image_id], predictor.spec.rule, path.name)
        if path.name in NON_FRUIT:
            assert online.unknown and online.label == UNKNOWN and online.family == "", (path.name, online)


def test_input_fit_is_the_models(model_dir, tmp_path):
    """The featurizer's inputFit reaches backbone.embed: crop = the centre square, squash = the whole frame."""
    rgb = np.asarray(Image.open(skimage_photo("chelsea.png")).convert("RGB"))
    assert rgb.shape[0] != rgb.shape[1]
    crop = OnlinePredictor.from_model_dir(model_dir, threads=1)
    h, w = rgb.shape[:2]
    s = min(h, w)
    centre = rgb[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    np.testing.assert_array_equal(crop.features([rgb]), crop.features([np.ascontiguousarray(centre)]))

    squashed = tmp_path / "model"
    shutil.copytree(model_dir, squashed)
    (meta,) = (squashed / "stages").glob("*ImageFeaturizer*/metadata/part-*")
    doc = json.loads(meta.read_text())
    doc["paramMap"]["inputFit"] = "squash"
    meta.write_text(json.dumps(doc) + "\n")
    squash = OnlinePredictor.from_model_dir(str(squashed), threads=1)
    assert squash.spec.input_fit == "squash"
    np.testing.assert_array_equal(squash.features([rgb]),
                                  backbone.embed([rgb], squash.spec.image_sizes, squash.onnx_path, 1, fit="squash"))
    assert not np.allclose(squash.features([rgb]), crop.features([rgb]))

    del doc["paramMap"]["inputFit"], doc["defaultParamMap"]["inputFit"]  # a model saved before the Param
    meta.write_text(json.dumps(doc) + "\n")
    assert load_model_spec(str(squashed)).input_fit == "crop"
    doc["paramMap"]["inputFit"] = "stretch"
    meta.write_text(json.dumps(doc) + "\n")
    with pytest.raises(InputError, match="inputFit 'stretch'"):
        load_model_spec(str(squashed))


def test_model_saved_before_the_answer_stage_still_serves(spark, model_dir, tmp_path, sample_dir):
    """Old layout (IndexToString last): families from the shipped taxonomy, never `unknown`."""
    from pyspark.ml import PipelineModel
    from pyspark.ml.feature import IndexToString

    from canestra.answer.taxonomy import load_taxonomy

    new = PipelineModel.load(model_dir)
    labels = new.stages[-1].labels()
    old_dir = str(tmp_path / "old-model")
    PipelineModel(stages=[*new.stages[:3], IndexToString(inputCol="prediction", outputCol="predicted_label",
                                                         labels=labels)]).write().save(old_dir)
    old = OnlinePredictor.from_model_dir(old_dir, threads=1)
    current = OnlinePredictor.from_model_dir(model_dir, threads=1)
    assert old.labels == labels
    assert old.spec.rule.families == load_taxonomy().families_of(labels)
    assert old.spec.rule.energy_threshold is None and old.spec.rule.fruitness_threshold is None
    for path in sample_files(sample_dir)[::32]:
        a = old.predict_bytes(path.read_bytes())
        assert not a.unknown and a.label == path.parent.name and a.family == load_taxonomy().family(a.label)
        # the old layout's classifier is the current model's main head (the answer head is a stage it lacks)
        main = current.probabilities_from_margins(current.margins(current.features([current.decode(path.read_bytes())])))
        np.testing.assert_allclose(a.probabilities, main[0], atol=1e-12)
    cat = old.predict_bytes(skimage_photo("chelsea.png").read_bytes())
    assert not cat.unknown and cat.label in labels  # no thresholds: the old behaviour


def test_batch_and_single_agree(sample_dir, model_dir):
    predictor = OnlinePredictor.from_model_dir(model_dir, threads=1)
    files = sample_files(sample_dir)[::40]
    rgbs = [predictor.decode(p.read_bytes()) for p in files]
    batch = predictor.predict_rgb(rgbs)
    single = [predictor.predict_rgb([r])[0] for r in rgbs]
    for b, s in zip(batch, single):
        assert b.label == s.label and b.image_id == s.image_id and b.family == s.family
        assert b.unknown == s.unknown
        assert np.max(np.abs(b.probabilities - s.probabilities)) < 1e-5


def test_model_facts_read_without_spark(model_dir, trained):
    spec = load_model_spec(model_dir)
    metrics = json.loads(Path(trained.out_dir, "metrics.json").read_text())
    assert spec.labels == sorted(os.listdir(ROOT / "sample" / "fruits-360")) == spec.rule.labels
    assert spec.rule.families[spec.labels.index("Apple Granny Smith")] == "Apple"
    assert spec.rule.families[spec.labels.index("Pepper Red")] == "Pepper"
    assert spec.families == sorted(set(spec.rule.families)) and "Apple" in spec.families
    # the unknown rule was calibrated at training time and saved with the model
    assert spec.rule.energy_threshold is not None and spec.rule.fruitness_threshold is not None
    assert spec.rule.imagenet_classes
    assert spec.input_fit == "crop"
    assert spec.pca.shape == (backbone.FEATURE_DIM * len(metrics["model"]["image_sizes"]), metrics["pca"]["k"])
    assert spec.coefficients.shape == (10, metrics["pca"]["k"]) and spec.multinomial
    assert spec.image_sizes == tuple(metrics["model"]["image_sizes"])
    assert spec.metrics["accuracy"] == metrics["accuracy"]
    assert spec.created_at and spec.created_at[:4].isdigit()
    assert len(spec.version) == 64 and spec.version == load_model_spec(model_dir).version


def test_version_changes_with_the_weights(model_dir, tmp_path):
    import pyarrow.parquet as pq

    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    before = load_model_spec(str(copy)).version
    lr_data = next((copy / "stages").glob("2_LogisticRegression*/data/*.parquet"))  # the main head
    table = pq.read_table(lr_data)
    rows = table.to_pylist()
    rows[0]["interceptVector"]["values"][0] += 1.0
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), lr_data)
    changed = load_model_spec(str(copy))
    assert changed.version != before
    assert changed.intercepts[0] == pytest.approx(load_model_spec(model_dir).intercepts[0] + 1.0)


def test_spark_matrix_layouts_match_pyspark():
    """Dense/sparse, transposed or not: the Parquet structs decode to pyspark's own toArray()."""
    from pyspark.ml.linalg import DenseMatrix, DenseVector, SparseMatrix, SparseVector

    def struct(m) -> dict:
        if isinstance(m, DenseMatrix):
            return {"type": 1, "numRows": m.numRows, "numCols": m.numCols, "colPtrs": None, "rowIndices": None,
                    "values": list(m.values), "isTransposed": m.isTransposed}
        return {"type": 0, "numRows": m.numRows, "numCols": m.numCols, "colPtrs": list(m.colPtrs),
                "rowIndices": list(m.rowIndices), "values": list(m.values), "isTransposed": m.isTransposed}

    dense = np.arange(12, dtype=float).reshape(3, 4) - 5
    cases = [
        DenseMatrix(3, 4, dense.T.ravel().tolist()),  # column-major
        DenseMatrix(3, 4, dense.ravel().tolist(), isTransposed=True),  # row-major
        SparseMatrix(3, 4, [0, 1, 1, 3, 4], [2, 0, 1, 2], [1.5, -2.0, 3.0, 4.0]),  # CSC
        SparseMatrix(3, 4, [0, 2, 2, 3], [0, 3, 1], [7.0, -1.0, 2.5], isTransposed=True),  # CSR
    ]
    for m in cases:
        np.testing.assert_array_equal(spark_matrix(struct(m)), m.toArray())
    np.testing.assert_array_equal(spark_vector({"type": 1, "size": None, "indices": None, "values": [1.0, 2.0]}),
                                  DenseVector([1.0, 2.0]).toArray())
    sv = SparseVector(5, [1, 3], [2.0, -1.0])
    np.testing.assert_array_equal(spark_vector({"type": 0, "size": 5, "indices": [1, 3], "values": [2.0, -1.0]}),
                                  sv.toArray())


def test_not_a_model_is_a_plain_error(tmp_path, model_dir):
    with pytest.raises(InputError, match="does not exist"):
        load_model_spec(str(tmp_path / "nope"))
    with pytest.raises(InputError, match="not a saved canestra model"):
        load_model_spec(str(tmp_path))
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    for d in (broken / "stages").glob("*PCA*"):
        shutil.rmtree(d)
    with pytest.raises(InputError, match="re-run `canestra train`"):
        load_model_spec(str(broken))

    for bad_rule in ("{not json", json.dumps({"labels": ["A"], "families": []}), json.dumps([1, 2]),
                     json.dumps({"labels": ["A", "B"], "families": ["A", "B"], "imagenet_classes": [5000]})):
        spoilt = tmp_path / f"spoilt-{abs(hash(bad_rule))}"
        shutil.copytree(model_dir, spoilt)
        (meta,) = (spoilt / "stages").glob("*AnswerModel*/metadata/part-*")
        doc = json.loads(meta.read_text())
        doc["paramMap"]["rule"] = bad_rule
        meta.write_text(json.dumps(doc) + "\n")
        with pytest.raises(InputError, match="AnswerModel stage has no usable decision rule"):
            load_model_spec(str(spoilt))
    shutil.rmtree(broken)
    shutil.copytree(model_dir, broken)
    for d in (broken / "stages").glob("*AnswerModel*"):
        shutil.rmtree(d)
    with pytest.raises(InputError, match="re-run `canestra train`"):
        load_model_spec(str(broken))


def test_predicts_in_a_process_where_spark_cannot_be_imported(model_dir, sample_dir, tmp_path):
    """Serving needs no Spark: block `import pyspark`, then classify an image with the predictor and
    through the HTTP app, and check that `canestra serve` gets as far as reading the model."""
    image = next((sample_dir / "Banana").glob("*.jpg"))
    code = (
        "import sys; sys.modules['pyspark'] = None\n"  # any `import pyspark...` now raises ImportError
        "from canestra.serve.predictor import OnlinePredictor\n"
        f"p = OnlinePredictor.from_model_dir({model_dir!r}, threads=1)\n"
        f"data = open({str(image)!r}, 'rb').read()\n"
        "r = p.predict_bytes(data)\n"
        "print(r.label, r.family)\n"
        f"cat = open({str(skimage_photo('chelsea.png'))!r}, 'rb').read()\n"
        "print(p.predict_bytes(cat).label)\n"  # the unknown rule (ImageNet head) needs no Spark either
        "from fastapi.testclient import TestClient\n"
        "from canestra.serve.app import create_app\n"
        "with TestClient(create_app(predictor=p)) as c:\n"
        "    body = c.post('/v1/predict', content=data).json()\n"
        "    print(body['prediction'], body['family'])\n"
        "from canestra.cli import main\n"  # the CLI path up to the model check (a missing folder: exit 2)
        f"print(main(['serve', '--model', {str(tmp_path / 'missing')!r}]))\n"
    )
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}  # the CLI's audit record goes there
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["Banana", "Banana", "unknown", "Banana", "Banana", "2"], \
        out.stdout + out.stderr[-2000:]
    assert "model folder" in out.stderr and "ImportError" not in out.stderr


def test_int8_model_same_answers_as_spark(spark, sample_dir, tmp_path):
    """A model trained with --precision int8 serves with the int8 graph too (same answers)."""
    import pyarrow.parquet as pq

    from canestra.config import Settings
    from canestra.pipeline.predict import predict
    from canestra.pipeline.train import train

    res = train(spark, str(sample_dir), str(tmp_path / "run"), Settings.load(precision="int8", pca_k=32, max_iter=30),
                Progress(quiet=True))
    assert res.metrics["model"]["precision"] == "int8" and res.metrics["accuracy"] >= 0.9
    model = os.path.join(res.out_dir, "model")
    spec = load_model_spec(model)
    assert spec.precision == "int8"
    pred = predict(spark, model, str(sample_dir), str(tmp_path / "pred"), Progress(quiet=True))
    spark_rows = {r["image_id"]: r for r in pq.read_table(pred.predictions_path).to_pylist()}
    predictor = OnlinePredictor.from_model_dir(model, threads=1)
    assert "int8" in predictor.onnx_path
    for path in sample_files(sample_dir)[::4]:
        online = predictor.predict_bytes(path.read_bytes())
        assert_same_answer(online, spark_rows[online.image_id], spec.rule, path)
