"""S3 storage against a real S3 HTTP endpoint on 127.0.0.1 (moto server, credentials enforced).

The server runs in its own process with ``INITIAL_NO_AUTH_ACTION_COUNT=3``: the first three
requests (create an IAM user, give it a policy, make its access key) are free, every later
request must be signed with that real key.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from canestra.cli import main
from canestra.errors import InputError
from canestra.storage import files as storage
from canestra.storage import s3

EU_BUCKET = "canestra-eu-data"  # created in eu-west-3 (Paris)
US_BUCKET = "canestra-us-data"  # created in us-east-1
PREFIX = "cohort-1/fruits"
IMAGES = f"s3://{EU_BUCKET}/{PREFIX}"


@dataclass(frozen=True)
class Moto:
    endpoint: str
    key_id: str
    secret: str
    log: Path

    def client(self, service: str, region: str = "eu-west-3", secret: str | None = None):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name=region, aws_access_key_id=self.key_id,
                            aws_secret_access_key=secret or self.secret)

    def requests_since(self, mark: int) -> list[str]:
        text = self.log.read_text(errors="replace")[mark:]
        return re.findall(r'"((?:GET|PUT|POST|HEAD|DELETE) [^ ]+) HTTP', text)

    def mark(self) -> int:
        return len(self.log.read_text(errors="replace"))


@pytest.fixture(scope="module")
def moto(tmp_path_factory) -> Moto:
    import boto3
    from cluster import free_port, wait_port

    log = tmp_path_factory.mktemp("moto") / "server.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"  # read by moto at start: auth is enforced after 3 requests
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        wait_port(port, timeout=60)
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="canestra-test")
        iam.put_user_policy(UserName="canestra-test", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="canestra-test")["AccessKey"]
        yield Moto(endpoint, key["AccessKeyId"], key["SecretAccessKey"], log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def buckets(moto, sample_dir) -> list[Path]:
    """The bundled sample under s3://canestra-eu-data/cohort-1/fruits/<Class>/…; a small us-east-1 bucket."""
    eu = moto.client("s3", "eu-west-3")
    eu.create_bucket(Bucket=EU_BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
    files = sorted(p for p in sample_dir.rglob("*") if p.is_file() and not p.name.startswith("."))

    def put(p: Path) -> None:
        eu.put_object(Bucket=EU_BUCKET, Key=f"{PREFIX}/{p.relative_to(sample_dir).as_posix()}", Body=p.read_bytes())

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, files))
    us = moto.client("s3", "us-east-1")
    us.create_bucket(Bucket=US_BUCKET)
    for p in files[:2] + files[-2:]:
        us.put_object(Bucket=US_BUCKET, Key=f"{PREFIX}/{p.relative_to(sample_dir).as_posix()}", Body=p.read_bytes())
    return files


@pytest.fixture(autouse=True)
def aws_env(moto, monkeypatch, tmp_path):
    """Credentials from env (the standard chain's first link), endpoint from CANESTRA_*; no real AWS."""
    for name in list(os.environ):
        if name.startswith("AWS_") or name.startswith("CANESTRA_S3") or name in (
                "CANESTRA_ALLOW_HTTP_ENDPOINT", "CANESTRA_ALLOW_NON_EU_REGION", "CANESTRA_SSE_KMS_KEY_ID"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto.key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto.secret)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask 169.254.169.254
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("CANESTRA_S3_ENDPOINT_URL", moto.endpoint)
    monkeypatch.setenv("CANESTRA_ALLOW_HTTP_ENDPOINT", "1")  # moto serves plain http on loopback
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # audit log of s3:// --out runs
    storage.configure_s3(None)
    yield
    storage.configure_s3(None)


def _cli_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("canestra: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _keys_under(moto: Moto, bucket: str, prefix: str) -> list[str]:
    res = moto.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for o in res.get("Contents", [])]


# --------------------------------------------------------------------------- listing + region


