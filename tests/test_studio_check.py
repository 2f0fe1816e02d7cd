"""The studio second opinion: a real photo of a family the model knows only from the studio is answered
with that family (or left alone) by a probe fitted on the studio frames only (answer.rule)."""

from __future__ import annotations

import numpy as np
import pytest

from canestra.answer.rule import AnswerRule, decide, studio_check_spec

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
