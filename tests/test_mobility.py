"""Hand-worked cases for each mobility measure, the bootstrap, and the research-table SQL."""

from __future__ import annotations

import datetime as dt
import math

import duckdb
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linkage.assemble import sql
from linkage.assemble import mobility
from linkage.config import load_config

# -- the measures on tiny tables ---------------------------------------------------------


def test_percentile_ranks_use_mid_ranks_within_groups():
    assert mobility.percentile_ranks(np.array([10.0, 20, 20, 40])).tolist() == [12.5, 50.0, 50.0, 87.5]
    # two cohorts: (5, 1) in one, (7) alone in the other
    ranks = mobility.percentile_ranks(np.array([5.0, 1.0, 7.0]), np.array([1990, 1990, 1991]))
    assert ranks.tolist() == [75.0, 25.0, 50.0]


def test_ige_is_the_within_cohort_slope():
    # cohort 1990: x = 1, 3; y = 10, 12   -> deviations x (-1, 1), y (-1, 1)
    # cohort 1991: x = 5, 7, 9; y = 0, 3, 0 -> deviations x (-2, 0, 2), y (-1, 2, -1)
    # sum dx*dy = 2 + (2 + 0 - 2) = 2; sum dx^2 = 2 + 8 = 10; slope 0.2
    x = np.log(np.exp([1.0, 3, 5, 7, 9]))
    y = np.array([10.0, 12, 0, 3, 0])
    cohort = np.array([1990, 1990, 1991, 1991, 1991])
    assert mobility.ige(x, y, cohort) == pytest.approx(0.2)
    # pooled over cohorts the slope would be negative: the cohort intercepts matter
    assert np.polyfit(x, y, 1)[0] < 0


def test_rank_slope_and_absolute_upward_mobility():
    # p deviations (-40, -20, 0, 20, 40), c deviations (-30, -10, -10, 10, 40):
    # slope 3200 / 4000 = 0.8, intercept 50 - 0.8 * 50 = 10, AUM 10 + 25 * 0.8 = 30
    parent = np.array([10.0, 30, 50, 70, 90])
    child = np.array([20.0, 40, 40, 60, 90])
    slope, intercept = mobility.rank_regression(parent, child)
    assert (slope, intercept) == (pytest.approx(0.8), pytest.approx(10.0))
    assert mobility.absolute_upward_mobility(parent, child) == pytest.approx(30.0)


def test_quintile_transition_matrix_and_bottom_to_top():
    parent = np.array([5.0, 15, 25, 35, 45, 65, 75, 85, 95, 100])
    child = np.array([95.0, 10, 30, 85, 50, 70, 20, 90, 99, 0])
    assert mobility.quintile(np.array([0.0, 19.9, 20, 99.9, 100])).tolist() == [1, 1, 2, 5, 5]
    m = mobility.transition_matrix(parent, child)
    assert m[0].tolist() == [0.5, 0, 0, 0, 0.5]          # (5 -> 95), (15 -> 10)
    assert m[1].tolist() == [0, 0.5, 0, 0, 0.5]          # (25 -> 30), (35 -> 85)
    assert m[2].tolist() == [0, 0, 1, 0, 0]
    assert m[3].tolist() == [0, 0.5, 0, 0.5, 0]          # (65 -> 70), (75 -> 20)
    assert m[4].tolist() == pytest.approx([1 / 3, 0, 0, 0, 2 / 3])
    assert mobility.bottom_to_top(parent, child) == 0.5


def test_attainment_gap():
    # not disadvantaged: 110, 105 -> 107.5; disadvantaged: 100, 90, 95 -> 95; gap 12.5
    assert mobility.attainment_gap(np.array([100.0, 110, 90, 95, 105]),
                                   np.array([1, 0, 1, 1, 0])) == pytest.approx(12.5)


