"""report.html: one self-contained page (inline SVG + CSS; no script, no network).

``render_report`` takes the dict canestra writes to ``metrics.json`` and renders
whatever part of it is present; every key is optional. All text that comes from
the data (class names are folder names) is escaped. The output is also
well-formed XML, so it can be checked with any XML parser.

The only files the page refers to are the worst-error thumbnails that training
writes next to it, ``gallery/<image_id>.jpg`` (relative links, built from the
pseudonymous 64-hex image id only; any other ``thumbnail`` value is ignored).
``canestra erase`` deletes an erased image's thumbnail, drops its entry from
metrics.json and re-renders the page with ``write_report``.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any, TypeGuard

from canestra.layout import GALLERY

__all__ = ["write_report"]

# Colour ramps (ColorBrewer): green for the diagonal (correct share of the
# row = recall), red for off-diagonal cells (share of the row going there).
_GREENS = ("#e5f5e0", "#a1d99b", "#41ab5d", "#006d2c")
_REDS = ("#fde0d2", "#fc9272", "#de2d26", "#67000d")
_ERR_FULL = 0.5  # an off-diagonal cell with this share of its row gets the darkest red
_BAR, _LINE = "#9ecae1", "#08519c"
_GAP = "#de2d26"
_FONT = 'font-family="system-ui,Helvetica,Arial,sans-serif"'
_IMAGE_ID = re.compile(r"^[0-9a-f]{64}$")
_THUMBNAIL = re.compile(rf"^{GALLERY}/[0-9a-f]{{64}}\.jpg$")

_CSS = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;
color:#1d2430;background:#f4f6f8}
main{max-width:1180px;margin:0 auto;padding:16px 20px 40px}
h1{font-size:24px;margin:6px 0 2px}
h2{font-size:18px;margin:30px 0 6px}
p{margin:4px 0 10px}
.muted{color:#5f6b7a}
.small{font-size:12px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px;margin-top:14px}
.card{background:#fff;border-radius:10px;padding:10px 14px;box-shadow:0 1px 2px rgba(0,0,0,.12)}
.card .k{font-size:12px;color:#5f6b7a;text-transform:uppercase;letter-spacing:.03em}
.card .v{display:block;font-size:22px;font-weight:600;margin-top:2px}
.card .s{display:block;font-size:12px;color:#5f6b7a}
.panel{background:#fff;border-radius:10px;padding:10px;box-shadow:0 1px 2px rgba(0,0,0,.12);
overflow:auto;max-width:100%}
.panel svg{display:block}
.panel svg.fluid{width:100%;min-width:520px;max-width:760px;height:auto}
.tall{max-height:720px}
table{border-collapse:collapse;font-size:13px;width:100%}
th,td{padding:4px 10px;border-bottom:1px solid #e6e9ee;text-align:right;white-space:nowrap}
th{position:sticky;top:0;background:#fff;font-weight:600;color:#3b4656}
th:first-child,td:first-child{text-align:left;white-space:normal;min-width:9em;overflow-wrap:anywhere}
td.l,th.l{text-align:left}
table.kv td:first-child{white-space:nowrap;width:1%;min-width:0;color:#5f6b7a}
table.kv td{white-space:normal;overflow-wrap:anywhere}
.narrow{max-width:860px}
tr.absent td{color:#8a94a3}
.bar{display:inline-block;vertical-align:middle;height:8px;border-radius:2px;margin-left:8px;width:70px;
background:#e6e9ee;overflow:hidden}
.bar i{display:block;height:100%}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(280px,1fr));gap:14px}
.grid h2{margin-top:14px}
footer{margin-top:30px;font-size:12px;color:#8a94a3}
.panel svg.small{width:100%;max-width:560px;height:auto}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(176px,1fr));gap:10px}
.gallery figure{margin:0;background:#fff;border-radius:10px;padding:10px;box-shadow:0 1px 2px rgba(0,0,0,.12);
font-size:12px;overflow-wrap:anywhere}
.gallery img,.gallery .noimg{display:block;width:96px;height:96px;border-radius:4px;background:#e6e9ee;
margin-bottom:6px;object-fit:cover}
.gallery .noimg{color:#8a94a3;font-size:11px;text-align:center;line-height:96px}
.gallery code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;color:#5f6b7a}
.gallery .t{display:block;font-weight:600;margin-top:2px}
.gallery .p{display:block;color:#5f6b7a}
@media print{.tall{max-height:none}.gallery figure{box-shadow:none;border:1px solid #e6e9ee}.panel{box-shadow:none;border:1px solid #e6e9ee}}
@media (max-width:600px){main{padding:10px}h1{font-size:20px}.card .v{font-size:18px}th,td{padding:3px 6px}.bar{display:none}.cards{grid-template-columns:1fr 1fr}}
"""


# ----------------------------------------------------------------------------- helpers


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _num(x, default: float = 0.0) -> float:
    """A finite float, or ``default`` for anything missing, non-numeric or not finite."""
    if isinstance(x, bool):
        return float(x)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return default
    return v if math.isfinite(v) else default


def _int(x, default: int = 0) -> int:
    return int(_num(x, default))


def _pct(x, digits: int = 2) -> str:
    return f"{_num(x) * 100:.{digits}f}%"


