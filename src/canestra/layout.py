"""Names of the files and folders in canestra's output folders: one place, so every writer,
reader, eraser and purger agree on them (a renamed file would otherwise escape erasure).

A run folder (``canestra train|predict|ingest --out OUT``)::

    OUT/catalog/          ingest's image table (Parquet)
    OUT/features/         CNN features of the catalogued images (Parquet)
    OUT/model/            the fitted Spark ML pipeline, with canestra_model.json (format),
                          canestra_training_ids.txt and canestra_erasures.json (for erase)
    OUT/metrics.json      evaluation figures; OUT/report.html is rendered from it
    OUT/gallery/          thumbnails of the worst errors, shown by report.html
    OUT/quarantine.csv    files refused, each with a plain reason
    OUT/eval_catalog/     train --eval-images: the evaluation roots' image table (never trained on)
    OUT/eval_quarantine.csv  files of the evaluation roots refused, each with a plain reason
    OUT/predictions.csv   predict's answers
    OUT/_audit/audit.jsonl  append-only GDPR audit log
    OUT/_gdpr/            records of processing
    OUT/_logs/spark.log   Spark/JVM output
    OUT/_staging/         tables being written (published by rename)
"""

from __future__ import annotations

CATALOG = "catalog"
FEATURES = "features"
MODEL = "model"
METRICS_JSON = "metrics.json"
REPORT_HTML = "report.html"
GALLERY = "gallery"
QUARANTINE_CSV = "quarantine.csv"
EVAL_CATALOG = "eval_catalog"  # train --eval-images: roots scored by the model, never trained on
EVAL_QUARANTINE_CSV = "eval_quarantine.csv"
PREDICTIONS_CSV = "predictions.csv"
MANIFEST = "_canestra.json"  # beside a published table: what it holds and how it was made
ERASURES = "canestra_erasures.json"  # inside a model folder: erasures since it was trained (no ids)
TRAINING_IDS = "canestra_training_ids.txt"  # inside a model folder: the image ids it was fitted on
MODEL_INFO = "canestra_model.json"  # inside a model folder: canestra version and format of the model

AUDIT_DIR = "_audit"
AUDIT_FILE = "audit.jsonl"
GDPR_DIR = "_gdpr"
LOGS_DIR = "_logs"
SPARK_LOG = "spark.log"
STAGING = "_staging"

# Governance records: they hold no image ids or paths, and retention never deletes them.
GOVERNANCE_DIRS = frozenset({AUDIT_DIR, GDPR_DIR})
