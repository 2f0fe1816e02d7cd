"""``canestra promote``: a candidate model goes live only when it is better (docs/feedback.md).

The candidate and the current model score the same fixed sets of photos neither trained on, image by
image, with the Spark-free predictor ``canestra serve`` uses (so the figures are what the service will
answer). Each set is measured at its own level:

- a labelled root read as varieties (``<Class>/<image>``): variety top-1 accuracy;
- a family-level root (``<Family>/<image>``, read as ingest reads it): family top-1 accuracy;
- an ``--unknown-images`` root (photos of no fruit): the share answered ``unknown``.

The candidate is promoted when the target set improves by more than ``min_gain`` and no set loses more
than ``tolerance`` (both shares: 0.01 = one point); otherwise ``PromotionRefused`` (exit code 3) with the
first reason. The side-by-side report (Markdown + JSON: counts and shares only, no image id or file
name) is written either way. Promotion writes the ``current`` pointer (``feedback.pointer``) or moves an
MLflow alias.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from canestra.errors import CanestraError, InputError
from canestra.feedback import pointer as pointers
from canestra.storage import files as storage

__all__ = ["Promotion", "PromotionRefused", "SetScore", "promote"]

EXIT_REFUSED = 3
MEASURES = {"variety": "accuracy", "family": "family accuracy", "unknown": "answered unknown"}
_BATCH = 16
_EPS = 1e-9  # shares of a few hundred images: differences below this are rounding


class PromotionRefused(CanestraError):
    """The candidate did not pass the gate: nothing was promoted."""

    exit_code = EXIT_REFUSED


@dataclass
class SetScore:
    name: str  # the root as given
    kind: str  # variety, family or unknown
    images: int  # images scored (unreadable files left out)
    unreadable: int
    candidate_right: int
    current_right: int | None
    target: bool = False
    verdict: str = ""

    @property
    def candidate(self) -> float:
        return self.candidate_right / self.images if self.images else 0.0

    @property
    def current(self) -> float | None:
        return None if self.current_right is None else self.current_right / self.images if self.images else 0.0

    @property
    def change(self) -> float | None:
        return None if self.current is None else self.candidate - self.current


@dataclass
class Promotion:
    """The gate's decision, with the figures it was taken on."""

    promoted: bool
    reason: str
    candidate_version: str
    current_version: str | None
    to: str  # the pointer file or models:/NAME@ALIAS
    tolerance: float
    min_gain: float
    sets: list[SetScore] = field(default_factory=list)
    report_md: str = ""
    report_json: str = ""

    def table(self) -> str:
        """The side-by-side figures as aligned text (what the CLI prints)."""
        rows = [("set", "measure", "images", "current", "candidate", "change", "verdict")]
        for s in self.sets:
            rows.append((("target " if s.target else "") + s.name, MEASURES[s.kind], str(s.images), _pct(s.current),
                         _pct(s.candidate), _points(s.change), s.verdict))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

    def raise_if_refused(self) -> None:
        if not self.promoted:
            raise PromotionRefused(f"promotion refused: {self.reason} (report: {self.report_md})")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["sets"] = [{**asdict(s), "measure": MEASURES[s.kind], "candidate": s.candidate, "current": s.current,
                        "change": s.change} for s in self.sets]
        return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def _points(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.2f} pt"


# ---------------------------------------------------------------------------- models and sets


def _model_dir(value: str, registry: str | None) -> str:
    """A model folder, a pointer file (the model it names) or ``models:/NAME/VERSION|ALIAS``: a local folder."""
    from canestra import tracking
    from canestra.model import check_model_dir

    if tracking.is_registry_uri(value):
        value = tracking.local_model_dir(value, registry)
    elif pointers.is_pointer(value):
        value = pointers.read_pointer(value).model_dir
    return check_model_dir(value, local_only=True)


@dataclass
class _Set:
    name: str
    kind: str
    files: list[tuple[str, str | None]]  # (path, truth: a class, "<Family> (family)" or None for unknown)


def _sets(eval_images: list[str], unknown_images: list[str], taxonomy) -> list[_Set]:
    from canestra.pipeline.ingest import list_roots

    out = []
    for flag, root in [("--eval-images", r) for r in eval_images] + [("--unknown-images", r) for r in unknown_images]:
        if not storage.is_remote(root) and not os.path.isdir(storage.local_path(root)):
            raise InputError(f"{flag} folder {storage.display(root)} does not exist: check the path")
    for root in eval_images:
        files, info = list_roots([root], False, taxonomy)
        labelled: list[tuple[str, str | None]] = [(f.path, f.label) for f in files
                                                  if f.label is not None and f.error is None]
        if not labelled:
            where = storage.display(root)
            raise InputError(f"no class folders under {where}: --eval-images needs <Family or Class>/<image> files, "
                             f"e.g. {where}/Apple/photo.jpg")
        out.append(_Set(root, info[0]["level"], labelled))
    for root in unknown_images:
        listed: list[tuple[str, str | None]] = [(f.path, None) for f in storage.list_images(root) if f.error is None]
        if not listed:
            raise InputError(f"no files found under {storage.display(root)}: --unknown-images needs photos of "
                             "things that are no fruit")
        out.append(_Set(root, "unknown", listed))
    return out


