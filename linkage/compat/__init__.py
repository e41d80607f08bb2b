"""Workarounds for third-party behaviour, in one place (each module says what and why).

- ``pyspark_guard``: pyspark 4 must not end ``python -c`` runs that import Great Expectations.
- ``gx_duckdb``: a SQLAlchemy dialect so Great Expectations' SQL engine works on DuckDB.
- ``splink_em``: an EM estimate of exactly 0 is floored after training rather than ending it.
"""
