"""``canestra deploy aws --serve``: the online service's stack (``aws_kit/canestra-serve.yaml``).

A second CloudFormation stack, ``<stack>-serve``, beside the data/EMR stack: ECS Fargate tasks
running ``canestra serve`` behind an HTTPS-only Application Load Balancer. This module holds what
the user chooses (:class:`ServeParams`, checked before any AWS call), the container's command, the
monthly cost estimate from ``prices.json``, the plan's lines, and the pre-flight checks and stack
apply of a real deploy (called by :func:`canestra.deploy.aws.deploy`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from canestra.errors import InputError, OutputError
from canestra.storage.regions import check_region

SERVE_TEMPLATE_NAME = "canestra-serve.yaml"
SERVE_STACK_SUFFIX = "-serve"
CONTAINER_PORT = 8000
KEYS_FILE = "$TMPDIR/canestra-api-keys"  # /tmp (the task's ephemeral volume) or /dev/shm: the root filesystem is read-only
MODEL_MARKER = "canestra_model.json"  # canestra.model's format file: there is a trained model in the folder
HOURS_PER_MONTH = 730  # AWS's own convention for monthly estimates (8,760 h / 12)

# Fargate's CPU units and the memory (MiB) each allows (ECS task definition parameters).
FARGATE_MEMORY = {
    256: (512, 1024, 2048),
    512: tuple(range(1024, 4097, 1024)),
    1024: tuple(range(2048, 8193, 1024)),
    2048: tuple(range(4096, 16385, 1024)),
    4096: tuple(range(8192, 30721, 1024)),
}
# CloudWatch Logs accepts only these retention periods.
LOG_RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922,
                      3288, 3653)

_IMAGE_RE = re.compile(
    r"^(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com/"
    r"(?P<repo>[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*)"
    r"(?P<ref>:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|@sha256:[0-9a-f]{64})?$")
_CERT_RE = re.compile(r"^arn:aws[a-z-]*:acm:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):certificate/[0-9a-f-]{36}$")
_SUBNET_RE = re.compile(r"^subnet-[0-9a-f]{8,17}$")
_VPC_RE = re.compile(r"^vpc-[0-9a-f]{8,17}$")
_CIDR_RE = re.compile(r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})/(\d{1,2})$")
_MODEL_PREFIX_RE = re.compile(r"^runs/[A-Za-z0-9._-]+/model/$")

# What a dry run shows for the choices only a real deploy needs.
_PLACEHOLDER = {"image": "<--image>", "certificate": "<--certificate-arn>", "vpc": "<--vpc-id>"}
_PLACEHOLDER_SUBNETS = ("<--lb-subnets>",)


def serve_stack_name(stack_name: str) -> str:
    return stack_name + SERVE_STACK_SUFFIX


def workers_for(task_cpu: int) -> int:
    """uvicorn workers for a task size: one per whole vCPU (at least one), each with one ONNX Runtime thread."""
    return max(1, task_cpu // 1024)


def serve_command(bucket: str, model_prefix: str, workers: int) -> str:
    """The container's ``sh -c`` script. ECS puts the API keys (from Secrets Manager) in
    ``$CANESTRA_API_KEYS``; the script writes them to a file only the container user can read, in
    /tmp (the task's ephemeral volume) or, when the image did not declare /tmp a VOLUME (a Fargate
    bind mount is then root-owned), /dev/shm; drops the variable; and becomes ``canestra serve``
    (so SIGTERM reaches it). The model is copied from S3 to the same ``TMPDIR``. The template's
    Command is this string with the parameters filled in (a test checks they agree)."""
    return ("umask 077 && if [ -w /tmp ]; then TMPDIR=/tmp; else TMPDIR=/dev/shm; fi && export TMPDIR && "
            f"printf '%s\\n' \"$CANESTRA_API_KEYS\" > \"{KEYS_FILE}\" && unset CANESTRA_API_KEYS && "
            f"exec canestra serve --model s3://{bucket}/{model_prefix} --host 0.0.0.0 --port {CONTAINER_PORT} "
            f"--workers {workers} --worker-threads 1 --api-keys-file \"{KEYS_FILE}\" --forwarded-allow-ips '*'")


def parse_image(uri: str) -> dict[str, str]:
    """An ECR image URI's parts: account, region, repo, ref (``:tag`` or ``@sha256:…``)."""
    m = _IMAGE_RE.match(uri)
    if not m:
        raise InputError(f"--image {uri!r} is not an ECR image URI: use "
                         "<account>.dkr.ecr.<region>.amazonaws.com/<repository>:<tag> (or @sha256:<digest>)")
    if not m.group("ref"):
        raise InputError(f"--image {uri!r} names no tag or digest: add :<tag> or @sha256:<digest> "
                         "(the service never assumes :latest)")
    return m.groupdict()


