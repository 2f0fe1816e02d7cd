"""The Spark-free predictor gives the same answers as `canestra predict` on Spark."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from canestra.errors import InputError
from canestra.online import OnlinePredictor, load_model_spec, spark_matrix, spark_vector
from canestra.progress import Progress

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(trained) -> str:
    return os.path.join(trained.out_dir, "model")


@pytest.fixture(scope="module")
def spark_predictions(spark, trained, sample_dir, tmp_path_factory, model_dir) -> dict[str, dict]:
    """`canestra predict` (Spark) on the 320 real sample images, keyed by image_id."""
    import pyarrow.parquet as pq

    from canestra.prediction import predict

    out = tmp_path_factory.mktemp("spark-predict")
    res = predict(spark, model_dir, str(sample_dir), str(out), Progress(quiet=True))
    rows = pq.read_table(res.predictions_path).to_pylist()
    assert res.predicted == 320 and res.quarantined == 0
    return {r["image_id"]: r for r in rows}


def sample_files(sample_dir: Path) -> list[Path]:
    return sorted(p for p in sample_dir.rglob("*") if p.is_file() and not p.name.startswith("."))


def test_same_answers_as_spark_predict(spark_predictions, sample_dir, model_dir):
    """Every image: same image_id, same top-1 class, probabilities within 1e-4 (top-1 and the top-5 list)."""
    predictor = OnlinePredictor.from_model_dir(model_dir, threads=1)
    files = sample_files(sample_dir)
    assert len(files) == 320
    max_delta, agree_with_folder = 0.0, 0
    for path in files:
        online = predictor.predict_bytes(path.read_bytes())
        spark_row = spark_predictions[online.image_id]  # KeyError = a different image_id
        assert online.label == spark_row["prediction"], path
        max_delta = max(max_delta, abs(online.probability - spark_row["probability"]))
        spark_top5 = json.loads(spark_row["top5"])
        if [c for c, _ in online.top5] != [c for c, _ in spark_top5]:  # only allowed between near-ties
            assert np.allclose([p for _, p in online.top5], [p for _, p in spark_top5], atol=1e-4), path
        spark_p = dict(spark_top5)
        for cls, p in online.top5:
            if cls in spark_p:  # top5 in predictions is rounded to 6 decimals
                max_delta = max(max_delta, abs(p - spark_p[cls]))
        assert abs(online.probabilities.sum() - 1) < 1e-9
        agree_with_folder += online.label == path.parent.name
    print(f"\nonline vs Spark on {len(files)} images: top-1 equal on all, max |dp| = {max_delta:.2e}")
    assert max_delta <= 1e-4
    assert agree_with_folder >= 0.95 * len(files)  # and the answers are right, not just equal


def test_batch_and_single_agree(sample_dir, model_dir):
    predictor = OnlinePredictor.from_model_dir(model_dir, threads=1)
    files = sample_files(sample_dir)[::40]
    rgbs = [predictor.decode(p.read_bytes()) for p in files]
    batch = predictor.predict_rgb(rgbs)
    single = [predictor.predict_rgb([r])[0] for r in rgbs]
    for b, s in zip(batch, single):
        assert b.label == s.label and b.image_id == s.image_id
        assert np.max(np.abs(b.probabilities - s.probabilities)) < 1e-5


def test_model_facts_read_without_spark(model_dir, trained):
    spec = load_model_spec(model_dir)
    metrics = json.loads(Path(trained.out_dir, "metrics.json").read_text())
    assert spec.labels == sorted(os.listdir(ROOT / "sample" / "fruits-360"))
    assert spec.pca.shape == (1280, metrics["pca"]["k"])
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
    (lr_data,) = (copy / "stages").glob("*LogisticRegression*/data/*.parquet")
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


def test_predicts_in_a_process_where_spark_cannot_be_imported(model_dir, sample_dir, tmp_path):
    """Serving needs no Spark: block `import pyspark`, then classify an image with the predictor and
    through the HTTP app, and check that `canestra serve` gets as far as reading the model."""
    image = next((sample_dir / "Banana").glob("*.jpg"))
    code = (
        "import sys; sys.modules['pyspark'] = None\n"  # any `import pyspark...` now raises ImportError
        "from canestra.online import OnlinePredictor\n"
        f"p = OnlinePredictor.from_model_dir({model_dir!r}, threads=1)\n"
        f"data = open({str(image)!r}, 'rb').read()\n"
        "print(p.predict_bytes(data).label)\n"
        "from fastapi.testclient import TestClient\n"
        "from canestra.server import create_app\n"
        "with TestClient(create_app(predictor=p)) as c:\n"
        "    print(c.post('/v1/predict', content=data).json()['prediction'])\n"
        "from canestra.cli import main\n"  # the CLI path up to the model check (a missing folder: exit 2)
        f"print(main(['serve', '--model', {str(tmp_path / 'missing')!r}]))\n"
    )
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}  # the CLI's audit record goes there
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["Banana", "Banana", "2"], out.stdout + out.stderr[-2000:]
    assert "model folder" in out.stderr and "ImportError" not in out.stderr


def test_int8_model_same_answers_as_spark(spark, sample_dir, tmp_path):
    """A model trained with --precision int8 serves with the int8 graph too (same answers)."""
    import pyarrow.parquet as pq

    from canestra.config import Settings
    from canestra.prediction import predict
    from canestra.training import train

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
        row = spark_rows[online.image_id]
        assert online.label == row["prediction"] and abs(online.probability - row["probability"]) <= 1e-4, path
