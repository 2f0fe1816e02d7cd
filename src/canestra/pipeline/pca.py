"""PCA for the training features: Spark's ``PCAModel`` stage, with the decomposition done by numpy.

Spark's own ``PCA.fit`` decomposes the d x d covariance in the JVM (breeze), slow for the
2,560-d embedding and heavy on the driver's heap; here numpy does it and the result is
wrapped back into the same ``PCAModel`` stage, so saved models are unchanged.
"""

from __future__ import annotations

import numpy as np

from canestra.config import Settings

_DRIVER_PCA_MAX_VALUES = 16_000_000  # rows x dims (128 MB of float64) under which PCA runs on the driver


def _pca_model(spark, pc: np.ndarray, explained: np.ndarray, k: int):
    """A Spark ``PCAModel`` (the same stage Spark's PCA fits) from components computed on the driver."""
    from pyspark.ml.common import _py2java
    from pyspark.ml.feature import PCAModel
    from pyspark.ml.linalg import DenseMatrix, DenseVector

    sc = spark.sparkContext
    d = pc.shape[0]
    jpc = _py2java(sc, DenseMatrix(d, k, np.asarray(pc[:, :k], dtype=np.float64).flatten(order="F").tolist()))
    jev = _py2java(sc, DenseVector(np.asarray(explained[:k], dtype=np.float64).tolist()))
    model = PCAModel(sc._jvm.org.apache.spark.ml.feature.PCAModel(PCAModel._randomUID(), jpc, jev))
    model._set(k=k, inputCol="features", outputCol="pca")
    model._transfer_params_to_java()
    return model


def _choose_k(ratio: np.ndarray, cfg: Settings, max_k: int) -> int:
    if cfg.pca_variance is None:
        return min(cfg.pca_k or max_k, max_k)
    return int(min(max_k, np.searchsorted(np.cumsum(ratio), cfg.pca_variance) + 1))


def fit_pca(train_df, cfg: Settings, input_dim: int, n_train: int):
    """Fit PCA with ``pca_k`` components, or the fewest reaching ``pca_variance``.

    Small training sets (rows x dims up to 16 M) are decomposed on the driver with numpy:
    Spark's PCA always decomposes the d x d covariance in the JVM, 50 s for the 2,560-d
    embedding even on the 254-image bundled sample, against 0.3 s for an SVD of the rows.
    Larger sets: Spark aggregates the covariance, numpy decomposes it. Both give Spark's ``PCAModel``.

    Never more than ``n_train - 1`` components: n centred rows span at most n - 1
    directions, the rest is numerical noise, and on the 253-image bundled sample those
    noise components made the classifier's L-BFGS fail (every image one class).
    """
    max_k = max(1, min(input_dim, n_train - 1))
    if n_train * input_dim <= _DRIVER_PCA_MAX_VALUES:
        x = np.stack([r.features.toArray() for r in train_df.select("features").collect()])
        x -= x.mean(axis=0)
        _, sv, vt = np.linalg.svd(x, full_matrices=False)
        var = sv ** 2
        ratio = var / var.sum() if var.sum() > 0 else var
        k = _choose_k(ratio, cfg, max_k)
        return _pca_model(train_df.sparkSession, vt.T, ratio, k)
    # Spark aggregates the d x d covariance over the rows; the driver decomposes it with numpy.
    # Spark's own PCA.fit decomposes it in the JVM instead (breeze SVD, ~0.5 GB of heap for
    # d = 2,560), which ran a 4 GB driver out of heap at 136,800 images with the features cached.
    ratio, components = _covariance_spectrum(train_df)
    k = _choose_k(ratio, cfg, max_k)
    return _pca_model(train_df.sparkSession, components, ratio, k)


def _covariance_spectrum(train_df) -> tuple[np.ndarray, np.ndarray]:
    """Explained-variance ratios (descending) and the matching unit eigenvectors of the covariance of
    ``features``: what Spark's PCA computes, with only the d x d matrix reaching the driver."""
    from pyspark.ml.stat import Correlation, Summarizer

    corr = np.nan_to_num(Correlation.corr(train_df, "features").first()[0].toArray())  # type: ignore[index]
    var = train_df.select(Summarizer.variance(train_df["features"])).first()[0].toArray()  # type: ignore[index]
    sd = np.sqrt(np.clip(var, 0.0, None))
    eigval, eigvec = np.linalg.eigh(corr * np.outer(sd, sd))  # corr of a constant dim is NaN, set to 0 above
    order = np.argsort(eigval)[::-1]
    eigval = np.clip(eigval[order], 0.0, None)
    total = eigval.sum()
    return (eigval / total if total > 0 else eigval), eigvec[:, order]
