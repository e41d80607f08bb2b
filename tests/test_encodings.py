"""Keyed encodings: HMAC tokens, Bloom filters and the Dice coefficient in Python, DuckDB and Spark SQL."""

from __future__ import annotations

import hashlib
import hmac as std_hmac
import os
import random

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linkage.config import load_config
from linkage.encodings import (BloomEncoder, BloomParams, Tokeniser, bit_count_sql, dice, dice_sql, dice_sql_counted,
                               hashes_for_half_fill)
from linkage.keys import derive_key
from linkage.pseudonymise.stage import bloom_params

# fixed test keys, generated here (never a key file): results below are reproducible
KEY = hashlib.sha256(b"hhlink test key one").digest()
OTHER = hashlib.sha256(b"hhlink test key two").digest()

keys = st.binary(min_size=32, max_size=32)
names = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x24F, exclude_characters="_"),
                min_size=1, max_size=30).filter(lambda s: s.strip())


def _default_encoder(key: bytes = KEY, field: str = "fn_bf") -> BloomEncoder:
    return BloomEncoder(key, bloom_params(load_config().pseudonymise)[field])


# -- tokens -----------------------------------------------------------------------------------

def test_token_is_hmac_sha256_of_field_nul_value_truncated_to_128_bits():
    # independent oracle: the standard library's HMAC
    expected = std_hmac.new(KEY, b"sn\x00SMITH", hashlib.sha256).hexdigest()[:32]
    assert Tokeniser(KEY, "sn")("SMITH") == expected
    assert Tokeniser(KEY, "sn").many(["SMITH", None, "SMITH"]) == [expected, None, expected]
    assert Tokeniser(KEY, "sn")(None) is None


def test_tokens_are_separated_by_field():
    assert Tokeniser(KEY, "fn")("MORGAN") != Tokeniser(KEY, "sn")("MORGAN")
    # the NUL separator keeps ("ab", "c") and ("a", "bc") apart
    assert Tokeniser(KEY, "ab")("c") != Tokeniser(KEY, "a")("bc")


@settings(max_examples=60, deadline=None)
@given(key=keys, other=keys, value=names)
def test_pseudonyms_are_deterministic_per_key_and_differ_across_keys(key, other, value):
    tok = Tokeniser(key, "fn")
    assert tok(value) == Tokeniser(key, "fn")(value) == tok.many([value])[0]
    assert len(tok(value)) == 32 and int(tok(value), 16) >= 0
    if other != key:
        assert Tokeniser(other, "fn")(value) != tok(value)


@settings(max_examples=40, deadline=None)
@given(value=names, other_value=names)
def test_distinct_values_get_distinct_tokens(value, other_value):
    tok = Tokeniser(KEY, "sn")
    assert (tok(value) == tok(other_value)) == (value == other_value)


# -- Bloom filters: construction, worked by hand ------------------------------------------------

def test_qgrams_are_padded():
    enc2 = BloomEncoder(KEY, BloomParams(512, 10, q=2))
    assert enc2.qgrams("ANN") == ["_A", "AN", "NN", "N_"]
    enc3 = BloomEncoder(KEY, BloomParams(512, 10, q=3))
    assert enc3.qgrams("ANN") == ["__A", "_AN", "ANN", "NN_", "N__"]


def test_positions_are_keyed_deterministic_and_in_range():
    params = BloomParams(512, 101)          # XOR-folded: positions index the 1024-bit unfolded filter
    a, b = BloomEncoder(KEY, params), BloomEncoder(OTHER, params)
    pa_, pb = a.positions("SM"), b.positions("SM")
    assert len(pa_) == 101 and pa_.min() >= 0 and pa_.max() < 1024
    assert (pa_ == BloomEncoder(KEY, params).positions("SM")).all()
    assert not (pa_ == pb).all()


def _by_hand(enc: BloomEncoder, value: str) -> np.ndarray:
    """The unhardened filter as a 0/1 array: OR of every q-gram's positions."""
    bits = np.zeros(enc.params.base_bits, dtype=np.uint8)
    for gram in enc.qgrams(value):
        bits[enc.positions(gram)] = 1
    return bits


