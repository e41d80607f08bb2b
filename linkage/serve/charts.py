"""Charts for the pages, drawn on the server: SVG bar charts and heat-map matrices.

No scripts and no inline styles (the pages' Content-Security-Policy forbids both): bars
use SVG presentation attributes, heat-map cells one of ten CSS classes. A suppressed
category is drawn as a hatched, labelled box and never gets a value.

Bars can be grouped (one bar per category of a second dimension, with a legend), carry a
confidence interval (a whisker from ``low`` to ``high``) and their ``n``, and sit on a
value axis with numbered ticks. The axis starts at 0 for counts and shares; for means,
medians and slopes it spans the data (a 45-53 range is not flattened against 0).
Heat maps come with a numeric legend, and a narrow range is not stretched to full
contrast.

Example:
    >>> svg = bar_svg([{"category": "a", "value": 3.0, "status": "perturbed"},
    ...                {"category": "b", "value": None, "status": "suppressed"}], "count")
    >>> "suppressed" in svg and svg.startswith("<svg")
    True
    >>> axis_range([45.2, 52.9], zero=False)[:2]
    (44.0, 54.0)
"""

from __future__ import annotations

import html
import math

__all__ = ["BUCKETS", "axis_range", "bar_svg", "heat_cells"]

BUCKETS = 10
#: colour-blind-safe series colours (Okabe-Ito)
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000")


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10 or float(v).is_integer():
        return f"{v:,.1f}".rstrip("0").rstrip(".")
    return f"{v:.3g}"


def _nice(step: float) -> float:
    exp = math.floor(math.log10(step))
    f = step / 10 ** exp
    return float((1 if f <= 1 else 2 if f <= 2 else 2.5 if f <= 2.5 else 5 if f <= 5 else 10) * 10.0 ** exp)


def axis_range(values: list[float], zero: bool, ticks: int = 5) -> tuple[float, float, list[float]]:
    """A value axis: ``(low, high, tick values)`` covering ``values`` with round ticks.

    Args:
        values: every value drawn (bar ends and interval ends).
        zero: the axis includes 0 (counts, shares); otherwise it spans the data.
        ticks: about how many ticks.
    """
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return 0.0, 1.0, [0.0, 1.0]
    lo, hi = min(vals), max(vals)
    if zero:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi == lo:
        pad = abs(hi) * 0.1 or 1.0
        lo, hi = (lo - pad, hi + pad) if not zero else (min(lo, 0.0), max(hi, 0.0) + pad)
    step = _nice((hi - lo) / ticks)
    lo_t = math.floor(lo / step) * step if not (zero and lo >= 0) else 0.0
    hi_t = math.ceil(hi / step) * step
    n = int(round((hi_t - lo_t) / step))
    return lo_t, hi_t, [round(lo_t + i * step, 10) for i in range(n + 1)]


def _label(item: dict) -> str:
    text = _fmt(item["value"])
    if item.get("low") is not None and item.get("high") is not None:
        text += f" ({_fmt(item['low'])} to {_fmt(item['high'])})"
    if item.get("n") is not None:
        text += f", n {item['n']:,.0f}"
    if item.get("reliability") == "low":
        text += ", low reliability"
    return text


