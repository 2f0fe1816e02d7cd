"""Zero-downtime model swap: ``serve --model POINTER`` or ``--model models:/NAME@ALIAS`` follows promotions.

Each worker checks its model source every ``--model-poll`` seconds and on SIGHUP. When the source
names another model (the pointer's version, the alias's registry version), the worker loads it
completely beside the one it serves (ONNX session built, one warm-up inference) and only then swaps
the reference the routes read (``_Service.swap``). The swap waits for the worker's inference in
progress and is done on the event loop, so every request is answered whole by one model and says
which (``model_version``); requests keep being answered while the new model loads. A model that does
not load leaves the old one serving (a warning line), and that version is tried again on SIGHUP only.

A fixed folder or ``models:/NAME/VERSION`` never changes: nothing is watched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import anyio

from canestra import tracking
from canestra.errors import InputError
from canestra.feedback import pointer as pointers

__all__ = ["ModelSource", "ModelWatcher", "model_source"]

log = logging.getLogger("canestra.serve.audit")


@dataclass(frozen=True)
class ModelSource:
    """What ``--model`` named when it can move: a pointer file or an MLflow alias."""

    kind: str  # "pointer" or "alias"
    uri: str
    registry: str | None = None

    def resolve(self) -> tuple[str, str]:
        """(the local model folder it names now, a token that changes when it names another model)."""
        if self.kind == "pointer":
            p = pointers.read_pointer(self.uri)
            return p.model_dir, p.version or p.model_dir
        version = tracking.alias_version(self.uri, self.registry)
        if version is None:
            raise InputError(f"the MLflow alias {self.uri} is not set: promote a version to it first")
        name, _ = tracking.alias_of(self.uri)
        return tracking.local_model_dir(f"models:/{name}/{version}", self.registry), version

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def model_source(value: str, registry: str | None = None) -> ModelSource | None:
    """The source to follow for ``serve --model value``; None for a model folder or a fixed version."""
    if tracking.is_registry_uri(value):
        try:
            tracking.alias_of(value)
        except InputError:  # models:/NAME/VERSION: a registered version never changes
            return None
        return ModelSource("alias", value, registry)
    if pointers.is_pointer(value):
        return ModelSource("pointer", os.path.abspath(value))
    return None


def _line(event: str, svc, **fields: Any) -> str:
    # Counts and versions only, like the service's other audit lines: never an image, an id or a path.
    return json.dumps({"event": event, "counts": svc.counts.snapshot(), "pid": os.getpid(),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}, sort_keys=True)


class ModelWatcher:
    """One worker's follower of a ``ModelSource`` (started and stopped by the app's lifespan)."""

    def __init__(self, svc, source: ModelSource, poll_s: float, load: Callable[[str], Any], token: str):
        self.svc = svc
        self.source = source
        self.poll_s = poll_s
        self.load = load  # model folder -> a loaded, warmed-up OnlinePredictor
        self.token = token  # what the served model was resolved from
        self.failed: str | None = None  # a token whose model did not load: retried on SIGHUP only
        self.swaps = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def wake(self) -> None:
        """SIGHUP (on the event loop): check now, and try again a model that failed to load."""
        self.failed = None
        if self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s if self.poll_s > 0 else None)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.check()

    async def check(self) -> bool:
        """Swap to the model the source names now if it is another one; True when it swapped."""
        try:
            model_dir, token = await anyio.to_thread.run_sync(self.source.resolve)
        except Exception as exc:  # a pointer being rewritten by hand, a registry down: keep serving
            log.warning(_line("serve.model_not_swapped", self.svc, reason=_reason(exc)))
            return False
        if token in (self.token, self.failed):
            return False
        t0 = time.perf_counter()
        try:
            predictor = await anyio.to_thread.run_sync(self.load, model_dir)
        except Exception as exc:
            self.failed = token
            log.warning(_line("serve.model_not_swapped", self.svc, reason=_reason(exc)))
            return False
        seconds = time.perf_counter() - t0
        # Holding the worker's compute slot: no inference runs in a thread meanwhile, so each request's
        # model_version is the model that answered it (inline ones run on this loop, between awaits).
        async with self.svc.compute_limiter():
            old = self.svc.swap(predictor)
        self.token, self.swaps = token, self.swaps + 1
        new = predictor.spec.model_version
        self.svc.metrics.model_info.labels(model_version=old.model_version).set(0)
        self.svc.metrics.model_loaded(new, seconds)
        log.info(_line("serve.model_swapped", self.svc, model_version=new, previous_model_version=old.model_version,
                       load_seconds=round(seconds, 3)))
        return True


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__
