"""DuckDB for every stage: one connection builder and the quoting every interpolated name goes through.

Every DuckDB connection in hhlink comes from :func:`connect`, so memory, threads, the spill
folder and the settings Splink needs on DuckDB 2 are set in one place. Every path, table name,
column name or string value put into SQL text goes through :func:`quote_ident`,
:func:`quote_literal`, :func:`path_literal` or :func:`read_literal`, so a workspace under
``/data/o'brien ł/ws`` works like any other (values that can be bound are bound with ``?``).

Example:
    >>> con = connect(memory_limit="1GB", threads=1)
    >>> con.execute("select " + quote_literal("o'brien") + " as " + quote_ident("name")).fetchall()
    [("o'brien",)]
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

import duckdb

from linkage.errors import WorkspaceError

__all__ = ["connect", "quote_ident", "quote_literal", "path_literal", "read_literal", "table_exists"]


class Limits(Protocol):
    """A config section with DuckDB limits (``link``, ``ingest``, ``assemble``)."""

    memory_limit: str
    threads: int


def connect(limits: Limits | None = None, *, memory_limit: str | None = None, threads: int | None = None,
            spill: Path | str | None = None, database: Path | str = ":memory:",
            preserve_insertion_order: bool = True) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with hhlink's settings.

    Args:
        limits: a config section holding ``memory_limit`` and ``threads`` (``config.link``,
            ``config.assemble``, ``config.ingest``); the keyword arguments override it.
        memory_limit: DuckDB's memory limit (e.g. ``"8GB"``); beyond it DuckDB spills. None: DuckDB's default.
        threads: worker threads; 0 or None uses every core.
        spill: the folder DuckDB spills to. Spill files can hold cleartext, so stages keep them in
            the workspace's private scratch folders, never DuckDB's default ``./.tmp``.
        database: a database file; default in memory.
        preserve_insertion_order: False lets DuckDB reorder rows (less memory); stages that
            turn it off order every table they write.

    Returns:
        The connection. Always set: single-arrow lambdas enabled (Splink 5 still emits ``x -> ...``,
        which DuckDB 2 rejects by default) and no progress bar.

    Example:
        >>> connect(threads=1).execute("select current_setting('threads')").fetchall()
        [(1,)]
    """
    if limits is not None:
        memory_limit = memory_limit or limits.memory_limit
        threads = limits.threads if threads is None else threads
    con = duckdb.connect(str(database))
    try:
        con.execute("SET lambda_syntax='ENABLE_SINGLE_ARROW'")
        con.execute("SET enable_progress_bar=false")
        if memory_limit:
            con.execute(f"SET memory_limit={quote_literal(memory_limit)}")
        if threads:
            con.execute(f"SET threads={int(threads)}")
        if spill is not None:
            con.execute(f"SET temp_directory={path_literal(spill)}")
        if not preserve_insertion_order:
            con.execute("SET preserve_insertion_order=false")
    except BaseException:
        con.close()
        raise
    return con


def quote_ident(name: str) -> str:
    """An SQL identifier (table or column name), double-quoted with inner quotes doubled.

    Raises:
        ValueError: the name is empty (DuckDB has no empty identifier).

    Example:
        >>> quote_ident('a"b')
        '"a""b"'
    """
    name = str(name)
    if not name:
        raise ValueError("an SQL identifier cannot be empty")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: object) -> str:
    """An SQL string literal of ``str(value)``, single-quoted with inner quotes doubled.

    Example:
        >>> quote_literal("o'brien")
        "'o''brien'"
    """
    return "'" + str(value).replace("'", "''") + "'"


def path_literal(path: Path | str) -> str:
    """A file path DuckDB writes as an SQL literal: ``COPY ... TO`` targets, ``SET temp_directory``.

    Paths DuckDB reads go through :func:`read_literal`, which keeps glob characters literal.

    Example:
        >>> path_literal(Path("/data/o'brien ł/ws/linked/pairs.parquet"))
        "'/data/o''brien ł/ws/linked/pairs.parquet'"
    """
    return quote_literal(Path(path))


# DuckDB globs a path it reads that holds one of these; a character class holding one matches it literally
_GLOB_CHARS = re.compile(r"([*?\[])")


def read_literal(path: Path | str, pattern: str | None = None) -> str:
    """A path DuckDB reads (``read_parquet``, ``read_csv``, ``FROM '...'``) as an SQL literal.

    Glob characters in ``path`` match only themselves; ``pattern``, when given, is appended
    as ``path/pattern`` and globs.

    Raises:
        WorkspaceError: the path holds a backslash and must be globbed (DuckDB's glob cannot
            match a backslash).

    Example:
        >>> read_literal("/data/run [2]", "*.parquet")
        "'/data/run [[]2]/*.parquet'"
        >>> read_literal("/data/o'brien/linked/pairs.parquet")
        "'/data/o''brien/linked/pairs.parquet'"
    """
    text = str(path)
    escaped = _GLOB_CHARS.sub(r"[\1]", text)
    if pattern is not None:
        escaped = f"{escaped}/{pattern}"
    if "\\" in text and (pattern is not None or escaped != text):
        raise WorkspaceError(f"{text}: DuckDB cannot read files under a path holding a backslash; rename the folder")
    return quote_literal(escaped)


def table_exists(con, name: str) -> bool:
    """Whether ``con`` holds a table (or temporary table) called ``name``."""
    return bool(con.execute("select count(*) from duckdb_tables() where table_name = ?", [name]).fetchall()[0][0])
