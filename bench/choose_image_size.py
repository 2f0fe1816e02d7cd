"""Choose the default CNN input size: accuracy (validation) and speed, measured.

For each candidate (100 px native, 160 and 224 upscaled, 100+224 concatenated):
  * speed: canestra's Spark featurizer (local[*]) on a class-balanced subset, img/s;
  * accuracy: Spark PCA(k) + the same logistic regression as `canestra train`, fitted on
    the *fit* part of the training split and scored on a *validation* split carved from the
    training split the same way (contiguous frame blocks, other seed). The test split of
    `canestra train` (seed 42, 20 %) is never looked at while choosing.
Then, for the chosen default only, the test accuracy with and without PCA.

Rule: the highest validation accuracy with PCA; any option within 0.1 points of it that is
faster wins (speed is a feature).

    python bench/choose_image_size.py [--images DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import benchlib
import numpy as np

ROOT = benchlib.ROOT
DEFAULT_IMAGES = benchlib.default_images()
CANDIDATES = ["100", "160", "224", "100+224"]


def load_images(root: Path):
    from canestra.storage.files import list_images
    from canestra.vision.images import decode_rgb

    files = [f for f in list_images(str(root)) if f.label]
    images = [decode_rgb(Path(f.path).read_bytes()) for f in files]
    return files, images


def bare_features(images, size: int, cache: Path) -> np.ndarray:
    from canestra.vision import backbone

    path = cache / f"features-{size}-{len(images)}.npy"
    if path.exists():
        return np.load(path)
    feats = np.concatenate([backbone.embed(images[i : i + 64], (size,), threads=2)
                            for i in range(0, len(images), 64)])
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, feats)
    return feats


def spark_speed(spark, files, sizes: tuple[int, ...], per_class: int = 10) -> float:
    """Spark featurizer img/s on a class-balanced subset (read bytes -> vectors written)."""
    import pandas as pd

    from canestra.featurizer import ImageFeaturizer

    seen: dict[str, int] = {}
    subset = []
    for f in files:
        if seen.get(f.label, 0) < per_class:
            seen[f.label] = seen.get(f.label, 0) + 1
            subset.append(f)
    pdf = pd.DataFrame({"content": [Path(f.path).read_bytes() for f in subset]})
    df = spark.createDataFrame(pdf).repartition(spark.sparkContext.defaultParallelism).cache()
    df.count()
    feat = ImageFeaturizer(imageSizes=list(sizes))
    feat.transform(df.limit(8)).count()  # warm the Python workers and ONNX sessions
    t = time.perf_counter()
    n = feat.transform(df).where("features IS NOT NULL").count()
    rate = n / (time.perf_counter() - t)
    df.unpersist()
    return rate


def accuracy(spark, X: np.ndarray, labels, fit_idx, eval_idx, pca_k: int | None, cfg) -> float:
    import pandas as pd
    from pyspark.ml.feature import PCA, StringIndexer
    from pyspark.ml.functions import array_to_vector

    from canestra.pipeline.train import make_classifier

    def frame(idx):
        pdf = pd.DataFrame({"label": [labels[i] for i in idx], "f": list(X[idx].astype(np.float64))})
        return spark.createDataFrame(pdf).select("label", array_to_vector("f").alias("features"))

    fit_df, eval_df = frame(fit_idx), frame(eval_idx)
    indexer = StringIndexer(inputCol="label", outputCol="label_index").fit(fit_df)
    fit_df, eval_df = indexer.transform(fit_df).cache(), indexer.transform(eval_df).cache()
    col = "features"
    if pca_k:
        pca = PCA(k=pca_k, inputCol="features", outputCol="pca").fit(fit_df)
        fit_df, eval_df, col = pca.transform(fit_df), pca.transform(eval_df), "pca"
    fit_df = fit_df.select(col, "label_index").localCheckpoint(eager=True)
    model = make_classifier(cfg, col).fit(fit_df)
    scored = model.transform(eval_df)
    return scored.where("prediction = label_index").count() / scored.count()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default=str(DEFAULT_IMAGES))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/canestra/bench"))
    args = ap.parse_args()
    benchlib.setup_env()

    from canestra.config import Settings
    from canestra.pipeline.split import assign_splits
    from canestra.sparkctx import get_spark

    cfg = Settings.load()
    files, images = load_images(Path(args.images))
    labels = [f.label for f in files]
    names = [os.path.basename(f.path) for f in files]
    split = np.array(assign_splits(labels, names, cfg.test_fraction, cfg.seed))
    train_idx = np.where(split == "train")[0]
    test_idx = np.where(split == "test")[0]
    inner = np.array(assign_splits([labels[i] for i in train_idx], [names[i] for i in train_idx], 0.2, 7))
    fit_idx, val_idx = train_idx[inner == "train"], train_idx[inner == "test"]

    feats = {s: bare_features(images, s, Path(args.cache)) for s in (100, 160, 224)}
    spark = get_spark("local[*]", conf={"spark.sql.execution.arrow.maxRecordsPerBatch": str(cfg.arrow_batch)})
    rows = []
    for cand in CANDIDATES:
        sizes = tuple(int(s) for s in cand.split("+"))
        X = np.hstack([feats[s] for s in sizes])
        speed = spark_speed(spark, files, sizes)
        val_pca = accuracy(spark, X, labels, fit_idx, val_idx, cfg.pca_k, cfg)
        val_raw = accuracy(spark, X, labels, fit_idx, val_idx, None, cfg)
        rows.append({"option": cand, "dim": X.shape[1], "spark_img_s": round(speed, 1),
                     "val_top1_pca": round(val_pca * 100, 2), "val_top1_no_pca": round(val_raw * 100, 2)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    best = max(r["val_top1_pca"] for r in rows)
    chosen = max((r for r in rows if r["val_top1_pca"] >= best - 0.1), key=lambda r: r["spark_img_s"])
    sizes = tuple(int(s) for s in chosen["option"].split("+"))
    X = np.hstack([feats[s] for s in sizes])
    test_pca = accuracy(spark, X, labels, train_idx, test_idx, cfg.pca_k, cfg) * 100
    test_raw = accuracy(spark, X, labels, train_idx, test_idx, None, cfg) * 100
    result = {"images": len(files), "fit": len(fit_idx), "val": len(val_idx),
              "test": len(test_idx), "pca_k": cfg.pca_k, "rows": rows, "chosen": chosen["option"],
              "test_top1_pca": round(test_pca, 2), "test_top1_no_pca": round(test_raw, 2),
              "pca_cost_points": round(test_raw - test_pca, 2)}
    print(f"{'option':<9}{'dim':>6}{'Spark img/s':>13}{'val top-1 PCA':>15}{'val top-1 no PCA':>18}")
    for r in rows:
        print(f"{r['option']:<9}{r['dim']:>6}{r['spark_img_s']:>13}{r['val_top1_pca']:>15}{r['val_top1_no_pca']:>18}")
    print(f"chosen: {chosen['option']} px; test top-1 {test_pca:.2f}% with PCA-{cfg.pca_k}, "
          f"{test_raw:.2f}% without (PCA costs {test_raw - test_pca:.2f} points)")
    benchlib.record("choose_image_size", result, args.json)


if __name__ == "__main__":
    main()
