"""OUT/.canestra.lock covers the GDPR commands and is never taken or dropped on a guess (issue 20,
findings 2 and 9): erase and gdpr record refuse while a run holds the lock; a holder in another PID
namespace (or boot) is not declared dead from a pid lookup; an s3:// lock is released only by its owner."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from canestra.cli import commands as cli
from canestra.errors import OutputError
from canestra.storage import lock
from canestra.storage.lock import LOCK_NAME, out_lock

ID = "d" * 64


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("CANESTRA_AUDIT_LOG", raising=False)


def holder(out: Path, prefix: list[str] | None = None) -> subprocess.Popen:
    """Another process holding ``out``'s lock as a running `canestra watch` would, until killed."""
    code = ("import time\nfrom canestra.storage.lock import out_lock\n"
            f"with out_lock({str(out)!r}, 'watch'):\n    print('held', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([*(prefix or []), sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def a_run(out: Path) -> None:
    (out / "predictions").mkdir(parents=True)
    pq.write_table(pa.table({"image_id": [ID, "e" * 64], "prediction": ["Kiwi", "Lime"]}),
                   out / "predictions" / "batch-5f0c2a9e-000000000.parquet")
    (out / "_audit").mkdir()
    (out / "_audit" / "audit.jsonl").write_text(json.dumps({"time": "2026-01-01T00:00:00Z", "command": "watch", "status": "ok"}) + "\n")


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("canestra: error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- finding 2


def test_erase_refuses_while_a_run_holds_the_lock(tmp_path, capsys):
    out = tmp_path / "out"
    a_run(out)
    proc = holder(out)
    try:
        assert cli.main(["erase", "--out", str(out), "--image-id", ID]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "is in use by canestra watch" in line and f"pid {proc.pid}" in line
        assert ID in pq.read_table(out / "predictions").column("image_id").to_pylist(), "nothing was erased"
    finally:
        stop(proc)
    assert cli.main(["erase", "--out", str(out), "--image-id", ID]) == 0  # the holder is gone: taken over
    assert pq.read_table(out / "predictions").column("image_id").to_pylist() == ["e" * 64]
    assert not (out / LOCK_NAME).exists()


def test_gdpr_record_refuses_while_a_run_holds_the_lock(tmp_path, capsys):
    out = tmp_path / "out"
    a_run(out)
    proc = holder(out)
    try:
        assert cli.main(["gdpr", "record", "--out", str(out)]) == 2
        assert "is in use by canestra watch" in one_error_line(capsys.readouterr().err)
        assert not (out / "_gdpr").exists()
    finally:
        stop(proc)
    assert cli.main(["gdpr", "record", "--out", str(out)]) == 0
    assert (out / "_gdpr" / "record-of-processing.json").is_file() and not (out / LOCK_NAME).exists()


def test_gdpr_commands_on_a_missing_folder_do_not_create_it(tmp_path, capsys):
    for argv in (["gdpr", "record"], ["purge", "--older-than", "1"]):
        assert cli.main([*argv, "--out", str(tmp_path / "nope")]) == 2
        assert "does not exist" in one_error_line(capsys.readouterr().err)
        assert not (tmp_path / "nope").exists()


# ----------------------------------------------------------------------------- finding 9: PID namespaces


def _can_unshare() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare --pid` (root or user namespaces)")
def test_a_holder_in_another_pid_namespace_is_not_taken_over(tmp_path):
    """A container on the same host name (shared volume) holds the lock: its pid means nothing here."""
    out = tmp_path / "out"
    proc = holder(out, ["unshare", "--pid", "--fork", "--mount-proc"])
    try:
        held = (out / LOCK_NAME).read_text()
        assert json.loads(held)["host"] == socket.gethostname()
        notes: list[str] = []
        with pytest.raises(OutputError) as err:
            with out_lock(str(out), "predict", note=notes.append):
                pytest.fail("took over the lock of a live run in another PID namespace")
        msg = str(err.value)
        assert "canestra watch" in msg and "another PID namespace" in msg and f"remove {out}/{LOCK_NAME}" in msg
        assert notes == [] and (out / LOCK_NAME).read_text() == held
        assert proc.poll() is None
    finally:
        stop(proc)


def test_a_lock_from_another_pid_namespace_or_boot_is_not_declared_stale(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that is free in this namespace
    mine = lock._holder("watch")
    for field, other in (("pid_ns", "pid:[1]"), ("boot_id", "00000000-0000-0000-0000-000000000000")):
        held = dict(mine, pid=gone.pid, proc_start="1", **{field: other})
        (out / LOCK_NAME).write_text(json.dumps(held))
        with pytest.raises(OutputError, match=f"if that run is gone, remove {out}/{LOCK_NAME}"):
            with out_lock(str(out), "predict", note=lambda _m: pytest.fail("taken over")):
                pass
        assert json.loads((out / LOCK_NAME).read_text()) == held
    # Same namespace and boot: a dead pid is still proof enough (kill -9 never blocks the next run).
    (out / LOCK_NAME).write_text(json.dumps(dict(mine, pid=gone.pid)))
    notes: list[str] = []
    with out_lock(str(out), "predict", note=notes.append):
        pass
    assert len(notes) == 1 and f"pid {gone.pid}" in notes[0]


# ----------------------------------------------------------------------------- finding 9: S3 release


def test_s3_lock_release_never_deletes_another_runs_lock(monkeypatch):
    from moto import mock_aws

    from canestra.storage import files as storage
    from canestra.storage import s3

    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    with mock_aws():
        import boto3

        c = boto3.client("s3", region_name="eu-west-3")
        c.create_bucket(Bucket="canestra-lock", CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
        storage.configure_s3(s3.S3Options(credentials=("test", "test", None)))
        s3._CLIENTS.clear()
        key = f"run/{LOCK_NAME}"
        try:
            with out_lock("s3://canestra-lock/run", "train"):
                # An operator removed the lock by hand, and another run took the folder meanwhile.
                c.delete_object(Bucket="canestra-lock", Key=key)
                other = dict(lock._holder("predict"), pid=4242)
                c.put_object(Bucket="canestra-lock", Key=key, Body=json.dumps(other).encode())
            body = json.loads(c.get_object(Bucket="canestra-lock", Key=key)["Body"].read())
            assert body == other, "the first run's release deleted the second run's lock"
            with pytest.raises(OutputError, match="pid 4242"):
                with out_lock("s3://canestra-lock/run", "predict"):
                    pytest.fail("two holders of one s3:// lock")
            c.delete_object(Bucket="canestra-lock", Key=key)
            with out_lock("s3://canestra-lock/run", "predict"):  # its own lock it does release
                pass
            assert "Contents" not in c.list_objects_v2(Bucket="canestra-lock", Prefix="run/")
        finally:
            storage.configure_s3(None)
            s3._CLIENTS.clear()
