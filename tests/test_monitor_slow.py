"""The drift monitor on real data (issue 22, part 4), end to end: train, predict, `canestra monitor --json`.

A model is trained on part of ../shared/data/fruits-360-sample (studio photos); the frames it never saw
are predicted and monitored:

- 1,000 studio frames it never saw, in one predict run: no window of 100 is flagged;
- 500 of those, then (a later predict run into the same --out) 500 real photos (grocery-photos-val,
  real-photos, topped up from grocery-photos): the windows of studio frames are not flagged, and a
  window is flagged within the first 200 real photos;
- the false-alarm rate on studio-only windows: the share of windows of 100 flagged over every
  window of the 1,000 frames' predictions, in their time order and in 20 seeded random orders.

The test trains on 25 of the 114 classes (a few minutes on 2 cores). The figures in docs/monitoring.md come
from the full-size run, every class (80 frames per class to train, the other 40 never seen)::

    .venv/bin/python tests/test_monitor_slow.py --classes 114 --out /tmp/drift-full   # prints JSON
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
STUDIO = DATA / "fruits-360-sample" / "Training"
REAL_ROOTS = (DATA / "grocery-photos-val", DATA / "real-photos", DATA / "grocery-photos")
WINDOW = 100
SHUFFLES = 20


def _frame_key(name: str) -> tuple[str, int]:
    m = re.match(r"^(.*?)(\d+)_100\.jpg$", name)
    return (m.group(1), int(m.group(2))) if m else (name, 0)


def split_studio(dest: Path, classes: int, seed: int = 7) -> tuple[Path, Path]:
    """``classes`` classes spread over the sample's 114: per class, its frames in 6 contiguous blocks (20
    frames each), 4 blocks to train on and 2 never seen (drawn per class, seeded). (train root, unseen root)."""
    rng = np.random.default_rng(seed)
    names = sorted(p.name for p in STUDIO.iterdir() if p.is_dir())
    picked = [names[i] for i in np.linspace(0, len(names) - 1, classes).astype(int)]
    train, unseen = dest / "train", dest / "unseen"
    for cls in picked:
        frames = sorted((p.name for p in (STUDIO / cls).glob("*.jpg")), key=_frame_key)
        blocks = np.array_split(np.arange(len(frames)), 6)
        held = set(rng.choice(6, 2, replace=False).tolist())
        for b, idx in enumerate(blocks):
            target = (unseen if b in held else train) / cls
            target.mkdir(parents=True, exist_ok=True)
            for i in idx:
                shutil.copy(STUDIO / cls / frames[i], target / frames[i])
    return train, unseen


def pick(root: Path, n: int, dest: Path, seed: int = 11) -> Path:
    """``n`` images of ``root`` (class folders kept), seeded."""
    files = sorted(root.rglob("*.jpg"))
    chosen = np.random.default_rng(seed).choice(len(files), n, replace=False)
    for i in sorted(chosen):
        f = files[i]
        (dest / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest / f.parent.name / f.name)
    return dest


def real_photos(dest: Path, n: int = 500) -> Path:
    """``n`` real photos: every one of grocery-photos-val and real-photos (462), topped up from grocery-photos."""
    count = 0
    for root in REAL_ROOTS:
        for f in sorted(root.rglob("*.jpg")):
            if count == n:
                return dest
            target = dest / f"{root.name}-{f.parent.name}"
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target / f.name)
            count += 1
    return dest


def monitor_json(model: str, predictions: Path, window: int = WINDOW) -> dict:
    from canestra.cli import commands

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = commands.main(["monitor", "--model", model, "--predictions", str(predictions), "--window", str(window),
                              "--json"])
    assert code == 0
    return json.loads(buf.getvalue())


def shuffled_false_alarms(model: str, predictions: Path, window: int = WINDOW, orders: int = SHUFFLES) -> dict:
    """Windows of ``window`` over the predictions in ``orders`` seeded random orders: how many are flagged."""
    from canestra.drift.monitor import load_reference, score_window
    from canestra.drift.stats import Sample
    from canestra.drift.table import read_predictions

    ref = load_reference(model)
    rows = read_predictions(str(predictions))
    sample = Sample.from_answers(rows.pca[:, :ref.pca_components], rows.energy, rows.fruitness, rows.family,
                                 ref.categories)
    rng = np.random.default_rng(0)
    flagged, total, per = 0, 0, dict.fromkeys(ref.thresholds[WINDOW], 0)
    for _ in range(orders):
        order = rng.permutation(len(sample))
        for i in range(len(sample) // window):
            w = score_window(ref, sample.take(order[i * window:(i + 1) * window]), i + 1, 1, "", "")
            flagged += w.drift
            total += 1
            for s in w.flagged:
                per[s] += 1
    return {"windows": total, "flagged": flagged, "rate": flagged / total, "by_statistic": per, "orders": orders}


def drift_check(work: Path, classes: int, spark=None) -> dict:
    """Train, predict and monitor as the module docstring says; the figures as a dict."""
    import time

    from canestra import api

    train_root, unseen = split_studio(work / "data", classes)
    t0 = time.perf_counter()
    # The shift evaluation stays on: its perturbed held-out images are the drift thresholds' second calibration.
    run = api.train(str(train_root), str(work / "model-run"), spark=spark, quiet=True)
    model = run.model_path
    trained_s = time.perf_counter() - t0
    n_unseen = sum(1 for _ in unseen.rglob("*.jpg"))
    studio = pick(unseen, min(1000, n_unseen), work / "studio1000")
    api.predict(model, str(studio), str(work / "pred-studio"), spark=spark, quiet=True)
    only_studio = monitor_json(model, work / "pred-studio")

    half = pick(studio, 500, work / "studio500", seed=12)
    real = real_photos(work / "real500")
    api.predict(model, str(half), str(work / "pred-mixed"), spark=spark, quiet=True)
    api.predict(model, str(real), str(work / "pred-mixed"), spark=spark, quiet=True, incremental=True)
    mixed = monitor_json(model, work / "pred-mixed")
    mixed50 = monitor_json(model, work / "pred-mixed", 50)
    first = mixed["first_drift_window"]
    first50 = mixed50["first_drift_window"]

    pool = work / "pred-unseen"  # every unseen frame, for the shuffled false-alarm estimate
    api.predict(model, str(unseen), str(pool), spark=spark, quiet=True)
    return {
        "classes": classes, "train_images": run.metrics["counts"]["train"], "held_out": run.metrics["n"],
        "accuracy": run.metrics["accuracy"], "train_s": round(trained_s, 1),
        "studio_only": {"predictions": only_studio["predictions_scored"], "windows": len(only_studio["windows"]),
                        "flagged": only_studio["windows_flagged"],
                        "max_ratio": {s: round(max(w["scores"][s] / max(w["thresholds"][s], 1e-12)
                                                   for w in only_studio["windows"]), 3)
                                      for s in only_studio["windows"][0]["scores"]}},
        "studio_then_real": {
            "window": WINDOW, "flagged": [w["window"] for w in mixed["windows"] if w["drift"]],
            "first_drift_window": first,
            "first_drift_predictions": [mixed["windows"][first - 1]["first"], mixed["windows"][first - 1]["last"]]
            if first else None,
            "first_drift_statistics": mixed["windows"][first - 1]["flagged"] if first else None,
            "window_50_first_drift": [mixed50["windows"][first50 - 1]["first"], mixed50["windows"][first50 - 1]["last"]]
            if first50 else None,
            "studio_windows_flagged": sum(w["drift"] for w in mixed["windows"] if w["last"] <= 500)},
        "false_alarms_unseen_pool": {"images": n_unseen, **shuffled_false_alarms(model, pool / "predictions")},
        "false_alarms_time_order": {"windows": len(only_studio["windows"]), "flagged": only_studio["windows_flagged"]},
    }


@pytest.mark.slow
def test_drift_is_flagged_on_real_photos_and_not_on_unseen_studio_frames(spark, tmp_path):
    if not STUDIO.is_dir() or not all(r.is_dir() for r in REAL_ROOTS):
        pytest.skip("../shared/data is not here")
    got = drift_check(tmp_path, classes=25, spark=spark)
    print(json.dumps(got))
    assert got["studio_only"]["windows"] == 10 and got["studio_only"]["flagged"] == 0
    mixed = got["studio_then_real"]
    assert mixed["studio_windows_flagged"] == 0
    first, last = mixed["first_drift_predictions"]
    assert first > 500 and last <= 700  # flagged within the first 200 real photos
    assert got["false_alarms_unseen_pool"]["rate"] <= 0.05


if __name__ == "__main__":  # the full-size figures of docs/monitoring.md
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=114)
    parser.add_argument("--out", required=True, help="work folder (deleted first)")
    a = parser.parse_args()
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    sys.path.insert(0, str(Path(__file__).parent))
    print(json.dumps(drift_check(Path(a.out), a.classes)))
