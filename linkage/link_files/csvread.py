"""Read a data engineer's CSV for ``hhlink link-files``: the dialect from the map, never sniffed.

Every column is read as text (the map decides what a column means, not a type sniffer),
with the delimiter, quote, encoding, header row and trimming the map states for the file
(defaults: comma, double quote, UTF-8, header on line 1, surrounding spaces trimmed, as
Python's ``csv`` with ``skipinitialspace`` reads FEBRL-style ``a, b, c`` files). DuckDB's
``read_csv`` runs first with that dialect and ``auto_detect=false``; when it declines
(a space before a quoted value, a quote inside a value, a blank line), Python's ``csv``
module reads the file instead. A file that neither can read as a rectangular table gives
one line naming the file, the physical line and what was wrong, e.g.
``people.csv: line 23: 12 fields, expected 11``; never a value.

Example:
    >>> d = parse_dialect("map.toml: [files.people]", {"delimiter": ";", "encoding": "latin-1"})
    >>> (d.delimiter, d.encoding, d.trim)
    (';', 'latin-1', True)
"""

from __future__ import annotations

import codecs
import csv
import gzip
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa

from linkage.db import quote_ident as q
from linkage.db import quote_literal as lit
from linkage.db import read_literal

log = logging.getLogger(__name__)

DIALECT_KEYS = ("delimiter", "quote", "encoding", "header", "trim")
_BATCH = 100_000
_NO_NULL = "\x01hhlink-no-null\x01"      # read_csv's NULL string: no field holds it, so '' stays ''
csv.field_size_limit(1 << 30)


@dataclass(frozen=True)
class Dialect:
    """How one CSV is written: delimiter, quote character ('' for none), encoding, header line
    (1 = first line; 0 = no header, columns named column1, column2, ...) and trimming of
    spaces and tabs around values and column names."""

    delimiter: str = ","
    quote: str = '"'
    encoding: str = "utf-8"
    header: int = 1
    trim: bool = True


class CsvReadError(Exception):
    """The file cannot be read as a table; the message is one line naming file and line."""


def parse_dialect(where: str, entry: dict) -> Dialect:
    """The dialect keys of a map's file table (missing keys take the defaults); bad values raise ValueError."""
    d = Dialect()
    values = {k: entry[k] for k in DIALECT_KEYS if k in entry}
    for key in ("delimiter", "quote"):
        if key in values:
            v = values[key]
            if not isinstance(v, str) or len(v) > 1 or (key == "delimiter" and len(v) != 1) or v in "\r\n" and v:
                raise ValueError(f"{where}: {key} must be one character" + (" or \"\" for none" if key == "quote" else ""))
    if "encoding" in values:
        try:
            codecs.lookup(values["encoding"])
        except (LookupError, TypeError):
            raise ValueError(f"{where}: encoding {values['encoding']!r} is not an encoding Python knows") from None
    if "header" in values and (not isinstance(values["header"], int) or isinstance(values["header"], bool)
                               or values["header"] < 0):
        raise ValueError(f"{where}: header must be the line number of the column names (1 = first line, 0 = none)")
    if "trim" in values and not isinstance(values["trim"], bool):
        raise ValueError(f"{where}: trim must be true or false")
    if values.get("quote") and values["quote"] == values.get("delimiter", d.delimiter):
        raise ValueError(f"{where}: quote and delimiter must differ")
    return Dialect(**{**d.__dict__, **values})


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name == "utf-8"


def _as_utf8(path: Path, dialect: Dialect, scratch: Path) -> Path:
    """The file itself when UTF-8 and uncompressed, else a UTF-8 copy in ``scratch`` (same lines)."""
    if _is_utf8(dialect.encoding) and not path.name.lower().endswith(".gz"):
        return path
    fd, out = tempfile.mkstemp(prefix=".lf-utf8-", suffix=".csv", dir=scratch)
    wide = codecs.lookup(dialect.encoding).name.startswith(("utf-16", "utf-32"))
    with _open(path) as src, open(fd, "w", encoding="utf-8", newline="") as dst:
        if wide:     # line feeds are not single bytes: decode whole, report the byte offset
            try:
                dst.write(src.read().decode(dialect.encoding))
            except UnicodeDecodeError as exc:
                raise CsvReadError(f"{path}: byte {exc.start}: not valid {dialect.encoding} (the map's encoding)") from None
        else:
            for n, line in enumerate(src, start=1):
                try:
                    dst.write(line.decode(dialect.encoding))
                except UnicodeDecodeError:
                    raise CsvReadError(f"{path}: line {n}: not valid {dialect.encoding}; state the file's encoding "
                                       f"in the map (encoding = \"latin-1\", ...)") from None
    return Path(out)


def _reader(fh, dialect: Dialect):
    quoting = csv.QUOTE_MINIMAL if dialect.quote else csv.QUOTE_NONE
    return csv.reader(fh, delimiter=dialect.delimiter, quotechar=dialect.quote or None, quoting=quoting,
                      skipinitialspace=dialect.trim, strict=True)


