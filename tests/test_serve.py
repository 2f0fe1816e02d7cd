"""`canestra serve`: the HTTP API answers like the library, rejects bad input plainly, keeps nothing."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from corpus import build_bad_corpus, decompression_bomb_png
from PIL import Image
from servers import ServeProcess

from canestra.answer.taxonomy import UNKNOWN
from canestra.config import Settings
from canestra.serve.predictor import OnlinePredictor

STATUS_FOR_REASON = {  # tests/corpus.py reason -> what an HTTP client must get
    "empty file": 422, "truncated": 422, "not an image": 415, "decompression bomb": 422,
    "animated image": 422, "corrupt": 422, "unsupported file type": 415,
}


@pytest.fixture(scope="module")
def model_dir(trained) -> str:
    return os.path.join(trained.out_dir, "model")


@pytest.fixture(scope="module")
def app(model_dir):
    from canestra.serve.app import create_app

    return create_app(model_dir, Settings.load(serve_threads=1, max_batch=8, rate_limit=0))


@pytest.fixture(scope="module")
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def predictor(model_dir) -> OnlinePredictor:
    return OnlinePredictor.from_model_dir(model_dir, threads=1)


def images_of(sample_dir: Path, cls: str, n: int = 3) -> list[Path]:
    return sorted((sample_dir / cls).glob("*.jpg"))[:n]


def test_predict_multipart_and_raw_body(client, predictor, sample_dir, model_dir):
    path = images_of(sample_dir, "Pineapple", 1)[0]
    data = path.read_bytes()
    expected = predictor.predict_bytes(data)
    r1 = client.post("/v1/predict", files={"file": ("photo.jpg", data, "image/jpeg")})
    r2 = client.post("/v1/predict", content=data, headers={"content-type": "image/jpeg"})
    for r in (r1, r2):
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"prediction", "probability", "family", "family_probability", "top5", "image_id",
                             "model_version", "timing_ms"}
        assert body["prediction"] == expected.label == "Pineapple"
        assert body["family"] == expected.family == "Pineapple"
        assert body["probability"] == pytest.approx(expected.probability, abs=1e-9)
        assert body["family_probability"] == pytest.approx(expected.family_probability, abs=1e-9)
        assert body["family_probability"] >= body["probability"] - 1e-9  # the variety is one of its family's classes
        assert [c for c, _ in body["top5"]] == [c for c, _ in expected.top5] and len(body["top5"]) == 5
        assert body["top5"][0] == [body["prediction"], round(body["probability"], 6)]
        assert body["image_id"] == expected.image_id
        assert body["model_version"] == predictor.spec.model_version
        assert body["timing_ms"] > 0


def test_batch_answers_each_image_like_single(client, sample_dir):
    # Pineapple and lemon are ImageNet classes: their fruitness sits far above the "unknown" threshold, which on
    # this small model is about the lowest held-out score (kiwi, no ImageNet class, sits at it).
    paths = images_of(sample_dir, "Pineapple", 2) + images_of(sample_dir, "Lemon", 2)
    files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    files.insert(2, ("file", ("notes.txt", b"not a picture at all", "text/plain")))
    r = client.post("/v1/predict/batch", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["index"] for x in results] == list(range(5))
    assert results[2]["status"] == 415 and "not an image" in results[2]["error"]
    good = [x for x in results if x["status"] == 200]
    assert [x["prediction"] for x in good] == ["Pineapple", "Pineapple", "Lemon", "Lemon"]
    assert [x["family"] for x in good] == ["Pineapple", "Pineapple", "Lemon", "Lemon"]
    assert "family" not in results[2] or results[2]["family"] is None
    for x, p in zip(good, paths):
        single = client.post("/v1/predict", content=p.read_bytes()).json()
        assert x["image_id"] == single["image_id"]
        assert x["probability"] == pytest.approx(single["probability"], abs=1e-5)
        assert x["family_probability"] == pytest.approx(single["family_probability"], abs=1e-5)


def non_fruit_images() -> dict[str, bytes]:
    """Pictures of no fruit: scikit-image's sample photos and made-up PNGs (tests/test_online.py)."""
    from test_online import SKIMAGE_PHOTOS, non_fruit_pngs, skimage_photo

    return {**{n: skimage_photo(n).read_bytes() for n in SKIMAGE_PHOTOS}, **non_fruit_pngs()}


