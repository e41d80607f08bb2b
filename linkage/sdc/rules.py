"""Primary disclosure rules and the true (unprotected) value of every measure in every cell.

Each rule is a vectorised test over the table's cells; a cell is primary-suppressed when
any rule fires for any of its measures, and then all its measures are withheld (one
suppression pattern per table). Rules, with the config fields that set them:

============ =================================================================================
rule         fires when
============ =================================================================================
threshold    fewer than ``threshold`` contributing units (but at least one)
zero         no contributing unit, when ``zeros_disclosive``
dominance    the ``dominance_n`` largest contributions exceed ``dominance_k`` of the total
p_percent    ``total - x1 - x2 < p_percent * x1``: the runner-up could estimate the largest
             contribution to within p% (absolute values; sums and means)
dof          a coefficient with fewer than ``min_dof`` residual degrees of freedom, or not estimable
proportion   a proportion whose numerator or complement is below ``threshold`` (or is zero,
             when ``zeros_disclosive``: everyone or no one in the group has the attribute)
quantile     no window of contributors' values around the rank averages to a value that is
             not one person's own (see :func:`quantile_value`)
============ =================================================================================
"""

from __future__ import annotations

import numpy as np

from linkage.config import DisclosureConfig
from linkage.sdc.cells import Cells
from linkage.sdc.spec import TableSpec

QUANTILE_FETCH = 6   # extra values fetched around a percentile's rank, for widening its window
RULES = ("threshold", "zero", "dominance", "p_percent", "dof", "proportion", "quantile")


def _top(cells: Cells, col: str, k: int) -> np.ndarray:
    out = np.zeros((len(cells.frame), k))
    for i, v in enumerate(cells.frame[f"{col}__top"]):
        m = min(k, len(v))
        out[i, :m] = np.sort(v)[::-1][:m]
    return out


def quantile_value(window: np.ndarray, n: int, q: float, width: int, fetched: int) -> float | None:
    """The released percentile (see :func:`quantile_window`), or ``None``."""
    found = quantile_window(window, n, q, width, fetched)
    return None if found is None else found[0]


