"""Spark featurization as ``canestra train`` runs it vs a bare ONNX Runtime loop: same images, same cores, one run.

(A) bare: one process reads each file, decodes it (canestra.vision.images.decode_rgb),
    resizes it (canestra.vision.backbone.resize_rgb) and runs the same ONNX model file in
    batches with the best intra-op thread count (probed: 1..cores).
(B) train, fresh: ``canestra.train`` (the public API, on the bench's Spark session) into a new
    output folder, timed by train's own ``featurize`` stage (``TrainRun.timings["featurize"]``):
    the feature store's pass over the stored ids, the CNN on every image (the store is empty),
    the new part's write, the join of the store's vectors with the catalog's labels into
    ``features/``, the augmented-views step. Ingest, fit and evaluate run too, untimed, with a
    cheap model (PCA 16, 10 iterations, no shift evaluation: none of it changes the featurize step).
(C) train, re-run: ``canestra.train`` again into B's folder: every vector is reused from the store.
(D) with ``--featurize-table``: ``pipeline.train.featurize_table`` on B's catalog, the featurizer
    alone into a Parquet table: what this bench timed before the feature store (no caller in src/).

The passes alternate (A B C [D], then [D] B C A, ...) ``--repeats`` times after one untimed
warm-up of each side; the ratio is the median of per-round img/s(B) / img/s(A). Target: >= 0.90.

    python bench/featurize_vs_bare.py [--images DIR] [--limit N] [--repeats 3] [--bare-threads N]
                                      [--featurize-table] [--json]
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


# Settings of the untimed steps (fit, evaluate): cheap, and none of them touches the featurize step.
CHEAP_MODEL = {"pca_k": 16, "max_iter": 10, "shift_eval": False}


def train_featurize(spark, images: str, out_dir: str, featurizer_opts: dict) -> tuple[dict, dict]:
    """``canestra train`` into ``out_dir``: (its stages' seconds, e.g. ``["featurize"]``; the images it
    took and its feature-store counts). A new ``out_dir`` has an empty feature store: every image is embedded."""
    import canestra

    run = canestra.train(images, out_dir, spark=spark, quiet=True, mlflow=False, **featurizer_opts, **CHEAP_MODEL)
    return run.timings, {"images": run.metrics["counts"]["images"], **run.metrics["feature_store"]}


def cpu_flags() -> str:
    """The CPU features that decide ONNX Runtime's kernels here."""
    from canestra.vision import backbone

    flags = backbone.cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16")
    return " ".join(f for f in wanted if f in flags) or "no AVX2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default=benchlib.default_images(), help="<Class>/<file> tree (default: shared 13,680 sample)")
    ap.add_argument("--limit", type=int, help="use only N images (spread over the classes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image-size", help="as canestra train --image-size (default: canestra's default)")
    ap.add_argument("--batch-size", type=int, help="images per ONNX Runtime call (default: canestra's)")
    ap.add_argument("--threads", type=int, help="ORT threads per Spark task (default: canestra's)")
    ap.add_argument("--bare-threads", type=int,
                    help="ORT threads of the bare loop (default: probed 1..cores; a busy machine can mislead the probe)")
    ap.add_argument("--featurize-table", action="store_true",
                    help="also time featurize_table (the featurizer alone, what this bench timed before)")
    ap.add_argument("--workdir", help="keep outputs here (default: a temp dir, removed)")
    ap.add_argument("--json", action="store_true", help="also print one JSON line of results")
    args = ap.parse_args()
    benchlib.setup_env()

    from canestra.config import Settings
    from canestra.layout import CATALOG
    from canestra.pipeline.train import featurize_table, make_featurizer
    from canestra.sparkctx import get_spark
    from canestra.vision import backbone

    opts = {k: v for k, v in (("image_sizes", args.image_size), ("batch_size", args.batch_size),
                              ("threads", args.threads)) if v is not None}
    cfg = Settings.load(**opts)
    sizes = tuple(cfg.image_sizes)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="canestra-bench-"))
    files = benchlib.list_subset(args.images, args.limit)
    images = benchlib.link_subset(files, work / "images") if args.limit else args.images
    paths = [f.path for f in files]
    model_path = backbone.default_model_path()

    if args.bare_threads:
        threads_a, probe = args.bare_threads, {}
        bare_loop(paths[:cfg.batch_size], sizes, cfg.batch_size, threads_a, model_path)  # session + warm-up
    else:
        threads_a, probe = best_threads(paths, sizes, cfg.batch_size, model_path)
    with benchlib.Timer() as t_start:
        # the session canestra.api starts for train (api.spark_session), on the same cores
        spark = get_spark("local[*]", app_name="bench-featurize", driver_memory=cfg.driver_memory,
                          conf={"spark.sql.execution.arrow.maxRecordsPerBatch": str(cfg.arrow_batch)})
    # Warm B the way A was warmed (Python workers started, ORT session loaded): one untimed train.
    # Its catalog (the same images) is what D reads.
    with benchlib.Timer() as t_warm:
        train_featurize(spark, images, str(work / "warm"), opts)
    catalog = str(work / "warm" / CATALOG)
    featurizer = make_featurizer(cfg)

    passes = "ABC" + ("D" if args.featurize_table else "")
    rounds = []
    n = 0
    for r in range(args.repeats):
        # B must precede C (C re-runs into B's folder); A and D swap ends every other round.
        order = passes if r % 2 == 0 else passes[3:] + "BC" + "A"
        out_dir = work / f"train-{r + 1}"  # a fresh output folder: empty feature store
        res, secs, counts = {}, {}, {}
        for which in order:
            if which == "A":
                with benchlib.Timer() as tm:
                    n_bare = bare_loop(paths, sizes, cfg.batch_size, threads_a, model_path)
                secs[which], res[which] = tm.seconds, n_bare / tm.seconds
            elif which in "BC":
                timings, counts[which] = train_featurize(spark, images, str(out_dir), opts)
                secs[which] = timings["featurize"]
                n = counts[which]["images"]
                res[which] = n / secs[which]
            else:
                with benchlib.Timer() as tm:
                    featurize_table(spark, catalog, str(work / "features-table"), featurizer)
                secs[which], res[which] = tm.seconds, n / tm.seconds
        # The passes must have measured what they claim: B embeds every image, C none.
        b, c = counts["B"], counts["C"]
        if b["reused"] or not b["featurized"] or c["featurized"] or c["reused"] != b["featurized"]:
            raise SystemExit(f"round {r + 1}: unexpected feature-store counts: fresh {b}, re-run {c}")
        shutil.rmtree(out_dir, ignore_errors=True)
        row = {"round": r + 1, "order": order, "bare_img_s": round(res["A"], 1),
               "spark_img_s": round(res["B"], 1), "ratio": round(res["B"] / res["A"], 3),
               "spark_s": round(secs["B"], 2), "featurized": b["featurized"],
               "rerun_s": round(secs["C"], 2), "rerun_img_s": round(res["C"], 1),
               "rerun_ratio": round(res["C"] / res["A"], 3), "rerun_reused": c["reused"]}
        line = (f"round {r + 1} ({order}): bare {res['A']:.1f} img/s   train fresh {res['B']:.1f} img/s "
                f"(ratio {res['B'] / res['A']:.3f})   train re-run {secs['C']:.2f} s")
        if "D" in res:
            row.update(featurize_table_img_s=round(res["D"], 1), featurize_table_ratio=round(res["D"] / res["A"], 3))
            line += f"   featurize_table {res['D']:.1f} img/s (ratio {res['D'] / res['A']:.3f})"
        rounds.append(row)
        print(line, flush=True)
    spark.stop()

    def med(key: str) -> float:
        return benchlib.median([x[key] for x in rounds])

    ratio = med("ratio")
    result = {
        "images": n,
        "image_sizes": list(sizes),
        "batch_size": cfg.batch_size,
        "arrow_batch": cfg.arrow_batch,
        "augment_views": cfg.augment_views,
        "cpu_flags": cpu_flags(),
        "spark_path": "canestra.train's featurize stage (feature store), fresh output folder",
        "spark_tasks": os.cpu_count(),
        "spark_threads_per_task": cfg.threads,
        "bare_threads": threads_a,
        "bare_thread_probe_img_s": probe,
        "spark_start_s": round(t_start.seconds, 1),
        "warm_train_s": round(t_warm.seconds, 1),
        "rounds": rounds,
        "bare_img_s_median": med("bare_img_s"),
        "spark_img_s_median": med("spark_img_s"),
        "ratio_median": round(ratio, 3),
        "rerun_s_median": med("rerun_s"),
        "rerun_img_s_median": med("rerun_img_s"),
        "rerun_ratio_median": round(med("rerun_ratio"), 3),
        "target": ">= 0.90",
    }
    if args.featurize_table:
        result.update(featurize_table_img_s_median=med("featurize_table_img_s"),
                      featurize_table_ratio_median=round(med("featurize_table_ratio"), 3))
    print()
    header = ["round", "order", "bare img/s", "train img/s", "ratio B/A", "re-run s", "re-run img/s"]
    cols = ["round", "order", "bare_img_s", "spark_img_s", "ratio", "rerun_s", "rerun_img_s"]
    if args.featurize_table:
        header += ["featurize_table img/s", "ratio D/A"]
        cols += ["featurize_table_img_s", "featurize_table_ratio"]
    print(benchlib.table([[x[c] for c in cols] for x in rounds], header))
    print(f"\n{n} images at {'+'.join(map(str, sizes))} px on {benchlib.machine()['cpu']} ({cpu_flags()}); "
          f"bare: {threads_a} ORT threads (probe {probe}); spark: local[*] = {os.cpu_count()} tasks x "
          f"{cfg.threads} thread(s)")
    print(f"median ratio B/A (canestra train's featurize stage, fresh folder) = {ratio:.3f}  (target >= 0.90); "
          f"re-run into the same folder: {result['rerun_s_median']:.2f} s "
          f"({result['rerun_img_s_median']:.1f} img/s, {result['rerun_ratio_median']:.2f}x bare)")
    if args.featurize_table:
        print(f"median ratio D/A (featurize_table, the featurizer alone) = {result['featurize_table_ratio_median']:.3f}")
    benchlib.record("featurize_vs_bare", result, args.json)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
