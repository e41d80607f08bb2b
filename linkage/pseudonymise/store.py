"""Zones at rest: ``pseudonymised/identifiers/``, ``payload/`` and ``research/`` as encrypted Parquet.

Every file of ``pseudonymised/identifiers/``, ``pseudonymised/payload/`` and ``research/``
is Parquet with modular encryption (AES-GCM, encrypted footer, every column encrypted):
without the key the files give nothing, not even their schema or row count. Each file's
256-bit data key is random and stored in the file wrapped (AES-256-GCM) under a subkey
derived from the master key, one per zone (and per research project):

================ =========================================
zone             subkey (HKDF-SHA256 purpose)
================ =========================================
identifiers/     ``zone:identifiers``
payload/         ``zone:payload``
research/        ``zone:research:<project>``
================ =========================================

so a party given one zone's subkey (say, a linkage operator holding ``zone:identifiers``)
reads that zone only, and learns nothing of the tokens' or Bloom filters' keys; a party
given one research project's subkey reads that project's extract and no other's.
``research/metadata.json`` stays in clear: it holds the project id, key fingerprints,
row counts, settings and the data window, no record value.

The encryption is Arrow's (``pyarrow.parquet.encryption``, OpenSSL). DuckDB 2.0.1 writes
encrypted Parquet only with the ``httpfs`` extension loaded (its built-in mbedtls module
is read-only, and ``force_mbedtls_unsafe`` is named so for a reason); ``httpfs`` cannot be
installed offline. So files are written from Arrow batches and read back as Arrow: the
stages decrypt them chunk by chunk into DuckDB tables (:func:`load_zone`), small readers take
whole Arrow tables (:func:`read_zone`). DuckDB never sees a key, so none of its error
messages can echo one.

Every reader outside the pseudonymise stage goes through this module: link, its report,
assemble and evaluate (:func:`load_zone`), the readers of ``research/`` (disclose, the
portal's table builder: :func:`read_research`, :func:`register_research`), benchmarks and
tests (:func:`read_identifiers`, :func:`read_payload`). Research tables are decrypted once
per file version and key and kept in memory, so the portal's builder does not decrypt per
request.

Example:
    >>> load_zone(con, "identifiers", "workspace", "identifiers", key, ["record_token", "source"])  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pqe
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from linkage.db import quote_ident
from linkage.errors import HhlinkError
from linkage.keys import KeyMismatchError, MasterKey
from linkage.workspace import Workspace

__all__ = ["ZONES", "ZoneKey", "EncryptedZoneError", "zone_key", "write_encrypted", "read_encrypted",
           "read_encrypted_schema", "batches_encrypted", "is_encrypted", "zone_files", "read_zone", "read_identifiers",
           "read_payload", "register", "load_zone", "research_zone", "research_key", "research_project", "write_research",
           "read_research", "register_research", "zone_metadata"]

ZONES = ("identifiers", "payload")
_RESEARCH = "research:"
_NONCE = 12


def research_zone(project: str) -> str:
    """The zone name of one research project's extract (subkey purpose ``zone:research:<project>``)."""
    if not project or not str(project).strip():
        raise ValueError("a research project id is required")
    return _RESEARCH + str(project)


def _where(zone: str) -> str:
    # the folder a zone name stands for, for messages
    if zone.startswith(_RESEARCH):
        return f"research/ (project {zone[len(_RESEARCH):]})"
    return f"pseudonymised/{zone}/"


class EncryptedZoneError(HhlinkError):
    """A zone file cannot be read: no key given, or it is not Parquet this module wrote."""


class ZoneKey:
    """The subkey of one zone (``zone:<name>``); ``repr`` never shows it."""

    __slots__ = ("zone", "_secret", "fingerprint")

    def __init__(self, zone: str, secret: bytes, fingerprint: str = "?"):
        if zone not in ZONES and not (zone.startswith(_RESEARCH) and len(zone) > len(_RESEARCH)):
            raise ValueError(f"unknown encrypted zone {zone!r}; one of {', '.join(ZONES)} or research:<project>")
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
            raise KeyMismatchError(f"the key given is the subkey of {_where(key.zone)}, which cannot "
                                   f"read {_where(zone)}")
        return key
    if not isinstance(key, MasterKey):
        raise EncryptedZoneError(f"{_where(zone)} is encrypted: reading it needs the master key")
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


