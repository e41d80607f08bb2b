"""Link a data engineer's own extracts: ``hhlink link-files FILE ... --map MAP.toml --out DIR``.

The files are read (CSV or Parquet), their mapped columns normalised as ingest does
(:mod:`linkage.normalise`), encoded exactly as pseudonymisation encodes staged rows
(:mod:`linkage.pseudonymise.stage`: keyed HMAC tokens and Bloom filters under the master key),
and linked with the project's Splink model (:mod:`linkage.link.model`) cut down to the
roles the map provides: dedupe within each file and link across them. ``DIR`` receives

* ``clusters.csv`` - ``file, record_id, cluster_id``: every input row exactly once;
* ``pairs.csv`` - ``record_id_l, file_l, record_id_r, file_r, match_probability,
  match_weight``: every scored pair at or above ``link.keep_pairs_above``;
* ``model.json`` - the Splink model as used (Splink's own JSON);
* ``report.json`` and ``report.html`` - the linkage-quality report (aggregates only).

Nothing in ``DIR`` holds a cleartext identifier except the record ids the user supplied;
the files are built beside ``DIR`` and moved in only when all of them are complete.

The map names one table per file, by the file's stem (``patients_2024.csv`` ->
``[files.patients_2024]``); each key is a role and its value the column(s) playing it::

    [files.patients_2024]
    record_id  = "pid"
    first_name = "forename"
    surname    = "family_name"
    dob        = { column = "birth_date", format = "%d/%m/%Y" }
    sex        = "gender"
    postcode   = "post_code"
    address    = ["house_no", "street", "town"]     # joined with spaces
    id         = "nhs_no"

Instead of ``address``, the address can come in parts, each its own keyed Bloom filter
compared by Dice: ``street = ["house_no", "street"]`` (number and street lines) and
``locality = ["town", "county"]`` (place and region: fold a low-cardinality part such as a
state into the locality rather than give it a filter of its own, which would be as good as
a token). With parts, the joined address is still encoded for blocking but scored only
through the parts (see :data:`ADDRESS_PARTS`).

Training adapts to the data's size (see :mod:`linkage.link_files.model`): fixed m and u
priors where there are too few records to estimate them, u by random sampling and m by
EM where there are enough.

Example:
    >>> summary = link_files(["a.csv", "b.csv"], "map.toml", "out")      # doctest: +SKIP
    >>> summary["records"], summary["clusters"]                           # doctest: +SKIP
    (240, 151)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from linkage.config import Config, PseudonymiseConfig, load_config
from linkage.db import connect, path_literal, read_literal
from linkage.db import quote_ident as q
from linkage.db import quote_literal as lit
from linkage.errors import HhlinkError, read_toml
from linkage.keys import load_master_key
from linkage.link_files.csvread import DIALECT_KEYS, CsvReadError, Dialect, parse_dialect, read_csv_table
from linkage.normalise import normalised_sql
# pseudonymisation's own encoders, plans and SQL (private there): files are encoded exactly as staged rows are
from linkage.encodings import BloomEncoder, bit_count_sql
from linkage.pseudonymise.stage import (bloom_values, norm_address, bloom_params, build_dictionaries, Encoders,
                                        identifiers_sql, postcode_parts, Source)
from linkage.schemas import Column
from linkage.workspace import publish

__all__ = ["ROLES", "LinkFilesError", "MapError", "InputFileError", "BadValueError", "FileMap",
           "load_map", "link_files"]

log = logging.getLogger(__name__)

ROLES = ("record_id", "first_name", "surname", "dob", "sex", "postcode", "address", "street", "locality", "id")
_MULTI_COLUMN = frozenset({"first_name", "surname", "postcode", "address", "street", "locality", "id"})
# address parts: each a Bloom filter of its own (key "bloom:<role>", the address filter's
# parameters), column "<role>_bf"; with parts and no "address", the address is their join
ADDRESS_PARTS = ("street", "locality")
# how each role's text is normalised: the ingest rules of the role named here
_NORMALISE_AS = {"first_name": "first_name", "surname": "surname", "sex": "sex", "postcode": "postcode",
                 "address": "address", "street": "address", "locality": "address", "id": "nino", "dob": "dob"}
_SUFFIXES = {".csv": "csv", ".csv.gz": "csv", ".parquet": "parquet"}
# the generic identifier is tokenised like a linked department reference, in its own "id" domain
_ID_REFERENCE = {"id": "id_tok"}


class LinkFilesError(HhlinkError):
    """``hhlink link-files`` cannot run; the message names the file (and row and column)."""


class MapError(LinkFilesError):
    """The map is unreadable, not TOML, or not a valid map (unknown role, missing column name, ...)."""


class InputFileError(LinkFilesError):
    """An input file cannot be read, is not in the map, or lacks a mapped column."""


class BadValueError(InputFileError):
    """A value is unusable: a date off its format, a missing or repeated record id."""


@dataclass(frozen=True)
class FileMap:
    """One file's entry in the map: the column(s) playing each role, and the date-of-birth format."""

    table: str
    columns: dict[str, tuple[str, ...]]
    dob_format: str | None = None
    dialect: Dialect = Dialect()
    invalid: str = "null"       # a dob off its format: "null" (counted in the summary) or "error"

    @property
    def roles(self) -> set[str]:
        """The identifier roles this file provides (record_id excluded)."""
        return set(self.columns) - {"record_id"}


