"""Evaluation against the synthetic ground truth (``truth/``), for the data engineer.

Truth is keyed by the departments' record ids; linkage outputs by record tokens. The
encrypted crosswalk (token -> record), opened with the key, joins the two, so
evaluation runs only where the key is held. It writes ``reports/evaluation.json``,
merging its keys into what other stages put there.

Metrics (records are landing rows; persons the true people):

* pairwise precision / recall / F1: over pairs of records placed in one person;
* cluster F1: a predicted person is right when it holds exactly one true person's
  records (precision over predicted persons, recall over true persons);
* metrics at each of ``link.evaluation_thresholds`` by re-clustering the kept pairs;
* after ``hhlink assemble``: the planted intergenerational elasticity and the truth's
  rank-rank slope beside the estimates from ``research/`` and on true links
  (``ige_*``, ``rank_slope_*``, ``mobility_sensitivity``; :func:`linkage.evaluate.mobility.mobility_evaluation`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import duckdb

from linkage.config import Config
from linkage.db import connect, read_literal
from linkage.keys import MasterKey
from linkage.link.linked_records import records_relation
from linkage.workspace import Workspace, atomic_path

PARENT_CHILD_PRECISION_TARGET = 0.999   # issue 15: parent-child recall is reported at this precision


def metrics_from_counts(tp: float, pred: float, true: float, exact: float, n_pred: float, n_true: float) -> dict:
    """Precision, recall and F1 (pairwise and cluster) from pair and cluster counts."""

    def f1(p: float, r: float) -> float:
        return 2 * p * r / (p + r) if p + r else 0.0

    precision = tp / pred if pred else 1.0
    recall = tp / true if true else 1.0
    cp = exact / n_pred if n_pred else 1.0
    cr = exact / n_true if n_true else 1.0
    return {"pairwise_precision": precision, "pairwise_recall": recall, "pairwise_f1": f1(precision, recall),
            "cluster_precision": cp, "cluster_recall": cr, "cluster_f1": f1(cp, cr)}


def pairwise_counts(con: duckdb.DuckDBPyConnection, assignments: str) -> tuple[float, ...]:
    """(true-positive pairs, predicted pairs, true pairs, exact clusters, predicted clusters, true clusters).

    ``assignments`` is a table or subquery with one row per record and columns
    ``pred`` (predicted cluster) and ``truth`` (true entity).
    """
    # Materialise the three count tables first: as one query with shared CTEs, DuckDB 2
    # planned this as a fan-out that spilled 21 GB and took four minutes at 100k persons.
    con.execute(f"create or replace temp table _cell as select pred, truth, count(*) n from {assignments} group by all")
    con.execute("create or replace temp table _p as select pred, sum(n) n from _cell group by all")
    con.execute("create or replace temp table _t as select truth, sum(n) n from _cell group by all")
    counts = con.execute("""
        select (select coalesce(sum(n * (n - 1) / 2), 0) from _cell)::double,
               (select coalesce(sum(n * (n - 1) / 2), 0) from _p)::double,
               (select coalesce(sum(n * (n - 1) / 2), 0) from _t)::double,
               (select count(*) from _cell c join _p p on p.pred = c.pred join _t t on t.truth = c.truth
                where c.n = p.n and c.n = t.n)::double,
               (select count(*) from _p)::double, (select count(*) from _t)::double""").fetchall()[0]
    con.execute("drop table _cell; drop table _p; drop table _t")
    return counts


def person_metrics(con: duckdb.DuckDBPyConnection, assignments: str) -> dict:
    """Precision, recall and F1 of a record -> (pred, truth) assignment; see :func:`pairwise_counts`."""
    return metrics_from_counts(*pairwise_counts(con, assignments))


def write_evaluation(workspace: Path | str, metrics: dict) -> Path:
    """Merge ``metrics`` into ``reports/evaluation.json`` (other stages' keys are kept)."""
    path = Workspace(workspace).zone("reports") / "evaluation.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(metrics)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    return path


def household_accuracy_sql() -> str:
    """SQL: share of observed person-years whose predicted co-residents are exactly the true ones.

    Needs tables ``rec_truth`` (record_token, person_key, truth_person, year),
    ``pk_truth`` (person_key, truth_person), ``households`` (person_key, year,
    household_key) and ``truth_py`` (person_id, year, household_id).
    """
    return """
        with observed as (select distinct truth_person, year from rec_truth),
        pred as (select p.truth_person, h.year, h.household_key from households h join pk_truth p using (person_key)),
        pred_sets as (select a.truth_person, a.year,
                             list(distinct b.truth_person order by b.truth_person) members
                      from pred a join pred b on a.household_key = b.household_key and a.year = b.year
                      join observed o on o.truth_person = b.truth_person and o.year = b.year
                      group by all),
        true_obs as (select t.person_id truth_person, t.year, t.household_id from truth_py t
                     join observed o on o.truth_person = t.person_id and o.year = t.year),
        true_sets as (select a.truth_person, a.year, list(distinct b.truth_person order by b.truth_person) members
                      from true_obs a join true_obs b on a.household_id = b.household_id and a.year = b.year
                      group by all)
        select avg(case when p.members = t.members then 1.0 else 0.0 end), count(*)
        from true_sets t left join pred_sets p using (truth_person, year)
    """


def household_accuracy_by_confidence_sql() -> str:
    """SQL: (confidence band, person-years, household accuracy) by the membership ``confidence`` of ``households``.

    The same accuracy as :func:`household_accuracy_sql`, per band of
    :data:`linkage.link.households.CONFIDENCE_BANDS`, to show whether the score means something.
    """
    from linkage.link.households import band_sql

    sql = household_accuracy_sql()
    body, _, _ = sql.rpartition("select avg(")
    return body + f"""
        , conf as (select p.truth_person, h.year, min(h.confidence) confidence
                   from households h join pk_truth p using (person_key) group by all)
        select {band_sql("c.confidence")} band, count(*) person_years,
               avg(case when p.members = t.members then 1.0 else 0.0 end) accuracy
        from true_sets t left join pred_sets p using (truth_person, year)
        join conf c using (truth_person, year)
        group by 1 order by 1
    """


def parent_child_metrics_sql(min_confidence: float = 0.0) -> str:
    """SQL: (precision, recall, predicted, true) of parent-child relations against the truth.

    Needs ``pk_truth``, ``parent_child`` (parent_key, child_key, confidence),
    ``truth_pc`` (parent_id, child_id) and ``rec_truth``.
    """
    return f"""
        with pred as (select distinct p.truth_person parent, c.truth_person child
                      from parent_child r join pk_truth p on p.person_key = r.parent_key
                      join pk_truth c on c.person_key = r.child_key
                      where r.confidence >= {min_confidence}),
        seen as (select distinct truth_person from rec_truth),
        tru as (select parent_id parent, child_id child from truth_pc
                where parent_id in (select truth_person from seen) and child_id in (select truth_person from seen)),
        tp as (select count(*) n from pred join tru using (parent, child))
        select (select n from tp) / nullif((select count(*) from pred), 0),
               (select n from tp) / nullif((select count(*) from tru), 0),
               (select count(*) from pred), (select count(*) from tru)
    """


def parent_child_curve_sql() -> str:
    """SQL: (confidence threshold, precision, recall) of parent-child relations at each distinct confidence.

    Needs the tables :func:`parent_child_metrics_sql` needs. The best recall at a precision
    target is the largest recall among rows whose precision meets it.
    """
    return """
        with seen as (select distinct truth_person from rec_truth),
        tru as (select distinct parent_id parent, child_id child from truth_pc
                where parent_id in (select truth_person from seen) and child_id in (select truth_person from seen)),
        pred as (select p.truth_person parent, c.truth_person child, max(r.confidence) confidence
                 from parent_child r join pk_truth p on p.person_key = r.parent_key
                 join pk_truth c on c.person_key = r.child_key group by all),
        scored as (select pred.confidence, (t.parent is not null)::int ok from pred left join tru t using (parent, child)),
        by_conf as (select confidence, count(*) n, sum(ok) tp from scored group by 1),
        cum as (select confidence, sum(n) over w n, sum(tp) over w tp from by_conf
                window w as (order by confidence desc rows between unbounded preceding and current row))
        select confidence, tp / n as "precision", tp / (select count(*) from tru) as recall from cum order by confidence desc
    """


def relation_evidence_sql(min_gap: int = 15, max_gap: int = 55) -> str:
    """SQL: the ceilings, shares of true relations with any evidence in the extracts, whatever the linkage did.

    Evidence is records of the two true persons sharing a claim, a benefit unit, a postcode
    token or an address filter. Returns one row:

    * co-residence: pairs of observed persons in one true household-year (as household
      accuracy counts them) with evidence in that year, and in that year or the one before or after;
    * parent-child (true relations, both observed): with evidence in the same year (a claim,
      postcode or address shared that year, the strict ceiling), with evidence in any years
      (a token shared across years: a benefit claim spans years, and a parent and a child can
      be recorded at one address in different years), and with evidence in any years and an
      age gap within ``min_gap``..``max_gap`` (what rules bound by those gaps can reach).

    Needs ``rec_ev`` (truth_person, year, claim_tok, postcode_tok, addr_bf, benefit_unit_tok),
    ``rec_truth``, ``truth_py``, ``truth_pc`` and ``truth_birth`` (person_id, birth_year).
    """
    return f"""
        with observed as (select distinct truth_person, year from rec_truth),
        true_obs as (select t.person_id p, t.year, t.household_id from truth_py t
                     join observed o on o.truth_person = t.person_id and o.year = t.year),
        co as (select a.p a, b.p b, a.year from true_obs a join true_obs b
               on a.household_id = b.household_id and a.year = b.year and a.p < b.p),
        tok as (select distinct truth_person, year, 'c' || claim_tok t from rec_ev where claim_tok is not null
                union select distinct truth_person, year, 'p' || postcode_tok from rec_ev where postcode_tok is not null
                union select distinct truth_person, year, 'a' || hex(addr_bf) from rec_ev where addr_bf is not null),
        ev as (select distinct ra.truth_person a, rb.truth_person b, ra.year from tok ra join tok rb
               on ra.t = rb.t and ra.year = rb.year and ra.truth_person < rb.truth_person),
        ev_co as (select co.a, co.b, co.year, max(case when ev.year = co.year then 1 else 0 end) same_year,
                         max(case when ev.year is not null then 1 else 0 end) near
                  from co left join ev on ev.a = co.a and ev.b = co.b and abs(ev.year - co.year) <= 1
                  group by all),
        seen as (select distinct truth_person from rec_truth),
        pc as (select distinct parent_id, child_id from truth_pc
               where parent_id in (select * from seen) and child_id in (select * from seen)),
        ev_pair as (select distinct a, b from ev),
        -- any years: the persons' tokens whatever the year, benefit units too
        tok_any as (select distinct truth_person, t from tok
                    union select distinct truth_person, 'u' || benefit_unit_tok from rec_ev
                    where benefit_unit_tok is not null),
        pc_tok as (select distinct least(parent_id, child_id) a, greatest(parent_id, child_id) b, parent_id, child_id
                   from pc),
        ev_any as (select distinct p.a, p.b from pc_tok p join tok_any ta on ta.truth_person = p.a
                   join tok_any tb on tb.truth_person = p.b and tb.t = ta.t),
        ev_pc as (select pc.*, e.a is not null found, x.a is not null found_any,
                         cb.birth_year - pb.birth_year between {min_gap} and {max_gap} in_bounds
                  from pc
                  left join ev_pair e on e.a = least(parent_id, child_id) and e.b = greatest(parent_id, child_id)
                  left join ev_any x on x.a = least(parent_id, child_id) and x.b = greatest(parent_id, child_id)
                  left join truth_birth pb on pb.person_id = pc.parent_id
                  left join truth_birth cb on cb.person_id = pc.child_id)
        select (select avg(same_year) from ev_co), (select avg(near) from ev_co),
               (select avg(found::int) from ev_pc), (select avg(found_any::int) from ev_pc),
               (select avg((found_any and coalesce(in_bounds, false))::int) from ev_pc)
    """


def _load(con: duckdb.DuckDBPyConnection, ws: Workspace, key) -> None:
    from linkage.crosswalk import CROSSWALK_FILE, crosswalk_table

    linked, truth = ws.zone("linked"), ws.zone("truth")
    crosswalk_table(con, ws.zone("pseudonymised") / CROSSWALK_FILE, key)
    con.execute(f"""
        create or replace table rec_truth as
        select r.record_token, r.unique_id, r.person_key, t.person_id truth_person, r.year
        from {records_relation(linked)} r join xw using (record_token)
        join {read_literal(truth / 'source_rows.parquet')} t on t.source = xw.source and t.record_id = xw.record_id""")
    con.execute("create or replace table pk_truth as select person_key, mode(truth_person) truth_person "
                "from rec_truth group by 1")
    # only the columns evaluation reads: Splink's clustering carries every column of its
    # node table through each step, and the identities' Bloom filters made that 15 GB at 100k
    for name, cols, path in (
            ("households", "person_key, year, household_key, confidence", linked / "households.parquet"),
            ("parent_child", "parent_key, child_key, confidence", linked / "parent_child.parquet"),
            ("pairs", "unique_id_l, unique_id_r, match_probability", linked / "pairs.parquet"),
            ("identities", "unique_id", linked / "identities.parquet"),
            ("truth_py", "person_id, year, household_id", truth / "person_years.parquet"),
            ("truth_pc", "parent_id, child_id", truth / "parent_child.parquet"),
            ("truth_birth", "person_id, birth_year", truth / "persons.parquet")):
        con.execute(f"create or replace table {name} as select {cols} from {read_literal(path)}")


def _by_threshold(con: duckdb.DuckDBPyConnection, thresholds: list[float]) -> list[dict]:
    from splink import DuckDBAPI
    from splink.clustering import cluster_pairwise_predictions_at_threshold

    out = []
    for t in thresholds:
        clusters = cluster_pairwise_predictions_at_threshold(
            "identities", "pairs", DuckDBAPI(connection=con), node_id_column_name="unique_id",
            threshold_match_probability=t)
        m = person_metrics(con, f"(select c.cluster_id pred, r.truth_person truth from rec_truth r "
                                f"join {clusters.physical_name} c using (unique_id))")
        out.append({"threshold": t, **{k: round(v, 6) for k, v in m.items()}})
    return out


def evaluate(config: Config, workspace: Path | str, key: MasterKey | None = None) -> dict:
    """Compare ``linked/`` with ``truth/`` and write ``reports/evaluation.json``.

    Args:
        config: the hhlink configuration.
        workspace: a workspace holding ``truth/``, ``pseudonymised/crosswalk.enc`` and ``linked/``.
        key: the master key (default: loaded from ``HHLINK_KEY``, ``HHLINK_KEY_FILE`` or the default file).

    Returns:
        The metrics written (``person_pairwise_precision``, ``person_pairwise_recall``,
        ``person_pairwise_f1``, ``person_cluster_f1``, ``household_accuracy``,
        ``parent_child_precision``, ``parent_child_recall``, the ceilings (``coresidence_evidence_*``,
        ``parent_child_evidence_ceiling`` (any years), ``parent_child_evidence_same_year``,
        ``parent_child_evidence_within_age_gap``: :func:`relation_evidence_sql`) and per-threshold metrics).

    Example:
        >>> evaluate(load_config(), "workspace")["person_pairwise_f1"]   # doctest: +SKIP
        0.999...
    """
    from linkage.errors import WorkspaceError
    from linkage.keys import load_master_key
    from linkage.link.stage import linked_threshold

    ws = Workspace(workspace)
    for zone in ("truth", "linked"):
        if not ws.zone(zone).is_dir():
            raise WorkspaceError(f"{ws.zone(zone)}: missing; evaluation needs the ground truth and a linkage run")
    key = key if key is not None else load_master_key(workspace=ws.root)
    spill = tempfile.mkdtemp(prefix=".evaluate.tmp-", dir=ws.root)   # spills stay on the workspace disk
    con = connect(config.link, spill=spill, preserve_insertion_order=False)
    try:
        _load(con, ws, key)
        m = person_metrics(con, "(select person_key pred, truth_person truth from rec_truth)")
        hh, _ = con.execute(household_accuracy_sql()).fetchall()[0]
        pc_p, pc_r, _, _ = con.execute(parent_child_metrics_sql()).fetchall()[0]
        from linkage.pseudonymise.store import load_zone

        load_zone(con, "ids_ev", ws.root, "identifiers", key, ["record_token", "claim_tok", "postcode_tok", "addr_bf",
                                                               "benefit_unit_tok"])
        con.execute("""create or replace table rec_ev as select r.truth_person, r.year, i.claim_tok,
                       i.postcode_tok, i.addr_bf, i.benefit_unit_tok from rec_truth r join ids_ev i using (record_token)""")
        co_same, co_near, pc_same_year, pc_ev, pc_in_bounds = con.execute(relation_evidence_sql(
            config.link.parent_min_age_gap, config.link.parent_max_age_gap)).fetchall()[0]
        hh_by_conf = [{"band": b, "person_years": n, "accuracy": round(a, 4)}
                      for b, n, a in con.execute(household_accuracy_by_confidence_sql()).fetchall()]
        curve = con.execute(parent_child_curve_sql()).fetchall()
        at_target = max((r for _, p, r in curve if p >= PARENT_CHILD_PRECISION_TARGET), default=0.0)
        metrics = {
            "person_pairwise_precision": m["pairwise_precision"], "person_pairwise_recall": m["pairwise_recall"],
            "person_pairwise_f1": m["pairwise_f1"], "person_cluster_f1": m["cluster_f1"],
            "person_cluster_precision": m["cluster_precision"], "person_cluster_recall": m["cluster_recall"],
            "household_accuracy": hh, "parent_child_precision": pc_p, "parent_child_recall": pc_r,
            # the ceiling: true relations with any evidence in the extracts (whatever the linkage did)
            "coresidence_evidence_same_year": co_same, "coresidence_evidence_ceiling": co_near,
            "parent_child_evidence_ceiling": pc_ev, "parent_child_evidence_same_year": pc_same_year,
            "parent_child_evidence_within_age_gap": pc_in_bounds,
            "household_accuracy_by_confidence": hh_by_conf,
            "parent_child_recall_at_precision_target": {
                "precision_target": PARENT_CHILD_PRECISION_TARGET, "recall": at_target,
                "min_confidence": next((c for c, p, r in curve if p >= PARENT_CHILD_PRECISION_TARGET
                                        and r == at_target), None)},
            "person_metrics_by_threshold": _by_threshold(con, config.link.evaluation_thresholds),
            "linkage_threshold": linked_threshold(config, ws.zone("linked")),
        }
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
    if (ws.zone("research") / "mobility.parquet").exists():
        # after hhlink assemble: planted vs estimated mobility, and the estimates on true links
        from linkage.evaluate.mobility import mobility_evaluation

        metrics.update(mobility_evaluation(config, workspace, key))
    write_evaluation(workspace, metrics)
    from linkage.link.report import write_report

    write_report(config, workspace)
    return metrics
