"""Incremental prediction: a delivery's identities scored against everything, the rest of the pairs carried.

With the stored model reused (:mod:`linkage.link.model_store`), a pair of identities
neither of which gained a record since the previous release scores as it did then: its
comparison values (the identity's encodings, its most frequent address, its postcodes,
its year of birth) all come from its records, and the model is the same. So only pairs
with at least one *touched* identity (one holding a record the previous ``linked/`` did
not have) are scored; the previous release's pairs between untouched identities are
carried over, and persons are the connected components of both, as in a full run.

Record tokens persist from release to release because pseudonymise is incremental
(:func:`linkage.pseudonymise.stage.plan_increment`); after a full pseudonymise every
record is new, every identity touched, and the run is a full one. The one difference
from a full run: term-frequency adjustments of carried pairs are those of the release
that scored them (name frequencies move little month to month); ``bench/incremental.py``
measures the pairwise F1 of the incremental result against a full re-link.

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

__all__ = ["scope", "restricted_rules", "merge_pairs"]

log = logging.getLogger(__name__)

TOUCHED = "(l.touched OR r.touched)"


def scope(con: duckdb.DuckDBPyConnection, previous: Path, model: Path, lc: LinkConfig) -> tuple[dict | None, str]:
    """Mark the touched identities and say whether this run can be incremental, with the reason.

    Args:
        con: the link stage's connection, holding ``records`` and ``identities``.
        previous: the previous release's ``linked/``.
        model: the model file this run scores with.
        lc: the link settings (``incremental``, ``incremental_max_share``, ``keep_pairs_above``).

    Returns:
        ``(facts, reason)``: facts (touched and total identities, the previous pairs' path)
        when incremental, else None; ``identities`` gains a boolean column ``touched``
        only when incremental.
    """
    if not lc.incremental:
        return None, "full: link.incremental is false"
    if lc.engine != "duckdb":
        return None, "full: incremental prediction runs on DuckDB only"
    files = {n: previous / n for n in ("pairs.parquet", "records.parquet", "model.json", "summary.json")}
    if not all(p.is_file() for p in files.values()):
        return None, "full: no previous release to build on"
    if fingerprint(files["model.json"]) != fingerprint(model):
        return None, "full: the model differs from the one that scored the previous release's pairs"
    try:
        before = json.loads(files["summary.json"].read_text())
    except (OSError, ValueError):
        return None, "full: the previous release's summary is unreadable"
    if before.get("keep_pairs_above") != lc.keep_pairs_above:
        return None, "full: link.keep_pairs_above differs from the previous release's"
    con.execute(f"""create or replace temp table _touched as
                    select distinct unique_id from records
                    anti join read_parquet({read_literal(files['records.parquet'])}) using (record_token)""")
    touched, total = con.execute("select (select count(*) from _touched), (select count(*) from identities)").fetchone()
    if total and touched / total > lc.incremental_max_share:
        con.execute("drop table _touched")
        return None, (f"full: {touched:,} of {total:,} identities gained records "
                      f"(more than link.incremental_max_share = {lc.incremental_max_share})")
    con.execute("alter table identities add column touched boolean")
    con.execute("update identities set touched = unique_id in (select unique_id from _touched)")
    con.execute("drop table _touched")
    return ({"touched_identities": int(touched), "identities": int(total), "previous_pairs": files["pairs.parquet"]},
            f"incremental: {touched:,} of {total:,} identities gained records")


def restricted_rules(rules, dialect: str = "duckdb") -> list[dict]:
    """The prediction blocking rules (:func:`linkage.link.blocking.anchored_rules`), each limited to
    pairs with a touched identity on either side."""
    return [{"blocking_rule": f"({rule_sql(r.rule)}) AND {TOUCHED}", "sql_dialect": dialect} for r in rules]


def merge_pairs(con: duckdb.DuckDBPyConnection, scored: str, facts: dict) -> str:
    """``pairs_merged``: this run's scored pairs and the previous pairs between untouched identities.

    Columns as Splink's predictions (``unique_id_l/_r``, ``source_dataset_l/_r``,
    ``match_weight``, ``match_probability``). Returns the table's name.
    """
    con.execute(f"""create or replace table pairs_merged as
        select unique_id_l, unique_id_r, source_dataset_l, source_dataset_r, match_weight, match_probability
        from {scored}
        union all
        select p.unique_id_l, p.unique_id_r, p.source_l, p.source_r, p.match_weight, p.match_probability
        from read_parquet({read_literal(facts['previous_pairs'])}) p
        join identities l on l.unique_id = p.unique_id_l and not l.touched
        join identities r on r.unique_id = p.unique_id_r and not r.touched""")
    return "pairs_merged"