# -- the map -----------------------------------------------------------------------------------

def _column_list(where: str, role: str, value) -> tuple[str, ...]:
    if isinstance(value, str) and value.strip():
        return (value,)
    if role in _MULTI_COLUMN and isinstance(value, list) and value \
            and all(isinstance(v, str) and v.strip() for v in value):
        return tuple(value)
    wanted = "a column name or a list of column names" if role in _MULTI_COLUMN else "a column name"
    raise MapError(f"{where}: '{role}' must be {wanted}")


def _file_map(path: Path, table: str, entry) -> FileMap:
    where = f"{path}: [files.{table}]"
    if not isinstance(entry, dict):
        raise MapError(f"{where} must be a table of roles")
    unknown = sorted(set(entry) - set(ROLES) - set(DIALECT_KEYS))
    if unknown:
        raise MapError(f"{where}: unknown role(s) {', '.join(repr(u) for u in unknown)}; "
                       f"roles are {', '.join(ROLES)}; the CSV dialect keys {', '.join(DIALECT_KEYS)}")
    try:
        dialect = parse_dialect(where, entry)
    except ValueError as exc:
        raise MapError(str(exc)) from None
    entry = {k: v for k, v in entry.items() if k not in DIALECT_KEYS}
    columns: dict[str, tuple[str, ...]] = {}
    fmt, invalid = None, "null"
    for role, value in entry.items():
        if role == "dob" and isinstance(value, dict):
            extra = sorted(set(value) - {"column", "format", "invalid"})
            if extra or not isinstance(value.get("column"), str) or not value["column"].strip():
                raise MapError(f"{where}: dob must be {{ column = \"...\", format = \"...\", invalid = \"null\" }}")
            invalid = value.get("invalid", "null")
            if invalid not in ("null", "error"):
                raise MapError(f"{where}: dob invalid must be \"null\" (an invalid date is left out and counted) "
                               f"or \"error\" (it stops the run)")
            fmt = value.get("format", "%Y-%m-%d")
            if not isinstance(fmt, str) or "%" not in fmt:
                raise MapError(f"{where}: dob format must be a strptime format such as \"%d/%m/%Y\"")
            columns[role] = (value["column"],)
        elif role == "dob":
            columns[role] = _column_list(where, role, value)
            fmt = "%Y-%m-%d"
        else:
            columns[role] = _column_list(where, role, value)
    if "address" not in columns and any(p in columns for p in ADDRESS_PARTS):
        # the joined parts feed the address filter's blocking rules; scoring uses the parts
        columns["address"] = tuple(c for p in ADDRESS_PARTS for c in columns.get(p, ()))
    if not set(columns) - {"record_id"}:
        raise MapError(f"{where} maps no identifier role: name at least one of "
                       f"{', '.join(r for r in ROLES if r != 'record_id')}")
    return FileMap(table, columns, fmt, dialect, invalid)


def load_map(path: Path | str) -> dict[str, FileMap]:
    """Read and check a link-files map.

    Args:
        path: the TOML map; one ``[files.<stem>]`` table per file.

    Returns:
        The :class:`FileMap` of each table, by table name (the file stem).

    Raises:
        MapError: unreadable, not TOML, or not a valid map (the message names the table and key).

    Example:
        >>> load_map("docs/link-files-example.toml")["patients_2024"].dob_format   # doctest: +SKIP
        '%d/%m/%Y'
    """
    path = Path(path)
    data = read_toml(path, MapError, "map file")
    unknown = sorted(set(data) - {"files", "link_only"})
    if unknown:
        raise MapError(f"{path}: unknown key(s) {', '.join(repr(u) for u in unknown)}; "
                       "the map holds link_only and one [files.<file stem>] table per file")
    if not isinstance(data.get("link_only", False), bool):
        raise MapError(f"{path}: link_only must be true or false")
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        raise MapError(f"{path}: no [files.<file stem>] tables")
    maps = {table: _file_map(path, table, entry) for table, entry in files.items()}
    _check_formats(path, maps)
    return maps


