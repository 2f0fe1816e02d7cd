"""GDPR Art. 17 (right to erasure): `canestra erase` removes an image and everything derived
from it (catalog, features, predictions table and csv, quarantine entries, copies under --out),
optionally the source file, without Spark and without ever leaving a half-written table; the
model that was trained on it is flagged for retraining."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from artefacts import find

from canestra import audit, cli, erase


@pytest.fixture(scope="module")
def predicted_run(spark, trained, tmp_path_factory):
    """The trained run plus `pred/` from `canestra predict --include-paths` on 3 copied sample images + 1 broken file.

    Returns (run dir, images dir, {name: (catalog row dict)}) as a template that tests copy.
    """
    base = tmp_path_factory.mktemp("erase")
    run, imgs = base / "run", base / "imgs"
    shutil.copytree(trained.out_dir, run)
    catalog = pq.read_table(run / "catalog", columns=["image_id", "label", "split", "source_path"]).to_pylist()
    chosen = {
        "train": next(r for r in catalog if r["label"] == "Banana" and r["split"] == "train"),
        "test": next(r for r in catalog if r["label"] == "Banana" and r["split"] == "test"),
        "other": next(r for r in catalog if r["label"] == "Kiwi" and r["split"] == "train"),
    }
    for row in chosen.values():
        dst = imgs / row["label"] / os.path.basename(row["source_path"])
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(row["source_path"], dst)
        row["copy"] = str(dst)
    (imgs / "Banana" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert cli.main(["predict", "--model", str(run / "model"), "--images", str(imgs), "--out", str(run / "pred"),
                     "--include-paths", "--quiet"]) == 0
    return run, imgs, chosen


@pytest.fixture
def case(predicted_run, tmp_path, monkeypatch):
    """A private copy of the run (erase changes it); the copied source images restored."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("CANESTRA_AUDIT_LOG", raising=False)
    run, imgs, chosen = predicted_run
    for row in chosen.values():
        if not os.path.exists(row["copy"]):
            shutil.copy(row["source_path"], row["copy"])
    if not (imgs / "Banana" / "broken.jpg").exists():
        (imgs / "Banana" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    mine = tmp_path / "run"
    shutil.copytree(run, mine)
    return mine, imgs, chosen


def rows(path: Path) -> int:
    return pq.read_table(path).num_rows


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_predict_include_paths_names_the_sources(predicted_run):
    """GDPR Art. 25: paths are left out of predictions by default; --include-paths adds them back."""
    run, imgs, chosen = predicted_run
    rows_ = read_csv(run / "pred" / "predictions.csv")
    assert list(rows_[0])[:2] == ["path", "image_id"]
    assert sorted(r["path"] for r in rows_) == sorted(row["copy"] for row in chosen.values())
    assert pq.read_table(run / "pred" / "predictions").column_names[:2] == ["path", "image_id"]
    log = (run / "pred" / "_audit" / "audit.jsonl").read_text()
    assert json.loads(log)["details"] == {"include_paths": True} and str(imgs) not in log


def test_erase_by_source_leaves_no_trace_and_flags_the_model(spark, case, capsys):
    run, imgs, chosen = case
    img = chosen["train"]
    image_id, copy, original = img["image_id"], img["copy"], img["source_path"]
    broken = str(imgs / "Banana" / "broken.jpg")
    (run / "exports").mkdir()
    shutil.copy(copy, run / "exports" / "shared-copy.jpg")  # a copy of the image inside the outputs
    before = {t: rows(run / t) for t in ("catalog", "features", "pred/predictions")}
    trained_on = erase.read_training_ids(str(run / "model"))
    assert image_id in trained_on
    # Positive control: the search sees the image everywhere it is stored.
    hits = find(run, [image_id, copy, broken])
    assert {"catalog", "features", "pred/predictions", "pred/predictions.csv",
            "model/canestra_training_ids.txt"} <= {h.split("/part-")[0] for h in hits[image_id]}
    assert "pred/quarantine.csv" in hits[broken]

    code = cli.main(["erase", "--out", str(run), "--source", copy, broken, "--delete-source"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"the model at {run / 'model'} was trained on 1 erased image(s): retrain it" in out
    assert find(run, [image_id, copy, broken, original]) == {}, "nothing of the image remains under --out"
    assert not os.path.exists(copy) and not os.path.exists(broken), "--delete-source removed the sources"
    assert os.path.exists(original) and os.path.exists(chosen["test"]["copy"]), "other files untouched"
    assert not (run / "exports" / "shared-copy.jpg").exists()
    summary = json.loads(out.splitlines()[0])
    assert summary["images"] == 1 and summary["sources_deleted"] == 2

    # Every table lost exactly that image and Spark still reads them (vectors included).
    cat = spark.read.parquet(str(run / "catalog"))
    feats = spark.read.parquet(str(run / "features"))
    preds = spark.read.parquet(str(run / "pred" / "predictions"))
    assert (cat.count(), feats.count(), preds.count()) == (
        before["catalog"] - 1, before["features"] - 1, before["pred/predictions"] - 1)
    assert dict(feats.dtypes)["features"] == "vector"
    assert feats.where(f"image_id = '{image_id}'").count() == 0
    assert len(read_csv(run / "pred" / "predictions.csv")) == before["pred/predictions"] - 1
    assert read_csv(run / "pred" / "quarantine.csv") == []
    assert not list(run.rglob("_staging"))

    # The model still loads; it now lists one image fewer and remembers the erasure.
    from pyspark.ml import PipelineModel

    PipelineModel.load(str(run / "model"))
    assert erase.read_training_ids(str(run / "model")) == trained_on - {image_id}
    assert erase.read_erasures(str(run / "model"))["erased_since_training"] == 1

    (rec,) = audit.read_records(str(run / "_audit" / "audit.jsonl"))
    assert rec["command"] == "erase" and rec["status"] == "ok"
    assert rec["counts"]["images"] == 1 and rec["counts"]["models_to_retrain"] == 1
    assert rec["counts"]["sources_deleted"] == 2 and rec["outputs"] == [str(run / "model")]


def test_erase_by_image_id_finds_its_paths_and_keeps_the_source(case, capsys):
    run, _, chosen = case
    img = chosen["test"]  # held out: the model was not trained on it
    before = {t: rows(run / t) for t in ("catalog", "features", "pred/predictions")}
    assert cli.main(["erase", "--out", str(run), "--image-id", img["image_id"].upper()]) == 0
    out = capsys.readouterr().out
    assert "retrain" not in out
    assert find(run, [img["image_id"], img["copy"], img["source_path"]]) == {}
    assert {t: rows(run / t) for t in before} == {t: n - 1 for t, n in before.items()}
    assert os.path.exists(img["copy"]) and os.path.exists(img["source_path"])
    other = chosen["other"]["image_id"]
    assert set(find(run, [other])) == {other}, "the other images are still there"
    manifest = json.loads((run / "catalog" / "_canestra.json").read_text())
    assert manifest["images"] == before["catalog"] - 1 and manifest["erased"] == 1


def test_a_failed_rewrite_never_leaves_a_half_written_table(case, monkeypatch):
    run, _, chosen = case
    image_id = chosen["other"]["image_id"]
    parts = sorted(p.name for p in (run / "catalog").iterdir())
    n = rows(run / "catalog")

    def crash(src, dst, matcher):
        Path(dst).write_bytes(b"PAR1 half")  # a partial file in staging, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(erase, "_write_filtered", crash)
    with pytest.raises(OSError):
        erase.erase(str(run), image_ids=[image_id])
    assert sorted(p.name for p in (run / "catalog").iterdir()) == parts
    assert rows(run / "catalog") == n and image_id in pq.read_table(run / "catalog")["image_id"].to_pylist()
    assert not list(run.rglob("_staging"))
    monkeypatch.undo()
    res = erase.erase(str(run), image_ids=[image_id])
    assert res.rows_removed["catalog"] == 1 and rows(run / "catalog") == n - 1


def test_bad_requests_are_plain_errors(case, capsys):
    run, _, _ = case
    assert cli.main(["erase", "--out", str(run), "--image-id", "not-an-id"]) == 2
    assert "is not a canestra image_id" in capsys.readouterr().err
    assert cli.main(["erase", "--out", str(run)]) == 2
    assert "nothing to erase" in capsys.readouterr().err
    assert cli.main(["erase", "--out", str(run), "--source", "gs://bucket/x.jpg", "--delete-source"]) == 2
    assert "deletes local files and s3:// objects" in capsys.readouterr().err  # s3://: tests/test_s3.py
