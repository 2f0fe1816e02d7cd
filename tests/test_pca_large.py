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
