"""--out on a full disk: exit 2 with "no space left on device", earlier predictions intact.

The real test mounts a small tmpfs (a true ENOSPC from the kernel, for Python and the JVM
alike); where mounting is not allowed it is skipped, and the deterministic tests of the
error mapping below still run.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from canestra._faults import typed_error
from canestra.cli import commands
from canestra.errors import DiskFull
from canestra.storage.lock import LOCK_NAME

FIXTURE_MODEL = Path(__file__).parent / "fixtures" / "model-0.1.0"
ENV = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)
PLAIN = "no space left on device: free disk space or choose another --out"


# ----------------------------------------------------------------------------- the error mapping


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, "No space left on device"),  # Python's own writes (predictions.csv)
    RuntimeError("An error occurred while calling o123.parquet.\n: org.apache.spark.SparkException: Job aborted."
                 "\nCaused by: java.io.IOException: No space left on device\n\tat java.base/..."),  # the JVM
    RuntimeError("Python worker failed: OSError: [Errno 122] Disk quota exceeded: '/out/_staging/x'"),
])
def test_enospc_texts_map_to_one_plain_line(exc):
    assert str(typed_error(exc)) == PLAIN and isinstance(typed_error(exc), DiskFull)


def test_enospc_by_errno_in_the_cause_chain():
    try:
        try:
            raise OSError(errno.ENOSPC, "write failed")  # no telltale text: found by errno
        except OSError as inner:
            raise RuntimeError("publishing failed") from inner
    except RuntimeError as exc:
        assert str(typed_error(exc)) == PLAIN and isinstance(typed_error(exc), DiskFull)
    assert typed_error(RuntimeError("something else")) is None


def test_cli_exits_2_on_enospc_during_the_job(tmp_path, sample_dir, monkeypatch, capsys):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "out" / "predictions.csv"))

    monkeypatch.setattr(commands, "_run_job", full_disk)
    code = commands.main(["predict", "--model", str(FIXTURE_MODEL), "--images", str(sample_dir / "Kiwi"),
                          "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"canestra: error: {PLAIN}"]
    assert not (tmp_path / "out" / LOCK_NAME).exists()


# ----------------------------------------------------------------------------- a real full disk


@pytest.fixture
def small_disk(small_tmpfs):
    return small_tmpfs("8m")  # skipped where mounting is not allowed (the mapping tests above still run)


def _fill(mnt: Path, leave_kb: int) -> None:
    """Fill the disk until only ``leave_kb`` KiB are free."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with open(mnt / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave_kb * 1024))


def _predict(images: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "canestra.cli", "predict", "--model", str(FIXTURE_MODEL),
                           "--images", str(images), "--out", str(out), "--master", "local[1]", "--quiet"],
                          capture_output=True, text=True, timeout=600, env=ENV)


@pytest.mark.slow
def test_full_disk_exits_2_and_keeps_earlier_predictions(small_disk, sample_dir):
    out = small_disk / "out"
    first = _predict(sample_dir / "Kiwi", out)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p.relative_to(out): p.read_bytes() for p in [out / "predictions.csv", *(out / "predictions").iterdir()]}
    _fill(small_disk, 48)  # room to start (lock, audit line), not for the new features and tables
    # Other images: their features and predictions must be written, and do not fit.
    second = _predict(sample_dir / "Banana", out)
    st = os.statvfs(small_disk)
    assert st.f_bavail * st.f_frsize < 64 * 1024  # the disk really was (nearly) full during the run
    assert second.returncode == 2, second.stderr[-3000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("canestra: error: ") and "no space left on device" in lines[0]
    after = {p.relative_to(out): p.read_bytes() for p in [out / "predictions.csv", *(out / "predictions").iterdir()]}
    assert after == before  # the Kiwi predictions, byte for byte
    assert not (out / "_staging").exists() and not (out / LOCK_NAME).exists()
    # Space freed: the next run into the same --out works.
    (small_disk / "filler").unlink()
    third = _predict(sample_dir / "Banana", out)
    assert third.returncode == 0, third.stderr[-3000:]
