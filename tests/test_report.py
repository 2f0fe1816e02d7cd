"""canestra.pipeline.report: a self-contained, escaped, well-formed report.html."""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pytest

from canestra.pipeline import report
from canestra.pipeline.metrics import classification_metrics
from canestra.pipeline.report import render_report, write_report

SVG_NS = "{http://www.w3.org/2000/svg}"
XMLNS = 'xmlns="http://www.w3.org/2000/svg"'
WEIRD = 'Pear <Red> & "Co"'


def _metrics(n_classes: int = 114, seed: int = 0, k: int = 96) -> dict:
    rng = np.random.default_rng(seed)
    names = [f"Fruit {i:03d}" for i in range(n_classes - 1)] + [WEIRD]
    counts = []
    for t in names:
        n = int(rng.integers(20, 120))
        wrong = int(rng.binomial(n, 0.08))
        counts.append((t, t, n - wrong))
        for j in rng.integers(0, n_classes, size=wrong):
            counts.append((t, names[int(j)], 1))
    m = classification_metrics(counts, classes=names)
    ratios = np.exp(-np.arange(k) / 15.0)
    ratios = ratios / ratios.sum() * 0.87
    m.update({
        "created_at": "2025-01-01T00:00:00+00:00",
        "canestra_version": "0.1.0",
        "pca": {"k": k, "input_dim": 1280, "explained_variance": float(ratios.sum()),
                "explained_variance_ratio": ratios.tolist()},
        "counts": {"images": 90000, "train": 67000, "test": m["n"], "quarantined": 2, "classes": n_classes},
        "timings_s": {"ingest": 10.5, "featurize": 600.25, "fit": 80.0, "evaluate": 12.0, "total": 703.0},
        "split": {"method": "blocks", "test_fraction": 0.25, "seed": 42, "block_size": 8},
        "model": {"backbone": "efficientnet_lite0 <onnx>", "image_size": 224, "classifier": "logistic regression"},
    })
    json.dumps(m, allow_nan=False)
    return m


@pytest.fixture(scope="module")
def big() -> dict:
    return _metrics()


@pytest.fixture(scope="module")
def page(big) -> str:
    return render_report(big)


def _svgs(page: str) -> list[ET.Element]:
    frags = re.findall(r"<svg\b.*?</svg>", page, flags=re.S)
    return [ET.fromstring(f) for f in frags]


class _StrictParser(HTMLParser):
    VOID = {"meta", "br", "hr", "img", "input", "link", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}>, open: {self.stack[-3:]}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def test_page_is_well_formed(page):
    assert page.startswith("<!DOCTYPE html>")
    p = _StrictParser()
    p.feed(page)
    p.close()
    assert p.errors == [] and p.stack == []
    # The whole document is also well-formed XML (so is every SVG fragment).
    root = ET.fromstring(page.split("\n", 1)[1])
    assert root.tag == "html"
    svgs = _svgs(page)
    assert len(svgs) >= 3  # confusion matrix, its legend, PCA plot
    assert all(s.tag == SVG_NS + "svg" for s in svgs)


def test_no_external_resources_or_scripts(page):
    stripped = page.replace(XMLNS, "")
    low = stripped.lower()
    for bad in ("http://", "https://", "<script", "<link", "<iframe", "<img", "@import", "url(", "src=", "href="):
        assert bad not in low, bad
    assert not re.search(r"\son[a-z]+\s*=", low), "no inline event handlers"


def test_class_names_are_escaped(big, page):
    assert "Pear <Red>" not in page
    assert html.escape(WEIRD, quote=True) in page
    for c in big["per_class"]:
        assert html.escape(c, quote=True) in page
    # and they read back as the original text
    p = _StrictParser()
    p.feed(page)
    assert WEIRD in "".join(p.text)