def quantile_window(window: np.ndarray, n: int, q: float, width: int, fetched: int) -> tuple[float, float] | None:
    """The released percentile: the mean of ``width`` sorted values around rank ``q*(n-1)``.

    The window widens by one value at a time (up to ``fetched``) while its mean equals a
    value held by fewer than ``width`` contributors, so a released percentile is never a
    single person's value. Returns (value, spread of the window used), or ``None`` when no
    window qualifies.

    Args:
        window: the ``fetched`` sorted values around the rank (all of them when n <= fetched).
        n: contributors in the cell.
        q: the quantile (0.5 for the median).
        width: the smallest window (config ``quantile_window``).
        fetched: the width of ``window`` as fetched (``width + 6``).

    Example:
        >>> quantile_window(np.array([1., 2., 3., 4., 6.]), 5, 0.5, 3, 5)   # mean(2, 3, 4) = 3 is one person's
        (3.75, 4.0)
    """
    if n == 0 or len(window) == 0:
        return None
    c = int(np.floor(q * (n - 1) + 0.5))
    big = min(fetched, n)
    start_fetched = max(0, min(n - big, c - (big - 1) // 2))
    for w in range(min(width, n), big + 1):
        s = max(0, min(n - w, c - (w - 1) // 2)) - start_fetched
        vals = window[s:s + w]
        mean = float(vals.mean())
        equal = np.isclose(vals, mean, rtol=1e-12, atol=1e-12)
        if not equal.any() or equal.sum() >= width:
            return mean, float(vals[-1] - vals[0])
    return None


def measure_values(cells: Cells, spec: TableSpec, cfg: DisclosureConfig) -> dict[str, np.ndarray]:
    """The true value of each measure in each cell (NaN where it is undefined). Never written anywhere."""
    f = cells.frame
    n = f["_n"].to_numpy().astype(float)
    out: dict[str, np.ndarray] = {}
    for m in spec.all_measures:
        if m.kind == "count":
            out[m.name] = n.copy()
        elif m.kind == "sum":
            out[m.name] = f[f"{m.column}__sum"].to_numpy(dtype=float)
        elif m.kind == "mean":
            with np.errstate(invalid="ignore", divide="ignore"):
                out[m.name] = np.where(n > 0, f[f"{m.column}__sum"].to_numpy(dtype=float) / n, np.nan)
        elif m.kind == "proportion":
            with np.errstate(invalid="ignore", divide="ignore"):
                out[m.name] = np.where(n > 0, f[f"{m.column}__ones"].to_numpy(dtype=float) / n, np.nan)
        elif m.kind in ("slope", "predict"):
            p = f"{m.column}__{m.x}"
            sx, sy = f[p + "__sx"].to_numpy(float), f[p + "__sy"].to_numpy(float)
            sxx, sxy = f[p + "__sxx"].to_numpy(float), f[p + "__sxy"].to_numpy(float)
            den = n * sxx - sx * sx
            with np.errstate(invalid="ignore", divide="ignore"):
                ok = (n > 0) & (np.abs(den) > 1e-12 * np.maximum(1.0, n * sxx))
                slope = np.where(ok, (n * sxy - sx * sy) / den, np.nan)
                intercept = np.where(ok, (sy - slope * sx) / n, np.nan)
            out[m.name] = slope if m.kind == "slope" else intercept + slope * m.at
        elif m.kind == "quantile":
            vals, spread = np.full(len(f), np.nan), np.zeros(len(f))
            for i, w in cells.windows.get(m.name, {}).items():
                found = quantile_window(w, int(n[i]), m.q, cfg.quantile_window, QUANTILE_FETCH + cfg.quantile_window)
                if found is not None:
                    vals[i], spread[i] = found
            out[m.name] = vals
            out[m.name + "__spread"] = spread
    return out


def ols_ci(cells: Cells, m, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-bootstrap confidence bounds of a slope or predict measure in every cell (NaN if none)."""
    n_cells = len(cells.frame)
    reps = (cells.replicates or {}).get((m.column, m.x))
    if reps is None:
        return np.full(n_cells, np.nan), np.full(n_cells, np.nan)
    w, sx, sy, sxx, sxy = (reps[..., i] for i in range(5))
    den = w * sxx - sx * sx
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = (w > 2) & (np.abs(den) > 1e-12 * np.maximum(1.0, w * sxx))
        slope = np.where(ok, (w * sxy - sx * sy) / den, np.nan)
        est = slope if m.kind == "slope" else np.where(ok, (sy - slope * sx) / w, np.nan) + slope * m.at
    a = (1 - level) / 2
    enough = np.isfinite(est).sum(axis=1) >= 0.9 * est.shape[1]
    with np.errstate(invalid="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lo, hi = np.nanquantile(est, a, axis=1), np.nanquantile(est, 1 - a, axis=1)
    return np.where(enough, lo, np.nan), np.where(enough, hi, np.nan)


def p_percent_shortfall(cells: Cells, column: str, cfg: DisclosureConfig) -> np.ndarray:
    """How far each cell's total falls short of the p% rule: ``p*x1 - (total - x1 - x2)`` (>0: sensitive)."""
    top = _top(cells, column, 2)
    total = cells.frame[f"{column}__abs"].to_numpy(float)
    return cfg.p_percent * top[:, 0] - (total - top[:, 0] - top[:, 1])


def primary(cells: Cells, spec: TableSpec, cfg: DisclosureConfig,
            values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Which cells each primary rule marks as disclosive (one boolean array per rule in :data:`RULES`)."""
    f = cells.frame
    n = f["_n"].to_numpy()
    fired = {r: np.zeros(len(f), dtype=bool) for r in RULES}
    fired["threshold"] = (n > 0) & (n < cfg.threshold)
    fired["zero"] = (n == 0) & cfg.zeros_disclosive
    for m in spec.all_measures:
        if m.kind in ("sum", "mean"):
            top = _top(cells, m.column, max(cfg.dominance_n, 2))
            total = f[f"{m.column}__abs"].to_numpy(float)
            fired["dominance"] |= (n > 0) & (top[:, :cfg.dominance_n].sum(axis=1) > cfg.dominance_k * total)
            fired["p_percent"] |= (n > 0) & (p_percent_shortfall(cells, m.column, cfg) > 0)
        elif m.kind in ("slope", "predict"):
            fired["dof"] |= (n > 0) & ((n - 2 < cfg.min_dof) | np.isnan(values[m.name]))
        elif m.kind == "proportion":
            ones = f[f"{m.column}__ones"].to_numpy()
            rest = n - ones
            small = ((ones > 0) & (ones < cfg.threshold)) | ((rest > 0) & (rest < cfg.threshold))
            if cfg.zeros_disclosive:
                small |= (n > 0) & ((ones == 0) | (rest == 0))
            fired["proportion"] |= small
        elif m.kind == "quantile":
            fired["quantile"] |= (n > 0) & np.isnan(values[m.name])
    return fired
