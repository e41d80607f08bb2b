"""Identifier corruptions: each shares one signature and records what it applied.

Every corruption is ``corrupt_<name>(rows, rate, rng)``: it marks the rows eligible for
it in ``rows.eligible``, draws which eligible rows to corrupt with the explicit seeded
generator, changes their values, and sets its bit in ``rows.flags``. String values are
ids into growing vocabularies; a corrupted string is appended and the row points at it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

CORRUPTIONS = (
    "name_typo", "name_transposition", "nickname", "hyphenated_surname_partial",
    "missing_middle_names", "dob_day_month_swap", "dob_wrong_year", "nino_missing",
    "nino_mistyped", "postcode_typo", "stale_address", "duplicate_record", "missing_value",
    "surname_after_partnership",
)
BIT = {name: 1 << i for i, name in enumerate(CORRUPTIONS)}
LETTERS = "abcdefghijklmnopqrstuvwxyz"
UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Vocab:
    """A list of strings addressed by integer id, which corruptions extend."""

    def __init__(self, values):
        self.values = list(values)
        self._arrow: tuple[int, pa.Array] | None = None

    def arrow(self) -> pa.Array:
        """The vocabulary as an Arrow string array (cached until it grows)."""
        if self._arrow is None or self._arrow[0] != len(self.values):
            self._arrow = (len(self.values), pa.array(self.values, type=pa.string()))
        return self._arrow[1]

    def add(self, strings: list[str]) -> np.ndarray:
        """Append strings; return their ids."""
        start = len(self.values)
        self.values.extend(strings)
        return np.arange(start, len(self.values), dtype=np.int32)


@dataclass
class Rows:
    """The identifier fields of one extract's rows, before they are written."""

    forename: np.ndarray
    middle1: np.ndarray
    middle2: np.ndarray
    surname: np.ndarray
    dob: np.ndarray            # datetime64[D]
    sex: np.ndarray            # int8: 0 M, 1 F, -1 missing
    postcode: np.ndarray       # id into postcodes vocab, -1 missing
    nino: np.ndarray           # id into ninos vocab, -1 missing/not applicable
    names: Vocab
    postcodes: Vocab
    ninos: Vocab
    variants: dict[int, list[int]]
    flags: np.ndarray          # int32 bitmask of applied corruptions
    eligible: np.ndarray       # int32 bitmask of corruptions the row was eligible for
    max_dob: np.datetime64 = np.datetime64("2100-12-31")   # a corrupted date of birth never passes this

    def __len__(self) -> int:
        return len(self.forename)

    def take(self, idx: np.ndarray) -> Rows:
        """The rows at ``idx`` (vocabularies shared)."""
        arrays = {k: getattr(self, k)[idx] for k in (
            "forename", "middle1", "middle2", "surname", "dob", "sex", "postcode", "nino", "flags", "eligible")}
        return Rows(names=self.names, postcodes=self.postcodes, ninos=self.ninos, variants=self.variants,
                    max_dob=self.max_dob, **arrays)


