"""The pseudonymise stage on a generated population taken through the real ingest, and hand-worked rows."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac as std_hmac
import json
import re
import shutil
import unicodedata
from pathlib import Path

import duckdb
import jellyfish
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from linkage.config import load_config
from linkage.crosswalk import (CrosswalkError, crosswalk_lookup, crosswalk_parts, part_path, read_crosswalk,
                               write_crosswalk)
from linkage.encodings import BloomEncoder, dice
from linkage.errors import WorkspaceError
from linkage.keys import ENV_KEY, ENV_KEY_FILE, KeyMismatchError, KeyNotFoundError, KeyPermissionError, MasterKey
from linkage.pseudonymise.store import is_encrypted, read_encrypted, zone_files
from linkage.pseudonymise.stage import IDENTIFIER_COLUMNS, PseudonymiseError, bloom_params, pseudonymise
from linkage.schemas import SOURCES, load_schema
from linkage.stages import run_stage
from tests.conftest import copy_workspace

SECRET = hashlib.sha256(b"hhlink pseudonymise test key").digest()     # fixed test keys, generated here
OTHER = hashlib.sha256(b"hhlink pseudonymise other key").digest()
KEY = MasterKey(SECRET, "test")
CFG = load_config()
TOKEN = re.compile(r"^[0-9a-f]{32}$")


def _oracle(domain: str, value: str | None, secret: bytes = SECRET) -> str | None:
    """An independent HMAC token: the standard library over the HKDF 'tokens' subkey."""
    if value is None:
        return None
    return std_hmac.new(MasterKey(secret, "t").subkey("tokens"), domain.encode() + b"\x00" + value.encode(),
                        hashlib.sha256).hexdigest()[:32]


def _context(dob: dt.date | None) -> str:
    """An independent context string: the token of the year and the sorted day and month, "" without a date."""
    if dob is None:
        return ""
    lo, hi = sorted((dob.month, dob.day))
    return _oracle("dobc", f"{dob.year:04d}-{lo:02d}-{hi:02d}")


def _ctx(domain: str, value: str | None, dob: dt.date | None) -> str | None:
    """An independent context token: domain '<domain>@dobc', value US context."""
    return None if value is None else _oracle(f"{domain}@dobc", f"{value}\x1f{_context(dob)}")


def _permuted(bf: bytes | None, field: str, dob: dt.date | None) -> bytes | None:
    """A stored filter's bits permuted as the contract says, computed here with the standard library's HMAC."""
    if bf is None:
        return None
    mac = std_hmac.new(KEY.subkey(f"bloom:{field}"), b"context\x00" + _context(dob).encode(), hashlib.sha256)
    bits = np.unpackbits(np.frombuffer(bf, dtype=np.uint8))
    perm = np.random.Generator(np.random.PCG64(int.from_bytes(mac.digest()[:8], "big"))).permutation(len(bits))
    return np.packbits(bits[perm]).tobytes()


def _name_part(fn: str, sn: str, dob: dt.date, parts: str) -> str:
    fmt = {"y": f"{dob.year:04d}", "m": f"{dob.month:02d}", "d": f"{dob.day:02d}"}
    return _oracle(f"name_{parts}", "\x1f".join([fn, sn, fmt[parts[0]], fmt[parts[1]]]))


@pytest.fixture(scope="module")
def ws(ingested_5k, tmp_path_factory):
    """The 5k-person population's landing zone, ingested by the real ingest and pseudonymised
    (ingested once per session: a copy of conftest's ``ingested_5k``)."""
    root = copy_workspace(ingested_5k[0], tmp_path_factory.mktemp("pseudo") / "ws")
    mp = pytest.MonkeyPatch()
    mp.setenv(ENV_KEY, SECRET.hex())
    summary = pseudonymise(CFG, root)
    yield root, summary
    mp.undo()


@pytest.fixture
def keyed(monkeypatch):
    monkeypatch.setenv(ENV_KEY, SECRET.hex())
    monkeypatch.delenv(ENV_KEY_FILE, raising=False)


def _plain(root: Path, key: MasterKey = KEY) -> Path:
    """A decrypted copy of ``root``'s identifiers/ and payload/ (through the store, the one reader), for SQL."""
    out = root.parent / f"{root.name}-plain-{key.fingerprint}"
    if not out.exists():
        for zone in ("identifiers", "payload"):
            (out / zone).mkdir(parents=True)
            for f in zone_files(root, zone):
                pq.write_table(read_encrypted(f, key, zone), out / zone / f.name)
    return out


def _con(root: Path, key: MasterKey = KEY) -> duckdb.DuckDBPyConnection:
    """A connection with ``cw`` (decrypted crosswalk) and ``j_<source>``: identifiers joined to staged rows."""
    con = duckdb.connect()
    con.register("cw_arrow", pa.concat_tables(read_crosswalk(root / "pseudonymised" / "crosswalk.enc", key)))
    con.execute("CREATE TABLE cw AS SELECT * FROM cw_arrow")
    for s in SOURCES:
        con.execute(f"""CREATE VIEW j_{s} AS SELECT i.*, st.*
            FROM '{_plain(root, key)}/identifiers/{s}.parquet' i JOIN cw USING (record_token)
            JOIN '{root}/staged/{s}.parquet' st ON st._file = cw.file AND st._row = cw.row AND cw.source = '{s}'""")
    return con


def _staged_rows(root: Path, source: str) -> int:
    return pq.ParquetFile(root / "staged" / f"{source}.parquet").metadata.num_rows


# -- the zone's shape -------------------------------------------------------------------------

def test_zone_layout_counts_and_identifiers_contract(ws):
    root, summary = ws
    zone = root / "pseudonymised"
    assert sorted(p.name for p in zone.iterdir()) == ["crosswalk.enc", "identifiers", "metadata.json", "payload"]
    con = duckdb.connect()
    expected = [*IDENTIFIER_COLUMNS, ("claim_tok", "VARCHAR")]
    tokens = 0
    for s in SOURCES:
        assert is_encrypted(zone / "identifiers" / f"{s}.parquet")
        path = _plain(root) / "identifiers" / f"{s}.parquet"
        assert con.execute(f"DESCRIBE SELECT * FROM '{path}'").fetchall() == [
            (n, t, "YES", None, None, None) for n, t in expected]
        n = _staged_rows(root, s)
        assert summary["rows"][s] == n == pq.ParquetFile(path).metadata.num_rows
        bad, sources = con.execute(f"SELECT count(*) FILTER (WHERE NOT regexp_full_match(record_token, '[0-9a-f]{{32}}')),"
                                   f" list(DISTINCT source) FROM '{path}'").fetchall()[0]
        assert bad == 0 and sources == [s]
        tokens += n
    assert con.execute(f"SELECT count(DISTINCT record_token) FROM '{_plain(root)}/identifiers/*.parquet'").fetchall()[0][0] == tokens
    meta = json.loads((zone / "metadata.json").read_text())
    assert meta["key_fingerprint"] == KEY.fingerprint == summary["key_fingerprint"]
    assert meta["bloom_filters"]["fn_bf"]["bits"] == 512 and meta["bloom_filters"]["addr_bf"]["bits"] == 1024
    assert meta["rows"] == summary["rows"] and meta["crosswalk"]["rows"] == tokens
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]      # no temp or spill folders left


