"""`--master spark://…` works unchanged: a real standalone cluster (1 master + 2 workers on
127.0.0.1) gives the same predictions as local[*]."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _predictions(path: Path) -> dict[str, tuple[str, float]]:
    with open(path, newline="") as fh:
        return {r["image_id"]: (r["prediction"], float(r["probability"])) for r in csv.DictReader(fh)}  # no paths by default (GDPR Art. 25)


def test_standalone_cluster_predicts_like_local(spark_cluster, trained, sample_dir, tmp_path):
    model = os.path.join(trained.out_dir, "model")
    outs = {}
    for name, master in (("local", "local[2]"), ("cluster", spark_cluster)):
        out = tmp_path / name
        proc = subprocess.run(
            [sys.executable, "-m", "canestra.cli", "predict", "--model", model, "--images", str(sample_dir),
             "--out", str(out), "--master", master],
            capture_output=True, text=True, timeout=600,
            env=dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[name] = _predictions(out / "predictions.csv")
    assert len(outs["local"]) == 320
    assert outs["local"].keys() == outs["cluster"].keys()
    for path, (pred, prob) in outs["local"].items():
        assert outs["cluster"][path][0] == pred
        assert abs(outs["cluster"][path][1] - prob) < 1e-5
