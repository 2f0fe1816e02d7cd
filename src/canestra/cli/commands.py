"""``canestra <command>``: a thin argparse layer over the library.

Every failure a user can fix ends as one line ``canestra: error: …`` and exit
code 2; the full Python/Java trace only with ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from canestra import __version__, api, tracking
from canestra._faults import typed_error
from canestra.cli import feedback as feedback_cli
from canestra.cli import options as opt
from canestra.config import Settings
from canestra.errors import EXIT_USER_ERROR, CanestraError
from canestra.privacy import audit
from canestra.progress import Progress


def _command(sub, name: str, help_text: str, examples: tuple[str, ...], parents: list) -> argparse.ArgumentParser:
    """One ``canestra <name>`` parser: shared flags from ``parents``, an example in its --help."""
    return sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                          parents=parents, formatter_class=opt.HelpFormatter, epilog=opt.example(*examples))


def _training_roots(p: argparse.ArgumentParser) -> None:
    """ingest and train: roots read at family level, and roots of none of the families (the catalog holds them)."""
    g = next(g for g in p._action_groups if g.title == "input and output")
    g.add_argument("--family-images", action="append", metavar="DIR",
                   help="root of family folders (Banana/, Orange/) trained at family level whatever their names: a "
                        "root whose folders are all also Fruits-360 class names would otherwise read as studio "
                        "varieties; repeatable")
    g.add_argument("--unknown-images", action="append", metavar="DIR",
                   help="photos of things that are none of the families (e.g. other produce, any folder layout), "
                        "trained as a class the model answers 'unknown' for; repeat it for several roots")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="canestra", formatter_class=opt.HelpFormatter,
        description="Fruit-image classification on Apache Spark (EfficientNet-Lite0 features, PCA, Spark ML).",
        epilog=opt.example("canestra train --images sample/fruits-360 --out runs/demo",
                           "canestra predict --model runs/demo/model --images photos/ --out runs/pred",
                           "canestra <command> --help    # its options, CANESTRA_* variables and an example"),
    )
    parser.add_argument("--version", action="version", version=f"canestra {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    spark = opt.spark_parent()
    debug, audit_log, storage = opt.debug_parent(), opt.audit_parent(), opt.storage_parent()

    p = _command(sub, "ingest", "scan an image tree into a curated catalog table (metadata stripped)",
                 ("canestra ingest --images sample/fruits-360 --out runs/catalog",
                  "canestra ingest --images sample/fruits-360 --family-images photos/shop --out runs/catalog"),
                 [opt.labelled_input_parent(), spark])
    _training_roots(p)

    p = _command(sub, "train", "ingest, featurize, fit PCA + classifier, evaluate, save the model",
                 ("canestra train --images sample/fruits-360 --out runs/demo",
                  "canestra train --images sample/fruits-360 --images photos/families --out runs/fam --pca-k 256",
                  "canestra train --images sample/fruits-360 --eval-images photos/grocery-val --out runs/demo"),
                 [opt.labelled_input_parent(), opt.features_parent(), spark])
    # In the parent's "input and output" group, beside --images (argparse copied it into p).
    next(g for g in p._action_groups if g.title == "input and output").add_argument(
        "--eval-images", action="append", metavar="DIR",
        help="labelled root (<Family or Class>/<image>) never trained on, scored by the final model into "
             "metrics.json by_source and the report; repeat it for several roots")
    _training_roots(p)
    next(g for g in p._action_groups if g.title == "input and output").add_argument(
        "--feedback", metavar="STORE",
        help="also train on the corrections users sent with consent: " + feedback_cli.STORE_HELP)
    g = p.add_argument_group("model")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--pca-k", type=int, metavar="K", help="number of PCA components (default 512)")
    x.add_argument("--pca-variance", type=float, metavar="SHARE",
                   help="keep the fewest components explaining this share, e.g. 0.95")
    g.add_argument("--reg-param", type=float, metavar="L2", help="logistic regression L2 strength (default 1e-5)")
    g.add_argument("--max-iter", type=int, metavar="N", help="logistic regression iterations (default 50)")
    g.add_argument("--taxonomy", metavar="FILE.csv",
                   help="class -> family table (columns class,family) overriding the shipped Fruits-360 one")
    g.add_argument("--unknown-quantile", type=float, metavar="SHARE",
                   help="share of held-out images the 'unknown' rule may refuse (default 0.005; 0 turns it off)")
    g.add_argument("--augment-views", type=int, metavar="N",
                   help="augmented views (crop, mirror, light, blur) of each family-labelled training photo "
                        "(default 4; 0 = off): real photos from other sources are recognised better")
    g.add_argument("--no-shift-eval", dest="shift_eval", action="store_false", default=None,
                   help="skip the evaluation on perturbed held-out images (saves ~15 s)")
    g.add_argument("--no-answer-head", dest="answer_head", action="store_false", default=None,
                   help="a studio-only model answers from its main classifier alone, without the second one on "
                        "the CNN's last block (which reads other capture sessions better, real photos worse)")
    g = p.add_argument_group("experiment tracking (MLflow)")
    g.add_argument("--mlflow", nargs="?", const=True, default=None, metavar="URI",
                   help="log the run to MLflow (params, metrics, report, model): this tracking URI or folder, "
                        "default MLFLOW_TRACKING_URI else ./mlruns; on by itself when MLFLOW_TRACKING_URI is set")
    g.add_argument("--register-model", metavar="NAME",
                   help="also register the model in MLflow's registry as a new version of NAME "
                        "(serve it with --model models:/NAME/VERSION)")
    opt.shared_groups_last(p)

    p = _command(sub, "predict", "classify images with a trained model",
                 ("canestra predict --model runs/demo/model --images photos/ --out runs/pred",
                  "canestra predict --model runs/demo/model --images inbox/ --out runs/pred --incremental"),
                 [opt.model_input_parent("output folder (predictions/, predictions.csv, quarantine.csv)"),
                  opt.include_paths_parent(), spark])
    p.add_argument("--incremental", action="store_true",
                   help="score only images not yet in OUT's predictions and add them to it (a re-run adds nothing)")
    opt.shared_groups_last(p)

    _command(sub, "evaluate", "metrics of a trained model on a labelled image folder",
             ("canestra evaluate --model runs/demo/model --images sample/fruits-360 --out runs/eval",),
             [opt.model_input_parent("output folder (default ./canestra-evaluation)", out_required=False,
                                     out_default="canestra-evaluation",
                                     images_help="root folder of <Class>/<image> files"), spark])

    p = _command(sub, "watch", "predict images as they land in a folder or S3 prefix (Spark Structured Streaming)",
                 ("canestra watch --model runs/demo/model --images inbox/ --out runs/live --trigger 5s",
                  "canestra watch --model runs/demo/model --images inbox/ --out runs/live --once   # from cron"),
                 [opt.model_input_parent("local output folder (predictions/, quarantine.csv, _checkpoints/)",
                                         images_help="folder (or s3://bucket/prefix) to watch; may start empty"),
                  opt.include_paths_parent(), spark])
    p.add_argument("--trigger", default="10s", metavar="INTERVAL",
                   help="how often to look for new images (default 10s; e.g. 2s, 1m)")
    p.add_argument("--once", action="store_true",
                   help="predict what is there now (and not yet predicted), then stop: for cron and EMR steps")
    opt.shared_groups_last(p)

    _gdpr_parsers(sub, debug, audit_log, storage)
    _serve_parser(sub, debug, audit_log)
    feedback_cli.add_promote_parser(sub, debug, audit_log)
    _monitor_parser(sub, debug, audit_log)

    p = sub.add_parser("deploy", help="deploy canestra to a cloud (AWS EMR + S3, the HTTPS service, EU regions)",
                       formatter_class=opt.HelpFormatter,
                       epilog=opt.example("canestra deploy aws --region eu-west-3 --bucket my-canestra-data --dry-run"))
    cloud = p.add_subparsers(dest="cloud", metavar="CLOUD", required=True)
    from canestra.deploy.aws import add_cli_arguments

    add_cli_arguments(_command(
        cloud, "aws", "CloudFormation stacks: encrypted S3 bucket, IAM roles, EMR 7 cluster; --serve: "
        "the HTTPS service on ECS Fargate; status; destroy",
        ("canestra deploy aws --region eu-west-3 --bucket my-canestra-data --dry-run",
         "canestra deploy aws --region eu-west-3 --bucket my-canestra-data --subnet-id subnet-0123abcd",
         "canestra deploy aws --region eu-west-3 --bucket my-canestra-data --storage-only --serve --image "
         "123456789012.dkr.ecr.eu-west-3.amazonaws.com/canestra:0.1.0 --certificate-arn arn:aws:acm:... "
         "--vpc-id vpc-0123abcd --lb-subnets subnet-0123abcd,subnet-4567cdef --task-public-ip",
         "canestra deploy aws status --region eu-west-3",
         "canestra deploy aws destroy --region eu-west-3    # keeps the data bucket; --delete-data asks first"),
        [debug]))
    return parser


def _serve_parser(sub, debug: argparse.ArgumentParser, audit_log: argparse.ArgumentParser) -> None:
    p = _command(sub, "serve", "HTTP API + web page classifying uploaded images (no Spark needed)",
                 ("canestra serve --model runs/demo/model --port 8000",
                  "canestra serve --model models:/fruit/champion --host 0.0.0.0 --api-keys-file keys.txt --workers 2"),
                 [debug, audit_log])
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, metavar="DIR|URI", help="the model/ folder written by `canestra train`, "
                   "an s3://.../model/ folder (copied once at start), a `current` pointer written by `canestra "
                   "promote` (followed on promotion), or a registered MLflow model: models:/NAME/ALIAS or "
                   "models:/NAME/VERSION")
    g.add_argument("--mlflow", metavar="URI",
                   help="MLflow registry for --model models:/NAME/ALIAS (default MLFLOW_TRACKING_URI, else ./mlruns)")
    g = p.add_argument_group("server")
    g.add_argument("--host", metavar="ADDR", help="address to bind (default 127.0.0.1)")
    g.add_argument("--port", type=int, metavar="PORT", help="port (default 8000)")
    g.add_argument("--workers", type=int, metavar="N", help="worker processes (default 1)")
    g.add_argument("--worker-threads", type=int, dest="serve_threads", metavar="N",
                   help="ONNX Runtime threads per worker (default: cores / workers)")
    opt.hidden_alias(g, "--threads", "serve_threads", type=int)  # the spelling before 0.2
    g.add_argument("--max-upload-mb", type=float, metavar="MB", help="largest accepted image in MB (default 10)")
    g.add_argument("--max-batch", type=int, metavar="N", help="most images per /v1/predict/batch request (default 16)")
    g.add_argument("--body-timeout", type=float, metavar="SECONDS",
                   help="seconds a request body may take to arrive before 408 (default 30; slow clients)")
    g.add_argument("--drain-timeout", type=float, metavar="SECONDS",
                   help="seconds SIGTERM waits for in-flight requests before stopping (default 30)")
    g.add_argument("--header-timeout", type=float, metavar="SECONDS",
                   help="seconds a request's headers may take to arrive before 408 (default 10; slow clients)")
    g.add_argument("--log-format", choices=["text", "json"],
                   help="log lines on stderr: text (default) or json, one object per line and one line per "
                        "request (request id, route, status, duration)")
    g.add_argument("--max-decoded-mb", type=float, metavar="MB",
                   help="largest image once decoded, width x height x channels (default 128; larger: 413)")
    g.add_argument("--worker-decoded-mb", type=float, metavar="MB",
                   help="decoded MB one worker takes on at once over all its requests, the most one request "
                        "may carry; more: 503 with Retry-After (default 0 = 4 x --max-decoded-mb)")
    g = p.add_argument_group("access")
    g.add_argument("--api-keys-file", metavar="FILE",
                   help="require `Authorization: Bearer <key>` on /v1/*; one key per line")
    g.add_argument("--allow-no-auth", action="store_true", default=None,
                   help="serve a non-loopback --host without API keys (anyone who can reach it may use it)")
    g.add_argument("--rate-limit", type=float, metavar="PER_S",
                   help="requests/s per client address and worker on /v1/* (default 20; 0 = no limit)")
    g.add_argument("--rate-burst", type=int, metavar="N",
                   help="requests a client may send at once above --rate-limit (default 40)")
    g.add_argument("--forwarded-allow-ips", metavar="IP[,IP]",
                   help="proxies (addresses or networks) whose X-Forwarded-For names the client for "
                        "--rate-limit (default none: the connecting address)")
    g.add_argument("--allowed-hosts", metavar="NAME[,NAME]",
                   help="Host names a loopback --host answers besides its IP addresses and localhost "
                        "(DNS rebinding guard; e.g. a local reverse proxy's name)")
    feedback_cli.add_serve_arguments(p)
    opt.shared_groups_last(p)


MONITOR_WINDOW = 100  # canestra.drift.stats.DEFAULT_WINDOW (not imported: it loads numpy for every command)
EXIT_DRIFT = 3  # monitor --fail-on-drift: a window drifted


def _monitor_parser(sub, debug: argparse.ArgumentParser, audit_log: argparse.ArgumentParser) -> None:
    p = _command(sub, "monitor", "drift of new predictions from the model's held-out images, window by window "
                 "(no Spark)",
                 ("canestra monitor --model runs/demo/model --predictions runs/pred --json",
                  "canestra monitor --model runs/demo/model --predictions runs/live --window 200 --report drift.html"),
                 [debug, audit_log])
    g = p.add_argument_group("input and output")
    g.add_argument("--model", required=True, metavar="DIR|URI",
                   help="the model/ folder that wrote the predictions (or models:/NAME/ALIAS)")
    g.add_argument("--predictions", required=True, metavar="DIR",
                   help="the --out folder of canestra predict or canestra watch (or its predictions/ folder)")
    g.add_argument("--window", type=int, default=MONITOR_WINDOW, metavar="N",
                   help=f"predictions per window, in time order (default {MONITOR_WINDOW}; at least 25)")
    g.add_argument("--json", action="store_true", help="print the result as one JSON object")
    g.add_argument("--report", metavar="FILE.html", help="also write an HTML page plotting the drift scores over time")
    g.add_argument("--fail-on-drift", action="store_true",
                   help=f"exit with code {EXIT_DRIFT} when a window drifted (for cron and CI)")
    g.add_argument("--mlflow", metavar="URI",
                   help="MLflow registry for --model models:/NAME/ALIAS (default MLFLOW_TRACKING_URI, else ./mlruns)")
    opt.shared_groups_last(p)


def _run_monitor(args: argparse.Namespace) -> int:
    res = api.monitor(args.model, args.predictions, window=args.window, report=args.report, audit_log=args.audit_log)
    print(res.to_json() if args.json else res.text())
    if args.report and not args.json:
        print(f"report: {os.path.abspath(os.path.expanduser(args.report))}")
    return EXIT_DRIFT if args.fail_on_drift and res.drift else 0


def _gdpr_parsers(sub, debug: argparse.ArgumentParser, audit_log: argparse.ArgumentParser,
                  storage: argparse.ArgumentParser) -> None:
    """erase (Art. 17), purge (Art. 5(1)(e)), gdpr record (Art. 30): no Spark needed."""
    p = _command(sub, "erase", "GDPR erasure: remove images and everything derived from them under --out",
                 ("canestra erase --out runs/ --image-id 3f2a...e9 --delete-source",
                  "canestra erase --out runs/ --source photos/IMG_0042.jpg"),
                 [opt.output_parent("output folder (a run, or a folder of runs) to erase from"), debug, storage,
                  audit_log])
    p.add_argument("--image-id", nargs="+", action="extend", default=[], metavar="ID", help="image_id(s) to erase")
    p.add_argument("--source", nargs="+", action="extend", default=[], metavar="PATH",
                   help="source image file(s) or folder(s) to erase")
    p.add_argument("--delete-source", action="store_true",
                   help="also delete the source image files (local files or s3:// objects)")
    feedback_cli.add_store_argument(p)
    opt.shared_groups_last(p)

    p = _command(sub, "purge", "GDPR retention: remove run outputs older than --older-than days",
                 ("canestra purge --out runs/ --older-than 180 --dry-run",),
                 [opt.output_parent("output folder (a run, or a folder of runs)"), debug, audit_log])
    p.add_argument("--older-than", type=float, dest="retention_days", metavar="DAYS",
                   help="remove outputs older than this many days")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    feedback_cli.add_store_argument(p)
    opt.shared_groups_last(p)

    p = sub.add_parser("gdpr", help="GDPR documents", formatter_class=opt.HelpFormatter,
                       epilog=opt.example("canestra gdpr record --out runs/"))
    gsub = p.add_subparsers(dest="gdpr_command", metavar="DOCUMENT", required=True)
    # the record states the S3 encryption/region settings in force
    opt.shared_groups_last(feedback_cli.add_store_argument(_command(
        gsub, "record", "write the record of processing (Art. 30) for --out, Markdown + JSON",
        ("canestra gdpr record --out runs/",),
        [opt.output_parent("output folder (a run, or a folder of runs)"), debug, storage, audit_log])))


def _run_gdpr(args: argparse.Namespace, cfg: Settings) -> int:
    if args.command == "erase":
        from canestra.privacy.erase import erase

        with api.gdpr_locks(args.out, "erase"):  # never beside a run writing there (a watch would lose a batch)
            res = erase(args.out, args.image_id, args.source, delete_source=args.delete_source)
        audit.note(images=res.image_ids, rows_removed=res.total_rows, files_deleted=len(res.files_deleted),
                   sources_deleted=res.sources_deleted, models_to_retrain=len(res.retrain),
                   outputs=[m for m, _ in res.retrain])
        print(json.dumps({"images": res.image_ids, "rows_removed": res.rows_removed,
                          "files_deleted": res.files_deleted, "sources_deleted": res.sources_deleted}))
        for model, n in res.retrain:
            print(f"the model at {model} was trained on {n} erased image(s): retrain it")
        for model in res.unknown_models:
            print(f"the model at {model} does not list its training images: retrain it if erased images were in them")
        feedback_cli.erase_feedback(args, cfg)  # --feedback-dir: every stored copy of the ids (docs/feedback.md)
    elif args.command == "purge":
        from canestra.privacy.purge import purge

        purged = purge(args.out, cfg.retention_days, dry_run=args.dry_run)  # takes the locks itself
        audit.note(removed=len(purged.removed), kept=purged.kept, bytes=purged.bytes,
                   details={"older_than_days": purged.older_than_days, "dry_run": purged.dry_run})
        verb = "would remove" if purged.dry_run else "removed"
        for e in purged.removed:
            print(f"{verb} {e.kind} {e.path} ({e.age_days:g} days old, {e.bytes} bytes)")
        for path, rows in purged.trimmed:
            print(f"{verb} {rows} row(s) of expired batches from {path}")
        print(f"{verb} {len(purged.removed)} output(s) older than {purged.older_than_days:g} days; kept {purged.kept}")
        feedback_cli.purge_feedback(args, cfg)  # --feedback-dir: corrections past the retention period
    else:
        from canestra.privacy.record import write_record

        with api.gdpr_locks(args.out, "gdpr record"):
            md, js, rec = write_record(args.out, cfg)
        audit.note(tables=len(rec["categories_of_data"]["tables"]), outputs=[md, js])
        print(f"record of processing -> {md} (and {os.path.basename(js)})")
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    """Flags > CANESTRA_* env > defaults, for every Settings field a command has a flag for."""
    return Settings.load(**{k: getattr(args, k, None) for k in opt.SETTINGS_FIELDS})


class _SparkLog:
    """Where this command's Spark/JVM output goes, and where its lines start in that (appended) file."""

    def __init__(self) -> None:
        self.path: str | None = None
        self.start = 0

    def spark(self, cfg: Settings, out: str):
        # Normal runs: every Spark/JVM line goes to the log file; --debug shows everything.
        self.path = None if cfg.debug else api.spark_log_path(out)
        if self.path:
            self.start = api.log_offset(self.path)
        return api.spark_session(cfg, log_file=self.path)


