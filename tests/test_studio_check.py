"""The studio second opinion: a real photo of a family the model knows only from the studio is answered
with that family (or left alone) by a probe fitted on the studio frames only (answer.rule)."""

from __future__ import annotations

import numpy as np
import pytest

from canestra.answer.rule import AnswerRule, decide, studio_check_spec, studio_check_threshold

LABELS = ["Apple Granny Smith", "Kiwi", "Apple (family)"]
FAMILIES = ["Apple", "Kiwi", "Apple"]
# The studio probe reads a 2-d embedding: the first feature says Granny Smith, the second Kiwi.
W = np.array([[10.0, -10.0], [-10.0, 10.0]])


def _rule(min_probability: float = 0.5) -> AnswerRule:
    spec = studio_check_spec(["Apple Granny Smith", "Kiwi"], W, np.zeros(2), min_probability)
    return AnswerRule(LABELS, FAMILIES, studio_check=spec)


def _answer(rule: AnswerRule, probs, features):
    probs = np.array([probs], float)
    return decide(probs, np.log(probs), np.array([features], float), rule)


def test_a_family_without_real_photos_named_by_the_studio_probe_is_the_answer():
    # The model answers its real-photo class "Apple (family)"; the studio probe sees a kiwi.
    a = _answer(_rule(), [0.1, 0.1, 0.8], [0.0, 1.0])
    assert (a.prediction, a.family) == (["Kiwi"], ["Kiwi"])
    assert a.family_probability[0] > 0.99 and not a.unknown[0]


def test_the_studio_probe_never_overrides_with_a_family_that_has_real_photos():
    # The model answers Kiwi; the studio probe says apple, but Apple has real photos: the model knows better.
    a = _answer(_rule(), [0.1, 0.8, 0.1], [1.0, 0.0])
    assert (a.prediction, a.family) == (["Kiwi"], ["Kiwi"])


def test_a_hesitant_studio_probe_changes_nothing():
    features = [0.0, 0.02]  # the probe: Kiwi at 0.6
    assert _answer(_rule(0.5), [0.1, 0.1, 0.8], features).family == ["Kiwi"]
    a = _answer(_rule(0.7), [0.1, 0.1, 0.8], features)
    assert (a.prediction, a.family) == (["Apple Granny Smith"], ["Apple"])


def test_the_studio_check_survives_the_rule_json_and_a_broken_one_is_refused():
    rule = AnswerRule.from_json(_rule().to_json())
    assert _answer(rule, [0.1, 0.1, 0.8], [0.0, 1.0]).family == ["Kiwi"]
    spec = _rule().studio_check | {"labels": ["Apple Granny Smith", "Kiwi", "Banana"]}
    with pytest.raises((ValueError, KeyError)):
        AnswerRule(LABELS, FAMILIES, studio_check=spec)


def _probe_probs(kiwi: list[float]) -> np.ndarray:
    """The studio probe's probabilities (Granny Smith, Kiwi) on real apple photos, Kiwi at ``kiwi``."""
    k = np.array(kiwi, float)
    return np.stack([1 - k, k], axis=1)


def test_the_threshold_rises_until_few_real_training_photos_would_be_overridden():
    fams, truth = ["Apple", "Kiwi"], ["Apple"] * 100
    # 3 of 100 real apples look like kiwis to the probe (0.85, 0.9, 0.95): a 2 % share allows two of them
    kiwi = [0.1] * 97 + [0.85, 0.9, 0.95]
    tau = studio_check_threshold(_probe_probs(kiwi), fams, truth, {"Apple"}, 0.8, 0.02)
    assert 0.85 < tau <= 0.9
    assert sum(k >= tau for k in kiwi) == 2
    # none is confidently wrong: the floor stands
    assert studio_check_threshold(_probe_probs([0.1] * 100), fams, truth, {"Apple"}, 0.8, 0.02) == 0.8
    # a family with real photos is never an override, so never counts
    assert studio_check_threshold(_probe_probs(kiwi), fams, truth, {"Apple", "Kiwi"}, 0.8, 0.02) == 0.8


def test_a_probe_sure_of_the_wrong_family_on_many_real_photos_is_switched_off():
    # a 10-class studio sample: a third of the real apples "are" kiwis, at probability 1
    kiwi = [0.1] * 60 + [1.0] * 40
    assert studio_check_threshold(_probe_probs(kiwi), ["Apple", "Kiwi"], ["Apple"] * 100, {"Apple"}, 0.8, 0.02) > 1