def map_link_only(path: Path | str) -> bool:
    """The map's ``link_only`` option: link across files only, never within one (default false)."""
    return bool(read_toml(Path(path), MapError, "map file").get("link_only", False))


def _check_formats(path: Path, maps: dict[str, FileMap]) -> None:
    con = connect(threads=1)
    try:
        for spec in maps.values():
            if spec.dob_format is not None:
                try:
                    con.execute("SELECT try_strptime('2000-01-01', ?)", [spec.dob_format]).fetchall()
                except duckdb.Error:
                    raise MapError(f"{path}: [files.{spec.table}]: dob format {spec.dob_format!r} is not a valid "
                                   "strptime format") from None
    finally:
        con.close()


# -- reading and staging -----------------------------------------------------------------------

@dataclass
class _Input:
    """One input file: its path, format, table in the map, and where its staged rows go."""

    index: int
    path: Path
    kind: str
    spec: FileMap
    rows: int = 0
    present: set[str] = field(default_factory=set)     # mapped roles with at least one value
    nulled: dict[str, int] = field(default_factory=dict)   # column -> invalid values used as missing

    @property
    def name(self) -> str:
        """The internal source name (file stems may not be SQL identifiers)."""
        return f"src{self.index}"


def _stem_and_kind(path: Path) -> tuple[str, str] | None:
    lower = path.name.lower()
    for suffix, kind in sorted(_SUFFIXES.items(), key=lambda kv: -len(kv[0])):
        if lower.endswith(suffix):
            return path.name[:-len(suffix)], kind
    return None


def _inputs(files: Sequence[Path | str], mapping: dict[str, FileMap], map_path: Path) -> list[_Input]:
    if not files:
        raise InputFileError("no input files given")
    out, seen = [], {}
    for i, f in enumerate(files):
        path = Path(f)
        found = _stem_and_kind(path)
        if found is None:
            raise InputFileError(f"{path}: not a CSV or Parquet file (.csv, .csv.gz, .parquet)")
        stem, kind = found
        if not path.is_file():
            raise InputFileError(f"{path}: file not found")
        if not os.access(path, os.R_OK):
            raise InputFileError(f"{path}: file cannot be read (permission denied)")
        if stem in seen:
            raise InputFileError(f"{path} and {seen[stem]} have the same stem '{stem}'; the map names "
                                 "each file's table by its stem, so rename one")
        if stem not in mapping:
            raise InputFileError(f"{path}: no [files.{stem}] table in the map {map_path}")
        seen[stem] = path
        out.append(_Input(i, path, kind, mapping[stem]))
    return out


def _db_message(exc: Exception) -> str:
    """The error class and, where DuckDB names it, the line: never the message (it can quote values)."""
    m = re.search(r"[Ll]ine:?\s+(\d+)", str(exc))
    return f"{exc.__class__.__name__}{f', near line {m.group(1)}' if m else ''}"


def _load_raw(con: duckdb.DuckDBPyConnection, inp: _Input, scratch: Path) -> dict[str, str]:
    """Load a file into table ``raw_<name>`` (rows in file order); return its column types."""
    table = f"raw_{inp.name}"
    if inp.kind == "csv":
        # the map's dialect, every column as text: DuckDB's sniffer never guesses (linkage.link_files.csvread)
        try:
            names = read_csv_table(con, inp.path, table, inp.spec.dialect, scratch)
        except CsvReadError as exc:
            raise InputFileError(str(exc)) from None
        return {n: "VARCHAR" for n in names}
    source = f"read_parquet({read_literal(inp.path)})"
    try:
        con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT * FROM {source}")
        described = con.execute(f"DESCRIBE {table}").fetchall()
    except duckdb.Error as exc:
        raise InputFileError(f"{inp.path}: cannot be read as {inp.kind.upper()} ({_db_message(exc)})") from None
    return {r[0]: r[1] for r in described}


