"""Read landing files into DuckDB, every record accounted for: delivered values or a parse fault.

One landing file becomes one DuckDB table (or view) of normalised text and delivered
identifier values (:func:`linkage.normalise.norm_select`), plus ``_file``, ``_line``,
``_row`` and ``_rawtext``, in file order, and a list of parse rejects (records that
cannot be split into the schema's fields). File-level faults
(unreadable, empty, a missing or unexpected column, the wrong encoding) raise
:class:`IngestError` with one line naming the file and, where there is one, the column.

CSV has two readers with one record model (RFC 4180: comma, double quote, doubled
quotes inside quoted fields, LF or CRLF line ends):

- the *fast* reader is DuckDB's ``read_csv`` (strict mode, ``store_rejects``), which
  parses and normalises in one multi-threaded statement; whole staging runs at about
  200k rows per CPU-second here. DuckDB does not report the line of an accepted row,
  so its answer is used only when every record is exactly one physical line (the
  file's line count equals header + accepted + rejected records, no rejected record
  spans lines, no lone carriage return); line numbers then follow from the rejected
  lines' positions. Any disagreement falls back to the exact reader, so a DuckDB
  quirk can cost speed but never a row.
- otherwise (blank lines, quoted line breaks, an unterminated quote, control characters,
  a line too long for DuckDB) the *exact* reader, Python's ``csv`` module in strict mode
  over the physical lines, streams the file and records each record's first line. It is
  about 4x slower (about 55k rows per CPU-second for whole staging) and is meant for
  deliveries that are already malformed.

Both readers account for the file itself, not only for what they parsed: the physical
lines are counted from the bytes (line feeds, independently of any CSV parser) and every
run checks that rows read plus continuation lines (the extra lines of records holding a
quoted line break) equal the data lines. A quote left open is contained to its own
physical line: a record may continue onto the next lines only if the quoted value closes
within :data:`MAX_RECORD_LINES` lines and the record then has exactly the header's fields;
otherwise that one line is quarantined (``quote``) and the next line starts a new record.
A file whose last line has no line break is flagged in the manifest and that last record
is quarantined (``no_final_newline``): it may have been cut mid-value. A file whose lines
end in a lone carriage return (CR only) is read as if they ended in line feeds.

Parquet is read with ``read_parquet(file_row_number=true)``; values are cast to VARCHAR
so that the same checks apply, and ``_line`` is the row number + 1.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import logging
import os
import re
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa

from linkage.errors import HhlinkError
from linkage.db import quote_ident as q
from linkage.db import quote_literal as lit
from linkage.db import read_literal
from linkage.normalise import norm_select
from linkage.schemas import Schema

log = logging.getLogger(__name__)

CHUNK = 1 << 24
BATCH = 200_000
MAX_RECORD_LINES = 100     # a quoted value may hold line breaks, but a record spans at most this many lines
# C0 control characters but tab, line feed and carriage return (handled as line ends), and DEL
_CONTROL_BYTES = bytes([*range(0, 9), 11, 12, *range(14, 32), 127])
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f]")      # in a value a carriage return is one too
csv.field_size_limit(1 << 30)    # lengths are the schema's to limit (reason too_long), not the csv module's
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
         (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))
_DUCKDB_REASONS = {
    "MISSING COLUMNS": "field_count", "TOO MANY COLUMNS": "field_count",
    "INVALID ENCODING": "encoding", "INVALID UNICODE": "encoding",
    "UNQUOTED VALUE": "quote",      # "LINE SIZE OVER MAXIMUM" sends the file to the exact reader
}
REJECT_COLUMNS = ("_file", "_line", "_row", "raw", "column", "reason")
NO_NULL = "\x01hhlink-no-null\x01"     # read_csv's NULL string: no field holds it


class IngestError(HhlinkError):
    """A landing file cannot be ingested (unreadable, empty, wrong columns or encoding, re-sent)."""


@dataclass
class LandingFile:
    """One landing file and its fingerprint."""

    path: Path
    source: str
    fmt: str
    size: int = 0
    sha256: str = ""
    newlines: int = 0
    ends_with_newline: bool = True
    lone_cr: bool = False       # a carriage return not followed by a line feed
    control: bool = False       # a control character (NUL, ...) somewhere in the file
    blank: bool = False         # an empty line somewhere in the file
    label: str = ""
    line_ends: str = "LF"       # "CR" when the delivered file ends its lines in lone carriage returns

    @property
    def name(self) -> str:
        """The landing file name, as recorded in ``_file`` and the manifest."""
        return self.label or self.path.name

    @property
    def physical_lines(self) -> int:
        """Lines in the file (a last line without a line break counts)."""
        return self.newlines + (0 if self.ends_with_newline or self.size == 0 else 1)

    @property
    def cr_only(self) -> bool:
        """True when the lines end in lone carriage returns (no line feed at all)."""
        return self.newlines == 0 and self.lone_cr


@dataclass
class Loaded:
    """What reading one file produced: a table of delivered values and the parse rejects."""

    table: str
    rows_read: int
    reader: str
    rejects: list[tuple] = field(default_factory=list)   # REJECT_COLUMNS, raw filled
    data_lines: int = 0                                    # physical lines after the header (from the bytes)
    continuation_lines: int = 0                            # lines read as part of an earlier line's record
    final_newline: bool = True
    raw_lookup: Path | None = None                         # file to fetch raw lines of later failures
    view: bool = False                                     # ``table`` is a view over ``<table>_parsed``


def find_files(landing: Path, schema: Schema) -> list[LandingFile]:
    """The landing files of a source: ``<file_stem>*.csv`` and ``<file_stem>*.parquet``, by name."""
    out = []
    for fmt in ("csv", "parquet"):
        for p in landing.glob(f"{schema.file_stem}*.{fmt}"):
            if p.is_file():
                out.append(LandingFile(p, schema.source, fmt))
    return sorted(out, key=lambda f: f.name)


def _fingerprint_one(f: LandingFile) -> LandingFile:
    h, n, last, cr, crlf, tail = hashlib.sha256(), 0, b"", 0, 0, b""
    control = blank = False
    try:
        with open(f.path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
                n += chunk.count(b"\n")
                cr += chunk.count(b"\r")
                crlf += chunk.count(b"\r\n") + (last == b"\r" and chunk[:1] == b"\n")
                last = chunk[-1:]
                control = control or len(chunk.translate(None, _CONTROL_BYTES)) != len(chunk)
                edge = tail + chunk[:2]
                blank = blank or b"\n\n" in chunk or b"\n\r\n" in chunk or b"\n\n" in edge or b"\n\r\n" in edge
                tail = chunk[-2:]
        f.size = f.path.stat().st_size
    except OSError as exc:
        raise IngestError(f"landing/{f.name}: cannot read the file ({exc.strerror})") from None
    f.sha256, f.newlines, f.ends_with_newline = h.hexdigest(), n, last == b"\n"
    f.lone_cr, f.control, f.blank = cr != crlf, control, blank
    return f


def fingerprint(files: list[LandingFile], threads: int = 2) -> list[LandingFile]:
    """Fill each file's SHA-256, size and line count (files read in parallel)."""
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return list(pool.map(_fingerprint_one, files))


