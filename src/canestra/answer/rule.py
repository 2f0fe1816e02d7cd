"""From class probabilities to the answer a user reads: variety, family, or ``unknown``.

One numpy function, :func:`decide`, makes the decision; the Spark stage
:class:`canestra.answer.stage.AnswerModel` (last stage of every trained ``PipelineModel``) and the online
predictor both call it, so batch and HTTP answers cannot drift apart.

- **family** and ``family_probability``: class probabilities summed per family; the answer is the most
  probable family;
- **variety**: the most probable variety *of that family* (family-level classes such as
  ``"Apple (family)"``, learnt from family-labelled photos, never name a variety; a family the model
  has no variety of is named by its family);
- **unknown**: an image that resembles no training class. Two scores, both calibrated at
  training time on held-out images (``calibrate``) and stored in the model:

  * ``energy`` = log-sum-exp of the classifier's margins: low when no class fits well;
  * ``fruitness`` = ImageNet probability mass on the ImageNet classes the training images
    fall into (computed from the same CNN embedding with the network's own ImageNet head):
    low for cats, cars and kitchens even when the classifier itself is confident.

  * for family-level classes (learnt from family-labelled photos, which look alike whatever
    the fruit: cluttered, real-world), a third check: when such a class wins, the photo's
    ImageNet profile must match that class's own (mass on the ImageNet classes its training
    photos fall into, ``profiles``). Measured: it keeps real oranges out of "Apple (family)"
    when no real oranges were in training (docs/outside-the-studio.md).

  Any score below its threshold answers ``unknown`` (and an empty family).

  A family-level answer the profile check alone refused is given anyway when the classifier is sure of it
  (``profile_rescue_energy``): family probability >= 0.9 and energy at least the 25 % quantile of the held-out
  family-labelled photos' energy. Shop photos of a known family taken on another visit fail the profile (their
  ImageNet look differs from the training photos') far more often than they leave the classifier unsure;
  non-fruit and unseen families rarely pass both. Measured on the cross-source bench: other shop visits
  75.9 -> 78.6 %, no other column moved (docs/outside-the-studio.md 7, fifth turn).

- **answer head** (``head_weight``; models trained on studio varieties only, ``pipeline.train._fit_answer_head``):
  a second classifier on the CNN's last block, pooled. The answer's class probabilities are
  ``answer_probabilities``: ``head_weight`` of its probabilities plus the rest of the main classifier's; energy,
  fruitness and the profile checks stay on the main classifier and the embedding. Measured on the studio sample
  (bench/cross_source.py --studio-rule --session-out, 3 seeds): capture sessions left out of training 73.5 ->
  75.9 % top-1 with unknown counted wrong, 5-block split 98.37 -> 98.61 %, refusals and non-fruit unchanged; real
  photos (which such a model never trained on) 50.2 -> 44.9 % family right. The head alone (weight 1) reads
  76.5 % / 98.62 % but 38.3 % on real photos; gating it by energy or by family agreement keeps neither gain.

- **studio second opinion** (``studio_check``; models trained on studio frames *and* family-labelled
  photos): a linear probe fitted on the studio frames alone. A real photo of a family the model knows only
  from the studio (strawberry, cherry) is pulled towards the real-photo classes of other families; the
  studio probe, which has no real-photo classes, still sees the fruit. When it names, with probability
  >= ``min_probability``, a family that has no real training photos and the answer is another family,
  its family (and its best variety of that family) is the answer. ``min_probability`` is 0.8, raised at
  training time until the probe would override at most 5 % of the real training photos
  (``studio_check_threshold``; a 10-variety studio sample is sure a red apple is a pomegranate).
  Measured on the cross-source bench: families with no real photo confidently wrong 70.6 -> 57.8 %, known
  families on other shop visits unchanged, -0.4 to -1.3 points on apple/banana/orange from another source
  (docs/outside-the-studio.md 7).
"""

from __future__ import annotations

import base64
import functools
import json
from dataclasses import dataclass, field

import numpy as np

from canestra.answer.taxonomy import UNKNOWN, is_family_label

TOP_K = 5
ANSWER_STAGE = "canestra.answer.stage.AnswerModel"  # class name saved in models


