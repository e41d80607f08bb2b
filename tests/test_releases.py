"""Stable keys across releases: keys carried by greatest overlap, every change listed."""

from __future__ import annotations

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linkage.releases import carry_keys, key_changes


def _con(prev: dict[str, str], cur: dict[str, int]):
    con = duckdb.connect()
    con.execute("create table prev (record varchar, key varchar)")
    con.execute("create table cur (record varchar, cluster integer)")
    if prev:
        con.executemany("insert into prev values (?, ?)", list(prev.items()))
    if cur:
        con.executemany("insert into cur values (?, ?)", list(cur.items()))
    return con


def _run(prev, cur):
    con = _con(prev, cur)
    keys = carry_keys(con, "prev", "cur", new_key=lambda r: f"new:{r}")
    changes = key_changes(con, "prev", "cur", keys)
    assigned = dict(con.execute(f"select cluster, key from {keys}").fetchall())
    return assigned, con.execute(f"select change, old_key, new_key, records from {changes}").fetchall()


def _by_records(cur: dict[str, int], assigned: dict[int, str]) -> dict[frozenset, str]:
    members: dict[int, set] = {}
    for r, c in cur.items():
        members.setdefault(c, set()).add(r)
    return {frozenset(m): assigned[c] for c, m in members.items()}


records = st.lists(st.sampled_from([f"r{i:02d}" for i in range(30)]), min_size=0, max_size=30, unique=True)


@st.composite
def releases(draw):
    prev_recs = draw(records)
    prev = {r: f"K{draw(st.integers(0, 8))}" for r in prev_recs}
    cur_recs = draw(records)
    cur = {r: draw(st.integers(0, 8)) for r in cur_recs}
    return prev, cur


@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(releases(), st.permutations(list(range(9))))
def test_every_cluster_gets_one_distinct_key_whatever_the_cluster_labels(rel, perm):
    prev, cur = rel
    assigned, changes = _run(prev, cur)
    assert set(assigned) == set(cur.values())
    assert len(set(assigned.values())) == len(assigned)
    # relabelling the clusters changes nothing: keys follow records, never positions or labels
    relabelled = {r: perm[c] for r, c in cur.items()}
    again, changes_again = _run(prev, relabelled)
    assert _by_records(cur, assigned) == _by_records(relabelled, again)
    assert sorted(changes, key=str) == sorted(changes_again, key=str)
    # every record of the previous release that is still here is accounted for: carried or in a change
    kept = sum(1 for r, k in prev.items() if r in cur and assigned[cur[r]] == k)
    moved = sum(n for change, _, _, n in changes if change in ("merged", "split"))
    assert kept + moved == sum(1 for r in prev if r in cur)
    gone = {k for k in prev.values()} - {prev[r] for r in prev if r in cur}
    assert {o for change, o, _, _ in changes if change == "retired"} == gone


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(releases(), st.permutations(list(range(9))))
def test_the_same_clustering_again_keeps_every_key_and_lists_no_change(rel, perm):
    prev, _ = rel
    key_to_cluster = {f"K{i}": perm[i] for i in range(9)}
    cur = {r: key_to_cluster[k] for r, k in prev.items()}
    assigned, changes = _run(prev, cur)
    assert changes == []
    assert all(assigned[cur[r]] == k for r, k in prev.items())


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(releases())
def test_a_cluster_holding_most_of_a_key_and_mostly_that_key_keeps_it(rel):
    prev, cur = rel
    assigned, _ = _run(prev, cur)
    for c in set(cur.values()):
        members = [r for r, x in cur.items() if x == c]
        for k in set(prev.values()):
            of_key = [r for r, x in prev.items() if x == k]
            shared = sum(1 for r in members if prev.get(r) == k)
            if 2 * shared > len(of_key) and 2 * shared > len(members):
                assert assigned[c] == k


def test_merge_split_new_and_retired_are_named():
    prev = {"a": "K1", "b": "K1", "c": "K2", "d": "K3", "e": "K3", "f": "K3", "g": "K4"}
    cur = {"a": 1, "b": 1, "c": 1,              # K2 merged into K1
           "d": 2, "e": 2, "f": 3,              # K3 split: f leaves for a new key
           "h": 4}                              # a new person; K4 retired (g gone)
    assigned, changes = _run(prev, cur)
    assert assigned == {1: "K1", 2: "K3", 3: "new:f", 4: "new:h"}
    assert sorted(changes, key=str) == sorted([("merged", "K2", "K1", 1), ("split", "K3", "new:f", 1),
                                               ("new", None, "new:h", 1), ("retired", "K4", None, 1)], key=str)


def test_a_key_in_use_or_retired_is_never_reissued():
    # K1 is carried by a; b's new key would be K1 and c's would be K9 (retired): both are asked again
    con = _con({"a": "K1", "z": "K9"}, {"a": 1, "b": 2, "c": 3})
    keys = carry_keys(con, "prev", "cur", new_key=lambda r: {"b": "K1", "c": "K9"}.get(r, f"new:{r}"))
    assert dict(con.execute(f"select cluster, key from {keys}").fetchall()) == {1: "K1", 2: "new:b#2", 3: "new:c#2"}


def test_a_key_asked_again_is_checked_again_against_every_issued_and_new_key():
    # b: K1 (carried by a), then K9 (retired), then new:b#3; c: new:b#3 (just made for b), then K9, then new:c#3
    con = _con({"a": "K1", "z": "K9"}, {"a": 1, "b": 2, "c": 3})
    names = {"b": "K1", "b#2": "K9", "c": "new:b#3", "c#2": "K9"}
    keys = carry_keys(con, "prev", "cur", new_key=lambda r: names.get(r, f"new:{r}"))
    assert dict(con.execute(f"select cluster, key from {keys}").fetchall()) == {1: "K1", 2: "new:b#3", 3: "new:c#3"}
