"""Protected values, the long-form output, data dictionaries and the auditors' disclosure report.

A published table is long: one row per cell and measure, with one column per dimension
level (``Total`` at margins), ``measure``, ``value`` and ``status``. A suppressed row has
no value (empty in CSV, null in Parquet): the true value is never written anywhere, and
neither are per-cell rule outcomes or feasible intervals. Every withheld cell has the one
status ``suppressed``: whether a rule fired on it (primary) or it protects another cell
(secondary) would tell an adversary that its count is below the threshold, or not; that
reason is kept, as counts per table, only in the auditors' report. The data dictionary
carries parameters and public counts (cells by status), never the number of cells any rule
fired on; the auditors' report counts rules on cells with contributors only (a count of
empty cells would say how many category combinations nobody has).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from linkage.config import DisclosureConfig
from linkage.sdc.cells import Cells
from linkage.sdc.lp import Audit
from linkage.sdc.perturb import count_noise, count_ptable, magnitude_d, measure_offset, round_counts
from linkage.sdc.rules import RULES
from linkage.sdc.spec import TableSpec
from linkage.workspace import atomic_path

STATUSES = ("published", "suppressed", "rounded", "perturbed", "low_reliability")
_DECIMALS = {"count": 0, "sum": 2, "mean": 4, "quantile": 4, "proportion": 4, "slope": 4, "predict": 4}


def protected_values(cells: Cells, spec: TableSpec, cfg: DisclosureConfig, values: dict[str, np.ndarray],
                     primary: np.ndarray, suppressed: np.ndarray, perturb: bool,
                     rounding: str) -> pd.DataFrame:
    """The long-form table: published values after perturbation or rounding; suppressed rows empty."""
    f = cells.frame
    n = f["_n"].to_numpy()
    status_supp = "suppressed"
    if perturb:
        n_pub = n + count_noise(n, f["_ck"].to_numpy(), cfg)
    elif rounding == "10-5":
        n_pub = round_counts(n, cfg.rounding_base)
    else:
        n_pub = n.astype(float)
    parts = []
    for m in spec.all_measures:
        kind = m.kind
        status = np.full(len(f), "published", dtype=object)
        if kind == "count":
            val = n_pub.astype(float)
            if perturb:
                status[:] = "perturbed"
            elif rounding == "10-5":
                status[:] = "rounded"
        elif kind in ("sum", "mean", "quantile"):
            val = values[m.name].copy()
            if perturb:
                key = (f["_ck2"].to_numpy().astype(np.uint64) + np.uint64(measure_offset(m.name))) % np.uint64(2**32)
                d = magnitude_d(key, cfg.magnitude_levels)
                if kind == "quantile":
                    scale = values[m.name + "__spread"]
                else:
                    tops = f[f"{m.column}__top"]
                    scale = np.array([float(np.max(t)) if len(t) else 0.0 for t in tops])
                noise = cfg.magnitude_noise * d * scale
                with np.errstate(invalid="ignore", divide="ignore"):
                    val = val + (noise / np.where(n > 0, n, 1) if kind == "mean" else noise)
                status[:] = "perturbed"
        elif kind == "proportion":
            ones = f[f"{m.column}__ones"].to_numpy()
            if perturb:
                ones_pub = ones + count_noise(ones, f[f"{m.column}__ck"].to_numpy() / 2**32, cfg)
                status[:] = "perturbed"
            elif rounding == "10-5":
                ones_pub = round_counts(ones, cfg.rounding_base)
                status[:] = "rounded"
            else:
                ones_pub = ones.astype(float)
            with np.errstate(invalid="ignore", divide="ignore"):
                val = np.clip(np.where(n_pub > 0, ones_pub / np.where(n_pub > 0, n_pub, 1), np.nan), 0.0, 1.0)
        else:   # coefficients: released exactly once they pass the threshold and dof rules
            val = values[m.name].copy()
        rows = [(m.name, val)]
        ci = values.get(m.name + "__ci")
        if ci is not None:
            # the bootstrap interval, and ONS-style reliability: wider than ci_max_width is "low"
            lo, hi = ci
            wide = ~(hi - lo <= cfg.ci_max_width.get(m.name, np.inf))
            status = np.where(wide, "low_reliability", status)
            rows += [(f"{m.name}_ci_lower", lo), (f"{m.name}_ci_upper", hi)]
            if cfg.ci_action == "suppress":
                rows = [(name, np.where(wide, np.nan, v)) for name, v in rows]
                status = np.where(wide, "suppressed", status)
        for name, v in rows:
            v = np.round(np.asarray(v, dtype=float), _DECIMALS[kind])
            part = f[list(spec.columns)].copy()
            part["measure"] = name
            part["value"] = np.where(suppressed, np.nan, v)
            part["status"] = np.where(suppressed, status_supp, status).astype(str)
            parts.append(part)
    return pd.concat(parts, ignore_index=True)


def rule_parameters(cfg: DisclosureConfig, perturb: bool, rounding: str, key_fingerprint: str | None) -> dict:
    """The SDC metadata shared by every table's data dictionary: rules and parameters, no values."""
    meta = {
        "threshold": {"min_units": cfg.threshold, "zeros_disclosive": cfg.zeros_disclosive},
        "dominance": {"n": cfg.dominance_n, "k": cfg.dominance_k, "applies_to": ["sum", "mean"]},
        "p_percent": {"p": cfg.p_percent, "applies_to": ["sum", "mean"]},
        "coefficients": {"min_residual_dof": cfg.min_dof},
        "percentiles": {"window": cfg.quantile_window,
                        "method": "mean of the contributors' values around the rank, widened until it is not "
                                  "one person's value"},
        "proportions": "numerator and complement each at least the threshold",
        "secondary_suppression": {
            "margins": "every dimension level, hierarchies included (local authority within region), and totals",
            "audit": "linear programming (HiGHS) feasible interval of every suppressed cell, counts and "
                     "magnitude totals",
            "protection_count": cfg.protection_count, "protection_ratio": cfg.protection_ratio,
            "requirement": "every suppressed cell's interval at least the protection range wide; a primary "
                           "cell's interval reaches the range above and below its value"},
        "rounding": {"rule": "10-5", "base": cfg.rounding_base} if rounding == "10-5" else None,
        "uncertainty": {
            "method": "percentile bootstrap (Poisson weights keyed by the record keys) of each coefficient, "
                      "computed with the table; released only for cells that pass every rule",
            "replicates": cfg.ci_replicates, "level": cfg.ci_level, "max_width": dict(cfg.ci_max_width),
            "wider": "status low_reliability" if cfg.ci_action == "mark" else "suppressed",
            "n": "the cell's count row, perturbed like every count"},
        "perturbation": {
            "method": "cell key (sum of keyed record keys mod 1), consistent across tables and requests",
            "count_ptable": count_ptable(cfg),
            "magnitude": {"noise": cfg.magnitude_noise, "levels": cfg.magnitude_levels,
                          "scale": "largest contribution (percentiles: window spread)"},
            "coefficients": "not perturbed",
            "key_fingerprint": key_fingerprint,
        } if perturb else None,
    }
    return meta


