"""The EMR step, run here: the wheel `pip wheel` builds, installed apart from the source
tree as the bootstrap action installs it, and the exact step command of the
CloudFormation template (`spark-submit ... emr_step.py train ...`), with the S3 URIs,
YARN and the node's venv swapped for local paths and a standalone cluster on 127.0.0.1.
It must train the same model as `canestra train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from canestra.deploy import aws as deploy_aws
from canestra.vision import backbone

pytestmark = pytest.mark.slow

KIT = Path(__file__).resolve().parents[1] / "src" / "canestra" / "deploy" / "aws_kit"
# The `trained` fixture's settings, passed the way the template passes TrainArgs.
TRAIN_ARGS = ("--pca-k", "32", "--max-iter", "30")


def test_emr_step_trains_like_canestra_train(spark_cluster, trained, canestra_wheel, sample_dir, tmp_path):
    import pyspark

    site = tmp_path / "site"  # stands in for /opt/canestra/venv on an EMR node
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(canestra_wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    out = tmp_path / "run"
    script = str(KIT / deploy_aws.STEP_SCRIPT_NAME)
    cache = str(backbone.cache_dir())

    # The template's step, with each EMR-only value mapped to its local stand-in.
    bucket = "example-bucket"
    on_emr = deploy_aws.emr_steps(bucket, TRAIN_ARGS)["canestra-train"]
    local_for = {"yarn": spark_cluster, deploy_aws.VENV_PYTHON: sys.executable, deploy_aws.NODE_CACHE_DIR: cache,
                 f"s3://{bucket}/artifacts/emr_step.py": script, f"s3://{bucket}/images/": str(sample_dir),
                 f"s3://{bucket}/runs/train": str(out)}

    def localize(arg: str) -> str:
        for emr_value, local_value in local_for.items():
            arg = arg.replace(emr_value, local_value)
        return arg

    step = deploy_aws.step_args("train", ["--images", str(sample_dir), "--out", str(out), *TRAIN_ARGS],
                                step_script=script, master=spark_cluster, python=sys.executable, cache_dir=cache)
    assert step == [localize(a) for a in on_emr]

    spark_submit = os.path.join(os.path.dirname(pyspark.__file__), "bin", "spark-submit")
    # The only addition: where this "node" installed the wheel, for driver and executors.
    argv = [spark_submit, f"--conf=spark.executorEnv.PYTHONPATH={site}", *step[1:]]
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYTHONPATH=str(site), PYSPARK_PYTHON=sys.executable)
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # It ran the installed wheel, not the source checkout (spark-submit sends the Python
    # driver's stderr to its stdout).
    log = proc.stdout + proc.stderr
    said = [ln for ln in log.splitlines() if ln.startswith("emr_step:")]
    assert said == [f"emr_step: canestra {trained.metrics['canestra_version']} from {site}/canestra/__init__.py"], said

    got = json.loads((out / "metrics.json").read_text())
    want = trained.metrics
    assert (out / "model").is_dir()
    assert got["confusion_matrix"]["labels"] == want["confusion_matrix"]["labels"]
    assert got["counts"]["test"] == want["counts"]["test"] and got["n"] == want["n"]
    assert got["counts"]["train"] == want["counts"]["train"]
    assert got["pca"]["k"] == want["pca"]["k"] == 32
    # Same features and split; LR fitted over other partitions may differ in the last bits.
    assert abs(got["accuracy"] - want["accuracy"]) <= 1e-6
