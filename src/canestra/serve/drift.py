"""``GET /v1/drift``: this worker's rolling windows of answers, scored against the model's drift reference.

Each worker keeps, in memory only, a few numbers per answer of the window being filled (its first PCA
components, energy, fruitness and family, never the image, its id or anything of the request), and the
results of its last ``KEEP_WINDOWS`` full windows. A window is ``DEFAULT_WINDOW`` answers (200s of
``/v1/predict`` and ``/v1/predict/batch``) in arrival order; when it fills, it is scored with
``canestra.drift.monitor.score_window`` (what ``canestra monitor`` does with the predictions table) and its
numbers are dropped. With ``--workers N``, each worker answers for its own requests (``worker`` in the answer).
"""

from __future__ import annotations

import collections
import datetime as dt
import os
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np
from fastapi import APIRouter
from fastapi.responses import Response
from pydantic import BaseModel, Field

from canestra.drift.monitor import DESCRIPTIONS, Window, load_reference, score_window
from canestra.drift.stats import DEFAULT_WINDOW, Reference, Sample
from canestra.errors import InputError
from canestra.serve.predictor import ModelSpec, Prediction

__all__ = ["DriftOut", "DriftWindows", "ModelDrift", "add_drift_route"]

KEEP_WINDOWS = 48  # full windows whose results a worker keeps (their scores, not their answers)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class WindowOut(BaseModel):
    window: int = Field(description="1 for this worker's first full window since it started")
    first: int = Field(description="position of the window's first answer among this worker's answers")
    last: int
    predictions: int
    start: str = Field(alias="from", description="when its first answer was given (UTC)")
    end: str = Field(alias="to", description="when its last answer was given (UTC)")
    scores: dict[str, float] = Field(description="drift score per statistic (0: like the held-out images)")
    thresholds: dict[str, float] = Field(description="per statistic: over it, the window drifted")
    flagged: list[str] = Field(description="statistics over their threshold, most over first")
    drift: bool


class DriftOut(BaseModel):
    available: bool = Field(description="false when the model has no drift reference (trained before canestra "
                                        "stored one): `reason` says so")
    reason: str | None = None
    model_version: str
    worker: int = Field(description="process id of the worker that answered: each keeps its own windows")
    window: int = Field(description="answers per window")
    filling: int = Field(description="answers in the window being filled")
    answers: int = Field(description="answers this worker has seen since it started")
    drift: bool = Field(description="the latest full window drifted")
    windows: list[WindowOut] = Field(description="the latest full windows, oldest first")
    statistics: dict[str, str] = Field(description="what each statistic measures")
    reference: dict[str, Any] | None = Field(None, description="held-out rows and the false-alarm target")


class DriftWindows:
    """Rolling windows of one worker's answers; thread-safe (answers come from the event loop and threads)."""

    def __init__(self, reference: Reference | None, reason: str | None = None, window: int = DEFAULT_WINDOW,
                 keep: int = KEEP_WINDOWS):
        self.reference = reference
        self.reason = reason
        self.window = window
        self._lock = threading.Lock()
        self._rows: list[tuple[np.ndarray, float, float, str]] = []
        self._started: str | None = None
        self._seen = 0
        self._done: collections.deque[Window] = collections.deque(maxlen=keep)
        self._count = 0

    @classmethod
    def for_model(cls, spec: ModelSpec, window: int = DEFAULT_WINDOW) -> DriftWindows:
        try:
            return cls(load_reference(spec.model_dir), window=window)
        except InputError as exc:  # a model without a reference is still served; /v1/drift says why
            return cls(None, reason=str(exc).replace(spec.model_dir, "the model served"), window=window)

    def observe(self, predictions: Iterable[Prediction]) -> None:
        """Add answers; a window that fills is scored, and its answers' numbers are dropped."""
        ref = self.reference
        if ref is None:
            return
        d = ref.pca_components
        full: list[tuple[list, str, str, int, int]] = []
        with self._lock:
            for p in predictions:
                if p.projection is None:
                    continue
                if not self._rows:
                    self._started = _now()
                self._rows.append((np.asarray(p.projection[:d], dtype=np.float64), p.energy, p.fruitness,
                                   "" if p.unknown else p.family))
                self._seen += 1
                if len(self._rows) == self.window:
                    self._count += 1
                    full.append((self._rows, self._started or _now(), _now(), self._seen - self.window + 1,
                                 self._count))
                    self._rows = []
        for rows, start, end, first, index in full:  # scored outside the lock: answers keep flowing meanwhile
            sample = Sample.from_answers(np.stack([r[0] for r in rows]), [r[1] for r in rows], [r[2] for r in rows],
                                         [r[3] for r in rows], ref.categories)
            win = score_window(ref, sample, index, first, start, end)
            with self._lock:
                self._done.append(win)

    def snapshot(self, model_version: str) -> dict[str, Any]:
        with self._lock:
            done = sorted(self._done, key=lambda w: w.index)
            filling, seen = len(self._rows), self._seen
        ref = self.reference
        return {"available": ref is not None, "reason": self.reason, "model_version": model_version,
                "worker": os.getpid(), "window": self.window, "filling": filling, "answers": seen,
                "drift": bool(done and done[-1].drift), "windows": [w.to_dict() for w in done],
                "statistics": dict(DESCRIPTIONS),
                "reference": None if ref is None else {"held_out_rows": ref.n, "false_alarm_target": ref.false_alarm,
                                                       "created_at": ref.created_at}}


class ModelDrift:
    """The drift windows of the model served now: a model swapped in (serve/swap.py) starts its own,
    against its own reference (the old windows were another model's answers)."""

    def __init__(self, window: int = DEFAULT_WINDOW):
        self.window = window
        self._lock = threading.Lock()
        self._version: str | None = None
        self._windows: DriftWindows | None = None

    def windows(self, spec: ModelSpec) -> DriftWindows:
        with self._lock:
            if self._windows is None or self._version != spec.version:
                self._windows, self._version = DriftWindows.for_model(spec, self.window), spec.version
            return self._windows

    def observe(self, spec: ModelSpec, predictions: Iterable[Prediction]) -> None:
        """Add the answers ``spec``'s model gave (the caller keeps the predictor it scored with)."""
        self.windows(spec).observe(predictions)

    def snapshot(self, spec: ModelSpec) -> dict[str, Any]:
        return self.windows(spec).snapshot(spec.model_version)


def add_drift_route(router: APIRouter, svc, as_json) -> None:
    """``GET /v1/drift`` on the guarded router (the same key, rate limit and Host check as /v1/*);
    ``svc``: the app's service (its ``predictor`` and ``drift``, a :class:`ModelDrift`)."""

    @router.get("/v1/drift", response_model=DriftOut,
                summary="Drift of this worker's latest answers from the model's held-out images, per window")
    async def drift_route() -> Response:
        return as_json(svc.drift.snapshot(svc.predictor.spec))

