"""Incremental stages: a delivery pseudonymises only its own rows; everything before keeps its record tokens."""

from __future__ import annotations

import os
import shutil

import pyarrow as pa
import pytest

from linkage.config import load_config
from linkage.crosswalk import read_crosswalk
from linkage.ingest import ingest
from linkage.keys import MasterKey
from linkage.pseudonymise import pseudonymise
from linkage.pseudonymise.seal import unseal
from linkage.pseudonymise.store import read_identifiers, read_payload
from synthetic_data import generate_population
from synthetic_data.deliveries import deliver_next, pending
from tests.conftest import FAST_LINK

PERSONS, SEED, N = 1200, 5, 4


def _cfg(**pseudonymise_settings):
    extra = {"pseudonymise": pseudonymise_settings} if pseudonymise_settings else {}
    return load_config(generate={"persons": PERSONS, "seed": SEED, "deliveries": N}, **extra)


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """A workspace with its history ingested and pseudonymised, deliveries still pending."""
    root = tmp_path_factory.mktemp("incremental") / "ws"
    cfg = _cfg()
    generate_population(cfg.generate, root)
    key = MasterKey(os.urandom(32), "test")
    ingest(cfg, root)
    summary = pseudonymise(cfg, root, key)
    return root, key, summary


def _copy(history, tmp_path):
    root, key, summary = history
    ws = tmp_path / "ws"
    shutil.copytree(root, ws)
    return ws, key, summary


def _crosswalk(ws, key):
    return pa.concat_tables(list(read_crosswalk(ws / "pseudonymised" / "crosswalk.enc", key))).to_pandas()


def _by_row(ws, key):
    """Every identifiers row keyed by its source row (file, line), without the random record token."""
    ids = read_identifiers(ws, key).to_pandas()
    xw = _crosswalk(ws, key).drop(columns=["source"])
    both = ids.merge(xw, on="record_token", validate="one_to_one")
    # sex_seal is randomised per record (a fresh nonce each run): compare the sex it opens to
    both["sex_seal"] = unseal(key.subkey("seal:sex"), both["sex_seal"].tolist())
    return both.drop(columns=["record_token"]).set_index(["file", "line"]).sort_index()


def test_a_delivery_encodes_only_its_rows_and_keeps_every_earlier_token(history, tmp_path):
    ws, key, first = _copy(history, tmp_path)
    assert first["mode"].startswith("full")
    before_ids = read_identifiers(ws, key).to_pandas().set_index("record_token")
    before_xw = _crosswalk(ws, key)
    delivered = deliver_next(ws)
    ingest(_cfg(), ws)
    second = pseudonymise(_cfg(), ws, key)

    assert second["mode"].startswith("incremental")
    new_files = [f for f in second["files"] if f not in first["files"]]
    assert sorted(f["file"] for f in new_files) == sorted(f["name"] for f in delivered["files"])
    assert sum(second["rows_encoded"].values()) == sum(f["rows"] for f in new_files)
    # the rows of earlier files: same record token, same encodings, same source row
    after_ids = read_identifiers(ws, key).to_pandas().set_index("record_token")
    old = before_ids.index
    assert set(old) <= set(after_ids.index)
    assert after_ids.loc[old][before_ids.columns].equals(before_ids)
    after_xw = _crosswalk(ws, key)
    kept = after_xw.merge(before_xw, on="record_token", suffixes=("", "_before"))
    assert len(kept) == len(before_xw) and (kept.file == kept.file_before).all() and (kept.line == kept.line_before).all()
    # one token per staged row, nothing doubled, and the new rows in files of their own
    assert after_xw.record_token.is_unique and len(after_xw) == len(after_ids) == sum(second["rows"].values())
    for source, parts in second["parts"].items():
        assert parts[0] == f"{source}.parquet"
        assert len(parts) == 1 + (source in second["rows_encoded"])
        assert (ws / "pseudonymised" / "payload" / parts[-1]).exists()
        assert read_payload(ws, key, source).num_rows == second["rows"][source]


