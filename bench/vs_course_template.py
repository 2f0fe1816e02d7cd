"""canestra vs the course's EMR template, same images, same cores, one run.

The template (replicated here, not imported): Keras MobileNetV2 at 224 px without its
top layer, weights broadcast from the driver as numpy arrays, the model rebuilt inside
an iterator pandas UDF (``model.predict`` per Arrow batch), images read with Spark's
``binaryFile`` source, ``repartition(20)``, features written as Parquet ``array<float>``.
ImageNet weights cannot be downloaded here, so the replica uses random weights:
throughput, not accuracy, is compared.

canestra runs its full path from the same files, as ``canestra train`` does it (the public API,
on the same Spark session, into a new output folder each time, so its feature store is empty and
every image is embedded): ``ingest`` (read, validate, strip metadata) then ``featurize`` (the
feature store's work included), timed by train's own stages -- more work than the template does.
Train's fit and evaluate also run, untimed, with a cheap model (see bench/featurize_vs_bare.py).

Needs TensorFlow (bench-only: ``pip install -e '.[bench]'`` in a separate venv, see
docs/performance.md); it is never a runtime dependency.

    python bench/vs_course_template.py [--images DIR] [--limit 2052] [--json]
"""

# No `from __future__ import annotations`: Spark reads the UDF's type hints at run time.
import argparse
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import benchlib
import pandas as pd

TEMPLATE_SIZE = 224
TEMPLATE_PARTITIONS = 20
TEMPLATE_ARROW_BATCH = 1024


def template_features(spark, images: str, out: str) -> None:
    """The course template's featurization, step by step."""
    import numpy as np
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tensorflow.keras import Model
    from tensorflow.keras.applications.mobilenet_v2 import MobileNetV2

    def build():
        base = MobileNetV2(weights=None, include_top=True, input_shape=(TEMPLATE_SIZE, TEMPLATE_SIZE, 3))
        for layer in base.layers:
            layer.trainable = False
        return Model(inputs=base.input, outputs=base.layers[-2].output)

    weights = spark.sparkContext.broadcast(build().get_weights())

    def featurize(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        import io

        from PIL import Image
        from tensorflow.keras.applications.mobilenet_v2 import preprocess_input

        model = build()
        model.set_weights(weights.value)
        for content in batches:
            arrs = []
            for data in content:
                img = Image.open(io.BytesIO(data)).convert("RGB").resize([TEMPLATE_SIZE, TEMPLATE_SIZE])
                arrs.append(preprocess_input(np.asarray(img, dtype=np.float32)))
            preds = model.predict(np.stack(arrs), verbose=0)
            yield pd.Series([p.flatten() for p in preds])

    udf = pandas_udf(featurize, "array<float>")
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(TEMPLATE_ARROW_BATCH))
    df = (spark.read.format("binaryFile").option("pathGlobFilter", "*.jpg")
          .option("recursiveFileLookup", "true").load(images))
    df = df.withColumn("label", F.element_at(F.split(df["path"], "/"), -2))
    (df.repartition(TEMPLATE_PARTITIONS).select("path", "label", udf("content").alias("features"))
     .write.mode("overwrite").parquet(out))
    weights.unpersist()


def canestra_features(spark, images: str, work: Path, sizes, precision: str | None = None) -> tuple[float, int]:
    """Seconds of ``canestra train``'s ingest and featurize stages into ``work`` (a new folder: an
    empty feature store, every image embedded), and the images it took."""
    from featurize_vs_bare import train_featurize

    from canestra.config import Settings

    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(Settings().arrow_batch))  # the template sets its own
    opts = {k: v for k, v in (("image_sizes", sizes), ("precision", precision)) if v is not None}
    timings, counts = train_featurize(spark, images, str(work), opts)
    if counts["reused"]:
        raise SystemExit(f"{work}: the feature store was not empty ({counts['reused']} vectors reused)")
    return timings["ingest"] + timings["featurize"], counts["images"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default=benchlib.default_images())
    ap.add_argument("--limit", type=int, default=2052, help="images (spread over classes); 0 = all (default 2052)")
    ap.add_argument("--repeats", type=int, default=1, help="alternating rounds (default 1)")
    ap.add_argument("--workdir", help="keep outputs here (default: a temp dir, removed)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    benchlib.setup_env()
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        raise SystemExit("TensorFlow is not installed: this bench needs the bench extra in its own venv "
                         "(python3 -m venv .venv-bench && .venv-bench/bin/pip install -e '.[bench]')") from None
    from canestra.sparkctx import get_spark

    work = Path(args.workdir or tempfile.mkdtemp(prefix="canestra-vs-template-"))
    files = benchlib.list_subset(args.images, args.limit or None)
    images = benchlib.link_subset(files, work / "images") if args.limit else args.images
    n = len(files)
    spark = get_spark("local[*]", app_name="bench-vs-template")
    # Start the Python workers once so neither side pays for it alone.
    spark.range(4).repartition(2).rdd.map(lambda x: x).count()

    runs = {"template_224": [], "canestra_224": [], "canestra_224_int8": [], "canestra_default": []}
    args_of = {"canestra_224": ("224", "fp32"), "canestra_224_int8": ("224", "int8"), "canestra_default": (None, None)}
    for r in range(args.repeats):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            if name == "template_224":
                with benchlib.Timer() as tm:
                    template_features(spark, images, str(work / "template"))
                seconds = tm.seconds
            else:
                seconds, _ = canestra_features(spark, images, work / f"{name}-{r + 1}", *args_of[name])
            runs[name].append(n / seconds)
            print(f"round {r + 1}: {name:17s} {n / seconds:7.1f} img/s  ({seconds:.1f} s)", flush=True)
    spark.stop()

    med = {k: benchlib.median(v) for k, v in runs.items()}
    from canestra.config import Settings

    default_sizes = "+".join(map(str, Settings().image_sizes))
    result = {
        "images": n,
        "template": {"framework": "tensorflow-keras", "model": "MobileNetV2 (random weights)", "size": TEMPLATE_SIZE,
                     "partitions": TEMPLATE_PARTITIONS, "arrow_batch": TEMPLATE_ARROW_BATCH},
        "img_s": {k: round(v, 1) for k, v in med.items()},
        "multiple_at_224": round(med["canestra_224"] / med["template_224"], 2),
        "multiple_at_224_int8": round(med["canestra_224_int8"] / med["template_224"], 2),
        "multiple_at_default": round(med["canestra_default"] / med["template_224"], 2),
        "canestra_default_sizes": default_sizes,
        "target": "multiple at 224 >= 4 (int8: top-1 within 0.2 points of fp32, docs/performance.md)",
    }
    print()
    print(benchlib.table([["course template (Keras MobileNetV2)", 224, round(med["template_224"], 1), "1.00x"],
                          ["canestra (ingest + featurize)", 224, round(med["canestra_224"], 1),
                           f"{result['multiple_at_224']:.2f}x"],
                          ["canestra --precision int8", 224, round(med["canestra_224_int8"], 1),
                           f"{result['multiple_at_224_int8']:.2f}x"],
                          ["canestra, default settings", default_sizes, round(med["canestra_default"], 1),
                           f"{result['multiple_at_default']:.2f}x"]],
                         ["pipeline", "px", "img/s", "vs template"]))
    print(f"\n{n} images, local[*] on {os.cpu_count()} cores; target: >= 4x at 224 px")
    benchlib.record("vs_course_template", result, args.json)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
