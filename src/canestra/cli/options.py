"""Building blocks of ``canestra``'s argument parsers: shared parent parsers for the flags
several commands take, and a help formatter that shows each flag's ``CANESTRA_*``
environment variable, read from :class:`canestra.config.Settings` (so help and
configuration cannot drift apart)."""

from __future__ import annotations

import argparse
import dataclasses

from canestra.config import Settings

ENV_PREFIX = Settings._ENV_PREFIX
SETTINGS_FIELDS = frozenset(f.name for f in dataclasses.fields(Settings))


def env_var(dest: str) -> str | None:
    """``CANESTRA_<DEST>`` when the flag's destination is a Settings field, else None."""
    return ENV_PREFIX + dest.upper() if dest in SETTINGS_FIELDS else None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's example as written and adds ``[env CANESTRA_X]`` to Settings-backed flags."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=110)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        var = env_var(action.dest) if action.option_strings else None
        if var and text is not argparse.SUPPRESS and var not in text:
            text = f"{text} [env {var}]"
        return text


def example(*lines: str) -> str:
    """An epilog: the example command lines, indented, as the help shows them."""
    return "example:\n" + "\n".join(f"  {ln}" for ln in lines)


def hidden_alias(p: argparse.ArgumentParser | argparse._ArgumentGroup, old: str, dest: str, **kw) -> None:
    """Keep an old spelling working without showing it in --help."""
    p.add_argument(old, dest=dest, help=argparse.SUPPRESS, **kw)


def _parent(*adders) -> argparse.ArgumentParser:
    """A parent parser (no -h of its own) with the given flag-adding functions applied."""
    p = argparse.ArgumentParser(add_help=False)
    for add in adders:
        add(p)
    return p


AUDIT_GROUP = "audit (GDPR Art. 30)"
S3_GROUP = "S3 (--images/--out s3://bucket/prefix)"
SPARK_GROUP = "Spark"
_SHARED_LAST = (SPARK_GROUP, S3_GROUP, AUDIT_GROUP)


def _add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", default=None, help="show full tracebacks on errors")


def _add_audit(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(AUDIT_GROUP)
    g.add_argument("--audit-log", metavar="FILE",
                   help="also append this command's audit record to this JSON Lines file "
                        "(OUT/_audit/audit.jsonl is always written)")


def _add_storage(p: argparse.ArgumentParser) -> None:
    """S3 for --images/--out (docs/storage.md)."""
    g = p.add_argument_group(S3_GROUP)
    g.add_argument("--s3-endpoint-url", metavar="URL", help="S3 endpoint (default: AWS_ENDPOINT_URL_S3 or AWS's own)")
    g.add_argument("--sse-kms-key-id", metavar="KEY_ID",
                   help="encrypt objects canestra writes with this KMS key (default SSE-S3, AES256)")
    g.add_argument("--allow-non-eu-region", action="store_true", default=None,
                   help="accept buckets outside the EU/EEA (GDPR Art. 44: only with a transfer safeguard)")
    g.add_argument("--allow-http-endpoint", action="store_true", default=None,
                   help="accept a plain http:// endpoint on 127.0.0.1 (local S3 emulators only)")


def debug_parent() -> argparse.ArgumentParser:
    return _parent(_add_debug)


def audit_parent() -> argparse.ArgumentParser:
    return _parent(_add_audit)


def storage_parent() -> argparse.ArgumentParser:
    return _parent(_add_storage)


def spark_parent() -> argparse.ArgumentParser:
    """What every Spark command takes: the master, progress, --debug, S3 and audit options."""
    p = _parent()
    _add_debug(p)
    g = p.add_argument_group(SPARK_GROUP)
    g.add_argument("--master", metavar="URL", help="Spark master URL (default local[*]; e.g. spark://127.0.0.1:7077)")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    _add_storage(p)
    _add_audit(p)
    return p


def shared_groups_last(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Show a command's own groups first, then Spark, S3 and audit (argparse lists parents' groups first)."""
    p._action_groups.sort(key=lambda g: _SHARED_LAST.index(g.title) + 1 if g.title in _SHARED_LAST else 0)
    return p


def labelled_input_parent() -> argparse.ArgumentParser:
    """ingest and train: labelled image roots, the output folder and the held-out split."""
    p = _parent()
    g = p.add_argument_group("input and output")
    g.add_argument("--images", required=True, action="append", metavar="DIR",
                   help="root folder of <Class>/<image> files; repeat it for several roots. A root whose folders "
                        "are all family names (Apple/, Banana/) teaches the family-level answer")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (catalog/, quarantine.csv; train adds model/, metrics.json, report.html)")
    s = p.add_argument_group("held-out split")
    s.add_argument("--test-fraction", type=float, metavar="SHARE",
                   help="share of frame blocks per class held out (default 0.2)")
    s.add_argument("--seed", type=int, metavar="N", help="split seed (default 42)")
    return p


def model_input_parent(out_help: str, *, out_required: bool = True, out_default: str | None = None,
                       images_help: str = "folder of images (class sub-folders optional)") -> argparse.ArgumentParser:
    """predict, evaluate and watch: a trained model, images and an output folder."""
    p = _parent()
    g = p.add_argument_group("input and output")
    g.add_argument("--model", required=True, metavar="DIR", help="the model/ folder written by `canestra train`")
    g.add_argument("--images", required=True, metavar="DIR", help=images_help)
    g.add_argument("--out", required=out_required, default=out_default, metavar="DIR", help=out_help)
    return p


def include_paths_parent() -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--include-paths", action="store_true",
                   help="add the source file path to predictions (default: pseudonymous image_id only, GDPR Art. 25)")
    return p


def features_parent() -> argparse.ArgumentParser:
    """The CNN featurizer's knobs (train)."""
    p = _parent()
    g = p.add_argument_group("CNN features")
    g.add_argument("--image-size", dest="image_sizes", metavar="PX[,PX]",
                   help="CNN input size(s) in px: 224 (default), 160, 100 (native, fastest) or several, concatenated (160,224)")
    g.add_argument("--batch-size", type=int, metavar="N", help="images per ONNX Runtime call (default 64)")
    g.add_argument("--task-threads", type=int, dest="threads", metavar="N",
                   help="ONNX Runtime threads per Spark task (default 1)")
    hidden_alias(g, "--threads", "threads", type=int)  # the spelling before 0.2: serve's --threads differs
    g.add_argument("--arrow-batch", type=int, metavar="ROWS",
                   help="max rows per Arrow batch into the featurizer (default 256)")
    g.add_argument("--precision", choices=["auto", "fp32", "int8"],
                   help="CNN arithmetic: auto (default; int8 on CPUs with VNNI, ~2x faster, else fp32), fp32 or int8 "
                        "(docs/performance.md)")
    return p


def output_parent(help_text: str) -> argparse.ArgumentParser:
    """erase, purge and gdpr record: the output folder they work on."""
    p = _parent()
    p.add_argument("--out", required=True, metavar="DIR", help=help_text)
    return p
