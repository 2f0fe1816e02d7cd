"""``canestra deploy aws``: render the CloudFormation kit in ``aws_kit/`` (shipped in the package), print the plan
and a cost estimate, and (with AWS credentials) create the stack; with ``--serve`` also the online
service's stack (``aws_serve``); ``canestra deploy aws status|destroy`` are in ``aws_ops``.

Two passes, because the cluster's bootstrap action reads the wheel from the bucket
the stack creates: (1) stack with ``DeployCluster=false`` (bucket, roles, EMR security
configuration); (2) upload wheel, bootstrap script, step script and TLS certificates;
(3) update the stack with ``DeployCluster=true`` (the EMR cluster and its steps).

Credentials come from boto3's standard chain (env, profile, instance role) and are
never printed or written anywhere.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.resources
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from canestra import __version__
from canestra.config import Settings
from canestra.deploy import aws_serve
from canestra.errors import EnvironmentProblem, InputError, OutputError
from canestra.storage.regions import check_region
from canestra.storage.s3 import check_endpoint  # the same TLS rule as s3:// data paths

TEMPLATE_NAME = "canestra-emr.yaml"
PRICES_NAME = "prices.json"
BOOTSTRAP_NAME = "bootstrap.sh"
STEP_SCRIPT_NAME = "emr_step.py"
TLS_ZIP_NAME = "emr-tls-certs.zip"
KIT_PACKAGE_DIR = "aws_kit"  # package data beside this module
ARTIFACTS = "artifacts/"

# Where the bootstrap action installs canestra on every EMR node.
VENV_PYTHON = "/opt/canestra/venv/bin/python"
NODE_CACHE_DIR = "/opt/canestra/cache"

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,56}[a-z0-9]$")
_SUBNET_RE = re.compile(r"^subnet-[0-9a-f]{8,17}$")
_KMS_RE = re.compile(r"^(mrk-)?[0-9a-fA-F-]{32,36}$")
_STACK_RE = re.compile(r"^[A-Za-z][A-Za-z0-9-]{0,100}$")


def kit_dir() -> Path:
    """The kit's folder: ``CANESTRA_DEPLOY_DIR``, else the ``aws_kit`` data shipped in the package."""
    env = os.environ.get("CANESTRA_DEPLOY_DIR")
    # Installed wheels are plain folders, so the resource is a real path spark-submit/S3 uploads can read.
    path = Path(env) if env else Path(str(importlib.resources.files("canestra.deploy").joinpath(KIT_PACKAGE_DIR)))
    if not (path / TEMPLATE_NAME).is_file():
        where = "CANESTRA_DEPLOY_DIR" if env else "the installed canestra package"
        raise EnvironmentProblem(
            f"the AWS deployment kit is not at {path} ({where}): reinstall canestra "
            f"or set CANESTRA_DEPLOY_DIR to a folder holding {TEMPLATE_NAME}"
        )
    return path


# --------------------------------------------------------------------------- parameters


@dataclass
class DeployParams:
    """What the user chooses; everything else is fixed by the template."""

    region: str
    bucket: str
    stack_name: str = "canestra"
    kms_key_id: str = ""  # empty: SSE-S3 bucket + a stack-owned KMS key for EMR disks
    subnet_id: str = ""
    release_label: str = "emr-7.5.0"
    master_type: str = "m5.xlarge"
    core_type: str = "m5.xlarge"
    core_count: int = 2
    idle_timeout_s: int = 3600
    raw_retention_days: int = 365
    output_retention_days: int = 180
    log_retention_days: int = 90
    train_args: tuple[str, ...] = ("--seed", "42")
    wheel_name: str = f"canestra-{__version__}-py3-none-any.whl"
    deploy_cluster: bool = True
    allow_non_eu_region: bool = False

    def validate(self) -> None:
        check_region(self.region, self.allow_non_eu_region, "S3 bucket and EMR cluster")
        if not _BUCKET_RE.match(self.bucket):
            raise InputError(
                f"bucket name {self.bucket!r} is not usable: 3-58 characters of lowercase letters, digits "
                f"and hyphens (no dots, so TLS works), starting and ending with a letter or digit"
            )
        if not _STACK_RE.match(self.stack_name):
            raise InputError(f"stack name {self.stack_name!r} must start with a letter and hold only letters, digits, '-'")
        if self.kms_key_id and not _KMS_RE.match(self.kms_key_id):
            raise InputError(f"--kms-key-id {self.kms_key_id!r} is not a KMS key id (e.g. 1234abcd-12ab-34cd-56ef-1234567890ab)")
        if self.subnet_id and not _SUBNET_RE.match(self.subnet_id):
            raise InputError(f"--subnet-id {self.subnet_id!r} is not a subnet id (subnet-0123abcd...)")
        if not re.match(r"^emr-7\.\d+\.\d+$", self.release_label):
            raise InputError(f"--release-label {self.release_label!r}: use an EMR 7.x release such as emr-7.5.0 (Spark 3.5)")
        if not 1 <= self.core_count <= 20:
            raise InputError(f"--core-count must be between 1 and 20, got {self.core_count}")
        if not 60 <= self.idle_timeout_s <= 604800:
            raise InputError(f"--idle-timeout must be between 60 s and 7 days, got {self.idle_timeout_s}")
        if any("," in a or "|" in a for a in self.train_args):
            raise InputError("--train-arg values cannot contain ',' or '|' (they travel in a CloudFormation list)")

    def cfn_parameters(self) -> dict[str, str]:
        return {
            "BucketName": self.bucket,
            "KmsKeyId": self.kms_key_id,
            "RawImageRetentionDays": str(self.raw_retention_days),
            "OutputRetentionDays": str(self.output_retention_days),
            "LogRetentionDays": str(self.log_retention_days),
            "DeployCluster": "true" if self.deploy_cluster else "false",
            "SubnetId": self.subnet_id,
            "ReleaseLabel": self.release_label,
            "MasterInstanceType": self.master_type,
            "CoreInstanceType": self.core_type,
            "CoreInstanceCount": str(self.core_count),
            "IdleTimeoutSeconds": str(self.idle_timeout_s),
            "WheelFileName": self.wheel_name,
            "TrainArgs": ",".join(self.train_args),
        }


