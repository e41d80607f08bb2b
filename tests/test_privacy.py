"""Side channels closed for an attacker without the key (issue 16): row order and retention at rest."""

from __future__ import annotations

import hashlib
import hmac as std_hmac
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from linkage.config import load_config
from linkage.crosswalk import read_crosswalk
from linkage.keys import ENV_KEY, MasterKey
from linkage.pseudonymise.stage import pseudonymise
from linkage.pseudonymise.store import (EncryptedZoneError, ZoneKey, is_encrypted, read_encrypted, read_identifiers,
                                        read_payload, zone_key)
from linkage.schemas import SOURCES
from tests.conftest import copy_workspace

SECRET = hashlib.sha256(b"hhlink privacy test key").digest()     # a fixed test key, generated here
KEY = MasterKey(SECRET, "test")
CFG = load_config()


@pytest.fixture(scope="module")
def ws(ingested_5k, tmp_path_factory):
    """The 5k-person population's landing zone, ingested and pseudonymised by the real stages
    (ingested once per session: a copy of conftest's ``ingested_5k``)."""
    root = copy_workspace(ingested_5k[0], tmp_path_factory.mktemp("privacy") / "ws")
    mp = pytest.MonkeyPatch()
    mp.setenv(ENV_KEY, SECRET.hex())
    pseudonymise(CFG, root)
    yield root
    mp.undo()


def _tokens(path: Path) -> list[str]:
    """The record tokens of one encrypted zone file, in file order (decrypted with the key)."""
    return read_encrypted(path, KEY, path.parent.name, ["record_token"]).column("record_token").to_pylist()


def _staged_position(root: Path) -> dict[str, int]:
    """record token -> its row's position in staged/ (through the crosswalk, with the key)."""
    cw = pa.concat_tables(read_crosswalk(root / "pseudonymised" / "crosswalk.enc", KEY)).to_pylist()
    pos = {}
    for source in SOURCES:
        rows = sorted((r["row"], r["record_token"]) for r in cw if r["source"] == source)
        pos.update({tok: i for i, (_, tok) in enumerate(rows)})
    return pos


@pytest.mark.parametrize("source", SOURCES)
def test_identifiers_and_payload_rows_are_not_in_landing_order(ws, source):
    staged = _staged_position(ws)
    for zone in ("identifiers", "payload"):
        tokens = _tokens(ws / "pseudonymised" / zone / f"{source}.parquet")
        where = np.array([staged[t] for t in tokens])
        n = len(where)
        assert n > 1000
        # a random permutation has about one fixed point and no rank correlation
        assert (where == np.arange(n)).sum() <= 10, zone
        assert abs(np.corrcoef(where, np.arange(n))[0, 1]) < 0.05, zone


@pytest.mark.parametrize("source", SOURCES)
def test_identifiers_and_payload_are_in_orders_unrelated_to_each_other(ws, source):
    ids = _tokens(ws / "pseudonymised" / "identifiers" / f"{source}.parquet")
    pay = _tokens(ws / "pseudonymised" / "payload" / f"{source}.parquet")
    assert sorted(ids) == sorted(pay)
    at = {t: i for i, t in enumerate(pay)}
    where = np.array([at[t] for t in ids])
    assert (where == np.arange(len(ids))).sum() <= 10
    assert abs(np.corrcoef(where, np.arange(len(ids)))[0, 1]) < 0.05


