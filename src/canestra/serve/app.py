"""``canestra serve``: online classification over HTTP (FastAPI + uvicorn), no Spark.

Each uvicorn worker process loads the model once (:mod:`canestra.serve.predictor`) and runs
one inference at a time on its own ONNX Runtime session, so ``workers x threads``
stays within the machine's cores.

Privacy: uploads are read into memory, decoded, scored and dropped. Nothing is
written to disk (the multipart body is parsed in memory, never spooled to a
temporary file), no image bytes, file names or client addresses are logged (the
uvicorn access log is off), and the audit log lines carry request counts only. The one exception:
a photo a user sends back with the right answer and consent (``POST /v1/feedback``, only with
``--feedback-dir``: serve/feedback.py).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from canestra.config import Settings
from canestra.errors import EnvironmentProblem, InputError
from canestra.serve.metrics import (
    ACCESS_LOGGER,
    LOG_FORMATS,
    Observe,
    ServeMetrics,
    multiprocess_dir,
    temporary_env,
)
from canestra.serve.predictor import ModelSpec, OnlinePredictor, Prediction, default_threads, load_model_spec
from canestra.serve.security import KeyRing, RateLimiter, is_loopback, keys_file_warning, load_api_keys
from canestra.vision import backbone
from canestra.vision.images import BadImage, decoded_size

try:
    import anyio
    from fastapi import APIRouter, Depends, FastAPI, Request, Security
    from fastapi.responses import FileResponse, Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel, Field
    from starlette.routing import Mount
except ImportError as exc:  # pragma: no cover - install problem
    raise EnvironmentProblem("`canestra serve` needs the serve extra: run `pip install 'canestra[serve]'`") from exc

if TYPE_CHECKING:
    from canestra.serve.feedback import RecentImages

STATIC_DIR = Path(__file__).parent / "static"
ENV_CONFIG = "CANESTRA_SERVE_CONFIG"  # JSON of the serve settings for worker processes (a keys file's path, no keys)
AUDIT_LOGGER = "canestra.serve.audit"
AUDIT_INTERVAL_S = 60.0
BATCH_BODY_FACTOR = 4  # a batch request may carry at most 4 x the per-image limit in total
_MULTIPART_SLACK = 64 * 1024  # boundaries and part headers around the image bytes
_FIELD_MAX = 1024  # a text form field (POST /v1/feedback's label, consent, image_id)
# Single images that decode to at most this many bytes (~1.3 MP) are scored on the event loop:
# a few ms, and the thread hand-over would cost more (docs/serving.md). Larger ones go to a thread.
INLINE_DECODED_BYTES = 4_000_000

log = logging.getLogger(AUDIT_LOGGER)


# ---------------------------------------------------------------------------- response schemas


# [class, probability]. Not tuple[str, float]: its `prefixItems` schema trips schemathesis'
# OpenAPI 3.1 handling, and clients see the same JSON either way.
ClassProb = Annotated[list[str | float], Field(min_length=2, max_length=2)]


_PREDICTION = ("the most probable variety (class), or `unknown` when the image resembles no class the model was "
               "trained on (not a fruit it knows)")
_PROBABILITY = "probability of the most probable variety (also given when `prediction` is `unknown`)"
_FAMILY = "fruit family of `prediction`, e.g. `Apple` for `Apple Red 2`; empty when `prediction` is `unknown`"
_FAMILY_PROBABILITY = ("probability of the most probable family: the probabilities of its classes summed "
                       "(also given when `prediction` is `unknown`)")
_TOP5 = "[[class, probability], ...], the five most probable classes, most probable first (6 decimals)"


class PredictionOut(BaseModel):
    prediction: str = Field(description=_PREDICTION)
    probability: float = Field(ge=0, le=1, description=_PROBABILITY)
    family: str = Field(description=_FAMILY)
    family_probability: float = Field(ge=0, le=1, description=_FAMILY_PROBABILITY)
    top5: list[ClassProb] = Field(description=_TOP5)
    image_id: str = Field(description="SHA-256 of the decoded pixels (the id `canestra predict` writes)")
    model_version: str
    timing_ms: float = Field(description="time spent in the service for this request")


class BatchItemOut(BaseModel):
    index: int = Field(description="position of the image among the request's `file` fields")
    status: int = Field(description="200, or the error status this image alone would get (413/415/422)")
    prediction: str | None = Field(None, description=_PREDICTION + " (status 200 only)")
    probability: float | None = Field(None, ge=0, le=1, description=_PROBABILITY + " (status 200 only)")
    family: str | None = Field(None, description=_FAMILY + " (status 200 only)")
    family_probability: float | None = Field(None, ge=0, le=1, description=_FAMILY_PROBABILITY + " (status 200 only)")
    top5: list[ClassProb] | None = Field(None, description=_TOP5 + " (status 200 only)")
    image_id: str | None = Field(None, description="SHA-256 of the decoded pixels (status 200 only)")
    error: str | None = Field(None, description="why this image was refused (other statuses)")


class BatchOut(BaseModel):
    results: list[BatchItemOut]
    model_version: str
    timing_ms: float


class UnknownThresholds(BaseModel):
    energy: float | None = Field(description="images whose classifier energy (log-sum-exp of the margins) is below "
                                             "this are answered `unknown`; null: no such check")
    fruitness: float | None = Field(description="images whose ImageNet probability mass on the training images' "
                                                "ImageNet classes is below this are answered `unknown`; null: no "
                                                "such check")


class ModelMetrics(BaseModel):
    """Held-out quality figures only: aggregates, never an image id, a path or a per-image row."""

    held_out_images: int | None = Field(None, description="images the figures below were measured on")
    accuracy: float | None = Field(None, description="variety top-1 accuracy on the held-out images")
    macro_f1: float | None = None
    weighted_f1: float | None = None
    family_accuracy: float | None = Field(None, description="family top-1 accuracy on the held-out images")
    unknown_coverage: float | None = Field(None, description="share of held-out images answered (not `unknown`)")
    calibration_ece: float | None = Field(None, description="expected calibration error of `probability`")


class ModelOut(BaseModel):
    classes: list[str]
    families: list[str] = Field(description="the fruit families the model answers with, sorted")
    class_families: list[str] = Field(description="the family of each class, in the order of `classes`")
    unknown_thresholds: UnknownThresholds = Field(description="when an image is answered `unknown` "
                                                              "(both null for models trained before this check)")
    created_at: str | None
    version: str = Field(description="SHA-256 of the model files")
    model_version: str = Field(description="short form of `version`, returned with every prediction")
    image_sizes: list[int]
    precision: str = Field(description="CNN arithmetic the model was trained with: fp32 or int8")
    input_fit: str = Field(description="how non-square photos are made square before the CNN: crop (centre "
                                       "square) or squash")
    pca_k: int
    backbone: str
    spark_version: str | None
    metrics: ModelMetrics | None = Field(description="held-out figures from `canestra train`'s metrics.json, "
                                                     "if present (the file itself stays on the server)")
    requests: dict[str, int] = Field(description="request counts of this worker process")
    feedback: bool = Field(False, description="whether this service takes corrections (POST /v1/feedback, "
                                              "serve --feedback-dir)")


class HealthOut(BaseModel):
    status: str
    requests: dict[str, int]


class ErrorOut(BaseModel):
    detail: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorOut, "description": "upload too large, or its images decode to more bytes than "
                                            "`--max-decoded-mb` (one image) or a worker's decode budget (a request)"},
    415: {"model": ErrorOut, "description": "not an image, or an unsupported format"},
    422: {"model": ErrorOut, "description": "empty, corrupt, truncated, animated image or decompression bomb; "
                                            "a malformed multipart body"},
    503: {"model": ErrorOut, "description": "this worker's decode budget is taken by other requests: "
                                            "retry after `Retry-After` seconds",
          "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}},
}

# An image file: at least one byte (an empty part or body is answered 422). What the bytes must be
# (a decodable image, answered 415 or 422 otherwise, per image in a batch) is beyond JSON Schema;
# the part's declared content type says it, and the 4xx responses are documented.
_BINARY = {"type": "string", "format": "binary", "minLength": 1}
_IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff")
# Raw bodies: the format is read from the bytes, whatever the Content-Type (application/octet-stream
# works too); the image types are the ones documented.
_RAW_TYPES = _IMAGE_TYPES


def _request_body(many: bool) -> dict:
    file_schema = {"type": "array", "items": _BINARY, "minItems": 1,
                   "description": "one part per image, all named `file`; each image gets its own entry in "
                                  "`results`, with the status that image alone would get"} if many else _BINARY
    content: dict[str, Any] = {"multipart/form-data": {
        "schema": {"type": "object", "properties": {"file": file_schema}, "required": ["file"]},
        "encoding": {"file": {"contentType": ", ".join(_IMAGE_TYPES)}}}}
    if not many:
        content.update({t: {"schema": _BINARY} for t in _RAW_TYPES})
    return {"requestBody": {"required": True, "content": content}}


# ---------------------------------------------------------------------------- request handling


# The reason label of canestra_rejected_inputs_total when a refusal names none: a fixed set, never
# the detail text (it could quote sizes today and something else tomorrow).
_STATUS_REASON = {401: "unauthorized", 408: "body_timeout", 413: "too_large", 415: "not_an_image",
                  422: "invalid_request", 429: "rate_limited", 503: "busy"}


class Problem(Exception):
    """A client error answered as ``{"detail": message}`` with ``status``; ``reason``: its metrics label."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None, reason: str | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers
        self.reason = reason or _STATUS_REASON.get(status, "other")