def test_payload_holds_attributes_and_tokenised_references_only(ws):
    root, _ = ws
    con = _con(root)
    refs = CFG.pseudonymise.references
    for s in SOURCES:
        schema = load_schema(s)
        assert is_encrypted(root / "pseudonymised" / "payload" / f"{s}.parquet")
        path = _plain(root) / "payload" / f"{s}.parquet"
        cols = pq.read_schema(path).names
        assert cols == ["record_token"] + [refs.get(c.name, c.name) for c in schema.columns
                                           if c.role in ("attribute", "period")]
        identifiers = {c.name for c in schema.columns if c.is_identifier} | set(refs)
        assert not identifiers & set(cols) and not [c for c in cols if c.endswith("_raw") or c.startswith("_")]
        # the same record tokens as the identifiers, and each row's attributes unchanged
        same = con.execute(f"""SELECT count(*) FROM '{path}' p JOIN '{_plain(root)}/identifiers/{s}.parquet' i
                               USING (record_token)""").fetchall()[0][0]
        assert same == _staged_rows(root, s)
        kept = [c for c in cols[1:] if c not in refs.values()]
        checks = " AND ".join(f"p.{c} IS NOT DISTINCT FROM j.{c}" for c in kept)
        assert con.execute(f"SELECT count(*) FILTER (WHERE NOT ({checks})), count(*) FROM '{path}' p "
                           f"JOIN j_{s} j USING (record_token)").fetchall()[0] == (0, _staged_rows(root, s))
    # references: the claim token is the keyed token of claim_id, the same in payload and identifiers
    rows = con.execute(f"""SELECT j.claim_id, p.claim_tok, j.claim_tok FROM '{_plain(root)}/payload/benefits.parquet' p
                           JOIN j_benefits j USING (record_token) USING SAMPLE 500 ROWS""").fetchall()
    assert rows and all(_oracle("claim_id", cid) == a == b for cid, a, b in rows)
    rows = con.execute(f"""SELECT j.employer_ref, p.employer_tok FROM '{_plain(root)}/payload/earnings.parquet' p
                           JOIN j_earnings j USING (record_token) USING SAMPLE 500 ROWS""").fetchall()
    assert rows and all(_oracle("employer_ref", ref) == tok for ref, tok in rows)


# -- the encodings are right, and attached to the right rows -----------------------------------

def _postcode(p):
    p = p.replace(" ", "")
    return f"{p[:-3]} {p[-3:]}", f"{p[:-3]} {p[-3]}", p[:-3]


def _metaphone(name):
    letters = "".join(c for c in unicodedata.normalize("NFKD", name) if "A" <= c <= "Z")
    return jellyfish.metaphone(letters) or None