@dataclass
class ServeParams:
    """What the user chooses for the service; the template fixes the rest."""

    region: str
    bucket: str
    stack_name: str = "canestra-serve"
    kms_key_id: str = ""
    image: str = ""
    certificate_arn: str = ""
    vpc_id: str = ""
    lb_subnets: tuple[str, ...] = ()
    task_subnets: tuple[str, ...] = ()  # empty: the load balancer's subnets
    task_public_ip: bool = False
    allowed_cidr: str = "0.0.0.0/0"
    model_prefix: str = "runs/train/model/"
    task_cpu: int = 1024
    task_memory: int = 2048
    min_tasks: int = 2
    max_tasks: int = 6
    cpu_target: int = 60
    requests_per_task: int = 600
    log_retention_days: int = 90
    allow_non_eu_region: bool = False

    def missing(self) -> list[str]:
        """The flags a real deploy needs that were not given (a dry run shows placeholders)."""
        needed = (("--image", self.image), ("--certificate-arn", self.certificate_arn), ("--vpc-id", self.vpc_id),
                  ("--lb-subnets", self.lb_subnets))
        return [flag for flag, value in needed if not value]

    def validate(self, *, complete: bool) -> None:
        """Check every given choice; with ``complete``, also that a real deploy has all it needs."""
        check_region(self.region, self.allow_non_eu_region, "the online service (ECS, load balancer, logs)")
        if complete and self.missing():
            raise InputError(f"--serve needs {', '.join(self.missing())} (see docs/deploy-aws.md, "
                             f"'From an empty AWS account to an HTTPS endpoint')")
        if self.image:
            image = parse_image(self.image)
            if image["region"] != self.region:
                raise InputError(f"--image is in {image['region']}, the service in {self.region}: push the image "
                                 f"to an ECR repository in {self.region} (the tasks pull from their own region)")
        if self.certificate_arn:
            cert = _CERT_RE.match(self.certificate_arn)
            if not cert:
                raise InputError(f"--certificate-arn {self.certificate_arn!r} is not an ACM certificate ARN "
                                 "(arn:aws:acm:<region>:<account>:certificate/<id>)")
            if cert.group("region") != self.region:
                raise InputError(f"--certificate-arn is in {cert.group('region')}: a load balancer uses an ACM "
                                 f"certificate of its own region; request one in {self.region}")
        if self.vpc_id and not _VPC_RE.match(self.vpc_id):
            raise InputError(f"--vpc-id {self.vpc_id!r} is not a VPC id (vpc-0123abcd...)")
        for flag, subnets in (("--lb-subnets", self.lb_subnets), ("--task-subnets", self.task_subnets)):
            bad = [s for s in subnets if not _SUBNET_RE.match(s)]
            if bad:
                raise InputError(f"{flag}: {', '.join(bad)} is not a subnet id (subnet-0123abcd...)")
            if len(set(subnets)) != len(subnets):
                raise InputError(f"{flag} names a subnet twice")
        if self.lb_subnets and len(self.lb_subnets) < 2:
            raise InputError("--lb-subnets needs two or more subnets in different availability zones "
                             "(an Application Load Balancer spans at least two)")
        m = _CIDR_RE.match(self.allowed_cidr)
        if not m or any(int(x) > 255 for x in m.groups()[:4]) or int(m.group(5)) > 32:
            raise InputError(f"--allowed-cidr {self.allowed_cidr!r} is not an IPv4 network such as 0.0.0.0/0 or 203.0.113.0/24")
        if not _MODEL_PREFIX_RE.match(self.model_prefix):
            raise InputError(f"--model-prefix {self.model_prefix!r}: the service reads only runs/<run>/model/ "
                             "(e.g. runs/train/model/, what the EMR train step writes)")
        if self.task_cpu not in FARGATE_MEMORY:
            raise InputError(f"--task-cpu {self.task_cpu}: Fargate takes {', '.join(map(str, FARGATE_MEMORY))} "
                             "CPU units (1024 = 1 vCPU)")
        if self.task_memory not in FARGATE_MEMORY[self.task_cpu]:
            allowed = FARGATE_MEMORY[self.task_cpu]
            raise InputError(f"--task-memory {self.task_memory} MiB does not go with --task-cpu {self.task_cpu}: "
                             f"Fargate allows {allowed[0]}-{allowed[-1]} MiB" +
                             (" in 1024 MiB steps" if len(allowed) > 3 else f" ({', '.join(map(str, allowed))})"))
        if not 1 <= self.min_tasks <= self.max_tasks <= 50:
            raise InputError(f"--min-tasks {self.min_tasks} / --max-tasks {self.max_tasks}: need 1 <= min <= max <= 50")
        if not 10 <= self.cpu_target <= 90:
            raise InputError(f"--cpu-target must be a percentage between 10 and 90, got {self.cpu_target}")
        if self.requests_per_task < 1:
            raise InputError(f"--requests-per-task must be at least 1 (requests per task per minute), got {self.requests_per_task}")
        if self.log_retention_days < 1:
            raise InputError("retention days must be at least 1")

    @property
    def cloudwatch_retention_days(self) -> int:
        """--log-retention-days rounded down to a period CloudWatch Logs accepts (never kept longer than asked)."""
        return max(d for d in LOG_RETENTION_DAYS if d <= self.log_retention_days)

    def cfn_parameters(self) -> dict[str, str]:
        if self.image:
            image = parse_image(self.image)
            repo, ref = image["repo"], image["ref"]
        else:
            repo, ref = _PLACEHOLDER["image"], ""
        lb_subnets = self.lb_subnets or _PLACEHOLDER_SUBNETS
        return {
            "BucketName": self.bucket,
            "KmsKeyId": self.kms_key_id,
            "ModelPrefix": self.model_prefix,
            "ImageRepository": repo,
            "ImageReference": ref,
            "VpcId": self.vpc_id or _PLACEHOLDER["vpc"],
            "LoadBalancerSubnetIds": ",".join(lb_subnets),
            "TaskSubnetIds": ",".join(self.task_subnets or lb_subnets),
            "TaskPublicIp": "ENABLED" if self.task_public_ip else "DISABLED",
            "AllowedCidr": self.allowed_cidr,
            "CertificateArn": self.certificate_arn or _PLACEHOLDER["certificate"],
            "TaskCpu": str(self.task_cpu),
            "TaskMemory": str(self.task_memory),
            "Workers": str(workers_for(self.task_cpu)),
            "MinTasks": str(self.min_tasks),
            "MaxTasks": str(self.max_tasks),
            "CpuTargetPercent": str(self.cpu_target),
            "RequestsPerTaskPerMinute": str(self.requests_per_task),
            "LogRetentionDays": str(self.cloudwatch_retention_days),
        }