_IMAGE_REASONS = (("empty file", "empty"), ("file too large", "too_large"), ("not an image", "not_an_image"),
                  ("unsupported", "unsupported_format"), ("HEIC/HEIF image", "unsupported_format"),
                  ("decompression bomb", "decompression_bomb"), ("truncated or corrupt", "corrupt"),
                  ("animated image", "animated"))


def image_problem(err: BadImage, limit_mb: float) -> Problem:
    """The answer to bytes that are no usable image, with a reason code read from the reason's start."""
    reason = next((code for start, code in _IMAGE_REASONS if err.reason.startswith(start)), "invalid_image")
    return Problem(bad_image_status(err), _bad_image_detail(err, limit_mb), reason=reason)


def bad_image_status(err: BadImage) -> int:
    reason = err.reason
    if reason.startswith("file too large"):
        return 413
    if reason.startswith(("not an image", "unsupported image format")):
        return 415
    return 422  # empty, truncated, corrupt, animated, decompression bomb, odd pixel layout


def _bad_image_detail(err: BadImage, limit_mb: float) -> str:
    if err.reason.startswith("file too large"):
        return f"image too large: the limit is {limit_mb:g} MB"
    return err.reason


async def read_body(request: Request, limit: int, too_large: str, timeout: float) -> bytes:
    """The whole request body in memory, refusing (413, ``too_large``) more than ``limit`` bytes early.

    A body that has not fully arrived ``timeout`` seconds after the headers gets 408 and the
    connection is closed: a slow or stalled client holds no more than its socket (the wait is
    asynchronous, the worker keeps serving others) and only for that long.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem(413, too_large)
    buf = bytearray()
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                buf += chunk
                if len(buf) > limit:
                    raise Problem(413, too_large)
    except TimeoutError:
        raise Problem(408, f"request body not received within {timeout:g} s: the upload was too slow or stalled",
                      {"Connection": "close"}) from None
    return bytes(buf)


def parse_multipart(body: bytes, content_type: str, max_part: int, max_files: int,
                    fields: dict[str, str] | None = None) -> list[bytes]:
    """The ``file`` fields of a multipart/form-data body, parsed in memory (never spooled to disk); with
    ``fields``, the other fields (short text: POST /v1/feedback's label and consent) go there by name."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise Problem(422, "multipart body without a boundary: send the image as a form field named file",
                      reason="malformed_form")
    files: list[bytes] = []
    state: dict[str, Any] = {"name": None, "data": None, "field": b"", "value": b"", "headers": {}}

    def on_part_begin() -> None:
        state.update(name=None, data=bytearray(), headers={})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        _, opts = parse_options_header(state["headers"].get(b"content-disposition", b""))
        state["name"] = opts.get(b"name")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["name"] != b"file":
            if fields is not None:
                state["data"] += data[start:end]
                if len(state["data"]) > _FIELD_MAX:
                    raise Problem(422, f"form field too long: at most {_FIELD_MAX} bytes", reason="malformed_form")
            return  # other fields are ignored, not kept
        state["data"] += data[start:end]
        if len(state["data"]) > max_part:
            raise Problem(413, f"image too large: the limit is {max_part / 1e6:g} MB")

    def on_part_end() -> None:
        if state["name"] == b"file":
            files.append(bytes(state["data"]))
            if len(files) > max_files:
                raise Problem(413, f"too many images in one request: at most {max_files}", reason="too_many_images")
        elif fields is not None and state["name"]:
            fields.setdefault(state["name"].decode("latin-1"), bytes(state["data"]).decode("utf-8", "replace"))
        state["data"] = None

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data, "on_part_end": on_part_end,
    }, max_header_count=16)
    try:
        parser.write(body)
        parser.finalize()
    except Problem:
        raise
    except Exception as exc:  # MultipartParseError and friends: a malformed body
        raise Problem(422, f"malformed multipart body ({type(exc).__name__}): "
                           "send the image as a form field named file", reason="malformed_form") from None
    return files


