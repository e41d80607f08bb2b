"""Mobility measures on the intergenerational cohort table, with bootstrap confidence intervals.

Every measure is computed on ``research/cohort.parquet`` (one row per child), nationally
and per birth cohort, region and local authority at 16:

* **ige** - intergenerational income elasticity: the OLS slope of ``log_adult_pay`` on
  ``log_parents_earnings`` within birth cohort (both demeaned by cohort), the quantity the
  generator plants;
* **rank_slope** - the rank-rank slope: OLS slope of the child's percentile rank on the
  parents' percentile rank; ranks (mid-rank, 0-100) are taken within birth cohort over the
  national sample, so an area's ranks are national ranks (Chetty et al. 2014);
* **absolute_upward_mobility** - the expected child rank at the parents' 25th percentile,
  ``intercept + 25 * rank_slope`` of the same regression;
* **transition matrix** - the share of each parental-earnings quintile's children in each
  adult-pay quintile; **bottom_to_top** is its (1, 5) cell;
* **attainment gaps** - mean KS2 score and KS4 Attainment 8 of children not disadvantaged
  minus those disadvantaged, for each disadvantage measure in :data:`DISADVANTAGE`.

The mobility sample is the children with both ``log_parents_earnings`` and
``log_adult_pay``; each gap's sample is the children with the outcome and the measure.

Confidence intervals: a Poisson bootstrap (each child's weight in a replicate is drawn
from Poisson(1)), seeded, with percentile intervals. One weight per child and replicate
serves every group and measure, so a replicate is one resampled population. Every
measure is a function of weighted sums (counts, sums, cross-products), so a replicate
costs one matrix product per group; ranks stay those of the full sample.

Example:
    >>> import numpy as np
    >>> ige(np.log([10, 20, 40.0]), np.log([5, 7, 9.8]), np.zeros(3))   # doctest: +ELLIPSIS
    0.48...
"""

from __future__ import annotations

from collections.abc import Callable
import warnings
from dataclasses import dataclass

import numpy as np

GROUP_TYPES = ("national", "birth_cohort", "region", "la")
MOBILITY_MEASURES = ("ige", "rank_slope", "absolute_upward_mobility", "bottom_to_top")
OUTCOMES = ("ks2_score", "ks4_att8")
# disadvantage measures for attainment gaps: name -> how a cohort row is flagged
DISADVANTAGE = ("ever_fsm", "persistent_fsm", "income_bottom_quintile", "parents_earnings_bottom_quintile",
                "long_benefit_spell")


# -- the measures, computed directly (the reference for the sums-based versions below) ---------