def test_the_incremental_zone_encodes_every_row_as_a_full_run_would(history, tmp_path):
    ws, key, _ = _copy(history, tmp_path)
    deliver_next(ws)
    deliver_next(ws)
    ingest(_cfg(), ws)
    assert pseudonymise(_cfg(), ws, key)["mode"].startswith("incremental")
    incremental = _by_row(ws, key)
    full = pseudonymise(_cfg(incremental=False), ws, key)
    assert full["mode"] == "full: pseudonymise.incremental is false"
    assert all(len(p) == 1 for p in full["parts"].values())
    assert incremental.equals(_by_row(ws, key)[incremental.columns])


@pytest.mark.parametrize("change, reason", [
    ("key", "full: the key differs"),
    ("setting", "full: encoding settings or schema versions differ"),
    ("withdrawn", "was pseudonymised before and is gone from staged/ or changed"),
])
def test_a_new_key_setting_or_a_withdrawn_file_means_a_full_run(history, tmp_path, change, reason):
    ws, key, _ = _copy(history, tmp_path)
    cfg = _cfg()
    delivered = deliver_next(ws)
    ingest(cfg, ws)
    pseudonymise(cfg, ws, key)
    if change == "key":
        key = MasterKey(os.urandom(32), "test")
    elif change == "setting":
        cfg = _cfg(phonetic="soundex")
    else:   # the department withdraws the delivery: its rows must not stay in the zone
        for f in (ws / "landing").glob("*.csv"):
            if "_" in f.stem:     # landing/<source>_<month>.csv; the history is landing/<source>.csv
                f.unlink()
        ingest(cfg, ws)
    summary = pseudonymise(cfg, ws, key)
    assert reason in summary["mode"]
    assert all(len(p) == 1 for p in summary["parts"].values())
    assert len(_crosswalk(ws, key)) == sum(summary["rows"].values())
    assert delivered and pending(ws)


def test_staged_rows_changed_under_an_unchanged_landing_file_mean_a_full_run(history, tmp_path):
    """A re-ingest under new normalisation rules (here: one staged value edited) must not keep the old encodings."""
    import duckdb

    ws, key, _ = _copy(history, tmp_path)
    staged = ws / "staged" / "earnings.parquet"
    edited = tmp_path / "edited.parquet"
    duckdb.execute(f"COPY (SELECT * REPLACE (CASE WHEN _line = 2 THEN 'ZZZ' ELSE surname END AS surname) "
                   f"FROM '{staged}') TO '{edited}' (FORMAT parquet)")
    edited.replace(staged)
    summary = pseudonymise(_cfg(), ws, key)
    assert summary["mode"] == "full: the staged rows of earnings.csv differ from those pseudonymised before"


def _rows(path):
    import duckdb

    return duckdb.sql(f"SELECT * FROM '{path}' ORDER BY _file, _line").df()


def _staged(ws, source):
    """A source's staged rows, from all its parts (ingest writes a part per delivery), by file and line."""
    import duckdb

    from linkage.ingest.stage import parquet_source, staged_paths

    return duckdb.sql(f"SELECT * FROM {parquet_source(staged_paths(ws / 'staged', source))} "
                      f"ORDER BY _file, _line").df()


