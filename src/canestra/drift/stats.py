"""Drift statistics: what a model's held-out answers looked like, and how far a window of new answers is from it.

Spark-free (numpy only): ``canestra train`` builds a :class:`Reference` from its held-out rows
(``canestra.pipeline.reference``), ``canestra monitor`` scores windows of the predictions table
against it, and ``canestra serve`` scores its own rolling windows with the same :func:`scores`.

Six statistics, one score each (0 = the window looks like the held-out rows):

- ``pca_mean``: root mean square, over the first ``PCA_HEAD`` PCA components, of the window mean's
  distance from the held-out mean in held-out standard deviations (where the images sit);
- ``pca_spread``: mean over those components of ``|ln(window sd / held-out sd)|`` (how varied they are);
- ``family_mix``: total variation distance between the window's answers by family (``unknown`` one
  of them) and the held-out answers';
- ``unknown_rate``: how much more often the window is answered ``unknown`` (one-sided: fewer is no alarm);
- ``energy`` / ``fruitness``: one-sided Kolmogorov-Smirnov distance ``max(F_window - F_held_out)``: how much
  more of the window sits at low classifier energy / low ImageNet fruit mass (the two scores of the
  "unknown" rule; images that fit the classes *better* than held-out ones raise no alarm).

Thresholds are calibrated when the reference is built, per window size in ``WINDOW_GRID``: each
statistic's score on ``REPLICATES`` bootstrap windows drawn from the held-out rows, scored against a
bootstrap resample of those same rows (so the threshold covers the noise of the reference itself, not
only the window's), and the threshold is that null distribution's ``1 - FALSE_ALARM / 6`` quantile: at
most ``FALSE_ALARM`` (1 %) of windows like the held-out ones raise any alarm (a Bonferroni bound over
the six statistics). The unknown rate's windows are drawn from its binomial with a Jeffreys-smoothed rate,
so a small held-out set with no ``unknown`` answer does not make a single one an alarm.

Held-out images sit close to the training images (Fruits-360's held-out frames are neighbours of
training frames), so new photos of the same studio read a little less sure than they do, and a test
calibrated on them alone flags them (measured: 57 % of windows of unseen studio frames, on energy;
docs/monitoring.md). So each threshold is also calibrated on *benign changes*: the held-out images
re-scored under the seeded changes of light, colour, angle, scale and blur of the training's shift
evaluation (``pipeline.evaluation.perturbed``), windows of them scored against the same reference
resamples, the same quantile; the threshold is the larger of the two. Drift then means "further from
the held-out images than ordinary changes of capture take them".
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DEFAULT_WINDOW", "FALSE_ALARM", "MIN_WINDOW", "PCA_HEAD", "STATISTICS", "UNKNOWN_CATEGORY",
           "WINDOW_GRID", "Reference", "Sample", "build_reference", "scores"]

STATISTICS = ("pca_mean", "pca_spread", "family_mix", "unknown_rate", "energy", "fruitness")
PCA_HEAD = 16  # PCA components kept per prediction (the predictions' pca_head column)
LEVELS = np.linspace(0.0, 1.0, 101)  # quantile levels of the energy and fruitness distributions
WINDOW_GRID = (25, 50, 100, 200, 500, 1000, 2000)  # window sizes the thresholds are calibrated for
MIN_WINDOW = WINDOW_GRID[0]
DEFAULT_WINDOW = 100
FALSE_ALARM = 0.01  # target share of no-drift windows flagged (over all six statistics)
REPLICATES = 2000
MAX_ROWS = 20_000  # held-out rows a reference is built from at most (a seeded sample beyond)
UNKNOWN_CATEGORY = "unknown"  # the family_mix category of `unknown` answers (their family is "")
FORMAT = 1
_CHUNK_FLOATS = 4_000_000  # bootstrap draws gathered at once: replicates x rows x components (32 MB)


@dataclass
class Sample:
    """Answers as arrays, one row per image: what a reference is built from and a window is scored on."""

    pca: np.ndarray  # (n, d) first PCA components
    energy: np.ndarray  # (n,)
    fruitness: np.ndarray  # (n,)
    category: np.ndarray  # (n,) int index into the reference's categories (families, then unknown)

    def __len__(self) -> int:
        return len(self.energy)

    def take(self, idx: np.ndarray | slice) -> Sample:
        return Sample(self.pca[idx], self.energy[idx], self.fruitness[idx], self.category[idx])

    @classmethod
    def from_answers(cls, pca: Any, energy: Any, fruitness: Any, families: Sequence[str],
                     categories: Sequence[str]) -> Sample:
        """``families``: each answer's family, ``""`` for ``unknown``; ``categories``: the reference's."""
        index = {c: i for i, c in enumerate(categories)}
        cat = np.array([index.get(f or UNKNOWN_CATEGORY, -1) for f in families], dtype=np.int64)
        if (cat < 0).any():
            strange = sorted({f for f, c in zip(families, cat) if c < 0})
            raise ValueError(f"families the model does not answer: {', '.join(strange[:5])}")
        return cls(np.asarray(pca, dtype=np.float64).reshape(len(cat), -1), np.asarray(energy, dtype=np.float64),
                   np.asarray(fruitness, dtype=np.float64), cat)


@dataclass
class _Summary:
    """A batch of reference summaries (b of them): what windows are scored against."""

    mean: np.ndarray  # (b, d)
    sd: np.ndarray  # (b, d)
    mix: np.ndarray  # (b, c)
    unknown: np.ndarray  # (b,)
    energy_q: np.ndarray  # (b, L)
    fruitness_q: np.ndarray  # (b, L)


def _mix(category: np.ndarray, n_categories: int) -> np.ndarray:
    """(b, N) category indices -> (b, n_categories) shares."""
    out = np.zeros((category.shape[0], n_categories))
    for i in range(n_categories):
        out[:, i] = (category == i).mean(axis=1)
    return out


def _summaries(pca: np.ndarray, energy: np.ndarray, fruitness: np.ndarray, category: np.ndarray,
               n_categories: int, unknown: int) -> _Summary:
    """Summaries of b samples at once: arrays shaped (b, n, ...)."""
    return _Summary(pca.mean(axis=1), pca.std(axis=1, ddof=1), _mix(category, n_categories),
                    (category == unknown).mean(axis=1),
                    np.quantile(energy, LEVELS, axis=1).T, np.quantile(fruitness, LEVELS, axis=1).T)


def _cdf(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The reference CDF from its quantile table (b, L) at the values x (b, N): linear between quantiles,
    0 below the smallest, 1 from the largest; a run of equal quantiles counts to its highest level."""
    k = (table[:, None, :] <= x[:, :, None]).sum(axis=2)  # quantiles at or below x
    last = table.shape[1] - 1
    lo = np.clip(k - 1, 0, last)
    hi = np.clip(k, 0, last)
    q_lo = np.take_along_axis(table, lo, axis=1)
    q_hi = np.take_along_axis(table, hi, axis=1)
    gap = q_hi - q_lo
    frac = np.divide(x - q_lo, gap, out=np.zeros_like(x), where=gap > 0)
    f = LEVELS[lo] + (LEVELS[hi] - LEVELS[lo]) * frac
    return np.where(k == 0, 0.0, np.where(k > last, 1.0, f))


