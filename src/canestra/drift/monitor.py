"""``canestra monitor``: windows of predictions, in time order, scored against the model's drift reference.

Spark-free: the model's ``canestra_drift_reference.json`` and the predictions table are read as plain
files. The windows are consecutive and do not overlap: predictions 1..N, N+1..2N, ...; predictions
that do not fill a last window wait for the next run. ``canestra serve`` scores its rolling windows
with the same :func:`score_window`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from canestra.drift.stats import DEFAULT_WINDOW, MIN_WINDOW, STATISTICS, Reference, Sample, scores
from canestra.errors import InputError

__all__ = ["DESCRIPTIONS", "DriftReport", "Window", "load_reference", "monitor", "score_window"]

# What each statistic measures, in the words the text output and the report use.
DESCRIPTIONS = {
    "pca_mean": "where the images sit (mean of the first PCA components)",
    "pca_spread": "how varied the images are (spread of the first PCA components)",
    "family_mix": "the mix of families answered",
    "unknown_rate": "the share answered unknown",
    "energy": "classifier energy (low: no class fits the image)",
    "fruitness": "fruitness (ImageNet fruit mass of the image)",
}
_RETRAIN = "retrain it with this canestra (canestra train) to monitor its predictions"


def load_reference(model_dir: str) -> Reference:
    """The model's drift reference; InputError in plain words when it has none or it is unreadable."""
    from canestra.model import DRIFT_REFERENCE, read_drift_reference

    raw = read_drift_reference(model_dir)
    if raw is None:
        raise InputError(f"the model in {model_dir} has no drift reference ({DRIFT_REFERENCE}): it was trained "
                         f"before canestra stored one; {_RETRAIN}")
    try:
        return Reference.from_json(raw)
    except ValueError as exc:
        raise InputError(f"the drift reference of the model in {model_dir} is unreadable ({exc}); {_RETRAIN}") from None


@dataclass
class Window:
    index: int  # 1-based
    first: int  # 1-based position of its first prediction in time order
    count: int
    started_at: str
    ended_at: str
    scores: dict[str, float]
    thresholds: dict[str, float]

    @property
    def flagged(self) -> list[str]:
        """The statistics over their threshold, most over first."""
        over = [s for s in STATISTICS if self.scores[s] > self.thresholds[s]]
        return sorted(over, key=lambda s: -self.ratio(s))

    @property
    def drift(self) -> bool:
        return bool(self.flagged)

    @property
    def last(self) -> int:
        return self.first + self.count - 1

    def ratio(self, statistic: str) -> float:
        """Score / threshold (over 1: flagged); a zero threshold reads as 1e-12."""
        return self.scores[statistic] / max(self.thresholds[statistic], 1e-12)

    def to_dict(self) -> dict[str, Any]:
        return {"window": self.index, "first": self.first, "last": self.last, "predictions": self.count,
                "from": self.started_at, "to": self.ended_at,
                "scores": {s: round(self.scores[s], 6) for s in STATISTICS},
                "thresholds": {s: round(self.thresholds[s], 6) for s in STATISTICS},
                "flagged": self.flagged, "drift": self.drift}


def score_window(reference: Reference, sample: Sample, index: int, first: int, started_at: str,
                 ended_at: str) -> Window:
    """One window's scores against ``reference`` and its thresholds at the window's size."""
    return Window(index, first, len(sample), started_at, ended_at, scores(reference, sample),
                  reference.thresholds_for(len(sample)))


