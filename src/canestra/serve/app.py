"""``canestra serve``: online classification over HTTP (FastAPI + uvicorn), no Spark.

Each uvicorn worker process loads the model once (:mod:`canestra.serve.predictor`) and runs
one inference at a time on its own ONNX Runtime session, so ``workers x threads``
stays within the machine's cores.

Privacy: uploads are read into memory, decoded, scored and dropped. Nothing is
written to disk (the multipart body is parsed in memory, never spooled to a
temporary file), no image bytes, file names or client addresses are logged (the
uvicorn access log is off), and the audit log lines carry request counts only.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import signal
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from canestra.config import Settings
from canestra.errors import EnvironmentProblem, InputError
from canestra.serve.predictor import ModelSpec, OnlinePredictor, Prediction, default_threads, load_model_spec
from canestra.serve.security import RateLimiter, is_loopback, key_matches, load_api_keys
from canestra.vision.images import BadImage

try:
    import anyio
    from fastapi import APIRouter, Depends, FastAPI, Request, Security
    from fastapi.responses import FileResponse, Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel, Field
except ImportError as exc:  # pragma: no cover - install problem
    raise EnvironmentProblem("`canestra serve` needs the serve extra: run `pip install 'canestra[serve]'`") from exc

STATIC_DIR = Path(__file__).parent / "static"
ENV_CONFIG = "CANESTRA_SERVE_CONFIG"  # JSON of the serve settings for worker processes (a keys file's path, no keys)
AUDIT_LOGGER = "canestra.serve.audit"
AUDIT_INTERVAL_S = 60.0
BATCH_BODY_FACTOR = 4  # a batch request may carry at most 4 x the per-image limit in total
_MULTIPART_SLACK = 64 * 1024  # boundaries and part headers around the image bytes

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
    metrics: dict[str, Any] | None = Field(description="metrics.json written by `canestra train`, if present")
    requests: dict[str, int] = Field(description="request counts of this worker process")


class HealthOut(BaseModel):
    status: str
    requests: dict[str, int]


class ErrorOut(BaseModel):
    detail: str


_ERRORS: dict[int | str, dict[str, Any]] = {413: {"model": ErrorOut, "description": "upload too large"},
           415: {"model": ErrorOut, "description": "not an image, or an unsupported format"},
           422: {"model": ErrorOut, "description": "corrupt, truncated, animated image or decompression bomb"}}

_BINARY = {"type": "string", "format": "binary"}
_RAW_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff", "application/octet-stream")


def _request_body(many: bool) -> dict:
    file_schema = {"type": "array", "items": _BINARY, "minItems": 1} if many else _BINARY
    content: dict[str, Any] = {"multipart/form-data": {"schema": {"type": "object", "properties": {"file": file_schema},
                                                  "required": ["file"]}}}
    if not many:
        content.update({t: {"schema": _BINARY} for t in _RAW_TYPES})
    return {"requestBody": {"required": True, "content": content}}


# ---------------------------------------------------------------------------- request handling


class Problem(Exception):
    """A client error answered as ``{"detail": message}`` with ``status``."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


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


