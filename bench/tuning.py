"""The single-process knobs of featurization, measured one at a time on the same images.

Each row changes one knob from canestra's defaults and reports img/s of decode ->
resize -> ONNX Runtime (the work one Spark task does per image), with 1 ORT thread
(what each of the ``local[*]`` tasks uses) unless the row is about threads:

* batch size (images per ``session.run``);
* ORT graph optimisation level (basic / extended / all);
* threads: 1 thread in 1 process vs 2 intra-op threads in 1 process (Spark runs one
  1-thread task per core instead);
* resize filter (bilinear, canestra's, vs nearest) -- speed only, it changes features.

Every configuration runs ``--repeats`` times, interleaved, and the median is kept.

    python bench/tuning.py [--images DIR] [--limit 512] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import os

import benchlib


def make_session(model_path: str, threads: int, level: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    return ort.InferenceSession(model_path, sess_options=opts, providers=["CPUExecutionProvider"])


def rate(datas: list[bytes], size: int, batch: int, sess, resample) -> float:
    import numpy as np
    from PIL import Image

    from canestra.vision.images import decode_rgb

    with benchlib.Timer() as tm:
        for i in range(0, len(datas), batch):
            imgs = [decode_rgb(d) for d in datas[i : i + batch]]
            x = np.stack([np.asarray(Image.fromarray(im).resize((size, size), resample)) for im in imgs])
            sess.run(["features"], {"image": x})
    return len(datas) / tm.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default=benchlib.default_images())
    ap.add_argument("--limit", type=int, default=512, help="images (spread over classes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image-size", type=int, help="input size (default: canestra's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    benchlib.setup_env()
    from PIL import Image

    from canestra.config import Settings
    from canestra.vision import backbone

    cfg = Settings.load()
    size = args.image_size or cfg.image_sizes[0]
    files = benchlib.list_subset(args.images, args.limit)
    datas = [open(f.path, "rb").read() for f in files]
    model = backbone.default_model_path()
    bilinear, nearest = Image.BILINEAR, Image.NEAREST
    default = {"batch": cfg.batch_size, "level": "all", "threads": 1, "resample": bilinear}
    configs = [("default", {})]
    configs += [(f"batch {b}", {"batch": b}) for b in (8, 16, 32, 128) if b != cfg.batch_size]
    configs += [("graph opt basic", {"level": "basic"}), ("graph opt extended", {"level": "extended"})]
    configs += [("2 threads, 1 process", {"threads": 2}), ("nearest resize", {"resample": nearest})]

    sessions = {}
    runs: dict[str, list[float]] = {name: [] for name, _ in configs}
    for _ in range(args.repeats):
        for name, change in configs:
            c = {**default, **change}
            key = (c["threads"], c["level"])
            if key not in sessions:
                sessions[key] = make_session(model, *key)
                rate(datas[: c["batch"]], size, c["batch"], sessions[key], c["resample"])  # warm-up
            runs[name].append(rate(datas, size, c["batch"], sessions[key], c["resample"]))
    base = benchlib.median(runs["default"])
    rows = [{"config": name, "img_s": round(benchlib.median(v), 1),
             "vs_default": round(benchlib.median(v) / base, 3)} for name, v in runs.items()]
    print(benchlib.table([[r["config"], r["img_s"], f"{r['vs_default']:.2f}x"] for r in rows],
                         ["knob (one change from the default)", "img/s", "vs default"]))
    print(f"\n{len(datas)} images at {size} px; default: batch {cfg.batch_size}, graph opt all, 1 ORT thread, "
          f"bilinear; median of {args.repeats} interleaved runs; {os.cpu_count()} cores")
    benchlib.record("tuning", {"images": len(datas), "image_size": size, "repeats": args.repeats, "rows": rows},
                    args.json)


if __name__ == "__main__":
    main()