@dataclass
class DriftReport:
    """What ``canestra monitor`` found: one entry per window, in time order."""

    model: str
    predictions: str
    window: int
    scored: int  # predictions in full windows
    pending: int  # predictions after the last full window (they wait for more)
    without_columns: int  # rows left out: written without the monitor's columns
    reference: dict[str, Any]
    windows: list[Window] = field(default_factory=list)

    @property
    def drift(self) -> bool:
        return any(w.drift for w in self.windows)

    @property
    def first_drift(self) -> Window | None:
        return next((w for w in self.windows if w.drift), None)

    def to_dict(self) -> dict[str, Any]:
        first = self.first_drift
        return {"model": self.model, "predictions": self.predictions, "window": self.window,
                "predictions_scored": self.scored, "predictions_pending": self.pending,
                "rows_without_monitor_columns": self.without_columns, "reference": self.reference,
                "drift": self.drift, "first_drift_window": first.index if first else None,
                "windows_flagged": sum(w.drift for w in self.windows),
                "windows": [w.to_dict() for w in self.windows]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)

    def text(self) -> str:
        """The plain-language summary ``canestra monitor`` prints without --json."""
        w = self.windows
        lines = [f"canestra monitor: {self.scored + self.pending} prediction(s) in time order, "
                 f"{len(w)} window(s) of {self.window}"
                 + (f" ({w[0].started_at} to {w[-1].ended_at})" if w else "")]
        ref = self.reference
        lines.append(f"reference: {ref['held_out_rows']} held-out images of the model; each window is compared on "
                     f"{len(STATISTICS)} statistics, thresholds set for at most {ref['false_alarm_target']:.0%} "
                     "false alarms on windows like them")
        if self.without_columns:
            lines.append(f"note: {self.without_columns} prediction(s) left out: written without the monitor's columns "
                         "(by an older canestra)")
        if w:
            lines.append("")
            lines.append(f"{'window':>6}  {'predictions':>13}  drift  over their threshold (score / threshold)")
            for win in w:
                over = ", ".join(f"{s} {win.scores[s]:.3g}/{win.thresholds[s]:.3g}" for s in win.flagged) or "-"
                lines.append(f"{win.index:>6}  {f'{win.first}-{win.last}':>13}  {'YES' if win.drift else 'no ':<5}  "
                             f"{over}")
            lines.append("")
        if self.pending:
            lines.append(f"the last {self.pending} prediction(s) do not fill a window of {self.window} yet: a later "
                         "run scores them")
        first = self.first_drift
        if not w:
            lines.append(f"no window scored: fewer than {self.window} predictions (use --window with a smaller "
                         f"number, at least {MIN_WINDOW})")
        elif first is None:
            lines.append(f"no drift: all {len(w)} window(s) look like the model's held-out images")
        else:
            n = sum(x.drift for x in w)
            what = "; ".join(DESCRIPTIONS[s] for s in first.flagged)
            lines.append(f"DRIFT in {n} of {len(w)} window(s), first in window {first.index} (predictions "
                         f"{first.first}-{first.last}, from {first.started_at}). Unlike the held-out images "
                         f"there: {what}")
        return "\n".join(lines)


def monitor(model_dir: str, predictions: str, window: int | None = None) -> DriftReport:
    """Score the predictions under ``predictions`` window by window against the model's reference."""
    from canestra.drift.table import predictions_folder, read_predictions

    window = DEFAULT_WINDOW if window is None else int(window)
    if window < MIN_WINDOW:
        raise InputError(f"--window {window} is too small: a window needs at least {MIN_WINDOW} predictions for its "
                         "statistics to mean something")
    reference = load_reference(model_dir)
    rows = read_predictions(predictions)
    d = reference.pca_components
    if rows.pca.shape[1] < d:
        raise InputError(f"the predictions carry {rows.pca.shape[1]} PCA components and the model's reference {d}: "
                         "they were written by another model; pass the model that wrote them")
    try:
        sample = Sample.from_answers(rows.pca[:, :d], rows.energy, rows.fruitness, rows.family,
                                     reference.categories)
    except ValueError as exc:
        raise InputError(f"the predictions name {exc}: they were written by another model; pass the model that "
                         "wrote them") from None
    full = len(sample) // window
    out = DriftReport(
        model=model_dir, predictions=predictions_folder(predictions), window=window, scored=full * window,
        pending=len(sample) - full * window, without_columns=rows.without_columns,
        reference={"held_out_rows": reference.n, "false_alarm_target": reference.false_alarm,
                   "created_at": reference.created_at, "categories": reference.categories})
    for i in range(full):
        sl = slice(i * window, (i + 1) * window)
        out.windows.append(score_window(reference, sample.take(sl), i + 1, i * window + 1, rows.predicted_at[sl.start],
                                        rows.predicted_at[sl.stop - 1]))
    return out