def parse_multipart(body: bytes, content_type: str, max_part: int, max_files: int) -> list[bytes]:
    """The ``file`` fields of a multipart/form-data body, parsed in memory (never spooled to disk)."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise Problem(422, "multipart body without a boundary: send the image as a form field named file")
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
            return  # other fields are ignored, not kept
        state["data"] += data[start:end]
        if len(state["data"]) > max_part:
            raise Problem(413, f"image too large: the limit is {max_part / 1e6:g} MB")

    def on_part_end() -> None:
        if state["name"] == b"file":
            files.append(bytes(state["data"]))
            if len(files) > max_files:
                raise Problem(413, f"too many images in one request: at most {max_files}")
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
                           "send the image as a form field named file") from None
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


class _Service:
    """What the routes of one worker share: the model, its request counters, the limits."""

    def __init__(self, predictor: OnlinePredictor, cfg: Settings):
        self.predictor = predictor
        self.cfg = cfg
        self.spec: ModelSpec = predictor.spec
        self.max_bytes = predictor.max_bytes
        self.limit_mb = self.max_bytes / 1e6
        self.counts = _Counts()
        self.ready = True  # False while the worker shuts down: /readyz then says 503
        self._limiter: anyio.CapacityLimiter | None = None  # created inside the event loop

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
            raise Problem(bad_image_status(err), _bad_image_detail(err, self.limit_mb)) from None
        except MemoryError:
            raise Problem(413, "image too large to decode in memory") from None
        return _answer(self.predictor.predict_rgb([rgb])[0])

    def score_many(self, blobs: list[bytes]) -> list[dict]:
        items: list[dict] = [{} for _ in blobs]
        good, rgbs = [], []
        for i, data in enumerate(blobs):
            try:
                rgbs.append(self.predictor.decode(data))
                good.append(i)
            except BadImage as err:
                items[i] = {"index": i, "status": bad_image_status(err), "error": _bad_image_detail(err, self.limit_mb)}
            except MemoryError:
                items[i] = {"index": i, "status": 413, "error": "image too large to decode in memory"}
        for i, p in zip(good, self.predictor.predict_rgb(rgbs)):
            items[i] = {"index": i, "status": 200, **_answer(p)}
        return items


def create_app(model_dir: str | None = None, settings: Settings | None = None, *,
               predictor: OnlinePredictor | None = None) -> FastAPI:
    """The FastAPI app serving one model; loads it now (raises InputError if ``model_dir`` is not one)."""
    cfg = settings or Settings.load()
    svc = _Service(predictor or _load_predictor(model_dir, cfg), cfg)
    app = _new_app(svc)
    guarded = APIRouter(dependencies=_guards(cfg), responses=_guard_responses(cfg))
    _add_prediction_routes(guarded, svc)
    _add_model_route(guarded, svc)
    app.include_router(guarded)
    _add_health_routes(app, svc)
    _add_page(app)
    _add_docs(app)
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
    async def lifespan(_app: FastAPI):
        svc.ready = True
        log.info(_audit_line("serve.start", svc.spec, svc.counts.snapshot()))
        task = asyncio.create_task(audit_every(AUDIT_INTERVAL_S))
        try:
            yield
        finally:
            svc.ready = False
            task.cancel()
            log.info(_audit_line("serve.stop", svc.spec, svc.counts.snapshot()))

    return lifespan


def _new_app(svc: _Service) -> FastAPI:
    app = FastAPI(
        title="canestra",
        version=svc.spec.model_version,
        summary="Fruit-image classification: EfficientNet-Lite0 features, PCA, logistic regression; answers a "
                "variety and its family, or `unknown` for images unlike any training class.",
        description="Uploaded images are processed in memory and never stored or logged; "
                    "the service keeps request counts only.",
        lifespan=_lifespan(svc),
        docs_url=None,  # served by _add_docs from local assets: no CDN
        redoc_url=None,
    )
    app.state.predictor = svc.predictor
    app.state.counts = svc.counts

    @app.exception_handler(Problem)
    async def _problem(_request: Request, exc: Problem) -> Response:
        svc.counts.add(requests=1, **{f"rejected_{exc.status}": 1})
        return _json({"detail": exc.detail}, exc.status, exc.headers)

    return app


def _guards(cfg: Settings) -> list:
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
    if cfg.api_keys_file:
        digests = load_api_keys(cfg.api_keys_file)
        scheme = HTTPBearer(auto_error=False, description="one of the keys in the server's --api-keys-file")

        async def require_key(creds: HTTPAuthorizationCredentials | None = Security(scheme)) -> None:
            if creds is None:
                raise Problem(401, "this service needs an API key: send the header Authorization: Bearer <key>",
                              {"WWW-Authenticate": "Bearer"})
            if not key_matches(creds.credentials, digests):
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
    cfg, spec = svc.cfg, svc.spec
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
                                   "no form field named file: send the image as file=@photo.jpg")
            data = files[0]
        else:
            data = body
            if len(data) > max_bytes:
                raise Problem(413, f"image too large: the limit is {limit_mb:g} MB")
        del body
        if not data:
            raise Problem(422, "empty request: send an image as the body or as a form field named file")
        # Inline, not in a thread: one inference at a time per worker anyway, and the thread
        # hop (GIL hand-over, wake-up) measured 0.7 ms of the p50 (docs/serving.md).
        out = svc.score_one(data)
        svc.counts.add(requests=1, images=1)
        out["model_version"] = spec.model_version
        out["timing_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        return _json(out)

    @router.post("/v1/predict/batch", response_model=BatchOut, responses={413: _ERRORS[413], 422: _ERRORS[422]},
                 openapi_extra=_request_body(True),
                 summary=f"Classify several images (repeated multipart field `file`, at most {cfg.max_batch})")
    async def predict_batch(request: Request) -> Response:
        t0 = time.perf_counter()
        body = await svc.body(request, BATCH_BODY_FACTOR * max_bytes + _MULTIPART_SLACK,
                              f"request too large: a batch may carry {BATCH_BODY_FACTOR * limit_mb:g} MB in total")
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise Problem(422, "send the images as multipart/form-data, one form field named file per image")
        files = parse_multipart(body, ctype, max_bytes, max_files=cfg.max_batch)
        del body
        if not files:
            raise Problem(422, "no form field named file: send each image as file=@photo.jpg")
        items = await anyio.to_thread.run_sync(svc.score_many, files, limiter=svc.compute_limiter())
        ok = sum(1 for it in items if it["status"] == 200)
        svc.counts.add(requests=1, batch_requests=1, images=ok, images_rejected=len(items) - ok)
        return _json({"results": items, "model_version": spec.model_version,
                      "timing_ms": round((time.perf_counter() - t0) * 1000, 3)})


def _add_model_route(router: APIRouter, svc: _Service) -> None:
    @router.get("/v1/model", response_model=ModelOut,
                summary="The model served: classes, families, training metrics, version")
    async def model_info() -> Response:
        return _json({**svc.predictor.info(), "requests": svc.counts.snapshot()})


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
    return create_app(model_dir, Settings.load(**conf))


def log_config(level: str = "INFO") -> dict:
    """uvicorn's logging config plus the service's audit logger (counts only)."""
    from uvicorn.config import LOGGING_CONFIG

    conf = json.loads(json.dumps(LOGGING_CONFIG))
    conf["formatters"]["audit"] = {"format": "%(message)s"}
    conf["handlers"]["audit"] = {"class": "logging.StreamHandler", "formatter": "audit", "stream": "ext://sys.stderr"}
    conf["loggers"][AUDIT_LOGGER] = {"handlers": ["audit"], "level": level, "propagate": False}
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
    if cfg.body_timeout <= 0 or cfg.drain_timeout < 0:
        raise InputError("--body-timeout must be a positive number of seconds, --drain-timeout 0 or more")


def check_auth(cfg: Settings) -> int:
    """How many API keys the service will accept (0: none required); refuses an open non-loopback bind."""
    if cfg.api_keys_file:
        return len(load_api_keys(cfg.api_keys_file))  # InputError: missing, unreadable or empty file
    if not is_loopback(cfg.host) and not cfg.allow_no_auth:
        raise InputError(f"--host {cfg.host} can be reached from other machines and no API keys are set: pass "
                         "--api-keys-file FILE (one key per line), or --allow-no-auth to serve anyone who can reach it")
    return 0


def _exit_quietly_on_sigterm(_sig: int, _frame: Any) -> None:
    """uvicorn drains, then re-raises SIGTERM with the handler it found: this one makes it exit 0."""


def run_serve(model_dir: str, cfg: Settings) -> int:
    """Validate the model here (exit 2 on a bad folder), then hand over to uvicorn."""
    import uvicorn

    check_serve_settings(cfg)
    n_keys = check_auth(cfg)
    spec = load_model_spec(model_dir)  # InputError -> `canestra: error: ...`, exit 2, before uvicorn starts
    if not spec.onnx_path:
        from canestra.vision import backbone

        backbone.default_model_path()  # build the ONNX graph once, not once per worker
    threads = cfg.serve_threads or default_threads(cfg.workers)
    os.environ[ENV_CONFIG] = json.dumps({"model_dir": spec.model_dir, "serve_threads": threads,
                                         "max_upload_mb": cfg.max_upload_mb, "max_batch": cfg.max_batch,
                                         "workers": cfg.workers, "rate_limit": cfg.rate_limit,
                                         "rate_burst": cfg.rate_burst, "body_timeout": cfg.body_timeout,
                                         # the path only: each worker reads the keys itself
                                         "api_keys_file": os.path.abspath(cfg.api_keys_file)
                                         if n_keys and cfg.api_keys_file else None})
    from canestra.privacy import audit

    audit.note(details={"model_version": spec.model_version, "workers": cfg.workers, "threads": threads,
                        "api_keys": n_keys, "rate_limit": cfg.rate_limit})
    auth = f"API key required ({n_keys} key(s))" if n_keys else "no API key required"
    print(f"canestra serve: model {spec.model_version} ({len(spec.labels)} classes, {len(spec.families)} families) "
          f"on http://{cfg.host}:{cfg.port}/ with {cfg.workers} worker(s) x {threads} ONNX Runtime thread(s), {auth}",
          flush=True)
    signal.signal(signal.SIGTERM, _exit_quietly_on_sigterm)
    uvicorn.run("canestra.serve.app:app_from_env", factory=True, host=cfg.host, port=cfg.port, workers=cfg.workers,
                access_log=False, log_config=log_config(), server_header=False,
                timeout_graceful_shutdown=cfg.drain_timeout,  # type: ignore[arg-type]  # float seconds work
                # A worker answers the supervisor's health pings only once Python and uvicorn are
                # imported; uvicorn's 5 s default kills slow starters on a busy machine, in a loop.
                timeout_worker_healthcheck=60)
    return 0