def _unseal(seal: bytes, subkey: bytes | None = None) -> str:
    """An independent opening of a sex seal: 8-byte nonce, then the code (zero-padded) XOR AES(nonce || 0^8)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    enc = Cipher(algorithms.AES(subkey or KEY.subkey("seal:sex")), modes.ECB()).encryptor()
    pad = enc.update(seal[:8] + bytes(8)) + enc.finalize()
    return bytes(a ^ b for a, b in zip(seal[8:], pad[:8])).rstrip(b"\x00").decode("utf-8", errors="replace")


@pytest.mark.parametrize("source", SOURCES)
def test_every_encoding_matches_an_independent_computation_on_its_own_row(ws, source):
    root, _ = ws
    con = _con(root)
    schema = load_schema(source)
    role = {c.role: c.name for c in schema.columns}
    rows = con.sql(f"SELECT * FROM j_{source} USING SAMPLE 400 ROWS (reservoir, 3)").to_arrow_table().to_pylist()
    assert len(rows) == 400
    params = bloom_params(CFG.pseudonymise)
    fn_bf = BloomEncoder(KEY.subkey("bloom:first_name"), params["fn_bf"])
    sn_bf = BloomEncoder(KEY.subkey("bloom:surname"), params["sn_bf"])
    addr_bf = BloomEncoder(KEY.subkey("bloom:address"), params["addr_bf"])
    for r in rows:
        fn, sn, dob = r[role["first_name"]], r[role["surname"]], r[role["dob"]]
        # names: keyed with the date-of-birth context (dobc_tok)
        assert r["dobc_tok"] == _context(dob)
        assert r["fn_tok"] == _ctx("fn", fn, dob) and r["sn_tok"] == _ctx("sn", sn, dob)
        assert r["fn_initial_tok"] == _ctx("fn_initial", fn[0], dob)
        assert r["fn_phon_tok"] == _ctx("fn_phon", _metaphone(fn), dob)
        assert r["sn_phon_tok"] == _ctx("sn_phon", _metaphone(sn), dob)
        assert r["fn_bf"] == _permuted(fn_bf.encode(fn), "first_name", dob)
        assert r["sn_bf"] == _permuted(sn_bf.encode(sn), "surname", dob)
        assert r["sn_swap_bf"] == _permuted(fn_bf.encode(sn), "first_name", dob)
        middle = r[role["middle_names"]]
        assert r["mn_initial_tok"] == (_ctx("mn_initial", middle[0], dob) if middle else None)
        assert (r["name_ym_tok"], r["name_yd_tok"], r["name_md_tok"]) == tuple(
            _name_part(fn, sn, dob, parts) for parts in ("ym", "yd", "md"))
        assert r["dob_tok"] == _oracle("dob", dob.isoformat())
        assert r["dob_year_tok"] == _oracle("dob_year", f"{dob.year:04d}")
        # no day, month or swapped-date token in the zone: the calendar names their few values
        assert r["dob_month_tok"] is None and r["dob_day_tok"] is None and r["dob_swap_tok"] is None
        assert r["birth_year"] == dob.year
        assert (_unseal(r["sex_seal"]) if r["sex_seal"] is not None else None) == r[role["sex"]]
        pc = r[role["postcode"]]
        parts = _postcode(pc) if pc else (None, None, None)
        # sex for the link model: keyed with the date context and the postcode unit together
        sex = r[role["sex"]]
        assert r["sex_tok"] == (_oracle("sex_place@dobc", f"{sex}\x1f{_context(dob)}\x1f{parts[0]}")
                                if sex and pc else None)
        assert (r["postcode_tok"], r["pc_sector_tok"], r["pc_district_tok"]) == tuple(
            _oracle(d, p) for d, p in zip(("postcode", "pc_sector", "pc_district"), parts))
        assert r["nino_tok"] == (_oracle("nino", r[role["nino"]]) if "nino" in role else None)
        assert r["upn_tok"] == (_oracle("upn", r[role["upn"]]) if "upn" in role else None)
        if "address" in role:
            line = r[role["address"]]
            assert r["addr_bf"] == (addr_bf.encode(" ".join(re.sub(r"[\W_]+", " ", line.upper()).split()))
                                    if line else None)
        else:
            assert r["addr_bf"] is None
        if "benefit_unit" in role:
            assert r["benefit_unit_tok"] == _oracle("benefit_unit", r[role["benefit_unit"]])
            assert r["bu_role"] == r[CFG.pseudonymise.member_role_column]
            assert r["claim_tok"] == _oracle("claim_id", r["claim_id"])
        else:
            assert r["benefit_unit_tok"] is None and r["bu_role"] is None and r["claim_tok"] is None
        period = [c.name for c in schema.columns if c.role == "period"]
        expected_year = int(r[period[0]][:4]) if period else r[CFG.pseudonymise.period_dates[source]].year
        assert r["year"] == expected_year


def test_the_same_value_in_two_sources_gets_the_same_encoding(ws):
    root, _ = ws
    con = _con(root)
    union = " UNION ALL ".join(
        f"SELECT source, forename, surname, dob, postcode, fn_tok, fn_bf, sn_bf, dob_tok, dobc_tok, postcode_tok, "
        f"year(dob) || '-' || least(month(dob), day(dob)) || '-' || greatest(month(dob), day(dob)) AS dobc FROM j_{s}"
        for s in SOURCES)
    con.execute(f"CREATE TABLE u AS {union}")
    # names in their context: the same name and date of birth (up to a day/month swap)
    for value, encodings in (("forename, dobc", ("fn_tok", "fn_bf")), ("surname, dobc", ("sn_bf",)),
                             ("dob", ("dob_tok", "dobc_tok")), ("postcode", ("postcode_tok",))):
        present = " AND ".join(f"{v} IS NOT NULL" for v in value.split(", "))
        shared, inconsistent = con.execute(f"""
            SELECT count(*) FILTER (WHERE n_sources > 1), count(*) FILTER (WHERE n_encodings > 1) FROM (
              SELECT {value}, count(DISTINCT source) n_sources,
                     {" + ".join(f"count(DISTINCT {e})" for e in encodings)} - {len(encodings) - 1} n_encodings
              FROM u WHERE {present} GROUP BY {value})""").fetchall()[0]
        assert shared > 100, value              # plenty of values occur in more than one source
        assert inconsistent == 0, value          # and each has one encoding wherever it occurs


# -- context keying (issue 16) ---------------------------------------------------------------------

def _records(root: Path, truth: Path | None = None) -> duckdb.DuckDBPyConnection:
    """``con`` with table ``u``: every record's identifiers beside its staged values (and its true person)."""
    con = _con(root)
    union = " UNION ALL ".join(
        f"SELECT '{s}' AS source, record_id, forename, surname, dob, year(dob) || '-' || least(month(dob), day(dob)) "
        f"|| '-' || greatest(month(dob), day(dob)) AS dobc, * EXCLUDE (source, record_id, forename, surname, dob) "
        f"FROM (SELECT {', '.join(c for c, _ in IDENTIFIER_COLUMNS)}, record_id, forename, surname, dob FROM j_{s})"
        for s in SOURCES)
    con.execute(f"CREATE TABLE u AS {union}")
    if truth is not None:
        con.execute(f"CREATE OR REPLACE TABLE u AS SELECT u.*, t.person_id FROM u JOIN '{truth}/source_rows.parquet' t "
                    "USING (source, record_id)")
    return con