def _check_columns(inp: _Input, types: dict[str, str], map_path: Path) -> None:
    missing = [c for cols in inp.spec.columns.values() for c in cols if c not in types]
    if missing:
        roles = [r for r, cols in inp.spec.columns.items() if any(c in missing for c in cols)]
        raise InputFileError(f"{inp.path}: missing column(s) {', '.join(repr(c) for c in missing)} "
                             f"(mapped as {', '.join(roles)} in [files.{inp.spec.table}] of {map_path})")


def _text_sql(columns: tuple[str, ...], trim: bool = True) -> str:
    """The delivered text of a role: one column, or several joined with single spaces (trimmed unless the map keeps spaces)."""
    parts = [f"nullif({'trim' if trim else ''}(CAST({q(c)} AS VARCHAR)), '')" for c in columns]
    return parts[0] if len(parts) == 1 else f"nullif(concat_ws(' ', {', '.join(parts)}), '')"


def _role_column(role: str) -> Column:
    return Column(name=role, type="string", role=_NORMALISE_AS[role], nullable=True, description="")


def _stage_select(inp: _Input, types: dict[str, str]) -> str:
    """SELECT of a file's normalised role columns, with ``row_n`` (1 = first data row) and ``dob__t``."""
    cols = inp.spec.columns
    parts = ["rowid + 1 AS row_n"]
    rid = cols.get("record_id")
    parts.append(f"{_text_sql(rid, inp.spec.dialect.trim)} AS record_id" if rid else "CAST(rowid + 1 AS VARCHAR) AS record_id")
    for role in ("first_name", "surname", "sex", "postcode", "address", *ADDRESS_PARTS, "id"):
        if role in cols:
            parts.append(f"{normalised_sql(_role_column(role), _text_sql(cols[role]))} AS {role}")
    if "dob" in cols:
        col = cols["dob"][0]
        if types[col].upper().startswith(("DATE", "TIMESTAMP")):
            parts += [f"CAST({q(col)} AS VARCHAR) AS dob__t", f"CAST({q(col)} AS DATE) AS dob"]
        else:
            text = normalised_sql(_role_column("dob"), f"CAST({q(col)} AS VARCHAR)")
            parts += [f"{text} AS dob__t",
                      f"CAST(TRY_STRPTIME({text}, {lit(inp.spec.dob_format)}) AS DATE) AS dob"]
    return f"SELECT {', '.join(parts)} FROM raw_{inp.name}"


def _first_bad(con, table: str, condition: str) -> tuple[int, int] | None:
    row, n = con.execute(f"SELECT min(row_n), count(*) FROM {table} WHERE {condition}").fetchall()[0]
    return (row, n) if n else None


def _more(n: int) -> str:
    return f" (and {n - 1} more row{'s' if n > 2 else ''})" if n > 1 else ""


def _check_values(con, inp: _Input, table: str) -> None:
    cols = inp.spec.columns
    if "dob" in cols:
        bad = _first_bad(con, table, "dob__t IS NOT NULL AND dob IS NULL")
        if bad and inp.spec.invalid == "null":
            # left out of linkage (as a blank would be) and counted per file and column in the summary
            inp.nulled[cols["dob"][0]] = bad[1]
            log.info("%s: %d value(s) of column %r are not dates in %r: used as missing", inp.path.name, bad[1],
                     cols["dob"][0], inp.spec.dob_format)
        elif bad:
            raise BadValueError(f"{inp.path}: row {bad[0]}, column {cols['dob'][0]!r}: date of birth does not "
                                f"match the format {inp.spec.dob_format!r}{_more(bad[1])}")
    if "record_id" in cols:
        rid = ", ".join(repr(c) for c in cols["record_id"])
        bad = _first_bad(con, table, "record_id IS NULL")
        if bad:
            raise BadValueError(f"{inp.path}: row {bad[0]}, column {rid}: record id is blank{_more(bad[1])}")
        dup = con.execute(f"""SELECT min(second), count(*) FROM (
                                  SELECT record_id, min(row_n) FILTER (WHERE rn = 2) AS second
                                  FROM (SELECT record_id, row_n, row_number() OVER (PARTITION BY record_id
                                        ORDER BY row_n) AS rn FROM {table})
                                  GROUP BY record_id HAVING count(*) > 1)""").fetchall()[0]
        if dup[1]:
            raise BadValueError(f"{inp.path}: row {dup[0]}, column {rid}: record id repeats an earlier "
                                f"row's{_more(dup[1])}; record ids must be unique within a file")