@pytest.mark.parametrize("value", ["ANN", "SMITH", "O'BRIEN-JONES", "ÉLODIE", "97 STATION GREEN"])
def test_filter_is_or_of_qgram_positions_then_hardened(value):
    plain = BloomEncoder(KEY, BloomParams(512, 20, hardening="none"))
    assert plain.encode(value) == np.packbits(_by_hand(plain, value)).tobytes()

    folded = BloomEncoder(KEY, BloomParams(512, 20, hardening="xor_fold"))
    base = _by_hand(folded, value)                        # 1024 bits
    assert folded.encode(value) == np.packbits(base[:512] ^ base[512:]).tobytes()

    balanced = BloomEncoder(KEY, BloomParams(512, 20, hardening="balance"))
    base = _by_hand(balanced, value)                      # 256 bits, then complement and permute
    out = np.unpackbits(np.frombuffer(balanced.encode(value), dtype=np.uint8))
    assert out.sum() == 256                               # every balanced filter has weight m
    unpermuted = np.empty_like(out)
    unpermuted[balanced._perm] = out                      # out[j] = (base ++ ~base)[perm[j]]
    assert (unpermuted[:256] == base).all() and (unpermuted[256:] == 1 - base).all()
    assert sorted(balanced._perm.tolist()) == list(range(512))


@pytest.mark.parametrize("hardening", ["xor_fold", "none"])
def test_levelled_filter_is_the_hardened_one_with_the_fewest_bits_changed_to_half_weight(hardening):
    # oracle written from the definition: positions in the keyed order; a light filter gets its
    # first unset ones set, a heavy one its last set ones cleared, until exactly half are set
    k = 20 if hardening == "none" else 80
    plain = BloomEncoder(KEY, BloomParams(512, k, hardening=hardening))
    levelled = BloomEncoder(KEY, BloomParams(512, k, hardening=hardening, level=True))
    order = levelled._order
    assert sorted(order.tolist()) == list(range(512))
    changed = []
    for value in ["AL", "ANN", "SMITH", "JONATHAN", "BARTHOLOMEW", "O'BRIEN-JONES", "97 STATION GREEN ROAD"]:
        before = np.unpackbits(np.frombuffer(plain.encode(value), dtype=np.uint8))
        expected = before.copy()
        weight = int(before.sum())
        if weight < 256:
            expected[[p for p in order if before[p] == 0][:256 - weight]] = 1
        elif weight > 256:
            expected[[p for p in order if before[p] == 1][-(weight - 256):]] = 0
        out = np.unpackbits(np.frombuffer(levelled.encode(value), dtype=np.uint8))
        assert out.sum() == 256
        assert (out == expected).all(), value
        changed.append(abs(weight - 256))
    assert max(changed) > 0        # the values above do need levelling: the test is not vacuous


def test_levelling_keeps_equal_values_equal_and_similar_ones_similar():
    enc = _default_encoder()
    assert enc.params.level and enc.params.hardening == "xor_fold"      # the shipped default
    weights = {int.from_bytes(enc.encode(v), "big").bit_count() for v in ["AL", "JO", "BARTHOLOMEW", "ELIZABETH"]}
    assert weights == {enc.params.bits // 2}
    assert enc.encode("JONATHAN") == _default_encoder().encode("JONATHAN")
    assert dice(enc.encode("JONATHAN"), enc.encode("JONATHON")) > 0.7
    assert dice(enc.encode("JONATHAN"), enc.encode("PRIYA")) < 0.6
    # the order is keyed: another key levels other positions
    assert not (enc._order == _default_encoder(OTHER)._order).all()


def test_hand_worked_dice_equals_bigram_dice_when_positions_do_not_collide():
    # SMITH: _S SM MI IT TH H_   SMYTH: _S SM MY YT TH H_   -> 4 shared of 6 + 6: Dice 8/12
    enc = BloomEncoder(KEY, BloomParams(8192, 2, hardening="none"))
    grams = set(enc.qgrams("SMITH")) | set(enc.qgrams("SMYTH"))
    positions = np.concatenate([enc.positions(g) for g in grams])
    assert len(set(positions.tolist())) == len(positions)      # precondition: no collisions under KEY
    assert dice(enc.encode("SMITH"), enc.encode("SMYTH")) == pytest.approx(8 / 12)
    # ANN vs ANNE: _A AN NN N_ | _A AN NN NE E_ -> 3 shared: 2*3/(4+5)
    assert dice(enc.encode("ANN"), enc.encode("ANNE")) == pytest.approx(6 / 9)


def test_encode_many_matches_encode_one_at_a_time():
    rng = random.Random(3)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ '-ÉÖ"
    values = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))).strip() or "X" for _ in range(300)]
    for hardening in ("xor_fold", "balance", "none"):
        enc = BloomEncoder(KEY, BloomParams(512, 25 if hardening == "balance" else 60, hardening=hardening))
        many = enc.encode_many(values)
        assert many.type == pa.binary(64)
        assert many.to_pylist() == [BloomEncoder(KEY, enc.params).encode(v) for v in values]