# --- header and encoding ---------------------------------------------------------------


def _is_utf8(schema: Schema) -> bool:
    return schema.encoding.lower().replace("_", "-") in ("utf-8", "utf8")


def read_header(f: LandingFile, schema: Schema) -> tuple[list[str], bool]:
    """The header fields of a UTF-8 CSV and whether its lines end in CRLF; file-level faults raise."""
    where = f"landing/{f.name}"
    if f.size == 0:
        raise IngestError(f"{where}: the file is empty")
    with open(f.path, "rb") as fh:
        head = fh.read(1 << 20)
    if not f.label:     # the delivered file, not a transcoded copy
        encoding = schema.encoding.lower().replace("_", "-")
        for bom, name in _BOMS:
            if head.startswith(bom) and not encoding.startswith(name.lower()):
                raise IngestError(f"{where}: the file is {name} (byte-order mark) but {schema.path.name} "
                                  f"declares encoding '{schema.encoding}'")
    line = head.split(b"\r" if f.cr_only else b"\n", 1)[0]
    if line.startswith(codecs.BOM_UTF8):
        line = line[len(codecs.BOM_UTF8):]
    if b"\x00" in line:
        raise IngestError(f"{where}: the header holds NUL bytes: the file is not '{schema.encoding}' text "
                          f"(UTF-16 without a byte-order mark?)")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise IngestError(f"{where}: the header is not valid {schema.encoding}: the file is in another "
                          f"encoding; declare it as 'encoding' in {schema.path.name}") from None
    crlf = text.endswith("\r")
    try:
        fields = next(csv.reader([text.rstrip("\r")], strict=True), [])
    except csv.Error as exc:
        raise IngestError(f"{where}: line 1 (the header) cannot be read as CSV ({exc})") from None
    fields = [x.strip() for x in fields]
    _check_columns(where, fields, schema)
    if f.physical_lines <= 1 and not f.cr_only:
        raise IngestError(f"{where}: the file has a header but no data rows")
    return fields, crlf


