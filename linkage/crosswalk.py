"""The encrypted crosswalk: record token -> (source, file, line, row, record_id).

Only the data engineer, who holds the key, can read it, for example to answer a data
owner's question about one record (``hhlink crosswalk lookup TOKEN``). It is a table
serialised as Parquet and encrypted with AES-256-GCM under the ``crosswalk`` subkey, in
segments of at most a few million rows (AES-GCM in ``cryptography`` takes at most
2 GiB per call), each encrypted in one call, never row by row.

File layout::

    magic  b"HHLCW001"                          8 bytes
    key fingerprint (ASCII hex)                 16 bytes
    per segment: nonce (12 random bytes) | ciphertext length (8 bytes, big-endian) | ciphertext

Each segment's associated data binds it to the file, the key and its place:
``magic | fingerprint | segment number | last-segment flag``, so reordered, dropped or
truncated segments fail authentication like altered bytes do. The fingerprint stands in
clear so a wrong key is reported as such before any decryption is tried.

A monthly delivery's rows go into a part file of their own beside it
(``crosswalk.0001.enc``, ``crosswalk.0002.enc``, ...: the same layout, each segment's
associated data also naming the part number), so a delivery never rewrites the rows
before it. :func:`read_crosswalk` of ``crosswalk.enc`` reads the parts after it, in
order; a part renamed to another number fails authentication, a gap in the numbering is
refused.

Example:
    >>> rows = crosswalk_lookup("workspace", "3f9c...", key)   # doctest: +SKIP
"""

from __future__ import annotations

import io
import os
import re
from contextlib import closing
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from linkage.errors import HhlinkError, WorkspaceError
from linkage.keys import KeyMismatchError, MasterKey
from linkage.workspace import Workspace

__all__ = ["CROSSWALK_FILE", "SEGMENT_ROWS", "CrosswalkError", "write_crosswalk", "read_crosswalk",
           "crosswalk_fingerprint", "crosswalk_lookup", "crosswalk_parts", "part_path"]

CROSSWALK_FILE = "crosswalk.enc"
SEGMENT_ROWS = 4_000_000
_MAGIC = b"HHLCW001"
_FP_LEN = 16
_NONCE = 12
_TOKEN = re.compile(r"^[0-9a-f]{32}$")


class CrosswalkError(HhlinkError):
    """The crosswalk is missing, malformed, or fails authentication."""


def _aad(fingerprint: str, index: int, last: bool, part: int = 0) -> bytes:
    # part 0 (crosswalk.enc itself) keeps the associated data it always had
    tail = part.to_bytes(4, "big") if part else b""
    return _MAGIC + fingerprint.encode("ascii") + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00") + tail


_PART = re.compile(r"^(?P<stem>.+)\.(?P<n>\d{4})\.enc$")


def part_path(path: Path | str, part: int) -> Path:
    """The file of part ``part`` of the crosswalk ``path`` (``crosswalk.0003.enc``); part 0 is ``path`` itself."""
    path = Path(path)
    return path if part == 0 else path.with_name(f"{path.name.removesuffix('.enc')}.{part:04d}.enc")


def crosswalk_parts(path: Path | str) -> list[Path]:
    """``path`` and its part files after it, in order (``crosswalk.enc``, ``crosswalk.0001.enc``, ...).

    Raises:
        CrosswalkError: the part numbers have a gap (a part was removed).
    """
    path = Path(path)
    stem = path.name.removesuffix(".enc")
    numbers = sorted(int(m["n"]) for f in path.parent.glob(f"{stem}.*.enc")
                     if (m := _PART.match(f.name)) and m["stem"] == stem)
    if numbers != list(range(1, len(numbers) + 1)):
        raise CrosswalkError(f"{path}: the crosswalk's part files are not numbered 1 to {len(numbers)}; "
                             "a part is missing")
    return [path] + [part_path(path, n) for n in numbers]


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_crosswalk(path: Path | str, key: MasterKey, batches: Iterable[pa.RecordBatch],
                    schema: pa.Schema, segment_rows: int = SEGMENT_ROWS, part: int = 0) -> dict:
    """Encrypt a stream of crosswalk rows into ``path``, a segment of Parquet bytes at a time.

    Args:
        path: the file to write (normally inside a zone being published).
        key: the master key; the ``crosswalk`` subkey encrypts.
        batches: record batches with the crosswalk columns.
        schema: their schema (used for an empty crosswalk).
        segment_rows: rows per encrypted segment.
        part: 0 for ``crosswalk.enc``; n for the part file ``crosswalk.<n>.enc`` (:func:`part_path`)
            holding a later delivery's rows (its number is bound into every segment).

    Returns:
        ``{"rows": n, "segments": s, "bytes": size}``.
    """
    aead = AESGCM(key.subkey("crosswalk"))
    fp = key.fingerprint
    rows = segments = 0

    def segments_of(stream: Iterable[pa.RecordBatch]) -> Iterator[pa.Table]:
        pending: list[pa.RecordBatch] = []
        count = 0
        for batch in stream:
            while batch.num_rows:
                take = min(batch.num_rows, segment_rows - count)
                pending.append(batch.slice(0, take))
                batch = batch.slice(take)
                count += take
                if count == segment_rows:
                    yield pa.Table.from_batches(pending, schema)
                    pending, count = [], 0
        if pending:
            yield pa.Table.from_batches(pending, schema)

    with open(path, "wb") as out:
        out.write(_MAGIC + fp.encode("ascii"))
        previous: bytes | None = None
        for table in segments_of(batches):
            rows += table.num_rows
            if previous is not None:
                _write_segment(out, aead, previous, _aad(fp, segments, last=False, part=part))
                segments += 1
            previous = _parquet_bytes(table)
        if previous is None:
            previous = _parquet_bytes(schema.empty_table())
        _write_segment(out, aead, previous, _aad(fp, segments, last=True, part=part))
        segments += 1
    return {"rows": rows, "segments": segments, "bytes": os.path.getsize(path)}