def test_encode_many_batches_do_not_change_results(monkeypatch):
    import linkage.encodings as encodings

    values = [f"NAME{i}" for i in range(50)] + ["A", "LONGER NAME HERE"]
    whole = _default_encoder().encode_many(values).to_pylist()
    monkeypatch.setattr(encodings, "_CHUNK", 7)
    assert _default_encoder().encode_many(values).to_pylist() == whole


def test_empty_values_have_no_encoding():
    enc = _default_encoder()
    assert enc.encode(None) is None and enc.encode("") is None
    with pytest.raises(ValueError, match="empty"):
        enc.encode_many(["A", ""])


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="multiple of 64"):
        BloomParams(500, 10)
    with pytest.raises(ValueError, match="hardening"):
        BloomParams(512, 10, hardening="salt")
    with pytest.raises(ValueError, match="q-grams"):
        BloomParams(512, 10, q=4)


def test_default_parameters_set_about_half_the_bits():
    cfg = load_config().pseudonymise
    assert hashes_for_half_fill(2 * cfg.name_bits, 6 + 1) == cfg.name_hashes
    assert hashes_for_half_fill(2 * cfg.address_bits, 15 + 1) == cfg.address_hashes
    names = ["JOHN", "SARAH", "OLIVER", "CHARLOTTE", "MOHAMMED", "GRACE", "WILLIAMS", "TAYLOR", "ALEXANDER", "LI"]
    fills = [np.unpackbits(np.frombuffer(b, np.uint8)).mean() for b in _default_encoder().encode_many(names).to_pylist()]
    assert 0.42 <= float(np.mean(fills)) <= 0.52
    assert min(fills) > 0.3 and max(fills) < 0.6      # folding keeps the weight near half whatever the length
    addresses = ["1 HIGH STREET", "97 STATION GREEN", "FLAT 3 24 QUEENS ROAD", "12 PARK AVENUE"]
    fills = [np.unpackbits(np.frombuffer(b, np.uint8)).mean()
             for b in _default_encoder(field="addr_bf").encode_many(addresses).to_pylist()]
    assert 0.42 <= float(np.mean(fills)) <= 0.52


def test_the_same_name_gets_the_same_filter_under_one_key_only():
    a = _default_encoder(derive_key(KEY, "bloom:first_name"))
    b = _default_encoder(derive_key(KEY, "bloom:first_name"))
    c = _default_encoder(derive_key(OTHER, "bloom:first_name"))
    assert a.encode("JONATHAN") == b.encode("JONATHAN")
    assert a.encode("JONATHAN") != c.encode("JONATHAN")
    # unrelated filters under different keys look like unrelated names
    assert dice(a.encode("JONATHAN"), c.encode("JONATHAN")) < 0.65


# -- Dice: near names high, unrelated names low --------------------------------------------------

NEAR = [("JONATHAN", "JONATHON"), ("CATHERINE", "KATHERINE"), ("SMITH", "SMYTH"), ("ANN", "ANNE"),
        ("MICHAEL", "MICHEAL"), ("THOMPSON", "THOMSON")]
FAR = [("JONATHAN", "PRIYA"), ("SMITH", "WILLIAMS"), ("CATHERINE", "BOB"), ("ANN", "GEORGE"),
       ("MICHAEL", "ZOE"), ("THOMPSON", "AHMED")]


def test_dice_hand_worked_values():
    assert dice(bytes([0b11110000]), bytes([0b11000000])) == pytest.approx(2 * 2 / (4 + 2))
    assert dice(bytes([0b10101010]), bytes([0b10101010])) == 1.0
    assert dice(bytes([0b11110000]), bytes([0b00001111])) == 0.0
    assert dice(bytes(2), bytes(2)) is None and dice(None, bytes(2)) is None
    with pytest.raises(ValueError):
        dice(bytes(1), bytes(2))


def test_near_names_score_high_and_unrelated_names_low_with_the_default_encoding():
    enc = _default_encoder(derive_key(KEY, "bloom:first_name"))
    near = {p: dice(enc.encode(p[0]), enc.encode(p[1])) for p in NEAR}
    far = {p: dice(enc.encode(p[0]), enc.encode(p[1])) for p in FAR}
    assert dice(enc.encode("JONATHAN"), enc.encode("JONATHAN")) == 1.0
    assert min(near.values()) > max(far.values()), (near, far)
    assert min(near.values()) >= 0.6 and max(far.values()) <= 0.56
    # chance level: half-full filters of unrelated names overlap by about half
    assert 0.35 <= float(np.mean(list(far.values()))) <= 0.55