def _stage(con, inp: _Input, scratch: Path, map_path: Path) -> Path:
    """Read, check and normalise one file; write its staged rows (cleartext) to the scratch folder."""
    types = _load_raw(con, inp, scratch)
    _check_columns(inp, types, map_path)
    table = f"st_{inp.name}"
    try:
        con.execute(f"CREATE OR REPLACE TABLE {table} AS {_stage_select(inp, types)} ORDER BY row_n")
    except duckdb.Error as exc:
        raise InputFileError(f"{inp.path}: cannot normalise its mapped columns ({_db_message(exc)})") from None
    _check_values(con, inp, table)
    roles = sorted(inp.spec.roles)
    counts = con.execute(f"SELECT count(*), {', '.join(f'count({r})' for r in roles)} FROM {table}").fetchall()[0]
    inp.rows = counts[0]
    inp.present = {r for r, n in zip(roles, counts[1:]) if n}
    target = scratch / f"{inp.name}.parquet"
    con.execute(f"COPY (SELECT * EXCLUDE (dob__t) FROM {table} ORDER BY row_n) TO {path_literal(target)} (FORMAT parquet)"
                if "dob" in inp.spec.columns else
                f"COPY (SELECT * FROM {table} ORDER BY row_n) TO {path_literal(target)} (FORMAT parquet)")
    con.execute(f"DROP TABLE raw_{inp.name}")
    return target


# -- encoding: the pseudonymisation stage's encoders and SQL, on the staged rows -----------------

def _tokens(inp: _Input) -> pa.Table:
    """Row-aligned record tokens: deterministic (file index, row), so training samples reproducibly."""
    i = np.arange(inp.rows, dtype=np.int64)
    return pa.table({"i": i, "record_token": [f"{inp.index:03d}{n + 1:010d}" for n in range(inp.rows)]})


def _encode(con, inputs: list[_Input], staged: dict[str, Path], config: Config, key) -> dict[str, int]:
    """Create ``ids_<name>`` per file: keyed encodings only, the record token as ``unique_id``."""
    plans = []
    for inp in inputs:
        roles = inp.spec.roles
        plans.append(Source(inp.name, staged[inp.name], None, inp.rows,
                             role_column={r: r for r in roles if r != "id" and r not in ADDRESS_PARTS},
                             references={"id": _ID_REFERENCE["id"]} if "id" in roles else {}))
        con.register(f"rt_{inp.name}", _tokens(inp))
    coder = Encoders(key, in_memory_encodings(config.pseudonymise))
    present = set().union(*(inp.spec.roles for inp in inputs))
    encoders = {r: e for r in sorted(present - {"id", *ADDRESS_PARTS}) if (e := coder.for_role(r)) is not None}
    if "id" in present:
        encoders["ref:id"] = coder.for_reference("id", _ID_REFERENCE["id"], "id_bf")
    distinct = build_dictionaries(con, plans, encoders)
    for plan in plans:
        con.execute(f"""CREATE OR REPLACE TABLE ids_{plan.name} AS
                        SELECT record_token AS unique_id, * EXCLUDE (record_token),
                               CASE WHEN postcode_tok IS NULL THEN []::VARCHAR[] ELSE [postcode_tok] END
                                   AS postcode_toks
                        FROM ({identifiers_sql(plan, encoders, _ID_REFERENCE)})""")
    for name in {e.name for e in encoders.values()}:
        con.unregister(name)
    for part in sorted(present & set(ADDRESS_PARTS)):
        distinct[f"d_{part}"] = _add_part_filter(con, inputs, staged, part, key, config)
    if "postcode" in present:
        _add_postcode_swaps(con, inputs, staged, coder, config)
    for inp in inputs:
        _filters_as_bits(con, f"ids_{inp.name}")
    return distinct


def _filters_as_bits(con, table: str) -> None:
    """Hold the Bloom filters of ``table`` as BITSTRING, each with its bit count ``<filter>_n``.

    Dice casts its inputs to BITSTRING, and a BLOB cast per pair and level made u sampling (each
    sampled pair computes up to twenty Dice) twice as slow; the stored counts are the half of Dice
    that depends on one record (:func:`linkage.encodings.dice_sql_counted`), computed once here
    rather than for every pair and level."""
    cols = con.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
                       "AND column_name LIKE '%\\_bf' ESCAPE '\\'", [table]).fetchall()
    if cols:
        casts = ", ".join(f"CAST({c} AS BITSTRING) AS {c}" for c, kind in cols if kind == "BLOB")
        counts = ", ".join(f"{bit_count_sql(c)} AS {c}_n" for c, _ in cols)
        con.execute(f"CREATE OR REPLACE TABLE {table} AS SELECT * {f'REPLACE ({casts})' if casts else ''}, "
                    f"{counts} FROM {table}")