@dataclass
class AnswerRule:
    labels: list[str]
    families: list[str]  # one per label
    energy_threshold: float | None = None
    fruitness_threshold: float | None = None
    imagenet_classes: list[int] = field(default_factory=list)
    imagenet_offset: int = 0  # start of the 1280-d block of the embedding fed to the ImageNet head
    profiles: dict[str, list[int]] = field(default_factory=dict)  # family-level label -> its ImageNet classes
    profile_thresholds: dict[str, float] = field(default_factory=dict)  # family-level label -> threshold
    # {"labels": [variety labels], "weights": base64 float32 [features x labels] (PCA folded in), "bias": [...],
    #  "min_probability": p}; {} when off
    studio_check: dict = field(default_factory=dict)
    # energy from which a sure family-level answer passes a failed profile check; None: never
    profile_rescue_energy: float | None = None
    # weight of the answer head's probabilities in the answer (``answer_probabilities``); 0: no answer head
    head_weight: float = 0.0

    def __post_init__(self) -> None:
        # A variety names a fruit: neither a family-level class nor the family-less "none of the families" class.
        self._variety = np.array([not is_family_label(lb) and bool(f) for lb, f in zip(self.labels, self.families)],
                                 dtype=bool)
        self._fam_names = sorted(set(self.families))
        fam_index = {f: i for i, f in enumerate(self._fam_names)}
        onehot = np.zeros((len(self.labels), len(self._fam_names)))
        for i, f in enumerate(self.families):
            onehot[i, fam_index[f]] = 1.0
        self._fam_onehot = onehot
        self._studio = _StudioProbe.from_spec(self.studio_check, self) if self.studio_check else None

    def to_json(self) -> str:
        return json.dumps({"labels": self.labels, "families": self.families,
                           "energy_threshold": self.energy_threshold,
                           "fruitness_threshold": self.fruitness_threshold,
                           "imagenet_classes": self.imagenet_classes, "imagenet_offset": self.imagenet_offset,
                           "profiles": self.profiles, "profile_thresholds": self.profile_thresholds,
                           "studio_check": self.studio_check, "profile_rescue_energy": self.profile_rescue_energy,
                           **({"head_weight": self.head_weight} if self.head_weight else {})})

    @classmethod
    def from_json(cls, text: str) -> AnswerRule:
        return cls(**json.loads(text))


@dataclass
class _StudioProbe:
    W: np.ndarray  # [features, k]
    b: np.ndarray  # [k]
    label_index: np.ndarray  # index in the rule's labels of each studio class
    families: np.ndarray  # family of each studio class
    real_families: frozenset  # families with real (family-labelled) training photos: the probe never overrides them
    min_probability: float

    @classmethod
    def from_spec(cls, spec: dict, rule: AnswerRule) -> _StudioProbe:
        labels = list(spec["labels"])
        W = np.frombuffer(base64.b64decode(spec["weights"]), dtype="<f4").reshape(-1, len(labels))
        index = {lb: i for i, lb in enumerate(rule.labels)}
        fams = {lb: f for lb, f in zip(rule.labels, rule.families)}
        return cls(W.astype(np.float64), np.asarray(spec["bias"], np.float64), np.array([index[lb] for lb in labels]),
                   np.array([fams[lb] for lb in labels]),
                   frozenset(f for lb, f in zip(rule.labels, rule.families) if is_family_label(lb)),
                   float(spec["min_probability"]))

    def opinion(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per row: the probe's best variety (index in the rule's labels) and its probability, its best
        family and that family's probability."""
        p = _softmax(np.asarray(features, np.float64)[:, : self.W.shape[0]] @ self.W + self.b)
        fam, fam_p = _best_family(p, self.families)
        best = _best_where(p, self.families[None, :] == fam[:, None])  # its variety is the best one of its family
        return self.label_index[best], p[np.arange(len(p)), best], fam, fam_p


HEAD_WEIGHT = 0.5  # the answer head's share of the answer's probabilities (module doc: 0.5 and 1 measured)