def _check_columns(where: str, fields: list[str], schema: Schema) -> None:
    seen = set()
    for name in fields:
        if name in seen:
            raise IngestError(f"{where}: column '{name}' appears twice in the header")
        seen.add(name)
    for name in schema.names:
        if name not in seen:
            raise IngestError(f"{where}: required column '{name}' is missing from the header "
                              f"(schema {schema.path.name} v{schema.version})")
    for name in fields:
        if name not in schema.names:
            raise IngestError(f"{where}: column '{name}' in the header is not in schema "
                              f"{schema.path.name} v{schema.version}")


def _as_utf8(f: LandingFile, schema: Schema, tmpdir: Path) -> LandingFile:
    """The file itself when declared UTF-8, else a transcoded copy (same lines, same name)."""
    if _is_utf8(schema):
        return f
    for bom, name in _BOMS:
        with open(f.path, "rb") as fh:
            if fh.read(4).startswith(bom) and not schema.encoding.lower().startswith(name.lower()):
                raise IngestError(f"landing/{f.name}: the file is {name} (byte-order mark) but "
                                  f"{schema.path.name} declares encoding '{schema.encoding}'")
    fd, out = tempfile.mkstemp(prefix=f".{f.name}.utf8-", dir=tmpdir)
    os.close(fd)
    try:
        with open(f.path, encoding=schema.encoding, newline="") as src, \
                open(out, "w", encoding="utf-8", newline="") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
    except UnicodeDecodeError as exc:
        raise IngestError(f"landing/{f.name}: the file is not valid {schema.encoding} (its declared "
                          f"encoding): {exc.reason}") from None
    except LookupError:
        raise IngestError(f"{schema.path.name}: unknown encoding '{schema.encoding}'") from None
    return _fingerprint_one(LandingFile(Path(out), f.source, f.fmt, label=f.name))


# --- CSV --------------------------------------------------------------------------------


def load_csv(con: duckdb.DuckDBPyConnection, f: LandingFile, schema: Schema, table: str,
             tmpdir: Path) -> Loaded:
    """Read one CSV landing file into ``table``; see the module docstring for the two readers."""
    utf8 = _as_utf8(f, schema, tmpdir)
    if utf8.cr_only:
        utf8 = _cr_to_lf(utf8, tmpdir)
    fields, crlf = read_header(utf8, schema)
    loaded = None
    if not (utf8.control or utf8.blank or utf8.lone_cr):
        loaded = _load_csv_fast(con, utf8, utf8.path, fields, crlf, table, schema)
    if loaded is None:
        log.info("landing/%s: records span lines, blank lines or control characters: exact reader", f.name)
        loaded = _load_csv_exact(con, utf8, utf8.path, fields, table, schema)
    loaded.data_lines = utf8.physical_lines - 1
    loaded.final_newline = utf8.ends_with_newline
    f.line_ends = utf8.line_ends
    if loaded.rows_read + loaded.continuation_lines != loaded.data_lines:
        # the reader lost or invented lines: never publish a count that does not match the file
        raise IngestError(f"landing/{f.name}: {loaded.rows_read:,} rows read + {loaded.continuation_lines:,} "
                          f"continuation lines but the file has {loaded.data_lines:,} data lines; nothing published")
    return loaded


def _cr_to_lf(f: LandingFile, tmpdir: Path) -> LandingFile:
    """A copy of a file whose lines end in lone carriage returns, with line feeds instead (same name)."""
    fd, out = tempfile.mkstemp(prefix=f".{f.name}.lf-", dir=tmpdir)
    with open(f.path, "rb") as src, os.fdopen(fd, "wb") as dst:
        while chunk := src.read(CHUNK):
            dst.write(chunk.replace(b"\r", b"\n"))
    log.info("landing/%s: lines end in lone carriage returns (CR): read as line feeds", f.name)
    copy = _fingerprint_one(LandingFile(Path(out), f.source, f.fmt, label=f.name))
    copy.line_ends = "CR"
    return copy