def test_near_and_unrelated_names_separate_under_every_key():
    # the gap holds on average across keys, not only for the fixed test key
    near, far = [], []
    for i in range(12):
        enc = _default_encoder(hashlib.sha256(f"key {i}".encode()).digest())
        near += [dice(enc.encode(a), enc.encode(b)) for a, b in NEAR]
        far += [dice(enc.encode(a), enc.encode(b)) for a, b in FAR]
    assert np.mean(near) > 0.65 and np.mean(far) < 0.52 and np.mean(near) - np.mean(far) > 0.15


def test_balanced_filters_complement_pairs_can_be_found_from_a_column():
    # why balancing is not the default: anyone holding many balanced filters finds each bit's
    # complement (the two are never equal), undoes the balancing and faces plain Bloom filters
    enc = BloomEncoder(KEY, BloomParams(128, 10, hardening="balance"))
    rng = random.Random(5)
    values = ["".join(rng.choice("ABCDEFGHIJKLMNOPRSTW") for _ in range(rng.randint(3, 9))) for _ in range(400)]
    bits = np.unpackbits(np.frombuffer(b"".join(enc.encode_many(values).to_pylist()), np.uint8)).reshape(400, 128)
    complement = (bits[:, :, None] != bits[:, None, :]).all(axis=0)
    assert complement.sum(axis=1).tolist() == [1] * 128       # every bit has exactly one partner
    folded = BloomEncoder(KEY, BloomParams(128, 20, hardening="xor_fold"))
    bits = np.unpackbits(np.frombuffer(b"".join(folded.encode_many(values).to_pylist()), np.uint8)).reshape(400, 128)
    assert (bits[:, :, None] != bits[:, None, :]).all(axis=0).sum() == 0


# -- Dice in SQL ------------------------------------------------------------------------------

def _assert_dice_of(pairs, got: dict) -> None:
    # got[i]: the SQL's Dice of pairs[i]; Python's dice() is the reference
    for i, (a, b) in enumerate(pairs):
        expected = dice(a, b)
        assert (got[i] is None) == (expected is None), i
        if expected is not None:
            assert got[i] == pytest.approx(expected, abs=1e-12), i


def test_dice_sql_duckdb_matches_python_on_random_and_encoded_filters():
    rng = np.random.default_rng(11)
    enc = _default_encoder()
    names_ = ["JONATHAN", "JONATHON", "SMITH", "SMYTH", "PRIYA", "ANNE", "ANN", "WILLIAMS"]
    pairs = [(rng.bytes(64), rng.bytes(64)) for _ in range(200)]
    pairs += [(rng.bytes(128), rng.bytes(128)) for _ in range(50)]
    pairs += [(enc.encode(a), enc.encode(b)) for a in names_ for b in names_]
    pairs += [(bytes(64), bytes(64)), (None, rng.bytes(64)), (rng.bytes(64), None),
              (bytes([255]) * 64, bytes([255]) * 64)]
    table = pa.table({"id": list(range(len(pairs))), "l": [p[0] for p in pairs], "r": [p[1] for p in pairs]},
                     schema=pa.schema([("id", pa.int64()), ("l", pa.binary()), ("r", pa.binary())]))
    con = duckdb.connect()
    con.register("pairs", table)
    got = dict(con.execute(f"SELECT id, {dice_sql('l', 'r')} FROM pairs").fetchall())
    _assert_dice_of(pairs, got)