def test_confusion_matrix_svg(big, page):
    labels = big["confusion_matrix"]["labels"]
    matrix = big["confusion_matrix"]["matrix"]
    cm_svg = _svgs(page)[0]
    assert int(cm_svg.get("width")) <= 1110  # 114 classes still fit the page width
    cells = [r for r in cm_svg.iter(SVG_NS + "rect") if r.find(SVG_NS + "title") is not None]
    nonzero = [(i, j) for i, row in enumerate(matrix) for j, v in enumerate(row) if v]
    assert len(cells) == len(nonzero)
    titles = {r.find(SVG_NS + "title").text for r in cells}
    i, j = next((i, j) for i, j in nonzero if i != j)
    assert any(t.startswith(f"{labels[i]} → {labels[j]}: {matrix[i][j]}") for t in titles)
    w = labels.index(WEIRD)
    assert any(t.startswith(f"{WEIRD} → {WEIRD}: {matrix[w][w]}") for t in titles)
    # diagonal (green) and off-diagonal (red) cells use distinct colour scales
    size = float(cells[0].get("width"))
    x0 = min(float(r.get("x")) for r in cells)
    y0 = min(float(r.get("y")) for r in cells)
    diag, off = set(), set()
    for r in cells:
        (diag if round((float(r.get("x")) - x0) / size) == round((float(r.get("y")) - y0) / size) else off).add(r.get("fill"))
    assert diag and off and not diag & off
    # every class is labelled on both axes
    texts = [t for t in cm_svg.iter(SVG_NS + "text")]
    assert sum(1 for t in texts if (t.text or "") == WEIRD) == 2
    assert any("rotate(-90)" in (t.get("transform") or "") for t in texts)


def test_cell_size_adapts_to_class_count():
    small = _svgs(render_report(_metrics(n_classes=4, k=5)))[0]
    big = _svgs(render_report(_metrics(n_classes=114)))[0]

    def cell(svg):
        return float(next(r for r in svg.iter(SVG_NS + "rect") if r.find(SVG_NS + "title") is not None).get("width"))

    assert cell(small) > cell(big) >= 8


def test_pca_plot(big, page):
    pca_svg = next(s for s in _svgs(page) if "PCA" in (s.get("aria-label") or ""))
    k = big["pca"]["k"]
    bars = [r for r in pca_svg.iter(SVG_NS + "rect") if (r.findtext(SVG_NS + "title") or "").startswith("component")]
    assert len(bars) == k
    assert pca_svg.find(SVG_NS + "polyline") is not None
    assert any(ln.get("stroke-dasharray") for ln in pca_svg.iter(SVG_NS + "line"))
    labels = [t.text or "" for t in pca_svg.iter(SVG_NS + "text")]
    assert {"0%", "20%", "100%"} <= set(labels)
    assert str(k) in labels  # x tick at the last component
    assert f"{big['pca']['explained_variance'] * 100:.1f}%" in " ".join(labels)


def test_sections_and_order(big, page):
    for heading in ("Confusion matrix", "PCA explained variance", "Per class", "Top confusions", "Stage timings",
                    "Split", "Model", "Counts"):
        assert f"<h2>{heading}</h2>" in page
    assert f"{big['accuracy'] * 100:.2f}%" in page
    assert f"{big['macro_f1']:.4f}" in page
    assert "efficientnet_lite0 &lt;onnx&gt;" in page
    # per-class table: worst F1 first
    per = big["per_class"]
    table = page[page.index("<h2>Per class</h2>"):page.index("<h2>Top confusions</h2>")]
    worst = min(per, key=lambda c: (per[c]["f1"], c))
    best = max(per, key=lambda c: (per[c]["f1"], c))
    assert table.index(f"<td>{html.escape(worst)}") < table.index(f"<td>{html.escape(best)}")
    top = big["top_confusions"][0]
    conf = page[page.index("<h2>Top confusions</h2>"):]
    assert f"<td>{html.escape(top['true'])}</td>" in conf and f">{top['count']}<" in conf


