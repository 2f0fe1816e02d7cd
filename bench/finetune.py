"""Fine-tuning the last backbone blocks: does it carry the family answer to other sources?

The cross-source bench (bench/cross_source.py) with one change: before each protocol's probe is
fitted, the last ``--blocks`` MBConv blocks and the head convolution of EfficientNet-Lite0 are
fine-tuned (PyTorch CPU) on that protocol's training rows only (studio train split, a sample of
``--studio-per-class`` frames per class, plus the real training photos and their augmented views),
with the product's labels (varieties, ``<Family> (family)``). The fine-tuned convolutions replace the
originals; the embedding (global average pool, 1280-d) feeds the same PCA + logistic probe and the
product's answer rule, and every test set is embedded by the fine-tuned network.

Speed: the frozen trunk (everything before the first tuned block) runs once per image in ONNX
Runtime and its output is cached (float16, ``--work``); the tuned tail runs in torch. Batch norms
are folded into the convolutions (frozen statistics), as in the product's graph.

    python bench/finetune.py [--blocks 3] [--epochs 3] [--levers "224 fp32 + aug 4"] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import benchlib
import numpy as np

benchlib.setup_env()
import cross_source as cs  # noqa: E402  (bench/ sibling)

N_BLOCKS = 16  # MBConv blocks of Lite0


def trunk_graph(fp32_path: str, first: int, work: Path) -> str:
    """The product's fp32 graph with one more output, ``trunk``: the input of block ``first``."""
    import onnx
    from onnx import helper

    out = work / f"trunk-{first}.onnx"
    if out.exists():
        return str(out)
    m = onnx.load(fp32_path)
    name = next(n.input[0] for n in m.graph.node if len(n.input) > 1 and n.input[1] == f"_blocks.{first}._expand_conv.w")
    m.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    m.graph.output[-1].name = name
    onnx.save(m, str(out))
    return str(out)


def conv_params(fp32_path: str) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(fp32_path).graph.initializer}


