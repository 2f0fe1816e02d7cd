"""What every bench script shares: the image set, machine facts, result records.

Each script prints a human table; with ``--json`` it also prints one JSON line.
Every run is appended to ``bench/results/<bench>.jsonl`` so figures have a history.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# CANESTRA_BENCH_RESULTS redirects the history (the smoke tests write to a temp dir).
RESULTS = Path(os.environ.get("CANESTRA_BENCH_RESULTS") or ROOT / "bench" / "results")
SHARED_SAMPLE = ROOT.parent / "shared" / "data" / "fruits-360-sample" / "Training"
BUNDLED_SAMPLE = ROOT / "sample" / "fruits-360"


def default_images() -> str:
    """The 13,680-image shared sample when present, else the bundled one."""
    return str(SHARED_SAMPLE if SHARED_SAMPLE.is_dir() else BUNDLED_SAMPLE)


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def setup_env() -> None:
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    sys.path.insert(0, str(ROOT / "src"))


def list_subset(images: str, limit: int | None):
    """The listing canestra would make, cut to ``limit`` files spread over all classes."""
    from canestra.storage.files import list_images

    files = [f for f in list_images(images) if f.label is not None]
    if limit and limit < len(files):
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    return files


def link_subset(files, dest: Path) -> str:
    """A folder of symlinks in the ``<Class>/<file>`` layout, so Spark reads exactly ``files``."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        d = dest / f.label
        d.mkdir(exist_ok=True)
        link = d / os.path.basename(f.path)
        if not link.exists():
            link.symlink_to(f.path)
    return str(dest)


def median(values) -> float:
    return float(statistics.median(values))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def record(bench: str, result: dict, as_json: bool) -> None:
    result = {"bench": bench, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine(), "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]), **result}
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"{bench}.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(result) + "\n")
    if as_json:
        print(json.dumps(result))


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