def _ks_low(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    """One-sided KS distance max(F_window - F_ref): how much more of the window sits low. (b,)"""
    x = np.sort(values, axis=1)
    n = x.shape[1]
    ecdf = np.arange(1, n + 1) / n
    return np.maximum(0.0, (ecdf[None, :] - _cdf(table, x)).max(axis=1))


def _batch_scores(ref: _Summary, pca: np.ndarray, energy: np.ndarray, fruitness: np.ndarray,
                  category: np.ndarray, unknown_share: np.ndarray) -> dict[str, np.ndarray]:
    """Scores of b windows (arrays shaped (b, N, ...)) against b reference summaries."""
    sd = np.maximum(ref.sd, 1e-9 * max(float(ref.sd.max()), 1e-12))
    m = pca.mean(axis=1)
    s = np.maximum(pca.std(axis=1, ddof=1), 1e-12)
    mix = _mix(category, ref.mix.shape[1])
    return {
        "pca_mean": np.sqrt((((m - ref.mean) / sd) ** 2).mean(axis=1)),
        "pca_spread": np.abs(np.log(s / sd)).mean(axis=1),
        "family_mix": 0.5 * np.abs(mix - ref.mix).sum(axis=1),
        "unknown_rate": np.maximum(0.0, unknown_share - ref.unknown),
        "energy": _ks_low(ref.energy_q, energy),
        "fruitness": _ks_low(ref.fruitness_q, fruitness),
    }


@dataclass
class Reference:
    """A model's held-out answers in summary, with the drift thresholds calibrated on them.

    Aggregates only (means, spreads, shares, quantiles): no image id, no per-image row."""

    n: int  # held-out rows it was built from
    categories: list[str]  # the model's families, then "unknown"
    pca_mean: np.ndarray
    pca_sd: np.ndarray
    family_mix: np.ndarray  # share of each category
    unknown_rate: float
    energy_quantiles: np.ndarray  # at LEVELS
    fruitness_quantiles: np.ndarray
    thresholds: dict[int, dict[str, float]]  # window size -> statistic -> threshold
    replicates: int = REPLICATES
    false_alarm: float = FALSE_ALARM
    seed: int = 0
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def families(self) -> list[str]:
        return [c for c in self.categories if c != UNKNOWN_CATEGORY]

    @property
    def pca_components(self) -> int:
        return int(len(self.pca_mean))

    def summary(self) -> _Summary:
        return _Summary(self.pca_mean[None], self.pca_sd[None], self.family_mix[None],
                        np.array([self.unknown_rate]), self.energy_quantiles[None], self.fruitness_quantiles[None])

    def thresholds_for(self, window: int) -> dict[str, float]:
        """Thresholds at ``window`` predictions: calibrated ones on the grid, log-log interpolated between,
        the largest size's beyond it (conservative: a larger window's null scores are smaller)."""
        sizes = sorted(self.thresholds)
        if window < sizes[0]:
            raise ValueError(f"a window of {window} predictions is too small: at least {sizes[0]}")
        if window >= sizes[-1]:
            return dict(self.thresholds[sizes[-1]])
        hi = next(s for s in sizes if s >= window)
        if hi == window:
            return dict(self.thresholds[hi])
        lo = max(s for s in sizes if s < window)
        t = (math.log(window) - math.log(lo)) / (math.log(hi) - math.log(lo))
        out = {}
        for name in STATISTICS:
            a, b = self.thresholds[lo][name], self.thresholds[hi][name]
            out[name] = math.exp((1 - t) * math.log(a) + t * math.log(b)) if a > 0 and b > 0 else (1 - t) * a + t * b
        return out

    def to_json(self) -> dict[str, Any]:
        def floats(a: np.ndarray) -> list[float]:
            return [float(x) for x in a]

        return {
            "format": FORMAT, "created_at": self.created_at, "held_out_rows": self.n,
            "categories": list(self.categories), "pca_components": self.pca_components,
            "pca_mean": floats(self.pca_mean), "pca_sd": floats(self.pca_sd),
            "family_mix": floats(self.family_mix), "unknown_rate": float(self.unknown_rate),
            "quantile_levels": floats(LEVELS),
            "energy_quantiles": floats(self.energy_quantiles), "fruitness_quantiles": floats(self.fruitness_quantiles),
            "thresholds": {str(n): {k: float(v) for k, v in t.items()} for n, t in sorted(self.thresholds.items())},
            "calibration": {"replicates": self.replicates, "false_alarm": self.false_alarm, "seed": self.seed,
                            "quantile": 1 - self.false_alarm / len(STATISTICS),
                            "method": "bootstrap windows of held-out rows against bootstrap resamples of them"},
            **self.extra,
        }

    @classmethod
    def from_json(cls, raw: Any) -> Reference:
        """A reference read back; ValueError (with what is wrong) when it is not one this canestra reads."""
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        if int(raw.get("format", 0)) > FORMAT:
            raise ValueError(f"format {raw.get('format')} is newer than this canestra reads ({FORMAT})")
        try:
            d = int(raw["pca_components"])
            cats = [str(c) for c in raw["categories"]]
            ref = cls(
                n=int(raw["held_out_rows"]), categories=cats,
                pca_mean=np.asarray(raw["pca_mean"], dtype=np.float64),
                pca_sd=np.asarray(raw["pca_sd"], dtype=np.float64),
                family_mix=np.asarray(raw["family_mix"], dtype=np.float64),
                unknown_rate=float(raw["unknown_rate"]),
                energy_quantiles=np.asarray(raw["energy_quantiles"], dtype=np.float64),
                fruitness_quantiles=np.asarray(raw["fruitness_quantiles"], dtype=np.float64),
                thresholds={int(n): {s: float(t[s]) for s in STATISTICS} for n, t in raw["thresholds"].items()},
                replicates=int(raw.get("calibration", {}).get("replicates", REPLICATES)),
                false_alarm=float(raw.get("calibration", {}).get("false_alarm", FALSE_ALARM)),
                seed=int(raw.get("calibration", {}).get("seed", 0)),
                created_at=str(raw.get("created_at", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed ({type(exc).__name__}: {str(exc)[:80]})") from None
        shapes_ok = (ref.pca_mean.shape == ref.pca_sd.shape == (d,) and d > 0
                     and ref.family_mix.shape == (len(cats),) and UNKNOWN_CATEGORY in cats
                     and ref.energy_quantiles.shape == ref.fruitness_quantiles.shape == LEVELS.shape
                     and bool(ref.thresholds) and ref.n > 1)
        if not shapes_ok:
            raise ValueError("its arrays do not fit together")
        return ref


def scores(reference: Reference, window: Sample) -> dict[str, float]:
    """Each statistic's drift score of one window against the reference (0: like the held-out rows)."""
    if len(window) < 2:
        raise ValueError("a window needs at least 2 predictions")
    d = reference.pca_components
    if window.pca.shape[1] < d:
        raise ValueError(f"the predictions carry {window.pca.shape[1]} PCA components, the reference {d}")
    unknown = reference.categories.index(UNKNOWN_CATEGORY)
    out = _batch_scores(reference.summary(), window.pca[None, :, :d], window.energy[None], window.fruitness[None],
                        window.category[None], (window.category == unknown).mean(keepdims=True))
    return {k: float(v[0]) for k, v in out.items()}


def _null_scores(ref: _Summary, rows: Sample, size: int, unknown: int, rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
    """Scores of bootstrap windows of ``size`` rows of ``rows``, one per reference summary of the batch."""
    b = len(ref.unknown)
    idx = rng.integers(0, len(rows), size=(b, size))
    # Unknown answers: binomial with a rate drawn from its Jeffreys posterior, so that k = 0 of n rows
    # still allows the odd unknown answer (a row resample would never draw one).
    k = int((rows.category == unknown).sum())
    share = rng.binomial(size, rng.beta(k + 0.5, len(rows) - k + 0.5, size=b)) / size
    return _batch_scores(ref, rows.pca[idx], rows.energy[idx], rows.fruitness[idx], rows.category[idx], share)


def build_reference(sample: Sample, categories: Sequence[str], *, benign: Sample | None = None, seed: int = 0,
                    replicates: int = REPLICATES, false_alarm: float = FALSE_ALARM,
                    window_grid: Sequence[int] = WINDOW_GRID) -> Reference:
    """Summarise held-out answers and calibrate each statistic's threshold per window size (bootstrap).

    ``benign``: answers on the held-out images under ordinary changes of capture (light, colour, angle,
    scale, blur: ``canestra.pipeline.reference``); each threshold is then also above the scores of windows of
    those, so that drift means "further from the held-out images than those changes take them"."""
    categories = list(categories)
    if UNKNOWN_CATEGORY not in categories:
        raise ValueError("categories must include the unknown answer")
    rng = np.random.default_rng(seed)
    if len(sample) > MAX_ROWS:
        sample = sample.take(np.sort(rng.choice(len(sample), MAX_ROWS, replace=False)))
    n, c = len(sample), len(categories)
    if n < 2:
        raise ValueError("at least 2 held-out rows are needed")
    unknown = categories.index(UNKNOWN_CATEGORY)
    full = _summaries(sample.pca[None], sample.energy[None], sample.fruitness[None], sample.category[None], c, unknown)
    if benign is not None and len(benign) < 2:
        benign = None

    # The references the null windows are scored against: resamples of the held-out rows, so the
    # thresholds include the reference's own sampling noise (it is n rows, not the population).
    refs = []
    d = sample.pca.shape[1]
    chunk = max(1, min(replicates, _CHUNK_FLOATS // (max(n, max(window_grid)) * max(d, 1))))
    for start in range(0, replicates, chunk):
        b = min(chunk, replicates - start)
        idx = rng.integers(0, n, size=(b, n))
        refs.append(_summaries(sample.pca[idx], sample.energy[idx], sample.fruitness[idx], sample.category[idx],
                               c, unknown))
    q = 1.0 - false_alarm / len(STATISTICS)
    thresholds: dict[int, dict[str, float]] = {}
    parts: dict[str, dict[str, dict[str, float]]] = {"held_out": {}, "benign_changes": {}}
    for size in window_grid:
        null: dict[str, dict[str, list[np.ndarray]]] = {p: {s: [] for s in STATISTICS} for p in parts}
        for ref in refs:
            for part, rows in (("held_out", sample), ("benign_changes", benign)):
                if rows is None:
                    continue
                got = _null_scores(ref, rows, size, unknown, rng)
                for s in STATISTICS:
                    null[part][s].append(got[s])
        for part in parts:
            if null[part][STATISTICS[0]]:
                parts[part][str(size)] = {s: float(np.quantile(np.concatenate(null[part][s]), q)) for s in STATISTICS}
        thresholds[int(size)] = {s: max(t[str(size)][s] for t in parts.values() if str(size) in t) for s in STATISTICS}
    extra: dict[str, Any] = {"thresholds_by_source": {p: t for p, t in parts.items() if t}}
    if benign is not None:
        extra["benign_changes_rows"] = len(benign)
    return Reference(
        n=n, categories=categories, pca_mean=full.mean[0], pca_sd=full.sd[0], family_mix=full.mix[0],
        unknown_rate=float(full.unknown[0]), energy_quantiles=full.energy_q[0], fruitness_quantiles=full.fruitness_q[0],
        thresholds=thresholds, replicates=replicates, false_alarm=false_alarm, seed=seed,
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), extra=extra)
