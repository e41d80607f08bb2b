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
           unit: str, kept_sql: str | None = None) -> tuple[str, dict]:
    """Keys for the clusters of ``current_sql`` (record, cluster) carried from ``previous_sql`` (record, key).

    ``kept_sql`` (cluster, key): clusters an incremental run did not recompute, each keeping its
    previous key as it is. Only the other clusters are matched, against the previous records
    under the other keys: a kept key's records are all in its kept cluster, so the keys and
    changes are those of matching every record. No key of the previous release is reissued.

    Writes every key that did not simply carry over to ``changes_file`` (its record count
    in a column named ``unit``) and leaves the table ``_keys`` (cluster, key, carried) on
    ``con``, every cluster of ``current_sql`` in it; returns its name and the summary's counts.
    """
    con.execute(f"create or replace temp table _kept as {kept_sql or 'select null::varchar cluster, null::varchar key where false'}")
    con.execute(f"create or replace temp table _cur as select * from ({current_sql}) "
                "where cluster not in (select cluster from _kept)")
    if previous_sql is not None:
        con.execute(f"""create or replace temp view _prev_all as {previous_sql};
                        create or replace temp table _prev as
                        select * from _prev_all where key not in (select key from _kept)""")
    else:
        con.execute("create or replace temp view _prev_all as select null::varchar record, null::varchar key where false; "
                    "create or replace temp table _prev as select * from _prev_all")
    keys = carry_keys(con, "_prev", "_cur", new_key=new_key, out="_keys", issued="_prev_all")
    changes = key_changes(con, "_prev", "_cur", keys, out="_key_changes")
    con.execute(f"""copy (select change, old_key, new_key, records as {unit} from {changes}
                         order by change, old_key nulls first, new_key nulls first)
                    to {path_literal(changes_file)} (compression zstd)""")
    counts = dict(con.execute(f"select change, count(*) from {changes} group by 1").fetchall())
    con.execute(f"insert into {keys} select cluster, key, true from _kept")
    carried = con.execute(f"select count(*) from {keys} where carried").fetchone()[0]
    con.execute("drop table _cur; drop table _prev; drop view _prev_all; drop table _kept; drop table _key_changes")
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
            not recomputed has the cluster ``'previous:' + its previous key`` and keeps that
            key; only the recomputed clusters are matched (:func:`_carry`): every identity
            of a recomputed person was recomputed, so the keys and changes are those of
            matching every identity.

    Returns:
        ``{"key_changes": {"carried": n, "merged": n, "split": n, "new": n, "retired": n}}``.
    """
    keys, counts = _carry(
        con, "select i.unique_id as record, c.cluster_id as cluster from identities i join clusters c using (unique_id)",
        f"select unique_id as record, person_key as key from read_parquet({read_literal(previous)})"
        if previous.is_file() else None, _new_key, out / "key_changes.parquet", "identities",
        kept_sql="select distinct cluster_id as cluster, substr(cluster_id, 10) as key from clusters "
                 "where cluster_id like 'previous:%'" if recomputed_only else None)
    con.execute(f"""create or replace table persons as
                    select c.unique_id, k.key as person_key from clusters c join {keys} k on k.cluster = c.cluster_id
                    semi join identities i using (unique_id)""")
    con.execute(f"drop table {keys}")
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
            previous key, which it keeps. Only the recomputed ones are matched (:func:`_carry`):
            a previous household lies wholly among the recomputed rows or wholly among the
            carried ones (its members share a place), so the keys and changes are those of
            matching everything.

    Returns:
        ``{"household_key_changes": {"carried": n, "merged": n, "split": n, "new": n, "retired": n}}``.
    """
    # the carried rows keep their keys: only the recomputed ones ('N' + a key) are matched and renamed
    recomputed = " where household_key like 'N%'" if recomputed_only else ""
    keys, counts = _carry(
        con, f"select person_key || ':' || year as record, household_key as cluster from households{recomputed}",
        f"select person_key || ':' || year as record, household_key as key from read_parquet({read_literal(previous)})"
        if previous.is_file() else None, _new_household_key, out / "household_key_changes.parquet", "person_years",
        kept_sql="select distinct household_key as cluster, household_key as key from households "
                 "where household_key not like 'N%'" if recomputed_only else None)
    if recomputed_only:   # in place: 15.6 million rows at 1,000,000 persons, a few per cent of them recomputed
        con.execute(f"""update households set household_key = k.key from {keys} k
                        where households.household_key like 'N%' and k.cluster = households.household_key""")
    else:
        con.execute(f"""create or replace table households as
                        select h.* replace (k.key as household_key)
                        from households h join {keys} k on k.cluster = h.household_key""")
    con.execute(f"drop table {keys}")
    return {"household_key_changes": counts}
