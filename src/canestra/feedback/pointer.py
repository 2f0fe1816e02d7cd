"""The ``current`` pointer: which model a service serves, written by ``canestra promote``.

A pointer is a small JSON file (``models/current``) beside the models it names::

    models/current                  {"model": "1a2b3c4d5e6f/model", "version": "<sha256>", "promoted_at": …,
                                     "previous": "0f9e8d7c6b5a/model", "report": "promotions/<time>-1a2b3c4d5e6f.md"}
    models/1a2b3c4d5e6f/model/      a copy of the promoted model (named by its model_version)
    models/1a2b3c4d5e6f/metrics.json  its held-out figures (what GET /v1/model shows)

Promotion copies the candidate in first, so the served folder never changes under a service (a later
``train --out`` of the same run folder replaces that run's model/, not this copy), then replaces the
pointer in one rename: a reader sees the old pointer or the new one, never half of one.
``canestra serve --model models/current`` follows it (``serve.swap``). Local files only: a remote
registry is MLflow's (``--to models:/NAME@ALIAS``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from dataclasses import dataclass

from canestra.errors import InputError, OutputError
from canestra.layout import METRICS_JSON, MODEL
from canestra.storage import files as storage

__all__ = ["Pointer", "is_pointer", "read_pointer", "shelve", "write_pointer"]

FORMAT = 1


@dataclass(frozen=True)
class Pointer:
    path: str  # the pointer file
    model_dir: str  # the model folder it names (absolute)
    version: str | None  # the model's full version (serve.predictor.model_files_sha256), when recorded
    promoted_at: str | None
    previous: str | None  # the model folder it named before (absolute), if any


def _local(path: str) -> str:
    if storage.is_remote(path):
        raise InputError(f"{path}: a `current` pointer is a local file (or one on a shared filesystem); for a "
                         "remote registry promote to an MLflow alias, --to models:/NAME@ALIAS")
    return storage.local_path(path)


def is_pointer(path: str) -> bool:
    """A local regular file (a model is a folder): what ``serve --model`` and ``promote`` read as a pointer."""
    return not storage.is_remote(path) and "://" not in str(path) and os.path.isfile(storage.local_path(path))


def read_pointer(path: str) -> Pointer:
    """The pointer at ``path``; InputError naming the file when it is not one."""
    local = _local(path)
    try:
        with open(local, encoding="utf-8") as fh:
            raw = json.load(fh)
        model = raw["model"]
        if not isinstance(model, str) or not model:
            raise ValueError("no model named")
    except FileNotFoundError:
        raise InputError(f"no model pointer at {local}: promote a model there first (canestra promote --to "
                         f"{local} …)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{local} is not a canestra model pointer ({type(exc).__name__}: {str(exc)[:80]}): it is "
                         "written by `canestra promote --to FILE`") from None
    here = os.path.dirname(local)
    previous = raw.get("previous")
    return Pointer(local, os.path.normpath(os.path.join(here, model)), raw.get("version") or None,
                   raw.get("promoted_at"), os.path.normpath(os.path.join(here, previous)) if previous else None)


def shelve(model_dir: str, pointer_path: str, model_version: str) -> str:
    """Copy ``model_dir`` (and the metrics.json beside it) to ``<pointer folder>/<model_version>/``, published
    whole; the copy's model folder. A version shelved before is kept as it is (a version never changes)."""
    home = os.path.join(os.path.dirname(_local(pointer_path)), model_version)
    target = os.path.join(home, MODEL)
    if os.path.isdir(target):
        return target
    staging = storage.staging_dir(home)
    try:
        shutil.copytree(model_dir, os.path.join(staging, MODEL))
        metrics = os.path.join(os.path.dirname(model_dir.rstrip(os.sep)), METRICS_JSON)
        if os.path.isfile(metrics):
            shutil.copy2(metrics, os.path.join(staging, METRICS_JSON))
        storage.publish_dir(staging, home)
    except OSError as exc:
        storage.discard_dir(staging)
        raise OutputError(f"cannot copy the model into {home} ({exc.strerror or type(exc).__name__}): check the "
                          "folder's permissions and free space") from None
    return target


def write_pointer(path: str, model_dir: str, version: str, *, previous: str | None = None,
                  report: str | None = None) -> Pointer:
    """Point ``path`` at ``model_dir`` (one atomic replace); the new pointer."""
    local = _local(path)
    here = os.path.dirname(local)
    info = {"format": FORMAT, "model": os.path.relpath(model_dir, here), "version": version,
            "model_version": version[:12],
            "promoted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "previous": os.path.relpath(previous, here) if previous else None,
            "report": os.path.relpath(report, here) if report else None}
    storage.write_text_atomic(local, json.dumps(info, indent=2) + "\n")
    return read_pointer(local)