def percentile_ranks(values: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Mid-rank percentile (0-100) of each value within its group: ``100 * (rank - 0.5) / n``.

    Tied values share the mean of their ranks, so ranks average 50 in every group.

    Example:
        >>> percentile_ranks(np.array([10.0, 20, 20, 40])).tolist()
        [12.5, 50.0, 50.0, 87.5]
    """
    values = np.asarray(values, dtype=float)
    groups = np.zeros(len(values)) if groups is None else np.asarray(groups)
    out = np.empty(len(values))
    order = np.lexsort((values, groups))
    g, v = groups[order], values[order]
    # a run is a block of equal (group, value); its members share the mean 1-based rank
    new_group = np.r_[True, g[1:] != g[:-1]]
    new_run = new_group | np.r_[True, v[1:] != v[:-1]]
    group_id = np.cumsum(new_group) - 1
    run_id = np.cumsum(new_run) - 1
    group_start = np.flatnonzero(new_group)
    group_size = np.diff(np.r_[group_start, len(v)])
    pos = np.arange(len(v)) - group_start[group_id] + 1
    run_mean = np.bincount(run_id, weights=pos) / np.bincount(run_id)
    out[order] = 100.0 * (run_mean[run_id] - 0.5) / group_size[group_id]
    return out


def within_group_slope(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """OLS slope of ``y`` on ``x`` with a separate intercept per group (x and y demeaned by group)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    _, inv = np.unique(groups, return_inverse=True)
    n = np.bincount(inv)
    xd = x - (np.bincount(inv, weights=x) / n)[inv]
    yd = y - (np.bincount(inv, weights=y) / n)[inv]
    sxx = float(xd @ xd)
    return float(xd @ yd) / sxx if sxx > 0 else float("nan")


def ige(log_parents: np.ndarray, log_child: np.ndarray, cohort: np.ndarray) -> float:
    """Intergenerational income elasticity: the within-birth-cohort slope of log child pay on log parental earnings."""
    return within_group_slope(log_parents, log_child, cohort)


def rank_regression(parent_rank: np.ndarray, child_rank: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of the OLS regression of child rank on parent rank."""
    p, c = np.asarray(parent_rank, float), np.asarray(child_rank, float)
    pd = p - p.mean()
    slope = float(pd @ (c - c.mean())) / float(pd @ pd)
    return slope, float(c.mean() - slope * p.mean())


def absolute_upward_mobility(parent_rank: np.ndarray, child_rank: np.ndarray, at: float = 25.0) -> float:
    """Expected child rank at the parents' ``at`` percentile (25th: Chetty's absolute upward mobility)."""
    slope, intercept = rank_regression(parent_rank, child_rank)
    return intercept + at * slope


def quintile(rank: np.ndarray) -> np.ndarray:
    """Quintile 1-5 of a 0-100 percentile rank (rank 20 is in quintile 2)."""
    return np.clip(np.floor(np.asarray(rank, float) / 20.0).astype(int) + 1, 1, 5)


def transition_matrix(parent_rank: np.ndarray, child_rank: np.ndarray) -> np.ndarray:
    """5 x 5 matrix: row i, column j is the share of children of parent quintile i in child quintile j."""
    counts = np.zeros((5, 5))
    np.add.at(counts, (quintile(parent_rank) - 1, quintile(child_rank) - 1), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts / counts.sum(axis=1, keepdims=True)


def bottom_to_top(parent_rank: np.ndarray, child_rank: np.ndarray) -> float:
    """Share of children with parents in the bottom quintile who reach the top quintile."""
    return float(transition_matrix(parent_rank, child_rank)[0, 4])


def attainment_gap(score: np.ndarray, disadvantaged: np.ndarray) -> float:
    """Mean score of children not disadvantaged minus that of disadvantaged children."""
    score, d = np.asarray(score, float), np.asarray(disadvantaged, bool)
    return float(score[~d].mean() - score[d].mean())


# -- the same measures from weighted sums, for the bootstrap -----------------------------------

@dataclass
class _Spec:
    """One group's sample for a family of measures: rows, their columns, and how sums become measures."""

    group_type: str
    group_value: str
    rows: np.ndarray                            # indices into the cohort arrays
    columns: np.ndarray                         # (len(rows), k) values whose weighted sums are needed
    finish: Callable[[np.ndarray], dict[str, np.ndarray]]   # sums (R, k) -> {measure: (R,)}
    n: dict[str, int]                           # children in each measure's sample


def _within_slope_sums(x: np.ndarray, y: np.ndarray, cohort_code: np.ndarray, n_codes: int) -> np.ndarray:
    """Columns whose sums give a within-cohort slope: per cohort (1, x, y, x^2, xy)."""
    cols = np.zeros((len(x), n_codes * 5))
    base = cohort_code * 5
    r = np.arange(len(x))
    for k, v in enumerate((np.ones(len(x)), x, y, x * x, x * y)):
        cols[r, base + k] = v
    return cols


def _within_slope(s: np.ndarray) -> np.ndarray:
    s = s.reshape(len(s), -1, 5)
    n, sx, sy, sxx, sxy = (s[..., k] for k in range(5))
    with np.errstate(invalid="ignore", divide="ignore"):
        cxx = np.where(n > 0, sxx - sx * sx / n, 0.0).sum(axis=1)
        cxy = np.where(n > 0, sxy - sx * sy / n, 0.0).sum(axis=1)
        return np.where(cxx > 0, cxy / cxx, np.nan)


def _ols(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, sx, sy, sxx, sxy = (s[:, k] for k in range(5))
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = (sxy - sx * sy / n) / (sxx - sx * sx / n)
        return slope, (sy - slope * sx) / n


def _mobility_spec(group_type: str, group_value: str, rows: np.ndarray, d: dict, min_n: int) -> _Spec:
    x, y = d["x"][rows], d["y"][rows]
    # cohorts present in this group only: the within-cohort sums need 5 columns per cohort
    _, code = np.unique(d["cohort_code"][rows], return_inverse=True)
    n_codes = int(code.max()) + 1 if len(rows) else 0
    p, c = d["parent_rank"][rows], d["child_rank"][rows]
    pq, cq = quintile(p) - 1, quintile(c) - 1
    # ranks centred and scaled to [-0.5, 0.5] keep the replicates' float32 sums accurate
    p, c = (p - 50.0) / 100.0, (c - 50.0) / 100.0
    trans = np.zeros((len(rows), 30))
    r = np.arange(len(rows))
    trans[r, pq] = 1.0
    trans[r, 5 + pq * 5 + cq] = 1.0
    cols = np.hstack([_within_slope_sums(x, y, code, n_codes),
                      np.column_stack([np.ones(len(rows)), p, c, p * p, p * c]), trans])
    k_ige = n_codes * 5
    enough = len(rows) >= min_n

    def finish(s: np.ndarray) -> dict[str, np.ndarray]:
        slope, intercept = _ols(s[:, k_ige:k_ige + 5])
        rows_n = s[:, k_ige + 5:k_ige + 10]
        cells = s[:, k_ige + 10:].reshape(len(s), 5, 5)
        with np.errstate(invalid="ignore", divide="ignore"):
            shares = cells / rows_n[:, :, None]
            aum = 50.0 + 100.0 * (intercept - 0.25 * slope)
        out = {"ige": _within_slope(s[:, :k_ige]), "rank_slope": slope, "absolute_upward_mobility": aum,
               "bottom_to_top": shares[:, 0, 4]}
        for i in range(5):
            for j in range(5):
                out[f"cell_{i + 1}_{j + 1}"] = shares[:, i, j]
        if not enough:
            out = {k: np.full(len(s), np.nan) for k in out}
        return out

    n = {m: len(rows) for m in MOBILITY_MEASURES}
    counts = np.zeros((5, 5), dtype=int)
    np.add.at(counts, (pq, cq), 1)
    n.update({f"cell_{i + 1}_{j + 1}": int(counts[i, j]) for i in range(5) for j in range(5)})
    n.update({f"row_{i + 1}": int(counts[i].sum()) for i in range(5)})
    return _Spec(group_type, group_value, rows, cols, finish, n)


def _gap_spec(group_type: str, group_value: str, rows: np.ndarray, outcome: str, d: dict, min_n: int) -> _Spec:
    score = d[outcome][rows] - d[f"{outcome}_mean"]       # centred: a difference of means is unchanged
    cols, n = [], {}
    for name in DISADVANTAGE:
        flag = d[name][rows]                            # 1.0, 0.0 or nan
        valid = ~np.isnan(flag)
        dis = np.where(valid, flag, 0.0)
        adv = np.where(valid, 1.0 - flag, 0.0)
        cols += [adv, adv * score, dis, dis * score]
        n[f"attainment_gap_{outcome}_{name}"] = int(valid.sum())
        n[f"_min_{name}"] = int(min(dis.sum(), adv.sum()))

    def finish(s: np.ndarray) -> dict[str, np.ndarray]:
        out = {}
        for i, name in enumerate(DISADVANTAGE):
            na, sa, nd, sd = (s[:, 4 * i + k] for k in range(4))
            with np.errstate(invalid="ignore", divide="ignore"):
                gap = sa / na - sd / nd
            ok = n[f"attainment_gap_{outcome}_{name}"] >= min_n and n[f"_min_{name}"] > 0
            out[f"attainment_gap_{outcome}_{name}"] = gap if ok else np.full(len(s), np.nan)
        return out

    return _Spec(group_type, group_value, rows, np.column_stack(cols), finish,
                 {k: v for k, v in n.items() if not k.startswith("_")})


def _groups(values: np.ndarray, rows: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(value, row indices) for each non-null value among ``rows``, in sorted order."""
    v = values[rows]
    keep = np.array([x is not None and x == x for x in v], dtype=bool) if v.dtype == object else ~np.isnan(v)
    rows, v = rows[keep], v[keep]
    if not len(rows):
        return []
    labels = np.array([str(int(x)) if isinstance(x, (float, np.floating)) else str(x) for x in v])
    out = []
    for label in np.unique(labels):
        out.append((str(label), rows[labels == label]))
    return out


def prepare(cohort: dict[str, np.ndarray], persistent_fsm: bool = True, long_spell_months: float = 24.0) -> dict:
    """Arrays the measures read, from the cohort table's columns (a dict of numpy arrays).

    Adds: the mobility sample mask ``mobile``; ``x``/``y`` (log parental earnings and log adult
    pay, demeaned by birth cohort); national within-cohort ``parent_rank``/``child_rank`` over
    the mobility sample; ``cohort_code``; and the disadvantage flags (1.0, 0.0 or NaN).
    """
    d = dict(cohort)
    n = len(d["birth_year"])
    lp = np.asarray(d["log_parents_earnings"], float)
    la = np.asarray(d["log_adult_pay"], float)
    mobile = ~np.isnan(lp) & ~np.isnan(la)
    by = np.asarray(d["birth_year"])
    _, code = np.unique(by, return_inverse=True)
    d["cohort_code"] = code
    d["n_codes"] = int(code.max()) + 1 if n else 0
    x, y = np.full(n, np.nan), np.full(n, np.nan)
    pr, cr = np.full(n, np.nan), np.full(n, np.nan)
    if mobile.any():
        idx = np.flatnonzero(mobile)
        c = code[idx]
        cnt = np.bincount(c, minlength=d["n_codes"])
        with np.errstate(invalid="ignore", divide="ignore"):
            x[idx] = lp[idx] - (np.bincount(c, weights=lp[idx], minlength=d["n_codes"]) / cnt)[c]
            y[idx] = la[idx] - (np.bincount(c, weights=la[idx], minlength=d["n_codes"]) / cnt)[c]
        pr[idx] = percentile_ranks(np.asarray(d["parents_earnings"], float)[idx], c)
        cr[idx] = percentile_ranks(np.asarray(d["adult_pay"], float)[idx], c)
    d.update(mobile=mobile, x=x, y=y, parent_rank=pr, child_rank=cr)

    def flag(values, test):
        v = np.asarray(values, dtype=float)
        return np.where(np.isnan(v), np.nan, test(v).astype(float))

    d["ever_fsm"] = flag(d["ever_fsm"], lambda v: v > 0)
    d["persistent_fsm"] = flag(d["persistent_fsm"], lambda v: v > 0)
    d["income_bottom_quintile"] = flag(d["household_income_percentile"], lambda v: v < 20)
    d["parents_earnings_bottom_quintile"] = flag(d["parents_earnings_percentile"], lambda v: v < 20)
    spell = np.asarray(d["longest_spell_months"], float)
    d["long_benefit_spell"] = np.where(np.isnan(spell), np.nan, (spell >= long_spell_months).astype(float))
    for o in OUTCOMES:
        d[o] = np.asarray(d[o], dtype=float)
        d[f"{o}_mean"] = float(np.nanmean(d[o])) if (~np.isnan(d[o])).any() else 0.0
    return d


def _specs(d: dict, min_n: int) -> list[_Spec]:
    n = len(d["birth_year"])
    everyone = np.arange(n)
    by_type = {"national": [("all", everyone)], "birth_cohort": _groups(np.asarray(d["birth_year"], float), everyone),
               "region": _groups(np.asarray(d["region_at_16"], dtype=object), everyone),
               "la": _groups(np.asarray(d["la_at_16"], dtype=object), everyone)}
    specs = []
    for group_type in GROUP_TYPES:
        for value, rows in by_type[group_type]:
            mob = rows[d["mobile"][rows]]
            specs.append(_mobility_spec(group_type, value, mob, d, min_n))
            for outcome in OUTCOMES:
                has = rows[~np.isnan(d[outcome][rows])]
                specs.append(_gap_spec(group_type, value, has, outcome, d, min_n))
    return specs


def bootstrap_measures(d: dict, replicates: int = 200, seed: int = 1, confidence: float = 0.95,
                       min_n: int = 20, chunk: int = 50) -> tuple[list[dict], list[dict]]:
    """Every measure for every group, with Poisson-bootstrap percentile intervals.

    Args:
        d: the output of :func:`prepare`.
        replicates: bootstrap replicates (0: point estimates only).
        seed: the bootstrap's seed; the same seed and data give the same intervals.
        confidence: the interval's coverage (0.95: the 2.5th and 97.5th percentiles).
        min_n: groups with fewer children in a measure's sample get no estimate.
        chunk: replicates drawn at a time (bounds memory: chunk x children weights).

    Returns:
        (measure rows, transition-matrix rows), as in ``schemas/research/mobility.toml`` and
        ``transition_matrix.toml``.
    """
    specs = _specs(d, min_n)
    n = len(d["birth_year"])
    points = [spec.finish(spec.columns.sum(axis=0)[None, :]) for spec in specs]
    draws: list[dict[str, list[np.ndarray]]] = [{k: [] for k in p} for p in points]
    columns32 = [spec.columns.astype(np.float32) for spec in specs] if replicates else []
    rng = np.random.default_rng(seed)
    done = 0
    while done < replicates:
        b = min(chunk, replicates - done)
        # float32 products run several times faster; the columns are centred and the weights
        # small integers, so the replicates' sums keep ~6 significant digits
        w = rng.poisson(1.0, size=(b, n)).astype(np.float32)
        for spec, cols, store in zip(specs, columns32, draws):
            if not len(spec.rows):
                continue
            for k, v in spec.finish((w[:, spec.rows] @ cols).astype(np.float64)).items():
                store[k].append(v)
        done += b
    lo_q, hi_q = 50 * (1 - confidence), 50 * (1 + confidence)
    measures, transitions = [], []
    for spec, point, store in zip(specs, points, draws):
        names = list(point)
        bounds = np.full((2, len(names)), np.nan)
        if replicates and store[names[0]]:
            reps = np.column_stack([np.concatenate(store[k]) for k in names])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)     # all-NaN columns: no interval
                bounds = np.nanpercentile(reps, [lo_q, hi_q], axis=0)
        for i, name in enumerate(names):
            est = float(point[name][0])
            lo, hi = (float(bounds[0, i]), float(bounds[1, i])) \
                if not (np.isnan(est) or np.isnan(bounds[0, i])) else (None, None)
            est = None if np.isnan(est) else est
            if name.startswith("cell_"):
                i, j = int(name[5]), int(name[7])
                transitions.append({"group_type": spec.group_type, "group_value": spec.group_value,
                                    "parent_quintile": i, "child_quintile": j, "share": est,
                                    "ci_low": lo, "ci_high": hi, "n": spec.n[name],
                                    "n_parent_quintile": spec.n[f"row_{i}"]})
            else:
                measures.append({"group_type": spec.group_type, "group_value": spec.group_value,
                                 "measure": name, "estimate": est, "ci_low": lo, "ci_high": hi,
                                 "n": spec.n[name]})
    return measures, transitions


def headline(d: dict) -> dict:
    """National point estimates of the mobility measures (no bootstrap), and the sample size."""
    idx = np.flatnonzero(d["mobile"])
    if len(idx) < 3:
        return {"ige": None, "rank_slope": None, "absolute_upward_mobility": None, "bottom_to_top": None, "n": len(idx)}
    p, c = d["parent_rank"][idx], d["child_rank"][idx]
    slope, intercept = rank_regression(p, c)
    return {"ige": ige(d["x"][idx], d["y"][idx], d["cohort_code"][idx]), "rank_slope": slope,
            "absolute_upward_mobility": intercept + 25.0 * slope, "bottom_to_top": bottom_to_top(p, c),
            "n": int(len(idx))}


# -- what reports may say about sample sizes ---------------------------------------------------

def national_samples(d: dict) -> dict[str, np.ndarray]:
    """Per national measure, the cohort rows in its sample (whose count is the measure's ``n``).

    Example:
        >>> d = prepare({"birth_year": np.array([2000.0, 2000.0, 2001.0]), "log_parents_earnings":
        ...             np.array([1.0, np.nan, 2.0]), "log_adult_pay": np.array([1.0, 1.0, 2.0]),
        ...             "parents_earnings": np.array([1.0, np.nan, 2.0]), "adult_pay": np.array([1.0, 1.0, 2.0]),
        ...             "ks2_score": np.full(3, np.nan), "ks4_att8": np.full(3, np.nan)})  # doctest: +SKIP
        >>> national_samples(d)["ige"].tolist()  # doctest: +SKIP
        [0, 2]
    """
    out = {m: np.flatnonzero(d["mobile"]) for m in MOBILITY_MEASURES}
    for outcome in OUTCOMES:
        has = ~np.isnan(np.asarray(d[outcome], float))
        for name in DISADVANTAGE:
            out[f"attainment_gap_{outcome}_{name}"] = np.flatnonzero(has & ~np.isnan(np.asarray(d[name], float)))
    return out


def public_n(samples: dict[str, np.ndarray], child_ids: list[str], secret: bytes, cfg) -> dict[str, int | None]:
    """Each sample's size as the disclosure engine would publish a count of the same children.

    The count gets the cell-key noise of :mod:`linkage.sdc.perturb` with the cell key of the
    same children (their record keys under ``secret``, the ``sdc:record-key`` subkey), so a
    report's ``n`` equals the published count of the same population in any table, and
    comparing the two reveals nothing about the noise; a sample below the threshold has no
    ``n`` (``None``).

    Args:
        samples: per measure, row indices into ``child_ids`` (:func:`national_samples`).
        child_ids: the research key of each cohort row (the unit of the published tables).
        secret: :func:`linkage.disclose.stage.record_key_secret` of the master key.
        cfg: the ``disclosure`` config section.

    Returns:
        Per measure, the perturbed count or ``None``.
    """
    from linkage.sdc.cells import KEY_MODULUS, record_keys
    from linkage.sdc.perturb import count_noise

    keyed = np.array([c is not None for c in child_ids], dtype=bool)
    rk1 = np.zeros(len(child_ids), dtype=np.int64)
    if keyed.any():
        rk1[keyed] = record_keys([c for c in child_ids if c is not None], secret)[:, 0].astype(np.int64)
    out: dict[str, int | None] = {}
    for name, rows in samples.items():
        n = len(rows)
        if n < cfg.threshold or not keyed[rows].all():   # a child without a research key is in no table
            out[name] = None
            continue
        ck = float(int(rk1[rows].sum()) % KEY_MODULUS) / KEY_MODULUS
        out[name] = int(n + count_noise(np.array([n]), np.array([ck]), cfg)[0])
    return out