def test_incremental_ingest_stages_only_new_files_and_equals_a_full_ingest(tmp_path):
    """Bad rows and record ids repeated from an earlier delivery are quarantined as a full run would."""
    import json

    ws = tmp_path / "ws"
    cfg = _cfg()
    generate_population(cfg.generate, ws)
    first = ingest(cfg, ws)
    assert first["mode"].startswith("full")
    history = (ws / "landing" / "benefits.csv").read_text().splitlines()
    d = deliver_next(ws)
    while not any(f["source"] == "benefits" for f in d["files"]):
        d = deliver_next(ws)
    target = ws / "landing" / next(f["name"] for f in d["files"] if f["source"] == "benefits")
    fields = history[2].split(",")
    fields[6] = '"Zed"'                                   # the forename: same record id, other values
    same, changed = history[1], ",".join(fields)
    broken = history[3].replace(history[3].split(",")[0], '"BEN999999999"', 1).replace("-", "/", 1)
    target.write_text(target.read_text() + "\n".join([same, changed, broken]) + "\n")

    second = ingest(cfg, ws)
    assert second["mode"].startswith("incremental")
    assert sorted(second["files_staged_now"]) == sorted(f["name"] for f in d["files"])
    staged = {s: _staged(ws, s) for s in ("education", "benefits", "earnings")}
    quarantined = _rows(ws / "quarantine" / "benefits.parquet")
    assert {"duplicate", "duplicate_id"} <= set(quarantined.reason)
    assert (quarantined._file == target.name).all()
    manifest = json.loads((ws / "staged" / "manifest.json").read_text())["files"]
    for e in manifest:      # nothing lost: every physical row staged or quarantined, per file
        assert e["rows_read"] == e["rows_staged"] + e["rows_quarantined"]

    full = ingest(load_config(generate={"persons": PERSONS, "seed": SEED, "deliveries": N},
                              ingest={"incremental": False}), ws)
    assert full["mode"] == "full: ingest.incremental is false"
    for s, rows in staged.items():
        assert rows.equals(_staged(ws, s))
    assert quarantined.equals(_rows(ws / "quarantine" / "benefits.parquet"))
    strip = lambda files: sorted(json.dumps(e, sort_keys=True) for e in files)  # noqa: E731
    assert strip(manifest) == strip(json.loads((ws / "staged" / "manifest.json").read_text())["files"])


def test_a_withdrawn_landing_file_means_a_full_ingest(tmp_path):
    ws = tmp_path / "ws"
    cfg = _cfg()
    generate_population(cfg.generate, ws)
    ingest(cfg, ws)
    d = deliver_next(ws)
    ingest(cfg, ws)
    (ws / "landing" / d["files"][0]["name"]).unlink()
    again = ingest(cfg, ws)
    assert again["mode"] == f"full: landing/{d['files'][0]['name']} was staged before and is gone or changed"
    assert d["files"][0]["name"] not in set(_staged(ws, d["files"][0]["source"])._file)


def test_link_scores_only_pairs_a_delivery_touches_and_finds_the_persons_a_full_link_finds(history, tmp_path):
    """Same model, same data: the incremental link's persons are a full link's, from far fewer scored pairs."""
    import duckdb

    from linkage.link import link

    ws, key, _ = _copy(history, tmp_path)
    cfg = load_config(generate={"persons": PERSONS, "seed": SEED, "deliveries": N}, link=FAST_LINK)
    first = link(cfg, ws, key)
    assert first["prediction"] == "full: a model is trained"
    model = tmp_path / "model.json"
    shutil.copyfile(ws / "linked" / "model.json", model)
    deliver_next(ws)
    deliver_next(ws)
    ingest(cfg, ws)
    pseudonymise(cfg, ws, key)
    full_ws = tmp_path / "full"
    shutil.copytree(ws, full_ws)

    again = link(cfg, ws, key, model=model)
    assert again["prediction"].startswith("incremental")
    touched = again["incremental"]["touched_identities"]
    assert 0 < touched < again["incremental"]["identities"]
    full = link(load_config(generate={"persons": PERSONS, "seed": SEED, "deliveries": N},
                            link={**FAST_LINK, "incremental": False}),
                full_ws, key, model=model)
    assert full["prediction"] == "full: link.incremental is false"
    assert again["pairs_scored_now"] < full["pairs_scored"]

    con = duckdb.connect()
    # the same persons: every pair of identities in one person in one run is in one person in the other
    same = con.execute(f"""
        with a as (select unique_id, person_key k from '{ws}/linked/identities.parquet'),
             b as (select unique_id, person_key k from '{full_ws}/linked/identities.parquet')
        select count(distinct a.k), count(distinct b.k), count(distinct (a.k, b.k)), count(*)
        from a join b using (unique_id)""").fetchone()
    assert same[0] == same[1] == same[2] and same[3] == again["identities"]
    # the pairs above the threshold differ at most by term-frequency drift of carried pairs
    differ = con.execute(f"""
        select count(*) from (select unique_id_l, unique_id_r from '{ws}/linked/pairs.parquet'
                              where match_probability >= {cfg.link.threshold}) a
        full join (select unique_id_l, unique_id_r from '{full_ws}/linked/pairs.parquet'
                   where match_probability >= {cfg.link.threshold}) b using (unique_id_l, unique_id_r)
        where a.unique_id_l is null or b.unique_id_l is null""").fetchone()[0]
    assert differ <= 0.001 * full["pairs_scored"]