def _answer(p: Prediction) -> dict:
    # A sum of class probabilities can exceed 1 by a rounding ulp; the schema promises <= 1.
    return {"prediction": p.label, "probability": min(p.probability, 1.0), "family": p.family,
            "family_probability": min(p.family_probability, 1.0), "top5": p.top5, "image_id": p.image_id}


def _json(payload: dict, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(payload, allow_nan=False), status_code=status, media_type="application/json",
                    headers=headers)


# ---------------------------------------------------------------------------- the app


class _Counts:
    """Per-process request counters: the only thing the service remembers about requests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: collections.Counter[str] = collections.Counter()

    def add(self, **inc: int) -> None:
        with self._lock:
            self._c.update(inc)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self._c.items()))


def _audit_line(event: str, spec: ModelSpec, counts: dict[str, int]) -> str:
    # Counts only: never image bytes, file names, image ids or client addresses.
    return json.dumps({"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "pid": os.getpid(), "model_version": spec.model_version, "counts": counts}, sort_keys=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:.4g} MB"


class _Service:
    """What the routes of one worker share: the model, its request counters, the limits."""

    def __init__(self, predictor: OnlinePredictor, cfg: Settings, metrics: ServeMetrics):
        self.predictor = predictor
        self.cfg = cfg
        self.metrics = metrics
        self.recent: RecentImages | None = None  # serve --feedback-dir: the images POST /v1/feedback's image_id names
        self.max_bytes = predictor.max_bytes
        self.limit_mb = self.max_bytes / 1e6
        self.counts = _Counts()
        from canestra.serve.drift import ModelDrift  # after the serve extra's import check above

        self.drift = ModelDrift()  # GET /v1/drift: rolling windows of this worker's answers
        self.ready = True  # False while the worker shuts down: /readyz then says 503
        self._limiter: anyio.CapacityLimiter | None = None  # created inside the event loop
        # Decoded bytes (images.decoded_size): one image at most, and what this worker admits at
        # once over all its requests (queued and running). Both are read from the headers before any
        # pixel is decoded, so a few-kB bomb costs a header parse, never its 100+ MB of pixels.
        self.max_decoded = int(cfg.max_decoded_mb * 1e6)
        self.worker_decoded = int((cfg.worker_decoded_mb or 4 * cfg.max_decoded_mb) * 1e6)
        self.admitted = 0  # decoded bytes of the requests admitted now; event loop only, no lock

    @contextmanager
    def admit(self, cost: int):
        """Reserve ``cost`` decoded bytes of this worker's budget for one request, or refuse it."""
        if cost > self.worker_decoded:
            raise Problem(413, f"request too large when decoded: its images decode to {_mb(cost)}, a request "
                               f"may decode to at most {_mb(self.worker_decoded)}; send fewer or smaller images",
                          reason="decoded_too_large")
        if self.admitted + cost > self.worker_decoded:
            raise Problem(503, "busy: this worker is decoding other large images; retry after 1 s",
                          {"Retry-After": "1"})
        self.admitted += cost
        try:
            yield
        finally:
            self.admitted -= cost

    def cost(self, data: bytes) -> int:
        """Decoded bytes of one image from its header (Problem 413/415/422 when it cannot be used)."""
        try:
            cost = decoded_size(data, max_pixels=self.predictor.max_pixels, max_bytes=self.max_bytes)
        except BadImage as err:
            raise image_problem(err, self.limit_mb) from None
        if cost > self.max_decoded:
            raise Problem(413, f"image too large when decoded: {_mb(cost)} (width x height x channels), "
                               f"the limit is {_mb(self.max_decoded)}", reason="decoded_too_large")
        return cost

    @property
    def spec(self) -> ModelSpec:
        """The model served now (``swap`` replaces it)."""
        return self.predictor.spec

    def swap(self, predictor: OnlinePredictor) -> ModelSpec:
        """Serve ``predictor`` from now on; the old model's spec. serve/swap.py calls it on the event loop
        holding the compute slot, so no request is scored half by one model and half by the other."""
        old = self.predictor.spec
        self.predictor = predictor
        return old

    def compute_limiter(self) -> anyio.CapacityLimiter:
        # One inference at a time per worker: its ORT session already uses `threads` cores.
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)
        return self._limiter

    async def body(self, request: Request, limit: int, too_large: str) -> bytes:
        return await read_body(request, limit, too_large, self.cfg.body_timeout)

    def score_one(self, data: bytes) -> dict:
        try:
            rgb = self.predictor.decode(data)
        except BadImage as err:
            raise image_problem(err, self.limit_mb) from None
        except MemoryError:
            raise Problem(413, "image too large to decode in memory", reason="decoded_too_large") from None
        predictor = self.predictor  # the model that answers, also for the drift windows
        p = predictor.predict_rgb([rgb])[0]
        self.drift.observe(predictor.spec, [p])
        return _answer(p)

    async def score(self, data: bytes) -> dict:
        cost = self.cost(data)
        with self.admit(cost):
            if cost <= INLINE_DECODED_BYTES:
                return self.score_one(data)
            # Off the event loop (health probes and other clients keep being answered), one decode
            # and inference at a time per worker: peak memory stays a few times max_decoded.
            return await anyio.to_thread.run_sync(self.score_one, data, limiter=self.compute_limiter())

    async def score_batch(self, blobs: list[bytes]) -> list[dict]:
        items: list[dict] = [{} for _ in blobs]
        costs: dict[int, int] = {}
        for i, data in enumerate(blobs):
            try:
                costs[i] = self.cost(data)
            except Problem as p:  # this image alone would get that status: the others are still scored
                items[i] = _refused(i, p)
        if not costs:  # nothing to decode: no need to queue behind other requests' inference
            return items
        with self.admit(sum(costs.values())):
            await anyio.to_thread.run_sync(self.score_many, blobs, costs, items, limiter=self.compute_limiter())
        return items

    def score_many(self, blobs: list[bytes], costs: dict[int, int], items: list[dict]) -> None:
        """Fill ``items`` for the images in ``costs``, decoded in chunks of at most max_decoded bytes."""
        held: list[tuple[int, Any]] = []
        held_cost = 0

        def flush() -> None:
            nonlocal held_cost
            predictor = self.predictor  # the model that answers, also for the drift windows
            preds = predictor.predict_rgb([rgb for _, rgb in held])
            self.drift.observe(predictor.spec, preds)
            for (i, _), p in zip(held, preds):
                items[i] = {"index": i, "status": 200, **_answer(p)}
            held.clear()
            held_cost = 0

        for i, cost in costs.items():
            if held and held_cost + cost > self.max_decoded:
                flush()  # the pixels held so far are scored and dropped before more are decoded
            try:
                held.append((i, self.predictor.decode(blobs[i])))
                held_cost += cost
            except BadImage as err:
                items[i] = _refused(i, image_problem(err, self.limit_mb))
            except MemoryError:
                items[i] = _refused(i, Problem(413, "image too large to decode in memory", reason="decoded_too_large"))
        flush()


