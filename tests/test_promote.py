"""canestra promote (the gate, the `current` pointer, the MLflow alias) and the model swap a service
does when the pointer moves (docs/feedback.md)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from canestra.cli import commands as cli
from canestra.config import Settings
from canestra.feedback import pointer as pointers
from canestra.serve.predictor import load_model_spec

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "fruits-360-sample" / "Training"
NOT_FRUIT = ("chelsea.png", "rocket.jpg", "motorcycle_left.png", "coffee.png", "astronaut.png", "brick.png")


def worse_copy(model_dir: str, dest: Path) -> str:
    """The model with its classifier's classes rolled by one (class i's weights answer for class i+1): a
    genuinely different model, wrong on nearly every studio image, made without Spark."""
    shutil.copytree(model_dir, dest)
    # every classifier of the model: the main head, and the answer head of a studio-only model
    for part in glob.glob(str(dest / "stages" / "*_LogisticRegression*" / "data" / "*.parquet")):
        table = pq.read_table(part)
        row = table.to_pylist()[0]
        m = row["coefficientMatrix"]
        assert m["type"] == 1, "a dense coefficient matrix"
        rows, cols = m["numRows"], m["numCols"]
        w = np.asarray(m["values"]).reshape(rows, cols) if m["isTransposed"] else \
            np.asarray(m["values"]).reshape(cols, rows).T
        w = np.roll(w, 1, axis=0)
        m["values"] = (w.reshape(-1) if m["isTransposed"] else w.T.reshape(-1)).tolist()
        row["interceptVector"]["values"] = np.roll(row["interceptVector"]["values"], 1).tolist()
        pq.write_table(pa.Table.from_pylist([row], schema=table.schema), part)
    for crc in glob.glob(str(dest / "stages" / "*_LogisticRegression*" / "data" / ".*.crc")):
        os.remove(crc)
    return str(dest)


@pytest.fixture(scope="module")
def models(trained, tmp_path_factory):
    """(A: the session's model, W: A with its classes rolled)."""
    a = os.path.join(trained.out_dir, "model")
    w = worse_copy(a, tmp_path_factory.mktemp("worse") / "model")
    assert load_model_spec(w).version != load_model_spec(a).version
    return a, w


@pytest.fixture(scope="module")
def sets(tmp_path_factory, sample_dir) -> dict[str, str]:
    """Photos the session's model never trained on: 4 studio images per class it knows (from the shared
    sample, not in sample/), and photos of no fruit (scikit-image's)."""
    import skimage

    base = tmp_path_factory.mktemp("sets")
    for cls in sorted(p.name for p in sample_dir.iterdir()):
        seen = {p.name for p in (sample_dir / cls).iterdir()}
        fresh = [p for p in sorted((SHARED / cls).glob("*.jpg")) if p.name not in seen][:4]
        assert len(fresh) == 4, cls
        (base / "studio" / cls).mkdir(parents=True)
        for p in fresh:
            shutil.copy(p, base / "studio" / cls / p.name)
    (base / "not-fruit").mkdir()
    for name in NOT_FRUIT:
        shutil.copy(Path(skimage.__file__).parent / "data" / name, base / "not-fruit" / name)
    return {"studio": str(base / "studio"), "not_fruit": str(base / "not-fruit")}


def promote(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(["promote", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_first_promotion_copies_the_model_and_writes_the_pointer(models, sets, tmp_path, capsys):
    a, _ = models
    to = tmp_path / "models" / "current"
    code, out, err = promote(["--candidate", a, "--to", str(to), "--eval-images", sets["studio"],
                              "--unknown-images", sets["not_fruit"]], capsys)
    assert code == 0, err
    spec = load_model_spec(a)
    p = pointers.read_pointer(str(to))
    assert p.version == spec.version and p.model_dir == str(tmp_path / "models" / spec.model_version / "model")
    assert load_model_spec(p.model_dir).version == spec.version  # a whole copy, beside the pointer
    assert "no current model" in out and f"promoted {spec.model_version}" in out
    report = json.loads(Path(out.split("report: ")[1].split()[0]).with_suffix(".json").read_text())
    assert report["promoted"] and [s["kind"] for s in report["sets"]] == ["variety", "unknown"]
    assert report["sets"][0]["candidate"] >= 0.9  # studio photos it never saw
    audit = [json.loads(x) for x in (tmp_path / "models" / "_audit" / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["command"] == "promote" and audit[-1]["counts"]["promoted"] == 1


def test_a_worse_candidate_is_refused_and_the_service_keeps_its_model(models, sets, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from canestra.serve.app import create_app

    a, w = models
    to = tmp_path / "models" / "current"
    gate = ["--eval-images", sets["studio"], "--unknown-images", sets["not_fruit"]]
    assert promote(["--candidate", a, "--to", str(to), *gate], capsys)[0] == 0
    served = pointers.read_pointer(str(to))
    cfg = Settings.load(serve_threads=1, rate_limit=0, model_poll=0.2)
    app = create_app(served.model_dir, cfg, model_source={"source": {"kind": "pointer", "uri": str(to)},
                                                          "token": served.version})
    a_version, w_version = load_model_spec(a).model_version, load_model_spec(w).model_version
    photo = sorted((Path(sets["studio"]) / "Banana").glob("*.jpg"))[0].read_bytes()
    with TestClient(app) as client:
        assert client.get("/v1/model").json()["model_version"] == a_version
        code, out, err = promote(["--candidate", w, "--to", str(to), *gate, "--tolerance", "0.05"], capsys)
        assert code == 3, (out, err)
        [line] = err.strip().splitlines()
        assert line.startswith("canestra: error: promotion refused: ") and "did not improve" in line
        assert "got worse" in line or "did not improve" in line
        assert pointers.read_pointer(str(to)) == served  # the pointer is as it was
        assert not (tmp_path / "models" / w_version).exists()
        report = Path(line.split("(report: ")[1].rstrip(")"))
        assert "**REFUSED**" in report.read_text() and json.loads(report.with_suffix(".json").read_text())[
            "promoted"] is False
        time.sleep(1.0)  # five polls of the pointer
        r = client.post("/v1/predict", files={"file": ("b.jpg", photo)})
        assert (r.status_code, r.json()["model_version"], r.json()["family"]) == (200, a_version, "Banana")
        # positive control: when the pointer does move, the same service follows it, answering all along
        pointers.write_pointer(str(to), w, load_model_spec(w).version, previous=served.model_dir)
        answers = []
        deadline = time.time() + 30
        while time.time() < deadline and (not answers or answers[-1][1] != w_version):
            r = client.post("/v1/predict", files={"file": ("b.jpg", photo)})
            answers.append((r.status_code, r.json().get("model_version")))
        assert {s for s, _ in answers} == {200} and answers[-1][1] == w_version
        versions = [v for _, v in answers]
        assert versions == sorted(versions, key=lambda v: v == w_version)  # A then W, one switch
        assert client.get("/v1/model").json()["model_version"] == w_version
        metrics = client.get("/metrics").text
        assert f'canestra_model_info{{model_version="{w_version}"}} 1.0' in metrics
        assert f'canestra_model_info{{model_version="{a_version}"}} 0.0' in metrics


def test_a_better_candidate_passes_the_gate(models, sets, tmp_path, capsys):
    a, w = models
    to = tmp_path / "models" / "current"
    gate = ["--eval-images", sets["studio"], "--unknown-images", sets["not_fruit"]]
    assert promote(["--candidate", w, "--to", str(to), *gate], capsys)[0] == 0  # W first: nothing to compare with
    code, out, err = promote(["--candidate", a, "--to", str(to), *gate], capsys)
    assert code == 0, err
    assert "improved" in out and "within tolerance" in out
    p = pointers.read_pointer(str(to))
    assert p.version == load_model_spec(a).version and p.previous == str(
        tmp_path / "models" / load_model_spec(w).model_version / "model")
    # the same candidate again: it is the current model, nothing to promote
    code, out, err = promote(["--candidate", a, "--to", str(to), *gate], capsys)
    assert code == 3 and "is the current model" in err
    # another target: W answers "unknown" for the same photos as A (its rule does not depend on the classes'
    # order), so that set does not improve, and the studio set got worse: both reasons are given
    code, _, err = promote(["--candidate", w, "--current", a, "--to", str(to), *gate, "--target", sets["not_fruit"]],
                           capsys)
    assert code == 3 and "the target set" in err and "did not improve" in err and "got worse" in err


def test_bad_gate_arguments_are_plain_errors(models, sets, tmp_path, capsys):
    a, _ = models
    to = str(tmp_path / "current")
    for args, words in (
        (["--candidate", a, "--to", to, "--eval-images", sets["studio"], "--target", sets["not_fruit"] + "x"],
         "is not one of the sets"),
        (["--candidate", a, "--to", to, "--eval-images", str(tmp_path / "nowhere")],
         "--eval-images folder " + str(tmp_path / "nowhere") + " does not exist"),
        (["--candidate", str(tmp_path), "--to", to, "--eval-images", sets["studio"]], "not a saved canestra model"),
        (["--candidate", a, "--to", to, "--eval-images", sets["studio"], "--tolerance", "2"], "shares between 0 and 1"),
        (["--candidate", a, "--to", "models:/fruit@champion", "--eval-images", sets["studio"]],
         "pass the candidate as a version"),
    ):
        code, _, err = promote(args, capsys)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not os.path.exists(to)
    (tmp_path / "bad-pointer").write_text("not json")
    code, _, err = promote(["--candidate", a, "--to", str(tmp_path / "bad-pointer"), "--eval-images", sets["studio"]],
                           capsys)
    assert code == 2 and "is not a canestra model pointer" in err


def test_promotion_to_an_mlflow_alias(models, sets, tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from canestra import tracking

    a, w = models
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("fruit")
    for folder in (w, a):  # version 1: W, version 2: A
        client.create_model_version("fruit", source=Path(folder).resolve().as_uri())
    client.set_registered_model_alias("fruit", "champion", "1")
    gate = ["--eval-images", sets["studio"], "--report-dir", str(tmp_path / "reports")]
    code, out, err = promote(["--candidate", "models:/fruit/2", "--to", "models:/fruit@champion", *gate], capsys)
    assert code == 0, err
    assert tracking.alias_version("models:/fruit@champion") == "2"
    code, _, err = promote(["--candidate", "models:/fruit/1", "--to", "models:/fruit@champion", *gate], capsys)
    assert code == 3 and tracking.alias_version("models:/fruit@champion") == "2"
    assert len(list((tmp_path / "reports").glob("*.md"))) == 2
