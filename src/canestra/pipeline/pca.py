"""PCA for the training features: Spark's ``PCAModel`` stage, with the decomposition done by numpy.

Spark's own ``PCA.fit`` decomposes the d x d covariance in the JVM (breeze), slow for the
2,560-d embedding and heavy on the driver's heap; here numpy does it and the result is
wrapped back into the same ``PCAModel`` stage, so saved models are unchanged.
"""

from __future__ import annotations

import numpy as np

from canestra.config import Settings

__all__ = ["fit_pca"]

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
    Larger sets: the Python workers sum the covariance (``scatter``), numpy decomposes it. Both give Spark's ``PCAModel``.

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
    # The Python workers sum the d x d covariance over the rows; the driver decomposes it with numpy.
    # Spark's own PCA.fit decomposes it in the JVM instead (breeze SVD, ~0.5 GB of heap for
    # d = 2,560), which ran a 4 GB driver out of heap at 136,800 images.
    ratio, components = _covariance_spectrum(train_df)
    k = _choose_k(ratio, cfg, max_k)
    return _pca_model(train_df.sparkSession, components, ratio, k)


def _covariance_spectrum(train_df) -> tuple[np.ndarray, np.ndarray]:
    """Explained-variance ratios (descending) and the matching unit eigenvectors of the covariance of
    ``features``: what Spark's PCA computes, with only the d x d matrix reaching the driver."""
    n, _, m2 = scatter(train_df, "features")
    eigval, eigvec = np.linalg.eigh(m2)  # the scatter's eigenvectors are the covariance's
    eigval = eigval / max(1, n - 1)
    order = np.argsort(eigval)[::-1]
    eigval = np.clip(eigval[order], 0.0, None)
    total = eigval.sum()
    return (eigval / total if total > 0 else eigval), eigvec[:, order]


_SCATTER_SCHEMA = "n long, mean binary, m2 binary"
_MERGE_FAN_IN = 4  # partial d x d matrices (52 MB each at d = 2,560) combined per merge task
_CHUNK_ROWS = 2048  # rows per matrix product: Arrow hands batches of 256, too small for BLAS to run at speed


def _merge(a: tuple, b: tuple) -> tuple:
    """Combine (n, mean, centred scatter) of two row sets (Chan et al.): exact, no large-mean cancellation."""
    na, ma, sa = a
    nb, mb, sb = b
    if na == 0:  # the first partial becomes the (writable) accumulator
        return nb, np.array(mb), np.array(sb)
    n = na + nb
    delta = mb - ma
    sa += sb
    sa += np.outer(delta, delta) * (na * nb / n)
    return n, ma + delta * (nb / n), sa


def _pack(part: tuple):
    import pyarrow as pa

    n, mean, m2 = part
    return pa.RecordBatch.from_pydict({"n": [n], "mean": [mean.tobytes()], "m2": [m2.tobytes()]},
                                      schema=pa.schema([("n", pa.int64()), ("mean", pa.binary()), ("m2", pa.binary())]))


def _unpack(n, mean, m2) -> tuple:
    d = len(mean) // 8
    return int(n), np.frombuffer(mean, dtype=np.float64), np.frombuffer(m2, dtype=np.float64).reshape(d, d)


def _scatter_partition(batches):
    """One partition's (n, mean, centred scatter) of the array column, in chunks of ``_CHUNK_ROWS``."""
    acc: tuple = (0, None, None)
    chunk: list[np.ndarray] = []
    rows = 0

    def flush(acc):
        x = np.concatenate(chunk)
        mean = x.mean(axis=0)
        x -= mean
        return _merge(acc, (len(x), mean, x.T @ x))

    for batch in batches:
        if batch.num_rows == 0:
            continue
        chunk.append(batch.column(0).flatten().to_numpy(zero_copy_only=False).reshape(batch.num_rows, -1))
        rows += batch.num_rows
        if rows >= _CHUNK_ROWS:
            acc, chunk, rows = flush(acc), [], 0
    if chunk:
        acc = flush(acc)
    if acc[0]:
        yield _pack(acc)


def _merge_partition(batches):
    acc: tuple = (0, None, None)
    for batch in batches:
        for n, mean, m2 in zip(*(batch.column(i).to_pylist() for i in range(3))):
            acc = _merge(acc, _unpack(n, mean, m2))
    if acc[0]:
        yield _pack(acc)


def scatter(df, col: str, tasks: int | None = None) -> tuple[int, np.ndarray, np.ndarray]:
    """(rows, mean, centred scatter matrix) of the vector column ``col``, computed on the Python workers.

    Each task multiplies its rows with numpy (BLAS) and returns one d x d partial; partials are
    merged on the executors in a tree, ``_MERGE_FAN_IN`` at a time, so the driver receives one
    (52 MB at d = 2,560, read-only) whatever the row count. Spark's own aggregators (``Correlation.corr``, ``PCA.fit``)
    hold dense d x d buffers per task on the JVM heap: at 136,800 images they ran the 4 GB local
    driver out of memory beside the features being read.
    """
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql.functions import col as column

    width = max(1, tasks or df.sparkSession.sparkContext.defaultParallelism)
    # One task per core reads its share of the rows: partials stay as few as the cores.
    parts = df.select(vector_to_array(column(col)).alias("x")).coalesce(width) \
        .mapInArrow(_scatter_partition, _SCATTER_SCHEMA)
    while width > 1:
        width = -(-width // _MERGE_FAN_IN)
        parts = parts.repartition(width).mapInArrow(_merge_partition, _SCATTER_SCHEMA)
    rows = parts.collect()
    if not rows:
        raise ValueError(f"no rows in {col}: cannot fit PCA")
    return _unpack(rows[0]["n"], rows[0]["mean"], rows[0]["m2"])
