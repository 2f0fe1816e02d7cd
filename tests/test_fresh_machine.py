"""A fresh machine: every advertised training option, first run, empty model cache, two Spark
workers (local[2]). Each must succeed and print only canestra's own lines: Spark/JVM output goes
to OUT/_logs/spark.log."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

OWN_LINE = re.compile(r"^(canestra |accuracy |macro-F1 |PCA |worst classes|top confusions|  |model: )")


def _train(tmp_path, sample_dir, *opts):
    cache = tmp_path / "empty-cache"
    env = dict(os.environ, CANESTRA_CACHE_DIR=str(cache), CANESTRA_MASTER="local[2]")
    env.pop("CANESTRA_DEBUG", None)
    out = tmp_path / "run"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "canestra.cli", "train", "--images", str(sample_dir),
                           "--out", str(out), *opts], capture_output=True, text=True, env=env, timeout=900)
    return proc, out, time.perf_counter() - t0


def _assert_clean(proc, out):
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    strays = [ln for ln in text.splitlines() if ln.strip() and not OWN_LINE.match(ln)]
    assert not strays, strays[:20]
    assert (out / "model" / "metadata").is_dir() and (out / "metrics.json").is_file()
    assert (out / "_logs" / "spark.log").is_file()


@pytest.mark.parametrize("opts", [
    ("--precision", "int8"), ("--precision", "int8"), ("--precision", "int8"),
    ("--image-size", "100"), ("--image-size", "224"), ("--image-size", "100,224"),
    ("--pca-variance", "0.95"),
], ids=["int8-1", "int8-2", "int8-3", "size-100", "size-224", "size-100+224", "pca-variance"])
def test_first_run_of_each_option_is_clean(tmp_path, sample_dir, opts):
    proc, out, seconds = _train(tmp_path, sample_dir, *opts)
    _assert_clean(proc, out)
    print(f"{' '.join(opts)}: ok in {seconds:.0f} s")


def test_a_failed_run_is_one_line_naming_the_cause(tmp_path, sample_dir):
    (tmp_path / "blocker").write_text("x")
    env = dict(os.environ, CANESTRA_CACHE_DIR=str(tmp_path / "blocker" / "cache"))
    proc = subprocess.run([sys.executable, "-m", "canestra.cli", "train", "--images", str(sample_dir),
                           "--out", str(tmp_path / "run"), "--precision", "int8"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2
    assert (proc.stdout + proc.stderr).strip().splitlines() == [
        f"canestra: error: the model cache {tmp_path / 'blocker' / 'cache'} is not writable (Not a directory): "
        "set CANESTRA_CACHE_DIR to a writable folder"]


def test_first_run_on_a_standalone_cluster_is_clean(tmp_path, sample_dir, spark_cluster):
    proc, out, seconds = _train(tmp_path, sample_dir, "--master", spark_cluster)
    _assert_clean(proc, out)
    print(f"--master {spark_cluster}: ok in {seconds:.0f} s")
