"""``canestra deploy aws status`` and ``canestra deploy aws destroy``.

``status`` reads what the two stacks made (``<stack>`` from canestra-emr.yaml, ``<stack>-serve`` from
canestra-serve.yaml): stack states, the EMR cluster and its last steps, the runs in the bucket, the
ECS cluster and service, the load balancer's targets. ``destroy`` deletes the stacks, service first;
the data bucket and its log bucket are kept (``DeletionPolicy: Retain``) unless ``--delete-data``,
which empties and deletes them after a typed confirmation (``--yes`` for scripts).

Every AWS failure ends as one plain line (``aws.aws_errors``), never a boto3 traceback.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Any, Callable

from canestra.deploy import aws
from canestra.deploy.aws_serve import MODEL_MARKER, serve_stack_name
from canestra.errors import InputError, OutputError
from canestra.storage.regions import check_region
from canestra.storage.s3 import check_endpoint

RUN_FILES = (("model", "model/" + MODEL_MARKER), ("metrics", "metrics.json"), ("predictions", "predictions.csv"))
MAX_RUNS = 20  # run folders status looks into (three HEAD requests each)
MAX_STEPS = 6
DELETE_BATCH = 1000  # DeleteObjects takes at most 1,000 keys


def _when(value: Any) -> str | None:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return None if value is None else str(value)


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _refused(exc: Exception) -> dict[str, str]:
    """A part of the status AWS would not give, in plain words (the rest of the status still prints)."""
    err = getattr(exc, "response", {}).get("Error", {})
    return {"error": f"{getattr(exc, 'operation_name', 'call')}: {err.get('Code', '?')}: {err.get('Message', '')[:160]}"}


def _stack(cfn, name: str) -> dict[str, Any] | None:
    s = aws.describe_stack(cfn, name)
    if s is None:
        return None
    return {"name": name, "status": s["StackStatus"], "reason": s.get("StackStatusReason"),
            "updated": _when(s.get("LastUpdatedTime") or s.get("CreationTime")),
            "outputs": {o["OutputKey"]: o["OutputValue"] for o in s.get("Outputs", [])}}


# --------------------------------------------------------------------------- status


def _cluster_status(emr, cluster_id: str) -> dict[str, Any]:
    import botocore.exceptions

    try:
        cluster = emr.describe_cluster(ClusterId=cluster_id)["Cluster"]
        steps = emr.list_steps(ClusterId=cluster_id)["Steps"][:MAX_STEPS]
    except botocore.exceptions.ClientError as exc:
        return {"id": cluster_id, **_refused(exc)}
    state = cluster["Status"]
    return {"id": cluster_id, "state": state["State"],
            "reason": (state.get("StateChangeReason") or {}).get("Message"),
            "steps": [{"name": s["Name"], "state": s["Status"]["State"],
                       "started": _when(s["Status"].get("Timeline", {}).get("StartDateTime")),
                       "ended": _when(s["Status"].get("Timeline", {}).get("EndDateTime"))} for s in steps]}


def _runs(s3, bucket: str) -> list[dict[str, Any]] | dict[str, str]:
    """The run folders under runs/, newest first: when each wrote its model, metrics.json, predictions.csv."""
    import botocore.exceptions

    try:
        listed = s3.list_objects_v2(Bucket=bucket, Prefix="runs/", Delimiter="/")
    except botocore.exceptions.ClientError as exc:
        return _refused(exc)
    runs = []
    for prefix in [p["Prefix"] for p in listed.get("CommonPrefixes", [])][:MAX_RUNS]:
        run: dict[str, Any] = {"prefix": f"s3://{bucket}/{prefix}"}
        for name, key in RUN_FILES:
            try:
                run[name] = _when(s3.head_object(Bucket=bucket, Key=prefix + key)["LastModified"])
            except botocore.exceptions.ClientError as exc:
                if _code(exc) not in ("404", "NoSuchKey", "NotFound", "403", "AccessDenied"):
                    raise
        runs.append(run)
    runs.sort(key=lambda r: max((r.get(n) or "") for n, _ in RUN_FILES), reverse=True)
    return runs


def _service_status(ecs, elbv2, outputs: dict[str, str]) -> dict[str, Any]:
    import botocore.exceptions

    out: dict[str, Any] = {}
    cluster, service = outputs.get("ClusterName"), outputs.get("ServiceName")
    if outputs.get("LoadBalancerDnsName"):
        out["load_balancer"] = outputs["LoadBalancerDnsName"]
    try:
        if cluster:
            c = (ecs.describe_clusters(clusters=[cluster])["clusters"] or [{}])[0]
            out["cluster"] = {"name": cluster, "status": c.get("status"), "running_tasks": c.get("runningTasksCount"),
                              "pending_tasks": c.get("pendingTasksCount")}
        if cluster and service:
            s = (ecs.describe_services(cluster=cluster, services=[service])["services"] or [{}])[0]
            deployments = s.get("deployments") or [{}]
            out["service"] = {"name": service, "status": s.get("status"), "desired": s.get("desiredCount"),
                              "running": s.get("runningCount"), "pending": s.get("pendingCount"),
                              "rollout": deployments[0].get("rolloutState"),
                              "events": [e.get("message") for e in (s.get("events") or [])[:3]]}
    except botocore.exceptions.ClientError as exc:
        out.update(_refused(exc))
    if outputs.get("TargetGroupArn"):
        try:
            health = elbv2.describe_target_health(TargetGroupArn=outputs["TargetGroupArn"])["TargetHealthDescriptions"]
            counts: dict[str, int] = {}
            for h in health:
                state = h.get("TargetHealth", {}).get("State", "unknown")
                counts[state] = counts.get(state, 0) + 1
            out["targets"] = counts
        except botocore.exceptions.ClientError as exc:
            out["targets"] = _refused(exc)
    return out


def status(session, *, region: str, stack_name: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """What the stacks, the EMR cluster, the runs and the service are doing now."""
    client = dict(endpoint_url=endpoint_url, region_name=region)
    with aws.aws_errors():
        cfn = session.client("cloudformation", **client)
        main, serve = _stack(cfn, stack_name), _stack(cfn, serve_stack_name(stack_name))
        if main is None and serve is None:
            raise InputError(f"no stack {stack_name} or {serve_stack_name(stack_name)} in {region}: "
                             f"check --stack-name and --region (`canestra deploy aws` creates them)")
        report: dict[str, Any] = {"region": region, "stack": main, "serve_stack": serve}
        if main is not None:
            outputs = main["outputs"]
            if outputs.get("ClusterId"):
                report["emr_cluster"] = _cluster_status(session.client("emr", **client), outputs["ClusterId"])
            if outputs.get("BucketName"):
                report["runs"] = _runs(session.client("s3", **client), outputs["BucketName"])
        if serve is not None:
            report["service"] = _service_status(session.client("ecs", **client), session.client("elbv2", **client),
                                                serve["outputs"])
    return report


def status_lines(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for key in ("stack", "serve_stack"):
        s = report.get(key)
        if s is None:
            continue
        reason = f" ({s['reason']})" if s.get("reason") and "FAILED" in s["status"] else ""
        lines.append(f"stack {s['name']} in {report['region']}: {s['status']}{reason}, last change {s['updated']}")
        if key == "stack":
            bucket = s["outputs"].get("BucketName")
            if bucket:
                lines.append(f"  data bucket s3://{bucket} (logs s3://{s['outputs'].get('LogBucketName', bucket + '-logs')})")
            cluster = report.get("emr_cluster")
            if cluster:
                lines.append(f"  EMR cluster {cluster['id']}: {cluster.get('state') or cluster.get('error')}"
                             + (f" ({cluster['reason']})" if cluster.get("reason") else ""))
                for step in cluster.get("steps", []):
                    lines.append(f"    step {step['name']}: {step['state']} (started {step['started'] or '-'}, "
                                 f"ended {step['ended'] or '-'})")
            elif "ClusterId" not in s["outputs"]:
                lines.append("  no EMR cluster (storage only)")
            runs = report.get("runs")
            if isinstance(runs, dict):
                lines.append(f"  runs: {runs['error']}")
            elif runs is not None:
                lines.append(f"  last runs ({len(runs)}):" if runs else "  no runs yet under runs/")
                for run in runs:
                    parts = [f"{n} {run[n]}" for n, _ in RUN_FILES if run.get(n)]
                    lines.append(f"    {run['prefix']}: {', '.join(parts) or 'nothing finished'}")
        else:
            svc = report.get("service", {})
            if svc.get("cluster"):
                c = svc["cluster"]
                lines.append(f"  ECS cluster {c['name']}: {c['status']}, {c['running_tasks']} tasks running, "
                             f"{c['pending_tasks']} pending")
            if svc.get("service"):
                v = svc["service"]
                lines.append(f"  service {v['name']}: {v['status']}, {v['running']}/{v['desired']} tasks running, "
                             f"{v['pending']} pending, deployment {v['rollout'] or '-'}")
                lines += [f"    event: {e}" for e in v["events"]]
            targets = svc.get("targets")
            if isinstance(targets, dict) and "error" not in targets:
                counts = ", ".join(f"{n} {state}" for state, n in sorted(targets.items())) or "none registered"
                lines.append(f"  load balancer targets (/readyz): {counts}")
            if svc.get("error"):
                lines.append(f"  service: {svc['error']}")
            if svc.get("load_balancer"):
                lines.append(f"  load balancer {svc['load_balancer']}: point the certificate's DNS name here, "
                             "then https://<that name>/v1/predict")
    return lines


# --------------------------------------------------------------------------- destroy


def _ask_bucket_name(buckets: list[str], yes: bool) -> None:
    """--delete-data's confirmation: the data bucket's name typed at a terminal, or --yes."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise InputError(f"--delete-data deletes every object in {' and '.join('s3://' + b for b in buckets)}: "
                         "run it at a terminal to confirm by typing the bucket name, or pass --yes in scripts")
    print(f"This deletes {' and '.join('s3://' + b for b in buckets)} with every object in them "
          "(images, models, predictions, logs). It cannot be undone.", file=sys.stderr)
    print(f"Type the bucket name ({buckets[0]}) to confirm: ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline().strip()
    if answer != buckets[0]:
        raise InputError(f"not confirmed (typed {answer!r}, not {buckets[0]!r}): nothing was deleted")


def _delete_stack(cfn, elbv2, stack: dict[str, Any], poll_s: int, echo: Callable[[str], None]) -> None:
    import botocore.exceptions

    name = stack["name"]
    lb_arn = stack["outputs"].get("LoadBalancerArn")
    if lb_arn:
        # The load balancer has deletion protection on (against a stray delete in the console): off first.
        try:
            elbv2.modify_load_balancer_attributes(
                LoadBalancerArn=lb_arn, Attributes=[{"Key": "deletion_protection.enabled", "Value": "false"}])
        except botocore.exceptions.ClientError as exc:
            if _code(exc) not in ("LoadBalancerNotFound", "ValidationError"):
                raise
    echo(f"deleting stack {name} ...")
    cfn.delete_stack(StackName=name)
    try:
        cfn.get_waiter("stack_delete_complete").wait(
            StackName=name, WaiterConfig={"Delay": poll_s, "MaxAttempts": max(1, 3600 // poll_s)})
    except botocore.exceptions.WaiterError:
        left = _stack(cfn, name)
        raise OutputError(f"stack {name} was not deleted (status {left['status'] if left else 'unknown'}"
                          f"{': ' + left['reason'] if left and left.get('reason') else ''}): see its events in the "
                          "CloudFormation console, fix the cause and run destroy again") from None


def _empty_and_delete_bucket(s3, bucket: str, echo: Callable[[str], None]) -> int:
    """Every object version and delete marker, then the bucket; returns the objects deleted."""
    import botocore.exceptions

    deleted = 0
    for attempt in range(3):  # S3 access logs may still arrive in the log bucket while it is emptied
        try:
            for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket):
                keys = [{"Key": o["Key"], "VersionId": o["VersionId"]}
                        for o in page.get("Versions", []) + page.get("DeleteMarkers", [])]
                for i in range(0, len(keys), DELETE_BATCH):
                    s3.delete_objects(Bucket=bucket, Delete={"Objects": keys[i:i + DELETE_BATCH], "Quiet": True})
                    deleted += len(keys[i:i + DELETE_BATCH])
            s3.delete_bucket(Bucket=bucket)
            echo(f"deleted s3://{bucket} ({deleted} objects)")
            return deleted
        except botocore.exceptions.ClientError as exc:
            if _code(exc) == "NoSuchBucket":
                echo(f"s3://{bucket} does not exist (already deleted)")
                return deleted
            if _code(exc) != "BucketNotEmpty" or attempt == 2:
                raise
    return deleted


def destroy(session, *, region: str, stack_name: str, bucket: str | None = None, delete_data: bool = False,
            yes: bool = False, endpoint_url: str | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Delete ``<stack>-serve`` then ``<stack>``; the buckets stay unless ``delete_data`` (confirmed first)."""
    client = dict(endpoint_url=endpoint_url, region_name=region)
    poll_s = 1 if endpoint_url and endpoint_url.startswith("http://") else 15
    with aws.aws_errors():
        cfn = session.client("cloudformation", **client)
        serve_name = serve_stack_name(stack_name)
        main, serve = _stack(cfn, stack_name), _stack(cfn, serve_name)
        if main is not None:
            bucket = main["outputs"].get("BucketName") or bucket
        if main is None and serve is None and not (delete_data and bucket):
            raise InputError(f"no stack {stack_name} or {serve_name} in {region}: nothing to delete "
                             "(check --stack-name and --region)")
        buckets = [bucket, f"{bucket}-logs"] if bucket else []
        for s in (serve, main):
            if s is not None:
                echo(f"will delete stack {s['name']} ({s['status']})")
        if delete_data:
            if not buckets:
                raise InputError(f"stack {stack_name} names no data bucket: pass --bucket NAME with --delete-data")
            echo(f"will delete {' and '.join('s3://' + b for b in buckets)} with every object in them")
            _ask_bucket_name(buckets, yes)
        elif buckets:
            echo(f"will keep {' and '.join('s3://' + b for b in buckets)} (add --delete-data to delete them)")
        elbv2 = session.client("elbv2", **client)
        deleted_stacks = []
        for s in (serve, main):
            if s is not None:
                _delete_stack(cfn, elbv2, s, poll_s, echo)
                deleted_stacks.append(s["name"])
        removed: dict[str, int] = {}
        if delete_data:
            s3 = session.client("s3", **client)
            for b in buckets:  # the data bucket first: it writes its access logs into the other
                removed[b] = _empty_and_delete_bucket(s3, b, echo)
    kept = [] if delete_data else buckets
    if kept:
        echo(f"kept {' and '.join('s3://' + b for b in kept)}")
    return {"deleted_stacks": deleted_stacks, "deleted_buckets": removed, "kept_buckets": kept}


# --------------------------------------------------------------------------- CLI


def run_cli(args) -> int:
    """``canestra deploy aws status|destroy`` (flags parsed by ``aws.add_cli_arguments``)."""
    check_region(args.region, bool(args.allow_non_eu_region), "the canestra stacks")
    check_endpoint(args.endpoint_url, args.allow_http_endpoint, flag="--endpoint-url")
    session = aws.aws_session(args.region, args.profile)
    if args.action == "status":
        report = status(session, region=args.region, stack_name=args.stack_name, endpoint_url=args.endpoint_url)
        print(json.dumps(report, sort_keys=True) if args.json else "\n".join(status_lines(report)))
        return 0
    destroy(session, region=args.region, stack_name=args.stack_name, bucket=args.bucket,
            delete_data=args.delete_data, yes=args.yes, endpoint_url=args.endpoint_url)
    return 0