def _load_csv_fast(con, f: LandingFile, path: Path, fields: list[str], crlf: bool, table: str,
                   schema: Schema) -> Loaded | None:
    rej, scan, parsed = f"{table}_rej", f"{table}_scan", f"{table}_parsed"
    # One extra column, null padding and a NULL string no field can hold tell field counts
    # apart: a missing field is NULL, an empty one '', and a surplus one fills _extra.
    # (DuckDB otherwise accepts a row with one surplus empty field, shifting nothing but
    # hiding a stray delimiter.)
    columns = "{" + ", ".join(f"{lit(n)}: 'VARCHAR'" for n in [*fields, "_extra"]) + "}"
    # new_line stays auto-detected: an explicit '\\r\\n' with null_padding returns no rows at
    # all in DuckDB 2.0.1 (the line-count check would catch it, at the exact reader's speed)
    try:
        _parse_fast(con, f, path, fields, columns, parsed, rej, scan, schema)
    except duckdb.Error as exc:
        # e.g. "the parallel scanner does not support null_padding with quoted new lines":
        # records span lines, which is the exact reader's job anyway
        # only the error's kind: DuckDB's CSV messages can quote the offending line
        log.info("landing/%s: fast reader declined (%s)", f.name, exc.__class__.__name__)
        con.execute(f"DROP TABLE IF EXISTS {parsed}; DROP TABLE IF EXISTS {rej}; DROP TABLE IF EXISTS {scan}")
        return None
    return _locate_fast(con, f, path, table, parsed, rej, scan)


def _parse_fast(con, f: LandingFile, path: Path, fields: list[str], columns: str, parsed: str, rej: str,
                scan: str, schema: Schema) -> None:
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE {parsed} AS SELECT {norm_select(schema)}, {lit(f.name)} AS _file,
            (_extra IS NOT NULL OR {q(fields[-1])} IS NULL) AS _bad_shape
        FROM read_csv({read_literal(path)}, header=true, auto_detect=false, columns={columns}, delim=',', quote='"',
            escape='"', strict_mode=true, null_padding=true, nullstr={lit(NO_NULL)},
            store_rejects=true, rejects_table={lit(rej)}, rejects_scan={lit(scan)})""")


def _locate_fast(con, f: LandingFile, path: Path, table: str, parsed: str, rej: str, scan: str) -> Loaded | None:
    """Line numbers for the fast reader's rows, or None when records do not map one-to-one onto lines."""
    accepted = con.execute(f"SELECT count(*) FROM {parsed}").fetchall()[0][0]
    bad = con.execute(f"""
        SELECT line, list(error_type ORDER BY column_idx), list(column_name ORDER BY column_idx),
               bool_or(contains(trim(csv_line, chr(13) || chr(10)), chr(10)))
        FROM {rej} GROUP BY line ORDER BY line""").fetchall()
    con.execute(f"DROP TABLE IF EXISTS {rej}; DROP TABLE IF EXISTS {scan}")
    lines = [b[0] for b in bad]
    # DuckDB may end a line at a lone CR, where the exact reader does not; a line over
    # DuckDB's line size is the exact reader's (the schema's lengths decide, not DuckDB's buffer)
    if any("LINE SIZE OVER MAXIMUM" in b[1] for b in bad):
        con.execute(f"DROP TABLE {parsed}")
        return None
    last = f.physical_lines
    cut = not f.ends_with_newline and last not in lines     # the last line may be cut short: never staged
    if f.lone_cr or f.physical_lines != 1 + accepted + len(bad) or any(b[3] for b in bad) \
            or any(not 2 <= ln <= f.physical_lines for ln in lines):
        con.execute(f"DROP TABLE {parsed}")
        return None
    cut_reason = "no_final_newline"
    if cut and con.execute(f"SELECT bool_or(_bad_shape) FROM {parsed} WHERE rowid = {accepted - 1}").fetchall()[0][0]:
        cut_reason = "field_count"      # a fault the line shows itself comes first, as in the exact reader
    if not bad:
        con.execute(f"""CREATE OR REPLACE TEMP VIEW {table} AS SELECT *, rowid + 2 AS _line, rowid + 1 AS _row,
            CAST(NULL AS VARCHAR) AS _rawtext FROM {parsed} {f"WHERE rowid + 2 < {last}" if cut else ""}""")
    else:
        # accepted row k comes after the i rejected lines that have fewer than k accepted rows before them
        con.execute(f"CREATE OR REPLACE TEMP TABLE {table}_gaps (a BIGINT, i BIGINT)")
        # a = accepted rows before the i-th rejected line; consecutive rejects share an a,
        # and the row after them must skip all of them: keep the largest i per a
        gaps = {ln - 1 - i: i for i, ln in enumerate(lines, start=1)}
        con.executemany(f"INSERT INTO {table}_gaps VALUES (?, ?)", sorted(gaps.items()))
        con.execute(f"""CREATE OR REPLACE TEMP TABLE {table} AS
            SELECT *, _line - 1 AS _row, CAST(NULL AS VARCHAR) AS _rawtext
            FROM (SELECT p.*, p.rowid + 2 + coalesce(g.i, 0) AS _line
                  FROM {parsed} p ASOF LEFT JOIN {table}_gaps g ON p.rowid + 1 > g.a)
            ORDER BY _line""")
        con.execute(f"DROP TABLE {table}_gaps; DROP TABLE {parsed}")
        if cut:
            con.execute(f"DELETE FROM {table} WHERE _line = {last}")
    raws = raw_lines(path, set(lines) | ({last} if cut else set()))
    rejects = []
    for ln, types, cols, _ in bad:
        reasons = [_DUCKDB_REASONS.get(t, "parse") for t in types]
        raw = raws.get(ln, "")
        if "quote" in reasons or raw.count('"') % 2:     # an open quote is the cause of what follows
            reason, column = "quote", None
        elif "field_count" in reasons:
            reason, column = "field_count", None
        else:
            reason, column = reasons[0], cols[0]
        rejects.append((f.name, ln, ln - 1, raw, column, reason))
    if cut:
        rejects.append((f.name, last, last - 1, raws.get(last, ""), None, cut_reason))
    return Loaded(table, accepted + len(bad), "fast", rejects, raw_lookup=path, view=not bad)


