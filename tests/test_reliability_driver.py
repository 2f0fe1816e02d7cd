"""The driver killed with kill -9 during featurize of `canestra train`, then re-run into the same
--out: the re-run completes (the dead run's lock is taken over), with no duplicate rows and no
half-written table under a final name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from procs import descendants, gone

from canestra.storage.lock import LOCK_NAME

pytestmark = pytest.mark.slow

ARGS = ["--image-size", "100", "--pca-k", "16", "--max-iter", "20", "--no-shift-eval", "--master", "local[2]"]


def _table_ids(folder: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(folder, columns=["image_id"]).column("image_id").to_pylist()


def test_train_driver_killed_during_featurize_then_rerun_completes(tmp_path, sample_dir):
    out = tmp_path / "run"
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
    cmd = [sys.executable, "-m", "canestra.cli", "train", "--images", str(sample_dir), "--out", str(out), *ARGS]
    victim = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(victim.stderr), daemon=True).start()
    deadline = time.time() + 600
    # Mid-featurize: the stage has begun and Spark has started writing (a _staging folder exists).
    while time.time() < deadline and victim.poll() is None:
        if any("▸ featurize" in ln for ln in lines) and any(out.rglob("_staging/*")):
            break
        time.sleep(0.2)
    assert victim.poll() is None, "".join(lines)[-3000:]
    assert not any("✓ featurize" in ln for ln in lines), "featurize ended before the kill"
    family = descendants(victim.pid)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL and gone(victim.pid)
    deadline = time.time() + 120  # its JVM notices the closed gateway and exits
    while time.time() < deadline and not all(gone(p) for p in family):
        time.sleep(0.5)
    for p in family:  # never leave our own processes behind, whatever happened
        if not gone(p):
            os.kill(p, signal.SIGKILL)
    # What the kill left: its lock (naming the dead pid), no published features or model.
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == victim.pid
    assert not (out / "features").exists() and not (out / "model").exists()

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"took over the lock of canestra train (pid {victim.pid}" in rerun.stderr
    catalog = _table_ids(out / "catalog")
    features = _table_ids(out / "features")
    assert len(catalog) == 320 and sorted(features) == sorted(catalog)  # every image once, no duplicates
    store = [p for p in (out / "feature_store").glob("*/part-*") if (p / "_canestra.json").exists()]
    stored = [i for p in store for i in _table_ids(p)]
    assert len(stored) == len(set(stored)) == 320  # the store holds each embedding once
    assert not (out / "_staging").exists() and not (out / LOCK_NAME).exists()
    from canestra.model import check_model_dir

    check_model_dir(str(out / "model"))
    assert json.loads((out / "metrics.json").read_text())["counts"]["images"] == 320
