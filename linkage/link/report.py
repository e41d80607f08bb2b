"""The linkage-quality report for auditors: ``reports/linkage/report.json`` and ``report.html``.

Follows GUILD (Guidance for Information about Linking Data sets) and RECORD practice:
coverage and identifier completeness per source; blocking rules and comparison counts;
m and u per level and Splink's own match-weight charts; match rates per source and by
subgroup, with linked-versus-unlinked comparisons to expose linkage bias; the model's
expected precision beside the true one (when ``hhlink evaluate`` has run); metrics at
several thresholds; and counts of implausible links.

The HTML is one self-contained file: styles inline, charts rendered to inline SVG
(``vl-convert``, no JavaScript, nothing fetched), so it reads the same inside a secure
environment with no internet. Only aggregates appear; no record, token or key.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import duckdb

from linkage.config import Config
from linkage.db import connect, quote_ident, read_literal
from linkage.link.households import confidence_distributions
from linkage.link.model import ADDRESS_COLUMNS, IDENTITY_COLUMNS
from linkage.link.linked_records import records_relation
from linkage.workspace import Workspace, atomic_path


def query_rows(con: duckdb.DuckDBPyConnection, sql: str) -> list[dict]:
    cur = con.execute(sql)
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


# the identifiers whose completeness the report shows
COMPLETENESS_COLUMNS = tuple(c for c in (*IDENTITY_COLUMNS, *ADDRESS_COLUMNS)
                             if not c.startswith(("dob_year", "dob_month", "dob_day", "pc_")))


def completeness_counts(con: duckdb.DuckDBPyConnection, identifiers: str) -> dict:
    """Per source: records, and the non-null values of each of :data:`COMPLETENESS_COLUMNS`.

    Counts rather than shares, so that a release adds its new records' counts to the ones the
    link state carries (:mod:`linkage.link.state`) and gets a full run's shares.
    """
    exprs = ", ".join(f"count({quote_ident(c)})" for c in COMPLETENESS_COLUMNS)
    return {source: {"records": int(n), **{c: int(v) for c, v in zip(COMPLETENESS_COLUMNS, nonnull)}}
            for source, n, *nonnull in con.execute(f"select source, count(*), {exprs} from {identifiers} "
                                                    "group by source").fetchall()}


def completeness_rows(counts: dict) -> list[dict]:
    """Per source: records, and the share of them holding each identifier (from :func:`completeness_counts`)."""
    return [{"source": source, "records": c["records"],
             **{col: round(c[col] / c["records"], 4) for col in COMPLETENESS_COLUMNS}}
            for source, c in sorted(counts.items()) if c["records"]]


def completeness(con, identifiers: str) -> list[dict]:
    """Per source: records, and the share of them holding each identifier (the link stage computes it)."""
    return completeness_rows(completeness_counts(con, identifiers))


def person_sources(con, identities: str) -> None:
    """Table ``person_source``: per person and source, its records and their lowest and highest birth year.

    From the linked identities (``linked/identities.parquet``: source, birth year, records and
    person of each), 4.8 million rows at 1M persons rather than the 19.4 million records: an
    identity's records share its source and its date-of-birth encoding, so its birth year
    (``year(dob)``) too, and it counts them (``n_records``). The match rates, the birth-year
    spans and who holds an adult record are all aggregates of this table; a test checks each
    against the per-record computation.
    """
    con.execute(f"""create or replace temp table person_source as
                    select person_key, source, sum(n_records) n, min(birth_year) min_birth_year,
                           max(birth_year) max_birth_year
                    from {identities} where person_key is not null group by all""")


def match_rates(con) -> list[dict]:
    """Per source: its records, and the share of them whose person holds records of each source (or of another).

    Weighted by each person-source's records, which is the average over records a
    per-record join would take (:func:`person_sources`).
    """
    def share(flag: str) -> str:
        return f"round(sum(case when {flag} then s.n else 0 end) / sum(s.n), 4)"

    return query_rows(con, f"""
        with p as (select person_key, bool_or(source = 'education') edu, bool_or(source = 'benefits') ben,
                          bool_or(source = 'earnings') ear, count(source) n_sources
                   from person_source group by 1)
        select s.source, sum(s.n)::bigint records, {share("p.edu")} with_education, {share("p.ben")} with_benefits,
               {share("p.ear")} with_earnings, {share("p.n_sources > 1")} with_another_source
        from person_source s join p using (person_key) group by 1 order by 1""")


def _most_frequent_sql(rows: str, column: str) -> str:
    """A CTE ``m_<column>``: per person of ``rows``, the most frequent non-null ``column``, ties to the lowest."""
    c = quote_ident(column)
    return f"""m_{column} as (select person_key, arg_min({c}, {{'k': -n, 'v': {c}}}) {c}
                          from (select person_key, {c}, count(*) n from {rows} where {c} is not null group by 1, 2)
                          group by 1)"""


def subgroups(con, payload: str | None, end_year: int, la_lookup: Path, records: str) -> dict:
    """Pupils old enough to be adults in the window: who links to adult records, by subgroup.

    ``records``: the linked records (``record_token, source, birth_year, person_key``); who holds
    an adult record comes from ``person_source`` (:func:`person_sources`). A pupil's birth year
    is the lowest of their school records', their ethnicity and local authority the most frequent
    (ties to the lowest): the same figures from every run, which a pick of any value, or
    of the most frequent in the order rows happen to arrive, did not give (a few pupils moved
    between groups from one run to the next at 1M persons).
    """
    if payload is None:
        return {}
    con.execute(f"""
        create or replace temp table school_records as
        select r.person_key, r.birth_year, p.fsm, p.ethnicity, p.la_code
        from (select record_token, person_key, birth_year from {records} where source = 'education') r
             join {payload} p using (record_token)""")
    con.execute(f"""
        create or replace table pupils as
        with adult as (select distinct person_key from person_source where source in ('benefits', 'earnings')),
        {_most_frequent_sql("school_records", "ethnicity")}, {_most_frequent_sql("school_records", "la_code")},
        edu as (select person_key, min(birth_year) birth_year, max(fsm) ever_fsm from school_records group by 1)
        select e.person_key, e.birth_year, e.ever_fsm, m_ethnicity.ethnicity, m_la_code.la_code,
               e.person_key in (select person_key from adult) as linked,
               coalesce(la.region_name, 'unknown') region,
               (e.birth_year // 5 * 5)::varchar || '-' || (e.birth_year // 5 * 5 + 4)::varchar birth_cohort
        from edu e left join m_ethnicity using (person_key) left join m_la_code using (person_key)
             left join read_csv({read_literal(la_lookup)}) la on la.utla_code = m_la_code.la_code
        where e.birth_year <= {end_year} - 22""")
    con.execute("drop table school_records")
    out = {}
    for dim, expr in (("ethnicity", "ethnicity"), ("ever_fsm", "ever_fsm::varchar"), ("region", "region"),
                      ("birth_cohort", "birth_cohort")):
        out[dim] = query_rows(con, f"""select {expr} as "group", count(*) pupils, round(avg(linked::int), 4) link_rate
                                  from pupils group by 1 order by 1""")
    out["linked_vs_unlinked"] = query_rows(con, """
        select case when linked then 'linked' else 'unlinked' end as "group", count(*) pupils,
               round(avg(ever_fsm), 4) fsm_share, round(avg((ethnicity = 'WBRI')::int), 4) white_british_share,
               round(avg(birth_year), 1) mean_birth_year
        from pupils group by 1 order by 1""")
    return out


def threshold_rows(con, thresholds: list[float]) -> list[dict]:
    out = []
    total = con.execute("select sum(match_probability) from pairs").fetchall()[0][0] or 0.0
    for t in thresholds:
        n, exp_tp = con.execute(f"select count(*), sum(match_probability) from pairs where match_probability >= {t}").fetchall()[0]
        out.append({"threshold": t, "pairs": n, "expected_precision": round(exp_tp / n, 5) if n else None,
                    "expected_recall_of_kept_pairs": round((exp_tp or 0.0) / total, 5) if total else None})
    return out


def claim_implausible_sql(records: str) -> str:
    """SQL: one row, persons holding a parent and their dependant, and persons holding two adults of one benefit unit.

    A person's records on one claim and year hold a parent and their dependant when some are
    dependants and some are adults (a known role other than dependant), and two adults when
    they hold two adult roles (a claimant and their partner; two records of one role are a
    re-delivery): what a self-join of those records on claim, year and person finds pair by
    pair, counted per group. ``records``: linked records (person_key, claim_tok, year, bu_role).
    The link stage counts them on its own records (``summary.json``'s ``implausible_claims``).
    """
    return f"""
        with same as (select person_key,
                             bool_or(bu_role = 'dependant') and bool_or(bu_role <> 'dependant') parent_child,
                             min(bu_role) filter (where bu_role <> 'dependant')
                             <> max(bu_role) filter (where bu_role <> 'dependant') two_adults
                      from (select person_key, claim_tok, year, bu_role from {records} where claim_tok is not null)
                      where person_key is not null group by claim_tok, year, person_key)
        select (select count(distinct person_key) from same where parent_child),
               (select count(distinct person_key) from same where two_adults)"""


def implausible_counts(con, records: str, claims: list[int] | None = None) -> tuple[int, int, int]:
    """Persons holding a parent and their dependant, two adults of one benefit unit, or birth years more than one apart.

    The first two by :func:`claim_implausible_sql` over ``records``, unless ``claims`` gives
    them (the link stage's count over the same records, which it holds in memory: at
    1,000,000 persons reading and joining every record again took 3.6 s of the report). The
    birth-year span comes from ``person_source``.
    """
    if claims is None:
        claims = con.execute(claim_implausible_sql(records)).fetchall()[0]
    gap = con.execute("""select count(*) from (select person_key, max(max_birth_year) - min(min_birth_year) gap
                                              from person_source group by 1) where gap > 1""").fetchall()[0][0]
    return int(claims[0]), int(claims[1]), int(gap)


def mu_rows(model: dict) -> list[dict]:
    rows = []
    for comp in model["comparisons"]:
        for level in comp["comparison_levels"]:
            if level.get("is_null_level"):
                continue
            m, u = level.get("m_probability"), level.get("u_probability")
            rows.append({"comparison": comp["output_column_name"],
                         "level": level.get("label_for_charts") or level["sql_condition"],
                         "m": m, "u": u, "match_weight": round(math.log2(m / u), 2) if m and u else None})
    return rows


def build_report(config: Config, workspace: Path | str, key=None) -> dict:
    """Compute the report's content (aggregates only) from ``linked/`` and ``pseudonymised/``.

    The identifiers and the education payload are encrypted at rest: with ``key`` (the
    master key; the link stage passes it) the completeness and subgroup sections are computed
    from them; without it (``hhlink evaluate`` rewriting the report) they are carried over
    from the report the link stage wrote.
    """
    from linkage.pseudonymise.store import load_zone, zone_files

    ws = Workspace(workspace)
    linked = ws.zone("linked")
    con = connect(config.link)
    previous_path = ws.zone("reports") / "linkage" / "report.json"
    previous = json.loads(previous_path.read_text()) if key is None and previous_path.exists() else {}
    summary = json.loads((linked / "summary.json").read_text())
    complete = summary.get("completeness")
    if key is not None and complete is None:
        # a linked/ written before the link stage computed it
        load_zone(con, "ids_in", ws.root, "identifiers", key, ["source", *IDENTITY_COLUMNS, *ADDRESS_COLUMNS])
        complete = completeness(con, "ids_in")
    payload = None
    if key is not None and any(f.stem == "education" for f in zone_files(ws.root, "payload")):
        # the columns the subgroups read (a Parquet-encrypted file decrypts only the columns read)
        load_zone(con, "payload_education", ws.root, "payload", key, ["record_token", "fsm", "ethnicity", "la_code"],
                  sources=["education"])
        payload = "payload_education"
    # only the columns each figure needs, read where they are: no copy of the 19 million records
    # (942 MB of Parquet at 1M persons, a third of it record tokens) is held
    con.execute(f"create temp table report_persons as select unique_id, person_key "
                f"from {read_literal(linked / 'identities.parquet')}")
    records = records_relation(linked, persons="report_persons")   # scanned twice: identities read once
    person_sources(con, read_literal(linked / "identities.parquet"))
    con.execute(f"create table pairs as select match_probability, match_weight "
                f"from {read_literal(linked / 'pairs.parquet')}")
    model = json.loads((linked / "model.json").read_text())
    evaluation_path = ws.zone("reports") / "evaluation.json"
    evaluation = json.loads(evaluation_path.read_text()) if evaluation_path.exists() else {}
    parent_child, two_adults, dob_gap = implausible_counts(con, records, summary.get("implausible_claims"))
    report = {
        "summary": {k: summary.get(k) for k in ("engine", "threshold", "records", "identities", "persons",
                                                "household_years", "parent_child_relations", "pairs_scored",
                                                "probability_two_random_records_match", "seconds")},
        "completeness": complete if complete is not None else previous.get("completeness", []),
        "blocking": summary.get("blocking", []),
        "uncompared": summary.get("uncompared"),
        "blocking_counted_at": summary.get("blocking_counted_at"),
        "parameters": mu_rows(model),
        "match_rates": match_rates(con),
        "subgroups": (subgroups(con, payload, config.generate.end_year, config.paths.resolve(config.assemble.la_lookup),
                                 records)
                      if key is not None else previous.get("subgroups", {})),
        "thresholds": threshold_rows(con, config.link.evaluation_thresholds),
        "implausible_links": {"persons_holding_a_parent_and_their_dependant": parent_child,
                              "persons_holding_two_adults_of_one_benefit_unit": two_adults,
                              "persons_with_birth_years_more_than_one_apart": dob_gap},
        "expected_vs_true": {
            "expected_precision_at_threshold": next(
                (t["expected_precision"] for t in threshold_rows(con, [summary.get("threshold", config.link.threshold)])),
                None),
            "true_pairwise_precision": evaluation.get("person_pairwise_precision"),
            "true_pairwise_recall": evaluation.get("person_pairwise_recall"),
            "true_metrics_by_threshold": evaluation.get("person_metrics_by_threshold"),
        },
        "histogram": query_rows(con, """select floor(match_weight) as weight, count(*) pairs from pairs
                                   group by 1 order by 1"""),
        "confidence": confidence_distributions(con, linked),
        # the stored model and how far this release's data drifted from it (linkage.link.drift)
        "model": summary.get("model"),
        "drift": summary.get("drift"),
    }
    con.close()
    return report


def chart_svg(spec: dict) -> str:
    import vl_convert as vlc

    return vlc.vegalite_to_svg(spec)


def html_table(rows: list[dict]) -> str:
    if not rows:
        return "<p class='note'>No data.</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in r.values())
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:70rem;color:#1b1b1b;
line-height:1.45;background:#fafafa}h1{color:#0b3d62;border-bottom:3px solid #0b3d62;padding-bottom:.3rem}
h2{color:#0b3d62;margin-top:2rem}table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.85rem;background:#fff}
th{background:#0b3d62;color:#fff;text-align:left;padding:.3rem .6rem}td{border-bottom:1px solid #ddd;padding:.25rem .6rem}
tr:nth-child(even) td{background:#f2f6f9}.note{color:#555;font-style:italic}.kpi{display:inline-block;margin:0 1.5rem .8rem 0;
padding:.6rem 1rem;background:#fff;border-left:5px solid #0b3d62}.kpi b{display:block;font-size:1.4rem}
.chart{background:#fff;padding:.5rem;margin:.5rem 0;overflow-x:auto}
"""


def render_html(report: dict, charts: dict[str, dict]) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG, no scripts)."""
    s = report["summary"]
    kpis = "".join(f"<div class='kpi'>{html.escape(k.replace('_', ' '))}<b>{html.escape(str(v))}</b></div>"
                   for k, v in s.items() if v is not None)
    sub = report["subgroups"]
    sub_html = "".join(f"<h3>{html.escape(k.replace('_', ' '))}</h3>{html_table(v)}" for k, v in sub.items()) or \
        "<p class='note'>No payload to break match rates down by.</p>"
    chart_html = "".join(f"<h3>{html.escape(name.replace('_', ' '))}</h3><div class='chart'>{chart_svg(spec)}</div>"
                         for name, spec in charts.items())
    ev = report["expected_vs_true"]
    sections = [
        ("Summary", kpis),
        ("Coverage and identifier completeness", html_table(report["completeness"])),
        ("Blocking rules and comparison counts", html_table(report["blocking"]) + _uncompared_html(report.get("uncompared"))
         + _counted_html(report.get("blocking_counted_at"))),
        ("Model parameters (m, u, match weight per level)", html_table(report["parameters"]) + chart_html),
        ("Match rates per source", html_table(report["match_rates"])),
        ("Match rates by subgroup: pupils old enough to appear as adults", sub_html),
        ("Expected versus true quality", html_table([{k: v for k, v in ev.items() if k != "true_metrics_by_threshold"}])
         + html_table(ev.get("true_metrics_by_threshold") or [])),
        ("Metrics at several thresholds (model-expected, identity pairs)", html_table(report["thresholds"])),
        ("Implausible links", html_table([report["implausible_links"]])),
        ("Match-weight distribution of scored pairs", html_table(report["histogram"])),
        *((f"Confidence distribution: {k.replace('_', ' ')}", html_table(v))
          for k, v in report.get("confidence", {}).items()),
        ("Model and drift since it was trained", _drift_html(report.get("model"), report.get("drift"))),
    ]
    return render_page("hhlink linkage-quality report", "Linkage-quality report",
                       "Aggregates only. Model: Splink, link and dedupe over education, benefits and earnings "
                       "on keyed encodings.", sections)


def render_page(title: str, heading: str, note: str, sections: list[tuple[str, str]]) -> str:
    """A self-contained report page (inline CSS, no assets): a heading, a note and titled sections of HTML."""
    body = "".join(f"<section><h2>{html.escape(t)}</h2>{c}</section>" for t, c in sections)
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(heading)}</h1>"
            f"<p class='note'>{html.escape(note)}</p>{body}</body></html>")


def _drift_html(model: dict | None, drift: dict | None) -> str:
    """The model used (fingerprint, reused or trained) and, per level, its m and u beside this release's shares."""
    if not model:
        return "<p class='note'>No model facts (linked before the model store).</p>"
    head = (f"<p>Model <code>{html.escape(str(model.get('fingerprint')))}</code>: {html.escape(str(model.get('mode')))}"
            f" (trained {html.escape(str(model.get('trained_at')))}).</p>")
    if not drift:
        return head + "<p class='note'>Trained on this release's data: later releases are measured against it.</p>"
    gate, rm = drift.get("gate") or {}, drift.get("records_matched") or {}
    note = (f"<p class='note'>Scope: {html.escape(str(drift.get('scope')))}; {drift.get('matched_pairs')} predicted "
            f"matches, {drift.get('random_pairs')} random pairs. Records matched to another source: "
            f"{rm.get('at_training')} at training, {rm.get('now')} now (of {rm.get('records')} records). "
            f"Gate (link.max_drift {gate.get('bound')}): {'passed' if gate.get('passed') else 'STOPPED'}"
            f"{'; ' + html.escape(str(gate['reason'])) if gate.get('reason') else ''}. m and u shares are per "
            "level among predicted matches and random pairs, at training and now, weighted to this release's "
            "mix of source pairs; drift is the larger absolute change.</p>")
    return head + note + html_table(drift.get("levels") or [])


def _counted_html(counted_at: str | None) -> str:
    """When the counts above were made: an incremental release scores only its delivery's pairs and
    carries the counts of the last release that made them over every identity."""
    if not counted_at:
        return ""
    return (f"<p class='note'>Counted over every identity at {html.escape(str(counted_at))}; a release that links a "
            "delivery incrementally carries these counts (its own pairs scored are in the summary).</p>")


def _uncompared_html(u: dict | None) -> str:
    if not u:
        return ""
    return (f"<p class='note'>Identities no rule compares with any other: {u['identities_no_rule_compares']:,} of "
            f"{u['identities']:,} ({u['identities_share']:.2%}; {u['records_share']:.2%} of records). They can only "
            "be persons of their own. Counted exactly, on every identity. Identities equal on a NINO, a UPN, or "
            "forename, surname and date of birth form anchor groups whose members are all compared; the other "
            "rules compare a few identities per anchor group (most records first), so their counts grow with the "
            "population, not its square.</p>")


def write_report(config: Config, workspace: Path | str, key=None) -> dict:
    """Write ``reports/linkage/report.json`` and ``report.html``; return the report dict.

    Example:
        >>> write_report(load_config(), "workspace")["summary"]["persons"]   # doctest: +SKIP
    """
    ws = Workspace(workspace)
    report = build_report(config, workspace, key)
    charts_dir = ws.zone("linked") / "charts"
    charts = {p.name.removesuffix(".vl.json"): json.loads(p.read_text()) for p in sorted(charts_dir.glob("*.vl.json"))}
    out = ws.zone("reports") / "linkage"
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=str))
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(render_html(report, charts), encoding="utf-8")
    return report
