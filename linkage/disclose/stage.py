"""Disclosure control: only protected aggregates leave the research zone.

:func:`protect_table` is the engine. It takes record-level contributions (one row per
person or household: its key, its categories and its measure values, as a pandas or
pyarrow table, a DuckDB relation or a SELECT statement) and a :class:`TableSpec`, and
returns the table with every cell, margins included, either released through the rules or
withheld:

* primary suppression: the threshold (default 10 units, zeros disclosive), (n,k)
  dominance (2, 90%) and the p% rule (10%) on magnitudes, residual degrees of freedom for
  coefficients, numerator and complement for proportions; percentiles and medians are
  means of a window of contributors' values and never one person's value
  (:mod:`linkage.sdc.rules`);
* secondary suppression over row, column and hierarchical margins (local authority
  within region, totals), verified by linear programming: every withheld cell's feasible
  interval is at least the protection range wide (:mod:`linkage.sdc.lp`);
* cell-key perturbation (consistent: the same units give the same noise) or the 10-5
  rounding rule (:mod:`linkage.sdc.perturb`).

:func:`disclose` is the stage (``hhlink disclose``): the standard tables from
``research/`` into ``published/`` (CSV, Parquet and a JSON data dictionary each) and the
auditors' report in ``reports/disclosure/``. :func:`build_table` answers a researcher's
request for a table from the allowed dimensions and measures, always perturbed.

Example:
    >>> import pandas as pd
    >>> from linkage.config import load_config
    >>> from linkage.keys import MasterKey
    >>> people = pd.DataFrame({"person": range(40), "region": ["North"] * 25 + ["South"] * 15,
    ...                        "pay": [20_000.0 + 100 * i for i in range(40)]})
    >>> spec = TableSpec("pay_by_region", dimensions=(Dimension("region", ("region",)),),
    ...                  measures=(Measure("mean_pay", "mean", "pay"),), unit="person")
    >>> table = protect_table(people, spec, load_config(), key=MasterKey(bytes(32), "example"))
    >>> sorted(table.frame["status"].unique())
    ['perturbed']
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from linkage.config import Config
from linkage.db import connect
from linkage.keys import MasterKey, load_master_key
from linkage.sdc.cells import ContributionError, compute_cells
from linkage.sdc.lp import Audit, Block, LPBudgetExceeded, System, cell_labels, equations, protect_jointly
from linkage.sdc.perturb import key_margin
from linkage.sdc.publish import (STATUSES, audit_counts, dictionary, protected_values, public_counts,
                                 rule_parameters, write_report, write_table)
from linkage.sdc.rules import QUANTILE_FETCH, measure_values, ols_ci, p_percent_shortfall, primary
from linkage.sdc.spec import ADDITIVE, TOTAL, Dimension, Measure, TableSpec

__all__ = [
    "TOTAL", "STATUSES", "ContributionError", "Dimension", "Measure", "ProtectedTable", "RequestError",
    "TableSpec", "build_table", "disclose", "protect_table", "protect_tables", "record_key_secret",
]

log = logging.getLogger(__name__)

RECORD_KEY_PURPOSE = "sdc:record-key"

#: DuckDB threads for every query that computes cells: one, so that row order and floating-point
#: sums never depend on how the work was split (the CI's full run published one LA table with
#: different suppression than the same run repeated; tables are small, a thread is enough)
_THREADS = 1


class RequestError(ContributionError):
    """A table request names a dimension or measure outside the allowed list, or is malformed."""


@dataclass
class ProtectedTable:
    """A table after disclosure control: only what may be released.

    Fields:
        spec: the table's declaration.
        frame: the long-form table (dimension columns, ``measure``, ``value``, ``status``);
            suppressed rows have no value.
        metadata: the JSON data dictionary with its SDC metadata (parameters and counts only).
        audit: what secondary suppression did.
        seconds: time taken.
        report: the auditors' counts (why cells were withheld, rules fired, LP work); never
            written beside the table.
        reasons: per row of ``frame``, ``primary``, ``secondary`` or empty (in memory only,
            for tests and the auditors).
    """

    spec: TableSpec
    frame: pd.DataFrame
    metadata: dict
    audit: Audit = field(repr=False)
    seconds: float = 0.0
    report: dict = field(default_factory=dict, repr=False)
    reasons: np.ndarray | None = field(default=None, repr=False)

    def write(self, folder: Path | str) -> list[Path]:
        """Write ``<name>.csv``, ``.parquet`` and ``.json`` into ``folder`` (atomically)."""
        return write_table(self.frame, self.metadata, Path(folder))


def record_key_secret(key: MasterKey | bytes | None = None) -> bytes:
    """The HKDF subkey (purpose ``sdc:record-key``) that keys every unit's record key."""
    if key is None:
        key = load_master_key()
    if isinstance(key, MasterKey):
        return key.subkey(RECORD_KEY_PURPOSE)
    from linkage.keys import derive_key

    return derive_key(bytes(key), RECORD_KEY_PURPOSE)


