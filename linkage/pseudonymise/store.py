"""The pseudonymised zone at rest: ``identifiers/`` and ``payload/`` as encrypted Parquet.

Every file of ``pseudonymised/identifiers/`` and ``pseudonymised/payload/`` is Parquet
with modular encryption (AES-GCM, encrypted footer, every column encrypted): without
the key the files give nothing, not even their schema or row count. Each file's 256-bit
data key is random and stored in the file wrapped (AES-256-GCM) under a subkey derived
from the master key, one per zone:

================ =========================================
zone             subkey (HKDF-SHA256 purpose)
================ =========================================
identifiers/     ``zone:identifiers``
payload/         ``zone:payload``
================ =========================================

so a party given one zone's subkey (say, a linkage operator holding ``zone:identifiers``)
reads that zone only, and learns nothing of the tokens' or Bloom filters' keys.

The encryption is Arrow's (``pyarrow.parquet.encryption``, OpenSSL). DuckDB 2.0.1 writes
encrypted Parquet only with the ``httpfs`` extension loaded (its built-in mbedtls module
is read-only, and ``force_mbedtls_unsafe`` is named so for a reason); ``httpfs`` cannot be
installed offline. So files are written from Arrow batches and read back into Arrow
tables, which callers register in DuckDB (:func:`register`). DuckDB never sees a key,
so none of its error messages can echo one.

Every reader outside the pseudonymise stage goes through this module: the link stage
(:func:`read_identifiers`), assemble and the linkage report (:func:`read_payload`),
benchmarks and tests.

Example:
    >>> ids = read_identifiers("workspace", key, columns=["record_token", "source"])  # doctest: +SKIP
    >>> register(con, "identifiers", ids)                                            # doctest: +SKIP
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pqe
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from linkage.errors import HhlinkError
from linkage.keys import KeyMismatchError, MasterKey
from linkage.workspace import Workspace

__all__ = ["ZONES", "ZoneKey", "EncryptedZoneError", "zone_key", "write_encrypted", "read_encrypted",
           "is_encrypted", "zone_files", "read_zone", "read_identifiers", "read_payload", "register"]

ZONES = ("identifiers", "payload")
_NONCE = 12


class EncryptedZoneError(HhlinkError):
    """A zone file cannot be read: no key given, or it is not Parquet this module wrote."""


class ZoneKey:
    """The subkey of one zone (``zone:<name>``); ``repr`` never shows it."""

    __slots__ = ("zone", "_secret", "fingerprint")

    def __init__(self, zone: str, secret: bytes, fingerprint: str = "?"):
        if zone not in ZONES:
            raise ValueError(f"unknown encrypted zone {zone!r}; one of {', '.join(ZONES)}")
        self.zone, self._secret, self.fingerprint = zone, bytes(secret), fingerprint

    def __repr__(self) -> str:
        return f"ZoneKey(zone={self.zone!r}, master={self.fingerprint})"

    __str__ = __repr__

    def __reduce__(self):  # never pickled into a cache or task result
        raise TypeError("ZoneKey cannot be pickled")


def zone_key(key: MasterKey | ZoneKey, zone: str) -> ZoneKey:
    """The subkey of ``zone`` from the master key (or ``key`` itself when it is that zone's subkey)."""
    if isinstance(key, ZoneKey):
        if key.zone != zone:
            raise KeyMismatchError(f"the key given is the subkey of pseudonymised/{key.zone}/, which cannot "
                                   f"read pseudonymised/{zone}/")
        return key
    if not isinstance(key, MasterKey):
        raise EncryptedZoneError(f"pseudonymised/{zone}/ is encrypted: reading it needs the master key")
    return ZoneKey(zone, key.subkey(f"zone:{zone}"), key.fingerprint)


class _Kms(pqe.KmsClient):
    """Wraps each file's data key with AES-256-GCM under the zone subkey; the zone name is the AAD."""

    def __init__(self, secret: bytes):
        super().__init__()
        self._aead = AESGCM(secret)

    def wrap_key(self, key_bytes, master_key_identifier):
        nonce = os.urandom(_NONCE)
        sealed = self._aead.encrypt(nonce, bytes(key_bytes), master_key_identifier.encode("ascii"))
        return base64.b64encode(nonce + sealed).decode("ascii")

    def unwrap_key(self, wrapped_key, master_key_identifier):
        raw = base64.b64decode(wrapped_key)
        return self._aead.decrypt(raw[:_NONCE], raw[_NONCE:], master_key_identifier.encode("ascii"))


def _factory(zk: ZoneKey) -> pqe.CryptoFactory:
    # a new factory per call: Arrow caches unwrapped keys per factory, and a cache shared
    # across keys would let a wrong key read a file a right key opened before
    secret = zk._secret
    return pqe.CryptoFactory(lambda _conf: _Kms(secret))


def _encryption(zk: ZoneKey):
    conf = pqe.EncryptionConfiguration(footer_key=zk.zone, uniform_encryption=True, plaintext_footer=False,
                                       double_wrapping=False, internal_key_material=True,
                                       data_key_length_bits=256, encryption_algorithm="AES_GCM_V1")
    return _factory(zk).file_encryption_properties(pqe.KmsConnectionConfig(), conf)


def _decryption(zk: ZoneKey):
    return _factory(zk).file_decryption_properties(pqe.KmsConnectionConfig(),
                                                   pqe.DecryptionConfiguration(cache_lifetime=0))


def write_encrypted(path: Path | str, batches: Iterable[pa.RecordBatch], schema: pa.Schema,
                    key: MasterKey | ZoneKey, zone: str) -> int:
    """Write ``batches`` to ``path`` as encrypted Parquet (zstd) under ``zone``'s subkey; returns rows."""
    zk = zone_key(key, zone)
    rows = 0
    with pq.ParquetWriter(str(path), schema, compression="zstd", encryption_properties=_encryption(zk)) as w:
        for batch in batches:
            if batch.num_rows:
                w.write_batch(batch.cast(schema) if batch.schema != schema else batch)
                rows += batch.num_rows
    os.chmod(path, 0o600)
    return rows


def is_encrypted(path: Path | str) -> bool:
    """True when ``path`` is Parquet with an encrypted footer (magic ``PARE``)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PARE"


def read_encrypted(path: Path | str, key: MasterKey | ZoneKey, zone: str,
                   columns: Sequence[str] | None = None) -> pa.Table:
    """Decrypt one zone file into an Arrow table (only ``columns``, when given).

    Raises:
        KeyMismatchError: the key is not the one the file was written under (one line, naming the file).
        EncryptedZoneError: no key, or the file is not encrypted Parquet.
    """
    path = Path(path)
    zk = zone_key(key, zone)
    if not is_encrypted(path):
        raise EncryptedZoneError(f"{path}: not an encrypted zone file; re-run 'hhlink pseudonymise'")
    try:
        pf = pq.ParquetFile(str(path), decryption_properties=_decryption(zk))
        if columns is not None:
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise EncryptedZoneError(f"{path}: no column(s) {', '.join(missing)}")
        return pf.read(columns=list(columns) if columns is not None else None)
    except (InvalidTag, OSError, ValueError) as exc:
        if isinstance(exc, InvalidTag) or "InvalidTag" in str(exc) or "decrypt" in str(exc).lower():
            raise KeyMismatchError(
                f"{path}: cannot be decrypted with the key given (fingerprint {zk.fingerprint}); it was "
                "written under another key: pass the key pseudonymised/ was written with") from None
        raise EncryptedZoneError(f"{path}: cannot be read ({exc.__class__.__name__})") from None


def zone_files(workspace: Path | str, zone: str) -> list[Path]:
    """The Parquet files of ``pseudonymised/<zone>/``, sorted by name."""
    folder = Workspace(workspace).zone("pseudonymised") / zone
    return sorted(folder.glob("*.parquet")) if folder.is_dir() else []


def read_zone(workspace: Path | str, zone: str, key: MasterKey | ZoneKey, columns: Sequence[str] | None = None,
              sources: Sequence[str] | None = None) -> pa.Table:
    """Every file of ``pseudonymised/<zone>/`` (or those of ``sources``), decrypted and concatenated.

    Files whose columns differ (payloads of different sources) are concatenated with
    ``promote_options="default"``: a column missing from one file is NULL there.
    """
    # a source's rows may span files: <source>.parquet, then <source>.0001.parquet, ... (incremental runs)
    files = [f for f in zone_files(workspace, zone) if sources is None or f.name.split(".")[0] in sources]
    if not files:
        raise EncryptedZoneError(f"{Workspace(workspace).zone('pseudonymised') / zone}: no files; "
                                 "run 'hhlink pseudonymise' first")
    tables = [read_encrypted(f, key, zone, columns) for f in files]
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def read_identifiers(workspace: Path | str, key: MasterKey | ZoneKey,
                     columns: Sequence[str] | None = None) -> pa.Table:
    """``pseudonymised/identifiers/*`` decrypted into one Arrow table (every source).

    Example:
        >>> read_identifiers("ws", key, ["record_token", "fn_bf"]).num_rows   # doctest: +SKIP
        422308
    """
    return read_zone(workspace, "identifiers", key, columns)


def read_payload(workspace: Path | str, key: MasterKey | ZoneKey, source: str,
                 columns: Sequence[str] | None = None) -> pa.Table:
    """``pseudonymised/payload/<source>.parquet`` (and the source's later parts) decrypted into an Arrow table."""
    path = Workspace(workspace).zone("pseudonymised") / "payload" / f"{source}.parquet"
    if not path.exists():
        raise EncryptedZoneError(f"{path}: missing; run 'hhlink pseudonymise' first")
    return read_zone(workspace, "payload", key, columns, sources=[source])


def register(con, name: str, table: pa.Table) -> None:
    """Materialise ``table`` as DuckDB table ``name`` (a table, not a view: the Arrow memory can go)."""
    view = f"_arrow_{name}"
    con.register(view, table)
    try:
        con.execute(f'create or replace table "{name}" as select * from "{view}"')
    finally:
        con.unregister(view)