def raw_lines(path: Path, wanted: set[int]) -> dict[int, str]:
    """The text of the wanted physical lines (1-based), undecodable bytes as U+FFFD."""
    out: dict[int, str] = {}
    if not wanted:
        return out
    last = max(wanted)
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, start=1):
            if n in wanted:
                out[n] = line.rstrip(b"\n").rstrip(b"\r").decode("utf-8", errors="replace")
            if n >= last:
                break
    return out


def _physical_lines(fh):
    """(line number, body without its line end, decoded text) of each physical line of a binary file."""
    for n, line in enumerate(iter(fh.readline, b""), start=1):
        body = line[:-1] if line.endswith(b"\n") else line
        body = body[:-1] if body.endswith(b"\r") else body
        yield n, body, body.decode("utf-8", errors="surrogateescape")


class _Feed:
    """Lines handed to one long-lived ``csv.reader`` on demand (a reader per line costs 10% of the exact reader)."""

    def __init__(self):
        self.lines: list[str] = []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.lines:
            return self.lines.pop()
        raise StopIteration


_FEED = threading.local()


def _parse(texts: list[str]) -> tuple[list[str] | None, str | None]:
    """The one record the lines hold, or None and the csv module's complaint."""
    if len(texts) == 1 and '"' not in texts[0] and "\r" not in texts[0]:
        return (texts[0].split(",") if texts[0] else []), None      # what the csv module returns, faster
    if not hasattr(_FEED, "reader"):
        _FEED.feed = _Feed()
        _FEED.reader = csv.reader(_FEED.feed, strict=True)
    feed = _FEED.feed
    feed.lines = [t + "\n" for t in texts[:-1]] + texts[-1:]
    feed.lines.reverse()
    try:
        record = next(_FEED.reader)
    except StopIteration:
        return None, "unexpected end of data"
    except csv.Error as exc:
        feed.lines.clear()
        return None, str(exc)
    if feed.lines:
        feed.lines.clear()
        return None, "more than one record"
    return record, None


