"""The linked zone's records: each record token with its identity, in append-only segments.

``linked/records.NNNN.parquet`` hold every record the link stage linked, one row each:
``record_token, source, year, birth_year, unique_id, benefit_unit_tok, bu_role, claim_tok``,
sorted by record token within a segment (a keyed, random token: no landing order survives).

A record's identity never changes: ``unique_id`` is a digest of its source and its identity
encodings (:func:`linkage.link.stage.records_sql`). Only an identity's person key does, when
new evidence merges or splits persons. So the record segments are append-only: a release
carries the previous release's segments into its ``linked/`` (hard links) and adds one
holding its new records, and a record's person key is read through its identity, from
``identities.parquet`` (:func:`records_relation`). At 1,000,000 persons, writing every
record with its person key again (19.4 million rows) took about 20 s of a monthly delivery
whose records are 0.1% of them; the identities file (4.8 million rows) is written anyway.

A full link writes one segment. After :data:`MAX_SEGMENTS` segments a release writes them
again as one.

Example:
    >>> con.sql(f"select count(distinct person_key) from {records_relation(ws / 'linked')}")   # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from linkage.db import path_literal, read_literal
from linkage.errors import HhlinkError
from linkage.workspace import carry_file

#: the columns of a record segment, in order
RECORD_COLUMNS = ("record_token", "source", "year", "birth_year", "unique_id", "benefit_unit_tok", "bu_role",
                  "claim_tok")
#: a release past this many segments writes all its records as one
MAX_SEGMENTS = 36
_PATTERN = "records.[0-9][0-9][0-9][0-9].parquet"


class LinkedRecordsError(HhlinkError):
    """``linked/`` holds no record segments (the link stage has not run, or ran under older code)."""


def record_files(linked: Path | str) -> list[Path]:
    """The record segments of ``linked/``, in order (empty when there are none)."""
    return sorted(Path(linked).glob(_PATTERN))


def records_relation(linked: Path | str, person_key: bool = True, persons: str | None = None) -> str:
    """A SQL relation of every linked record (:data:`RECORD_COLUMNS`), with its person key from
    ``identities.parquet`` unless ``person_key`` is False. ``persons``: a table (unique_id,
    person_key) already read from it, for a caller that scans the records more than once.

    Raises:
        LinkedRecordsError: ``linked/`` holds no record segments.
    """
    files = record_files(linked)
    if not files:
        raise LinkedRecordsError(f"{Path(linked) / 'records.0000.parquet'}: missing; run 'hhlink link' first")
    scan = f"read_parquet([{', '.join(read_literal(f) for f in files)}])"
    if not person_key:
        return f"(select * from {scan})"
    persons = persons or f"(select unique_id, person_key from {read_literal(Path(linked) / 'identities.parquet')})"
    return f"(select r.*, i.person_key from {scan} r join {persons} i using (unique_id))"


def write_records(con: duckdb.DuckDBPyConnection, out: Path, records: str, *, previous: Path | None = None,
                  new: str | None = None) -> dict:
    """Write ``out``'s record segments from table ``records`` (every record of the release).

    With ``previous`` (the previous release's ``linked/``) and ``new`` (a table of the records it
    lacks), its segments are carried and ``new`` appended as one more, provided they hold exactly
    ``records`` less ``new`` by count (their footers say so) and there are fewer than
    :data:`MAX_SEGMENTS`; otherwise every record is written as one segment.

    Returns:
        ``{"linked_records": {"segments": how many out holds, "written": rows written now}}``.
    """
    carried = record_files(previous) if previous is not None and new is not None else []
    if carried:
        rows = con.execute(f"""select (select sum(num_rows) from parquet_file_metadata(
                                           [{', '.join(read_literal(f) for f in carried)}])),
                                      (select count(*) from {records}), (select count(*) from {new})""").fetchone()
        if rows[0] != rows[1] - rows[2] or len(carried) >= MAX_SEGMENTS:
            carried = []
    for f in carried:
        carry_file(f, out / f.name)
    source = new if carried else records
    written = con.execute(f"select count(*) from {source}").fetchone()[0]
    if written or not carried:
        # zstd's fastest level: at 1,000,000 persons every record (0.9 GB) wrote in 19 s against the default
        # level's 26 s, to a file of the same size (random tokens barely compress)
        con.execute(f"""copy (select {', '.join(RECORD_COLUMNS)} from {source} order by record_token)
                        to {path_literal(out / f'records.{len(carried):04d}.parquet')}
                        (compression zstd, compression_level 1)""")
    return {"linked_records": {"segments": len(carried) + (1 if written or not carried else 0), "written": int(written)}}
