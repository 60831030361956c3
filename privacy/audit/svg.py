"""Small self-contained SVG line charts for the report (no external assets, no scripts)."""

from __future__ import annotations

import math
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")


def line_chart(series: dict[str, list[tuple[float, float]]], *, title: str, y_label: str,
               hlines: dict[str, float] | None = None, width: int = 640, height: int = 300, x_label: str = "round",
               x_ticks: tuple[float, ...] | None = None) -> str:
    """Lines (one per series, same colour as its optional dashed horizontal line)."""
    points = [p for pts in series.values() for p in pts if math.isfinite(p[1])]
    ys = [y for _, y in points] + list((hlines or {}).values())
    if not points:
        return f'<p class="muted">{escape(title)}: not recorded</p>'
    x0, x1 = min(x for x, _ in points), max(x for x, _ in points)
    y0, y1 = min(0.0, min(ys)), max(ys) * 1.08 or 1.0
    left, right, top, bottom = 56, 150, 28, 36
    w, h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (w * (x - x0) / (x1 - x0) if x1 > x0 else w / 2)

    def sy(y: float) -> float:
        return top + h - h * (y - y0) / (y1 - y0)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{escape(title)}">',
           f'<text x="{left}" y="18" font-size="14" font-weight="bold">{escape(title)}</text>',
           f'<line x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" stroke="#444"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + h}" stroke="#444"/>',
           f'<text x="12" y="{top + h / 2}" font-size="11" transform="rotate(-90 12 {top + h / 2})">'
           f'{escape(y_label)}</text>']
    for frac in (0.0, 0.5, 1.0):
        y = y0 + frac * (y1 - y0)
        out.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" font-size="10" text-anchor="end">{y:.3g}</text>')
    for x in x_ticks if x_ticks is not None else sorted({x for x, _ in points}):
        out.append(f'<text x="{sx(x):.1f}" y="{top + h + 14}" font-size="10" text-anchor="middle">{x:g}</text>')
    out.append(f'<text x="{left + w / 2}" y="{height - 6}" font-size="11" text-anchor="middle">{escape(x_label)}</text>')
    for i, (name, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        good = [(x, y) for x, y in pts if math.isfinite(y)]
        if len(good) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        for x, y in good:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>')
        if hlines and name in hlines:
            out.append(f'<line x1="{left}" x2="{left + w}" y1="{sy(hlines[name]):.1f}" y2="{sy(hlines[name]):.1f}" '
                       f'stroke="{colour}" stroke-dasharray="6 4"/>')
        out.append(f'<text x="{left + w + 10}" y="{top + 14 + 16 * i}" font-size="11" fill="{colour}">'
                   f'{escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)
