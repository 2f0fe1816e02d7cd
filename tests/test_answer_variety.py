"""The variety an answer names belongs to the family it answers (answer.rule.decide)."""

from __future__ import annotations

import numpy as np

from canestra.answer.rule import AnswerRule, decide

LABELS = ["Apple (family)", "Apple Red 1", "Cabbage (family)", "Pear Red"]
FAMILIES = ["Apple", "Apple", "Cabbage", "Pear"]


def _answer(probs):
    probs = np.array([probs], float)
    return decide(probs, np.log(probs), np.zeros((1, 1280)), AnswerRule(LABELS, FAMILIES))


def test_a_family_level_win_names_a_variety_of_that_family_not_the_likeliest_variety_overall():
    # A real apple photo: "Apple (family)" wins; the studio variety with the most probability is a pear.
    a = _answer([0.7, 0.05, 0.05, 0.2])
    assert (a.prediction, a.family) == (["Apple Red 1"], ["Apple"])
    assert a.probability[0] == 0.05 and abs(a.family_probability[0] - 0.75) < 1e-9


def test_a_family_with_no_variety_is_named_by_its_family():
    a = _answer([0.05, 0.05, 0.7, 0.2])
    assert (a.prediction, a.family) == (["Cabbage"], ["Cabbage"])
    assert abs(a.probability[0] - 0.7) < 1e-9


def test_a_studio_answer_is_unchanged():
    a = _answer([0.05, 0.05, 0.1, 0.8])
    assert (a.prediction, a.family, a.probability[0]) == (["Pear Red"], ["Pear"], 0.8)
