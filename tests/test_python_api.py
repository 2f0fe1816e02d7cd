"""The public Python API (``import canestra``): cheap to import, every exported name resolves,
keyword overrides are validated, and library calls write the same GDPR audit records as the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import canestra
from canestra.privacy import audit


@pytest.fixture(autouse=True)
def isolated_logs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("CANESTRA_AUDIT_LOG", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("CANESTRA_ACTOR", "notebook-user")


def test_import_canestra_loads_no_heavy_module():
    code = ("import sys, canestra; canestra.Settings; canestra.InputError; "
            "print(sorted(m for m in ('pyspark', 'pandas', 'numpy', 'onnxruntime', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_every_exported_name_resolves():
    from canestra import errors
    from canestra.featurizer import ImageFeaturizer
    from canestra.serve.predictor import OnlinePredictor

    expected = {"train", "predict", "evaluate", "ingest", "load_model", "watch", "ImageFeaturizer", "OnlinePredictor",
                "Settings", "CanestraError", "InputError", "OutputError", "EnvironmentProblem"}
    assert expected <= set(canestra.__all__)
    for name in canestra.__all__:
        assert getattr(canestra, name) is not None, name
    assert canestra.ImageFeaturizer is ImageFeaturizer and canestra.OnlinePredictor is OnlinePredictor
    assert canestra.InputError is errors.InputError and issubclass(canestra.OutputError, canestra.CanestraError)
    for fn in ("train", "predict", "evaluate", "ingest", "load_model", "watch"):
        assert callable(getattr(canestra, fn)) and getattr(canestra, fn).__doc__
    with pytest.raises(AttributeError):
        canestra.no_such_name  # noqa: B018
    assert "train" in dir(canestra)


def test_typed_results_report_their_files(tmp_path):
    from canestra.api import Predictions, TrainRun

    run = TrainRun(str(tmp_path), {"accuracy": 0.75})
    assert run.model_path == str(tmp_path / "model") and run.report_path == str(tmp_path / "report.html")
    assert run.accuracy == 0.75
    (tmp_path / "predictions.csv").write_text("image_id,prediction,probability\nab12,Banana,0.9\ncd34,unknown,0.4\n")
    preds = Predictions(str(tmp_path), 2, 0, ["Banana"])
    assert preds.predictions_path == str(tmp_path / "predictions") and not preds.labelled
    df = preds.to_pandas()
    assert list(df["prediction"]) == ["Banana", "unknown"] and df["probability"].dtype.kind == "f"
    with pytest.raises(canestra.InputError, match="quarantine.csv"):
        preds.quarantine()


@pytest.mark.parametrize("overrides, message", [({"pca_k": 0}, "--pca-k"), ({"pca_kk": 3}, "unknown setting pca_kk"),
                                                ({"test_fraction": 1.5}, "--test-fraction")])
def test_bad_keyword_overrides_fail_plainly_and_are_audited(tmp_path, sample_dir, overrides, message):
    with pytest.raises(canestra.InputError, match=message):
        canestra.train(str(sample_dir), str(tmp_path / "out"), **overrides)
    assert not (tmp_path / "out").exists()  # nothing started, nothing written
    (rec,) = audit.read_records(str(tmp_path / "state" / "canestra" / "audit.jsonl"))
    assert rec["command"] == "train" and rec["status"] == "error" and rec["error"] == "InputError"


def test_a_watch_that_could_never_return_is_refused(tmp_path):
    """watch(once=False) without a stop event would block a notebook for good: refused, audited."""
    with pytest.raises(canestra.InputError, match="stop=threading.Event"):
        canestra.watch(str(tmp_path / "model"), str(tmp_path), str(tmp_path / "out"))
    (rec,) = audit.read_records(str(tmp_path / "state" / "canestra" / "audit.jsonl"))
    assert rec["command"] == "watch" and rec["status"] == "error"


def test_register_model_without_tracking_is_refused(tmp_path, sample_dir):
    with pytest.raises(canestra.InputError, match="register_model needs MLflow"):
        canestra.train(str(sample_dir), str(tmp_path / "out"), register_model="fruits", mlflow=False)


def test_library_failure_before_spark_is_audited(tmp_path):
    missing = tmp_path / "Mario Rossi" / "photos"
    log = tmp_path / "central.jsonl"
    with pytest.raises(canestra.InputError):
        canestra.train(str(missing), str(tmp_path / "out"), audit_log=str(log))
    (rec,) = audit.read_records(str(log))
    assert rec["command"] == "train" and rec["status"] == "error" and rec["exit_code"] == 2
    assert rec["actor"] == "notebook-user" and "Mario Rossi" not in json.dumps(rec)


def test_library_ingest_writes_the_cli_audit_record_once(spark, tmp_path, sample_dir):
    import shutil

    from canestra.cli.commands import main

    images = tmp_path / "images"  # 3 classes x 4 images: the record, not the volume, is under test
    for cls in sorted(p for p in sample_dir.iterdir() if p.is_dir())[:3]:
        (images / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:4]:
            shutil.copy2(f, images / cls.name / f.name)
    (images / sorted(p.name for p in images.iterdir())[0] / "notes.txt").write_text("not an image")
    lib_out = tmp_path / "lib"
    res = canestra.ingest(str(images), str(lib_out), spark=spark, quiet=True)
    assert isinstance(res, canestra.IngestRun) and (res.images, res.classes, res.quarantined) == (12, 3, 1)
    (bad,) = res.quarantine().itertuples()
    assert bad.path.endswith("notes.txt") and bad.reason  # the file and a plain reason
    assert res.to_spark(spark).count() == 12
    (lib_rec,) = audit.read_records(str(lib_out / "_audit" / "audit.jsonl"))

    cli_out = tmp_path / "cli"
    assert main(["ingest", "--images", str(images), "--out", str(cli_out), "--quiet"]) == 0
    (cli_rec,) = audit.read_records(str(cli_out / "_audit" / "audit.jsonl"))  # one record, not two

    for rec, out in ((lib_rec, lib_out), (cli_rec, cli_out)):
        assert rec["command"] == "ingest" and rec["status"] == "ok"
        assert rec["counts"] == {"images": 12, "classes": 3, "quarantined": 1}
        assert rec["outputs"] == [str(out / "catalog"), str(out / "quarantine.csv")]
    assert not (tmp_path / "state").exists()  # nothing fell back to the per-user log


@pytest.mark.slow
def test_the_wheel_ships_the_typing_marker_and_package_data(canestra_wheel):
    import zipfile

    names = set(zipfile.ZipFile(canestra_wheel).namelist())
    assert {"canestra/py.typed", "canestra/api.py", "canestra/tracking.py", "canestra/conf/taxonomy.csv",
            "canestra/conf/log4j2.properties", "canestra/serve/static/index.html", "canestra/serve/static/app.js",
            "canestra/serve/static/app.css"} <= names
    assert sum(n.startswith("canestra/calibration/") and n.endswith(".jpg") for n in names) >= 40
