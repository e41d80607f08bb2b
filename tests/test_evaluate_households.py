"""Hand-worked cases for evaluation metrics and household assembly."""

from __future__ import annotations

import hashlib

import duckdb
import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linkage.config import LinkConfig
from linkage.evaluate.stage import metrics_from_counts, pairwise_counts, person_metrics
from linkage.link.households import assemble_households


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


def _households(con):
    con.execute("""create or replace table records_linked (record_token varchar, person_key varchar, year int,
                   birth_year int, claim_tok varchar, bu_role varchar, postcode_tok varchar, addr_bf blob)""")
    con.executemany("insert into records_linked values (?, ?, ?, ?, ?, ?, ?, ?)", RECORDS)
    return assemble_households(con, LinkConfig())


def test_households_hand_worked():
    con = duckdb.connect()
    con.execute("SET lambda_syntax='ENABLE_SINGLE_ARROW'")
    facts = _households(con)
    hh = {(p, y): h for p, y, h in con.execute("select person_key, year, household_key from households").fetchall()}
    # 2010: one benefit unit = one household
    assert hh[("mum", 2010)] == hh[("dad", 2010)] == hh[("kid", 2010)]
    # 2011: two addresses at PC1, so the pupil cannot be placed by postcode alone;
    # dad has moved out; the lodger lives at another address
    assert hh[("dad", 2011)] != hh[("mum", 2011)]
    assert hh[("lodger", 2011)] != hh[("mum", 2011)]
    assert hh[("kid", 2011)] != hh[("mum", 2011)]
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
