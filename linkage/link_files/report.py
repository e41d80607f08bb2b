"""The linkage-quality report of ``hhlink link-files``: ``DIR/report.json`` and ``DIR/report.html``.

A smaller sibling of :mod:`linkage.link.report` (whose sections on benefit units,
households and pupils' subgroups do not apply to arbitrary files), built with its table,
chart and parameter helpers: identifier completeness per file, blocking rules and their
comparison counts, how the model was trained, m and u per level with match weights and
Splink's charts, match rates per file, metrics at several thresholds and the
match-weight distribution. Aggregates only: no record, record id, token or key.
"""

from __future__ import annotations

import html
import json
import threading
from pathlib import Path

from linkage.link_files.model import ROLE_COLUMNS
from linkage.link.report import chart_svg, html_table, mu_rows, query_rows, render_page, threshold_rows
from linkage.workspace import atomic_path

# the encoding that shows whether a role is present in a record
_PRESENCE = {role: cols[0] for role, cols in ROLE_COLUMNS.items()}


def _completeness(con, inputs) -> list[dict]:
    out = []
    for inp in inputs:
        exprs = ", ".join(f"round(avg(({c} IS NOT NULL)::int), 4) AS {r}" if r in inp.spec.roles else f"NULL AS {r}"
                          for r, c in _PRESENCE.items())
        row = query_rows(con, f"SELECT count(*) AS records, {exprs} FROM ids_{inp.name}")[0]
        out.append({"file": inp.spec.table, **row})
    return out


def _match_rates(con) -> list[dict]:
    return query_rows(con, """
        WITH per_cluster AS (SELECT cluster_id, count(*) AS n, count(DISTINCT file) AS files
                             FROM lf_clusters GROUP BY 1),
        per_file AS (SELECT cluster_id, file, count(*) AS n FROM lf_clusters GROUP BY 1, 2)
        SELECT c.file, count(*) AS records,
               round(avg((f.n > 1)::int), 4) AS with_a_duplicate_in_the_same_file,
               round(avg((k.files > 1)::int), 4) AS linked_to_another_file,
               count(DISTINCT c.cluster_id) AS clusters
        FROM lf_clusters c JOIN per_cluster k USING (cluster_id)
        JOIN per_file f ON f.cluster_id = c.cluster_id AND f.file = c.file
        GROUP BY c.file, c.file_index ORDER BY c.file_index""")


def _cluster_sizes(con) -> list[dict]:
    return query_rows(con, """SELECT n AS cluster_size, count(*) AS clusters FROM
                         (SELECT cluster_id, count(*) AS n FROM lf_clusters GROUP BY 1) GROUP BY 1 ORDER BY 1""")


def build_report(con, inputs, summary: dict, model: dict) -> dict:
    """The report's content (aggregates only) from the run's tables and summary."""
    con.execute("CREATE OR REPLACE VIEW pairs AS SELECT * FROM lf_pairs")
    keys = ("records", "clusters", "pairs_scored", "pairs_at_threshold", "threshold", "keep_pairs_above",
            "key_fingerprint", "seconds")
    return {
        "summary": {k: summary.get(k) for k in keys},
        "files": summary["files"],
        "completeness": _completeness(con, inputs),
        "comparisons": summary.get("comparisons", []),
        "blocking": summary.get("blocking", []),
        "records_not_compared": summary.get("records_not_compared"),
        "files_not_compared": summary.get("files_not_compared", []),
        "training": summary.get("training", {}),
        "parameters": mu_rows(model) if model.get("comparisons") else [],
        "match_rates": _match_rates(con),
        "cluster_sizes": _cluster_sizes(con),
        "thresholds": threshold_rows(con, sorted({0.5, 0.9, 0.99, 0.999, summary["threshold"]})),
        "histogram": query_rows(con, "SELECT floor(match_weight) AS weight, count(*) AS pairs FROM lf_pairs "
                                "GROUP BY 1 ORDER BY 1"),
    }


def _named(levels: list[str]) -> str:
    """How many levels, and which."""
    return f"{len(levels)}" + (f" ({'; '.join(levels)})" if levels else "")