def _oracle_order(tokens: list[str], zone: str, key: MasterKey = KEY) -> list[str]:
    """An independent keyed order: each token encrypted on its own (AES-256 under the standard
    library's HMAC of the zone name with the HKDF 'row_order' subkey), first 8 bytes."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    zone_key = std_hmac.new(key.subkey("row_order"), zone.encode(), hashlib.sha256).digest()

    def sort_key(t: str) -> bytes:
        enc = Cipher(algorithms.AES(zone_key), modes.ECB()).encryptor()
        return (enc.update(bytes.fromhex(t)) + enc.finalize())[:8]
    return sorted(tokens, key=sort_key)


@pytest.mark.parametrize("zone", ["identifiers", "payload"])
def test_row_order_is_the_keyed_permutation(ws, zone):
    # the order is a function of the key and the (random) record token only
    tokens = _tokens(ws / "pseudonymised" / zone / "education.parquet")
    assert tokens == _oracle_order(tokens, zone)
    assert tokens != _oracle_order(tokens, zone, MasterKey(hashlib.sha256(b"another key").digest(), "t"))


# -- retention at rest: pseudonymise.purge_cleartext_after ------------------------------------

def _purging():
    return CFG.model_copy(update={"pseudonymise": CFG.pseudonymise.model_copy(
        update={"purge_cleartext_after": "pseudonymise"})})


def _copy_cleartext(root: Path, to: Path) -> Path:
    for zone in ("staged", "quarantine"):
        shutil.copytree(root / zone, to / zone)
    return to


def test_default_keeps_the_cleartext_zones(ws):
    assert CFG.pseudonymise.purge_cleartext_after == "never"
    assert sorted(p.name for p in (ws / "staged").glob("*.parquet")) == sorted(f"{s}.parquet" for s in SOURCES)
    assert list((ws / "quarantine").glob("*.parquet"))


def test_purge_deletes_staged_and_quarantined_rows_once_pseudonymised_is_published(ws, tmp_path, monkeypatch):
    root = _copy_cleartext(ws, tmp_path)
    rows = {s: pq.ParquetFile(root / "staged" / f"{s}.parquet").metadata.num_rows for s in SOURCES}
    quarantined = len(list((root / "quarantine").glob("*.parquet")))
    monkeypatch.setenv(ENV_KEY, SECRET.hex())
    summary = pseudonymise(_purging(), root)
    assert summary["purged"] == {"staged": len(SOURCES), "quarantine": quarantined}
    assert not list(root.glob("staged/*.parquet")) and not list(root.glob("quarantine/*.parquet"))
    # counts and file hashes stay (no record values); the published zone is whole
    assert (root / "staged" / "manifest.json").exists() and (root / "staged" / "ledger.json").exists()
    for s in SOURCES:
        for zone in ("identifiers", "payload"):
            assert read_encrypted(root / "pseudonymised" / zone / f"{s}.parquet", KEY, zone).num_rows == rows[s]


def test_no_purge_when_pseudonymisation_fails(ws, tmp_path, monkeypatch):
    from linkage.keys import ENV_KEY_FILE, SecretKeyError

    root = _copy_cleartext(ws, tmp_path)
    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.setenv(ENV_KEY_FILE, str(tmp_path / "absent.key"))
    with pytest.raises(SecretKeyError):
        pseudonymise(_purging(), root)
    assert len(list(root.glob("staged/*.parquet"))) == len(SOURCES)
    assert not (root / "pseudonymised").exists()


# -- encryption at rest: identifiers/ and payload/ (linkage.pseudonymise.store) --------------

@pytest.mark.parametrize("zone", ["identifiers", "payload"])
def test_zone_files_give_nothing_without_the_key(ws, zone):
    import duckdb

    for source in SOURCES:
        path = ws / "pseudonymised" / zone / f"{source}.parquet"
        assert is_encrypted(path)
        with pytest.raises(duckdb.Error, match="encrypted"):          # DuckDB: not even the schema
            duckdb.sql(f"SELECT count(*) FROM '{path}'").fetchall()
        with pytest.raises(OSError, match="encrypted|decryption"):    # Arrow: nor the row count
            pq.ParquetFile(path)
        data = path.read_bytes()
        # the footer is encrypted: no column name stands in clear (a plain Parquet file names them all)
        assert b"record_token" not in data and b"sex_tok" not in data and b"fn_bf" not in data


def test_zone_files_are_readable_with_the_key_and_mode_0600(ws):
    ids = read_identifiers(ws, KEY, ["record_token", "source", "fn_bf"])
    pay = {s: read_payload(ws, KEY, s) for s in SOURCES}
    assert ids.num_rows == sum(t.num_rows for t in pay.values()) > 10_000
    assert set(ids.column("source").to_pylist()) == set(SOURCES)
    assert sorted(ids.column("record_token").to_pylist()) == sorted(
        t for p in pay.values() for t in p.column("record_token").to_pylist())
    for path in (ws / "pseudonymised").glob("*/*.parquet"):
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_a_wrong_key_is_refused_with_one_clear_line(ws):
    from linkage.keys import KeyMismatchError

    other = MasterKey(hashlib.sha256(b"not the key").digest(), "test")
    with pytest.raises(KeyMismatchError) as err:
        read_identifiers(ws, other)
    message = str(err.value)
    assert "identifiers/" in message and "another key" in message and "\n" not in message
    assert other.fingerprint in message
    # no key material in the message: neither the master key nor the zone subkey
    for secret in (other.secret, other.subkey("zone:identifiers")):
        assert secret.hex() not in message and secret.hex().upper() not in message
    with pytest.raises(EncryptedZoneError, match="needs the master key"):
        read_payload(ws, None, "education")


def test_one_zone_subkey_reads_its_zone_only(ws):
    from linkage.keys import KeyMismatchError

    ids_key = zone_key(KEY, "identifiers")
    assert "zone" in repr(ids_key) and KEY.subkey("zone:identifiers").hex() not in repr(ids_key)
    assert read_identifiers(ws, ids_key, ["record_token"]).num_rows > 10_000
    with pytest.raises(KeyMismatchError, match="cannot read pseudonymised/payload/"):
        read_payload(ws, ids_key, "education")
    # the payload subkey does not open identifiers either (a different HKDF purpose)
    forged = ZoneKey("identifiers", KEY.subkey("zone:payload"), KEY.fingerprint)
    with pytest.raises(KeyMismatchError):
        read_identifiers(ws, forged)


def test_load_zone_streams_what_read_zone_gives_into_duckdb(ws):
    import duckdb

    from linkage.keys import KeyMismatchError
    from linkage.pseudonymise.store import load_zone, read_zone

    con = duckdb.connect()
    cols = ["fn_bf", "source", "record_token"]            # not the files' order
    load_zone(con, "ids", ws, "identifiers", KEY, cols)
    assert [d[0] for d in con.execute("select * from ids limit 0").description] == cols
    got = con.sql("select * from ids order by record_token").to_arrow_table()
    want = read_identifiers(ws, KEY, cols).sort_by("record_token")
    assert got.num_rows > 10_000 and got.equals(want.cast(got.schema))
    # the payloads' columns differ by source: a column a file lacks is NULL there, as read_zone gives
    load_zone(con, "pay", ws, "payload", KEY)
    merged = read_zone(ws, "payload", KEY)
    assert con.execute("select count(*) from pay").fetchall()[0][0] == merged.num_rows
    assert sorted(d[0] for d in con.execute("select * from pay limit 0").description) == sorted(merged.column_names)
    load_zone(con, "edu", ws, "payload", KEY, sources=["education"])
    assert con.execute("select count(*) from edu").fetchall()[0][0] == read_payload(ws, KEY, "education").num_rows
    with pytest.raises(KeyMismatchError):
        load_zone(con, "x", ws, "identifiers", MasterKey(hashlib.sha256(b"not the key").digest(), "test"))
    with pytest.raises(EncryptedZoneError, match="no column"):
        load_zone(con, "x", ws, "identifiers", KEY, ["record_token", "no_such_column"])
    with pytest.raises(EncryptedZoneError, match="no files"):
        load_zone(con, "x", ws, "payload", KEY, sources=["no_such_source"])


def test_load_files_in_chunks_with_dictionaries_gives_the_file(ws, tmp_path, monkeypatch):
    """Row groups decrypted a chunk at a time, some columns as dictionaries: the same table, the same types."""
    import duckdb

    from linkage.pseudonymise import store

    whole = read_identifiers(ws, KEY, ["record_token", "source", "postcode_tok", "fn_bf", "year"])
    path = tmp_path / "parts.parquet"
    store.write_encrypted(path, whole.to_batches(max_chunksize=997), whole.schema, KEY, "identifiers")
    with store._opened(path, store.zone_key(KEY, "identifiers")) as pf:
        assert pf.num_row_groups > 10
    monkeypatch.setattr(store, "LOAD_CHUNK_ROWS", 2500)   # three row groups a chunk, the last one short
    con = duckdb.connect()
    store.load_files(con, "got", [path], KEY, "identifiers", dictionary=["source", "postcode_tok", "no_such_column"])
    con.register("want", whole)
    assert con.execute("describe got").fetchall() == con.execute("describe select * from want").fetchall()
    assert con.execute("select count(*) from got").fetchone()[0] == whole.num_rows > 10_000
    assert con.execute("select * from got except all select * from want").fetchall() == []
    assert con.execute("select * from want except all select * from got").fetchall() == []


# -- research extracts: pay coarsened by default (assemble.research_pay_rounding) -------------

def test_pay_rounding_hand_worked():
    import duckdb

    from linkage.assemble.stage import pay_rounding_sql

    con = duckdb.connect()
    con.execute("CREATE TABLE t (i INTEGER, paye_pay DOUBLE)")     # DOUBLE, as person_year.paye_pay
    con.execute("INSERT INTO t VALUES (1, 0.0), (2, 120.5), (3, 499.99), (4, 500.0), (5, 1499.0), (6, 1500.0), "
                "(7, 25340.17), (8, NULL)")
    got = con.execute(f"SELECT {pay_rounding_sql('paye_pay', 1000)} FROM t ORDER BY i").fetchall()
    # a positive pay never rounds to 0 (it would turn an employed year into a year without pay)
    assert [r[0] for r in got] == [0, 1000, 1000, 1000, 1000, 2000, 25000, None]
    exact = con.execute(f"SELECT {pay_rounding_sql('paye_pay', 0)} FROM t ORDER BY i").fetchall()
    assert [r[0] for r in exact] == [0.0, 120.5, 499.99, 500.0, 1499.0, 1500.0, 25340.17, None]


def test_default_config_coarsens_research_pay_and_exact_pay_is_an_opt_in():
    assert CFG.assemble.research_pay_rounding == 1000
    assert load_config(assemble={"research_pay_rounding": 0}).assemble.research_pay_rounding == 0
    from linkage.errors import ConfigError

    with pytest.raises(ConfigError, match="research_pay_rounding"):
        load_config(assemble={"research_pay_rounding": -5})


def test_research_extracts_hold_rounded_pay(portal_workspace):
    import duckdb

    from linkage.pseudonymise.store import register_research
    from tests.conftest import PORTAL_KEY_HEX

    ws = portal_workspace
    con = duckdb.connect()
    register_research(con, ws, MasterKey(bytes.fromhex(PORTAL_KEY_HEX), "test"), ["person_year", "household_year"])
    n, off, positive = con.execute("""SELECT count(*), count(*) FILTER (WHERE paye_pay % 1000 <> 0),
                                             count(*) FILTER (WHERE paye_pay > 0)
                                      FROM research_person_year""").fetchall()[0]
    assert n > 10_000 and positive > 1_000 and off == 0
    off = con.execute("""SELECT count(*) FILTER (WHERE paye_income % 1000 <> 0 OR equivalised_income % 1000 <> 0)
                         FROM research_household_year""").fetchall()[0][0]
    assert off == 0
    import json

    assert json.loads((ws / "research" / "metadata.json").read_text())["settings"]["research_pay_rounding"] == 1000


# -- file modes of the engineer's folders: truth/, service/, .flow/ ---------------------------

def test_truth_service_and_flow_files_are_0600_or_0640(run_cli, tmp_path, monkeypatch):
    """What the CLI writes under truth/, service/ and .flow/ is the engineer's (0600) or their group's
    to read (0640): never writable by the group, never readable by others; folders 0700 or 0750."""
    import os
    import stat

    monkeypatch.setenv(ENV_KEY, SECRET.hex())
    monkeypatch.delenv("HHLINK_KEY_FILE", raising=False)
    ws = tmp_path / "ws"
    old = os.umask(0o022)          # a permissive caller: the modes must not depend on it
    try:
        for args in (["generate", "--persons", "300", "--seed", "3"], ["ingest"],
                     ["users", "add", "alice", "--role", "researcher"]):
            code, _, err = run_cli(*args, "--workspace", str(ws))
            assert code == 0, err[-500:]
    finally:
        os.umask(old)
    seen = {}
    for folder in ("truth", "service", ".flow"):
        paths = [p for p in (ws / folder).rglob("*")]
        assert paths, folder
        for p in [ws / folder, *paths]:
            mode = stat.S_IMODE(p.stat().st_mode)
            allowed = (0o700, 0o750) if p.is_dir() else (0o600, 0o640)
            assert mode in allowed, f"{p.relative_to(ws)}: {mode:04o}"
            seen[folder] = seen.get(folder, 0) + 1
    assert seen["truth"] >= 5 and seen[".flow"] >= 2


# -- research/ at rest: the cross-project join an attacker without the keys can no longer make ----

def test_keyless_cross_project_join_reads_nothing_and_the_subkey_holder_joins(portal_workspace):
    """bench/privacy's keyless attacker reads 0 rows of research/ (DuckDB and Arrow both fail), so the
    cross-project joins have no input; a holder of the project's research subkey reads the extract
    and the whole-sequence join finds persons again (the documented residual)."""
    from bench.privacy import attack_cross_project, keyless_reads, research_pay
    from linkage.db import connect
    from linkage.pseudonymise.store import research_key, research_project
    from tests.conftest import PORTAL_KEY_HEX

    ws = portal_workspace
    got, held = keyless_reads(ws)["research"]
    assert got == 0 and held > 10_000
    assert research_pay(ws) is None
    con = connect()
    assert attack_cross_project(con, None) == (0, 0)
    sub = research_key(MasterKey(bytes.fromhex(PORTAL_KEY_HEX), "test"), research_project(ws))
    py = research_pay(ws, sub)
    values, sequences = attack_cross_project(con, py)
    assert len(py) > 1_000 and sequences > 100


def test_nearest_neighbour_pay_sequences_hand_worked():
    """Second extract: pay rounded to GBP 5,000 and each person's last year missing. p1 and p3 have
    equal coarse pay in 2010 but differ in 2011; p5 is p1's twin (a tie names neither); p4 keeps one
    year in the second extract (fewer than two common years: never named)."""
    import pandas as pd

    from bench.privacy import attack_cross_project_nearest

    rows = [("p1", 2010, 21000), ("p1", 2011, 22000), ("p1", 2012, 40000),
            ("p2", 2010, 31000), ("p2", 2011, 33000), ("p2", 2012, 36000),
            ("p3", 2010, 21000), ("p3", 2011, 23000), ("p3", 2012, 50000),
            ("p4", 2011, 60000), ("p4", 2012, 61000)]
    py = pd.DataFrame(rows, columns=["person", "year", "pay"])
    assert attack_cross_project_nearest(py) == 3                      # p1, p2, p3
    twin = pd.DataFrame([("p5", y, p) for _, y, p in rows[:3]], columns=["person", "year", "pay"])
    assert attack_cross_project_nearest(pd.concat([py, twin], ignore_index=True)) == 2   # p2, p3
    assert attack_cross_project_nearest(None) == 0


def test_research_reads_are_cached_per_file_version_and_key(tmp_path):
    """The portal's builder does not decrypt per request: a research file is decrypted once per
    version and key; a rewritten file is read again, and a cached copy never serves another key."""
    import json

    from linkage.keys import KeyMismatchError
    from linkage.pseudonymise.store import read_research, write_research

    (tmp_path / "research").mkdir()
    (tmp_path / "research" / "metadata.json").write_text(json.dumps({"project": "p1"}))
    path = tmp_path / "research" / "cohort.parquet"
    first = pa.table({"child_id": ["a", "b"], "adult_pay": [1000.0, 2000.0]})
    write_research(path, first, first.schema, KEY, "p1")
    a = read_research(tmp_path, KEY, "cohort")
    assert a.equals(first) and read_research(tmp_path, KEY, "cohort") is a
    other = MasterKey(hashlib.sha256(b"another key").digest(), "test")
    with pytest.raises(KeyMismatchError, match="cannot be decrypted with the key given"):
        read_research(tmp_path, other, "cohort")
    second = pa.table({"child_id": ["c"], "adult_pay": [3000.0]})
    write_research(path, second, second.schema, KEY, "p1")      # a new assemble run replaces the file
    assert read_research(tmp_path, KEY, "cohort").equals(second)
    assert read_research(tmp_path, KEY, "cohort", ["child_id"]).column_names == ["child_id"]


# -- bench/privacy's scoring can fail: a deterministic token is re-identified, a context-keyed one is not --

def _surname_table(context: bool, persons: int = 4000, seed: int = 16):
    """A hand-built ``pp`` (one pseudo-person per person) and ``scored`` (the truth) for the surname attack:
    surnames drawn from the attacker's own reference mix; ``sn_tok`` keyed on the surname alone, or on the
    surname and the person's date of birth (the context-keyed encoding of issue 16)."""
    from bench.privacy import name_prior, reference_lists
    from linkage.db import connect

    rng = np.random.default_rng(seed)
    prior = name_prior(reference_lists()[1])
    names = rng.choice(prior.index.to_numpy(), size=persons, p=prior.to_numpy())
    dobs = rng.integers(0, 20 * 365, size=persons)
    tok = [hashlib.sha256(f"{n}\x1f{d if context else ''}".encode()).hexdigest()[:32] for n, d in zip(names, dobs)]
    con = connect()
    con.execute("CREATE TABLE pp (ppid BIGINT, sn_tok VARCHAR)")
    con.executemany("INSERT INTO pp VALUES (?, ?)", list(enumerate(tok)))
    con.execute("CREATE TABLE pp_eth (ppid BIGINT, ethnicity VARCHAR)")
    con.execute("CREATE TABLE scored (sn_tok VARCHAR, sn VARCHAR, sn2 VARCHAR)")
    con.executemany("INSERT INTO scored VALUES (?, ?, NULL)", list(zip(tok, names.tolist())))
    return con