# --------------------------------------------------------------------------- cost


@dataclass
class ServiceCost:
    """Monthly estimate of the service at its minimum size (and at --max-tasks)."""

    tasks: int
    max_tasks: int
    vcpu: float
    memory_gb: float
    lcu: float
    public_ips: int
    fargate_vcpu_hour: float | None
    fargate_gb_hour: float | None
    alb_hour: float | None
    alb_lcu_hour: float | None
    ipv4_hour: float
    secret_month: float
    parts: dict[str, float] = field(default_factory=dict)
    total_usd: float | None = None
    at_max_usd: float | None = None
    label: str = ""
    prices_as_of: str = ""
    not_included: str = ""

    def lines(self) -> list[str]:
        out = [f"service cost estimate, per month of {HOURS_PER_MONTH} h ({self.label}):"]
        if self.total_usd is None:
            out.append("  no Fargate or load-balancer price in the kit's prices.json for this region: "
                       "see the AWS pricing pages")
            return out
        assert self.fargate_vcpu_hour is not None and self.fargate_gb_hour is not None
        assert self.alb_hour is not None and self.alb_lcu_hour is not None
        p = self.parts
        out += [
            f"  Fargate: {self.tasks} tasks x ({self.vcpu:g} vCPU x ${self.fargate_vcpu_hour:.5f} + "
            f"{self.memory_gb:g} GB x ${self.fargate_gb_hour:.6f}) per hour = ${p['fargate']:.2f}",
            f"  load balancer: ${self.alb_hour:.5f}/h + {self.lcu:g} LCU x ${self.alb_lcu_hour:.4f}/h = ${p['alb']:.2f}",
            f"  public IPv4: {self.public_ips} addresses x ${self.ipv4_hour:.3f}/h = ${p['ipv4']:.2f}",
            f"  Secrets Manager: 1 secret = ${p['secret']:.2f}",
            f"  total about ${self.total_usd:.2f} USD/month at {self.tasks} tasks, up to ${self.at_max_usd:.2f} "
            f"at {self.max_tasks} (estimate, prices as of {self.prices_as_of})",
            f"  not included: {self.not_included}",
        ]
        return out


