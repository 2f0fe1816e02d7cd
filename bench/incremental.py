"""Incremental train: what a second `canestra train` costs after 10 % more images arrive.

1. links ``--classes`` classes of ``--images`` (default 0: all) into ``--work``/images, holding back
   ``--new-fraction`` of each class's images (a seeded random choice);
2. ``canestra train --images WORK/images --out WORK/out`` (the CLI, default settings);
3. links the held-back images in and runs the same command into the same --out;
4. prints both runs' featurize times (metrics.json ``timings_s``), their ratio (target
   <= 0.25), how many images each run featurized and reused, n_train and the CPU.

    python bench/incremental.py [--images ../shared/data/fruits-360-sample/Training]
        [--classes 0] [--new-fraction 0.1] [--work /tmp/canestra-incremental]
        [--train-args="--no-shift-eval --max-iter 20"] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import benchlib


def train(images: Path, out: Path, log: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "canestra.cli", "train", "--images", str(images), "--out", str(out), *extra]
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return {"wall_s": round(wall, 1), "featurize_s": round(metrics["timings_s"]["featurize"], 2),
            "total_s": round(metrics["timings_s"]["total"], 1), "n_train": metrics["n_train"],
            "images": metrics["counts"]["images"], **metrics["feature_store"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default=benchlib.default_images())
    # All classes by default: a run's fixed Spark cost (~3 s here) is a larger share of a small
    # set's featurize time (20 classes, 2,160 images: ratio 0.28 quiet; the whole sample: 0.17).
    ap.add_argument("--classes", type=int, default=0, help="first N classes (0 = all)")
    ap.add_argument("--new-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--work", default="/tmp/canestra-incremental")
    ap.add_argument("--train-args", default="",
                    help="extra `canestra train` flags for both runs, e.g. \"--no-shift-eval --max-iter 20\" "
                         "(they change fit/evaluate time, not featurize)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    benchlib.setup_env()

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    files = benchlib.list_subset(args.images, None)
    classes = sorted({f.label for f in files})[: args.classes or None]
    rng = random.Random(args.seed)
    first, later = [], []
    for c in classes:
        mine = sorted((f for f in files if f.label == c), key=lambda f: f.path)
        held = set(rng.sample(range(len(mine)), round(len(mine) * args.new_fraction)))
        first += [f for i, f in enumerate(mine) if i not in held]
        later += [f for i, f in enumerate(mine) if i in held]
    images, out = work / "images", work / "out"
    benchlib.link_subset(first, images)
    extra = args.train_args.split()
    runs = [train(images, out, work / "train-1.log", extra)]
    benchlib.link_subset(later, images)
    runs.append(train(images, out, work / "train-2.log", extra))

    ratio = runs[1]["featurize_s"] / runs[0]["featurize_s"]
    load = os.getloadavg()
    print(benchlib.table(
        [[i + 1, r["images"], r["featurized"], r["reused"], r["n_train"], r["featurize_s"], r["total_s"]]
         for i, r in enumerate(runs)],
        ["run", "images", "featurized", "reused", "n_train", "featurize s", "train total s"]))
    print(f"featurize ratio (run 2 / run 1): {ratio:.3f} (target <= 0.25); "
          f"all images used: {runs[1]['images'] == len(first) + len(later)}")
    m = benchlib.machine()
    print(f"CPU: {m['cpu']}, {m['cores']} cores; load average after the runs {load[0]:.1f} (shared machine)")
    benchlib.record("incremental", {"classes": len(classes), "first_images": len(first), "added_images": len(later),
                                    "runs": runs, "featurize_ratio": round(ratio, 4),
                                    "loadavg_1m": round(load[0], 2)}, args.json)
    return 0 if ratio <= 0.25 and runs[1]["images"] == len(first) + len(later) else 1


if __name__ == "__main__":
    sys.exit(main())