def _precheck(args: argparse.Namespace, cfg: Settings):
    """Fail fast on bad paths before paying for a JVM start; the listing it made goes on to the run."""
    return api.precheck(args.command, cfg, out=args.out, images=getattr(args, "images", None),
                 model=getattr(args, "model", None), eval_images=getattr(args, "eval_images", None),
                 unknown_images=getattr(args, "unknown_images", None), trigger=getattr(args, "trigger", None),
                 family_images=getattr(args, "family_images", None))


def run(args: argparse.Namespace, log: _SparkLog | None = None) -> int:
    log = log or _SparkLog()
    if args.command == "deploy":  # no Spark: plans and creates cloud resources
        from canestra.deploy.aws import run_cli

        return run_cli(args)
    cfg = _settings(args)
    api.configure_storage(cfg)  # S3 endpoint/encryption/region settings
    if getattr(args, "model", None):  # models:/NAME/ALIAS -> a local copy of that registered version
        args.model_source = args.model  # serve follows it when it is a pointer or an alias (serve/swap.py)
        args.model = tracking.local_model_dir(args.model, getattr(args, "mlflow", None))
    if args.command in ("erase", "purge", "gdpr"):
        return _run_gdpr(args, cfg)
    if args.command == "promote":  # no Spark: both models are read as plain files
        return feedback_cli.run_promote(args, cfg)
    if args.command == "monitor":  # no Spark: the model's drift reference and the predictions are plain files
        return _run_monitor(args)
    if args.command == "serve":  # no Spark: the model is read as plain files
        # Set before numpy loads (importing .server loads it), so every worker inherits it: numpy's
        # BLAS would otherwise start one busy-waiting thread per core in each worker for the tiny
        # PCA/classifier products, stealing the cores the ONNX Runtime threads are sized to
        # (measured with 2 workers on 2 cores: 33 % -> 72 % of the bare ONNX Runtime rate).
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")
        from canestra.serve.app import run_serve

        return run_serve(args.model, cfg, source=args.model_source, registry=args.mlflow)
    progress = Progress(quiet=args.quiet)
    listing = _precheck(args, cfg)
    api.tune_driver_process()  # this process is the command's own
    # One run per --out at a time: a second one stops here naming the holder (docs/reliability.md).
    with api.out_lock(args.out, args.command):
        code = _run_job(args, cfg, progress, log, listing)
    if log.path:  # JVM notices a user can act on: one plain line, once per machine
        for line in api.notices(log.path, log.start):
            print(f"canestra: note: {line}", file=sys.stderr)
    return code