def _records(fh, n: int):
    """(first line, its physical lines, fields or None) per record, an open quote contained to its own line.

    A line that ends inside a quoted value takes the following lines only while the value
    stays open, up to :data:`MAX_RECORD_LINES`, and only if the record then closes with
    exactly ``n`` fields; otherwise that line alone is the record (unparseable: ``None``).
    """
    lines = _physical_lines(fh)
    next(lines, None)                                   # the header, checked already
    pending: list[tuple[int, bytes, str]] = []
    while True:
        if not pending:
            nxt = next(lines, None)
            if nxt is None:
                return
            pending.append(nxt)
        fields, err = _parse([pending[0][2]])
        span = 1
        if err == "unexpected end of data":             # a quoted value still open at the line's end
            k = 1
            while k < MAX_RECORD_LINES:
                if len(pending) == k:
                    nxt = next(lines, None)
                    if nxt is None:
                        break
                    pending.append(nxt)
                k += 1
                if '"' not in pending[k - 1][2]:
                    continue                            # the value cannot close on this line
                got, err = _parse([p[2] for p in pending[:k]])
                if err == "unexpected end of data":
                    continue
                if got is not None and len(got) == n:
                    fields, span = got, k
                break
        yield pending[0][0], pending[:span], fields
        del pending[:span]


def _load_csv_exact(con, f: LandingFile, path: Path, fields: list[str], table: str, schema: Schema) -> Loaded:
    n = len(fields)
    cols: dict[str, list] = {k: [] for k in (*fields, "_line", "_row", "_rawtext")}
    rejects: list[tuple] = []
    created = False

    def flush() -> None:
        nonlocal created
        if not cols["_line"]:
            return
        data = {k: pa.array(v, pa.int64() if k in ("_line", "_row") else pa.string()) for k, v in cols.items()}
        batch = pa.table(data)  # noqa: F841 - read by DuckDB's replacement scan below
        body = f"SELECT {norm_select(schema)}, {lit(f.name)} AS _file, false AS _bad_shape, _line, _row, _rawtext FROM batch"
        con.execute(f"INSERT INTO {table} {body}" if created else f"CREATE TEMP TABLE {table} AS {body}")
        created = True
        for v in cols.values():
            v.clear()

    row = continuation = 0
    last = f.physical_lines
    with open(path, "rb") as fh:
        for start, lines, record in _records(fh, n):
            row += 1
            continuation += len(lines) - 1
            raw = "\n".join(b.decode("utf-8", errors="replace") for _, b, _ in lines)
            reason = column = None
            if record is None:
                # a carriage return inside an unquoted value is what the csv module trips on
                reason = "control_char" if any("\r" in t for _, _, t in lines) else "quote"
            elif not record:
                reason = "blank_line"
            elif len(record) != n:
                reason = "field_count"
            elif _has_surrogates(text := "\n".join(t for _, _, t in lines)):      # one test per record, then the column
                reason, column = "encoding", _first(fields, record, _has_surrogates)
            elif _CONTROL_RE.search(text):
                # a carriage return the csv module took as a line end is in no value: then no column
                reason, column = "control_char", _first(fields, record, _CONTROL_RE.search)
            elif not f.ends_with_newline and start + len(lines) - 1 == last:
                reason = "no_final_newline"
            if reason:
                rejects.append((f.name, start, row, raw, column, reason))
                continue
            for name, value in zip(fields, record):
                cols[name].append(None if value == "" else value)
            cols["_line"].append(start)
            cols["_row"].append(row)
            cols["_rawtext"].append(raw)
            if len(cols["_line"]) >= BATCH:
                flush()
    flush()
    if not created:
        con.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT {norm_select(schema)}, {lit(f.name)} AS _file, "
                    f"false AS _bad_shape, CAST(NULL AS BIGINT) AS _line, CAST(NULL AS BIGINT) AS _row, CAST(NULL AS VARCHAR) AS _rawtext "
                    f"FROM (SELECT {', '.join('CAST(NULL AS VARCHAR) AS ' + q(x) for x in fields)}) WHERE false")
    return Loaded(table, row, "exact", rejects, continuation_lines=continuation)


def _first(fields: list[str], record: list[str], test) -> str | None:
    return next((name for name, v in zip(fields, record) if test(v)), None)


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


# --- Parquet ----------------------------------------------------------------------------


