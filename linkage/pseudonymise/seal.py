"""Sealed values: a short code (sex) stored per record under randomised encryption (issue 16).

A seal is ``nonce || ciphertext``: an 8-byte random nonce drawn per record, then the code's
bytes, zero-padded to 8, XOR the first 8 bytes of AES-256 (ECB, one block) of the nonce padded to
16 bytes, under the HKDF subkey :data:`SEAL_SUBKEY`. Two records with the same code share a seal
only if they draw the same nonce (about 1 in 10^5 at 21 million records), so a seal's frequency
says nothing; without the subkey its 8 code bytes are a one-time pad. Keystreams of all records
are computed in one AES call (:func:`keystreams`); the XOR runs in DuckDB (:func:`seal_sql`).

Example (the seal the pseudonymiser builds in SQL, built here by hand):
    >>> import os
    >>> subkey, nonce = os.urandom(32), nonces(1)
    >>> sealed = nonce + (code_int("M") ^ int(keystreams(subkey, nonce)[0])).to_bytes(CODE_BYTES, "big")
    >>> unseal(subkey, [sealed, None])
    ['M', None]
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["SEAL_SUBKEY", "aes_block_words", "code_int", "keystreams", "nonces", "seal_sql", "unseal", "unseal_codes"]

SEAL_SUBKEY = "seal:sex"
NONCE_BYTES = 8
CODE_BYTES = 8


def nonces(n: int) -> bytes:
    """n random nonces of :data:`NONCE_BYTES` bytes each, concatenated (os.urandom via secrets)."""
    return secrets.token_bytes(NONCE_BYTES * n)


def aes_block_words(key: bytes, blocks: bytes) -> np.ndarray:
    """The first 8 bytes (big-endian uint64) of AES-256 of each 16-byte block, all blocks in one call.

    ECB on purpose: every block is distinct random data (a nonce, a record token), so no
    pattern repeats; the row order and the seals use it as a keyed pseudorandom function.
    """
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return np.frombuffer(enc.update(blocks) + enc.finalize(), dtype=">u8").reshape(-1, 2)[:, 0].astype(np.uint64)


def keystreams(subkey: bytes, raw_nonces: bytes) -> np.ndarray:
    """The 8-byte keystream of each nonce as uint64: AES-256 of the nonce zero-padded to a block."""
    n = len(raw_nonces) // NONCE_BYTES
    blocks = np.zeros((n, 16), dtype=np.uint8)
    blocks[:, :NONCE_BYTES] = np.frombuffer(raw_nonces, dtype=np.uint8).reshape(n, NONCE_BYTES)
    return aes_block_words(subkey, blocks.tobytes())


def code_int(code: str | None) -> int | None:
    """The code's bytes zero-padded to 8, as a big-endian integer (None for None or blank).

    A code longer than 8 bytes keeps its first 8 (sex is staged as M, F or the source's own
    word for unknown; assemble reads only M and F).
    """
    raw = (code or "").encode("utf-8").replace(b"\x00", b"")[:CODE_BYTES]
    return int.from_bytes(raw.ljust(CODE_BYTES, b"\x00"), "big") if raw else None


def seal_sql(code: str, nonce: str, keystream: str) -> str:
    """DuckDB expression of the seal (BLOB) from a UBIGINT code, a BLOB nonce and a UBIGINT keystream.

    NULL when the code is NULL.
    """
    return f"({nonce} || unhex(lpad(hex(xor({code}, {keystream})), {2 * CODE_BYTES}, '0')))"


def unseal_codes(subkey: bytes, seals: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The code integer (:func:`code_int`) of each seal, NULL for NULL: one AES call over every nonce.

    A wrong subkey gives garbage, never an error.
    """
    arr = seals.combine_chunks() if isinstance(seals, pa.ChunkedArray) else seals
    arr = arr.cast(pa.binary())
    width = NONCE_BYTES + CODE_BYTES
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    present = arr.drop_null()
    offsets = np.frombuffer(present.buffers()[1], dtype=np.int32)[present.offset:present.offset + len(present) + 1]
    if len(present) and not (np.diff(offsets) == width).all():
        raise ValueError(f"seal at position {int(np.argmax(np.diff(offsets) != width))} is not {width} bytes")
    data = np.frombuffer(present.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]].reshape(-1, width) \
        if len(present) else np.zeros((0, width), dtype=np.uint8)
    pads = keystreams(subkey, data[:, :NONCE_BYTES].tobytes())
    codes = np.frombuffer(data[:, NONCE_BYTES:].tobytes(), dtype=">u8").astype(np.uint64) ^ pads
    out = np.zeros(len(arr), dtype=np.uint64)
    out[valid] = codes
    return pa.array(out, pa.uint64(), mask=~valid)


def unseal(subkey: bytes, seals: pa.Array | Sequence[bytes | None]) -> list[str | None]:
    """The code of each seal (None for None); a wrong subkey gives garbage, never an error."""
    arr = seals if isinstance(seals, (pa.Array, pa.ChunkedArray)) else pa.array(list(seals), pa.binary())
    decoded: dict[int, str] = {}
    out: list[str | None] = []
    for c in unseal_codes(subkey, arr).to_pylist():
        if c is not None and c not in decoded:
            decoded[c] = c.to_bytes(CODE_BYTES, "big").rstrip(b"\x00").decode("utf-8", errors="replace")
        out.append(None if c is None else decoded[c])
    return out
