"""An executor JVM of a Spark standalone cluster (127.0.0.1) killed with kill -9 in the middle of
`canestra predict`: Spark re-runs its tasks elsewhere and the predictions equal a clean run's."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import SHARED
from procs import children, gone

pytestmark = pytest.mark.slow

FIXTURE_MODEL = Path(__file__).parent / "fixtures" / "model-0.1.0"  # 100 px: the CNN part stays short
EXECUTOR = "org.apache.spark.executor.CoarseGrainedExecutorBackend"


def _images(tmp_path: Path, sample_dir: Path) -> Path:
    """Enough images that the job is still running when an executor dies: 8 x 120 from the large
    set when it is there (links, nothing copied), else the bundled sample."""
    if not SHARED.is_dir():
        return sample_dir
    root = tmp_path / "images"
    for cls in sorted(p for p in SHARED.iterdir() if p.is_dir())[:8]:
        (root / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:120]:
            (root / cls.name / f.name).symlink_to(f)
    return root


def _executors(work_dir: Path) -> list[int]:
    """Executor JVMs of this test's cluster: they run inside its worker folder."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace")
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if EXECUTOR in cmdline and cwd.startswith(str(work_dir)):
            pids.append(int(entry))
    return pids


def _predictions(path: Path) -> dict[str, tuple[str, float]]:
    with open(path, newline="") as fh:
        return {r["image_id"]: (r["prediction"], float(r["probability"])) for r in csv.DictReader(fh)}


def test_executor_killed_mid_predict_gives_same_predictions(tmp_path, tmp_path_factory, sample_dir):
    from cluster import standalone_cluster

    images = _images(tmp_path, sample_dir)
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)

    def predict(out: Path, master: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "canestra.cli", "predict", "--model", str(FIXTURE_MODEL),
                                 "--images", str(images), "--out", str(out), "--master", master],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    clean = predict(tmp_path / "clean", "local[2]")
    assert clean.wait(timeout=900) == 0, clean.stderr.read()[-3000:]

    logs = tmp_path_factory.mktemp("kill-cluster")
    with standalone_cluster(logs) as url:
        job = predict(tmp_path / "faulty", url)
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(job.stderr), daemon=True).start()
        victim = None
        deadline = time.time() + 600
        while time.time() < deadline and job.poll() is None and victim is None:
            if any("▸ predict" in ln for ln in lines):
                busy = [p for p in _executors(logs / "work") if children(p)]
                if busy:
                    victim = busy[0]
            time.sleep(0.2)
        assert victim is not None and job.poll() is None, "".join(lines)[-3000:]
        assert not any("✓ predict" in ln for ln in lines), "the job ended before the kill"
        os.kill(victim, signal.SIGKILL)
        deadline = time.time() + 30
        while time.time() < deadline and not gone(victim):
            time.sleep(0.1)
        assert gone(victim)  # the executor really died mid-job
        assert job.wait(timeout=900) == 0, "".join(lines)[-3000:]
        assert victim not in _executors(logs / "work")
    clean_preds = _predictions(tmp_path / "clean" / "predictions.csv")
    faulty = _predictions(tmp_path / "faulty" / "predictions.csv")
    assert len(clean_preds) >= 320 and faulty.keys() == clean_preds.keys()
    for image_id, (label, prob) in clean_preds.items():
        assert faulty[image_id][0] == label and abs(faulty[image_id][1] - prob) < 1e-5
