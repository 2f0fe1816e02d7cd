"""The drift reference of a model being trained: its held-out rows as the final model answers them.

``canestra train`` calls :func:`drift_reference` once, after the "unknown" thresholds are
calibrated: the held-out rows' first PCA components (read in the same pass that scores them), their
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


def _sample(table: pd.DataFrame, rule, categories: list[str]) -> tuple[Sample, int]:
    """Scored rows (no thresholds applied yet) answered as the final rule answers them: a drift Sample
    and its number of ``unknown`` answers."""
    energy = table["energy"].to_numpy(dtype=np.float64)
    fruitness = table["fruitness"].to_numpy(dtype=np.float64)
    unknown = (table["predicted_label"] == UNKNOWN).to_numpy()
    if rule.energy_threshold is not None:
        unknown |= energy < rule.energy_threshold
    if rule.fruitness_threshold is not None:
        unknown |= fruitness < rule.fruitness_threshold
    families = np.where(unknown, "", table["family"].fillna("").astype(str).to_numpy())
    pca = np.stack(table["pca_head"].to_numpy()) if len(table) else np.zeros((0, PCA_HEAD))
    return Sample.from_answers(pca, energy, fruitness, list(families), categories), int(unknown.sum())


def drift_reference(rows: pd.DataFrame, rule, seed: int, benign: pd.DataFrame | None = None
                    ) -> dict[str, Any] | None:
    """The reference JSON for the model folder; None when there are fewer than 2 held-out rows.

    ``rows``: the held-out rows scored without the energy/fruitness thresholds (``image_id``,
    ``predicted_label``, ``family``, ``energy``, ``fruitness``, ``pca_head``); ``rule``: the final answer
    rule, whose thresholds are applied here as ``answer.rule.decide`` applies them. ``benign``: the
    held-out images under the shift evaluation's seeded changes of light, colour, angle, scale and blur,
    scored the same way (the thresholds' second calibration, ``canestra.drift.stats``); None with
    ``--no-shift-eval``: the thresholds then come from the held-out rows alone and flag other capture
    sessions more often (docs/monitoring.md).
    """
    table = rows.drop_duplicates("image_id")
    if len(table) < 2:
        return None
    categories = sorted({f for f in rule.families if f}) + [UNKNOWN_CATEGORY]
    sample, n_unknown = _sample(table, rule, categories)
    ref = build_reference(sample, categories, benign=None if benign is None else _sample(benign, rule, categories)[0],
                          seed=seed)
    out = ref.to_json()
    out["held_out_answers"] = {"unknown": n_unknown, "rows": int(len(table))}
    return out
