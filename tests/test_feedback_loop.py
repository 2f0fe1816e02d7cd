"""Issue 23 end to end (slow): a served model A gets a family wrong on real photos; users send 50
corrections with consent; B is trained with --feedback (only the new photos are featurized); the
promotion gate passes; the running service switches to B under a steady load without failing a
request; on held-out photos of that family B is right where A was wrong.

Set CANESTRA_FEEDBACK_LOG=FILE to keep the run's figures (retrain cost, the swap's request log) as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from servers import ServeProcess

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
NOT_FRUIT = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "color.png",
             "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg", "moon.png", "motorcycle_left.png",
             "motorcycle_right.png", "page.png", "rocket.jpg", "text.png", "logo.png", "retina.jpg",
             "clock_motion.png")
KEY = "feedback-loop-key-" + "fedcba9876543210" * 2
CORRECTIONS = 50


def copy(paths: list[Path], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for p in paths:
        shutil.copy(p, dest / p.name)
    return dest


def sets(base: Path, sample_dir: Path) -> dict[str, Path]:
    """Training photos of two families, 50 apple photos to correct, and the gate's fixed sets."""
    import skimage

    real = {fam: sorted((DATA / "real-photos" / fam).glob("*.jpg")) for fam in ("Apple", "Banana", "Orange")}
    out = {"studio": sample_dir}
    for fam in ("Banana", "Orange"):  # A has seen real photos of these two families, never of apples
        copy(real[fam][:40], base / "real-train" / fam)
        copy(real[fam][40:], base / "real-val" / fam)
    out["real_train"], out["real_val"] = base / "real-train", base / "real-val"
    out["corrections"] = copy(real["Apple"][:CORRECTIONS], base / "to-correct")
    out["held_out"] = copy(real["Apple"][CORRECTIONS:], base / "apple-held-out" / "Apple")
    for cls in sorted(p.name for p in sample_dir.iterdir()):  # studio photos neither model trains on
        seen = {p.name for p in (sample_dir / cls).iterdir()}
        copy([p for p in sorted((DATA / "fruits-360-sample" / "Training" / cls).glob("*.jpg"))
              if p.name not in seen][:8], base / "studio-held-out" / cls)
    out["studio_held_out"] = base / "studio-held-out"
    out["not_fruit"] = copy([Path(skimage.__file__).parent / "data" / n for n in NOT_FRUIT], base / "not-fruit")
    return out