def _cohort(n: int, seed: int, slope: float = 0.4) -> dict:
    rng = np.random.default_rng(seed)
    by = rng.integers(1985, 1990, n).astype(float)
    lp = rng.normal(10, 0.6, n) + (by - 1985) * 0.05
    la = 9.5 + slope * (lp - 10) + rng.normal(0, 0.5, n) + (by - 1985) * 0.1
    fsm_share = np.clip(rng.normal(0.2, 0.3, n), 0, 1)
    return {
        "birth_year": by, "log_parents_earnings": lp, "log_adult_pay": la, "parents_earnings": np.exp(lp),
        "adult_pay": np.exp(la), "ever_fsm": (fsm_share > 0).astype(float),
        "persistent_fsm": (fsm_share >= 0.8).astype(float),
        "household_income_percentile": mobility.percentile_ranks(lp, by),
        "parents_earnings_percentile": mobility.percentile_ranks(lp, by),
        "longest_spell_months": np.where(fsm_share > 0.5, 30.0, 0.0),
        "ks2_score": np.round(104 + 3 * (lp - 10) + rng.normal(0, 4, n)),
        "ks4_att8": 46 + 6 * (lp - 10) + rng.normal(0, 8, n),
        "region_at_16": np.array(["E12000001", "E12000002"] * (n // 2) + ["E12000001"] * (n % 2), dtype=object),
        "la_at_16": np.array(["E06000001"] * n, dtype=object),
    }


def test_bootstrap_point_estimates_equal_the_direct_measures():
    d = mobility.prepare(_cohort(300, 1))
    measures, transitions = mobility.bootstrap_measures(d, replicates=20, seed=3, min_n=5)
    nat = {m["measure"]: m for m in measures if m["group_type"] == "national"}
    c = _cohort(300, 1)
    assert nat["ige"]["estimate"] == pytest.approx(mobility.ige(c["log_parents_earnings"], c["log_adult_pay"],
                                                                c["birth_year"]))
    pr = mobility.percentile_ranks(c["parents_earnings"], c["birth_year"])
    cr = mobility.percentile_ranks(c["adult_pay"], c["birth_year"])
    slope, intercept = mobility.rank_regression(pr, cr)
    assert nat["rank_slope"]["estimate"] == pytest.approx(slope)
    assert nat["absolute_upward_mobility"]["estimate"] == pytest.approx(intercept + 25 * slope)
    assert nat["bottom_to_top"]["estimate"] == pytest.approx(mobility.bottom_to_top(pr, cr))
    fsm = c["ever_fsm"] > 0
    assert nat["attainment_gap_ks4_att8_ever_fsm"]["estimate"] == pytest.approx(
        mobility.attainment_gap(c["ks4_att8"], fsm))
    # per region: the within-cohort slope of that region's children
    north = c["region_at_16"] == "E12000001"
    reg = next(m for m in measures if m["group_type"] == "region" and m["group_value"] == "E12000001"
               and m["measure"] == "ige")
    assert reg["estimate"] == pytest.approx(mobility.ige(c["log_parents_earnings"][north],
                                                         c["log_adult_pay"][north], c["birth_year"][north]))
    assert reg["n"] == int(north.sum())
    # transition rows sum to one and match the direct matrix
    nat_cells = {(t["parent_quintile"], t["child_quintile"]): t["share"] for t in transitions
                 if t["group_type"] == "national"}
    direct = mobility.transition_matrix(pr, cr)
    for (i, j), share in nat_cells.items():
        assert share == pytest.approx(direct[i - 1, j - 1])
    # every cohort has its own row
    assert {m["group_value"] for m in measures if m["group_type"] == "birth_cohort"} == {
        str(y) for y in range(1985, 1990)}


def test_bootstrap_is_seeded_and_its_interval_matches_the_analytic_standard_error():
    c = _cohort(2000, 7, slope=0.5)
    d = mobility.prepare(c)
    a = mobility.bootstrap_measures(d, replicates=300, seed=11, min_n=5)[0]
    b = mobility.bootstrap_measures(d, replicates=300, seed=11, min_n=5)[0]
    other = mobility.bootstrap_measures(d, replicates=300, seed=12, min_n=5)[0]
    assert a == b
    ige_a = next(m for m in a if m["group_type"] == "national" and m["measure"] == "ige")
    ige_o = next(m for m in other if m["group_type"] == "national" and m["measure"] == "ige")
    assert ige_a["ci_low"] != ige_o["ci_low"]
    assert ige_a["ci_low"] < ige_a["estimate"] < ige_a["ci_high"]
    # OLS standard error of the within-cohort slope, from the residuals
    x, y = d["x"], d["y"]
    slope = ige_a["estimate"]
    resid = y - slope * x
    se = math.sqrt(resid @ resid / (len(x) - 2 - 5) / (x @ x))
    width = ige_a["ci_high"] - ige_a["ci_low"]
    assert width == pytest.approx(2 * 1.96 * se, rel=0.25)


def test_small_groups_get_no_estimate_but_keep_their_count():
    d = mobility.prepare(_cohort(60, 2))
    measures, _ = mobility.bootstrap_measures(d, replicates=10, seed=1, min_n=25)
    by_cohort = [m for m in measures if m["group_type"] == "birth_cohort" and m["measure"] == "ige"]
    assert all(m["estimate"] is None and m["ci_low"] is None and 0 < m["n"] < 25 for m in by_cohort)
    national = next(m for m in measures if m["group_type"] == "national" and m["measure"] == "ige")
    assert national["estimate"] is not None and national["n"] == 60


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=30), st.lists(st.integers(0, 2), min_size=30, max_size=30))
def test_percentile_ranks_match_a_brute_force_oracle(values, groups):
    v = np.array(values, dtype=float)
    g = np.array(groups[:len(values)])
    got = mobility.percentile_ranks(v, g)
    for i in range(len(v)):
        same = v[g == g[i]]
        below, ties = (same < v[i]).sum(), (same == v[i]).sum()
        assert got[i] == pytest.approx(100 * (below + (ties + 1) / 2 - 0.5) / len(same))