# --------------------------------------------------------------------------- EMR steps


def step_args(command: str, cmd_args: Sequence[str], *, step_script: str, master: str = "yarn",
              python: str = VENV_PYTHON, cache_dir: str = NODE_CACHE_DIR) -> list[str]:
    """The ``command-runner.jar`` arguments of one canestra EMR step.

    The template's steps are this list with EMR's values; the local test runs it with
    a standalone master, this interpreter and a local step script.
    """
    return [
        "spark-submit", "--master", master, "--deploy-mode", "client",
        # `--conf=k=v` rather than `--conf k=v`: the same flag twice trips cfn-lint E3037.
        f"--conf=spark.pyspark.python={python}",
        f"--conf=spark.pyspark.driver.python={python}",
        f"--conf=spark.executorEnv.CANESTRA_CACHE_DIR={cache_dir}",
        step_script, command, *cmd_args,
    ]


def emr_steps(bucket: str, train_args: Sequence[str] = ()) -> dict[str, list[str]]:
    """The steps the cluster runs, by name: train on images/, then predict with that model."""
    base = f"s3://{bucket}/"
    script = base + ARTIFACTS + STEP_SCRIPT_NAME
    return {
        "canestra-train": step_args(
            "train", ["--images", base + "images/", "--out", base + "runs/train", *train_args], step_script=script),
        "canestra-predict": step_args(
            "predict", ["--model", base + "runs/train/model", "--images", base + "images/", "--out", base + "runs/predict"],
            step_script=script),
    }


# --------------------------------------------------------------------------- template


def _cfn_loader():
    try:
        import yaml
    except ImportError:
        raise EnvironmentProblem("PyYAML is not installed: pip install 'canestra[aws]'") from None

    class CfnLoader(yaml.SafeLoader):
        """YAML with CloudFormation's short-form tags (!Ref, !Sub, !GetAtt, ...)."""

    def intrinsic(loader, suffix: str, node):
        if isinstance(node, yaml.ScalarNode):
            value: Any = loader.construct_scalar(node)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        if suffix == "Ref":
            return {"Ref": value}
        if suffix == "Condition":
            return {"Condition": value}
        if suffix == "GetAtt" and isinstance(value, str):
            value = value.split(".", 1)
        return {f"Fn::{suffix}": value}

    CfnLoader.add_multi_constructor("!", intrinsic)
    return CfnLoader


def template_text(kit: Path | None = None, name: str = TEMPLATE_NAME) -> str:
    return ((kit or kit_dir()) / name).read_text()


def load_template(kit: Path | None = None, name: str = TEMPLATE_NAME) -> dict:
    loader = _cfn_loader()
    import yaml

    return yaml.load(template_text(kit, name), Loader=loader)  # noqa: S506 - a SafeLoader subclass


_NO_VALUE = object()


@dataclass
class _Context:
    params: dict[str, Any]
    pseudo: dict[str, str]
    resources: dict[str, dict]
    conditions: dict[str, bool] = field(default_factory=dict)
    mappings: dict[str, dict] = field(default_factory=dict)

    def ref(self, name: str) -> Any:
        if name == "AWS::NoValue":
            return _NO_VALUE
        if name in self.pseudo:
            return self.pseudo[name]
        if name in self.params:
            return self.params[name]
        res = self.resources.get(name)
        if res is None:
            raise KeyError(f"template refers to unknown {name!r}")
        if res["Type"] == "AWS::S3::Bucket":
            return resolve(res["Properties"]["BucketName"], self)
        if res["Type"] == "AWS::SecretsManager::Secret":  # Ref is the ARN
            part, region, account = (self.pseudo[k] for k in ("AWS::Partition", "AWS::Region", "AWS::AccountId"))
            return f"arn:{part}:secretsmanager:{region}:{account}:secret:{self.pseudo['AWS::StackName']}-{name}-AbCdEf"
        if res["Type"] == "AWS::Logs::LogGroup" and "LogGroupName" in res.get("Properties", {}):
            return resolve(res["Properties"]["LogGroupName"], self)
        return f"{self.pseudo['AWS::StackName']}-{name}"  # a stand-in physical id

    def getatt(self, name: str, attr: str) -> str:
        kind = self.resources[name]["Type"]
        part, region, account = (self.pseudo[k] for k in ("AWS::Partition", "AWS::Region", "AWS::AccountId"))
        if attr == "Arn" and kind == "AWS::S3::Bucket":
            return f"arn:{part}:s3:::{self.ref(name)}"
        if attr == "Arn" and kind == "AWS::IAM::Role":
            return f"arn:{part}:iam::{account}:role/{self.ref(name)}"
        if attr == "Arn" and kind == "AWS::KMS::Key":
            return f"arn:{part}:kms:{region}:{account}:key/00000000-0000-4000-8000-000000000000"
        return f"{self.ref(name)}.{attr}"


