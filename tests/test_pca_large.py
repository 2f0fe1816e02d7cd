"""The large-set PCA path (Spark aggregates the covariance, numpy decomposes it) agrees with the
small-set path (numpy SVD of the rows) on the same features: same spectrum, same components up
to sign."""

from __future__ import annotations

import os

import numpy as np

from canestra.config import Settings
from canestra.pipeline import pca as pca_mod


def _components(model) -> np.ndarray:
    return model.pc.toArray()


def test_covariance_path_matches_the_row_svd(spark, trained, monkeypatch):
    feats = spark.read.parquet(os.path.join(trained.out_dir, "features")).where("split = 'train'")
    n = feats.count()
    cfg = Settings.load(pca_k=8)
    small = pca_mod.fit_pca(feats, cfg, 2560, n)
    monkeypatch.setattr(pca_mod, "_DRIVER_PCA_MAX_VALUES", 0)  # force the large-set path
    large = pca_mod.fit_pca(feats, cfg, 2560, n)
    assert large.getK() == small.getK() == 8
    np.testing.assert_allclose(large.explainedVariance.toArray(), small.explainedVariance.toArray(), rtol=1e-5)
    cos = np.abs(np.sum(_components(large) * _components(small), axis=0))  # unit columns: |cos| = 1 when equal
    np.testing.assert_allclose(cos, np.ones(8), atol=1e-5)


def test_covariance_path_honours_a_variance_target(spark, trained, monkeypatch):
    feats = spark.read.parquet(os.path.join(trained.out_dir, "features")).where("split = 'train'")
    n = feats.count()
    monkeypatch.setattr(pca_mod, "_DRIVER_PCA_MAX_VALUES", 0)
    model = pca_mod.fit_pca(feats, Settings.load(pca_variance=0.8), 2560, n)
    ev = model.explainedVariance.toArray()
    assert ev.sum() >= 0.8 and ev[:-1].sum() < 0.8


def test_scatter_merges_partials_in_a_tree_and_matches_numpy(spark, monkeypatch):
    """Five partials merged two at a time (5 -> 3 -> 2 -> driver) give numpy's mean and scatter,
    also for data far from the origin (where summing raw squares would lose the digits)."""
    from pyspark.ml.linalg import Vectors

    rng = np.random.default_rng(3)
    x = rng.normal(size=(3000, 6)) * [1, 2, 3, 0.5, 0.1, 0.0] + 1e4
    df = spark.createDataFrame([(Vectors.dense(r),) for r in x], ["features"]).repartition(7)
    monkeypatch.setattr(pca_mod, "_MERGE_FAN_IN", 2)
    monkeypatch.setattr(pca_mod, "_CHUNK_ROWS", 100)
    n, mean, m2 = pca_mod.scatter(df, "features", tasks=5)
    xc = x - x.mean(axis=0)
    assert n == 3000
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(m2, xc.T @ xc, rtol=1e-8, atol=1e-6)