def _refused(index: int, p: Problem) -> dict:
    """A batch entry for a refused image; ``_reason`` is for the metrics and is taken out before sending."""
    return {"index": index, "status": p.status, "error": p.detail, "_reason": p.reason}


def create_app(model_dir: str | None = None, settings: Settings | None = None, *,
               predictor: OnlinePredictor | None = None, keys: KeyRing | None = None,
               host_check: bool = False, metrics_dir: str | None = None,
               model_source: dict[str, Any] | None = None) -> FastAPI:
    """The FastAPI app serving one model; loads it now (raises InputError if ``model_dir`` is not one).

    ``host_check``: on a loopback ``cfg.host``, answer only requests whose Host header is an IP
    address, ``localhost`` or one of ``cfg.allowed_hosts`` (DNS rebinding); the real server turns it
    on, in-process test clients (Host ``testserver``) leave it off. ``metrics_dir``: the workers'
    shared Prometheus folder (``run_serve`` makes it), None for metrics of this process alone.
    ``model_source``: ``{"source": ModelSource fields, "token": what the model was resolved from}`` when
    ``--model`` named a pointer or an MLflow alias to follow (serve/swap.py).
    """
    cfg = settings or Settings.load()
    metrics = ServeMetrics(metrics_dir)
    t0 = time.perf_counter()
    loaded = predictor or _load_predictor(model_dir, cfg)
    metrics.model_loaded(loaded.spec.model_version, time.perf_counter() - t0 if predictor is None else None)
    svc = _Service(loaded, cfg, metrics)
    app = _new_app(svc)
    if model_source is not None:  # serve --model POINTER|models:/NAME@ALIAS follows promotions (serve/swap.py)
        from canestra.serve.swap import ModelSource, ModelWatcher

        app.state.model_watcher = ModelWatcher(svc, ModelSource(**model_source["source"]), cfg.model_poll,
                                               lambda d: _load_predictor(d, cfg), model_source["token"])
    if keys is None and cfg.api_keys_file:
        keys = KeyRing(cfg.api_keys_file)
    app.state.keys = keys
    if host_check and is_loopback(cfg.host):
        app.add_middleware(_HostCheck, allowed=_allowed_hosts(cfg), counts=svc.counts)
    guarded = APIRouter(dependencies=_guards(cfg, keys), responses=_guard_responses(cfg))
    _add_prediction_routes(guarded, svc)
    _add_model_route(guarded, svc)
    _add_metrics_route(guarded, svc)
    if cfg.feedback_dir:  # POST /v1/feedback (serve/feedback.py): corrections with consent, into the store
        from canestra.serve.feedback import add_feedback_routes

        add_feedback_routes(guarded, svc, cfg.feedback_dir, keys, _json)
        app.description += " With the user's consent, POST /v1/feedback stores a corrected photo, metadata-free."
    from canestra.serve.drift import add_drift_route

    add_drift_route(guarded, svc, _json)
    app.include_router(guarded)
    _add_health_routes(app, svc)
    _add_page(app)
    _add_docs(app)
    # added last, so outermost: refusals of the Host check get a request id and are counted too
    app.add_middleware(Observe, metrics=metrics, access_log=cfg.log_format == "json",
                       mounts=tuple(r.path for r in app.routes if isinstance(r, Mount)))
    return app


def _load_predictor(model_dir: str | None, cfg: Settings) -> OnlinePredictor:
    if model_dir is None:
        raise InputError("no model: pass --model DIR/model")
    predictor = OnlinePredictor(load_model_spec(model_dir), cfg.serve_threads or default_threads(cfg.workers),
                                max_bytes=int(cfg.max_upload_mb * 1_000_000))
    predictor.warm_up()
    return predictor


