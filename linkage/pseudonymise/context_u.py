"""u of the context-keyed comparisons, measured where the names are: a random sample in one context.

The zone's name and middle-initial encodings are keyed with each record's date-of-birth
context (issue 16), so the link stage can compare them only between records of one date, and
a random sample of record pairs there holds few such pairs, most of them the same person
(few people share a birthday). The u of those levels - how often two different people agree
on them - is measured here instead: a seeded random sample of staged rows is encoded exactly
as the zone is, all rows under one shared context, and each level's share among the sample's
pairs is counted with the link model's own SQL (:data:`linkage.link.model.CONTEXT_COMPARISONS`).
Only those shares leave this module (``metadata.json``, ``context_u``): one number per level,
a property of the population's names (for an exact forename, the sum of squared name
frequencies), never an encoding of the sample or a record value.

A name's agreement between two people is taken not to depend on whether they share a date
of birth (their names and birthdays are independent); the link stage uses these u for the
levels and estimates m by EM as before.
"""

from __future__ import annotations

import datetime as dt
import re

import duckdb
import pyarrow as pa

from linkage.db import quote_ident, quote_literal
from linkage.ingest.stage import staged_scan

__all__ = ["SAMPLE_ROWS", "measure_context_u", "sample_sql"]

SAMPLE_ROWS = 1_500         # 1,124,250 pairs, as many as the link stage samples for u (u_max_pairs)
_SHARED_DATE = dt.date(2000, 1, 1)   # every sampled row is encoded in this one date's context


def sample_sql(plans, roles: tuple[str, ...], seed: int) -> str | None:
    """The sampled rows: one column per role (NULL where a source lacks it), in a seeded hashed order."""
    parts = []
    for p in plans:
        if not any(r in p.role_column for r in roles):
            continue
        cols = ", ".join(f"CAST(s.{quote_ident(p.role_column[r])} AS VARCHAR) AS {quote_ident(r)}" if r in p.role_column
                         else f"CAST(NULL AS VARCHAR) AS {quote_ident(r)}" for r in roles)
        parts.append(f"SELECT {cols}, hash({quote_literal(p.name)}, s.file_row_number, {int(seed)}) AS h "
                     f"FROM {staged_scan(p.path)} s")
    if not parts:
        return None
    return f"SELECT * EXCLUDE (h) FROM ({' UNION ALL '.join(parts)}) ORDER BY h LIMIT {SAMPLE_ROWS}"


def measure_context_u(con: duckdb.DuckDBPyConnection, plans, context, seed: int) -> dict:
    """``{"pairs": n, "comparisons": {comparison: {level label: u}}}`` from a sample of the staged rows.

    Args:
        con: a DuckDB connection (the pseudonymiser's; a temporary table is made and dropped).
        plans: the staged sources (:class:`linkage.pseudonymise.stage.Source`).
        context: the zone's :class:`linkage.pseudonymise.stage.ContextEncoders`.
        seed: the sample's seed (``generate.seed`` is not used: ``link.seed``, as Splink's sampling).

    A level no sampled pair shows is left out (the link stage keeps its sampled u, floored).
    """
    from linkage.link.drift import level_case_sql
    from linkage.link.model import CONTEXT_COMPARISONS, model_settings
    from linkage.pseudonymise.stage import CONTEXT_ROLES

    sql = sample_sql(plans, (*CONTEXT_ROLES, "sex"), seed)
    if sql is None:
        return {"pairs": 0, "comparisons": {}}
    sample = con.sql(sql).to_arrow_table()
    n = sample.num_rows
    dobs = [_SHARED_DATE] * n
    # one date and one postcode for every sampled row: sex_tok is keyed with both
    columns: dict[str, pa.Array | list] = {"dobc_tok": ["shared"] * n, "postcode_tok": ["shared"] * n}
    for role in (*CONTEXT_ROLES, "sex"):
        values = sample.column(role).to_pylist()
        present = [i for i, v in enumerate(values) if v and v.strip()]
        if not present:
            continue
        # the encoders take values (as the zone's dictionaries hold them), never NULL
        encoder, rows = ((context.sex_in_place(), [[values[i] for i in present], ["SW1A 1AA"] * len(present)])
                         if role == "sex" else (context.for_role(role), [[values[i] for i in present]]))
        encoded = encoder.encode(rows, [dobs[i] for i in present])
        for column, got in encoded.items():
            got = got.to_pylist() if isinstance(got, pa.Array) else list(got)
            full = [None] * n
            for i, v in zip(present, got):
                full[i] = v
            columns[column] = full
    table = pa.table({k: pa.array(v, type=pa.binary() if k.endswith("_bf") else pa.string())
                      for k, v in columns.items()})
    con.register("__context_u_sample", table)
    try:
        con.execute("CREATE OR REPLACE TEMP TABLE __context_u AS SELECT row_number() OVER () AS i, * "
                    "FROM __context_u_sample")
        names = [c for c in table.column_names]
        pairs = ", ".join(f"l.{c} AS {c}_l, r.{c} AS {c}_r" for c in names)
        settings = model_settings("duckdb").create_settings_dict("duckdb")
        comps = [c for c in settings["comparisons"] if c["output_column_name"] in CONTEXT_COMPARISONS
                 and {c_[:-2] for lv in c["comparison_levels"] for c_ in _columns(lv["sql_condition"])} <= set(names)]
        out: dict[str, dict[str, float]] = {}
        if comps:
            # every comparison's level (its label, as the drift profile names it) of every pair, in one pass
            cases = ", ".join(f"{level_case_sql(c)} AS c{k}" for k, c in enumerate(comps))
            con.execute(f"""CREATE OR REPLACE TEMP TABLE __context_u_levels AS SELECT {cases}
                            FROM (SELECT {pairs} FROM __context_u l JOIN __context_u r ON l.i < r.i)""")
            for k, comp in enumerate(comps):
                null = {lv["label_for_charts"] for lv in comp["comparison_levels"] if lv.get("is_null_level")}
                counts = {label: n for label, n in con.execute(
                    f"SELECT c{k}, count(*) FROM __context_u_levels GROUP BY 1").fetchall() if label not in null}
                total = sum(counts.values())
                if total:
                    out[comp["output_column_name"]] = {label: n / total for label, n in sorted(counts.items())}
    finally:
        con.execute("DROP TABLE IF EXISTS __context_u; DROP TABLE IF EXISTS __context_u_levels")
        con.unregister("__context_u_sample")
    return {"pairs": n * (n - 1) // 2, "rows": n, "comparisons": out}


def _columns(sql: str) -> set[str]:
    return set(re.findall(r"\b(\w+_[lr])\b", sql))
