"""Drift monitoring (docs/monitoring.md): the model's drift reference, the predictions' monitor columns,
`canestra monitor` (JSON, text, HTML report, plain errors) and `GET /v1/drift` on the service.

The end-to-end tests use the session's small model (tests/conftest.py `trained`: the bundled sample,
10 classes) on studio frames of its classes it never saw (from ../shared/data/fruits-360-sample) and
real photos (../shared/data/real-photos). The statistics themselves are checked on synthetic data,
where the truth is known. The full-size check (1,000 studio images, then real photos) is in
tests/test_monitor_slow.py.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SHARED

from canestra.cli import commands
from canestra.drift import stats
from canestra.drift.stats import STATISTICS, WINDOW_GRID, Reference, Sample, build_reference

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "canestra"
REAL = ROOT.parent / "shared" / "data" / "real-photos"
HEX64 = re.compile(r"[0-9a-f]{64}")


# ---------------------------------------------------------------------------- the statistics (synthetic data)


def synthetic(rng: np.random.Generator, n: int, shift: float = 0.0, unknown: float = 0.01) -> Sample:
    """Answers of 20 families: PCA components with falling variance, energy, fruitness; ``shift`` moves them
    the way photos from outside the studio do (elsewhere in PCA space, lower energy and fruitness)."""
    pca = rng.normal(size=(n, 16)) * np.linspace(3, 0.5, 16) + shift
    energy = rng.normal(10, 2, n) - 2 * shift
    fruitness = np.clip(rng.beta(8, 2, n) - 0.2 * shift, 0, 1)
    cat = rng.integers(0, 20, n)
    cat[rng.random(n) < unknown] = 20
    return Sample(pca, energy, fruitness, cat)


CATEGORIES = [f"F{i}" for i in range(20)] + ["unknown"]


def test_thresholds_hold_the_false_alarm_rate_on_windows_like_the_reference():
    rng = np.random.default_rng(5)
    ref = build_reference(synthetic(rng, 600), CATEGORIES, seed=1, replicates=1000, window_grid=(100,))
    th = ref.thresholds_for(100)
    flagged = 0
    for _ in range(300):  # fresh windows from the same distribution: the target is 1 %
        s = stats.scores(ref, synthetic(rng, 100))
        flagged += any(s[k] > th[k] for k in STATISTICS)
    assert flagged / 300 <= 0.04
    shifted = stats.scores(ref, synthetic(rng, 100, shift=0.5))
    assert {"pca_mean", "energy"} <= {k for k in STATISTICS if shifted[k] > th[k]}


def test_one_sided_scores_ignore_images_that_fit_better():
    rng = np.random.default_rng(2)
    ref = build_reference(synthetic(rng, 400), CATEGORIES, seed=0, replicates=300, window_grid=(100,))
    better = synthetic(rng, 100, unknown=0.0)
    better.energy += 5.0  # more confident than the held-out images: no alarm
    better.fruitness = np.ones(100)
    s = stats.scores(ref, better)
    assert s["energy"] == 0.0 and s["fruitness"] == 0.0 and s["unknown_rate"] == 0.0
    worse = synthetic(rng, 100, unknown=0.5)
    assert stats.scores(ref, worse)["unknown_rate"] > ref.thresholds_for(100)["unknown_rate"]


def test_no_unknown_in_a_small_reference_still_allows_the_odd_one():
    """A held-out set without a single `unknown` answer must not make one such answer an alarm."""
    rng = np.random.default_rng(3)
    ref = build_reference(synthetic(rng, 60, unknown=0.0), CATEGORIES, seed=0, replicates=500, window_grid=(100,))
    assert ref.unknown_rate == 0.0 and ref.thresholds_for(100)["unknown_rate"] >= 0.02


def test_reference_cdf_matches_the_empirical_one_with_ties():
    values = np.array([0.2, 0.5, 0.5, 0.5, 0.9, 1.0, 1.0, 1.0])
    table = np.quantile(values, stats.LEVELS)[None]
    x = np.array([[0.1, 0.2, 0.5, 0.7, 1.0, 1.5]])
    got = stats._cdf(table, x)[0]
    assert got[0] == 0.0 and got[-1] == 1.0 and got[4] == 1.0
    assert np.all(np.diff(got) >= 0)
    # a run of equal quantiles counts to its highest level: 0.5 is sorted value 3 of 0..7, numpy's
    # (linear) quantile level 3/7 (the lowest level, 1/7, would say most of the 0.5s sit above 0.5)
    assert got[2] == pytest.approx(3 / 7, abs=0.011)


def test_thresholds_between_grid_sizes_are_interpolated_and_too_small_windows_refused():
    rng = np.random.default_rng(4)
    ref = build_reference(synthetic(rng, 300), CATEGORIES, seed=0, replicates=300, window_grid=(50, 200))
    lo, mid, hi = ref.thresholds_for(50), ref.thresholds_for(100), ref.thresholds_for(200)
    for k in ("pca_mean", "energy"):
        assert hi[k] < mid[k] < lo[k]  # larger windows: less noise, lower thresholds
    assert ref.thresholds_for(5000) == hi
    with pytest.raises(ValueError, match="too small"):
        ref.thresholds_for(20)


def test_reference_round_trips_and_a_broken_one_is_refused():
    rng = np.random.default_rng(6)
    ref = build_reference(synthetic(rng, 200), CATEGORIES, seed=0, replicates=200, window_grid=(50,))
    raw = json.loads(json.dumps(ref.to_json()))
    back = Reference.from_json(raw)
    assert back.thresholds == ref.thresholds and back.categories == CATEGORIES
    assert np.allclose(back.energy_quantiles, ref.energy_quantiles)
    w = synthetic(rng, 50)
    assert stats.scores(back, w) == pytest.approx(stats.scores(ref, w))
    for broken in ({**raw, "pca_sd": [1.0]}, {**raw, "format": 99}, {k: v for k, v in raw.items() if k != "thresholds"},
                   []):
        with pytest.raises(ValueError):
            Reference.from_json(broken)


def test_drift_never_imports_spark_serve_or_the_front_doors():
    bad = []
    for path in sorted((SRC / "drift").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.name}: {n}" for n in names
                    if n.split(".")[0] == "pyspark" or n.startswith(("canestra.pipeline", "canestra.serve",
                                                                        "canestra.api", "canestra.cli",
                                                                        "canestra.sparkctx"))]
    assert bad == []


# ---------------------------------------------------------------------------- a trained model, end to end


@pytest.fixture(scope="module")
def model_dir(trained) -> str:
    return os.path.join(trained.out_dir, "model")


def unseen_studio(tmp: Path, per_class: int = 10) -> Path:
    """Frames of the model's classes (the bundled sample's) that the model never saw: the shared copy of
    Fruits-360 holds 120 per class, the bundled sample 32 of them."""
    sample = ROOT / "sample" / "fruits-360"
    for cls in sorted(p.name for p in sample.iterdir() if p.is_dir()):
        (tmp / cls).mkdir(parents=True)
        seen = {p.name for p in (sample / cls).iterdir()}
        for f in sorted((SHARED / cls).glob("*.jpg"), key=lambda p: p.name)[:per_class + len(seen)]:
            if f.name not in seen and len(list((tmp / cls).iterdir())) < per_class:
                shutil.copy(f, tmp / cls / f.name)
    return tmp


def real_photos(tmp: Path, n: int) -> Path:
    files = sorted(REAL.rglob("*.jpg"))
    picked = [files[i] for i in np.linspace(0, len(files) - 1, n).astype(int)]  # every family
    for f in picked:
        (tmp / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, tmp / f.parent.name / f.name)
    return tmp


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    if not SHARED.is_dir() or not REAL.is_dir():
        pytest.skip("../shared/data (Fruits-360 sample, real photos) is not here")
    root = tmp_path_factory.mktemp("drift-photos")
    return {"studio": unseen_studio(root / "studio"), "real": real_photos(root / "real", 100)}


@pytest.fixture(scope="module")
def studio_then_real(spark, model_dir, photos, tmp_path_factory) -> Path:
    """100 unseen studio frames predicted, then (a later run into the same --out) 50 real photos."""
    from canestra.pipeline.predict import predict
    from canestra.progress import Progress

    out = tmp_path_factory.mktemp("drift-pred")
    real50 = real_photos(tmp_path_factory.mktemp("real50"), 50)
    predict(spark, model_dir, str(photos["studio"]), str(out), Progress(quiet=True))
    predict(spark, model_dir, str(real50), str(out), Progress(quiet=True), incremental=True)
    return out


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = commands.main(list(argv))
    got = capsys.readouterr()
    return code, got.out, got.err


def test_the_model_stores_its_drift_reference_as_plain_json(model_dir, trained):
    from canestra.model import DRIFT_REFERENCE

    text = (Path(model_dir) / DRIFT_REFERENCE).read_text()
    raw = json.loads(text)
    ref = Reference.from_json(raw)
    assert ref.n == trained.metrics["n"]  # every held-out row
    assert ref.categories == sorted({f for f in ref.families}) + ["unknown"]
    assert sorted(ref.thresholds) == list(WINDOW_GRID) and ref.pca_components == 16
    assert all(t > 0 for k, t in ref.thresholds[100].items() if k != "unknown_rate")
    assert not HEX64.search(text)  # aggregates only: no image id


def test_predictions_carry_what_monitor_needs(studio_then_real):
    from canestra.pipeline.predict import MONITOR_COLUMNS, PREDICTION_COLUMNS

    table = pq.read_table(studio_then_real / "predictions")
    assert table.column_names == PREDICTION_COLUMNS + MONITOR_COLUMNS + ["label"]
    assert table.num_rows == 150
    assert {len(h) for h in table.column("pca_head").to_pylist()} == {16}
    assert len(set(table.column("predicted_at").to_pylist())) == 2  # one time per predict run
    header = (studio_then_real / "predictions.csv").read_text().splitlines()[0].split(",")
    assert header == PREDICTION_COLUMNS + ["label"]  # the CSV export keeps its columns


def test_monitor_json_flags_the_real_photos_and_not_the_studio_frames(studio_then_real, model_dir, capsys):
    code, out, err = run_cli(capsys, "monitor", "--model", model_dir, "--predictions", str(studio_then_real),
                             "--window", "50", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["window"] == 50 and res["predictions_scored"] == 150 and res["predictions_pending"] == 0
    drift = [w["drift"] for w in res["windows"]]
    assert drift == [False, False, True] and res["first_drift_window"] == 3
    real = res["windows"][2]
    assert {"energy", "pca_mean"} <= set(real["flagged"]) and set(real["scores"]) == set(STATISTICS)
    assert real["first"] == 101 and real["last"] == 150
    assert res["windows"][0]["from"] < res["windows"][2]["from"]  # in time order


def test_monitor_text_is_plain_and_fail_on_drift_exits_3(studio_then_real, model_dir, capsys, tmp_path):
    code, out, _ = run_cli(capsys, "monitor", "--model", model_dir, "--predictions",
                           str(studio_then_real / "predictions"), "--window", "50")
    assert code == 0
    assert "3 window(s) of 50" in out and "DRIFT in 1 of 3 window(s), first in window 3 (predictions 101-150" in out
    code, out, _ = run_cli(capsys, "monitor", "--model", model_dir, "--predictions", str(studio_then_real),
                           "--window", "35", "--fail-on-drift")
    # window 4 holds real photos 6-40; the last 10 predictions wait for a fifth window
    assert code == 3 and "the last 10 prediction(s) do not fill a window of 35 yet" in out


def test_monitor_report_plots_the_drift_score_over_time(studio_then_real, model_dir, capsys, tmp_path):
    page = tmp_path / "drift.html"
    code, out, _ = run_cli(capsys, "monitor", "--model", model_dir, "--predictions", str(studio_then_real),
                           "--window", "25", "--report", str(page))
    assert code == 0 and f"report: {page}" in out
    root = ET.fromstring(page.read_text().split("\n", 1)[1])  # well-formed XML after the doctype
    ns = "{http://www.w3.org/2000/svg}"
    svg = next(root.iter(f"{ns}svg"))
    assert len(list(svg.iter(f"{ns}polyline"))) == len(STATISTICS)  # one line per statistic over 6 windows
    assert len(list(svg.iter(f"{ns}circle"))) == 6 * len(STATISTICS)
    assert len([r for r in svg.iter(f"{ns}rect") if r.get("fill") == "#fde0d2"]) == 2  # the two real windows
    assert not HEX64.search(page.read_text())


def test_predictions_without_the_monitor_columns_are_refused_plainly(studio_then_real, model_dir, capsys, tmp_path):
    from canestra.pipeline.predict import PREDICTION_COLUMNS

    old = tmp_path / "old" / "predictions"
    old.mkdir(parents=True)
    table = pq.read_table(studio_then_real / "predictions").select(PREDICTION_COLUMNS)  # as canestra wrote it before
    pq.write_table(table, old / "part-00000.parquet")
    code, _, err = run_cli(capsys, "monitor", "--model", model_dir, "--predictions", str(old.parent))
    assert code == 2
    assert "have no energy, fruitness, pca_head, predicted_at column(s)" in err and "predict the images again" in err
    # old rows beside new ones (predict --incremental on an old table): the old ones are left out, said so
    for f in (studio_then_real / "predictions").glob("*.parquet"):
        shutil.copy(f, old / f"new-{f.name}")
    code, out, _ = run_cli(capsys, "monitor", "--model", model_dir, "--predictions", str(old.parent), "--window", "50")
    assert code == 0 and "150 prediction(s) left out" in out and "3 window(s) of 50" in out


def test_monitor_errors_are_one_plain_line(model_dir, tmp_path, capsys):
    photos_dir = tmp_path / "holiday"
    photos_dir.mkdir()
    (photos_dir / "a.jpg").write_bytes(b"x")
    cases = [
        (["--predictions", str(tmp_path / "nope")], "does not exist"),
        (["--predictions", str(photos_dir)], "holds no predictions"),
        (["--predictions", str(tmp_path / "nope"), "--window", "10"], "--window 10 is too small"),
        (["--predictions", "s3://bucket/run/predictions"], "reads a local predictions folder"),
    ]
    for extra, message in cases:
        code, out, err = run_cli(capsys, "monitor", "--model", model_dir, *extra)
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (photos_dir / "_audit").exists()  # not a canestra output: no audit record written into it


def test_a_model_without_a_reference_says_so(trained, studio_then_real, tmp_path, capsys):
    from canestra.model import DRIFT_REFERENCE

    old = tmp_path / "model"
    shutil.copytree(os.path.join(trained.out_dir, "model"), old)
    (old / DRIFT_REFERENCE).unlink()  # as models trained before canestra stored one
    code, _, err = run_cli(capsys, "monitor", "--model", str(old), "--predictions", str(studio_then_real))
    assert code == 2 and "has no drift reference" in err and "retrain it" in err
    client = _client(str(old))
    with client as c:
        r = c.get("/v1/drift")
    assert r.status_code == 200 and r.json()["available"] is False and "has no drift reference" in r.json()["reason"]
    assert str(old) not in r.text  # no server path in an answer


def test_monitor_through_the_python_api_writes_its_audit_record(studio_then_real, model_dir, tmp_path):
    from canestra import api

    res = api.monitor(model_dir, str(studio_then_real), window=50, report=str(tmp_path / "r.html"))
    assert res.drift and res.first_drift.index == 3 and len(res.windows) == 3
    records = [json.loads(x) for x in (studio_then_real / "_audit" / "audit.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["command"] == "monitor" and last["status"] == "ok"
    assert last["counts"] == {"predictions": 150, "windows": 3, "windows_flagged": 1}


def test_cli_window_default_is_the_calibrated_one():
    assert commands.MONITOR_WINDOW == stats.DEFAULT_WINDOW


# ---------------------------------------------------------------------------- the service


def _client(model: str, **settings):
    from fastapi.testclient import TestClient

    from canestra.config import Settings
    from canestra.serve.app import create_app

    return TestClient(create_app(model, Settings.load(serve_threads=1, max_batch=16, rate_limit=0, **settings)),
                      raise_server_exceptions=False)


def _post_all(c, files: list[Path]) -> None:
    for i in range(0, len(files), 16):
        r = c.post("/v1/predict/batch", files=[("file", (f.name, f.read_bytes())) for f in files[i:i + 16]])
        assert r.status_code == 200 and all(x["status"] == 200 for x in r.json()["results"])


def test_serve_scores_rolling_windows_of_its_answers(model_dir, photos):
    studio = sorted(photos["studio"].rglob("*.jpg"))
    real = sorted(photos["real"].rglob("*.jpg"))
    assert len(studio) == len(real) == 100
    with _client(model_dir) as c:
        first = c.get("/v1/drift").json()
        assert first["available"] and first["windows"] == [] and first["filling"] == 0 and first["window"] == 100
        _post_all(c, studio[:60])
        assert c.post("/v1/predict", content=studio[60].read_bytes()).status_code == 200  # single answers count too
        _post_all(c, studio[61:])
        after_studio = c.get("/v1/drift").json()
        _post_all(c, real)
        r = c.get("/v1/drift")
        assert "/v1/drift" in c.app.openapi()["paths"]
    assert [w["drift"] for w in after_studio["windows"]] == [False] and after_studio["drift"] is False
    got = r.json()
    assert got["answers"] == 200 and got["filling"] == 0
    assert [w["drift"] for w in got["windows"]] == [False, True] and got["drift"] is True
    assert {"energy", "pca_mean"} <= set(got["windows"][1]["flagged"])
    assert (got["windows"][1]["first"], got["windows"][1]["last"]) == (101, 200)
    assert not HEX64.search(r.text)  # nothing per image: no id


def test_drift_needs_the_api_key_when_keys_are_set(model_dir, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("drift-key-0123456789abcdef\n")
    keys.chmod(0o600)
    with _client(model_dir, api_keys_file=str(keys)) as c:
        assert c.get("/v1/drift").status_code == 401
        assert c.get("/v1/drift", headers={"Authorization": "Bearer drift-key-0123456789abcdef"}).status_code == 200


def test_drift_windows_score_what_monitor_scores(model_dir, photos):
    """The service's window and canestra monitor's window of the same answers get the same scores."""
    from canestra.drift.monitor import load_reference, score_window
    from canestra.serve.drift import DriftWindows
    from canestra.serve.predictor import OnlinePredictor

    predictor = OnlinePredictor.from_model_dir(model_dir, threads=1)
    ref = load_reference(model_dir)
    answers = predictor.predict_rgb([predictor.decode(f.read_bytes())
                                     for f in sorted(photos["real"].rglob("*.jpg"))[:25]])
    windows = DriftWindows(ref, window=25)
    windows.observe(answers)
    served = windows.snapshot("x")["windows"][0]
    sample = Sample.from_answers(np.stack([a.projection[:16] for a in answers]), [a.energy for a in answers],
                                 [a.fruitness for a in answers], ["" if a.unknown else a.family for a in answers],
                                 ref.categories)
    direct = score_window(ref, sample, 1, 1, "", "").to_dict()
    assert served["scores"] == direct["scores"] and served["flagged"] == direct["flagged"]


def test_a_swapped_in_model_starts_its_own_windows(model_dir):
    """serve/swap.py may replace the model a worker serves: its answers are not mixed into the old model's windows."""
    import dataclasses

    from canestra.serve.drift import ModelDrift
    from canestra.serve.predictor import load_model_spec

    spec = load_model_spec(model_dir)
    other = dataclasses.replace(spec, version="0" * 64)
    drift = ModelDrift()
    first = drift.windows(spec)
    assert drift.windows(spec) is first and first.reference is not None
    assert drift.windows(other) is not first
    assert drift.snapshot(other)["model_version"] == "0" * 12


# ---------------------------------------------------------------------------- watch


@pytest.mark.slow
def test_watch_writes_the_monitor_columns(spark, model_dir, photos, tmp_path, capsys):
    from canestra.pipeline.watch import watch
    from canestra.progress import Progress

    inbox = tmp_path / "inbox"
    shutil.copytree(photos["studio"], inbox)
    res = watch(spark, model_dir, str(inbox), str(tmp_path / "live"), once=True, progress=Progress(quiet=True))
    assert res.predicted == 100
    table = pq.read_table(tmp_path / "live" / "predictions")
    assert {"energy", "fruitness", "pca_head", "predicted_at"} <= set(table.column_names)
    code, out, _ = run_cli(capsys, "monitor", "--model", model_dir, "--predictions", str(tmp_path / "live"),
                           "--window", "50", "--json")
    assert code == 0 and len(json.loads(out)["windows"]) == 2
