"""Driver state that must not grow with the number of images or partitions (docs/scaling.md § 5)."""

from __future__ import annotations

import numpy as np


def test_imagenet_class_means_merged_on_executors(spark, monkeypatch):
    """Per-label ImageNet means are exact over many partitions, and the driver receives one row per
    label, not one per label and partition (at 10x the sample that was ~80 MB of Python floats)."""
    from pyspark.ml.linalg import Vectors

    from canestra.answer.rule import imagenet_probabilities
    from canestra.pipeline.evaluation import imagenet_class_means
    from canestra.vision.backbone import FEATURE_DIM

    rng = np.random.default_rng(3)
    labels = np.array(["Banana", "Kiwi", "Lemon"])[rng.integers(0, 3, 240)]
    feats = rng.normal(0, 1, (240, FEATURE_DIM)).astype(np.float32)
    df = spark.createDataFrame([(str(lb), Vectors.dense(f.astype(float))) for lb, f in zip(labels, feats)],
                               ["label", "features"]).repartition(12)
    assert df.rdd.getNumPartitions() == 12

    collected: list[int] = []
    real_collect = type(df).collect

    def counting_collect(self):
        rows = real_collect(self)
        collected.append(len(rows))
        return rows

    monkeypatch.setattr(type(df), "collect", counting_collect)
    got_labels, means = imagenet_class_means(df, 0)

    assert got_labels == ["Banana", "Kiwi", "Lemon"]
    p = imagenet_probabilities(feats, 0)
    expected = np.stack([p[labels == lb].mean(axis=0) for lb in got_labels])
    np.testing.assert_allclose(means, expected, rtol=1e-9, atol=1e-12)
    assert collected == [3], f"the driver collected {collected} rows, expected one per label"
