"""canestra.report: a self-contained, escaped, well-formed report.html."""

from __future__ import annotations

import html
import json
import os
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pytest

from canestra import report
from canestra.metrics import classification_metrics
from canestra.report import render_report, write_report

SVG_NS = "{http://www.w3.org/2000/svg}"
XMLNS = 'xmlns="http://www.w3.org/2000/svg"'
WEIRD = 'Pear <Red> & "Co"'


def _metrics(n_classes: int = 114, seed: int = 0, k: int = 96) -> dict:
    rng = np.random.default_rng(seed)
    names = [f"Fruit {i:03d}" for i in range(n_classes - 1)] + [WEIRD]
    counts = []
    for i, t in enumerate(names):
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