def test_listing_is_one_paginated_request_with_sizes(moto, buckets, sample_dir):
    mark = moto.mark()
    files = storage.list_images(IMAGES)
    requests = moto.requests_since(mark)

    local = {p.relative_to(sample_dir).as_posix(): p.stat().st_size for p in buckets}
    assert {f.path: f.size for f in files} == {f"{IMAGES}/{rel}": size for rel, size in local.items()}
    assert {f.label for f in files} == {p.name for p in sample_dir.iterdir() if p.is_dir()}
    assert all(f.label == f.path.split("/")[-2] and f.mtime > 0 for f in files)
    # 320 objects: one ListObjectsV2 page, no HEAD/GET per object.
    assert sum("list-type=2" in r for r in requests) == 1, requests
    assert not [r for r in requests if re.match(rf"(HEAD|GET) /{EU_BUCKET}/{PREFIX}/.+\.\w+$", r)], requests


def test_bucket_outside_eu_is_refused_unless_allowed(moto, buckets, tmp_path, monkeypatch, capsys):
    with pytest.raises(InputError, match=r"us-east-1.*outside the EU/EEA.*--allow-non-eu-region"):
        storage.list_images(f"s3://{US_BUCKET}/{PREFIX}")
    allowed = s3.S3Options.from_settings(type("Cfg", (), {"s3_endpoint_url": moto.endpoint, "allow_http_endpoint": True,
                                                         "allow_non_eu_region": True})())
    assert len(storage.list_images(f"s3://{US_BUCKET}/{PREFIX}", allowed)) == 4
    # The CLI refuses before Spark starts and writes nothing to --out.
    out = tmp_path / "out"
    assert main(["train", "--images", f"s3://{US_BUCKET}/{PREFIX}", "--out", str(out)]) == 2
    assert "outside the EU/EEA (GDPR Art. 44)" in _cli_error(capsys)
    assert not out.exists()
    # The region comes from S3, not from the client's configuration: an EU client region changes nothing.
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    with pytest.raises(InputError, match="us-east-1"):
        storage.list_images(f"s3://{US_BUCKET}/{PREFIX}", s3.S3Options(moto.endpoint, True))


def test_non_eu_bucket_with_the_override_flag(moto, buckets, spark, tmp_path, capsys):
    """--allow-non-eu-region (a documented transfer safeguard) lets the CLI ingest from us-east-1."""
    out = tmp_path / "out"
    rc = main(["ingest", "--images", f"s3://{US_BUCKET}/{PREFIX}", "--out", str(out), "--allow-non-eu-region",
               "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert spark.read.parquet(str(out / "catalog")).count() == 4
    (rec,) = [json.loads(line) for line in (out / "_audit" / "audit.jsonl").read_text().splitlines()]
    assert rec["command"] == "ingest" and rec["status"] == "ok" and rec["counts"]["images"] == 4


@pytest.mark.parametrize("which", ["secret", "key_id"])
def test_wrong_keys_exit_2_and_nothing_written(moto, buckets, tmp_path, monkeypatch, capsys, which):
    wrong_secret = "WrongSecretThatMustNotBePrinted0123456789"
    if which == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)  # -> SignatureDoesNotMatch
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNCANESTRA00")  # -> InvalidAccessKeyId
    out = tmp_path / "out"
    rc = main(["train", "--images", IMAGES, "--out", str(out), "--debug"])
    captured = capsys.readouterr()
    assert rc == 2
    line = [ln for ln in captured.err.splitlines() if ln.startswith("canestra: error:")][-1]
    assert f"S3 access denied for {IMAGES}: check credentials" in line
    assert wrong_secret not in captured.err + captured.out and moto.secret not in captured.err + captured.out
    assert not out.exists()


def test_plain_errors_for_http_missing_bucket_and_dead_endpoint(moto, buckets, tmp_path, monkeypatch, capsys):
    from cluster import free_port

    out = str(tmp_path / "out")
    monkeypatch.delenv("CANESTRA_ALLOW_HTTP_ENDPOINT")
    assert main(["ingest", "--images", IMAGES, "--out", out]) == 2
    assert "plain http://" in (line := _cli_error(capsys)) and "--allow-http-endpoint" in line
    assert main(["ingest", "--images", f"s3://canestra-no-such-bucket/{PREFIX}", "--out", out,
                 "--allow-http-endpoint"]) == 2
    assert "S3 bucket canestra-no-such-bucket does not exist" in _cli_error(capsys)
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["ingest", "--images", IMAGES, "--out", out, "--allow-http-endpoint", "--s3-endpoint-url", dead]) == 2
    assert f"cannot reach the S3 endpoint {dead}" in _cli_error(capsys)
    assert not Path(out).exists()