# -- the research-table SQL on one hand-built family ---------------------------------------

LOOKUP = [("E06000001", "E12000001"), ("E06000002", "E12000002")]


def _family_con(households, cfg=None):
    """Mum (born 1970), dad (1968) and kid (1990): records, payloads and links built by hand."""
    con = duckdb.connect()
    recs, edu, ben, ern = [], [], [], []

    def rec(token, who, source, year, born, claim=None, role=None):
        recs.append((token, f"u-{who}", source, year, born, claim, role, who))

    for year, fsm, la, ks2, ks4 in ((2000, 1, "E06000001", None, None), (2001, 1, "E06000001", 105, None),
                                    (2002, 0, "E06000001", None, None), (2003, 1, "E06000001", None, None),
                                    (2004, 1, "E06000002", None, 50.0)):
        rec(f"e{year}", "kid", "education", year, 1990)
        edu.append((f"e{year}", "WBRI", la, year - 1995, fsm, "N", ks2, ks4))
    # the kid is a dependant on three income-related claims: two 20 days apart (one spell), then one more
    for token, claim, btype, start, end in (("b1", "C1", "JSA", "2000-01-01", "2000-06-30"),
                                            ("b2", "C2", "UC", "2000-07-20", "2001-03-31"),
                                            ("b3", "C3", "IS", "2003-01-01", "2003-12-31")):
        rec(token, "kid", "benefits", int(start[:4]), 1990, claim, "dependant")
        ben.append((token, claim, "dependant", btype, dt.date.fromisoformat(start), dt.date.fromisoformat(end)))
    # the mum claims Child Benefit in 2002 (her only record that year)
    rec("b4", "mum", "benefits", 2002, 1970, "C4", "claimant")
    ben.append(("b4", "C4", "claimant", "CB", dt.date(2002, 1, 1), dt.date(2002, 12, 31)))
    pay = {("mum", 2000): [("emp1", 10000.0)], ("mum", 2001): [("emp1", 12000.0)],
           ("dad", 2000): [("emp2", 20000.0)], ("dad", 2001): [("emp2", 22000.0)], ("dad", 2002): [("emp2", 30000.0)],
           # kid at 25: two jobs and one row delivered twice; at 26 one job; at 17 one job
           ("kid", 2015): [("emp3", 15000.0), ("emp3", 15000.0), ("emp4", 5000.0)], ("kid", 2016): [("emp3", 24000.0)],
           ("kid", 2007): [("emp5", 3000.0)]}
    for (who, year), jobs in pay.items():
        for i, (emp, amount) in enumerate(jobs):
            token = f"p-{who}-{year}-{i}"
            rec(token, who, "earnings", year, {"mum": 1970, "dad": 1968, "kid": 1990}[who])
            ern.append((token, emp, amount))
    con.execute("""create table recs (record_token varchar, unique_id varchar, source varchar, year int,
                   birth_year int, claim_tok varchar, bu_role varchar, base_key varchar)""")
    con.executemany("insert into recs values (?, ?, ?, ?, ?, ?, ?, ?)", recs)
    con.execute("""create table payload_education (record_token varchar, ethnicity varchar, la_code varchar,
                   year_group bigint, fsm bigint, sen varchar, ks2_score bigint, ks4_att8 double)""")
    con.executemany("insert into payload_education values (?, ?, ?, ?, ?, ?, ?, ?)", edu)
    con.execute("""create table payload_benefits (record_token varchar, claim_tok varchar, role varchar,
                   benefit_type varchar, start_date date, end_date date)""")
    con.executemany("insert into payload_benefits values (?, ?, ?, ?, ?, ?)", ben)
    con.execute("create table payload_earnings (record_token varchar, employer_tok varchar, pay double)")
    con.executemany("insert into payload_earnings values (?, ?, ?)", ern)
    con.execute("create table unique_sex as select * from (values ('u-mum', 'F'), ('u-dad', 'M'), ('u-kid', 'F')) "
                "t(unique_id, sex)")
    con.execute("create table la_region (la_code varchar, region_code varchar)")
    con.executemany("insert into la_region values (?, ?)", LOOKUP)
    con.execute("create table households (person_key varchar, year int, birth_year int, household_key varchar)")
    con.executemany("insert into households values (?, ?, ?, ?)", households)
    con.execute("""create table parent_child as select * from
                   (values ('mum', 'kid', 0.9, 2, 3, 20), ('dad', 'kid', 0.8, 0, 2, 22))
                   t(parent_key, child_key, confidence, bu_years, coresident_years, age_gap)""")
    con.execute(sql.inputs_sql())
    con.execute("create view id_person as select unique_id, base_key person_key from id_base")
    cfg = cfg or load_config(assemble={"childhood_ages": [10, 12], "adult_pay_ages": [25, 26], "neet_ages": [16, 18]})
    a = cfg.assemble
    for step in (sql.person_sql(), sql.pay_sql(), sql.education_sql(), sql.claims_sql(), sql.person_year_sql(),
                 sql.household_year_sql(), sql.coresidence_sql(0.0), sql.childhood_sql(a.childhood_ages),
                 sql.adult_pay_sql(a.adult_pay_ages), sql.children_sql(0.0),
                 sql.cohort_sql(a.childhood_ages, a.neet_ages, a.persistent_fsm_share)):
        con.execute(step)
    return con


