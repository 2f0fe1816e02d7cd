"""End to end on the bundled sample: train writes a loadable model and metrics, predict and
evaluate work, bad files are quarantined, re-runs are idempotent."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from corpus import build_bad_corpus

from canestra.pipeline.ingest import CATALOG_COLUMNS
from canestra.pipeline.predict import evaluate, predict
from canestra.progress import Progress
from canestra.vision.images import has_metadata

QUIET = Progress(quiet=True)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_train_writes_model_metrics_report(trained):
    out = Path(trained.out_dir)
    m = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix", "pca", "counts", "timings_s", "split"):
        assert key in m
    assert m["accuracy"] >= 0.95
    assert m["split"]["method"].startswith("contiguous frame-number blocks")
    assert m["counts"]["train"] + m["counts"]["test"] == 320
    assert m["pca"]["k"] == 32 and 0 < m["pca"]["explained_variance"] <= 1
    assert len(m["confusion_matrix"]["labels"]) == 10
    html = (out / "report.html").read_text()
    assert "<svg" in html and "Confusion matrix" in html and "explained variance" in html
    assert (out / "model" / "metadata").is_dir()


def test_catalog_table(spark, trained):
    cat = spark.read.parquet(os.path.join(trained.out_dir, "catalog"))
    assert cat.columns == CATALOG_COLUMNS
    rows = cat.select("image_id", "label", "split", "width", "height").collect()
    assert len(rows) == 320 and len({r.image_id for r in rows}) == 320
    assert {r.split for r in rows} == {"train", "test"}
    assert all(r.width == 100 and r.height == 100 for r in rows)


def test_saved_pipeline_model_scores_raw_image_bytes(spark, trained, sample_dir):
    """PipelineModel.load + transform on raw images (Spark's binaryFile source) just works."""
    from pyspark.ml import PipelineModel

    model = PipelineModel.load(os.path.join(trained.out_dir, "model"))
    df = spark.read.format("binaryFile").load(str(sample_dir / "Banana"))
    preds = model.transform(df).select("predicted_label").collect()
    banana = sum(r.predicted_label == "Banana" for r in preds)
    assert len(preds) == 32 and banana >= 30


def test_predict_csv_and_evaluate(spark, trained, sample_dir, tmp_path):
    model = os.path.join(trained.out_dir, "model")
    res = predict(spark, model, str(sample_dir), str(tmp_path / "p"), QUIET)
    rows = read_csv(tmp_path / "p" / "predictions.csv")
    # GDPR Art. 25: shared outputs carry the pseudonymous image_id, no source path by default.
    assert list(rows[0].keys()) == ["image_id", "prediction", "probability", "family", "family_probability", "top5", "label"]
    assert len(rows) == 320 and res.quarantined == 0
    for r in rows:
        top5 = json.loads(r["top5"])
        assert len(top5) == 5 and top5[0][0] == r["prediction"] or r["prediction"] == "unknown"
        assert abs(top5[0][1] - float(r["probability"])) < 1e-5
        assert (r["family"] == "") == (r["prediction"] == "unknown")
        assert [p for _, p in top5] == sorted((p for _, p in top5), reverse=True)
    assert sum(r["prediction"] == r["label"] for r in rows) / len(rows) >= 0.97
    m = evaluate(spark, model, str(sample_dir), str(tmp_path / "e"), QUIET)
    assert m["n"] == 320 and m["accuracy"] >= 0.97
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["accuracy"] == m["accuracy"]


def test_bad_inputs_quarantined_nothing_lost(spark, trained, sample_dir, tmp_path):
    corpus = build_bad_corpus(tmp_path / "imgs", sample_dir / "Banana")
    res = predict(spark, os.path.join(trained.out_dir, "model"), str(tmp_path / "imgs"), str(tmp_path / "out"), QUIET,
                  include_paths=True)
    preds = read_csv(tmp_path / "out" / "predictions.csv")
    quarantine = read_csv(tmp_path / "out" / "quarantine.csv")
    assert {r["path"] for r in preds} == {str(p) for p in corpus["valid"]}
    assert {r["path"] for r in quarantine} == {str(p) for p in corpus["bad"]}
    reasons = {r["path"]: r["reason"] for r in quarantine}
    for p, expected in corpus["expected_reason"].items():
        assert expected in reasons[str(p)], (p, reasons[str(p)])
    assert res.predicted == len(corpus["valid"]) and res.quarantined == len(corpus["bad"])
    assert len(corpus["valid"]) + len(corpus["bad"]) >= 12


def test_ingest_strips_gps_from_stored_images(spark, sample_dir, tmp_path):
    from canestra.pipeline.ingest import ingest

    corpus = build_bad_corpus(tmp_path / "imgs")
    res = ingest(spark, str(tmp_path / "imgs"), str(tmp_path / "out"))
    rows = spark.read.parquet(res.catalog_path).select("source_path", "content").collect()
    assert len(rows) == len(corpus["valid"])
    for r in rows:
        assert has_metadata(bytes(r.content)) == [], r.source_path
        assert b"Mario Rossi" not in bytes(r.content)
    quarantine = read_csv(res.quarantine_csv)
    assert len(quarantine) == len(corpus["bad"])


def test_rerun_is_idempotent(spark, sample_dir, tmp_path):
    from canestra.config import Settings
    from canestra.pipeline.train import train

    small = tmp_path / "imgs"
    for cls in ("Banana", "Kiwi", "Lemon"):
        shutil.copytree(sample_dir / cls, small / cls)
    cfg = Settings.load(pca_k=8, max_iter=20)
    first = train(spark, str(small), str(tmp_path / "out"), cfg, QUIET)
    preds1 = predict(spark, str(tmp_path / "out" / "model"), str(small), str(tmp_path / "pred"), QUIET)
    rows1 = read_csv(tmp_path / "pred" / "predictions.csv")
    second = train(spark, str(small), str(tmp_path / "out"), cfg, QUIET)
    predict(spark, str(tmp_path / "out" / "model"), str(small), str(tmp_path / "pred"), QUIET)
    rows2 = read_csv(tmp_path / "pred" / "predictions.csv")
    assert first.metrics["accuracy"] == second.metrics["accuracy"]
    assert first.metrics["confusion_matrix"] == second.metrics["confusion_matrix"]
    assert [(r["image_id"], r["prediction"]) for r in rows1] == [(r["image_id"], r["prediction"]) for r in rows2]
    assert len(rows2) == preds1.predicted == 96
    assert spark.read.parquet(str(tmp_path / "out" / "catalog")).count() == 96
    assert spark.read.parquet(str(tmp_path / "pred" / "predictions")).count() == 96
    assert not (tmp_path / "out" / "_staging").exists()


def test_crashed_publish_never_looks_complete(tmp_path, monkeypatch):
    """A table is visible under its final name only once complete (staging + rename):
    the old table stays readable while the new one is written, a publish replaces it whole,
    and a crash during the publish never leaves the new table's parts under the final name."""
    from canestra.layout import STAGING
    from canestra.storage import files as storage

    def table(path: str) -> dict[str, str]:
        return {p.name: p.read_text() for p in Path(path).iterdir()} if os.path.isdir(path) else {}

    final = str(tmp_path / "table")
    os.makedirs(final)
    Path(final, "part-old.parquet").write_text("old")
    Path(final, "_SUCCESS").write_text("")
    staging = storage.staging_dir(final)
    assert os.path.basename(os.path.dirname(staging)) == STAGING and not staging.startswith(final + os.sep)
    os.makedirs(staging)
    Path(staging, "part-new.parquet").write_text("half")
    assert table(final) == {"part-old.parquet": "old", "_SUCCESS": ""}  # writing the new one leaves the old intact
    Path(staging, "part-new.parquet").write_text("new")
    Path(staging, "_SUCCESS").write_text("")

    real_replace, calls = os.replace, []

    def crash_on_publish(src, dst):
        calls.append((src, dst))
        if os.fspath(src) == staging:
            raise OSError("simulated crash while publishing")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_publish)
    # The two-rename path (filesystems without an atomic swap; test_safety_publish.py covers the swap).
    monkeypatch.setattr(storage, "_exchange", lambda a, b: False)
    with pytest.raises(OSError, match="simulated crash"):
        storage.publish_dir(staging, final)
    assert (staging, final) in calls  # the fault really hit the publishing rename
    assert table(final) == {"part-old.parquet": "old", "_SUCCESS": ""}  # the old table is back, untouched
    assert table(staging) == {"part-new.parquet": "new", "_SUCCESS": ""}  # the complete copy survives

    monkeypatch.setattr(os, "replace", real_replace)
    storage.publish_dir(staging, final)
    assert table(final) == {"part-new.parquet": "new", "_SUCCESS": ""}  # replaced whole, no old part left
    assert not os.path.exists(staging) and not os.path.exists(os.path.dirname(staging))


def test_readme_job_with_default_settings_classifies_the_bundled_sample(spark, sample_dir, tmp_path):
    """`canestra train --images sample/fruits-360` as the README runs it: defaults, right answers."""
    from canestra.config import Settings
    from canestra.pipeline.train import train

    res = train(spark, str(sample_dir), str(tmp_path / "demo"), Settings.load(), QUIET)
    m = res.metrics
    # 253 training images cannot carry 256 principal components: k is capped at n - 1.
    assert m["pca"]["k"] == min(256, m["counts"]["train"] - 1)
    assert m["accuracy"] >= 0.95, m["accuracy"]