# --------------------------------------------------------------------------- writing (GDPR Art. 32)


def test_objects_canestra_writes_are_encrypted(moto, buckets):
    head = moto.client("s3").head_object
    run = f"s3://{EU_BUCKET}/runs/enc"

    assert storage.ensure_output_dir(run) == run
    assert _keys_under(moto, EU_BUCKET, "runs/enc") == []  # the write probe leaves nothing behind

    storage.write_text_atomic(f"{run}/metrics.json", '{"accuracy": 1.0}')
    assert head(Bucket=EU_BUCKET, Key="runs/enc/metrics.json")["ServerSideEncryption"] == "AES256"
    assert storage.read_text(f"{run}/metrics.json") == '{"accuracy": 1.0}'

    # A table Spark wrote (unencrypted here) is re-encrypted when published, and its staging copy removed.
    plain = moto.client("s3")
    staging = storage.staging_dir(f"{run}/catalog")
    for part in ("part-0.parquet", "_SUCCESS"):
        plain.put_object(Bucket=EU_BUCKET, Key=f"{s3.split_uri(staging)[1]}/{part}", Body=b"x")
    # Positive control: the emulator adds no encryption of its own, so what follows proves canestra's.
    assert "ServerSideEncryption" not in head(Bucket=EU_BUCKET, Key=f"{s3.split_uri(staging)[1]}/part-0.parquet")
    storage.publish_dir(staging, f"{run}/catalog")
    assert sorted(_keys_under(moto, EU_BUCKET, "runs/enc/catalog/")) == ["runs/enc/catalog/_SUCCESS",
                                                                         "runs/enc/catalog/part-0.parquet"]
    assert _keys_under(moto, EU_BUCKET, "runs/enc/_staging") == []
    assert head(Bucket=EU_BUCKET, Key="runs/enc/catalog/part-0.parquet")["ServerSideEncryption"] == "AES256"

    # SSE-KMS with a key id (--sse-kms-key-id / CANESTRA_SSE_KMS_KEY_ID).
    key_id = moto.client("kms").create_key(Description="canestra test")["KeyMetadata"]["KeyId"]
    from canestra.config import Settings

    storage.configure_s3(s3.S3Options.from_settings(Settings.load(sse_kms_key_id=key_id)))
    storage.write_text_atomic(f"{run}/quarantine.csv", "path,reason\n")
    meta = head(Bucket=EU_BUCKET, Key="runs/enc/quarantine.csv")
    assert meta["ServerSideEncryption"] == "aws:kms" and key_id in meta["SSEKMSKeyId"]


def test_s3_out_without_spark_s3_filesystem_fails_before_writing(moto, buckets, spark, sample_dir, capsys):
    rc = main(["train", "--images", str(sample_dir), "--out", f"s3://{EU_BUCKET}/runs/no-emrfs", "--quiet"])
    assert rc == 2
    assert "writing tables to s3:// needs EMRFS (on EMR) or the hadoop-aws jars: use a local/HDFS --out" in _cli_error(capsys)
    assert _keys_under(moto, EU_BUCKET, "runs/no-emrfs") == []


# --------------------------------------------------------------------------- the pipeline on S3 images


def _catalog_ids(spark, out_dir: str, label: str | None = None) -> set[str]:
    df = spark.read.parquet(os.path.join(out_dir, "catalog"))
    if label:
        df = df.where(df.label == label)
    return {r.image_id for r in df.select("image_id").collect()}


def test_train_from_s3_reads_the_same_images(moto, buckets, spark, trained, tmp_path):
    """Executors read the bytes from S3 with the settings in the task closure (their env has none)."""
    from canestra.config import Settings
    from canestra.pipeline.train import train
    from canestra.progress import Progress

    res = train(spark, IMAGES, str(tmp_path / "run"), Settings.load(image_sizes="100", pca_k=8, max_iter=5),
                Progress(quiet=True))
    for key in ("images", "classes", "quarantined"):
        assert res.metrics["counts"][key] == trained.metrics["counts"][key]
    assert _catalog_ids(spark, res.out_dir) == _catalog_ids(spark, trained.out_dir)
    paths = spark.read.parquet(os.path.join(res.out_dir, "catalog")).select("source_path").collect()
    assert all(r.source_path.startswith(f"{IMAGES}/") for r in paths)
    assert (tmp_path / "run" / "model" / "metadata").is_dir()