def _one_to_one(con, key: str, encoding: str) -> tuple[int, int]:
    """(most encodings per ``key`` value, most ``key`` values per encoding) over records with both."""
    present = " AND ".join(f"{c} IS NOT NULL" for c in (*key.split(", "), encoding))
    return con.execute(f"""
        SELECT (SELECT max(n) FROM (SELECT count(DISTINCT {encoding}) n FROM u WHERE {present} GROUP BY {key})),
               (SELECT max(n) FROM (SELECT count(DISTINCT ({key})) n FROM u WHERE {present} GROUP BY {encoding}))
        """).fetchall()[0]


def test_name_encodings_are_equal_exactly_within_one_date_of_birth_context(ws):
    root, _ = ws
    con = _records(root)
    # one encoding per (name, context) and one (name, context) per encoding: records born on other
    # dates never share a name's token or filter, records born the same day (or day/month swapped) always do
    for key, encodings in (("forename, dobc", ("fn_tok", "fn_bf")),
                           ("surname, dobc", ("sn_tok", "sn_bf", "sn_swap_bf"))):
        for encoding in encodings:
            if encoding.endswith("_bf"):    # two names with the same q-grams share a filter, in one context only
                assert _one_to_one(con, key, encoding)[0] == _one_to_one(con, "dobc", encoding)[1] == 1, encoding
            else:
                assert _one_to_one(con, key, encoding) == (1, 1), encoding
    swapped = con.execute("SELECT count(DISTINCT fn_tok), count(DISTINCT dob) FROM u WHERE day(dob) <> month(dob) "
                          "AND day(dob) <= 12 GROUP BY forename, dobc HAVING count(DISTINCT dob) > 1").fetchall()
    assert swapped and all(toks == 1 for toks, _ in swapped)     # swaps occur, and keep the token
    # the same forename in different contexts: unrelated filters (Dice near a random pair's, not 1)
    across = con.execute("""
        WITH f AS (SELECT DISTINCT forename, dobc, fn_bf FROM u WHERE fn_bf IS NOT NULL)
        SELECT a.fn_bf, b.fn_bf FROM f a JOIN f b ON a.forename = b.forename AND a.dobc < b.dobc
        USING SAMPLE 500 ROWS (reservoir, 5)""").fetchall()
    assert len(across) == 500
    assert sum(dice(a, b) for a, b in across) / len(across) < 0.7
    # different forenames in one context: exactly the Dice of the unpermuted filters
    encoder = BloomEncoder(KEY.subkey("bloom:first_name"), bloom_params(CFG.pseudonymise)["fn_bf"])
    within = con.execute("""
        WITH f AS (SELECT DISTINCT forename, dobc, fn_bf FROM u WHERE fn_bf IS NOT NULL)
        SELECT a.forename, b.forename, a.fn_bf, b.fn_bf FROM f a JOIN f b ON a.dobc = b.dobc AND a.forename < b.forename
        USING SAMPLE 300 ROWS (reservoir, 5)""").fetchall()
    assert len(within) == 300
    assert all(dice(x, y) == dice(encoder.encode(a), encoder.encode(b)) for a, b, x, y in within)
    assert sum(dice(x, y) > 0.7 for *_, x, y in within) > 0      # similar names stay similar


def test_encoding_frequencies_follow_people_not_names(ws, small_population):
    root, _ = ws
    con = _records(root, small_population[0] / "truth")
    most_records = con.execute("SELECT max(n) FROM (SELECT count(*) n FROM u GROUP BY person_id)").fetchall()[0][0]
    # in clear, the commonest forename belongs to many people; its token now to one birthday's people
    name_people = con.execute("SELECT max(n) FROM (SELECT count(DISTINCT person_id) n FROM u GROUP BY forename)")
    assert name_people.fetchall()[0][0] > 30
    for column in ("fn_tok", "fn_bf", "fn_phon_tok", "fn_initial_tok", "sn_tok", "sn_phon_tok", "sn_bf", "sn_swap_bf",
                   "mn_initial_tok", "sex_seal", "name_ym_tok", "name_yd_tok", "name_md_tok"):
        records, people = con.execute(f"SELECT max(n), max(p) FROM (SELECT count(*) n, count(DISTINCT person_id) p "
                                      f"FROM u WHERE {column} IS NOT NULL GROUP BY {column})").fetchall()[0]
        assert people <= 4 and records <= 2 * most_records, column   # twins and shared birthdays only
    # the yardstick: the most frequent forename token covers no more records than the most-recorded person
    assert con.execute("SELECT max(n) FROM (SELECT count(*) n FROM u GROUP BY fn_tok)").fetchall()[0][0] <= most_records


