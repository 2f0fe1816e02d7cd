"""`train --unknown-images`: photos of none of the families train a class that is answered
`unknown` -- never a variety, never a family, never a threshold of the unknown rule."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from canestra.answer.rule import AnswerRule, decide
from canestra.answer.taxonomy import OTHER_LABEL, UNKNOWN, is_variety_label, load_taxonomy
from canestra.config import Settings
from canestra.pipeline import evaluation
from canestra.progress import Progress

CFG = dict(pca_k=16, image_sizes="100", max_iter=40, shift_eval=False)
SCENES = ("chelsea.png", "rocket.jpg", "astronaut.png", "coffee.png", "motorcycle_left.png", "coins.png",
          "camera.png", "brick.png", "hubble_deep_field.jpg", "text.png", "grass.png", "gravel.png")


def _crops(dst: Path, names, corners) -> Path:
    """Square crops of scikit-image's sample photos (no fruit in any of them)."""
    import skimage

    data = Path(skimage.__file__).parent / "data"
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        im = Image.open(data / name).convert("RGB")
        w, h = im.size
        s = int(min(w, h) * 0.7)
        for k, (fx, fy) in enumerate(corners):
            x, y = int((w - s) * fx), int((h - s) * fy)
            im.crop((x, y, x + s, y + s)).save(dst / f"{Path(name).stem}_{k}.png")
    return dst


def test_taxonomy_other_label_has_no_family():
    tax = load_taxonomy(None)
    assert tax.family(OTHER_LABEL) == ""
    assert not is_variety_label(OTHER_LABEL) and not is_variety_label("Apple (family)") and is_variety_label("Kiwi")


def test_rule_answers_unknown_when_the_other_class_wins():
    labels = ["Banana", "Kiwi", OTHER_LABEL]
    rule = AnswerRule(labels, load_taxonomy(None).families_of(labels))
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.4, 0.25, 0.35]])
    a = decide(probs, np.log(probs), np.zeros((3, 1280)), rule)
    assert a.prediction[0] == "Banana" and a.family[0] == "Banana"
    assert a.prediction[1] == UNKNOWN and a.family[1] == "" and a.unknown[1]
    # The "none" class is never named as a variety, and never in a family's sum.
    assert a.prediction[2] == "Banana" and a.family_probability[2] == pytest.approx(0.4)
    assert all(lb != OTHER_LABEL for lb in a.prediction)


def test_thresholds_ignore_unknown_image_rows():
    rows = pd.DataFrame({"label": ["Kiwi"] * 200 + [OTHER_LABEL] * 200,
                         "energy": np.r_[np.linspace(5, 10, 200), np.full(200, -50.0)],
                         "fruitness": np.r_[np.linspace(0.5, 1, 200), np.zeros(200)],
                         "predicted_label": ["Kiwi"] * 400, "family": ["Kiwi"] * 400})
    te, tf = evaluation.thresholds(rows, 0.05)
    only = evaluation.thresholds(rows.iloc[:200], 0.05)
    assert (te, tf) == only  # the non-fruit rows pull neither threshold down


def test_energy_threshold_only_for_models_without_real_photos():
    """Studio-only models keep the energy threshold; once family-labelled photos are trained it is off."""
    assert evaluation.energy_applies(["Kiwi", "Lemon", OTHER_LABEL])
    assert not evaluation.energy_applies(["Kiwi", "Apple (family)"])
    rows = pd.DataFrame({"label": ["Kiwi"] * 200, "energy": np.linspace(5, 10, 200),
                         "fruitness": np.linspace(0.5, 1, 200), "predicted_label": ["Kiwi"] * 200,
                         "family": ["Kiwi"] * 200})
    te, tf = evaluation.thresholds(rows, 0.05, energy=False)
    assert te is None and tf == evaluation.thresholds(rows, 0.05)[1]


@pytest.fixture(scope="module")
def trained(spark, tmp_path_factory, sample_dir):
    from canestra.pipeline.train import train

    base = tmp_path_factory.mktemp("unknown-images")
    # A folder layout (Scenes/...) and loose files both count: every image is "none of the families".
    other = _crops(base / "non-fruit" / "Scenes", SCENES, [(0, 0), (1, 1), (0, 1), (1, 0), (0.5, 0.5)])
    (other.parent / "loose.png").write_bytes((other / "rocket_0.png").read_bytes())
    log = io.StringIO()
    res = train(spark, str(sample_dir), str(base / "out"), Settings.load(**CFG), Progress(stream=log),
                unknown_images=[str(other.parent)])
    return res, log.getvalue(), base


def test_unknown_images_train_a_refusing_class(spark, trained, sample_dir):
    from canestra.answer.rule import AnswerRule
    from canestra.pipeline.predict import predict

    res, log, base = trained
    assert "none of the families" in log
    roots = res.metrics["roots"]
    assert [r["level"] for r in roots] == ["variety", "unknown"] and roots[1]["files"] == 12 * 5 + 1
    from pyspark.ml import PipelineModel

    model = PipelineModel.load(str(Path(res.out_dir) / "model"))
    rule = AnswerRule.from_json(model.stages[-1].getOrDefault("rule"))
    assert OTHER_LABEL in rule.labels and rule.families[rule.labels.index(OTHER_LABEL)] == ""
    # Variety metrics count fruit classes only.
    assert OTHER_LABEL not in (res.metrics.get("per_class") or {})

    # Unseen crops of the same kind of scenes: refused; the studio sample: still named.
    unseen = _crops(base / "unseen", SCENES, [(0.25, 0.75), (0.75, 0.25)])
    out = predict(spark, str(Path(res.out_dir) / "model"), str(unseen), str(base / "pred-other"),
                  Progress(quiet=True))
    rows = list(csv.DictReader(io.StringIO((Path(out.out_dir) / "predictions.csv").read_text())))
    refused = sum(r["prediction"] == UNKNOWN for r in rows) / len(rows)
    assert refused >= 0.9, rows
    out = predict(spark, str(Path(res.out_dir) / "model"), str(sample_dir), str(base / "pred-fruit"),
                  Progress(quiet=True))
    rows = list(csv.DictReader(io.StringIO((Path(out.out_dir) / "predictions.csv").read_text())))
    assert sum(r["prediction"] == UNKNOWN for r in rows) / len(rows) <= 0.05
    assert all(r["prediction"] != OTHER_LABEL and r["family"] != OTHER_LABEL for r in rows)


def test_unknown_images_root_must_hold_images(tmp_path, sample_dir):
    from canestra.errors import InputError
    from canestra.pipeline.ingest import list_roots

    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no files found"):
        list_roots([str(sample_dir)], True, load_taxonomy(None), [str(tmp_path / "empty")])
