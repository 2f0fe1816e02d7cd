"""The command line of learning from the field (docs/feedback.md): ``canestra promote``, ``serve
--feedback-dir/--model-poll``, and ``--feedback-dir`` on erase, purge and gdpr record. Through ``api.py``."""

from __future__ import annotations

import argparse
import collections
import os

from canestra import api
from canestra.cli import options as opt
from canestra.config import Settings
from canestra.privacy import audit

__all__ = ["add_promote_parser", "add_serve_arguments", "add_store_argument", "erase_feedback", "purge_feedback",
           "run_promote"]

STORE_HELP = "the feedback store serve --feedback-dir writes to (a folder or s3:// prefix)"


def add_store_argument(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """erase, purge, gdpr record: the feedback store they cover too."""
    p.add_argument("--feedback-dir", metavar="DIR|URI", help=f"also cover {STORE_HELP}")
    return p


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("learning from the field (docs/feedback.md)")
    g.add_argument("--feedback-dir", metavar="DIR|URI",
                   help="accept corrections sent with the user's consent (POST /v1/feedback; needs --api-keys-file) "
                        "into this feedback store: a folder or s3:// prefix, made when new")
    g.add_argument("--model-poll", type=float, metavar="SECONDS",
                   help="when --model is a pointer written by canestra promote or models:/NAME@ALIAS: how often to "
                        "look for a promoted model, swapped in without failing a request (default 10; 0 = on "
                        "SIGHUP only)")


class _PromoteTo(argparse.Action):
    """``--to``: a pointer's folder is where the command's audit record goes too (an alias: the user's log)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        if isinstance(values, str) and ":/" not in values:
            namespace.out = os.path.dirname(os.path.abspath(os.path.expanduser(values)))


def add_promote_parser(sub, debug: argparse.ArgumentParser, audit_log: argparse.ArgumentParser) -> None:
    text = "compare a candidate model with the current one on fixed photo sets and promote it only if it is better"
    p = sub.add_parser("promote", help=text, description=text[0].upper() + text[1:] + ".",
                       parents=[debug, audit_log], formatter_class=opt.HelpFormatter, epilog=opt.example(
                           "canestra promote --candidate runs/fruit/model --to models/current --eval-images "
                           "photos/apple-val --eval-images photos/studio-holdout --unknown-images photos/not-fruit",
                           "canestra promote --candidate models:/fruit/7 --to models:/fruit@champion "
                           "--eval-images photos/val --tolerance 0.02"))
    p.set_defaults(out=None)
    g = p.add_argument_group("models")
    g.add_argument("--candidate", required=True, metavar="DIR|URI",
                   help="the model to promote: a model/ folder written by canestra train, or models:/NAME/VERSION")
    g.add_argument("--to", required=True, action=_PromoteTo, metavar="FILE|URI",
                   help="a pointer file that canestra serve --model FILE follows (the model is copied beside it; "
                        "made on the first promotion), or models:/NAME@ALIAS")
    g.add_argument("--current", metavar="DIR|FILE|URI",
                   help="the model to compare with (default: the one --to names now; none on a first promotion)")
    g.add_argument("--mlflow", metavar="URI",
                   help="MLflow registry for models:/ (default MLFLOW_TRACKING_URI, else ./mlruns)")
    g = p.add_argument_group("the gate")
    g.add_argument("--eval-images", action="append", required=True, metavar="DIR",
                   help="labelled photos neither model trained on (<Family or Class>/<image>), scored by both; repeat "
                        "it for several sets (a real-photo validation set, a studio hold-out, …)")
    g.add_argument("--unknown-images", action="append", metavar="DIR",
                   help="photos of no fruit, where the share answered 'unknown' is compared; repeat it for several")
    g.add_argument("--target", metavar="DIR", help="the set that must improve (default: the first --eval-images)")
    g.add_argument("--tolerance", type=float, default=0.01, metavar="SHARE",
                   help="how much worse any other set may get (default 0.01, one point)")
    g.add_argument("--min-gain", type=float, default=0.0, metavar="SHARE",
                   help="how much the target set must improve, more than this (default 0: any gain)")
    g.add_argument("--report-dir", metavar="DIR",
                   help="where the side-by-side report goes (default: promotions/ beside the pointer; "
                        "./canestra-promotions for an alias)")
    g.add_argument("--taxonomy", metavar="FILE.csv",
                   help="class -> family table the models were trained with, if not the shipped one")
    opt.shared_groups_last(p)


def run_promote(args: argparse.Namespace, cfg: Settings) -> int:
    res = api.promote(args.candidate, args.to, args.eval_images, current=args.current,
                      unknown_images=args.unknown_images, target=args.target, tolerance=args.tolerance,
                      min_gain=args.min_gain, report_dir=args.report_dir, registry=args.mlflow, settings=cfg)
    print(res.table())
    print(f"report: {res.report_md}")
    if res.promoted:
        print(f"promoted {res.candidate_version[:12]} to {res.to}: {res.reason}")
    res.raise_if_refused()  # exit 3 with the reason: the pointer or alias was left as it was
    return 0


def erase_feedback(args: argparse.Namespace, cfg: Settings) -> None:
    """erase: every stored copy of the ids in the feedback store too (after --out's erasure)."""
    if not cfg.feedback_dir or not args.image_id:
        return
    removed = api.erase_feedback(cfg.feedback_dir, args.image_id)
    audit.note(feedback_deleted=len(removed))
    print(f"removed {len(removed)} correction(s) from the feedback store {cfg.feedback_dir}")


def purge_feedback(args: argparse.Namespace, cfg: Settings) -> None:
    """purge: corrections stored longer than the retention period (each dated by its own write)."""
    if not cfg.feedback_dir:
        return
    expired = api.purge_feedback(cfg.feedback_dir, cfg.retention_days, dry_run=args.dry_run)
    audit.note(feedback_removed=len(expired))
    verb = "would remove" if args.dry_run else "removed"
    by_label = collections.Counter(f"{e.level}/{e.label}" for e, _ in expired)  # labels only: no image id
    detail = ", ".join(f"{k}: {n}" for k, n in sorted(by_label.items()))
    print(f"{verb} {len(expired)} correction(s) older than {cfg.retention_days:g} days from the feedback store "
          f"{cfg.feedback_dir}" + (f" ({detail})" if detail else ""))