def _selected(path: Path, schema: pa.Schema, columns: Sequence[str] | None) -> pa.Schema:
    """``schema`` narrowed to ``columns`` in the order asked for (all of it for None).

    Raises:
        EncryptedZoneError: the file lacks one of ``columns`` (one line, naming the file).
    """
    if columns is None:
        return schema
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise EncryptedZoneError(f"{path}: no column(s) {', '.join(missing)}")
    return pa.schema([schema.field(c) for c in columns])


def read_encrypted(path: Path | str, key: MasterKey | ZoneKey, zone: str,
                   columns: Sequence[str] | None = None) -> pa.Table:
    """Decrypt one zone file into an Arrow table (only ``columns``, when given).

    Raises:
        KeyMismatchError: the key is not the one the file was written under (one line, naming the file).
        EncryptedZoneError: no key, or the file is not encrypted Parquet.
    """
    path = Path(path)
    zk = zone_key(key, zone)
    with _opened(path, zk) as pf:
        _selected(path, pf.schema_arrow, columns)
        return pf.read(columns=list(columns) if columns is not None else None)


def batches_encrypted(path: Path | str, key: MasterKey | ZoneKey, zone: str,
                      batch_size: int = 65_536, columns: Sequence[str] | None = None) -> pa.RecordBatchReader:
    """One zone file decrypted batch by batch (a reader DuckDB can scan once without a full copy in memory)."""
    path = Path(path)
    zk = zone_key(key, zone)
    with _opened(path, zk) as pf:
        schema = _selected(path, pf.schema_arrow, columns)

    def batches():
        with _opened(path, zk) as f:
            for batch in f.iter_batches(batch_size=batch_size, columns=list(columns) if columns is not None else None):
                yield batch if columns is None else batch.select(list(columns))   # in the order asked for

    return pa.RecordBatchReader.from_batches(schema, batches())


def read_encrypted_schema(path: Path | str, key: MasterKey | ZoneKey, zone: str) -> pa.Schema:
    """The Arrow schema of one zone file (decrypting its footer only)."""
    path = Path(path)
    with _opened(path, zone_key(key, zone)) as pf:
        return pf.schema_arrow


class _opened:
    """``with _opened(path, zk) as pf``: the decrypting ParquetFile; key errors in one line naming the file."""

    def __init__(self, path: Path, zk: ZoneKey, read_dictionary: Sequence[str] | None = None):
        self.path, self.zk, self.read_dictionary = path, zk, read_dictionary

    def __enter__(self) -> pq.ParquetFile:
        if not is_encrypted(self.path):
            stage = "assemble" if self.zk.zone.startswith(_RESEARCH) else "pseudonymise"
            raise EncryptedZoneError(f"{self.path}: not an encrypted zone file; re-run 'hhlink {stage}'")
        try:
            return pq.ParquetFile(str(self.path), decryption_properties=_decryption(self.zk),
                                  read_dictionary=self.read_dictionary or None)
        except (InvalidTag, OSError, ValueError) as exc:
            self.__exit__(type(exc), exc, None)
            raise

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or not isinstance(exc, (InvalidTag, OSError, ValueError)):
            return False
        if isinstance(exc, InvalidTag) or "InvalidTag" in str(exc) or "decrypt" in str(exc).lower():
            raise KeyMismatchError(
                f"{self.path}: cannot be decrypted with the key given (fingerprint {self.zk.fingerprint}); it "
                f"was written under another key: pass the key {_where(self.zk.zone)} was written with") from None
        raise EncryptedZoneError(f"{self.path}: cannot be read ({exc.__class__.__name__})") from None


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