def public_counts(long: pd.DataFrame, suppressed: np.ndarray, audit: Audit) -> dict:
    """Per-table counts for the data dictionary: cells, rows by status, whether the audit passed."""
    return {
        "cells": int(len(suppressed)),
        "rows": int(len(long)),
        "status_rows": {s: int((long["status"] == s).sum()) for s in STATUSES},
        "suppressed_cells": int(suppressed.sum()),
        "lp_audit": {"all_protected": audit.protected, "whole_table_suppressed": audit.fallback},
    }


def audit_counts(fired: dict[str, np.ndarray], primary: np.ndarray, suppressed: np.ndarray, audit: Audit,
                 nonempty: np.ndarray | None = None) -> dict:
    """Per-table counts for the auditors' report only: why cells were withheld, and the LP audit's work.

    ``rules_fired`` counts only cells with contributors (``nonempty``): how many category
    combinations are empty is itself disclosive (zeros are), so the zero rule is not counted.
    """
    nonempty = np.ones(len(primary), dtype=bool) if nonempty is None else nonempty
    return {
        "suppressed_cells": {"primary": int(primary.sum()), "secondary": int((suppressed & ~primary).sum())},
        "rules_fired": {r: int((fired[r] & nonempty).sum()) for r in RULES if r != "zero"},
        "lp_audit": {"rounds": audit.rounds, "linear_programs": audit.lps, "suppressed_cells_audited": audit.audited,
                     "all_protected": audit.protected, "whole_table_suppressed": audit.fallback,
                     "joint_with": list(audit.joint_with)},
    }


