"""report.html: a self-contained page (inline SVG + CSS, no script, no network)."""

from __future__ import annotations

import html
import os
import tempfile

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:16px}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:17px;margin:28px 0 8px}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:#fff;border-radius:8px;padding:10px 14px;
box-shadow:0 1px 2px #0002;min-width:120px}.card b{display:block;font-size:20px}
table{border-collapse:collapse;background:#fff;font-size:13px}td,th{padding:3px 8px;border-bottom:1px solid #e3e6ea;
text-align:right}td:first-child,th:first-child{text-align:left}.scroll{overflow:auto;max-width:100%;background:#fff;
border-radius:8px;padding:8px}.muted{color:#667}
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _pct(x) -> str:
    return f"{float(x) * 100:.2f}%"


def _confusion_svg(labels: list[str], matrix: list[list[int]]) -> str:
    n = len(labels)
    if n == 0:
        return "<p class=muted>no confusion matrix</p>"
    cell = max(5, min(28, 900 // n))
    font = max(5, min(11, cell - 2))
    margin = int(font * 0.62 * max(len(s) for s in labels)) + 14
    size = margin + n * cell + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" '
             f'viewBox="0 0 {size} {size}" font-size="{font}" font-family="sans-serif">']
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        for j, v in enumerate(row):
            if not v:
                continue
            share = v / total
            if i == j:
                color = f"rgb({int(235 - 200 * share)},{int(245 - 110 * share)},{int(235 - 200 * share)})"
            else:
                color = f"rgb(230,{int(200 - 170 * min(1, share * 3))},{int(200 - 170 * min(1, share * 3))})"
            parts.append(
                f'<rect x="{margin + j * cell}" y="{margin + i * cell}" width="{cell}" height="{cell}" fill="{color}">'
                f"<title>{_e(labels[i])} → {_e(labels[j])}: {v}</title></rect>"
            )
    for k, lab in enumerate(labels):
        y = margin + k * cell + cell / 2 + font / 3
        parts.append(f'<text x="{margin - 4}" y="{y:.1f}" text-anchor="end">{_e(lab)}</text>')
        x = margin + k * cell + cell / 2 + font / 3
        parts.append(f'<text transform="translate({x:.1f},{margin - 4}) rotate(-90)">{_e(lab)}</text>')
    parts.append(f'<rect x="{margin}" y="{margin}" width="{n * cell}" height="{n * cell}" fill="none" stroke="#999"/>')
    parts.append("</svg>")
    return "".join(parts)


def _variance_svg(ratios: list[float]) -> str:
    if not ratios:
        return "<p class=muted>no PCA spectrum</p>"
    w, h, left, bottom, top = 760, 280, 50, 30, 12
    pw, ph = w - left - 12, h - bottom - top
    k = len(ratios)
    bar = pw / k
    cum, points = 0.0, []
    top_bar = max(ratios)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
             f'font-size="11" font-family="sans-serif">']
    for t in range(0, 101, 20):
        y = top + ph * (1 - t / 100)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e6ea"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{t}%</text>')
    for i, r in enumerate(ratios):
        cum += r
        bh = ph * r / top_bar * 0.5  # bars scaled to half height: per-component share
        x = left + i * bar
        parts.append(f'<rect x="{x:.2f}" y="{top + ph - bh:.2f}" width="{max(bar - 0.5, 0.5):.2f}" height="{bh:.2f}" '
                     f'fill="#7aa6d8"><title>component {i + 1}: {r * 100:.2f}%</title></rect>')
        points.append(f"{x + bar / 2:.2f},{top + ph * (1 - cum):.2f}")
    parts.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="#1f5fa8" stroke-width="2"/>')
    yc = top + ph * (1 - cum)
    parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{yc:.1f}" y2="{yc:.1f}" stroke="#1f5fa8" '
                 f'stroke-dasharray="4 3"/><text x="{left + pw}" y="{yc - 4:.1f}" text-anchor="end">'
                 f"cumulative {cum * 100:.1f}% at k={k}</text>")
    for t in sorted({1, max(1, k // 4), max(1, k // 2), max(1, 3 * k // 4), k}):
        x = left + (t - 0.5) * bar
        parts.append(f'<text x="{x:.1f}" y="{h - 10}" text-anchor="middle">{t}</text>')
    parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" stroke="#333"/></svg>')
    return "".join(parts)


def render_report(metrics: dict) -> str:
    counts = metrics.get("counts", {})
    pca = metrics.get("pca") or {}
    cards = [("top-1 accuracy", _pct(metrics.get("accuracy", 0))), ("macro-F1", f"{metrics.get('macro_f1', 0):.4f}"),
             ("test images", metrics.get("n", 0)), ("classes", counts.get("classes", len(metrics.get("per_class", {}))))]
    if pca:
        cards.append(("PCA", f"{pca.get('input_dim', '?')}→{pca.get('k')} ({_pct(pca.get('explained_variance', 0))})"))
    if counts.get("quarantined") is not None:
        cards.append(("quarantined", counts["quarantined"]))
    body = ['<main><h1>canestra — training report</h1>',
            f'<p class=muted>{_e(metrics.get("created_at", ""))} · canestra {_e(metrics.get("canestra_version", ""))}</p>',
            '<div class=cards>' + "".join(f"<div class=card>{_e(k)}<b>{_e(v)}</b></div>" for k, v in cards) + "</div>"]
    cmx = metrics.get("confusion_matrix", {})
    body.append("<h2>Confusion matrix</h2><p class=muted>rows: true class, columns: predicted; "
                "green = correct share of the row, red = errors. Hover a cell for its count.</p>")
    body.append(f'<div class=scroll>{_confusion_svg(cmx.get("labels", []), cmx.get("matrix", []))}</div>')
    if pca:
        body.append("<h2>PCA explained variance</h2><p class=muted>bars: share of each component; "
                    "line: cumulative share.</p>")
        body.append(f'<div class=scroll>{_variance_svg(pca.get("explained_variance_ratio", []))}</div>')
    conf = metrics.get("top_confusions", [])
    if conf:
        body.append("<h2>Top confusions</h2><table><tr><th>true</th><th>predicted</th><th>count</th></tr>"
                    + "".join(f"<tr><td>{_e(c['true'])}</td><td>{_e(c['predicted'])}</td><td>{c['count']}</td></tr>"
                              for c in conf) + "</table>")
    per = metrics.get("per_class", {})
    if per:
        rows = sorted(per.items(), key=lambda kv: (kv[1]["f1"], kv[0]))
        body.append("<h2>Per class (worst F1 first)</h2><div class=scroll><table><tr><th>class</th><th>precision</th>"
                    "<th>recall</th><th>F1</th><th>support</th></tr>"
                    + "".join(f"<tr><td>{_e(c)}</td><td>{v['precision']:.3f}</td><td>{v['recall']:.3f}</td>"
                              f"<td>{v['f1']:.3f}</td><td>{v['support']}</td></tr>" for c, v in rows)
                    + "</table></div>")
    for title, key in (("Stage timings (s)", "timings_s"), ("Split", "split"), ("Model", "model"), ("Counts", "counts")):
        d = metrics.get(key)
        if d:
            body.append(f"<h2>{title}</h2><table>" + "".join(
                f"<tr><td>{_e(k)}</td><td>{_e(f'{v:.1f}' if isinstance(v, float) and key == 'timings_s' else v)}</td></tr>"
                for k, v in d.items()) + "</table>")
    body.append("</main>")
    return ('<!doctype html><html lang=en><head><meta charset=utf-8>'
            '<meta name=viewport content="width=device-width,initial-scale=1">'
            f"<title>canestra report</title><style>{_CSS}</style></head><body>{''.join(body)}</body></html>")


def write_report(metrics: dict, path: str | os.PathLike) -> None:
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-report-")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(render_report(metrics))
    os.replace(tmp, path)
