"""`canestra watch` latency: an image lands in the watched folder -> its prediction is written.

For each ``--triggers`` value, one ``canestra watch --trigger T`` runs as a subprocess on an
empty folder. After a warm-up image (JVM start and first CNN load, not counted), ``--images``
sample images land one at a time, each after a seeded random pause of 0..T s, so landings
fall at random points of the trigger cycle; each is written under a hidden name and renamed
into place (as uploaders should). Its latency runs from the rename to the moment its row is
readable in ``OUT/predictions`` (polled every 50 ms). Then SIGINT stops the watcher.

    python bench/watch_latency.py [--model runs/demo/model] [--images 12] [--triggers 10,2] [--json]

Without ``--model``, the cached quick model of bench/serve_latency.py is used (trained once).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib


def _new_rows(pred_dir: Path, done: set[str]) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for f in sorted(pred_dir.glob("batch-*.parquet")):
        if f.name not in done:
            done.add(f.name)
            rows += pq.read_table(f).to_pylist()
    return rows


def _land(src: Path, inbox: Path) -> str:
    dest = inbox / src.parent.name / src.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{src.name}.part"
    tmp.write_bytes(src.read_bytes())
    os.replace(tmp, dest)
    return str(dest)


def measure(model: str, trigger: float, images: list[Path], work: Path, seed: int) -> dict:
    inbox, out = work / f"inbox-{trigger:g}", work / f"out-{trigger:g}"
    inbox.mkdir(parents=True)
    log = open(work / f"watch-{trigger:g}.log", "wb")
    cmd = [sys.executable, "-m", "canestra.cli", "watch", "--model", model, "--images", str(inbox), "--out", str(out),
           "--include-paths", "--trigger", f"{trigger:g}s"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(benchlib.ROOT / "src")})
    rng = random.Random(seed)
    done: set[str] = set()
    latencies = []
    try:
        for i, src in enumerate(images):
            if i:  # the warm-up image (i == 0) lands at once and is not counted
                time.sleep(rng.uniform(0, trigger))
            landed, path = time.time(), _land(src, inbox)
            deadline = time.monotonic() + (600 if i == 0 else 120)
            while path not in {r["path"] for r in _new_rows(out / "predictions", done)}:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"no prediction for {path}; see {log.name}")
                time.sleep(0.05)
            if i:
                latencies.append(time.time() - landed)
                print(f"  trigger {trigger:g}s: image {i:2d} {latencies[-1]:5.2f} s", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    return {"trigger_s": trigger, "images": len(latencies), "median_s": round(benchlib.median(latencies), 2),
            "max_s": round(max(latencies), 2), "min_s": round(min(latencies), 2),
            "latencies_s": [round(x, 2) for x in latencies]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model/ folder (default: the cached quick model of serve_latency.py)")
    ap.add_argument("--images", type=int, default=12, help="images measured per trigger (default 12)")
    ap.add_argument("--triggers", default="10,2", help="trigger intervals in seconds (default 10,2)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    benchlib.setup_env()
    from serve_latency import quick_model

    model = args.model or quick_model()
    files = benchlib.list_subset(str(benchlib.BUNDLED_SAMPLE), None)
    pick = random.Random(args.seed).sample(files, args.images + 1)
    results = []
    with tempfile.TemporaryDirectory(prefix="canestra-watch-bench-") as tmp:
        for trigger in [float(t) for t in args.triggers.split(",")]:
            results.append(measure(model, trigger, [Path(f.path) for f in pick], Path(tmp), args.seed))
    print(benchlib.table([[f"{r['trigger_s']:g}s", r["images"], r["median_s"], r["max_s"]] for r in results],
                         ["trigger", "images", "median latency (s)", "max latency (s)"]))
    benchlib.record("watch_latency", {"model": model, "results": results,
                                      "load_avg_1m": os.getloadavg()[0]}, args.json)


if __name__ == "__main__":
    main()