def transposed(postcode: str) -> list[str]:
    """The postcode with each pair of adjacent characters swapped (spaces stay; equal neighbours give nothing).

    Example:
        >>> transposed("4117")
        ['1417', '4171']
    """
    out = []
    for i in range(len(postcode) - 1):
        a, b = postcode[i], postcode[i + 1]
        if a != b and " " not in (a, b):
            out.append(postcode[:i] + b + a + postcode[i + 2:])
    return out


def _add_postcode_swaps(con, inputs: list[_Input], staged: dict[str, Path], coder: Encoders, config: Config) -> None:
    """Add ``pc_swap_toks`` to every ``ids_<name>``: postcode tokens of the postcode with two adjacent characters swapped.

    In the postcode's own token domain on purpose (as ``dob_swap_tok`` is in the date's): a
    transposed postcode compares equal to the other record's ``postcode_tok``. Each is the
    token of a postcode-shaped string, as common as postcodes are, not a low-cardinality token.
    """
    pattern = re.compile(config.pseudonymise.postcode_pattern) if config.pseudonymise.postcode_pattern else None
    with_pc = [inp for inp in inputs if "postcode" in inp.spec.columns]
    values = con.sql("SELECT DISTINCT v FROM (" + " UNION ALL ".join(
        f"SELECT postcode AS v FROM read_parquet({read_literal(staged[inp.name])}) WHERE postcode IS NOT NULL"
        for inp in with_pc) + ")").to_arrow_table().column("v").to_pylist()
    variants = [transposed(postcode_parts(v, pattern)[0] or "") for v in values]
    flat = coder.tok("postcode").many([x for vs in variants for x in vs])
    it = iter(flat)
    con.register("d_pc_swap", pa.table({"v": pa.array(values, pa.string()),
                                        "toks": pa.array([[next(it) for _ in vs] for vs in variants],
                                                         pa.list_(pa.string()))}))
    for inp in inputs:
        if "postcode" in inp.spec.columns:
            con.execute(f"""CREATE OR REPLACE TABLE ids_{inp.name} AS
                            SELECT i.*, coalesce(d.toks, []::VARCHAR[]) AS pc_swap_toks FROM ids_{inp.name} i
                            LEFT JOIN (SELECT printf('%03d%010d', {inp.index}, file_row_number + 1) AS t, postcode
                                       FROM read_parquet({read_literal(staged[inp.name])}, file_row_number = true)) s
                                   ON s.t = i.unique_id
                            LEFT JOIN d_pc_swap d ON d.v = s.postcode""")
        else:
            con.execute(f"CREATE OR REPLACE TABLE ids_{inp.name} AS "
                        f"SELECT *, []::VARCHAR[] AS pc_swap_toks FROM ids_{inp.name}")
    con.unregister("d_pc_swap")


def in_memory_encodings(cfg: PseudonymiseConfig) -> PseudonymiseConfig:
    """The encoding settings for filters that exist in memory for one run and are never written.

    Levelling a filter's weight (``level_weight``) defends stored filters, whose weight anyone
    holding the zone can count; ``link-files`` stores none, and levelling cost it 0.13 F1 points on
    FEBRL4 without the id (0.9954 against 0.9967, two runs of ``python -m bench.public``), so here
    it is off.
    The rest (keys, lengths, hash counts, XOR-folding) is the zone's.
    """
    return cfg.model_copy(update={"level_weight": False})