def test_sex_is_sealed_per_record_and_opens_only_with_its_subkey(ws):
    """Issue 16: no sex token assemble reads (a token plus the payload told sex apart); ``sex_seal`` is randomised
    encryption under the subkey 'seal:sex': every seal opens to its row's staged sex, no two records
    share one, NULL where sex is NULL, and under any other subkey (tokens', another key's) the
    seals open to noise, not to two codes."""
    root, _ = ws
    con = _con(root)
    rows = con.execute(" UNION ALL ".join(f"SELECT sex_seal, sex FROM j_{s}" for s in SOURCES)).fetchall()
    sealed = [(seal, sex) for seal, sex in rows if seal is not None]
    assert len(rows) > 10_000 and all(sex is None for seal, sex in rows if seal is None)
    assert len(sealed) == sum(sex is not None for _, sex in rows)
    assert all(_unseal(seal) == sex for seal, sex in sealed)
    assert {sex for _, sex in sealed} == {"M", "F"}
    assert len({seal for seal, _ in sealed}) == len(sealed)              # frequency gives nothing
    for wrong in (KEY.subkey("tokens"), MasterKey(OTHER, "t").subkey("seal:sex")):
        opened = {_unseal(seal, wrong) for seal, _ in sealed[:2000]}
        assert len(opened) > 1900 and not opened & {"M", "F"}
    # the same through the library's vectorised reader
    from linkage.pseudonymise.seal import unseal
    assert unseal(KEY.subkey("seal:sex"), [seal for seal, _ in sealed]) == [sex for _, sex in sealed]
    meta = json.loads((root / "pseudonymised" / "metadata.json").read_text())
    assert "sex_seal" in meta["identifiers_columns"] and "sex_tok" in meta["identifiers_columns"]
    assert "sex" not in json.dumps(meta["tokens"]["context"]["keyed"])
    # the link model's sex_tok is keyed with date and postcode: no token is shared across more than a
    # household's people (twins, a couple born on one day), where the seal says nothing at all
    per_token = con.execute(" UNION ALL ".join(
        f"SELECT sex_tok, dobc_tok, postcode_tok FROM j_{s} WHERE sex_tok IS NOT NULL" for s in SOURCES)).fetchall()
    places = {}
    for tok, dobc, postcode in per_token:
        places.setdefault(tok, set()).add((dobc, postcode))
    assert all(len(p) == 1 for p in places.values())


def test_name_and_date_part_tokens_are_equal_exactly_when_names_and_parts_are(ws):
    root, _ = ws
    con = _records(root)
    for column, parts in (("name_ym_tok", "year(dob), month(dob)"), ("name_yd_tok", "year(dob), day(dob)"),
                          ("name_md_tok", "month(dob), day(dob)")):
        assert _one_to_one(con, f"forename, surname, {parts}", column) == (1, 1), column
        # NULL exactly when a name or the date is missing
        assert con.execute(f"SELECT count(*) FROM u WHERE ({column} IS NULL) <> "
                           "(forename IS NULL OR surname IS NULL OR dob IS NULL)").fetchall()[0][0] == 0
        assert con.execute(f"SELECT count(DISTINCT {column}) FROM u").fetchall()[0][0] > 1000
    # they carry name evidence across a mistyped date part: some names share ym but not dob
    assert con.execute("SELECT count(*) FROM (SELECT name_ym_tok FROM u WHERE name_ym_tok IS NOT NULL "
                       "GROUP BY 1 HAVING count(DISTINCT dob) > 1)").fetchall()[0][0] > 0


# -- keys ------------------------------------------------------------------------------------

def _copy_staged(root: Path, to: Path) -> Path:
    shutil.copytree(root / "staged", to / "staged")
    return to


def test_encodings_are_stable_under_one_key_and_differ_under_another(ws, tmp_path, monkeypatch):
    root, _ = ws
    monkeypatch.delenv(ENV_KEY_FILE, raising=False)
    monkeypatch.setenv(ENV_KEY, SECRET.hex())
    again = _copy_staged(root, tmp_path / "again")
    pseudonymise(CFG, again)
    monkeypatch.setenv(ENV_KEY, OTHER.hex())
    other = _copy_staged(root, tmp_path / "other")
    pseudonymise(CFG, other)
    cols = "nino_tok, dob_tok, postcode_tok, fn_tok, sn_tok, fn_bf, addr_bf, dobc_tok"
    first = _con(root).execute(f"SELECT _row, {cols} FROM j_earnings ORDER BY _row").fetchall()
    second = _con(again).execute(f"SELECT _row, {cols} FROM j_earnings ORDER BY _row").fetchall()
    assert first == second                                           # same key: same encodings per row
    tokens = duckdb.sql(f"SELECT record_token FROM '{_plain(root)}/identifiers/*.parquet' INTERSECT "
                        f"SELECT record_token FROM '{_plain(again)}/identifiers/*.parquet'").fetchall()
    assert tokens == []                                              # record tokens are random each run
    third = _con(other, MasterKey(OTHER, "t")).execute(f"SELECT _row, {cols} FROM j_earnings ORDER BY _row").fetchall()
    assert [r[0] for r in third] == [r[0] for r in first]
    for i in range(1, 6):                                            # tokens: none shared across keys
        assert not {r[i] for r in first if r[i]} & {r[i] for r in third if r[i]}
    assert sum(dice(a[6], b[6]) > 0.9 for a, b in zip(first, third)) < len(first) * 0.001
    with pytest.raises(KeyMismatchError, match="does not match"):
        next(read_crosswalk(other / "pseudonymised" / "crosswalk.enc", KEY))


def test_missing_or_exposed_key_writes_nothing(ws, tmp_path, monkeypatch):
    root, _ = ws
    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.delenv(ENV_KEY_FILE, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "nowhere"))
    fresh = _copy_staged(root, tmp_path / "fresh")
    with pytest.raises(KeyNotFoundError):
        pseudonymise(CFG, fresh)
    assert sorted(p.name for p in fresh.iterdir()) == ["staged"]
    key_file = tmp_path / "open.key"
    key_file.write_text(SECRET.hex())
    key_file.chmod(0o644)
    with pytest.raises(KeyPermissionError):
        run_stage("pseudonymise", CFG, fresh, key_file=key_file)   # the way the CLI and flows pass a key file
    monkeypatch.setenv(ENV_KEY, "too short")
    with pytest.raises(Exception, match="neither hex nor base64|at least 32"):
        pseudonymise(CFG, fresh)
    assert sorted(p.name for p in fresh.iterdir()) == ["staged"]


