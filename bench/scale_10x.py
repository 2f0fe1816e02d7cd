"""Does ``canestra train`` scale to 10x the sample? 1x vs 10x distinct images, measured.

The 10x set is generated, not kept in the repo: each source image gives ``--scale``
copies, each a seeded small change of its pixels (flip, rotation, crop, colour
jitter; JPEG re-encoded), so every copy has its own ``image_id`` (pixel SHA-256,
checked: no duplicates). The 1x set is copy 0 of every image (links), so both
runs see the same kind of files. Copies keep the source frame number in their
name, so all copies of a frame land on the same side of the block split.

Generation runs in parallel (multiprocessing) into a folder under /tmp and is
skipped when that folder's manifest says it is complete. Then ``canestra train``
runs at 1x and at 10x, each in a fresh process with identical flags; the bench
prints wall time, stage timings (metrics.json ``timings_s``), the 10x/1x ratio,
the Python driver's and its JVM's peak RSS (/proc VmHWM) and the CPU model.
Targets: time ratio <= 1.05 x scale; Python driver peak RSS growth <= 10 %.

    python bench/scale_10x.py [--images DIR] [--scale 10] [--classes N] [--per-class N]
                              [--data DIR] [--workers N] [--train-args "..."] [--json]

Full run (13,680 -> 136,800 images): ~15 GB free under /tmp and a quiet machine.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shlex
import shutil
import tempfile
import time
from collections import defaultdict
from multiprocessing import get_context
from pathlib import Path

import benchlib

TRANSFORM = "flip+rot10+crop88+jitter10/q95/v1"  # part of the manifest: a change regenerates
MANIFEST = "manifest.json"


def transform_jpeg(data: bytes, seed: int) -> bytes:
    """A small seeded change of an image: mirror (p=0.5), rotate +-10 deg, crop 88-100 %
    back to the same size, brightness/contrast/saturation +-10 %, JPEG quality 95."""
    import numpy as np
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng(seed)
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    im = im.rotate(float(rng.uniform(-10, 10)), resample=Image.BILINEAR, fillcolor=(255, 255, 255))
    keep = float(rng.uniform(0.88, 1.0))
    cw, ch = max(8, int(w * keep)), max(8, int(h * keep))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BILINEAR)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        im = enhancer(im).enhance(float(rng.uniform(0.9, 1.1)))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def copy_seed(seed: int, rel: str, copy: int, attempt: int) -> int:
    digest = hashlib.sha256(f"{seed}:{rel}:{copy}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def copy_name(name: str, copy: int) -> str:
    # Prefix, so the split still reads the source frame number (the last number in the stem).
    return f"v{copy}_{os.path.splitext(name)[0]}.jpg"


def _image_id(data: bytes) -> str:
    from canestra.vision.images import decode_rgb, pixel_id

    return pixel_id(decode_rgb(data))


def make_copy(job: tuple) -> tuple[str, str]:
    """Write one copy (atomically; an existing complete file is kept) and return (relpath, image_id)."""
    src, src_rel, rel_out, root, seed, copy, attempt = job
    dest = os.path.join(root, rel_out)
    if attempt == 0 and os.path.exists(dest):  # resuming an interrupted generation
        with open(dest, "rb") as fh:
            return rel_out, _image_id(fh.read())
    with open(src, "rb") as fh:
        data = transform_jpeg(fh.read(), copy_seed(seed, src_rel, copy, attempt))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, dest)
    return rel_out, _image_id(data)


def generate(files, scale: int, root: Path, seed: int, workers: int) -> dict:
    """``scale`` distinct copies of every file under ``root/<label>/``; returns generation facts."""
    t0 = time.perf_counter()
    jobs = {}
    for f in files:
        name = os.path.basename(f.path)
        for k in range(scale):
            jobs[os.path.join(f.label, copy_name(name, k))] = (f.path, f"{f.label}/{name}", k)
    ids: dict[str, str] = {}
    pending = [(*jobs[rel][:2], rel, str(root), seed, jobs[rel][2], 0) for rel in jobs]
    attempt = 0
    with get_context("fork").Pool(workers) as pool:
        while pending:
            for rel, image_id in pool.imap_unordered(make_copy, pending, chunksize=64):
                ids[rel] = image_id
            # A copy whose pixels equal another's gets a new seed (deterministic: attempt number).
            by_id = defaultdict(list)
            for rel, image_id in ids.items():
                by_id[image_id].append(rel)
            clashes = [rel for rels in by_id.values() if len(rels) > 1 for rel in sorted(rels)[1:]]
            attempt += 1
            if clashes and attempt > 5:
                raise SystemExit(f"{len(clashes)} copies still duplicate another image after 5 reseeds")
            pending = [(*jobs[rel][:2], rel, str(root), seed, jobs[rel][2], attempt) for rel in clashes]
    distinct = len(set(ids.values()))
    if distinct != len(jobs):
        raise SystemExit(f"{len(jobs) - distinct} duplicate image ids among {len(jobs)} copies")
    return {"images": len(jobs), "distinct_ids": distinct, "reseeded_rounds": attempt - 1,
            "ids_sha256": hashlib.sha256("".join(sorted(ids.values())).encode()).hexdigest(),
            "seconds": round(time.perf_counter() - t0, 1), "workers": workers}


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def count_files(root: Path) -> int:
    return sum(len([n for n in names if not n.endswith(".tmp")]) for _, _, names in os.walk(root))


def prepare(files, scale: int, data: Path, seed: int, workers: int, params: dict) -> tuple[Path, Path, dict]:
    """The 10x folder (generated unless its manifest says complete) and the 1x folder of links to copy 0."""
    big = data / f"x{scale}"
    manifest_path = data / MANIFEST
    one = data / "x1"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    if manifest and manifest["params"] == params and manifest.get("generation") \
            and count_files(big) == manifest["generation"]["images"]:
        gen = dict(manifest["generation"], reused=True)
    else:
        if manifest and manifest["params"] != params:  # another set in this folder: start afresh
            for old in data.glob("x*"):
                shutil.rmtree(old, ignore_errors=True)
        # Params first, generation facts when complete: an interrupted run resumes with the same params.
        _write_json(manifest_path, {"params": params})
        gen = generate(files, scale, big, seed, workers)
        _write_json(manifest_path, {"params": params, "generation": gen})
        gen = dict(gen, reused=False)
    for f in files:
        link = one / f.label / copy_name(os.path.basename(f.path), 0)
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(big / f.label / link.name)
    return one, big, gen


def select(files, classes: int, per_class: int):
    """The first ``classes`` classes (sorted; 0 = all), at most ``per_class`` files each (0 = all)."""
    by_label = defaultdict(list)
    for f in files:
        by_label[f.label].append(f)
    labels = sorted(by_label)[:classes or None]
    return [f for lb in labels for f in sorted(by_label[lb], key=lambda f: f.path)[:per_class or None]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default=benchlib.default_images(), help="source sample (default: the shared one)")
    ap.add_argument("--scale", type=int, default=10, help="copies per source image (the big run's factor)")
    ap.add_argument("--classes", type=int, default=0, help="use the first N classes only (0 = all)")
    ap.add_argument("--per-class", type=int, default=0, help="at most N source images per class (0 = all)")
    ap.add_argument("--seed", type=int, default=7, help="seed of the copy transforms")
    ap.add_argument("--data", help="generated images (default /tmp/canestra-scale-<params hash>; kept for reuse)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="generation processes")
    ap.add_argument("--train-args", default="", help="extra flags for both canestra train runs, e.g. '--no-shift-eval'")
    ap.add_argument("--workdir", help="train outputs (default: a temp dir, removed at the end)")
    ap.add_argument("--generate-only", action="store_true", help="make the image set and stop")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.scale < 2:
        ap.error("--scale must be at least 2")
    benchlib.setup_env()
    from scaling import growth, growth_line, run_train, runs_table

    source = os.path.realpath(args.images)
    files = select(benchlib.list_subset(source, None), args.classes, args.per_class)
    params = {"source": source, "classes": args.classes, "per_class": args.per_class, "scale": args.scale,
              "seed": args.seed, "transform": TRANSFORM, "source_files": len(files)}
    tag = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    data = Path(args.data or Path(tempfile.gettempdir()) / f"canestra-scale-{tag}")
    one, big, gen = prepare(files, args.scale, data, args.seed, args.workers, params)
    print(f"{args.scale}x set: {gen['images']} images, {gen['distinct_ids']} distinct ids, under {big} "
          + ("(reused)" if gen["reused"] else f"(generated in {gen['seconds']} s by {gen['workers']} processes)"),
          flush=True)
    if args.generate_only:
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="canestra-scale10x-"))
    extra = shlex.split(args.train_args)
    runs = {}
    for factor, images in ((1, one), (args.scale, big)):
        out = work / f"out-x{factor}"
        shutil.rmtree(out, ignore_errors=True)  # a fresh run each time, never a reused catalog
        runs[factor] = r = run_train(str(images), str(out), extra)
        expected = len(files) * factor
        if r["images"] != expected:
            raise SystemExit(f"{factor}x: canestra trained on {r['images']} images, expected {expected}: see {out}")
        print(f"{factor}x: {r['images']} images  {r['wall_s']} s  driver peak RSS {r['driver_peak_rss_mb']} MB  "
              f"JVM peak RSS {r['jvm_peak_rss_mb']} MB", flush=True)
        if not args.workdir:
            shutil.rmtree(out, ignore_errors=True)  # the 10x tables take GBs

    one_r, big_r = runs[1], runs[args.scale]
    stages = [s for s in big_r["timings_s"] if s in one_r["timings_s"]]
    result = {
        "source": source,
        "base_images": one_r["images"],
        "scale": args.scale,
        "train_args": extra,
        "generation": gen,
        "runs": {f"{k}x": v for k, v in runs.items()},
        **growth(one_r, big_r),
        "stage_ratios": {s: round(big_r["timings_s"][s] / max(one_r["timings_s"][s], 1e-9), 2) for s in stages},
        "targets": {"time_ratio": f"<= {round(1.05 * args.scale, 2)}", "driver_rss_growth_pct": "<= 10"},
    }
    result["meets_targets"] = {"time_ratio": result["time_ratio"] <= 1.05 * args.scale,
                               "driver_rss_growth_pct": result["driver_rss_growth_pct"] <= 10}
    print()
    print(runs_table(runs))
    print()
    print(benchlib.table([[s, round(one_r["timings_s"][s], 1), round(big_r["timings_s"][s], 1),
                           result["stage_ratios"][s]] for s in stages],
                         ["stage", "1x s", f"{args.scale}x s", "ratio"]))
    print(f"\nCPU: {benchlib.machine()['cpu']} ({os.cpu_count()} cores)")
    print(growth_line(result, args.scale))
    benchlib.record("scale_10x", result, args.json)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
