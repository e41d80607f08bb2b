"""Disclosure control: hand-worked tables whose protected form is worked out in the comments.

Unless a test is about perturbation or rounding, tables are built with ``perturb = false``
so the released values are the exact ones and the suppression pattern can be read directly.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from linkage.config import load_config
from linkage.disclose.stage import ContributionError, Dimension, Measure, TableSpec, protect_table
from linkage.errors import ConfigError
from linkage.keys import load_master_key
from linkage.sdc.cells import record_keys
from linkage.sdc.perturb import count_noise, magnitude_d
from linkage.sdc.rules import quantile_window


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("HHLINK_KEY", "5e" * 32)
    return load_master_key()


def exact():
    return load_config(disclosure={"perturb": False})


def people(counts: dict[tuple, int], cols: tuple[str, ...], values: dict[tuple, list[float]] | None = None):
    """One row per person: ``counts[cell]`` persons in each leaf cell, with optional values."""
    rows = []
    for cell, n in counts.items():
        vals = (values or {}).get(cell, [1.0] * n)
        for i in range(n):
            rows.append({"person": f"{'-'.join(cell)}-{i}", **dict(zip(cols, cell)), "v": vals[i]})
    return pd.DataFrame(rows)


def status_of(table, measure: str) -> dict[tuple, str]:
    """Each cell's status, with the withheld cells' reason (kept in memory for the auditors only)."""
    frame = table.frame.assign(status=np.where(table.reasons != "", "suppressed_" + table.reasons,
                                               table.frame["status"]))
    dims = [c for c in frame.columns if c not in ("measure", "value", "status")]
    sub = frame[frame["measure"] == measure]
    return {tuple(r[:-1]): r[-1] for r in sub[dims + ["status"]].itertuples(index=False, name=None)}


def value_of(frame: pd.DataFrame, measure: str) -> dict[tuple, float]:
    dims = [c for c in frame.columns if c not in ("measure", "value", "status")]
    sub = frame[frame["measure"] == measure]
    return {tuple(r[:-1]): r[-1] for r in sub[dims + ["value"]].itertuples(index=False, name=None)}


REGION = Dimension("region", ("region",))


def test_one_dimension_threshold_and_complement(key):
    # A=3 B=17 C=25 D=40, Total=85. A < 10: primary. The equation Total = A+B+C+D has one
    # suppressed cell, so one more is needed: the smallest cell that can cover A's protection
    # range (5) is B (17). Then A + B = 85 - 25 - 40 = 20: A lies in [0, 20] (reaches 3+5 and 0)
    # but B in [0, 20] does not reach 17+5: every withheld cell needs its upper and lower
    # protection (the adversary cannot tell a primary from a secondary cell, so both must be
    # safe). The next complement is C (25): A+B+C = 45, each in [0, 45]. D and the total stay.
    df = people({("A",): 3, ("B",): 17, ("C",): 25, ("D",): 40}, ("region",))
    t = protect_table(df, TableSpec("t1", (REGION,), unit="person"), exact(), key=key)
    st = status_of(t, "persons")
    assert st == {("Total",): "published", ("A",): "suppressed_primary", ("B",): "suppressed_secondary",
                  ("C",): "suppressed_secondary", ("D",): "published"}
    assert set(t.frame["status"]) == {"published", "suppressed"}   # the reason is not published
    vals = value_of(t.frame, "persons")
    assert vals[("D",)] == 40 and vals[("Total",)] == 85
    assert np.isnan(vals[("A",)]) and np.isnan(vals[("B",)])
    assert t.report["rules_fired"]["threshold"] == 1
    assert t.report["suppressed_cells"] == {"primary": 1, "secondary": 2}
    assert "rules_fired" not in t.metadata["sdc"] and t.metadata["sdc"]["suppressed_cells"] == 3
    assert t.audit.protected


def test_two_way_table_rectangle(key):
    #         c1   c2   c3 | Total
    #   r1    20   30   25 |   75
    #   r2     4   40   16 |   60
    #   r3    15   22   18 |   55
    #   Total 39   92   59 |  190
    # (r2,c1)=4 is primary. Column c1 = r1+r2+r3 then holds one suppressed cell: the smallest
    # cell able to cover 5 there is (r3,c1)=15. Row r2 likewise: (r2,c3)=16. Column c3 now holds
    # one: (r3,c3)=18. Row r3 holds two, so the closure stops: a 2x2 rectangle. With
    # t = (r2,c1): (r2,c3) = 20-t, (r3,c1) = 19-t, (r3,c3) = 14+t, and t in [0, 19]: the primary
    # reaches 9 and 0, but (r3,c1)=15 cannot reach 20 and (r2,c3)=16 cannot reach 21 while
    # (r2,c2) is published (row r2 leaves 20 for c1 + c3). Every withheld cell needs both its
    # protections, so more cells join: the cheapest release (an LP over the table's equations)
    # withholds every interior cell but (r1,c2): row r1 leaves 45 for (r1,c1) + (r1,c3), and
    # every withheld cell can move 5 either way. Margins all published.
    counts = {("r1", "c1"): 20, ("r1", "c2"): 30, ("r1", "c3"): 25, ("r2", "c1"): 4, ("r2", "c2"): 40,
              ("r2", "c3"): 16, ("r3", "c1"): 15, ("r3", "c2"): 22, ("r3", "c3"): 18}
    df = people(counts, ("row", "col"))
    spec = TableSpec("t2", (Dimension("row", ("row",)), Dimension("col", ("col",))), unit="person")
    t = protect_table(df, spec, exact(), key=key)
    st = status_of(t, "persons")
    supp = {k: v for k, v in st.items() if v.startswith("suppressed")}
    assert supp == {k: "suppressed_primary" if k == ("r2", "c1") else "suppressed_secondary" for k in counts
                    if k != ("r1", "c2")}
    assert t.audit.protected
    vals = value_of(t.frame, "persons")
    assert vals[("Total", "Total")] == 190 and vals[("r2", "Total")] == 60 and vals[("Total", "c1")] == 39
    assert len(st) == 16   # 3x3 interior, 3+3 margins and the grand total


def test_hierarchy_la_within_region(key):
    # North: N1=12 N2=3 N3=20 (North 35); South: S1=30 S2=25 (South 55); Total 90.
    # N2 is primary; North = N1+N2+N3 needs a second suppression: N1 (12, the smallest >= 5).
    # N1 + N2 = 15, so N2 lies in [0, 15] and N1 in [0, 15], short of 12+5: N3 joins them,
    # N1+N2+N3 = 35, each in [0, 35]. The region rows and the total stay: the hierarchy's
    # equation Total = North + South has nothing suppressed.
    counts = {("North", "N1"): 12, ("North", "N2"): 3, ("North", "N3"): 20, ("South", "S1"): 30,
              ("South", "S2"): 25}
    df = people(counts, ("region", "la"))
    spec = TableSpec("t3", (Dimension("geography", ("region", "la")),), unit="person")
    t = protect_table(df, spec, exact(), key=key)
    st = status_of(t, "persons")
    assert {k: v for k, v in st.items() if v != "published"} == {
        ("North", "N2"): "suppressed_primary", ("North", "N1"): "suppressed_secondary",
        ("North", "N3"): "suppressed_secondary"}
    assert st[("North", "Total")] == "published" and st[("Total", "Total")] == "published"
    assert value_of(t.frame, "persons")[("North", "Total")] == 35


def test_small_region_protected_through_the_regions_equation(key):
    # East: E1=4 E2=3 (East 7); West: W1=30 W2=40 (70); North: N1=25 N2=20 (45); Total 122.
    # E1, E2 and East are all primary. East = E1+E2 is fully suppressed, but Total =
    # East+West+North holds one suppressed cell: the cheapest region able to cover East's 5 is
    # North (45 < 70). North = N1+N2 then holds one: N2 (20 < 25). Check: East + North = 52 and
    # North = 25 + N2 >= 25, so East lies in [0, 27]; E1, E2 in [0, 27]; North in [25, 52].
    counts = {("East", "E1"): 4, ("East", "E2"): 3, ("West", "W1"): 30, ("West", "W2"): 40,
              ("North", "N1"): 25, ("North", "N2"): 20}
    df = people(counts, ("region", "la"))
    spec = TableSpec("t4", (Dimension("geography", ("region", "la")),), unit="person")
    t = protect_table(df, spec, exact(), key=key)
    st = status_of(t, "persons")
    assert {k: v for k, v in st.items() if v != "published"} == {
        ("East", "E1"): "suppressed_primary", ("East", "E2"): "suppressed_primary",
        ("East", "Total"): "suppressed_primary", ("North", "Total"): "suppressed_secondary",
        ("North", "N2"): "suppressed_secondary"}


def test_dominance_and_p_percent(key):
    # A: 10 people at 20,000 and two at 1,000,000: the top two hold 2.0M of 2.2M = 90.9% > 90%,
    #    so (2, 90%) dominance fires; p%: 2.2M - 1M - 1M = 200k >= 10% of 1M, so p% does not.
    # B: 12 people at 30,000: passes.
    # C: 14 at 25,000 and one at 400,000: top two 425k of 750k = 57%; p%: 325k >= 40k: passes.
    # D: 11 at 10,000 and one at 2,000,000: top two 2.01M of 2.11M = 95%: dominance; p%:
    #    2.11M - 2M - 10k = 100k < 200k: p% fires too.
    # A and D are primary; Total = A+B+C+D then holds two suppressed cells, and the audit finds
    # D's pay protected (A+D = 4.31M, so D in [0, 4.31M]) and A's too: nothing more is needed.
    vals = {("A",): [20_000.0] * 10 + [1e6, 1e6], ("B",): [30_000.0] * 12,
            ("C",): [25_000.0] * 14 + [400_000.0], ("D",): [10_000.0] * 11 + [2e6]}
    df = people({k: len(v) for k, v in vals.items()}, ("region",), vals)
    spec = TableSpec("t5", (REGION,), (Measure("mean_pay", "mean", "v"), Measure("total_pay", "sum", "v")),
                     unit="person")
    t = protect_table(df, spec, exact(), key=key)
    st = status_of(t, "mean_pay")
    assert st == {("Total",): "published", ("A",): "suppressed_primary", ("B",): "published",
                  ("C",): "published", ("D",): "suppressed_primary"}
    fired = t.report["rules_fired"]
    assert fired["dominance"] == 2 and fired["p_percent"] == 1
    v = value_of(t.frame, "mean_pay")
    assert v[("C",)] == pytest.approx(750_000 / 15)
    assert v[("Total",)] == pytest.approx(sum(sum(x) for x in vals.values()) / 51, rel=1e-9)
    assert value_of(t.frame, "total_pay")[("B",)] == 360_000
    assert status_of(t, "persons")[("A",)] == "suppressed_primary"   # one pattern per table


def test_median_is_never_one_persons_value(key):
    # Region A holds 1..11: the 5 values around the median (4..8) average 6, which is person
    # 6's own value, so the window widens to 6 values, 4..9, whose mean is 6.5.
    # Region B holds twelve people at 7 and 8 (six each): rank round(0.5 * 11) = 6 (half up), the
    # window is ranks 4..8 = 7,7,8,8,8, whose mean 7.6 nobody holds.
    vals = {("A",): [float(i) for i in range(1, 12)], ("B",): [7.0] * 6 + [8.0] * 6}
    df = people({k: len(v) for k, v in vals.items()}, ("region",), vals)
    spec = TableSpec("t6", (REGION,), (Measure("median", "quantile", "v", q=0.5),), unit="person")
    t = protect_table(df, spec, exact(), key=key)
    v = value_of(t.frame, "median")
    assert v[("A",)] == 6.5
    assert v[("B",)] == pytest.approx(7.6)
    for cell, released in v.items():
        assert released not in set(df.loc[df["region"] == cell[0], "v"]) or cell == ("Total",)
    # directly: the window function on hand-made windows
    assert quantile_window(np.array([1.0, 2.0, 3.0, 4.0, 6.0]), 5, 0.5, 3, 5) == (3.75, 4.0)


def test_coefficients_need_residual_degrees_of_freedom(key):
    # y = 2x + 1 exactly. A has 11 people: 9 residual dof < 10, primary. B has 12: slope 2.
    # A is primary, so the margin equation needs a partner: B (12, the only other region).
    rows = []
    for region, n in (("A", 11), ("B", 12), ("C", 30)):
        rows += [{"person": f"{region}{i}", "region": region, "x": float(i), "y": 2.0 * i + 1} for i in range(n)]
    df = pd.DataFrame(rows)
    spec = TableSpec("t7", (REGION,), (Measure("slope", "slope", "y", x="x"),
                                       Measure("at_5", "predict", "y", x="x", at=5.0)), unit="person")
    t = protect_table(df, spec, exact(), key=key)
    st = status_of(t, "slope")
    assert st[("A",)] == "suppressed_primary" and st[("B",)] == "suppressed_secondary"
    assert value_of(t.frame, "slope")[("C",)] == 2.0 and value_of(t.frame, "at_5")[("C",)] == 11.0
    assert t.report["rules_fired"]["dof"] == 1


def test_proportion_numerator_and_complement(key):
    # A: 20 people, 9 with the attribute: the numerator 9 < 10, primary. B: 20 with 10: 0.5.
    # C: 25 with 25: everyone has it (zeros disclosive: a proportion of 1 is a group
    # disclosure), primary. D: 30 with 12: 0.4. Total: 95 with 56.
    # Numerators and complements add up like counts and are audited too. Complements: A 11,
    # C 0, so with A and C alone suppressed A's complement is at most 11 - no room above its
    # true value 11: a partner that can give 5 is needed, the smallest is B (complement 10).
    # Then A+B+C: counts 65, numerators 44, complements 21, and every interval is wide enough.
    flags = {("A",): [1.0] * 9 + [0.0] * 11, ("B",): [1.0] * 10 + [0.0] * 10, ("C",): [1.0] * 25,
             ("D",): [1.0] * 12 + [0.0] * 18}
    df = people({k: len(v) for k, v in flags.items()}, ("region",), flags)
    spec = TableSpec("t8", (REGION,), (Measure("share", "proportion", "v"),), unit="person")
    t = protect_table(df, spec, exact(), key=key)
    st, v = status_of(t, "share"), value_of(t.frame, "share")
    assert st[("A",)] == st[("C",)] == "suppressed_primary" and st[("B",)] == "suppressed_secondary"
    assert v[("D",)] == 0.4 and v[("Total",)] == round(56 / 95, 4)
    assert t.report["rules_fired"]["proportion"] == 2


def test_ten_five_rounding(key):
    # A=12 -> 10, B=13 -> 15, C=17 -> 15, D=18 -> 20, E=4 suppressed; Total 64 -> 65.
    # E needs a partner: the smallest region able to cover 5 is A (12); E+A = 16 leaves A short
    # of its upper protection (17), so B (13) joins: E+A+B = 29, each in [0, 29].
    df = people({("A",): 12, ("B",): 13, ("C",): 17, ("D",): 18, ("E",): 4}, ("region",))
    cfg = load_config(disclosure={"perturb": False, "rounding": "10-5"})
    t = protect_table(df, TableSpec("t9", (REGION,), unit="person"), cfg, key=key)
    v, st = value_of(t.frame, "persons"), status_of(t, "persons")
    assert (v[("C",)], v[("D",)], v[("Total",)]) == (15, 20, 65)
    assert st[("E",)] == "suppressed_primary" and st[("A",)] == st[("B",)] == "suppressed_secondary"
    assert st[("C",)] == "rounded"
    assert t.metadata["sdc"]["rounding"] == {"rule": "10-5", "base": 5}


def test_rounding_and_perturbation_cannot_be_combined():
    with pytest.raises(ConfigError, match="perturb"):
        load_config(disclosure={"rounding": "10-5", "perturb": True})
    with pytest.raises(ConfigError, match="p_percent"):
        load_config(disclosure={"magnitude_levels": 5})


def test_perturbation_is_consistent_bounded_and_keyed(key, monkeypatch):
    rng = np.random.default_rng(3)
    counts = {(r,): int(n) for r, n in zip("ABCDEFGH", rng.integers(10, 60, 8))}
    df = people(counts, ("region",))
    spec = TableSpec("t10", (REGION,), unit="person")
    cfg = load_config()
    a = protect_table(df, spec, cfg, key=key)
    b = protect_table(df.sample(frac=1, random_state=1), spec, cfg, key=key)   # row order is irrelevant
    pd.testing.assert_frame_equal(a.frame, b.frame)
    v = value_of(a.frame, "persons")
    for cell, n in counts.items():
        assert abs(v[cell] - n) <= 2 and v[cell] >= 10
    assert set(a.frame["status"]) == {"perturbed"}
    monkeypatch.setenv("HHLINK_KEY", "77" * 32)
    c = protect_table(df, spec, cfg, key=load_master_key())
    assert not c.frame.equals(a.frame)   # 9 cells each keep their value with probability 0.5
    assert c.metadata["sdc"]["perturbation"]["key_fingerprint"] != a.metadata["sdc"]["perturbation"]["key_fingerprint"]


def test_count_ptable_lookup_and_truncation():
    cfg = load_config().disclosure
    # cumulative 0.05, 0.25, 0.75, 0.95, 1: keys pick -2, -1, 0, +1, +2
    keys = np.array([0.01, 0.1, 0.5, 0.8, 0.99])
    assert count_noise(np.full(5, 50), keys, cfg).tolist() == [-2, -1, 0, 1, 2]
    # n = 11 keeps |d| <= 1: probabilities 0.2, 0.5, 0.2 renormalised (cumulative 2/9, 7/9, 1)
    assert count_noise(np.full(3, 11), np.array([0.2, 0.5, 0.99]), cfg).tolist() == [-1, 0, 1]
    # at the threshold, and below it (suppressed anyway), no noise
    assert count_noise(np.array([10, 3]), np.array([0.99, 0.99]), cfg).tolist() == [0, 0]


def test_record_keys_move_the_magnitude_cell_key_by_at_least_one_bucket():
    keys = record_keys([f"p{i}" for i in range(2000)], b"k" * 32, margin=2**32 // 8)
    assert keys[:, 1].min() >= 2**32 // 8 and keys[:, 1].max() <= 2**32 - 2**32 // 8
    assert (record_keys(["p1"], b"k" * 32) == record_keys(["p1"], b"k" * 32)).all()
    assert (record_keys(["p1"], b"k" * 32) != record_keys(["p1"], b"j" * 32)).any()
    # removing any one unit from a cell changes the magnitude p-table draw
    rng = np.random.default_rng(0)
    for _ in range(200):
        members = keys[rng.choice(len(keys), size=15, replace=False), 1]
        full = int(members.sum() % 2**32)
        for r in members:
            assert magnitude_d(np.array([full]), 4)[0] != magnitude_d(np.array([(full - int(r)) % 2**32]), 4)[0]


def test_declared_categories_give_zero_cells(key):
    # LA "Z" has nobody: it is a zero cell, and zeros are disclosive by default. Region X then
    # holds X1=20 and Z=0 (suppressed): the partner is X1, and X1 + Z = 20 puts Z in [0, 20].
    df = people({("X", "X1"): 20, ("Y", "Y1"): 30}, ("region", "la"))
    geo = Dimension("geography", ("region", "la"), categories=(("X", "X1"), ("X", "Z"), ("Y", "Y1")))
    t = protect_table(df, TableSpec("t11", (geo,), unit="person"), exact(), key=key)
    st = status_of(t, "persons")
    assert st[("X", "Z")] == "suppressed_primary" and st[("X", "X1")] == "suppressed_secondary"
    # the empty cell is withheld, but no count of empty cells is reported anywhere
    assert "zero" not in t.report["rules_fired"] and t.report["rules_fired"]["threshold"] == 0
    safe = protect_table(df, TableSpec("t11", (geo,), unit="person"),
                         load_config(disclosure={"perturb": False, "zeros_disclosive": False}), key=key)
    assert status_of(safe, "persons")[("X", "Z")] == "published"


def test_suppressed_values_are_never_written(key, tmp_path):
    # A (4 people) is primary; its partner is C (25 < 30), but A+C = 29 leaves C short of 25+5,
    # so B joins: every cell's count and mean are withheld, only the total is published.
    vals = {("A",): [1000.0 + i for i in range(4)], ("B",): [2000.0 + 7 * i for i in range(30)],
            ("C",): [3000.0 + 3 * i for i in range(25)]}
    df = people({k: len(v) for k, v in vals.items()}, ("region",), vals)
    spec = TableSpec("t12", (REGION,), (Measure("mean_v", "mean", "v"),), unit="person", title="t")
    t = protect_table(df, spec, exact(), key=key)
    t.write(tmp_path)
    csv = pd.read_csv(tmp_path / "t12.csv", keep_default_na=False)
    pq = pd.read_parquet(tmp_path / "t12.parquet")
    hidden = csv["status"].str.startswith("suppressed")
    assert set(csv.loc[hidden, "region"]) == {"A", "B", "C"}
    assert hidden.sum() == 6 and (csv.loc[hidden, "value"] == "").all()
    assert pq.loc[pq["status"].str.startswith("suppressed"), "value"].isna().all()
    # the true suppressed values appear in no output file
    secrets = {"1001.5", "4006", "3036", "25,", ",4,"}   # A's and C's means, A's total, the counts
    for path in tmp_path.iterdir():
        text = path.read_text(errors="replace") if path.suffix != ".parquet" else ""
        for s in secrets:
            assert s not in text, (path.name, s)
    meta = json.loads((tmp_path / "t12.json").read_text())
    assert meta["sdc"]["threshold"]["min_units"] == 10
    assert {c["name"] for c in meta["columns"]} == {"region", "measure", "value", "status"}


def test_contributions_are_validated(key):
    df = people({("A",): 12}, ("region",))
    spec = TableSpec("t13", (REGION,), unit="person")
    with pytest.raises(ContributionError, match="one row per unit"):
        protect_table(pd.concat([df, df.head(1)]), spec, exact(), key=key)
    with pytest.raises(ContributionError, match="reserved"):
        protect_table(df.assign(region="Total"), spec, exact(), key=key)
    with pytest.raises(ContributionError, match="lack column"):
        protect_table(df.drop(columns="region"), spec, exact(), key=key)
    with pytest.raises(ContributionError, match="no value"):
        bad = df.assign(v=[np.nan] + [1.0] * 11)
        protect_table(bad, TableSpec("t13", (REGION,), (Measure("m", "mean", "v"),), unit="person"), exact(), key=key)


def test_duckdb_relation_and_sql_inputs_match_pandas(key):
    import duckdb

    df = people({("A",): 12, ("B",): 3, ("C",): 30}, ("region",))
    spec = TableSpec("t14", (REGION,), unit="person")
    con = duckdb.connect()
    con.register("src", df)
    from_pandas = protect_table(df, spec, load_config(), key=key).frame
    from_rel = protect_table(con.sql("select * from src"), spec, load_config(), key=key, con=con).frame
    from_sql = protect_table("select * from src", spec, load_config(), key=key, con=con).frame
    pd.testing.assert_frame_equal(from_pandas, from_rel)
    pd.testing.assert_frame_equal(from_pandas, from_sql)


def test_whole_table_is_suppressed_when_secondary_suppression_gives_up(key):
    # the proportion table above needs a second round (B is added after the first audit);
    # allowed one round only, the engine withholds every cell rather than release an unsafe one
    flags = {("A",): [1.0] * 9 + [0.0] * 11, ("B",): [1.0] * 10 + [0.0] * 10, ("C",): [1.0] * 25,
             ("D",): [1.0] * 12 + [0.0] * 18}
    df = people({k: len(v) for k, v in flags.items()}, ("region",), flags)
    spec = TableSpec("t15", (REGION,), (Measure("share", "proportion", "v"),), unit="person")
    t = protect_table(df, spec, load_config(disclosure={"perturb": False, "lp_max_rounds": 1}), key=key)
    assert t.frame["status"].str.startswith("suppressed").all() and t.frame["value"].isna().all()
    assert t.metadata["sdc"]["lp_audit"]["whole_table_suppressed"]


def test_coefficients_carry_bootstrap_intervals_and_reliability(key):
    # Region A: y = 2x + small noise (60 people): a narrow interval around 2, reliable.
    # Region B: y unrelated to x (60 people): the slope's interval is wide, so the estimate
    # and its bounds are marked low_reliability (with ci_max_width 0.4 for this measure).
    rng = np.random.default_rng(3)
    rows = []
    for region, slope, noise in (("A", 2.0, 0.05), ("B", 0.0, 20.0)):
        x = rng.uniform(0, 1, 60)
        y = slope * x + rng.normal(0, noise, 60)
        rows += [{"person": f"{region}{i}", "region": region, "x": x[i], "y": y[i]} for i in range(60)]
    df = pd.DataFrame(rows)
    spec = TableSpec("ci", (REGION,), (Measure("b", "slope", "y", x="x"),), unit="person")
    cfg = load_config(disclosure={"perturb": False, "ci_max_width": {"b": 0.4}, "ci_replicates": 200})
    t = protect_table(df, spec, cfg, key=key)
    v, st = value_of(t.frame, "b"), status_of(t, "b")
    lo, hi = value_of(t.frame, "b_ci_lower"), value_of(t.frame, "b_ci_upper")
    assert lo[("A",)] < v[("A",)] < hi[("A",)] and hi[("A",)] - lo[("A",)] < 0.4 and abs(v[("A",)] - 2) < 0.1
    assert st[("A",)] == "published" and status_of(t, "b_ci_lower")[("A",)] == "published"
    assert hi[("B",)] - lo[("B",)] > 0.4 and st[("B",)] == "low_reliability"
    assert t.metadata["sdc"]["uncertainty"]["replicates"] == 200
    # the same units give the same replicates: a shuffled input gives the same bounds
    again = protect_table(df.sample(frac=1.0, random_state=1), spec, cfg, key=key)
    assert value_of(again.frame, "b_ci_lower") == lo
    # withheld instead of marked when configured
    strict = protect_table(df, spec, load_config(disclosure={"perturb": False, "ci_max_width": {"b": 0.4},
                                                              "ci_action": "suppress"}), key=key)
    assert status_of(strict, "b")[("B",)] == "suppressed" and np.isnan(value_of(strict.frame, "b")[("B",)])


def test_tables_sharing_cells_get_one_pattern_and_one_audit(key):
    # Table X: persons by region (A=3 B=17 C=25 D=40). Table Y: by region x sex over the same
    # people, so Y's region totals (sex = Total) are X's cells: one cell each in the joint audit.
    # Alone, X would withhold A, B and C (see the first test) and publish D = 40; Y must then
    # withhold the same region totals, and a region total withheld in one is withheld in both.
    from linkage.disclose.stage import protect_tables

    counts = {("A", "F"): 1, ("A", "M"): 2, ("B", "F"): 8, ("B", "M"): 9, ("C", "F"): 12, ("C", "M"): 13,
              ("D", "F"): 20, ("D", "M"): 20}
    df = people(counts, ("region", "sex"))
    x = TableSpec("x", (REGION,), unit="person")
    y = TableSpec("y", (REGION, Dimension("sex", ("sex",))), unit="person")
    tx, ty = protect_tables([(df, x), (df, y)], exact(), key=key)
    sx, sy = status_of(tx, "persons"), status_of(ty, "persons")
    for region in ("Total", "A", "B", "C", "D"):
        assert (sx[(region,)] == "published") == (sy[(region, "Total")] == "published"), region
    assert tx.audit.protected and tx.audit.joint_with == ("x", "y")
    assert sx[("A",)] == "suppressed_primary" and sy[("A", "F")] == "suppressed_primary"


def test_merge_cells_needs_the_same_label_and_units():
    from linkage.sdc.lp import merge_cells

    a = np.array([[5, 1, 2], [5, 1, 2], [0, 0, 0]])
    b = np.array([[5, 1, 2], [0, 0, 0]])
    maps, n = merge_cells([a, b], [np.array(["la=1", "la=1|x=y", ""]), np.array(["la=1", ""])])
    # a's two cells hold the same units under different labels: distinct; b's first is a's first
    assert maps[0].tolist() == [0, 1, 2] and maps[1].tolist() == [0, 3] and n == 4


def test_ledger_keeps_releases_and_couples_through_withheld_cells(tmp_path):
    # one: T = a + b (a, b withheld); two: U = a + c (a, c withheld); three: V = c + d, all
    # published (so c is known); four: W = c + e (c, e withheld); five shares nothing.
    # A new table holding b and T reaches one's group {a, b} through b, and two's {a, c}
    # through a, but not four through c (known: three published it), nor three (T and V are
    # published cells: fixed values, no coupling) or five.
    from scipy import sparse

    from linkage.sdc import ledger
    from linkage.sdc.lp import Block

    cells = {"T": [30, 1, 1], "a": [10, 2, 2], "b": [20, 3, 3], "U": [25, 4, 4], "c": [15, 5, 5], "V": [40, 6, 6],
             "d": [25, 7, 7], "W": [50, 8, 8], "e": [35, 9, 9], "X": [12, 10, 10], "f": [12, 11, 11]}

    def block(name, names, hidden=()):
        ident = np.array([cells[n] for n in names])
        A = sparse.csr_matrix(np.array([[1.0] + [-1.0] * (len(names) - 1)]))
        sys_ = {"count": (ident[:, 0].astype(float), 0.0, np.full(len(names), 5.0))}
        return Block(name, A, ident, np.zeros(len(names), np.int64), np.isin(names, hidden), sys_,
                     labels=np.array(names, dtype=object))

    rel = [block("one", ["T", "a", "b"], ["a", "b"]), block("two", ["U", "a", "c"], ["a", "c"]),
           block("three", ["V", "c", "d"]), block("four", ["W", "c", "e"], ["c", "e"]), block("five", ["X", "f"])]
    with ledger.locked(tmp_path) as d:
        ledger.record(d, rel, [b.primary for b in rel], reset=True)
        got = ledger.releases(d)
        assert [b.name for b in got] == ["one", "two", "three", "four", "five"]
        assert got[1].primary.tolist() == [False, True, True] and got[1].released
        cells["g"] = [10, 12, 12]
        new = block("new", ["T", "b", "g"])
        earlier, known = ledger.coupled(new, d)
    assert [b.name for b in earlier] == ["one", "two"]
    assert known.tolist() == [True, False, False]               # T was published by one
    assert earlier[1].known.tolist() == [True, False, True]     # U by two itself, c by three
    assert all(b.released for b in earlier)




def test_record_keys_remembered_between_requests_are_the_same_keys():
    # the builder keeps the last secret's record keys in memory: any order, any subset, new
    # units added, and another secret never served from the memory of the first
    from linkage.sdc.cells import _known_record_keys, record_keys

    units = [f"u{i}" for i in range(50)]
    full = record_keys(units, b"s" * 32, 7)
    assert (_known_record_keys(units, b"s" * 32, 7) == full).all()
    assert (_known_record_keys(units[::-3], b"s" * 32, 7) == full[::-3]).all()
    more = _known_record_keys(["new", *units[:2]], b"s" * 32, 7)
    assert (more[0] == record_keys(["new"], b"s" * 32, 7)[0]).all() and (more[1:] == full[:2]).all()
    assert (_known_record_keys(units, b"t" * 32, 7) == record_keys(units, b"t" * 32, 7)).all()
    assert not (_known_record_keys(units, b"t" * 32, 7) == full).all()


def test_a_reports_sample_size_is_the_count_the_engine_publishes_for_the_same_people(key):
    # reports/mobility.json's n (linkage.assemble.mobility.public_n): the oracle is the engine's
    # own perturbed total over the same people; under the threshold there is no n at all
    from linkage.assemble.mobility import public_n
    from linkage.disclose.stage import record_key_secret

    cfg = load_config()
    secret = record_key_secret(key)
    for size in (57, 123, 1000):
        df = people({("X",): size // 2, ("Y",): size - size // 2}, ("region",))
        ids = ["nobody", *df["person"], None]
        t = protect_table(df, TableSpec("n", (Dimension("region", ("region",)),), unit="person"), cfg, key=key)
        total = t.frame.loc[t.frame["region"] == "Total", "value"].iloc[0]
        got = public_n({"m": np.arange(1, size + 1), "few": np.array([1, 2]), "unkeyed": np.array([1, size + 1])},
                       ids, secret, cfg.disclosure)
        assert got == {"m": int(total), "few": None, "unkeyed": None}
        assert abs(got["m"] - size) <= 2
