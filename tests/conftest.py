"""Shared fixtures: one local SparkSession per test run, the bundled sample, a trained model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample" / "fruits-360"
SHARED = ROOT.parent / "shared" / "data" / "fruits-360-sample" / "Training"
sys.path.insert(0, str(Path(__file__).parent))  # tests/corpus.py

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


@pytest.fixture(scope="session")
def spark():
    from canestra.sparkctx import get_spark

    session = get_spark("local[2]", app_name="canestra-tests",
                        conf={"spark.sql.execution.arrow.maxRecordsPerBatch": "128", "spark.sql.shuffle.partitions": "2",
                              "spark.default.parallelism": "2"})
    yield session
    session.stop()


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    assert SAMPLE.is_dir(), "the bundled sample is missing"
    return SAMPLE


@pytest.fixture(scope="session")
def trained(spark, tmp_path_factory, sample_dir):
    """Train once on the bundled sample (10 classes x 32 images) for the tests that need a model."""
    from canestra.config import Settings
    from canestra.pipeline.train import train
    from canestra.progress import Progress

    out = tmp_path_factory.mktemp("trained")
    cfg = Settings.load(pca_k=32, max_iter=30)
    result = train(spark, str(sample_dir), str(out), cfg, Progress(quiet=True))
    return result


@pytest.fixture(scope="session")
def spark_cluster(tmp_path_factory):
    """A Spark standalone cluster (1 master + 2 one-core workers) on 127.0.0.1; its master URL."""
    from cluster import standalone_cluster

    with standalone_cluster(tmp_path_factory.mktemp("cluster-logs")) as url:
        yield url


@pytest.fixture(scope="session")
def canestra_wheel(tmp_path_factory) -> Path:
    """canestra built as a wheel with `pip wheel` (what the EMR bootstrap action installs)."""
    import shutil
    import subprocess

    dest = tmp_path_factory.mktemp("wheel")
    # Build from a clean copy: pip builds in-tree, and a stale build/lib of the checkout would
    # slip modules that no longer exist in src/ into the wheel.
    tree = tmp_path_factory.mktemp("wheel-src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest),
                    str(tree)], check=True, capture_output=True, text=True, timeout=300)
    wheels = sorted(dest.glob("canestra-*.whl"))
    assert wheels, "pip wheel produced no canestra wheel"
    return wheels[-1]


@pytest.fixture
def small_tmpfs(tmp_path):
    """``make(size)``: a real small disk (tmpfs) mounted under tmp_path, for true ENOSPC faults;
    the test is skipped with its reason where mounting is not allowed (needs root or CAP_SYS_ADMIN)."""
    import shutil
    import subprocess
    import uuid

    mounted = []

    def make(size: str = "8m") -> Path:
        mnt = tmp_path / f"disk{len(mounted)}"
        mnt.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command: cannot make a real full disk here")
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"canestra-test-{uuid.uuid4().hex[:6]}",
                              str(mnt)], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs ({res.stderr.strip() or res.returncode}; needs root or "
                        "CAP_SYS_ADMIN)")
        mounted.append(mnt)
        return mnt

    yield make
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
