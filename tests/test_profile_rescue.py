"""A family-level answer the profile check refused is given anyway when the classifier is sure of it
(answer.rule ``profile_rescue_energy``): shop photos of a known family taken on another visit."""

from __future__ import annotations

import numpy as np
import pandas as pd

from canestra.answer.rule import AnswerRule, decide
from canestra.pipeline import evaluation

LABELS = ["Apple (family)", "Apple Red 1", "Kiwi"]
FAMILIES = ["Apple", "Apple", "Kiwi"]


def _rule(rescue: float | None) -> AnswerRule:
    # A profile no photo can match (mass >= 2): the check refuses every "Apple (family)" answer.
    return AnswerRule(LABELS, FAMILIES, imagenet_classes=list(range(1000)), profiles={"Apple (family)": [0]},
                      profile_thresholds={"Apple (family)": 2.0}, profile_rescue_energy=rescue)


def _answer(rule: AnswerRule, apple: float, energy_shift: float = 0.0):
    probs = np.array([[apple, (1 - apple) * 0.6, (1 - apple) * 0.4]])
    margins = np.log(probs) + energy_shift  # energy = log-sum-exp(margins) = energy_shift
    return decide(probs, margins, np.zeros((1, 1280)), rule)


def test_a_sure_family_answer_passes_a_failed_profile_check():
    assert _answer(_rule(None), 0.95, 20.0).prediction == ["unknown"]
    a = _answer(_rule(15.0), 0.95, 20.0)
    assert (a.prediction, a.family, bool(a.unknown[0])) == (["Apple Red 1"], ["Apple"], False)


def test_an_unsure_or_low_energy_answer_is_still_refused():
    assert _answer(_rule(15.0), 0.5, 20.0).prediction == ["unknown"]  # family probability 0.8 < 0.9
    assert _answer(_rule(15.0), 0.95, 10.0).prediction == ["unknown"]  # energy below the rescue's


def test_the_rescue_survives_the_rule_json():
    rule = AnswerRule.from_json(_rule(15.0).to_json())
    assert rule.profile_rescue_energy == 15.0 and _answer(rule, 0.95, 20.0).family == ["Apple"]


def test_the_rescue_energy_is_a_quantile_of_the_held_out_family_photos_only():
    rows = pd.DataFrame({
        "label": ["Apple (family)"] * 4 + ["Kiwi"] * 2 + ["(none of the families)"],
        "energy": [10.0, 20.0, 30.0, 40.0, -100.0, -100.0, -100.0],
        "predicted_label": ["unknown", "Apple", "unknown", "unknown", "Kiwi", "Kiwi", "unknown"],
        "family_probability": [0.95, 0.99, 0.95, 0.5, 0.9, 0.9, 0.99],
    })
    energy = evaluation.profile_rescue(rows)
    assert energy == np.quantile([10.0, 20.0, 30.0, 40.0], 0.25)  # studio and "none" rows never set it
    assert evaluation.rescued(rows, energy).tolist() == [False, False, True, False, False, False, False]
    assert evaluation.profile_rescue(rows[rows["label"] == "Kiwi"]) is None


def test_the_held_out_report_states_the_rescue_only_when_the_model_has_one():
    from canestra.answer.taxonomy import load_taxonomy

    rows = pd.DataFrame({
        "image_id": ["a", "b"], "label": ["Apple (family)", "Apple Red 1"], "family": ["Apple", "Apple"],
        "predicted_label": ["Apple (family)", "Apple Red 1"], "predicted_probability": [0.9, 0.9],
        "family_probability": [0.9, 0.9], "energy": [20.0, 20.0], "fruitness": [0.9, 0.9],
    })
    tax = load_taxonomy(None)

    def rule_text(rescue):
        return evaluation.held_out_report(rows, tax, 0.005, None, 0.1, energy=False, rescue=rescue)["unknown"]["rule"]

    assert "sure of it" not in rule_text(None) and "profile check" in rule_text(None)
    assert "energy >= 17.25" in rule_text(17.25)
