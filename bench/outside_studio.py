"""Outside the studio: the figures behind docs/outside-the-studio.md.

Every figure comes from the product's CNN features (``canestra.vision.backbone.embed``, fp32
EfficientNet-Lite0, centre-crop fit unless stated) and a *probe* standing in for Spark: the
objective of ``canestra train`` -- PCA without whitening, then multinomial logistic regression
minimising mean cross-entropy + reg/2 * ||W||^2 (intercepts unpenalised), solved by L-BFGS --
fitted with torch on the CPU, so that the ~100 fits below take minutes, not hours.
bench/abstention.py checks the abstention figures through the real product (Spark).

``levers``: top-1 on the 13,680-image studio sample for each featurization / regularisation
lever (image sizes, PCA, L2, mirror averaging):

* 10 blocks: each class cut into 10 runs of consecutive frames, 2 held out (seed 42): the
  product's split before it moved to 5 blocks;
* 5 blocks: 1 of 5 blocks held out (the product's split now), mean over seeds 42, 7, 3;
* perturbed: the 10-block model on its held-out images after
  ``canestra.pipeline.evaluation.perturb_jpeg``, seeded from the image id exactly as the shift
  evaluation of ``canestra train`` (``int(pixel_id(decode_rgb(bytes))[:12], 16)``);
* session out: per class one capture session (file-name prefix ``r_``, ``r2_``, ``r3_`` or
  none) held out, the session drawn per class with seeds 0, 1, 2; mean of the three (a
  class with a single session stays in training, untested);
* featurize cost: img/s of ``backbone.embed`` (``--threads``) at each size on 512 studio
  images, median of 3 interleaved runs, summed over a lever's sizes (x2 for mirror averaging)
  and given as a multiple of 160 px. The only timing here: a ratio; the runs are interleaved
  so that a busy machine slows every size alike, yet expect +-20 % there.

``real``: the real photos (``<root>/<Family>/*.jpg``, e.g. Apple/Banana/Orange):

* family accuracy of a studio-only model (trained on the 5-block train split) with the photo
  squashed, centre-cropped or padded with white to a square;
* the product's answer rule, built as ``canestra.pipeline.train.train`` builds it
  (``canestra.answer.rule.AnswerRule`` + ``decide``; energy and fruitness thresholds from
  ``canestra.pipeline.evaluation.thresholds`` on the held-out studio rows; ImageNet classes from the
  per-class mean ImageNet probabilities; family-level profiles), for the studio-only model
  and for the mixed model (studio train split + real photos as "Apple (family)", ...):
  5-fold CV family accuracy on the real photos (folds stratified by family, seed 0; each
  photo scored by the model that left it out) with "unknown" counted wrong, share of
  non-fruit images and of held-out studio images answered "unknown", and, leaving one real
  family out of training, the share of its photos answered with a wrong family
  ("confidently wrong"). The model settings are canestra's defaults (``Settings()``). One
  difference from ``train``: the thresholds are calibrated on held-out studio rows only
  (``train`` adds its held-out family-labelled photos; here those are the evaluation fold).

Non-fruit images: scikit-image's sample photos (``skimage/data/*.png|jpg``) and scikit-learn's
``sklearn/datasets/images/*.jpg``, each whole, centre square and 4 corner crops at 60 %.

Features are cached in ``--work`` (per backbone, image set, variant and size, with the list of
images they belong to and a spot check of two rows on reuse), and so are the figures of each
finished lever (keyed by its settings and feature files; ``--refit`` ignores them). The
~100 fits (L-BFGS, 100 iterations, float64) dominate: 16 min measured on 2 quiet cores,
close to an hour when other jobs share them; the features add ~20 min on a first run.

    python bench/outside_studio.py [levers|real|all] [--studio DIR] [--real DIR] [--work DIR]
        [--lite1 LITE1.onnx] [--max-iter 100] [--threads 2] [--refit] [--json]

``--lite1`` adds EfficientNet-Lite1 at 160 and 224 px: pass an ONNX graph with canestra's graph
interface (input ``image`` uint8 NHWC, outputs ``features``/``logits``); canestra ships no
builder for it, so it is off by default.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import benchlib
import numpy as np

DEFAULT_STUDIO = str(benchlib.SHARED_SAMPLE)
DEFAULT_REAL = str(benchlib.ROOT.parent / "shared" / "data" / "real-photos")
DEFAULT_WORK = "/tmp/canestra-bench-work"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
BATCH = 64  # images per ONNX Runtime call, as the product's featurizer
TEST_FRACTION = 0.2
TEN_BLOCKS_SEED = 42
FIVE_BLOCK_SEEDS = (42, 7, 3)
SESSION_SEEDS = (0, 1, 2)
CV_FOLDS = 5
CV_SEED = 0
THROUGHPUT_IMAGES = 512
THROUGHPUT_REPEATS = 3
SESSION_PREFIX = re.compile(r"^(r\d*_)")


@dataclass(frozen=True)
class Lever:
    name: str
    sizes: tuple[int, ...]
    pca_k: int | None  # None: no PCA (centred raw features)
    reg: float
    flip: bool = False  # features averaged with those of the mirrored image (train and test)
    backbone: str = "lite0"


LEVERS = [
    Lever("160 px, PCA 256, reg 1e-4 (old default)", (160,), 256, 1e-4),
    Lever("160 px, no PCA, reg 1e-4", (160,), None, 1e-4),
    Lever("160 px, no PCA, reg 1e-5", (160,), None, 1e-5),
    Lever("160 px, no PCA, reg 1e-3", (160,), None, 1e-3),
    Lever("160 px + mirror averaged, no PCA, reg 1e-4", (160,), None, 1e-4, flip=True),
    Lever("224 px, no PCA, reg 1e-4", (224,), None, 1e-4),
    Lever("100+224 px, no PCA, reg 1e-4", (100, 224), None, 1e-4),
    Lever("100+160 px, no PCA, reg 1e-5", (100, 160), None, 1e-5),
    Lever("160+224 px, no PCA, reg 1e-4", (160, 224), None, 1e-4),
    Lever("160+224 px, no PCA, reg 1e-5", (160, 224), None, 1e-5),
    Lever("160+224 px, PCA 512, reg 1e-4", (160, 224), 512, 1e-4),
    Lever("160+224 px, PCA 512, reg 1e-5 (new default)", (160, 224), 512, 1e-5),
    Lever("160+224 px, PCA 768, reg 1e-5", (160, 224), 768, 1e-5),
]
LITE1_LEVERS = [
    Lever("Lite1 160 px, no PCA, reg 1e-4", (160,), None, 1e-4, backbone="lite1"),
    Lever("Lite1 224 px, no PCA, reg 1e-4", (224,), None, 1e-4, backbone="lite1"),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- images


def list_labelled(root: str) -> list[str]:
    """``<Class>/<file>`` paths under ``root``, in ``sorted(glob(root/*/*))`` order."""
    return sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "*", "*"))
                  if p.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(p))


def read_rgb(path: str) -> np.ndarray:
    from canestra.vision.images import decode_rgb

    return decode_rgb(Path(path).read_bytes())


def mirrored(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[:, ::-1])


def padded(rgb: np.ndarray) -> np.ndarray:
    """The photo centred on a white square (the studio's background)."""
    h, w = rgb.shape[:2]
    s = max(h, w)
    out = np.full((s, s, 3), 255, np.uint8)
    y, x = (s - h) // 2, (s - w) // 2
    out[y : y + h, x : x + w] = rgb
    return out


def nonfruit_images() -> list[tuple[str, np.ndarray]]:
    """(name, RGB) of scikit-image's and scikit-learn's sample photos: whole, centre square and
    4 corner squares of 60 % of the short side -- crops of everyday scenes and textures, the
    kind of thing a user photographs by mistake. Images under 64 px or undecodable are skipped."""
    import skimage
    import sklearn

    from canestra.vision.images import decode_rgb

    sk = os.path.join(os.path.dirname(skimage.__file__), "data")
    sl = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
    sources = [("skimage", f) for f in sorted(glob.glob(sk + "/*.png") + glob.glob(sk + "/*.jpg"))]
    sources += [("sklearn", f) for f in sorted(glob.glob(sl + "/*.jpg"))]
    out = []
    for origin, f in sources:
        try:
            rgb = decode_rgb(Path(f).read_bytes())
        except Exception:  # e.g. 16-bit or odd modes canestra refuses: not part of the set
            continue
        h, w = rgb.shape[:2]
        if min(h, w) < 64:
            continue
        s = min(h, w)
        c = int(s * 0.6)
        views = [rgb, rgb[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]]
        views += [rgb[y : y + c, x : x + c] for y, x in ((0, 0), (0, w - c), (h - c, 0), (h - c, w - c))]
        out += [(f"{origin}/{os.path.basename(f)}#{k}", np.ascontiguousarray(v)) for k, v in enumerate(views)]
    return out


# ----------------------------------------------------------------------------- features


class FeatureCache:
    """``backbone.embed`` features per (backbone, image set, variant, size), kept in ``work``.

    Each array has a JSON sidecar with the ordered list of image ids it was computed from; on
    reuse the list must match and two rows (first, last) are recomputed and compared, so a
    changed CNN graph or preprocessing cannot hide behind a stale cache.
    """

    def __init__(self, work: str, threads: int, backbones: dict[str, str]):
        self.dir = Path(work) / "features"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.threads = threads
        self.backbones = backbones  # name -> ONNX path

    def path(self, backbone_name: str, image_set: str, variant: str, size: int) -> Path:
        return self.dir / f"{backbone_name}-{image_set}-{variant}-{size}.npy"

    def _embed(self, backbone_name: str, rgbs: list[np.ndarray], size: int, fit: str) -> np.ndarray:
        from canestra.vision import backbone

        return backbone.embed(rgbs, (size,), self.backbones[backbone_name], threads=self.threads, fit=fit)

    def get(self, backbone_name: str, image_set: str, variant: str, sizes, items: list[str],
            image_of: Callable[[int], np.ndarray], fit: str = "crop") -> dict[int, np.ndarray]:
        out, missing = {}, []
        for size in sizes:
            path = self.path(backbone_name, image_set, variant, size)
            side = path.with_suffix(".json")
            if path.exists() and side.exists() and json.loads(side.read_text())["items"] == items:
                arr = np.load(path)
                probe = [0, len(items) - 1]
                fresh = self._embed(backbone_name, [image_of(i) for i in probe], size, fit)
                if np.allclose(arr[probe], fresh, rtol=1e-3, atol=1e-3):
                    out[size] = arr
                    continue
                log(f"cache {path.name}: spot check failed, recomputing")
            missing.append(size)
        if missing:
            log(f"features {backbone_name} {image_set}/{variant} at {missing} px: {len(items)} images")
            parts: dict[int, list] = {s: [] for s in missing}
            t0 = time.perf_counter()
            for start in range(0, len(items), BATCH):
                rgbs = [image_of(i) for i in range(start, min(start + BATCH, len(items)))]
                for s in missing:
                    parts[s].append(self._embed(backbone_name, rgbs, s, fit))
                if (start // BATCH) % 40 == 39:
                    log(f"  {start + len(rgbs)}/{len(items)} ({time.perf_counter() - t0:.0f} s)")
            for s in missing:
                arr = np.concatenate(parts[s]).astype(np.float32)
                path = self.path(backbone_name, image_set, variant, s)
                np.save(path, arr)
                path.with_suffix(".json").write_text(json.dumps({"items": items, "fit": fit}))
                out[s] = arr
        return out


def throughput(model_paths: dict[str, str], needed: set[tuple[str, int]], rgbs: list[np.ndarray],
               threads: int) -> dict[tuple[str, int], float]:
    """img/s of ``backbone.embed`` per (backbone, size): median of interleaved repeats."""
    from canestra.vision import backbone

    runs: dict[tuple[str, int], list[float]] = {k: [] for k in sorted(needed)}
    for name, size in runs:  # warm-up: session creation and first-run allocations
        backbone.embed(rgbs[:BATCH], (size,), model_paths[name], threads=threads)
    for _ in range(THROUGHPUT_REPEATS):
        for name, size in runs:
            t0 = time.perf_counter()
            for i in range(0, len(rgbs), BATCH):
                backbone.embed(rgbs[i : i + BATCH], (size,), model_paths[name], threads=threads)
            runs[(name, size)].append(len(rgbs) / (time.perf_counter() - t0))
    return {k: benchlib.median(v) for k, v in runs.items()}


# ----------------------------------------------------------------------------- probe


@dataclass
class Probe:
    """PCA (centred, not whitened) + multinomial logistic regression, as ``canestra train`` fits it.

    Spark's PCA does not centre at transform time; with an unpenalised intercept that shift is
    absorbed by the intercepts, so margins and probabilities are those of the product's model.
    """

    mean: np.ndarray
    basis: np.ndarray | None
    W: np.ndarray
    b: np.ndarray

    def margins(self, X: np.ndarray) -> np.ndarray:
        Z = np.asarray(X, np.float64) - self.mean
        if self.basis is not None:
            Z = Z @ self.basis
        return Z @ self.W + self.b

    def probabilities(self, X: np.ndarray) -> np.ndarray:
        m = self.margins(X)
        m -= m.max(axis=1, keepdims=True)
        e = np.exp(m)
        return e / e.sum(axis=1, keepdims=True)


def pca_directions(Z: np.ndarray) -> np.ndarray:
    """Eigenvectors of the covariance of centred rows ``Z``, largest first (Spark's PCA directions),
    at most ``n - 1`` of them: n centred rows span no more (``canestra.pipeline.pca.fit_pca`` caps k so)."""
    _, vecs = np.linalg.eigh(Z.T @ Z / (len(Z) - 1))
    return np.ascontiguousarray(vecs[:, ::-1][:, : max(1, len(Z) - 1)])


def fit_probe(X: np.ndarray, y: np.ndarray, n_classes: int, pca_k: int | None, reg: float, max_iter: int,
              directions: dict | None = None, key=None, weights: np.ndarray | None = None,
              dtype: str = "float64") -> Probe:
    """Fit the probe on (X, y). ``directions[key]`` caches the PCA directions of this training set,
    so levers that differ only in k or reg share one eigendecomposition. ``weights``: per-row weights
    (Spark ML's weightCol objective: the weighted mean cross-entropy); ``dtype="float32"`` fits ~4x
    faster and ranks levers the same (bench/cross_source.py)."""
    import torch

    X = np.asarray(X, np.float64)
    mean = X.mean(axis=0)
    Z = X - mean
    basis = None
    if pca_k:
        if directions is not None and key in directions:
            vecs = directions[key]
        else:
            vecs = pca_directions(Z)
            if directions is not None:
                directions[key] = vecs
        basis = vecs[:, :pca_k]
        Z = Z @ basis
    tdt = getattr(torch, dtype)
    Zt, yt = torch.from_numpy(np.ascontiguousarray(Z, dtype)), torch.from_numpy(np.asarray(y, np.int64))
    wt = None if weights is None else torch.from_numpy((weights / weights.sum()).astype(dtype))
    W = torch.zeros(Z.shape[1], n_classes, dtype=tdt, requires_grad=True)
    b = torch.zeros(n_classes, dtype=tdt, requires_grad=True)
    # Spark's objective (L2 only, standardization off): mean cross-entropy + reg/2 ||W||^2.
    opt = torch.optim.LBFGS([W, b], max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = Zt @ W + b
        ce = (torch.nn.functional.cross_entropy(logits, yt) if wt is None
              else (torch.nn.functional.cross_entropy(logits, yt, reduction="none") * wt).sum())
        loss = ce + reg / 2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return Probe(mean, basis, W.detach().numpy().astype(np.float64), b.detach().numpy().astype(np.float64))


def top1(probe: Probe, X: np.ndarray, y: np.ndarray) -> float:
    return float((probe.margins(X).argmax(axis=1) == y).mean())


# ----------------------------------------------------------------------------- splits


def block_test(labels: list[str], names: list[str], seed: int, n_blocks: int) -> np.ndarray:
    from canestra.pipeline.split import assign_splits

    return np.array(assign_splits(labels, names, TEST_FRACTION, seed, n_blocks=n_blocks)) == "test"


def session_of(name: str) -> str:
    m = SESSION_PREFIX.match(name)
    return m.group(1) if m else "none"


def session_test(y: np.ndarray, sessions: np.ndarray, seed: int) -> np.ndarray:
    """Per class, all images of one capture session (drawn with ``seed``, classes in order).
    A class with a single session stays in training and is not tested."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in range(int(y.max()) + 1):
        idx = np.where(y == c)[0]
        kinds = sorted(set(sessions[idx]))
        if len(kinds) < 2:
            continue
        pick = kinds[rng.integers(len(kinds))]
        test[idx[sessions[idx] == pick]] = True
    return test


# ----------------------------------------------------------------------------- studio data


@dataclass
class Studio:
    root: str
    items: list[str]  # "<Class>/<file>"
    labels: list[str]
    names: list[str]
    classes: list[str]
    y: np.ndarray

    @classmethod
    def load(cls, root: str) -> Studio:
        items = list_labelled(root)
        if not items:
            raise SystemExit(f"no <Class>/<image> files under {root}: pass --studio")
        labels = [i.split(os.sep)[0] for i in items]
        classes = sorted(set(labels))  # StringIndexer alphabetAsc, as canestra train
        index = {c: k for k, c in enumerate(classes)}
        return cls(root, items, labels, [os.path.basename(i) for i in items], classes,
                   np.array([index[lb] for lb in labels]))

    def rgb(self, i: int) -> np.ndarray:
        return read_rgb(os.path.join(self.root, self.items[i]))

    def features(self, cache: FeatureCache, backbone_name: str, sizes, flip: bool = False) -> np.ndarray:
        plain = cache.get(backbone_name, "studio", "plain", sizes, self.items, self.rgb)
        if flip:
            mirror = cache.get(backbone_name, "studio", "mirror", sizes, self.items, lambda i: mirrored(self.rgb(i)))
            return np.hstack([(plain[s] + mirror[s]) / 2 for s in sizes])
        return np.hstack([plain[s] for s in sizes])


class Perturbed:
    """Held-out studio images under ``perturb_jpeg``, seeded from the image id as ``canestra train``."""

    def __init__(self, studio: Studio, rows: np.ndarray):
        from canestra.vision.images import decode_rgb, pixel_id

        self.studio, self.rows = studio, rows
        self.data = [Path(studio.root, studio.items[i]).read_bytes() for i in rows]
        self.seeds = [int(pixel_id(decode_rgb(d))[:12], 16) for d in self.data]
        self.items = [f"{studio.items[i]}#perturb:{s}" for i, s in zip(rows, self.seeds)]

    def rgb(self, j: int) -> np.ndarray:
        from canestra.pipeline.evaluation import perturb_jpeg
        from canestra.vision.images import decode_rgb

        return decode_rgb(perturb_jpeg(self.data[j], self.seeds[j]))

    def features(self, cache: FeatureCache, backbone_name: str, sizes, flip: bool = False) -> np.ndarray:
        plain = cache.get(backbone_name, "perturbed", "plain", sizes, self.items, self.rgb)
        if flip:
            mirror = cache.get(backbone_name, "perturbed", "mirror", sizes, self.items,
                               lambda j: mirrored(self.rgb(j)))
            return np.hstack([(plain[s] + mirror[s]) / 2 for s in sizes])
        return np.hstack([plain[s] for s in sizes])


# ----------------------------------------------------------------------------- levers


def fits_key(args, cache: FeatureCache, studio: Studio, lv: Lever) -> str:
    """Identity of a lever's fits: its settings, the iterations, the images and the exact feature
    files (a recomputed file gets a new mtime), so finished levers survive an interrupted run."""
    import hashlib

    files = [cache.path(lv.backbone, image_set, variant, s) for image_set in ("studio", "perturbed")
             for variant in (("plain", "mirror") if lv.flip else ("plain",)) for s in lv.sizes]
    ident = {"lever": lv.__dict__, "max_iter": args.max_iter, "version": 1,
             "images": hashlib.sha256("\n".join(studio.items).encode()).hexdigest(),
             "features": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def run_levers(args, cache: FeatureCache, studio: Studio, levers: list[Lever]) -> dict:
    n_classes = len(studio.classes)
    y = studio.y
    sessions = np.array([session_of(n) for n in studio.names])
    test10 = block_test(studio.labels, studio.names, TEN_BLOCKS_SEED, 10)
    tests5 = {s: block_test(studio.labels, studio.names, s, 5) for s in FIVE_BLOCK_SEEDS}
    tests_session = {s: session_test(y, sessions, s) for s in SESSION_SEEDS}
    perturbed = Perturbed(studio, np.where(test10)[0])

    # Featurize cost: img/s per (backbone, size) on 512 images spread over all classes.
    step = len(studio.items) / min(THROUGHPUT_IMAGES, len(studio.items))
    sample = [studio.rgb(int(i * step)) for i in range(min(THROUGHPUT_IMAGES, len(studio.items)))]
    needed = {(lv.backbone, s) for lv in levers for s in lv.sizes} | {("lite0", 160)}
    log(f"throughput of backbone.embed on {len(sample)} images: {sorted(needed)}")
    rates = throughput(cache.backbones, needed, sample, args.threads)
    per_160 = 1.0 / rates[("lite0", 160)]

    rows = []
    done_dir = Path(args.work) / "levers"  # finished levers' figures, reused unless --refit
    done_dir.mkdir(parents=True, exist_ok=True)
    directions: dict = {}  # PCA directions per split, for the features of the current lever
    features_of = None
    for lv in levers:
        t0 = time.perf_counter()
        if (lv.backbone, lv.sizes, lv.flip) != features_of:
            features_of = (lv.backbone, lv.sizes, lv.flip)
            directions.clear()
        X = studio.features(cache, lv.backbone, lv.sizes, lv.flip)
        Xp = perturbed.features(cache, lv.backbone, lv.sizes, lv.flip)
        cost = sum(1.0 / rates[(lv.backbone, s)] for s in lv.sizes) * (2 if lv.flip else 1) / per_160
        done = done_dir / f"{fits_key(args, cache, studio, lv)}.json"
        if done.exists() and not args.refit:
            rows.append({**json.loads(done.read_text()), "featurize_cost_vs_160": cost})
            log(f"{lv.name}: figures of an earlier run with the same features ({done})")
            continue
        log(f"{lv.name}: fitting")

        def held_out_top1(test, key, X=X, lv=lv):  # bound now: the loop moves on
            probe = fit_probe(X[~test], y[~test], n_classes, lv.pca_k, lv.reg, args.max_iter, directions, key)
            return probe, top1(probe, X[test], y[test])

        m10, acc10 = held_out_top1(test10, "blocks10")
        acc_pert = top1(m10, Xp, y[perturbed.rows])
        acc5 = {s: held_out_top1(t, f"blocks5-{s}")[1] for s, t in tests5.items()}
        acc_sess = {s: held_out_top1(t, f"session-{s}")[1] for s, t in tests_session.items()}
        row = {"lever": lv.name, "backbone": lv.backbone, "sizes": list(lv.sizes), "pca_k": lv.pca_k,
               "reg": lv.reg, "mirror_averaged": lv.flip, "dims": int(m10.W.shape[0]),
               "blocks10": acc10, "blocks5_mean": float(np.mean(list(acc5.values()))),
               "blocks5": {str(k): v for k, v in acc5.items()}, "perturbed": acc_pert,
               "session_out_mean": float(np.mean(list(acc_sess.values()))),
               "session_out": {str(k): v for k, v in acc_sess.items()}}
        done.write_text(json.dumps(row))
        rows.append({**row, "featurize_cost_vs_160": cost})
        log(f"{lv.name}: done in {time.perf_counter() - t0:.0f} s")

    print(f"Levers: top-1 % on {len(studio.items)} studio images, {n_classes} classes ({studio.root})")
    print(benchlib.table(
        [[r["lever"], r["dims"], f"{r['blocks10'] * 100:.2f}", f"{r['blocks5_mean'] * 100:.2f}",
          f"{r['perturbed'] * 100:.2f}", f"{r['session_out_mean'] * 100:.2f}", f"{r['featurize_cost_vs_160']:.2f}x"]
         for r in rows],
        ["lever", "dims", "10 blocks", "5 blocks", "perturbed", "session out", "featurize cost"]))
    print(f"10 blocks: 2 of 10 frame blocks per class held out (seed {TEN_BLOCKS_SEED}, {int(test10.sum())} images); "
          f"5 blocks: 1 of 5 held out, mean of seeds {'/'.join(map(str, FIVE_BLOCK_SEEDS))}; perturbed: the 10-block "
          f"model on its held-out images after perturb_jpeg (seed from the image id); session out: one capture "
          f"session per class held out, mean of seeds {'/'.join(map(str, SESSION_SEEDS))} "
          f"({', '.join(str(int(t.sum())) for t in tests_session.values())} images).")
    print("featurize cost: backbone.embed time per image over the lever's sizes (x2 mirrored) / 160 px; img/s: "
          + ", ".join(f"{b} {s} px {r:.1f}" for (b, s), r in sorted(rates.items()))
          + f" ({args.threads} ORT threads, median of {THROUGHPUT_REPEATS}).")
    print(f"probe: PCA (centred, no whitening) + softmax regression, mean CE + reg/2*||W||^2, torch L-BFGS "
          f"{args.max_iter} iterations, float64.")
    return {"images": len(studio.items), "classes": n_classes, "held_out_10_blocks": int(test10.sum()),
            "img_s": {f"{b}-{s}": r for (b, s), r in rates.items()}, "rows": rows}


# ----------------------------------------------------------------------------- real photos


@dataclass
class Decisions:
    family: np.ndarray  # answered family ("" when unknown)
    best_family: np.ndarray  # family with the highest summed probability, ignoring "unknown"
    unknown: np.ndarray


def imagenet_offset(sizes) -> int:
    """Start of the embedding block fed to the ImageNet head: the size closest to 224 px,
    as ``canestra.pipeline.train._answer_rule``."""
    from canestra.vision.backbone import FEATURE_DIM

    return min(range(len(sizes)), key=lambda i: abs(sizes[i] - 224)) * FEATURE_DIM


def build_rule(probe: Probe, labels: list[str], taxonomy, sizes, X_train, y_train, X_cal, cal_labels, q: float,
               profile_quantile: float | None = None, offset: int | None = None, energy: bool | None = None,
               fruit_min_mass: float | None = None, profile_min_mass: float | None = None, rescue: bool = True):
    """The answer rule as ``canestra.pipeline.train.train`` builds it, from training and held-out rows.
    ``profile_quantile``: the family-level profile check's quantile (default the product's; 0 turns it off);
    ``fruit_min_mass`` / ``profile_min_mass``: the mean mass from which an ImageNet class counts for fruitness /
    a profile (default the product's); ``rescue``: a sure family-level answer passes a failed profile check
    (the product's ``profile_rescue_energy``)."""
    import pandas as pd

    from canestra.answer.rule import (
        FRUIT_MIN_MASS,
        PROFILE_MIN_MASS,
        PROFILE_QUANTILE,
        AnswerRule,
        decide,
        imagenet_class_set,
        imagenet_probabilities,
    )
    from canestra.answer.taxonomy import is_family_label
    from canestra.pipeline import evaluation

    offset = imagenet_offset(sizes) if offset is None else offset
    families = taxonomy.families_of(labels)
    inet = imagenet_probabilities(X_train, offset)
    means = np.stack([inet[y_train == c].mean(axis=0) for c in range(len(labels))])
    imagenet_classes = imagenet_class_set(means, FRUIT_MIN_MASS if fruit_min_mass is None else fruit_min_mass)
    pm = PROFILE_MIN_MASS if profile_min_mass is None else profile_min_mass
    profiles = {lb: imagenet_class_set(means[i], pm) for i, lb in enumerate(labels)
                if is_family_label(lb)}
    pq = PROFILE_QUANTILE if profile_quantile is None else profile_quantile
    profile_thr = {lb: float(np.quantile(inet[y_train == labels.index(lb)][:, cls].sum(axis=1), pq))
                   for lb, cls in profiles.items()}
    # Calibration: held-out rows scored without thresholds (profile check on), then their quantile.
    plain = AnswerRule(labels, families, None, None, imagenet_classes, offset, profiles, profile_thr)
    a = decide(probe.probabilities(X_cal), probe.margins(X_cal), X_cal, plain)
    rows = pd.DataFrame({"label": cal_labels, "predicted_label": a.prediction, "energy": a.energy,
                         "fruitness": a.fruitness})
    # Fruitness is calibrated on the training rows too, as canestra train does.
    t = decide(probe.probabilities(X_train), probe.margins(X_train), X_train, plain)
    train_rows = pd.DataFrame({"label": np.array(labels)[y_train], "fruitness": t.fruitness})
    te, tf = evaluation.thresholds(rows, q, evaluation.energy_applies(labels) if energy is None else energy,
                                   fruit_rows=train_rows)
    checked = {} if profile_quantile == 0 else profile_thr
    return AnswerRule(labels, families, te, tf, imagenet_classes, offset, profiles, checked,
                      profile_rescue_energy=evaluation.profile_rescue(rows) if rescue and checked else None)


def decisions(probe: Probe, rule, X: np.ndarray) -> Decisions:
    from canestra.answer.rule import decide

    probs = probe.probabilities(X)
    a = decide(probs, probe.margins(X), X, rule)
    best = np.array(rule._fam_names)[(probs @ rule._fam_onehot).argmax(axis=1)]
    return Decisions(np.array(a.family), best, np.asarray(a.unknown, bool))


def cv_folds(families: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold per photo, stratified by family (each family's photos shuffled, then dealt out)."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(families), int)
    for f in sorted(set(families)):
        idx = np.where(families == f)[0]
        fold[rng.permutation(idx)] = np.arange(len(idx)) % k
    return fold


def run_real(args, cache: FeatureCache, studio: Studio) -> dict:
    from canestra.answer.taxonomy import family_label, load_taxonomy
    from canestra.config import Settings

    cfg = Settings()  # canestra's defaults, not the environment's
    sizes, pca_k, reg, q = tuple(cfg.image_sizes), cfg.pca_k, cfg.reg_param, cfg.unknown_quantile
    taxonomy = load_taxonomy(None)
    items = list_labelled(args.real)
    if not items:
        raise SystemExit(f"no <Family>/<image> files under {args.real}: pass --real")
    folders = [i.split(os.sep)[0] for i in items]
    fam_real = np.array([taxonomy.canonical_family(f) or f for f in folders])
    real_families = sorted(set(fam_real))

    def real_rgb(i: int) -> np.ndarray:
        return read_rgb(os.path.join(args.real, items[i]))

    nf = nonfruit_images()
    nf_names = [n for n, _ in nf]
    X = studio.features(cache, "lite0", sizes)
    R = {fit: np.hstack([v[s] for s in sizes]) for fit, v in (
        ("squash", cache.get("lite0", "real", "squash", sizes, items, real_rgb, fit="squash")),
        ("crop", cache.get("lite0", "real", "crop", sizes, items, real_rgb, fit="crop")),
        ("pad", cache.get("lite0", "real", "pad", sizes, items, lambda i: padded(real_rgb(i)))))}
    nf_feats = cache.get("lite0", "nonfruit", "crop", sizes, nf_names, lambda i: nf[i][1])
    N = np.hstack([nf_feats[s] for s in sizes])
    Rc = R["crop"]  # the product's input fit
    test5 = block_test(studio.labels, studio.names, 42, 5)
    X_tr, y_tr, X_cal = X[~test5], studio.y[~test5], X[test5]
    cal_labels = [studio.labels[i] for i in np.where(test5)[0]]

    def mixed(keep: np.ndarray):
        """Studio train split + the ``keep`` real photos as family-level classes; probe and rule."""
        labels = sorted(set(studio.classes) | {family_label(f) for f in fam_real[keep]})
        index = {lb: k for k, lb in enumerate(labels)}
        Xm = np.vstack([X_tr, Rc[keep]])
        ym = np.concatenate([[index[studio.classes[c]] for c in y_tr],
                             [index[family_label(f)] for f in fam_real[keep]]]).astype(int)
        probe = fit_probe(Xm, ym, len(labels), pca_k, reg, args.max_iter)
        return probe, build_rule(probe, labels, taxonomy, sizes, Xm, ym, X_cal, cal_labels, q)

    # Studio-only model.
    log("real: studio-only model")
    studio_probe = fit_probe(X_tr, y_tr, len(studio.classes), pca_k, reg, args.max_iter)
    studio_rule = build_rule(studio_probe, list(studio.classes), taxonomy, sizes, X_tr, y_tr, X_cal, cal_labels, q)
    fit_acc = {fit: float((decisions(studio_probe, studio_rule, A).best_family == fam_real).mean())
               for fit, A in R.items()}
    d_real, d_nf, d_cal = (decisions(studio_probe, studio_rule, A) for A in (Rc, N, X_cal))
    studio_only = {
        "real_family_accuracy": fit_acc,
        "real_answered_accuracy": float(((d_real.family == fam_real) & ~d_real.unknown).mean()),
        "real_unknown": float(d_real.unknown.mean()),
        "real_confidently_wrong": float(((d_real.family != fam_real) & ~d_real.unknown).mean()),
        "nonfruit_unknown": float(d_nf.unknown.mean()),
        "studio_unknown": float(d_cal.unknown.mean()),
        "energy_threshold": studio_rule.energy_threshold, "fruitness_threshold": studio_rule.fruitness_threshold,
    }

    # Mixed model, 5-fold CV over the real photos (each photo scored once, by the fold leaving it out).
    folds = cv_folds(fam_real, CV_FOLDS, CV_SEED)
    answered_ok = np.zeros(len(items), bool)
    best_ok = np.zeros(len(items), bool)
    real_unknown = np.zeros(len(items), bool)
    wrong_answered = np.zeros(len(items), bool)
    nf_unknown, cal_unknown = [], []
    for f in range(CV_FOLDS):
        out = folds == f
        if not out.any():
            continue
        log(f"real: mixed model, fold {f + 1}/{CV_FOLDS}")
        probe, rule = mixed(~out)
        d = decisions(probe, rule, Rc[out])
        answered_ok[out] = (d.family == fam_real[out]) & ~d.unknown
        best_ok[out] = d.best_family == fam_real[out]
        real_unknown[out] = d.unknown
        wrong_answered[out] = (d.family != fam_real[out]) & ~d.unknown
        nf_unknown.append(decisions(probe, rule, N).unknown.mean())
        cal_unknown.append(decisions(probe, rule, X_cal).unknown.mean())
    mixed_cv = {"real_answered_accuracy": float(answered_ok.mean()), "real_family_accuracy": float(best_ok.mean()),
                "real_unknown": float(real_unknown.mean()), "real_confidently_wrong": float(wrong_answered.mean()),
                "nonfruit_unknown": float(np.mean(nf_unknown)), "studio_unknown": float(np.mean(cal_unknown))}

    # Leave one real family out: its photos must not be answered with another family.
    lofo = {}
    for fam in real_families:
        log(f"real: mixed model without real {fam} photos")
        held = fam_real == fam
        probe, rule = mixed(~held)
        d = decisions(probe, rule, Rc[held])
        said = {k: int(v) for k, v in zip(*np.unique(d.family[~d.unknown], return_counts=True))}
        lofo[fam] = {"n": int(held.sum()), "confidently_wrong": float(((d.family != fam) & ~d.unknown).mean()),
                     "unknown": float(d.unknown.mean()), "right": float(((d.family == fam) & ~d.unknown).mean()),
                     "answers": said}

    pct = lambda v: f"{v * 100:.1f}"  # noqa: E731
    print(f"\nReal photos: {len(items)} ({', '.join(f'{f} {int((fam_real == f).sum())}' for f in real_families)}; "
          f"{args.real}); non-fruit: {len(nf)} images; held-out studio: {int(test5.sum())} images (5 blocks, seed 42)")
    print(f"model: {'+'.join(map(str, sizes))} px, PCA {pca_k}, reg {reg:g}; unknown thresholds at the "
          f"{q * 100:g} % quantile of held-out studio images")
    print("studio-only model, family accuracy on real photos (no abstention): "
          + ", ".join(f"{fit} {pct(a)} %" for fit, a in fit_acc.items()))
    print(benchlib.table(
        [["studio only", pct(studio_only["real_answered_accuracy"]), pct(studio_only["real_unknown"]),
          pct(studio_only["real_confidently_wrong"]), pct(studio_only["nonfruit_unknown"]),
          f"{studio_only['studio_unknown'] * 100:.2f}"],
         [f"mixed ({CV_FOLDS}-fold CV)", pct(mixed_cv["real_answered_accuracy"]), pct(mixed_cv["real_unknown"]),
          pct(mixed_cv["real_confidently_wrong"]), pct(mixed_cv["nonfruit_unknown"]),
          f"{mixed_cv['studio_unknown'] * 100:.2f}"]],
        ["model (crop fit)", "real: family right %", "real: unknown %", "real: confidently wrong %",
         "non-fruit: unknown %", "studio held-out: unknown %"]))
    print(f"(family right = answered with the right family, unknown counted wrong; mixed model without "
          f"abstention: {pct(mixed_cv['real_family_accuracy'])} %)")
    print("leave one real family out (mixed model trained without that family's photos), its photos: "
          + "; ".join(f"{fam}: confidently wrong {pct(v['confidently_wrong'])} %, unknown {pct(v['unknown'])} %, "
                      f"right {pct(v['right'])} %" for fam, v in lofo.items()))
    return {"real_images": len(items), "nonfruit_images": len(nf), "studio_held_out": int(test5.sum()),
            "model": {"image_sizes": list(sizes), "pca_k": pca_k, "reg_param": reg, "unknown_quantile": q},
            "studio_only": studio_only, "mixed_cv": mixed_cv, "leave_one_family_out": lofo}


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", nargs="?", choices=["all", "levers", "real"], default="all")
    ap.add_argument("--studio", default=DEFAULT_STUDIO, help="Fruits-360 style <Class>/<image> folder")
    ap.add_argument("--real", default=DEFAULT_REAL, help="real photos, <Family>/<image>")
    ap.add_argument("--work", default=DEFAULT_WORK, help="feature cache folder")
    ap.add_argument("--lite1", metavar="ONNX", help="EfficientNet-Lite1 graph (canestra's interface): adds 2 levers")
    ap.add_argument("--max-iter", type=int, default=100, help="L-BFGS iterations per fit")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime and torch threads")
    ap.add_argument("--refit", action="store_true", help="refit every lever, even those an earlier run finished")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    benchlib.setup_env()
    import torch

    from canestra.vision import backbone

    torch.set_num_threads(args.threads)
    backbones = {"lite0": backbone.model_path("fp32")}
    levers = list(LEVERS)
    if args.lite1:
        if not os.path.isfile(args.lite1):
            raise SystemExit(f"--lite1 {args.lite1}: no such ONNX file")
        backbones["lite1"] = args.lite1
        levers += LITE1_LEVERS
    cache = FeatureCache(args.work, args.threads, backbones)
    studio = Studio.load(args.studio)
    t0 = time.perf_counter()
    result: dict = {"studio": args.studio, "max_iter": args.max_iter, "threads": args.threads}
    if args.part in ("all", "levers"):
        result["levers"] = run_levers(args, cache, studio, levers)
    if args.part in ("all", "real"):
        result["real_root"] = args.real
        result["real"] = run_real(args, cache, studio)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    benchlib.record("outside_studio", result, args.json)


if __name__ == "__main__":
    main()
