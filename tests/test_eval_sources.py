"""`train --eval-images`: roots never trained on, scored by the final model into metrics.json
`by_source` and report.html; their own table (erase reaches it), the training feature store (a
re-run embeds nothing), and plain errors for bad roots before any Spark work."""

from __future__ import annotations

import csv
import io
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from canestra.answer.taxonomy import load_taxonomy
from canestra.config import Settings
from canestra.errors import InputError
from canestra.layout import EVAL_CATALOG, EVAL_QUARANTINE_CSV, TRAINING_IDS
from canestra.pipeline import eval_sources
from canestra.pipeline.report import render_report
from canestra.progress import Progress

REAL = Path(__file__).resolve().parents[1] / "sample" / "real-photos"
# Small and fast: 100 px only, 8 PCA components, no perturbed re-featurization.
CFG = dict(pca_k=8, image_sizes="100", max_iter=20, shift_eval=False)
SECTION = "Other sources (never trained on)"


def _perturbed_copies(src: Path, dst: Path, n: int, seed: int) -> None:
    """``n`` seeded perturbations of the photos in ``src``: new pixels, so new image ids."""
    from canestra.pipeline.evaluation import perturb_jpeg

    dst.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(sorted(src.glob("*.jpg"))[:n]):
        (dst / f"{dst.name.lower()}_{i}.jpg").write_bytes(perturb_jpeg(path.read_bytes(), seed + i))