def _lifespan(svc: _Service):
    async def audit_every(interval: float) -> None:
        last: dict[str, int] = {}
        while True:
            await asyncio.sleep(interval)
            now = svc.counts.snapshot()
            if now != last:
                log.info(_audit_line("serve.requests", svc.spec, now))
                last = now

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.ready = True
        keys: KeyRing | None = app.state.keys
        watcher = getattr(app.state, "model_watcher", None)  # serve/swap.py: a pointer or alias to follow
        hup = getattr(app.state, "reload_keys_on_sighup", False) and (keys is not None or watcher is not None)
        if hup:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _on_sighup, keys, watcher)
        if watcher is not None:
            watcher.start()
        log.info(_audit_line("serve.start", svc.spec, svc.counts.snapshot()))
        task = asyncio.create_task(audit_every(AUDIT_INTERVAL_S))
        try:
            yield
        finally:
            svc.ready = False
            task.cancel()
            if watcher is not None:
                watcher.stop()
            if hup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            svc.metrics.worker_stopped()
            log.info(_audit_line("serve.stop", svc.spec, svc.counts.snapshot()))

    return lifespan


def _on_sighup(keys: KeyRing | None, watcher) -> None:
    """SIGHUP: re-read the keys file; look at the model source now (serve/swap.py)."""
    if keys is not None:
        _reload_keys(keys)
    if watcher is not None:
        watcher.wake()


