"""Classification metrics from aggregated confusion counts (what a Spark groupBy returns)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def classification_metrics(counts: Iterable[tuple[str, str, int]], classes: Sequence[str] | None = None) -> dict:
    """Accuracy, macro/weighted F1, per-class precision/recall/F1, confusion matrix.

    ``counts`` holds (true label, predicted label, n). Macro-F1 averages over the
    labels present in truth or predictions (scikit-learn's convention). No NaN:
    an undefined precision or recall is 0.
    """
    counts = [(str(t), str(p), int(n)) for t, p, n in counts if n]
    seen = sorted({t for t, _, _ in counts} | {p for _, p, _ in counts})
    labels = list(classes) if classes is not None else []
    labels += [c for c in seen if c not in set(labels)]
    index = {c: i for i, c in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p, n in counts:
        cm[index[t], index[p]] += n
    total = int(cm.sum())
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = (support > 0) | (predicted > 0)
    per_class = {
        c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
        for i, c in enumerate(labels)
    }
    off = [(int(cm[i, j]), labels[i], labels[j]) for i, j in zip(*np.nonzero(cm)) if i != j]
    off.sort(key=lambda x: (-x[0], x[1], x[2]))
    return {
        "n": total,
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "weighted_f1": float((f1 * support).sum() / support.sum()) if support.sum() else 0.0,
        "per_class": per_class,
        "confusion_matrix": {"labels": labels, "matrix": cm.tolist()},
        "top_confusions": [{"true": t, "predicted": p, "count": n} for n, t, p in off[:20]],
    }


def format_summary(metrics: dict) -> str:
    """A few plain lines for the terminal."""
    lines = [
        f"top-1 accuracy {metrics.get('accuracy', 0) * 100:.2f}%  macro-F1 {metrics.get('macro_f1', 0):.4f}  "
        f"on {metrics.get('n', 0)} images"
    ]
    pca = metrics.get("pca")
    if pca:
        lines.append(f"PCA {pca.get('input_dim', '?')} -> {pca.get('k')} components, "
                     f"{pca.get('explained_variance', 0) * 100:.1f}% of variance")
    per = metrics.get("per_class", {})
    worst = sorted((v["f1"], c) for c, v in per.items() if v["support"] > 0)[:5]
    if worst and worst[0][0] < 1.0:
        lines.append("weakest classes (F1): " + ", ".join(f"{c} {f:.3f}" for f, c in worst if f < 1.0))
    conf = metrics.get("top_confusions", [])[:5]
    if conf:
        lines.append("top confusions: " + "; ".join(f"{c['true']} -> {c['predicted']} ({c['count']})" for c in conf))
    return "\n".join(lines)
