"""Incremental prediction: a delivery's identities scored against everything, the rest of the pairs carried.

With the stored model reused (:mod:`linkage.link.model_store`), a pair of identities
neither of which gained a record since the previous release scores as it did then: its
comparison values (the identity's encodings, its most frequent address, its postcodes,
its year of birth) all come from its records, and the model is the same. So only pairs
with at least one *touched* identity (one holding a record the previous ``linked/`` did
not have) are scored; the previous release's pairs between untouched identities are
carried over, and persons are the connected components of both, as in a full run; those
components are recomputed only over the identities this release's evidence reaches
(:func:`cluster_affected`), every other identity keeping its previous person.

Record tokens persist from release to release because pseudonymise is incremental
(:func:`linkage.pseudonymise.stage.plan_increment`); after a full pseudonymise every
record is new, every identity touched, and the run is a full one. A model with
term-frequency adjustments (the stored one has none) would make the one difference from a
full run: carried pairs would keep those of the release that scored them.
``bench/incremental.py`` measures the pairwise F1 of the incremental result against a full
re-link.

Splink is given only the identities that can be in a scored pair: the touched ones and
those sharing a prediction rule's value with one (:func:`reachable_identities`); at
1,000,000 persons this is a small part of the millions of identities, all of which were
joined on each rule's keys before the touched filter dropped most pairs. The pairs are the
same (a model with term-frequency adjustments would take them from its input, so the link
stage then gives Splink every identity).

Used only on DuckDB and only when every condition holds (:func:`scope`); otherwise the
link runs in full and the summary says why.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import duckdb

from linkage.config import LinkConfig
from linkage.db import read_literal
from linkage.link.model import rule_sql
from linkage.link.model_store import fingerprint
from linkage.link.linked_records import record_files, records_relation

__all__ = ["scope", "restricted_rules", "reachable_identities", "merge_pairs", "cluster_affected"]

log = logging.getLogger(__name__)

TOUCHED = "(l.touched OR r.touched)"


def scope(con: duckdb.DuckDBPyConnection, previous: Path, model: Path, lc: LinkConfig,
          threshold: float, touched: str | None = None) -> tuple[dict | None, str]:
    """Mark the touched identities and say whether this run can be incremental, with the reason.

    Args:
        con: the link stage's connection, holding ``records`` and ``identities``.
        previous: the previous release's ``linked/``.
        model: the model file this run scores with.
        lc: the link settings (``incremental``, ``incremental_max_share``, ``keep_pairs_above``).
        threshold: the probability this run clusters at (:func:`linkage.link.stage.effective_threshold`).
        touched: a table (unique_id) of the identities holding records the previous release did not
            have, when the caller knows them (:mod:`linkage.link.state`); else they are found by
            reading the previous release's records (:mod:`linkage.link.linked_records`).

    Returns:
        ``(facts, reason)``: facts (touched and total identities, the previous pairs' path)
        when incremental, else None; only when incremental, ``identities`` gains a boolean
        column ``touched`` and the table ``previous_persons`` (unique_id, person_key) holds
        the previous release's persons.
    """
    if not lc.incremental:
        return None, "full: link.incremental is false"
    if lc.engine != "duckdb":
        return None, "full: incremental prediction runs on DuckDB only"
    files = {n: previous / n for n in ("pairs.parquet", "model.json", "summary.json")}
    if not all(p.is_file() for p in files.values()) or (touched is None and not record_files(previous)):
        return None, "full: no previous release to build on"
    if fingerprint(files["model.json"]) != fingerprint(model):
        return None, "full: the model differs from the one that scored the previous release's pairs"
    try:
        before = json.loads(files["summary.json"].read_text())
    except (OSError, ValueError):
        return None, "full: the previous release's summary is unreadable"
    if before.get("keep_pairs_above") != lc.keep_pairs_above:
        return None, "full: link.keep_pairs_above differs from the previous release's"
    if before.get("threshold") != threshold:
        # the previous persons are its components at its threshold; untouched ones are carried as they are
        return None, "full: the threshold differs from the previous release's"
    identities = previous / "identities.parquet"
    if not identities.is_file():
        return None, "full: no previous release to build on"
    # read once: the check below and cluster_affected both need the previous persons
    con.execute(f"""create or replace temp table previous_persons as
                    select unique_id, person_key from read_parquet({read_literal(identities)})""")
    gone = con.execute("select count(*) from previous_persons anti join identities using (unique_id)").fetchone()[0]
    if gone:
        con.execute("drop table previous_persons")
        # records only arrive between releases; an identity that went is a re-delivered or removed file
        return None, f"full: {gone:,} identities of the previous release are no longer in the zone"
    if touched is not None:
        con.execute(f"create or replace temp table _touched as select distinct unique_id from {touched}")
    else:
        con.execute(f"""create or replace temp table _touched as
                        select distinct unique_id from records
                        anti join {records_relation(previous, person_key=False)} using (record_token)""")
    touched, total = con.execute("select (select count(*) from _touched), (select count(*) from identities)").fetchone()
    if total and touched / total > lc.incremental_max_share:
        con.execute("drop table _touched; drop table previous_persons")
        return None, (f"full: {touched:,} of {total:,} identities gained records "
                      f"(more than link.incremental_max_share = {lc.incremental_max_share})")
    con.execute("alter table identities add column touched boolean")
    con.execute("update identities set touched = unique_id in (select unique_id from _touched)")
    con.execute("drop table _touched")
    return ({"touched_identities": int(touched), "identities": int(total), "previous_pairs": files["pairs.parquet"],
             "previous_blocking": {k: before.get(k) for k in ("blocking", "uncompared")},
             "blocking_counted_at": before.get("blocking_counted_at")},
            f"incremental: {touched:,} of {total:,} identities gained records")


def restricted_rules(rules, dialect: str = "duckdb") -> list[dict]:
    """The prediction blocking rules (:func:`linkage.link.blocking.anchored_rules`), each limited to
    pairs with a touched identity on either side."""
    return [{"blocking_rule": f"({rule_sql(r.rule)}) AND {TOUCHED}", "sql_dialect": dialect} for r in rules]


def reachable_identities(con: duckdb.DuckDBPyConnection, table: str, rules, out: str = "reachable") -> int:
    """Table ``out`` (unique_id): the touched identities of ``table`` and those a prediction rule can pair with one.

    :func:`restricted_rules` keep only pairs with a touched side, and a rule pairs two
    identities only when they are equal on its columns (or, for a rule equating different
    columns, the left's on one and the right's on the other, either way round). An identity
    sharing no rule's value with a touched one is in no pair the rules keep, so predicting on
    ``out`` alone gives the pairs predicting on ``table`` gives (without term-frequency
    adjustments, which Splink takes from its input). ``table`` holds the identities
    with their rule keys (:func:`linkage.link.blocking.build_blocking_keys`) and ``touched``.
    Returns the identities in ``out``.
    """
    from linkage.link.blocking import rule_sides

    parts = [f"select unique_id from {table} where touched"]
    for r in rules:
        left, right = rule_sides(r.rule)
        for a, b in {(left, right), (right, left)}:
            present = " and ".join(f"{c} is not null" for c in b)
            on = " and ".join(f"x.{ca} = t.{cb}" for ca, cb in zip(a, b))
            parts.append(f"""select x.unique_id from {table} x
                             semi join (select distinct {", ".join(b)} from {table} where touched and {present}) t
                             on {on}""")
    con.execute(f"create or replace temp table {out} as " + "\nunion\n".join(parts))
    return con.execute(f"select count(*) from {out}").fetchall()[0][0]


def merge_pairs(con: duckdb.DuckDBPyConnection, scored: str, facts: dict) -> str:
    """``pairs_merged``: this run's scored pairs and the previous pairs between untouched identities.

    Columns as Splink's predictions (``unique_id_l/_r``, ``source_dataset_l/_r``,
    ``match_weight``, ``match_probability``). Returns the table's name.
    """
    # the few touched identities, anti-joined: every previous pair's identities are still here (scope
    # checked it), and a join with every identity, twice, took 2.7 s at 1,000,000 persons against 0.8 s
    con.execute(f"""create or replace temp table _touched_ids as select unique_id from identities where touched;
        create or replace table pairs_merged as
        select unique_id_l, unique_id_r, source_dataset_l, source_dataset_r, match_weight, match_probability
        from {scored}
        union all
        select p.unique_id_l, p.unique_id_r, p.source_l, p.source_r, p.match_weight, p.match_probability
        from read_parquet({read_literal(facts['previous_pairs'])}) p
        anti join _touched_ids l on l.unique_id = p.unique_id_l
        anti join _touched_ids r on r.unique_id = p.unique_id_r;
        drop table _touched_ids""")
    return "pairs_merged"


def cluster_affected(con: duckdb.DuckDBPyConnection, scored: str, merged: str, threshold: float) -> dict:
    """``clusters`` (unique_id, cluster_id): persons as the connected components of ``merged`` at
    ``threshold``, computed only where this release's evidence reaches.

    The components of the whole graph equal these: a previous person with no touched identity
    and no new pair above the threshold keeps exactly its identities, because every pair it
    had above the threshold joined two untouched identities of that person and was carried
    over, and no other pair reaches it. So the components are recomputed over the *affected*
    identities only (touched or new ones, both ends of every pair scored now above the
    threshold, and every identity of a previous person holding one of those), with the pairs
    among them; every other identity keeps its previous person as its cluster.
    At 1,000,000 persons this clusters a few hundred thousand identities instead of millions.

    Args:
        con: the link stage's connection, holding ``identities`` (with ``touched``), ``scored``, ``merged``
            and :func:`scope`'s ``previous_persons``.
        scored: the pairs scored now (each has a touched identity: :func:`restricted_rules`).
        merged: those with the carried ones (:func:`merge_pairs`).
        threshold: the match probability at which a pair joins two identities.

    Returns:
        Counts: ``affected_identities`` and ``affected_persons_before``.
    """
    from splink import DuckDBAPI
    from splink.clustering import cluster_pairwise_predictions_at_threshold

    t = f"{float(threshold)!r}"
    con.execute(f"""
        create or replace temp table _seed as
        select unique_id from identities where touched
        union select unique_id from identities anti join previous_persons using (unique_id)
        union select unique_id_l from {scored} where match_probability >= {t}
        union select unique_id_r from {scored} where match_probability >= {t};
        create or replace temp table _affected_persons as
        select distinct person_key from previous_persons join _seed using (unique_id);
        create or replace table affected_identities as
        select unique_id from _seed
        union select unique_id from previous_persons semi join _affected_persons using (person_key);
        create or replace table affected_pairs as
        select m.unique_id_l, m.unique_id_r, m.match_probability from {merged} m
        semi join affected_identities l on l.unique_id = m.unique_id_l
        semi join affected_identities r on r.unique_id = m.unique_id_r
        where m.match_probability >= {t};
    """)
    clusters = cluster_pairwise_predictions_at_threshold(
        "affected_identities", "affected_pairs", DuckDBAPI(connection=con), node_id_column_name="unique_id",
        edge_id_column_name_left="unique_id_l", edge_id_column_name_right="unique_id_r",
        threshold_match_probability=threshold)
    con.execute(f"""
        create or replace table clusters as
        select unique_id, cluster_id::varchar as cluster_id from {clusters.physical_name}
        union all
        select p.unique_id, 'previous:' || p.person_key from previous_persons p anti join affected_identities using (unique_id)""")
    affected, persons = con.execute(
        "select (select count(*) from affected_identities), (select count(*) from _affected_persons)").fetchone()
    con.execute("drop table previous_persons; drop table _seed; drop table _affected_persons; "
                "drop table affected_identities; drop table affected_pairs")
    return {"affected_identities": int(affected), "affected_persons_before": int(persons)}
