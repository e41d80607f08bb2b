"""Hand-worked cases for evaluation metrics and household assembly."""

from __future__ import annotations

import hashlib
import math

import duckdb
import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linkage.config import LinkConfig
from linkage.evaluate.stage import metrics_from_counts, pairwise_counts, person_metrics
from linkage.evaluate.stage import relation_evidence_sql
from linkage.link.households import BIRTH_PARTNER_WEIGHT, SPELL_WEIGHT, UNIT_WEIGHT
from linkage.link.households import assemble_households, confidence_distribution_sql


def _assign(con, rows):
    con.execute("create or replace table a (pred varchar, truth varchar)")
    con.executemany("insert into a values (?, ?)", rows)


def test_pairwise_metrics_hand_worked():
    con = duckdb.connect()
    # truth: {1,2,3} {4,5}; predicted: {1,2} {3,4,5}
    _assign(con, [("A", "x"), ("A", "x"), ("B", "x"), ("B", "y"), ("B", "y")])
    m = person_metrics(con, "a")
    # true pairs: 3 + 1 = 4; predicted pairs: 1 + 3 = 4; correct: (1,2) and (4,5) = 2
    assert m["pairwise_precision"] == pytest.approx(0.5)
    assert m["pairwise_recall"] == pytest.approx(0.5)
    # no predicted cluster equals a true person
    assert m["cluster_f1"] == 0.0


def test_perfect_linkage_scores_one_and_singletons_count_as_exact_clusters():
    con = duckdb.connect()
    _assign(con, [("A", "x"), ("A", "x"), ("B", "y"), ("C", "z")])
    m = person_metrics(con, "a")
    assert m == {"pairwise_precision": 1.0, "pairwise_recall": 1.0, "pairwise_f1": 1.0,
                 "cluster_precision": 1.0, "cluster_recall": 1.0, "cluster_f1": 1.0}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=40))
def test_pairwise_counts_match_a_brute_force_oracle(rows):
    con = duckdb.connect()
    _assign(con, [(str(p), str(t)) for p, t in rows])
    tp, pred, true, exact, n_pred, n_true = pairwise_counts(con, "a")
    pairs = [(i, j) for i in range(len(rows)) for j in range(i + 1, len(rows))]
    assert pred == sum(rows[i][0] == rows[j][0] for i, j in pairs)
    assert true == sum(rows[i][1] == rows[j][1] for i, j in pairs)
    assert tp == sum(rows[i][0] == rows[j][0] and rows[i][1] == rows[j][1] for i, j in pairs)
    members = {}
    for i, (p, t) in enumerate(rows):
        members.setdefault(("p", p), set()).add(i)
        members.setdefault(("t", t), set()).add(i)
    predicted = {frozenset(v) for k, v in members.items() if k[0] == "p"}
    truth = {frozenset(v) for k, v in members.items() if k[0] == "t"}
    assert (exact, n_pred, n_true) == (len(predicted & truth), len(predicted), len(truth))


def test_all_singletons_with_nothing_to_find_is_perfect():
    # no predicted and no true pairs: nothing was wrongly joined or missed
    assert metrics_from_counts(0, 0, 0, 3, 3, 3)["pairwise_f1"] == 1.0


RECORDS = [
    # token, person, year, birth_year, claim, role, postcode, address
    ("r1", "mum", 2010, 1980, "c1", "claimant", "PC1", b"\x0f"),
    ("r2", "dad", 2010, 1978, "c1", "partner", "PC1", b"\x0f"),
    ("r3", "kid", 2010, 2005, "c1", "dependant", "PC1", b"\x0f"),
    ("r4", "kid", 2011, 2005, None, None, "PC1", None),        # pupil record: postcode only
    ("r5", "mum", 2011, 1980, None, None, "PC1", b"\x0f"),      # payroll record at home
    ("r6", "dad", 2011, 1978, None, None, "PC9", b"\xf0"),      # dad has moved out
    ("r7", "lodger", 2011, 1990, None, None, "PC1", b"\x33"),   # same postcode, other address
]