@pytest.mark.parametrize("context", [False, True])
def test_frequency_attack_scores_deterministic_tokens_high_and_context_keyed_tokens_near_zero(context):
    from bench.privacy import attack_surname, field_score, map_guesses, reference_lists

    con = _surname_table(context)
    map_guesses(con, "g", attack_surname(con, reference_lists()[1]))
    right, blind, of = field_score(con, "g", "s.sn_tok", "s.sn", "s.sn2")
    assert of == 4000 and 0 < blind < 0.05 * of          # the commonest surname: a few percent, guessed blind
    advantage = (right - blind) / of
    if context:
        assert advantage < 0.01, advantage                # one token per person: nothing beyond the blind guess
    else:
        assert advantage > 0.10, advantage                # shared tokens: frequency names them


def test_a_coin_flip_on_sex_re_identifies_nobody_and_the_truth_half_the_records():
    """The bench counts only what beats the blind guess (the commonest value named for every record)."""
    from bench.privacy import field_score, map_guesses
    from linkage.db import connect

    rng = np.random.default_rng(3)
    sex = rng.choice(["F", "M"], size=2000, p=[0.52, 0.48])
    con = connect()
    con.execute("CREATE TABLE scored (sex_tok VARCHAR, sex VARCHAR)")
    con.executemany("INSERT INTO scored VALUES (?, ?)", [(f"t{i}", s) for i, s in enumerate(sex)])
    map_guesses(con, "coin", {f"t{i}": c for i, c in enumerate(rng.choice(["F", "M"], size=2000))})
    right, blind, of = field_score(con, "coin", "s.sex_tok", "s.sex")
    assert of == 2000 and blind == (sex == "F").sum() and right - blind < 0.04 * of
    map_guesses(con, "truth", {f"t{i}": s for i, s in enumerate(sex)})
    right, blind, _ = field_score(con, "truth", "s.sex_tok", "s.sex")
    assert right == 2000 and right - blind == (sex == "M").sum()
    map_guesses(con, "none", {})                  # no guess at all: the blind guess stands in, nothing gained
    assert field_score(con, "none", "s.sex_tok", "s.sex")[:2] == (blind, blind)
