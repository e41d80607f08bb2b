"""A SQLAlchemy dialect that lets Great Expectations' SQL engine run on DuckDB.

GX 1.24 has no DuckDB data source; its generic SQL data source works through the
``duckdb_engine`` SQLAlchemy dialect with one fix. GX executes a query, closes the
connection, then fetches the rows (``SqlAlchemyExecutionEngine.execute_query``). DuckDB's
DB-API cursor *is* the connection, so the rows are gone by the time GX asks for them and
every metric comes back empty. This dialect buffers every result set fully when the
statement finishes (SQLAlchemy's ``FullyBufferedCursorFetchStrategy``, the mechanism its
own Oracle dialect uses). GX's metric queries return one row of aggregates; the only
row-returning queries it sends are partial lists it reads with ``fetchmany`` of a few
hundred rows, so at most ``MAX_BUFFERED_ROWS`` rows are kept and the rest of such a
result is dropped (an unexpected-rows query matching millions of rows would otherwise
be copied into Python). Point GX at tables or views, not query assets: for a query asset
GX runs the bare query to learn its columns, which would read the whole table.

Importing this module registers the dialect as ``duckdb+hhlink``:

    >>> import sqlalchemy as sa
    >>> import linkage.compat.gx_duckdb  # noqa: F401
    >>> engine = sa.create_engine("duckdb+hhlink:///:memory:")
    >>> with engine.connect() as con:
    ...     result = con.execute(sa.text("select 42"))
    >>> result.fetchall()
    [(42,)]

Tested by tests/test_quality.py against the installed GX, SQLAlchemy and duckdb_engine.
"""

from __future__ import annotations

import duckdb_engine
from sqlalchemy.dialects import registry
from sqlalchemy.engine import cursor as _cursor

URL = "duckdb+hhlink:///:memory:"
MAX_BUFFERED_ROWS = 10_000


class _BufferedExecutionContext(duckdb_engine.Dialect.execution_ctx_cls):
    """Fetch every row as soon as the statement has run."""

    def post_exec(self) -> None:
        super().post_exec()
        if self.cursor.description is not None:
            rows = self.cursor.fetchmany(MAX_BUFFERED_ROWS)
            self.cursor_fetch_strategy = _cursor.FullyBufferedCursorFetchStrategy(
                self.cursor, self.cursor.description, rows)


class BufferedDuckDBDialect(duckdb_engine.Dialect):
    """duckdb_engine's dialect with fully buffered results (see the module docstring)."""

    execution_ctx_cls = _BufferedExecutionContext
    supports_statement_cache = False


registry.register("duckdb.hhlink", __name__, "BufferedDuckDBDialect")