def _research_reader(key: MasterKey | bytes) -> MasterKey:
    # research/ is encrypted under a subkey of the master key: raw master bytes are wrapped to derive it
    return key if isinstance(key, MasterKey) else MasterKey(bytes(key), origin="caller")


def _systems(cells, spec: TableSpec, cfg, values) -> list[System]:
    f = cells.frame
    n = f["_n"].to_numpy().astype(float)
    systems = [System("count", n, 0.0, np.maximum(cfg.protection_count, cfg.protection_ratio * n))]
    seen = set()
    for m in spec.all_measures:
        if m.kind in ADDITIVE and m.column not in seen:
            seen.add(m.column)
            total = f[f"{m.column}__sum"].to_numpy(float)
            short = np.maximum(0.0, p_percent_shortfall(cells, m.column, cfg))
            need = np.maximum(cfg.protection_ratio * np.abs(total), short)
            systems.append(System(m.column, total, 0.0 if cells.nonnegative[m.column] else -np.inf, need))
        elif m.kind == "proportion" and m.column not in seen:
            # numerators and complements add up over margins too; each is audited as its own
            # system (a relaxation: the coupling numerator + complement = count is not used)
            seen.add(m.column)
            ones = f[f"{m.column}__ones"].to_numpy().astype(float)
            for name, v in ((f"{m.column}:numerator", ones), (f"{m.column}:complement", n - ones)):
                systems.append(System(name, v, 0.0, np.maximum(cfg.protection_count, cfg.protection_ratio * v)))
    return systems


@dataclass
class _Prepared:
    """A table between its cell statistics and its suppression pattern (true values inside)."""

    spec: TableSpec
    cells: object
    values: dict
    fired: dict
    primary: np.ndarray
    A: object
    systems: list[System]
    perturb: bool
    rounding: str
    fingerprint: str | None

    def block(self) -> Block:
        from linkage.sdc.standard import ALIASES

        f = self.cells.frame
        ident = np.stack([f["_n"].to_numpy(np.int64), f["_ck1"].to_numpy(np.int64), f["_ck2"].to_numpy(np.int64)], 1)
        return Block(self.spec.name, self.A, ident, f["_depth"].to_numpy(np.int64), self.primary,
                     {s.name: (s.values, s.lower, s.need) for s in self.systems},
                     labels=cell_labels(f, list(self.spec.columns), ALIASES))


def _prepare(contributions, spec: TableSpec, config: Config, master, con, perturb: bool | None,
             with_ci: bool = True) -> _Prepared:
    cfg = config.disclosure
    do_perturb = perturb if perturb is not None else (spec.perturb if spec.perturb is not None else cfg.perturb)
    rounding = "none" if do_perturb else cfg.rounding
    own = con is None
    con = con or connect(threads=_THREADS)
    try:
        cells = compute_cells(con, contributions, spec, record_key_secret(master),
                              top_k=max(cfg.dominance_n, 2), quantile_width=cfg.quantile_window + QUANTILE_FETCH,
                              key_margin=key_margin(cfg.magnitude_levels),
                              replicates=cfg.ci_replicates if with_ci else 0)
    finally:
        if own:
            con.close()
    values = measure_values(cells, spec, cfg)
    for m in spec.all_measures:
        if with_ci and m.kind in ("slope", "predict"):
            values[m.name + "__ci"] = ols_ci(cells, m, cfg.ci_level)
    fired = primary(cells, spec, cfg, values)
    prim = np.logical_or.reduce(list(fired.values()))
    fp = master.fingerprint if isinstance(master, MasterKey) else None
    return _Prepared(spec, cells, values, fired, prim, equations(cells.nodes), _systems(cells, spec, cfg, values),
                     do_perturb, rounding, fp)