@pytest.mark.parametrize("metrics", [
    {},
    {"accuracy": 0.5},
    {"confusion_matrix": {"labels": ["a", "b"], "matrix": [[1]]}},  # malformed: skipped
    {"confusion_matrix": None, "per_class": {"a": {}}, "top_confusions": [{}], "pca": {"k": 3}},
    {"pca": {"explained_variance_ratio": [float("nan"), 0.2, -1]}, "timings_s": {"fit": None}},
    {"split": {"nested": {"a": [1, 2]}, "flag": True, "none": None}, "model": {"sizes": [100, 224]}},
    classification_metrics([]),
    classification_metrics([("only", "only", 1)]),
])
def test_renders_partial_or_odd_metrics(metrics):
    page = render_report(metrics)
    ET.fromstring(page.split("\n", 1)[1])
    assert "http://" not in page.replace(XMLNS, "")
    assert "NaN" not in page


def test_evaluation_report_without_pca():
    m = classification_metrics([("a", "a", 3), ("a", "b", 1), ("b", "b", 2)])
    m["counts"] = {"images": 6, "test": 6, "quarantined": 0}
    page = render_report(m)
    assert "evaluation report" in page and "PCA" not in page
    assert "<h2>Confusion matrix</h2>" in page
    assert ">3</text>" in page  # with few classes the counts are written in the cells


def test_write_report_atomic(tmp_path, big):
    out = tmp_path / "report.html"
    out.write_text("old", encoding="utf-8")
    write_report(big, out)
    assert out.read_text(encoding="utf-8") == render_report(big)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    write_report({}, str(out))  # str path, overwrite
    assert "canestra" in out.read_text(encoding="utf-8")
    assert not (tmp_path / "report.html.tmp").exists()


def test_write_report_failure_keeps_old_file_and_no_tmp(tmp_path, monkeypatch, big):
    out = tmp_path / "report.html"
    out.write_text("old", encoding="utf-8")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", boom)
    with pytest.raises(OSError):
        write_report(big, out)
    assert out.read_text(encoding="utf-8") == "old"
    assert sorted(os.listdir(tmp_path)) == ["report.html"]


# ----------------------------------------------------------------------------- families, unknown, shift, calibration, gallery

IDS = [hashlib.sha256(bytes([i])).hexdigest() for i in range(3)]  # pseudonymous image ids (64 hex)


def _new_metrics() -> dict:
    """metrics.json of a run with every key training adds for families, unknown, calibration and shift."""
    m = _metrics(n_classes=6, k=5)
    bins = [{"lo": i / 10, "hi": (i + 1) / 10, "n": n, "confidence": i / 10 + 0.05, "accuracy": a}
            for i, (n, a) in enumerate([(3, 0.33), (0, 0.0), (4, 0.25), (6, 0.5), (9, 0.44), (12, 0.58),
                                        (20, 0.65), (40, 0.78), (90, 0.86), (2552, 0.995)])]
    m.update({
        "n_train": 10944,
        "family": {"n": 2736, "accuracy": 0.995, "answered_accuracy": 0.99,
                   "per_family": {"Apple": {"n": 312, "accuracy": 0.99, "unknown": 0.003},
                                  WEIRD: {"n": 40, "accuracy": 0.875, "unknown": 0.025},
                                  "Kiwi": {"n": 0}}},
        "unknown": {"rule": "unknown when energy < t_e or fruitness < t_f (thresholds: 0.5 % quantile of held-out "
                            "images)",
                    "quantile": 0.005, "energy_threshold": 12.3, "fruitness_threshold": 0.41,
                    "coverage": 0.99, "risk": 0.004,
                    "curve": [{"quantile": q, "coverage": 1 - 2 * q, "risk": 0.006 * (1 - 5 * q)}
                              for q in (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)]},
        "calibration": {"bins": bins, "ece": 0.0043},
        "shift": {"perturbed_held_out": {"n": 2736, "accuracy": 0.94, "family_accuracy": 0.96, "unknown_rate": 0.05,
                                         "description": "held-out images under seeded lighting, colour, rotation, "
                                                        "scale, blur changes"},
                  "family_roots_held_out": {"n": 55, "family_accuracy": 0.96, "answered_family_accuracy": 0.93,
                                            "unknown_rate": 0.03}},
        "worst_errors": [
            {"image_id": IDS[0], "label": "Apple Red 1", "prediction": "Cherry 2", "probability": 0.97,
             "family": "Cherry", "thumbnail": f"gallery/{IDS[0]}.jpg"},
            {"image_id": IDS[1], "label": WEIRD, "prediction": "Pear 2", "probability": 0.91, "family": "Pear",
             "thumbnail": f"gallery/{IDS[1]}.jpg"},
            # a thumbnail pointing anywhere else is never linked: the link is built from the id
            {"image_id": IDS[2], "label": "Kiwi", "prediction": "Apple Red 1", "probability": 0.8,
             "family": "Apple", "thumbnail": "http://example.com/x.jpg\" onerror=\"alert(1)"},
        ],
    })
    json.dumps(m, allow_nan=False)
    return m


