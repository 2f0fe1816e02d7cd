"""canestra.pipeline.metrics: hand-computed cases, edge cases, and a scikit-learn cross-check."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from canestra.pipeline.metrics import classification_metrics, format_summary


def _floats(obj):
    """Every float anywhere in a nested dict/list."""
    if isinstance(obj, float):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _floats(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _floats(v)


def _assert_clean(m: dict) -> None:
    json.dumps(m, allow_nan=False)  # raises on NaN/inf
    assert all(math.isfinite(x) for x in _floats(m))
    assert set(m) >= {"n", "accuracy", "macro_f1", "weighted_f1", "per_class", "confusion_matrix", "top_confusions"}


def test_perfect_classifier():
    m = classification_metrics([("b", "b", 4), ("a", "a", 3), ("c", "c", 5)])
    _assert_clean(m)
    assert m["n"] == 12
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["weighted_f1"] == 1.0
    assert m["confusion_matrix"] == {"labels": ["a", "b", "c"], "matrix": [[3, 0, 0], [0, 4, 0], [0, 0, 5]]}
    assert m["per_class"]["c"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 5}
    assert m["top_confusions"] == []


def test_one_confusion_hand_computed():
    # A: tp 3, support 4, predicted 3 -> P 1, R 3/4, F1 6/7
    # B: tp 2, support 2, predicted 3 -> P 2/3, R 1, F1 4/5
    m = classification_metrics([("A", "A", 3), ("A", "B", 1), ("B", "B", 2)])
    _assert_clean(m)
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(5 / 6)
    a, b = m["per_class"]["A"], m["per_class"]["B"]
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == pytest.approx((1.0, 0.75, 6 / 7, 4))
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == pytest.approx((2 / 3, 1.0, 0.8, 2))
    assert m["macro_f1"] == pytest.approx((6 / 7 + 0.8) / 2)
    assert m["weighted_f1"] == pytest.approx((4 * 6 / 7 + 2 * 0.8) / 6)
    assert m["confusion_matrix"]["matrix"] == [[3, 1], [0, 2]]
    assert m["top_confusions"] == [{"true": "A", "predicted": "B", "count": 1}]


def test_class_never_predicted_has_zero_precision_and_no_nan():
    # C is never predicted (precision 0/0 -> 0), B is listed but absent everywhere.
    m = classification_metrics([("A", "A", 2), ("C", "A", 1)], classes=["A", "B", "C"])
    _assert_clean(m)
    assert m["confusion_matrix"]["labels"] == ["A", "B", "C"]
    assert m["confusion_matrix"]["matrix"] == [[2, 0, 0], [0, 0, 0], [1, 0, 0]]
    assert m["per_class"]["C"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_class"]["B"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["A"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["A"]["f1"] == pytest.approx(0.8)
    # macro over labels present in truth or predictions: A and C, not B
    assert m["macro_f1"] == pytest.approx(0.4)
    assert m["weighted_f1"] == pytest.approx((2 * 0.8 + 1 * 0.0) / 3)
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_predicted_label_outside_classes_is_appended():
    m = classification_metrics([("A", "A", 2), ("A", "Zebra", 1), ("B", "B", 1)], classes=["B", "A"])
    _assert_clean(m)
    assert m["confusion_matrix"]["labels"] == ["B", "A", "Zebra"]
    assert m["confusion_matrix"]["matrix"] == [[1, 0, 0], [0, 2, 1], [0, 0, 0]]
    z = m["per_class"]["Zebra"]
    assert z == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # Zebra was predicted, so it counts in macro-F1 (scikit-learn convention)
    f1_a = 2 * 2 / (2 * 2 + 0 + 1)
    assert m["macro_f1"] == pytest.approx((1.0 + f1_a + 0.0) / 3)


def test_duplicates_summed_zeros_ignored_and_negative_rejected():
    m = classification_metrics([("a", "b", 2), ("a", "b", 3), ("a", "a", 0), ("b", "b", np.int64(1))])
    assert m["confusion_matrix"]["matrix"] == [[0, 5], [0, 1]]
    assert isinstance(m["n"], int) and m["n"] == 6
    with pytest.raises(ValueError):
        classification_metrics([("a", "a", -1)])


def test_empty_counts():
    m = classification_metrics([], classes=["x", "y"])
    _assert_clean(m)
    assert m["n"] == 0 and m["accuracy"] == 0.0 and m["macro_f1"] == 0.0 and m["weighted_f1"] == 0.0
    assert m["confusion_matrix"] == {"labels": ["x", "y"], "matrix": [[0, 0], [0, 0]]}
    assert classification_metrics([])["confusion_matrix"] == {"labels": [], "matrix": []}


def test_duplicate_classes_dropped_and_order_kept():
    m = classification_metrics([("b", "a", 1)], classes=["c", "b", "c", "a"])
    assert m["confusion_matrix"]["labels"] == ["c", "b", "a"]


def test_top_confusions_sorted_and_capped_at_20():
    counts = [(f"t{i:02d}", f"p{i:02d}", 100 - i) for i in range(30)]
    counts += [("t00", "t00", 7), ("b", "x", 5), ("a", "x", 5), ("a", "w", 5)]
    m = classification_metrics(counts)
    top = m["top_confusions"]
    assert len(top) == 20
    assert [c["count"] for c in top] == sorted((c["count"] for c in top), reverse=True)
    assert top[0] == {"true": "t00", "predicted": "p00", "count": 100}
    assert all(c["true"] != c["predicted"] for c in top)
    # ties: by true label then predicted label
    m2 = classification_metrics([("b", "x", 5), ("a", "x", 5), ("a", "w", 5)])
    assert [(c["true"], c["predicted"]) for c in m2["top_confusions"]] == [("a", "w"), ("a", "x"), ("b", "x")]


def test_matches_sklearn_on_random_data():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1234)
    classes = [f"fruit {i}" for i in range(12)]
    y_true = rng.choice(classes[:11], size=3000, p=np.r_[np.full(10, 0.095), 0.05])  # fruit 11: no support
    noisy = rng.random(3000) < 0.3
    y_pred = np.where(noisy, rng.choice(classes[:9] + ["ghost"], size=3000), y_true)  # fruit 9/10 rarely right
    counts = [(t, p, n) for (t, p), n in Counter(zip(y_true.tolist(), y_pred.tolist())).items()]
    m = classification_metrics(counts)
    _assert_clean(m)

    labels = m["confusion_matrix"]["labels"]
    assert labels == sorted(set(y_true) | set(y_pred))
    assert m["n"] == 3000
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="weighted", zero_division=0))
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for i, c in enumerate(labels):
        pc = m["per_class"][c]
        assert (pc["precision"], pc["recall"], pc["f1"]) == pytest.approx((p[i], r[i], f[i]))
        assert pc["support"] == s[i]
    assert np.array_equal(np.array(m["confusion_matrix"]["matrix"]),
                          skm.confusion_matrix(y_true, y_pred, labels=labels))

    # With an explicit class list containing a label absent everywhere, macro-F1 is unchanged
    m2 = classification_metrics(counts, classes=classes + ["never seen"])
    assert m2["macro_f1"] == pytest.approx(m["macro_f1"])
    assert m2["confusion_matrix"]["labels"][: len(classes) + 1] == classes + ["never seen"]


def test_format_summary():
    m = classification_metrics([("Apple", "Apple", 90), ("Apple", "Pear", 10), ("Pear", "Pear", 50),
                                ("Kiwi", "Kiwi", 48), ("Kiwi", "Apple", 2)])
    m["pca"] = {"k": 64, "input_dim": 1280, "explained_variance": 0.8766, "explained_variance_ratio": [0.1] * 64}
    text = format_summary(m)
    lines = text.splitlines()
    assert len(lines) >= 5
    assert "94.00%" in lines[0] and "200 test images" in lines[0]
    assert f"{m['macro_f1']:.4f}" in text
    assert "1280 -> 64 components" in text and "87.7%" in text
    worst = text.index("worst classes")
    # F1: Pear 100/110 < Apple 180/192 < Kiwi 96/98
    assert text.index("Pear", worst) < text.index("Apple", worst) < text.index("Kiwi", worst)
    assert "Apple" in text and "-> Pear  (10)" in text
    assert text.index("Apple", text.index("top confusions")) < text.index("Kiwi", text.index("top confusions"))


def test_format_summary_tolerates_missing_keys():
    assert "accuracy" in format_summary({})
    assert "PCA" not in format_summary({"accuracy": 0.5, "n": 10})
    perfect = format_summary(classification_metrics([("a", "a", 3)]))
    assert "worst" not in perfect and "confusions" not in perfect