def test_non_fruit_images_are_unknown(client, predictor, sample_dir):
    """A cat, a rocket, a motorbike, a coffee cup, a gradient, a checkerboard: `unknown`, no family."""
    images = non_fruit_images()
    for name, data in images.items():
        r = client.post("/v1/predict", files={"file": (name, data)})
        assert r.status_code == 200, (name, r.text)
        body = r.json()
        assert body["prediction"] == UNKNOWN and body["family"] == "", (name, body)
        assert 0 <= body["family_probability"] <= 1 and 0 <= body["probability"] <= 1
        assert len(body["top5"]) == 5 and all(c in predictor.labels for c, _ in body["top5"])
    # in a batch too, next to a real fruit photo that keeps its answer
    banana = images_of(sample_dir, "Banana", 1)[0].read_bytes()
    files = [("file", ("banana.jpg", banana))] + [("file", (n, d)) for n, d in list(images.items())[:3]]
    results = client.post("/v1/predict/batch", files=files).json()["results"]
    assert (results[0]["prediction"], results[0]["family"]) == ("Banana", "Banana")
    assert all(x["status"] == 200 and x["prediction"] == UNKNOWN and x["family"] == "" for x in results[1:]), results


def test_batch_limits(client, sample_dir):
    data = images_of(sample_dir, "Kiwi", 1)[0].read_bytes()
    r = client.post("/v1/predict/batch", files=[("file", (f"{i}.jpg", data)) for i in range(9)])  # max_batch=8
    assert r.status_code == 413 and "at most 8" in r.json()["detail"]
    r = client.post("/v1/predict/batch", content=data, headers={"content-type": "image/jpeg"})
    assert r.status_code == 422 and "multipart" in r.json()["detail"]
    r = client.post("/v1/predict/batch", files={"other": ("a.jpg", data)})
    assert r.status_code == 422 and "file" in r.json()["detail"]