def _records(con, rows):
    """``records_linked`` from (token, person, year, birth_year, claim, role, postcode, address[, unit]) rows."""
    con.execute("""create or replace table records_linked (record_token varchar, person_key varchar, year int,
                   birth_year int, claim_tok varchar, bu_role varchar, postcode_tok varchar, addr_bf blob,
                   benefit_unit_tok varchar)""")
    con.executemany("insert into records_linked values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(*r, None) if len(r) == 8 else r for r in rows])


def _households(con):
    _records(con, RECORDS)
    return assemble_households(con, LinkConfig())


def test_households_hand_worked():
    con = duckdb.connect()
    con.execute("SET lambda_syntax='ENABLE_SINGLE_ARROW'")
    facts = _households(con)
    hh = {(p, y): h for p, y, h in con.execute("select person_key, year, household_key from households").fetchall()}
    # 2010: one benefit unit = one household
    assert hh[("mum", 2010)] == hh[("dad", 2010)] == hh[("kid", 2010)]
    # 2011: dad has moved out (a full address seen once is a new home, not a typo); the lodger
    # lives at another address; two addresses at PC1, so the pupil's postcode alone cannot
    # place them, but they lived at one of them the year before: evidence across years
    assert hh[("dad", 2011)] != hh[("mum", 2011)]
    assert hh[("lodger", 2011)] != hh[("mum", 2011)]
    assert hh[("kid", 2011)] == hh[("mum", 2011)]
    # the key is a hash of the smallest member's person key
    assert hh[("mum", 2010)] == "H" + hashlib.md5(b"dad").hexdigest()[:16]
    pc = {(p, c): conf for p, c, conf in con.execute(
        "select parent_key, child_key, confidence from parent_child").fetchall()}
    assert set(pc) == {("mum", "kid"), ("dad", "kid")}
    # one year of benefit-unit evidence: 1 - exp(-1); with co-residence (under 18) that year: 1 - exp(-1.35)
    assert pc[("dad", "kid")] == pytest.approx(1 - 2.718281828 ** -1.35, abs=1e-3)
    assert facts["parent_child_relations"] == 2


def test_pupil_joins_the_only_address_at_its_postcode():
    con = duckdb.connect()
    con.execute("SET lambda_syntax='ENABLE_SINGLE_ARROW'")
    global RECORDS
    saved = RECORDS
    RECORDS = [r for r in saved if r[1] != "lodger"]
    try:
        _households(con)
    finally:
        RECORDS = saved
    hh = {(p, y): h for p, y, h in con.execute("select person_key, year, household_key from households").fetchall()}
    assert hh[("kid", 2011)] == hh[("mum", 2011)]


def test_households_are_connected_components_of_the_evidence():
    """Oracle: networkx connected components over the same edges."""
    con = duckdb.connect()
    con.execute("SET lambda_syntax='ENABLE_SINGLE_ARROW'")
    _households(con)
    name = {n: f"{p}:{y}" for n, p, y in con.execute("select node_id, person_key, year from py_nodes").fetchall()}
    g = nx.Graph()
    g.add_nodes_from(name.values())
    g.add_edges_from((name[a], name[b]) for a, b in con.execute("select node_id_l, node_id_r from hh_edges").fetchall())
    ours = {}
    for p, y, h in con.execute("select person_key, year, household_key from households").fetchall():
        ours.setdefault((h, y), set()).add(f"{p}:{y}")
    assert sorted(map(sorted, ours.values())) == sorted(map(sorted, nx.connected_components(g)))


def _run(records):
    """Households from (token, person, year, birth_year, claim, role, postcode, address) rows."""
    con = duckdb.connect()
    con.execute("SET lambda_syntax='ENABLE_SINGLE_ARROW'")
    _records(con, records)
    facts = assemble_households(con, LinkConfig())
    hh = {(p, y): h for p, y, h in con.execute("select person_key, year, household_key from households").fetchall()}
    return con, hh, facts


HOME, NEW = b"\x0f\x0f", b"\xf0\xf0"


def test_stale_address_after_a_move_is_replaced_by_the_new_one():
    # the family moves from PC1 to PC2 in 2011; dad's payroll record still shows PC1 that year
    rows = [(f"{p}{y}", p, y, b, None, None, pc, a)
            for p, b in (("mum", 1980), ("dad", 1978))
            for y, pc, a in ((2010, "PC1", HOME), (2011, "PC2", NEW), (2012, "PC2", NEW))]
    rows = [r if (r[1], r[2]) != ("dad", 2011) else (*r[:6], "PC1", HOME) for r in rows]
    con, hh, facts = _run(rows)
    assert hh[("dad", 2011)] == hh[("mum", 2011)]
    assert facts["address_evidence"]["stale"] == 1
    # without the partner already at the new address, a later move is just as likely: kept
    con, hh, facts = _run([r for r in rows if (r[1], r[2]) != ("mum", 2011)])
    assert "stale" not in facts["address_evidence"]


def test_a_split_household_is_not_mistaken_for_a_stale_address():
    # dad leaves in 2011 for PC9 and stays there; mum and the child stay at PC1
    rows = [(f"{p}{y}", p, y, b, None, None, "PC1", HOME) for p, b in (("mum", 1980), ("kid", 2005))
            for y in (2010, 2011, 2012)]
    rows += [("d10", "dad", 2010, 1978, None, None, "PC1", HOME),
             ("d11", "dad", 2011, 1978, None, None, "PC9", NEW), ("d12", "dad", 2012, 1978, None, None, "PC9", NEW)]
    _, hh, _ = _run(rows)
    assert hh[("dad", 2011)] != hh[("mum", 2011)] and hh[("dad", 2010)] == hh[("mum", 2010)]
    assert hh[("kid", 2012)] == hh[("mum", 2012)]


def test_mistyped_postcode_seen_once_is_filled_from_the_years_around_it():
    rows = [(f"{p}{y}", p, y, b, None, None, "PC1", HOME) for p, b in (("mum", 1980), ("dad", 1978))
            for y in (2010, 2011, 2012)]
    rows = [r if (r[1], r[2]) != ("dad", 2011) else (*r[:6], "PX1", HOME) for r in rows]
    con, hh, facts = _run(rows)
    assert hh[("dad", 2011)] == hh[("mum", 2011)]
    assert facts["address_evidence"]["inferred"] == 1
    # a missing address is filled the same way; a person-year with no evidence at all is still a node
    rows = [r if (r[1], r[2]) != ("dad", 2011) else (*r[:6], None, None) for r in rows]
    _, hh, _ = _run(rows + [("x", "solo", 2011, 1990, None, None, None, None)])
    assert hh[("dad", 2011)] == hh[("mum", 2011)] and ("solo", 2011) in hh


def test_address_lines_at_one_postcode_match_on_dice_not_equality():
    similar = bytes([0xff, 0xfe])   # Dice with mum's filter 2*15/(16+15) = 0.97; mum vs HOME 2*8/(16+8) = 0.67
    rows = [("a", "mum", 2010, 1980, None, None, "PC1", b"\xff\xff"), ("b", "dad", 2010, 1978, None, None, "PC1", similar),
            ("c", "lodger", 2010, 1990, None, None, "PC1", HOME)]
    _, hh, _ = _run(rows)
    assert hh[("mum", 2010)] == hh[("dad", 2010)] != hh[("lodger", 2010)]


def test_siblings_with_postcodes_only_share_a_household():
    rows = [("a", "k1", 2010, 2004, None, None, "PC1", None), ("b", "k2", 2010, 2006, None, None, "PC1", None),
            ("c", "k3", 2010, 2006, None, None, "PC2", None)]
    _, hh, _ = _run(rows)
    assert hh[("k1", 2010)] == hh[("k2", 2010)] != hh[("k3", 2010)]


def test_young_adult_living_with_a_parent_is_a_parent_child_relation_and_confidence_bands():
    rows = [(f"{p}{y}", p, y, b, None, None, "PC1", HOME) for p, b in (("mum", 1980), ("son", 2001), ("gran", 1930))
            for y in (2020, 2021)]
    con, _, _ = _run(rows)
    pc = {(p, c) for p, c in con.execute("select parent_key, child_key from parent_child").fetchall()}
    # son is 19-20: a child under 25 still at home; gran is 50 years older than mum (within 55)
    # but mum is 40, not a young adult
    assert pc == {("mum", "son")}
    conf = [r[0] for r in con.execute("select confidence from households").fetchall()]
    assert all(0 < c < 1 for c in conf)
    bands = con.execute(confidence_distribution_sql("households", "person_years")).fetchall()
    assert sum(n for _, n, _ in bands) == 6 and sum(s for _, _, s in bands) == pytest.approx(1.0)


def test_relation_evidence_ceiling_hand_worked():
    con = duckdb.connect()
    # true: household 1 = {1, 2, 3} in 2010; parent 1 of children 3, 4, 5 and 6; parent 7 of child 5
    con.execute("""create table rec_truth as select * from (values (1, 2010), (2, 2010), (3, 2010), (4, 2010),
                   (5, 2012), (6, 2013), (7, 2011)) t(truth_person, year)""")
    con.execute("""create table truth_py as select * from (values (1, 2010, 1), (2, 2010, 1), (3, 2010, 1), (4, 2010, 2),
                   (5, 2012, 3), (6, 2013, 4), (7, 2011, 5)) t(person_id, year, household_id)""")
    con.execute("create table truth_pc as select * from (values (1, 3), (1, 4), (1, 5), (1, 6), (7, 5)) t(parent_id, child_id)")
    con.execute("""create table truth_birth as select * from (values (1, 1980), (2, 1982), (3, 2005), (4, 2006),
                   (5, 2012), (6, 2013), (7, 2000)) t(person_id, birth_year)""")
    # 1 and 2 share a postcode; 3's only record has no address and no claim; 4 shares a claim with 1;
    # 5 is recorded in 2012 at the postcode 1 had in 2010 (evidence across years, not in the same year);
    # 6 shares only 1's benefit unit, on a claim three years later; 7 shares 5's address filter
    # across years but is only 12 years older (outside the 15-55 age gaps)
    con.execute("""create table rec_ev as select * from (values
                   (1, 2010, 'c', 'P', null::blob, 'U'), (2, 2010, null, 'P', null, null),
                   (3, 2010, null, null, null, null), (4, 2010, 'c', 'Q', null, 'U'),
                   (5, 2012, null, 'P', '\\xAA'::blob, null), (6, 2013, 'd', 'R', null, 'U'),
                   (7, 2011, null, 'S', '\\xAA'::blob, null))
                   t(truth_person, year, claim_tok, postcode_tok, addr_bf, benefit_unit_tok)""")
    same, near, pc_same_year, pc_any, pc_in_bounds = con.execute(relation_evidence_sql()).fetchall()[0]
    # co-resident pairs (1,2) (1,3) (2,3): only (1,2) has evidence
    assert (same, near) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    # same year: (1,4) only; any year: (1,4), (1,5) by the postcode, (1,6) by the unit, (7,5) by the address
    assert pc_same_year == pytest.approx(1 / 5)
    assert pc_any == pytest.approx(4 / 5)
    # within the age gaps: (7,5) is 12 years apart
    assert pc_in_bounds == pytest.approx(3 / 5)


def test_parent_child_curve_hand_worked():
    from linkage.evaluate.stage import parent_child_curve_sql

    con = duckdb.connect()
    con.execute("create table rec_truth as select * from (values (1), (2), (3), (4)) t(truth_person)")
    con.execute("create table pk_truth as select 'k' || truth_person person_key, truth_person from rec_truth")
    con.execute("create table truth_pc as select * from (values (1, 2), (1, 3), (4, 3)) t(parent_id, child_id)")
    # predicted: (1,2) at 0.9 right, (4,2) at 0.5 wrong, (1,3) at 0.3 right; (4,3) missed
    con.execute("""create table parent_child as select * from (values ('k1', 'k2', 0.9), ('k4', 'k2', 0.5),
                   ('k1', 'k3', 0.3)) t(parent_key, child_key, confidence)""")
    curve = [(float(c), pytest.approx(p), pytest.approx(r)) for c, p, r in con.execute(parent_child_curve_sql()).fetchall()]
    assert curve == [(0.9, 1.0, 1 / 3), (0.5, 0.5, 1 / 3), (0.3, 2 / 3, 2 / 3)]


def test_household_accuracy_by_confidence_hand_worked():
    from linkage.evaluate.stage import household_accuracy_by_confidence_sql, household_accuracy_sql

    con = duckdb.connect()
    # truth: {1, 2} and {3} in 2010; predicted: {1, 2, 3} with 3 weakly placed
    con.execute("create table rec_truth as select * from (values (1, 2010), (2, 2010), (3, 2010)) t(truth_person, year)")
    con.execute("create table pk_truth as select 'k' || truth_person person_key, truth_person from rec_truth")
    con.execute("create table truth_py as select * from (values (1, 2010, 1), (2, 2010, 1), (3, 2010, 2)) t(person_id, year, household_id)")
    con.execute("""create table households as select * from (values ('k1', 2010, 'H', 0.97), ('k2', 2010, 'H', 0.97),
                   ('k3', 2010, 'H', 0.2)) t(person_key, year, household_key, confidence)""")
    assert con.execute(household_accuracy_sql()).fetchall()[0][0] == 0.0
    rows = con.execute(household_accuracy_by_confidence_sql()).fetchall()
    assert [(b, n, float(a)) for b, n, a in rows] == [("0.00-0.30", 1, 0.0), ("0.95-1.00", 2, 0.0)]


def _pc(con):
    return {(p, c): conf for p, c, conf in con.execute("select parent_key, child_key, confidence from parent_child").fetchall()}


def test_claimant_of_a_new_benefit_unit_at_the_family_address_has_left_home():
    # the son's 2021 claim (a unit of his own, new that year) still shows the family's address; in
    # 2022 he is at his own address: he had left in 2021, the claim's address is stale
    rows = [(f"{p}{y}", p, y, b, None, None, "PC1", HOME) for p, b in (("mum", 1970), ("dad", 1968))
            for y in (2019, 2020, 2021, 2022)]
    rows += [("s19", "son", 2019, 2000, None, None, "PC1", HOME), ("s20", "son", 2020, 2000, None, None, "PC1", HOME),
             ("s21", "son", 2021, 2000, "c9", "claimant", "PC1", HOME, "U9"),
             ("s22", "son", 2022, 2000, None, None, "PC2", NEW), ("s23", "son", 2023, 2000, None, None, "PC2", NEW)]
    con, hh, facts = _run(rows)
    assert hh[("son", 2021)] != hh[("mum", 2021)] == hh[("dad", 2021)]
    assert hh[("son", 2020)] == hh[("mum", 2020)]
    assert facts["address_evidence"]["stale"] == 1
    # a payroll record instead of the claim: he more likely left the next year; kept at home
    _, hh, facts = _run([r if r[0] != "s21" else ("s21", "son", 2021, 2000, None, None, "PC1", HOME) for r in rows])
    assert hh[("son", 2021)] == hh[("mum", 2021)] and "stale" not in facts["address_evidence"]
    # a unit his mother belongs to is the family's, not his own: kept at home
    _, hh, _ = _run(rows + [("m21c", "mum", 2021, 1970, "c9", "partner", "PC1", HOME, "U9")])
    assert hh[("son", 2021)] == hh[("mum", 2021)]
    # a unit of his that already claimed while he lived at home is not a new household: kept at
    # home, unless the unit claims at his new address later
    older = rows + [("s19c", "son", 2019, 2000, "c8", "claimant", "PC1", HOME, "U9")]
    _, hh, _ = _run(older)
    assert hh[("son", 2021)] == hh[("mum", 2021)]
    _, hh, _ = _run(older + [("s23c", "son", 2023, 2000, "c7", "claimant", "PC2", NEW, "U9")])
    assert hh[("son", 2021)] != hh[("mum", 2021)]


def test_adult_and_dependant_of_one_benefit_unit_on_different_claims_are_parent_and_child():
    # dad claims with unit U in 2010 and is not seen again; the child is a dependant of U in 2012
    rows = [("d", "dad", 2010, 1975, "c1", "partner", "PC1", HOME, "U"),
            ("m", "mum", 2012, 1977, "c2", "claimant", "PC2", NEW, "U"),
            ("k", "kid", 2012, 2005, "c2", "dependant", "PC2", NEW, "U")]
    con, _, _ = _run(rows)
    pc = _pc(con)
    assert pc[("dad", "kid")] == pytest.approx(1 - math.exp(-UNIT_WEIGHT), abs=1e-3)
    # a child born more than a year after the adult's last claim in the unit: no evidence for that adult
    con, _, _ = _run([r if r[0] != "k" else ("k", "kid", 2012, 2012, "c2", "dependant", "PC2", NEW, "U") for r in rows])
    assert ("dad", "kid") not in _pc(con) and ("mum", "kid") in _pc(con)


def test_overlapping_spells_at_one_address_without_a_year_together_are_parent_and_child():
    # mum and her son are recorded at one address in alternate years, never in the same year
    rows = [("m10", "mum", 2010, 1960, None, None, "PC1", HOME), ("m12", "mum", 2012, 1960, None, None, "PC1", HOME),
            ("k11", "son", 2011, 1995, None, None, "PC1", HOME), ("k13", "son", 2013, 1995, None, None, "PC1", HOME)]
    con, _, _ = _run(rows)
    assert _pc(con) == {("mum", "son"): pytest.approx(1 - math.exp(-SPELL_WEIGHT), abs=1e-3)}
    # a stale record still says where someone lived: her son's claim of a unit of his own, at her
    # address in his first year away (he is placed at his new address that year)
    rows = [(f"m{y}", "mum", y, 1965, None, None, "PC1", HOME) for y in (2010, 2011, 2012, 2013)]
    rows += [("k11", "son", 2011, 1992, "c1", "claimant", "PC1", HOME, "U1")]
    rows += [(f"k{y}", "son", y, 1992, None, None, "PC2", NEW) for y in (2012, 2013)]
    con, hh, _ = _run(rows)
    assert hh[("son", 2011)] != hh[("mum", 2011)]
    assert _pc(con) == {("mum", "son"): pytest.approx(1 - math.exp(-SPELL_WEIGHT), abs=1e-3)}
    # succession: a family moves into the flat the elder left: no evidence
    rows = [(f"e{y}", "elder", y, 1960, None, None, "PC1", HOME) for y in (2008, 2009, 2010)]
    rows += [(f"k{y}", "kid", y, 1995, None, None, "PC1", HOME) for y in (2011, 2012, 2013)]
    con, _, _ = _run(rows)
    assert _pc(con) == {}
    # crossing only in the year the elder arrives and the younger leaves, by the younger's stale record
    # (a claim of a new unit of their own there; placed at the new address): no evidence either
    rows = [(f"e{y}", "elder", y, 1960, None, None, "PC1", HOME) for y in (2013, 2014, 2015)]
    rows += [("o13", "other", 2013, 1962, None, None, "PC1", HOME), ("o14", "other", 2014, 1962, None, None, "PC1", HOME)]
    rows += [(f"k{y}", "kid", y, 1995, None, None, "PC1", HOME) for y in (2011, 2012)]
    rows += [("k13", "kid", 2013, 1995, "c1", "claimant", "PC1", HOME, "U1")]
    rows += [(f"k{y}", "kid", y, 1995, None, None, "PC2", NEW) for y in (2014, 2015)]
    con, hh, _ = _run(rows)
    assert hh[("kid", 2013)] != hh[("elder", 2013)]
    assert ("elder", "kid") not in _pc(con)


def test_the_parents_partner_in_the_year_before_the_birth_is_a_parent():
    # dad lives with mum until 2011 and leaves; the baby is born in 2012 and lives with mum
    def rows(dad_years, baby_by=2012, step=False):
        r = [(f"m{y}", "mum", y, 1985, None, None, "PC1", HOME) for y in range(2009, 2015)]
        r += [(f"d{y}", "dad", y, 1984, None, None, "PC1" if y in dad_years else "PC9", HOME if y in dad_years else NEW)
              for y in range(2009, 2015)]
        r += [(f"b{y}", "baby", y, baby_by, None, None, "PC1", HOME) for y in range(baby_by, 2015)]
        if step:   # mum's new partner moves in the year before the birth
            r += [(f"s{y}", "step", y, 1986, None, None, "PC1", HOME) for y in range(baby_by - 1, 2015)]
        return r

    con, _, _ = _run(rows({2009, 2010, 2011}))
    pc = _pc(con)
    assert pc[("dad", "baby")] == pytest.approx(1 - math.exp(-BIRTH_PARTNER_WEIGHT), abs=1e-3)
    assert ("mum", "baby") in pc
    # left during the pregnancy: with mum two years before the birth, elsewhere the year before
    con, _, _ = _run(rows({2009, 2010}))
    assert ("dad", "baby") in _pc(con)
    # left three years before the birth and living elsewhere since: not evidence
    con, _, _ = _run(rows({2009}))
    assert ("dad", "baby") not in _pc(con)
    # someone else lived with the mother between the partner leaving and the birth
    con, _, _ = _run(rows({2009, 2010}, step=True))
    assert ("dad", "baby") not in _pc(con) and ("step", "baby") in _pc(con)


def test_parent_child_without_cross_year_evidence_keeps_the_callers_key_type():
    # assemble's sensitivity variants call parent_child_sql alone, on integer person keys and a
    # four-column households table
    from linkage.link.households import parent_child_sql

    con = duckdb.connect()
    con.execute("""create table records_linked as select * from (values (1, 2010, 1980, 'c', 'claimant'),
                   (2, 2010, 2005, 'c', 'dependant')) t(person_key, year, birth_year, claim_tok, bu_role)""")
    con.execute("""create table households as select * from (values (1, 2010, 1980, 'H'), (2, 2010, 2005, 'H'))
                   t(person_key, year, birth_year, household_key)""")
    con.execute(parent_child_sql(LinkConfig()))
    assert con.execute("select parent_key, child_key from parent_child").fetchall() == [(1, 2)]
