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
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import duckdb

from linkage.db import path_literal, read_literal
from linkage.releases import carry_keys, key_changes

__all__ = ["person_keys"]


def _new_key(first: str) -> str:
    return "P" + hashlib.md5(first.encode()).hexdigest()[:16]


def person_keys(con: duckdb.DuckDBPyConnection, previous: Path, out: Path) -> dict:
    """Create ``persons (unique_id, person_key)`` from ``clusters`` and write ``out/key_changes.parquet``.

    Args:
        con: the link stage's connection, holding ``identities`` and ``clusters`` (``unique_id, cluster_id``).
        previous: the previous release's ``linked/identities.parquet`` (absent on a first release).
        out: the new ``linked/`` folder.

    Returns:
        ``{"key_changes": {"carried": n, "merged": n, "split": n, "new": n, "retired": n}}``.
    """
    con.execute("""create or replace temp table _cur as
                   select i.unique_id as record, c.cluster_id as cluster from identities i join clusters c using (unique_id)""")
    if previous.is_file():
        con.execute(f"create or replace temp table _prev as select unique_id as record, person_key as key "
                    f"from read_parquet({read_literal(previous)})")
    else:
        con.execute("create or replace temp table _prev (record varchar, key varchar)")
    keys = carry_keys(con, "_prev", "_cur", new_key=_new_key, out="_person_keys")
    con.execute("""create or replace table persons as
                   select c.record as unique_id, k.key as person_key from _cur c join _person_keys k using (cluster)""")
    changes = key_changes(con, "_prev", "_cur", keys, out="_key_changes")
    con.execute(f"""copy (select change, old_key, new_key, records as identities from {changes}
                         order by change, old_key nulls first, new_key nulls first)
                    to {path_literal(out / 'key_changes.parquet')} (compression zstd)""")
    counts = dict(con.execute(f"select change, count(*) from {changes} group by 1").fetchall())
    carried = con.execute(f"select count(*) from {keys} where carried").fetchone()[0]
    first = not previous.is_file()
    con.execute("drop table _cur; drop table _prev; drop table _person_keys; drop table _key_changes")
    return {"key_changes": {"first_release": first, "carried": carried,
                            **{c: counts.get(c, 0) for c in ("merged", "split", "new", "retired")}}}