def make_tail(params: dict[str, np.ndarray], first: int, n_labels: int):
    """Torch module: blocks ``first``..15 + head conv + pool (+ a new linear classifier)."""
    import torch
    from torch import nn

    from canestra.vision.backbone import BLOCKS

    specs = []  # (idx, stride, residual)
    idx = 0
    for repeats, _k, stride, _e, cin, cout in BLOCKS:
        for r in range(repeats):
            s = stride if r == 0 else 1
            specs.append((idx, s, s == 1 and (cin if r == 0 else cout) == cout))
            idx += 1

    def conv(prefix: str, group: int = 1) -> nn.Conv2d:
        w, b = params[f"{prefix}.w"], params[f"{prefix}.b"]
        c = nn.Conv2d(w.shape[1] * group, w.shape[0], w.shape[2], padding=w.shape[2] // 2, groups=group)
        c.weight.data = torch.from_numpy(w.copy())
        c.bias.data = torch.from_numpy(b.copy())
        return c

    class Tail(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList()
            self.residual = []
            for i, s, res in specs[first:]:
                assert s == 1, "the tuned tail must start after the last stride-2 block"
                p = f"_blocks.{i}"
                ch = params[f"{p}._depthwise_conv.w"].shape[0]
                self.blocks.append(nn.ModuleList([conv(f"{p}._expand_conv"), conv(f"{p}._depthwise_conv", ch),
                                                  conv(f"{p}._project_conv")]))
                self.residual.append(res)
            self.head = conv("_conv_head")
            self.fc = nn.Linear(1280, n_labels)

        def embed(self, x):
            for (e, d, p), res in zip(self.blocks, self.residual):
                y = p(torch.clamp(d(torch.clamp(e(x), 0, 6)), 0, 6))
                x = x + y if res else y
            return torch.clamp(self.head(x), 0, 6).mean(dim=(2, 3))

        def forward(self, x):
            return self.fc(self.embed(x))

    return Tail()


class FTBench(cs.Bench):
    """The cross-source bench whose features come from a tail fine-tuned per protocol."""

    def __init__(self, args):
        super().__init__(args)
        from canestra.vision import backbone

        self.first = N_BLOCKS - args.blocks
        self.fp32 = backbone.model_path("fp32")
        self.trunk_path = trunk_graph(self.fp32, self.first, Path(args.work))
        self.params = conv_params(self.fp32)
        self.tail = None
        self.emb: dict = {}
        self.costs: list[dict] = []

    # ----- trunk activations, cached per set/view
    def acts(self, s: cs.ImageSet, view: str, rgb_of=None) -> np.ndarray:
        from canestra.vision import backbone

        path = self.feats.dir / f"trunk{self.first}-{s.name}-{view}.npy"
        if not path.exists():
            rgb_of = rgb_of or s.rgb
            sess = backbone.session(self.trunk_path, self.args.threads)
            name = sess.get_outputs()[-1].name
            out = []
            t0 = time.perf_counter()
            for start in range(0, len(s.items), 64):
                rgbs = [backbone.square_rgb(rgb_of(i)) for i in range(start, min(start + 64, len(s.items)))]
                x = np.stack([backbone.resize_rgb(im, 224) for im in rgbs])
                out.append(sess.run([name], {"image": x})[0].astype(np.float16))
            np.save(path, np.concatenate(out))
            cs.log(f"trunk {s.name}/{view}: {len(s.items) / (time.perf_counter() - t0):.1f} img/s")
        return np.load(path, mmap_mode="r")

    def _embed(self, key, acts: np.ndarray) -> np.ndarray:
        """Fine-tuned embedding of cached trunk outputs; with ``--imagenet-original`` the original
        network's embedding is appended (the answer rule's ImageNet head reads it, the probe does not)."""
        import torch

        if key not in self.emb:
            self.tail.eval()
            out = []
            with torch.no_grad():
                for i in range(0, len(acts), 256):
                    out.append(self.tail.embed(torch.from_numpy(np.asarray(acts[i : i + 256], np.float32))).numpy())
            self.emb[key] = np.concatenate(out)
            if self.args.imagenet_original:
                self.emb[key] = np.concatenate([self.emb[key], self._original(key, acts)], axis=1)
        return self.emb[key]

    def _original(self, key, acts) -> np.ndarray:
        import torch

        if not hasattr(self, "_orig_tail"):
            self._orig_tail = make_tail(self.params, self.first, 1).eval()
            self._orig = {}
        if key not in self._orig:
            with torch.no_grad():
                self._orig[key] = np.concatenate([self._orig_tail.embed(torch.from_numpy(np.asarray(acts[i : i + 256], np.float32))).numpy()
                                                  for i in range(0, len(acts), 256)])
        return self._orig[key]

    def X(self, name, lv):
        if self.tail is None:
            return super().X(name, lv)
        return self._embed((name, "orig"), self.acts(self.sets[name], "orig"))

    def aug_X(self, name, lv, k):
        if self.tail is None:
            return super().aug_X(name, lv, k)
        s = self.sets[name]
        return self._embed((name, f"aug{k}"), self.acts(s, f"aug{k}", lambda i: cs.augment(s.rgb(i), k, i)))

    def test_X(self, name, lv, rows=None):
        X = self.X(name, lv)
        if lv.tta <= 1 or self.tail is None:
            return X if self.tail is not None else super().test_X(name, lv)
        s = self.sets[name]
        views = [X] + [self._embed((name, v), self.acts(s, v, lambda i, v=v: cs.tta_view(s.rgb(i), v)))
                       for v in cs.TTA_VIEWS[: lv.tta - 1]]
        return np.mean(views, axis=0)

    def nonfruit_X(self, lv):
        if self.tail is None:
            return super().nonfruit_X(lv)
        fake = self._nonfruit_set()
        X = self._embed(("nonfruit", "orig"), self.acts(fake, "orig", fake.rgb))
        if lv.tta <= 1:
            return X
        views = [X] + [self._embed(("nonfruit", v), self.acts(fake, v, lambda i, v=v: cs.tta_view(fake.rgb(i), v)))
                       for v in cs.TTA_VIEWS[: lv.tta - 1]]
        return np.mean(views, axis=0)

    # ----- fine-tuning on the protocol's own training rows
    def finetune(self, lv, real_roots, drop_families) -> None:
        import torch

        from canestra.answer.taxonomy import family_label

        torch.set_num_threads(self.args.threads)
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        st = self.sets["studio"]
        parts, labels = [], []
        tr = np.where(st.split == "train")[0]
        pick = np.concatenate([rng.permutation(tr[st.folders[tr] == c])[: self.args.studio_per_class]
                               for c in sorted(set(st.folders))])
        parts.append(np.asarray(self.acts(st, "orig"))[pick])
        labels += list(st.folders[pick])
        for r in real_roots:
            s = self.sets[r]
            keep = ~np.isin(s.families, list(drop_families)) & (s.split == "train")
            lab = [family_label(f) for f in s.families[keep]]
            parts.append(np.asarray(self.acts(s, "orig"))[keep])
            labels += lab
            for k in range(lv.aug):
                parts.append(np.asarray(self.acts(s, f"aug{k}", lambda i, k=k, s=s: cs.augment(s.rgb(i), k, i)))[keep])
                labels += lab
        A = np.concatenate(parts)
        names = sorted(set(labels))
        y = torch.from_numpy(np.array([names.index(lb) for lb in labels]))
        self.tail = make_tail(self.params, self.first, len(names))
        self.emb = {}
        a = self.args
        key = f"tail-{'+'.join(real_roots)}-{'-'.join(sorted(drop_families))}-b{a.blocks}-e{a.epochs}-lr{a.lr}-s{a.studio_per_class}-aug{lv.aug}"
        saved = self.feats.dir / f"{key}.pt"
        if saved.exists():
            self.tail.load_state_dict(torch.load(saved))
            cs.log(f"  fine-tuned tail reused: {saved.name}")
            return
        head = list(self.tail.fc.parameters())
        body = [p for n, p in self.tail.named_parameters() if not n.startswith("fc.")]
        opt = torch.optim.AdamW([{"params": body, "lr": self.args.lr}, {"params": head, "lr": self.args.lr * 10}],
                                weight_decay=1e-4)
        steps = self.args.epochs * ((len(A) + 127) // 128)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[self.args.lr, self.args.lr * 10], total_steps=steps,
                                                    pct_start=0.15)
        t0 = time.perf_counter()
        self.tail.train()
        for ep in range(self.args.epochs):
            order = rng.permutation(len(A))
            tot = 0.0
            for i in range(0, len(A), 128):
                b = order[i : i + 128]
                x = torch.from_numpy(A[b].astype(np.float32))
                loss = torch.nn.functional.cross_entropy(self.tail(x), y[b], label_smoothing=0.1)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                tot += float(loss.detach()) * len(b)
            cs.log(f"  epoch {ep + 1}: loss {tot / len(A):.3f}")
        dt = time.perf_counter() - t0
        torch.save(self.tail.state_dict(), saved)
        self.costs.append({"roots": "+".join(real_roots), "rows": len(A), "finetune_s": round(dt, 1)})
        cs.log(f"  fine-tuned {self.args.blocks} blocks on {len(A)} rows ({'+'.join(real_roots)}): {dt:.0f} s")

    def train(self, lv, real_roots, drop_families=frozenset()):
        self.finetune(lv, real_roots, drop_families)
        return super().train(lv, real_roots, drop_families)

    def run_val(self, lv) -> dict:
        """Only the grocery->val protocol (+ non-fruit, studio held-out): one fine-tune instead of six."""
        out: dict = {"lever": lv.name}
        v, st = self.sets["gval"], self.sets["studio"]
        t0 = time.perf_counter()
        probe, rule = self.train(lv, ["real", "grocery"])
        known = set(rule.families) - {""}
        a = self.answer(probe, rule, self.test_X("gval", lv))
        out["grocery->val"] = self.scores(a, v.families, known)
        for fam in ("Tomato", "Lime", "Apple"):
            out[f"grocery->val {fam}"] = self.scores(a[v.families == fam], v.families[v.families == fam], known)
        out["non-fruit unknown"] = float((self.answer(probe, rule, self.nonfruit_X(lv)) == "").mean())
        te = st.split == "test"
        pred = np.array(rule.labels)[probe.margins(self.X("studio", lv)[te]).argmax(axis=1)]
        out["studio 5-block top1"] = float((pred == st.folders[te]).mean())
        out["fit_s"] = round(time.perf_counter() - t0, 1)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levers", default="224 fp32 + aug 4")
    ap.add_argument("--blocks", type=int, default=3, help="MBConv blocks tuned (the last ones; at most 4)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--studio-per-class", type=int, default=30)
    ap.add_argument("--work", default="/tmp/canestra-bench-work")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-iter", type=int, default=60)
    ap.add_argument("--only-val", action="store_true", help="only the grocery->val protocol (one fine-tune)")
    ap.add_argument("--imagenet-original", action="store_true",
                    help="the answer rule's ImageNet head reads the original network's embedding (fine-tuned one for the probe)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    b = FTBench(args)
    for name in [n.strip() for n in args.levers.split(",") if n.strip()]:
        lv = cs.LEVERS.get(name) or cs.Lever(name)
        if args.imagenet_original:
            lv = dataclasses.replace(lv, probe_dims=1280, inet_offset=1280, name=lv.name + " + original ImageNet head")
        res = b.run_val(lv) if args.only_val else b.run(lv)
        res["lever"] = f"{lv.name} + fine-tune {args.blocks} blocks ({args.epochs} epochs)"
        res["finetune"] = b.costs
        print(cs.fmt(res), flush=True)
        benchlib.record("cross_source", {"lever_settings": {**dataclasses.asdict(lv), "finetune_blocks": args.blocks,
                                                            "epochs": args.epochs, "lr": args.lr,
                                                            "studio_per_class": args.studio_per_class},
                                         **res}, False)
        if args.json:
            print(json.dumps({"machine": benchlib.machine(), "result": res}))


if __name__ == "__main__":
    main()