def load_parquet(con: duckdb.DuckDBPyConnection, f: LandingFile, schema: Schema, table: str) -> Loaded:
    """Read one Parquet landing file into ``table`` (values cast to VARCHAR)."""
    where = f"landing/{f.name}"
    if f.size == 0:
        raise IngestError(f"{where}: the file is empty")
    try:
        desc = con.execute(f"DESCRIBE SELECT * FROM read_parquet({read_literal(f.path)})").fetchall()
    except duckdb.Error as exc:
        raise IngestError(f"{where}: not a readable Parquet file ({str(exc).splitlines()[0][:120]})") from None
    _check_columns(where, [d[0] for d in desc], schema)
    cast = ", ".join(f"CAST({q(n)} AS VARCHAR) AS {q(n)}" for n in schema.names)
    try:
        con.execute(f"""CREATE OR REPLACE TEMP TABLE {table} AS SELECT {norm_select(schema)}, {lit(f.name)} AS _file,
            false AS _bad_shape, file_row_number + 2 AS _line, file_row_number + 1 AS _row, CAST(NULL AS VARCHAR) AS _rawtext
            FROM (SELECT {cast}, file_row_number FROM read_parquet({read_literal(f.path)}, file_row_number=true)
                  ORDER BY file_row_number)""")
    except duckdb.Error as exc:
        raise IngestError(f"{where}: not a readable Parquet file ({str(exc).splitlines()[0][:120]})") from None
    n = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
    if n == 0:
        raise IngestError(f"{where}: the file has no rows")
    return Loaded(table, n, "parquet", _parquet_control(con, f, schema, table, cast), raw_lookup=f.path)


def _parquet_control(con, f: LandingFile, schema: Schema, table: str, cast: str) -> list[tuple]:
    """Rows of a Parquet file with a control character in a value: taken out of ``table``, returned as rejects."""
    pattern = lit("[\\x00-\\x08\\x0b-\\x1f\\x7f]")
    which = " ".join(f"WHEN regexp_matches({q(n)}, {pattern}) THEN {lit(n)}" for n in schema.names)
    hits = con.execute(f"""SELECT file_row_number + 1, CASE {which} END FROM (SELECT {cast}, file_row_number
        FROM read_parquet({read_literal(f.path)}, file_row_number=true))
        WHERE regexp_matches(concat_ws(' ', {', '.join(q(n) for n in schema.names)}), {pattern})
        ORDER BY 1""").fetchall()
    if not hits:
        return []
    con.execute(f"DELETE FROM {table} WHERE _row IN ({', '.join(str(r) for r, _ in hits)})")
    raw = parquet_rows_json(con, f.path, schema, [r for r, _ in hits])
    return [(f.name, r + 1, r, raw.get(r, ""), col, "control_char") for r, col in hits]


def parquet_rows_json(con: duckdb.DuckDBPyConnection, path: Path, schema: Schema, rows: list[int]) -> dict[int, str]:
    """JSON renderings of the delivered values of some Parquet rows (1-based ``_row``)."""
    con.execute("CREATE OR REPLACE TEMP TABLE _wanted (r BIGINT)")
    con.executemany("INSERT INTO _wanted VALUES (?)", [(r - 1,) for r in rows])
    pack = ", ".join(f"{q(n)} := CAST({q(n)} AS VARCHAR)" for n in schema.names)
    got = con.execute(f"""SELECT file_row_number + 1, CAST(to_json(struct_pack({pack})) AS VARCHAR)
        FROM read_parquet({read_literal(path)}, file_row_number=true) WHERE file_row_number IN (SELECT r FROM _wanted)""").fetchall()
    con.execute("DROP TABLE _wanted")
    return dict(got)


def drop(con: duckdb.DuckDBPyConnection, loaded: Loaded) -> None:
    """Drop the tables (or view) a load left behind."""
    kind = "VIEW" if loaded.view else "TABLE"
    con.execute(f"DROP {kind} IF EXISTS {loaded.table}; DROP TABLE IF EXISTS {loaded.table}_parsed")


def load(con: duckdb.DuckDBPyConnection, f: LandingFile, schema: Schema, table: str, tmpdir: Path) -> Loaded:
    """Read one landing file (CSV or Parquet) into ``table``."""
    if f.fmt == "csv":
        return load_csv(con, f, schema, table, tmpdir)
    return load_parquet(con, f, schema, table)
