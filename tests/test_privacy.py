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
from linkage.schemas import SOURCES

SECRET = hashlib.sha256(b"hhlink privacy test key").digest()     # a fixed test key, generated here
KEY = MasterKey(SECRET, "test")
CFG = load_config()


@pytest.fixture(scope="module")
def ws(small_population, tmp_path_factory):
    """The 5k-person population's landing zone, ingested and pseudonymised by the real stages."""
    from linkage.ingest.stage import ingest

    root = tmp_path_factory.mktemp("privacy")
    shutil.copytree(small_population[0] / "landing", root / "landing")
    mp = pytest.MonkeyPatch()
    mp.setenv(ENV_KEY, SECRET.hex())
    ingest(CFG, root)
    pseudonymise(CFG, root)
    yield root
    mp.undo()


def _tokens(path: Path) -> list[str]:
    return pq.read_table(path, columns=["record_token"]).column("record_token").to_pylist()


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
            assert pq.ParquetFile(root / "pseudonymised" / zone / f"{s}.parquet").metadata.num_rows == rows[s]


def test_no_purge_when_pseudonymisation_fails(ws, tmp_path, monkeypatch):
    from linkage.keys import ENV_KEY_FILE, SecretKeyError

    root = _copy_cleartext(ws, tmp_path)
    monkeypatch.delenv(ENV_KEY, raising=False)
    monkeypatch.setenv(ENV_KEY_FILE, str(tmp_path / "absent.key"))
    with pytest.raises(SecretKeyError):
        pseudonymise(_purging(), root)
    assert len(list(root.glob("staged/*.parquet"))) == len(SOURCES)
    assert not (root / "pseudonymised").exists()
