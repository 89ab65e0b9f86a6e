"""Renders a Summary as a terminal table or as one self-contained HTML page (inline SVG charts,
no script, nothing fetched), every text escaped."""

from __future__ import annotations

from html import escape

from cellblock.report.summary import Chart, Summary

#: Width of a chart's bar area in the HTML page, in pixels.
BAR_WIDTH = 420
#: Height of one bar row, in pixels.
ROW = 22
LABEL_WIDTH = 220
PALETTE = ("#2f6fdf", "#e0803a", "#3aa17e", "#c44d58", "#8a63d2", "#6b7a8f")


def _fmt(value: float, unit: str) -> str:
    if unit == "USD":
        return f"${value:.6f}"
    if value == int(value) and unit != "s":
        return f"{int(value)} {unit}".strip()
    return f"{value:.3f} {unit}".strip()


def to_text(summary: Summary, width: int = 40) -> str:
    """A plain-text report: the figures as a two-column table, each chart as text bars."""
    lines = [summary.title, "=" * len(summary.title)]
    key_w = max((len(k) for k, _ in summary.stats), default=0)
    lines += [f"{k.ljust(key_w)}  {v}" for k, v in summary.stats]
    for chart in summary.charts:
        lines += ["", chart.title, "-" * len(chart.title)]
        if not chart.bars:
            lines.append("(nothing)")
            continue
        top = max(b.value for b in chart.bars) or 1.0
        label_w = min(max(len(b.label) for b in chart.bars), 32)
        for b in chart.bars:
            bar = "#" * max(round(width * b.value / top), 1 if b.value else 0)
            lines.append(f"{b.label[:label_w].ljust(label_w)}  {bar} {_fmt(b.value, chart.unit)}")
    return "\n".join(lines) + "\n"


def _svg(chart: Chart, color: str) -> str:
    height = ROW * max(len(chart.bars), 1) + 8
    total = LABEL_WIDTH + BAR_WIDTH + 140
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{total}" height="{height}" '
             f'role="img" aria-label="{escape(chart.title)}">']
    top = max((b.value for b in chart.bars), default=0.0) or 1.0
    for i, b in enumerate(chart.bars):
        y = 4 + i * ROW
        w = max(BAR_WIDTH * b.value / top, 1.0 if b.value else 0.0)
        parts.append(
            f'<text x="{LABEL_WIDTH - 8}" y="{y + 15}" text-anchor="end">'
            f'{escape(b.label[:40])}</text>'
            f'<rect class="bar" x="{LABEL_WIDTH}" y="{y + 3}" width="{w:.1f}" height="{ROW - 6}" '
            f'fill="{color}"><title>{escape(b.label)}: {escape(_fmt(b.value, chart.unit))}'
            f'</title></rect>'
            f'<text x="{LABEL_WIDTH + w + 6:.1f}" y="{y + 15}">'
            f'{escape(_fmt(b.value, chart.unit))}</text>')
    if not chart.bars:
        parts.append(f'<text x="{LABEL_WIDTH}" y="18">(nothing)</text>')
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #1d2430; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { font-size: 1.15em; margin: 1.6em 0 .4em; }
table { border-collapse: collapse; } td { padding: .25em 1.2em .25em 0; }
td:first-child { color: #5b6472; } svg text { font: 12px system-ui, sans-serif; fill: #1d2430; }
.kind { color: #5b6472; text-transform: uppercase; letter-spacing: .08em; font-size: .8em; }
"""


def to_html(summary: Summary) -> str:
    """One self-contained HTML page (no script, no external resource)."""
    rows = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>"
                   for k, v in summary.stats)
    charts = "".join(
        f'<section><h2>{escape(c.title)}</h2>{_svg(c, PALETTE[i % len(PALETTE)])}</section>'
        for i, c in enumerate(summary.charts))
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "style-src 'unsafe-inline'\">"
        f"<title>{escape(summary.title)}</title><style>{_CSS}</style></head><body>"
        f"<div class=\"kind\">cellblock report: {escape(summary.kind)}</div>"
        f"<h1>{escape(summary.title)}</h1><table>{rows}</table>{charts}</body></html>\n"
    )
