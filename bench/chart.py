"""A grouped bar chart as plain SVG text (no dependency): one group per target, one bar per peer.

Rates are normalised per group (the fastest peer of the group = 100 %), so targets with different
units (results/s, calls/s) share one axis; each bar is labelled with its absolute rate. A peer keeps
its colour in every group; one without a measurement gets an "n/a" mark instead of a bar.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple
from xml.sax.saxutils import escape

#: ``(peer key, rate or None)`` of one bar.
Bar = Tuple[str, Optional[float]]

PALETTE = ('#1f77b4', '#aec7e8', '#2ca02c', '#d62728', '#ff7f0e', '#7f7f7f', '#9467bd', '#8c564b',
           '#e377c2', '#17becf')
BAR_W, BAR_GAP, GROUP_GAP = 26, 4, 44
LEFT, RIGHT, PLOT_TOP, PLOT_H, BOTTOM = 64, 24, 0, 260, 56
FONT = 'font-family="DejaVu Sans, Arial, sans-serif"'


def short_rate(value: float) -> str:
    """``31234.5`` -> ``31.2k``, ``1.2e6`` -> ``1.20M``."""
    if value >= 1e6:
        return f'{value / 1e6:.2f}M'
    if value >= 1e4:
        return f'{value / 1e3:.0f}k'
    if value >= 1e3:
        return f'{value / 1e3:.1f}k'
    return f'{value:.0f}'


def render_chart(title: str, subtitle: str, groups: Sequence[Tuple[str, Sequence[Bar]]],
                 legend: Dict[str, str], colours: Optional[Dict[str, str]] = None) -> str:
    """The SVG document: ``groups`` is ``[(group title, [(peer key, rate or None), ...]), ...]``
    (a group title may hold a second line after ``\\n``; the subtitle any number of lines); ``colours``
    fixes a peer's colour (others take the palette's in order of appearance)."""
    keys: List[str] = []
    for _, bars in groups:
        for key, _ in bars:
            if key not in keys:
                keys.append(key)
    colour = {key: (colours or {}).get(key) or PALETTE[i % len(PALETTE)] for i, key in enumerate(keys)}
    widths = [len(bars) * (BAR_W + BAR_GAP) - BAR_GAP for _, bars in groups]
    plot_w = sum(widths) + GROUP_GAP * max(0, len(groups) - 1)
    width = max(LEFT + plot_w + RIGHT, 560)
    per_row = max(1, (width - LEFT) // 210)
    legend_rows = math.ceil(len(keys) / per_row) if keys else 0
    sub_lines = subtitle.split('\n') if subtitle else []
    legend_top = 34 + 16 * len(sub_lines)
    top = legend_top + legend_rows * 18 + 30  # title, subtitle, legend, room for the tallest bar's label
    height = top + PLOT_H + BOTTOM
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" {FONT} font-size="12">',
           f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
           f'<text x="{LEFT}" y="22" font-size="16" font-weight="bold">{escape(title)}</text>']
    out.extend(f'<text x="{LEFT}" y="{40 + 16 * i}" fill="#555555">{escape(line)}</text>'
               for i, line in enumerate(sub_lines))
    for i, key in enumerate(keys):  # legend
        x, y = LEFT + (i % per_row) * 210, legend_top + (i // per_row) * 18
        out.append(f'<rect x="{x}" y="{y}" width="12" height="12" fill="{colour[key]}"/>')
        out.append(f'<text x="{x + 17}" y="{y + 10}">{escape(legend.get(key, key))}</text>')
    base = top + PLOT_H
    for step in range(5):  # axis: 0 .. 100 % of the group's fastest
        y = base - PLOT_H * step / 4
        out.append(f'<line x1="{LEFT - 4}" y1="{y:.1f}" x2="{LEFT + plot_w}" y2="{y:.1f}" '
                   f'stroke="{"#333333" if step == 0 else "#dddddd"}" stroke-width="1"/>')
        out.append(f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end" fill="#555555">{step * 25} %</text>')
    out.append(f'<text transform="translate(16 {base - PLOT_H / 2:.0f}) rotate(-90)" text-anchor="middle" '
               'fill="#555555">rate, % of the fastest peer of the group</text>')
    x0 = LEFT
    for (group_title, bars), group_w in zip(groups, widths):
        best = max((value for _, value in bars if value), default=0.0)
        for j, (key, value) in enumerate(bars):
            x = x0 + j * (BAR_W + BAR_GAP)
            cx = x + BAR_W / 2
            if not value or not best:
                out.append(f'<text transform="translate({cx + 4:.1f} {base - 4}) rotate(-90)" fill="#999999" '
                           'font-size="11">n/a</text>')
                continue
            h = PLOT_H * value / best
            out.append(f'<rect x="{x}" y="{base - h:.1f}" width="{BAR_W}" height="{h:.1f}" fill="{colour[key]}">'
                       f'<title>{escape(legend.get(key, key))}: {value:,.0f}/s</title></rect>')
            out.append(f'<text transform="translate({cx + 4:.1f} {base - h - 4:.1f}) rotate(-90)" '
                       f'font-size="11">{short_rate(value)}</text>')
        for line_no, line in enumerate(group_title.split('\n')):  # a title may have a second line
            weight = ' font-weight="bold"' if line_no == 0 else ' fill="#555555"'
            out.append(f'<text x="{x0 + group_w / 2:.1f}" y="{base + 20 + 15 * line_no}" text-anchor="middle"'
                       f'{weight}>{escape(line)}</text>')
        x0 += group_w + GROUP_GAP
    out.append('</svg>')
    return '\n'.join(out) + '\n'


def write_chart(path: str, title: str, subtitle: str, groups: Sequence[Tuple[str, Sequence[Bar]]],
                legend: Dict[str, str], colours: Optional[Dict[str, str]] = None) -> None:
    """Write :func:`render_chart`'s SVG to ``path`` (replacing it atomically)."""
    text = render_chart(title, subtitle, groups, legend, colours)
    staged = f'{path}.tmp'
    with open(staged, 'w', encoding='utf-8') as f:
        f.write(text)
    os.replace(staged, path)