def test_a_failed_run_leaves_the_previous_zone_as_it_was(ws, tmp_path, monkeypatch):
    root, _ = ws
    monkeypatch.setenv(ENV_KEY, SECRET.hex())
    work = _copy_staged(root, tmp_path / "work")
    pseudonymise(CFG, work)
    before = {p: p.read_bytes() for p in (work / "pseudonymised").rglob("*") if p.is_file()}
    monkeypatch.delenv(ENV_KEY)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(KeyNotFoundError):
        pseudonymise(CFG, work)
    # a staged file off its contract fails after the key is loaded: still nothing replaced
    monkeypatch.setenv(ENV_KEY, OTHER.hex())
    con = duckdb.connect()
    broken = work / "staged" / "education.parquet"
    con.execute(f"COPY (SELECT * EXCLUDE (forename) FROM '{root}/staged/education.parquet') TO '{broken}' (FORMAT parquet)")
    with pytest.raises(PseudonymiseError, match="lacks column.*forename"):
        pseudonymise(CFG, work)
    after = {p: p.read_bytes() for p in (work / "pseudonymised").rglob("*") if p.is_file()}
    assert after == before
    assert not [p.name for p in work.iterdir() if p.name.startswith(".")]


def test_no_staged_zone_is_a_clear_error(tmp_path, keyed):
    with pytest.raises(WorkspaceError, match="no staged zone.*hhlink ingest"):
        pseudonymise(CFG, tmp_path)


def test_no_key_material_in_any_output(ws):
    root, _ = ws
    secrets_ = [SECRET, SECRET.hex().encode(), SECRET.hex().upper().encode()]
    import base64

    secrets_.append(base64.b64encode(SECRET))
    for purpose in ("tokens", "crosswalk", "bloom:first_name", "bloom:surname", "bloom:address", "zone:identifiers",
                    "zone:payload", "row_order"):
        sub = KEY.subkey(purpose)
        secrets_ += [sub, sub.hex().encode()]
    files = [p for p in (root / "pseudonymised").rglob("*") if p.is_file()]
    assert len(files) >= 8
    for path in files:
        data = path.read_bytes()
        assert not [s for s in secrets_ if s in data], path


# -- the crosswalk -----------------------------------------------------------------------------

def test_crosswalk_lookup_finds_the_source_row(ws, run_cli, keyed):
    root, _ = ws
    con = _con(root)
    for s in SOURCES:
        token, record_id, file, line, row = con.execute(
            f"SELECT record_token, record_id, _file, _line, _row FROM j_{s} USING SAMPLE 1 ROWS").fetchall()[0]
        hit = crosswalk_lookup(root, token, KEY)
        assert hit == {"record_token": token, "source": s, "file": file, "line": line, "row": row,
                       "record_id": record_id}
        assert crosswalk_lookup(root, token.upper(), KEY) == hit
    code, out, err = run_cli("crosswalk", "lookup", token, "--workspace", str(root))
    assert code == 0, err
    assert re.search(rf"record_id\s+{record_id}", out) and re.search(rf"source\s+{s}", out)
    assert crosswalk_lookup(root, "0" * 32, KEY) is None
    code, _, err = run_cli("crosswalk", "lookup", "0" * 32, "--workspace", str(root))
    assert code == 1 and "not found" in err
    with pytest.raises(CrosswalkError, match="32 hexadecimal"):
        crosswalk_lookup(root, "not-a-token", KEY)


def test_crosswalk_with_the_wrong_key_says_so(ws, run_cli, monkeypatch):
    root, _ = ws
    monkeypatch.setenv(ENV_KEY, OTHER.hex())
    code, _, err = run_cli("crosswalk", "lookup", "a" * 32, "--workspace", str(root))
    assert code != 0 and "does not match" in err and KEY.fingerprint in err
    assert len(err.strip().splitlines()) == 1


def test_crosswalk_segments_and_tampering(tmp_path):
    schema = pa.schema([("record_token", pa.string()), ("row", pa.int64())])
    table = pa.table({"record_token": [f"{i:032x}" for i in range(2500)], "row": list(range(2500))}, schema=schema)
    path = tmp_path / "cw.enc"
    info = write_crosswalk(path, KEY, table.to_batches(max_chunksize=700), schema, segment_rows=1000)
    assert info["rows"] == 2500 and info["segments"] == 3
    assert pa.concat_tables(read_crosswalk(path, KEY)).equals(table)
    data = path.read_bytes()
    assert b"PAR1" not in data and b"0000000000000000000000000000000a" not in data

    def fails(blob: bytes, match: str):
        bad = tmp_path / "bad.enc"
        bad.write_bytes(blob)
        with pytest.raises(CrosswalkError, match=match):
            list(read_crosswalk(bad, KEY))

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    fails(bytes(flipped), "authentication")
    fails(data[:-10], "truncated|authentication")
    # dropping the whole last segment leaves a file whose new last segment was not written as last
    offsets, pos = [], 24                                            # after magic and fingerprint
    while pos < len(data):
        offsets.append(pos)
        pos += 12 + 8 + int.from_bytes(data[pos + 12:pos + 20], "big")
    assert len(offsets) == 3
    fails(data[:offsets[-1]], "authentication")
    fails(data[:24] + data[offsets[1]:], "authentication")          # segments out of place
    fails(b"not a crosswalk at all", "not an hhlink crosswalk")
    empty = write_crosswalk(tmp_path / "empty.enc", KEY, [], schema)
    assert empty["rows"] == 0 and pa.concat_tables(read_crosswalk(tmp_path / "empty.enc", KEY)).num_rows == 0