def estimate_service_cost(params: ServeParams, prices: dict[str, Any], lcu: float = 1.0) -> ServiceCost:
    """Fargate vCPU/GB-hours + ALB hours and LCU-hours + public IPv4 + the secret, from ``prices.json``'s
    ``serve`` section, for a month of the minimum task count (the most autoscaling starts, beside it)."""
    table = prices["serve"]
    fargate = table["fargate_linux_x86_per_hour"].get(params.region, {})
    alb = table["alb_per_hour"].get(params.region, {})
    vcpu, gb = params.task_cpu / 1024, params.task_memory / 1024
    # One address per load-balancer subnet (zone) at least; one per task with --task-public-ip.
    lb_ips = max(2, len(params.lb_subnets))
    ips = lb_ips + (params.min_tasks if params.task_public_ip else 0)
    cost = ServiceCost(
        tasks=params.min_tasks, max_tasks=params.max_tasks, vcpu=vcpu, memory_gb=gb, lcu=lcu, public_ips=ips,
        fargate_vcpu_hour=fargate.get("vcpu"), fargate_gb_hour=fargate.get("gb"), alb_hour=alb.get("hour"),
        alb_lcu_hour=alb.get("lcu"), ipv4_hour=table["public_ipv4_per_hour"],
        secret_month=table["secrets_manager_per_secret_month"], label=table["label"],
        prices_as_of=table["prices_as_of"], not_included=table["not_included"])
    if None in (cost.fargate_vcpu_hour, cost.fargate_gb_hour, cost.alb_hour, cost.alb_lcu_hour):
        return cost
    assert cost.fargate_vcpu_hour is not None and cost.fargate_gb_hour is not None
    assert cost.alb_hour is not None and cost.alb_lcu_hour is not None
    per_task = (vcpu * cost.fargate_vcpu_hour + gb * cost.fargate_gb_hour) * HOURS_PER_MONTH

    def month(tasks: int) -> dict[str, float]:
        task_ips = tasks if params.task_public_ip else 0
        return {
            "fargate": tasks * per_task,
            "alb": (cost.alb_hour + lcu * cost.alb_lcu_hour) * HOURS_PER_MONTH,  # type: ignore[operator]
            "ipv4": (lb_ips + task_ips) * cost.ipv4_hour * HOURS_PER_MONTH,
            "secret": cost.secret_month,
        }

    cost.parts = {k: round(v, 2) for k, v in month(params.min_tasks).items()}
    cost.total_usd = round(sum(month(params.min_tasks).values()), 2)
    cost.at_max_usd = round(sum(month(params.max_tasks).values()), 2)
    return cost


