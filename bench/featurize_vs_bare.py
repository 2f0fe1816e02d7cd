"""Spark featurization vs a bare ONNX Runtime loop: same images, same cores, one run.

(A) bare: one process reads each file, decodes it (canestra.vision.images.decode_rgb),
    resizes it (canestra.vision.backbone.resize_rgb) and runs the same ONNX model file in
    batches with the best intra-op thread count (probed: 1..cores).
(B) canestra: ``featurize_table`` on Spark ``local[*]`` -- the catalog table
    (written once by ``canestra ingest``, untimed) through the ImageFeaturizer stage
    into a Parquet features table, exactly what ``canestra train`` runs.

A and B alternate (A B, B A, A B, ...) ``--repeats`` times; the ratio is the median of
per-round img/s(B) / img/s(A). Target: >= 0.90.

    python bench/featurize_vs_bare.py [--images DIR] [--limit N] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import benchlib


def bare_loop(paths: list[str], sizes: tuple[int, ...], batch: int, threads: int, model_path: str) -> int:
    from canestra.vision import backbone
    from canestra.vision.images import BadImage, decode_rgb

    n = 0
    pending = []
    for p in paths:
        with open(p, "rb") as fh:
            data = fh.read()
        try:
            pending.append(decode_rgb(data))
        except BadImage:
            continue
        if len(pending) == batch:
            backbone.embed(pending, sizes, model_path, threads)
            n += len(pending)
            pending = []
    if pending:
        backbone.embed(pending, sizes, model_path, threads)
        n += len(pending)
    return n


def best_threads(paths: list[str], sizes, batch: int, model_path: str) -> tuple[int, dict]:
    """Probe ORT intra-op threads 1..cores on a few batches; keep the fastest."""
    probe = paths[: batch * 4]
    rates = {}
    for t in range(1, (os.cpu_count() or 1) + 1):
        bare_loop(probe[:batch], sizes, batch, t, model_path)  # session creation + warm-up
        with benchlib.Timer() as tm:
            n = bare_loop(probe, sizes, batch, t, model_path)
        rates[t] = n / tm.seconds
    return max(rates, key=rates.get), {str(k): round(v, 1) for k, v in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default=benchlib.default_images(), help="<Class>/<file> tree (default: shared 13,680 sample)")
    ap.add_argument("--limit", type=int, help="use only N images (spread over the classes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image-size", help="as canestra train --image-size (default: canestra's default)")
    ap.add_argument("--batch-size", type=int, help="images per ONNX Runtime call (default: canestra's)")
    ap.add_argument("--threads", type=int, help="ORT threads per Spark task (default: canestra's)")
    ap.add_argument("--workdir", help="keep tables here (default: a temp dir, removed)")
    ap.add_argument("--json", action="store_true", help="also print one JSON line of results")
    args = ap.parse_args()
    benchlib.setup_env()

    from canestra.config import Settings
    from canestra.pipeline.ingest import ingest
    from canestra.pipeline.train import featurize_table, make_featurizer
    from canestra.sparkctx import get_spark
    from canestra.vision import backbone

    cfg = Settings.load(image_sizes=args.image_size, batch_size=args.batch_size, threads=args.threads)
    sizes = tuple(cfg.image_sizes)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="canestra-bench-"))
    files = benchlib.list_subset(args.images, args.limit)
    images = benchlib.link_subset(files, work / "images") if args.limit else args.images
    paths = [f.path for f in files]
    model_path = backbone.default_model_path()

    threads_a, probe = best_threads(paths, sizes, cfg.batch_size, model_path)
    with benchlib.Timer() as t_start:
        spark = get_spark("local[*]", app_name="bench-featurize",
                          conf={"spark.sql.execution.arrow.maxRecordsPerBatch": str(cfg.arrow_batch)})
    with benchlib.Timer() as t_ingest:
        cat = ingest(spark, images, str(work), reuse=True)
    featurizer = make_featurizer(cfg)
    # Warm B the way A was warmed (Python workers started, ORT session loaded): one untimed pass.
    featurize_table(spark, cat.catalog_path, str(work / "features"), featurizer)

    rounds = []
    for r in range(args.repeats):
        order = "AB" if r % 2 == 0 else "BA"
        res = {}
        for which in order:
            if which == "A":
                with benchlib.Timer() as tm:
                    n = bare_loop(paths, sizes, cfg.batch_size, threads_a, model_path)
            else:
                with benchlib.Timer() as tm:
                    featurize_table(spark, cat.catalog_path, str(work / "features"), featurizer)
                n = cat.images
            res[which] = n / tm.seconds
        rounds.append({"round": r + 1, "order": order, "bare_img_s": round(res["A"], 1),
                       "spark_img_s": round(res["B"], 1), "ratio": round(res["B"] / res["A"], 3)})
        print(f"round {r + 1} ({order}): bare {res['A']:.1f} img/s   spark {res['B']:.1f} img/s   "
              f"ratio {res['B'] / res['A']:.3f}", flush=True)
    spark.stop()

    ratio = benchlib.median([x["ratio"] for x in rounds])
    result = {
        "images": cat.images,
        "image_sizes": list(sizes),
        "batch_size": cfg.batch_size,
        "arrow_batch": cfg.arrow_batch,
        "spark_tasks": os.cpu_count(),
        "spark_threads_per_task": cfg.threads,
        "bare_threads": threads_a,
        "bare_thread_probe_img_s": probe,
        "spark_start_s": round(t_start.seconds, 1),
        "ingest_s": round(t_ingest.seconds, 1),
        "rounds": rounds,
        "bare_img_s_median": benchlib.median([x["bare_img_s"] for x in rounds]),
        "spark_img_s_median": benchlib.median([x["spark_img_s"] for x in rounds]),
        "ratio_median": round(ratio, 3),
        "target": ">= 0.90",
    }
    print()
    print(benchlib.table([[x["round"], x["order"], x["bare_img_s"], x["spark_img_s"], x["ratio"]] for x in rounds],
                         ["round", "order", "bare img/s", "spark img/s", "ratio B/A"]))
    print(f"\n{cat.images} images at {'+'.join(map(str, sizes))} px; bare: {threads_a} ORT threads "
          f"(probe {probe}); spark: local[*] = {os.cpu_count()} tasks x {cfg.threads} thread(s)")
    print(f"median ratio B/A = {ratio:.3f}  (target >= 0.90)")
    benchlib.record("featurize_vs_bare", result, args.json)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