@pytest.fixture(scope="module")
def new_page() -> str:
    return render_report(_new_metrics())


def _section(page: str, title: str) -> str:
    start = page.index(f"<h2>{title}</h2>")
    end = page.find("<h2>", start + 1)
    return page[start:end if end > 0 else len(page)]


def test_new_sections_render(new_page):
    page = new_page
    for title in ("Evaluation under shift", "Families", "Unknown", "Calibration", "Worst errors"):
        assert f"<h2>{title}</h2>" in page
    # cards: training images, family accuracy, coverage, ECE
    assert '<span class="k">train images</span><span class="v">10,944</span>' in page
    assert '<span class="k">family accuracy</span><span class="v">99.50%</span>' in page
    assert '<span class="k">calibration error</span><span class="v">0.0043</span>' in page

    shift = _section(page, "Evaluation under shift")
    for row, n in (("held-out blocks", None), ("perturbed held-out", "2,736"), ("family-labelled photos", "55")):
        assert f"<tr><td>{row}</td>" in shift
        if n:
            assert f"<tr><td>{row}</td><td>{n}</td>" in shift
    assert "<td>94.0%</td>" in shift and "<td>93.0%</td>" in shift
    assert "seeded lighting, colour, rotation" in shift

    fam = _section(page, "Families")
    assert "<tr><td>Apple</td><td>312</td><td>99.0%" in fam and "<td>0.3%</td>" in fam
    assert f"<tr><td>{html.escape(WEIRD, quote=True)}</td><td>40</td><td>87.5%" in fam
    assert fam.index(html.escape(WEIRD, quote=True)) < fam.index("<td>Apple</td>"), "worst family first"
    assert '<tr class="absent"><td>Kiwi</td>' in fam, "a family without held-out images is greyed"

    unk = _section(page, "Unknown")
    assert "unknown when energy &lt; t_e or fruitness &lt; t_f" in unk
    assert "12.3" in unk and "0.41" in unk and "99.00%" in unk and "0.40%" in unk
    (curve,) = [s for s in _svgs(unk) if s.get("aria-label") == "coverage against risk"]
    assert len([c for c in curve.iter(SVG_NS + "circle") if c.find(SVG_NS + "title") is not None]) == 7
    assert curve.find(SVG_NS + "polyline") is not None
    assert any("chosen: coverage 99.0%" in (t.text or "") for t in curve.iter(SVG_NS + "text"))

    cal = _section(page, "Calibration")
    assert "ECE" in cal and "<b>0.0043</b>" in cal
    (diagram,) = [s for s in _svgs(cal) if s.get("aria-label") == "reliability diagram"]
    bars = [r for r in diagram.iter(SVG_NS + "rect") if r.get("fill") == report._BAR
            and r.find(SVG_NS + "title") is not None]
    assert len(bars) == 9, "one accuracy bar per non-empty bin"
    assert any(ln.get("stroke-dasharray") and ln.get("x1") != ln.get("x2") and ln.get("y1") != ln.get("y2")
               for ln in diagram.iter(SVG_NS + "line")), "the diagonal"

    worst = _section(page, "Worst errors")
    assert f'<img src="gallery/{IDS[0]}.jpg" width="96" height="96" alt=""/>' in worst
    assert f'<img src="gallery/{IDS[2]}.jpg"' in worst, "link built from the id, not the odd thumbnail value"
    assert f"<code title=\"{IDS[0]}\">{IDS[0][:12]}</code>" in worst
    assert "Apple Red 1 → Cherry 2" in worst and "probability 97.0%" in worst
    assert f"{html.escape(WEIRD, quote=True)} → Pear 2" in worst and WEIRD not in worst