def _answers(predictors: list, files: list[tuple[str, str | None]]
             ) -> tuple[list[str | None], list[list[tuple[str, str]]], int]:
    """The truths of the readable files, each predictor's (prediction, family) of them, and how many files
    were no usable image (left out). The CNN runs once per distinct featurizer (same graph, sizes, fit)."""
    from canestra.vision.images import DEFAULT_MAX_BYTES, BadImage

    truths: list[str | None] = []
    out: list[list[tuple[str, str]]] = [[] for _ in predictors]
    unreadable = 0
    for start in range(0, len(files), _BATCH):
        rgbs = []
        for path, truth in files[start:start + _BATCH]:
            try:
                rgbs.append(predictors[0].decode(storage.read_bytes(path, max_bytes=DEFAULT_MAX_BYTES)))
                truths.append(truth)
            except (BadImage, OSError):
                unreadable += 1
        if not rgbs:
            continue
        embedded: dict[tuple, Any] = {}
        for i, p in enumerate(predictors):
            key = (p.onnx_path, tuple(p.spec.image_sizes), p.spec.input_fit, p.spec.answer_coefficients is not None)
            if key not in embedded:
                embedded[key] = p.embed(rgbs)
            a = p.answers(*embedded[key])[2]
            out[i] += list(zip(a.prediction, a.family))
    return truths, out, unreadable


def _right(kind: str, truths: list[str | None], answers: list[tuple[str, str]]) -> int:
    from canestra.answer.taxonomy import FAMILY_SUFFIX, UNKNOWN

    if kind == "unknown":
        return sum(pred == UNKNOWN for pred, _ in answers)
    if kind == "family":
        return sum(fam == (t or "").removesuffix(FAMILY_SUFFIX) for t, (_, fam) in zip(truths, answers))
    return sum(pred == t for t, (pred, _) in zip(truths, answers))


def _score(predictors: list, s: _Set) -> SetScore:
    """``predictors``: [candidate] or [candidate, current]."""
    truths, answers, unreadable = _answers(predictors, s.files)
    right = [_right(s.kind, truths, a) for a in answers]
    return SetScore(s.name, s.kind, len(truths), unreadable, right[0], right[1] if len(right) > 1 else None)


# ---------------------------------------------------------------------------- the gate


def _judge(scores: list[SetScore], tolerance: float, min_gain: float, have_current: bool) -> str | None:
    """Each set's verdict; the reasons to refuse, or None."""
    reasons = []
    for s in scores:
        if not s.images:
            s.verdict = "no usable image"
            reasons.append(f"{s.name}: none of its files is a usable image")
        elif not have_current:
            s.verdict = "no current model to compare with"
        elif s.target:
            ok = (s.change or 0.0) > min_gain + _EPS
            s.verdict = "improved" if ok else f"not improved (needs more than {_points(min_gain)})"
            if not ok:
                reasons.append(f"the target set {s.name} did not improve: {MEASURES[s.kind]} {_pct(s.current)} -> "
                               f"{_pct(s.candidate)} ({_points(s.change)}; needs more than {_points(min_gain)})")
        else:
            ok = (s.change or 0.0) >= -tolerance - _EPS
            s.verdict = "within tolerance" if ok else f"worse by more than {100 * tolerance:.2f} pt"
            if not ok:
                reasons.append(f"{s.name} got worse: {MEASURES[s.kind]} {_pct(s.current)} -> {_pct(s.candidate)} "
                               f"({_points(s.change)}; the tolerance is {100 * tolerance:.2f} pt)")
    return "; ".join(reasons) if reasons else None


def _write_report(res: Promotion, report_dir: str, facts: dict) -> None:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = os.path.join(storage.local_path(report_dir), f"{stamp}-{res.candidate_version[:12]}")
    res.report_md, res.report_json = base + ".md", base + ".json"
    lines = [f"# Promotion gate: candidate {res.candidate_version[:12]} vs current "
             f"{(res.current_version or 'none')[:12]}", "",
             f"**{'PROMOTED' if res.promoted else 'REFUSED'}**: {res.reason}", "",
             f"Promotes to: `{res.to}`. Target: more than {_points(res.min_gain)}; every other set: at most "
             f"{_points(res.tolerance)} worse.", "",
             "| set | measure | images | current | candidate | change | verdict |", "|---|---|---|---|---|---|---|"]
    for s in res.sets:
        lines.append(f"| {'**target** ' if s.target else ''}{s.name} | {MEASURES[s.kind]} | {s.images} | "
                     f"{_pct(s.current)} | {_pct(s.candidate)} | {_points(s.change)} | {s.verdict} |")
    unreadable = sum(s.unreadable for s in res.sets)
    if unreadable:
        lines += ["", f"{unreadable} file(s) were no usable image and were left out."]
    lines += ["", "| model | version | created | classes |", "|---|---|---|---|"]
    lines += [f"| {who} | {f['model_version']} | {f['created_at']} | {f['classes']} |" for who, f in facts.items()]
    storage.write_text_atomic(res.report_md, "\n".join(lines) + "\n")
    storage.write_text_atomic(res.report_json, json.dumps({**res.to_dict(), "models": facts}, indent=2) + "\n")


