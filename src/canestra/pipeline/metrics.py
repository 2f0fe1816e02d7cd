"""Classification metrics from aggregated confusion counts (what a Spark groupBy returns).

Everything returned is plain Python (str, int, float, list, dict) and finite, so
``json.dumps(metrics, allow_nan=False)`` always succeeds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["classification_metrics", "format_summary"]

TOP_CONFUSIONS = 20


def classification_metrics(counts: Iterable[tuple[str, str, int]], classes: Sequence[str] | None = None) -> dict:
    """Accuracy, macro/weighted F1, per-class precision/recall/F1, confusion matrix, top confusions.

    ``counts`` holds ``(true_label, predicted_label, n)`` triples; a pair may
    appear more than once (the counts are summed) and ``n == 0`` rows are ignored.
    ``classes`` fixes the order of the labels (duplicates dropped); any label
    seen in ``counts`` but missing from it is appended in sorted order. Without
    ``classes`` the labels are the sorted union of true and predicted labels.

    Conventions (those of scikit-learn with ``zero_division=0``):

    * precision of a class never predicted is 0, recall of a class with no
      support is 0, F1 is ``2 tp / (2 tp + fp + fn)`` and 0 when that is 0/0;
    * ``macro_f1`` is the unweighted mean of F1 over the labels present in the
      true labels *or* the predictions (scikit-learn's ``average="macro"``
      without ``labels=``); a class listed in ``classes`` but absent from both
      does not count;
    * ``weighted_f1`` weights each class's F1 by its support;
    * ``per_class`` lists every label (including absent ones, all zeros);
    * ``confusion_matrix.matrix[i][j]`` counts true ``labels[i]`` predicted as
      ``labels[j]``;
    * ``top_confusions``: the up to 20 largest off-diagonal cells, count
      descending, then true and predicted label ascending.
    """
    rows: list[tuple[str, str, int]] = []
    for t, p, n in counts:
        n = int(n)
        if n < 0:
            raise ValueError(f"negative count {n} for ({t!r}, {p!r})")
        if n:
            rows.append((str(t), str(p), n))

    labels: list[str] = list(dict.fromkeys(str(c) for c in classes)) if classes is not None else []
    known = set(labels)
    seen = {t for t, _, _ in rows} | {p for _, p, _ in rows}
    labels += sorted(seen - known)
    index = {c: i for i, c in enumerate(labels)}

    cm = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p, n in rows:
        cm[index[t], index[p]] += n

    total = int(cm.sum())
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    zeros = np.zeros_like(tp)
    precision = np.divide(tp, predicted, out=zeros.copy(), where=predicted > 0)
    recall = np.divide(tp, support, out=zeros.copy(), where=support > 0)
    f1_denom = support + predicted  # = 2 tp + fp + fn
    f1 = np.divide(2 * tp, f1_denom, out=zeros.copy(), where=f1_denom > 0)
    present = (support > 0) | (predicted > 0)

    per_class = {
        c: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, c in enumerate(labels)
    }
    off = [(int(cm[i, j]), labels[i], labels[j]) for i, j in zip(*np.nonzero(cm)) if i != j]
    off.sort(key=lambda x: (-x[0], x[1], x[2]))
    return {
        "n": total,
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "weighted_f1": float((f1 * support).sum() / support.sum()) if support.sum() > 0 else 0.0,
        "per_class": per_class,
        "confusion_matrix": {"labels": labels, "matrix": cm.tolist()},
        "top_confusions": [{"true": t, "predicted": p, "count": n} for n, t, p in off[:TOP_CONFUSIONS]],
    }


def _num(x, default: float = 0.0) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return default
    return v if np.isfinite(v) else default


def format_summary(metrics: dict) -> str:
    """A short plain-text summary for the terminal (several lines, no trailing newline).

    Accuracy, macro-F1, number of test images, PCA size and kept variance when
    ``metrics["pca"]`` is there, the 5 worst classes by F1 and the 5 largest
    confusions. Missing keys are skipped.
    """
    per = metrics.get("per_class") or {}
    n_classes = (metrics.get("counts") or {}).get("classes") or len(per)
    head = f"accuracy   {_num(metrics.get('accuracy')) * 100:.2f}%   on {int(_num(metrics.get('n'))):,} test images"
    if n_classes:
        head += f", {n_classes} classes"
    lines = [head, f"macro-F1   {_num(metrics.get('macro_f1')):.4f}"
             + (f"    weighted-F1 {_num(metrics['weighted_f1']):.4f}" if "weighted_f1" in metrics else "")]
    pca = metrics.get("pca") or {}
    if pca:
        dim = pca.get("input_dim")
        lines.append(f"PCA        {'' if dim is None else f'{dim} -> '}{pca.get('k', '?')} components, "
                     f"{_num(pca.get('explained_variance')) * 100:.1f}% of variance kept")

    scored = [(_num(v.get("f1")), c, v) for c, v in per.items()
              if isinstance(v, dict) and (int(_num(v.get("support"))) > 0)]
    worst = sorted(scored, key=lambda x: (x[0], x[1]))[:5]
    if worst and worst[0][0] < 1.0:
        width = min(40, max(len(c) for _, c, _ in worst))
        lines.append("worst classes by F1:")
        for f1, c, v in worst:
            if f1 >= 1.0:
                break
            lines.append(f"  {c:<{width}}  F1 {f1:.3f}  (precision {_num(v.get('precision')):.3f}, "
                         f"recall {_num(v.get('recall')):.3f}, support {int(_num(v.get('support')))})")

    conf = [c for c in (metrics.get("top_confusions") or []) if isinstance(c, dict)][:5]
    if conf:
        lines.append("top confusions (true -> predicted):")
        width = min(40, max(len(str(c.get("true", ""))) for c in conf))
        for c in conf:
            lines.append(f"  {str(c.get('true', '?')):<{width}} -> {c.get('predicted', '?')}  ({c.get('count', '?')})")
    return "\n".join(lines)
