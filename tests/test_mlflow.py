"""MLflow, the ecosystem's way (canestra/tracking.py), against a local file store (./mlruns style):
a training logs its settings, metrics, report and model folder; a registered version is served
by ``canestra serve --model models:/NAME/ALIAS``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mlflow", reason="the mlflow extra is not installed: pip install 'canestra[mlflow]'")

from mlflow import MlflowClient  # noqa: E402

from canestra import tracking  # noqa: E402
from canestra.cli.commands import main  # noqa: E402
from canestra.config import Settings  # noqa: E402
from canestra.errors import EnvironmentProblem, InputError  # noqa: E402
from canestra.layout import TRAINING_IDS  # noqa: E402

MODEL_FIXTURE = Path(__file__).parent / "fixtures" / "model-0.1.0"  # a real saved model (10 classes, 100 px)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("CANESTRA_CACHE_DIR", os.environ.get("CANESTRA_CACHE_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "canestra"))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    # The tests read the store with MLflow's own client, which (MLflow >= 3.7) opens a file store only
    # with this opt-out; canestra sets it for itself.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def _run_folder(tmp_path: Path) -> Path:
    """A run folder as `canestra train` leaves it: model/, metrics.json, report.html."""
    out = tmp_path / "run"
    shutil.copytree(MODEL_FIXTURE, out / "model")
    metrics = {"accuracy": 0.925, "macro_f1": 0.91, "n": 64, "per_class": {"Kiwi": {"f1": 1.0, "support": 7}},
               "confusion_matrix": {"labels": ["Kiwi"], "matrix": [[7]]}, "pca": {"k": 8},
               "counts": {"images": 320, "train": 256}, "shift": {"perturbed_held_out": {"accuracy": 0.8}}}
    (out / "metrics.json").write_text(json.dumps(metrics))
    (out / "report.html").write_text("<html><body>report</body></html>")
    return out


def test_resolve_uri_follows_the_flag_and_the_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_uri(None) is None  # off unless asked for
    assert tracking.resolve_uri(True) == f"file://{tmp_path}/mlruns"  # --mlflow alone: ./mlruns
    assert tracking.resolve_uri("store") == f"file://{tmp_path}/store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_uri(None) == "http://127.0.0.1:5000"  # the variable alone turns it on
    assert tracking.resolve_uri(True) == "http://127.0.0.1:5000"
    assert tracking.resolve_uri(False) is None


def test_training_is_logged_and_registered_then_fetched_by_alias(tmp_path):
    out = _run_folder(tmp_path)
    store = tmp_path / "mlruns"
    cfg = Settings.load(pca_k=8, image_sizes="100")
    with tracking.tracked_run(str(store), run_name="t1") as run:
        logged = run.log_training(str(out), json.loads((out / "metrics.json").read_text()), cfg, "fruits")
    client = MlflowClient(tracking_uri=logged.tracking_uri, registry_uri=logged.tracking_uri)
    got = client.get_run(logged.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["pca_k"] == "8" and got.data.params["image_sizes"] == "100"
    assert got.data.params["pca_k_fitted"] == "8"
    assert got.data.metrics["accuracy"] == 0.925 and got.data.metrics["per_class.Kiwi.f1"] == 1.0
    assert got.data.metrics["shift.perturbed_held_out.accuracy"] == 0.8
    assert not any(k.startswith("confusion_matrix") for k in got.data.metrics)  # lists stay out
    arts = {a.path for a in client.list_artifacts(logged.run_id)}
    assert {"report.html", "metrics.json", "model"} <= arts
    assert logged.model_version == "1"

    client.set_registered_model_alias("fruits", "champion", "1")
    local = tracking.local_model_dir("models:/fruits/champion", str(store))
    # Everything but the training image ids (data minimisation: they stay in the run folder).
    assert (MODEL_FIXTURE / TRAINING_IDS).is_file()
    assert sorted(os.listdir(local)) == sorted(set(os.listdir(MODEL_FIXTURE)) - {TRAINING_IDS})
    assert tracking.local_model_dir("models:/fruits/1", str(store)) == local  # same version, same cached copy
    assert tracking.local_model_dir("models:/fruits@champion", str(store)) == local

    from canestra.serve.predictor import OnlinePredictor

    banana = sorted((Path(__file__).parents[1] / "sample" / "fruits-360" / "Banana").glob("*.jpg"))[0]
    assert OnlinePredictor.from_model_dir(local, threads=1).predict_bytes(banana.read_bytes()).label == "Banana"


def test_a_failed_training_is_marked_failed(tmp_path):
    store = tmp_path / "mlruns"
    with pytest.raises(InputError):
        with tracking.tracked_run(str(store)):
            raise InputError("no images")
    client = MlflowClient(tracking_uri=f"file://{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("canestra").experiment_id])
    assert run.info.status == "FAILED"


def test_serve_unknown_alias_is_one_plain_line(tmp_path, capsys):
    out = _run_folder(tmp_path)
    store = tmp_path / "mlruns"
    with tracking.tracked_run(str(store)) as run:
        run.log_training(str(out), {"accuracy": 1.0}, Settings.load(), "fruits")
    assert main(["serve", "--model", "models:/fruits/staging-typo", "--mlflow", str(store)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("canestra: error: no registered model 'fruits' with alias 'staging-typo'")
    assert "\n" not in err and "Traceback" not in err
    with pytest.raises(InputError, match="models:/NAME/ALIAS"):
        tracking.local_model_dir("models:/fruits")


def test_without_mlflow_installed_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    with pytest.raises(EnvironmentProblem, match=r"pip install 'canestra\[mlflow\]'"):
        tracking.local_model_dir("models:/fruits/1")
    with pytest.raises(EnvironmentProblem, match="mlflow is not installed"):
        with tracking.tracked_run(True):
            pass
    assert tracking.local_model_dir("/some/model") == "/some/model"  # plain folders never need mlflow


def test_train_without_mlflow_installed_fails_before_any_work(tmp_path, sample_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    out = tmp_path / "out"
    assert main(["train", "--images", str(sample_dir), "--out", str(out), "--mlflow", str(tmp_path / "mlruns")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("canestra: error: MLflow tracking was asked for (--mlflow, mlflow=... or MLFLOW_TRACKING_URI) but "
                   "mlflow is not installed: pip install 'canestra[mlflow]'")
    assert not (out / "catalog").exists() and not (out / "_logs" / "spark.log").exists()  # no Spark, no ingest


@pytest.mark.slow
def test_train_logs_to_mlflow_and_serve_runs_the_registered_model(tmp_path, sample_dir):
    """MLFLOW_TRACKING_URI alone turns tracking on for `canestra train`; the registered version is
    then served over HTTP from its models:/ address."""
    import httpx

    store = tmp_path / "mlruns"
    env = dict(os.environ, MLFLOW_TRACKING_URI=str(store), MLFLOW_EXPERIMENT_NAME="fruit-trials",
               SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "canestra.cli", "train", "--images", str(sample_dir), "--out", str(out),
                           "--image-size", "100", "--pca-k", "8", "--no-shift-eval", "--quiet", "--master", "local[2]",
                           "--register-model", "fruits"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "registered fruits version 1" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    client = MlflowClient(tracking_uri=f"file://{store}", registry_uri=f"file://{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("fruit-trials").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["pca_k"] == "8"
    assert run.data.metrics["accuracy"] == metrics["accuracy"]
    (audit,) = [json.loads(line) for line in (out / "_audit" / "audit.jsonl").read_text().splitlines()]
    assert audit["details"]["mlflow_run_id"] == run.info.run_id

    client.set_registered_model_alias("fruits", "champion", "1")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "canestra.cli", "serve", "--model", "models:/fruits/champion",
                               "--port", str(port), "--threads", "1"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while not _ready(base):
            assert server.poll() is None and time.time() < deadline, server.stderr.read() if server.poll() else "timeout"
            time.sleep(0.5)
        info = httpx.get(base + "/v1/model", timeout=10, trust_env=False).json()
        assert len(info["classes"]) == 10 and info["image_sizes"] == [100]
        kiwi = sorted((sample_dir / "Kiwi").glob("*.jpg"))[-1]
        r = httpx.post(base + "/v1/predict", files={"file": (kiwi.name, kiwi.read_bytes())}, timeout=60,
                       trust_env=False)
        assert r.status_code == 200 and r.json()["prediction"] == "Kiwi"
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert server.poll() is not None  # the server is gone


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(base: str) -> bool:
    import httpx

    try:
        return httpx.get(base + "/readyz", timeout=2, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False