def load_prices(kit: Path, name: str) -> dict[str, Any]:
    return json.loads((kit / name).read_text())


# --------------------------------------------------------------------------- plan


def plan_lines(params: ServeParams, rendered: dict, cost: ServiceCost) -> list[str]:
    res = rendered["Resources"]
    c = params.cfn_parameters()
    lines = [
        f"plan: CloudFormation stack {params.stack_name!r} in {params.region} (the online service)",
        f"  image {params.image or _PLACEHOLDER['image']}, model s3://{params.bucket}/{params.model_prefix}",
        f"  ECS Fargate: {params.min_tasks}-{params.max_tasks} tasks x {params.task_cpu / 1024:g} vCPU / "
        f"{params.task_memory} MiB, {c['Workers']} worker(s) each; scale on CPU {params.cpu_target}% and "
        f"{params.requests_per_task} requests per task per minute",
        f"  load balancer: HTTPS :443 only (TLS 1.2+, certificate {params.certificate_arn or _PLACEHOLDER['certificate']}),"
        f" :80 redirects; open to {params.allowed_cidr}; health check /readyz",
        "  API keys: a generated secret in Secrets Manager, handed to the container by ECS (never a parameter,"
        " an output or a log line)",
        f"  task role: read s3://{params.bucket}/runs/*/model/ only; logs kept {params.cloudwatch_retention_days} d",
        "  resources:",
    ]
    lines += [f"    {lid}: {r['Type']}" for lid, r in res.items()]
    missing = params.missing()
    if missing:
        lines.append(f"  (a real deploy also needs {', '.join(missing)})")
    return lines + cost.lines()


# --------------------------------------------------------------------------- deploy


def preflight(params: ServeParams, *, s3, sts) -> None:
    """Before the service stack: the image and certificate belong to this account, and the model exists
    (a service without one would never pass /readyz, and the stack would wait for it)."""
    import botocore.exceptions

    account = sts.get_caller_identity()["Account"]
    image = parse_image(params.image)
    if image["account"] != account:
        raise InputError(f"--image is in account {image['account']}, the stack in {account}: push the image to "
                         "this account's ECR (the task's pull permission covers this account's repository only)")
    cert = _CERT_RE.match(params.certificate_arn)
    if cert and cert.group("account") != account:
        raise InputError(f"--certificate-arn belongs to account {cert.group('account')}, not {account}")
    key = params.model_prefix + MODEL_MARKER
    try:
        s3.head_object(Bucket=params.bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
            raise
        raise OutputError(f"no trained model at s3://{params.bucket}/{params.model_prefix} (no {MODEL_MARKER}): "
                          "run the EMR train step first, or pass --model-prefix runs/<run>/model/") from None


def apply(params: ServeParams, *, cfn, s3, sts, body: str, poll_s: int,
          apply_stack: Callable[..., str], echo: Callable[[str], None]) -> tuple[str, dict[str, str]]:
    """Create or update the service stack; returns its final status and outputs."""
    preflight(params, s3=s3, sts=sts)
    echo(f"creating or updating stack {params.stack_name} (ECS service, load balancer, API-key secret) ...")
    status = apply_stack(cfn, params.stack_name, params.cfn_parameters(), body, poll_s)
    stack = cfn.describe_stacks(StackName=params.stack_name)["Stacks"][0]
    return status, {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
