"""``canestra monitor --report FILE``: the drift score over time as one self-contained HTML page.

Inline SVG and CSS, no script, no network (as ``report.html`` of ``canestra train``); well-formed XML.
The chart plots, per window, each statistic's score divided by its threshold on a log scale: the
line at 1 is the threshold, windows with any statistic above it are shaded. A table lists every
window's scores.
"""

from __future__ import annotations

import html
import math
import os

from canestra.drift.monitor import DESCRIPTIONS, DriftReport
from canestra.drift.stats import STATISTICS

__all__ = ["render", "write_report"]

_COLOURS = {"pca_mean": "#08519c", "pca_spread": "#6baed6", "family_mix": "#31a354", "unknown_rate": "#756bb1",
            "energy": "#de2d26", "fruitness": "#fd8d3c"}
_FONT = 'font-family="system-ui,Helvetica,Arial,sans-serif"'
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d2430;
background:#f4f6f8}
main{max-width:1100px;margin:0 auto;padding:16px 20px 40px}
h1{font-size:24px;margin:6px 0 2px}
h2{font-size:18px;margin:28px 0 6px}
.muted{color:#5f6b7a}
.panel{background:#fff;border-radius:10px;padding:10px;box-shadow:0 1px 2px rgba(0,0,0,.12);overflow:auto}
.panel svg{display:block;width:100%;height:auto;min-width:560px}
table{border-collapse:collapse;font-size:13px;width:100%}
th,td{padding:4px 8px;border-bottom:1px solid #e6e9ee;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
tr.drift td{background:#fde0d2}
td.over{font-weight:600;color:#a50f15}
"""
_FLOOR = 0.01  # ratios below this are drawn at it (the log axis needs a bottom)


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _chart(report: DriftReport) -> str:
    wins = report.windows
    w, h, left, right, top, bottom = 880, 340, 56, 170, 16, 40
    pw, ph = w - left - right, h - top - bottom
    hi = max([2.0] + [win.ratio(s) for win in wins for s in STATISTICS])
    lo_log, hi_log = math.log10(_FLOOR), math.log10(hi * 1.1)

    def x(i: int) -> float:
        return left + (pw * (i + 0.5) / len(wins) if wins else 0)

    def y(r: float) -> float:
        v = math.log10(max(r, _FLOOR))
        return top + ph * (1 - (v - lo_log) / (hi_log - lo_log))

    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" {_FONT} '
         'font-size="12" role="img" aria-label="drift score over time">']
    step = pw / max(len(wins), 1)
    for i, win in enumerate(wins):  # flagged windows shaded
        if win.drift:
            o.append(f'<rect x="{left + i * step:.1f}" y="{top}" width="{step:.1f}" height="{ph}" fill="#fde0d2"/>')
    for t in (0.01, 0.1, 1, 10, 100, 1000):
        if _FLOOR <= t <= hi * 1.1:
            o.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#e6e9ee"/>')
            o.append(f'<text x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end" fill="#5f6b7a">{t:g}</text>')
    o.append(f'<line x1="{left}" x2="{left + pw}" y1="{y(1):.1f}" y2="{y(1):.1f}" stroke="#1d2430" '
             'stroke-dasharray="5,4"/>')
    o.append(f'<text x="{left + pw + 6}" y="{y(1) + 4:.1f}" fill="#1d2430">threshold</text>')
    for s in STATISTICS:
        pts = " ".join(f"{x(i):.1f},{y(win.ratio(s)):.1f}" for i, win in enumerate(wins))
        if len(wins) > 1:
            o.append(f'<polyline points="{pts}" fill="none" stroke="{_COLOURS[s]}" stroke-width="2"/>')
        for i, win in enumerate(wins):
            o.append(f'<circle cx="{x(i):.1f}" cy="{y(win.ratio(s)):.1f}" r="3" fill="{_COLOURS[s]}">'
                     f'<title>window {win.index}: {_e(s)} {win.scores[s]:.4g} / {win.thresholds[s]:.4g}</title></circle>')
    every = max(1, math.ceil(len(wins) / 20))
    for i, win in enumerate(wins):
        if i % every == 0 or i == len(wins) - 1:
            o.append(f'<text x="{x(i):.1f}" y="{top + ph + 16}" text-anchor="middle" fill="#5f6b7a">{win.index}</text>')
    o.append(f'<text x="{left + pw / 2:.1f}" y="{h - 6}" text-anchor="middle" fill="#5f6b7a">window (in time order, '
             f'{report.window} predictions each)</text>')
    o.append(f'<text transform="translate(14,{top + ph / 2:.1f}) rotate(-90)" text-anchor="middle" fill="#5f6b7a">'
             'score / threshold (log)</text>')
    for k, s in enumerate(STATISTICS):
        ly = top + 8 + 20 * k if y(1) > top + 8 + 20 * len(STATISTICS) else top + ph - 20 * (len(STATISTICS) - k)
        o.append(f'<line x1="{left + pw + 14}" x2="{left + pw + 34}" y1="{ly}" y2="{ly}" stroke="{_COLOURS[s]}" '
                 'stroke-width="3"/>')
        o.append(f'<text x="{left + pw + 40}" y="{ly + 4}">{_e(s)}</text>')
    o.append("</svg>")
    return "".join(o)


def render(report: DriftReport) -> str:
    first = report.first_drift
    verdict = ("no drift: every window looks like the model's held-out images" if first is None else
               f"drift in {sum(w.drift for w in report.windows)} of {len(report.windows)} windows, first in window "
               f"{first.index} (predictions {first.first}-{first.last}, from {first.started_at})")
    rows = []
    for win in report.windows:
        cells = "".join(
            f'<td class="{"over" if win.scores[s] > win.thresholds[s] else ""}">{win.scores[s]:.3g} / '
            f"{win.thresholds[s]:.3g}</td>" for s in STATISTICS)
        rows.append(f'<tr class="{"drift" if win.drift else ""}"><td>{win.index}</td><td>{win.first}-{win.last}</td>'
                    f"<td>{_e(win.started_at)}</td><td>{'yes' if win.drift else 'no'}</td>{cells}</tr>")
    head = "".join(f'<th title="{_e(DESCRIPTIONS[s])}">{_e(s)}</th>' for s in STATISTICS)
    legend = "".join(f"<li><b>{_e(s)}</b>: {_e(DESCRIPTIONS[s])}</li>" for s in STATISTICS)
    ref = report.reference
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"/>'
        '<meta name="viewport" content="width=device-width, initial-scale=1"/>'
        f"<title>canestra drift monitor</title><style>{_CSS}</style></head><body><main>"
        "<h1>Drift monitor</h1>"
        f'<p class="muted">{report.scored + report.pending} predictions of {_e(report.predictions)} in time order, '
        f"windows of {report.window}; reference: {ref['held_out_rows']} held-out images of the model "
        f"{_e(report.model)}, thresholds set for at most {ref['false_alarm_target']:.0%} false alarms per window.</p>"
        f"<p><b>{_e(verdict)}</b></p>"
        "<h2>Drift score over time</h2>"
        f'<div class="panel">{_chart(report)}</div>'
        f"<ul class=\"muted\">{legend}</ul>"
        "<h2>Windows</h2>"
        '<div class="panel"><table><thead><tr><th>window</th><th>predictions</th><th>from</th><th>drift</th>'
        f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
        "</main></body></html>\n")


def write_report(report: DriftReport, path: str) -> str:
    """Write the page to ``path`` (whole or not at all); its absolute path."""
    from canestra.storage import files as storage

    target = path if "://" in path else os.path.abspath(os.path.expanduser(path))
    storage.write_text_atomic(target, render(report))
    return target