def _sub(value: Any, ctx: _Context) -> str:
    text, local = (value, {}) if isinstance(value, str) else (value[0], resolve(value[1], ctx))

    def one(m: re.Match) -> str:
        name = m.group(1)
        if name.startswith("!"):
            return "${" + name[1:] + "}"
        if name in local:
            return str(local[name])
        if "." in name and not name.startswith("AWS::"):
            return ctx.getatt(*name.split(".", 1))
        return str(ctx.ref(name))

    return re.sub(r"\$\{([^}]+)\}", one, text)


def resolve(node: Any, ctx: _Context) -> Any:
    """Evaluate the intrinsic functions this template uses, with stand-in physical ids."""
    if isinstance(node, list):
        return [r for r in (resolve(n, ctx) for n in node) if r is not _NO_VALUE]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        (key, val), = node.items()
        if key == "Ref":
            return ctx.ref(val)
        if key == "Fn::Sub":
            return _sub(val, ctx)
        if key == "Fn::GetAtt":
            return ctx.getatt(*(val.split(".", 1) if isinstance(val, str) else val))
        if key == "Fn::If":
            cond, yes, no = val
            return resolve(yes if ctx.conditions[cond] else no, ctx)
        if key == "Fn::Join":
            return val[0].join(str(x) for x in resolve(val[1], ctx))
        if key == "Fn::Split":
            return str(resolve(val[1], ctx)).split(val[0])
        if key == "Fn::Equals":
            a, b = resolve(val, ctx)
            return str(a) == str(b)
        if key == "Fn::Not":
            return not resolve(val[0], ctx)
        if key == "Fn::Or":
            return any(resolve(v, ctx) for v in val)
        if key == "Fn::And":
            return all(resolve(v, ctx) for v in val)
        if key == "Fn::FindInMap":
            m, top, second = resolve(val, ctx)
            return ctx.mappings[m][top][second]
        if key == "Fn::Select":
            index, items = resolve(val, ctx)
            return items[int(index)]
        if key == "Condition":
            return ctx.conditions[val]
    out = {}
    for k, v in node.items():
        r = resolve(v, ctx)
        if r is not _NO_VALUE:
            out[k] = r
    return out


def render(params: DeployParams | aws_serve.ServeParams, template: dict | None = None,
           account_id: str = "123456789012") -> dict:
    """The template with parameters filled in, conditions applied and intrinsics evaluated.

    Returns ``{"Resources": {logical id: resource}, "Outputs": {...}, "Conditions": {...}}``:
    what the plan prints, what the IAM linter reads, what the step test compares. ``params``
    is the data/EMR stack's (canestra-emr.yaml, the default) or the service's (canestra-serve.yaml).
    """
    template = template or load_template()
    values: dict[str, Any] = {}
    given = params.cfn_parameters()
    for name, spec in template["Parameters"].items():
        raw = given.get(name, spec.get("Default", ""))
        is_list = spec["Type"] == "CommaDelimitedList" or spec["Type"].startswith("List<")
        values[name] = [v.strip() for v in str(raw).split(",")] if is_list else raw
    pseudo = {"AWS::Region": params.region, "AWS::AccountId": account_id, "AWS::Partition": "aws",
              "AWS::URLSuffix": "amazonaws.com", "AWS::StackName": params.stack_name}
    ctx = _Context(values, pseudo, template["Resources"], mappings=template.get("Mappings", {}))
    for name, expr in template.get("Conditions", {}).items():
        ctx.conditions[name] = bool(resolve(expr, ctx))
    resources = {
        lid: resolve(res, ctx)
        for lid, res in template["Resources"].items()
        if "Condition" not in res or ctx.conditions[res["Condition"]]
    }
    outputs = {k: resolve(v, ctx) for k, v in template.get("Outputs", {}).items()
               if "Condition" not in v or ctx.conditions[v["Condition"]]}
    return {"Resources": resources, "Outputs": outputs, "Conditions": dict(ctx.conditions)}