def _reload_keys(keys: KeyRing) -> None:
    n, problem = keys.reload()
    line = {"event": "serve.keys_reloaded" if problem is None else "serve.keys_not_reloaded", "keys": n,
            "pid": os.getpid(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if problem is not None:
        line["reason"] = problem  # the file's path and what is wrong with it: never a key
    (log.info if problem is None else log.warning)(json.dumps(line, sort_keys=True))


def _new_app(svc: _Service) -> FastAPI:
    app = FastAPI(
        title="canestra",
        version=svc.spec.model_version,
        summary="Fruit-image classification: EfficientNet-Lite0 features, PCA, logistic regression; answers a "
                "variety and its family, or `unknown` for images unlike any training class.",
        description="Uploaded images are processed in memory and never stored or logged; "
                    "the service keeps request counts and, for `/v1/drift`, a few numbers per recent answer "
                    "(never the image or its id).",
        lifespan=_lifespan(svc),
        docs_url=None,  # served by _add_docs from local assets: no CDN
        redoc_url=None,
    )
    app.state.predictor = svc.predictor
    app.state.counts = svc.counts

    @app.exception_handler(Problem)
    async def _problem(_request: Request, exc: Problem) -> Response:
        svc.counts.add(requests=1, **{f"rejected_{exc.status}": 1})
        svc.metrics.rejected(exc.reason)
        return _json({"detail": exc.detail}, exc.status, exc.headers)

    return app


def _allowed_hosts(cfg: Settings) -> frozenset[str]:
    names = {"localhost", cfg.host.lower()} | {h.strip().lower() for h in (cfg.allowed_hosts or "").split(",")}
    return frozenset(n for n in names if n)


def _host_name(host: str) -> str:
    """The name of a Host header value, without its port (``[::1]:8000`` -> ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class _HostCheck:
    """Pure ASGI middleware: 421 for a Host header that is neither an IP address nor an allowed name.

    A page on evil.example whose name is re-pointed at 127.0.0.1 (DNS rebinding) makes the browser
    send ``Host: evil.example``; a loopback service that answers it hands that page its responses.
    """

    def __init__(self, app, allowed: frozenset[str], counts: _Counts):
        self.app = app
        self.allowed = allowed
        self.counts = counts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            raw = next((v for k, v in scope["headers"] if k == b"host"), None)
            name = _host_name(raw.decode("latin-1")) if raw is not None else ""
            if raw is not None and not self._ok(name):
                self.counts.add(requests=1, rejected_421=1)
                body = json.dumps({"detail": "Host header not accepted: this service answers requests to its "
                                             "IP address or localhost only (serve --allowed-hosts NAME adds a name)"})
                await send({"type": "http.response.start", "status": 421,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body.encode()})
                return
        await self.app(scope, receive, send)

    def _ok(self, name: str) -> bool:
        if name in self.allowed:
            return True
        try:
            ipaddress.ip_address(name)  # an address cannot be re-pointed: only names can
            return True
        except ValueError:
            return False


def _guards(cfg: Settings, keys: KeyRing | None) -> list:
    """Dependencies of every /v1 route: the rate limit first (it also slows key guessing), then the key."""
    guards = []
    if cfg.rate_limit > 0:
        limiter = RateLimiter(cfg.rate_limit, cfg.rate_burst)

        async def rate_limit(request: Request) -> None:
            wait = limiter.retry_after(request.client.host if request.client else "")
            if wait:
                raise Problem(429, f"too many requests: at most {cfg.rate_limit:g} per second from one client; "
                                   f"retry after {wait} s", {"Retry-After": str(wait)})

        guards.append(Depends(rate_limit))
    if keys is not None:
        scheme = HTTPBearer(auto_error=False, description="one of the keys in the server's --api-keys-file")

        async def require_key(creds: HTTPAuthorizationCredentials | None = Security(scheme)) -> None:
            if creds is None:
                raise Problem(401, "this service needs an API key: send the header Authorization: Bearer <key>",
                              {"WWW-Authenticate": "Bearer"})
            if not keys.matches(creds.credentials):
                raise Problem(401, "API key not accepted", {"WWW-Authenticate": 'Bearer error="invalid_token"'})

        guards.append(Depends(require_key))
    return guards


def _guard_responses(cfg: Settings) -> dict:
    out: dict[int | str, dict] = {}
    if cfg.rate_limit > 0:
        out[429] = {"model": ErrorOut, "description": "too many requests from this client: wait `Retry-After` seconds"}
    if cfg.api_keys_file:
        out[401] = {"model": ErrorOut, "description": "missing or wrong API key (`Authorization: Bearer <key>`)"}
    return out


def _add_prediction_routes(router: APIRouter, svc: _Service) -> None:
    cfg = svc.cfg
    max_bytes, limit_mb = svc.max_bytes, svc.limit_mb

    @router.post("/v1/predict", response_model=PredictionOut, responses=_ERRORS, openapi_extra=_request_body(False),
                 summary="Classify one image (multipart field `file`, or the raw image as the body)")
    async def predict(request: Request) -> Response:
        t0 = time.perf_counter()
        body = await svc.body(request, max_bytes + _MULTIPART_SLACK, f"image too large: the limit is {limit_mb:g} MB")
        ctype = request.headers.get("content-type", "")
        if ctype.lower().startswith("multipart/form-data"):
            files = parse_multipart(body, ctype, max_bytes, max_files=1 << 10)
            if len(files) != 1:
                raise Problem(422, "send exactly one image in a form field named file "
                                   "(several images: POST /v1/predict/batch)" if files else
                                   "no form field named file: send the image as file=@photo.jpg",
                          reason="malformed_form")
            data = files[0]
        else:
            data = body
            if len(data) > max_bytes:
                raise Problem(413, f"image too large: the limit is {limit_mb:g} MB")
        del body
        if not data:
            raise Problem(422, "empty request: send an image as the body or as a form field named file",
                          reason="empty")
        out = await svc.score(data)
        svc.counts.add(requests=1, images=1)
        svc.metrics.scored("/v1/predict", [out["family"]])  # "" (the family of `unknown`) counts as unknown
        out["model_version"] = svc.spec.model_version  # no await since scoring: the model that answered
        out["timing_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        if svc.recent is not None:  # serve --feedback-dir: POST /v1/feedback may name this image by its id
            await anyio.to_thread.run_sync(svc.recent.remember, data, svc.predictor.max_pixels, max_bytes)
        return _json(out)

    @router.post("/v1/predict/batch", response_model=BatchOut,
                 responses={k: _ERRORS[k] for k in (413, 422, 503)},
                 openapi_extra=_request_body(True),
                 summary=f"Classify several images (repeated multipart field `file`, at most {cfg.max_batch})")
    async def predict_batch(request: Request) -> Response:
        t0 = time.perf_counter()
        body = await svc.body(request, BATCH_BODY_FACTOR * max_bytes + _MULTIPART_SLACK,
                              f"request too large: a batch may carry {BATCH_BODY_FACTOR * limit_mb:g} MB in total")
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise Problem(422, "send the images as multipart/form-data, one form field named file per image",
                          reason="malformed_form")
        files = parse_multipart(body, ctype, max_bytes, max_files=cfg.max_batch)
        del body
        if not files:
            raise Problem(422, "no form field named file: send each image as file=@photo.jpg",
                          reason="malformed_form")
        items = await svc.score_batch(files)
        ok = sum(1 for it in items if it["status"] == 200)
        svc.counts.add(requests=1, batch_requests=1, images=ok, images_rejected=len(items) - ok)
        svc.metrics.scored("/v1/predict/batch", [it["family"] for it in items if it["status"] == 200])
        for it in items:
            if "_reason" in it:
                svc.metrics.rejected(it.pop("_reason"))
        return _json({"results": items, "model_version": svc.spec.model_version,
                      "timing_ms": round((time.perf_counter() - t0) * 1000, 3)})


def _add_model_route(router: APIRouter, svc: _Service) -> None:
    @router.get("/v1/model", response_model=ModelOut,
                summary="The model served: classes, families, held-out figures, version")
    async def model_info() -> Response:
        return _json({**model_facts(svc.spec), "requests": svc.counts.snapshot(),  # the model of now: swaps
                      "feedback": svc.recent is not None})


def _add_metrics_route(router: APIRouter, svc: _Service) -> None:
    # On the guarded router: the same rate limit and API key as /v1/* (answer counts by family are
    # business figures); Prometheus sends the key with `authorization: credentials_file`.
    @router.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        body, content_type = svc.metrics.render()
        return Response(body, media_type=content_type)


def _section(metrics: dict[str, Any], key: str) -> dict[str, Any]:
    value = metrics.get(key)
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def model_facts(spec: ModelSpec) -> dict[str, Any]:
    """What clients may know of the model: no path, no image id, nothing per image of the training data.

    metrics.json also lists training images (``worst_errors``: ids and paths) that an erase may later
    remove; only aggregate held-out figures are taken from it, by name, so a field added to it later
    never reaches clients by default.
    """
    s, m = spec, spec.metrics or {}
    metrics = None
    if spec.metrics is not None:
        family, unknown, calibration = (_section(m, k) for k in ("family", "unknown", "calibration"))
        n = _number(m.get("n"))
        metrics = {"held_out_images": int(n) if n is not None else None, "accuracy": _number(m.get("accuracy")),
                   "macro_f1": _number(m.get("macro_f1")), "weighted_f1": _number(m.get("weighted_f1")),
                   "family_accuracy": _number(family.get("accuracy")),
                   "unknown_coverage": _number(unknown.get("coverage")),
                   "calibration_ece": _number(calibration.get("ece"))}
    return {
        "classes": list(s.labels), "families": s.families, "class_families": list(s.rule.families),
        "unknown_thresholds": {"energy": s.rule.energy_threshold, "fruitness": s.rule.fruitness_threshold},
        "created_at": s.created_at, "version": s.version, "model_version": s.model_version,
        "image_sizes": list(s.image_sizes), "precision": s.precision, "input_fit": s.input_fit,
        "pca_k": int(s.pca.shape[1]),
        # a custom graph's file name could be a path or name a person: say only that it is one
        "backbone": backbone.MODEL_NAME if not s.onnx_path else "custom ONNX graph",
        "spark_version": s.spark_version, "metrics": metrics,
    }


def _add_health_routes(app: FastAPI, svc: _Service) -> None:
    """Open without a key and never rate limited: load balancers and orchestrators probe them."""

    @app.get("/healthz", response_model=HealthOut, summary="Liveness")
    async def healthz() -> Response:
        return _json({"status": "ok", "requests": svc.counts.snapshot()})

    @app.get("/readyz", response_model=HealthOut, responses={503: {"model": HealthOut, "description": "not ready"}},
             summary="Readiness: the model is loaded and the worker is not shutting down")
    async def readyz() -> Response:
        ready = svc.ready
        return _json({"status": "ready" if ready else "stopping", "requests": svc.counts.snapshot()},
                     200 if ready else 503)


def _add_page(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        # Everything the page needs comes from this app: no CDN, no inline script.
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                                       "base-uri 'none'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def _add_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from the swagger-ui-bundle-v2 wheel's files (FastAPI's default loads a CDN)."""
    from fastapi.openapi.docs import get_swagger_ui_html

    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:  # pragma: no cover - serve extra without the bundle: CDN-hosted docs
        swagger_ui_path = None
    if swagger_ui_path:
        app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")
        urls: dict[str, Any] = {"swagger_js_url": "/docs-assets/swagger-ui-bundle.js",
                                "swagger_css_url": "/docs-assets/swagger-ui.css",
                                "swagger_favicon_url": "/docs-assets/favicon-32x32.png"}
    else:
        urls = {}

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title="canestra API", **urls)


# ---------------------------------------------------------------------------- running it


def app_from_env() -> FastAPI:
    """App factory for uvicorn worker processes: the CLI passes its settings in ``CANESTRA_SERVE_CONFIG``."""
    raw = os.environ.get(ENV_CONFIG)
    if not raw:
        raise InputError(f"{ENV_CONFIG} is not set: start the service with `canestra serve --model DIR/model`")
    conf = json.loads(raw)
    model_dir = conf.pop("model_dir")
    metrics_dir = conf.pop("metrics_dir", None)
    model_source = conf.pop("model_source", None)  # serve/swap.py: a pointer or an alias the workers follow
    if hasattr(signal, "SIGHUP"):
        # Until the lifespan installs the reload, a SIGHUP (its default action: exit) is ignored.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    app = create_app(model_dir, Settings.load(**conf), host_check=True, metrics_dir=metrics_dir,
                     model_source=model_source)
    app.state.reload_keys_on_sighup = hasattr(signal, "SIGHUP")
    return app


