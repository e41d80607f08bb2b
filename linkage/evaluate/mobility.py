"""Mobility estimates against the synthetic truth, for ``reports/evaluation.json``.

The planted elasticity, the population's own measures on the truth tables, and the
headline measures re-estimated with true person links and with all links true: how much
of the gap between estimate and truth is linkage error.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from linkage.assemble import mobility
from linkage.assemble.stage import COHORT_NUMERIC, COHORT_TEXT, AssembleError, load_inputs, spread, variant
from linkage.config import Config
from linkage.db import connect, read_literal
from linkage.workspace import Workspace

__all__ = ["mobility_evaluation"]


def _truth_measures(truth: Path, config: Config) -> dict:
    """IGE and rank-rank slope on the truth tables, with the cohort table's sample definition.

    The parents' side is the generator's own (``truth/children.parquet``: log mean PAYE
    earnings of the parents a child lived with at 10-16); the child's side is the mean
    PAYE pay over the adult ages' years with pay, from ``truth/person_years.parquet``.
    """
    b0, b1 = config.assemble.adult_pay_ages
    t = connect(config.assemble).sql(f"""
        with pay as (select y.person_id, avg(y.paye_pay) adult_pay
                     from read_parquet({read_literal(truth / 'person_years.parquet')}) y
                     join read_parquet({read_literal(truth / 'persons.parquet')}) p using (person_id)
                     where y.year - p.birth_year between {b0} and {b1} and y.paye_pay > 0 group by 1)
        select c.birth_year::double birth_year, c.parental_log_earnings_10_16 log_parents_earnings,
               exp(c.parental_log_earnings_10_16) parents_earnings, pay.adult_pay, ln(pay.adult_pay) log_adult_pay
        from read_parquet({read_literal(truth / 'children.parquet')}) c join pay using (person_id)
        where c.parental_log_earnings_10_16 is not null order by c.person_id""").to_arrow_table()
    d = {c: t[c].to_numpy() for c in t.column_names}
    n = t.num_rows
    d.update({c: np.full(n, np.nan) for c in COHORT_NUMERIC if c not in d})
    d.update({c: np.array([None] * n, dtype=object) for c in COHORT_TEXT})
    return mobility.headline(mobility.prepare(d))


def mobility_evaluation(config: Config, workspace: Path | str, key) -> dict:
    """The mobility estimates against the truth, for ``reports/evaluation.json``.

    Reads the planted elasticity (``truth/planted.json``), the estimates ``hhlink assemble``
    published (``research/mobility.parquet``) and its sensitivity analysis
    (``reports/mobility.json``), and re-estimates the headline measures with true person
    links and with all links (persons, households, parent-child) true.

    Returns:
        ``ige_planted``, ``ige_population`` (on the truth tables), ``ige_estimated``,
        ``ige_true_links``, ``ige_true_person_links``, the same for ``rank_slope_*``
        (``rank_slope_planted`` is the rank-rank slope on the truth tables: the generator
        plants the elasticity, so the truth tables define the rank slope), and
        ``mobility_sensitivity``: every variant and the spread of each measure.
    """
    from linkage.assemble.sensitivity import true_links, true_persons
    from linkage.crosswalk import CROSSWALK_FILE, crosswalk_table
    from linkage.pseudonymise.store import read_research

    ws = Workspace(workspace)
    truth = ws.zone("truth")
    research = ws.zone("research") / "mobility.parquet"
    if not research.exists():
        raise AssembleError(f"{research}: missing; run 'hhlink assemble' first")
    planted = json.loads((truth / "planted.json").read_text())
    national = {r["measure"]: r["estimate"]
                for r in read_research(ws.root, key, "mobility", ["measure", "estimate", "group_type"]).to_pylist()
                if r["group_type"] == "national"}
    population = _truth_measures(truth, config)
    report_path = ws.zone("reports") / "mobility.json"
    variants = json.loads(report_path.read_text())["sensitivity"]["variants"] if report_path.exists() else []
    lookup = config.paths.resolve(config.assemble.la_lookup)
    spill = Path(tempfile.mkdtemp(prefix=".assemble-eval.tmp-", dir=ws.root))
    con = connect(config.assemble, spill=spill, preserve_insertion_order=False)
    try:
        load_inputs(con, ws, key, lookup)
        crosswalk_table(con, ws.zone("pseudonymised") / CROSSWALK_FILE, key)
        con.execute(f"""
            create or replace table rec_truth as
            select xw.record_token, t.person_id truth_person
            from xw join read_parquet({read_literal(truth / 'source_rows.parquet')}) t
                 on t.source = xw.source and t.record_id = xw.record_id;
            create or replace table truth_py as select person_id, year, household_id
                from read_parquet({read_literal(truth / 'person_years.parquet')});
            create or replace table truth_pc as select parent_id, child_id from read_parquet({read_literal(truth / 'parent_child.parquet')});
        """)
        con.execute("drop table xw")
        persons = true_persons(con, config.link)
        person_links = variant(con, config, "true person links", persons)
        persons = true_links(con)
        all_links = variant(con, config, "true links", persons)
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
    variants = [v for v in variants if not v["variant"].startswith("true")] + [person_links, all_links]
    return {
        "ige_planted": planted["ige"], "ige_population": population["ige"],
        "ige_estimated": national.get("ige"), "ige_true_links": all_links["ige"],
        "ige_true_person_links": person_links["ige"],
        "rank_slope_planted": population["rank_slope"], "rank_slope_estimated": national.get("rank_slope"),
        "rank_slope_true_links": all_links["rank_slope"], "rank_slope_true_person_links": person_links["rank_slope"],
        "mobility_sensitivity": {"variants": variants, "spread": spread(variants)},
    }
