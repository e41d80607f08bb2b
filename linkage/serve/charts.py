"""Charts for the pages, drawn on the server: SVG bar charts and heat-map matrices.

No scripts and no inline styles (the pages' Content-Security-Policy forbids both): bars
use SVG presentation attributes, heat-map cells one of ten CSS classes. A suppressed
category is drawn as a hatched, labelled box and never gets a value.

Example:
    >>> svg = bar_svg([{"category": "a", "value": 3.0, "status": "perturbed"},
    ...                {"category": "b", "value": None, "status": "suppressed_primary"}], "count")
    >>> "suppressed" in svg and svg.startswith("<svg")
    True
"""

from __future__ import annotations

import html
import math

BUCKETS = 10


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10 or float(v).is_integer():
        return f"{v:,.1f}".rstrip("0").rstrip(".")
    return f"{v:.3g}"


def bar_svg(items: list[dict], title: str, labels: dict[str, str] | None = None, width: int = 760) -> str:
    """A horizontal bar chart of ``[{category, value, status}]``; suppressed bars are marked.

    Args:
        items: one dict per category.
        title: the chart's accessible title (the measure).
        labels: display names for category codes.
        width: total width in pixels.

    Returns:
        An ``<svg>`` element (text).
    """
    labels = labels or {}
    shown = sorted((i for i in items if i["value"] is not None), key=lambda i: -i["value"])
    hidden = [i for i in items if i["value"] is None]
    rows = shown + hidden
    bar_h, gap, left, right = 18, 4, 230, 80
    height = max(1, len(rows)) * (bar_h + gap) + 30
    vals = [i["value"] for i in shown]
    lo, hi = min([0.0, *vals]), max([0.0, *vals])
    span = (hi - lo) or 1.0
    plot = width - left - right

    def x(v: float) -> float:
        return left + (v - lo) / span * plot

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" aria-label="{html.escape(title)}">',
           f"<title>{html.escape(title)}</title>",
           '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
           'patternTransform="rotate(45)"><rect width="6" height="6" fill="#f1f1f1"/>'
           '<line x1="0" y1="0" x2="0" y2="6" stroke="#b5b5b5" stroke-width="2"/></pattern></defs>']
    for n, item in enumerate(rows):
        y = 10 + n * (bar_h + gap)
        cat = str(item["category"])
        name = labels.get(cat, cat)
        label = name if len(name) <= 32 else name[:31] + "…"
        out.append(f'<text x="{left - 6}" y="{y + bar_h - 5}" text-anchor="end" font-size="12" '
                   f'fill="#1b1b1b">{html.escape(label)}</text>')
        if item["value"] is None:
            out.append(f'<g class="suppressed" data-status="{html.escape(item["status"])}">'
                       f'<rect x="{left}" y="{y}" width="{plot * 0.35:.1f}" height="{bar_h}" fill="url(#hatch)" '
                       f'stroke="#8a8a8a"/><text x="{left + 6}" y="{y + bar_h - 5}" font-size="11" fill="#444">'
                       f'suppressed ({html.escape(item["status"].replace("suppressed_", ""))})</text></g>')
            continue
        v = item["value"]
        x0, x1 = sorted((x(0.0), x(v)))
        out.append(f'<rect x="{x0:.1f}" y="{y}" width="{max(1.0, x1 - x0):.1f}" height="{bar_h}" fill="#1d70b8">'
                   f'<title>{html.escape(name)}: {_fmt(v)}</title></rect>'
                   f'<text x="{x1 + 4:.1f}" y="{y + bar_h - 5}" font-size="11" fill="#1b1b1b">{_fmt(v)}</text>')
    out.append("</svg>")
    return "".join(out)


def heat_cells(matrix: dict, share: bool = False) -> dict:
    """Heat-map cells for a template: value text, CSS class (``heat-0``..``heat-9`` or ``suppressed``).

    Args:
        matrix: :meth:`linkage.serve.catalogue.TableView.matrix` output.
        share: show each cell as a share of its row's ``Total`` (the transition matrix view),
            when both are published.

    Returns:
        ``{"rows", "cols", "grid": [[{text, cls, status}]]}``.
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
                b = 0 if hi == lo else min(BUCKETS - 1, int(math.floor((v - lo) / (hi - lo) * BUCKETS)))
                line.append({"text": f"{v:.0%}" if share else _fmt(v), "cls": f"heat-{b}", "status": cell["status"]})
            else:
                v = vals.get((r, c), cell["value"])
                line.append({"text": f"{v:.0%}" if share and (r, c) in vals else _fmt(cell["value"]),
                             "cls": "margin", "status": cell["status"]})
        grid.append(line)
    return {"rows": rows, "cols": cols, "grid": grid}