def _is_num(x) -> TypeGuard[float]:
    """A finite number (bools excluded): the value is shown; anything else is "—"."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    return math.isfinite(x)


def _opt_pct(x, digits: int = 1) -> str:
    return _pct(x, digits) if _is_num(x) else "—"


def _opt_int(x) -> str:
    return f"{int(x):,}" if _is_num(x) else "—"


def _dict(x) -> dict:
    return x if isinstance(x, dict) else {}


def _mix(stops: Sequence[str], t: float) -> str:
    """Colour at ``t`` in [0, 1] along a piecewise-linear ramp of hex colours."""
    t = min(1.0, max(0.0, t)) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    f = t - i
    a, b = stops[i], stops[i + 1]
    rgb = [round(int(a[k:k + 2], 16) * (1 - f) + int(b[k:k + 2], 16) * f) for k in (1, 3, 5)]
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _dark(stops: Sequence[str], t: float) -> bool:
    c = _mix(stops, t)
    r, g, b = (int(c[k:k + 2], 16) for k in (1, 3, 5))
    return 0.299 * r + 0.587 * g + 0.114 * b < 140


def _err_t(share: float) -> float:
    return math.sqrt(min(1.0, share / _ERR_FULL))


def _short(label: str, limit: int = 32) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


def _seconds(s: float, compact: bool = False) -> str:
    if compact and s >= 59.95:
        m, sec = divmod(int(round(s)), 60)
        return f"{m}m\u00a0{sec:02d}s" if m < 60 else f"{m // 60}h\u00a0{m % 60:02d}m"
    if s < 59.95:
        return f"{s:.1f}\u00a0s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}\u00a0min {sec:02d}\u00a0s"
    h, m = divmod(m, 60)
    return f"{h}\u00a0h {m:02d}\u00a0min"


def _value(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower() if v is not None else "—"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


def _nice(x: float) -> float:
    """The smallest 1/2/2.5/5 x 10^n that is >= x (x > 0)."""
    p = 10 ** math.floor(math.log10(x))
    for m in (1, 2, 2.5, 5, 10):
        if m * p >= x * (1 - 1e-9):
            return m * p
    return 10 * p


# ----------------------------------------------------------------------------- confusion matrix


def _clean_matrix(cmx) -> tuple[list[str], list[list[int]]] | None:
    if not isinstance(cmx, dict):
        return None
    labels, matrix = cmx.get("labels"), cmx.get("matrix")
    if not isinstance(labels, list) or not isinstance(matrix, list) or not labels or len(matrix) != len(labels):
        return None
    n = len(labels)
    rows = []
    for row in matrix:
        if not isinstance(row, list) or len(row) != n:
            return None
        rows.append([max(0, _int(v)) for v in row])
    return [str(x) for x in labels], rows


def _confusion_svg(labels: list[str], matrix: list[list[int]]) -> str:
    n = len(labels)
    shown = [_short(s) for s in labels]
    longest = max(len(s) for s in shown)
    # Largest cell (8..30 px) for which the whole figure fits in ~1110 px (the page width);
    # below 8 px it scrolls rather than shrinking the labels further.
    cell, font, margin = 8, 7.5, 0
    for c in range(30, 7, -1):
        f = max(7.5, min(12.0, c * 0.85))
        m = int(f * 0.56 * longest) + 14
        cell, font, margin = c, f, m
        if m + 18 + n * c + 12 <= 1110:
            break
    top = margin + 18  # room for the "predicted" axis title
    left = margin + 18
    side = n * cell
    width, height = left + side + 12, top + side + 12
    show_counts = cell >= 22
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="system-ui,Helvetica,Arial,sans-serif" '
         f'font-size="{font:.1f}" role="img" aria-label="confusion matrix, {n} classes">']
    o.append(f'<rect x="{left}" y="{top}" width="{side}" height="{side}" fill="#fbfcfd"/>')
    # guide lines every 5 classes (darker every 10) to follow rows and columns
    step = 5 if n > 15 else 1
    for k in range(step, n, step):
        ink = "#d5dae1" if k % 10 == 0 or step == 1 else "#eceff3"
        p = k * cell
        o.append(f'<line x1="{left}" x2="{left + side}" y1="{top + p}" y2="{top + p}" stroke="{ink}" stroke-width="0.6"/>'
                 f'<line x1="{left + p}" x2="{left + p}" y1="{top}" y2="{top + side}" stroke="{ink}" stroke-width="0.6"/>')
    for i, row in enumerate(matrix):
        total = sum(row)
        if not total:
            continue
        for j, v in enumerate(row):
            if not v:
                continue
            share = v / total
            stops, t = (_GREENS, share) if i == j else (_REDS, _err_t(share))
            x, y = left + j * cell, top + i * cell
            o.append(f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{_mix(stops, t)}">'
                     f"<title>{_e(labels[i])} → {_e(labels[j])}: {v} ({share * 100:.1f}% of row)</title></rect>")
            if show_counts:
                fill = "#fff" if _dark(stops, t) else "#1d2430"
                o.append(f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + font * 0.35:.1f}" text-anchor="middle" '
                         f'fill="{fill}" font-size="{min(font, cell * 0.45):.1f}" pointer-events="none">{v}</text>')
    o.append(f'<rect x="{left}" y="{top}" width="{side}" height="{side}" fill="none" stroke="#9aa3ae"/>')
    o.append('<g fill="#2b3442">')
    for k, (lab, short) in enumerate(zip(labels, shown)):
        mid = k * cell + cell / 2 + font * 0.35
        tip = f"<title>{_e(lab)}</title>" if short != lab else ""
        o.append(f'<text x="{left - 4}" y="{top + mid:.1f}" text-anchor="end">{tip}{_e(short)}</text>')
        o.append(f'<text transform="translate({left + mid:.1f},{top - 4}) rotate(-90)">{tip}{_e(short)}</text>')
    o.append("</g>")
    o.append(f'<text x="{left + side / 2:.1f}" y="12" text-anchor="middle" font-size="12" font-weight="600" '
             f'fill="#3b4656">predicted →</text>')
    o.append(f'<text transform="translate(12,{top + side / 2:.1f}) rotate(-90)" text-anchor="middle" font-size="12" '
             f'font-weight="600" fill="#3b4656">← true</text>')
    o.append("</svg>")
    return "".join(o)


def _legend_svg() -> str:
    w, h, bw = 560, 44, 200
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
         f'font-family="system-ui,Helvetica,Arial,sans-serif" font-size="11" fill="#3b4656" role="img" '
         f'aria-label="colour legend">']
    for x0, stops, title, ticks in (
        (10, _GREENS, "correct (diagonal), share of the true class", [(0, "0%"), (0.5, "50%"), (1, "100%")]),
        (290, _REDS, "errors (off-diagonal), share of the true class",
         [(0, "0%"), (_err_t(0.05), "5%"), (_err_t(0.2), "20%"), (1, f"≥{_ERR_FULL * 100:.0f}%")]),
    ):
        o.append(f'<text x="{x0}" y="11">{_e(title)}</text>')
        steps = 40
        for s in range(steps):
            o.append(f'<rect x="{x0 + s * bw / steps:.1f}" y="16" width="{bw / steps + 0.4:.1f}" height="10" '
                     f'fill="{_mix(stops, (s + 0.5) / steps)}"/>')
        for t, lab in ticks:
            anchor = "start" if t == 0 else "end" if t == 1 else "middle"
            o.append(f'<text x="{x0 + t * bw:.1f}" y="39" text-anchor="{anchor}">{_e(lab)}</text>')
    o.append("</svg>")
    return "".join(o)


# ----------------------------------------------------------------------------- PCA spectrum


def _variance_svg(ratios: list[float], cumulative: float | None) -> str:
    k = len(ratios)
    w, h = 760, 320
    left, right, top, bottom = 56, 62, 34, 44
    pw, ph = w - left - right, h - top - bottom
    ymax_r = _nice(max(max(ratios), 1e-6) * 100 * 1.05)  # right axis (per component), in %
    bar = pw / k
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" class="fluid" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
         f'font-family="system-ui,Helvetica,Arial,sans-serif" font-size="11" fill="#3b4656" role="img" '
         f'aria-label="PCA explained variance">']
    # left axis: cumulative share 0..100 %, with grid lines
    for t in range(0, 101, 20):
        y = top + ph * (1 - t / 100)
        o.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e6e9ee"/>'
                 f'<line x1="{left - 4}" x2="{left}" y1="{y:.1f}" y2="{y:.1f}" stroke="#3b4656"/>'
                 f'<text x="{left - 7}" y="{y + 4:.1f}" text-anchor="end" fill="{_LINE}">{t}%</text>')
    # right axis: per-component share 0..ymax_r %
    for s in range(6):
        val = ymax_r * s / 5
        y = top + ph * (1 - s / 5)
        lab = f"{val:.3g}%"
        o.append(f'<line x1="{left + pw}" x2="{left + pw + 4}" y1="{y:.1f}" y2="{y:.1f}" stroke="#3b4656"/>'
                 f'<text x="{left + pw + 7}" y="{y + 4:.1f}" fill="#4a7fa8">{lab}</text>')
    # bars (right axis)
    for i, r in enumerate(ratios):
        bh = ph * min(1.0, r * 100 / ymax_r)
        x = left + i * bar
        gap = min(1.0, bar * 0.15)
        o.append(f'<rect x="{x + gap / 2:.2f}" y="{top + ph - bh:.2f}" width="{max(bar - gap, 0.6):.2f}" '
                 f'height="{bh:.2f}" fill="{_BAR}"><title>component {i + 1}: {r * 100:.2f}%</title></rect>')
    # cumulative line (left axis), from (0, 0%)
    cum, pts = 0.0, [f"{left},{top + ph}"]
    for i, r in enumerate(ratios):
        cum += r
        pts.append(f"{left + (i + 1) * bar:.2f},{top + ph * (1 - min(cum, 1.0)):.2f}")
    total = cumulative if cumulative is not None else cum
    o.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{_LINE}" stroke-width="2" '
             f'stroke-linejoin="round"/>')
    yc = top + ph * (1 - min(max(total, 0.0), 1.0))
    o.append(f'<line x1="{left}" x2="{left + pw}" y1="{yc:.1f}" y2="{yc:.1f}" stroke="{_LINE}" stroke-width="1.2" '
             f'stroke-dasharray="5 4"/>')
    ty = yc - 6 if yc - 6 > top + 10 else yc + 15
    o.append(f'<text x="{left + pw - 4}" y="{ty:.1f}" text-anchor="end" fill="{_LINE}" font-weight="600">'
             f"k = {k} keeps {total * 100:.1f}% of the variance</text>")
    # x axis with ticks at component numbers
    o.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" stroke="#3b4656"/>'
             f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}" stroke="#3b4656"/>'
             f'<line x1="{left + pw}" x2="{left + pw}" y1="{top}" y2="{top + ph}" stroke="#3b4656"/>')
    step = max(1, int(_nice(k / 8)))
    ticks = sorted({1, *range(step, k + 1, step)})
    if k - ticks[-1] >= step / 2:
        ticks.append(k)
    for t in ticks:
        x = left + (t - 0.5) * bar
        o.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#3b4656"/>'
                 f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{t}</text>')
    o.append(f'<text x="{left + pw / 2:.1f}" y="{h - 6}" text-anchor="middle">principal component</text>')
    # legend
    o.append(f'<line x1="{left}" x2="{left + 22}" y1="14" y2="14" stroke="{_LINE}" stroke-width="2"/>'
             f'<text x="{left + 28}" y="18">cumulative share (left axis)</text>'
             f'<rect x="{left + 210}" y="8" width="14" height="11" fill="{_BAR}"/>'
             f'<text x="{left + 230}" y="18">share per component (right axis)</text>')
    o.append("</svg>")
    return "".join(o)


# ----------------------------------------------------------------------------- sections


def _cards(metrics: dict) -> str:
    counts = _dict(metrics.get("counts"))
    pca = _dict(metrics.get("pca"))
    per = _dict(metrics.get("per_class"))
    cards: list[tuple[str, str, str]] = []
    if "accuracy" in metrics:
        cards.append(("top-1 accuracy", _pct(metrics["accuracy"]), ""))
    if "macro_f1" in metrics:
        sub = f"weighted {_num(metrics['weighted_f1']):.4f}" if "weighted_f1" in metrics else ""
        cards.append(("macro-F1", f"{_num(metrics['macro_f1']):.4f}", sub))
    n_test = metrics.get("n", counts.get("test"))
    n_train = metrics.get("n_train")
    if n_test is not None:
        sub = f"{_int(counts['train']):,} train" if "train" in counts and not _is_num(n_train) else ""
        cards.append(("test images", f"{_int(n_test):,}", sub))
    if _is_num(n_train):
        cards.append(("train images", f"{int(n_train):,}", ""))
    family = _dict(metrics.get("family"))
    if _is_num(family.get("accuracy")):
        sub = (f"{_pct(family['answered_accuracy'])} when answered"
               if _is_num(family.get("answered_accuracy")) else "")
        cards.append(("family accuracy", _pct(family["accuracy"]), sub))
    unknown = _dict(metrics.get("unknown"))
    if _is_num(unknown.get("coverage")):
        sub = f"risk {_pct(unknown['risk'])}" if _is_num(unknown.get("risk")) else ""
        cards.append(("answered", _pct(unknown["coverage"], 1), sub))
    calibration = _dict(metrics.get("calibration"))
    if _is_num(calibration.get("ece")):
        cards.append(("calibration error", f"{calibration['ece']:.4f}", "ECE"))
    n_classes = counts.get("classes", len(per) if per else None)
    if n_classes is not None:
        cards.append(("classes", f"{_int(n_classes):,}", ""))
    if pca:
        dim = pca.get("input_dim")
        sub = (f"{_pct(pca['explained_variance'], 1)} of variance" if "explained_variance" in pca else "")
        cards.append(("PCA components", f"{pca.get('k', '?')}", (f"from {dim} · " if dim is not None else "") + sub))
    if "quarantined" in counts:
        cards.append(("quarantined", f"{_int(counts['quarantined']):,}", "unreadable files skipped"))
    timings = _dict(metrics.get("timings_s"))
    if "total" in timings:
        cards.append(("total time", _seconds(_num(timings["total"]), compact=True), ""))
    if not cards:
        return ""
    return '<div class="cards">' + "".join(
        f'<div class="card"><span class="k">{_e(k)}</span><span class="v">{_e(v)}</span>'
        + (f'<span class="s">{_e(s)}</span>' if s else "") + "</div>"
        for k, v, s in cards) + "</div>"


def _confusion_section(metrics: dict) -> str:
    cm = _clean_matrix(metrics.get("confusion_matrix"))
    if cm is None:
        return ""
    labels, matrix = cm
    return ("<h2>Confusion matrix</h2>"
            '<p class="muted">Rows: true class; columns: predicted class. Green: share of the class predicted '
            "correctly (recall); red: share of the class sent to another class. Hover a cell for its count.</p>"
            f'<div class="panel">{_confusion_svg(labels, matrix)}{_legend_svg()}</div>')


def _pca_section(metrics: dict) -> str:
    pca = metrics.get("pca")
    if not isinstance(pca, dict) or not pca:
        return ""
    raw = pca.get("explained_variance_ratio")
    ratios = [max(0.0, _num(r)) for r in raw] if isinstance(raw, (list, tuple)) else []
    cumulative = _num(pca["explained_variance"]) if "explained_variance" in pca else None
    dim = pca.get("input_dim")
    text = (f"{_e(dim)}-dimensional CNN features projected on " if dim is not None else "Projected on ") + \
        f"{_e(pca.get('k', len(ratios) or '?'))} principal components"
    if cumulative is not None:
        text += f", keeping {_pct(cumulative, 1)} of the variance"
    out = f'<h2>PCA explained variance</h2><p class="muted">{text}.</p>'
    if ratios:
        out += f'<div class="panel">{_variance_svg(ratios, cumulative)}</div>'
    return out


def _per_class_section(metrics: dict) -> str:
    per = metrics.get("per_class")
    if not isinstance(per, dict) or not per:
        return ""
    rows = []
    for c, v in per.items():
        v = v if isinstance(v, dict) else {}
        rows.append((str(c), _num(v.get("precision")), _num(v.get("recall")), _num(v.get("f1")), _int(v.get("support"))))
    rows.sort(key=lambda r: (r[4] == 0, r[3], r[0]))
    body = []
    for c, p, r, f, s in rows:
        colour = _mix(_REDS, 1 - f) if f < 0.9 else _mix(_GREENS, 0.35 + f * 0.5)
        cls = ' class="absent"' if s == 0 else ""
        note = ' <span class="small">(not in the test set)</span>' if s == 0 else ""
        body.append(f"<tr{cls}><td>{_e(c)}{note}</td><td>{p:.3f}</td><td>{r:.3f}</td>"
                    f'<td>{f:.3f}<span class="bar"><i style="width:{f * 100:.1f}%;background:{colour}"></i></span></td>'
                    f"<td>{s:,}</td></tr>")
    return ('<h2>Per class</h2><p class="muted">Worst F1 first. Precision is 0 for a class never predicted.</p>'
            '<div class="panel tall narrow"><table><thead><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th>'
            "<th>support</th></tr></thead><tbody>" + "".join(body) + "</tbody></table></div>")


def _confusions_section(metrics: dict) -> str:
    conf = metrics.get("top_confusions")
    if not isinstance(conf, list):
        return ""
    conf = [c for c in conf if isinstance(c, dict)]
    if not conf:
        return '<h2>Top confusions</h2><p class="muted">No misclassified test image.</p>' if "n" in metrics else ""
    per = _dict(metrics.get("per_class"))
    body = []
    for c in conf:
        t, p, n = str(c.get("true", "?")), str(c.get("predicted", "?")), _int(c.get("count"))
        sup = _int(_dict(per.get(t)).get("support"))
        share = f"{n / sup * 100:.1f}%" if sup else "—"
        body.append(f'<tr><td>{_e(t)}</td><td class="l">{_e(p)}</td><td>{n:,}</td><td>{share}</td></tr>')
    return ('<h2>Top confusions</h2><p class="muted">The largest off-diagonal cells of the confusion matrix.</p>'
            '<div class="panel narrow"><table><thead><tr><th>true class</th><th class="l">'
            "predicted as</th><th>images</th><th>of the true class</th></tr></thead><tbody>"
            + "".join(body) + "</tbody></table></div>")


def _timings_section(metrics: dict) -> str:
    t = metrics.get("timings_s")
    if not isinstance(t, dict) or not t:
        return ""
    stages = [(str(k), _num(v)) for k, v in t.items() if k != "total"]
    total = _num(t["total"]) if "total" in t else sum(s for _, s in stages)
    body = []
    for k, s in stages:
        share = s / total if total > 0 else 0.0
        body.append(f"<tr><td>{_e(k)}</td><td>{_e(_seconds(s))}</td><td>{share * 100:.1f}%"
                    f'<span class="bar"><i style="width:{min(share, 1) * 100:.1f}%;background:{_LINE}"></i>'
                    "</span></td></tr>")
    if "total" in t:
        body.append(f"<tr><td><b>total</b></td><td><b>{_e(_seconds(total))}</b></td><td></td></tr>")
    return ('<div><h2>Stage timings</h2><div class="panel"><table><thead><tr><th>stage</th><th>time</th>'
            "<th>share</th></tr></thead><tbody>" + "".join(body) + "</tbody></table></div></div>")


def _kv_section(title: str, d, thousands: bool = False) -> str:
    if not isinstance(d, dict) or not d:
        return ""
    def fmt(v):
        return f"{v:,}" if thousands and isinstance(v, int) and not isinstance(v, bool) else _value(v)

    rows = "".join(f'<tr><td>{_e(k)}</td><td class="l">{_e(fmt(v))}</td></tr>' for k, v in d.items())
    return f'<div><h2>{_e(title)}</h2><div class="panel"><table class="kv"><tbody>{rows}</tbody></table></div></div>'


# ----------------------------------------------------------------------------- robustness, unknown, calibration


def _shift_section(metrics: dict) -> str:
    shift = metrics.get("shift")
    if not isinstance(shift, dict) or not shift:
        return ""
    family = _dict(metrics.get("family"))
    unknown = _dict(metrics.get("unknown"))
    counts = _dict(metrics.get("counts"))
    n_held = metrics.get("n", counts.get("test", family.get("n")))
    coverage = unknown.get("coverage")
    held = {"n": n_held, "accuracy": metrics.get("accuracy"), "family_accuracy": family.get("accuracy"),
            "answered_family_accuracy": family.get("answered_accuracy"),
            "unknown_rate": 1 - coverage if _is_num(coverage) else None}
    rows: list[tuple[str, str, Any]] = [("held-out blocks", "the block-split test images", held)]
    pert = shift.get("perturbed_held_out")
    if isinstance(pert, dict) or "perturbed_held_out" in shift:
        rows.append(("perturbed held-out", "", pert))
    if "family_roots_held_out" in shift:
        rows.append(("family-labelled photos", "", shift.get("family_roots_held_out")))
    if len(rows) == 1:
        return ""
    body = []
    for name, _, block in rows:
        if not isinstance(block, dict):
            body.append(f'<tr class="absent"><td>{_e(name)} <span class="small">(none in this run)</span></td>'
                        + "<td>—</td>" * 5 + "</tr>")
            continue
        body.append(f"<tr><td>{_e(name)}</td><td>{_opt_int(block.get('n'))}</td>"
                    f"<td>{_opt_pct(block.get('accuracy'))}</td><td>{_opt_pct(block.get('family_accuracy'))}</td>"
                    f"<td>{_opt_pct(block.get('answered_family_accuracy'))}</td>"
                    f"<td>{_opt_pct(block.get('unknown_rate'))}</td></tr>")
    notes = ["<b>held-out blocks</b>: the test images of the block split"]
    desc = _dict(pert).get("description")
    notes.append("<b>perturbed held-out</b>: " + (_e(desc) if isinstance(desc, str) and desc
                                                   else "the held-out images under seeded changes"))
    if "family_roots_held_out" in shift:
        notes.append("<b>family-labelled photos</b>: held-out photos labelled only with their family, never "
                     "trained on (no variety accuracy); they share their training photos' sources, so photos from "
                     "other sources read lower (measured: by ~15-17 points): see “Other sources” with --eval-images")
    return ('<h2>Evaluation under shift</h2><p class="muted">The same model on the held-out images, on the same '
            "images perturbed, and on photos labelled by family. “Answered”: images not answered unknown.</p>"
            '<div class="panel narrow"><table><thead><tr><th>evaluation set</th><th>images</th>'
            "<th>variety accuracy</th><th>family accuracy</th><th>family accuracy, answered</th>"
            "<th>answered unknown</th></tr></thead><tbody>" + "".join(body) + "</tbody></table></div>"
            f'<p class="muted small">{"; ".join(notes)}.</p>')


def _families_section(metrics: dict) -> str:
    family = metrics.get("family")
    if not isinstance(family, dict) or not family:
        return ""
    facts = []
    if _is_num(family.get("n")):
        facts.append(f"{int(family['n']):,} held-out images")
    if _is_num(family.get("accuracy")):
        facts.append(f"family accuracy {_pct(family['accuracy'])}")
    if _is_num(family.get("answered_accuracy")):
        facts.append(f"{_pct(family['answered_accuracy'])} on the images not answered unknown")
    out = ('<h2>Families</h2><p class="muted">A prediction counts as right for its family when the predicted '
           "variety belongs to the true variety's family" + (": " + ", ".join(facts) if facts else "") + ".</p>")
    per = family.get("per_family")
    if not isinstance(per, dict) or not per:
        return out
    rows = []
    for name, v in per.items():
        v = _dict(v)
        rows.append((str(name), _int(v.get("n")), v.get("accuracy"), v.get("unknown")))
    rows.sort(key=lambda r: (r[1] == 0, _num(r[2], 2.0), r[0]))
    body = []
    for name, n, acc, unk in rows:
        cls = ' class="absent"' if n == 0 else ""
        bar = ""
        if _is_num(acc):
            a = min(1.0, max(0.0, acc))
            colour = _mix(_REDS, 1 - a) if a < 0.9 else _mix(_GREENS, 0.35 + a * 0.5)
            bar = f'<span class="bar"><i style="width:{a * 100:.1f}%;background:{colour}"></i></span>'
        body.append(f"<tr{cls}><td>{_e(name)}</td><td>{n:,}</td><td>{_opt_pct(acc)}{bar}</td>"
                    f"<td>{_opt_pct(unk)}</td></tr>")
    return (out + '<div class="panel tall narrow"><table><thead><tr><th>family</th><th>images</th>'
            "<th>accuracy</th><th>answered unknown</th></tr></thead><tbody>" + "".join(body)
            + "</tbody></table></div>")


def _share_cell(x, kind: str) -> str:
    """A share with its bar: ``good`` (top-1: green when high), ``bad`` (errors: redder when high), else neutral."""
    if not _is_num(x):
        return "<td>—</td>"
    a = min(1.0, max(0.0, x))
    if kind == "good":
        colour = _mix(_REDS, 1 - a) if a < 0.9 else _mix(_GREENS, 0.35 + a * 0.5)
    elif kind == "bad":
        colour = _mix(_REDS, min(1.0, a * 2))
    else:
        colour = _BAR
    return f'<td>{_opt_pct(x)}<span class="bar"><i style="width:{a * 100:.1f}%;background:{colour}"></i></span></td>'


def _source_row(name_html: str, v: dict, note: str = "", cls: str = "") -> str:
    return (f"<tr{cls}><td>{name_html}{note}</td><td>{_int(v.get('n')):,}</td>"
            f"{_share_cell(v.get('family_top1'), 'good')}{_share_cell(v.get('unknown'), 'neutral')}"
            f"{_share_cell(v.get('confidently_wrong'), 'bad')}</tr>")


def _sources_section(metrics: dict) -> str:
    """``by_source``: the --eval-images roots, never trained on, one table each (all, then per family)."""
    sources = metrics.get("by_source")
    if not isinstance(sources, list):
        return ""
    sources = [s for s in sources if isinstance(s, dict)]
    if not sources:
        return ""
    out = ['<h2>Other sources (never trained on)</h2><p class="muted">Each <code>--eval-images</code> root, '
           "scored by the final model with its “unknown” rule, as <code>canestra predict</code> answers. "
           "Family top-1: the answered family is the true one (“unknown” counts wrong, except for a family the "
           "model does not know, where “unknown” is the right answer); confidently wrong: a wrong family "
           "answered. Images also in a training root are left out.</p>"]
    gap = _dict(metrics.get("by_source_gap"))
    if _is_num(gap.get("held_out_family_top1")) and _is_num(gap.get("by_source_mean_family_top1")):
        what = "real photos" if str(gap.get("held_out", "")).startswith("family") else "images"
        text = (f"held-out {what} read {_pct(gap['held_out_family_top1'], 1)} family top-1, these sources "
                f"{_pct(gap['by_source_mean_family_top1'], 1)} (mean of the roots)")
        out.append(f"<p><b>The held-out split flatters</b>: {_e(text)}; trust these figures.</p>" if gap.get("flatters")
                   else f'<p class="muted">{_e(text)}.</p>')
    head = "<th>images</th><th>family top-1</th><th>answered unknown</th><th>confidently wrong</th>"
    for s in sources:
        level = str(s.get("level", ""))
        variety = level == "variety"
        facts = [f"{level}-level" if level else "", f"{_int(s.get('n')):,} images"]
        left = _int(s.get("left_out_trained_on"))
        if left:
            facts.append(f"{left:,} left out (also in a training root)")
        if variety:
            facts.append(f"variety top-1 {_opt_pct(s.get('top1'))}")
        out.append(f'<p><b>{_e(s.get("name", "?"))}</b> <span class="muted">· '
                   + " · ".join(_e(f) for f in facts if f) + "</span></p>")
        body = [_source_row("<b>all</b>", s)]
        fams = _dict(s.get("families"))
        for name in sorted(fams, key=lambda f: (_num(_dict(fams[f]).get("family_top1"), 2.0), str(f))):
            v = _dict(fams[name])
            note = ("" if v.get("in_model", True) else
                    ' <span class="small">(not in the model: right when answered unknown)</span>')
            body.append(_source_row(_e(name), v, note, ' class="absent"' if _int(v.get("n")) == 0 else ""))
        out.append('<div class="panel narrow"><table><thead><tr><th>family</th>' + head + "</tr></thead><tbody>"
                   + "".join(body) + "</tbody></table></div>")
    return "".join(out)


def _axis_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = _nice((hi - lo) / n) if hi > lo else 1.0
    first = math.ceil(lo / step - 1e-9) * step
    out, t = [], first
    while t <= hi + step * 1e-6:
        out.append(round(t, 10))
        t += step
    return out


def _tick_pct(v: float) -> str:
    return f"{v * 100:.3g}%"


def _risk_curve_svg(points: list[tuple[float, float, float]], chosen: tuple[float, float, float] | None) -> str:
    """Risk (error rate of the answered images) against coverage (share answered), one point per quantile."""
    w, h = 560, 280
    left, right, top, bottom = 56, 18, 30, 44
    pw, ph = w - left - right, h - top - bottom
    covs = [c for _, c, _ in points]
    xmin = min(0.95, math.floor(min(covs) * 20 - 1e-9) / 20)
    xmin = max(0.0, xmin)
    ymax = _nice(max(max(r for _, _, r in points) * 1.1, 1e-3))

    def px(c: float) -> float:
        return left + pw * (min(max(c, xmin), 1.0) - xmin) / (1.0 - xmin)

    def py(r: float) -> float:
        return top + ph * (1 - min(max(r, 0.0), ymax) / ymax)

    o = [f'<svg xmlns="http://www.w3.org/2000/svg" class="small" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
         f'{_FONT} font-size="11" fill="#3b4656" role="img" aria-label="coverage against risk">']
    for t in _axis_ticks(0.0, ymax):
        y = py(t)
        o.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e6e9ee"/>'
                 f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_tick_pct(t)}</text>')
    for t in _axis_ticks(xmin, 1.0):
        x = px(t)
        o.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#3b4656"/>'
                 f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{_tick_pct(t)}</text>')
    o.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" stroke="#3b4656"/>'
             f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}" stroke="#3b4656"/>')
    pts = " ".join(f"{px(c):.1f},{py(r):.1f}" for _, c, r in sorted(points, key=lambda p: -p[1]))
    o.append(f'<polyline points="{pts}" fill="none" stroke="{_LINE}" stroke-width="2" stroke-linejoin="round"/>')
    for q, c, r in points:
        o.append(f'<circle cx="{px(c):.1f}" cy="{py(r):.1f}" r="3" fill="{_LINE}"><title>quantile {q * 100:.3g}%: '
                 f"coverage {c * 100:.2f}%, risk {r * 100:.2f}%</title></circle>")
    if chosen is not None:
        q, c, r = chosen
        x, y = px(c), py(r)
        anchor, dx = ("end", -9) if x > left + pw * 0.6 else ("start", 9)
        o.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="none" stroke="{_GAP}" stroke-width="2"/>'
                 f'<text x="{x + dx:.1f}" y="{max(y - 8, top + 10):.1f}" text-anchor="{anchor}" fill="{_GAP}" '
                 f'font-weight="600">chosen: coverage {c * 100:.1f}%, risk {r * 100:.2f}%</text>')
    o.append(f'<text x="{left + pw / 2:.1f}" y="{h - 6}" text-anchor="middle">coverage (share of images answered)'
             "</text>")
    o.append(f'<text x="{left}" y="16">risk (error rate of the answered images)</text>')
    o.append("</svg>")
    return "".join(o)


def _unknown_section(metrics: dict) -> str:
    unknown = metrics.get("unknown")
    if not isinstance(unknown, dict) or not unknown:
        return ""
    rule = unknown.get("rule")
    out = ['<h2>Unknown</h2><p class="muted">Images the model is not sure are a known fruit are answered '
           "“unknown” instead of a variety.</p>"]
    rows = []
    if isinstance(rule, str) and rule:
        rows.append(("rule", _e(rule)))
    if _is_num(unknown.get("quantile")):
        rows.append(("quantile", _e(_tick_pct(unknown["quantile"])) + " of the held-out images"))
    for key, name in (("energy_threshold", "energy threshold"), ("fruitness_threshold", "fruitness threshold")):
        if _is_num(unknown.get(key)):
            rows.append((name, _e(f"{unknown[key]:.6g}")))
    if _is_num(unknown.get("coverage")):
        rows.append(("coverage", _pct(unknown["coverage"]) + " of the held-out images answered"))
    if _is_num(unknown.get("risk")):
        rows.append(("risk", _pct(unknown["risk"]) + " of the answered held-out images wrong"))
    if rows:
        out.append('<div class="panel narrow"><table class="kv"><tbody>'
                   + "".join(f'<tr><td>{k}</td><td class="l">{v}</td></tr>' for k, v in rows)
                   + "</tbody></table></div>")
    curve = unknown.get("curve")
    points = []
    if isinstance(curve, list):
        for p in curve:
            p = _dict(p)
            q, c, r = p.get("quantile"), p.get("coverage"), p.get("risk")
            if _is_num(c) and _is_num(r):
                points.append((float(q) if _is_num(q) else 0.0, min(max(float(c), 0.0), 1.0),
                               max(float(r), 0.0)))
    if points:
        chosen = None
        if _is_num(unknown.get("quantile")):
            chosen = next((p for p in points if abs(p[0] - unknown["quantile"]) < 1e-9), None)
        if chosen is None and _is_num(unknown.get("coverage")) and _is_num(unknown.get("risk")):
            chosen = (_num(unknown.get("quantile")), min(max(unknown["coverage"], 0.0), 1.0),
                      max(unknown["risk"], 0.0))
        out.append('<p class="muted">Each point is one threshold quantile: answering fewer images (lower '
                   "coverage) leaves fewer errors among those answered (lower risk). Hover a point for its "
                   "quantile.</p>")
        out.append(f'<div class="panel narrow">{_risk_curve_svg(points, chosen)}</div>')
    return "".join(out)


def _clean_bins(raw) -> list[tuple[float, float, int, float | None, float]]:
    bins: list[tuple[float, float, int, float | None, float]] = []
    if not isinstance(raw, list):
        return bins
    for b in raw:
        b = _dict(b)
        lo, hi, acc = b.get("lo"), b.get("hi"), b.get("accuracy")
        if not (_is_num(lo) and _is_num(hi)) or not 0.0 <= lo < hi <= 1.0:
            continue
        n = max(0, _int(b.get("n")))
        conf = b.get("confidence")
        conf = min(max(float(conf), 0.0), 1.0) if _is_num(conf) else None
        bins.append((float(lo), float(hi), n, conf, min(max(float(acc), 0.0), 1.0) if _is_num(acc) else 0.0))
    return bins


def _reliability_svg(bins: list[tuple[float, float, int, float | None, float]]) -> str:
    w, h = 440, 400
    left, right, top, bottom = 56, 16, 40, 46
    pw, ph = w - left - right, h - top - bottom

    def px(v: float) -> float:
        return left + pw * v

    def py(v: float) -> float:
        return top + ph * (1 - v)

    o = [f'<svg xmlns="http://www.w3.org/2000/svg" class="small" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
         f'{_FONT} font-size="11" fill="#3b4656" role="img" aria-label="reliability diagram">']
    for t in range(0, 101, 20):
        v = t / 100
        o.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#e6e9ee"/>'
                 f'<text x="{left - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{t}%</text>'
                 f'<line x1="{px(v):.1f}" x2="{px(v):.1f}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#3b4656"/>'
                 f'<text x="{px(v):.1f}" y="{top + ph + 16}" text-anchor="middle">{t}%</text>')
    for lo, hi, n, conf, acc in bins:
        if not n:
            continue
        x, bw = px(lo) + 1, max(px(hi) - px(lo) - 2, 0.6)
        tip = (f"confidence {lo * 100:.0f}–{hi * 100:.0f}%: {n:,} images, "
               + (f"mean confidence {conf * 100:.1f}%, " if conf is not None else "") + f"accuracy {acc * 100:.1f}%")
        o.append(f'<rect x="{x:.1f}" y="{py(acc):.1f}" width="{bw:.1f}" height="{py(0) - py(acc):.1f}" '
                 f'fill="{_BAR}"><title>{_e(tip)}</title></rect>')
        if conf is not None and abs(conf - acc) > 1e-9:
            y0, y1 = py(max(conf, acc)), py(min(conf, acc))
            o.append(f'<rect x="{x:.1f}" y="{y0:.1f}" width="{bw:.1f}" height="{y1 - y0:.1f}" fill="{_GAP}" '
                     f'fill-opacity="0.3" stroke="{_GAP}" stroke-width="0.8"><title>{_e(tip)}</title></rect>')
        o.append(f'<text x="{x + bw / 2:.1f}" y="{py(acc) - 3:.1f}" text-anchor="middle" font-size="9" '
                 f'fill="#5f6b7a">{n:,}</text>')
    o.append(f'<line x1="{px(0)}" y1="{py(0)}" x2="{px(1)}" y2="{py(1)}" stroke="{_LINE}" stroke-width="1.2" '
             f'stroke-dasharray="5 4"/>')
    o.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" stroke="#3b4656"/>'
             f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}" stroke="#3b4656"/>')
    o.append(f'<text x="{left + pw / 2:.1f}" y="{h - 6}" text-anchor="middle">confidence (top probability)</text>'
             f'<text transform="translate(14,{top + ph / 2:.1f}) rotate(-90)" text-anchor="middle">accuracy</text>')
    o.append(f'<rect x="{left}" y="8" width="14" height="11" fill="{_BAR}"/>'
             f'<text x="{left + 19}" y="18">accuracy</text>'
             f'<rect x="{left + 86}" y="8" width="14" height="11" fill="{_GAP}" fill-opacity="0.3" stroke="{_GAP}" '
             f'stroke-width="0.8"/><text x="{left + 105}" y="18">gap to confidence</text>'
             f'<line x1="{left + 220}" x2="{left + 242}" y1="14" y2="14" stroke="{_LINE}" stroke-width="1.2" '
             f'stroke-dasharray="5 4"/><text x="{left + 247}" y="18">perfect calibration</text>')
    o.append("</svg>")
    return "".join(o)


def _calibration_section(metrics: dict) -> str:
    cal = metrics.get("calibration")
    if not isinstance(cal, dict) or not cal:
        return ""
    bins = _clean_bins(cal.get("bins"))
    ece = cal.get("ece")
    text = ("Held-out images grouped by the probability of their top prediction; a bar is the accuracy of its "
            "group, which for a calibrated model equals the group's mean confidence (the diagonal).")
    if _is_num(ece):
        text += (f" Expected calibration error (ECE): <b>{ece:.4f}</b>, the image-weighted mean gap between "
                 "confidence and accuracy.")
    out = f'<h2>Calibration</h2><p class="muted">{text}</p>'
    if any(n for _, _, n, _, _ in bins):
        out += f'<div class="panel narrow">{_reliability_svg(bins)}</div>'
    return out


# ----------------------------------------------------------------------------- worst errors


def _thumbnail(err: dict) -> str | None:
    """The relative link of an error's thumbnail: gallery/<64 hex>.jpg, never anything else."""
    thumb = err.get("thumbnail")
    if isinstance(thumb, str) and _THUMBNAIL.match(thumb):
        return thumb
    image_id = err.get("image_id")
    if isinstance(image_id, str) and _IMAGE_ID.match(image_id):
        return f"{GALLERY}/{image_id}.jpg"
    return None