def test_crosswalk_parts_read_in_order_and_a_moved_or_missing_part_is_refused(tmp_path):
    """A delivery's rows go into crosswalk.<n>.enc; reading crosswalk.enc reads the parts after it."""
    schema = pa.schema([("record_token", pa.string()), ("row", pa.int64())])
    tables = [pa.table({"record_token": [f"{i:032x}" for i in range(a, b)], "row": list(range(a, b))}, schema=schema)
              for a, b in ((0, 1500), (1500, 1600), (1600, 2300))]
    zone = tmp_path / "pseudonymised"
    zone.mkdir()
    path = zone / "crosswalk.enc"
    for n, table in enumerate(tables):
        write_crosswalk(part_path(path, n), KEY, table.to_batches(), schema, segment_rows=1000, part=n)
    assert [p.name for p in crosswalk_parts(path)] == ["crosswalk.enc", "crosswalk.0001.enc", "crosswalk.0002.enc"]
    assert pa.concat_tables(read_crosswalk(path, KEY)).equals(pa.concat_tables(tables))
    assert crosswalk_lookup(tmp_path, f"{2200:032x}", KEY)["row"] == 2200      # found in the last part
    # part 2 renamed part 1 (part 1 gone): its segments name part 2, so it fails authentication
    (zone / "crosswalk.0001.enc").unlink()
    (zone / "crosswalk.0002.enc").rename(zone / "crosswalk.0001.enc")
    with pytest.raises(CrosswalkError, match="authentication"):
        list(read_crosswalk(path, KEY))
    # a gap in the numbering: refused before anything is read
    (zone / "crosswalk.0001.enc").rename(zone / "crosswalk.0002.enc")
    with pytest.raises(CrosswalkError, match="a part is missing"):
        list(read_crosswalk(path, KEY))


# -- hand-worked rows --------------------------------------------------------------------------

_TYPES = {"string": pa.string(), "int": pa.int64(), "float": pa.float64(), "date": pa.date32(), "bool": pa.bool_()}


def _write_staged(root: Path, source: str, rows: list[dict]) -> None:
    """A staged file by hand: every schema column (None unless given), its _raw twin, _file/_line/_row."""
    schema = load_schema(source)
    cols, fields = {}, []
    for c in schema.columns:
        cols[c.name] = [r.get(c.name) for r in rows]
        fields.append(pa.field(c.name, _TYPES[c.type]))
    for c in schema.columns:
        if c.is_identifier and c.role != "record_id":
            cols[f"{c.name}_raw"] = [None if r.get(c.name) is None else str(r[c.name]) for r in rows]
            fields.append(pa.field(f"{c.name}_raw", pa.string()))
    cols["_file"] = [f"{source}.csv"] * len(rows)
    cols["_line"] = list(range(2, len(rows) + 2))
    cols["_row"] = list(range(1, len(rows) + 1))
    fields += [pa.field("_file", pa.string()), pa.field("_line", pa.int64()), pa.field("_row", pa.int64())]
    (root / "staged").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols, schema=pa.schema(fields)), root / "staged" / f"{source}.parquet")