def promote(candidate: str, to: str, eval_images: list[str], *, current: str | None = None,
            unknown_images: list[str] | None = None, target: str | None = None, tolerance: float = 0.01,
            min_gain: float = 0.0, report_dir: str | None = None, registry: str | None = None,
            taxonomy: str | None = None, threads: int | None = None) -> Promotion:
    """Score ``candidate`` and the current model on the sets, write the report, promote when the gate passes.

    ``to``: the pointer file to (re)write, or ``models:/NAME@ALIAS`` (the candidate then is
    ``models:/NAME/VERSION``). ``current``: what to compare with, default what ``to`` names now (none on a
    first promotion: the candidate is scored and promoted). ``target``: one of the sets, default the first
    ``eval_images`` root. Returns the decision; ``Promotion.raise_if_refused`` raises ``PromotionRefused``.
    """
    from canestra import tracking
    from canestra.answer.taxonomy import load_taxonomy
    from canestra.serve.predictor import OnlinePredictor, load_model_spec

    unknown_images = list(unknown_images or [])
    if not eval_images:
        raise InputError("promote needs --eval-images DIR: the photos the two models are compared on")
    if not 0 <= tolerance < 1 or not 0 <= min_gain < 1:
        raise InputError("--tolerance and --min-gain are shares between 0 and 1 (0.01 = one point)")
    roots = list(eval_images) + unknown_images
    target = target or eval_images[0]
    if target not in roots and storage.display(target) not in [storage.display(r) for r in roots]:
        raise InputError(f"--target {target} is not one of the sets: pass one of the --eval-images or "
                         "--unknown-images folders")
    alias = tracking.is_registry_uri(to)
    if alias:
        name, _ = tracking.alias_of(to)
        if not tracking.is_registry_uri(candidate) or tracking.version_of(candidate)[0] != name:
            raise InputError(f"promoting to {to} moves an MLflow alias: pass the candidate as a version of the same "
                             f"model, --candidate models:/{name}/VERSION (train --register-model {name} makes one)")
        if current is None:
            now = tracking.alias_version(to, registry)
            current = f"models:/{name}/{now}" if now else None
    elif current is None and pointers.is_pointer(to):
        current = pointers.read_pointer(to).model_dir
    tax = load_taxonomy(taxonomy)
    sets = _sets(list(eval_images), unknown_images, tax)  # bad roots fail before any model loads

    cand_spec = load_model_spec(_model_dir(candidate, registry))
    predictors = [OnlinePredictor(cand_spec, threads)]
    cur_spec = None
    if current is not None:
        cur_spec = load_model_spec(_model_dir(current, registry))
        predictors.append(OnlinePredictor(cur_spec, threads))
    res = Promotion(False, "", cand_spec.version, cur_spec.version if cur_spec else None, to, tolerance, min_gain)
    for s in sets:
        score = _score(predictors, s)
        score.target = storage.display(s.name) == storage.display(target)
        res.sets.append(score)
    if cur_spec is not None and cur_spec.version == cand_spec.version:
        reason: str | None = f"the candidate is the current model (version {cand_spec.model_version}): nothing to promote"
        for score in res.sets:
            score.verdict = "same model"
    else:
        reason = _judge(res.sets, tolerance, min_gain, cur_spec is not None)
    res.promoted = reason is None
    res.reason = reason or ("no current model: the candidate is the first one promoted" if cur_spec is None else
                            "the target set improved and no set got worse by more than the tolerance")
    facts = {who: {"model_version": sp.model_version, "created_at": sp.created_at, "classes": len(sp.labels)}
             for who, sp in (("candidate", cand_spec), ("current", cur_spec)) if sp is not None}
    if report_dir is None:
        report_dir = "canestra-promotions" if alias else os.path.join(os.path.dirname(
            storage.local_path(to)), "promotions")
    _write_report(res, report_dir, facts)
    if res.promoted:
        if alias:
            tracking.set_alias(to, tracking.version_of(candidate)[1], registry)
        else:
            previous = pointers.read_pointer(to).model_dir if pointers.is_pointer(to) else None
            shelved = pointers.shelve(cand_spec.model_dir, to, cand_spec.model_version)
            pointers.write_pointer(to, shelved, cand_spec.version, previous=previous, report=res.report_md)
    return res
