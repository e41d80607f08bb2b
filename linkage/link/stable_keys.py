"""Person keys that stay stable from release to release (see :mod:`linkage.releases`).

An identity's ``unique_id`` is a digest of its keyed encodings, so the same record
delivered again, under the same key, has the same ``unique_id`` in every release. The
link stage therefore carries the previous release's person keys (``linked/identities.parquet``
as it was before this run) onto the new clusters by greatest overlap of identities, gives
clusters that take none the key the first release would have given them
(``'P' + md5(smallest unique_id)[:16]``, never one already issued), and writes every merge,
split, new and retired key to ``linked/key_changes.parquet``. Re-linking the same data
changes no key; a key rotation changes every ``unique_id``, so every key (and the change
table says so).

Household keys follow the same rule (:func:`household_keys`): a household is a cluster of
person-years, so each of this release's households takes the previous household key it
shares most person-years with (``person_key:year``), and every merge, split, new and retired
household key goes to ``linked/household_key_changes.parquet``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import duckdb

from linkage.db import path_literal, read_literal
from linkage.releases import carry_keys, key_changes

__all__ = ["person_keys", "household_keys"]


def _new_key(first: str) -> str:
    return "P" + hashlib.md5(first.encode()).hexdigest()[:16]


def _new_household_key(first: str) -> str:
    return "H" + hashlib.md5(first.encode()).hexdigest()[:16]


def _carry(con: duckdb.DuckDBPyConnection, current_sql: str, previous_sql: str | None, new_key, changes_file: Path,
           unit: str, issued_sql: str | None = None) -> tuple[str, dict]:
    """Keys for the clusters of ``current_sql`` (record, cluster) carried from ``previous_sql`` (record, key).

    Writes every key that did not simply carry over to ``changes_file`` (its record count
    in a column named ``unit``) and leaves the table ``_keys`` (cluster, key, carried) on
    ``con``; returns its name and the counts for the stage's summary.
    """
    con.execute(f"create or replace temp table _cur as {current_sql}")
    if previous_sql is not None:
        con.execute(f"create or replace temp table _prev as {previous_sql}")
    else:
        con.execute("create or replace temp table _prev (record varchar, key varchar)")
    if issued_sql is not None:
        con.execute(f"create or replace temp table _issued as {issued_sql}")
    keys = carry_keys(con, "_prev", "_cur", new_key=new_key, out="_keys",
                      issued="_issued" if issued_sql is not None else None)
    changes = key_changes(con, "_prev", "_cur", keys, out="_key_changes")
    con.execute(f"""copy (select change, old_key, new_key, records as {unit} from {changes}
                         order by change, old_key nulls first, new_key nulls first)
                    to {path_literal(changes_file)} (compression zstd)""")
    counts = dict(con.execute(f"select change, count(*) from {changes} group by 1").fetchall())
    carried = con.execute(f"select count(*) from {keys} where carried").fetchone()[0]
    con.execute("drop table _prev; drop table _key_changes; drop table if exists _issued")
    return keys, {"first_release": previous_sql is None, "carried": carried,
                  **{c: counts.get(c, 0) for c in ("merged", "split", "new", "retired")}}


def person_keys(con: duckdb.DuckDBPyConnection, previous: Path, out: Path, recomputed_only: bool = False) -> dict:
    """Create ``persons (unique_id, person_key)`` from ``clusters`` and write ``out/key_changes.parquet``.

    Args:
        con: the link stage's connection, holding ``identities`` and ``clusters`` (``unique_id, cluster_id``).
        previous: the previous release's ``linked/identities.parquet`` (absent on a first release).
        out: the new ``linked/`` folder.
        recomputed_only: ``clusters`` came from an incremental link
            (:func:`linkage.link.incremental.cluster_affected`): an identity whose person was
            not recomputed has the cluster ``'previous:' + its previous key``. Only the
            recomputed clusters are matched, against the previous identities of the persons
            they hold: every identity of such a person was recomputed, so the keys and
            changes are those of matching every identity.

    Returns:
        ``{"key_changes": {"carried": n, "merged": n, "split": n, "new": n, "retired": n}}``.
    """
    prev = read_literal(previous)
    if recomputed_only and previous.is_file():
        con.execute(f"""create or replace temp table _pk_prev as
                        select unique_id, person_key from read_parquet({prev});
                        create or replace temp table _pk_carried as
                        select c.unique_id, substr(c.cluster_id, 10) as person_key from clusters c
                        where c.cluster_id like 'previous:%'""")
        keys, counts = _carry(
            con, "select i.unique_id as record, c.cluster_id as cluster from identities i join clusters c "
                 "using (unique_id) where c.cluster_id not like 'previous:%'",
            """select unique_id as record, person_key as key from _pk_prev
               where person_key not in (select person_key from _pk_carried)""",
            _new_key, out / "key_changes.parquet", "identities",
            issued_sql="select distinct person_key as key from _pk_prev")
        counts["carried"] += con.execute("select count(distinct person_key) from _pk_carried").fetchone()[0]
        con.execute(f"""create or replace table persons as
                        select c.record as unique_id, k.key as person_key from _cur c join {keys} k using (cluster)
                        union all select unique_id, person_key from _pk_carried;
                        drop table _pk_prev; drop table _pk_carried""")
    else:
        keys, counts = _carry(
            con, "select i.unique_id as record, c.cluster_id as cluster from identities i join clusters c using (unique_id)",
            f"select unique_id as record, person_key as key from read_parquet({prev})"
            if previous.is_file() else None, _new_key, out / "key_changes.parquet", "identities")
        con.execute(f"""create or replace table persons as
                        select c.record as unique_id, k.key as person_key from _cur c join {keys} k using (cluster)""")
    con.execute(f"drop table _cur; drop table {keys}")
    return {"key_changes": counts}


def household_keys(con: duckdb.DuckDBPyConnection, previous: Path, out: Path, recomputed_only: bool = False) -> dict:
    """Carry the previous release's household keys onto ``households`` and write ``out/household_key_changes.parquet``.

    Args:
        con: the link stage's connection, holding ``households`` (person_key, year,
            household_key, ...) as :func:`linkage.link.households.assemble_households` built it;
            its ``household_key`` is replaced in place.
        previous: the previous release's ``linked/households.parquet`` (may be missing).
        out: the folder being published as ``linked/``.
        recomputed_only: ``households`` came from an incremental assembly: its recomputed
            households are named ``'N'`` + a key, every other row is a previous row under its
            previous key. Only the recomputed ones are matched, against the previous rows of
            their persons and of persons gone since: a previous household lies wholly among
            those or wholly among the carried rows (its members share a place), so the keys
            and changes are those of matching everything, without reading ten million
            person-years at 1,000,000 persons.

    Returns:
        ``{"household_key_changes": {"carried": n, "merged": n, "split": n, "new": n, "retired": n}}``.
    """
    prev = read_literal(previous)
    if recomputed_only and previous.is_file():
        con.execute("create or replace temp table _hh_n as select distinct person_key from households "
                    "where household_key like 'N%'")
        keys, counts = _carry(
            con, "select person_key || ':' || year as record, household_key as cluster from households "
                 "where household_key like 'N%'",
            f"""select p.person_key || ':' || p.year as record, p.household_key as key from read_parquet({prev}) p
                where p.person_key in (select person_key from _hh_n)
                   or p.person_key not in (select person_key from households)""",
            _new_household_key, out / "household_key_changes.parquet", "person_years",
            issued_sql=f"select distinct household_key as key from read_parquet({prev})")
        counts["carried"] += con.execute(
            "select count(distinct household_key) from households where household_key not like 'N%'").fetchone()[0]
        con.execute(f"""create or replace table households as
                        select h.* replace (coalesce(k.key, h.household_key) as household_key)
                        from households h left join {keys} k on k.cluster = h.household_key;
                        drop table _hh_n""")
    else:
        keys, counts = _carry(
            con, "select person_key || ':' || year as record, household_key as cluster from households",
            f"select person_key || ':' || year as record, household_key as key from read_parquet({prev})"
            if previous.is_file() else None, _new_household_key, out / "household_key_changes.parquet", "person_years")
        con.execute(f"""create or replace table households as
                        select h.* replace (k.key as household_key)
                        from households h join {keys} k on k.cluster = h.household_key""")
    con.execute(f"drop table _cur; drop table {keys}")
    return {"household_key_changes": counts}
