"""GDPR Art. 30: `canestra gdpr record` writes a record of processing (Markdown + JSON) generated
from the real configuration (Settings, env) and what is on disk, not static text."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from canestra.cli import commands as cli
from canestra.privacy import erase


@pytest.fixture
def run(trained, tmp_path, monkeypatch):
    for var in ("CANESTRA_CONTROLLER", "CANESTRA_RETENTION_DAYS", "CANESTRA_REGION", "CANESTRA_AUDIT_LOG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    dst = tmp_path / "run"
    shutil.copytree(trained.out_dir, dst)
    return dst


def record(run) -> dict:
    assert cli.main(["gdpr", "record", "--out", str(run)]) == 0
    assert (run / "_gdpr" / "record-of-processing.md").is_file()
    return json.loads((run / "_gdpr" / "record-of-processing.json").read_text())


def test_record_reflects_configuration_and_disk(run, monkeypatch):
    monkeypatch.setenv("CANESTRA_CONTROLLER", "Frutta Fresca Srl")
    monkeypatch.setenv("CANESTRA_RETENTION_DAYS", "30")
    rec = record(run)
    catalog = pq.read_table(run / "catalog", columns=["split"])["split"].to_pylist()
    assert rec["controller"]["name"] == "Frutta Fresca Srl"
    assert rec["retention"]["period_days"] == 30 and rec["retention"]["outputs_past_retention"] == 0
    tables = {t["table"]: t for t in rec["categories_of_data"]["tables"]}
    store = [t for t in tables if t.startswith("feature_store/")]  # embeddings by image_id, one per image
    assert set(tables) == {"catalog", "features", *store} and len(store) == 1
    assert tables[store[0]]["rows"] == len(set(pq.read_table(run / "catalog", columns=["image_id"])["image_id"]))
    assert tables["catalog"]["rows"] == len(catalog) and tables["features"]["rows"] == len(catalog)
    assert "source_path" in tables["catalog"]["columns"] and tables["catalog"]["holds_source_paths"]
    assert not tables["features"]["holds_source_paths"]
    (model,) = rec["categories_of_data"]["models"]
    assert model["trained_on_images"] == catalog.count("train") and not model["retrain_needed"]
    assert rec["location"]["transfers"].startswith("none: data stays on the host")
    assert rec["audit_log"]["records"] == 0
    assert any(p.startswith("training and evaluating") for p in rec["purposes"])
    md = (run / "_gdpr" / "record-of-processing.md").read_text()
    assert "Frutta Fresca Srl" in md and "older than 30 days" in md
    assert f"| `catalog/` (Parquet) | {len(catalog)} |" in md
    for heading in ("Purposes", "Categories of personal data", "Categories of recipients", "Retention",
                    "Location and transfers", "Technical and organisational security measures", "Erasure"):
        assert f"## {heading}" in md


def test_record_changes_with_the_configuration(run, monkeypatch):
    first = record(run)
    assert first["controller"]["name"].startswith("[to be completed")
    assert first["retention"]["rule"].startswith("NOT CONFIGURED")
    monkeypatch.setenv("CANESTRA_REGION", "us-east-1")
    assert record(run)["location"]["transfers"].startswith("TRANSFER OUTSIDE THE EU/EEA")
    monkeypatch.setenv("CANESTRA_REGION", "eu-west-3")
    third = record(run)
    assert third["location"]["transfers"].startswith("none outside the EU/EEA")
    assert third["audit_log"]["records"] == 2, "the two earlier `gdpr record` runs were audited"


def test_record_shows_erasures_and_shared_paths(run):
    catalog = pq.read_table(run / "catalog", columns=["image_id", "split"]).to_pylist()
    train_id = next(r["image_id"] for r in catalog if r["split"] == "train")
    erase.erase(str(run), image_ids=[train_id])
    (run / "pred").mkdir()
    (run / "pred" / "predictions.csv").write_text("path,image_id,prediction\n/photos/a.jpg,x,Banana\n")
    rec = record(run)
    assert rec["erasure"]["models_needing_retrain"] == ["model"]
    assert any(m.startswith("WARNING: outputs meant for sharing hold source paths") and "pred/predictions.csv" in m
               for m in rec["security_measures"])
    assert any(p.startswith("classifying images") for p in rec["purposes"])


def test_record_states_the_s3_security_settings_in_force(run, monkeypatch):
    """Art. 30(1)(g)/Art. 32: the measures listed are the ones s3.py will apply, read from the configuration."""
    for var in ("CANESTRA_SSE_KMS_KEY_ID", "CANESTRA_ALLOW_HTTP_ENDPOINT", "CANESTRA_ALLOW_NON_EU_REGION",
                "CANESTRA_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    default = "\n".join(record(run)["security_measures"])
    assert "SSE-S3 (AES256)" in default and "TLS (https endpoints only)" in default
    assert "buckets outside the EU/EEA are refused" in default
    monkeypatch.setenv("CANESTRA_SSE_KMS_KEY_ID", "arn:aws:kms:eu-west-3:111122223333:key/canestra-test")
    monkeypatch.setenv("CANESTRA_ALLOW_NON_EU_REGION", "1")
    assert cli.main(["gdpr", "record", "--out", str(run), "--allow-http-endpoint",
                     "--s3-endpoint-url", "http://user:pw@127.0.0.1:9000"]) == 0
    md = (run / "_gdpr" / "record-of-processing.md").read_text()
    assert "SSE-KMS (aws:kms) with key arn:aws:kms:eu-west-3:111122223333:key/canestra-test" in md
    assert "WARNING: plain http:// endpoints allowed" in md and "WARNING: buckets outside the EU/EEA accepted" in md
    assert "pw@" not in md and "http://127.0.0.1:9000" in md
