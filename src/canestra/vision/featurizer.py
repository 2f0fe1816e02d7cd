"""ImageFeaturizer: a Spark ML Transformer, image bytes -> CNN embedding vector.

Inference runs in an iterator pandas UDF: the ONNX Runtime session is created
once per Python worker (``backbone.session`` caches it, and Spark reuses
workers), then every Arrow batch is decoded and pushed through the network in
sub-batches of ``batchSize``. Images that cannot be decoded give a null vector;
``canestra predict`` quarantines them before they reach the model.
"""

# No `from __future__ import annotations` here: Spark reads the UDF's type
# hints at run time to know it is an iterator pandas UDF.
from collections.abc import Iterator

import numpy as np
import pandas as pd
from pyspark import keyword_only
from pyspark.ml import Transformer
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasInputCol, HasOutputCol
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable

from canestra.vision import backbone

__all__ = ["ImageFeaturizer"]

DEFAULT_IMAGE_SIZES = [224]  # see docs/outside-the-studio.md section 7
DEFAULT_BATCH_SIZE = 64


def _embed_series_factory(sizes, batch_size: int, threads: int, model_path, precision: str = "fp32",
                          fit: str = "crop", with_block: bool = False):
    """The UDF's body: each image's embedding, then (``with_block``) the graph's ``block`` output appended."""

    def embed_batches(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        from canestra.vision.images import BadImage, decode_rgb

        path = model_path or backbone.model_path(precision)  # on the executor: its own cache

        for contents in batches:
            out: list = [None] * len(contents)
            pending_idx: list[int] = []
            pending_img: list = []

            def flush(out=out, pending_idx=pending_idx, pending_img=pending_img) -> None:  # this batch's lists
                if pending_img:
                    feats = backbone.embed(pending_img, sizes, path, threads, fit=fit, with_block=with_block)
                    if with_block:
                        feats = np.concatenate(feats, axis=1)
                    for j, i in enumerate(pending_idx):
                        out[i] = feats[j]
                    pending_idx.clear()
                    pending_img.clear()

            for i, data in enumerate(contents):
                if data is None:
                    continue
                try:
                    pending_img.append(decode_rgb(bytes(data)))
                except BadImage:
                    continue
                pending_idx.append(i)
                if len(pending_img) >= batch_size:
                    flush()
            flush()
            yield pd.Series([None if v is None else v.astype(np.float32, copy=False) for v in out])

    return embed_batches


class ImageFeaturizer(Transformer, HasInputCol, HasOutputCol, DefaultParamsReadable, DefaultParamsWritable):
    """Embed encoded images (binary column) with ImageNet EfficientNet-Lite0.

    >>> ImageFeaturizer(inputCol="content", outputCol="features", imageSizes=[100]).transform(df)
    """

    batchSize = Param(Params._dummy(), "batchSize", "images per ONNX Runtime call", TypeConverters.toInt)
    imageSizes = Param(
        Params._dummy(),
        "imageSizes",
        "square input sizes in pixels; several sizes concatenate their embeddings",
        TypeConverters.toListInt,
    )
    threads = Param(Params._dummy(), "threads", "ONNX Runtime intra-op threads per Spark task", TypeConverters.toInt)
    modelPath = Param(
        Params._dummy(), "modelPath", "ONNX file; empty = the built-in EfficientNet-Lite0", TypeConverters.toString
    )
    backboneName = Param(Params._dummy(), "backboneName", "name of the pretrained network", TypeConverters.toString)
    precision = Param(Params._dummy(), "precision", "fp32, or int8 (static quantization, faster)", TypeConverters.toString)
    inputFit = Param(Params._dummy(), "inputFit", "non-square photos: crop (centre square) or squash",
                     TypeConverters.toString)
    blockCol = Param(Params._dummy(), "blockCol", "column for the last block's pooled output (the answer head's "
                     "input); empty = none", TypeConverters.toString)

    @keyword_only
    def __init__(
        self,
        *,
        inputCol: str = "content",
        outputCol: str = "features",
        batchSize: int = DEFAULT_BATCH_SIZE,
        imageSizes=None,
        threads: int = 1,
        modelPath: str = "",
        backboneName: str = backbone.MODEL_NAME,
        precision: str = "fp32",
        inputFit: str = "crop",
        blockCol: str = "",
    ):
        super().__init__()
        self._setDefault(
            inputCol="content",
            outputCol="features",
            batchSize=DEFAULT_BATCH_SIZE,
            imageSizes=list(DEFAULT_IMAGE_SIZES),
            threads=1,
            modelPath="",
            backboneName=backbone.MODEL_NAME,
            precision="fp32",
            inputFit="crop",
            blockCol="",
        )
        kwargs = dict(self._input_kwargs)  # type: ignore[attr-defined]  # set by @keyword_only
        if kwargs.get("imageSizes") is None:
            kwargs.pop("imageSizes", None)
        self._set(**kwargs)

    def featureDim(self) -> int:
        return backbone.FEATURE_DIM * len(self.getOrDefault(self.imageSizes))

    def _transform(self, dataset):
        from pyspark.ml.functions import array_to_vector
        from pyspark.sql import functions as F
        from pyspark.sql.types import ArrayType, FloatType

        block_col = self.getOrDefault(self.blockCol)
        fn = _embed_series_factory(
            tuple(self.getOrDefault(self.imageSizes)),
            self.getOrDefault(self.batchSize),
            self.getOrDefault(self.threads),
            self.getOrDefault(self.modelPath) or None,
            self.getOrDefault(self.precision),
            self.getOrDefault(self.inputFit),
            with_block=bool(block_col),
        )
        udf = F.pandas_udf(fn, returnType=ArrayType(FloatType()))
        embedded = udf(F.col(self.getInputCol()))
        if not block_col:
            return dataset.withColumn(self.getOutputCol(), array_to_vector(embedded))
        # One CNN pass for both columns: the UDF's array is [embedding | block], split here.
        n = self.featureDim()
        tmp = "_canestra_embedding"
        return (dataset.withColumn(tmp, embedded)
                .withColumn(self.getOutputCol(), array_to_vector(F.slice(F.col(tmp), 1, n)))
                .withColumn(block_col, array_to_vector(F.slice(F.col(tmp), F.lit(n + 1), F.size(tmp) - n)))
                .drop(tmp))
