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

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from artefacts import find

from canestra.cli import commands as cli
from canestra.errors import OutputError
from canestra.privacy import audit, erase


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
    cap = capsys.readouterr()
    out = cap.out
    assert code == 0, out
    assert f"the model at {run / 'model'} was trained on 1 erased image(s): retrain it" in out
    assert find(run, [image_id, copy, broken, original]) == {}, "nothing of the image remains under --out"
    assert not os.path.exists(copy), "--delete-source removed the source predictions list by path"
    # Only quarantine.csv knew the broken file: no table lists it as an image read there, so it stays.
    assert os.path.exists(broken) and f"kept {broken}: no table under {run} lists it" in cap.err
    assert os.path.exists(original) and os.path.exists(chosen["test"]["copy"]), "other files untouched"
    assert not (run / "exports" / "shared-copy.jpg").exists()
    summary = json.loads(out.splitlines()[0])
    assert summary["images"] == 1 and summary["sources_deleted"] == 1

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
    assert rec["counts"]["sources_deleted"] == 1 and rec["outputs"] == [str(run / "model")]


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


# ---------------------------------------------------------------------------- the error gallery (no Spark)


def _jpeg(path: Path, colour: tuple[int, int, int], size: int) -> bytes:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, "JPEG", quality=90)
    return path.read_bytes()


def _error(image_id: str, label: str, prediction: str) -> dict:
    return {"image_id": image_id, "label": label, "prediction": prediction, "probability": 0.97,
            "family": prediction.split()[0], "thumbnail": f"gallery/{image_id}.jpg"}


def make_gallery_run(run: Path, photos: dict[str, Path], errors: list[tuple[str, str, str]]) -> dict:
    """A run folder as `canestra train` leaves it, without Spark: catalog table, metrics.json whose
    worst_errors list ``errors`` (name, label, prediction), their 96 px thumbnails in gallery/, report.html."""
    from canestra.pipeline.report import write_report
    from canestra.vision.images import clean_image

    ids = {name: clean_image(p.read_bytes()).image_id for name, p in photos.items()}
    run.mkdir(parents=True)
    (run / "catalog").mkdir()
    pq.write_table(pa.table({"image_id": list(ids.values()), "label": [n.title() for n in ids],
                             "source_path": [str(p) for p in photos.values()]}),
                   run / "catalog" / "part-00000.parquet")
    metrics = {"accuracy": 0.9, "n": 40, "n_train": 120,
               "worst_errors": [_error(ids[name], label, pred) for name, label, pred in errors]}
    for i, (name, _, _) in enumerate(errors):
        _jpeg(run / "gallery" / f"{ids[name]}.jpg", (40 * i, 200, 90), 96)  # resized: other pixels, other id
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    write_report(metrics, run / "report.html")
    return ids


@pytest.mark.parametrize("by", ["image-id", "source"])
def test_erase_covers_the_error_gallery(tmp_path, monkeypatch, capsys, by):
    """Art. 17 for the worst-errors gallery: the thumbnail goes, metrics.json and report.html forget it,
    in every (nested) run, and the other images' entries stay."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("CANESTRA_AUDIT_LOG", raising=False)
    photos = {name: tmp_path / "photos" / name / "IMG_1.jpg" for name in ("apple", "kiwi", "pear")}
    for i, p in enumerate(photos.values()):
        _jpeg(p, (200, 60 * i, 30), 32)
    out = tmp_path / "runs"
    ids = make_gallery_run(out / "r1", photos, [("apple", "Apple Red 1", "Cherry 2"),
                                                ("kiwi", 'Kiwi <B> & "Co"', "Pear 2")])
    make_gallery_run(out / "2025" / "r2", photos, [("pear", "Pear 2", "Apple Red 1"),
                                                   ("apple", "Apple Red 1", "Pear 2")])
    make_gallery_run(out / "r3", photos, [("kiwi", "Kiwi", "Pear 2")])  # never saw the erased image
    erased, kept = ids["apple"], [ids["kiwi"], ids["pear"]]
    r3_report = (out / "r3" / "report.html").read_bytes()
    # positive control: the search sees the image in the gallery, metrics.json and report.html
    hits = find(out, [erased])[erased]
    assert {"r1/metrics.json", "r1/report.html", "2025/r2/metrics.json", "2025/r2/report.html"} <= hits
    assert erased[:12] in (out / "r1" / "report.html").read_text(encoding="utf-8")

    target = ["--image-id", erased] if by == "image-id" else ["--source", str(photos["apple"])]
    assert cli.main(["erase", "--out", str(out), *target]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])

    thumbs = [f"r1/gallery/{erased}.jpg", f"2025/r2/gallery/{erased}.jpg"]
    assert sorted(summary["files_deleted"]) == sorted(thumbs)
    assert not any((out / t).exists() for t in thumbs)
    assert summary["rows_removed"] == {"r1/metrics.json": 1, "2025/r2/metrics.json": 1, "r1/catalog": 1,
                                       "2025/r2/catalog": 1, "r3/catalog": 1}
    assert find(out, [erased, erased[:12]]) == {}, "no file holds the id, not even the report's short form"
    for run, left in (("r1", ids["kiwi"]), ("2025/r2", ids["pear"])):
        metrics = json.loads((out / run / "metrics.json").read_text(encoding="utf-8"))
        assert [e["image_id"] for e in metrics["worst_errors"]] == [left]
        assert metrics["accuracy"] == 0.9 and metrics["n_train"] == 120
        page = (out / run / "report.html").read_text(encoding="utf-8")
        assert f'<img src="gallery/{left}.jpg" width="96" height="96" alt=""/>' in page
        assert left[:12] in page and erased not in page and "<h2>Worst errors</h2>" in page
        assert (out / run / "gallery" / f"{left}.jpg").is_file()
        assert not list((out / run).glob(".tmp-*")) and not (out / run / "report.html.tmp").exists()
    assert "Kiwi &lt;B&gt; &amp; &quot;Co&quot; → Pear 2" in (out / "r1" / "report.html").read_text(encoding="utf-8")
    assert (out / "r3" / "report.html").read_bytes() == r3_report, "a run without the image is not re-rendered"
    assert set(find(out, kept)) == set(kept), "the other images are still there"
    (rec,) = audit.read_records(str(out / "_audit" / "audit.jsonl"))
    assert rec["counts"]["files_deleted"] == 2 and rec["counts"]["rows_removed"] == 5


def test_a_thumbnail_left_behind_is_a_trace(tmp_path):
    """The verification also reads file names: a thumbnail named after an erased id fails the erasure."""
    photo = tmp_path / "photos" / "apple" / "IMG_1.jpg"
    _jpeg(photo, (200, 10, 10), 32)
    out = tmp_path / "runs"
    ids = make_gallery_run(out / "r1", {"apple": photo}, [("apple", "Apple Red 1", "Cherry 2")])
    stray = out / "r1" / "gallery" / f"{ids['apple']}.jpg.bak"  # no image extension: not deleted
    stray.write_bytes(b"x")
    with pytest.raises(OutputError, match="erasure incomplete"):
        erase.erase(str(out), image_ids=[ids["apple"]])
    assert not (out / "r1" / "gallery" / f"{ids['apple']}.jpg").exists() and stray.exists()
