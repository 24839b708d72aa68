"""Charts as server-rendered inline SVG: no script, no CDN, readable by screen readers.

Each chart is an `<svg role="img">` labelled by its own `<title>` and `<desc>`, with a
`<title>` on every bar (a tooltip and an accessible name). All text goes through
`django.utils.html.escape`; numbers are formatted here, never taken from user input.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from decimal import Decimal

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from billing.money import format_money

# Colour-blind-safe palette (Okabe–Ito), then greys for the rest.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
OTHER_COLOUR = "#999999"
_ids = itertools.count(1)


@dataclass(frozen=True)
class Bar:
    label: str
    value: Decimal
    text: str  # the value as shown ("12.30 EUR", "3.5 h"), formatted by `billing.money`


def _chart_id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


def bar_chart(*, title: str, desc: str, bars: list[Bar], colour: str = PALETTE[0], width: int = 640) -> SafeString:
    """Horizontal bars, one per row, labels left, values right."""
    cid = _chart_id("chart")
    row_h, label_w, value_w, pad = 26, 180, 90, 8
    height = max(len(bars), 1) * row_h + 2 * pad
    plot_w = width - label_w - value_w - 2 * pad
    top = max((b.value for b in bars), default=Decimal(0)) or Decimal(1)
    parts = [
        f'<svg class="chart" role="img" aria-labelledby="{cid}-t {cid}-d" viewBox="0 0 {width} {height}" '
        f'width="100%" preserveAspectRatio="xMinYMin meet" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{cid}-t">{escape(title)}</title>',
        f'<desc id="{cid}-d">{escape(desc)}</desc>',
    ]
    if not bars:
        parts.append(f'<text x="{pad}" y="{pad + 16}" class="chart__empty">No data in this period.</text>')
    for i, bar in enumerate(bars):
        y = pad + i * row_h
        w = float(bar.value / top) * plot_w if bar.value > 0 else 0.0
        label = bar.label if len(bar.label) <= 26 else bar.label[:25] + "…"
        parts.append(
            f'<g class="chart__row"><title>{escape(bar.label)}: {escape(bar.text)}</title>'
            f'<text x="{label_w - 6}" y="{y + 17}" text-anchor="end" class="chart__label">{escape(label)}</text>'
            f'<rect x="{label_w}" y="{y + 4}" width="{w:.1f}" height="{row_h - 8}" fill="{colour}" rx="2"></rect>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + 17}" class="chart__value">{escape(bar.text)}</text></g>'
        )
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308  every interpolated text is escaped above


def stacked_daily_chart(
    *,
    title: str,
    desc: str,
    days: list,
    series: list[tuple[str, dict]],
    currency: str = "USD",
    width: int = 720,
    height: int = 260,
) -> SafeString:
    """One column per day, stacked by series (`[(name, {day: Decimal})]`) of one currency, with a legend."""
    cid = _chart_id("stack")
    pad_l, pad_r, pad_t, pad_b = 56, 12, 12, 40
    legend_h = 22 * ((len(series) + 3) // 4)
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b
    totals = [sum((s.get(day) or Decimal(0) for _, s in series), Decimal(0)) for day in days]
    top = max(totals, default=Decimal(0)) or Decimal(1)
    col_w = plot_w / max(len(days), 1)
    parts = [
        f'<svg class="chart" role="img" aria-labelledby="{cid}-t {cid}-d" viewBox="0 0 {width} {height + legend_h}" '
        f'width="100%" preserveAspectRatio="xMinYMin meet" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{cid}-t">{escape(title)}</title>',
        f'<desc id="{cid}-d">{escape(desc)}</desc>',
        f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{width - pad_r}" y2="{pad_t + plot_h}" class="chart__axis" stroke="#888"></line>',
        f'<text x="{pad_l - 6}" y="{pad_t + 10}" text-anchor="end" class="chart__tick">{escape(format_money(top, currency))}</text>',
        f'<text x="{pad_l - 6}" y="{pad_t + plot_h}" text-anchor="end" class="chart__tick">0</text>',
    ]
    label_every = max(1, len(days) // 10)
    for i, day in enumerate(days):
        x = pad_l + i * col_w
        y = pad_t + plot_h
        tip = [f"{day:%Y-%m-%d}: {format_money(totals[i], currency)}"]
        bars = []
        for j, (name, values) in enumerate(series):
            value = values.get(day) or Decimal(0)
            if value <= 0:
                continue
            h = float(value / top) * plot_h
            y -= h
            colour = PALETTE[j] if j < len(PALETTE) else OTHER_COLOUR
            bars.append(
                f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{max(col_w - 2, 1):.1f}" height="{h:.1f}" fill="{colour}"></rect>'
            )
            tip.append(f"{name} {format_money(value, currency)}")
        parts.append(f"<g><title>{escape(', '.join(tip))}</title>{''.join(bars)}</g>")
        if i % label_every == 0:
            parts.append(
                f'<text x="{x + col_w / 2:.1f}" y="{pad_t + plot_h + 16}" text-anchor="middle" class="chart__tick">{day:%m-%d}</text>'
            )
    for j, (name, _) in enumerate(series):
        lx = pad_l + (j % 4) * (plot_w / 4)
        ly = height + 22 * (j // 4)
        colour = PALETTE[j] if j < len(PALETTE) else OTHER_COLOUR
        short = name if len(name) <= 22 else name[:21] + "…"
        parts.append(
            f'<rect x="{lx:.1f}" y="{ly - 10}" width="12" height="12" fill="{colour}"></rect>'
            f'<text x="{lx + 16:.1f}" y="{ly}" class="chart__legend">{escape(short)}</text>'
        )
    parts.append("</svg>")
    return mark_safe("".join(parts))  # noqa: S308  every interpolated text is escaped above


def top_series(daily: dict, names: dict, limit: int = len(PALETTE) - 1) -> list[tuple[str, dict]]:
    """Stack the biggest keys by total, folding the rest into "Other" so colours stay readable."""
    totals: dict = {}
    for values in daily.values():
        for key, value in values.items():
            totals[key] = totals.get(key, Decimal(0)) + value
    ranked = sorted(totals, key=lambda k: (-totals[k], str(names.get(k, k))))
    keep, rest = ranked[:limit], ranked[limit:]
    series = [(str(names.get(k, k) or "—"), {day: v[k] for day, v in daily.items() if k in v}) for k in keep]
    if rest:
        other: dict = {}
        for day, values in daily.items():
            value = sum((values[k] for k in rest if k in values), Decimal(0))
            if value:
                other[day] = value
        series.append(("Other", other))
    return series
