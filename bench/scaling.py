"""Does canestra scale linearly? ``canestra train`` on 1x and 4x the images.

4x is the same image files repeated under new names (``copy<k>_<name>``) in the same
class folders, so the work per image is identical. Each size runs ``canestra train``
in a fresh process (Spark start included); the driver's peak RSS is read from
/proc (VmHWM) of the Python driver process and, for information, of its JVM.
Targets: time ratio 4x/1x <= 4.2; Python driver peak RSS growth <= 10 %.

    python bench/scaling.py [--images DIR] [--base 2000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib


def replicate(files, dest: Path, copies: int) -> str:
    for f in files:
        d = dest / f.label
        d.mkdir(parents=True, exist_ok=True)
        name = os.path.basename(f.path)
        for k in range(copies):
            link = d / (name if k == 0 else f"copy{k}_{name}")
            if not link.exists():
                link.symlink_to(f.path)
    return str(dest)


def _hwm_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


def run_train(images: str, out: str, extra: list[str]) -> dict:
    """``canestra train`` in a child process; poll the driver's and its JVM's peak RSS."""
    cmd = [sys.executable, "-m", "canestra.cli", "train", "--images", images, "--out", out, "--quiet", *extra]
    t0 = time.perf_counter()
    # Output to a file, not a pipe: nobody reads a pipe while polling, and a full one (64 kB) would
    # block the child for good (long runs warn more).
    sink = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, text=True)
    driver_kb = jvm_kb = 0
    while proc.poll() is None:
        driver_kb = max(driver_kb, _hwm_kb(proc.pid) or 0)
        for child in _children(proc.pid):
            try:
                exe = os.readlink(f"/proc/{child}/exe")
            except OSError:
                continue
            if exe.endswith("java"):
                jvm_kb = max(jvm_kb, _hwm_kb(child) or 0)
        time.sleep(0.25)
    proc.wait()
    sink.seek(0)
    err_text = sink.read()
    sink.close()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"canestra train failed ({proc.returncode}):\n{err_text[-2000:]}")
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    return {"wall_s": round(wall, 1), "driver_peak_rss_mb": round(driver_kb / 1024, 1),
            "jvm_peak_rss_mb": round(jvm_kb / 1024, 1), "images": metrics["counts"]["images"],
            "timings_s": metrics.get("timings_s", {}), "accuracy": metrics.get("accuracy")}


def growth(one: dict, big: dict) -> dict:
    """Time ratio and peak-RSS growth of the big run over the 1x run (shared with scale_10x.py)."""
    return {
        "time_ratio": round(big["wall_s"] / one["wall_s"], 2),
        "driver_rss_growth_pct": round(100 * (big["driver_peak_rss_mb"] / one["driver_peak_rss_mb"] - 1), 1),
        "jvm_rss_growth_pct": round(100 * (big["jvm_peak_rss_mb"] / max(one["jvm_peak_rss_mb"], 1) - 1), 1),
    }


def growth_line(result: dict, factor: int) -> str:
    return (f"time ratio {factor}x/1x = {result['time_ratio']} (target {result['targets']['time_ratio']}); "
            f"driver RSS growth {result['driver_rss_growth_pct']} % (target <= 10 %); "
            f"JVM RSS growth {result['jvm_rss_growth_pct']} %")


def runs_table(runs: dict) -> str:
    return benchlib.table([[f"{k}x", v["images"], v["wall_s"], v["driver_peak_rss_mb"], v["jvm_peak_rss_mb"]]
                           for k, v in runs.items()],
                          ["size", "images", "wall s", "driver peak RSS MB", "JVM peak RSS MB"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default=benchlib.default_images())
    ap.add_argument("--base", type=int, default=2000, help="images at 1x (spread over classes; 0 = all)")
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--image-size", help="passed to canestra train (default: canestra's default)")
    ap.add_argument("--workdir")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    benchlib.setup_env()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="canestra-scaling-"))
    files = benchlib.list_subset(args.images, args.base or None)
    extra = ["--image-size", args.image_size] if args.image_size else []
    runs = {}
    for factor in (1, args.factor):
        images = replicate(files, work / f"images-x{factor}", factor)
        runs[factor] = run_train(images, str(work / f"out-x{factor}"), extra)
        r = runs[factor]
        print(f"{factor}x: {r['images']} images  {r['wall_s']} s  driver peak RSS {r['driver_peak_rss_mb']} MB  "
              f"JVM peak RSS {r['jvm_peak_rss_mb']} MB", flush=True)

    one, big = runs[1], runs[args.factor]
    result = {
        "base_images": one["images"],
        "factor": args.factor,
        "runs": {f"{k}x": v for k, v in runs.items()},
        **growth(one, big),
        "targets": {"time_ratio": "<= 4.2", "driver_rss_growth_pct": "<= 10"},
    }
    print()
    print(runs_table(runs))
    print("\n" + growth_line(result, args.factor))
    benchlib.record("scaling", result, args.json)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