@pytest.mark.parametrize("seed", range(6))
def test_clustering_only_the_affected_identities_gives_the_components_of_the_whole_graph(seed):
    """cluster_affected against connected components of every pair, on random graphs.

    A previous release's persons are the components of its pairs; a delivery touches some
    identities and adds new ones, its scored pairs each have a touched end, and the pairs
    between untouched identities are carried. Whatever the graph, the persons found by
    re-clustering only the affected identities must be the components of all of it.
    """
    import random

    import duckdb

    from linkage.link.incremental import cluster_affected

    rng, threshold = random.Random(seed), 0.9

    def components(nodes, edges):
        """Connected components at the threshold, by breadth-first search (the oracle)."""
        near = {n: set() for n in nodes}
        for a, b, p in edges:
            if p >= threshold:
                near[a].add(b)
                near[b].add(a)
        seen, out = set(), set()
        for start in nodes:
            if start in seen:
                continue
            group, frontier = {start}, [start]
            while frontier:
                frontier = [m for n in frontier for m in near[n] if m not in group]
                group.update(frontier)
            seen |= group
            out.add(frozenset(group))
        return out

    old = [f"i{n:03d}" for n in range(120)]
    prob = lambda: rng.choice([0.95, 0.99, 0.5, 0.2])   # noqa: E731 - above and below the threshold
    previous = {tuple(sorted(rng.sample(old, 2))) + (prob(),) for _ in range(140)}
    persons = components(old, previous)
    key = {n: f"P{min(g)}" for g in persons for n in g}
    new = [f"n{n:03d}" for n in range(12)]
    touched = set(rng.sample(old, 10))
    every = old + new
    scored = {}
    for _ in range(40):
        a = rng.choice(sorted(touched) + new)
        b = rng.choice(every)
        if a != b:
            scored[tuple(sorted((a, b)))] = prob()
    carried = [e for e in previous if e[0] not in touched and e[1] not in touched]
    merged = [(a, b, p) for (a, b), p in scored.items()] + [e for e in carried if (e[0], e[1]) not in scored]

    con = duckdb.connect()
    con.execute("create table identities (unique_id varchar, touched boolean)")
    con.executemany("insert into identities values (?, ?)", [(n, n in touched or n in new) for n in every])
    for name, rows in (("scored", [(a, b, p) for (a, b), p in scored.items()]), ("merged", merged)):
        con.execute(f"create table {name} (unique_id_l varchar, unique_id_r varchar, match_probability double)")
        if rows:
            con.executemany(f"insert into {name} values (?, ?, ?)", rows)
    con.execute("create table previous_persons (unique_id varchar, person_key varchar)")
    con.executemany("insert into previous_persons values (?, ?)", list(key.items()))

    facts = cluster_affected(con, "scored", "merged", threshold)
    got: dict = {}
    for uid, cluster in con.execute("select unique_id, cluster_id from clusters").fetchall():
        got.setdefault(cluster, set()).add(uid)
    assert sorted(map(sorted, got.values())) == sorted(map(sorted, components(every, merged)))
    # and it did not re-cluster everything: untouched persons no new pair reaches stay out
    assert 0 < facts["affected_identities"] < len(every)


def _zone_files(ws):
    """name -> (inode, bytes) of every file of pseudonymised/."""
    zone = ws / "pseudonymised"
    return {str(p.relative_to(zone)): (p.stat().st_ino, p.read_bytes()) for p in sorted(zone.rglob("*")) if p.is_file()}