def log_config(level: str = "INFO", log_format: str = "text") -> dict:
    """uvicorn's logging config plus the service's audit logger (counts only); ``json``: uvicorn's own
    lines as JSON objects too, and one access line per request (canestra.serve.metrics.Observe)."""
    from uvicorn.config import LOGGING_CONFIG

    conf = json.loads(json.dumps(LOGGING_CONFIG))
    conf["formatters"]["audit"] = {"format": "%(message)s"}  # the audit lines are JSON objects already
    conf["handlers"]["audit"] = {"class": "logging.StreamHandler", "formatter": "audit", "stream": "ext://sys.stderr"}
    conf["loggers"][AUDIT_LOGGER] = {"handlers": ["audit"], "level": level, "propagate": False}
    if log_format == "json":
        for name in ("default", "access"):
            conf["formatters"][name] = {"()": "canestra.serve.metrics.JsonFormatter"}
        conf["handlers"]["requests"] = {"class": "logging.StreamHandler", "formatter": "default",
                                        "stream": "ext://sys.stderr"}
        conf["loggers"][ACCESS_LOGGER] = {"handlers": ["requests"], "level": level, "propagate": False}
    return conf


def check_serve_settings(cfg: Settings) -> None:
    if not 1 <= cfg.port <= 65535:
        raise InputError(f"--port must be between 1 and 65535, got {cfg.port}")
    if cfg.workers < 1 or (cfg.serve_threads is not None and cfg.serve_threads < 1):
        raise InputError("--workers and --threads must be positive numbers")
    if cfg.max_upload_mb <= 0 or cfg.max_batch < 1:
        raise InputError("--max-upload-mb and --max-batch must be positive numbers")
    if cfg.rate_limit < 0 or cfg.rate_burst < 1:
        raise InputError("--rate-limit must be 0 (no limit) or more, and --rate-burst a positive number")
    if cfg.body_timeout <= 0 or cfg.drain_timeout < 0 or cfg.header_timeout <= 0:
        raise InputError("--body-timeout and --header-timeout must be positive numbers of seconds, "
                         "--drain-timeout 0 or more")
    if cfg.log_format not in LOG_FORMATS:
        raise InputError(f"--log-format must be text or json, got {cfg.log_format!r}")
    if cfg.max_decoded_mb <= 0 or cfg.worker_decoded_mb < 0:
        raise InputError("--max-decoded-mb must be a positive number, --worker-decoded-mb 0 (4 x that) or more")
    if cfg.worker_decoded_mb and cfg.worker_decoded_mb < cfg.max_decoded_mb:
        raise InputError(f"--worker-decoded-mb {cfg.worker_decoded_mb:g} is below --max-decoded-mb "
                         f"{cfg.max_decoded_mb:g}: a worker could never take the largest image allowed")
    for ip in trusted_proxies(cfg):
        if ip != "*":
            try:
                ipaddress.ip_network(ip, strict=False)
            except ValueError:
                raise InputError(f"--forwarded-allow-ips: {ip!r} is not an IP address or network "
                                 "(e.g. 10.0.0.5 or 10.0.0.0/24)") from None


def trusted_proxies(cfg: Settings) -> list[str]:
    """The --forwarded-allow-ips entries: the peers whose X-Forwarded-For names the client."""
    return [p.strip() for p in (cfg.forwarded_allow_ips or "").split(",") if p.strip()]


def check_auth(cfg: Settings) -> int:
    """How many API keys the service will accept (0: none required); refuses an open non-loopback bind."""
    if cfg.api_keys_file:
        n = len(load_api_keys(cfg.api_keys_file))  # InputError: missing, unreadable or empty file
        warning = keys_file_warning(cfg.api_keys_file)
        if warning:
            print(f"canestra: warning: {warning}", file=sys.stderr, flush=True)
        return n
    if not is_loopback(cfg.host) and not cfg.allow_no_auth:
        raise InputError(f"--host {cfg.host} can be reached from other machines and no API keys are set: pass "
                         "--api-keys-file FILE (one key per line), or --allow-no-auth to serve anyone who can reach it")
    return 0


