"""GDPR Art. 5(1)(e) storage limitation: `canestra purge` removes run outputs older than the
retention period (by file mtime or manifest time; predictions/ batch by batch), keeps younger
ones and the audit log."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from canestra.cli import commands as cli
from canestra.privacy.purge import purge

DAY = 86400


def backdate(path: Path, days: float) -> None:
    """Set the mtime of ``path`` and everything under it ``days`` days into the past."""
    stamp = time.time() - days * DAY
    targets = [path] + (list(path.rglob("*")) if path.is_dir() else [])
    for p in targets:
        os.utime(p, (stamp, stamp))


def make_run(run: Path, image_ids: list[str]) -> None:
    """A run folder shaped like `canestra train` + `predict` output (tables, model, files)."""
    for table in ("catalog", "features", "predictions"):
        (run / table).mkdir(parents=True)
        pq.write_table(pa.table({"image_id": image_ids, "label": ["Banana"] * len(image_ids)}),
                       run / table / "part-00000.parquet")
        (run / table / "_SUCCESS").write_text("")
    (run / "catalog" / "_canestra.json").write_text(json.dumps({"images": len(image_ids)}))
    (run / "model" / "metadata").mkdir(parents=True)
    (run / "model" / "stages" / "0_featurizer").mkdir(parents=True)
    (run / "model" / "metadata" / "part-00000").write_text("{}")
    (run / "model" / "canestra_training_ids.txt").write_text("\n".join(image_ids) + "\n")
    (run / "predictions.csv").write_text("image_id,prediction\n" + "".join(f"{i},Banana\n" for i in image_ids))
    (run / "quarantine.csv").write_text("path,reason\n")
    (run / "gallery").mkdir()  # worst-error thumbnails, named after their image ids
    for i in image_ids:
        (run / "gallery" / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 thumbnail")
    (run / "metrics.json").write_text(json.dumps({"worst_errors": [{"image_id": i, "thumbnail": f"gallery/{i}.jpg"}
                                                                   for i in image_ids]}))
    (run / "report.html").write_text("<html></html>")


@pytest.fixture
def runs(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # a failing command's fallback audit log
    monkeypatch.delenv("CANESTRA_AUDIT_LOG", raising=False)
    monkeypatch.delenv("CANESTRA_RETENTION_DAYS", raising=False)
    root = tmp_path / "runs"
    make_run(root / "old", ["a" * 64, "b" * 64])
    make_run(root / "new", ["c" * 64])
    backdate(root / "old", 40)
    (root / "_audit").mkdir()
    (root / "_audit" / "audit.jsonl").write_text('{"command": "train"}\n')
    backdate(root / "_audit", 400)
    return root


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_dry_run_lists_and_removes_nothing(runs, capsys):
    before = files_under(runs)
    assert cli.main(["purge", "--out", str(runs), "--older-than", "30", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert files_under(runs) - {"_audit/audit.jsonl"} == before - {"_audit/audit.jsonl"}
    kinds = {"old/catalog": "table", "old/features": "table", "old/predictions/part-00000.parquet": "batch",
             "old/model": "model",
             "old/predictions.csv": "file", "old/quarantine.csv": "file", "old/metrics.json": "file",
             "old/report.html": "file", "old/gallery": "gallery"}
    for unit, kind in kinds.items():
        assert f"would remove {kind} {unit} (40 days old" in out, (unit, out)
    assert "new/" not in out
    assert "would remove 9 output(s) older than 30 days; kept 9" in out


def test_purge_removes_old_runs_keeps_new_ones_and_the_audit_log(runs, capsys):
    assert cli.main(["purge", "--out", str(runs), "--older-than", "30"]) == 0
    out = capsys.readouterr().out
    assert "removed table old/catalog" in out and "removed model old/model" in out
    assert "removed gallery old/gallery (40 days old" in out, "the thumbnails go with their run, as one unit"
    assert not (runs / "old").exists(), "the emptied run folder is removed too"
    left = files_under(runs)
    assert "new/catalog/part-00000.parquet" in left and "new/model/canestra_training_ids.txt" in left
    assert "new/predictions.csv" in left and "new/report.html" in left
    assert f"new/gallery/{'c' * 64}.jpg" in left
    assert pq.read_table(runs / "new" / "features").num_rows == 1
    # The 400-day-old audit log is kept and gains the purge's own record.
    records = [json.loads(line) for line in (runs / "_audit" / "audit.jsonl").read_text().splitlines()]
    assert records[0] == {"command": "train"}
    assert records[-1]["command"] == "purge" and records[-1]["status"] == "ok"
    assert records[-1]["counts"]["removed"] == 9 and records[-1]["counts"]["kept"] == 9
    assert records[-1]["details"] == {"older_than_days": 30.0, "dry_run": False}


def test_a_table_written_whole_is_as_young_as_its_newest_part(tmp_path):
    table = tmp_path / "out" / "features"
    table.mkdir(parents=True)
    (tmp_path / "out" / "_audit").mkdir()
    (tmp_path / "out" / "_audit" / "audit.jsonl").write_text(json.dumps({"command": "train", "status": "ok"}) + "\n")
    for i in range(2):
        pq.write_table(pa.table({"image_id": [str(i)]}), table / f"part-0000{i}.parquet")
    backdate(table, 60)
    os.utime(table / "part-00001.parquet")  # rewritten today (e.g. by erase)
    res = purge(str(tmp_path / "out"), 30)
    assert res.removed == [] and res.kept == 1
    assert len(list(table.glob("*.parquet"))) == 2


def test_manifest_time_wins_over_file_mtime(tmp_path):
    table = tmp_path / "out" / "catalog"
    table.mkdir(parents=True)
    pq.write_table(pa.table({"image_id": ["x"]}), table / "part-00000.parquet")
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 100 * DAY))
    (table / "_canestra.json").write_text(json.dumps({"created_at": created}))
    res = purge(str(tmp_path / "out"), 90)  # files were written just now, the manifest says 100 days ago
    assert [(e.path, e.kind) for e in res.removed] == [("catalog", "table")]
    assert 99.9 < res.removed[0].age_days < 100.1
    assert not table.exists()


def test_retention_period_from_the_environment(runs, monkeypatch, capsys):
    monkeypatch.setenv("CANESTRA_RETENTION_DAYS", "50")  # the old run is 40 days old: kept
    assert cli.main(["purge", "--out", str(runs)]) == 0
    assert "removed 0 output(s) older than 50 days; kept 18" in capsys.readouterr().out
    monkeypatch.setenv("CANESTRA_RETENTION_DAYS", "35")
    assert cli.main(["purge", "--out", str(runs)]) == 0
    assert not (runs / "old").exists() and (runs / "new" / "model").is_dir()


def test_no_retention_period_is_a_plain_error(runs, capsys):
    assert cli.main(["purge", "--out", str(runs)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("canestra: error:") and "--older-than" in err and "CANESTRA_RETENTION_DAYS" in err
    assert cli.main(["purge", "--out", str(runs), "--older-than", "-1"]) == 2
    assert (runs / "old" / "model").is_dir()


def test_a_gallery_goes_whole_as_old_as_its_newest_thumbnail(tmp_path):
    run = tmp_path / "out" / "run"
    (run / "gallery").mkdir(parents=True)
    (run / "_audit").mkdir()
    (run / "_audit" / "audit.jsonl").write_text(json.dumps({"command": "train", "status": "ok"}) + "\n")
    for i in "ab":
        (run / "gallery" / f"{i * 64}.jpg").write_bytes(b"\xff\xd8")
    backdate(run / "gallery", 60)
    os.utime(run / "gallery" / f"{'b' * 64}.jpg")  # one thumbnail written today: the gallery is young
    assert purge(str(tmp_path / "out"), 30).removed == []
    backdate(run / "gallery", 60)
    res = purge(str(tmp_path / "out"), 30)
    assert [(e.path, e.kind) for e in res.removed] == [("run/gallery", "gallery")]
    assert not (run / "gallery").exists() and (run / "_audit" / "audit.jsonl").is_file()
