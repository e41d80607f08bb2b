"""Person keys stay stable across releases: re-linking keeps every key, a delivery keeps untouched persons' keys."""

from __future__ import annotations

import shutil

import duckdb
import pytest

from linkage.config import load_config
from linkage.stages import run_stage
from synthetic_data import generate_population
from synthetic_data.deliveries import deliver_next
from tests.conftest import FAST_LINK

KEY = "6a" * 32


def _identities(ws) -> dict[str, str]:
    return dict(duckdb.execute(f"select unique_id, person_key from '{ws}/linked/identities.parquet'").fetchall())


def _changes(ws) -> list[tuple]:
    return duckdb.execute(f"select change, old_key, new_key, identities from '{ws}/linked/key_changes.parquet'").fetchall()


@pytest.fixture(scope="module")
def first_release(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("HHLINK_KEY", KEY)
    root = tmp_path_factory.mktemp("stable") / "ws"
    cfg = load_config(generate={"persons": 800, "seed": 9, "deliveries": 3}, link=FAST_LINK)
    generate_population(cfg.generate, root)
    for stage in ("ingest", "pseudonymise", "link"):
        summary = run_stage(stage, cfg, root)
    yield cfg, root, summary
    mp.undo()


def test_the_first_release_lists_every_person_as_new(first_release):
    _, root, summary = first_release
    changes = _changes(root)
    assert summary["key_changes"]["first_release"] and summary["key_changes"]["carried"] == 0
    assert {c for c, *_ in changes} == {"new"} and len(changes) == summary["persons"]


def test_re_linking_the_same_data_keeps_every_key(first_release, tmp_path):
    cfg, root, _ = first_release
    ws = tmp_path / "ws"
    shutil.copytree(root, ws)
    before = _identities(ws)
    # the stage registry would skip an unchanged link: call the stage function itself
    from linkage.link.stage import link
    summary = link(cfg, ws)
    assert _identities(ws) == before
    assert _changes(ws) == []
    assert summary["key_changes"]["carried"] == summary["persons"] and not summary["key_changes"]["first_release"]


def test_a_delivery_keeps_the_keys_of_persons_it_does_not_touch(first_release, tmp_path):
    cfg, root, _ = first_release
    ws = tmp_path / "ws"
    shutil.copytree(root, ws)
    before = _identities(ws)
    assert deliver_next(ws) is not None
    for stage in ("ingest", "pseudonymise", "link"):
        summary = run_stage(stage, cfg, ws)
    after = _identities(ws)
    # the same records give the same identities under the same key
    assert set(before) <= set(after)
    old_members: dict[str, set] = {}
    for uid, k in before.items():
        old_members.setdefault(k, set()).add(uid)
    new_members: dict[str, set] = {}
    for uid, k in after.items():
        new_members.setdefault(k, set()).add(uid)
    # a person whose cluster only gained identities that were not in the previous release keeps its key
    untouched = [k for k, m in old_members.items()
                 if (new := new_members.get(after[next(iter(m))])) is not None
                 and m <= new and not (new - m) & set(before)]
    assert len(untouched) >= 0.99 * len(old_members)
    assert all(after[next(iter(old_members[k]))] == k for k in untouched)
    # every other change is in the key-change table
    changes = _changes(ws)
    listed_old = {o for c, o, _, _ in changes if o is not None}
    assert set(old_members) - set(new_members) <= listed_old
    listed_new = {n for c, _, n, _ in changes if c in ("new", "split")}
    assert set(new_members) - set(old_members) == listed_new
    assert summary["key_changes"]["carried"] + len(listed_new) == summary["persons"]
    # researchers get the same changes in their project's keys, never a linkage key
    run_stage("assemble", cfg, ws)
    from linkage.keys import MasterKey
    from linkage.pseudonymise.store import read_research   # research/ is encrypted at rest

    master = MasterKey(bytes.fromhex(KEY), "test")
    changes_t = read_research(ws, master, "key_changes")    # noqa: F841 - scanned by DuckDB below
    research = duckdb.execute("select change, old_person_id, new_person_id, identities from changes_t").fetchall()
    assert sorted(r[0] for r in research) == sorted(c for c, *_ in changes if c != "new")
    linkage_keys = set(before.values()) | set(after.values())
    assert not {v for r in research for v in r[1:3]} & linkage_keys
    people = set(read_research(ws, master, "person", ["person_id"]).column("person_id").to_pylist())
    assert {r[2] for r in research if r[0] == "merged"} <= people


def _households(ws) -> dict[str, str]:
    return dict(duckdb.execute(f"select person_key || ':' || year, household_key from '{ws}/linked/households.parquet'")
                .fetchall())


def test_household_keys_carry_over_and_every_change_is_listed(first_release, tmp_path):
    cfg, root, summary = first_release
    assert summary["household_key_changes"]["first_release"]
    assert {c for (c,) in duckdb.execute(f"select change from '{root}/linked/household_key_changes.parquet'")
            .fetchall()} == {"new"}
    ws = tmp_path / "ws"
    shutil.copytree(root, ws)
    before = _households(ws)
    from linkage.link.stage import link

    # re-linking the same data: every household keeps its key
    again = link(cfg, ws)
    assert _households(ws) == before and again["household_key_changes"]["carried"] == len(set(before.values()))
    # a delivery: a household whose person-years are all as before keeps its key; a changed key is listed
    deliver_next(ws)
    for stage in ("ingest", "pseudonymise", "link"):
        run_stage(stage, cfg, ws)
    after = _households(ws)
    old_members: dict[str, set] = {}
    for py, k in before.items():
        old_members.setdefault(k, set()).add(py)
    new_members: dict[str, set] = {}
    for py, k in after.items():
        new_members.setdefault(k, set()).add(py)
    same = [k for k, m in old_members.items() if any(new_members.get(k2) == m for k2 in {after.get(p) for p in m})]
    assert same and all(after[next(iter(old_members[k]))] == k for k in same)
    listed = duckdb.execute(f"select old_key, new_key from '{ws}/linked/household_key_changes.parquet'").fetchall()
    named = {k for pair in listed for k in pair if k is not None}
    assert (set(old_members) ^ set(new_members)) <= named
    # researchers get the household changes in their project's household ids, never a linkage key
    run_stage("assemble", cfg, ws)
    from linkage.keys import MasterKey
    from linkage.pseudonymise.store import read_research

    master = MasterKey(bytes.fromhex(KEY), "test")
    research = read_research(ws, master, "household_key_changes").to_pylist()
    assert len(research) == sum(1 for c, *_ in duckdb.execute(
        f"select change from '{ws}/linked/household_key_changes.parquet' where change <> 'new'").fetchall())
    ids = {r[k] for r in research for k in ("old_household_id", "new_household_id") if r[k] is not None}
    assert not ids & (set(old_members) | set(new_members))
    households = set(read_research(ws, master, "household_year", ["household_id"]).column("household_id").to_pylist())
    assert {r["new_household_id"] for r in research if r["change"] == "merged"} <= households


@pytest.mark.parametrize("seed", range(5))
def test_matching_only_the_recomputed_persons_gives_the_keys_of_matching_all(tmp_path, seed):
    """An incremental link names every person it did not recompute ``'previous:' + key``; matching
    only the recomputed clusters gives the same keys, changes and counts as matching every identity."""
    import json
    import random

    import pyarrow as pa

    from linkage.link.stable_keys import person_keys

    rng = random.Random(seed)
    ids = [f"u{i:04d}" for i in range(300)]
    previous = {u: f"P{rng.randrange(90):03d}" for u in ids[:260]}          # 40 identities are new
    persons = sorted(set(previous.values()))
    recomputed = set(rng.sample(persons, 25))
    clusters = {}
    for u in ids:
        if u in previous and previous[u] not in recomputed:
            clusters[u] = "previous:" + previous[u]
        else:   # merged, split, kept together or new: any cluster among a few dozen
            clusters[u] = f"c{rng.randrange(30)}"
    prev_file = tmp_path / "identities.parquet"
    duckdb.execute(f"copy (select * from (values {', '.join(f'({u!r}, {k!r})' for u, k in previous.items())}) "
                   f"t(unique_id, person_key)) to '{prev_file}'")
    results = []
    for only in (False, True):
        out = tmp_path / str(only)
        out.mkdir()
        con = duckdb.connect()
        con.register("_c", pa.table({"unique_id": list(clusters), "cluster_id": list(clusters.values())}))
        con.execute("create table clusters as select * from _c; create table identities as select unique_id from _c")
        counts = person_keys(con, prev_file, out, recomputed_only=only)
        results.append((sorted(con.execute("select * from persons").fetchall()),
                        duckdb.execute(f"select * from '{out}/key_changes.parquet' order by all").fetchall(),
                        json.dumps(counts, sort_keys=True)))
        con.close()
    assert results[1] == results[0]
    assert results[0][1], "the release changed some keys"
