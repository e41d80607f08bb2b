"""Cell statistics from record-level contributions, computed in DuckDB.

The contributions are one row per unit (person or household): its key, its category on
every dimension column and its measure values. Every cell of the table, margins
included, gets the statistics the rules and the perturbation need: the number of
contributors, the cell keys, and per measure column the total, the largest
contributions and the sums an OLS line needs. Margins come from ``GROUPING SETS`` over
each dimension's level prefixes, so a margin is computed from its units, never summed
from released cells. Only statistics leave DuckDB, never rows (percentile windows are
the exception: the few values around each percentile's rank, kept in memory).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from dataclasses import dataclass

import duckdb
import numpy as np
import pandas as pd

from linkage.db import quote_ident as _q
from linkage.errors import HhlinkError
from linkage.sdc.spec import ADDITIVE, TOTAL, TableSpec

log = logging.getLogger(__name__)

UNKNOWN = "Unknown"
KEY_MODULUS = 2**32       # record keys are 32-bit integers; a cell key is their sum modulo 2**32, over 2**32


class ContributionError(HhlinkError):
    """The contributions given for a table do not have the shape the engine needs."""


@dataclass
class Cells:
    """All cells of one table: a frame indexed 0..N-1 with dimension columns and statistics.

    Fields:
        frame: one row per cell: dimension columns (``Total`` at margins), ``_n``,
            ``_ck1``/``_ck2`` (the two integer cell keys, sums of record keys mod 2**32),
            ``_ck`` (``_ck1`` as a fraction in [0, 1)), ``_depth`` (how many dimension levels
            are margins) and per-column statistics (see :func:`cell_stats_sql`).
        nodes: per dimension, its nodes as tuples of level values (``Total``-padded).
        node_index: per cell, the index of its node in each dimension (an N x D array).
        nonnegative: per magnitude column, whether every contribution is >= 0.
        windows: per quantile measure name, per cell index, the sorted values around the rank.
        replicates: per (y, x) column pair of a slope or predict measure, an N x B x 5 array
            of Poisson-bootstrap weighted sums (w, wx, wy, wxx, wxy) per cell and replicate.
    """

    frame: pd.DataFrame
    nodes: list[list[tuple[str, ...]]]
    node_index: np.ndarray
    nonnegative: dict[str, bool]
    windows: dict[str, dict[int, np.ndarray]]
    replicates: dict[tuple[str, str], np.ndarray] | None = None


def register_contributions(con: duckdb.DuckDBPyConnection, contributions, name: str = "sdc_raw") -> str:
    """Make ``contributions`` (pandas, pyarrow, a DuckDB relation or a SQL query) a view ``name``."""
    if isinstance(contributions, str):
        con.execute(f"create or replace temp view {name} as {contributions}")
    elif isinstance(contributions, duckdb.DuckDBPyRelation):
        contributions.create_view(name, replace=True)
    else:
        con.register(name, contributions)
    return name


def _validate(con: duckdb.DuckDBPyConnection, raw: str, spec: TableSpec) -> None:
    have = {r[0] for r in con.execute(f"describe {raw}").fetchall()}
    value_cols = sorted({c for m in spec.all_measures for c in m.columns})
    missing = [c for c in (spec.unit, *spec.columns, *value_cols) if c not in have]
    if missing:
        raise ContributionError(f"table {spec.name}: contributions lack column(s) {', '.join(missing)}")
    nulls = ", ".join(f"count(*) filter (where {_q(c)} is null)" for c in value_cols) or "0"
    row = con.execute(f"""select count(*), count(distinct {_q(spec.unit)}), count(*) filter (where {_q(spec.unit)} is null),
                                 {nulls} from {raw}""").fetchall()[0]
    if row[2]:
        raise ContributionError(f"table {spec.name}: {row[2]} contribution(s) have no unit key")
    if row[0] != row[1]:
        raise ContributionError(f"table {spec.name}: contributions must have one row per unit "
                                f"({row[0]} rows, {row[1]} distinct {spec.unit})")
    for col, n in zip(value_cols, row[3:]):
        if n:
            raise ContributionError(f"table {spec.name}: {n} contribution(s) have no value in '{col}' "
                                    "(a table's population is the units with every measure)")
    for m in spec.all_measures:
        if m.kind == "proportion":
            bad = con.execute(f"select count(*) from {raw} where {_q(m.column)} not in (0, 1)").fetchall()[0][0]
            if bad:
                raise ContributionError(f"table {spec.name}: proportion column '{m.column}' must be 0 or 1")
    for col in spec.columns:
        n = con.execute(f"select count(*) from {raw} where cast({_q(col)} as varchar) = '{TOTAL}'").fetchall()[0][0]
        if n:
            raise ContributionError(f"table {spec.name}: '{TOTAL}' is reserved for margins (column '{col}')")


def record_keys(units: list, secret: bytes, margin: int = 0) -> np.ndarray:
    """Two 32-bit record keys per unit from a keyed BLAKE2b of its key (an N x 2 uint64 array).

    The first is uniform on [0, 2**32); the second on [margin, 2**32 - margin], so removing
    one unit moves a cell's second key by at least ``margin`` (see :mod:`linkage.sdc.perturb`).
    Both are fixed for a unit and a secret, so a cell holding the same units always has
    the same cell keys.
    """
    span = KEY_MODULUS - 2 * margin + 1
    out = np.empty((len(units), 2), dtype=np.uint64)
    for i, u in enumerate(units):
        d = hashlib.blake2b(str(u).encode("utf-8"), digest_size=16, key=secret).digest()
        out[i, 0] = int.from_bytes(d[:4], "big")
        out[i, 1] = margin + int.from_bytes(d[8:], "big") % span
    return out


# the last secret's record keys, per unit: every request reads the same children, and hashing
# 100,000 of them one by one in Python took a third of a second per request (in memory only)
_KEYS_SEEN: dict[tuple[bytes, int], tuple[dict[str, int], np.ndarray]] = {}


def _known_record_keys(keys: list[str], secret: bytes, margin: int) -> np.ndarray:
    tag = (hashlib.sha256(secret).digest(), margin)
    row, rks = _KEYS_SEEN.get(tag, ({}, np.zeros((0, 2), dtype=np.uint64)))
    new = [k for k in keys if k not in row]
    if new:
        row = {**row, **{k: len(rks) + i for i, k in enumerate(new)}}
        rks = np.vstack([rks, record_keys(new, secret, margin)])
        _KEYS_SEEN.clear()
        _KEYS_SEEN[tag] = (row, rks)
    return rks[np.fromiter((row[k] for k in keys), dtype=np.int64, count=len(keys))]


def _prepare(con: duckdb.DuckDBPyConnection, raw: str, spec: TableSpec, secret: bytes, margin: int) -> None:
    units = con.sql(f"select distinct cast({_q(spec.unit)} as varchar) from {raw}").to_arrow_table()
    keys = units.column(0).to_pylist()
    rk = _known_record_keys(keys, secret, margin)
    con.register("sdc_rk_df", pd.DataFrame({"unit": keys, "rk1": rk[:, 0], "rk2": rk[:, 1]}))
    con.execute("create or replace temp table sdc_rk as select * from sdc_rk_df")
    con.unregister("sdc_rk_df")
    dims = ", ".join(f"coalesce(cast({_q(c)} as varchar), '{UNKNOWN}') as {_q(c)}" for c in spec.columns)
    vals = sorted({c for m in spec.all_measures for c in m.columns})
    vsel = "".join(f", cast({_q(c)} as double) as {_q(c)}" for c in vals)
    con.execute(f"""create or replace temp table sdc_x as
        select {dims}, k.rk1, k.rk2{vsel}
        from {raw} r join sdc_rk k on cast(r.{_q(spec.unit)} as varchar) = k.unit""")


def grouping_sets(spec: TableSpec) -> list[tuple[str, ...]]:
    """Every combination of each dimension's level prefixes: the cells' grouping sets."""
    per_dim = [[d.levels[:k] for k in range(len(d.levels), -1, -1)] for d in spec.dimensions]
    return [tuple(itertools.chain.from_iterable(combo)) for combo in itertools.product(*per_dim)]


def cell_stats_sql(spec: TableSpec, top_k: int) -> str:
    """The aggregate query: one row per non-empty cell, ``Total`` where a column is rolled up."""
    cols = spec.columns
    dim_sel = ", ".join(f"case when grouping({_q(c)}) = 1 then '{TOTAL}' else {_q(c)} end as {_q(c)}" for c in cols)
    aggs = ["count(*) as _n", f"cast(sum(rk1) % {KEY_MODULUS} as bigint) as _ck1",
            f"cast(sum(rk2) % {KEY_MODULUS} as bigint) as _ck2"]
    seen: set[str] = set()
    for m in spec.all_measures:
        c = m.column
        if m.kind in ADDITIVE and ("s", c) not in seen:
            seen.add(("s", c))
            aggs += [f"sum({_q(c)}) as {_q(c + '__sum')}", f"sum(abs({_q(c)})) as {_q(c + '__abs')}",
                     f"max(abs({_q(c)}), {top_k}) as {_q(c + '__top')}"]
        elif m.kind == "proportion" and ("p", c) not in seen:
            seen.add(("p", c))
            aggs += [f"cast(sum({_q(c)}) as bigint) as {_q(c + '__ones')}",
                     f"cast(coalesce(sum(rk1) filter (where {_q(c)} = 1), 0) % {KEY_MODULUS} as bigint) "
                     f"as {_q(c + '__ck')}"]
        elif m.kind in ("slope", "predict") and ("o", c, m.x) not in seen:
            seen.add(("o", c, m.x))
            x, y, p = _q(m.x), _q(c), f"{c}__{m.x}"
            aggs += [f"sum({x}) as {_q(p + '__sx')}", f"sum({y}) as {_q(p + '__sy')}",
                     f"sum({x} * {x}) as {_q(p + '__sxx')}", f"sum({x} * {y}) as {_q(p + '__sxy')}"]
    sets = ", ".join("(" + ", ".join(_q(c) for c in s) + ")" for s in grouping_sets(spec))
    return f"select {dim_sel}, {', '.join(aggs)} from sdc_x group by grouping sets ({sets})"


def quantile_windows_sql(spec: TableSpec, column: str, q: float, width: int) -> str:
    """The ``width`` sorted values of ``column`` around rank ``q*(n-1)`` in every cell (margins too)."""
    cols = spec.columns
    parts = []
    for s in grouping_sets(spec):
        sel = ", ".join(_q(c) if c in s else f"'{TOTAL}' as {_q(c)}" for c in cols)
        parts.append(f"select {sel}, {_q(column)} as v from sdc_x")
    part = ", ".join(_q(c) for c in cols)
    return f"""
        with e as ({' union all '.join(parts)}),
        r as (select *, row_number() over (partition by {part} order by v) - 1 as i,
                        count(*) over (partition by {part}) as n from e),
        w as (select *, greatest(0, least(n - {width}, cast(floor({q} * (n - 1) + 0.5) as bigint) - {(width - 1) // 2})) as s
              from r)
        select {part}, v from w where i >= s and i < s + {width} order by {part}, i"""


def _dimension_nodes(con: duckdb.DuckDBPyConnection, spec: TableSpec) -> list[list[tuple[str, ...]]]:
    nodes = []
    for d in spec.dimensions:
        lv = ", ".join(_q(c) for c in d.levels)
        leaves = {tuple(r) for r in con.execute(f"select distinct {lv} from sdc_x").fetchall()}
        if d.categories is not None:
            leaves |= {tuple(str(v) for v in c) for c in d.categories}
        node_set: set[tuple[str, ...]] = {(TOTAL,) * len(d.levels)}
        for leaf in leaves:
            for k in range(len(d.levels) + 1):
                node_set.add(tuple(leaf[:k]) + (TOTAL,) * (len(d.levels) - k))
        # Total first, then coarse to fine, each level sorted: a stable, readable order
        nodes.append(sorted(node_set, key=lambda t: (sum(v != TOTAL for v in t), t)))
    return nodes


def compute_cells(con: duckdb.DuckDBPyConnection, contributions, spec: TableSpec, secret: bytes,
                  top_k: int, quantile_width: int, key_margin: int = 0, replicates: int = 0) -> Cells:
    """Validate the contributions and compute every cell's statistics.

    Args:
        con: a DuckDB connection (temporary tables ``sdc_*`` are created in it).
        contributions: pandas or pyarrow table, DuckDB relation, or a SELECT statement; one row per unit.
        spec: the table's declaration.
        secret: the record-key subkey (:func:`linkage.keys.derive_key` purpose ``sdc:record-key``).
        top_k: how many of the largest contributions to keep per cell (dominance n, at least 2).
        quantile_width: how many values around each percentile's rank to keep.
        key_margin: the second record keys' distance from 0 mod 2**32 (see :func:`record_keys`).
        replicates: bootstrap replicates for slope and predict measures (0: none).

    Returns:
        The table's :class:`Cells`, covering the full grid (empty cells have ``_n = 0``).
    """
    raw = register_contributions(con, contributions)
    _validate(con, raw, spec)
    _prepare(con, raw, spec, secret, key_margin)
    stats = con.execute(cell_stats_sql(spec, top_k)).df()
    nodes = _dimension_nodes(con, spec)
    cols = list(spec.columns)
    grid = list(itertools.product(*[range(len(n)) for n in nodes]))
    node_index = np.array(grid, dtype=np.int64).reshape(len(grid), len(nodes))
    rows = {c: [] for c in cols}
    for combo in grid:
        for d, i in enumerate(combo):
            for c, v in zip(spec.dimensions[d].levels, nodes[d][i]):
                rows[c].append(v)
    frame = pd.DataFrame(rows, columns=cols)
    stats[cols] = stats[cols].astype(str)
    frame = frame.merge(stats, on=cols, how="left", validate="one_to_one")
    if len(frame) != len(grid):
        raise ContributionError(f"table {spec.name}: cell grid mismatch")
    frame["_n"] = frame["_n"].fillna(0).astype(np.int64) if "_n" in frame else 0
    for c in frame.columns:
        if c.endswith(("__sum", "__abs", "__sx", "__sy", "__sxx", "__sxy")):
            frame[c] = frame[c].astype(float).fillna(0.0)
        elif c.endswith(("__ones", "__ck", "_ck1", "_ck2")):
            frame[c] = frame[c].fillna(0).astype(np.int64)
        elif c.endswith("__top"):
            frame[c] = [np.asarray(v, dtype=float) if isinstance(v, (list, np.ndarray)) else np.zeros(0)
                        for v in frame[c]]
    frame["_ck"] = frame["_ck1"] / KEY_MODULUS
    frame["_depth"] = _depth(frame, spec)
    nonneg = {}
    for m in spec.all_measures:
        if m.kind in ADDITIVE and m.column not in nonneg:
            nonneg[m.column] = bool(con.execute(f"select coalesce(min({_q(m.column)}) >= 0, true) from sdc_x")
                                    .fetchall()[0][0])
    windows: dict[str, dict[int, np.ndarray]] = {}
    key_of = {tuple(r): i for i, r in enumerate(frame[cols].itertuples(index=False, name=None))}
    for m in spec.all_measures:
        if m.kind == "quantile":
            win: dict[int, list[float]] = {}
            for r in con.execute(quantile_windows_sql(spec, m.column, m.q, quantile_width)).fetchall():
                win.setdefault(key_of[tuple(r[:-1])], []).append(r[-1])
            windows[m.name] = {i: np.asarray(v, dtype=float) for i, v in win.items()}
    reps = {}
    if replicates:
        for m in spec.all_measures:
            if m.kind in ("slope", "predict") and (m.column, m.x) not in reps:
                reps[(m.column, m.x)] = _bootstrap(con, spec, m.column, m.x, replicates, key_of)
    log.info("table %s: %d cells over %d dimension(s)", spec.name, len(frame), len(nodes))
    return Cells(frame=frame, nodes=nodes, node_index=node_index, nonnegative=nonneg, windows=windows,
                 replicates=reps)


# Poisson(1) cumulative probabilities for weights 0..5 (6 and more: 0.06% of draws, taken as 6)
_POISSON_CUM = (0.36788, 0.73576, 0.91970, 0.98101, 0.99634, 0.99941)


def bootstrap_sql(spec: TableSpec, y: str, x: str, replicates: int) -> str:
    """Poisson-bootstrap weighted sums of an OLS line per cell (margins too) and replicate.

    Each unit's weight in replicate ``i`` is a Poisson(1) draw read from a hash of its
    keyed record key and ``i``: the same units give the same replicates in every run, and
    nothing outside the engine can reproduce them without the key.
    """
    cols = spec.columns
    dim_sel = ", ".join(f"case when grouping({_q(c)}) = 1 then '{TOTAL}' else {_q(c)} end as {_q(c)}" for c in cols)
    u = "(hash(rk1, rk2, r.i) % 1000000) / 1000000.0"
    w = "case " + " ".join(f"when {u} < {p} then {k}" for k, p in enumerate(_POISSON_CUM)) + " else 6 end"
    sets = ", ".join("(" + ", ".join([*(_q(c) for c in s), "i"]) + ")" for s in grouping_sets(spec))
    return f"""
        with e as (select {', '.join(_q(c) for c in cols)}, {_q(x)} as x, {_q(y)} as y, r.i, {w} as w
                   from sdc_x, range({replicates}) r(i))
        select {dim_sel}, i, sum(w), sum(w * x), sum(w * y), sum(w * x * x), sum(w * x * y)
        from e group by grouping sets ({sets})"""


def _bootstrap(con, spec: TableSpec, y: str, x: str, replicates: int, key_of: dict) -> np.ndarray:
    out = np.zeros((len(key_of), replicates, 5))
    k = len(spec.columns)
    for r in con.execute(bootstrap_sql(spec, y, x, replicates)).fetchall():
        out[key_of[tuple(r[:k])], r[k]] = r[k + 1:]
    return out


def _depth(frame: pd.DataFrame, spec: TableSpec) -> np.ndarray:
    # a dimension is at a margin level when its coarsest column is Total or any finer column is
    depth = np.zeros(len(frame), dtype=np.int64)
    for d in spec.dimensions:
        depth += (frame[list(d.levels)] == TOTAL).sum(axis=1).to_numpy()
    return depth
