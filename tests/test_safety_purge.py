"""`canestra purge` only ever removes what canestra wrote (issue 20, findings 1, 2 and 7): a folder
that is not a canestra output is refused whole; the lock, `watch`'s checkpoint and a live run's
staging are never listed or touched; a live stream's old batches expire while new ones stay."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from canestra.cli import commands as cli
from canestra.storage.lock import LOCK_NAME

DAY = 86400
QUERY = "5f0c2a9e-7d1b-4c59-9a51-0c6f3c1d2e77"  # a watch checkpoint's query id


def backdate(path: Path, days: float) -> None:
    stamp = time.time() - days * DAY
    for p in [path] + (list(path.rglob("*")) if path.is_dir() else []):
        os.utime(p, (stamp, stamp), follow_symlinks=False)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def folders(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir()}


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("CANESTRA_AUDIT_LOG", raising=False)
    monkeypatch.delenv("CANESTRA_RETENTION_DAYS", raising=False)


def holder(out: Path, command: str = "watch") -> subprocess.Popen:
    """Another process holding ``out``'s lock (as a running `canestra watch` does) until killed."""
    code = ("import time\nfrom canestra.storage.lock import out_lock\n"
            f"with out_lock({str(out)!r}, {command!r}):\n    print('held', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def watch_output(out: Path, batches: dict[int, tuple[list[str], float]]) -> None:
    """The files `canestra watch` leaves in ``out``: one Parquet file per micro-batch under predictions/
    (``{batch id: (image ids, age in days)}``), quarantine.csv, the checkpoint, _watch/ and the audit log."""
    preds = out / "predictions"
    preds.mkdir(parents=True)
    for batch, (ids, days) in batches.items():
        part = preds / f"batch-{QUERY[:8]}-{batch:09d}.parquet"
        pq.write_table(pa.table({"image_id": ids, "prediction": ["Banana"] * len(ids),
                                 "probability": [0.9] * len(ids)}), part)
        backdate(part, days)
    (out / "quarantine.csv").write_text("path,reason\n")
    ckpt = out / "_checkpoints" / "watch"
    for sub in ("offsets", "commits", "sources/0"):
        (ckpt / sub).mkdir(parents=True)
    (ckpt / "metadata").write_text(json.dumps({"id": QUERY}) + "\n")
    for batch in batches:
        (ckpt / "offsets" / str(batch)).write_text("v1\n{}\n")
        (ckpt / "commits" / str(batch)).write_text("v1\n{}\n")
        (ckpt / "sources" / "0" / str(batch)).write_text('v1\n{"path":"file:///photos/a.jpg"}\n')
    (out / "_watch" / "s3-listing").mkdir(parents=True)
    (out / "_audit").mkdir()
    (out / "_audit" / "audit.jsonl").write_text(json.dumps({"time": "2026-01-01T00:00:00Z", "command": "watch", "status": "ok"}) + "\n")
    backdate(ckpt, 200)
    backdate(out / "_watch", 200)


# ----------------------------------------------------------------------------- finding 1


def photo_folder(root: Path) -> Path:
    """A user's photo folder: 200-day-old photos, a nested album, a note, a CSV and a report of their own."""
    for rel in ("2024/IMG_0001.jpg", "2024/IMG_0002.jpg", "2024/summer/IMG_0100.jpg", "notes.txt",
                "predictions.csv", "report.html", "catalog/part-0001.parquet"):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\xff\xd8\xff\xe0 " + rel.encode())
    (root / "empty-album").mkdir()
    backdate(root, 200)
    return root


def test_purge_refuses_a_folder_that_is_not_a_canestra_output(tmp_path, capsys):
    photos = photo_folder(tmp_path / "photos")
    before, dirs = snapshot(photos), folders(photos)
    for _ in range(2):  # a refused purge must not turn the folder into a canestra output either
        assert cli.main(["purge", "--out", str(photos), "--older-than", "180"]) == 2
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("canestra: error: "), err
        assert str(photos) in lines[0] and "not a canestra output" in lines[0]
        assert "catalog/" in lines[0] and "model/" in lines[0], "the message says what it looked for"
        assert "removed" not in out
        after = snapshot(photos)
        assert after == before, "every photo and file is still there, and nothing was added (no audit record)"
        assert dirs == folders(photos), "no folder was removed or created"
        assert not (photos / LOCK_NAME).exists()


def test_purge_deletes_only_what_canestra_wrote_in_a_canestra_output(tmp_path, capsys):
    """A run folder that also holds the user's own files: they stay, whatever their age."""
    run = tmp_path / "run"
    (run / "catalog").mkdir(parents=True)
    pq.write_table(pa.table({"image_id": ["a" * 64]}), run / "catalog" / "part-00000.parquet")
    (run / "catalog" / "_canestra.json").write_text(json.dumps({"images": 1}))
    (run / "predictions.csv").write_text("image_id,prediction\n" + "a" * 64 + ",Banana\n")
    (run / "my-notes.txt").write_text("keep me")
    (run / "album" / "sub").mkdir(parents=True)
    (run / "album" / "IMG_1.jpg").write_bytes(b"\xff\xd8")
    backdate(run, 200)
    assert cli.main(["purge", "--out", str(run), "--older-than", "180"]) == 0
    out = capsys.readouterr().out
    assert "removed table catalog" in out and "removed file predictions.csv" in out
    assert (run / "my-notes.txt").read_text() == "keep me"
    assert (run / "album" / "IMG_1.jpg").exists() and (run / "album" / "sub").is_dir(), \
        "folders canestra did not create are never removed"
    assert not (run / "catalog").exists() and not (run / "predictions.csv").exists()
    assert not (run / LOCK_NAME).exists()


# ----------------------------------------------------------------------------- finding 2


def test_dry_run_never_lists_the_lock_or_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "stream"
    watch_output(out, {0: (["a" * 64], 200)})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # A lock left by a watch killed with kill -9 (its pid is gone): purge takes it over.
    (out / LOCK_NAME).write_text(json.dumps(_dead_holder(dead.pid)))
    backdate(out / LOCK_NAME, 200)
    before = snapshot(out)
    assert cli.main(["purge", "--out", str(out), "--older-than", "0", "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert LOCK_NAME not in listed and "_checkpoints" not in listed and "_watch" not in listed, listed
    assert "would remove batch predictions/batch-" in listed
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k != "_audit/audit.jsonl" and k != LOCK_NAME} == \
        {k: v for k, v in before.items() if k != "_audit/audit.jsonl" and k != LOCK_NAME}
    # A real purge removes the old batch but leaves the checkpoint whole: the next watch resumes.
    assert cli.main(["purge", "--out", str(out), "--older-than", "30"]) == 0
    capsys.readouterr()
    ckpt = {k for k in snapshot(out) if k.startswith("_checkpoints/")}
    assert ckpt == {k for k in before if k.startswith("_checkpoints/")}
    assert (out / "_watch" / "s3-listing").is_dir()


def _dead_holder(pid: int) -> dict:
    from canestra.storage import lock

    held = lock._holder("watch")
    held.update(pid=pid, proc_start=None, started_at="2026-01-01T00:00:00+00:00")
    return held


def test_purge_refuses_while_a_run_holds_the_lock(tmp_path, capsys):
    out = tmp_path / "stream"
    watch_output(out, {0: (["a" * 64], 200), 1: (["b" * 64], 0)})
    proc = holder(out)
    try:
        before = snapshot(out)
        for extra in (["--dry-run"], []):
            assert cli.main(["purge", "--out", str(out), "--older-than", "30", *extra]) == 2
            captured = capsys.readouterr()
            lines = captured.err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("canestra: error: "), captured.err
            assert "is in use by canestra watch" in lines[0] and f"pid {proc.pid}" in lines[0]
            assert "would remove" not in captured.out and "removed" not in captured.out
            after = snapshot(out)
            assert {k: v for k, v in after.items() if k != "_audit/audit.jsonl"} == \
                {k: v for k, v in before.items() if k != "_audit/audit.jsonl"}
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_purge_of_a_folder_of_runs_refuses_while_one_of_them_is_running(tmp_path, capsys):
    runs = tmp_path / "runs"
    watch_output(runs / "old", {0: (["a" * 64], 200)})
    watch_output(runs / "live", {0: (["b" * 64], 200)})
    (runs / "live" / "_staging" / "predictions-1234").mkdir(parents=True)  # the live run's table in the making
    backdate(runs / "live" / "_staging", 200)
    proc = holder(runs / "live")
    try:
        before = snapshot(runs)
        assert cli.main(["purge", "--out", str(runs), "--older-than", "30"]) == 2
        err = capsys.readouterr().err
        assert "runs/live is in use by canestra watch" in err and f"pid {proc.pid}" in err
        assert {k: v for k, v in snapshot(runs).items() if "_audit" not in k} == \
            {k: v for k, v in before.items() if "_audit" not in k}
        assert (runs / "live" / "_staging" / "predictions-1234").is_dir()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # Once it has stopped, the purge goes through (and takes the dead run's lock over).
    assert cli.main(["purge", "--out", str(runs), "--older-than", "30"]) == 0
    assert not (runs / "old" / "predictions").exists() and not (runs / "live" / "predictions").exists()
    assert not (runs / "live" / LOCK_NAME).exists()


# ----------------------------------------------------------------------------- finding 7


def test_a_live_streams_old_batches_expire_while_new_ones_stay(tmp_path, capsys):
    out = tmp_path / "stream"
    old_ids, new_ids = ["a" * 64, "b" * 64], ["c" * 64]
    # batch 0 and 1: 40 days old; batch 2: written today (the stream is still running every day)
    watch_output(out, {0: (old_ids[:1], 40), 1: (old_ids[1:], 40), 2: (new_ids, 0)})
    assert cli.main(["purge", "--out", str(out), "--older-than", "30"]) == 0
    report = capsys.readouterr().out
    assert f"removed batch predictions/batch-{QUERY[:8]}-000000000.parquet (40 days old" in report
    assert f"removed batch predictions/batch-{QUERY[:8]}-000000001.parquet (40 days old" in report
    left = pq.read_table(out / "predictions")
    assert left.column("image_id").to_pylist() == new_ids, "the rows within retention are all still there"
    assert (out / "_checkpoints" / "watch" / "metadata").is_file()
    # Later the last batch ages too: then the table goes whole.
    backdate(out / "predictions", 40)
    assert cli.main(["purge", "--out", str(out), "--older-than", "30"]) == 0
    assert "removed batch predictions/batch-" in capsys.readouterr().out
    assert not (out / "predictions").exists()


def test_incremental_predictions_expire_by_part_and_the_csv_follows(tmp_path, capsys):
    """`predict --incremental` adds part files to predictions/ and rewrites predictions.csv whole:
    the csv is young, yet the rows of the old parts must go from both."""
    out = tmp_path / "pred"
    (out / "predictions").mkdir(parents=True)
    pq.write_table(pa.table({"image_id": ["a" * 64], "prediction": ["Kiwi"]}), out / "predictions" / "part-0.parquet")
    (out / "predictions" / "_SUCCESS").write_text("")
    backdate(out / "predictions", 40)
    pq.write_table(pa.table({"image_id": ["b" * 64], "prediction": ["Lime"]}),
                   out / "predictions" / "1a2b3c4d-part-0.parquet")
    (out / "predictions.csv").write_text(f"image_id,prediction\n{'a' * 64},Kiwi\n{'b' * 64},Lime\n")
    (out / "_audit").mkdir()
    (out / "_audit" / "audit.jsonl").write_text(json.dumps({"time": "2026-01-01T00:00:00Z", "command": "predict", "status": "ok"}) + "\n")
    assert cli.main(["purge", "--out", str(out), "--older-than", "30"]) == 0
    assert "removed batch predictions/part-0.parquet" in capsys.readouterr().out
    assert pq.read_table(out / "predictions").column("image_id").to_pylist() == ["b" * 64]
    with open(out / "predictions.csv", newline="") as fh:
        assert list(csv.reader(fh)) == [["image_id", "prediction"], ["b" * 64, "Lime"]]


def test_a_table_left_aside_by_a_killed_publish_is_dated_and_expired_too(tmp_path, capsys):
    """A publish killed between its two renames leaves the old table hidden beside its name: purge puts
    it back first (storage.recover_publishes), so its rows expire like any other's instead of lingering."""
    out = tmp_path / "run"
    aside = out / ".catalog-0123456789ab.canestra-old"
    aside.mkdir(parents=True)
    pq.write_table(pa.table({"image_id": ["a" * 64], "source_path": ["/photos/a.jpg"]}), aside / "part-0.parquet")
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 200 * DAY))
    (aside / "_canestra.json").write_text(json.dumps({"images": 1, "created_at": created}))
    (out / "_logs").mkdir()
    (out / "_logs" / "spark.log").write_text("spark\n")
    assert cli.main(["purge", "--out", str(out), "--older-than", "180"]) == 0
    assert "removed table catalog (200 days old" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["_audit", "_logs"]


def test_an_erased_batch_keeps_its_age_for_retention(tmp_path, capsys):
    """Erase rewrites the batch that held the image: the rewrite must not make an old batch young
    again, or retention would keep the stream's other old rows for another full period."""
    out = tmp_path / "stream"
    watch_output(out, {0: (["a" * 64, "b" * 64], 40), 1: (["c" * 64], 0)})
    assert cli.main(["erase", "--out", str(out), "--image-id", "a" * 64]) == 0
    capsys.readouterr()
    assert cli.main(["purge", "--out", str(out), "--older-than", "30"]) == 0
    assert f"removed batch predictions/batch-{QUERY[:8]}-000000000.parquet (40 days old" in capsys.readouterr().out
    assert pq.read_table(out / "predictions").column("image_id").to_pylist() == ["c" * 64]