def _write_segment(out, aead: AESGCM, plaintext: bytes, aad: bytes) -> None:
    nonce = os.urandom(_NONCE)
    ciphertext = aead.encrypt(nonce, plaintext, aad)
    out.write(nonce + len(ciphertext).to_bytes(8, "big") + ciphertext)


def crosswalk_fingerprint(path: Path | str) -> str:
    """The fingerprint of the key a crosswalk was written with (read from its header)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_MAGIC) + _FP_LEN)
    except FileNotFoundError:
        raise CrosswalkError(f"{path}: no crosswalk; run 'hhlink pseudonymise' first") from None
    if len(head) != len(_MAGIC) + _FP_LEN or not head.startswith(_MAGIC):
        raise CrosswalkError(f"{path}: not an hhlink crosswalk file")
    return head[len(_MAGIC):].decode("ascii", errors="replace")


def read_crosswalk(path: Path | str, key: MasterKey) -> Iterator[pa.Table]:
    """Decrypt a crosswalk segment by segment: ``path``, then its part files (:func:`crosswalk_parts`).

    Raises:
        KeyMismatchError: the key is not the one the crosswalk was written with.
        CrosswalkError: the file is malformed, truncated or altered, or a part is missing.
    """
    parts = crosswalk_parts(path) if Path(path).exists() else [Path(path)]
    for number, file in enumerate(parts):
        yield from _read_part(file, key, number)


def _read_part(path: Path, key: MasterKey, part: int) -> Iterator[pa.Table]:
    fp = crosswalk_fingerprint(path)
    if fp != key.fingerprint:
        raise KeyMismatchError(f"the key from {key.origin} (fingerprint {key.fingerprint}) does not match "
                               f"the key this crosswalk was written with (fingerprint {fp})")
    aead = AESGCM(key.subkey("crosswalk"))
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(len(_MAGIC) + _FP_LEN)
        index = 0
        while True:
            header = f.read(_NONCE + 8)
            if len(header) != _NONCE + 8:
                raise CrosswalkError(f"{path}: the crosswalk is truncated")
            nonce, length = header[:_NONCE], int.from_bytes(header[_NONCE:], "big")
            if length > size:
                raise CrosswalkError(f"{path}: the crosswalk is malformed")
            ciphertext = f.read(length)
            last = f.tell() == size
            try:
                plaintext = aead.decrypt(nonce, ciphertext, _aad(fp, index, last, part))
            except InvalidTag:
                raise CrosswalkError(f"{path}: the crosswalk failed authentication (corrupt, truncated "
                                     "or altered)") from None
            # single-threaded: a segment is small, and a lookup that returns mid-file must not
            # leave Arrow's pool threads busy at interpreter exit (seen to abort the CLI once)
            yield pq.read_table(io.BytesIO(plaintext), use_threads=False)
            index += 1
            if last:
                return


def crosswalk_table(con, path: Path | str, key: MasterKey, name: str = "xw",
                    columns: tuple[str, ...] = ("record_token", "source", "record_id")) -> None:
    """Decrypt the crosswalk into the DuckDB table ``name`` (only ``columns``), segment by segment.

    The rows go into DuckDB, within its memory limit (spilling if need be), never into one
    Arrow table in Python's heap: at 1M persons the crosswalk holds 21M rows, and holding
    them beside DuckDB's own memory took evaluation past 11 GB.
    """
    for i, segment in enumerate(read_crosswalk(path, key)):
        con.register("_crosswalk_segment", segment.select(list(columns)))
        con.execute(f"create or replace table {name} as select * from _crosswalk_segment" if i == 0 else
                    f"insert into {name} select * from _crosswalk_segment")
        con.unregister("_crosswalk_segment")


def crosswalk_lookup(workspace: Path | str, token: str, key: MasterKey) -> dict | None:
    """Find the source row of one record token.

    Args:
        workspace: the workspace holding ``pseudonymised/crosswalk.enc``.
        token: a record token (32 hex characters).
        key: the master key the zone was written with.

    Returns:
        ``{"record_token", "source", "file", "line", "row", "record_id"}``, or ``None`` when
        the token is not in the crosswalk.

    Raises:
        CrosswalkError: bad token, missing or altered crosswalk.
        KeyMismatchError: the wrong key.
    """
    token = token.strip().lower()
    if not _TOKEN.match(token):
        raise CrosswalkError("a record token is 32 hexadecimal characters")
    path = Workspace(workspace).zone("pseudonymised") / CROSSWALK_FILE
    if not path.parent.is_dir():
        raise WorkspaceError(f"{path.parent}: no pseudonymised zone; run 'hhlink pseudonymise' first")
    with closing(read_crosswalk(path, key)) as tables:   # the file is closed on an early return
        for table in tables:
            hit = table.filter(pc.equal(table["record_token"], token))
            if hit.num_rows:
                return hit.slice(0, 1).to_pylist()[0]
    return None