def policy_documents(rendered: dict) -> dict[str, dict]:
    """Every IAM policy document in the rendered template, by ``<resource>.<policy>``."""
    docs: dict[str, dict] = {}
    for lid, res in rendered["Resources"].items():
        props = res.get("Properties", {})
        if res["Type"] == "AWS::IAM::Role":
            docs[f"{lid}.AssumeRolePolicy"] = props["AssumeRolePolicyDocument"]
            for pol in props.get("Policies", []):
                docs[f"{lid}.{pol['PolicyName']}"] = pol["PolicyDocument"]
        elif res["Type"] == "AWS::S3::BucketPolicy":
            docs[f"{lid}.PolicyDocument"] = props["PolicyDocument"]
        elif res["Type"] == "AWS::KMS::Key":
            docs[f"{lid}.KeyPolicy"] = props["KeyPolicy"]
    return docs


# --------------------------------------------------------------------------- cost


@dataclass
class CostEstimate:
    instances: int
    hours_per_instance: float
    ec2_per_hour: dict[str, float]
    emr_per_hour: dict[str, float]
    total_usd: float | None
    label: str
    prices_as_of: str
    not_included: str

    def lines(self) -> list[str]:
        out = [f"cost estimate ({self.label}):"]
        if self.total_usd is None:
            out.append("  no price in the kit's prices.json for this region/instance type: see the AWS pricing pages")
            return out
        for itype in self.ec2_per_hour:
            out.append(f"  {itype}: EC2 ${self.ec2_per_hour[itype]:.3f}/h + EMR ${self.emr_per_hour[itype]:.3f}/h")
        out.append(f"  {self.instances} instances x {self.hours_per_instance:g} h "
                   f"(job + idle timeout) = about ${self.total_usd:.2f} USD (estimate, prices as of {self.prices_as_of})")
        out.append(f"  not included: {self.not_included}")
        return out


def estimate_cost(params: DeployParams, job_hours: float, kit: Path | None = None) -> CostEstimate:
    """Instance-hours x (EC2 + EMR uplift) from the kit's ``prices.json``.

    Hours per instance = the expected job time plus the idle timeout, the most a
    cluster lingers after its last step before it terminates itself.
    """
    prices = json.loads(((kit or kit_dir()) / PRICES_NAME).read_text())
    hours = round(job_hours + params.idle_timeout_s / 3600.0, 3)
    counts = {params.master_type: 1}
    counts[params.core_type] = counts.get(params.core_type, 0) + params.core_count
    ec2_table = prices["ec2_per_hour"].get(params.region, {})
    ec2 = {t: ec2_table.get(t) for t in counts}
    emr = {t: prices["emr_uplift_per_hour"].get(t) for t in counts}
    if any(v is None for v in (*ec2.values(), *emr.values())):
        total = None
    else:
        total = round(sum(n * hours * (ec2[t] + emr[t]) for t, n in counts.items()), 2)
    return CostEstimate(instances=1 + params.core_count, hours_per_instance=hours, ec2_per_hour=ec2,
                        emr_per_hour=emr, total_usd=total, label=prices["label"],
                        prices_as_of=prices["prices_as_of"], not_included=prices["not_included"])


# --------------------------------------------------------------------------- plan


def plan_lines(params: DeployParams, rendered: dict, cost: CostEstimate) -> list[str]:
    res = rendered["Resources"]
    enc = "SSE-KMS key " + params.kms_key_id if params.kms_key_id else "SSE-S3 (AES256)"
    lines = [
        f"plan: CloudFormation stack {params.stack_name!r} in {params.region}",
        f"  bucket s3://{params.bucket} ({enc}, Block Public Access on, TLS-only + encrypted-put bucket policy,"
        f" lifecycle: images/ inbox/ {params.raw_retention_days} d, runs/ {params.output_retention_days} d)",
        f"  access logs s3://{params.bucket}-logs (expire after {params.log_retention_days} d)",
        "  resources:",
    ]
    lines += [f"    {lid}: {r['Type']}" for lid, r in res.items()]
    if params.deploy_cluster:
        lines.append(f"  EMR {params.release_label} (Spark 3.5): 1 x {params.master_type} + "
                     f"{params.core_count} x {params.core_type}, terminates after {params.idle_timeout_s} s idle")
        for name, args in emr_steps(params.bucket, params.train_args).items():
            lines.append(f"  step {name}: {' '.join(args)}")
    else:
        lines.append("  no EMR cluster (storage, roles and security configuration only)")
    lines += cost.lines()
    return [ln for ln in lines if ln]


# --------------------------------------------------------------------------- AWS calls


def aws_session(region: str, profile: str | None = None):
    """A boto3 session on the standard credential chain; refuses to go on without credentials."""
    try:
        import boto3
        import botocore.exceptions
    except ImportError:
        raise EnvironmentProblem("boto3 is not installed: pip install 'canestra[aws]'") from None
    try:
        session = boto3.Session(profile_name=profile, region_name=region)
    except botocore.exceptions.ProfileNotFound:
        raise InputError(f"AWS profile {profile!r} not found in ~/.aws/config: check --profile or AWS_PROFILE") from None
    if session.get_credentials() is None:
        raise EnvironmentProblem(
            "no AWS credentials found: run `aws configure` or `aws sso login`, set AWS_PROFILE, "
            "or run where an IAM role is attached (credentials are read, never printed)"
        )
    return session