def test_model_health_ready(client, predictor, trained):
    info = client.get("/v1/model").json()
    metrics = json.loads(Path(trained.out_dir, "metrics.json").read_text())
    assert info["classes"] == predictor.labels and len(info["classes"]) == 10
    assert info["class_families"] == predictor.spec.rule.families and len(info["class_families"]) == 10
    assert info["families"] == sorted(set(info["class_families"])) and {"Apple", "Pepper"} <= set(info["families"])
    assert info["class_families"][info["classes"].index("Apple Granny Smith")] == "Apple"
    thresholds = predictor.spec.rule.energy_threshold, predictor.spec.rule.fruitness_threshold
    assert None not in thresholds
    assert (info["unknown_thresholds"]["energy"], info["unknown_thresholds"]["fruitness"]) == thresholds
    assert info["input_fit"] == "crop"
    assert info["metrics"]["accuracy"] == metrics["accuracy"]
    assert info["version"] == predictor.spec.version and info["model_version"] == info["version"][:12]
    assert info["created_at"] and info["image_sizes"] == metrics["model"]["image_sizes"]
    assert info["pca_k"] == metrics["pca"]["k"]
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/readyz").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/predict/batch", "/v1/model", "/healthz", "/readyz"} <= set(spec["paths"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text and "cdn." not in docs.text
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200


def test_request_counter_counts_everything(client, sample_dir):
    before = client.get("/healthz").json()["requests"]
    data = images_of(sample_dir, "Orange", 1)[0].read_bytes()
    client.post("/v1/predict", content=data)
    client.post("/v1/predict", content=b"garbage")
    after = client.get("/healthz").json()["requests"]
    assert after["requests"] == before.get("requests", 0) + 2
    assert after["images"] == before.get("images", 0) + 1
    assert after["rejected_415"] == before.get("rejected_415", 0) + 1


def test_bad_input_corpus_never_500(client, tmp_path, sample_dir):
    corpus = build_bad_corpus(tmp_path / "corpus", sample_dir / "Banana")
    for path in corpus["bad"]:
        try:
            data = Path(path).read_bytes()
        except OSError:
            continue  # unreadable on disk (dangling link, no permission): nothing to upload
        reason = corpus["expected_reason"][path]
        want = STATUS_FOR_REASON[reason.split(" with ")[0]]
        for r in (client.post("/v1/predict", files={"file": (Path(path).name, data)}),
                  client.post("/v1/predict", content=data, headers={"content-type": "application/octet-stream"})):
            assert r.status_code == want, (path, r.status_code, r.text)
            detail = r.json()["detail"]
            assert isinstance(detail, str) and detail and "Traceback" not in detail
    for path in corpus["valid"]:  # awkward but valid (CMYK, 16-bit, alpha, rotated, MPO, WebP, ...)
        r = client.post("/v1/predict", files={"file": (Path(path).name, Path(path).read_bytes())})
        assert r.status_code == 200, (path, r.text)


def test_size_limit_and_bomb(client):
    big = np.random.default_rng(1).integers(0, 256, (2200, 2200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "PNG", compress_level=0)  # ~14.5 MB, a real image over the 10 MB default
    assert buf.tell() > 10_000_000
    r = client.post("/v1/predict", files={"file": ("big.png", buf.getvalue())})
    assert r.status_code == 413 and "10 MB" in r.json()["detail"]
    r = client.post("/v1/predict", content=buf.getvalue(), headers={"content-type": "image/png"})
    assert r.status_code == 413
    r = client.post("/v1/predict", files={"file": ("bomb.png", decompression_bomb_png())})
    assert r.status_code == 422 and "decompression bomb" in r.json()["detail"]
    r = client.post("/v1/predict", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 422


def test_uploads_are_neither_stored_nor_logged(client, sample_dir, caplog, tmp_path, monkeypatch):
    """A 3 MB upload (Starlette would spool > 1 MB to a temp file) leaves no file and no log line about it."""
    watched = tmp_path / "tmp"
    watched.mkdir()
    monkeypatch.setenv("TMPDIR", str(watched))
    monkeypatch.setattr(tempfile, "tempdir", str(watched))
    noise = np.random.default_rng(2).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")
    assert buf.tell() > 2_000_000
    secret_name = "mario-rossi-holiday.png"
    with caplog.at_level(logging.DEBUG):
        r = client.post("/v1/predict", files={"file": (secret_name, buf.getvalue(), "image/png")})
    assert r.status_code == 200
    image_id = r.json()["image_id"]
    assert list(watched.iterdir()) == []
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert secret_name not in logged and image_id not in logged and "mario" not in logged.lower()


@pytest.mark.slow  # ~10 s idle, minutes on a loaded 2-core machine (two model loads + uvicorn start)
def test_cli_serve_with_two_workers(model_dir, sample_dir, tmp_path):
    """The real command: uvicorn with 2 worker processes (app factory + env), then a clean stop."""
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    server = ServeProcess(model_dir, env=env, workers=2, timeout=120)
    try:
        with httpx.Client(base_url=server.base, trust_env=False, timeout=60) as http:
            for path in images_of(sample_dir, "Strawberry", 4):
                r = http.post("/v1/predict", files={"file": (path.name, path.read_bytes())})
                assert r.status_code == 200 and r.json()["prediction"] == "Strawberry"
                assert r.json()["family"] == "Strawberry"
            assert http.get("/").text.startswith("<!doctype html>")
    finally:
        out = server.stop()
    assert "2 worker(s)" in out
    starts = [json.loads(line) for line in out.splitlines() if line.startswith('{"counts"')]
    assert len({s["pid"] for s in starts}) == 2, out  # two worker processes served
    stops = [s for s in starts if s["event"] == "serve.stop"]
    assert sum(s["counts"].get("images", 0) for s in stops) == 4
    for s in starts:  # audit lines carry counts only
        assert set(s) == {"counts", "event", "model_version", "pid", "time"}


def test_cli_serve_bad_model_exits_2_before_starting(tmp_path):
    r = subprocess.run([sys.executable, "-m", "canestra.cli", "serve", "--model", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")})
    assert r.returncode == 2
    assert r.stderr.strip().startswith("canestra: error: model folder") and "Uvicorn" not in r.stderr + r.stdout


@pytest.mark.slow
def test_serve_two_workers_build_the_int8_graph_into_an_empty_cache(model_dir, sample_dir, tmp_path):
    """Issue 14's matrix, serve row: both workers load an int8 model at once on a fresh machine."""
    import shutil

    model = tmp_path / "model-int8"
    shutil.copytree(model_dir, model)
    for meta in model.glob("stages/*ImageFeaturizer*/metadata/part-*"):
        doc = json.loads(meta.read_text().splitlines()[0])
        doc.setdefault("paramMap", {})["precision"] = "int8"
        meta.write_text(json.dumps(doc) + "\n")
        for crc in meta.parent.glob(".*.crc"):
            crc.unlink()
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "CANESTRA_CACHE_DIR": str(tmp_path / "cache")}
    server = ServeProcess(str(model), env=env, workers=2, timeout=300)
    try:
        with httpx.Client(base_url=server.base, trust_env=False, timeout=60) as http:
            for path in images_of(sample_dir, "Strawberry", 4):
                assert http.post("/v1/predict", files={"file": (path.name, path.read_bytes())}).status_code == 200
    finally:
        out = server.stop()
    assert "Traceback" not in out and "WARNING:root" not in out, out[-3000:]
    assert any(p.name.endswith(".onnx") and "int8" in p.name for p in (tmp_path / "cache").iterdir())