def load_zone(con, name: str, workspace: Path | str, zone: str, key: MasterKey | ZoneKey,
              columns: Sequence[str] | None = None, sources: Sequence[str] | None = None) -> None:
    """Decrypt every file of ``pseudonymised/<zone>/`` (or those of ``sources``) into DuckDB table ``name``.

    What :func:`register` of :func:`read_zone` gives, without holding the decrypted zone in
    memory: each file is decrypted a chunk at a time (:func:`load_files`) into the table, which DuckDB keeps
    within its memory limit (spilling beyond it). At 1,000,000 persons the identifiers zone
    decrypted into one Arrow table, then copied, held 19 GB before linkage began. Columns
    missing from a file are NULL there, as in :func:`read_zone`.

    Raises:
        EncryptedZoneError: the zone has no files (or none of ``sources``), or a file lacks one of ``columns``.
        KeyMismatchError: a file was written under another key.
    """
    files = [f for f in zone_files(workspace, zone) if sources is None or f.name.split(".")[0] in sources]
    if not files:
        raise EncryptedZoneError(f"{Workspace(workspace).zone('pseudonymised') / zone}: no files; "
                                 "run 'hhlink pseudonymise' first")
    load_files(con, name, files, key, zone, columns)


#: rows :func:`load_files` decrypts at once: enough for Arrow to decode columns and row groups
#: on every core and DuckDB to insert in parallel, bounded so a file is never held whole
LOAD_CHUNK_ROWS = 1 << 20


def load_files(con, name: str, files: Sequence[Path], key: MasterKey | ZoneKey, zone: str,
               columns: Sequence[str] | None = None, dictionary: Sequence[str] = (),
               aside: tuple[str, Sequence[str], str] | None = None) -> None:
    """Decrypt encrypted ``files`` of ``zone`` (the zone's own, or the link state's) into DuckDB table ``name``.

    :func:`load_zone` for a list of files: every footer is checked first, then each file is
    decrypted in chunks of row groups (about :data:`LOAD_CHUNK_ROWS` rows) into the table;
    columns missing from a file are NULL there. A chunk rather than a stream of batches: a
    stream is decoded and inserted on one thread (at 1,000,000 persons the link state's 19.4
    million records took most of a monthly delivery's 21.8 s of loading). ``dictionary``: string
    columns with few distinct values in a row group (a source, a postcode sector), which Arrow
    then decodes as dictionaries rather than one string per row. Both together: 15-17 s to
    about 13 s for the link state's 18.7 million records, offline at 1,000,000 persons.

    ``aside``: ``(table, deferred, where)``: ``name`` gets every column but ``deferred``, and
    the rows matching ``where`` (SQL on the file's columns) go whole into ``table`` too, from
    the same decoded chunk. For columns only a few rows are read for: kept for all, they
    held 2.7 GB of the link state's records in memory at 1,000,000 persons.
    """
    zk = zone_key(key, zone)
    full = [read_encrypted_schema(f, zk, zone) for f in files]   # footers only, checked first
    schemas = [_selected(Path(f), schema, columns) for f, schema in zip(files, full)]
    unified = pa.unify_schemas(schemas, promote_options="default")
    deferred = [c for c in aside[1] if c in unified.names] if aside else []
    register(con, name, pa.schema([fld for fld in unified if fld.name not in deferred]).empty_table())
    if aside:
        register(con, aside[0], unified.empty_table())
    view = f"_arrow_{name}"
    narrow = f'* exclude ({", ".join(quote_ident(c) for c in deferred)})' if deferred else "*"
    for f, schema in zip(files, full):
        with _opened(Path(f), zk, [c for c in dictionary if c in schema.names]) as pf:
            groups, rows = [], 0
            for g in range(pf.num_row_groups):
                groups.append(g)
                rows += pf.metadata.row_group(g).num_rows
                if rows < LOAD_CHUNK_ROWS and g < pf.num_row_groups - 1:
                    continue
                chunk = pf.read_row_groups(groups, columns=list(columns) if columns is not None else None,
                                           use_threads=True)
                groups, rows = [], 0
                con.register(view, chunk)
                try:
                    con.execute(f'insert into "{name}" by name select {narrow} from "{view}"')
                    if aside:
                        con.execute(f'insert into "{aside[0]}" by name select * from "{view}" where {aside[2]}')
                finally:
                    con.unregister(view)
                del chunk


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