def test_new_page_is_well_formed_and_links_only_its_thumbnails(new_page):
    p = _StrictParser()
    p.feed(new_page)
    p.close()
    assert p.errors == [] and p.stack == []
    ET.fromstring(new_page.split("\n", 1)[1])
    assert all(s.tag == SVG_NS + "svg" for s in _svgs(new_page))
    low = new_page.replace(XMLNS, "").lower()
    for bad in ("http://", "https://", "<script", "<link", "<iframe", "@import", "url(", "href=", "onerror"):
        assert bad not in low, bad
    srcs = re.findall(r'src="([^"]*)"', new_page)
    assert srcs == [f"gallery/{i}.jpg" for i in IDS]
    assert len(re.findall(r"<img\b", new_page)) == len(srcs)


def test_old_metrics_render_without_the_new_sections(page):
    for title in ("Evaluation under shift", "Families", "Unknown", "Calibration", "Worst errors"):
        assert f"<h2>{title}</h2>" not in page
    assert "train images" not in page and "67,000 train" in page  # the old card keeps counts.train


def test_absent_family_photos_and_no_errors():
    m = _new_metrics()
    m["shift"]["family_roots_held_out"] = None
    m["worst_errors"] = []
    page = render_report(m)
    assert '<tr class="absent"><td>family-labelled photos <span class="small">(none in this run)</span>' in page
    assert "No misclassified held-out image to show." in _section(page, "Worst errors")
    assert "<img" not in page and "src=" not in page
    ET.fromstring(page.split("\n", 1)[1])


@pytest.mark.parametrize("odd", [
    {"n_train": "lots", "family": None, "unknown": None, "calibration": None, "shift": None, "worst_errors": None},
    {"family": {"per_family": {"A": None, "B": {"n": "x", "accuracy": float("nan")}}}, "shift": {}},
    {"family": {"accuracy": "high"}, "unknown": {"curve": [None, {"coverage": "x"}, {"coverage": 1.0, "risk": 0.0}]}},
    {"unknown": {"curve": [{"quantile": 0.01, "coverage": 0.5, "risk": 2.0}], "quantile": float("inf")}},
    {"calibration": {"bins": [{"lo": 2}, None, {"lo": 0.5, "hi": 0.4, "n": 3}, {"lo": 0, "hi": 1, "n": -5}],
                     "ece": float("nan")}},
    {"calibration": {"bins": [{"lo": 0.0, "hi": 1.0, "n": 7, "accuracy": "x"}]}},
    {"shift": {"perturbed_held_out": None, "family_roots_held_out": {"n": None}}},
    {"shift": {"perturbed_held_out": {"description": "<b>bold</b>", "accuracy": True}}},
    {"worst_errors": [None, 3, {}, {"image_id": "../../etc/passwd", "thumbnail": "../../etc/passwd"},
                      {"image_id": IDS[0].upper(), "label": None, "probability": "0.9"}]},
])
def test_new_keys_with_odd_values_never_crash(odd):
    page = render_report({**_metrics(n_classes=3, k=2), **odd})
    ET.fromstring(page.split("\n", 1)[1])
    assert "NaN" not in page and "inf%" not in page
    assert "<b>bold</b>" not in page
    assert re.findall(r'src="([^"]*)"', page) == []