def dictionary(spec: TableSpec, cells: Cells, sdc: dict, counts: dict) -> dict:
    """The JSON data dictionary of one table."""
    cols = []
    for d in spec.dimensions:
        for i, c in enumerate(d.levels):
            cols.append({"name": c, "role": "dimension", "dimension": d.name, "level": i + 1,
                         "description": d.description, "margin_value": "Total"})
    ci = [(m, side) for m in spec.all_measures if m.kind in ("slope", "predict") for side in ("lower", "upper")]
    cols += [{"name": "measure", "role": "measure name",
              "values": [m.name for m in spec.all_measures] + [f"{m.name}_ci_{side}" for m, side in ci]},
             {"name": "value", "role": "value", "description": "empty when suppressed"},
             {"name": "status", "role": "status", "values": list(STATUSES)}]
    return {
        "table": spec.name, "title": spec.title or spec.name, "description": spec.description,
        "unit": spec.unit_label, "files": {"csv": f"{spec.name}.csv", "parquet": f"{spec.name}.parquet"},
        "columns": cols,
        "dimensions": [{"name": d.name, "levels": list(d.levels), "description": d.description,
                        "categories": len([t for t in cells.nodes[i] if "Total" not in t])}
                       for i, d in enumerate(spec.dimensions)],
        "measures": [{"name": m.name, "kind": m.kind, "description": m.description,
                      **({"q": m.q} if m.q is not None else {}), **({"at": m.at} if m.at is not None else {})}
                     for m in spec.all_measures]
                    + [{"name": f"{m.name}_ci_{side}", "kind": f"ci_{side}",
                        "description": f"{side} bound of the bootstrap confidence interval of {m.name} (see "
                                       "sdc.uncertainty); its status is low_reliability when the interval is "
                                       "wider than the configured precision"} for m, side in ci],
        "sdc": {**sdc, **counts},
    }


def write_table(long: pd.DataFrame, meta: dict, folder: Path) -> list[Path]:
    """Write ``<name>.csv``, ``<name>.parquet`` and ``<name>.json`` atomically into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    name = meta["table"]
    out = long.copy()
    out["value"] = out["value"].astype("float64")
    paths = []
    with atomic_path(folder / f"{name}.csv") as tmp:
        out.to_csv(tmp, index=False, na_rep="", float_format="%.12g")
    paths.append(folder / f"{name}.csv")
    with atomic_path(folder / f"{name}.parquet") as tmp:
        out.to_parquet(tmp, index=False)
    paths.append(folder / f"{name}.parquet")
    with atomic_path(folder / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    paths.append(folder / f"{name}.json")
    return paths


def write_report(tables: list[dict], run: dict, folder: Path) -> tuple[Path, Path]:
    """The auditors' disclosure report: ``report.json`` and a self-contained ``report.html``.

    ``tables`` are data dictionaries whose ``sdc`` holds :func:`audit_counts` too.
    """
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"run": run, "tables": tables}
    with atomic_path(folder / "report.json") as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
    with atomic_path(folder / "report.html") as tmp:
        tmp.write_text(_html(doc))
    return folder / "report.json", folder / "report.html"


def _html(doc: dict) -> str:
    e = html.escape
    run = doc["run"]
    rows = []
    for t in doc["tables"]:
        s = t["sdc"]
        fired = ", ".join(f"{k} {v}" for k, v in s["rules_fired"].items() if v) or "none"
        lp = s["lp_audit"]
        rows.append(
            f"<tr><td><b>{e(t['table'])}</b><br><small>{e(t['title'])}</small></td><td>{s['cells']:,}</td>"
            f"<td>{s['suppressed_cells']['primary']:,}</td><td>{s['suppressed_cells']['secondary']:,}</td>"
            f"<td>{e(fired)}</td><td>{'yes' if lp['all_protected'] else '<b>NO</b>'}"
            f"{' (whole table suppressed)' if lp['whole_table_suppressed'] else ''}<br>"
            f"<small>{lp['linear_programs']:,} LPs, {lp['rounds']} round(s)</small></td>"
            f"<td>{e(', '.join(f'{k} {v:,}' for k, v in s['status_rows'].items() if v))}</td></tr>")
    params = run.get("parameters", {})
    plist = "".join(f"<li><b>{e(k)}</b>: {e(json.dumps(v))}</li>" for k, v in params.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hhlink disclosure report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:80em;color:#222}}
table{{border-collapse:collapse;width:100%}}td,th{{border:1px solid #bbb;padding:.35em .6em;vertical-align:top;text-align:left}}
th{{background:#eef}}small{{color:#555}}</style></head><body>
<h1>Disclosure control report</h1>
<p>Run {e(run.get('finished', ''))}: {len(doc['tables'])} table(s) released to <code>published/</code>.
Each cell is withheld when it has fewer than {e(str(params.get('threshold', {}).get('min_units', '')))} contributors
or fails a magnitude rule (primary), or when it would let a withheld cell be recovered from the margins
(secondary). A linear-programming adversary who knows every published cell and margin was run against every
withheld cell. No withheld value, and no per-cell rule outcome, appears in this report or in any output.</p>
<table><tr><th>table</th><th>cells</th><th>primary</th><th>secondary</th><th>rules fired (cells)</th>
<th>LP audit: all withheld cells protected</th><th>rows by status</th></tr>
{''.join(rows)}</table>
<h2>Rules and parameters</h2><ul>{plist}</ul>
</body></html>
"""
