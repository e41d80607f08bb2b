"""The link state: a release built on the previous one's state gives the tables a rebuild from the whole zone gives."""

from __future__ import annotations

import json
import os
import shutil

import duckdb
import pyarrow as pa
import pytest

from linkage.config import load_config
from linkage.ingest import ingest
from linkage.keys import KeyMismatchError, MasterKey
from linkage.link import link
from linkage.link import linked_records
from linkage.link import state as link_state
from linkage.link.linked_records import record_files, records_relation
from linkage.pseudonymise import pseudonymise
from linkage.pseudonymise.store import is_encrypted, read_encrypted, read_identifiers, zone_files
from synthetic_data import generate_population
from synthetic_data.deliveries import deliver_next
from tests.conftest import FAST_LINK

PERSONS, SEED, N = 1200, 11, 3
OUTPUTS = ("identities.parquet", "pairs.parquet", "households.parquet", "parent_child.parquet")


def _cfg(**link_settings):
    return load_config(generate={"persons": PERSONS, "seed": SEED, "deliveries": N},
                       link={**FAST_LINK, **link_settings})


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A history linked in full (model trained, state written), then a delivery linked from that state;
    ``base`` is the workspace after a second delivery was ingested and pseudonymised, not yet linked.
    Returns (base, key, history's link summary, first delivery's link summary)."""
    base = tmp_path_factory.mktemp("link_state") / "base"
    cfg = _cfg()
    generate_population(cfg.generate, base)
    key = MasterKey(os.urandom(32), "test")
    ingest(cfg, base)
    pseudonymise(cfg, base, key)
    first = link(cfg, base, key)
    deliver_next(base)
    ingest(cfg, base)
    pseudonymise(cfg, base, key)
    second = link(cfg, base, key)
    deliver_next(base)
    ingest(cfg, base)
    pseudonymise(cfg, base, key)
    return base, key, first, second


@pytest.fixture(scope="module")
def both(released, tmp_path_factory):
    """The second delivery linked twice: from the state (``a``) and as before the state existed (``b``:
    the state removed, so the identities and keys are rebuilt from the whole zone, and Splink given
    every identity). Returns (a, b, summaries)."""
    from linkage.link import stage

    base, key, _, _ = released
    root = tmp_path_factory.mktemp("link_state_both")
    a, b = root / "a", root / "b"
    shutil.copytree(base, a)
    shutil.copytree(base, b)
    shutil.rmtree(b / "linked" / link_state.STATE_DIR)
    sa = link(_cfg(), a, key)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stage, "PREDICT_REACHABLE_ONLY", False)
        sb = link(_cfg(), b, key)
    return a, b, sa, sb


def _rows(con, path):
    return con.execute(f"select * from read_parquet('{path}') order by all").fetchall()


def _assert_same_outputs(ws, other):
    con = duckdb.connect()
    for name in OUTPUTS:
        assert _rows(con, ws / "linked" / name) == _rows(con, other / "linked" / name), name
    # every record with its identity and person key, however the segments divide them
    records = [con.execute(f"select * from {records_relation(w / 'linked')} order by all").fetchall() for w in (ws, other)]
    assert records[0] == records[1] and len(records[0]) > 0


def _state_table(ws, key, name):
    folder = ws / "linked" / link_state.STATE_DIR
    meta = json.loads((folder / "state.json").read_text())
    if name == "records":
        return pa.concat_tables([read_encrypted(folder / f, key, "identifiers") for f in meta["records"]])
    # identity segments: a later segment's row for an identity replaces an earlier one's
    con = duckdb.connect()
    link_state.load_identities(con, "t", [folder / f for f in meta["identities"]], key)
    return con.execute("select * from t").to_arrow_table()


def test_every_release_writes_a_state_and_the_next_reads_only_new_zone_files(released):
    base, key, first, second = released
    assert first["link_state"] == "full: no link state from a previous release"
    assert second["link_state"].startswith("incremental: "), second["link_state"]
    assert second["prediction"].startswith("incremental")
    inc = second["incremental"]
    # Splink saw the touched identities and those a rule can pair with one, not every identity
    assert 0 < inc["touched_identities"] <= inc["reachable_identities"] < inc["identities"]
    assert 0 < second["anchors"]["identities_rebuilt"] < inc["identities"]
    # the release added a segment of the identities that changed (touched, or blocking keys rebuilt)
    assert second["state"]["record_segments"] == 2 and second["state"]["identity_segments"] == 2
    assert first["state"]["identities_written"] == first["identities"]
    assert inc["touched_identities"] <= second["state"]["identities_written"] < second["identities"]


def test_a_release_from_the_state_equals_one_rebuilt_from_the_whole_zone(both):
    """Oracle: outputs, summary counts and the decrypted state itself are those of the rebuild."""
    a, b, sa, sb = both
    assert sa["link_state"].startswith("incremental: ") and sb["link_state"] == "full: no link state from a previous release"
    assert sa["prediction"].startswith("incremental") and sb["prediction"].startswith("incremental")
    for k in ("records", "identities", "persons", "pairs_scored", "pairs_scored_now", "completeness"):
        assert sa[k] == sb[k], k
    assert sa["anchors"]["anchor_groups"] == sb["anchors"]["anchor_groups"]
    assert sa["incremental"]["reachable_identities"] < sb["incremental"]["reachable_identities"] == sb["identities"]
    # households from the state's new records, against those found by reading the previous release's records
    for s in (sa, sb):
        assert s["households_mode"].startswith("incremental") and s["households_recomputed_persons"] > 0, s
    assert sa["households_recomputed_persons"] == sb["households_recomputed_persons"]
    _assert_same_outputs(a, b)


@pytest.mark.parametrize("name", ["identities", "records"])
def test_the_state_carried_equals_the_state_rebuilt(released, both, name):
    """Encodings, facts, addresses, representatives and blocking keys of every identity; every record."""
    _, key, _, _ = released
    a, b, sa, sb = both
    assert (sa["state"]["identity_segments"], sb["state"]["identity_segments"]) == (3, 1)
    ta, tb = _state_table(a, key, name), _state_table(b, key, name)
    assert ta.schema == tb.schema
    con = duckdb.connect()
    con.register("ta", ta)
    con.register("tb", tb)
    assert con.execute("select count(*) from ta").fetchall() == con.execute("select count(*) from tb").fetchall()
    assert con.execute("select * from ta except all select * from tb").fetchall() == []
    assert con.execute("select * from tb except all select * from ta").fetchall() == []


def _files(base):
    return zone_files(base, "identifiers")


def test_the_state_is_not_used_when_it_cannot_be_carried_exactly(released, tmp_path):
    base, key, _, _ = released
    linked = base / "linked"
    ok, reason = link_state.plan(_cfg(), linked, _files(base), key)
    assert ok is not None and ok.new_files and reason.startswith("incremental")
    assert link_state.plan(_cfg(), linked, _files(base), MasterKey(os.urandom(32), "other"))[1] == \
        "full: the link state was written under another key"
    assert link_state.plan(_cfg(incremental=False), linked, _files(base), key)[1] == "full: link.incremental is false"
    assert link_state.plan(_cfg(engine="spark"), linked, _files(base), key)[1] == "full: the link state is used on DuckDB only"
    assert link_state.plan(_cfg(), tmp_path, _files(base), key)[1] == "full: no link state from a previous release"
    listed = sorted(f for f in _files(base) if f not in ok.new_files)
    gone = [f for f in _files(base) if f != listed[0]]
    assert link_state.plan(_cfg(), linked, gone, key)[1] == f"full: identifiers file {listed[0].name} of the link state is gone"
    meta = json.loads((linked / link_state.STATE_DIR / "state.json").read_text())
    assert meta["code"] == link_state.code_fingerprint()


def test_a_zone_file_rewritten_since_the_state_means_a_full_rebuild_with_the_same_result(released, both, tmp_path):
    """A full pseudonymise rewrites every file: a listed file whose size or time changed is never carried."""
    base, key, _, _ = released
    a, _, sa, _ = both
    ws = tmp_path / "ws"
    shutil.copytree(base, ws)
    listed = sorted(f for f in _files(ws) if f.name in {e["name"] for e in json.loads(
        (ws / "linked" / link_state.STATE_DIR / "state.json").read_text())["zone_files"]})
    st = listed[0].stat()
    os.utime(listed[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    summary = link(_cfg(), ws, key)
    assert summary["link_state"] == f"full: identifiers file {listed[0].name} changed since the link state was built"
    _assert_same_outputs(ws, a)


def _link_copy(source, tmp_path, key, module=link_state, **patches):
    """Link a copy of workspace ``source`` (with ``module``'s constants patched); returns it and the summary."""
    ws = tmp_path / "ws"
    shutil.copytree(source, ws)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in patches.items():
            mp.setattr(module, name, value)
        return ws, link(_cfg(), ws, key)


def test_a_link_with_no_new_zone_file_carries_everything_and_changes_nothing(both, released, tmp_path):
    """Linking again before the next delivery (a re-run): no file to decrypt, no segment added, the same outputs."""
    _, key, _, _ = released
    a, _, sa, _ = both
    ws, summary = _link_copy(a, tmp_path, key)
    assert summary["link_state"].startswith("incremental: 0 new identifiers file(s)"), summary["link_state"]
    assert summary["state"]["record_segments"] == sa["state"]["record_segments"]
    assert summary["state"]["identity_segments"] == sa["state"]["identity_segments"]
    assert summary["linked_records"] == {"segments": sa["linked_records"]["segments"], "written": 0}
    assert summary["households_mode"].startswith("incremental: 0 of"), summary["households_mode"]
    assert summary["key_changes"]["carried"] == summary["persons"]
    _assert_same_outputs(ws, a)


def test_identity_segments_are_rewritten_as_one_once_they_replace_too_many_rows(released, both, tmp_path):
    """Past MAX_REPLACED_SHARE the release writes every identity in one segment: the same state, the same outputs."""
    base, key, _, _ = released
    a, _, _, _ = both
    ws, summary = _link_copy(base, tmp_path, key, MAX_REPLACED_SHARE=0.0)
    assert summary["link_state"].startswith("incremental: ")
    assert summary["state"]["identity_segments"] == 1 and summary["state"]["identities_written"] == summary["identities"]
    con = duckdb.connect()
    con.register("ta", _state_table(ws, key, "identities"))
    con.register("tb", _state_table(a, key, "identities"))
    assert con.execute("select count(*) from ta").fetchone()[0] == summary["identities"]
    assert con.execute("select * from ta except all select * from tb").fetchall() == []
    assert con.execute("select * from tb except all select * from ta").fetchall() == []
    _assert_same_outputs(ws, a)


def test_record_segments_past_max_segments_are_rewritten_whole_with_every_column(released, both, tmp_path):
    """A release loads the columns only identity facts read for the touched identities' records alone,
    except when it rewrites the records as one segment: then every record keeps them all."""
    base, key, _, _ = released
    a, _, _, _ = both
    ws, summary = _link_copy(base, tmp_path, key, MAX_SEGMENTS=1)
    assert summary["link_state"].startswith("incremental: ")
    assert summary["state"]["record_segments"] == 1
    mine, theirs = _state_table(ws, key, "records"), _state_table(a, key, "records")
    assert set(link_state.RECORD_FACT_COLUMNS) <= set(mine.column_names) and mine.num_rows == summary["records"]
    con = duckdb.connect()
    con.register("ta", mine)
    con.register("tb", theirs.select(mine.column_names))
    assert con.execute("select count(*) from ta where sex_tok is not null").fetchone()[0] > 0
    assert con.execute("select * from ta except all select * from tb").fetchall() == []
    assert con.execute("select * from tb except all select * from ta").fetchall() == []
    _assert_same_outputs(ws, a)


def test_the_state_holds_no_token_in_clear_and_needs_the_key(released, both):
    base, key, _, _ = released
    a, _, _, _ = both
    folder = a / "linked" / link_state.STATE_DIR
    parquet = sorted(folder.glob("*.enc"))
    assert len(parquet) >= 3 and all(is_encrypted(p) for p in parquet)
    for p in parquet:
        with pytest.raises(KeyMismatchError):
            read_encrypted(p, MasterKey(os.urandom(32), "other"), "identifiers")
        with pytest.raises(duckdb.Error):
            duckdb.connect().execute(f"select * from read_parquet('{p}')").fetchall()
    ids = read_identifiers(a, key)
    values = set()
    for col in ("fn_tok", "sn_tok", "nino_tok", "postcode_tok", "dob_tok"):
        values.update(v for v in ids.column(col).to_pylist()[:200] if v)
    assert len(values) > 100
    blobs = [p.read_bytes() for p in (a / "linked").rglob("*") if p.is_file()]
    leaked = [v for v in values if any(v.encode() in blob for blob in blobs)]
    assert leaked == []


def test_a_release_carries_the_record_segments_and_adds_one_of_its_new_records(released, both):
    """linked/'s records are append-only: the previous release's segments unchanged, then exactly the new records."""
    base, key, first, second = released
    a, b, sa, sb = both
    assert [f.name for f in record_files(a / "linked")] == [f"records.{i:04d}.parquet" for i in range(3)]
    assert first["linked_records"] == {"segments": 1, "written": first["records"]}
    assert second["linked_records"] == {"segments": 2, "written": second["records"] - first["records"]}
    assert sa["linked_records"] == {"segments": 3, "written": sa["records"] - second["records"]} and sa["records"] > second["records"]
    # the state removed: every record in one segment, as a full link writes them
    assert sb["linked_records"] == {"segments": 1, "written": sb["records"]}
    for old in record_files(base / "linked"):
        assert (a / "linked" / old.name).read_bytes() == old.read_bytes(), old.name
    con = duckdb.connect()
    new = {t for (t,) in con.execute(f"select record_token from '{a}/linked/records.0002.parquet'").fetchall()}
    before = {t for (t,) in con.execute(f"select record_token from {records_relation(base / 'linked', False)}").fetchall()}
    now = {t for (t,) in con.execute(f"select record_token from {records_relation(a / 'linked', False)}").fetchall()}
    assert new == now - before and not new & before and len(now) == sa["records"]
    assert con.execute(f"select count(*) from '{a}/linked/records.0002.parquet'").fetchone()[0] == len(new)
    # no person key in a segment: a merge or split changes identities.parquet only
    assert "person_key" not in con.sql(f"select * from '{a}/linked/records.0000.parquet' limit 0").columns


def test_record_segments_are_written_as_one_past_their_bound(released, both, tmp_path):
    base, key, _, _ = released
    a, _, _, _ = both
    ws, summary = _link_copy(base, tmp_path, key, module=linked_records, MAX_SEGMENTS=2)
    assert summary["link_state"].startswith("incremental: ")
    assert summary["linked_records"] == {"segments": 1, "written": summary["records"]}
    assert [f.name for f in record_files(ws / "linked")] == ["records.0000.parquet"]
    _assert_same_outputs(ws, a)


def test_record_segments_that_do_not_add_up_are_written_again(released, both, tmp_path):
    """A previous segment missing (a damaged linked/): its records are not lost, every record is written again."""
    base, key, _, _ = released
    a, _, _, _ = both
    damaged = tmp_path / "damaged"
    shutil.copytree(base, damaged)
    (damaged / "linked" / "records.0001.parquet").unlink()
    ws, summary = _link_copy(damaged, tmp_path, key)
    assert summary["link_state"].startswith("incremental: ")
    assert summary["linked_records"] == {"segments": 1, "written": summary["records"]}
    _assert_same_outputs(ws, a)
