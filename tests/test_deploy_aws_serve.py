"""`canestra deploy aws --serve` (the online service's stack, canestra-serve.yaml), `canestra deploy aws status`
and `canestra deploy aws destroy`.

The plan prints the service's monthly cost from prices.json; the rendered template is HTTPS-only
(TLS 1.2+, port 80 redirects), keeps the API keys in Secrets Manager (never a parameter, output or
environment value), lets the task read only runs/*/model/, scales on CPU and requests per task,
checks /readyz and keeps logs for a set time. Against a moto server on 127.0.0.1 (fake keys, nothing
reaches AWS): the service stack is created once a trained model is in the bucket, status reports the
stacks, the ECS service and the runs, destroy keeps the data bucket unless --delete-data, which asks
for the bucket's name at a terminal first (--yes for scripts). moto's CloudFormation skips
AWS::SecretsManager::Secret, AWS::ApplicationAutoScaling::* and AWS::S3::BucketPolicy and records no
ECS service network or load-balancer settings: those are checked on the rendered template.
The linters (cfn-lint, checkov, parliament) run on both templates in tests/test_deploy_aws.py.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from test_deploy_aws import FAKE_KEY_ID, FAKE_SECRET, KIT, _policy, moto_endpoint  # noqa: F401 (a fixture)

from canestra.cli import main
from canestra.deploy import aws as deploy_aws
from canestra.deploy import aws_ops, aws_serve
from canestra.errors import InputError
from canestra.storage.regions import EU_EEA_REGIONS

REGION = "eu-west-3"
BUCKET = "canestra-moto-bucket"
KMS_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"
IMAGE = f"123456789012.dkr.ecr.{REGION}.amazonaws.com/canestra:0.1.0"
CERT = f"arn:aws:acm:{REGION}:123456789012:certificate/12345678-1234-1234-1234-123456789012"
PRICES = json.loads((KIT / "prices.json").read_text())


def _serve(**kw) -> aws_serve.ServeParams:
    base = dict(region=REGION, bucket="canestra-demo-bucket", image=IMAGE, certificate_arn=CERT, vpc_id="vpc-0123abcd",
                lb_subnets=("subnet-0123abcd", "subnet-4567cdef"))
    return aws_serve.ServeParams(**{**base, **kw})


def _render(params: aws_serve.ServeParams) -> dict:
    return deploy_aws.render(params, deploy_aws.load_template(KIT, aws_serve.SERVE_TEMPLATE_NAME))


def _statements(doc: dict) -> list[dict]:
    return doc["Statement"] if isinstance(doc["Statement"], list) else [doc["Statement"]]


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


# --------------------------------------------------------------------------- plan and estimate


def test_serve_dry_run_prints_the_monthly_service_estimate(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", HOME=str(tmp_path))
    region = "eu-west-1"
    proc = subprocess.run(
        [sys.executable, "-m", "canestra.cli", "deploy", "aws", "--region", region, "--bucket", "canestra-demo-bucket",
         "--dry-run", "--storage-only", "--serve", "--task-cpu", "2048", "--task-memory", "4096", "--min-tasks", "3",
         "--max-tasks", "5", "--lcu", "2", "--task-public-ip"],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for rtype in ("AWS::ECS::Service", "AWS::ElasticLoadBalancingV2::LoadBalancer", "AWS::SecretsManager::Secret",
                  "AWS::ApplicationAutoScaling::ScalingPolicy", "AWS::Logs::LogGroup"):
        assert rtype in out
    assert "plan: CloudFormation stack 'canestra-serve' in eu-west-1" in out
    assert "a real deploy also needs --image, --certificate-arn, --vpc-id, --lb-subnets" in out
    serve = PRICES["serve"]
    fargate = serve["fargate_linux_x86_per_hour"][region]
    alb = serve["alb_per_hour"][region]

    def month(tasks: int) -> float:
        return (tasks * (2 * fargate["vcpu"] + 4 * fargate["gb"]) * 730 + (alb["hour"] + 2 * alb["lcu"]) * 730
                + (2 + tasks) * serve["public_ipv4_per_hour"] * 730 + serve["secrets_manager_per_secret_month"])

    assert (f"total about ${month(3):.2f} USD/month at 3 tasks, up to ${month(5):.2f} at 5 "
            f"(estimate, prices as of {serve['prices_as_of']})") in out
    assert "5 addresses" in out  # two for the load balancer, one per task with --task-public-ip
    assert "ESTIMATE ONLY" in out and "not included:" in out and "dry run: nothing created" in out


def test_default_service_estimate_in_each_region_of_the_price_table():
    serve = PRICES["serve"]
    assert set(serve["fargate_linux_x86_per_hour"]) == set(serve["alb_per_hour"])
    assert set(serve["fargate_linux_x86_per_hour"]) <= set(EU_EEA_REGIONS)
    for region in serve["fargate_linux_x86_per_hour"]:
        cost = aws_serve.estimate_service_cost(aws_serve.ServeParams(region=region, bucket="b-b-b"), PRICES)
        # 2 x (1 vCPU, 2 GB) all month + a load balancer: tens of dollars, not cents nor thousands
        assert cost.total_usd is not None and 80 < cost.total_usd < 200, (region, cost.total_usd)
        assert cost.at_max_usd is not None and cost.at_max_usd > cost.total_usd
        assert sum(cost.parts.values()) == pytest.approx(cost.total_usd, abs=0.02)
    unpriced = [r for r in EU_EEA_REGIONS if r not in serve["fargate_linux_x86_per_hour"]]
    for region in unpriced:  # said so, not guessed
        cost = aws_serve.estimate_service_cost(aws_serve.ServeParams(region=region, bucket="b-b-b"), PRICES)
        assert cost.total_usd is None and "no Fargate or load-balancer price" in "\n".join(cost.lines())
    assert serve["prices_as_of"] and serve["sources"] and serve["checked"]


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("argv, needle", [
    (["--image", "canestra:0.1.0"], "not an ECR image URI"),
    (["--image", IMAGE.rsplit(":", 1)[0]], "no tag or digest"),
    (["--image", IMAGE.replace(REGION, "eu-west-1")], f"ECR repository in {REGION}"),
    (["--certificate-arn", CERT.replace(REGION, "us-east-1")], "certificate of its own region"),
    (["--certificate-arn", "arn:aws:iam::123456789012:server-certificate/x"], "not an ACM certificate"),
    (["--vpc-id", "vpc_1"], "not a VPC id"),
    (["--lb-subnets", "subnet-0123abcd"], "two or more"),
    (["--lb-subnets", "subnet-0123abcd,subnet-0123abcd"], "names a subnet twice"),
    (["--task-cpu", "3000"], "Fargate takes"),
    (["--task-cpu", "1024", "--task-memory", "1024"], "does not go with --task-cpu 1024"),
    (["--min-tasks", "4", "--max-tasks", "2"], "min <= max"),
    (["--model-prefix", "images/"], "runs/<run>/model/"),
    (["--allowed-cidr", "10.0.0.0/33"], "not an IPv4 network"),
    (["--cpu-target", "95"], "between 10 and 90"),
])
def test_serve_rejects_bad_options_with_one_plain_line(capsys, argv, needle):
    rc = main(["deploy", "aws", "--region", REGION, "--bucket", "canestra-demo-bucket", "--dry-run", "--serve", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err, err
    assert err.startswith("canestra: error:") and len(err.strip().splitlines()) == 1


def test_a_real_serve_deploy_names_what_it_still_needs(capsys):
    rc = main(["deploy", "aws", "--region", REGION, "--bucket", "canestra-demo-bucket", "--storage-only", "--serve",
               "--image", IMAGE])
    err = capsys.readouterr().err
    assert rc == 2 and "--serve needs --certificate-arn, --vpc-id, --lb-subnets" in err


def test_deploy_without_a_bucket_says_so(capsys):
    assert main(["deploy", "aws", "--region", REGION, "--dry-run"]) == 2
    assert "needs --bucket" in capsys.readouterr().err


def test_the_service_stays_in_the_eu_unless_allowed(capsys):
    base = ["deploy", "aws", "--region", "us-east-1", "--bucket", "canestra-demo-bucket", "--dry-run", "--serve"]
    assert main(base) == 2 and "--allow-non-eu-region" in capsys.readouterr().err
    assert main([*base, "--allow-non-eu-region"]) == 0
    out = capsys.readouterr().out
    assert "plan: CloudFormation stack 'canestra-serve' in us-east-1" in out
    assert "no Fargate or load-balancer price" in out  # the price table is EU-only


def test_log_retention_rounds_down_to_a_cloudwatch_period():
    for asked, kept in ((1, 1), (90, 90), (100, 90), (365, 365), (366, 365), (5000, 3653)):
        assert _serve(log_retention_days=asked).cloudwatch_retention_days == kept


# --------------------------------------------------------------------------- template


@pytest.mark.parametrize("kms", ["", KMS_ID], ids=["sse-s3", "sse-kms"])
def test_serve_template_is_https_only_with_keys_in_secrets_manager_and_least_privilege(kms):
    params = _serve(kms_key_id=kms)
    rendered = _render(params)
    res = rendered["Resources"]
    by_type: dict[str, list[str]] = {}
    for lid, r in res.items():
        by_type.setdefault(r["Type"], []).append(lid)

    # HTTPS only: a TLS 1.2+ listener with the ACM certificate; port 80 only redirects (301) to it.
    listeners = {res[lid]["Properties"]["Port"]: res[lid]["Properties"] for lid in by_type["AWS::ElasticLoadBalancingV2::Listener"]}
    assert set(listeners) == {443, 80}
    https = listeners[443]
    assert https["Protocol"] == "HTTPS" and https["SslPolicy"] == "ELBSecurityPolicy-TLS13-1-2-2021-06"
    assert https["Certificates"] == [{"CertificateArn": CERT}]
    assert [a["Type"] for a in https["DefaultActions"]] == ["forward"]
    redirect = listeners[80]["DefaultActions"]
    assert [a["Type"] for a in redirect] == ["redirect"]
    assert redirect[0]["RedirectConfig"]["Protocol"] == "HTTPS" and redirect[0]["RedirectConfig"]["StatusCode"] == "HTTP_301"
    lb = res["LoadBalancer"]["Properties"]
    attrs = {a["Key"]: a["Value"] for a in lb["LoadBalancerAttributes"]}
    assert lb["Scheme"] == "internet-facing" and lb["Subnets"] == list(params.lb_subnets)
    assert attrs["routing.http.drop_invalid_header_fields.enabled"] == "true"
    assert attrs["deletion_protection.enabled"] == "true"  # destroy turns it off first
    assert attrs["access_logs.s3.enabled"] == "true" and attrs["access_logs.s3.bucket"] == "canestra-demo-bucket-logs"
    tg = res["TargetGroup"]["Properties"]
    assert tg["HealthCheckPath"] == "/readyz" and tg["Matcher"] == {"HttpCode": "200"} and tg["TargetType"] == "ip"

    # Security groups: clients reach only the load balancer (443, 80); the tasks only from it.
    lb_sg = res["LoadBalancerSecurityGroup"]["Properties"]
    assert sorted(r["FromPort"] for r in lb_sg["SecurityGroupIngress"]) == [80, 443]
    assert lb_sg["SecurityGroupEgress"] == [{"Description": "to the canestra tasks only", "IpProtocol": "tcp",
                                             "FromPort": 8000, "ToPort": 8000,
                                             "DestinationSecurityGroupId": "canestra-serve-TaskSecurityGroup"}]
    assert "SecurityGroupIngress" not in res["TaskSecurityGroup"]["Properties"]
    ingress = res["TaskIngressFromLoadBalancer"]["Properties"]
    assert ingress["SourceSecurityGroupId"] == "canestra-serve-LoadBalancerSecurityGroup" and ingress["FromPort"] == 8000
    assert [r["FromPort"] for r in res["TaskSecurityGroup"]["Properties"]["SecurityGroupEgress"]] == [443]

    # API keys: generated by Secrets Manager, handed to the container by ECS; never a parameter,
    # an output or an environment value.
    secret = res["ApiKeysSecret"]["Properties"]
    assert "SecretString" not in secret and secret["GenerateSecretString"]["PasswordLength"] >= 32
    assert ("KmsKeyId" in secret) == bool(kms)
    secret_arn = rendered["Outputs"]["ApiKeysSecretArn"]["Value"]  # the ARN only: the output names where the keys are
    assert secret_arn.startswith(f"arn:aws:secretsmanager:{REGION}:123456789012:secret:")
    template = deploy_aws.load_template(KIT, aws_serve.SERVE_TEMPLATE_NAME)
    sensitive = ("key", "secret", "password", "token", "credential")
    assert [p for p in template["Parameters"] if any(w in p.lower() for w in sensitive)] == ["KmsKeyId"]
    assert set(params.cfn_parameters()) == set(template["Parameters"])
    container = res["TaskDefinition"]["Properties"]["ContainerDefinitions"][0]
    assert container["Secrets"] == [{"Name": "CANESTRA_API_KEYS", "ValueFrom": secret_arn}]
    assert not any(w in str(container.get("Environment", [])).lower() for w in ("key", "secret"))
    assert container["ReadonlyRootFilesystem"] is True and container["Essential"] is True
    assert container["EntryPoint"] == ["/bin/sh", "-c"]
    assert container["Command"] == [aws_serve.serve_command("canestra-demo-bucket", "runs/train/model/", 1)]
    assert container["LogConfiguration"]["Options"]["awslogs-group"] == "/canestra/canestra-serve"
    assert res["LogGroup"]["Properties"]["RetentionInDays"] == "90"

    # Execution role: pull the one repository, write the one log group, read the one secret.
    start = res["ExecutionRole"]["Properties"]["Policies"][0]["PolicyDocument"]
    for st in _statements(start):
        if _as_list(st["Resource"]) == ["*"]:
            assert st["Action"] == "ecr:GetAuthorizationToken"  # takes no resource (parliament suppression)
    by_sid = {st["Sid"]: st for st in _statements(start)}
    assert by_sid["PullTheOneRepository"]["Resource"] == f"arn:aws:ecr:{REGION}:123456789012:repository/canestra"
    assert by_sid["ReadApiKeys"] == {"Sid": "ReadApiKeys", "Effect": "Allow", "Action": "secretsmanager:GetSecretValue",
                                     "Resource": secret_arn}
    assert ("DecryptApiKeys" in by_sid) == bool(kms)

    # Task role: read runs/*/model/ of the data bucket and nothing else (plus the bucket's region, and
    # the bucket's key through S3 when it is a customer key).
    read = res["TaskRole"]["Properties"]["Policies"][0]["PolicyDocument"]
    actions = sorted(a for st in _statements(read) for a in _as_list(st["Action"]))
    assert actions == sorted(["s3:ListBucket", "s3:GetBucketLocation", "s3:GetObject", *(["kms:Decrypt"] if kms else [])])
    for st in _statements(read):
        assert st["Effect"] == "Allow" and "*" not in _as_list(st["Resource"])
        if st["Action"] == "s3:GetObject":
            assert st["Resource"] == "arn:aws:s3:::canestra-demo-bucket/runs/*/model/*"
        if st["Action"] == "s3:ListBucket":
            assert st["Condition"] == {"StringLike": {"s3:prefix": ["runs/*/model", "runs/*/model/*"]}}
        if st["Action"] == "kms:Decrypt":
            assert st["Resource"].endswith(f":key/{KMS_ID}")
            assert st["Condition"]["StringEquals"]["kms:ViaService"] == f"s3.{REGION}.amazonaws.com"

    # Service: Fargate, no public IP unless asked, rolls back a deployment that never gets healthy.
    svc = res["Service"]["Properties"]
    assert svc["LaunchType"] == "FARGATE" and svc["DesiredCount"] == "2"
    assert svc["NetworkConfiguration"]["AwsvpcConfiguration"]["AssignPublicIp"] == "DISABLED"
    assert svc["DeploymentConfiguration"]["DeploymentCircuitBreaker"] == {"Enable": True, "Rollback": True}
    assert svc["LoadBalancers"][0]["ContainerPort"] == 8000

    # Autoscaling between --min-tasks and --max-tasks on CPU and on requests per task.
    target = res["ScalableTarget"]["Properties"]
    assert (target["MinCapacity"], target["MaxCapacity"]) == ("2", "6")
    metrics = {res[lid]["Properties"]["TargetTrackingScalingPolicyConfiguration"]["PredefinedMetricSpecification"]
               ["PredefinedMetricType"]: res[lid]["Properties"]["TargetTrackingScalingPolicyConfiguration"]
               for lid in by_type["AWS::ApplicationAutoScaling::ScalingPolicy"]}
    assert set(metrics) == {"ECSServiceAverageCPUUtilization", "ALBRequestCountPerTarget"}
    assert metrics["ECSServiceAverageCPUUtilization"]["TargetValue"] == "60"
    assert metrics["ALBRequestCountPerTarget"]["TargetValue"] == "600"
    assert "ResourceLabel" in metrics["ALBRequestCountPerTarget"]["PredefinedMetricSpecification"]


def test_task_size_sets_workers_and_public_ip():
    for cpu, memory, workers in ((256, 512, 1), (1024, 2048, 1), (2048, 4096, 2), (4096, 8192, 4)):
        container = _render(_serve(task_cpu=cpu, task_memory=memory))["Resources"]["TaskDefinition"]["Properties"]
        assert container["Cpu"] == str(cpu) and container["Memory"] == str(memory)
        assert f"--workers {workers} --worker-threads 1" in container["ContainerDefinitions"][0]["Command"][0]
    svc = _render(_serve(task_public_ip=True, task_subnets=("subnet-89abcdef",)))["Resources"]["Service"]["Properties"]
    assert svc["NetworkConfiguration"]["AwsvpcConfiguration"] == {
        "AssignPublicIp": "ENABLED", "SecurityGroups": ["canestra-serve-TaskSecurityGroup"], "Subnets": ["subnet-89abcdef"]}


def test_container_command_hides_the_keys_in_a_private_file(tmp_path):
    """The container's script, run with /bin/sh and a stand-in `canestra`: the keys from the secret land in a
    0600 file, one per line; the variable is gone from what `canestra serve` sees."""
    fake = tmp_path / "bin" / "canestra"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nfor a in "$@"; do [ "$prev" = --api-keys-file ] && f="$a"; prev="$a"; done\n'
                    'echo "args=$*"; echo "file=$f"; stat -c "mode=%a" "$f"; cat "$f"; env | grep -c CANESTRA_API_KEYS\n')
    fake.chmod(0o755)
    keys = "key-one-0123456789abcdef\nkey-two-0123456789abcdef"
    script = aws_serve.serve_command("canestra-demo-bucket", "runs/train/model/", 2).replace(
        "if [ -w /tmp ]", f"if [ -w {tmp_path} ]").replace("TMPDIR=/tmp;", f"TMPDIR={tmp_path};")
    proc = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{fake.parent}:/usr/bin:/bin", "CANESTRA_API_KEYS": keys})
    assert proc.returncode == 1, proc.stderr  # grep -c finds 0 lines: the variable is not passed on
    lines = proc.stdout.splitlines()
    assert lines[0] == ("args=serve --model s3://canestra-demo-bucket/runs/train/model/ --host 0.0.0.0 --port 8000 "
                        f"--workers 2 --worker-threads 1 --api-keys-file {tmp_path}/canestra-api-keys "
                        "--forwarded-allow-ips *")
    assert lines[2] == "mode=600" and lines[3:5] == keys.splitlines() and lines[5] == "0"


@pytest.mark.parametrize("region", sorted(EU_EEA_REGIONS) + ["eu-west-2", "eu-central-2", "us-east-1"])
def test_log_bucket_admits_the_load_balancer_logs_where_the_service_writes_them(region):
    main_params = deploy_aws.DeployParams(region=region, bucket="canestra-demo-bucket", allow_non_eu_region=True)
    policy = deploy_aws.render(main_params)["Resources"]["LogBucketPolicy"]["Properties"]["PolicyDocument"]
    delivery = [st for st in policy["Statement"] if st.get("Sid") == "LoadBalancerAccessLogDelivery"]
    serve = _render(_serve(region=region, image="", certificate_arn="", allow_non_eu_region=True))
    attrs = {a["Key"]: a["Value"] for a in serve["Resources"]["LoadBalancer"]["Properties"]["LoadBalancerAttributes"]}
    # The service logs to the log bucket exactly where the bucket's policy lets the load balancer write.
    assert (attrs["access_logs.s3.enabled"] == "true") == bool(delivery)
    if region == "us-east-1":
        assert not delivery
        return
    st, = delivery
    assert st["Action"] == "s3:PutObject"
    assert st["Resource"] == "arn:aws:s3:::canestra-demo-bucket-logs/alb/AWSLogs/123456789012/*"
    principal = st["Principal"]
    if region in ("eu-south-2", "eu-central-2"):  # regions newer than August 2022: the service principal
        assert principal == {"Service": "logdelivery.elasticloadbalancing.amazonaws.com"}
    else:
        assert principal["AWS"].startswith("arn:aws:iam::") and principal["AWS"].endswith(":root")


# --------------------------------------------------------------------------- moto server


@pytest.fixture
def moto_fresh(moto_endpoint):  # noqa: F811 (the fixture imported above)
    """The moto server with empty backends before and after (they are process-wide, so state outlives a server)."""
    import urllib.request

    def reset() -> None:
        urllib.request.urlopen(urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST"), timeout=30).close()

    reset()
    yield moto_endpoint
    reset()


def _env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=FAKE_KEY_ID, AWS_SECRET_ACCESS_KEY=FAKE_SECRET, HOME=str(home),
               AWS_CONFIG_FILE=str(home / "none"), AWS_SHARED_CREDENTIALS_FILE=str(home / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    return env


def _client(service: str, endpoint: str):
    import boto3

    return boto3.client(service, region_name=REGION, endpoint_url=endpoint, aws_access_key_id=FAKE_KEY_ID,
                        aws_secret_access_key=FAKE_SECRET)


def _cli(endpoint: str, tmp_path: Path, *argv: str, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "canestra.cli", "deploy", "aws", *argv, "--region", REGION,
           "--endpoint-url", endpoint, "--allow-http-endpoint"]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), cwd=tmp_path, timeout=300, stdin=stdin)


def _deploy_storage(endpoint: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    wheel = tmp_path / "canestra-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"a stand-in: the EMR cluster that would install it is not started")
    certs = tmp_path / "certs.zip"
    certs.write_bytes(b"stand-in")
    return _cli(endpoint, tmp_path, "--bucket", BUCKET, "--storage-only", "--wheel", str(wheel),
                "--tls-certs-zip", str(certs), *extra)


def _no_leak(*texts: str) -> None:
    for secret in (FAKE_KEY_ID, FAKE_SECRET):
        assert not any(secret in t for t in texts)


def test_serve_stack_status_and_destroy_on_moto(moto_fresh, tmp_path):
    ec2 = _client("ec2", moto_fresh)
    subnets = ec2.describe_subnets()["Subnets"][:2]
    vpc = subnets[0]["VpcId"]
    cert = _client("acm", moto_fresh).request_certificate(DomainName="fruit.example.com")["CertificateArn"]
    serve = ("--serve", "--image", IMAGE, "--certificate-arn", cert, "--vpc-id", vpc,
             "--lb-subnets", ",".join(s["SubnetId"] for s in subnets), "--task-public-ip")

    # No trained model yet: the data stack is there, the service is not started (it would never be ready).
    first = _deploy_storage(moto_fresh, tmp_path, *serve)
    assert first.returncode == 2, first.stderr[-2000:]
    assert first.stderr.strip() == (f"canestra: error: no trained model at s3://{BUCKET}/runs/train/model/ (no "
                                    "canestra_model.json): run the EMR train step first, or pass --model-prefix "
                                    "runs/<run>/model/")
    cfn = _client("cloudformation", moto_fresh)
    assert {s["StackName"] for s in cfn.describe_stacks()["Stacks"]} == {"canestra"}

    s3 = _client("s3", moto_fresh)
    for key in ("runs/train/model/canestra_model.json", "runs/train/metrics.json", "runs/predict/predictions.csv"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"{}", ServerSideEncryption="AES256")
    proc = _deploy_storage(moto_fresh, tmp_path, *serve)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "service cost estimate, per month of 730 h" in proc.stdout and "total about $" in proc.stdout
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "UPDATE_COMPLETE" and summary["serve"]["status"] == "CREATE_COMPLETE"
    outputs = summary["serve"]["outputs"]
    assert outputs["ModelUri"] == f"s3://{BUCKET}/runs/train/model/"
    # (moto leaves out ApiKeysSecretArn: it does not create the secret)
    assert {"LoadBalancerDnsName", "ClusterName", "ServiceName", "LogGroupName"} <= set(outputs)

    # What moto made of the stack.
    elbv2 = _client("elbv2", moto_fresh)
    lb, = elbv2.describe_load_balancers()["LoadBalancers"]
    assert lb["DNSName"] == outputs["LoadBalancerDnsName"] and lb["Scheme"] == "internet-facing"
    listeners = {x["Port"]: x for x in elbv2.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]}
    assert listeners[443]["Protocol"] == "HTTPS" and listeners[443]["SslPolicy"] == "ELBSecurityPolicy-TLS13-1-2-2021-06"
    assert listeners[443]["Certificates"] == [{"CertificateArn": cert}]
    assert listeners[80]["DefaultActions"][0]["RedirectConfig"]["Protocol"] == "HTTPS"
    tg, = elbv2.describe_target_groups()["TargetGroups"]
    assert tg["HealthCheckPath"] == "/readyz" and tg["Port"] == 8000
    group, = _client("logs", moto_fresh).describe_log_groups(logGroupNamePrefix="/canestra/")["logGroups"]
    assert group["logGroupName"] == outputs["LogGroupName"] and group["retentionInDays"] == 90
    ecs = _client("ecs", moto_fresh)
    service, = ecs.describe_services(cluster=outputs["ClusterName"], services=[outputs["ServiceName"]])["services"]
    task = ecs.describe_task_definition(taskDefinition=service["taskDefinition"])["taskDefinition"]
    container, = task["containerDefinitions"]
    assert container["image"] == IMAGE and container["readonlyRootFilesystem"] is True
    assert [s["name"] for s in container["secrets"]] == ["CANESTRA_API_KEYS"]
    assert container["command"] == [aws_serve.serve_command(BUCKET, "runs/train/model/", 1)]
    iam = _client("iam", moto_fresh)
    task_role = next(r["RoleName"] for r in iam.list_roles()["Roles"] if "TaskRole" in r["RoleName"])
    doc = _policy(iam.get_role_policy(RoleName=task_role, PolicyName="canestra-read-model"))
    # (moto keeps an Fn::If that gave AWS::NoValue as a None statement; CloudFormation drops it)
    resources = {r for st in _statements(doc) if st is not None for r in _as_list(st["Resource"])}
    assert resources == {f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/runs/*/model/*"}

    # status: the stacks, the bucket's runs, the ECS cluster and service, the endpoint.
    st = _cli(moto_fresh, tmp_path, "status")
    assert st.returncode == 0, st.stderr
    text = st.stdout
    assert f"stack canestra in {REGION}: UPDATE_COMPLETE" in text and f"stack canestra-serve in {REGION}: CREATE_COMPLETE" in text
    assert f"data bucket s3://{BUCKET}" in text and "no EMR cluster (storage only)" in text
    assert "last runs (2):" in text
    assert f"s3://{BUCKET}/runs/train/: model 20" in text and ", metrics 20" in text
    assert f"s3://{BUCKET}/runs/predict/: predictions 20" in text
    assert f"ECS cluster {outputs['ClusterName']}: ACTIVE" in text
    assert f"service {outputs['ServiceName']}: ACTIVE" in text and "/2 tasks running" in text
    assert f"load balancer {outputs['LoadBalancerDnsName']}" in text
    report = json.loads(_cli(moto_fresh, tmp_path, "status", "--json").stdout)
    assert report["serve_stack"]["status"] == "CREATE_COMPLETE" and report["service"]["service"]["desired"] == 2
    assert [r["prefix"] for r in report["runs"]] and report["stack"]["outputs"]["BucketName"] == BUCKET

    # destroy without --delete-data: both stacks go, the data stays.
    gone = _cli(moto_fresh, tmp_path, "destroy")
    assert gone.returncode == 0, gone.stderr
    lines = gone.stdout.splitlines()
    assert lines.index("deleting stack canestra-serve ...") < lines.index("deleting stack canestra ...")
    assert f"kept s3://{BUCKET} and s3://{BUCKET}-logs" in gone.stdout
    assert not [s for s in cfn.describe_stacks()["Stacks"] if s["StackStatus"] != "DELETE_COMPLETE"]
    assert elbv2.describe_load_balancers()["LoadBalancers"] == []
    assert s3.get_object(Bucket=BUCKET, Key="runs/train/model/canestra_model.json")["Body"].read() == b"{}"
    s3.head_bucket(Bucket=f"{BUCKET}-logs")
    after = _cli(moto_fresh, tmp_path, "status")
    assert after.returncode == 2
    assert after.stderr.strip() == (f"canestra: error: no stack canestra or canestra-serve in {REGION}: check "
                                    "--stack-name and --region (`canestra deploy aws` creates them)")
    _no_leak(first.stdout, first.stderr, proc.stdout, proc.stderr, st.stdout, st.stderr, gone.stdout, gone.stderr)


def _at_a_terminal(endpoint: str, tmp_path: Path, typed: bytes, *argv: str) -> subprocess.CompletedProcess:
    """The command with a pseudo-terminal as stdin (so it may ask), ``typed`` already waiting there."""
    leader, follower = pty.openpty()
    try:
        os.write(leader, typed)
        return _cli(endpoint, tmp_path, *argv, stdin=follower)
    finally:
        os.close(follower)
        os.close(leader)


def test_destroy_deletes_data_only_after_typed_confirmation(moto_fresh, tmp_path):
    assert _deploy_storage(moto_fresh, tmp_path).returncode == 0
    s3 = _client("s3", moto_fresh)
    s3.put_object(Bucket=BUCKET, Key="images/Apple/1.jpg", Body=b"jpeg", ServerSideEncryption="AES256")
    s3.put_object(Bucket=f"{BUCKET}-logs", Key="s3-access/log-1", Body=b"log", ServerSideEncryption="AES256")
    cfn = _client("cloudformation", moto_fresh)

    def intact() -> bool:
        live = [s for s in cfn.describe_stacks()["Stacks"] if s["StackStatus"] != "DELETE_COMPLETE"]
        return bool(live) and s3.get_object(Bucket=BUCKET, Key="images/Apple/1.jpg")["Body"].read() == b"jpeg"

    # A script without --yes: refused before anything is deleted.
    proc = _cli(moto_fresh, tmp_path, "destroy", "--delete-data")
    assert proc.returncode == 2 and "pass --yes in scripts" in proc.stderr and intact()
    assert "deleting stack" not in proc.stdout
    # At a terminal, a wrong answer deletes nothing.
    proc = _at_a_terminal(moto_fresh, tmp_path, b"canestra\n", "destroy", "--delete-data")
    assert proc.returncode == 2, proc.stderr
    assert f"Type the bucket name ({BUCKET}) to confirm" in proc.stderr
    assert "not confirmed" in proc.stderr and "nothing was deleted" in proc.stderr and intact()
    assert f"will delete s3://{BUCKET} and s3://{BUCKET}-logs" in proc.stdout
    # The bucket's name: stacks, then both buckets, go.
    proc = _at_a_terminal(moto_fresh, tmp_path, f"{BUCKET}\n".encode(), "destroy", "--delete-data")
    assert proc.returncode == 0, proc.stderr
    assert f"deleted s3://{BUCKET} (5 objects)" in proc.stdout  # the image and the four artifacts
    assert f"deleted s3://{BUCKET}-logs (1 objects)" in proc.stdout
    assert {b["Name"] for b in s3.list_buckets()["Buckets"]} == set()
    assert not [s for s in cfn.describe_stacks()["Stacks"] if s["StackStatus"] != "DELETE_COMPLETE"]

    # --yes (scripts): no question asked.
    assert _deploy_storage(moto_fresh, tmp_path).returncode == 0
    proc = _cli(moto_fresh, tmp_path, "destroy", "--delete-data", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert "Type the bucket name" not in proc.stderr and s3.list_buckets()["Buckets"] == []
    _no_leak(proc.stdout, proc.stderr)


def test_status_lists_the_emr_cluster_and_its_last_steps():
    """EMR through moto in-process (its server answers EMR calls as us-east-1 whatever the region)."""
    import boto3
    from moto import mock_aws

    with mock_aws():
        session = boto3.Session(aws_access_key_id=FAKE_KEY_ID, aws_secret_access_key=FAKE_SECRET, region_name=REGION)
        emr = session.client("emr")
        cluster = emr.run_job_flow(Name="canestra-canestra", ReleaseLabel="emr-7.5.0", JobFlowRole="r", ServiceRole="r",
                                   Instances={"MasterInstanceType": "m5.xlarge", "InstanceCount": 1,
                                              "KeepJobFlowAliveWhenNoSteps": True},
                                   Steps=[{"Name": n, "ActionOnFailure": "CONTINUE",
                                           "HadoopJarStep": {"Jar": "command-runner.jar", "Args": ["true"]}}
                                          for n in ("canestra-train", "canestra-predict")])["JobFlowId"]
        cfn = session.client("cloudformation")
        cfn.create_stack(StackName="canestra", TemplateBody=json.dumps({
            "Resources": {"Logs": {"Type": "AWS::Logs::LogGroup"}},
            "Outputs": {"ClusterId": {"Value": cluster}}}))
        report = aws_ops.status(session, region=REGION, stack_name="canestra")
    assert report["serve_stack"] is None and "service" not in report
    assert report["emr_cluster"]["id"] == cluster and report["emr_cluster"]["state"]
    assert sorted(s["name"] for s in report["emr_cluster"]["steps"]) == ["canestra-predict", "canestra-train"]
    text = "\n".join(aws_ops.status_lines(report))
    assert f"EMR cluster {cluster}: " in text and "step canestra-train: " in text


def test_status_and_destroy_errors_are_one_plain_line(moto_fresh, tmp_path):
    for action in ("status", "destroy"):
        proc = _cli(moto_fresh, tmp_path, action)
        assert proc.returncode == 2
        assert proc.stderr.startswith(f"canestra: error: no stack canestra or canestra-serve in {REGION}")
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    env = {k: v for k, v in _env(tmp_path).items() if not k.startswith("AWS_ACCESS") and not k.startswith("AWS_SECRET")}
    proc = subprocess.run([sys.executable, "-m", "canestra.cli", "deploy", "aws", "status", "--region", REGION],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "no AWS credentials" in proc.stderr
    with pytest.raises(InputError, match="GDPR"):
        aws_ops.run_cli(type("Args", (), {"region": "us-east-1", "allow_non_eu_region": False, "endpoint_url": None,
                                          "allow_http_endpoint": False})())
