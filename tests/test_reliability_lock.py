"""Two runs into the same --out: OUT/.canestra.lock gives the second a plain error (exit 2)
naming the holder; a lock left by a dead run is taken over; tables are never interleaved."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from canestra.errors import OutputError
from canestra.storage import lock
from canestra.storage.lock import LOCK_NAME, out_lock

FIXTURE_MODEL = Path(__file__).parent / "fixtures" / "model-0.1.0"
ENV = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable)


def _holder_process(out: Path) -> subprocess.Popen:
    """Another process holding the lock of ``out`` until killed; returns once it holds it."""
    code = ("import sys, time\nfrom canestra.storage.lock import out_lock\n"
            f"with out_lock({str(out)!r}, 'predict'):\n    print('held', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "out"
    with out_lock(str(out), "train") as path:
        held = json.loads(Path(path).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["command"] == "train"
        with pytest.raises(OutputError) as err:
            with out_lock(str(out), "predict"):
                pytest.fail("the second holder got the lock")
        msg = str(err.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in msg and "canestra train" in msg
        assert str(out) in msg
    assert not (out / LOCK_NAME).exists()  # released
    with out_lock(str(out), "predict"):  # and free for the next run
        pass


def test_lock_of_a_killed_run_is_taken_over_and_its_staging_cleared(tmp_path):
    out = tmp_path / "out"
    victim = _holder_process(out)
    lock = json.loads((out / LOCK_NAME).read_text())
    assert lock["pid"] == victim.pid
    (out / "_staging" / "predictions-deadbeef").mkdir(parents=True)  # a half table of the dead run
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    with pytest.raises(ProcessLookupError):  # the holder really is gone
        os.kill(victim.pid, 0)
    assert (out / LOCK_NAME).exists()  # SIGKILL left its lock behind
    notes: list[str] = []
    with out_lock(str(out), "predict", note=notes.append):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert not (out / "_staging").exists()
    assert len(notes) == 1 and f"pid {victim.pid}" in notes[0] and "no longer running" in notes[0]


def test_reused_pid_does_not_keep_a_stale_lock(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # This very process, but with another start time: the recorded holder was a previous owner of the pid
    # (same boot and PID namespace, so the pid is comparable at all).
    (out / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "proc_start": "1",
                                             "boot_id": lock._boot_id(), "pid_ns": lock._pid_ns(),
                                             "command": "train", "started_at": "2020-01-01T00:00:00+00:00"}))
    notes: list[str] = []
    with out_lock(str(out), "predict", note=notes.append):
        pass
    assert notes and "2020-01-01" in notes[0]


def test_failed_run_leaves_no_staging_and_keeps_published_tables(tmp_path):
    out = tmp_path / "out"
    (out / "predictions").mkdir(parents=True)
    (out / "predictions" / "part-0.parquet").write_bytes(b"published")
    with pytest.raises(RuntimeError):
        with out_lock(str(out), "predict"):
            (out / "_staging" / "predictions-1").mkdir(parents=True)
            raise RuntimeError("job failed")
    assert not (out / "_staging").exists() and not (out / LOCK_NAME).exists()
    assert (out / "predictions" / "part-0.parquet").read_bytes() == b"published"


def test_cli_run_into_a_locked_out_exits_2_naming_the_holder(tmp_path, sample_dir):
    out = tmp_path / "out"
    holder = _holder_process(out)
    try:
        proc = subprocess.run([sys.executable, "-m", "canestra.cli", "predict", "--model", str(FIXTURE_MODEL),
                               "--images", str(sample_dir / "Kiwi"), "--out", str(out)],
                              capture_output=True, text=True, timeout=300, env=ENV)
        assert holder.poll() is None  # the holder was alive for the whole run
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("canestra: error: ")
    assert f"pid {holder.pid}" in lines[0] and "canestra predict" in lines[0]
    assert not (out / "predictions").exists() and not (out / "predictions.csv").exists()


@pytest.mark.slow
def test_two_concurrent_predicts_one_wins_tables_not_interleaved(tmp_path, sample_dir):
    out = tmp_path / "out"
    cmds = [[sys.executable, "-m", "canestra.cli", "predict", "--model", str(FIXTURE_MODEL), "--images",
             str(sample_dir / name), "--out", str(out), "--master", "local[1]"] for name in ("Kiwi", "Banana")]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for c in cmds]
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    winner = [i for i, r in enumerate(results) if r[0] == 0][0]
    loser_err = results[1 - winner][2].strip().splitlines()
    assert loser_err[-1].startswith("canestra: error: ") and "is in use by canestra predict" in loser_err[-1]
    assert f"pid {procs[winner].pid}" in loser_err[-1]
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 32  # one run's images only: Kiwi or Banana, not a mix
    import pyarrow.parquet as pq

    table = pq.read_table(out / "predictions")
    assert sorted(table.column("image_id").to_pylist()) == sorted(r["image_id"] for r in rows)
    assert not (out / LOCK_NAME).exists()


def test_empty_lock_of_a_writer_killed_mid_creation(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_NAME
    lock.write_text("")  # created, never filled
    with pytest.raises(OutputError):  # fresh: its writer may be filling it right now
        with out_lock(str(out), "predict"):
            pass
    old = time.time() - 60
    os.utime(lock, (old, old))
    notes: list[str] = []
    with out_lock(str(out), "predict", note=notes.append):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert len(notes) == 1


def test_s3_lock_is_a_conditional_put(tmp_path, monkeypatch):
    from moto import mock_aws

    from canestra.storage import files as storage
    from canestra.storage import s3

    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    with mock_aws():
        import boto3

        boto3.client("s3", region_name="eu-west-3").create_bucket(
            Bucket="canestra-lock", CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
        storage.configure_s3(s3.S3Options(credentials=("test", "test", None)))
        s3._CLIENTS.clear()
        try:
            with out_lock("s3://canestra-lock/run", "train") as uri:
                assert uri == f"s3://canestra-lock/run/{LOCK_NAME}"
                with pytest.raises(OutputError, match=f"pid {os.getpid()}"):
                    with out_lock("s3://canestra-lock/run", "predict"):
                        pytest.fail("two holders of one s3:// lock")
            with out_lock("s3://canestra-lock/run", "predict"):  # released: the object is gone
                pass
        finally:
            storage.configure_s3(None)
            s3._CLIENTS.clear()
