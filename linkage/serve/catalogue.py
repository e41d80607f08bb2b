"""The researchers' catalogue: the protected tables in ``published/`` and views of them.

Only what ``hhlink disclose`` (or the table builder) released is read here: long-form
tables of dimension columns, ``measure``, ``value`` and ``status`` with their JSON data
dictionaries. Files are re-read when they change (``published/`` is swapped whole by each
disclose run), and their CSV and JSON renderings are kept in memory for fast downloads.

Views: ``select`` filters rows by dimension values; ``series`` and ``matrix`` give a
measure along one dimension, or across two, with every other dimension at a chosen
category (``Total`` by default), for the bar charts and heat maps of the pages.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from linkage.config import Config
from linkage.serve.files import read_confined
from linkage.serve.words import plain_meta

TOTAL = "Total"
NAME_PATTERN = r"^[a-z0-9_]{1,64}$"
_NAME = re.compile(NAME_PATTERN.strip("^$"))     # used with fullmatch: "$" would admit a trailing newline


class NotFound(KeyError):
    """No such published table (or column, or category)."""


def stamp(path: Path, follow: bool = True) -> tuple | None:
    """The file's (inode, size, mtime) signature, or None when it is missing: a cache key (without
    ``follow``, a link is stamped itself, not its target)."""
    try:
        st = os.stat(path) if follow else os.lstat(path)
    except (OSError, ValueError):
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def rows_json(frame: pd.DataFrame) -> list[dict]:
    """Rows as JSON-ready dicts: a suppressed (missing) value is ``null``."""
    out = frame.astype(object).where(frame.notna(), None).to_dict("records")
    for r in out:
        v = r.get("value")
        if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
            r["value"] = None
    return out


@dataclass
class TableView:
    """A protected table in memory: its data dictionary, its rows and their dimension columns."""

    name: str
    meta: dict
    frame: pd.DataFrame
    csv: bytes
    json: bytes

    @property
    def dimension_columns(self) -> list[str]:
        """The table's dimension columns, in order."""
        return [c["name"] for c in self.meta["columns"] if c.get("role") == "dimension"]

    @property
    def measures(self) -> list[str]:
        """The values of the ``measure`` column."""
        return list(dict.fromkeys(self.frame["measure"].tolist()))

    def column_dimension(self, column: str) -> tuple[str, int]:
        """(dimension name, level) of a dimension column."""
        for c in self.meta["columns"]:
            if c.get("name") == column and c.get("role") == "dimension":
                return c.get("dimension", column), int(c.get("level", 1))
        raise NotFound(column)

    def categories(self, column: str) -> list[str]:
        """The categories of a dimension column (``Total`` first)."""
        vals = sorted(set(self.frame[column].astype(str)) - {TOTAL})
        return [TOTAL, *vals]

    def select(self, filters: dict[str, str], measure: str | None = None) -> pd.DataFrame:
        """Rows whose dimension columns equal ``filters`` (columns not named are free)."""
        mask = pd.Series(True, index=self.frame.index)
        for col, val in filters.items():
            if col not in self.dimension_columns:
                raise NotFound(col)
            mask &= self.frame[col].astype(str) == str(val)
        if measure is not None:
            mask &= self.frame["measure"] == measure
        return self.frame[mask]

    def _axis_filters(self, axes: list[str], fixed: dict[str, str]) -> tuple[pd.Series, list[str]]:
        # along an axis column: not Total; finer levels of its dimension: Total; coarser levels and
        # other dimensions: the chosen category, or Total (coarser levels of an axis: any)
        dims = {c: self.column_dimension(c) for c in self.dimension_columns}
        mask = pd.Series(True, index=self.frame.index)
        for col in self.dimension_columns:
            dim, level = dims[col]
            axis_here = [a for a in axes if dims[a][0] == dim]
            if col in axes:
                mask &= self.frame[col].astype(str) != TOTAL
            elif axis_here and level > dims[axis_here[0]][1]:
                mask &= self.frame[col].astype(str) == TOTAL
            elif axis_here:
                if col in fixed and fixed[col] != TOTAL:
                    mask &= self.frame[col].astype(str) == fixed[col]
            else:
                mask &= self.frame[col].astype(str) == fixed.get(col, TOTAL)
        return mask, list(dims)

    def series(self, measure: str, axis: str, fixed: dict[str, str]) -> list[dict]:
        """The measure along one dimension column: ``[{category, value, status}]``."""
        if axis not in self.dimension_columns:
            raise NotFound(axis)
        mask, _ = self._axis_filters([axis], fixed)
        sub = self.frame[mask & (self.frame["measure"] == measure)]
        return [{"category": str(r[axis]), "value": None if pd.isna(r["value"]) else float(r["value"]),
                 "status": r["status"]} for r in sub.to_dict("records")]

    def count_measure(self) -> str | None:
        """The measure that counts the table's units (``children``), if any."""
        kinds = {m.get("name"): m.get("kind") for m in self.meta.get("measures", [])}
        return next((m for m in self.measures if kinds.get(m) == "count"), None)

    def measure_kind(self, measure: str) -> str:
        """A measure's kind (``count``, ``mean``, ``quantile``, ``proportion``, ``slope`` ...), or ``""``."""
        return next((m.get("kind", "") for m in self.meta.get("measures", []) if m.get("name") == measure), "")

    def points(self, measure: str, axes: list[str], fixed: dict[str, str]) -> list[dict]:
        """The measure at each combination of the ``axes`` columns (others at ``fixed`` or Total), with
        what the table publishes beside it: its ``n`` (the count measure of the same cell), and a
        confidence interval (``low``, ``high``) and ``reliability`` when the table carries them, as
        columns (``ci_low``/``ci_high``, ``lower``/``upper``, ``n``, ``reliability``) or as measures
        named after this one (``<measure>_ci_lower``, ``<measure>_ci_upper``, ``<measure>_n``); a
        ``low_reliability`` status marks a wide interval."""
        for a in axes:
            if a not in self.dimension_columns:
                raise NotFound(a)
        mask, _ = self._axis_filters(axes, fixed)
        sub = self.frame[mask]
        dims = self.dimension_columns
        extra = {"low": ("ci_low", "ci_lower", "lower"), "high": ("ci_high", "ci_upper", "upper"),
                 "n": ("n", "n_perturbed"), "reliability": ("reliability",)}
        by_measure: dict[str, dict[tuple, float | None]] = {}
        count = self.count_measure()
        related = {"low": [f"{measure}_ci_lower", f"{measure}_ci_low", f"{measure}_lower"],
                   "high": [f"{measure}_ci_upper", f"{measure}_ci_high", f"{measure}_upper"],
                   "n": [f"{measure}_n"] + ([count] if count and count != measure else [])}
        wanted = {measure, *(m for ms in related.values() for m in ms)}
        for r in sub[sub["measure"].isin(wanted)].to_dict("records"):
            v = r["value"]
            ok = not (isinstance(v, float) and math.isnan(v)) and v is not None and not str(r.get("status", "")).startswith("suppressed")
            by_measure.setdefault(r["measure"], {})[tuple(str(r[d]) for d in dims)] = float(v) if ok else None
        out = []
        for r in sub[sub["measure"] == measure].to_dict("records"):
            key = tuple(str(r[d]) for d in dims)
            value = None if pd.isna(r["value"]) or str(r["status"]).startswith("suppressed") else float(r["value"])
            p = {**{a: str(r[a]) for a in axes}, "value": value, "status": str(r["status"])}
            for field, names in extra.items():
                col = next((c for c in names if c in r), None)
                if col is not None and not pd.isna(r[col]):
                    p[field] = r[col] if field == "reliability" else float(r[col])
            for field, names in related.items():
                if field not in p:
                    p[field] = next((by_measure[m][key] for m in names if key in by_measure.get(m, {})), None)
            if "reliability" not in p and p["status"] == "low_reliability":
                p["reliability"] = "low"
            if value is None:
                p.update(low=None, high=None)
            out.append(p)
        return out

    def matrix(self, measure: str, rows: str, cols: str, fixed: dict[str, str]) -> dict:
        """The measure across two dimension columns, margins included (``Total`` row and column).

        Returns:
            ``{"rows": [...], "cols": [...], "cells": {(row, col): {value, status}}}``.
        """
        for c in (rows, cols):
            if c not in self.dimension_columns:
                raise NotFound(c)
        if self.column_dimension(rows)[0] == self.column_dimension(cols)[0]:
            raise NotFound(cols)
        mask, _ = self._axis_filters([rows, cols], fixed)
        # margins: the same filters with one or both axes at Total
        base = self.frame["measure"] == measure
        keep = mask.copy()
        for axes in ([rows], [cols], []):
            m, _ = self._axis_filters(axes, fixed)
            keep |= m & (self.frame[[c for c in (rows, cols) if c not in axes]].astype(str) == TOTAL).all(axis=1)
        sub = self.frame[keep & base]
        cells = {(str(r[rows]), str(r[cols])): {"value": None if pd.isna(r["value"]) else float(r["value"]),
                                                 "status": r["status"]} for r in sub.to_dict("records")}
        row_cats = sorted({k[0] for k in cells} - {TOTAL}) + [TOTAL]
        col_cats = sorted({k[1] for k in cells} - {TOTAL}) + [TOTAL]
        return {"rows": row_cats, "cols": col_cats, "cells": cells}