def _add_part_filter(con, inputs: list[_Input], staged: dict[str, Path], part: str, key, config: Config) -> int:
    """Add ``<part>_bf`` to every ``ids_<name>``: the part's keyed Bloom filter (NULL where a file lacks it)."""
    bloom = BloomEncoder(key.subkey(f"bloom:{part}"), bloom_params(in_memory_encodings(config.pseudonymise))["addr_bf"])
    with_part = [inp for inp in inputs if part in inp.spec.columns]
    # DISTINCT: one dictionary row per value, or the join below would repeat records
    values = con.sql("SELECT DISTINCT v FROM (" + " UNION ALL ".join(
        f"SELECT {part} AS v FROM read_parquet({read_literal(staged[inp.name])}) WHERE {part} IS NOT NULL"
        for inp in with_part) + ")").to_arrow_table().column("v")
    con.register(f"d_{part}", pa.table({"v": values, "bf": bloom_values(
        bloom, [norm_address(v) or None for v in values.to_pylist()])}))
    for inp in inputs:
        if part in inp.spec.columns:
            con.execute(f"""CREATE OR REPLACE TABLE ids_{inp.name} AS
                            SELECT i.*, CAST(d.bf AS BLOB) AS {part}_bf FROM ids_{inp.name} i
                            LEFT JOIN (SELECT printf('%03d%010d', {inp.index}, file_row_number + 1) AS t, {part}
                                       FROM read_parquet({read_literal(staged[inp.name])}, file_row_number = true)) s
                                   ON s.t = i.unique_id
                            LEFT JOIN d_{part} d ON d.v = s.{part}""")
        else:
            con.execute(f"CREATE OR REPLACE TABLE ids_{inp.name} AS "
                        f"SELECT *, CAST(NULL AS BLOB) AS {part}_bf FROM ids_{inp.name}")
    con.unregister(f"d_{part}")
    return len(values)


# -- output ------------------------------------------------------------------------------------

def _records_sql(inputs: list[_Input]) -> str:
    """Every input row: its internal id, file (table name), record id and order."""
    return " UNION ALL ".join(
        f"SELECT printf('%03d%010d', {inp.index}, row_n) AS unique_id, {lit(inp.spec.table)} AS file, "
        f"{inp.index} AS file_index, row_n, record_id FROM st_{inp.name}" for inp in inputs) + " ORDER BY unique_id"


def _write_outputs(con, pairs: str | None, clusters: str | None, out: Path) -> None:
    """``clusters.csv`` (every row of ``lf_records`` once) and ``pairs.csv`` from Splink's tables."""
    cluster_of = f"LEFT JOIN {clusters} c USING (unique_id)" if clusters else ""
    cid = "coalesce(c.cluster_id, r.unique_id)" if clusters else "r.unique_id"
    # cluster ids numbered in order of each cluster's first record (file order, then row): reproducible
    con.execute(f"""CREATE OR REPLACE TABLE lf_clusters AS
        WITH c AS (SELECT r.*, {cid} AS splink_cluster FROM lf_records r {cluster_of}),
        first AS (SELECT splink_cluster, min(unique_id) AS first_id FROM c GROUP BY 1)
        SELECT c.unique_id, c.file, c.file_index, c.row_n, c.record_id,
               dense_rank() OVER (ORDER BY f.first_id) AS cluster_id
        FROM c JOIN first f USING (splink_cluster)""")
    con.execute(f"""COPY (SELECT file, record_id, cluster_id FROM lf_clusters ORDER BY file_index, row_n)
                    TO {path_literal(out / 'clusters.csv')} (HEADER, DELIMITER ',')""")
    if pairs:
        # the earlier record (file order, then row) on the left, so each pair reads one way
        con.execute(f"""CREATE OR REPLACE TABLE lf_pairs AS
            SELECT least(unique_id_l, unique_id_r) AS id_l, greatest(unique_id_l, unique_id_r) AS id_r,
                   match_probability, match_weight FROM {pairs}""")
    else:
        con.execute("CREATE OR REPLACE TABLE lf_pairs (id_l VARCHAR, id_r VARCHAR, match_probability DOUBLE, "
                    "match_weight DOUBLE)")
    con.execute(f"""COPY (SELECT l.record_id AS record_id_l, l.file AS file_l, r.record_id AS record_id_r,
                                 r.file AS file_r, p.match_probability, p.match_weight
                          FROM lf_pairs p JOIN lf_records l ON l.unique_id = p.id_l
                          JOIN lf_records r ON r.unique_id = p.id_r
                          ORDER BY l.file_index, l.row_n, r.file_index, r.row_n)
                    TO {path_literal(out / 'pairs.csv')} (HEADER, DELIMITER ',')""")


def _publish(built: Path, out: Path) -> None:
    """Move the finished files into ``out`` (each swapped in by :func:`publish`; other files there are left alone)."""
    if not out.exists():
        publish(built, out)
        return
    for item in built.iterdir():
        publish(item, out / item.name)
    shutil.rmtree(built, ignore_errors=True)


