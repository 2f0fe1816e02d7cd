"""What does PCA cost? Same logistic regression with and without PCA on a trained run's tables.

Reads ``OUT/features`` (written by ``canestra train --out OUT``), fits the classifier of
``canestra train`` on the train split directly on the full embedding (no PCA), scores the
held-out split, and compares with ``OUT/metrics.json`` (the PCA model).

    python bench/pca_cost.py --out runs/full [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import benchlib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="the --out folder of a canestra train run")
    ap.add_argument("--max-iter", type=int, help="classifier iterations (default: as in the run)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    benchlib.setup_env()

    from pyspark.ml.feature import StringIndexer

    from canestra.config import Settings
    from canestra.pipeline.train import make_classifier
    from canestra.sparkctx import get_spark

    metrics = json.load(open(os.path.join(args.out, "metrics.json")))
    cfg = Settings.load(reg_param=metrics["model"]["reg_param"], max_iter=args.max_iter or metrics["model"]["max_iter"])
    spark = get_spark("local[*]")
    feats = spark.read.parquet(os.path.join(args.out, "features")).where("features IS NOT NULL")
    train = feats.where("split = 'train'")
    test = feats.where("split = 'test'")
    indexer = StringIndexer(inputCol="label", outputCol="label_index", stringOrderType="alphabetAsc").fit(train)
    t = time.perf_counter()
    fit_df = indexer.transform(train).select("features", "label_index").localCheckpoint(eager=True)
    model = make_classifier(cfg, "features").fit(fit_df)
    scored = model.transform(indexer.transform(test))
    acc = scored.where("prediction = label_index").count() / scored.count()
    result = {
        "run": os.path.abspath(args.out),
        "image_sizes": metrics["model"]["image_sizes"],
        "test_images": scored.count(),
        "top1_with_pca": round(metrics["accuracy"] * 100, 2),
        "pca_k": metrics["pca"]["k"],
        "top1_without_pca": round(acc * 100, 2),
        "pca_cost_points": round((acc - metrics["accuracy"]) * 100, 2),
        "max_iter_without_pca": cfg.max_iter,
        "fit_seconds_without_pca": round(time.perf_counter() - t, 1),
    }
    print(f"top-1 with PCA-{result['pca_k']}: {result['top1_with_pca']}%   without PCA: "
          f"{result['top1_without_pca']}%   PCA costs {result['pca_cost_points']} points")
    spark.stop()
    benchlib.record("pca_cost", result, args.json)


if __name__ == "__main__":
    main()