def _pick(rows: Rows, name: str, eligible: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    rows.eligible[eligible] |= BIT[name]
    hit = eligible & (rng.random(len(eligible), dtype=np.float32) < rate)
    rows.flags[hit] |= BIT[name]
    return np.nonzero(hit)[0]


def _typo(s: str, u1: float, u2: float, u3: float) -> str:
    if len(s) < 2:
        return s + LETTERS[int(u2 * 26)]
    i = 1 + int(u1 * (len(s) - 1))          # keep the initial: typos rarely hit it
    c = LETTERS[int(u2 * 26)]
    op = int(u3 * 3)
    if op == 0:
        if s[i].lower() == c:
            c = LETTERS[(LETTERS.index(c) + 1) % 26]
        return s[:i] + c + s[i + 1:]
    if op == 1:
        return s[:i] + c + s[i:]
    return s[:i] + s[i + 1:]


def _transpose(s: str, u1: float) -> str:
    if len(s) < 3:
        return s[::-1]
    i = 1 + int(u1 * (len(s) - 2))
    if s[i] == s[i + 1]:
        i = 1 if s[1] != s[2] else i
    return s[:i] + s[i + 1] + s[i] + s[i + 2:]


def _edit_names(rows: Rows, idx: np.ndarray, rng: np.random.Generator, fn: Callable, nargs: int) -> None:
    if not len(idx):
        return
    field = rng.random(len(idx)) < 0.5
    us = rng.random((nargs, len(idx)))
    for col, sel in ((rows.forename, field), (rows.surname, ~field)):
        ii = idx[sel]
        vals = [fn(rows.names.values[v], *u) for v, u in zip(col[ii], us[:, sel].T)]
        col[ii] = rows.names.add(vals)


def corrupt_name_typo(rows: Rows, rate: float, rng: np.random.Generator) -> None:
    """One character substituted, inserted or deleted in the forename or the surname."""
    idx = _pick(rows, "name_typo", np.ones(len(rows), bool), rate, rng)
    _edit_names(rows, idx, rng, _typo, 3)


def corrupt_name_transposition(rows: Rows, rate: float, rng: np.random.Generator) -> None:
    """Two adjacent characters swapped in the forename or the surname."""
    idx = _pick(rows, "name_transposition", np.ones(len(rows), bool), rate, rng)
    _edit_names(rows, idx, rng, _transpose, 1)


def corrupt_nickname(rows: Rows, rate: float, rng: np.random.Generator) -> None:
    """Forename recorded as a nickname or spelling variant."""
    has_variant = np.zeros(len(rows.names.values), dtype=bool)
    has_variant[list(rows.variants)] = True
    idx = _pick(rows, "nickname", has_variant[rows.forename], rate, rng)
    u = rng.random(len(idx))
    rows.forename[idx] = [rows.variants[f][int(x * len(rows.variants[f]))] for f, x in zip(rows.forename[idx].tolist(), u)]


def corrupt_hyphenated_surname_partial(rows: Rows, rate: float, rng: np.random.Generator) -> None:
    """A two-part surname recorded as one part, or with a space for the hyphen."""
    hyphenated = np.fromiter(("-" in v for v in rows.names.values), dtype=bool, count=len(rows.names.values))
    idx = _pick(rows, "hyphenated_surname_partial", hyphenated[rows.surname], rate, rng)
    u = rng.random(len(idx))
    out = []
    for s, x in zip(rows.surname[idx].tolist(), u):
        a, _, b = rows.names.values[s].partition("-")
        out.append(a if x < 0.4 else (b if x < 0.7 else f"{a} {b}"))
    rows.surname[idx] = rows.names.add(out)


def corrupt_missing_middle_names(rows: Rows, rate: float, rng: np.random.Generator) -> None:
    """Middle names left out."""
    idx = _pick(rows, "missing_middle_names", rows.middle1 >= 0, rate, rng)
    rows.middle1[idx] = -1
    rows.middle2[idx] = -1


def _ymd(d: np.ndarray):
    y = d.astype("datetime64[Y]")
    m = d.astype("datetime64[M]")
    month = (m - y.astype("datetime64[M]")).astype(np.int8) + 1
    day = (d - m.astype("datetime64[D]")).astype(np.int8) + 1
    return y, month, day


def _date(y, m, d) -> np.ndarray:
    return (y.astype("datetime64[M]") + (m.astype(np.int64) - 1)).astype("datetime64[D]") + (d.astype(np.int64) - 1)


def corrupt_dob_day_month_swap(rows: Rows, rate: float, rng: np.random.Generator) -> None:
    """Day and month of the date of birth swapped (rows whose day is 12 or less)."""
    _, m, d = _ymd(rows.dob)
    idx = _pick(rows, "dob_day_month_swap", (d <= 12) & (d != m), rate, rng)
    del m, d
    y, m, d = _ymd(rows.dob[idx])
    rows.dob[idx] = _date(y, d, m)


def corrupt_dob_wrong_year(rows: Rows, rate: float, rng: np.random.Generator) -> None:
    """The year of birth off by one (29 February becomes the 28th)."""
    idx = _pick(rows, "dob_wrong_year", np.ones(len(rows), bool), rate, rng)
    y, m, d = _ymd(rows.dob[idx])
    shift = np.where(rng.random(len(idx)) < 0.5, -1, 1)
    d = np.where((m == 2) & (d == 29), 28, d)
    later = _date(y + 1, m, d)
    # a year later would be after the extract was taken: the slip goes a year back instead
    shift = np.where(later > rows.max_dob, -1, shift)
    rows.dob[idx] = _date(y + shift, m, d)


def corrupt_nino_missing(rows: Rows, rate: float, rng: np.random.Generator) -> None:
    """NINO left blank."""
    idx = _pick(rows, "nino_missing", rows.nino >= 0, rate, rng)
    rows.nino[idx] = -1


def corrupt_nino_mistyped(rows: Rows, rate: float, rng: np.random.Generator) -> None:
    """One digit of the NINO mistyped."""
    idx = _pick(rows, "nino_mistyped", rows.nino >= 0, rate, rng)
    u = rng.random((2, len(idx)))
    out = []
    for v, a, b in zip(rows.nino[idx].tolist(), u[0], u[1]):
        s = rows.ninos.values[v]
        i = 2 + int(a * 6)
        digit = str((int(s[i]) + 1 + int(b * 9)) % 10)
        out.append(s[:i] + digit + s[i + 1:])
    rows.nino[idx] = rows.ninos.add(out)


def corrupt_postcode_typo(rows: Rows, rate: float, rng: np.random.Generator) -> None:
    """One character of the postcode mistyped (a letter for a letter, a digit for a digit)."""
    idx = _pick(rows, "postcode_typo", rows.postcode >= 0, rate, rng)
    u = rng.random((2, len(idx)))
    out = []
    for v, a, b in zip(rows.postcode[idx].tolist(), u[0], u[1]):
        s = rows.postcodes.values[v]
        pos = [i for i, ch in enumerate(s) if ch != " "]
        i = pos[int(a * len(pos))]
        ch = s[i]
        if ch.isdigit():
            new = str((int(ch) + 1 + int(b * 9)) % 10)
        else:
            new = UPPER[(UPPER.index(ch) + 1 + int(b * 25)) % 26]
        out.append(s[:i] + new + s[i + 1:])
    rows.postcode[idx] = rows.postcodes.add(out)


def corrupt_missing_value(rows: Rows, rate: float, rng: np.random.Generator) -> None:
    """One optional identifier (sex, postcode or middle names) left blank."""
    idx = _pick(rows, "missing_value", np.ones(len(rows), bool), rate, rng)
    which = rng.integers(0, 3, len(idx))
    rows.sex[idx[which == 0]] = -1
    rows.postcode[idx[which == 1]] = -1
    rows.middle1[idx[which == 2]] = -1
    rows.middle2[idx[which == 2]] = -1


FIELD_CORRUPTIONS: tuple[tuple[str, Callable], ...] = (
    ("nickname", corrupt_nickname),
    ("hyphenated_surname_partial", corrupt_hyphenated_surname_partial),
    ("name_typo", corrupt_name_typo),
    ("name_transposition", corrupt_name_transposition),
    ("missing_middle_names", corrupt_missing_middle_names),
    ("dob_day_month_swap", corrupt_dob_day_month_swap),
    ("dob_wrong_year", corrupt_dob_wrong_year),
    ("nino_missing", corrupt_nino_missing),
    ("nino_mistyped", corrupt_nino_mistyped),
    ("postcode_typo", corrupt_postcode_typo),
    ("missing_value", corrupt_missing_value),
)


def apply_field_corruptions(rows: Rows, rates, rng: np.random.Generator) -> None:
    """Apply every field corruption in a fixed order at the configured rates."""
    for name, fn in FIELD_CORRUPTIONS:
        fn(rows, getattr(rates, name), rng)
