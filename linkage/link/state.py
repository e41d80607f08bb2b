"""The link state: what the next release needs so that its link does only the delivery's work.

A monthly delivery adds a few thousand records to millions, yet a link rebuilt from the zone
decrypts every identifiers file, collapses every record into identities and derives every
identity's blocking keys (at 1,000,000 persons 278 s of a delivery's link). Every link run
(full or not) therefore ends by writing, into ``linked/state/``:

* ``records.NNNN.enc`` - the ``records`` table (record token, source, year, birth year,
  benefit unit, claim, identity key and the address encodings), in segments: a release
  carries the previous segments (hard links) and adds one with its new records; a full run,
  or more than :data:`MAX_SEGMENTS`, writes one;
* ``identities.NNNN.enc`` - the ``identities`` table with its encodings, each identity's
  representative record (the smallest record token, whose encodings it shows) and its
  blocking keys (:func:`linkage.link.blocking.build_blocking_keys`' columns), in segments
  where a later one's row for an identity replaces an earlier one's: a release carries the
  previous segments and adds one with the rows that changed (identities touched, or whose
  blocking keys were rebuilt); a full run writes one, and so does a release once the
  carried segments hold more than :data:`MAX_REPLACED_SHARE` of the first one's rows or
  number :data:`MAX_SEGMENTS` (at 1,000,000 persons rewriting every identity took 27 s of
  a monthly delivery);
* ``state.json`` (clear: names, sizes and counts only) - the identifiers-zone files the state
  was built from (name, size, modification time), the key's fingerprint, the code fingerprint
  (:func:`code_fingerprint`), the key columns, and per source the records and non-null counts
  of the completeness report.

The ``.enc`` files hold keyed tokens and Bloom filters: they are identifier-zone data and are
encrypted exactly as that zone (:func:`linkage.pseudonymise.store.write_encrypted`, subkey
``zone:identifiers``, which the link stage already holds); they are named ``.enc``, as the
crosswalk is, because no Parquet reader opens them without the key. Nothing of them is logged. They sit
in ``linked/`` so that the state and the release it describes are published together (one
atomic swap of the folder), and the next release reads the previous one's from
``ws.zone("linked")`` while it builds its own.

A release with a usable state (:func:`plan`) then decrypts only the zone files the state does
not list, computes their records' identity keys with the full run's expression, and
recomputes the facts, most frequent address and representative only of the *touched*
identities (new, or gaining records) from all their records, with the full run's SQL; every
other identity's row is carried, since all of it comes from its records and none changed.
Blocking keys are rebuilt only for the anchor groups a touched identity reaches
(:func:`linkage.link.blocking.update_blocking_keys`). The result is the tables a full run
builds, row for row (``tests/test_link_state.py`` checks it against a full recompute).

Anything else means the full path, and the summary's ``link_state`` says why: no state, a
state under another key or another version of this code (:func:`code_fingerprint`), a
listed zone file changed or gone (a full pseudonymise rewrites them all), nothing listed left
(every record new), ``link.incremental`` false, the Spark engine.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from linkage.db import quote_ident, table_exists
from linkage.link.model import ADDRESS_COLUMNS, IDENTITY_COLUMNS

__all__ = ["STATE_DIR", "MAX_SEGMENTS", "StatePlan", "code_fingerprint", "plan", "load", "load_identities", "write"]

log = logging.getLogger(__name__)

STATE_DIR = "state"
STATE_VERSION = 2
MAX_SEGMENTS = 36   # record or identity segments carried before one release rewrites them as one
MAX_REPLACED_SHARE = 0.5   # identity rows in later segments, as a share of the first's, before a rewrite
ZONE = "identifiers"
IDENTITY_TABLE = ("unique_id", "source", "birth_year", "n_records", "first_year", "last_year", *IDENTITY_COLUMNS,
                  "postcode_toks", *ADDRESS_COLUMNS)


#: the records' string columns with few distinct values in a row group, decoded as dictionaries
#: (:func:`linkage.pseudonymise.store.load_files`)
RECORD_DICTIONARY = ("source", "bu_role", "unique_id", "postcode_tok", "pc_sector_tok", "pc_district_tok")
#: the records' columns only an identity's facts read (its most frequent address): a release loads
#: them for the touched identities' records alone (2.7 GB of memory at 1,000,000 persons for all)
RECORD_FACT_COLUMNS = ("pc_sector_tok", "pc_district_tok", "sex_tok")


def code_fingerprint() -> str:
    """A digest of the code that derives what the state holds: the records, identity and key SQL,
    and the identifiers whose completeness it counts.

    A release under other code (another identity key expression, other blocking keys) cannot
    carry a state the old code built, so it runs in full.
    """
    from linkage.link import blocking, stage
    from linkage.link.report import COMPLETENESS_COLUMNS

    parts = [str(STATE_VERSION), stage.records_sql("z"), stage.identity_facts_sql("r"),
             stage.identities_select_sql("e"), stage.identities_sql("z"), inspect.getsource(blocking),
             *COMPLETENESS_COLUMNS]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _file_entry(path: Path) -> dict:
    st = path.stat()
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


@dataclass
class StatePlan:
    """A usable state: its folder and description, and the identifiers-zone files it lacks."""
    folder: Path
    meta: dict
    new_files: list[Path] = field(default_factory=list)
    decrypted_at: float | None = None   # perf_counter when :func:`load` had decrypted what it reads


def plan(config, linked: Path, zone_files: list[Path], key) -> tuple[StatePlan | None, str]:
    """Whether the previous release's state (``linked/state/``) can be carried, and why (a phrase for the summary).

    Args:
        config: the hhlink config (``link.incremental``, ``link.engine``).
        linked: the previous release's ``linked/`` (still in place while the next is built).
        zone_files: the identifiers zone's files now (:func:`linkage.pseudonymise.store.zone_files`).
        key: the master key this run decrypts the zone with.
    """
    lc = config.link
    if not lc.incremental:
        return None, "full: link.incremental is false"
    if lc.engine != "duckdb":
        return None, "full: the link state is used on DuckDB only"
    folder = Path(linked) / STATE_DIR
    try:
        meta = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        return None, "full: no link state from a previous release"
    if meta.get("key_fingerprint") != getattr(key, "fingerprint", None):
        return None, "full: the link state was written under another key"
    if meta.get("code") != code_fingerprint():
        return None, "full: the link state was built by another version of the identity or blocking code"
    if not meta.get("records") or not meta.get("key_columns"):
        return None, "full: the link state lists no records"
    if not meta.get("identities"):
        return None, "full: the link state lists no identities"
    for name in [*meta["records"], *meta["identities"]]:
        if not (folder / name).is_file():
            return None, f"full: the link state lacks {name}"
    now = {f.name: f for f in zone_files}
    listed = {e["name"] for e in meta.get("zone_files", [])}
    for entry in meta.get("zone_files", []):
        f = now.get(entry["name"])
        if f is None:
            return None, f"full: identifiers file {entry['name']} of the link state is gone"
        if _file_entry(f) != entry:
            return None, f"full: identifiers file {entry['name']} changed since the link state was built"
    if not listed:
        return None, "full: the link state lists no identifiers file"
    new = [f for f in zone_files if f.name not in listed]
    return StatePlan(folder, meta, new), f"incremental: {len(new)} new identifiers file(s), {len(listed)} carried"


def load(con: duckdb.DuckDBPyConnection, state: StatePlan, key) -> dict:
    """Build ``records``, ``identities``, ``identity_representative`` as a full run would, from the state
    and the new zone files only.

    Also leaves ``state_touched`` (unique_id: new identities and those gaining records),
    ``new_identities`` (unique_id: those of them the state did not hold),
    ``state_keys`` (the previous identities' blocking keys) and ``new_records`` (the records of
    the new files, which :func:`write` appends as a segment). Returns the completeness counts
    with the new records' added.
    """
    from linkage.link.report import completeness_counts
    from linkage.link.stage import identities_select_sql, identity_facts_sql, records_sql
    from linkage.pseudonymise.store import load_files, read_encrypted_schema

    meta = state.meta
    encodings = ", ".join(IDENTITY_COLUMNS)
    counts = meta["completeness"]
    # the new records first: they say which identities are touched, whose old records are read whole
    if state.new_files:
        load_files(con, "identifiers_in", state.new_files, key, ZONE)
        counts = _add_counts(counts, completeness_counts(con, "identifiers_in"))
        con.execute(f"create or replace table new_records as {records_sql('identifiers_in')}")
        con.execute(f"create or replace temp table _new_encodings as select record_token, {encodings} from identifiers_in")
        con.execute("drop table identifiers_in")
        con.execute("create or replace table state_touched as select distinct unique_id from new_records")
    else:
        con.execute("create or replace table state_touched (unique_id varchar)")
    # the records' columns only the touched identities' facts read are kept for their records alone (a
    # state rewritten whole, past MAX_SEGMENTS, needs them all)
    deferred = RECORD_FACT_COLUMNS if len(meta["records"]) < MAX_SEGMENTS else ()
    load_files(con, "records", [state.folder / n for n in meta["records"]], key, ZONE, dictionary=RECORD_DICTIONARY,
               aside=("_touched_records", deferred, "unique_id in (select unique_id from state_touched)"))
    segments = [state.folder / n for n in meta["identities"]]
    # the identities and their blocking keys into tables of their own, each decoding only its columns:
    # at 1,000,000 persons the keys load in 1.8 s where copying them out of one table took 2.2 s, and
    # the identities table no longer holds them
    columns = read_encrypted_schema(segments[0], key, ZONE).names
    load_identities(con, "state_identities", segments, key, [c for c in columns if c not in meta["key_columns"]])
    load_identities(con, "state_keys", segments, key, ["unique_id", *meta["key_columns"]])
    state.decrypted_at = time.perf_counter()
    if not state.new_files:
        con.execute("create or replace table new_records as select * from _touched_records limit 0")
        con.execute(f"create or replace temp table _new_encodings as select representative as record_token, {encodings} "
                    "from state_identities limit 0")
    narrow = f"* exclude ({', '.join(quote_ident(c) for c in deferred)})" if deferred else "*"
    con.execute(f"insert into records by name select {narrow} from new_records")
    con.execute("insert into _touched_records by name select * from new_records")
    # the identities new in this release (the drift's scope): those the state did not hold, which is
    # what the previous release's identities.parquet would say, without reading its millions of rows
    con.execute("""create or replace temp table new_identities as
                   select unique_id from state_touched anti join state_identities using (unique_id)""")
    con.execute(identity_facts_sql("_touched_records"))
    # a touched identity's representative is its old one or a new record: take its encodings from where it is
    con.execute(f"""create or replace temp table _touched_identities as
        {identities_select_sql(f'''(select * from _new_encodings union all
                                      select representative as record_token, {encodings}
                                      from state_identities semi join state_touched using (unique_id))''')}""")
    con.execute("""create or replace table identity_representative as
        select unique_id, representative from state_identities anti join state_touched using (unique_id)
        union all select unique_id, representative from identity_facts""")
    # the identities in place: the touched ones' rows replaced, the state's own column dropped (a copy
    # of every identity with its encodings took 10.8 s of a monthly delivery at 1,000,000 persons)
    con.execute("delete from state_identities where unique_id in (select unique_id from state_touched)")
    con.execute("alter table state_identities drop column representative")
    con.execute("insert into state_identities by name select * from _touched_identities; "
                "drop table if exists identities; alter table state_identities rename to identities")
    con.execute("drop table identity_facts; drop table _touched_records; drop table _new_encodings; "
                "drop table _touched_identities")
    return counts


def load_identities(con: duckdb.DuckDBPyConnection, name: str, segments: list[Path], key,
                     columns: list[str] | None = None) -> None:
    """Table ``name`` from identity segments: for each identity, its row in the last segment holding one
    (``columns`` of it, with ``unique_id``; all of them for None)."""
    from linkage.pseudonymise.store import load_files

    load_files(con, name, segments[:1], key, ZONE, columns)
    for segment in segments[1:]:
        load_files(con, "_state_segment", [segment], key, ZONE, columns)
        con.execute(f"""delete from {name} where unique_id in (select unique_id from _state_segment);
                        insert into {name} by name select * from _state_segment;
                        drop table _state_segment""")


def _add_counts(a: dict, b: dict) -> dict:
    out = {s: dict(v) for s, v in a.items()}
    for source, counts in b.items():
        mine = out.setdefault(source, {c: 0 for c in counts})
        for c, v in counts.items():
            mine[c] = mine.get(c, 0) + v
    return out


def write(con: duckdb.DuckDBPyConnection, out: Path, key, zone_files: list[Path], counts: dict,
          carried: StatePlan | None) -> dict:
    """Write ``out/state/`` from ``records``, ``identities``, ``identity_representative`` and ``blocking_keys``.

    ``carried``: the state this run was built on (its record segments are carried and
    ``new_records`` appended; its identity segments are carried and the rows of the identities
    in ``state_touched`` or ``state_rebuilt`` appended), or None (both are written whole).
    Returns facts.
    """
    from linkage.pseudonymise.store import write_encrypted
    from linkage.workspace import carry_file

    folder = out / STATE_DIR
    folder.mkdir()
    key_columns = [c for c in con.sql("select * from blocking_keys limit 0").columns if c != "unique_id"]
    # the identities' rows that changed, when the state carries the others: touched ones (new, or
    # gaining records: facts and representative) and those whose blocking keys were rebuilt
    changed = (carried is not None and carried.meta.get("key_columns") == key_columns
               and table_exists(con, "state_touched") and table_exists(con, "state_rebuilt"))
    previous = carried.meta.get("identity_rows", []) if changed else []
    only = ""
    if changed:
        n = con.execute("""select count(*) from (select unique_id from state_touched
                                                 union select unique_id from state_rebuilt)""").fetchall()[0][0]
        changed = (len(previous) < MAX_SEGMENTS and len(previous) == len(carried.meta["identities"])
                   and sum(previous[1:]) + n <= MAX_REPLACED_SHARE * previous[0])
        only = ("semi join (select unique_id from state_touched union select unique_id from state_rebuilt) c "
                "using (unique_id)")
    segments: list[str] = []
    if carried is not None and len(carried.meta["records"]) < MAX_SEGMENTS:
        for name in carried.meta["records"]:
            carry_file(carried.folder / name, folder / name)
            segments.append(name)
        source = "new_records"
    else:
        source = "records"
    name = f"records.{len(segments):04d}.enc"
    reader = con.sql(f"select * from {source}").to_arrow_reader(65_536)
    if write_encrypted(folder / name, reader, reader.schema, key, ZONE) or not segments:
        segments.append(name)
    else:
        (folder / name).unlink()
    identity_segments: list[str] = []
    identity_rows: list[int] = []
    if changed:
        for name, rows in zip(carried.meta["identities"], previous):
            carry_file(carried.folder / name, folder / name)
            identity_segments.append(name)
            identity_rows.append(rows)
    else:
        only = ""
    cols = ", ".join(f"i.{quote_ident(c)}" for c in IDENTITY_TABLE)
    reader = con.sql(f"""select {cols}, r.representative, {", ".join(f"k.{quote_ident(c)}" for c in key_columns)}
                             from identities i join identity_representative r using (unique_id)
                             join blocking_keys k using (unique_id) {only}""").to_arrow_reader(65_536)
    name = f"identities.{len(identity_segments):04d}.enc"
    rows = write_encrypted(folder / name, reader, reader.schema, key, ZONE)
    if rows or not identity_segments:
        identity_segments.append(name)
        identity_rows.append(int(rows))
    else:
        (folder / name).unlink()
    meta = {"version": STATE_VERSION, "code": code_fingerprint(), "key_fingerprint": key.fingerprint,
            "zone_files": [_file_entry(f) for f in zone_files], "records": segments, "key_columns": key_columns,
            "identities": identity_segments, "identity_rows": identity_rows, "completeness": counts}
    (folder / "state.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return {"record_segments": len(segments), "identity_segments": len(identity_segments),
            "identities_written": int(rows)}


def discard(out: Path) -> None:
    """Remove a half-written state (the release then carries none; the next runs in full)."""
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