def _worst_errors_section(metrics: dict) -> str:
    errs = metrics.get("worst_errors")
    if not isinstance(errs, list):
        return ""
    errs = [e for e in errs if isinstance(e, dict)]
    head = "<h2>Worst errors</h2>"
    if not errs:
        return head + '<p class="muted">No misclassified held-out image to show.</p>'
    figs = []
    for err in errs:
        image_id = err.get("image_id")
        short = str(image_id)[:12] if image_id is not None else "?"
        src = _thumbnail(err)
        img = (f'<img src="{_e(src)}" width="96" height="96" alt=""/>' if src
               else '<span class="noimg">no thumbnail</span>')
        label, pred = str(err.get("label", "?")), str(err.get("prediction", "?"))
        fam = err.get("family")
        fam = f" ({_e(fam)})" if isinstance(fam, str) and fam and fam != pred else ""
        prob = err.get("probability")
        p = f'<span class="p">probability {_pct(prob, 1)}</span>' if _is_num(prob) else ""
        title = f' title="{_e(image_id)}"' if isinstance(image_id, str) else ""
        figs.append(f"<figure>{img}<figcaption><code{title}>{_e(short)}</code>"
                    f'<span class="t">{_e(label)} → {_e(pred)}{fam}</span>{p}</figcaption></figure>')
    return (head + '<p class="muted">The held-out images misclassified with the highest probability: true variety → '
            "prediction. Ids are pseudonymous (SHA-256 of the pixels), shortened to 12 characters; thumbnails are in "
            f"{GALLERY}/ next to this report. <code>canestra erase</code> removes an image's thumbnail and entry.</p>"
            '<div class="gallery">' + "".join(figs) + "</div>")