def test_dice_sql_counted_reads_stored_counts_and_gives_the_same_dice():
    rng = np.random.default_rng(12)
    enc = _default_encoder()
    names_ = ["JONATHAN", "JONATHON", "SMITH", "SMYTH", "PRIYA", "ANNE"]
    pairs = [(rng.bytes(64), rng.bytes(64)) for _ in range(100)]
    pairs += [(enc.encode(a), enc.encode(b)) for a in names_ for b in names_]
    pairs += [(bytes(64), bytes(64)), (None, rng.bytes(64)), (rng.bytes(64), None)]
    con = duckdb.connect()
    con.register("raw", pa.table({"id": list(range(len(pairs))), "fn_bf_l": [p[0] for p in pairs],
                                  "sn_swap_bf_r": [p[1] for p in pairs]},
                                 schema=pa.schema([("id", pa.int64()), ("fn_bf_l", pa.binary()),
                                                   ("sn_swap_bf_r", pa.binary())])))
    # the counts hold what dice_sql would compute per record; poison them to show they are read
    con.execute(f"CREATE TABLE pairs AS SELECT *, {bit_count_sql('fn_bf_l')} AS fn_bf_n_l, "
                f"{bit_count_sql('sn_swap_bf_r')} AS sn_swap_bf_n_r FROM raw")
    plain = dice_sql("fn_bf_l", "sn_swap_bf_r")
    counted = dice_sql_counted(f"{plain} >= 0.5 OR {plain} IS NULL")
    assert "bit_count((fn_bf_l)::BITSTRING) +" not in counted and counted.count("fn_bf_n_l + sn_swap_bf_n_r") == 2
    got = dict(con.execute(f"SELECT id, {dice_sql_counted(plain)} FROM pairs").fetchall())
    _assert_dice_of(pairs, got)
    con.execute("UPDATE pairs SET fn_bf_n_l = fn_bf_n_l + 100")
    moved = dict(con.execute(f"SELECT id, {dice_sql_counted(plain)} FROM pairs WHERE id < 100").fetchall())
    assert all(moved[i] < got[i] for i in moved if got[i])
    # other expressions (not <name>_bf_<l|r>) are left as they were
    assert dice_sql_counted(dice_sql("a.addr_bf", "b.addr_bf")) == dice_sql("a.addr_bf", "b.addr_bf")


def test_dice_sql_works_on_expressions_and_rejects_unknown_dialects():
    con = duckdb.connect()
    sql = dice_sql("CAST('\\xF0'::BLOB AS BLOB)", "'\\xC0'::BLOB")
    assert con.execute(f"SELECT {sql}").fetchall()[0][0] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="dialect"):
        dice_sql("a", "b", "postgres")


def _emulate_spark_words(blob: bytes) -> list[int]:
    # what the Spark expression reads: for i in sequence(0, length/4 - 1), the 4 bytes at
    # substring(b, i*4+1, 4) (1-based), hex() then conv(.., 16, 10) as a BIGINT
    return [int(blob[i * 4:i * 4 + 4].hex().upper(), 16) for i in range(len(blob) // 4)]


def test_dice_sql_spark_string_parses_and_its_word_arithmetic_is_exact():
    sqlglot = pytest.importorskip("sqlglot")
    sql = dice_sql("fn_bf_l", "fn_bf_r", "spark")
    sqlglot.parse_one(sql, read="spark")                      # valid Spark SQL, lambdas included
    assert sql.count("bit_count(") == 3 and "nullif(" in sql
    assert "substring(fn_bf_l, i * 4 + 1, 4)" in sql and "substring(fn_bf_r, i * 4 + 1, 4)" in sql
    assert "sequence(0, CAST(length(fn_bf_l) / 4 AS INT) - 1)" in sql
    rng = np.random.default_rng(2)
    for _ in range(50):
        a, b = rng.bytes(64), rng.bytes(64)
        wa, wb = _emulate_spark_words(a), _emulate_spark_words(b)
        inter = sum((x & y).bit_count() for x, y in zip(wa, wb))
        total = sum(x.bit_count() for x in wa) + sum(y.bit_count() for y in wb)
        assert 2 * inter / total == pytest.approx(dice(a, b), abs=1e-12)


@pytest.mark.slow
def test_dice_sql_spark_runs_on_spark():
    """Runs the Spark expression on a local Spark session (skipped without pyspark and Java)."""
    pytest.importorskip("pyspark")
    import shutil

    if not shutil.which("java") and not os.environ.get("JAVA_HOME"):
        pytest.skip("no Java runtime for Spark")
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    # reuse a session another test started (and leave it running); stop only the one made here
    spark = SparkSession.getActiveSession()
    own = spark is None
    if own:
        spark = (SparkSession.builder.master("local[1]").appName("hhlink-dice-test")
                 .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "1").getOrCreate())
    try:
        _check_spark_dice(spark)
    finally:
        if own:
            spark.stop()


def _check_spark_dice(spark) -> None:
    rng = np.random.default_rng(4)
    rows = [(i, rng.bytes(64), rng.bytes(64)) for i in range(40)]
    rows += [(40, bytes(64), bytes(64)), (41, None, rng.bytes(64))]
    spark.createDataFrame(rows, "id long, l binary, r binary").createOrReplaceTempView("hhlink_dice_pairs")
    got = {r.id: r.d for r in spark.sql(f"SELECT id, {dice_sql('l', 'r', 'spark')} AS d FROM hhlink_dice_pairs").collect()}
    for i, a, b in rows:
        expected = dice(a, b) if a is not None else None
        assert (got[i] is None) == (expected is None), i
        if expected is not None:
            assert got[i] == pytest.approx(expected, abs=1e-12)