def _exit_quietly_on_sigterm(_sig: int, _frame: Any) -> None:
    """uvicorn drains, then re-raises SIGTERM with the handler it found: this one makes it exit 0."""


def _forward_sighup_to_workers() -> None:
    """With several workers, SIGHUP reaches uvicorn's supervisor, which would replace every worker
    (each loads the model again, and one that finds the keys file unusable fails to start). The
    workers re-read the keys file in place (app_from_env), so the supervisor only passes it on."""
    import importlib

    from uvicorn.supervisors.multiprocess import Multiprocess

    # the module, not uvicorn.main the function (uvicorn's __init__ shadows the name with it)
    uvicorn_main = importlib.import_module("uvicorn.main")

    class _Supervisor(Multiprocess):
        def handle_hup(self) -> None:
            for proc in self.processes:
                pid = getattr(proc, "pid", None)
                if pid:
                    os.kill(pid, signal.SIGHUP)

    setattr(uvicorn_main, "Multiprocess", _Supervisor)  # noqa: B010  # uvicorn.run looks it up when called


def run_serve(model_dir: str, cfg: Settings, source: str | None = None, registry: str | None = None) -> int:
    """Validate the model here (exit 2 on a bad folder), then hand over to uvicorn. ``source``: what --model
    said when it names a pointer or an MLflow alias (``registry``) the workers follow (serve/swap.py)."""
    import uvicorn

    from canestra.serve.feedback import check_feedback
    from canestra.serve.swap import model_source

    check_serve_settings(cfg)
    n_keys = check_auth(cfg)
    feedback_store = check_feedback(cfg, n_keys)  # --feedback-dir: needs keys; made and proved writable now
    followed = model_source(source or model_dir, registry)
    if followed is not None:
        if cfg.model_poll < 0:
            raise InputError(f"--model-poll must be 0 (on SIGHUP only) or more seconds, got {cfg.model_poll:g}")
        model_dir, token = followed.resolve()
    spec = load_model_spec(model_dir)  # InputError -> `canestra: error: ...`, exit 2, before uvicorn starts
    if not spec.onnx_path:
        from canestra.vision import backbone

        backbone.default_model_path()  # build the ONNX graph once, not once per worker
    threads = cfg.serve_threads or default_threads(cfg.workers)
    # uvicorn starts its workers from an import string, so the settings travel in the environment
    # the workers inherit; it is put back as it was when the service stops (a notebook's too).
    conf = {"model_dir": spec.model_dir, "serve_threads": threads,
            "max_upload_mb": cfg.max_upload_mb, "max_batch": cfg.max_batch,
            "workers": cfg.workers, "rate_limit": cfg.rate_limit,
            "rate_burst": cfg.rate_burst, "body_timeout": cfg.body_timeout,
            "header_timeout": cfg.header_timeout,
            "max_decoded_mb": cfg.max_decoded_mb,
            "worker_decoded_mb": cfg.worker_decoded_mb,
            "host": cfg.host, "allowed_hosts": cfg.allowed_hosts, "log_format": cfg.log_format,
            "feedback_dir": feedback_store, "retention_days": cfg.retention_days, "model_poll": cfg.model_poll,
            "model_source": {"source": followed.to_json(), "token": token} if followed is not None else None,
            # the path only: each worker reads the keys itself
            "api_keys_file": os.path.abspath(cfg.api_keys_file)
            if n_keys and cfg.api_keys_file else None}
    from canestra.privacy import audit

    audit.note(details={"model_version": spec.model_version, "workers": cfg.workers, "threads": threads,
                        "api_keys": n_keys, "rate_limit": cfg.rate_limit})
    auth = f"API key required ({n_keys} key(s))" if n_keys else "no API key required"
    print(f"canestra serve: model {spec.model_version} ({len(spec.labels)} classes, {len(spec.families)} families) "
          f"on http://{cfg.host}:{cfg.port}/ with {cfg.workers} worker(s) x {threads} ONNX Runtime thread(s), {auth}",
          flush=True)
    if followed is not None:
        print(f"canestra serve: following {followed.uri} (checked every {cfg.model_poll:g} s and on SIGHUP)", flush=True)
    if feedback_store:
        print(f"canestra serve: corrections sent with consent go to {feedback_store}", flush=True)
    audit.note(details={"follows": followed.kind if followed else None, "feedback": bool(feedback_store)})
    signal.signal(signal.SIGTERM, _exit_quietly_on_sigterm)
    if cfg.workers > 1 and hasattr(signal, "SIGHUP"):
        _forward_sighup_to_workers()
    # With several workers, their metric files go to a private folder made here and removed on stop.
    with multiprocess_dir(cfg.workers) as metrics_dir, \
            temporary_env(ENV_CONFIG, json.dumps({**conf, "metrics_dir": metrics_dir})):
        _run_uvicorn(uvicorn, cfg, trusted_proxies(cfg))
    return 0


def _run_uvicorn(uvicorn, cfg: Settings, proxies) -> None:
    from canestra.serve.protocol import protocol_class

    uvicorn.run("canestra.serve.app:app_from_env", factory=True, host=cfg.host, port=cfg.port, workers=cfg.workers,
                access_log=False, log_config=log_config(log_format=cfg.log_format), server_header=False,
                http=protocol_class() or "auto",  # type: ignore[arg-type]
                # X-Forwarded-For only from the proxies named: uvicorn's default trusts 127.0.0.1 (any
                # local client could pick its rate-limit address) and no remote proxy (all share one).
                proxy_headers=bool(proxies), forwarded_allow_ips=proxies or None,
                timeout_graceful_shutdown=cfg.drain_timeout,  # type: ignore[arg-type]  # float seconds work
                # A worker answers the supervisor's health pings only once Python and uvicorn are
                # imported; uvicorn's 5 s default kills slow starters on a busy machine, in a loop.
                timeout_worker_healthcheck=60)
