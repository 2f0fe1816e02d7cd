"""A throwaway Spark standalone cluster (1 master + N workers) on 127.0.0.1 for tests.

Shared by the ``spark_cluster`` fixture in conftest.py (test_standalone_cluster.py,
test_emr_step.py): started at most once per test session.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"port {port} never opened")


def spark_home() -> str:
    import pyspark

    return os.path.dirname(pyspark.__file__)


@contextlib.contextmanager
def standalone_cluster(logs: Path, workers: int = 2, cores: int = 1, memory: str = "2g") -> Iterator[str]:
    """Start a master and ``workers`` workers bound to 127.0.0.1; yield the master URL."""
    spark_class = os.path.join(spark_home(), "bin", "spark-class")
    env = dict(os.environ, SPARK_HOME=spark_home(), SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable,
               SPARK_WORKER_DIR=str(logs / "work"))
    port = free_port()
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen(
            [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
             "--webui-port", str(free_port())],
            env=env, stdout=open(logs / "master.log", "w"), stderr=subprocess.STDOUT))
        wait_port(port)
        url = f"spark://127.0.0.1:{port}"
        for i in range(workers):
            procs.append(subprocess.Popen(
                [spark_class, "org.apache.spark.deploy.worker.Worker", url, "--host", "127.0.0.1",
                 "--cores", str(cores), "--memory", memory, "--webui-port", str(free_port())],
                env=env, stdout=open(logs / f"worker{i}.log", "w"), stderr=subprocess.STDOUT))
        deadline = time.time() + 240  # a busy 2-core machine can take minutes
        while time.time() < deadline:  # all workers registered?
            if (logs / "master.log").read_text(errors="replace").count("Registering worker") >= workers:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError("workers did not register:\n" + (logs / "master.log").read_text())
        yield url
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
