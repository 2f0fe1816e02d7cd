"""Each bench script still runs end to end on a handful of images and reports its figures.

No timing is asserted (these machines are noisy): the figures only have to be there and
be consistent with the inputs. Results go to a temp dir, not to bench/results/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each script starts its own Spark JVM


def run_bench(script: str, *args: str, tmp_path: Path, timeout: int = 900) -> dict:
    env = dict(os.environ, CANESTRA_BENCH_RESULTS=str(tmp_path / "results"), SPARK_LOCAL_IP="127.0.0.1",
               PYSPARK_PYTHON=sys.executable)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    history = (tmp_path / "results" / f"{script[:-3]}.jsonl").read_text().splitlines()
    assert json.loads(history[-1]) == result, "the printed JSON line is the one appended to the history"
    assert result["machine"]["cores"] == os.cpu_count() and result["command"].startswith(script)
    return result


def test_featurize_vs_bare(sample_dir, tmp_path):
    r = run_bench("featurize_vs_bare.py", "--images", str(sample_dir), "--limit", "24", "--repeats", "1",
                  tmp_path=tmp_path)
    assert r["images"] == 24 and len(r["rounds"]) == 1
    assert r["bare_img_s_median"] > 0 and r["spark_img_s_median"] > 0
    # img/s are printed to 0.1: on a starved machine (a few img/s) that rounding alone moves the ratio ~2 %.
    assert r["ratio_median"] == pytest.approx(r["spark_img_s_median"] / r["bare_img_s_median"], rel=0.06)


def test_scaling(sample_dir, tmp_path):
    r = run_bench("scaling.py", "--images", str(sample_dir), "--base", "48", "--factor", "2", tmp_path=tmp_path)
    one, two = r["runs"]["1x"], r["runs"]["2x"]
    assert (one["images"], two["images"]) == (48, 96)
    assert one["driver_peak_rss_mb"] > 0 and two["jvm_peak_rss_mb"] > 0
    assert {"ingest", "featurize", "fit"} <= set(two["timings_s"])
    assert r["time_ratio"] == pytest.approx(two["wall_s"] / one["wall_s"], abs=0.01)


def test_pca_cost(trained, tmp_path):
    r = run_bench("pca_cost.py", "--out", trained.out_dir, "--max-iter", "10", tmp_path=tmp_path)
    assert r["top1_with_pca"] == round(trained.metrics["accuracy"] * 100, 2)
    assert 0 <= r["top1_without_pca"] <= 100 and r["test_images"] == trained.metrics["n"]


def test_vs_course_template(sample_dir, tmp_path):
    pytest.importorskip("tensorflow", reason="the course-template replica needs the bench venv (docs/performance.md)")
    r = run_bench("vs_course_template.py", "--images", str(sample_dir), "--limit", "30", tmp_path=tmp_path)
    assert r["images"] == 30 and set(r["img_s"]) == {"template_224", "canestra_224", "canestra_224_int8", "canestra_default"}
    assert r["multiple_at_224"] == pytest.approx(r["img_s"]["canestra_224"] / r["img_s"]["template_224"], rel=0.05)


def test_tuning(sample_dir, tmp_path):
    r = run_bench("tuning.py", "--images", str(sample_dir), "--limit", "16", "--repeats", "1", tmp_path=tmp_path)
    rows = {row["config"]: row for row in r["rows"]}
    assert r["images"] == 16 and rows["default"]["vs_default"] == 1.0
    assert {"graph opt basic", "2 threads, 1 process"} <= set(rows) and all(x["img_s"] > 0 for x in rows.values())


def test_serve_latency(trained, tmp_path):
    r = run_bench("serve_latency.py", "--model", os.path.join(trained.out_dir, "model"), "--quick", tmp_path=tmp_path)
    assert r["quick"] and r["rounds"] == 1 and set(r["workers"]) == {"1", "2"}
    for w in r["workers"].values():
        assert w["p50_ms"] > 0 and w["bare_p50_ms"] > 0 and w["throughput_rps"] > 0
        assert w["p95_ms"] >= w["p50_ms"]


def test_serve_load(trained, tmp_path):
    r = run_bench("serve_load.py", "--model", os.path.join(trained.out_dir, "model"), "--quick", "--workers", "1",
                  tmp_path=tmp_path)
    assert r["quick"] and r["requests"] == 300 and r["clients"] == 8
    assert r["kinds"] == {"photo": 264, "garbage": 30, "oversize": 6}
    assert sum(r["statuses"].values()) == 300 and r["statuses"]["413"] == 6
    assert r["errors_5xx"] == 0 and r["dropped_connections"] == 0 and not r["unexpected"]
    assert r["rps"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0
    assert set(r["rss"]) == {"start", "middle", "end"} and all(v["total_mb"] > 50 for v in r["rss"].values())


def test_scale_10x(sample_dir, tmp_path):
    """The 10x bench at 2x on 2 classes: distinct generated copies, both trains, a reusable image set."""
    from canestra.vision.images import decode_rgb, pixel_id

    data = tmp_path / "data"
    gen_args = ["--images", str(sample_dir), "--classes", "2", "--per-class", "12", "--scale", "2", "--data", str(data)]
    r = run_bench("scale_10x.py", *gen_args, "--train-args=--no-shift-eval --image-size 100 --max-iter 10",
                  tmp_path=tmp_path)
    one, two = r["runs"]["1x"], r["runs"]["2x"]
    assert (one["images"], two["images"]) == (24, 48) and r["base_images"] == 24
    assert r["generation"]["images"] == r["generation"]["distinct_ids"] == 48 and not r["generation"]["reused"]
    assert {"ingest", "featurize", "fit"} <= set(two["timings_s"]) and one["driver_peak_rss_mb"] > 0
    assert two["jvm_peak_rss_mb"] > 0 and r["time_ratio"] == pytest.approx(two["wall_s"] / one["wall_s"], abs=0.01)

    # What a user would check on disk: 48 files, 48 different pixel ids, none equal to a source image.
    copies = sorted((data / "x2").rglob("*.jpg"))
    ids = {p: pixel_id(decode_rgb(p.read_bytes())) for p in copies}
    sources = {pixel_id(decode_rgb(p.read_bytes())) for c in ("Apple Granny Smith", "Banana")
               for p in (sample_dir / c).iterdir()}
    assert len(copies) == 48 and len(set(ids.values())) == 48 and not set(ids.values()) & sources
    assert len(list((data / "x1").rglob("*.jpg"))) == 24

    # A complete set is reused; one missing copy makes it regenerate, to the same pixels (seeded).
    victim = copies[5]
    again = subprocess.run([sys.executable, str(ROOT / "bench" / "scale_10x.py"), *gen_args, "--generate-only"],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0 and "(reused)" in again.stdout, again.stderr[-2000:]
    victim.unlink()
    assert not victim.exists()
    regen = subprocess.run([sys.executable, str(ROOT / "bench" / "scale_10x.py"), *gen_args, "--generate-only"],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert regen.returncode == 0 and "generated in" in regen.stdout, regen.stderr[-2000:]
    assert pixel_id(decode_rgb(victim.read_bytes())) == ids[victim]
