"""Spark/JVM noise stays out of the terminal: `canestra train` and `canestra predict` on the bundled
sample print only canestra's own lines, on a machine whose JVM cannot load a native BLAS (the
"netlib-blas: JNI_OnLoad: dlopen(libblas.so.3) failed" notice): that notice goes to the Spark log
and becomes one plain line, said once per machine."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

OWN_LINE = re.compile(r"^(canestra[ :]|accuracy |macro-F1 |PCA |worst classes|top confusions|  |model: "
                      r"|\d+ predictions -> )")
MISSING_BLAS = "libcanestra-missing-blas.so.3"  # the JVM's BLAS loader is pointed at a library that is not there


def _run(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "canestra.cli", *args], capture_output=True, text=True,
                          env=env, timeout=900)


def _strays(proc) -> list[str]:
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip() and not OWN_LINE.match(ln)]


def test_train_and_predict_print_only_canestra_lines(tmp_path, sample_dir):
    from canestra.vision.backbone import cache_dir

    cache = tmp_path / "cache"  # the built CNN graphs, without any "said once" markers
    cache.mkdir()
    for graph in cache_dir().glob("*.onnx"):
        shutil.copy(graph, cache / graph.name)
    env = {k: v for k, v in os.environ.items() if k not in ("CANESTRA_DEBUG", "CANESTRA_SPARK_LOG")}
    env.update(CANESTRA_CACHE_DIR=str(cache), SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable,
               JAVA_TOOL_OPTIONS=f"-Ddev.ludovic.netlib.blas.nativeLib={MISSING_BLAS}")
    out = tmp_path / "run"
    train = _run(env, "train", "--images", str(sample_dir), "--out", str(out), "--master", "local[2]",
                 "--image-size", "100", "--pca-k", "16", "--max-iter", "20", "--no-shift-eval")
    assert train.returncode == 0, (train.stdout + train.stderr)[-3000:]
    assert not _strays(train), _strays(train)[:20]
    log = (out / "_logs" / "spark.log").read_text(errors="replace")
    # The noise really was produced, into the log: the JVM picked up the option, and the BLAS load failed.
    assert f"dlopen({MISSING_BLAS}) failed" in log and "Picked up JAVA_TOOL_OPTIONS" in log
    notes = [ln for ln in train.stderr.splitlines() if ln.startswith("canestra: note: no native BLAS")]
    assert len(notes) == 1 and MISSING_BLAS in notes[0], train.stderr
    # canestra train records which canestra wrote the model (canestra.model).
    info = json.loads((out / "model" / "canestra_model.json").read_text())
    from canestra import __version__
    from canestra.model import MODEL_FORMAT

    assert info["canestra_version"] == __version__ and info["model_format"] == MODEL_FORMAT
    assert [c.rsplit(".", 1)[-1] for c in info["stages"]] == [
        "ImageFeaturizer", "PCAModel", "LogisticRegressionModel", "LogisticRegressionModel", "AnswerModel"]

    pred = _run(env, "predict", "--model", str(out / "model"), "--images", str(sample_dir),
                "--out", str(tmp_path / "pred"), "--master", "local[2]")
    assert pred.returncode == 0, (pred.stdout + pred.stderr)[-3000:]
    assert not _strays(pred), _strays(pred)[:20]
    assert "no native BLAS" not in pred.stderr  # said once per machine, not on every run
    assert (tmp_path / "pred" / "_logs" / "spark.log").stat().st_size > 0