def _finish(prep: _Prepared, config: Config, suppressed: np.ndarray, audit: Audit, t0: float) -> ProtectedTable:
    cfg, spec, prim = config.disclosure, prep.spec, prep.primary
    long = protected_values(prep.cells, spec, cfg, prep.values, prim, suppressed, prep.perturb, prep.rounding)
    sdc = rule_parameters(cfg, prep.perturb, prep.rounding, prep.fingerprint)
    meta = dictionary(spec, prep.cells, sdc, public_counts(long, suppressed, audit))
    report = audit_counts(prep.fired, prim, suppressed, audit, prep.cells.frame["_n"].to_numpy() > 0)
    reason = np.where(prim, "primary", np.where(suppressed, "secondary", ""))
    reasons = np.tile(reason, len(long) // max(1, len(reason)))
    seconds = time.perf_counter() - t0
    log.info("table %s: %d cells, %d primary, %d secondary, %d LPs, %.1fs", spec.name, len(prim), int(prim.sum()),
             int((suppressed & ~prim).sum()), audit.lps, seconds)
    return ProtectedTable(spec=spec, frame=long, metadata=meta, audit=audit, seconds=seconds, report=report,
                          reasons=reasons)


def protect_table(contributions, spec: TableSpec, config: Config, key: MasterKey | bytes | None = None,
                  con: duckdb.DuckDBPyConnection | None = None, perturb: bool | None = None) -> ProtectedTable:
    """Apply every disclosure rule to one table and return only what may be released.

    Args:
        contributions: one row per unit with ``spec.unit``, every dimension column and every
            measure column (pandas, pyarrow, a DuckDB relation or a SELECT statement).
        spec: the table's dimensions, measures and unit.
        config: the configuration (its ``disclosure`` section).
        key: the master key (or raw secret) that keys record keys; default: the configured key.
        con: a DuckDB connection to compute in (default: a new in-memory one).
        perturb: override ``spec.perturb`` and the config.

    Returns:
        The :class:`ProtectedTable`.

    Raises:
        ContributionError: missing columns, more than one row per unit, missing values.
    """
    return protect_tables([(contributions, spec)], config, key=key, con=con, perturb=perturb)[0]


def protect_tables(tables: list[tuple[object, TableSpec]], config: Config, key: MasterKey | bytes | None = None,
                   con: duckdb.DuckDBPyConnection | None = None, perturb: bool | None = None,
                   earlier: list[Block] = (), max_lps: int | None = None) -> list[ProtectedTable]:
    """Protect several tables released together with one suppression pattern and one LP audit.

    Cells holding the same units in two tables (an LA's total in two tables of the same
    population, ``fsm_ever = no`` and ``fsm_years_band = 0``) are one cell: withheld in both
    or in neither, and every table's margins constrain every other's cells in the audit.

    Args:
        tables: (contributions, spec) per table (see :func:`protect_table`).
        config: the configuration.
        key: the master key; default: the configured key.
        con: a DuckDB connection (default: a new one).
        perturb: override each spec's ``perturb`` and the config.
        earlier: releases already made (:mod:`linkage.sdc.ledger`): their withheld cells stay
            withheld and their published cells are never chosen as complements.
        max_lps: the most linear programs the audit may solve (:class:`LPBudgetExceeded` beyond).

    Returns:
        One :class:`ProtectedTable` per table, in order.
    """
    t0 = time.perf_counter()
    master = key if key is not None else load_master_key()
    preps = [_prepare(c, spec, config, master, con, perturb) for c, spec in tables]
    masks, audit = protect_jointly([p.block() for p in preps] + list(earlier),
                                   max_rounds=config.disclosure.lp_max_rounds, max_lps=max_lps)
    return [_finish(p, config, m, audit, t0) for p, m in zip(preps, masks)]


def build_table(request: dict, workspace: Path | str, config: Config, key: MasterKey | bytes | None = None,
                con: duckdb.DuckDBPyConnection | None = None, record: bool = True) -> ProtectedTable:
    """Build a table on request, from the allowed dimensions and measures, always perturbed.

    The request's dimensions are put in a canonical order first, so the answer does not
    depend on the order they were named in. The answer is audited jointly with everything
    released before it that shares a cell with it (the standard tables and earlier answers,
    from the workspace's release ledger, :mod:`linkage.sdc.ledger`), and then recorded there.

    Args:
        request: ``{"dimensions": ["region", "cohort"], "measure": "mean_pay_25_30"}``;
            dimensions and measure must be in the config's ``allowed_dimensions`` and
            ``allowed_measures`` (and known to the catalogue); at most three dimensions.
        workspace: the workspace whose ``research/`` tables are the population.
        config: the configuration.
        key: the master key; default: the configured key.
        con: a DuckDB connection (default: a new one).
        record: add the answer to the release ledger (``False``: a dry run that releases nothing).

    Returns:
        The :class:`ProtectedTable` (only protected values; cell-key perturbation applied).

    Raises:
        RequestError: a dimension or measure outside the allowed list, or an answer whose
            disclosure audit would need more than ``disclosure.request_max_lps`` linear programs,
            or that no suppression pattern protects (nothing is released or recorded).

    Example:
        >>> build_table({"dimensions": ["region"], "measure": "count"}, "ws", load_config())  # doctest: +SKIP
    """
    from linkage.sdc import ledger, standard

    t0 = time.perf_counter()
    spec, source = standard.request_spec(request, config)
    master = key if key is not None else load_master_key()
    own = con is None
    con = con or connect(threads=_THREADS)
    try:
        rel = standard.population(con, Path(workspace), source, config, _research_reader(master))
        prep = _prepare(rel, spec, config, master, con, True)
    finally:
        if own:
            con.close()
    new = prep.block()
    with ledger.locked(workspace) as d:
        earlier, new.known = ledger.coupled(new, d, published_only=config.disclosure.on_demand_audit == "published")
        try:
            masks, audit = protect_jointly([new, *earlier], max_rounds=config.disclosure.lp_max_rounds,
                                           max_lps=config.disclosure.request_max_lps)
        except LPBudgetExceeded:
            raise RequestError(f"this table needs more disclosure checking than one request may use "
                               f"(over {config.disclosure.request_max_lps} linear programs, "
                               "disclosure.request_max_lps): choose fewer or coarser dimensions") from None
        if audit.fallback:
            # no pattern protects it: withholding every cell would still release its equations, and
            # with cells published elsewhere they can narrow what earlier releases withheld
            raise RequestError("this table cannot be released without narrowing cells withheld in earlier "
                               "tables: choose other or coarser dimensions")
        if record:
            ledger.record(d, [new], masks[:1])
    return _finish(prep, config, masks[0], audit, t0)


def disclose(config: Config, workspace: Path | str, key: MasterKey | bytes | None = None) -> dict:
    """The disclose stage: the standard tables from ``research/`` into ``published/``, and the report.

    Args:
        config: the configuration.
        workspace: the workspace folder (reads ``research/``, writes ``published/`` and
            ``reports/disclosure/``).
        key: the master key; default: the configured key (``HHLINK_KEY`` etc.).

    Returns:
        A summary: tables written with their cell and suppression counts, and timings.

    Example:
        >>> disclose(load_config(), "workspace")["tables"][0]["table"]   # doctest: +SKIP
        'mobility_la_cohort'
    """
    from linkage.sdc import standard
    from linkage.workspace import Workspace

    t0 = time.perf_counter()
    ws = Workspace(workspace)
    research = ws.zone("research")
    if not research.is_dir():
        from linkage.errors import WorkspaceError

        raise WorkspaceError(f"{research}: no research tables; run hhlink assemble first")
    master = key if key is not None else load_master_key(workspace=ws.root)
    from linkage.sdc import ledger

    tables, metas = [], []
    con = connect(threads=_THREADS)
    try:
        with ws.publish_dir("published") as out, ledger.locked(ws.root) as book:
            # the standard tables share cells and margins: one pattern, one LP audit over their union
            reader = _research_reader(master)
            preps = [_prepare(standard.population(con, ws.root, source, config, reader), spec, config, master, con, None)
                     for spec, source in standard.standard_tables(research, config)]
            blocks = [p.block() for p in preps]
            masks, audit = protect_jointly(blocks, max_rounds=config.disclosure.lp_max_rounds)
            for prep, mask in zip(preps, masks):
                pt = _finish(prep, config, mask, audit, t0)
                pt.write(out)
                metas.append({**pt.metadata, "sdc": {**pt.metadata["sdc"], **pt.report}})
                tables.append({"table": prep.spec.name, "cells": pt.metadata["sdc"]["cells"],
                               "suppressed": pt.report["suppressed_cells"],
                               "protected": pt.audit.protected, "seconds": round(pt.seconds, 2)})
            (out / "index.json").write_text(json.dumps({"tables": [m["table"] for m in metas]}, indent=2) + "\n")
            # later on-demand answers are audited against these (a new release starts a new ledger)
            ledger.record(book, blocks, masks, reset=True)
    finally:
        con.close()
    seconds = time.perf_counter() - t0
    params = metas[0]["sdc"] if metas else {}
    run = {"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(seconds, 1),
           "parameters": {k: params[k] for k in ("threshold", "dominance", "p_percent", "coefficients", "percentiles",
                                                  "proportions", "secondary_suppression", "rounding",
                                                  "perturbation") if k in params}}
    report = write_report(metas, run, ws.zone("reports") / "disclosure")
    return {"tables": tables, "seconds": seconds, "report": [str(p) for p in report]}