def suppressed_total(counts: object) -> int:
    """Suppressed cells from a dictionary's count: a number, or counts by reason (summed)."""
    if isinstance(counts, dict):
        return int(sum(v for v in counts.values() if isinstance(v, (int, float))))
    return int(counts) if isinstance(counts, (int, float)) else 0


def table_view(name: str, meta: dict, frame: pd.DataFrame, csv_bytes: bytes | None = None) -> TableView:
    """A :class:`TableView` of a protected table, with its CSV and JSON renderings."""
    frame = frame.reset_index(drop=True)
    dims = [c for c in frame.columns if c not in ("measure", "value", "status")]
    frame[dims] = frame[dims].astype(str)
    if csv_bytes is None:
        csv_bytes = frame.to_csv(index=False).encode()
    body = json.dumps({"table": name, "columns": list(frame.columns), "rows": rows_json(frame)},
                      separators=(",", ":")).encode()
    return TableView(name, meta, frame, csv_bytes, body)


class Catalogue:
    """The published tables of one workspace, cached in memory until their files change."""

    def __init__(self, workspace: Path | str, config: Config):
        self.folder = Path(workspace) / "published"
        self._config = config
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[tuple, TableView]] = {}
        self._index: tuple[tuple | None, list[str]] = ((), [])
        self._labels: dict[str, str] | None = None

    def names(self) -> list[str]:
        """Names of the published tables (from ``published/index.json``)."""
        path = self.folder / "index.json"
        signature = stamp(path, follow=False)
        if signature != self._index[0]:
            names: list[str] = []
            raw = read_confined(self.folder, "index.json") if signature is not None else None
            if raw is not None:
                try:
                    listed = json.loads(raw).get("tables", [])
                    # an index may list anything: only plain table names are ever used to build a path
                    names = [n for n in listed if isinstance(n, str) and _NAME.fullmatch(n)] if isinstance(listed, list) else []
                except (ValueError, AttributeError, UnicodeDecodeError):
                    names = []
            self._index = (signature, names)
        return self._index[1]

    def get(self, name: str) -> TableView:
        """One published table.

        Raises:
            NotFound: not in ``published/index.json`` (names are never used as paths before this check).
        """
        if name not in self.names():
            raise NotFound(name)
        files = [f"{name}.json", f"{name}.csv", f"{name}.parquet"]
        signature = tuple(stamp(self.folder / f, follow=False) for f in files)
        hit = self._cache.get(name)
        if hit is not None and hit[0] == signature:
            return hit[1]
        if None in signature:
            raise NotFound(name)
        with self._lock:
            # read only regular files inside published/, never through a link, whatever the index says
            meta_raw, csv_raw, parquet_raw = (read_confined(self.folder, f) for f in files)
            if meta_raw is None or csv_raw is None or parquet_raw is None:
                raise NotFound(name)
            meta = plain_meta(json.loads(meta_raw), self._config)
            frame = pd.read_parquet(io.BytesIO(parquet_raw))
            view = table_view(name, meta, frame, csv_raw)
            self._cache[name] = (signature, view)
        return view

    def summaries(self) -> list[dict]:
        """Each table's name, title, description, unit, dimensions, measures and cell counts."""
        out = []
        for name in self.names():
            try:
                v = self.get(name)
            except (NotFound, OSError, ValueError):
                continue
            sdc = v.meta.get("sdc", {})
            out.append({"name": name, "title": v.meta.get("title", name), "description": v.meta.get("description", ""),
                        "unit": v.meta.get("unit", ""), "dimensions": [d["name"] for d in v.meta.get("dimensions", [])],
                        "measures": [m["name"] for m in v.meta.get("measures", [])], "rows": len(v.frame),
                        "cells": sdc.get("cells"), "suppressed_cells": suppressed_total(sdc.get("suppressed_cells"))})
        return out

    def labels(self) -> dict[str, str]:
        """Display names of region and local-authority codes (ONS lookup)."""
        if self._labels is None:
            path = self._config.paths.resolve(self._config.assemble.la_lookup)
            labels: dict[str, str] = {}
            try:
                with path.open(newline="", encoding="utf-8") as fh:
                    for r in csv.DictReader(fh):
                        labels[r["utla_code"]] = r["utla_name"]
                        labels[r["region_code"]] = r["region_name"]
            except (OSError, KeyError):
                pass
            self._labels = labels
        return self._labels
