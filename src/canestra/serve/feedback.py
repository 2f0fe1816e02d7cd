"""``POST /v1/feedback``: a user says what a photo really shows, with consent, into the feedback store.

Only with ``serve --feedback-dir URI`` (and ``--api-keys-file``: only clients with a key may write).
Form fields (multipart/form-data; without a file, a urlencoded form works too): ``label`` (a family, e.g. ``Apple``, or a variety the served model knows), ``consent``
(exactly ``true``) and either ``file`` (the photo) or ``image_id`` (a photo this worker scored in the last
few minutes). Without consent the answer is 400 and nothing is read from the cache or written.

The photo is stored as ``clean_image`` makes it (no EXIF/GPS/ICC, named by its pixel hash:
``feedback.store``). For ``image_id``, each worker keeps the cleaned copies of the images it scored on
``POST /v1/predict`` in memory (``RecentImages``: ``RECENT_SECONDS``, at most ``RECENT_IMAGES`` images and
``RECENT_BYTES`` bytes, oldest dropped first): never on disk, gone with the worker, and only when feedback
is on. With several workers an id may have been scored by another one: the answer is then 404 and the
client sends the file.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import re
import threading
import time
import urllib.parse
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from canestra.config import Settings
from canestra.errors import CanestraError, InputError
from canestra.feedback import store
from canestra.vision.images import BadImage, clean_image

__all__ = ["CONSENT_TEXT", "RecentImages", "add_feedback_routes", "check_feedback"]

RECENT_SECONDS = 300.0
RECENT_IMAGES = 256
RECENT_BYTES = 64_000_000
_ID = re.compile(r"^[0-9a-f]{64}$")
_FORM_SLACK = 64 * 1024  # boundaries, part headers and the small text fields around the photo
CONSENT_TEXT = ("I agree that this photo and the answer I give are stored to improve the fruit classifier. "
                "The photo is kept without its metadata (no location, no camera details), under a random-looking "
                "id that does not name me, for at most {days}, and is deleted on request.")
NO_CONSENT = ("consent is required to store a correction: send the form field consent=true once the user has "
              "agreed to the consent text (GET /v1/feedback); nothing was stored")
log = logging.getLogger("canestra.serve.audit")


class RecentImages:
    """Cleaned copies of the images this worker just scored, by image id, for a short while (thread-safe)."""

    def __init__(self, seconds: float = RECENT_SECONDS, max_images: int = RECENT_IMAGES,
                 max_bytes: int = RECENT_BYTES, clock=time.monotonic):
        self.seconds, self.max_images, self.max_bytes, self.clock = seconds, max_images, max_bytes, clock
        self._items: collections.OrderedDict[str, tuple[float, Any]] = collections.OrderedDict()  # clean_image's
        self._bytes = 0
        self._lock = threading.Lock()

    def remember(self, data: bytes, max_pixels: int, max_bytes: int) -> None:
        """Clean ``data`` (an image just scored, so it decodes) and keep the copy; the raw bytes are not kept."""
        try:
            img = clean_image(data, max_pixels=max_pixels, max_bytes=max_bytes)
        except BadImage:
            return
        with self._lock:
            self._drop(img.image_id)
            self._items[img.image_id] = (self.clock() + self.seconds, img)
            self._bytes += len(img.content)
            self._expire()

    def get(self, image_id: str) -> Any:
        """clean_image's result for ``image_id`` (content, format, image_id), or None."""
        with self._lock:
            self._expire()
            hit = self._items.get(image_id)
            return hit[1] if hit else None

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._items)

    def _drop(self, image_id: str) -> None:
        old = self._items.pop(image_id, None)
        if old is not None:
            self._bytes -= len(old[1].content)

    def _expire(self) -> None:
        now = self.clock()
        while self._items:
            image_id, (expires, _) = next(iter(self._items.items()))
            if expires > now and len(self._items) <= self.max_images and self._bytes <= self.max_bytes:
                break
            self._drop(image_id)


class FeedbackOut(BaseModel):
    stored: bool
    image_id: str = Field(description="the stored photo's id (SHA-256 of its pixels), what `canestra erase "
                                      "--image-id` takes")
    label: str = Field(description="the label as stored: a family or a variety")
    level: str = Field(description="family or variety")


class FeedbackInfoOut(BaseModel):
    consent_text: str = Field(description="what the user agrees to by sending consent=true")
    families: list[str] = Field(description="family labels accepted (the served model's and canestra's families)")
    varieties: list[str] = Field(description="variety labels accepted: the served model's classes")
    retention_days: float | None = Field(description="how long a correction is kept (canestra purge), if configured")


def check_feedback(cfg: Settings, n_keys: int) -> str | None:
    """At start: the store (made when new, and proved writable), or None without --feedback-dir."""
    if not cfg.feedback_dir:
        return None
    if not n_keys:
        raise InputError("--feedback-dir needs --api-keys-file: corrections are written to storage, so only clients "
                         "with an API key may send them")
    return store.ensure_store(cfg.feedback_dir)


@functools.lru_cache(maxsize=1)
def _shipped_families() -> frozenset[str]:
    from canestra.answer.taxonomy import load_taxonomy

    return frozenset(load_taxonomy().families)


def _families(svc) -> list[str]:
    """Family labels accepted: the served model's and the shipped taxonomy's (a family it does not know yet)."""
    return sorted({f for f in svc.spec.families if f} | _shipped_families())