def test_hand_worked_rows(tmp_path, keyed):
    d = dt.date
    _write_staged(tmp_path, "education", [
        {"record_id": "EDU000000001", "academic_year": "2015/16", "upn": "A123456789012", "forename": "JOHN",
         "middle_names": "PAUL GEORGE", "surname": "SMITH", "dob": d(2005, 3, 4), "sex": "M", "postcode": "AB1 2CD",
         "la_code": "E06000001", "school_urn": 100001, "year_group": 5, "fsm": 1, "sen": "N"}])
    _write_staged(tmp_path, "earnings", [
        {"record_id": "ERN0000000001", "tax_year": "2016-17", "nino": "AB123456C", "forename": "JOHN",
         "surname": "SMITH", "dob": d(2005, 4, 3), "sex": "M", "address_line": "1 High Street", "postcode": "AB1 2CE",
         "employer_ref": "123/AB12345", "pay": 100.0},
        {"record_id": "ERN0000000002", "tax_year": "2016-17", "nino": None, "forename": "JOHN", "surname": "SMITH",
         "dob": d(2005, 3, 25), "sex": None, "address_line": "1 HIGH ST.", "postcode": None,
         "employer_ref": "123/AB12345", "pay": 5.0}])
    _write_staged(tmp_path, "benefits", [
        {"record_id": "BEN000000001", "claim_id": "C000000001", "benefit_unit_id": "BU00000001", "member_no": 3,
         "role": "dependant", "forename": "JON", "surname": "SMYTH", "dob": d(2005, 3, 4), "sex": "M",
         "address_line": "1 High Street", "postcode": "AB12CD", "benefit_type": "CB", "start_date": d(2014, 5, 1)}])
    pseudonymise(CFG, tmp_path)
    ids = {s: duckdb.sql(f"SELECT * FROM '{_plain(tmp_path)}/identifiers/{s}.parquet'").to_arrow_table()
           .to_pylist() for s in SOURCES}
    cw = {r["record_token"]: r for r in pa.concat_tables(
        read_crosswalk(tmp_path / "pseudonymised" / "crosswalk.enc", KEY)).to_pylist()}
    edu = ids["education"][0]
    e1, e2 = sorted(ids["earnings"], key=lambda r: cw[r["record_token"]]["row"])
    ben = ids["benefits"][0]
    assert cw[e2["record_token"]]["record_id"] == "ERN0000000002" and cw[edu["record_token"]]["line"] == 2
    # the same name in two sources: the same tokens and filters in the same date-of-birth context (a
    # day/month swap keeps it), unrelated ones in another
    assert edu["dobc_tok"] == e1["dobc_tok"] == ben["dobc_tok"] != e2["dobc_tok"]
    assert edu["fn_tok"] == e1["fn_tok"] != e2["fn_tok"] and edu["fn_bf"] == e1["fn_bf"] != e2["fn_bf"]
    assert edu["sn_swap_bf"] == e1["sn_swap_bf"] != e2["sn_swap_bf"]
    # sex sealed: the same sex, three different seals, each opening to M; none without a sex
    assert len({edu["sex_seal"], e1["sex_seal"], ben["sex_seal"]}) == 3 and e2["sex_seal"] is None
    assert [_unseal(r["sex_seal"]) for r in (edu, e1, ben)] == ["M", "M", "M"]
    assert dice(edu["fn_bf"], e2["fn_bf"]) < 0.8
    # forename, surname and two date parts: 2005-03-25 shares year and month with 2005-03-04, the swap none
    assert edu["name_ym_tok"] == e2["name_ym_tok"] and edu["name_yd_tok"] != e2["name_yd_tok"]
    assert edu["name_md_tok"] != e2["name_md_tok"]
    assert not {edu[c] for c in ("name_ym_tok", "name_yd_tok", "name_md_tok")} & {
        e1[c] for c in ("name_ym_tok", "name_yd_tok", "name_md_tok")}
    assert ben["name_ym_tok"] != edu["name_ym_tok"]                 # JON SMYTH is not JOHN SMITH
    # 2005-04-03 is 2005-03-04 with day and month swapped: one context (above), two dates, one year;
    # no day, month or swap tokens at all
    assert e1["dob_tok"] != edu["dob_tok"] == ben["dob_tok"] and e1["dob_year_tok"] == edu["dob_year_tok"]
    assert {r[c] for r in (edu, e1, e2, ben) for c in ("dob_month_tok", "dob_day_tok", "dob_swap_tok")} == {None}
    assert edu["birth_year"] == 2005 and (edu["year"], e1["year"], ben["year"]) == (2015, 2016, 2014)
    # postcodes: AB1 2CD vs AB1 2CE share sector AB1 2 and district AB1; AB12CD is AB1 2CD
    assert edu["postcode_tok"] != e1["postcode_tok"] and edu["pc_sector_tok"] == e1["pc_sector_tok"]
    assert edu["pc_district_tok"] == e1["pc_district_tok"] and ben["postcode_tok"] == edu["postcode_tok"]
    assert e2["postcode_tok"] is None and e2["sex_seal"] is None and e2["nino_tok"] is None
    # JOHN/JON and SMITH/SMYTH: same initial and Metaphone code (JN, SM0), different tokens, high Dice
    assert ben["fn_tok"] != edu["fn_tok"] and ben["fn_initial_tok"] == edu["fn_initial_tok"]
    assert ben["fn_phon_tok"] == edu["fn_phon_tok"] and ben["sn_phon_tok"] == edu["sn_phon_tok"]
    assert dice(ben["fn_bf"], edu["fn_bf"]) > 0.6 and dice(ben["sn_bf"], edu["sn_bf"]) > 0.6
    # "1 High Street" in two sources is one filter; "1 HIGH ST." is close to it
    assert e1["addr_bf"] == ben["addr_bf"] and edu["addr_bf"] is None
    assert 0.6 < dice(e1["addr_bf"], e2["addr_bf"]) < 1
    assert edu["mn_initial_tok"] == _ctx("mn_initial", "P", d(2005, 3, 4)) and e1["mn_initial_tok"] is None
    assert (ben["bu_role"], ben["benefit_unit_tok"]) == ("dependant", _oracle("benefit_unit", "BU00000001"))
    assert ben["claim_tok"] == _oracle("claim_id", "C000000001") and edu["claim_tok"] is None
    payload = duckdb.sql(f"SELECT * FROM '{_plain(tmp_path)}/payload/earnings.parquet'").to_arrow_table()
    assert set(payload["employer_tok"].to_pylist()) == {_oracle("employer_ref", "123/AB12345")}
    assert "employer_ref" not in payload.column_names


def test_a_configured_postcode_pattern_gives_non_uk_postcodes_their_district_and_sector():
    from linkage.errors import ConfigError
    from linkage.pseudonymise.stage import Encoders

    pattern = r"(?P<sector>(?P<district>\d{2})\d)\d"          # e.g. Australian postcodes
    key = MasterKey(bytes(range(32)), "test")
    enc = Encoders(key, load_config(pseudonymise={"postcode_pattern": pattern}).pseudonymise).for_role("postcode")
    plain = Encoders(key, load_config().pseudonymise).for_role("postcode")
    values = ["2615", "2617", "2715", "SW1A 1AA", "SW1A 1AB"]
    got, before = enc.encode(values), plain.encode(values)
    # 2615 and 2617 share a sector and a district, 2715 neither; without the pattern a 4-digit code's
    # "district" is its first two characters too, but its "sector" drops only the last one
    assert got["pc_sector_tok"][0] == got["pc_sector_tok"][1] != got["pc_sector_tok"][2]
    assert got["pc_district_tok"][0] == got["pc_district_tok"][1] != got["pc_district_tok"][2]
    # UK postcodes the pattern does not match keep their usual parts, token for token
    for col in ("postcode_tok", "pc_sector_tok", "pc_district_tok"):
        assert got[col][3:] == before[col][3:]
    assert got["pc_sector_tok"][3] == got["pc_sector_tok"][4]
    with pytest.raises(ConfigError, match="district"):
        load_config(pseudonymise={"postcode_pattern": r"(\d{2})\d\d"})
    with pytest.raises(ConfigError, match="regular expression"):
        load_config(pseudonymise={"postcode_pattern": r"(?P<district>\d{2"})