def _header(path: Path, text: Path, dialect: Dialect) -> list[str]:
    """The column names (trimmed when the dialect trims); column1, ... when there is no header."""
    with open(text, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = _reader(fh, dialect)
        try:
            first = None
            while reader.line_num < max(dialect.header, 1):
                first = next(reader)
        except StopIteration:
            raise CsvReadError(f"{path}: the file is empty" if reader.line_num == 0 else
                               f"{path}: no header on line {dialect.header}") from None
        except csv.Error as exc:
            raise CsvReadError(f"{path}: line {reader.line_num}: {exc}") from None
    if dialect.header == 0:
        return [f"column{i}" for i in range(1, len(first) + 1)]
    if dialect.header == 1 and first:
        first[0] = first[0].removeprefix("\ufeff")      # a UTF-8 byte-order mark, as spreadsheets write
    names = [n.strip(" \t") if dialect.trim else n for n in first]
    for i, name in enumerate(names):
        if not name:
            raise CsvReadError(f"{path}: line {dialect.header}: column {i + 1} of the header has no name")
        if name in names[:i]:
            raise CsvReadError(f"{path}: line {dialect.header}: column {name!r} appears twice in the header")
    return names


def read_csv_table(con: duckdb.DuckDBPyConnection, path: Path, table: str, dialect: Dialect, scratch: Path) -> list[str]:
    """Create ``table`` with every column of the CSV as text, rows in file order; return the column names.

    Raises:
        CsvReadError: one line naming the file, the physical line and what was wrong.
    """
    text = _as_utf8(path, dialect, scratch)
    names = _header(path, text, dialect)
    skip = dialect.header
    try:
        _read_duckdb(con, text, table, names, dialect, skip)
        return names
    except duckdb.Error as exc:
        # the class only: DuckDB's CSV messages can quote the offending line
        log.info("%s: DuckDB's reader declined (%s); reading with Python's csv module", path.name,
                 exc.__class__.__name__)
    _read_python(con, path, text, table, names, dialect, skip)
    return names


def _read_duckdb(con, text: Path, table: str, names: list[str], dialect: Dialect, skip: int) -> None:
    with open(text, "rb") as fh:
        head = fh.read(1 << 24)
    # DuckDB has no skipinitialspace: a space before a quoted value is Python's to read
    if dialect.quote and dialect.trim and (dialect.delimiter + " " + dialect.quote).encode() in head:
        raise duckdb.InvalidInputException("space before a quoted value")
    columns = "{" + ", ".join(f"{lit(n)}: 'VARCHAR'" for n in names) + "}"
    quote = lit(dialect.quote) if dialect.quote else "''"
    sel = ", ".join(f"trim({q(n)}, ' ' || chr(9)) AS {q(n)}" if dialect.trim else q(n) for n in names)
    con.execute(f"""CREATE OR REPLACE TABLE {table} AS SELECT {sel} FROM read_csv({read_literal(text)},
        auto_detect=false, header=false, skip={int(skip)}, columns={columns}, delim={lit(dialect.delimiter)},
        quote={quote}, escape={quote}, strict_mode=true, null_padding=false, nullstr={lit(_NO_NULL)})""")


def _read_python(con, path: Path, text: Path, table: str, names: list[str], dialect: Dialect, skip: int) -> None:
    _check_utf8(path, text)
    n = len(names)
    cols: list[list] = [[] for _ in names]
    created = False

    def flush() -> None:
        nonlocal created
        batch = pa.table({f"c{i}": pa.array(v, pa.string()) for i, v in enumerate(cols)})  # noqa: F841
        sel = ", ".join(f"c{i} AS {q(name)}" for i, name in enumerate(names))
        con.execute(f"INSERT INTO {table} SELECT {sel} FROM batch" if created else
                    f"CREATE OR REPLACE TABLE {table} AS SELECT {sel} FROM batch")
        created = True
        for v in cols:
            v.clear()

    with open(text, encoding="utf-8", newline="") as fh:
        reader = _reader(fh, dialect)
        start = 1
        try:
            for _ in range(skip):
                next(reader)
            start = reader.line_num + 1
            for record in reader:
                if record:          # a blank line holds no record
                    if len(record) != n:
                        raise CsvReadError(f"{path}: line {start}: {len(record)} field{'s' * (len(record) != 1)}, "
                                           f"expected {n}")
                    for i, value in enumerate(record):
                        if dialect.trim:
                            value = value.strip(" \t")
                        cols[i].append(value)
                    if len(cols[0]) >= _BATCH:
                        flush()
                start = reader.line_num + 1
        except csv.Error as exc:
            raise CsvReadError(f"{path}: line {start}: {exc}") from None
        except StopIteration:
            pass
    flush()


def _check_utf8(path: Path, text: Path) -> None:
    """A UTF-8 file with bytes that are not UTF-8: name the first such line."""
    if text != path:
        return
    with open(text, "rb") as fh:
        for n, line in enumerate(fh, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                raise CsvReadError(f"{path}: line {n}: not valid utf-8; state the file's encoding in the map "
                                   f"(encoding = \"latin-1\", ...)") from None
