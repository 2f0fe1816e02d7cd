"""The drift reference of a model being trained: its held-out rows as the final model answers them.

``canestra train`` calls :func:`drift_reference` once, after the "unknown" thresholds are
calibrated: the held-out rows' first PCA components (one Spark pass of the fitted PCA), their
energy and fruitness and, from the final rule, their family or ``unknown``. ``canestra.drift``
(numpy, no Spark) summarises them and calibrates the drift thresholds; the result is saved as
plain JSON in the model folder (``canestra.model.DRIFT_REFERENCE``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from canestra.answer.taxonomy import UNKNOWN
from canestra.drift.stats import PCA_HEAD, UNKNOWN_CATEGORY, Sample, build_reference

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["drift_reference", "pca_head_column"]


def pca_head_column(pca_col: str, k: int = PCA_HEAD):
    """The first ``k`` components of a PCA vector column as array<float> (the predictions' ``pca_head``)."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    return F.slice(vector_to_array(F.col(pca_col), "float32"), 1, k)


MAX_BENIGN = 2000  # held-out images re-scored under benign changes at most (a seeded sample beyond)


def _benign_changes(spark, model, catalog_path: str, n_held_out: int, categories: list[str], seed: int) -> Sample:
    """The final model's answers on held-out images under the shift evaluation's seeded changes of light,
    colour, angle, scale and blur (``evaluation.perturbed``): what ordinary capture changes do to the scores."""
    from canestra.pipeline.evaluation import perturbed

    pca = next(s for s in model.stages if type(s).__name__ == "PCAModel")
    test = spark.read.parquet(catalog_path).where("split = 'test'").select("image_id", "content")
    if n_held_out > MAX_BENIGN:
        test = test.sample(fraction=MAX_BENIGN / n_held_out, seed=seed)
    got = (model.transform(perturbed(test))
           .select("predicted_label", "family", "energy", "fruitness",
                   pca_head_column(pca.getOutputCol()).alias("pca_head")).toPandas())
    unknown = (got["predicted_label"] == UNKNOWN).to_numpy()
    families = np.where(unknown, "", got["family"].fillna("").astype(str).to_numpy())
    return Sample.from_answers(np.stack(got["pca_head"].to_numpy()) if len(got) else np.zeros((0, PCA_HEAD)),
                               got["energy"].to_numpy(dtype=np.float64), got["fruitness"].to_numpy(dtype=np.float64),
                               list(families), categories)


def drift_reference(model, catalog_path: str, held_out_df, rows: pd.DataFrame, rule, seed: int
                    ) -> dict[str, Any] | None:
    """The reference JSON for the model folder; None when there are fewer than 2 held-out rows.

    ``model``: the final PipelineModel; ``held_out_df``: the held-out rows of the features table;
    ``rows``: those rows scored without the energy/fruitness thresholds (``image_id``, ``predicted_label``,
    ``family``, ``energy``, ``fruitness``); ``rule``: the final answer rule, whose thresholds are applied
    here as ``answer.rule.decide`` applies them. The held-out images of ``catalog_path`` are also scored
    under benign changes (the thresholds' second calibration, ``canestra.drift.stats``).
    """
    pca_model = next(s for s in model.stages if type(s).__name__ == "PCAModel")
    heads = (pca_model.transform(held_out_df).select("image_id", pca_head_column(pca_model.getOutputCol())
                                                     .alias("pca_head")).toPandas())
    table = rows.drop_duplicates("image_id").merge(heads.drop_duplicates("image_id"), on="image_id", how="inner")
    if len(table) < 2:
        return None
    energy = table["energy"].to_numpy(dtype=np.float64)
    fruitness = table["fruitness"].to_numpy(dtype=np.float64)
    unknown = (table["predicted_label"] == UNKNOWN).to_numpy()
    if rule.energy_threshold is not None:
        unknown |= energy < rule.energy_threshold
    if rule.fruitness_threshold is not None:
        unknown |= fruitness < rule.fruitness_threshold
    families = np.where(unknown, "", table["family"].fillna("").astype(str).to_numpy())
    categories = sorted({f for f in rule.families if f}) + [UNKNOWN_CATEGORY]
    sample = Sample.from_answers(np.stack(table["pca_head"].to_numpy()), energy, fruitness, list(families),
                                 categories)
    benign = _benign_changes(held_out_df.sparkSession, model, catalog_path, len(table), categories, seed)
    ref = build_reference(sample, categories, benign=benign, seed=seed)
    out = ref.to_json()
    out["held_out_answers"] = {"unknown": int(unknown.sum()), "rows": int(len(table))}
    return out