def _training_rows(training: dict) -> list[dict]:
    """What training did, one readable line per parameter."""
    rows = [{"what": "records", "how": training.get("records")}]
    lam = training.get("probability_two_random_records_match")
    if lam:
        rows.append({"what": "probability two random records match", "how": f"{lam['value']:.3g} ({lam['how']})"})
    u = training.get("u")
    if u:
        how = u["how"]
        if "max_pairs" in u:
            how += (f" (up to {u['max_pairs']:,.0f} pairs); {_named(u.get('levels_left_at_prior', []))} unobserved "
                    f"level(s) kept the prior; {u.get('levels_corrected_for_matches_in_the_sample', 0)} level(s) corrected "
                    "for the matches in the sample")
        rows.append({"what": "u", "how": how})
    m = training.get("m")
    if m:
        rows.append({"what": "m", "how": m["how"] + (f"; {_named(m['levels_raised_to_floor'])} level(s) raised to a "
                                                    "tenth of the prior" if "levels_raised_to_floor" in m else "")
                     + (f"; comparisons EM could not train (prior m kept): {', '.join(m['comparisons_at_prior_m'])}"
                        if m.get("comparisons_at_prior_m") else "")})
        for e in m.get("em", []):
            done = ("ran" + (f", {_named(e['levels_left_at_prior'])} unobserved level(s) kept the prior"
                             if e.get("levels_left_at_prior") else "")) if e["ran"] else f"not run: {e['why_not']}"
            rows.append({"what": f"EM block {e['block']}", "how": f"{e['pairs']:,} pairs; {done}"})
    if "term_frequency_adjustments" in training:
        rows.append({"what": "term-frequency adjustments on names",
                     "how": "on" if training["term_frequency_adjustments"] else "off (too few records)"})
    if "note" in training:
        rows.append({"what": "note", "how": training["note"]})
    return rows


def warm_up_charts() -> threading.Thread:
    """Start the chart renderer in the background (its first SVG takes about 1.5 s to start a JS engine).

    The renderer releases the GIL, so reading, encoding and training go on meanwhile; the
    report's charts then render at once. Returns the (daemon) thread.
    """
    tiny = {"data": {"values": [{"x": 0}]}, "mark": "point", "encoding": {"x": {"field": "x", "type": "quantitative"}}}
    thread = threading.Thread(target=chart_svg, args=(tiny,), name="warm-up-charts", daemon=True)
    thread.start()
    return thread


def render_html(report: dict, charts: dict[str, dict]) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG, no scripts)."""
    kpis = "".join(f"<div class='kpi'>{html.escape(k.replace('_', ' '))}<b>{html.escape(str(v))}</b></div>"
                   for k, v in report["summary"].items() if v is not None)
    charts_html = "".join(f"<h3>{html.escape(n.replace('_', ' '))}</h3><div class='chart'>{chart_svg(spec)}</div>"
                          for n, spec in charts.items())
    not_compared = report["files_not_compared"]
    blocking_note = (f"<p class='note'>No blocking rule fits these files' common roles, so they were not "
                     f"compared: {html.escape(', '.join(not_compared))}</p>" if not_compared else "")
    alone = report.get("records_not_compared")
    if alone:
        blocking_note += (f"<p class='note'>Records no rule compares with any other: {alone['records']:,} "
                          f"({100 * alone['share']:.2f}%); they can only stay on their own.</p>")
    sections = [
        ("Summary", kpis),
        ("Files and identifier completeness (share of records with each role)", html_table(report["completeness"])),
        ("Blocking rules and comparison counts", html_table(report["blocking"]) + blocking_note),
        ("Training", html_table(_training_rows(report["training"]))),
        ("Model parameters (m, u, match weight per level)", html_table(report["parameters"]) + charts_html),
        ("Match rates per file", html_table(report["match_rates"])),
        ("Cluster sizes", html_table(report["cluster_sizes"])),
        ("Metrics at several thresholds (model-expected, scored pairs)", html_table(report["thresholds"])),
        ("Match-weight distribution of scored pairs", html_table(report["histogram"])),
    ]
    return render_page("hhlink link-files report", "Linkage-quality report: link-files",
                       "Aggregates only. Model: Splink, dedupe within and link across the files, on keyed "
                       f"encodings; comparisons: {', '.join(report['comparisons'])}.", sections)


def write_report(con, inputs, summary: dict, charts: dict, out: Path) -> dict:
    """Write ``out/report.json`` and ``out/report.html``; return the report dict."""
    model = json.loads((out / "model.json").read_text())
    report = build_report(con, inputs, summary, model)
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=str))
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(render_html(report, charts), encoding="utf-8")
    return report
