"""What ``canestra serve`` tells its operators: Prometheus metrics, request ids, JSON log lines.

Nothing here ever holds an image, an image id, a file name, a client address or a raw request
path: requests are labelled by their route *template* (``/v1/predict``, or ``other`` for a path no
route matches), answers by family, refusals by a fixed reason code.

With several uvicorn workers the counters must add up over processes: ``run_serve`` makes a
private folder (``multiprocess_dir``) and prometheus_client's multiprocess mode keeps each
worker's values in memory-mapped files there; ``GET /metrics``, on whichever worker answers it,
sums them. One worker: the values live in that process's own registry.

prometheus_client is imported only when a service is built, not with this module: it picks
single- or multi-process storage at its first import, from ``PROMETHEUS_MULTIPROC_DIR``, so that
import must come after ``run_serve`` has set (or cleared) the variable.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from canestra.errors import EnvironmentProblem

ENV_MULTIPROC = "PROMETHEUS_MULTIPROC_DIR"
ACCESS_LOGGER = "canestra.serve.access"
REQUEST_ID_HEADER = "X-Request-ID"
OTHER_ROUTE = "other"  # label of a path no route matches: never the raw path (it could carry anything)
UNKNOWN_FAMILY = "unknown"  # the answers label of images answered `unknown` (their family is empty)
LOG_FORMATS = ("text", "json")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# A caller's request id is echoed and logged only when it is short, plain and no digest: an
# image id (64 hex) sent as a request id would otherwise reach the logs. 32 hex (a UUID without
# dashes) still passes.
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_LONG_HEX = re.compile(r"[0-9a-fA-F]{33,}")
# Seconds: a small image takes ~10 ms, a 16-image batch of large photos several seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

log = logging.getLogger(ACCESS_LOGGER)

__all__ = ["ACCESS_LOGGER", "ENV_MULTIPROC", "LOG_FORMATS", "REQUEST_ID_HEADER", "JsonFormatter", "Observe",
           "ServeMetrics", "multiprocess_dir", "request_id", "route_of", "temporary_env"]


def request_id(given: str | None) -> str:
    """The caller's X-Request-ID when it is sane (1-64 of ``A-Za-z0-9._:-``, no digest), else a new one."""
    if given and _SANE_ID.fullmatch(given) and not _LONG_HEX.search(given):
        return given
    return uuid.uuid4().hex


def route_of(scope: dict, mounts: Iterable[str] = ()) -> str:
    """The route template that answered (``/v1/predict``), the mount point of a file under one of
    ``mounts`` (``/static``), else ``other``."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str) and path:
        return path
    raw = scope.get("path", "")
    # FastAPI does not name a Mount in the scope: the prefix does
    return next((m for m in mounts if raw == m or raw.startswith(m + "/")), OTHER_ROUTE)


class ServeMetrics:
    """The service's Prometheus metrics; ``directory``: the multiprocess folder, None for one process."""

    def __init__(self, directory: str | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.directory = directory
        # Multiprocess: the values go to files and /metrics collects them with a fresh registry per
        # scrape; registering them too would count this worker twice.
        self.registry = None if directory else CollectorRegistry()
        reg = self.registry
        self.requests = Counter("canestra_http_requests", "HTTP requests by route template, method and status",
                                ["route", "method", "status"], registry=reg)
        self.latency = Histogram("canestra_http_request_duration_seconds",
                                 "time from a request's arrival to its response, by route template and method",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=reg)
        self.images = Counter("canestra_images_scored", "images classified (answered 200), by route",
                              ["route"], registry=reg)
        self.answers = Counter("canestra_answers", "answers by fruit family, or unknown", ["family"], registry=reg)
        self.refused = Counter("canestra_rejected_inputs", "requests and images refused, by reason",
                               ["reason"], registry=reg)
        # livemax: a worker's values leave with it (mark_process_dead), the survivors' stay
        self.model_info = Gauge("canestra_model_info", "the model served (value 1), by its model_version",
                                ["model_version"], multiprocess_mode="livemax", registry=reg)
        self.load_seconds = Gauge("canestra_model_load_seconds",
                                  "seconds a worker took to load and warm up the model (the slowest live worker)",
                                  multiprocess_mode="livemax", registry=reg)

    def model_loaded(self, model_version: str, seconds: float | None) -> None:
        self.model_info.labels(model_version=model_version).set(1)
        if seconds is not None:
            self.load_seconds.set(seconds)

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, method=method, status=str(status)).inc()
        self.latency.labels(route=route, method=method).observe(seconds)

    def scored(self, route: str, families: Iterable[str]) -> None:
        """One answer per family (``""``, the family of an `unknown` answer, counts as unknown)."""
        n = 0
        for family in families:
            self.answers.labels(family=family or UNKNOWN_FAMILY).inc()
            n += 1
        if n:
            self.images.labels(route=route).inc(n)

    def rejected(self, reason: str, n: int = 1) -> None:
        self.refused.labels(reason=reason).inc(n)

    def render(self) -> tuple[bytes, str]:
        """The text exposition (summed over workers in multiprocess mode) and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if self.registry is not None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.directory)
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def worker_stopped(self) -> None:
        """Drop this worker's live gauges (its counters stay: they keep adding up after it)."""
        if self.directory:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid(), self.directory)


@contextmanager
def temporary_env(name: str, value: str | None) -> Iterator[None]:
    """``os.environ[name] = value`` (None: unset) for the block, then back as it was."""
    previous = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextmanager
def multiprocess_dir(workers: int) -> Iterator[str | None]:
    """A private folder (mode 0700) for the workers' metric files, removed afterwards; None for one worker.

    The workers inherit it as PROMETHEUS_MULTIPROC_DIR. A folder left from an earlier run is never
    reused (its counts would be added to this run's). One worker clears the variable, so a value the
    caller's environment happens to hold is not written to.
    """
    try:
        directory = tempfile.mkdtemp(prefix="canestra-metrics-") if workers > 1 else None
    except OSError as exc:
        raise EnvironmentProblem(f"cannot make the metrics folder of --workers {workers} under "
                                 f"{tempfile.gettempdir()} ({exc.strerror or type(exc).__name__}): set TMPDIR to a "
                                 "writable folder") from None
    try:
        with temporary_env(ENV_MULTIPROC, directory):
            yield directory
    finally:
        if directory:
            shutil.rmtree(directory, ignore_errors=True)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, then the record's ``fields`` or its message."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name}
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class Observe:
    """Pure ASGI middleware, outermost: request id in and out, the request counted and timed by its
    route template, and with JSON logs one access line per request (no client address, path or id)."""

    def __init__(self, app, metrics: ServeMetrics, access_log: bool, mounts: tuple[str, ...] = ()):
        self.app = app
        self.metrics = metrics
        self.access_log = access_log
        self.mounts = mounts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = request_id(given.decode("latin-1") if given is not None else None)
        status = 500  # what the client gets when the app raises before answering
        header = (REQUEST_ID_HEADER.lower().encode(), rid.encode())

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - t0
            route = route_of(scope, self.mounts)
            method = scope.get("method", "")
            method = method if method in _METHODS else "other"  # a label value per made-up method: no
            self.metrics.request(route, method, status, seconds)
            if self.access_log:
                log.info("request", extra={"fields": {
                    "event": "http.request", "request_id": rid, "method": method, "route": route,
                    "status": status, "duration_ms": round(seconds * 1000, 3)}})
