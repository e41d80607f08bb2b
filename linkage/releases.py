"""Releases: stable keys carried from one release to the next, and the ledger of releases.

**The ledger** (``DIR/releases.jsonl``, one JSON object per release, oldest first) records
what each release was made of and what it changed: its number, when, the landing files
ingested for it (name, source, SHA-256, rows read, staged and quarantined), its counts
(records, persons, household-years, published tables), its key changes and the model that
scored it (fingerprint, reused or trained, largest drift). :func:`unreleased_files` lists
the landing files no release holds yet; :func:`record_release` appends the release made
from them (nothing when there are none, so recording twice is harmless);
:func:`read_releases` reads the ledger for the portal's runs page. It holds counts and file
names only, never a record value or a key.

**Stable keys.** Carry the previous release's keys onto a new clustering.

A release's persons (or households) are clusters of records. When the next release is
linked, a researcher needs each person to keep its key unless the evidence really
changed: :func:`carry_keys` gives each new cluster the previous key whose records it
shares most (a one-to-one assignment, largest overlaps first, ties broken by the key
and then by the cluster's smallest record, never by position), and a fresh key to
clusters that took no previous key. :func:`key_changes` lists every key that did not
simply carry over, as a researcher would follow it:

=========  ===============================================================
change     meaning
=========  ===============================================================
merged     ``old_key``'s records now belong to ``new_key`` (another key's cluster)
split      some of ``old_key``'s records left it for ``new_key`` (a new key)
new        ``new_key`` has no record of the previous release
retired    ``old_key``'s records are all gone from this release
=========  ===============================================================

``records`` counts the records behind each row (the overlap for merges and splits).
Records are matched by an identifier that is the same in both releases (e.g. a
record token that is stable across deliveries).

Example:
    >>> from linkage.db import connect
    >>> con = connect()
    >>> _ = con.execute("create table prev as select * from (values ('a','K1'),('b','K1'),('c','K2')) t(record, key)")
    >>> _ = con.execute("create table cur as select * from (values ('a',1),('b',1),('c',1),('d',2)) t(record, cluster)")
    >>> keys = carry_keys(con, "prev", "cur", new_key=lambda rec: "N-" + rec)
    >>> sorted(con.execute(f"select cluster, key from {keys}").fetchall())
    [(1, 'K1'), (2, 'N-d')]
    >>> sorted(con.execute(f"select change, old_key, new_key, records from {key_changes(con, 'prev', 'cur', keys)}").fetchall())
    [('merged', 'K2', 'K1', 1), ('new', None, 'N-d', 1)]
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import duckdb

from linkage.errors import HhlinkError

__all__ = ["LEDGER", "carry_keys", "key_changes", "read_releases", "record_release", "unreleased_files"]

LEDGER = "releases.jsonl"


def carry_keys(con: duckdb.DuckDBPyConnection, previous: str, current: str,
               new_key: Callable[[str], str], out: str = "carried_keys", issued: str | None = None) -> str:
    """Assign each cluster of ``current`` a key, keeping ``previous`` keys by greatest overlap.

    Args:
        con: a DuckDB connection holding both tables.
        previous: table or view ``(record, key)``: the previous release's key of each record.
        current: table or view ``(record, cluster)``: this release's cluster of each record.
        new_key: the key of a cluster that takes no previous key, from its smallest record
            (so a re-run gives the same key); a key already in use (carried, or any key of
            the previous release) is never reissued: ``new_key`` is asked again with
            ``"#2"``, ``"#3"``... appended to the record.
        out: the name of the table to create.
        issued: a table or view ``(key)`` of every key issued before, when ``previous`` holds
            only some of them (default: the keys of ``previous``).

    Returns:
        ``out``: a table ``(cluster, key, carried)`` with one row per cluster of ``current``.
    """
    con.execute(f"""
        create or replace temp table _overlap as
        select c.cluster, p.key, count(*) n
        from {current} c join {previous} p using (record) group by all;
        create or replace temp table _first as select cluster, min(record) first_record from {current} group by 1;
        create or replace temp table _assigned as select cluster, key from _overlap where false;
    """)
    # one-to-one, largest overlap first: each round assigns the pairs that are each other's best
    # among the still unassigned (ties broken by key, then by the cluster's smallest record);
    # every round assigns at least the globally best remaining pair, so this ends
    while True:
        added = con.execute("""
            insert into _assigned
            with free as (
                select o.cluster, o.key, o.n, f.first_record from _overlap o join _first f using (cluster)
                where o.cluster not in (select cluster from _assigned) and o.key not in (select key from _assigned)),
            best_for_cluster as (select cluster, key from free
                qualify row_number() over (partition by cluster order by n desc, key) = 1),
            best_for_key as (select key, cluster from free
                qualify row_number() over (partition by key order by n desc, first_record) = 1)
            select c.cluster, c.key from best_for_cluster c join best_for_key k on k.key = c.key and k.cluster = c.cluster
        """).fetchone()
        if not added or not added[0]:
            break
    fresh = con.execute("select f.cluster, f.first_record from _first f anti join _assigned a using (cluster) "
                        "order by f.first_record").fetchall()
    # a key is never given to another person: not one of the previous release's (retired ones
    # included), not one carried now. Only the keys asked for are looked up (reading every issued
    # key into Python took about a second per release at 1,000,000 persons, for a thousand new ones)
    import pyarrow as pa

    def issued_among(keys: list[str]) -> set[str]:
        con.register("_asked_keys", pa.table({"key": keys}))
        try:
            return {k for (k,) in con.execute(f"select key from (select key from {issued or previous} "
                                              "union select key from _assigned) semi join _asked_keys using (key)"
                                              ).fetchall()}
        finally:
            con.unregister("_asked_keys")

    first = [new_key(str(r)) for _, r in fresh]
    used = issued_among(first) if fresh else set()
    made, mine = [], set()
    for (c, r), k in zip(fresh, first):
        attempt = 1
        while k in used or k in mine or (attempt > 1 and issued_among([k])):
            attempt += 1
            k = new_key(f"{r}#{attempt}")
        mine.add(k)
        made.append((c, k))
    con.execute("create or replace temp table _fresh as select cluster, key from _assigned where false")
    if made:
        # one Arrow insert: executemany took 12 s for 20,000 keys, minutes for a first release at 1M
        con.register("_fresh_made", pa.table({"cluster": [c for c, _ in made], "key": [k for _, k in made]}))
        con.execute("insert into _fresh select * from _fresh_made")
        con.unregister("_fresh_made")
    con.execute(f"""
        create or replace table {out} as
        select cluster, key, true carried from _assigned
        union all select cluster, key, false from _fresh;
        drop table _overlap; drop table _assigned; drop table _fresh; drop table _first;
    """)
    return out


def key_changes(con: duckdb.DuckDBPyConnection, previous: str, current: str, keys: str,
                out: str = "key_changes") -> str:
    """Every key that did not simply carry over from ``previous`` to ``current`` (see the module).

    Args:
        con: a DuckDB connection.
        previous: ``(record, key)`` of the previous release.
        current: ``(record, cluster)`` of this release.
        keys: the table :func:`carry_keys` made (``cluster, key, carried``).
        out: the name of the table to create.

    Returns:
        ``out``: a table ``(change, old_key, new_key, records)``.
    """
    con.execute(f"""
        create or replace table {out} as
        with flow as (
            select p.key old_key, k.key new_key, k.carried, count(*) records
            from {previous} p join {current} c using (record) join {keys} k using (cluster) group by all)
        select case when f.new_key in (select key from {previous}) then 'merged' else 'split' end as change,
               f.old_key, f.new_key, f.records
        from flow f where f.old_key <> f.new_key
        union all
        select 'new', null, k.key, count(*) from {keys} k join {current} c using (cluster)
        where not k.carried and k.cluster not in (
            select c2.cluster from {current} c2 join {previous} p2 using (record))
        group by k.key
        union all
        select 'retired', p.key, null, count(*) from {previous} p
        where p.key not in (select old_key from flow) group by p.key
    """)
    return out


# --- the ledger of releases ------------------------------------------------------------------


def read_releases(workspace: Path | str) -> list[dict]:
    """Every recorded release, oldest first (``[]`` before the first).

    Raises:
        HhlinkError: a line of the ledger is not JSON (named by its line number).
    """
    path = Path(workspace) / LEDGER
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for i, line in enumerate(lines, 1):
        try:
            out.append(json.loads(line))
        except ValueError:
            raise HhlinkError(f"{path}: line {i} is not a JSON release entry; restore the ledger") from None
    return out


def unreleased_files(workspace: Path | str) -> list[str]:
    """Names of the files in ``landing/`` that no recorded release holds, sorted."""
    released = {f["name"] for r in read_releases(workspace) for f in r.get("files", [])}
    landing = Path(workspace) / "landing"
    names = sorted(p.name for p in landing.iterdir() if p.is_file() and not p.name.startswith(".")) \
        if landing.is_dir() else []
    return [n for n in names if n not in released]


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_release(workspace: Path | str, run: str | None = None) -> dict | None:
    """Append the release just made from the unreleased landing files to ``releases.jsonl``.

    Call it once the release is published (after ``disclose``). The files are those of
    ``staged/manifest.json`` not in an earlier release; the counts, key changes and model
    come from ``linked/summary.json`` and ``published/index.json``.

    Args:
        workspace: the workspace folder.
        run: an identifier of the run that made the release (e.g. the Prefect flow run id).

    Returns:
        The entry recorded, or None when every ingested file is already in a release.
    """
    from linkage.workspace import atomic_path

    ws = Path(workspace)
    releases = read_releases(ws)
    released = {f["name"] for r in releases for f in r.get("files", [])}
    manifest = _json(ws / "staged" / "manifest.json").get("files", [])
    files = [{"name": f["file"], "source": f.get("source"), "sha256": f.get("sha256"), "rows_read": f.get("rows_read"),
              "rows_staged": f.get("rows_staged"), "rows_quarantined": f.get("rows_quarantined")}
             for f in manifest if f.get("file") not in released]
    if not files:
        return None
    linked = _json(ws / "linked" / "summary.json")
    model = linked.get("model") or {}
    drift = linked.get("drift") or {}
    largest = drift.get("largest") or {}
    entry = {
        "release": len(releases) + 1,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": run,
        "files": sorted(files, key=lambda f: f["name"]),
        "counts": {"records": linked.get("records"), "persons": linked.get("persons"),
                   "household_years": linked.get("household_years"),
                   "published_tables": len(_json(ws / "published" / "index.json").get("tables", []))},
        "key_changes": linked.get("key_changes"),
        "model": {"fingerprint": model.get("fingerprint"), "mode": model.get("mode"),
                  "largest_drift": largest.get("drift"),
                  "drift_level": f"{largest['comparison']}: {largest['level']}" if largest else None},
    }
    with atomic_path(ws / LEDGER) as tmp:
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in [*releases, entry]))
    return entry
