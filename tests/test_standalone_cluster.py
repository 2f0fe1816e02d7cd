"""`--master spark://…` works unchanged: a real standalone cluster (1 master + 2 workers on
127.0.0.1) gives the same predictions as local[*]."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"port {port} never opened")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import pyspark

    spark_home = os.path.dirname(pyspark.__file__)
    spark_class = os.path.join(spark_home, "bin", "spark-class")
    logs = tmp_path_factory.mktemp("cluster-logs")
    env = dict(os.environ, SPARK_HOME=spark_home, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable,
               SPARK_WORKER_DIR=str(logs / "work"))
    port = _free_port()
    procs = []
    try:
        procs.append(subprocess.Popen(
            [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
             "--webui-port", str(_free_port())],
            env=env, stdout=open(logs / "master.log", "w"), stderr=subprocess.STDOUT))
        _wait_port(port)
        url = f"spark://127.0.0.1:{port}"
        for i in range(2):
            procs.append(subprocess.Popen(
                [spark_class, "org.apache.spark.deploy.worker.Worker", url, "--host", "127.0.0.1",
                 "--cores", "1", "--memory", "2g", "--webui-port", str(_free_port())],
                env=env, stdout=open(logs / f"worker{i}.log", "w"), stderr=subprocess.STDOUT))
        deadline = time.time() + 60
        while time.time() < deadline:  # both workers registered?
            text = (logs / "master.log").read_text(errors="replace")
            if text.count("Registering worker") >= 2:
                break
            time.sleep(0.5)
        else:
            pytest.fail("workers did not register:\n" + (logs / "master.log").read_text())
        yield url
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _predictions(path: Path) -> dict[str, tuple[str, float]]:
    with open(path, newline="") as fh:
        return {r["path"]: (r["prediction"], float(r["probability"])) for r in csv.DictReader(fh)}


def test_standalone_cluster_predicts_like_local(cluster, trained, sample_dir, tmp_path):
    model = os.path.join(trained.out_dir, "model")
    outs = {}
    for name, master in (("local", "local[2]"), ("cluster", cluster)):
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