def answer_probabilities(probs: np.ndarray, head_probs: np.ndarray | None, rule: AnswerRule) -> np.ndarray:
    """The class probabilities the answer is read from: the main classifier's, mixed with the answer head's
    (``rule.head_weight`` of them) where the model has one."""
    if head_probs is None or not rule.head_weight:
        return np.asarray(probs, np.float64)
    w = float(rule.head_weight)
    return (1.0 - w) * np.asarray(probs, np.float64) + w * np.asarray(head_probs, np.float64)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _best_where(p: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Per row of ``p``: the index of the most probable class among those ``ok`` marks (``ok`` broadcasts
    against ``p``; ties -> lowest index, as Spark's argmax), -1 where it marks none."""
    return np.where(ok.any(axis=1), np.where(ok, p, -1.0).argmax(axis=1), -1)


def _best_family(p: np.ndarray, families: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of class probabilities ``p`` (one class per entry of ``families``): the most probable
    family and its probability (the sum over its classes)."""
    fams = sorted(set(families))
    fp = np.stack([p[:, families == f].sum(axis=1) for f in fams], axis=1)
    return np.array(fams)[fp.argmax(axis=1)], fp.max(axis=1)


def studio_check_threshold(probs: np.ndarray, studio_families, truth, real_families, floor: float,
                           share: float) -> float:
    """The studio probe's family probability from which it overrides: ``floor``, raised until the probe
    would override at most ``share`` of the real training photos (``probs``: its class probabilities on
    them, one class per ``studio_families`` entry; ``truth``: their families). The probe never trained on
    those photos, so this is a held-out count. Above 1 when no threshold keeps to ``share``: the check is off.

    Why: with few studio varieties (a 10-class sample), every real photo lands near one of them, and the
    probe is sure of the wrong family (a red apple "is" a pomegranate); with 114 it rarely is."""
    fam, fam_p = _best_family(np.asarray(probs, np.float64), np.asarray(studio_families))
    score = np.where((fam != np.asarray(truth)) & ~np.isin(fam, list(real_families)), fam_p, 0.0)
    allowed = int(share * len(score))
    ranked = np.sort(score)[::-1]
    if allowed >= len(ranked) or ranked[allowed] < floor:
        return float(floor)
    return float(np.nextafter(ranked[allowed], np.inf))  # overrides need p >= threshold: strictly above it


def studio_check_spec(labels: list[str], weights: np.ndarray, bias: np.ndarray, min_probability: float) -> dict:
    """The ``studio_check`` entry of a rule: ``weights`` [features, len(labels)] (PCA folded in), ``bias``."""
    w = np.ascontiguousarray(weights, dtype="<f4")
    return {"labels": list(labels), "weights": base64.b64encode(w.tobytes()).decode("ascii"),
            "bias": [float(x) for x in bias], "min_probability": float(min_probability)}


@functools.lru_cache(maxsize=1)
def imagenet_head() -> tuple[np.ndarray, np.ndarray]:
    """The CNN's own ImageNet classifier (1000 x 1280 weights, bias), read once per process."""
    from canestra.vision import backbone
    from canestra.vision.weights import load_state_dict

    sd = load_state_dict(backbone.weights_path())
    return np.ascontiguousarray(sd["_fc.weight"].T, dtype=np.float64), sd["_fc.bias"].astype(np.float64)


def imagenet_probabilities(features: np.ndarray, offset: int = 0) -> np.ndarray:
    from canestra.vision.backbone import FEATURE_DIM

    w, b = imagenet_head()
    return _softmax(np.asarray(features, dtype=np.float64)[:, offset : offset + FEATURE_DIM] @ w + b)


def energy(margins: np.ndarray) -> np.ndarray:
    m = np.asarray(margins, dtype=np.float64)
    mx = m.max(axis=1)
    return mx + np.log(np.exp(m - mx[:, None]).sum(axis=1))


def fruitness(features: np.ndarray, rule: AnswerRule, inet: np.ndarray | None = None) -> np.ndarray:
    if not rule.imagenet_classes:
        return np.ones(len(features))
    if inet is None:
        inet = imagenet_probabilities(features, rule.imagenet_offset)
    return inet[:, rule.imagenet_classes].sum(axis=1)


def profile_mismatch(probs: np.ndarray, inet: np.ndarray | None, rule: AnswerRule) -> np.ndarray:
    """True where the winning class is family-level and the photo's ImageNet profile is not its own."""
    out = np.zeros(len(probs), dtype=bool)
    if inet is None or not rule.profile_thresholds:
        return out
    top = np.asarray(probs).argmax(axis=1)
    index = {lb: i for i, lb in enumerate(rule.labels)}
    for label, thr in rule.profile_thresholds.items():
        sel = top == index.get(label, -1)
        if sel.any():
            out[sel] = inet[sel][:, rule.profiles[label]].sum(axis=1) < thr
    return out


@dataclass
class Answers:
    prediction: list[str]
    probability: np.ndarray
    family: list[str]
    family_probability: np.ndarray
    energy: np.ndarray
    fruitness: np.ndarray
    top5: list[list[tuple[str, float]]]
    unknown: np.ndarray  # bool


def decide(probs: np.ndarray, margins: np.ndarray, features: np.ndarray, rule: AnswerRule) -> Answers:
    probs = np.asarray(probs, dtype=np.float64)
    n = len(probs)
    if not n:
        return Answers([], np.zeros(0), [], np.zeros(0), np.zeros(0), np.zeros(0), [], np.zeros(0, bool))
    # Variety: best variety class (ties -> lowest index, as Spark's argmax); a model trained on
    # family-level images only answers with the family.
    best = _best_where(probs, rule._variety[None, :]) if rule._variety.any() else probs.argmax(axis=1)
    fam_p = probs @ rule._fam_onehot
    fam_best = fam_p.argmax(axis=1)
    en = energy(margins)
    inet = imagenet_probabilities(features, rule.imagenet_offset) if rule.imagenet_classes else None
    fr = fruitness(features, rule, inet)
    unknown = profile_mismatch(probs, inet, rule)
    if rule.profile_rescue_energy is not None:
        unknown &= ~sure_of_family(fam_p.max(axis=1), en, rule.profile_rescue_energy)
    # The trained "none of the families" class (--unknown-images) has the empty family: when the
    # empty family carries the most probability, the photo is of none of the families.
    if "" in rule._fam_names:
        unknown |= fam_best == rule._fam_names.index("")
    if rule.energy_threshold is not None:
        unknown |= en < rule.energy_threshold
    if rule.fruitness_threshold is not None:
        unknown |= fr < rule.fruitness_threshold
    labels = rule.labels
    fams = rule._fam_names
    probability, fam_prob = probs[np.arange(n), best], fam_p[np.arange(n), fam_best]
    second = rule._studio.opinion(features) if rule._studio is not None else None
    family_variety = _best_variety_of(probs, rule, fam_best)
    prediction, family, top5 = [], [], []
    for i in range(n):
        order = np.argsort(-probs[i], kind="stable")[:TOP_K]
        top5.append([(labels[j], round(float(probs[i, j]), 6)) for j in order])
        if unknown[i]:
            prediction.append(UNKNOWN)
            family.append("")
        elif second is not None and _studio_overrides(rule, fams[fam_best[i]], second, i):
            prediction.append(labels[second[0][i]])
            family.append(str(second[2][i]))
            probability[i], fam_prob[i] = second[1][i], second[3][i]
        else:
            # The variety named is one of the answered family's (a real apple photo won by "Apple (family)" is
            # not called "Pear Red" because that studio variety was the likeliest one); a family the model has
            # no variety of is named by its family.
            v = family_variety[i]
            prediction.append(labels[v] if v >= 0 else fams[fam_best[i]])
            probability[i] = probs[i, v] if v >= 0 else fam_prob[i]
            family.append(fams[fam_best[i]])
    return Answers(prediction, probability, family, fam_prob, en, fr, top5, unknown)


def _best_variety_of(probs: np.ndarray, rule: AnswerRule, fam_best: np.ndarray) -> np.ndarray:
    """Per row: the index of the most probable variety of family ``fam_best`` (index in the rule's
    family names), -1 where that family has no variety class."""
    return _best_where(probs, rule._variety[None, :] & (rule._fam_onehot[:, fam_best].T > 0))


def _studio_overrides(rule: AnswerRule, family: str, second, i: int) -> bool:
    studio = rule._studio
    assert studio is not None
    g = second[2][i]
    return bool(g != family and g not in studio.real_families and second[3][i] >= studio.min_probability)


# ----------------------------------------------------------------------------- calibration


def quantile_threshold(scores: np.ndarray, q: float) -> float | None:
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    return float(np.quantile(scores, q)) if len(scores) else None


def imagenet_class_set(class_means: np.ndarray, min_mass: float) -> list[int]:
    """ImageNet classes that hold at least ``min_mass`` of some training class's mean probability."""
    return [int(j) for j in np.where(np.atleast_2d(class_means).max(axis=0) >= min_mass)[0]]


FRUIT_MIN_MASS = 0.01  # an ImageNet class counts for fruitness from this mean mass in some training class
STUDIO_CHECK_MIN = 0.8  # the studio probe's family probability from which it overrides (0.5-0.9 measured, section 7)
STUDIO_CHECK_SHARE = 0.05  # ... raised until it would override at most this share of the real training photos
PROFILE_MIN_MASS = 0.02  # an ImageNet class belongs to a family-level class's profile from this mean mass
PROFILE_QUANTILE = 0.05  # share of a family-level class's own training photos its profile check may refuse
PROFILE_RESCUE_PROBABILITY = 0.9  # a failed profile check is overruled from this family probability ...
PROFILE_RESCUE_QUANTILE = 0.25  # ... and this quantile of the held-out family-labelled photos' energy (0.05-0.5 measured)


def sure_of_family(family_probability, energies, rescue_energy: float):
    """Where the classifier is sure enough of its family for a failed profile check to be overruled
    (arrays or pandas Series alike: ``decide`` and the held-out report share this one test)."""
    return (family_probability >= PROFILE_RESCUE_PROBABILITY) & (energies >= rescue_energy)