def canestra(*args: str, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "canestra.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


class SteadyLoad:
    """One client posting the same photo back to back; every answer logged (time, status, model, family)."""

    def __init__(self, base_url: str, photo: bytes):
        self.base_url, self.photo = base_url, photo
        self.log: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, trust_env=False, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as c:
            while not self._stop.is_set():
                t0 = time.time()
                try:
                    r = c.post("/v1/predict", files={"file": ("p.jpg", self.photo)})
                    body = r.json()
                    self.log.append({"t": t0, "status": r.status_code, "ms": round((time.time() - t0) * 1000, 1),
                                     "model": body.get("model_version"), "family": body.get("family")})
                except Exception as exc:  # a refused connection or a reset is a failed request too
                    self.log.append({"t": t0, "status": type(exc).__name__, "model": None, "family": None})

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


def test_corrections_retrain_promote_and_swap_without_a_failed_request(tmp_path, sample_dir):
    from canestra.feedback import pointer as pointers
    from canestra.serve.predictor import OnlinePredictor

    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"), SPARK_LOCAL_IP="127.0.0.1",
               PYSPARK_PYTHON=sys.executable)
    env.pop("MLFLOW_TRACKING_URI", None)
    s = sets(tmp_path / "data", sample_dir)
    run, models, store = tmp_path / "runs" / "fruit", tmp_path / "models", tmp_path / "feedback"
    keys = tmp_path / "keys.txt"
    keys.write_text(KEY + "\n")
    keys.chmod(0o600)
    train = ["train", "--images", str(s["studio"]), "--images", str(s["real_train"]), "--out", str(run),
             "--no-shift-eval", "--quiet"]
    # --tolerance: one photo of the smallest set (20 photos of no fruit, 5 points each): with corrections of a
    # family, the unknown rule drops its energy threshold (answer/rule.py), and B answers one of those 20 as a
    # fruit where A refused all of them; the default tolerance (one point) refuses B for it
    gate = ["--eval-images", str(s["held_out"].parent), "--eval-images", str(s["real_val"]),
            "--eval-images", str(s["studio_held_out"]), "--unknown-images", str(s["not_fruit"]), "--tolerance", "0.05"]
    figures: dict = {}

    # model A: studio photos plus real photos of bananas and oranges; promoted first (nothing to compare with)
    done = canestra(*train, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics_a = json.loads((run / "metrics.json").read_text())
    done = canestra("promote", "--candidate", str(run / "model"), "--to", str(models / "current"), *gate, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    a = pointers.read_pointer(str(models / "current"))

    server = ServeProcess(str(models / "current"), "--feedback-dir", str(store), "--api-keys-file", str(keys),
                          "--model-poll", "1", "--rate-limit", "0", env=env)
    try:
        with httpx.Client(base_url=server.base, trust_env=False, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as c:
            a_version = c.get("/v1/model").json()["model_version"]
            assert a_version == a.version[:12]
            wrong = 0
            for photo in sorted(s["corrections"].iterdir()):
                answer = c.post("/v1/predict", files={"file": (photo.name, photo.read_bytes())}).json()
                wrong += answer["family"] != "Apple"
                r = c.post("/v1/feedback", data={"image_id": answer["image_id"], "label": "Apple", "consent": "true"})
                assert r.status_code == 201, r.text
        assert wrong >= 0.9 * CORRECTIONS, f"A got {CORRECTIONS - wrong} of the {CORRECTIONS} apples right already"
        assert len(list((store / "family" / "Apple").glob("*.jpg"))) == CORRECTIONS

        # model B: the same run folder, plus the store: only the 50 new photos (and their views) go to the CNN
        done = canestra(*train, "--feedback", str(store), env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        metrics_b = json.loads((run / "metrics.json").read_text())
        assert metrics_b["feature_store"]["featurized"] == CORRECTIONS
        assert metrics_b["feature_store"]["reused"] == metrics_a["feature_store"]["featurized"]
        assert metrics_b["ingest"]["read"] == CORRECTIONS
        figures["retrain"] = {
            "full_run_featurize_s": metrics_a["timings_s"]["featurize"],
            "full_run_images": metrics_a["feature_store"]["featurized"],
            "plus_corrections_featurize_s": metrics_b["timings_s"]["featurize"],
            "plus_corrections_images": metrics_b["feature_store"]["featurized"],
            "augmented_views_per_family_photo": 4,
            "full_run_total_s": metrics_a["timings_s"]["total"], "retrain_total_s": metrics_b["timings_s"]["total"]}

        # the gate passes, and the running service switches to B under a steady load
        probe = sorted(s["held_out"].iterdir())[0].read_bytes()
        with SteadyLoad(server.base, probe) as load:
            time.sleep(3)
            t_promote = time.time()
            done = canestra("promote", "--candidate", str(run / "model"), "--to", str(models / "current"), *gate,
                            env=env)
            assert done.returncode == 0, (done.stdout, done.stderr[-3000:])
            t_promoted = time.time()
            b = pointers.read_pointer(str(models / "current"))
            deadline = time.time() + 120
            while time.time() < deadline and not [x for x in load.log[-20:] if x["model"] == b.version[:12]]:
                time.sleep(0.2)
            time.sleep(3)
        log = load.log
    finally:
        output = server.stop()
    figures["gate"] = done.stdout
    failed = [x for x in log if x["status"] != 200]
    versions = [x["model"] for x in log]
    switches = [i for i in range(1, len(versions)) if versions[i] != versions[i - 1]]
    swapped = [json.loads(ln) for ln in output.splitlines() if '"serve.model_swapped"' in ln]
    figures["swap"] = {
        "requests": len(log), "failed": len(failed), "models": sorted(set(versions)),
        "requests_on_a": versions.count(a.version[:12]), "requests_on_b": versions.count(b.version[:12]),
        "promote_s": round(t_promoted - t_promote, 2),
        "first_b_answer_after_promote_started_s": round(log[switches[0]]["t"] - t_promote, 2) if switches else None,
        "latency_ms_max": max(x.get("ms", 0) for x in log),
        "latency_ms_median": sorted(x.get("ms", 0) for x in log)[len(log) // 2],
        "server_line": swapped[0] if swapped else None,
        "around_the_switch": log[max(0, switches[0] - 3):switches[0] + 3] if switches else []}
    assert failed == [], failed[:5]
    assert len(switches) == 1 and versions[0] == a.version[:12] and versions[-1] == b.version[:12], switches
    assert len(swapped) == 1 and swapped[0]["previous_model_version"] == a.version[:12]
    assert log[-1]["family"] == "Apple"

    # on held-out apple photos, B is right where A was wrong
    pa, pb = (OnlinePredictor.from_model_dir(p.model_dir) for p in (a, b))
    a_wrong = b_fixed = 0
    for photo in sorted(s["held_out"].iterdir()):
        data = photo.read_bytes()
        if pa.predict_bytes(data).family != "Apple":
            a_wrong += 1
            b_fixed += pb.predict_bytes(data).family == "Apple"
    figures["held_out"] = {"photos": len(list(s["held_out"].iterdir())), "a_wrong": a_wrong, "b_right_of_those": b_fixed}
    if os.environ.get("CANESTRA_FEEDBACK_LOG"):
        Path(os.environ["CANESTRA_FEEDBACK_LOG"]).write_text(json.dumps({**figures, "requests": log}, indent=1))
    print(json.dumps(figures, indent=1))
    assert a_wrong >= 20 and b_fixed >= 0.8 * a_wrong, figures["held_out"]


def test_with_polling_off_sighup_swaps_every_worker(trained, tmp_path):
    """--model-poll 0: a moved pointer is taken on SIGHUP only; with two workers, each swaps (the
    supervisor passes SIGHUP on) and /metrics, summed over workers, shows the new model alone."""
    import signal

    from test_promote import worse_copy

    from canestra.feedback import pointer as pointers
    from canestra.serve.predictor import load_model_spec

    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"))
    a = os.path.join(trained.out_dir, "model")
    w = worse_copy(a, tmp_path / "worse" / "model")
    va, vw = load_model_spec(a), load_model_spec(w)
    current = tmp_path / "models" / "current"
    pointers.write_pointer(str(current), pointers.shelve(a, str(current), va.model_version), va.version)
    server = ServeProcess(str(current), "--model-poll", "0", "--rate-limit", "0", env=env, workers=2)
    photo = sorted((ROOT / "sample" / "fruits-360" / "Banana").glob("*.jpg"))[0].read_bytes()
    try:
        with httpx.Client(base_url=server.base, trust_env=False, timeout=60) as c:
            def versions(n: int = 12) -> set[str]:
                return {c.post("/v1/predict", files={"file": ("b.jpg", photo)}).json()["model_version"]
                        for _ in range(n)}

            assert versions() == {va.model_version}
            pointers.write_pointer(str(current), w, vw.version)
            time.sleep(3)
            assert versions() == {va.model_version}  # no polling: the pointer moved, the service did not
            server.proc.send_signal(signal.SIGHUP)
            deadline = time.time() + 60
            while time.time() < deadline and versions() != {vw.model_version}:
                time.sleep(0.5)
            assert versions(20) == {vw.model_version}
            metrics = c.get("/metrics").text
        assert f'canestra_model_info{{model_version="{vw.model_version}"}} 1.0' in metrics
        assert f'canestra_model_info{{model_version="{va.model_version}"}} 0.0' in metrics
    finally:
        output = server.stop()
    swapped = [json.loads(ln) for ln in output.splitlines() if '"serve.model_swapped"' in ln]
    assert len({x["pid"] for x in swapped}) == 2 and {x["model_version"] for x in swapped} == {vw.model_version}