def test_deliveries_add_a_crosswalk_part_each_hash_no_earlier_row_and_equal_full_runs(history, tmp_path, monkeypatch):
    """Three deliveries, each ingested and pseudonymised: the earlier crosswalk parts are the same files (linked,
    never rewritten), the new rows' mapping is a part of its own, pseudonymise hashes no staged row (ingest's
    digests are used), and staged rows, manifest, zone and crosswalk equal full runs' on the same files."""
    import json

    import duckdb

    from linkage.ingest.stage import staged_paths, staged_row_digests
    from linkage.pseudonymise import stage as pstage

    ws, key, _ = _copy(history, tmp_path)
    hashed = []
    monkeypatch.setattr(pstage, "staged_row_digests",
                        lambda con, path, files=None: hashed.append(path) or staged_row_digests(con, path, files))
    con = duckdb.connect()
    for n in range(1, 4):
        before = _zone_files(ws)
        assert deliver_next(ws)
        ingest(_cfg(), ws)
        manifest = json.loads((ws / "staged" / "manifest.json").read_text())
        for source in ("education", "benefits", "earnings"):   # ingest's digests are those of the rows staged
            recorded = {e["file"]: e["staged_digest"] for e in manifest["files"] if e["source"] == source}
            assert staged_row_digests(con, staged_paths(ws / "staged", source)) == \
                {f: d for f, d in recorded.items() if d is not None}
        summary = pseudonymise(_cfg(), ws, key)
        assert summary["mode"].startswith("incremental") and hashed == []
        parts = ["crosswalk.enc"] + [f"crosswalk.{i:04d}.enc" for i in range(1, n + 1)]
        assert summary["crosswalk"]["parts"] == parts
        assert sorted(p.name for p in (ws / "pseudonymised").glob("crosswalk*")) == sorted(parts)
        after = _zone_files(ws)
        for name in parts[:-1]:
            assert after[name] == before[name]      # same inode, same bytes: carried, not rewritten
        assert summary["crosswalk"]["rows"] == len(_crosswalk(ws, key)) == sum(summary["rows"].values())
    incremental, staged = _by_row(ws, key), {s: _staged(ws, s) for s in ("education", "benefits", "earnings")}
    strip = lambda files: sorted(json.dumps(e, sort_keys=True) for e in files)  # noqa: E731
    manifest = strip(json.loads((ws / "staged" / "manifest.json").read_text())["files"])

    ingest(load_config(generate={"persons": PERSONS, "seed": SEED, "deliveries": N}, ingest={"incremental": False}), ws)
    assert manifest == strip(json.loads((ws / "staged" / "manifest.json").read_text())["files"])
    for s, rows in staged.items():
        assert rows.equals(_staged(ws, s))
    full = pseudonymise(_cfg(incremental=False), ws, key)
    assert full["crosswalk"]["parts"] == ["crosswalk.enc"]
    assert not list((ws / "pseudonymised").glob("crosswalk.0*.enc"))
    assert incremental.equals(_by_row(ws, key)[incremental.columns])


def test_a_delivery_failing_while_writing_its_crosswalk_part_leaves_the_zone_as_it_was(history, tmp_path, monkeypatch):
    from linkage.pseudonymise import stage as pstage

    ws, key, _ = _copy(history, tmp_path)
    deliver_next(ws)
    ingest(_cfg(), ws)
    before = _zone_files(ws)
    real = pstage.write_crosswalk

    def dies(path, *args, **kwargs):
        real(path, *args, **kwargs)
        raise OSError("disk full")      # after the part is written in full, before the zone is published
    monkeypatch.setattr(pstage, "write_crosswalk", dies)
    with pytest.raises(OSError):
        pseudonymise(_cfg(), ws, key)
    assert _zone_files(ws) == before
    assert not [p for p in ws.iterdir() if p.name.startswith(".pseudonymised")]
    monkeypatch.setattr(pstage, "write_crosswalk", real)
    again = pseudonymise(_cfg(), ws, key)
    assert again["mode"].startswith("incremental") and again["crosswalk"]["parts"] == ["crosswalk.enc",
                                                                                        "crosswalk.0001.enc"]
    assert len(_crosswalk(ws, key)) == sum(again["rows"].values())