def _run_job(args: argparse.Namespace, cfg: Settings, progress: Progress, log: _SparkLog, listing=None) -> int:
    if args.command == "ingest":
        # The library functions (canestra.api) do the work and write the audit counts.
        cat = api.ingest(args.images, args.out, spark=log.spark(cfg, args.out), settings=cfg, progress=progress,
                         listing=listing, family_images=args.family_images, unknown_images=args.unknown_images)
        print(json.dumps({"catalog": cat.catalog_path, "images": cat.images, "quarantined": cat.quarantined,
                          "quarantine_csv": cat.quarantine_csv}))
    elif args.command == "train":
        tracking.require(tracking.train_option(args.mlflow, args.register_model))  # before Spark starts
        if args.feedback:
            api.feedback_store(args.feedback)  # not a feedback store: one plain line before Spark starts
        run = api.train(args.images, args.out, spark=log.spark(cfg, args.out), settings=cfg, progress=progress,
                        mlflow=args.mlflow, register_model=args.register_model, eval_images=args.eval_images,
                        unknown_images=args.unknown_images, listing=listing, feedback=args.feedback,
                        family_images=args.family_images)
        print(api.format_summary(run.metrics))
        if run.mlflow:
            print(f"mlflow: run {run.mlflow.run_id} at {run.mlflow.tracking_uri}"
                  + (f"; registered {args.register_model} version {run.mlflow.model_version}"
                     if run.mlflow.model_version else ""))
        print(f"model: {run.model_path}  report: {run.report_path}")
    elif args.command == "predict":
        res = api.predict(args.model, args.images, args.out, spark=log.spark(cfg, args.out), settings=cfg,
                          progress=progress, include_paths=args.include_paths, incremental=args.incremental,
                          listing=listing)
        print(f"{res.predicted} predictions" + (f" ({res.added} new)" if args.incremental else "")
              + f" -> {os.path.join(res.out_dir, 'predictions.csv')}; "
              f"{res.quarantined} quarantined -> {os.path.join(res.out_dir, 'quarantine.csv')}")
    elif args.command == "evaluate":
        ev = api.evaluate(args.model, args.images, args.out, spark=log.spark(cfg, args.out), settings=cfg,
                          progress=progress, listing=listing)
        print(api.format_summary(ev.metrics))
    elif args.command == "watch":
        from canestra.cli.watch import run_watch_cli

        run_watch_cli(args, cfg, log.spark, progress)
    return 0


def _audit_name(args: argparse.Namespace) -> str:
    sub = getattr(args, "gdpr_command", None) or getattr(args, "cloud", None)
    return f"{args.command} {sub}" if sub else args.command


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USER_ERROR
    debug = bool(args.debug) or os.environ.get("CANESTRA_DEBUG", "").lower() in ("1", "true", "yes")
    log = _SparkLog()
    try:
        # GDPR Art. 30: every command, successful or not, leaves an audit record.
        out = api.monitor_run_folder(args.predictions) if args.command == "monitor" else getattr(args, "out", None)
        with audit.audited(_audit_name(args), out=out, audit_log=getattr(args, "audit_log", None)):
            return run(args, log)
    except CanestraError as exc:
        if debug:
            traceback.print_exc()
        print(f"canestra: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("canestra: interrupted; outputs already published are complete, nothing half-written", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        typed = typed_error(exc)  # a failure outside an API call (those arrive typed already)
        if typed is not None:
            print(f"canestra: error: {typed}", file=sys.stderr)
            return typed.exit_code
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        where = f"see {log.path} or " if log.path else ""
        print(f"canestra: error: unexpected failure ({type(exc).__name__}: {first}); "
              f"{where}re-run with --debug for the full trace, and report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