def link_files(files: Sequence[Path | str], map_path: Path | str, out: Path | str, config: Config | None = None,
               key_file: Path | str | None = None, threshold: float | None = None,
               link_only: bool | None = None) -> dict:
    """Pseudonymise and link a data engineer's own extracts; write clusters, pairs and a report to ``out``.

    Args:
        files: CSV (``.csv``, ``.csv.gz``) or Parquet files; each file's stem names its table in the map.
        map_path: the TOML map (see :func:`load_map`).
        out: the output folder (created; files already there other than ours are left alone).
        config: the hhlink config (encoding parameters; ``link.keep_pairs_above``, ``link.seed``,
            sampling sizes, ``memory_limit`` and ``threads``); default the project's ``hhlink.toml``.
        key_file: a master key file; default ``HHLINK_KEY``, ``HHLINK_KEY_FILE`` or the default key file.
        threshold: match probability at or above which records share a cluster; default ``link.threshold``.
        link_only: compare records of different files only (no dedupe within a file); default the
            map's ``link_only`` (false). Needs at least two files.

    Returns:
        A summary: records per file, clusters, pairs, training facts, seconds. Never a record value.

    Raises:
        MapError: the map is unreadable or invalid.
        InputFileError: a file is unreadable, not in the map, or lacks a mapped column.
        BadValueError: a date off its format, a blank or repeated record id (file, row and column named).
        SecretKeyError: no usable key. In every case nothing is written to ``out``.

    Example:
        >>> link_files(["patients_2024.csv", "clinic.parquet"], "map.toml", "linked")["clusters"]  # doctest: +SKIP
        1873
    """
    from linkage.link_files.model import run_model
    from linkage.link_files.report import warm_up_charts, write_report

    t0 = time.perf_counter()
    warm_up_charts()
    config = config or load_config()
    threshold = config.link.threshold if threshold is None else threshold
    if not 0 < threshold < 1:
        raise LinkFilesError(f"threshold must be between 0 and 1, not {threshold}")
    map_path, out = Path(map_path), Path(out)
    mapping = load_map(map_path)
    inputs = _inputs(files, mapping, map_path)
    link_only = map_link_only(map_path) if link_only is None else link_only
    if link_only and len(inputs) < 2:
        raise LinkFilesError("link_only links across files: give at least two files")
    if out.exists() and not out.is_dir():
        raise LinkFilesError(f"{out}: exists and is not a folder")
    key = load_master_key(key_file)       # before anything is written
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.scratch-", dir=out.parent))   # mode 0700
        built = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise LinkFilesError(f"{out.parent}: cannot write there ({exc.strerror})") from None
    # the same memory and thread limits as hhlink link; spill files can hold cleartext: keep them in scratch
    con = connect(config.link, spill=scratch / "spill")
    try:
        staged = {inp.name: _stage(con, inp, scratch, map_path) for inp in inputs}
        distinct = _encode(con, inputs, staged, config, key)
        # from here on only record ids and row numbers remain in clear, and only in memory
        con.execute(f"CREATE TABLE lf_records AS {_records_sql(inputs)}")
        for inp in inputs:
            con.execute(f"DROP TABLE st_{inp.name}")
            staged[inp.name].unlink()
        run = run_model(con, inputs, config, threshold, built, link_only=link_only)
        _write_outputs(con, run.pairs_table, run.clusters_table, built)
        summary = {
            "files": {inp.spec.table: {"records": inp.rows, "roles": sorted(inp.spec.roles),
                                       "roles_with_values": sorted(inp.present),
                                       "invalid_as_missing": dict(inp.nulled)} for inp in inputs},
            "records": sum(inp.rows for inp in inputs),
            "clusters": con.execute("SELECT count(DISTINCT cluster_id) FROM lf_clusters").fetchall()[0][0],
            "pairs_scored": con.execute("SELECT count(*) FROM lf_pairs").fetchall()[0][0],
            "pairs_at_threshold": con.execute(
                f"SELECT count(*) FROM lf_pairs WHERE match_probability >= {threshold!r}").fetchall()[0][0],
            "link_only": link_only, "threshold": threshold, "keep_pairs_above": min(config.link.keep_pairs_above, threshold),
            "key_fingerprint": key.fingerprint, "distinct_values_encoded": distinct, **run.facts,
        }
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        write_report(con, inputs, summary, run.charts, built)
        _publish(built, out)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
    finally:
        con.close()
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("linked %d records from %d files into %d clusters", summary["records"], len(inputs), summary["clusters"])
    return summary
