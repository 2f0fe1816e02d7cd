"""The feedback store on S3 (a moto server on 127.0.0.1, credentials enforced): each correction is one
encrypted object, listed by label, erased and expired like a local one."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from test_s3 import aws_env, moto  # noqa: F401  (fixtures: the S3 endpoint, its credentials in the env)

from canestra.config import Settings
from canestra.feedback import store

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real-photos"
BUCKET = "canestra-eu-feedback"
KEY = "feedback-s3-key-" + "a1b2c3d4" * 4


@pytest.fixture(scope="module")
def bucket(moto):  # noqa: F811
    moto.client("s3", "eu-west-3").create_bucket(Bucket=BUCKET,
                                                 CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
    return BUCKET


def test_corrections_on_s3_are_encrypted_objects_erased_and_expired(moto, bucket, trained, tmp_path):  # noqa: F811
    from fastapi.testclient import TestClient

    from canestra.serve.app import create_app
    from canestra.serve.security import KeyRing

    uri = f"s3://{bucket}/feedback"
    keys = tmp_path / "keys.txt"
    keys.write_text(KEY + "\n")
    keys.chmod(0o600)
    app = create_app(os.path.join(trained.out_dir, "model"), Settings.load(
        serve_threads=1, rate_limit=0, feedback_dir=uri, api_keys_file=str(keys)), keys=KeyRing(str(keys)))
    photo = sorted((REAL / "Apple").glob("*.jpg"))[2].read_bytes()
    with TestClient(app) as client:
        r = client.post("/v1/feedback", data={"label": "Apple", "consent": "true"}, files={"file": ("p.jpg", photo)},
                        headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 201, r.text
    image_id = r.json()["image_id"]
    head = moto.client("s3").head_object
    assert head(Bucket=bucket, Key=f"feedback/family/Apple/{image_id}.jpg")["ServerSideEncryption"] == "AES256"
    assert head(Bucket=bucket, Key=f"feedback/{store.MARKER}")["ServerSideEncryption"] == "AES256"
    [entry] = store.entries(uri)
    assert (entry.level, entry.label, entry.image_id) == ("family", "Apple", image_id)
    assert store.summary(uri)["by_level"] == {"family": 1, "variety": 0}
    # positive control of the expiry, then the erasure
    assert store.purge(uri, 30) == [] and len(store.purge(uri, 0, dry_run=True, now=time.time() + 86400)) == 1
    assert store.erase(uri, {image_id}) == [f"family/Apple/{image_id}.jpg"]
    assert store.entries(uri) == []
    listed = moto.client("s3").list_objects_v2(Bucket=bucket, Prefix="feedback/").get("Contents", [])
    assert [o["Key"] for o in listed] == [f"feedback/{store.MARKER}"]