@pytest.fixture(scope="module")
def roots(tmp_path_factory, sample_dir) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("eval-roots")
    grocery = base / "grocery-val"  # family-level: Apple/Banana/Orange real photos + a family the model lacks
    for fam in ("Apple", "Banana", "Orange"):
        shutil.copytree(REAL / fam, grocery / fam)
    _perturbed_copies(sample_dir / "Lemon", grocery / "Lime", 5, seed=7)  # Lime: no class of the model
    (grocery / "Apple" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")  # quarantined, not counted
    veg = base / "other-veg"  # one folder, no family of the taxonomy: a variety-level root
    _perturbed_copies(sample_dir / "Cauliflower", veg / "Asparagus", 4, seed=11)
    return {"grocery": grocery, "veg": veg}


@pytest.fixture(scope="module")
def run(spark, tmp_path_factory, sample_dir, roots):
    from canestra.pipeline.train import train

    out = tmp_path_factory.mktemp("eval-run")
    log = io.StringIO()
    res = train(spark, str(sample_dir), str(out), Settings.load(**CFG), Progress(stream=log),
                eval_images=[str(roots["grocery"]), str(roots["veg"])])
    return res, log.getvalue()


def _predicted(spark, model: str, images: Path, out: Path) -> list[dict]:
    from canestra.pipeline.predict import predict

    res = predict(spark, model, str(images), str(out), Progress(quiet=True))
    return list(csv.DictReader(io.StringIO((Path(res.out_dir) / "predictions.csv").read_text(encoding="utf-8"))))


def _expected(rows: list[dict], model_families: set[str]) -> dict:
    """family_top1 / unknown / confidently_wrong from predict's answers (folder name = true family)."""
    unknown = [r["prediction"] == "unknown" for r in rows]
    right = [(u if r["label"] not in model_families else (not u and r["family"] == r["label"]))
             for r, u in zip(rows, unknown)]
    wrong = [not u and r["family"] != r["label"] for r, u in zip(rows, unknown)]
    n = len(rows)
    return {"n": n, "family_top1": sum(right) / n, "unknown": sum(unknown) / n, "confidently_wrong": sum(wrong) / n}


def test_each_root_is_scored_as_predict_answers(run, spark, tmp_path, roots):
    from canestra.pipeline.predict import load_model

    res, log = run
    out = Path(res.out_dir)
    by_source = res.metrics["by_source"]
    assert [s["name"] for s in by_source] == ["grocery-val", "other-veg"]  # the folders' names, in order
    assert [s["level"] for s in by_source] == ["family", "variety"]
    grocery, veg = by_source
    assert grocery["n"] == 18 + 5 and veg["n"] == 4  # the broken file is quarantined, not counted
    quarantine = (out / EVAL_QUARANTINE_CSV).read_text(encoding="utf-8")
    assert "broken.jpg" in quarantine

    model = str(out / "model")
    families = set(load_model(model).stages[-1].getRule().families)
    assert {"Apple", "Banana", "Orange"} <= families and not {"Lime", "Asparagus"} & families
    g_rows = _predicted(spark, model, roots["grocery"], tmp_path / "pg")
    v_rows = _predicted(spark, model, roots["veg"], tmp_path / "pv")
    for got, rows in ((grocery, g_rows), (veg, v_rows)):
        want = _expected(rows, families)
        assert got["n"] == want["n"]
        for key in ("family_top1", "unknown", "confidently_wrong"):
            assert got[key] == pytest.approx(want[key]), (got["name"], key)
    # Lime and Asparagus: the model knows neither, so only "unknown" is right.
    lime = grocery["families"]["Lime"]
    lime_rows = [r for r in g_rows if r["label"] == "Lime"]
    assert lime["n"] == 5 and lime["in_model"] is False
    assert lime["family_top1"] == pytest.approx(sum(r["prediction"] == "unknown" for r in lime_rows) / 5)
    assert lime["family_top1"] == pytest.approx(lime["unknown"])
    assert lime["family_top1"] + lime["confidently_wrong"] == pytest.approx(1.0)
    apple = grocery["families"]["Apple"]
    assert apple["n"] == 6 and apple["in_model"] is True
    assert apple["family_top1"] + apple["unknown"] + apple["confidently_wrong"] == pytest.approx(1.0)
    assert veg["top1"] == 0.0 and "top1" not in grocery  # variety top-1 only for variety-level roots

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["by_source"] == by_source
    assert "/" not in json.dumps([s["name"] for s in saved["by_source"]])  # no paths in shared outputs
    assert "grocery-val: family top-1 " in log and "confidently wrong" in log and "23 images" in log
    page = (out / "report.html").read_text(encoding="utf-8")
    assert SECTION in page and "grocery-val" in page and "not in the model" in page
    ET.fromstring(page.split("\n", 1)[1])  # still well-formed


def test_eval_images_are_never_trained_on_nor_held_out(run, sample_dir):
    res, _ = run
    out = Path(res.out_dir)
    eval_ids = set(pq.read_table(out / EVAL_CATALOG, columns=["image_id"])["image_id"].to_pylist())
    trained = set((out / "model" / TRAINING_IDS).read_text().split())
    catalog = set(pq.read_table(out / "catalog", columns=["image_id"])["image_id"].to_pylist())
    assert len(eval_ids) == 27 and trained and not eval_ids & trained and not eval_ids & catalog
    m = res.metrics
    n_sample = sum(1 for _ in sample_dir.rglob("*.jpg"))
    assert m["counts"]["images"] == m["n_train"] + m["n"] == n_sample  # the eval rows count in neither
    assert m["eval_counts"] == {"images": 27, "quarantined": 1}
    assert all(s["left_out_trained_on"] == 0 for s in m["by_source"])


def test_a_second_run_featurizes_nothing(run, spark, sample_dir, roots):
    from canestra.pipeline.train import train

    first, _ = run
    again = train(spark, str(sample_dir), first.out_dir, Settings.load(**CFG), Progress(quiet=True),
                  eval_images=[str(roots["grocery"]), str(roots["veg"])])
    m = again.metrics
    assert m["feature_store"]["featurized"] == 0 and m["eval_feature_store"]["featurized"] == 0
    assert m["eval_feature_store"]["reused"] == 27
    assert [s["n"] for s in m["by_source"]] == [23, 4]


def test_erase_reaches_the_eval_catalog(run, roots, tmp_path):
    from canestra.privacy.erase import erase

    res, _ = run
    out = tmp_path / "copy"
    shutil.copytree(res.out_dir, out)
    victim = roots["grocery"] / "Banana" / "banana_1.jpg"
    before = pq.read_table(out / EVAL_CATALOG, columns=["source_path"]).num_rows
    done = erase(str(out), sources=[str(victim)])
    assert done.rows_removed[EVAL_CATALOG] == 1
    left = pq.read_table(out / EVAL_CATALOG, columns=["source_path"])["source_path"].to_pylist()
    assert len(left) == before - 1 and str(victim) not in left
    assert not done.retrain  # never trained on: no model to retrain


def _evaluate_sources(spark, run, roots: list[Path], out: Path):
    """The step alone, with the module's model, into another folder (its own, empty feature store)."""
    from canestra.pipeline.predict import load_model
    from canestra.pipeline.train import make_featurizer

    res, _ = run
    st = Progress(quiet=True)
    with st.stage("evaluate sources") as stage:
        added, warning = eval_sources.evaluate_sources(
            spark, [str(r) for r in roots], str(out), make_featurizer(Settings.load(**CFG)),
            load_model(str(Path(res.out_dir) / "model")), str(Path(res.out_dir) / "catalog"), load_taxonomy(),
            res.metrics, stage)
    return added, stage.notes


def test_images_also_in_a_training_root_are_left_out(run, spark, tmp_path, sample_dir):
    ev = tmp_path / "dup-val"
    shutil.copytree(sample_dir / "Kiwi", ev / "Kiwi", ignore=lambda d, names: sorted(names)[3:])  # 3 trained on
    _perturbed_copies(sample_dir / "Kiwi", ev / "Kiwi", 2, seed=3)  # and 2 new photos
    added, notes = _evaluate_sources(spark, run, [ev], tmp_path / "out")
    (s,) = added["by_source"]
    assert (s["name"], s["level"], s["n"], s["left_out_trained_on"]) == ("dup-val", "variety", 2, 3)
    assert "3 images also in the training roots left out" in notes[0]


def test_no_usable_eval_image_still_ends_the_run(run, spark, tmp_path):
    ev = tmp_path / "junk-val"
    (ev / "Apple").mkdir(parents=True)
    (ev / "Apple" / "a.jpg").write_bytes(b"not an image")
    added, notes = _evaluate_sources(spark, run, [ev], tmp_path / "out")
    assert added["by_source"] == [{"name": "junk-val", "level": "family", "n": 0, "family_top1": None,
                                   "unknown": None, "confidently_wrong": None, "families": {},
                                   "left_out_trained_on": 0}]
    assert "is a usable image" in notes[0]
    assert SECTION in render_report(added)  # rendered, with its empty table


# ----------------------------------------------------------------------------- no Spark


def test_source_metrics_on_a_hand_made_frame():
    tax = load_taxonomy()
    rows = pd.DataFrame({
        "label": ["Apple (family)"] * 4 + ["Lime (family)"] * 2 + ["Banana (family)"],
        "predicted_label": ["Apple Granny Smith", "unknown", "Banana", "Apple Granny Smith", "unknown", "Lemon",
                            "Banana"],
        "family": ["Apple", "", "Banana", "Apple", None, "Lemon", "Banana"],
    })
    got = eval_sources.source_metrics(rows, tax, {"Apple", "Banana", "Lemon"}, "family")
    # right: 2 apples, the Lime answered unknown, the banana; unknown: 2; wrong: apple->Banana, lime->Lemon
    assert got["n"] == 7 and "top1" not in got
    assert got["family_top1"] == pytest.approx(4 / 7)
    assert got["unknown"] == pytest.approx(2 / 7) and got["confidently_wrong"] == pytest.approx(2 / 7)
    assert got["families"]["Apple"] == {"n": 4, "family_top1": 0.5, "unknown": 0.25, "confidently_wrong": 0.25,
                                        "in_model": True}
    assert got["families"]["Lime"] == {"n": 2, "family_top1": 0.5, "unknown": 0.5, "confidently_wrong": 0.5,
                                       "in_model": False}
    variety = eval_sources.source_metrics(
        pd.DataFrame({"label": ["Kiwi", "Kiwi"], "predicted_label": ["Kiwi", "Lemon"], "family": ["Kiwi", "Lemon"]}),
        tax, {"Kiwi", "Lemon"}, "variety")
    assert variety["top1"] == 0.5 and variety["family_top1"] == 0.5
    empty = eval_sources.source_metrics(rows.iloc[:0], tax, {"Apple"}, "variety")
    assert empty == {"level": "variety", "n": 0, "family_top1": None, "unknown": None, "confidently_wrong": None,
                     "families": {}, "top1": None}


def test_the_gap_warning_compares_like_with_like():
    by_source = [{"n": 10, "family_top1": 0.70}, {"n": 0, "family_top1": None}, {"n": 5, "family_top1": 0.80}]
    held = {"shift": {"family_roots_held_out": {"family_accuracy": 0.97, "answered_family_accuracy": 0.95}}}
    gap = eval_sources.source_gap(held, by_source)
    assert gap is not None and gap["flatters"] and gap["gap_points"] == pytest.approx(20.0)
    assert eval_sources.gap_warning(gap) == ("held-out real photos read 95.0%, other sources 75.0%: the held-out "
                                             "split flatters; trust by_source")
    close = eval_sources.source_gap({"family": {"answered_accuracy": 0.77}}, by_source)
    assert close is not None and not close["flatters"] and eval_sources.gap_warning(close) is None
    assert eval_sources.source_gap(held, [{"n": 0, "family_top1": None}]) is None


def test_the_report_section_only_with_by_source():
    assert SECTION not in render_report({"accuracy": 0.9, "n": 10})
    m = {"accuracy": 0.9, "n": 10, "by_source": [
        {"name": 'Pear <shop> & "Co"', "level": "family", "n": 3, "family_top1": 1 / 3, "unknown": 1 / 3,
         "confidently_wrong": 1 / 3, "left_out_trained_on": 2,
         "families": {"Lime": {"n": 3, "family_top1": 1 / 3, "unknown": 1 / 3, "confidently_wrong": 1 / 3,
                               "in_model": False}}}],
        "by_source_gap": {"held_out": "held-out images", "held_out_family_top1": 0.9,
                          "by_source_mean_family_top1": 1 / 3, "gap_points": 56.7, "flatters": True}}
    page = render_report(m)
    ET.fromstring(page.split("\n", 1)[1])
    assert SECTION in page and "Pear &lt;shop&gt; &amp; &quot;Co&quot;" in page
    assert "The held-out split flatters" in page and "2 left out" in page and "33.3%" in page


@pytest.mark.parametrize("case", ["missing", "no-folders", "training-root", "twice"])
def test_bad_roots_fail_in_one_line_before_spark(case, tmp_path, sample_dir, capsys):
    from canestra.cli import commands

    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "a.jpg").write_bytes(b"x")
    ev = {"missing": [str(tmp_path / "nope")], "no-folders": [str(loose)], "training-root": [str(sample_dir)],
          "twice": [str(REAL), str(REAL) + "/"]}[case]
    with pytest.raises(InputError) as err:
        eval_sources.check_eval_roots(ev, str(sample_dir), load_taxonomy())
    assert "\n" not in str(err.value)
    argv = ["train", "--images", str(sample_dir), "--out", str(tmp_path / "out"), "--quiet"]
    for e in ev:
        argv += ["--eval-images", e]
    assert commands.main(argv) == 2
    msg = capsys.readouterr().err.strip()
    assert msg.startswith("canestra: error: ") and "\n" not in msg and "--eval-images" in msg, msg
    assert not (tmp_path / "out" / "_logs").exists()  # no Spark was started