def resolve_label(text: str | None, svc) -> tuple[str, str]:
    """(level, label) for what the user typed: a served variety (exact class), else a family (any case)."""
    from canestra.answer.taxonomy import FAMILY_SUFFIX, is_variety_label

    raw = (text or "").strip()
    if not raw:
        raise _problem(422, "no label: send the right answer as the form field label, e.g. label=Apple", "no_label")
    varieties = {lb.lower(): lb for lb in svc.spec.labels if is_variety_label(lb)}
    if raw.lower() in varieties:
        return "variety", varieties[raw.lower()]
    families = {f.lower(): f for f in _families(svc)}
    name = raw.removesuffix(FAMILY_SUFFIX).strip().lower()
    if name in families:
        return "family", families[name]
    raise _problem(422, f"unknown label {raw[:60]!r}: send a fruit family (e.g. Apple) or one of the model's "
                        "varieties (GET /v1/feedback lists them)", "unknown_label")


def _problem(status: int, detail: str, reason: str, headers: dict[str, str] | None = None):
    from canestra.serve.app import Problem

    return Problem(status, detail, headers, reason=reason)


def add_feedback_routes(router: APIRouter, svc, store_uri: str, keys, respond) -> None:
    """``GET``/``POST /v1/feedback`` on the guarded router (``respond``: the app's JSON response maker);
    turns on the worker's recent-image memory."""
    from canestra.serve.app import image_problem, parse_multipart

    if keys is None:
        raise InputError("--feedback-dir needs --api-keys-file: corrections are written to storage, so only clients "
                         "with an API key may send them")
    cfg: Settings = svc.cfg
    store.ensure_store(store_uri)  # run_serve made it already; an app built in a notebook or a test too
    svc.recent = RecentImages()
    max_bytes, limit_mb = svc.max_bytes, svc.limit_mb
    days = f"{cfg.retention_days:g} days" if cfg.retention_days is not None else "the period the operator sets"

    @router.get("/v1/feedback", response_model=FeedbackInfoOut,
                summary="What POST /v1/feedback takes: the consent text and the labels accepted")
    async def feedback_info() -> Response:
        from canestra.answer.taxonomy import is_variety_label

        return respond({"consent_text": CONSENT_TEXT.format(days=days), "families": _families(svc),
                      "varieties": [lb for lb in svc.spec.labels if is_variety_label(lb)],
                      "retention_days": cfg.retention_days})

    @router.post("/v1/feedback", status_code=201, response_model=FeedbackOut,
                 responses={400: {"description": "no consent: nothing stored"},
                            404: {"description": "image_id not among this worker's recent predictions"},
                            503: {"description": "the feedback store cannot be written now: nothing stored"}},
                 openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                     "type": "object", "required": ["label", "consent"], "properties": {
                         "file": {"type": "string", "format": "binary", "minLength": 1},
                         "image_id": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                         "label": {"type": "string", "minLength": 1},
                         "consent": {"type": "string", "enum": ["true"]}}}}}}},
                 summary="Tell the service the right answer for a photo (with the user's consent)")
    async def feedback(request: Request) -> Response:
        body = await svc.body(request, max_bytes + _FORM_SLACK, f"image too large: the limit is {limit_mb:g} MB")
        ctype = request.headers.get("content-type", "")  # as sent: a boundary is case-sensitive
        kind = ctype.lower()
        fields: dict[str, str] = {}
        files: list[bytes] = []
        if kind.startswith("multipart/form-data"):
            files = parse_multipart(body, ctype, max_bytes, max_files=1, fields=fields)
        elif kind.startswith("application/x-www-form-urlencoded") and len(body) <= _FORM_SLACK:  # image_id only
            fields = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode("utf-8", "replace")).items()}
        else:
            raise _problem(422, "send the correction as a form (multipart/form-data): fields label, consent=true and "
                                "file or image_id", "malformed_form")
        del body
        if fields.get("consent") != "true":  # exactly true: a missing, empty or "yes" consent stores nothing
            raise _problem(400, NO_CONSENT, "no_consent")
        level, label = resolve_label(fields.get("label"), svc)
        image_id = fields.get("image_id", "").strip().lower()
        if files and image_id:
            raise _problem(422, "send either the photo (file) or the image_id of a recent prediction, not both",
                           "malformed_form")
        if files:
            data = files[0]
            with svc.admit(svc.cost(data)):
                try:
                    img = await anyio.to_thread.run_sync(lambda: clean_image(
                        data, max_pixels=svc.predictor.max_pixels, max_bytes=max_bytes))
                except BadImage as err:
                    raise image_problem(err, limit_mb) from None
        elif image_id:
            if not _ID.match(image_id):
                raise _problem(422, "image_id must be the 64 hex characters /v1/predict answered", "invalid_request")
            hit = svc.recent.get(image_id)
            if hit is None:
                raise _problem(404, f"no recent prediction with this image_id on this worker (they are kept "
                                    f"{RECENT_SECONDS / 60:g} minutes): send the photo as the form field file",
                               "not_found")
            img = hit
        else:
            raise _problem(422, "no photo: send it as the form field file, or image_id=<the id /v1/predict "
                                "answered>", "malformed_form")
        try:
            await anyio.to_thread.run_sync(store.add, store_uri, img.content, img.format, img.image_id, level, label)
        except (CanestraError, OSError) as exc:
            _log_store_problem(exc)
            raise _problem(503, "the feedback store cannot be written now: nothing was stored; retry later",
                           "store_unavailable", {"Retry-After": "30"}) from None
        svc.counts.add(requests=1, feedback=1, **{f"feedback_{level}": 1})
        return respond({"stored": True, "image_id": img.image_id, "label": label, "level": level}, 201)


def _log_store_problem(exc: BaseException) -> None:
    # The reason names the store's location, never the image or its id.
    line: dict[str, Any] = {"event": "serve.feedback_not_stored", "error": type(exc).__name__,
                            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    log.warning(json.dumps(line, sort_keys=True))