def render_report(metrics: dict) -> str:
    """The full HTML document for ``metrics`` (the content of metrics.json); every key is optional."""
    if not isinstance(metrics, dict):
        metrics = {}
    counts = _dict(metrics.get("counts"))
    kind = "training" if isinstance(metrics.get("pca"), dict) or "train" in counts else "evaluation"
    sub = [x for x in (str(metrics.get("created_at", "") or ""),
                       f"canestra {metrics['canestra_version']}" if metrics.get("canestra_version") else "") if x]
    page_title = f"canestra {kind} report"
    if "accuracy" in metrics:
        page_title += f" — accuracy {_pct(metrics['accuracy'], 1)}"
    info = "".join(s for s in (
        _timings_section(metrics),
        _kv_section("Split", metrics.get("split")),
        _kv_section("Model", metrics.get("model")),
        _kv_section("Counts", metrics.get("counts"), thousands=True),
    ) if s)
    worst = _worst_errors_section(metrics)
    body = [
        "<main>",
        f"<h1>canestra — {kind} report</h1>",
        f'<p class="muted">{" · ".join(_e(s) for s in sub)}</p>' if sub else "",
        _cards(metrics),
        _shift_section(metrics),
        _sources_section(metrics),
        _families_section(metrics),
        _unknown_section(metrics),
        _calibration_section(metrics),
        _confusion_section(metrics),
        _pca_section(metrics),
        _per_class_section(metrics),
        _confusions_section(metrics),
        worst,
        f'<div class="grid">{info}</div>' if info else "",
        "<footer>Self-contained report written by canestra: no scripts, no network"
        + (f"; the thumbnails are the files in {GALLERY}/ next to it" if "<img " in worst else "") + ".</footer>",
        "</main>",
    ]
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"/>'
            '<meta name="viewport" content="width=device-width, initial-scale=1"/>'
            f"<title>{_e(page_title)}</title><style>{_CSS}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")


def write_report(metrics: dict, path: str | os.PathLike) -> None:
    """Render ``metrics`` and write it to ``path`` whole or not at all (local or s3://)."""
    from canestra.storage import files as storage

    text = render_report(metrics)  # render first: a rendering error leaves nothing behind
    storage.write_text_atomic(os.fspath(path), text)