FAMILY_HOUSEHOLDS = [
    # 2000: all three together; 2001: the dad's records hold no address, so he is in no household;
    # 2002: together again (the mum's Child Benefit claim places her)
    ("mum", 2000, 1970, "H1"), ("dad", 2000, 1968, "H1"), ("kid", 2000, 1990, "H1"),
    ("mum", 2001, 1970, "H1"), ("kid", 2001, 1990, "H1"),
    ("mum", 2002, 1970, "H1"), ("dad", 2002, 1968, "H1"), ("kid", 2002, 1990, "H1"),
]


def _row(con, table, where):
    cur = con.execute(f"select * from {table} where {where}")
    names = [d[0] for d in cur.description]
    rows = cur.fetchall()
    assert len(rows) == 1, rows
    return dict(zip(names, rows[0]))


def test_cohort_row_hand_worked():
    con = _family_con(FAMILY_HOUSEHOLDS)
    kid = _row(con, "t_cohort", "child_key = 'kid'")
    # parental earnings at 10-12 (2000-2002): 10000 + 20000; 12000 + 22000 (the dad counts in 2001:
    # he lived with the kid in 2000 and 2002); 0 + 30000 (no PAYE record for the mum)
    assert kid["childhood_years"] == 3
    assert kid["parents_earnings"] == pytest.approx((30000 + 34000 + 30000) / 3)
    assert kid["log_parents_earnings"] == pytest.approx(math.log(94000 / 3))
    # equivalised: 2000 and 2002 two adults and a child under 14 (scale 1.8); 2001 the household
    # holds the mum and the kid (scale 1.3)
    assert kid["household_income"] == pytest.approx((30000 / 1.8 + 34000 / 1.3 + 30000 / 1.8) / 3)
    # adult pay at 25-26: 2015 counts the twice-delivered row once: 15000 + 5000; 2016: 24000
    assert kid["adult_pay"] == pytest.approx(22000.0)
    assert kid["adult_pay_years"] == 2
    # FSM in 4 of 5 school years: persistent at the 80% threshold
    assert (kid["school_years"], kid["fsm_years"], kid["fsm_share"]) == (5, 4, pytest.approx(0.8))
    assert kid["ever_fsm"] is True and kid["persistent_fsm"] is True
    # spells: 2000-01-01..2001-03-31 (456 days; the 20-day gap joins the claims) and 2003 (365 days)
    assert kid["benefit_spells"] == 2
    assert kid["longest_spell_months"] == pytest.approx(456 * 12 / 365.25)
    assert kid["benefit_months"] == pytest.approx((456 + 365) * 12 / 365.25)
    # NEET at 16-18 (2006-2008): PAYE only in 2007
    assert (kid["neet_years"], kid["neet_window_years"]) == (2, 3)
    assert (kid["ks2_score"], kid["ks4_att8"]) == (105, 50.0)
    # LA of the last pupil record at or before 16 (2004), its region, and that LA's FSM rate that year
    assert (kid["la_at_16"], kid["region_at_16"], kid["area_fsm_rate"]) == ("E06000002", "E12000002", 1.0)
    assert kid["parents"] == 2 and kid["sex"] == "F" and kid["birth_year"] == 1990
    # a cohort of one: every percentile is the middle
    assert kid["parents_earnings_percentile"] == kid["household_income_percentile"] == 50.0