def bar_svg(items: list[dict], title: str, labels: dict[str, str] | None = None, width: int = 960,
            zero: bool = True, groups: list[str] | None = None, group_title: str = "") -> str:
    """A horizontal bar chart; suppressed bars are marked, intervals drawn as whiskers.

    Args:
        items: one dict per bar: ``category``, ``value`` (``None`` when suppressed), ``status``, and
            optionally ``group`` (a category of the grouping dimension), ``low`` and ``high`` (a
            confidence interval), ``n`` and ``reliability``.
        title: the chart's accessible title.
        labels: display names for category codes.
        width: total width in pixels.
        zero: start the value axis at 0 (counts and shares).
        groups: the groups in legend order (bars of one category are drawn in this order).
        group_title: the grouping dimension's name, for the legend.

    Returns:
        An ``<svg>`` element (text).
    """
    labels = labels or {}
    groups = groups or []
    colour = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(groups)}
    # categories: by value (of the first group) when ungrouped; as given when grouped
    if groups:
        cats = list(dict.fromkeys(i["category"] for i in items))
        order = {g: k for k, g in enumerate(groups)}
        rows = sorted(items, key=lambda i: (cats.index(i["category"]), order.get(i.get("group"), 99)))
    else:
        shown = sorted((i for i in items if i["value"] is not None), key=lambda i: -i["value"])
        rows = shown + [i for i in items if i["value"] is None]
    ends = [v for i in rows for v in (i["value"], i.get("low"), i.get("high")) if v is not None]
    lo, hi, ticks = axis_range(ends, zero)
    bar_h, gap, block_gap, left = 16, 3, 10, 200
    # room on the right for the longest value label (about 6.4 px a character at 11 px), so none is cut off
    longest = max((len(_label(i)) for i in rows if i["value"] is not None), default=0)
    right = max(170, min(width // 2 - 120, int(longest * 6.4) + 16))
    legend_h = 26 if groups else 0
    top = 8 + legend_h
    y, placed, last_cat = top, [], None
    for item in rows:
        if groups and last_cat is not None and item["category"] != last_cat:
            y += block_gap
        placed.append((y, item, item["category"] != last_cat))
        last_cat = item["category"]
        y += bar_h + gap
    plot_bottom = y + 2
    height = plot_bottom + 34
    plot = width - left - right

    def x(v: float) -> float:
        return left + (min(max(v, lo), hi) - lo) / ((hi - lo) or 1.0) * plot

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" aria-label="{html.escape(title)}">',
           f"<title>{html.escape(title)}</title>",
           '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
           'patternTransform="rotate(45)"><rect width="6" height="6" fill="#f1f1f1"/>'
           '<line x1="0" y1="0" x2="0" y2="6" stroke="#b5b5b5" stroke-width="2"/></pattern></defs>']
    if groups:
        gx = left
        out.append(f'<text x="{left - 6}" y="20" text-anchor="end" font-size="12" font-weight="bold" '
                   f'fill="#1b1b1b">{html.escape(group_title)}</text>')
        for g in groups:
            name = labels.get(g, g)
            out.append(f'<g class="legend-item"><rect x="{gx}" y="9" width="14" height="14" fill="{colour[g]}"/>'
                       f'<text x="{gx + 18}" y="20" font-size="12" fill="#1b1b1b">{html.escape(name)}</text></g>')
            gx += 30 + 7 * len(name)
    for t in ticks:
        tx = x(t)
        out.append(f'<line x1="{tx:.1f}" y1="{top - 2}" x2="{tx:.1f}" y2="{plot_bottom}" stroke="#e2e2e2"/>'
                   f'<text class="tick" x="{tx:.1f}" y="{plot_bottom + 14}" text-anchor="middle" font-size="11" '
                   f'fill="#444">{_fmt(t)}</text>')
    out.append(f'<line x1="{left}" y1="{plot_bottom}" x2="{left + plot}" y2="{plot_bottom}" stroke="#888"/>')
    if lo > 0 or hi < 0:
        out.append(f'<text x="{left + plot}" y="{plot_bottom + 28}" text-anchor="end" font-size="11" fill="#6b3b00">'
                   f'axis starts at {_fmt(lo)}, not 0</text>')
    base = x(0.0) if lo <= 0 <= hi else x(lo)
    for y, item, first in placed:
        cat = str(item["category"])
        name = labels.get(cat, cat)
        if first or not groups:
            label = name if len(name) <= 30 else name[:29] + "…"
            out.append(f'<text x="{left - 6}" y="{y + bar_h - 4}" text-anchor="end" font-size="12" '
                       f'fill="#1b1b1b">{html.escape(label)}</text>')
        fill = colour.get(item.get("group"), PALETTE[0])
        who = name + (f", {labels.get(item['group'], item['group'])}" if groups else "")
        if item["value"] is None:
            # a marker at the baseline, not a bar: its length must not read as a value
            out.append(f'<g class="suppressed" data-status="{html.escape(item["status"])}">'
                       f'<rect x="{base + 1:.1f}" y="{y + 1}" width="{bar_h - 2}" height="{bar_h - 2}" '
                       f'fill="url(#hatch)" stroke="{fill}"/><text x="{base + bar_h + 3:.1f}" y="{y + bar_h - 4}" '
                       f'font-size="11" font-style="italic" fill="#6b3b00">suppressed</text>'
                       f'<title>{html.escape(who)}: suppressed</title></g>')
            continue
        v = item["value"]
        x0, x1 = sorted((base, x(v)))
        faint = ' fill-opacity="0.45"' if item.get("reliability") == "low" else ""
        out.append(f'<rect x="{x0:.1f}" y="{y}" width="{max(1.0, x1 - x0):.1f}" height="{bar_h}" fill="{fill}"{faint}>'
                   f'<title>{html.escape(who)}: {html.escape(_label(item))}</title></rect>')
        end = x(v)
        if item.get("low") is not None and item.get("high") is not None:
            a, b = x(item["low"]), x(item["high"])
            mid = y + bar_h / 2
            out.append(f'<g class="interval"><line x1="{a:.1f}" y1="{mid}" x2="{b:.1f}" y2="{mid}" stroke="#1b1b1b" '
                       f'stroke-width="1.5"/><line x1="{a:.1f}" y1="{y + 3}" x2="{a:.1f}" y2="{y + bar_h - 3}" '
                       f'stroke="#1b1b1b" stroke-width="1.5"/><line x1="{b:.1f}" y1="{y + 3}" x2="{b:.1f}" '
                       f'y2="{y + bar_h - 3}" stroke="#1b1b1b" stroke-width="1.5"/></g>')
            end = max(end, b)
        out.append(f'<text class="value" x="{max(end, x1) + 4:.1f}" y="{y + bar_h - 4}" font-size="11" '
                   f'fill="#1b1b1b">{html.escape(_label(item))}</text>')
    out.append("</svg>")
    return "".join(out)


def heat_cells(matrix: dict, share: bool = False, zero: bool = True) -> dict:
    """Heat-map cells for a template: value text, CSS class (``heat-0``..``heat-9`` or ``suppressed``),
    and the legend: each class's range of values.

    The colour scale runs from 0 (counts, shares; ``zero``) or from the smallest value, to the
    largest; a range narrower than a tenth of its midpoint is widened to that, so small differences
    are not drawn as large ones.

    Args:
        matrix: :meth:`linkage.serve.catalogue.TableView.matrix` output.
        share: show each cell as a share of its row's ``Total`` (the transition matrix view),
            when both are published.
        zero: the scale starts at 0.

    Returns:
        ``{"rows", "cols", "grid": [[{text, cls, status}]], "legend": [{cls, low, high}]}``.
    """
    cells, rows, cols = matrix["cells"], matrix["rows"], matrix["cols"]
    vals = {}
    for r in rows:
        total = cells.get((r, "Total"), {}).get("value")
        for c in cols:
            cell = cells.get((r, c))
            if cell is None or cell["value"] is None:
                continue
            v = cell["value"]
            if share:
                if c == "Total" or not total:
                    continue
                v = v / total
            vals[(r, c)] = v
    inner = [v for (r, c), v in vals.items() if r != "Total" and c != "Total"]
    lo, hi = (min(inner), max(inner)) if inner else (0.0, 1.0)
    if zero or share:
        lo = min(lo, 0.0)
    mid = (lo + hi) / 2
    if hi - lo < abs(mid) * 0.1:
        lo, hi = mid - abs(mid) * 0.05, mid + abs(mid) * 0.05
    if hi == lo:
        hi = lo + 1.0
    fmt = (lambda v: f"{v:.0%}") if share else _fmt
    legend = [{"cls": f"heat-{b}", "low": fmt(lo + (hi - lo) * b / BUCKETS), "high": fmt(lo + (hi - lo) * (b + 1) / BUCKETS)}
              for b in range(BUCKETS)]
    grid = []
    for r in rows:
        line = []
        for c in cols:
            cell = cells.get((r, c))
            if cell is None:
                line.append({"text": "", "cls": "empty", "status": ""})
            elif cell["value"] is None:
                line.append({"text": "✕", "cls": "suppressed", "status": cell["status"]})
            elif (r, c) in vals and r != "Total" and c != "Total":
                v = vals[(r, c)]
                b = min(BUCKETS - 1, max(0, int(math.floor((v - lo) / (hi - lo) * BUCKETS))))
                line.append({"text": fmt(v), "cls": f"heat-{b}", "status": cell["status"]})
            else:
                v = vals.get((r, c), cell["value"])
                line.append({"text": f"{v:.0%}" if share and (r, c) in vals else _fmt(cell["value"]),
                             "cls": "margin", "status": cell["status"]})
        grid.append(line)
    return {"rows": rows, "cols": cols, "grid": grid, "legend": legend}
