"""Keyed encodings for probabilistic linkage: HMAC tokens, Bloom filters (CLKs), Dice in SQL.

Two kinds of encoding leave pseudonymisation, both keyed with subkeys of the master
key (:mod:`linkage.keys`), so nobody without the key can compute one from a guess:

* **Tokens** for exact comparison: HMAC-SHA256 under the ``tokens`` subkey of
  ``field NUL value``, truncated to 128 bits, as 32 lower-case hex characters. The field
  name in the message separates domains: the same text as a forename and as a surname
  gives unrelated tokens. :class:`Tokeniser` encodes one field.
* **Bloom filters** for fuzzy comparison of names and address lines: the padded q-grams
  of a value, each setting ``k`` positions chosen by HMAC under the field's own
  ``bloom:<field>`` subkey, ORed together, then hardened (XOR-folded by default).
  Similar strings share most q-grams, so their filters share most bits and score a
  high Dice coefficient. :class:`BloomEncoder` encodes one field, a whole column of
  distinct values at a time with numpy.

:func:`dice_sql` writes the Dice coefficient of two filter columns for DuckDB or Spark
SQL; :func:`dice` is the Python reference. ``docs/privacy.md`` explains the choices.

Example:
    >>> import secrets
    >>> key = secrets.token_bytes(32)
    >>> tok = Tokeniser(key, "sn")
    >>> tok("SMITH") == tok("SMITH") != Tokeniser(key, "fn")("SMITH")
    True
    >>> bf = BloomEncoder(key, BloomParams(bits=512, hashes=100))
    >>> dice(bf.encode("JONATHAN"), bf.encode("JONATHON")) > 0.75
    True
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from cryptography.hazmat.primitives import hashes, hmac

__all__ = [
    "TOKEN_BYTES", "HARDENINGS", "Tokeniser", "BloomParams", "BloomEncoder", "dice", "dice_sql", "dice_sql_counted",
    "bit_count_sql",
    "hashes_for_half_fill", "CONTEXT_SEPARATOR", "dob_context", "context_message", "ContextPermuter",
]

TOKEN_BYTES = 16                       # 128-bit tokens, 32 hex characters
HARDENINGS = ("xor_fold", "balance", "none")
PAD = "_"                              # q-gram padding; normalised values never contain it
_CP_BITS = 21                          # a Unicode code point fits in 21 bits
_CHUNK = 65_536                        # distinct values encoded per numpy batch


class Tokeniser:
    """Keyed HMAC-SHA256 tokens of one field's values (domain-separated by the field name).

    Args:
        key: the ``tokens`` subkey (32 bytes).
        field: the domain label, e.g. ``"nino"``; values of different fields never share tokens.
    """

    def __init__(self, key: bytes, field: str):
        if not field or "\x00" in field:
            raise ValueError("a token field name is required and cannot contain NUL")
        self.field = field
        self._base = hmac.HMAC(key, hashes.SHA256())
        self._base.update(field.encode("utf-8") + b"\x00")

    def digest(self, value: str) -> bytes:
        """The 16-byte token of a non-null value."""
        h = self._base.copy()
        h.update(value.encode("utf-8"))
        return h.finalize()[:TOKEN_BYTES]

    def __call__(self, value: str | None) -> str | None:
        """The hex token of ``value``; ``None`` for ``None``."""
        return None if value is None else self.digest(value).hex()

    def many(self, values: Iterable[str | None]) -> list[str | None]:
        """Hex tokens of many values (one HMAC copy per value; NULLs stay NULL)."""
        base = self._base
        out: list[str | None] = []
        append = out.append
        for v in values:
            if v is None:
                append(None)
                continue
            h = base.copy()
            h.update(v.encode("utf-8"))
            append(h.finalize()[:TOKEN_BYTES].hex())
        return out


def hashes_for_half_fill(filter_bits: int, qgrams: float) -> int:
    """The hash count k that sets about half the bits of an m-bit filter for g q-grams.

    A filter with g distinct q-grams and k random positions each has an expected share
    ``1 - exp(-k g / m)`` of bits set; that is one half when ``k = m ln 2 / g``.

    Example:
        >>> hashes_for_half_fill(1024, 7)
        101
    """
    return max(1, round(filter_bits * math.log(2) / qgrams))


@dataclass(frozen=True)
class BloomParams:
    """A Bloom-filter field's parameters.

    Args:
        bits: stored filter length in bits (multiple of 64).
        hashes: positions per q-gram (k) in the unhardened filter.
        q: q-gram length (2 or 3); values are padded with q-1 ``_`` on each side.
        hardening: ``"xor_fold"`` (the unhardened filter is twice ``bits`` long and its
            halves are XORed), ``"balance"`` (the unhardened filter is half ``bits`` long;
            its complement is appended and the bits permuted with a keyed permutation) or
            ``"none"``.
        level: after hardening, bring every filter to exactly ``bits / 2`` bits set (a keyed,
            fixed order of positions: the first unset ones are set, or the last set ones
            cleared), so a filter's weight, the one property no permutation of its bits
            hides, says nothing of the value's length.
    """

    bits: int
    hashes: int
    q: int = 2
    hardening: str = "xor_fold"
    level: bool = False

    def __post_init__(self):
        if self.bits <= 0 or self.bits % 64:
            raise ValueError(f"Bloom filter length must be a positive multiple of 64 bits, not {self.bits}")
        if self.hashes < 1:
            raise ValueError("a Bloom filter needs at least one hash position per q-gram")
        if self.q not in (2, 3):
            raise ValueError("q-grams of length 2 or 3 are supported")
        if self.hardening not in HARDENINGS:
            raise ValueError(f"unknown hardening {self.hardening!r}; choose one of {HARDENINGS}")

    @property
    def base_bits(self) -> int:
        """Length of the filter before hardening."""
        return {"xor_fold": self.bits * 2, "balance": self.bits // 2, "none": self.bits}[self.hardening]

    def as_dict(self) -> dict:
        """The parameters as recorded in run metadata."""
        return {"bits": self.bits, "hashes": self.hashes, "q": self.q, "hardening": self.hardening,
                "level_weight": self.level, "unhardened_bits": self.base_bits, "padding": PAD * (self.q - 1)}


class BloomEncoder:
    """Keyed Bloom-filter encodings (CLKs) of one field's values.

    Args:
        key: the field's ``bloom:<field>`` subkey (32 bytes).
        params: filter length, hash count, q and hardening.
    """

    def __init__(self, key: bytes, params: BloomParams):
        self.params = params
        self._pos = hmac.HMAC(key, hashes.SHA256())
        self._pos.update(b"positions\x00")
        self._vectors: dict[int, np.ndarray] = {}
        self._perm = self._permutation(key) if params.hardening == "balance" else None
        self._order = self._permutation(key, b"level") if params.level else None

    # -- q-grams --------------------------------------------------------------------
    def qgrams(self, value: str) -> list[str]:
        """The padded q-grams of a value, in order (with repeats).

        Example:
            >>> BloomEncoder(bytes(32), BloomParams(512, 10)).qgrams("ANN")
            ['_A', 'AN', 'NN', 'N_']
        """
        q = self.params.q
        padded = PAD * (q - 1) + value + PAD * (q - 1)
        return [padded[i:i + q] for i in range(len(padded) - q + 1)]

    def positions(self, qgram: str) -> np.ndarray:
        """The k bit positions (in the unhardened filter) that a q-gram sets.

        HMAC-SHA256 of ``counter || q-gram`` under the field key, read as 32-bit integers
        modulo the filter length: independent keyed positions ("random hashing"), not
        double hashing, whose arithmetic progressions known attacks exploit.
        """
        k, m = self.params.hashes, self.params.base_bits
        data = qgram.encode("utf-8")
        words: list[bytes] = []
        for counter in range(math.ceil(k / 8)):
            h = self._pos.copy()
            h.update(counter.to_bytes(4, "big") + data)
            words.append(h.finalize())
        return (np.frombuffer(b"".join(words), dtype=">u4")[:k] % m).astype(np.int64)

    def _vector(self, code: int) -> np.ndarray:
        vec = self._vectors.get(code)
        if vec is None:
            bits = np.zeros(self.params.base_bits, dtype=np.uint8)
            bits[self.positions(_decode_qgram(code, self.params.q))] = 1
            vec = np.packbits(bits).view(np.uint64)
            self._vectors[code] = vec
        return vec

    # -- encoding -------------------------------------------------------------------
    def encode(self, value: str | None) -> bytes | None:
        """The filter of one value as bytes (``bits / 8`` long); ``None`` for ``None`` or ``""``."""
        if value is None or value == "":
            return None
        return self.encode_many([value])[0].as_py()

    def encode_many(self, values: Sequence[str]) -> pa.Array:
        """Filters of many non-empty values, as a ``fixed_size_binary(bits/8)`` arrow array.

        Values are grouped by length and encoded in batches: the q-grams of a batch become
        integer codes (numpy), each distinct q-gram's bit vector is computed once, and a
        value's filter is the OR of its q-grams' vectors.
        """
        nbytes = self.params.bits // 8
        n = len(values)
        if n == 0:
            return pa.array([], type=pa.binary(nbytes))
        arr = np.asarray(values, dtype=str) if not isinstance(values, np.ndarray) else values.astype(str)
        lengths = np.strings.str_len(arr)
        if (lengths == 0).any():
            raise ValueError("empty strings have no Bloom filter encoding; map them to NULL first")
        order = np.argsort(lengths, kind="stable")
        out = np.empty((n, nbytes), dtype=np.uint8)
        for start in range(0, n, _CHUNK):
            idx = order[start:start + _CHUNK]
            out[idx] = self._encode_batch(arr[idx], lengths[idx])
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(nbytes), n, [None, pa.py_buffer(out.tobytes())])

    def _encode_batch(self, arr: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        q, words = self.params.q, self.params.base_bits // 64
        n, width = len(arr), int(lengths.max())
        # code points, padded with q-1 PADs before and after each value, zeros beyond
        cps = np.zeros((n, width + 2 * (q - 1)), dtype=np.int64)
        cps[:, q - 1:q - 1 + width] = np.ascontiguousarray(arr.astype(f"<U{width}")).view(np.uint32).reshape(n, width)
        cps[:, :q - 1] = ord(PAD)
        rows = np.arange(n)
        for j in range(q - 1):
            cps[rows, q - 1 + lengths + j] = ord(PAD)
        n_grams = width + q - 1
        codes = np.zeros((n, n_grams), dtype=np.int64)
        for j in range(q):
            codes |= cps[:, j:j + n_grams] << (_CP_BITS * j)
        valid = np.arange(n_grams)[None, :] < (lengths + q - 1)[:, None]
        uniq, inverse = np.unique(codes[valid], return_inverse=True)
        table = np.zeros((len(uniq) + 1, words), dtype=np.uint64)   # row 0: the empty vector
        for i, code in enumerate(uniq.tolist()):
            table[i + 1] = self._vector(code)
        ids = np.zeros((n, n_grams), dtype=np.int64)
        ids[valid] = inverse.reshape(-1) + 1
        acc = np.zeros((n, words), dtype=np.uint64)
        for j in range(n_grams):
            acc |= table[ids[:, j]]
        hardened = self._harden(acc.view(np.uint8))
        return self._level(hardened) if self._order is not None else hardened

    def _level(self, filters: np.ndarray) -> np.ndarray:
        """Every filter to exactly half its bits set (:attr:`BloomParams.level`).

        Positions are taken in one keyed order: a light filter gets the first of its unset
        positions in that order set, a heavy one the last of its set positions cleared. The
        change is a function of the filter alone, so equal values keep equal filters;
        similar values, of similar weight, change in the same few positions (as many as the
        filter is away from half full). ``bench/privacy.py``'s weight attack measures what the
        weight gave.
        """
        target = self.params.bits // 2
        ordered = np.unpackbits(filters, axis=1)[:, self._order]
        weight = ordered.sum(axis=1, dtype=np.int32)[:, None]
        unset = ordered == 0
        add = unset & (np.cumsum(unset, axis=1, dtype=np.int16) <= target - weight)
        drop = ~unset & (np.cumsum(ordered[:, ::-1], axis=1, dtype=np.int16)[:, ::-1] <= weight - target)
        ordered = (ordered | add) & ~drop
        bits = np.empty_like(ordered)
        bits[:, self._order] = ordered
        return np.packbits(bits, axis=1)

    def _harden(self, filters: np.ndarray) -> np.ndarray:
        kind = self.params.hardening
        if kind == "xor_fold":
            half = filters.shape[1] // 2
            return filters[:, :half] ^ filters[:, half:]
        if kind == "balance":
            bits = np.unpackbits(filters, axis=1)
            return np.packbits(np.concatenate([bits, 1 - bits], axis=1)[:, self._perm], axis=1)
        return filters

    def _permutation(self, key: bytes, label: bytes = b"permutation") -> np.ndarray:
        # a keyed shuffle of the stored positions: sort positions by HMAC(key, label || i)
        h0 = hmac.HMAC(key, hashes.SHA256())
        h0.update(label + b"\x00")
        sort_keys = []
        for i in range(self.params.bits):
            h = h0.copy()
            h.update(i.to_bytes(4, "big"))
            sort_keys.append(h.finalize()[:8])
        return np.argsort(np.frombuffer(b"".join(sort_keys), dtype=">u8"), kind="stable")


def _decode_qgram(code: int, q: int) -> str:
    mask = (1 << _CP_BITS) - 1
    return "".join(chr((code >> (_CP_BITS * j)) & mask) for j in range(q))


def dice(a: bytes | None, b: bytes | None) -> float | None:
    """Dice coefficient of two filters, ``2 |a & b| / (|a| + |b|)``: the Python reference.

    Example:
        >>> dice(bytes([0b11110000]), bytes([0b11000000]))
        0.6666666666666666
    """
    if a is None or b is None:
        return None
    if len(a) != len(b):
        raise ValueError("filters of different lengths cannot be compared")
    x, y = int.from_bytes(a, "big"), int.from_bytes(b, "big")
    total = x.bit_count() + y.bit_count()
    return None if total == 0 else 2 * (x & y).bit_count() / total


def _spark_popcount(expr: str, other: str | None = None) -> str:
    # popcount of a BINARY (or of the AND of two) in 32-bit words: Spark has no bitwise
    # operators or bit_count on BINARY, but has them on BIGINT, and conv() turns hex into one
    def word(e: str) -> str:
        return f"CAST(conv(hex(substring({e}, i * 4 + 1, 4)), 16, 10) AS BIGINT)"

    body = word(expr) if other is None else f"{word(expr)} & {word(other)}"
    return (f"aggregate(sequence(0, CAST(length({expr}) / 4 AS INT) - 1), 0L, "
            f"(acc, i) -> acc + bit_count({body}))")


def dice_sql(left: str, right: str, dialect: str = "duckdb") -> str:
    """A SQL expression for the Dice coefficient of two Bloom-filter BLOB columns.

    NULL when either side is NULL or both filters are empty. Both filters must have the
    same length (they do within one column).

    Args:
        left: SQL for the left filter (e.g. ``"fn_bf_l"``).
        right: SQL for the right filter.
        dialect: ``"duckdb"`` (BLOB cast to BITSTRING, ``bit_count`` of the AND) or
            ``"spark"`` (BINARY split into 32-bit words with ``substring``/``hex``/``conv``,
            ``bit_count`` of each BIGINT word, summed with ``aggregate``).

    Returns:
        The expression, parenthesised, as a string.

    Example:
        >>> dice_sql("a", "b")
        '(2.0 * bit_count((a)::BITSTRING & (b)::BITSTRING) / nullif(bit_count((a)::BITSTRING) + bit_count((b)::BITSTRING), 0))'
    """
    if dialect == "duckdb":
        a, b = f"({left})::BITSTRING", f"({right})::BITSTRING"
        return f"(2.0 * bit_count({a} & {b}) / nullif(bit_count({a}) + bit_count({b}), 0))"
    if dialect == "spark":
        inter = _spark_popcount(left, right)
        total = f"{_spark_popcount(left)} + {_spark_popcount(right)}"
        return f"(CAST(2 * {inter} AS DOUBLE) / nullif({total}, 0))"
    raise ValueError(f"unknown SQL dialect {dialect!r}; use 'duckdb' or 'spark'")


_DICE_TOTAL = re.compile(r"nullif\(bit_count\(\((\w+)_bf_([lr])\)::BITSTRING\) \+ "
                         r"bit_count\(\((\w+)_bf_([lr])\)::BITSTRING\), 0\)")


def dice_sql_counted(sql: str) -> str:
    """``sql`` with each DuckDB :func:`dice_sql` on ``<name>_bf_<l|r>`` reading stored bit counts.

    The denominator of Dice is the two filters' bit counts, which depend on one record each:
    stored once per record as ``<name>_bf_n`` (see :func:`bit_count_sql`), each pair computes only
    the count of the AND. Every sampled pair of u estimation evaluates up to a dozen Dice, so
    this nearly halves their cost. The result is the same number (tested on real filters).

    Example:
        >>> dice_sql_counted(dice_sql("fn_bf_l", "sn_swap_bf_r"))
        '(2.0 * bit_count((fn_bf_l)::BITSTRING & (sn_swap_bf_r)::BITSTRING) / nullif(fn_bf_n_l + sn_swap_bf_n_r, 0))'
    """
    return _DICE_TOTAL.sub(r"nullif(\1_bf_n_\2 + \3_bf_n_\4, 0)", sql)


def bit_count_sql(column: str) -> str:
    """The stored bit count :func:`dice_sql_counted` reads: ``bit_count`` of the filter, NULL if it is NULL."""
    return f"bit_count(({column})::BITSTRING)"


# -- context keying: name encodings that differ between people who share a name ----------------

CONTEXT_SEPARATOR = "\x1f"             # between a value and its context in a context token's message
_PERMUTE_CHUNK = 16_384                # filters permuted per numpy batch


def dob_context(date) -> str:
    """The date of birth as a context: year, then the smaller and the larger of day and month.

    A date and the same date with day and month swapped share it, so a swap keeps the
    record's name encodings comparable.

    Example:
        >>> import datetime as dt
        >>> dob_context(dt.date(2005, 3, 4)) == dob_context(dt.date(2005, 4, 3)) == "2005-03-04"
        True
    """
    lo, hi = sorted((date.month, date.day))
    return f"{date.year:04d}-{lo:02d}-{hi:02d}"


def context_message(value: str | None, context: str) -> str | None:
    """The message a context token is the HMAC of: ``value US context`` (``None`` for no value)."""
    return None if value is None else value + CONTEXT_SEPARATOR + context


class ContextPermuter:
    """Keyed permutations of one Bloom-filter field's stored bits, one per context.

    The permutation of context ``c`` is ``Generator(PCG64(seed)).permutation(bits)`` with
    ``seed`` the first 8 bytes (big-endian) of HMAC-SHA256(field key, ``b"context\\x00" + c``);
    a filter's bits become ``bits[perm]``. Dice between two filters of one context is
    unchanged; filters of different contexts are unrelated without the key.

    Args:
        key: the field's ``bloom:<field>`` subkey (the one its filters are built under).
        bits: the stored filter length.

    Example:
        >>> p = ContextPermuter(bytes(32), 64)
        >>> f = np.frombuffer(bytes([0b10110000, 0, 0, 0, 0, 0, 0, 1]), dtype=np.uint8).reshape(1, 8)
        >>> g = p.permute(f, np.array([0]), ["a context"])
        >>> int(np.unpackbits(g).sum()) == 4 and g.tobytes() != f.tobytes()
        True
    """

    def __init__(self, key: bytes, bits: int):
        self.bits = bits
        self._mac = hmac.HMAC(key, hashes.SHA256())
        self._mac.update(b"context\x00")
        self._cache: dict[str, np.ndarray] = {}

    def permutation(self, context: str) -> np.ndarray:
        """The permutation of one context (cached): ``bits[perm]`` is the permuted filter."""
        perm = self._cache.get(context)
        if perm is None:
            h = self._mac.copy()
            h.update(context.encode("utf-8"))
            seed = int.from_bytes(h.finalize()[:8], "big")
            perm = np.random.Generator(np.random.PCG64(seed)).permutation(self.bits).astype(np.int32)
            self._cache[context] = perm
        return perm

    def permute(self, filters: np.ndarray, context_ids: np.ndarray, contexts: Sequence[str]) -> np.ndarray:
        """Filters (``(n, bits/8)`` uint8) each permuted with its context ``contexts[context_ids[i]]``."""
        n = len(filters)
        out = np.empty_like(filters)
        if n == 0:
            return out
        perms = np.stack([self.permutation(c) for c in contexts])
        for start in range(0, n, _PERMUTE_CHUNK):
            stop = min(n, start + _PERMUTE_CHUNK)
            unpacked = np.unpackbits(filters[start:stop], axis=1).reshape(-1)
            index = perms[context_ids[start:stop]]
            index += (np.arange(stop - start, dtype=np.int32) * self.bits)[:, None]
            out[start:stop] = np.packbits(unpacked[index], axis=1)
        return out
