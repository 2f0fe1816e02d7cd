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

from . import __version__
from .config import Settings
from .errors import EXIT_USER_ERROR, CanestraError
from .progress import Progress


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--master", help="Spark master URL (default local[*]; e.g. spark://127.0.0.1:7077)")
    p.add_argument("--debug", action="store_true", default=None, help="show full tracebacks on errors")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _feature_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", dest="image_sizes", help="CNN input size in px: 160 (default, upscaled), 100 (native, fastest), 224, or 100,224 (concatenated)")
    p.add_argument("--batch-size", type=int, help="images per ONNX Runtime call (default 64)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads per Spark task (default 1)")
    p.add_argument("--arrow-batch", type=int, help="max rows per Arrow batch into the featurizer (default 256)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="canestra",
        description="Fruit-image classification on Apache Spark (EfficientNet-Lite0 features, PCA, Spark ML).",
    )
    parser.add_argument("--version", action="version", version=f"canestra {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("ingest", help="scan an image tree into a curated catalog table (metadata stripped)")
    p.add_argument("--images", required=True, help="root folder of <Class>/<image> files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--test-fraction", type=float, help="share of frame blocks per class held out (default 0.2)")
    p.add_argument("--seed", type=int, help="split seed (default 42)")
    _common(p)

    p = sub.add_parser("train", help="ingest, featurize, fit PCA + classifier, evaluate, save the model")
    p.add_argument("--images", required=True, help="root folder of <Class>/<image> files")
    p.add_argument("--out", required=True, help="output folder (model/, metrics.json, report.html, tables)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--pca-k", type=int, help="number of PCA components (default 256)")
    g.add_argument("--pca-variance", type=float, help="keep the fewest components explaining this share, e.g. 0.95")
    p.add_argument("--test-fraction", type=float, help="share of frame blocks per class held out (default 0.2)")
    p.add_argument("--seed", type=int, help="split seed (default 42)")
    p.add_argument("--reg-param", type=float, help="logistic regression L2 strength (default 1e-4)")
    p.add_argument("--max-iter", type=int, help="logistic regression iterations (default 50)")
    _feature_opts(p)
    _common(p)

    p = sub.add_parser("predict", help="classify images with a trained model")
    p.add_argument("--model", required=True, help="the model/ folder written by `canestra train`")
    p.add_argument("--images", required=True, help="folder of images (class sub-folders optional)")
    p.add_argument("--out", required=True, help="output folder (predictions/, predictions.csv, quarantine.csv)")
    _common(p)

    p = sub.add_parser("evaluate", help="metrics of a trained model on a labelled image folder")
    p.add_argument("--model", required=True, help="the model/ folder written by `canestra train`")
    p.add_argument("--images", required=True, help="root folder of <Class>/<image> files")
    p.add_argument("--out", default="canestra-evaluation", help="output folder (default ./canestra-evaluation)")
    _common(p)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    keys = ["master", "image_sizes", "batch_size", "threads", "arrow_batch", "pca_k", "pca_variance",
            "test_fraction", "seed", "reg_param", "max_iter", "debug"]
    return Settings.load(**{k: getattr(args, k, None) for k in keys})


def _spark(cfg: Settings):
    from .sparkctx import get_spark

    conf = {"spark.sql.execution.arrow.maxRecordsPerBatch": str(cfg.arrow_batch)}
    os.environ.setdefault("CANESTRA_DRIVER_MEMORY", cfg.driver_memory)
    return get_spark(cfg.master, conf=conf)


def _precheck(args: argparse.Namespace) -> None:
    """Fail fast on bad paths before paying for a JVM start."""
    from .catalog import list_for_ingest
    from .storage import ensure_output_dir

    if args.command in ("ingest", "train"):
        list_for_ingest(args.images, require_labels=True)
    if args.command in ("predict", "evaluate"):
        from .prediction import check_model_dir

        check_model_dir(args.model)
        list_for_ingest(args.images, require_labels=args.command == "evaluate")
    ensure_output_dir(args.out)


def run(args: argparse.Namespace) -> int:
    cfg = _settings(args)
    progress = Progress(quiet=args.quiet)
    _precheck(args)
    if args.command == "ingest":
        from .catalog import ingest
        from .storage import ensure_output_dir

        out = ensure_output_dir(args.out)
        spark = _spark(cfg)
        with progress.stage("ingest") as st:
            res = ingest(spark, args.images, out, test_fraction=cfg.test_fraction, seed=cfg.seed, reuse=False)
            st.note(f"{res.images} images, {res.classes} classes, {res.quarantined} quarantined")
        print(json.dumps({"catalog": res.catalog_path, "images": res.images, "quarantined": res.quarantined,
                          "quarantine_csv": res.quarantine_csv}))
    elif args.command == "train":
        from .metrics import format_summary
        from .training import train

        spark = _spark(cfg)
        res = train(spark, args.images, args.out, cfg, progress)
        print(format_summary(res.metrics))
        print(f"model: {os.path.join(res.out_dir, 'model')}  report: {os.path.join(res.out_dir, 'report.html')}")
    elif args.command == "predict":
        from .prediction import predict

        spark = _spark(cfg)
        res = predict(spark, args.model, args.images, args.out, progress)
        print(f"{res.predicted} predictions -> {os.path.join(res.out_dir, 'predictions.csv')}; "
              f"{res.quarantined} quarantined -> {os.path.join(res.out_dir, 'quarantine.csv')}")
    elif args.command == "evaluate":
        from .metrics import format_summary
        from .prediction import evaluate

        spark = _spark(cfg)
        metrics = evaluate(spark, args.model, args.images, args.out, progress)
        print(format_summary(metrics))
    return 0


def _plain_spark_error(exc: BaseException) -> str | None:
    """A one-line reading of common Spark/Java failures, or None."""
    text = str(exc)
    if "Permission denied" in text or "AccessDeniedException" in text:
        return "permission denied while Spark wrote or read a file: check the --out folder's permissions"
    if "No space left on device" in text:
        return "no space left on device: free disk space or choose another --out"
    if "Could not parse Master URL" in text or "Invalid master URL" in text:
        return "invalid --master URL: use local[*] or spark://HOST:PORT"
    if "JAVA_GATEWAY_EXITED" in text or "Java gateway process exited" in text:
        return "Spark's Java process failed to start: check that Java 17+ is installed and JAVA_HOME is right"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USER_ERROR
    debug = bool(args.debug) or os.environ.get("CANESTRA_DEBUG", "").lower() in ("1", "true", "yes")
    try:
        return run(args)
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
        plain = _plain_spark_error(exc)
        if plain:
            print(f"canestra: error: {plain}", file=sys.stderr)
            return EXIT_USER_ERROR
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        print(f"canestra: error: unexpected failure ({type(exc).__name__}: {first}); "
              "re-run with --debug for the full trace and report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
