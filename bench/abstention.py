"""Abstention through the real product: what a trained canestra model answers "unknown" to.

bench/outside_studio.py measures the answer rule on a probe; this script runs the product
itself, end to end (Spark, ``canestra.pipeline.train.train`` and ``canestra.pipeline.predict.predict``
with ``Settings.load()``, i.e. canestra's defaults unless CANESTRA_* variables say otherwise):

1. writes the non-fruit images (scikit-image's and scikit-learn's sample photos, each whole,
   centre square and 4 corner squares at 60 %; see ``outside_studio.nonfruit_images``) as PNG
   files into ``--work``/nonfruit;
2. trains, unless given a run folder: (a) the default model on ``--studio`` and (b) the mixed
   model on ``--studio`` + ``--real`` (a family-level root: its photos become
   "Apple (family)", ...);
3. predicts the non-fruit folder and the real photos with each model and prints: non-fruit
   share answered "unknown"; real photos: family accuracy ("unknown" counts wrong), share
   "unknown", share "confidently wrong" (answered with a wrong family) -- for the mixed model
   on its held-out real photos only (the others were in its training set), and on all of
   them for reference; plus each model's own metrics.json figures (held-out top-1, "unknown"
   coverage, shift).

Full run (~10 min training on 2 cores per model, plus prediction):

    python bench/abstention.py [--studio ../shared/data/fruits-360-sample/Training]
        [--real ../shared/data/real-photos] [--work /tmp/canestra-bench-work]
        [--model-default RUN] [--model-mixed RUN] [--json]

``--model-default`` / ``--model-mixed`` take run folders written by ``canestra train``
(holding model/ and metrics.json) and skip that training.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import benchlib

DEFAULT_STUDIO = str(benchlib.SHARED_SAMPLE)
DEFAULT_REAL = str(benchlib.ROOT.parent / "shared" / "data" / "real-photos")
DEFAULT_WORK = "/tmp/canestra-bench-work"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_nonfruit(folder: Path) -> int:
    """The non-fruit views as PNG files (lossless: the product decodes the same pixels)."""
    from outside_studio import nonfruit_images
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    images = nonfruit_images()
    names = set()
    for name, rgb in images:
        fname = re.sub(r"[^A-Za-z0-9]+", "_", name) + ".png"  # "skimage/coffee.png#2" -> skimage_coffee_png_2.png
        names.add(fname)
        path = folder / fname
        if not path.exists():
            Image.fromarray(rgb).save(path, format="PNG")
    for stale in folder.glob("*.png"):  # a folder left by another version of the set
        if stale.name not in names:
            stale.unlink()
    return len(images)


def predictions(spark, run: str, images: str, out: str):
    """predictions.csv of ``canestra predict`` as a DataFrame (family "" when unknown)."""
    import pandas as pd

    from canestra.layout import PREDICTIONS_CSV
    from canestra.pipeline.predict import predict

    predict(spark, os.path.join(run, "model"), images, out)
    return pd.read_csv(os.path.join(out, PREDICTIONS_CSV), keep_default_na=False)


def real_figures(df, taxonomy) -> dict:
    """Family accuracy (unknown = wrong), unknown share and confidently-wrong share of labelled photos."""
    truth = df["label"].map(lambda f: taxonomy.canonical_family(f) or f)
    unknown = df["prediction"] == "unknown"
    right = (df["family"] == truth) & ~unknown
    return {"n": int(len(df)), "family_accuracy": float(right.mean()) if len(df) else None,
            "unknown": float(unknown.mean()) if len(df) else None,
            "confidently_wrong": float(((df["family"] != truth) & ~unknown).mean()) if len(df) else None}


def metrics_figures(run: str) -> dict:
    m = json.loads(Path(run, "metrics.json").read_text())
    shift = m.get("shift") or {}
    fam = shift.get("family_roots_held_out") or {}
    return {"accuracy": m.get("accuracy"), "n": m.get("n"),
            "unknown_coverage": (m.get("unknown") or {}).get("coverage"),
            "perturbed_accuracy": (shift.get("perturbed_held_out") or {}).get("accuracy"),
            "family_photos_held_out_accuracy": fam.get("family_accuracy"),
            "family_photos_held_out_answered_accuracy": fam.get("answered_family_accuracy"),
            "image_sizes": (m.get("model") or {}).get("image_sizes")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studio", default=DEFAULT_STUDIO, help="Fruits-360 style <Class>/<image> folder")
    ap.add_argument("--real", default=DEFAULT_REAL, help="real photos, <Family>/<image>")
    ap.add_argument("--work", default=DEFAULT_WORK, help="folder for the non-fruit images, runs and predictions")
    ap.add_argument("--model-default", metavar="RUN", help="run folder of a model trained on --studio")
    ap.add_argument("--model-mixed", metavar="RUN", help="run folder of a model trained on --studio and --real")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    benchlib.setup_env()
    from canestra.answer.taxonomy import load_taxonomy
    from canestra.config import Settings
    from canestra.layout import CATALOG
    from canestra.pipeline.train import train
    from canestra.sparkctx import get_spark

    work = Path(args.work) / "abstention"
    cfg = Settings.load()
    taxonomy = load_taxonomy(cfg.taxonomy)
    n_nonfruit = write_nonfruit(work / "nonfruit")
    log(f"{n_nonfruit} non-fruit images in {work / 'nonfruit'}")
    os.environ.setdefault("CANESTRA_DRIVER_MEMORY", cfg.driver_memory)
    spark = get_spark(cfg.master, conf={"spark.sql.execution.arrow.maxRecordsPerBatch": str(cfg.arrow_batch)})

    runs = {"default": (args.model_default, [args.studio]), "mixed": (args.model_mixed, [args.studio, args.real])}
    results = {}
    for kind, (given, roots) in runs.items():
        run = given
        if run is None:
            run = str(work / f"run-{kind}")
            log(f"training the {kind} model on {', '.join(roots)} -> {run}")
            train(spark, roots if len(roots) > 1 else roots[0], run, cfg)
        if not Path(run, "model").is_dir():
            raise SystemExit(f"{run} is not a canestra run folder (no model/ inside): "
                             "pass the --out folder of `canestra train`")
        log(f"{kind}: predicting")
        nf = predictions(spark, run, str(work / "nonfruit"), str(work / f"pred-{kind}-nonfruit"))
        real = predictions(spark, run, args.real, str(work / f"pred-{kind}-real"))
        res = {"run": run, "nonfruit_unknown": float((nf["prediction"] == "unknown").mean()),
               "nonfruit_n": int(len(nf)), "real_all": real_figures(real, taxonomy), "metrics": metrics_figures(run)}
        # Photos the model was trained on say little: keep those its catalog held out (same image ids).
        split = spark.read.parquet(os.path.join(run, CATALOG)).select("image_id", "split").toPandas()
        trained_on = set(split.loc[split["split"] == "train", "image_id"])
        unseen = real[~real["image_id"].isin(trained_on)]
        res["real_unseen"] = real_figures(unseen, taxonomy)
        results[kind] = res

    pct = lambda v: "-" if v is None else f"{v * 100:.1f}"  # noqa: E731
    rows = []
    for kind, r in results.items():
        u = r["real_unseen"]
        rows.append([kind, pct(r["nonfruit_unknown"]), u["n"], pct(u["family_accuracy"]), pct(u["unknown"]),
                     pct(u["confidently_wrong"])])
    print(f"Abstention through canestra train/predict (non-fruit: {n_nonfruit} images; real photos: {args.real})")
    print(benchlib.table(rows, ["model", "non-fruit: unknown %", "real photos not trained on", "family right %",
                                "unknown %", "confidently wrong %"]))
    print("(family right: answered with the right family, unknown counts wrong; confidently wrong: answered with "
          "a wrong family)")
    mixed_all = results["mixed"]["real_all"]
    print(f"mixed model on all {mixed_all['n']} real photos, training ones included: family right "
          f"{pct(mixed_all['family_accuracy'])} %, unknown {pct(mixed_all['unknown'])} %, confidently wrong "
          f"{pct(mixed_all['confidently_wrong'])} %")
    mrows = []
    for kind, r in results.items():
        m = r["metrics"]
        mrows.append([kind, "+".join(map(str, m["image_sizes"] or [])), pct(m["accuracy"]),
                      f"{(1 - m['unknown_coverage']) * 100:.2f}" if m["unknown_coverage"] is not None else "-",
                      pct(m["perturbed_accuracy"]), pct(m["family_photos_held_out_accuracy"]),
                      pct(m["family_photos_held_out_answered_accuracy"])])
    print("\nmetrics.json of each run (held-out split of its own catalog):")
    print(benchlib.table(mrows, ["model", "px", "top-1 %", "unknown %", "perturbed top-1 %",
                                 "family photos: family %", "family photos: answered right %"]))
    benchlib.record("abstention", {"studio": args.studio, "real": args.real, "nonfruit_images": n_nonfruit,
                                   "models": results}, args.json)


if __name__ == "__main__":
    main()
