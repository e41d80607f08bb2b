"""Disclosure control: properties that must hold for every table (hypothesis).

The truth each property is checked against is recomputed here from the records with
pandas, and the adversary's linear programs are built here from the published long-form
table alone (its dimension columns and ``Total`` rows), independently of the engine's own
audit in :mod:`linkage.sdc.lp`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from linkage.config import load_config
from linkage.disclose.stage import Dimension, Measure, TableSpec, protect_table
from linkage.keys import MasterKey

KEY = MasterKey(bytes.fromhex("5e" * 32), "test")
CFG = load_config().disclosure
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def populations(draw):
    """A small population over region > LA (and sometimes a second dimension), with pay.

    Cell sizes mix small (disclosive) and comfortable counts; some cells hold one or two
    very large values so the magnitude rules fire.
    """
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    regions = {f"R{i}": [f"R{i}L{j}" for j in range(draw(st.integers(1, 3)))] for i in range(draw(st.integers(1, 3)))}
    cats = ["a", "b", "c"][:draw(st.integers(2, 3))] if draw(st.booleans()) else [None]
    rows, pid = [], 0
    for r, las in regions.items():
        for la in las:
            for c in cats:
                n = draw(st.one_of(st.integers(0, 12), st.integers(10, 40)))
                pay = rng.lognormal(10, 0.4, n)
                if n and draw(st.integers(0, 4)) == 0:
                    pay[: draw(st.integers(1, 2))] *= draw(st.sampled_from([5.0, 50.0, 500.0]))
                for v in pay:
                    rows.append({"person": f"p{pid}", "region": r, "la": la, "cat": c, "pay": float(v)})
                    pid += 1
    df = pd.DataFrame(rows, columns=["person", "region", "la", "cat", "pay"])
    dims = [Dimension("geography", ("region", "la"))]
    if cats != [None]:
        dims.append(Dimension("cat", ("cat",)))
    else:
        df = df.drop(columns="cat")
    spec = TableSpec("prop", tuple(dims), (Measure("mean_pay", "mean", "pay"),), unit="person")
    return df, spec


def _dims(frame):
    return [c for c in frame.columns if c not in ("measure", "value", "status")]


def _members(df: pd.DataFrame, cell: dict) -> pd.DataFrame:
    mask = np.ones(len(df), dtype=bool)
    for col, val in cell.items():
        if val != "Total":
            mask &= (df[col] == val).to_numpy()
    return df[mask]


def _truth(df: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """True count, total, the two largest values and the p% shortfall of every output cell."""
    cells = frame[_dims(frame)].drop_duplicates().reset_index(drop=True)
    out = []
    for cell in cells.to_dict("records"):
        pay = np.sort(_members(df, cell)["pay"].to_numpy())[::-1]
        x1 = pay[0] if len(pay) else 0.0
        x2 = pay[1] if len(pay) > 1 else 0.0
        out.append({**cell, "n": len(pay), "total": pay.sum(), "x1": x1, "x2": x2})
    return pd.DataFrame(out)


def _equations(cells: pd.DataFrame, spec: TableSpec) -> list[tuple[int, list[int]]]:
    """(parent, children) over the output's own rows: each margin row equals its children's sum."""
    cols = list(spec.columns)
    eqs = []
    for i, row in enumerate(cells[cols].itertuples(index=False, name=None)):
        row = dict(zip(cols, row))
        for d in spec.dimensions:
            lv = list(d.levels)
            k = sum(row[c] != "Total" for c in lv)
            if k == len(lv):
                continue
            kids = [j for j, other in enumerate(cells[cols].itertuples(index=False, name=None))
                    if all(other[cols.index(c)] == row[c] for c in cols if c not in lv)
                    and all(other[cols.index(c)] == row[c] for c in lv[:k])
                    and other[cols.index(lv[k])] != "Total"
                    and all(other[cols.index(c)] == "Total" for c in lv[k + 1:])]
            if kids:
                eqs.append((i, kids))
    return eqs


def _interval(eqs, values: np.ndarray, hidden: np.ndarray, c: int, lower: float) -> tuple[float, float]:
    idx = np.flatnonzero(hidden)
    pos = {j: i for i, j in enumerate(idx)}
    A, b = [], []
    for p, kids in eqs:
        members = [(p, 1.0)] + [(k, -1.0) for k in kids]
        if not any(hidden[j] for j, _ in members):
            continue
        row = np.zeros(len(idx))
        rhs = 0.0
        for j, coef in members:
            if hidden[j]:
                row[pos[j]] += coef
            else:
                rhs -= coef * values[j]
        A.append(row)
        b.append(rhs)
    bounds = [(None if np.isneginf(lower) else lower, None)] * len(idx)
    obj = np.zeros(len(idx))
    obj[pos[c]] = 1.0
    ends = []
    for sign in (1.0, -1.0):
        res = linprog(sign * obj, A_eq=np.array(A) if A else None, b_eq=np.array(b) if b else None,
                      bounds=bounds, method="highs")
        if res.status == 3:
            ends.append(-np.inf if sign > 0 else np.inf)
        else:
            assert res.status == 0, res.message
            ends.append(sign * res.fun)
    return ends[0], ends[1]


@SETTINGS
@given(populations())
def test_no_published_count_below_threshold(pop):
    df, spec = pop
    t = protect_table(df, spec, load_config(), key=KEY)
    counts = t.frame[t.frame["measure"] == "persons"].reset_index(drop=True)
    truth = _truth(df, counts)
    merged = counts.merge(truth, on=_dims(counts))
    shown = ~merged["status"].str.startswith("suppressed")
    assert (merged.loc[shown, "n"] >= CFG.threshold).all()
    assert (merged.loc[shown, "value"] >= CFG.threshold).all()
    assert merged.loc[~shown, "value"].isna().all()


@SETTINGS
@given(populations())
def test_no_published_magnitude_fails_dominance_or_p_percent(pop):
    df, spec = pop
    t = protect_table(df, spec, load_config(), key=KEY)
    means = t.frame[t.frame["measure"] == "mean_pay"]
    shown = means[~means["status"].str.startswith("suppressed")]
    for cell in shown[_dims(shown)].to_dict("records"):
        pay = np.sort(_members(df, cell)["pay"].to_numpy())[::-1]
        total = pay.sum()
        assert pay[: CFG.dominance_n].sum() <= CFG.dominance_k * total
        assert total - pay[0] - (pay[1] if len(pay) > 1 else 0.0) >= CFG.p_percent * pay[0]


@SETTINGS
@given(populations())
def test_lp_adversary_cannot_narrow_a_suppressed_cell(pop):
    df, spec = pop
    t = protect_table(df, spec, load_config(disclosure={"perturb": False}), key=KEY)
    counts = t.frame[t.frame["measure"] == "persons"].reset_index(drop=True)
    if not counts["status"].str.startswith("suppressed").any():
        return
    truth = counts.merge(_truth(df, counts), on=_dims(counts), how="left")
    hidden = truth["status"].str.startswith("suppressed").to_numpy()
    eqs = _equations(truth, spec)
    n, total = truth["n"].to_numpy(float), truth["total"].to_numpy(float)
    short = np.maximum(0.0, CFG.p_percent * truth["x1"] - (total - truth["x1"] - truth["x2"])).to_numpy()
    systems = [(n, np.maximum(CFG.protection_count, CFG.protection_ratio * n)),
               (total, np.maximum(CFG.protection_ratio * total, short))]
    for values, need in systems:
        for c in np.flatnonzero(hidden):
            lo, hi = _interval(eqs, values, hidden, c, 0.0)
            tol = 1e-6 * max(1.0, values[c])
            assert hi - lo >= need[c] - tol, f"cell {c}: interval narrower than the protection range"
            # one status for every withheld cell: each keeps its upper and lower protection
            assert hi >= values[c] + need[c] - tol
            assert lo <= max(0.0, values[c] - need[c]) + tol


@SETTINGS
@given(populations())
def test_same_request_gives_the_same_perturbed_table(pop):
    df, spec = pop
    a = protect_table(df, spec, load_config(), key=KEY)
    b = protect_table(df.sample(frac=1.0, random_state=7), spec, load_config(), key=KEY)
    pd.testing.assert_frame_equal(a.frame, b.frame)
    assert a.metadata == b.metadata


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(populations(), st.integers(0, 10**6))
def test_differencing_one_person_does_not_reveal_their_value(pop, pick):
    # Two requests whose populations differ by one person X. The attacker knows both true
    # counts and subtracts the released totals (mean x count) of every cell published in both:
    # the estimate of X's pay must miss by more than p% whenever X is not the cell's largest
    # contributor (the perturbation's guarantee, see linkage/sdc/perturb.py).
    df, spec = pop
    if df.empty:
        return
    x = df.iloc[pick % len(df)]
    without = df[df["person"] != x["person"]]
    cfg = load_config()
    a = protect_table(df, spec, cfg, key=KEY).frame
    b = protect_table(without, spec, cfg, key=KEY).frame
    dims = _dims(a)
    m = a[a["measure"] == "mean_pay"].merge(b[b["measure"] == "mean_pay"], on=dims + ["measure"], suffixes=("_a", "_b"))
    for row in m.to_dict("records"):
        cell = {c: row[c] for c in dims}
        members = _members(df, cell)
        if x["person"] not in set(members["person"]):
            if not (row["status_a"].startswith("suppressed") or row["status_b"].startswith("suppressed")):
                assert row["value_a"] == row["value_b"]   # same units, same cell key, same value
            continue
        if row["status_a"].startswith("suppressed") or row["status_b"].startswith("suppressed"):
            continue
        if members["pay"].max() == x["pay"]:
            continue   # the largest contributor: the noise scale changes too (documented limitation)
        estimate = row["value_a"] * len(members) - row["value_b"] * (len(members) - 1)
        assert abs(estimate - x["pay"]) > CFG.p_percent * x["pay"], "differencing recovered a person's value"


def test_differencing_attack_rarely_succeeds_even_on_the_largest_contributor():
    # The same attack on every person of one population, largest contributors included: the
    # estimate lands within p% of the truth for only a small share of attacks.
    rng = np.random.default_rng(11)
    n = 60
    df = pd.DataFrame({"person": [f"p{i}" for i in range(n)], "region": rng.choice(["A", "B"], n),
                       "pay": rng.lognormal(10, 0.5, n)})
    spec = TableSpec("diff", (Dimension("region", ("region",)),), (Measure("total_pay", "sum", "pay"),),
                     unit="person")
    cfg = load_config()
    full = protect_table(df, spec, cfg, key=KEY).frame.set_index(["region", "measure"])["value"]
    hits = tries = 0
    for i in range(n):
        x = df.iloc[i]
        part = protect_table(df.drop(index=i), spec, cfg, key=KEY).frame.set_index(["region", "measure"])["value"]
        for cell in (x["region"], "Total"):
            a, b = full[(cell, "total_pay")], part[(cell, "total_pay")]
            if np.isnan(a) or np.isnan(b):
                continue
            tries += 1
            hits += abs((a - b) - x["pay"]) <= CFG.p_percent * x["pay"]
    assert tries >= n
    assert hits / tries < 0.05


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(["A", "B", "C"]), st.integers(0, 12)), min_size=0, max_size=120),
       st.sampled_from([0.5, 0.25, 0.9]))
def test_percentiles_are_never_one_persons_value(records, q):
    # integer scores with many ties: the hardest case for a window mean to avoid a person's value
    df = pd.DataFrame({"person": [f"p{i}" for i in range(len(records))],
                       "region": [r for r, _ in records], "score": [float(v) for _, v in records]})
    spec = TableSpec("pct", (Dimension("region", ("region",)),), (Measure("p", "quantile", "score", q=q),),
                     unit="person")
    t = protect_table(df, spec, load_config(disclosure={"perturb": False}), key=KEY).frame
    shown = t[(t["measure"] == "p") & ~t["status"].str.startswith("suppressed")]
    for row in shown.to_dict("records"):
        scores = _members(df, {"region": row["region"]})["score"]
        holders = int(np.isclose(scores, row["value"], rtol=0, atol=1e-9).sum())
        assert holders == 0 or holders >= CFG.quantile_window, "a released percentile is one person's value"
