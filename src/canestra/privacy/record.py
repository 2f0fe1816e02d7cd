"""GDPR Art. 30: a record of processing activities generated from the real configuration.

``build_record(out_dir, cfg)`` inspects the loaded :class:`~canestra.config.Settings`
and what is on disk under ``out_dir`` (tables and their columns and row counts,
CSVs, models and the images they were trained on, pending retrains after erasures,
the audit log, the age of the oldest output) and returns a JSON-able dict;
``write_record`` writes it as ``_gdpr/record-of-processing.json`` and ``.md``.
Nothing is invented: what the controller must supply (name, contact, legal basis)
is a visible placeholder, and what is not configured (e.g. retention) says so.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import stat
import time
from typing import Any

from canestra import __version__
from canestra.config import Settings
from canestra.layout import CATALOG, EVAL_CATALOG, FEATURES, GDPR_DIR, PREDICTIONS_CSV, STAGING
from canestra.model import read_training_ids
from canestra.privacy import audit, erase
from canestra.privacy import purge as retention
from canestra.storage import files as storage

RECORD_JSON = "record-of-processing.json"
RECORD_MD = "record-of-processing.md"
PLACEHOLDER = "[to be completed by the controller]"

# What each known column holds, in words an auditor reads.
COLUMN_CATEGORIES = {
    "content": "image pixels, metadata-free (EXIF/GPS/XMP/ICC/maker notes/comments stripped at ingest)",
    "image_id": "pseudonymous image id (SHA-256 of the pixels)",
    "source_path": "source file path of the image (may contain personal names): the controller's index",
    "path": "source file path (written because predict ran with --include-paths)",
    "features": "CNN embedding derived from the pixels",
    "label": "fruit class (folder name)",
    "split": "train/test assignment",
    "frame": "frame number parsed from the file name",
    "width": "image width", "height": "image height", "format": "stored image encoding",
    "source_size": "source file size in bytes", "source_mtime": "source file modification time",
    "prediction": "predicted fruit class", "probability": "model confidence", "top5": "five most likely classes",
    "reason": "why a file was rejected",
}


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _tables(root: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    from canestra.pipeline.features import store_of

    out = []
    stores: dict[str, dict[str, Any]] = {}
    for table in erase.find_tables(root):
        parts = erase.parquet_parts(table)
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
        cols = pq.ParquetFile(parts[0]).schema_arrow.names if parts else []
        store = store_of(table)
        if store in stores:  # the feature store is one table, appended to in parts (one per run)
            stores[store]["rows"] += rows
            stores[store]["parts"] += 1
            continue
        entry = {"table": os.path.relpath(store or table, root), "rows": rows, "columns": cols,
                 "categories": [f"{c}: {COLUMN_CATEGORIES.get(c, 'other')}" for c in cols],
                 "holds_source_paths": any(c in erase.PATH_COLUMNS for c in cols)}
        if store:
            stores[store] = entry
            entry["parts"] = 1
        out.append(entry)
    return out


def _csvs(root: str) -> list[dict[str, Any]]:
    out = []
    for dirpath, _, filenames in erase.walk_outputs(root):
        for name in sorted(filenames):
            if not name.endswith(".csv") or STAGING in dirpath.split(os.sep):
                continue
            path = os.path.join(dirpath, name)
            with open(path, newline="", encoding="utf-8") as fh:
                rows = list(csv.reader(fh))
            cols = rows[0] if rows else []
            out.append({"file": os.path.relpath(path, root), "rows": max(0, len(rows) - 1), "columns": cols,
                        "holds_source_paths": any(c in erase.PATH_COLUMNS for c in cols)})
    return out


def _models(root: str) -> list[dict[str, Any]]:
    out = []
    for model in erase.find_models(root):
        ids = read_training_ids(model)
        erased = erase.read_erasures(model).get("erased_since_training", 0)
        out.append({"model": os.path.relpath(model, root),
                    "trained_on_images": None if ids is None else len(ids),
                    "lists_training_ids": ids is not None,
                    "erased_images_since_training": erased,
                    "retrain_needed": bool(erased)})
    return out


def _region(cfg: Settings, remote: bool) -> str | None:
    """The deployment region: a Settings field (CANESTRA_REGION), else, for cloud storage, the AWS default."""
    for name in ("region", "s3_region", "aws_region"):
        value = getattr(cfg, name, None)
        if value:
            return str(value)
    if os.environ.get("CANESTRA_REGION"):
        return os.environ["CANESTRA_REGION"]
    if remote:
        return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    return None


def _location(out_dir: str, cfg: Settings) -> dict[str, Any]:
    from canestra.storage.regions import EU_EEA_REGIONS, is_eu_eea

    remote = "://" in out_dir and not out_dir.startswith("file://")
    region = _region(cfg, remote)
    loc: dict[str, Any] = {"storage": audit.redact_uri(out_dir) if remote else "local filesystem",
                           "region": region or ("unknown" if remote else "n/a (local host)")}
    if region and is_eu_eea(region):
        loc["transfers"] = f"none outside the EU/EEA ({region} is an EU/EEA region)"
    elif region:
        loc["transfers"] = (f"TRANSFER OUTSIDE THE EU/EEA: {region} is not an EU/EEA region; "
                            "document the Chapter V safeguard (adequacy decision or SCCs)")
    elif remote:
        loc["transfers"] = "UNKNOWN: no region configured; use one of " + ", ".join(sorted(EU_EEA_REGIONS))
    else:
        loc["transfers"] = "none: data stays on the host running canestra (record where that host is)"
    return loc


def _retention(root: str, cfg: Settings) -> dict[str, Any]:
    now = time.time()
    ages = [(now - retention.created_at(p, k)) / retention.DAY for p, k in retention.output_units(root)]
    days = getattr(cfg, "retention_days", None)
    info: dict[str, Any] = {
        "period_days": days,
        "oldest_output_days": round(max(ages), 2) if ages else None,
        "outputs": len(ages),
    }
    if days is None:
        info["rule"] = "NOT CONFIGURED: set CANESTRA_RETENTION_DAYS and run `canestra purge` on a schedule"
    else:
        over = sum(a > days for a in ages)
        info["rule"] = f"run outputs older than {days:g} days are removed by `canestra purge --older-than {days:g}`"
        info["outputs_past_retention"] = over
    return info


def _security(root: str, cfg: Settings, tables: list, csvs: list) -> list[str]:
    mode = stat.S_IMODE(os.stat(root).st_mode)
    measures = [
        "data minimisation: EXIF, GPS, XMP, ICC, maker notes, comments and thumbnails are stripped at ingest; "
        "only pixels are stored",
        "pseudonymisation: images are identified by image_id (SHA-256 of the pixels) in features, predictions "
        "and reports; source paths are kept only in the catalog and in quarantine.csv (operator files)",
        "integrity: every table is written to a staging folder and renamed into place (never half-written)",
        f"accountability: every command appends a record to {audit.AUDIT_DIR}/{audit.AUDIT_FILE} "
        "(no image content, paths or credentials)",
        f"access: output folder permissions {mode:04o}"
        + (" (WARNING: readable by all local users; chmod o-rwx)" if mode & stat.S_IROTH else ""),
    ]
    measures += _s3_measures(cfg)
    shared_paths = [t["table"] for t in tables if t["holds_source_paths"] and CATALOG not in t["table"]]
    shared_paths += [c["file"] for c in csvs if c["holds_source_paths"] and "quarantine" not in c["file"]]
    if shared_paths:
        measures.append("WARNING: outputs meant for sharing hold source paths (--include-paths): "
                        + ", ".join(shared_paths))
    return measures


def _s3_measures(cfg: Settings) -> list[str]:
    """Encryption and transfer settings as the S3 code will apply them (s3.S3Options), not as documented."""
    from canestra.storage.s3 import S3Options

    opts = S3Options.from_settings(cfg)
    sse = opts.sse_kwargs()
    at_rest = (f"SSE-KMS (aws:kms) with key {sse['SSEKMSKeyId']}" if sse["ServerSideEncryption"] == "aws:kms"
               else "SSE-S3 (AES256)")
    endpoint = audit.redact_uri(opts.endpoint_url) if opts.endpoint_url else "AWS S3"
    in_transit = ("TLS (https endpoints only)" if not opts.allow_http_endpoint else
                  "WARNING: plain http:// endpoints allowed (--allow-http-endpoint; local emulators only)")
    regions = ("buckets outside the EU/EEA are refused (region asked from S3 with GetBucketLocation)"
               if not opts.allow_non_eu_region else
               "WARNING: buckets outside the EU/EEA accepted (--allow-non-eu-region): document the Chapter V safeguard")
    return [
        f"encryption at rest on S3: every object canestra writes is sent with {at_rest}; local outputs "
        "are not encrypted by canestra: keep them on an encrypted filesystem/volume",
        f"encryption in transit to S3 ({endpoint}): {in_transit}",
        f"S3 region control (Art. 44): {regions}",
        "credentials: from the standard AWS chain (env, profile, instance role); never written to outputs or logs",
    ]


def _feedback(cfg: Settings) -> dict[str, Any] | None:
    """The feedback store of ``serve --feedback-dir`` (docs/feedback.md), when one is configured: counts only."""
    store = getattr(cfg, "feedback_dir", None)
    if not store:
        return None
    from canestra.feedback.store import summary

    return {**summary(store),
            "legal_basis": "consent (Art. 6(1)(a), 7): POST /v1/feedback stores nothing unless consent=true, "
                           "sent after the user was shown the consent text",
            "data_subjects": "users of the app who sent a correction; people who appear in their photos",
            "data": "the photo without metadata (EXIF, GPS, ICC stripped), named by its pixel hash; the label given; "
                    "no user, device, address or file name",
            "erasure": "canestra erase --image-id ID --feedback-dir STORE (also removes the image from the tables, "
                       "the feature store and flags models trained on it)",
            "retention": "canestra purge --older-than DAYS --feedback-dir STORE expires each correction by its age"}


def build_record(out_dir: str, cfg: Settings) -> dict[str, Any]:
    """The record of processing for the runs under ``out_dir`` with settings ``cfg``."""
    root = storage.local_path(out_dir)
    tables, csvs, models = _tables(root), _csvs(root), _models(root)
    names = {os.path.basename(t["table"]) for t in tables}
    purposes = []
    if names & {CATALOG, FEATURES} or models:
        purposes.append("training and evaluating an image classifier for fruit (catalog, features, model)")
    if EVAL_CATALOG in names:
        purposes.append("evaluating the classifier on images never trained on (eval_catalog, by_source in "
                        "metrics.json)")
    if "predictions" in names or any(c["file"].endswith(PREDICTIONS_CSV) for c in csvs):
        purposes.append("classifying images with a trained model (predictions)")
    feedback = _feedback(cfg)
    if feedback:
        purposes.append("improving the classifier with corrections users sent with their consent (feedback store)")
    if not purposes:
        purposes.append("fruit-image classification (no outputs on disk yet)")
    audit_log = os.path.join(root, audit.AUDIT_DIR, audit.AUDIT_FILE)
    records = audit.read_records(audit_log)
    return {
        "title": "Record of processing activities (GDPR Art. 30)",
        "generated_at": _iso(time.time()),
        "generated_by": f"canestra {__version__}",
        "output_folder": root,
        "controller": {"name": getattr(cfg, "controller", None) or PLACEHOLDER,
                       "contact": PLACEHOLDER, "dpo": PLACEHOLDER},
        "legal_basis": PLACEHOLDER,
        "purposes": purposes,
        "data_subjects": [
            "people who appear incidentally in the photographs",
            "owners of the capturing devices and people named in file paths or image metadata "
            "(metadata is removed at ingest; paths stay in the catalog)",
        ],
        "categories_of_data": {"tables": tables, "files": csvs, "models": models},
        "recipients": [
            "operators with access to the output folder (catalog, quarantine.csv: source paths)",
            "users of predictions, features and reports (image_id only, no source paths unless --include-paths)",
            "the storage/compute provider acting as processor, if any (see location)",
        ],
        "location": _location(out_dir, cfg),
        "retention": _retention(root, cfg),
        "security_measures": _security(root, cfg, tables, csvs),
        "erasure": {
            "procedure": "canestra erase --out DIR --image-id ID… | --source PATH… [--delete-source]: removes the "
                         "image's rows from every table and CSV under DIR, image copies and staging leftovers, "
                         "then verifies that nothing mentions it; models trained on it are flagged for retraining",
            "models_needing_retrain": [m["model"] for m in models if m["retrain_needed"]],
        },
        "audit_log": {"path": audit_log, "records": len(records),
                      "last_record": records[-1]["time"] if records else None},
        "feedback": feedback,
    }


def render_markdown(rec: dict[str, Any]) -> str:
    lines = [f"# {rec['title']}", "", f"Generated {rec['generated_at']} by {rec['generated_by']} "
             f"from the configuration and the outputs under `{rec['output_folder']}`.", ""]

    def section(title: str, items) -> None:
        lines.extend([f"## {title}", ""])
        if isinstance(items, dict):
            lines.extend(f"- **{k}**: {v}" for k, v in items.items())
        else:
            lines.extend(f"- {v}" for v in items)
        lines.append("")

    section("Controller", rec["controller"])
    section("Legal basis", [rec["legal_basis"]])
    section("Purposes", rec["purposes"])
    section("Categories of data subjects", rec["data_subjects"])
    lines.extend(["## Categories of personal data", "", "| stored in | rows | columns |", "|---|---|---|"])
    for t in rec["categories_of_data"]["tables"]:
        lines.append(f"| `{t['table']}/` (Parquet) | {t['rows']} | {', '.join(t['columns'])} |")
    for c in rec["categories_of_data"]["files"]:
        lines.append(f"| `{c['file']}` | {c['rows']} | {', '.join(c['columns'])} |")
    for m in rec["categories_of_data"]["models"]:
        lines.append(f"| `{m['model']}/` (model) | trained on {m['trained_on_images']} images | weights only |")
    lines.append("")
    described = sorted({c for t in rec["categories_of_data"]["tables"] for c in t["categories"]})
    if described:
        section("What the columns hold", described)
    section("Categories of recipients", rec["recipients"])
    section("Location and transfers", rec["location"])
    section("Retention", rec["retention"])
    section("Technical and organisational security measures", rec["security_measures"])
    section("Erasure", {"procedure": rec["erasure"]["procedure"],
                        "models needing retrain": ", ".join(rec["erasure"]["models_needing_retrain"]) or "none"})
    section("Audit log", rec["audit_log"])
    if rec.get("feedback"):
        section("Feedback store (corrections sent with consent)", rec["feedback"])
    return "\n".join(lines)


def write_record(out_dir: str, cfg: Settings) -> tuple[str, str, dict[str, Any]]:
    """Write ``_gdpr/record-of-processing.{md,json}`` under ``out_dir``; (md path, json path, record)."""
    from canestra.errors import InputError

    root = storage.local_path(out_dir)
    if not os.path.isdir(root):
        raise InputError(f"output folder {root} does not exist: pass the --out folder of your runs")
    rec = build_record(root, cfg)
    md = os.path.join(root, GDPR_DIR, RECORD_MD)
    js = os.path.join(root, GDPR_DIR, RECORD_JSON)
    storage.write_text_atomic(js, json.dumps(rec, indent=2))
    storage.write_text_atomic(md, render_markdown(rec))
    return md, js, rec