def build_wheel(dest: Path) -> Path:
    """``pip wheel`` the checkout canestra runs from (no deps: the bootstrap installs those)."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "pyproject.toml").is_file():
        raise EnvironmentProblem("cannot find canestra's source tree to build the wheel: pass --wheel PATH")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest), str(root)],
        capture_output=True, text=True,
    )
    wheels = sorted(dest.glob("canestra-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise EnvironmentProblem(f"building the canestra wheel failed: {proc.stderr.strip()[-300:]}; pass --wheel PATH")
    return wheels[-1]


def self_signed_tls_zip(region: str) -> bytes:
    """A zip with the PEM files EMR's in-transit encryption reads (privateKey.pem,
    certificateChain.pem, trustedCertificates.pem): a self-signed certificate for the
    cluster's private DNS names. The key only ever goes to the encrypted bucket."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise EnvironmentProblem("the cryptography package is missing: pip install 'canestra[aws]', or pass --tls-certs-zip") from None
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    domain = f"*.{region}.compute.internal"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("privateKey.pem", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        zf.writestr("certificateChain.pem", pem)
        zf.writestr("trustedCertificates.pem", pem)
    return buf.getvalue()


@dataclass
class DeployResult:
    stack_name: str
    status: str
    outputs: dict[str, str]
    uploaded: list[str]
    serve: dict[str, Any] | None = None  # {"stack", "status", "outputs"} of the service stack (--serve)


@contextmanager
def aws_errors() -> Iterator[None]:
    """AWS failures as one plain line (canestra's error types, exit 2), never a boto3 traceback."""
    import botocore.exceptions

    try:
        yield
    except botocore.exceptions.NoCredentialsError:
        raise EnvironmentProblem("no AWS credentials found: run `aws configure`, set AWS_PROFILE, or attach an IAM role") from None
    except botocore.exceptions.ClientError as exc:
        err = exc.response.get("Error", {})
        raise OutputError(f"AWS refused {exc.operation_name}: {err.get('Code', '?')}: {err.get('Message', '')[:200]}") from None
    except botocore.exceptions.EndpointConnectionError as exc:
        raise OutputError(f"cannot reach AWS ({exc.kwargs.get('endpoint_url', 'endpoint')}): check the network or --endpoint-url") from None
    except botocore.exceptions.WaiterError as exc:
        raise OutputError(f"AWS did not finish in time ({exc.kwargs.get('reason') or exc}): see the CloudFormation console") from None
    except botocore.exceptions.BotoCoreError as exc:
        raise OutputError(f"AWS call failed: {exc}") from None


def describe_stack(cfn, name: str) -> dict[str, Any] | None:
    """The stack's description, or None when there is none (never created, or deleted)."""
    import botocore.exceptions

    try:
        stacks = cfn.describe_stacks(StackName=name)["Stacks"]
    except botocore.exceptions.ClientError as exc:
        if "does not exist" in str(exc):
            return None
        raise
    if not stacks or stacks[0]["StackStatus"] == "DELETE_COMPLETE":
        return None
    return stacks[0]


def _stack_status(cfn, name: str) -> str | None:
    stack = describe_stack(cfn, name)
    return stack["StackStatus"] if stack else None


def _apply_stack(cfn, stack_name: str, parameters: dict[str, str], body: str, poll_s: int) -> str:
    """Create the stack, or update it; wait; return the final status."""
    import botocore.exceptions

    cfn_params = [{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()]
    common = dict(StackName=stack_name, TemplateBody=body, Parameters=cfn_params,
                  Capabilities=["CAPABILITY_IAM"], Tags=[{"Key": "app", "Value": "canestra"}])
    waiter_cfg = {"Delay": poll_s, "MaxAttempts": max(1, 3600 // poll_s)}
    status = _stack_status(cfn, stack_name)
    try:
        if status is None:
            cfn.create_stack(OnFailure="ROLLBACK", **common)
            cfn.get_waiter("stack_create_complete").wait(StackName=stack_name, WaiterConfig=waiter_cfg)
        else:
            try:
                cfn.update_stack(**common)
            except botocore.exceptions.ClientError as exc:
                if "No updates are to be performed" not in str(exc):
                    raise
            else:
                cfn.get_waiter("stack_update_complete").wait(StackName=stack_name, WaiterConfig=waiter_cfg)
    except botocore.exceptions.WaiterError:
        raise OutputError(
            f"stack {stack_name} did not complete (status {_stack_status(cfn, stack_name)}): "
            f"see its events in the CloudFormation console"
        ) from None
    return _stack_status(cfn, stack_name) or "UNKNOWN"


def _put(s3, bucket: str, key: str, body: bytes, kms_key_id: str) -> None:
    # The bucket policy refuses uploads that do not name their encryption.
    extra = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": kms_key_id} if kms_key_id else {"ServerSideEncryption": "AES256"}
    s3.put_object(Bucket=bucket, Key=key, Body=body, **extra)


def deploy(params: DeployParams, *, session, endpoint_url: str | None = None, wheel: Path | None = None,
           tls_certs_zip: Path | None = None, echo: Callable[[str], None] = print,
           serve: aws_serve.ServeParams | None = None) -> DeployResult:
    """Create or update the stack in two passes (see the module docstring); with ``serve``, then
    the online service's stack (after checking the trained model is in the bucket)."""
    kit = kit_dir()
    body = template_text(kit)
    client = dict(endpoint_url=endpoint_url, region_name=params.region)
    cfn = session.client("cloudformation", **client)
    s3 = session.client("s3", **client)
    poll_s = 1 if endpoint_url and endpoint_url.startswith("http://") else 15
    with aws_errors():
        storage_only = dataclasses.replace(params, deploy_cluster=False)
        if _stack_status(cfn, params.stack_name) is None:
            echo(f"creating stack {params.stack_name} (storage, roles, security configuration) ...")
            status = _apply_stack(cfn, storage_only.stack_name, storage_only.cfn_parameters(), body, poll_s)
        else:
            status = _stack_status(cfn, params.stack_name) or "UNKNOWN"
        if not status.endswith("_COMPLETE") or "ROLLBACK" in status:
            raise OutputError(f"stack {params.stack_name} is in state {status}: see its events in the CloudFormation console")
        uploaded: list[str] = []
        with tempfile.TemporaryDirectory() as tmp:
            whl = wheel or build_wheel(Path(tmp))
            if not whl.is_file():
                raise InputError(f"--wheel {whl} does not exist: build it with `pip wheel --no-deps -w dist .`")
            params = dataclasses.replace(params, wheel_name=whl.name)
            certs = tls_certs_zip.read_bytes() if tls_certs_zip else self_signed_tls_zip(params.region)
            for key, data in ((ARTIFACTS + whl.name, whl.read_bytes()),
                              (ARTIFACTS + BOOTSTRAP_NAME, (kit / BOOTSTRAP_NAME).read_bytes()),
                              (ARTIFACTS + STEP_SCRIPT_NAME, (kit / STEP_SCRIPT_NAME).read_bytes()),
                              (ARTIFACTS + TLS_ZIP_NAME, certs)):
                _put(s3, params.bucket, key, data, params.kms_key_id)
                uploaded.append(f"s3://{params.bucket}/{key}")
                echo(f"uploaded s3://{params.bucket}/{key}")
        if params.deploy_cluster:
            echo(f"updating stack {params.stack_name}: EMR cluster + steps ...")
        status = _apply_stack(cfn, params.stack_name, params.cfn_parameters(), body, poll_s)
        stack = cfn.describe_stacks(StackName=params.stack_name)["Stacks"][0]
        served = None
        if serve is not None:
            serve_status, serve_outputs = aws_serve.apply(
                serve, cfn=cfn, s3=s3, sts=session.client("sts", **client),
                body=template_text(kit, aws_serve.SERVE_TEMPLATE_NAME), poll_s=poll_s, apply_stack=_apply_stack,
                echo=echo)
            served = {"stack": serve.stack_name, "status": serve_status, "outputs": serve_outputs}
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
    return DeployResult(params.stack_name, status, outputs, uploaded, served)


# --------------------------------------------------------------------------- CLI


def add_cli_arguments(p) -> None:
    """Flags of ``canestra deploy aws [status|destroy]`` (the parser itself lives in cli/commands.py)."""
    p.add_argument("action", nargs="?", choices=("status", "destroy"), metavar="ACTION",
                   help="none: plan and deploy; `status`: what the stacks, cluster, service and runs are doing; "
                        "`destroy`: delete the stacks (the data bucket stays unless --delete-data)")
    g = p.add_argument_group("where (GDPR Art. 44: EU/EEA regions)")
    g.add_argument("--region", required=True, metavar="REGION",
                   help="AWS region, EU/EEA only unless --allow-non-eu-region (e.g. eu-west-3)")
    g.add_argument("--bucket", metavar="NAME",
                   help="data bucket name to create (access logs go to <bucket>-logs); needed to deploy")
    g.add_argument("--allow-non-eu-region", action="store_true", default=None,
                   help="allow a region outside the EU/EEA (GDPR Art. 44: only with a transfer safeguard)")
    g = p.add_argument_group("what")
    g.add_argument("--dry-run", action="store_true",
                   help="print the plan and cost estimate; no AWS call, no credentials needed")
    g.add_argument("--storage-only", action="store_true", help="bucket, roles and security configuration, no EMR cluster")
    g.add_argument("--stack-name", default="canestra", metavar="NAME",
                   help="CloudFormation stack name (default canestra; the service's stack is <name>-serve)")
    g.add_argument("--kms-key-id", default="", metavar="KEY_ID", help="KMS key id for SSE-KMS (default: SSE-S3)")
    g.add_argument("--subnet-id", default="", metavar="SUBNET",
                   help="subnet for the cluster, tagged for-use-with-amazon-emr-managed-policies=true")
    g = p.add_argument_group("EMR cluster")
    g.add_argument("--release-label", default="emr-7.5.0", metavar="LABEL",
                   help="EMR 7.x release (default emr-7.5.0, Spark 3.5)")
    g.add_argument("--master-type", default="m5.xlarge", metavar="TYPE", help="primary node instance type (default m5.xlarge)")
    g.add_argument("--core-type", default="m5.xlarge", metavar="TYPE", help="core node instance type (default m5.xlarge)")
    g.add_argument("--core-count", type=int, default=2, metavar="N", help="core nodes (default 2)")
    g.add_argument("--idle-timeout", type=int, default=3600, metavar="SECONDS",
                   help="seconds idle before the cluster terminates (default 3600)")
    g.add_argument("--train-arg", action="append", default=None, metavar="ARG",
                   help="extra `canestra train` argument for the EMR step, repeatable (e.g. --train-arg=--pca-k --train-arg=128)")
    g.add_argument("--wheel", metavar="FILE", help="canestra wheel to install on the cluster (default: build one with pip wheel)")
    g.add_argument("--tls-certs-zip", metavar="FILE",
                   help="zip of privateKey.pem/certificateChain.pem[/trustedCertificates.pem] for "
                        "EMR in-transit TLS (default: a generated self-signed certificate)")
    g = p.add_argument_group("online service (--serve: canestra serve on ECS Fargate behind an HTTPS load balancer)")
    g.add_argument("--serve", action="store_true",
                   help="also create or update the service's stack <stack-name>-serve (needs a trained model in the bucket)")
    g.add_argument("--image", default="", metavar="URI",
                   help="the serve image in this account's ECR, with a tag or digest "
                        "(<account>.dkr.ecr.<region>.amazonaws.com/canestra:0.1.0)")
    g.add_argument("--certificate-arn", default="", metavar="ARN",
                   help="ACM certificate of the service's DNS name, in --region (HTTPS, TLS 1.2+)")
    g.add_argument("--vpc-id", default="", metavar="VPC", help="VPC of the subnets below")
    g.add_argument("--lb-subnets", default="", metavar="SUBNET,SUBNET",
                   help="two or more public subnets in different zones, for the load balancer")
    g.add_argument("--task-subnets", default="", metavar="SUBNET[,SUBNET]",
                   help="subnets for the tasks (default: the load balancer's); private ones need a NAT gateway")
    g.add_argument("--task-public-ip", action="store_true",
                   help="give tasks a public IPv4 address for their outbound calls (public subnets without NAT, "
                        "e.g. the default VPC); inbound still only from the load balancer")
    g.add_argument("--allowed-cidr", default="0.0.0.0/0", metavar="CIDR",
                   help="who may reach the load balancer (default 0.0.0.0/0)")
    g.add_argument("--model-prefix", default="runs/train/model/", metavar="PREFIX",
                   help="the model the service loads, in the bucket (default runs/train/model/)")
    g.add_argument("--task-cpu", type=int, default=1024, metavar="UNITS",
                   help="Fargate CPU units per task, 1024 = 1 vCPU (default 1024)")
    g.add_argument("--task-memory", type=int, default=2048, metavar="MIB", help="memory per task in MiB (default 2048)")
    g.add_argument("--min-tasks", type=int, default=2, metavar="N", help="tasks always running (default 2)")
    g.add_argument("--max-tasks", type=int, default=6, metavar="N", help="most tasks autoscaling starts (default 6)")
    g.add_argument("--cpu-target", type=int, default=60, metavar="PERCENT",
                   help="average CPU the service scales to (default 60)")
    g.add_argument("--requests-per-task", type=int, default=600, metavar="N",
                   help="requests per task per minute the service scales to (default 600)")
    g = p.add_argument_group("retention (days before objects expire)")
    g.add_argument("--raw-retention-days", type=int, default=365, metavar="DAYS", help="images/ and inbox/ (default 365)")
    g.add_argument("--output-retention-days", type=int, default=180, metavar="DAYS", help="runs/ (default 180)")
    g.add_argument("--log-retention-days", type=int, default=90, metavar="DAYS",
                   help="access, EMR and service logs (default 90)")
    g = p.add_argument_group("cost estimate")
    g.add_argument("--hours", type=float, default=1.0, metavar="HOURS",
                   help="expected job hours, for the cost estimate (default 1)")
    g.add_argument("--lcu", type=float, default=1.0, metavar="N",
                   help="average load-balancer capacity units, for the service's estimate (default 1)")
    g = p.add_argument_group("status and destroy")
    g.add_argument("--json", action="store_true", help="status: one JSON object instead of lines")
    g.add_argument("--delete-data", action="store_true",
                   help="destroy: also delete the data bucket and its log bucket, with every object (asks first)")
    g.add_argument("--yes", action="store_true",
                   help="destroy --delete-data: do not ask (for scripts); without it a terminal must type the bucket name")
    g = p.add_argument_group("AWS access")
    g.add_argument("--profile", metavar="NAME", help="AWS profile (default: the standard credential chain)")
    g.add_argument("--endpoint-url", metavar="URL", help="AWS endpoint override, e.g. a local emulator")
    g.add_argument("--allow-http-endpoint", action="store_true", default=None,
                   help="local development only: accept a plain-http --endpoint-url on 127.0.0.1")


def params_from_cli(args) -> DeployParams:
    return DeployParams(
        region=args.region, bucket=args.bucket, stack_name=args.stack_name, kms_key_id=args.kms_key_id,
        subnet_id=args.subnet_id, release_label=args.release_label, master_type=args.master_type,
        core_type=args.core_type, core_count=args.core_count, idle_timeout_s=args.idle_timeout,
        raw_retention_days=args.raw_retention_days, output_retention_days=args.output_retention_days,
        log_retention_days=args.log_retention_days,
        train_args=tuple(args.train_arg) if args.train_arg is not None else DeployParams.train_args,
        deploy_cluster=not args.storage_only, allow_non_eu_region=args.allow_non_eu_region,
    )


def _subnets(value: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in value.split(",") if s.strip())


def serve_params_from_cli(args, params: DeployParams) -> aws_serve.ServeParams:
    return aws_serve.ServeParams(
        region=params.region, bucket=params.bucket, stack_name=aws_serve.serve_stack_name(params.stack_name),
        kms_key_id=params.kms_key_id, image=args.image, certificate_arn=args.certificate_arn, vpc_id=args.vpc_id,
        lb_subnets=_subnets(args.lb_subnets), task_subnets=_subnets(args.task_subnets),
        task_public_ip=args.task_public_ip, allowed_cidr=args.allowed_cidr, model_prefix=args.model_prefix,
        task_cpu=args.task_cpu, task_memory=args.task_memory, min_tasks=args.min_tasks, max_tasks=args.max_tasks,
        cpu_target=args.cpu_target, requests_per_task=args.requests_per_task,
        log_retention_days=args.log_retention_days, allow_non_eu_region=bool(args.allow_non_eu_region),
    )


def run_cli(args) -> int:
    """``canestra deploy aws``: validate, print the plan; unless --dry-run, deploy. ``status`` and
    ``destroy`` go to :mod:`canestra.deploy.aws_ops`."""
    # The two GDPR opt-ins follow the usual precedence (flag > CANESTRA_* env > off), as for s3:// paths.
    cfg = Settings.load(allow_non_eu_region=args.allow_non_eu_region, allow_http_endpoint=args.allow_http_endpoint)
    args.allow_non_eu_region, args.allow_http_endpoint = cfg.allow_non_eu_region, cfg.allow_http_endpoint
    if args.action in ("status", "destroy"):
        from canestra.deploy import aws_ops

        return aws_ops.run_cli(args)
    if not args.bucket:
        raise InputError("canestra deploy aws needs --bucket NAME (the data bucket to create or update)")
    params = params_from_cli(args)
    params.validate()
    check_endpoint(args.endpoint_url, args.allow_http_endpoint, flag="--endpoint-url")
    for n in (args.raw_retention_days, args.output_retention_days, args.log_retention_days):
        if n < 1:
            raise InputError("retention days must be at least 1")
    if args.hours < 0:
        raise InputError(f"--hours must not be negative, got {args.hours}")
    if args.lcu < 0:
        raise InputError(f"--lcu must not be negative, got {args.lcu}")
    if params.deploy_cluster and not params.subnet_id and not args.dry_run:
        raise InputError(
            "the EMR cluster needs --subnet-id: a subnet with internet access, tagged "
            "for-use-with-amazon-emr-managed-policies=true (or pass --storage-only first)"
        )
    serve = serve_params_from_cli(args, params) if args.serve else None
    if serve is not None:
        serve.validate(complete=not args.dry_run)
    wheel = Path(args.wheel) if args.wheel else None
    certs = Path(args.tls_certs_zip) if args.tls_certs_zip else None
    for path, flag in ((wheel, "--wheel"), (certs, "--tls-certs-zip")):
        if path is not None and not path.is_file():
            raise InputError(f"{flag} {path} does not exist")
    if wheel is not None:
        params = dataclasses.replace(params, wheel_name=wheel.name)
    kit = kit_dir()
    rendered = render(params, load_template(kit))
    for line in plan_lines(params, rendered, estimate_cost(params, args.hours, kit)):
        print(line)
    if serve is not None:
        serve_rendered = render(serve, load_template(kit, aws_serve.SERVE_TEMPLATE_NAME))
        cost = aws_serve.estimate_service_cost(serve, aws_serve.load_prices(kit, PRICES_NAME), args.lcu)
        for line in aws_serve.plan_lines(serve, serve_rendered, cost):
            print(line)
    if args.dry_run:
        print("dry run: nothing created")
        return 0
    session = aws_session(params.region, args.profile)
    result = deploy(params, session=session, endpoint_url=args.endpoint_url, wheel=wheel, tls_certs_zip=certs,
                    serve=serve)
    summary: dict[str, Any] = {"stack": result.stack_name, "status": result.status, "outputs": result.outputs}
    if result.serve is not None:
        summary["serve"] = result.serve
    print(json.dumps(summary, sort_keys=True))
    return 0