# -- research/: one project's extract, encrypted under its subkey -------------------------------

_CACHE: OrderedDict[tuple, pa.Table] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_FILES = 16


def research_key(key: MasterKey | ZoneKey, project: str) -> ZoneKey:
    """The subkey of ``project``'s research extract (HKDF purpose ``zone:research:<project>``)."""
    return zone_key(key, research_zone(project))


def research_project(workspace: Path | str) -> str:
    """The project whose extract ``research/`` holds (from ``research/metadata.json``, kept in clear)."""
    meta = Workspace(workspace).zone("research") / "metadata.json"
    try:
        return str(json.loads(meta.read_text())["project"])
    except (OSError, ValueError, KeyError, TypeError):
        raise EncryptedZoneError(f"{meta}: missing or without a project; run 'hhlink assemble' first") from None


def write_research(path: Path | str, batches: Iterable[pa.RecordBatch] | pa.Table, schema: pa.Schema,
                   key: MasterKey | ZoneKey, project: str) -> int:
    """Write one research table to ``path``, encrypted under ``project``'s subkey; returns rows."""
    if isinstance(batches, pa.Table):
        batches = batches.to_batches()
    return write_encrypted(path, batches, schema, key, research_zone(project))


def read_research(workspace: Path | str, key: MasterKey | ZoneKey, table: str,
                  columns: Sequence[str] | None = None) -> pa.Table:
    """``research/<table>.parquet`` decrypted into an Arrow table (only ``columns``, when given).

    The key is the master key or the project's research subkey (:func:`research_key`);
    another project's subkey raises :class:`KeyMismatchError`. A file is decrypted once
    per version (inode, size, modification time) and key, then served from memory (the
    last 16 files), so the portal's table builder does not decrypt per request.

    Example:
        >>> read_research("ws", key, "cohort", ["child_id", "adult_pay"]).num_rows   # doctest: +SKIP
        4913
    """
    path = Workspace(workspace).zone("research") / f"{table}.parquet"
    if not path.exists():
        raise EncryptedZoneError(f"{path}: missing; run 'hhlink assemble' first")
    zk = research_key(key, research_project(workspace))
    st = path.stat()
    ident = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, zk.zone,
             hashlib.sha256(zk._secret).digest())
    with _CACHE_LOCK:
        hit = _CACHE.get(ident)
        if hit is not None:
            _CACHE.move_to_end(ident)
    if hit is None:
        hit = read_encrypted(path, zk, zk.zone)
        with _CACHE_LOCK:
            for old in [k for k in _CACHE if k[0] == ident[0]]:   # an older version of the same file
                del _CACHE[old]
            _CACHE[ident] = hit
            while len(_CACHE) > _CACHE_FILES:
                _CACHE.popitem(last=False)
    if columns is None:
        return hit
    _selected(path, hit.schema, columns)
    return hit.select(list(columns))


def register_research(con, workspace: Path | str, key: MasterKey | ZoneKey, tables: Sequence[str],
                      prefix: str = "research_") -> list[str]:
    """Register research tables in DuckDB as views ``<prefix><table>`` over their decrypted Arrow tables.

    Views, not copies: registering is instant once a file is in memory (:func:`read_research`).
    Returns the names registered.

    Example:
        >>> register_research(con, "ws", key, ["cohort", "person"])   # doctest: +SKIP
        ['research_cohort', 'research_person']
    """
    names = []
    for table in tables:
        name = f"{prefix}{table}"
        con.register(name, read_research(workspace, key, table))
        names.append(name)
    return names


def zone_metadata(zone: Path | str) -> dict:
    """A zone's ``metadata.json`` (kept in clear: counts, settings, fingerprints), ``{}`` if it has none."""
    try:
        meta = json.loads((Path(zone) / "metadata.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}
