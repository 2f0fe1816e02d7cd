"""`canestra deploy aws`: the CloudFormation kit (src/canestra/deploy/aws_kit/, both templates) lints clean
(cfn-lint, checkov, parliament), keeps data in the EU/EEA, and creates its resources against a
local AWS emulator (moto server on 127.0.0.1) without ever printing the credentials. The online
service's stack (--serve), status and destroy: tests/test_deploy_aws_serve.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from canestra.cli import main
from canestra.deploy import aws as deploy_aws
from canestra.deploy import aws_serve
from canestra.errors import InputError
from canestra.storage.regions import EU_EEA_REGIONS, check_region

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "src" / "canestra" / "deploy" / "aws_kit"
TEMPLATE = KIT / "canestra-emr.yaml"
SERVE_TEMPLATE = KIT / "canestra-serve.yaml"
TEMPLATES = [TEMPLATE, SERVE_TEMPLATE]
# checks checkov must pass on each template (so a check that silently stops running is noticed)
CHECKOV_MIN_PASSED = {TEMPLATE.name: 30, SERVE_TEMPLATE.name: 25}
REGION = "eu-west-3"
KMS_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"


def _params(**kw) -> deploy_aws.DeployParams:
    base = dict(region=REGION, bucket="canestra-demo-bucket", subnet_id="subnet-0123abcd")
    return deploy_aws.DeployParams(**{**base, **kw})


def _serve_params(**kw) -> aws_serve.ServeParams:
    base = dict(region=REGION, bucket="canestra-demo-bucket", image=f"123456789012.dkr.ecr.{REGION}.amazonaws.com/canestra:0.1.0",
                certificate_arn=f"arn:aws:acm:{REGION}:123456789012:certificate/12345678-1234-1234-1234-123456789012",
                vpc_id="vpc-0123abcd", lb_subnets=("subnet-0123abcd", "subnet-4567cdef"))
    return aws_serve.ServeParams(**{**base, **kw})


# --------------------------------------------------------------------------- regions


def test_only_eu_eea_regions_pass_without_the_flag():
    assert {"eu-west-1", "eu-west-3", "eu-central-1", "eu-north-1", "eu-south-1", "eu-south-2"} == set(EU_EEA_REGIONS)
    for region in EU_EEA_REGIONS:
        check_region(region, allow_non_eu=False, what="bucket")
    # London and Zurich are outside the EU/EEA (adequacy decisions only), like us-east-1.
    for region in ("eu-west-2", "eu-central-2", "us-east-1", "ap-southeast-1"):
        with pytest.raises(InputError, match="--allow-non-eu-region"):
            check_region(region, allow_non_eu=False, what="bucket")
        check_region(region, allow_non_eu=True, what="bucket")


def test_cli_refuses_non_eu_region_with_exit_2(capsys):
    rc = main(["deploy", "aws", "--region", "eu-west-2", "--bucket", "canestra-demo-bucket", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("canestra: error:") and "--allow-non-eu-region" in err and "GDPR" in err
    assert len(err.strip().splitlines()) == 1
    rc = main(["deploy", "aws", "--region", "eu-west-2", "--bucket", "canestra-demo-bucket", "--dry-run",
               "--allow-non-eu-region"])
    assert rc == 0
    assert "plan: CloudFormation stack 'canestra' in eu-west-2" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["--bucket", "Bad.Name"], "bucket name"),
    (["--endpoint-url", "http://127.0.0.1:9"], "--allow-http-endpoint"),
    (["--endpoint-url", "http://10.1.2.3:9", "--allow-http-endpoint"], "loopback"),
    (["--kms-key-id", "not-a-key"], "KMS key id"),
    (["--release-label", "emr-6.15.0"], "EMR 7.x"),
])
def test_cli_rejects_bad_options(capsys, argv, needle):
    base = ["deploy", "aws", "--region", REGION, "--bucket", "canestra-demo-bucket", "--dry-run"]
    rc = main(base + argv)
    assert rc == 2 and needle in capsys.readouterr().err


# --------------------------------------------------------------------------- plan and estimate


def test_dry_run_prints_plan_and_priced_estimate_without_credentials(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", HOME=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "canestra.cli", "deploy", "aws", "--region", REGION, "--bucket", "canestra-demo-bucket",
         "--dry-run", "--core-count", "3", "--core-type", "m5.2xlarge", "--hours", "2", "--idle-timeout", "1800"],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for rtype in ("AWS::S3::Bucket", "AWS::S3::BucketPolicy", "AWS::IAM::Role", "AWS::EMR::SecurityConfiguration",
                  "AWS::EMR::Cluster"):
        assert rtype in out
    assert "emr-7.5.0" in out and "spark-submit" in out and "dry run: nothing created" in out
    prices = json.loads((KIT / "prices.json").read_text())
    per_h = {t: prices["ec2_per_hour"][REGION][t] + prices["emr_uplift_per_hour"][t] for t in ("m5.xlarge", "m5.2xlarge")}
    hours = 2 + 0.5  # job + idle timeout
    expected = hours * (per_h["m5.xlarge"] + 3 * per_h["m5.2xlarge"])
    assert f"about ${expected:.2f} USD (estimate, prices as of {prices['prices_as_of']})" in out
    assert "4 instances x 2.5 h" in out
    assert "ESTIMATE" in out and "check the AWS pricing pages" in out


def test_estimate_without_a_price_says_so():
    cost = deploy_aws.estimate_cost(_params(core_type="x9.huge"), 1.0, KIT)
    assert cost.total_usd is None
    assert "no price" in "\n".join(cost.lines())


# --------------------------------------------------------------------------- template content


@pytest.mark.parametrize("kms", ["", KMS_ID], ids=["sse-s3", "sse-kms"])
def test_template_encrypts_blocks_public_access_and_scopes_iam(kms):
    res = deploy_aws.render(_params(kms_key_id=kms))["Resources"]
    bucket = res["DataBucket"]["Properties"]
    sse = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
    assert sse["SSEAlgorithm"] == ("aws:kms" if kms else "AES256")
    assert not kms or sse["KMSMasterKeyID"].endswith(f":key/{KMS_ID}")
    assert set(bucket["PublicAccessBlockConfiguration"].values()) == {True}
    assert len(bucket["PublicAccessBlockConfiguration"]) == 4
    rules = {r.get("Prefix"): r for r in bucket["LifecycleConfiguration"]["Rules"]}
    assert rules["images/"]["ExpirationInDays"] == "365" and rules["runs/"]["ExpirationInDays"] == "180"

    statements = res["DataBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    tls = [s for s in statements if s["Effect"] == "Deny" and s.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false"]
    assert tls and tls[0]["Action"] == "s3:*"
    unencrypted = [s for s in statements if s["Effect"] == "Deny" and s["Action"] == "s3:PutObject"
                   and s["Condition"].get("Null", {}).get("s3:x-amz-server-side-encryption") == "true"]
    assert unencrypted

    # Least privilege: no action wildcard and no resource wildcard in any role policy;
    # S3 access only under the bucket's own prefixes.
    bucket_arn = "arn:aws:s3:::canestra-demo-bucket"
    for role in ("EmrInstanceRole", "EmrServiceRole"):
        for pol in res[role]["Properties"]["Policies"]:
            for st in pol["PolicyDocument"]["Statement"]:
                actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
                resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
                assert not any(a == "*" or a.endswith(":*") for a in actions), st
                assert "*" not in resources, st
                for r in resources:
                    if r.startswith(f"{bucket_arn}/"):
                        assert r.split("/", 1)[1].split("/")[0] in ("images", "inbox", "runs", "artifacts"), r

    sec = res["EmrSecurityConfiguration"]["Properties"]["SecurityConfiguration"]["EncryptionConfiguration"]
    assert sec["EnableAtRestEncryption"] is True and sec["EnableInTransitEncryption"] is True
    assert sec["AtRestEncryptionConfiguration"]["LocalDiskEncryptionConfiguration"]["EnableEbsEncryption"] is True
    cluster = res["EmrCluster"]["Properties"]
    assert cluster["ReleaseLabel"].startswith("emr-7.") and cluster["Applications"] == [{"Name": "Spark"}]
    assert int(cluster["AutoTerminationPolicy"]["IdleTimeout"]) == 3600
    assert cluster["BootstrapActions"][0]["ScriptBootstrapAction"]["Args"] == [
        "s3://canestra-demo-bucket/artifacts/canestra-0.1.0-py3-none-any.whl"]


def test_template_steps_are_the_library_step_commands():
    p = _params(train_args=("--pca-k", "64", "--max-iter", "20"))
    cluster = deploy_aws.render(p)["Resources"]["EmrCluster"]["Properties"]
    in_template = {s["Name"]: s["HadoopJarStep"]["Args"] for s in cluster["Steps"]}
    assert in_template == deploy_aws.emr_steps(p.bucket, p.train_args)
    assert in_template["canestra-train"][-4:] == ["--pca-k", "64", "--max-iter", "20"]


def test_storage_only_pass_has_no_cluster():
    res = deploy_aws.render(_params(deploy_cluster=False))["Resources"]
    assert "EmrCluster" not in res and "DataBucket" in res


# --------------------------------------------------------------------------- linters


def _linter(name: str) -> str:
    for d in (ROOT / ".venv-lint" / "bin", Path(sys.executable).parent):
        if (d / name).exists():
            return str(d / name)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed: .ci/run installs it into .venv-lint")
    return found


def test_the_kit_templates_are_the_ones_linted():
    assert sorted(KIT.glob("*.yaml")) == sorted([*TEMPLATES, KIT / "parliament-suppressions.yaml"])


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_cfn_lint_is_clean(template):
    proc = subprocess.run([_linter("cfn-lint"), str(template)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_checkov_is_clean_and_every_skip_is_justified(tmp_path, template):
    import yaml

    env = dict(os.environ, BC_SKIP_MAPPING="TRUE", CHECKOV_RUN_SCA_PACKAGE_SCAN_V2="false")
    proc = subprocess.run(
        [_linter("checkov"), "-f", str(template), "--framework", "cloudformation", "--skip-download", "--quiet",
         "-o", "json"], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    report = json.loads(proc.stdout)
    summary = report["summary"]
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert summary["failed"] == 0 and not failed, failed
    assert summary["parsing_errors"] == 0
    template_doc = yaml.load(template.read_text(), Loader=deploy_aws._cfn_loader())
    assert summary["resource_count"] == len(template_doc["Resources"])  # every resource was checked
    assert summary["passed"] >= CHECKOV_MIN_PASSED[template.name]
    skips = [(lid, s) for lid, r in template_doc["Resources"].items()
             for s in r.get("Metadata", {}).get("checkov", {}).get("skip", [])]
    assert summary["skipped"] == len(skips)
    for lid, skip in skips:
        assert len(skip.get("comment", "")) > 30, f"{lid}: skip {skip['id']} has no justification"


def test_parliament_is_clean_on_every_policy_document(tmp_path):
    import yaml

    accepted = yaml.safe_load((KIT / "parliament-suppressions.yaml").read_text())
    for name, entries in accepted.items():
        assert all(len(e.get("why", "")) > 30 for e in entries), f"{name}: suppression without a reason"
    used: set[tuple[str, str]] = set()
    names: dict[str, str] = {}
    serve_template = deploy_aws.load_template(KIT, aws_serve.SERVE_TEMPLATE_NAME)
    for kms in ("", KMS_ID):
        docs = deploy_aws.policy_documents(deploy_aws.render(_params(kms_key_id=kms)))
        docs.update(deploy_aws.policy_documents(deploy_aws.render(_serve_params(kms_key_id=kms), serve_template)))
        for name, doc in docs.items():
            if name.endswith(".AssumeRolePolicy"):
                continue  # trust policies: see parliament-suppressions.yaml (checkov covers them)
            path = tmp_path / f"{'kms' if kms else 'sse'}-{name}.json"
            path.write_text(json.dumps(doc, indent=1))
            names[str(path)] = name
    linted = len(names)
    proc = subprocess.run([_linter("parliament"), "--directory", str(tmp_path), "--include_policy_extension", "json",
                           "--include-community-auditors", "--json"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1) and not proc.stderr.strip(), proc.stderr
    findings = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    for f in findings:
        name = names[f["location"]["filepath"]]
        rules = [e for e in accepted.get(name, []) if e["issue"] == f["issue"]
                 and ("actions" not in e or sorted(e["actions"]) == sorted(f["location"].get("actions", [])))]
        assert rules, f"{name}: {f}"
        used.add((name, f["issue"]))
    assert linted >= 13  # identity, bucket and key policies of both templates and both encryption modes
    stale = {(n, e["issue"]) for n, es in accepted.items() for e in es} - used
    assert not stale, f"suppressions that no longer match a finding: {stale}"


# --------------------------------------------------------------------------- moto server


@pytest.fixture
def moto_endpoint():
    from cluster import free_port
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


FAKE_KEY_ID = "AKIAFAKECANESTRA7Q2Z"
FAKE_SECRET = "fakeSecret/CanestraMustNeverPrint+9xQ"


def _client(service: str, endpoint: str):
    import boto3

    return boto3.client(service, region_name=REGION, endpoint_url=endpoint, aws_access_key_id=FAKE_KEY_ID,
                        aws_secret_access_key=FAKE_SECRET)


def _policy(response: dict) -> dict:
    doc = response["PolicyDocument"]
    if isinstance(doc, str):  # botocore decodes JSON; moto's CloudFormation stores a Python repr
        import ast

        doc = ast.literal_eval(doc)
    return doc


def test_deploy_creates_stack_on_moto_and_never_leaks_credentials(moto_endpoint, canestra_wheel, tmp_path):
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.emr.models import emr_backends

    subnet = _client("ec2", moto_endpoint).describe_subnets()["Subnets"][0]["SubnetId"]
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=FAKE_KEY_ID, AWS_SECRET_ACCESS_KEY=FAKE_SECRET, HOME=str(home),
               AWS_CONFIG_FILE=str(home / "none"), AWS_SHARED_CREDENTIALS_FILE=str(home / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    bucket = "canestra-moto-bucket"
    proc = subprocess.run(
        [sys.executable, "-m", "canestra.cli", "deploy", "aws", "--region", REGION, "--bucket", bucket,
         "--subnet-id", subnet, "--endpoint-url", moto_endpoint, "--allow-http-endpoint", "--wheel", str(canestra_wheel),
         "--debug"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "UPDATE_COMPLETE"
    outputs = summary["outputs"]
    assert outputs["BucketName"] == bucket and outputs["LogBucketName"] == f"{bucket}-logs"

    # S3: the bucket in Paris, encrypted by default; artifacts uploaded with SSE.
    s3 = _client("s3", moto_endpoint)
    assert s3.get_bucket_location(Bucket=bucket)["LocationConstraint"] == REGION
    rule = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {f"artifacts/{canestra_wheel.name}", "artifacts/bootstrap.sh", "artifacts/emr_step.py",
                    "artifacts/emr-tls-certs.zip"}
    for key in keys:
        assert s3.head_object(Bucket=bucket, Key=key)["ServerSideEncryption"] == "AES256"
    assert s3.get_object(Bucket=bucket, Key=f"artifacts/{canestra_wheel.name}")["Body"].read() == canestra_wheel.read_bytes()

    # IAM: both roles with their inline policies, S3 access scoped to the bucket.
    iam = _client("iam", moto_endpoint)
    roles = {r["RoleName"]: r for r in iam.list_roles()["Roles"]}
    instance_role = outputs["InstanceRoleArn"].rsplit("/", 1)[1]
    service_role = outputs["ServiceRoleArn"].rsplit("/", 1)[1]
    assert {instance_role, service_role} <= set(roles)
    doc = _policy(iam.get_role_policy(RoleName=instance_role, PolicyName="canestra-data-access"))
    s3_resources = [r for st in doc["Statement"] for r in (st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]])
                    if r.startswith("arn:aws:s3")]
    assert s3_resources and all(r.startswith((f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}-logs/")) for r in s3_resources)
    passrole = _policy(iam.get_role_policy(RoleName=service_role, PolicyName="canestra-emr-service"))["Statement"][0]
    assert passrole["Action"] == "iam:PassRole" and passrole["Resource"] == outputs["InstanceRoleArn"]
    profiles = iam.list_instance_profiles_for_role(RoleName=instance_role)["InstanceProfiles"]
    assert len(profiles) == 1

    # EMR: moto answers EMR API calls on a custom endpoint in us-east-1 whatever the
    # region, so read what the stack made from moto's own (in-process) backend.
    emr = emr_backends[DEFAULT_ACCOUNT_ID][REGION]
    sec = emr.security_configurations[outputs["SecurityConfigurationName"]]
    sec_doc = sec.security_configuration if isinstance(sec.security_configuration, dict) else json.loads(sec.security_configuration)
    assert sec_doc["EncryptionConfiguration"]["EnableInTransitEncryption"] is True
    cluster = emr.clusters[outputs["ClusterId"]]
    assert cluster.release_label == "emr-7.5.0" and cluster.name == "canestra-canestra"

    # The credentials appear nowhere: not in the output, not in what was uploaded,
    # not in the stack, not in any file the command wrote.
    cfn = _client("cloudformation", moto_endpoint)
    stack = json.dumps(cfn.describe_stacks(StackName="canestra")["Stacks"], default=str)
    stack += cfn.get_template(StackName="canestra")["TemplateBody"]
    uploaded = b"".join(s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys)
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    for secret in (FAKE_KEY_ID, FAKE_SECRET):
        assert secret not in proc.stdout and secret not in proc.stderr
        assert secret not in stack
        assert secret.encode() not in uploaded and secret.encode() not in written
    assert "PRIVATE KEY" not in proc.stdout + proc.stderr  # the generated TLS key stays in the bucket


def test_deploy_without_credentials_says_how_to_get_them(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HOME=str(tmp_path), AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    proc = subprocess.run(
        [sys.executable, "-m", "canestra.cli", "deploy", "aws", "--region", REGION, "--bucket", "canestra-demo-bucket",
         "--subnet-id", "subnet-0123abcd"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "no AWS credentials" in proc.stderr and "aws configure" in proc.stderr