def test_predict_cli_from_s3_never_leaks_credentials(moto, buckets, spark, trained, tmp_path, capfd):
    out = tmp_path / "pred"
    rc = main(["predict", "--model", os.path.join(trained.out_dir, "model"), "--images", f"{IMAGES}/Banana",
               "--out", str(out), "--s3-endpoint-url", moto.endpoint, "--allow-http-endpoint", "--debug"])
    captured = capfd.readouterr()
    assert rc == 0, captured.err
    rows = (out / "predictions.csv").read_text().splitlines()[1:]
    assert {r.split(",")[0] for r in rows} == _catalog_ids(spark, trained.out_dir, "Banana")
    # Credentials: not on stdout/stderr (Spark's included), in no output file, not in the audit log.
    secrets = (moto.key_id, moto.secret)
    assert not [s for s in secrets if s in captured.out + captured.err]
    files = [p for p in list(out.rglob("*")) + list((tmp_path / "state").rglob("*")) if p.is_file()]
    assert len(files) > 3
    leaked = [str(p) for p in files for s in secrets if s.encode() in p.read_bytes()]
    assert not leaked


def test_erase_deletes_the_source_object(moto, buckets, spark, sample_dir, tmp_path, capfd):
    """GDPR Art. 17 on S3: `erase --source s3://… --delete-source` removes the rows and the object itself."""
    from artefacts import find

    src = f"erase-src/{tmp_path.name}"
    c = moto.client("s3")
    for cls in ("Banana", "Kiwi"):
        for p in sorted((sample_dir / cls).iterdir())[:2]:
            c.put_object(Bucket=EU_BUCKET, Key=f"{src}/{cls}/{p.name}", Body=p.read_bytes())
    out = tmp_path / "run"
    images = f"s3://{EU_BUCKET}/{src}"
    assert main(["ingest", "--images", images, "--out", str(out), "--quiet"]) == 0
    catalog = spark.read.parquet(str(out / "catalog")).select("image_id", "source_path").collect()
    victim = next(r for r in catalog if "/Banana/" in r.source_path)
    assert find(out, [victim.image_id, victim.source_path]), "positive control: the catalog holds the image"

    assert main(["erase", "--out", str(out), "--source", victim.source_path, "--delete-source"]) == 0
    captured = capfd.readouterr()
    assert json.loads(captured.out.splitlines()[-1])["sources_deleted"] == 1
    assert find(out, [victim.image_id, victim.source_path]) == {}
    left = _keys_under(moto, EU_BUCKET, src)
    assert f"{src}/Banana/{victim.source_path.rsplit('/', 1)[-1]}" not in left and len(left) == 3
    assert spark.read.parquet(str(out / "catalog")).count() == len(catalog) - 1
    secrets = (moto.key_id, moto.secret)
    assert not [x for x in secrets if x in captured.out + captured.err]
    assert not [p for p in out.rglob("*") if p.is_file() for x in secrets if x.encode() in p.read_bytes()]


@pytest.mark.slow
def test_fresh_machine_train_from_s3_prints_only_canestra_lines(moto, buckets, tmp_path):
    """Issue 14's matrix, s3:// row: empty model cache, two workers, images read through the emulator."""
    import re

    env = dict(os.environ, CANESTRA_CACHE_DIR=str(tmp_path / "empty-cache"), CANESTRA_MASTER="local[2]")
    env.pop("CANESTRA_DEBUG", None)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "canestra.cli", "train", "--images", IMAGES, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    own = re.compile(r"^(canestra |accuracy |macro-F1 |PCA |worst classes|top confusions|  |model: )")
    assert [ln for ln in text.splitlines() if ln.strip() and not own.match(ln)] == []
    assert (out / "model" / "metadata").is_dir() and (out / "_logs" / "spark.log").is_file()
    assert moto.secret not in text