def test_person_year_and_household_year_hand_worked():
    con = _family_con(FAMILY_HOUSEHOLDS)
    py = _row(con, "t_person_year", "person_key = 'kid' and year = 2000")
    # 2000 is a leap year: JSA 1 Jan - 30 Jun is 182 days, UC 20 Jul - 31 Dec 165 days
    assert py["income_benefit_months"] == pytest.approx((182 + 165) * 12 / 366)
    assert py["benefits"] == "JSA,UC"
    assert (py["education_stage"], py["year_group"], py["fsm"], py["age"]) == ("primary", 5, True, 10)
    assert py["household_key"] == "H1" and py["paye_pay"] == 0 and not py["employed"]
    kid25 = _row(con, "t_person_year", "person_key = 'kid' and year = 2015")
    assert (kid25["paye_pay"], kid25["employments"], kid25["employed"]) == (20000.0, 2, True)
    assert kid25["household_key"] is None
    hy = _row(con, "t_household_year", "household_key = 'H1' and year = 2000")
    assert (hy["members"], hy["adults"], hy["children"], hy["composition"]) == (3, 2, 1, "two adults with children")
    assert hy["paye_income"] == 30000.0 and hy["oecd_scale"] == pytest.approx(1.8)
    assert hy["equivalised_income"] == pytest.approx(30000 / 1.8)
    assert hy["income_benefit_months"] == pytest.approx((182 + 165) * 12 / 366)
    assert (hy["fsm"], hy["la_code"], hy["region_code"]) == (True, "E06000001", "E12000001")
    hy01 = _row(con, "t_household_year", "household_key = 'H1' and year = 2001")
    assert (hy01["composition"], hy01["oecd_scale"]) == ("one adult with children", pytest.approx(1.3))
    hy02 = _row(con, "t_household_year", "household_key = 'H1' and year = 2002")
    assert (hy02["paye_income"], hy02["child_benefit_months"], hy02["fsm"]) == (30000.0, 12.0, False)
    person = _row(con, "t_person", "person_key = 'kid'")
    assert (person["first_year"], person["last_year"], person["in_benefits"]) == (2000, 2016, True)


def test_coresidence_fills_between_and_beside_observed_years():
    """Parent P and child C (with a sibling S, so C's household is known) over 2000-2005."""
    con = duckdb.connect()
    con.execute("create table t_person as select * from (values ('C', 1995), ('P', 1970), ('S', 1997)) "
                "t(person_key, birth_year)")
    con.execute("create table data_window as select 2000 y0, 2005 y1")
    con.execute("create table parent_child as select 'P' parent_key, 'C' child_key, 0.9 confidence")
    rows = [("C", y, 1995, f"K{y}") for y in range(2000, 2006)] + [("S", y, 1997, f"K{y}") for y in range(2000, 2006)]
    # P: with C in 2000 and 2002; in another household in 2001 (an address slip) and 2005; unseen in 2003-04
    rows += [("P", 2000, 1970, "K2000"), ("P", 2001, 1970, "X2001"), ("P", 2002, 1970, "K2002"),
             ("P", 2005, 1970, "X2005")]
    con.execute("create table households (person_key varchar, year int, birth_year int, household_key varchar)")
    con.executemany("insert into households values (?, ?, ?, ?)", rows)
    con.execute(sql.coresidence_sql(0.0))
    got = dict(con.execute("select year, lived_with from t_status order by year").fetchall())
    # 2001 lies between years together; 2003 is nearer 2002 (together) than 2005 (apart); 2004 nearer 2005
    assert got == {2000: True, 2001: True, 2002: True, 2003: True, 2004: False, 2005: False}
