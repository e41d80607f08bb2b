"""Pseudonymisation: split staged rows into keyed identifiers, a payload and an encrypted crosswalk.

Reads ``staged/<source>.parquet`` (with its delivery parts, :func:`linkage.ingest.stage.staged_paths`) and
writes the ``pseudonymised/`` zone, atomically:

* ``identifiers/<source>.parquet`` - one row per staged row: a random record token,
  the row's source, year and year of birth, keyed HMAC tokens of the exact identifiers
  and Bloom-filter encodings of names and address (:data:`IDENTIFIER_COLUMNS`);
* ``payload/<source>.parquet`` - the same token and the row's attribute and period
  columns; department references (claim, employer) only as keyed tokens;
* ``crosswalk.enc`` - token -> (source, file, line, row, record_id), AES-GCM encrypted
  (:mod:`linkage.crosswalk`); an incremental run writes the new rows' mapping into a part
  file of its own (``crosswalk.0001.enc``, ...) and carries the earlier ones unchanged;
* ``metadata.json`` - key fingerprint (never the key), encoding parameters, counts, timings.

Which staged column is a forename, a date of birth, ... comes from the roles in
``schemas/<source>.toml``. Each distinct value is encoded once, in Python (HMAC) and
numpy (Bloom filters), and the encodings are joined back to the rows in DuckDB:
names, dates and postcodes have far fewer distinct values than there are rows. Names,
initials and phonetic codes are keyed with the row's date-of-birth context
(:class:`ContextEncoders`, issue 16): they are encoded once per distinct (value, date of
birth) pair, so a token is shared by the records of one name *and* birthday, not of one name.
Sex is never tokenised: ``sex_seal`` holds it under randomised encryption (:mod:`.seal`), for
assemble only; no two records share a seal.
``docs/privacy.md`` holds the threat model and the encoding design.

Example:
    >>> from linkage.config import load_config
    >>> summary = pseudonymise(load_config(), "workspace")      # doctest: +SKIP
    >>> summary["rows"]                                          # doctest: +SKIP
    {'education': 18399, 'benefits': 18876, 'earnings': 68671}
"""

from __future__ import annotations

import binascii
import datetime as dt
import json
import logging
import re
import secrets
import shutil
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import jellyfish
from cryptography.hazmat.primitives import hashes, hmac
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from linkage.config import Config, PseudonymiseConfig
from linkage.crosswalk import CROSSWALK_FILE, CrosswalkError, crosswalk_parts, part_path, write_crosswalk
from linkage.db import connect, path_literal, quote_ident, quote_literal
from linkage.encodings import (CONTEXT_SEPARATOR, TOKEN_BYTES, BloomEncoder, BloomParams, ContextPermuter, Tokeniser,
                               context_message, dob_context)
from linkage.errors import HhlinkError, SchemaError, WorkspaceError
from linkage.ingest.stage import (parquet_source, staged_file_signature, staged_paths, staged_row_digests,
                                  staged_scan)
from linkage.keys import MasterKey, load_master_key
from linkage.pseudonymise.context_u import measure_context_u
from linkage.pseudonymise.seal import (NONCE_BYTES, SEAL_SUBKEY, aes_block_words, code_int, keystreams, nonces,
                                      seal_sql)
from linkage.pseudonymise.store import write_encrypted, zone_metadata
from linkage.schemas import SOURCES, Schema, load_schema
from linkage.workspace import Workspace, carry_file

__all__ = ["IDENTIFIER_COLUMNS", "PseudonymiseError", "pseudonymise", "bloom_params", "plan_sources"]

log = logging.getLogger(__name__)

# The identifiers contract: every source's file has these columns, NULL where it lacks the field.
# Reference tokens named in ``pseudonymise.link_references`` follow ``bu_role``.
IDENTIFIER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("record_token", "VARCHAR"), ("source", "VARCHAR"), ("year", "SMALLINT"), ("birth_year", "SMALLINT"),
    ("nino_tok", "VARCHAR"), ("upn_tok", "VARCHAR"),
    ("dob_tok", "VARCHAR"), ("dob_year_tok", "VARCHAR"), ("dob_month_tok", "VARCHAR"),
    ("dob_day_tok", "VARCHAR"), ("dob_swap_tok", "VARCHAR"), ("sex_seal", "BLOB"), ("sex_tok", "VARCHAR"),
    ("postcode_tok", "VARCHAR"), ("pc_sector_tok", "VARCHAR"), ("pc_district_tok", "VARCHAR"),
    ("fn_tok", "VARCHAR"), ("sn_tok", "VARCHAR"), ("fn_initial_tok", "VARCHAR"), ("fn_phon_tok", "VARCHAR"),
    ("sn_phon_tok", "VARCHAR"), ("mn_initial_tok", "VARCHAR"),
    ("dobc_tok", "VARCHAR"), ("name_ym_tok", "VARCHAR"), ("name_yd_tok", "VARCHAR"), ("name_md_tok", "VARCHAR"),
    ("fn_bf", "BLOB"), ("sn_bf", "BLOB"), ("addr_bf", "BLOB"), ("sn_swap_bf", "BLOB"),
    ("benefit_unit_tok", "VARCHAR"), ("bu_role", "VARCHAR"),
)
_META_COLUMNS = ("_file", "_line", "_row")
_CROSSWALK_SCHEMA = pa.schema([("record_token", pa.string()), ("source", pa.string()), ("file", pa.string()),
                               ("line", pa.int64()), ("row", pa.int64()), ("record_id", pa.string())])


class PseudonymiseError(HhlinkError):
    """Pseudonymisation cannot run: no staged zone, a staged file off its contract, or an engine failure."""


# -- normalisation and phonetic codes (applied to distinct values, never logged) -----------------

def _norm_name(v: str) -> str:
    return " ".join(unicodedata.normalize("NFC", v).upper().split())


def _letters(v: str) -> str:
    decomposed = unicodedata.normalize("NFKD", v)
    return "".join(c for c in decomposed if "A" <= c <= "Z")


def norm_address(v: str) -> str:
    return " ".join(re.sub(r"[\W_]+", " ", unicodedata.normalize("NFC", v).upper()).split())


def postcode_parts(v: str, pattern: re.Pattern | None = None) -> tuple[str | None, str | None, str | None]:
    """A postcode's (whole, sector, district) prefixes for partial levels; UK or not (``None`` where too short).

    ``pattern`` (``pseudonymise.postcode_pattern``, compiled) names the ``district`` and
    ``sector`` of postcodes that are not UK postcodes; a value it does not match is split
    as below.

    Example:
        >>> postcode_parts("sw1a 1aa")
        ('SW1A 1AA', 'SW1A 1', 'SW1A')
        >>> postcode_parts("2615", re.compile(r"(?P<sector>(?P<district>\\d{2})\\d)\\d"))
        ('2615', '261', '26')
    """
    p = "".join(v.upper().split())
    if not p:
        return None, None, None
    if pattern is not None and (m := pattern.fullmatch(p)) is not None:
        g = m.groupdict()
        return p, g.get("sector") or None, g.get("district") or None
    if len(p) < 5:
        # not a UK postcode (a 3-4 character postal code, e.g. Australian): its prefixes
        # play sector and district, so a one-character error at the end keeps partial credit
        return p, (p[:-1] if len(p) >= 3 else None), (p[:-2] if len(p) >= 4 else None)
    return f"{p[:-3]} {p[-3:]}", f"{p[:-3]} {p[-3]}", p[:-3]


_PHONETIC: dict[str, Callable[[str], str]] = {
    "metaphone": jellyfish.metaphone, "nysiis": jellyfish.nysiis, "soundex": jellyfish.soundex,
}


def _phonetic(v: str, algorithm: str) -> str | None:
    letters = _letters(v)
    return (_PHONETIC[algorithm](letters) or None) if letters else None


# -- encoders: one per identifier role ---------------------------------------------------------

def bloom_params(cfg: PseudonymiseConfig) -> dict[str, BloomParams]:
    """The Bloom-filter parameters of ``fn_bf``, ``sn_bf`` and ``addr_bf`` from the config."""
    name = BloomParams(cfg.name_bits, cfg.name_hashes, cfg.q, cfg.hardening, cfg.level_weight)
    return {"fn_bf": name, "sn_bf": name,
            "addr_bf": BloomParams(cfg.address_bits, cfg.address_hashes, cfg.q, cfg.hardening, cfg.level_weight)}


def _mapped(fn: Callable[[Sequence[str]], list], values: Sequence[str | None]) -> list:
    """Apply ``fn`` to the distinct non-null values only, and map the results back."""
    distinct = list(dict.fromkeys(v for v in values if v is not None))
    out = dict(zip(distinct, fn(distinct)))
    out[None] = None
    return [out[v] for v in values]


def bloom_values(encoder: BloomEncoder, values: Sequence[str | None]) -> pa.Array:
    """Bloom filters of ``values`` (NULL for None or ""), each distinct value encoded once."""
    present = np.array([bool(v) for v in values], dtype=bool)
    if not present.any():
        return pa.nulls(len(values), pa.binary())
    distinct, inverse = np.unique(np.array([v for v in values if v], dtype=str), return_inverse=True)
    index = np.full(len(values), -1, dtype=np.int64)
    index[present] = inverse.reshape(-1)
    encoded = encoder.encode_many(distinct).take(pa.array(index, mask=~present))
    return encoded.cast(pa.binary())


@dataclass
class _Encoder:
    """Encodes the distinct values of one identifier into its output columns."""

    name: str                      # DuckDB table holding value -> encodings
    columns: tuple[str, ...]
    value_type: str                # "VARCHAR" or "DATE"
    encode: Callable[[list], dict[str, pa.Array | list]]


class Encoders:
    """The encoders of every identifier role and department reference, keyed from one master key."""

    def __init__(self, key: MasterKey, cfg: PseudonymiseConfig):
        self.cfg = cfg
        self._key = key
        self._tokens_key = key.subkey("tokens")
        params = bloom_params(cfg)
        self.bloom = {
            "fn_bf": BloomEncoder(key.subkey("bloom:first_name"), params["fn_bf"]),
            "sn_bf": BloomEncoder(key.subkey("bloom:surname"), params["sn_bf"]),
            "addr_bf": BloomEncoder(key.subkey("bloom:address"), params["addr_bf"]),
        }

    def tok(self, domain: str) -> Tokeniser:
        return Tokeniser(self._tokens_key, domain)

    def for_role(self, role: str) -> _Encoder | None:
        if role in ("nino", "upn", "sex", "benefit_unit"):
            # one token each, the role as its domain; upper case without spaces (as staged)
            return _Encoder(f"d_{role}", (f"{role}_tok",), "VARCHAR",
                            lambda vs: {f"{role}_tok": self.tok(role).many(
                                ["".join(v.upper().split()) or None for v in vs])})
        builders = {"dob": self._dob, "postcode": self._postcode, "first_name": self._first_name,
                    "surname": self._surname, "middle_names": self._middle_names, "address": self._address}
        if role not in builders:
            return None
        cols = {"dob": ("dob_tok", "dob_year_tok", "dob_month_tok", "dob_day_tok", "dob_swap_tok"),
                "postcode": ("postcode_tok", "pc_sector_tok", "pc_district_tok"),
                "first_name": ("fn_tok", "fn_initial_tok", "fn_phon_tok", "fn_bf"),
                "surname": ("sn_tok", "sn_phon_tok", "sn_bf", "sn_swap_bf"),
                "middle_names": ("mn_initial_tok",), "address": ("addr_bf",)}[role]
        return _Encoder(f"d_{role}", cols, "DATE" if role == "dob" else "VARCHAR", builders[role])

    def for_reference(self, column: str, token_column: str, bloom_column: str | None = None) -> _Encoder:
        # the column name is the token domain: the same reference gets the same token everywhere
        if bloom_column is None:
            return _Encoder(f"d_ref_{column}", (token_column,), "VARCHAR",
                            lambda vs: {token_column: self.tok(column).many([str(v).strip() or None for v in vs])})
        # with a Bloom filter of its bigrams too (key 'bloom:<column>'): a mistyped reference keeps a high Dice
        bloom = BloomEncoder(self._key.subkey(f"bloom:{column}"), bloom_params(self.cfg)["fn_bf"])

        def encode(vs):
            clean = [str(v).strip() or None for v in vs]
            return {token_column: self.tok(column).many(clean), bloom_column: bloom_values(bloom, clean)}
        return _Encoder(f"d_ref_{column}", (token_column, bloom_column), "VARCHAR", encode)

    def _dob(self, values: list[dt.date]) -> dict[str, list]:
        dob = self.tok("dob")
        return {
            "dob_tok": dob.many([d.isoformat() for d in values]),
            "dob_year_tok": _mapped(self.tok("dob_year").many, [f"{d.year:04d}" for d in values]),
            "dob_month_tok": _mapped(self.tok("dob_month").many, [f"{d.month:02d}" for d in values]),
            "dob_day_tok": _mapped(self.tok("dob_day").many, [f"{d.day:02d}" for d in values]),
            # in the dob domain on purpose: a swapped date compares equal to the other record's dob_tok
            "dob_swap_tok": dob.many([dt.date(d.year, d.day, d.month).isoformat() if d.day <= 12 else None
                                      for d in values]),
        }

    def _postcode(self, values: list[str]) -> dict[str, list]:
        pattern = re.compile(self.cfg.postcode_pattern) if self.cfg.postcode_pattern else None
        parts = [postcode_parts(v, pattern) for v in values]
        # units are nearly all distinct already: tokenise directly; sectors and districts repeat
        return {"postcode_tok": self.tok("postcode").many([p[0] for p in parts]),
                "pc_sector_tok": _mapped(self.tok("pc_sector").many, [p[1] for p in parts]),
                "pc_district_tok": _mapped(self.tok("pc_district").many, [p[2] for p in parts])}

    def _name(self, values: list[str], prefix: str, initial: bool) -> dict[str, object]:
        norm = [_norm_name(v) or None for v in values]
        out: dict[str, object] = {f"{prefix}_tok": self.tok(prefix).many(norm)}
        if initial:
            out[f"{prefix}_initial_tok"] = _mapped(self.tok(f"{prefix}_initial").many,
                                                   [n[0] if n else None for n in norm])
        out[f"{prefix}_phon_tok"] = _mapped(
            self.tok(f"{prefix}_phon").many,
            [_phonetic(n, self.cfg.phonetic) if n else None for n in norm])
        out[f"{prefix}_bf"] = bloom_values(self.bloom[f"{prefix}_bf"], norm)
        return out

    def _first_name(self, values: list[str]) -> dict[str, object]:
        return self._name(values, "fn", initial=True)

    def _surname(self, values: list[str]) -> dict[str, object]:
        out = self._name(values, "sn", initial=False)
        # the surname's filter under the forename key: comparable with a forename filter, so a
        # forename/surname swap shows as high Dice across the two fields, with no extra token
        out["sn_swap_bf"] = bloom_values(self.bloom["fn_bf"], [_norm_name(v) or None for v in values])
        return out

    def _middle_names(self, values: list[str]) -> dict[str, list]:
        norm = [_norm_name(v) for v in values]
        return {"mn_initial_tok": _mapped(self.tok("mn_initial").many, [n[0] if n else None for n in norm])}

    def _address(self, values: list[str]) -> dict[str, object]:
        return {"addr_bf": bloom_values(self.bloom["addr_bf"], [norm_address(v) or None for v in values])}


# -- context encoders: name encodings keyed with the record's date-of-birth context --------------

# the roles whose encodings are keyed with the dob context (docs/privacy.md): two records share one
# only when they share the value and the context, so a token's frequency is a person's, not a name's
CONTEXT_ROLES = ("first_name", "surname", "middle_names")
# in the settings digest: a zone encoded before names were context-keyed (or sex sealed) is never
# carried into one after
ENCODING_VERSION = "dobc-context-4-no-date-parts"
# the date-of-birth tokens the zone holds (``link-files`` also has the day, month and swap tokens)
ZONE_DOB_COLUMNS = ("dob_tok", "dob_year_tok")
_CONTEXT_COLUMNS = {"first_name": ("fn_tok", "fn_initial_tok", "fn_phon_tok", "fn_bf"),
                    "surname": ("sn_tok", "sn_phon_tok", "sn_bf", "sn_swap_bf"),
                    "middle_names": ("mn_initial_tok",)}
NAME_DATE_PARTS = {"name_ym_tok": ("year", "month"), "name_yd_tok": ("year", "day"), "name_md_tok": ("month", "day")}
_DATE_PART = {"year": "{:04d}", "month": "{:02d}", "day": "{:02d}"}


@dataclass
class _ContextEncoder:
    """Encodes the distinct (values..., date of birth) tuples of a row into its context-keyed columns."""

    name: str                      # DuckDB table holding v0[, v1], d -> encodings
    roles: tuple[str, ...]         # the roles whose staged columns are v0, v1, ...; d is the dob's
    columns: tuple[str, ...]
    encode: Callable[[list[list], list], dict[str, pa.Array | list]]
    dob_required: bool = False     # rows without a date of birth get NULL (no dictionary entry)


def _ids(values: Sequence) -> tuple[list, np.ndarray]:
    """The distinct values in first-seen order, and each value's index among them."""
    index: dict = {}
    ids = np.fromiter((index.setdefault(v, len(index)) for v in values), dtype=np.int64, count=len(values))
    return list(index), ids


class ContextEncoders:
    """The pseudonymiser's context-keyed encodings (``docs/privacy.md``), beside :class:`Encoders`.

    The context of a row is ``dobc_tok``, the token of its date of birth with day and month in
    order (:func:`linkage.encodings.dob_context`), or "" without one. Tokens are HMACs in domain
    ``<field>@dobc`` of ``value US context``; Bloom filters are today's, bits permuted per context
    (:class:`linkage.encodings.ContextPermuter`). ``link-files`` keeps :meth:`Encoders.for_role`.
    """

    def __init__(self, coder: Encoders):
        self.coder = coder
        self.permuter = {name: ContextPermuter(coder._key.subkey(f"bloom:{role}"), coder.bloom[name].params.bits)
                         for name, role in (("fn_bf", "first_name"), ("sn_bf", "surname"))}

    def contexts(self, dobs: Sequence[dt.date | None]) -> list[str]:
        """The context string of each date of birth: its ``dobc_tok``, "" for None."""
        return [c or "" for c in _mapped(lambda ds: self.coder.tok("dobc").many([dob_context(d) for d in ds]), dobs)]

    def _keyed(self, domain: str, values: Sequence[str | None], contexts: Sequence[str],
               distinct: bool = False) -> list[str | None]:
        """Context tokens of each (value, context); ``distinct``: the pairs are (nearly) all distinct already."""
        messages = [context_message(v, c) for v, c in zip(values, contexts)]
        tok = self.coder.tok(f"{domain}@dobc")
        return tok.many(messages) if distinct else _mapped(tok.many, messages)

    def for_role(self, role: str) -> _Encoder | _ContextEncoder | None:
        """The encoder of a staged role in the pseudonymised zone (context-keyed where the contract says)."""
        if role == "dob":
            # the full date, its year and its context only: no day, month or swapped-date token, whose
            # few values the calendar names (ZONE_DOB_COLUMNS; the columns stay in the contract, NULL)
            base = self.coder.for_role("dob")

            def encode(values):
                dobc = self.coder.tok("dobc").many([dob_context(d) for d in values])
                return {**{c: v for c, v in base.encode(values).items() if c in ZONE_DOB_COLUMNS}, "dobc_tok": dobc}
            return _Encoder(base.name, (*ZONE_DOB_COLUMNS, "dobc_tok"), base.value_type, encode)
        if role == "first_name":
            return _ContextEncoder("c_first_name", (role,), _CONTEXT_COLUMNS[role],
                                   lambda vs, ds: self._name(vs[0], ds, "fn", initial=True))
        if role == "surname":
            return _ContextEncoder("c_surname", (role,), _CONTEXT_COLUMNS[role],
                                   lambda vs, ds: self._name(vs[0], ds, "sn", initial=False))
        if role == "middle_names":
            return _ContextEncoder("c_middle_names", (role,), _CONTEXT_COLUMNS[role], self._middle_names)
        if role == "sex":
            # no token at all (issue 16: a sex token plus the payload told sex apart): the code as an
            # integer, sealed per row in SQL with the row's nonce (identifiers_sql, _record_tokens)
            return _Encoder("d_sex", ("sex_code",), "VARCHAR", lambda vs: {"sex_code": pa.array(
                [code_int("".join(v.upper().split())) for v in vs], pa.uint64())})
        return self.coder.for_role(role)

    def sex_in_place(self) -> _ContextEncoder:
        """``sex_tok``: sex keyed with the date-of-birth context and the postcode together.

        Only records of one date and one postcode share a context (the same person, twins, or a
        couple born on one day), so a token says nothing across people, and the link model can
        still tell apart, by sex, the two people such a household holds (without it, a couple
        with one surname and birthdays a day/month swap apart merged). NULL without a date of
        birth or a postcode. Assemble reads sex from ``sex_seal``, never from this.
        """
        pattern = re.compile(self.coder.cfg.postcode_pattern) if self.coder.cfg.postcode_pattern else None

        def encode(values, dobs):
            codes = ["".join(v.upper().split()) or None for v in values[0]]
            units = _mapped(lambda ps: [postcode_parts(p, pattern)[0] or "" for p in ps], values[1])
            places = [f"{c}{CONTEXT_SEPARATOR}{u}" for c, u in zip(self.contexts(dobs), units)]
            return {"sex_tok": self._keyed("sex_place", codes, places)}
        return _ContextEncoder("c_sex_place", ("sex", "postcode"), ("sex_tok",), encode, dob_required=True)

    def names_and_dates(self) -> _ContextEncoder:
        """``name_ym_tok``, ``name_yd_tok``, ``name_md_tok``: forename, surname and two parts of the date."""
        return _ContextEncoder("c_names", ("first_name", "surname"), tuple(NAME_DATE_PARTS), self._name_dates,
                               dob_required=True)

    def _name(self, values: list[str], dobs: list, prefix: str, initial: bool) -> dict[str, object]:
        distinct, ids = _ids(values)
        norm = [_norm_name(v) or None for v in distinct]
        contexts = self.contexts(dobs)
        per_row = [norm[i] for i in ids]
        out: dict[str, object] = {f"{prefix}_tok": self._keyed(prefix, per_row, contexts, distinct=True)}
        if initial:
            out[f"{prefix}_initial_tok"] = self._keyed(f"{prefix}_initial", [n[0] if n else None for n in per_row],
                                                       contexts)
        phon = [_phonetic(n, self.coder.cfg.phonetic) if n else None for n in norm]
        out[f"{prefix}_phon_tok"] = self._keyed(f"{prefix}_phon", [phon[i] for i in ids], contexts)
        out[f"{prefix}_bf"] = self._filters(f"{prefix}_bf", norm, ids, contexts)
        if prefix == "sn":
            # the surname under the forename key and the forename's context permutation: comparable
            # with fn_bf of a record in the same context, so a forename/surname swap shows
            out["sn_swap_bf"] = self._filters("fn_bf", norm, ids, contexts)
        return out

    def _filters(self, field: str, norm: list[str | None], ids: np.ndarray, contexts: list[str]) -> pa.Array:
        """The field's filter of each row's value (``norm[ids[i]]``), permuted with the row's context."""
        encoder = self.coder.bloom[field]
        nbytes = encoder.params.bits // 8
        present = [i for i, n in enumerate(norm) if n]
        base = np.zeros((len(norm), nbytes), dtype=np.uint8)
        if present:
            encoded = encoder.encode_many([norm[i] for i in present])
            base[present] = np.frombuffer(encoded.buffers()[1], dtype=np.uint8,
                                          count=len(present) * nbytes).reshape(-1, nbytes)
        distinct, context_ids = _ids(contexts)
        filters = self.permuter[field].permute(base[ids], context_ids, distinct)
        valid = np.array([bool(n) for n in norm], dtype=bool)[ids]
        nulls = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
        arr = pa.FixedSizeBinaryArray.from_buffers(pa.binary(nbytes), len(ids), [nulls, pa.py_buffer(filters.tobytes())],
                                                  null_count=int((~valid).sum()))
        return arr.cast(pa.binary())

    def _middle_names(self, values: list[list], dobs: list) -> dict[str, list]:
        norm = [_norm_name(v) for v in values[0]]
        return {"mn_initial_tok": self._keyed("mn_initial", [n[0] if n else None for n in norm], self.contexts(dobs))}

    def _name_dates(self, values: list[list], dobs: list) -> dict[str, list]:
        forenames, surnames = (_mapped(lambda vs: [_norm_name(v) for v in vs], column) for column in values)
        names = [f"{f}{CONTEXT_SEPARATOR}{s}" if f and s else None for f, s in zip(forenames, surnames)]
        out = {}
        for column, parts in NAME_DATE_PARTS.items():
            def date_parts(ds, parts=parts):
                return [CONTEXT_SEPARATOR.join(_DATE_PART[p].format(getattr(d, p)) for p in parts) for d in ds]
            dates = _mapped(date_parts, dobs)
            out[column] = self.coder.tok(column[:-4]).many(
                [None if n is None else f"{n}{CONTEXT_SEPARATOR}{d}" for n, d in zip(names, dates)])
        return out


# -- the plan for one source -------------------------------------------------------------------

@dataclass
class Source:
    """One staged source: its schema, file (or its parts, in order) and which column plays each role."""

    name: str
    path: Path | list[Path]
    schema: Schema
    rows: int
    role_column: dict[str, str] = field(default_factory=dict)
    year_sql: str = "NULL"
    references: dict[str, str] = field(default_factory=dict)     # column -> token column
    member_role: str | None = None


def _plan_source(source: str, path: Path, schema: Schema, cfg: PseudonymiseConfig) -> Source:
    try:
        parts = path if isinstance(path, list) else [path]
        present = set.intersection(*(set(pq.read_schema(p).names) for p in parts))
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    except (OSError, pa.ArrowInvalid) as exc:
        raise PseudonymiseError(f"{path}: cannot read the staged file ({exc.__class__.__name__})") from None
    missing = [c for c in [*schema.names, *_META_COLUMNS] if c not in present]
    if missing:
        raise PseudonymiseError(f"{path}: staged file lacks column(s) {', '.join(missing)}; re-run 'hhlink ingest'")
    plan = Source(source, path, schema, rows)
    for col in schema.columns:
        if col.is_identifier:
            if col.role in plan.role_column:
                raise SchemaError(f"{schema.path}: two columns play role '{col.role}' "
                                  f"({plan.role_column[col.role]}, {col.name}); pseudonymisation needs one")
            plan.role_column[col.role] = col.name
    periods = schema.columns_with_role("period")
    if periods:
        p = periods[0]
        plan.year_sql = (f"year(s.{quote_ident(p.name)})" if p.type == "date"
                         else f"TRY_CAST(left(CAST(s.{quote_ident(p.name)} AS VARCHAR), 4) AS SMALLINT)")
    elif source in cfg.period_dates:
        name = cfg.period_dates[source]
        if name not in schema.names or schema.column(name).type != "date":
            raise SchemaError(f"pseudonymise.period_dates: '{name}' is not a date column of {source}")
        plan.year_sql = f"year(s.{quote_ident(name)})"
    else:
        raise SchemaError(f"{schema.path}: {source} has no period column; name a date column for it in "
                          "pseudonymise.period_dates")
    plan.references = {c: t for c, t in cfg.references.items() if c in schema.names}
    for c in plan.references:
        if schema.column(c).is_identifier:
            raise SchemaError(f"pseudonymise.references: '{c}' is an identifier-role column of {source}; "
                              "identifiers are encoded by role, not listed as references")
    if cfg.member_role_column in schema.names and "benefit_unit" in plan.role_column:
        plan.member_role = cfg.member_role_column
    return plan


# -- SQL builders ------------------------------------------------------------------------------

def plan_sources(config: Config, staged: Path) -> list[Source]:
    """The staged sources present in ``staged`` with their schemas and roles (what pseudonymise encodes)."""
    schemas_dir = config.paths.resolve(config.paths.schemas)
    return [_plan_source(s, paths[0] if len(paths) == 1 else paths, load_schema(s, schemas_dir), config.pseudonymise)
            for s in SOURCES if (paths := staged_paths(staged, s))]


def _key_sql(column: str, enc: _Encoder, alias: str = "s") -> str:
    """The staged column as the type its dictionary is keyed on (VARCHAR, or DATE for dates of birth)."""
    return f"CAST({alias}.{quote_ident(column)} AS {enc.value_type})"


def _rows_sql(plan: Source, joins: list[str] | None = None, order: str | None = None) -> str:
    """FROM ... WHERE: each staged row beside its record token, then the dictionary joins.

    The tokens are paired with rows by position (a POSITIONAL JOIN: no hash table of
    millions of tokens); the WHERE clause proves the pairing on every row: token i belongs
    to file row i, in identifiers, payload and crosswalk alike, or the query fails.
    ``order`` names a column of the record-token table to write the rows in (a keyed
    permutation, :func:`_record_tokens`), so a file's row order says nothing of the landing order.
    """
    return (f"FROM {staged_scan(plan.path)} AS s "
            f"POSITIONAL JOIN rt_{plan.name} AS rt {' '.join(joins or [])} "
            "WHERE CASE WHEN rt.i = s.file_row_number THEN true "
            "ELSE error('record tokens are not aligned with staged rows') END"
            + (f" ORDER BY rt.{quote_ident(order)}" if order else ""))


def identifiers_sql(plan: Source, encoders: dict[str, _Encoder], link_refs: dict[str, str],
                    order: str | None = None) -> str:
    """SELECT producing the identifiers file of one source (every contract column, in order)."""
    supplied: dict[str, str] = {}
    joins = []
    for role, enc in encoders.items():
        if isinstance(enc, _ContextEncoder):
            if (on := _context_join_sql(plan, enc)) is not None:
                joins.append(f"LEFT JOIN {enc.name} ON {on}")
                supplied.update({c: f"{enc.name}.{c}" for c in enc.columns})
            continue
        if role.startswith("ref:"):
            column = role[4:]
            if column not in plan.references or column not in link_refs:
                continue
        elif role not in plan.role_column:
            continue
        else:
            column = plan.role_column[role]
        joins.append(f"LEFT JOIN {enc.name} ON {enc.name}.v = {_key_sql(column, enc)}")
        for c in enc.columns:
            supplied[c] = f"{enc.name}.{c}"
    if "sex_code" in supplied:   # sealed with the row's own nonce: no two records share a seal
        supplied["sex_seal"] = seal_sql(supplied.pop("sex_code"), "rt.sex_nonce", "rt.sex_pad")
    dob = plan.role_column.get("dob")
    supplied["record_token"] = "rt.record_token"
    supplied["source"] = quote_literal(plan.name)
    supplied["year"] = plan.year_sql
    supplied["birth_year"] = f"year(s.{quote_ident(dob)})" if dob else "NULL"
    if plan.member_role:
        supplied["bu_role"] = f"s.{quote_ident(plan.member_role)}"
    select = [f"CAST({supplied.get(name, 'NULL')} AS {typ}) AS {name}"
              for name, typ in (*IDENTIFIER_COLUMNS, *((t, "VARCHAR") for t in link_refs.values()))]
    # after the contract's columns: a reference's Bloom filter (link-files' id) and link-files' plain
    # sex token (in memory only; the pseudonymised zone seals sex instead)
    contract = {name for name, _ in IDENTIFIER_COLUMNS} | set(link_refs.values())
    extra = sorted({c for role, enc in encoders.items() if not isinstance(enc, _ContextEncoder)
                    and (not role.startswith("ref:") or role[4:] in link_refs)
                    for c in enc.columns if c not in contract and c != "sex_code"})
    select += [f"CAST({supplied.get(name, 'NULL')} AS {'VARCHAR' if name.endswith('_tok') else 'BLOB'}) AS {name}"
               for name in extra]
    return f"SELECT {', '.join(select)} {_rows_sql(plan, joins, order)}"


def _context_columns(plan: Source, enc: _ContextEncoder, alias: str = "") -> tuple[list[str], str] | None:
    """The staged columns of ``enc``'s roles in ``plan`` (quoted) and its date of birth as SQL, or None to skip it."""
    columns = [plan.role_column.get(r) for r in enc.roles]
    dob = plan.role_column.get("dob")
    if None in columns or (dob is None and enc.dob_required):
        return None
    return ([alias + quote_ident(c) for c in columns],
            f"CAST({alias}{quote_ident(dob)} AS DATE)" if dob else "CAST(NULL AS DATE)")


def _context_join_sql(plan: Source, enc: _ContextEncoder) -> str | None:
    """The join condition of a context dictionary: its values and the date of birth (NULL matching NULL)."""
    if (found := _context_columns(plan, enc, "s.")) is None:
        return None
    columns, dob = found
    on = [f"{enc.name}.v{i} = CAST({c} AS VARCHAR)" for i, c in enumerate(columns)]
    return " AND ".join([*on, f"{enc.name}.d IS NOT DISTINCT FROM {dob}"])


def _distinct_context_sql(plans: list[Source], enc: _ContextEncoder) -> str | None:
    parts = []
    for p in plans:
        if (found := _context_columns(p, enc)) is None:
            continue
        columns, dob = found
        values = ", ".join(f"CAST({c} AS VARCHAR) AS v{i}" for i, c in enumerate(columns))
        parts.append(f"SELECT {values}, {dob} AS d FROM {parquet_source(p.path)}")
    if not parts:
        return None
    where = [f"v{i} IS NOT NULL AND trim(v{i}) <> ''" for i in range(len(enc.roles))]
    where += ["d IS NOT NULL"] if enc.dob_required else []
    return f"SELECT DISTINCT * FROM ({' UNION ALL '.join(parts)}) WHERE {' AND '.join(where)}"


def _payload_sql(plan: Source, encoders: dict[str, _Encoder], order: str | None = None) -> tuple[str, list[str]]:
    """SELECT producing the payload of one source, and the names of its columns."""
    select, joins, names = ["rt.record_token"], [], ["record_token"]
    for col in plan.schema.columns:
        if col.role not in ("attribute", "period"):
            continue
        if col.name in plan.references:
            enc = encoders[f"ref:{col.name}"]
            token_column = plan.references[col.name]
            joins.append(f"LEFT JOIN {enc.name} ON {enc.name}.v = {_key_sql(col.name, enc)}")
            select.append(f"{enc.name}.{token_column} AS {quote_ident(token_column)}")
            names.append(token_column)
        else:
            select.append(f"s.{quote_ident(col.name)}")
            names.append(col.name)
    return f"SELECT {', '.join(select)} {_rows_sql(plan, joins, order)}", names


def _crosswalk_sql(plan: Source) -> str:
    """SELECT producing the crosswalk rows of one source."""
    rid = plan.role_column.get("record_id")
    record_id = f"CAST(s.{quote_ident(rid)} AS VARCHAR)" if rid else "CAST(NULL AS VARCHAR)"
    return (f"SELECT rt.record_token, {quote_literal(plan.name)} AS source, CAST(s._file AS VARCHAR) AS file, "
            f"CAST(s._line AS BIGINT) AS line, CAST(s._row AS BIGINT) AS row, {record_id} AS record_id "
            f"{_rows_sql(plan)}")


def _distinct_sql(plans: list[Source], column_of: Callable[[Source], str | None], value_type: str) -> str | None:
    parts = [f"SELECT CAST({quote_ident(col)} AS {value_type}) AS v FROM {parquet_source(p.path)}"
             for p in plans if (col := column_of(p)) is not None]
    if not parts:
        return None
    blank = " AND trim(v) <> ''" if value_type == "VARCHAR" else ""
    return f"SELECT DISTINCT v FROM ({' UNION ALL '.join(parts)}) WHERE v IS NOT NULL{blank}"


# -- running ---------------------------------------------------------------------------------

# the zones written in a keyed order of their own: (column of the record-token table, HMAC domain)
ROW_ORDERS = {"identifiers": ("order_identifiers", "identifiers"), "payload": ("order_payload", "payload")}


def _record_tokens(n: int, order_key: bytes | None = None, seal_key: bytes | None = None) -> pa.Table:
    """n random 128-bit record tokens (os.urandom via secrets), as 32-character hex, with row numbers.

    With ``order_key`` (the ``row_order`` subkey), one sort key per zone of :data:`ROW_ORDERS`:
    the token's 16 bytes encrypted with AES-256 under HMAC-SHA256(order_key, zone), first
    8 bytes, shifted right by one to fit a signed 64-bit integer. Sorting by it is a keyed
    permutation: without the key a file's row i says nothing of the staged row it came from,
    and identifiers and payload are in orders unrelated to each other. A token is one AES
    block, so all tokens are encrypted in one call (an HMAC per token was 7x slower).

    With ``seal_key`` (the ``seal:sex`` subkey), each row's random seal nonce ``sex_nonce`` and
    its keystream ``sex_pad`` (:mod:`linkage.pseudonymise.seal`), also in one AES call.
    """
    raw = secrets.token_bytes(TOKEN_BYTES * n)
    hexed = binascii.hexlify(raw)
    width = 2 * TOKEN_BYTES
    offsets = np.arange(0, width * (n + 1), width, dtype=np.int64)
    tokens = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(hexed))
    columns = {"i": pa.array(np.arange(n, dtype=np.int64)), "record_token": tokens}
    if order_key is not None:
        for column, domain in ROW_ORDERS.values():
            mac = hmac.HMAC(order_key, hashes.SHA256())
            mac.update(domain.encode("ascii"))
            columns[column] = pa.array((aes_block_words(mac.finalize(), raw) >> np.uint64(1)).astype(np.int64))
    if seal_key is not None:
        raw_nonces = nonces(n)
        columns["sex_nonce"] = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(NONCE_BYTES), n, [None, pa.py_buffer(raw_nonces)]).cast(pa.binary())
        columns["sex_pad"] = pa.array(keystreams(seal_key, raw_nonces), pa.uint64())
    return pa.table(columns)


def _connect(spill: Path, cfg: PseudonymiseConfig) -> duckdb.DuckDBPyConnection:
    # spill files can hold cleartext: keep them inside the workspace (never DuckDB's ./.tmp default)
    con = connect(cfg, spill=spill, preserve_insertion_order=False)
    try:
        # after the positional join DuckDB cannot estimate the staged side's size and would build
        # its hash tables on millions of rows instead of the dictionaries; keep the build side as written
        con.execute("SET disabled_optimizers = 'build_side_probe_side'")
    except duckdb.Error:  # an engine without that optimizer: nothing to turn off
        pass
    return con


def _write_zone(con: duckdb.DuckDBPyConnection, sql: str, target: Path, key: MasterKey, zone: str, what: str) -> None:
    """Stream a SELECT into an encrypted zone file (:mod:`linkage.pseudonymise.store`)."""
    try:
        reader = con.sql(sql).to_arrow_reader(1_000_000)
        write_encrypted(target, reader, reader.schema, key, zone)
    except duckdb.Error as exc:
        # DuckDB messages can quote record values: report the step and error class only
        raise PseudonymiseError(f"{what} failed in DuckDB ({exc.__class__.__name__})") from exc


def build_dictionaries(con, plans: list[Source], encoders: dict[str, _Encoder]) -> dict[str, int]:
    counts = {}
    for key, enc in encoders.items():
        if isinstance(enc, _ContextEncoder):
            counts.update(_context_dictionary(con, plans, enc))
            continue
        if key.startswith("ref:"):
            column = key[4:]
            sql = _distinct_sql(plans, lambda p, c=column: c if c in p.references else None, enc.value_type)
        else:
            sql = _distinct_sql(plans, lambda p, r=key: p.role_column.get(r), enc.value_type)
        if sql is None:
            continue
        try:
            values = con.sql(sql).to_arrow_table().column("v")
        except duckdb.Error as exc:
            raise PseudonymiseError(f"reading distinct values of {enc.name} failed ({exc.__class__.__name__})") from exc
        encoded = enc.encode(values.to_pylist())
        table = pa.table({"v": values, **{c: encoded[c] for c in enc.columns}})
        con.register(enc.name, table)
        counts[enc.name] = table.num_rows
    return counts


def _context_dictionary(con, plans: list[Source], enc: _ContextEncoder) -> dict[str, int]:
    """Register ``enc``'s dictionary over the distinct (values, date of birth) tuples of ``plans``."""
    sql = _distinct_context_sql(plans, enc)
    if sql is None:
        return {}
    try:
        table = con.sql(sql).to_arrow_table()
    except duckdb.Error as exc:
        raise PseudonymiseError(f"reading distinct values of {enc.name} failed ({exc.__class__.__name__})") from exc
    keys = [table.column(f"v{i}").to_pylist() for i in range(len(enc.roles))]
    encoded = enc.encode(keys, table.column("d").to_pylist())
    table = pa.table({**{c: table.column(c) for c in table.column_names}, **{c: encoded[c] for c in enc.columns}})
    con.register(enc.name, table)
    return {enc.name: table.num_rows}


def _crosswalk_batches(con, plans: list[Source]) -> Iterator[pa.RecordBatch]:
    for plan in plans:
        try:
            reader = con.sql(_crosswalk_sql(plan)).to_arrow_reader(1_000_000)
        except duckdb.Error as exc:
            raise PseudonymiseError(f"{plan.name}: crosswalk query failed ({exc.__class__.__name__})") from exc
        for batch in reader:
            yield batch.cast(_CROSSWALK_SCHEMA)


def settings_digest(cfg: PseudonymiseConfig, schemas: dict[str, Schema]) -> str:
    """SHA-256 of every setting an encoding depends on, and of each source's schema version.

    Retention, incrementality and DuckDB's limits are left out: they change what is kept or how
    fast, never a token.
    """
    import hashlib

    settings = cfg.model_dump(mode="json", exclude={"purge_cleartext_after", "incremental", "memory_limit",
                                                    "threads"})
    versions = {name: schema.version for name, schema in sorted(schemas.items())}
    return hashlib.sha256(json.dumps([settings, versions, ENCODING_VERSION], sort_keys=True).encode()).hexdigest()


@dataclass
class Increment:
    """What an incremental run carries over and what it encodes.

    ``carry``: per source, the previous zone's file names (``<source>.parquet``,
    ``<source>.0001.parquet``, ...), linked into the new zone unchanged; ``new_files``: per
    source, the landing files whose staged rows are encoded now; ``files``: the manifest
    entries of every file the new zone covers.
    """
    carry: dict[str, list[str]]
    new_files: dict[str, list[str]]
    files: list[dict]


def staged_digests(con: duckdb.DuckDBPyConnection, plans: list[Source],
                   manifest: dict | None = None) -> dict[tuple[str, str], str]:
    """Per (source, landing file): its staged rows' count and an order-free hash of their values.

    Guards the carry-over against staged rows that changed while their landing file did not
    (a re-ingest under new normalisation rules, a hand edit): DuckDB's row hash, XORed
    over the file's rows (each row holds its own line number, so no two cancel)
    (:func:`linkage.ingest.stage.staged_row_digests`).

    ``manifest`` (``staged/manifest.json``): ingest records there each file's digest, made as
    it staged the rows, and each staged file's signature (size, mtime, inode, device) as it
    wrote it. A source whose staged file still has that signature takes its digests from the
    manifest instead of reading every row again (a delivery's run then reads no earlier row);
    any other source is hashed here, as before.
    """
    out = {}
    recorded = (manifest or {}).get("staged_files") or {}
    for p in plans:
        entries = [e for e in (manifest or {}).get("files", []) if e.get("source") == p.name]
        sig = recorded.get(p.name)
        if sig is not None and entries and all("staged_digest" in e for e in entries):
            try:
                same = staged_file_signature(p.path) == sig
            except OSError:
                same = False
            if same:
                out.update({(p.name, e["file"]): e["staged_digest"] for e in entries if e["staged_digest"]})
                continue
        try:
            out.update({(p.name, f): d for f, d in staged_row_digests(con, p.path).items()})
        except duckdb.Error as exc:
            raise PseudonymiseError(f"{p.path}: hashing the staged rows failed ({exc.__class__.__name__})") from exc
    return out


def plan_increment(ws: Workspace, digest: str, key: MasterKey, cfg: PseudonymiseConfig,
                   rows: dict[tuple[str, str], str]) -> tuple[Increment | None, str]:
    """Decide between an incremental and a full run, and say why in a phrase (for the log and summary).

    Incremental only when the previous zone was written under this key and these encoding
    settings, lists the files it covers, and every one of them is still in ``staged/`` with
    the same SHA-256 and the same staged rows (``rows``: :func:`staged_digests`): otherwise
    a full run (a withdrawn, corrected or re-normalised file must not keep its old rows).
    """
    zone = ws.zone("pseudonymised")
    if not cfg.incremental:
        return None, "full: pseudonymise.incremental is false"
    try:
        previous = json.loads((zone / "metadata.json").read_text())
        staged = json.loads((ws.zone("staged") / "manifest.json").read_text())["files"]
    except (OSError, ValueError, KeyError):
        return None, "full: no previous zone (or no staged manifest)"
    if previous.get("key_fingerprint") != key.fingerprint:
        return None, "full: the key differs from the previous zone's"
    if previous.get("settings_digest") != digest or "files" not in previous:
        return None, "full: encoding settings or schema versions differ from the previous zone's"
    if not (zone / CROSSWALK_FILE).exists():
        return None, "full: the previous zone has no crosswalk"
    try:
        found = [p.name for p in crosswalk_parts(zone / CROSSWALK_FILE)]
    except CrosswalkError:
        return None, "full: the previous zone's crosswalk lacks a part"
    if found != (previous.get("crosswalk") or {}).get("parts", [CROSSWALK_FILE]):
        return None, "full: the previous zone's crosswalk parts differ from those its metadata lists"
    now = {(f["source"], f["file"]): f["sha256"] for f in staged}
    for f in previous["files"]:
        if now.get((f["source"], f["file"])) != f["sha256"]:
            return None, f"full: {f['file']} was pseudonymised before and is gone from staged/ or changed"
        if rows.get((f["source"], f["file"])) != f.get("staged_rows"):
            return None, f"full: the staged rows of {f['file']} differ from those pseudonymised before"
    parts = previous.get("parts", {})
    for source, names in parts.items():
        for name in names:
            for sub in ("identifiers", "payload"):
                if not (zone / sub / name).is_file():
                    return None, f"full: the previous zone lacks {sub}/{name}"
    done = {(f["source"], f["file"]) for f in previous["files"]}
    new_files: dict[str, list[str]] = {}
    for f in staged:
        if (f["source"], f["file"]) not in done and f.get("rows_staged", 1):
            new_files.setdefault(f["source"], []).append(f["file"])
    covered = list(previous["files"]) + [_file_entry(f, rows) for f in staged if (f["source"], f["file"]) not in done]
    n = sum(len(v) for v in new_files.values())
    return Increment(parts, new_files, covered), f"incremental: {n} new file(s), {len(done)} carried"


def _file_entry(f: dict, rows: dict[tuple[str, str], str]) -> dict:
    return {"source": f["source"], "file": f["file"], "sha256": f["sha256"], "rows": f.get("rows_staged"),
            "staged_rows": rows.get((f["source"], f["file"]))}


def _part_name(source: str, existing: list[str]) -> str:
    return f"{source}.parquet" if not existing else f"{source}.{len(existing):04d}.parquet"


def _subset(con: duckdb.DuckDBPyConnection, path: Path | list[Path], files: list[str], target: Path) -> Path:
    """The staged rows of ``files`` only, in a spill file (cleartext: it stays in the workspace's spill)."""
    names = ", ".join(quote_literal(f) for f in files)
    try:
        con.execute(f"COPY (SELECT * FROM {parquet_source(path)} WHERE CAST(_file AS VARCHAR) IN ({names})) "
                    f"TO {path_literal(target)} (FORMAT parquet, COMPRESSION zstd, COMPRESSION_LEVEL 1)")
    except duckdb.Error as exc:
        raise PseudonymiseError(f"{path}: selecting the new files' rows failed ({exc.__class__.__name__})") from exc
    return target


def _coverage(ws: Workspace, increment: Increment | None, digest: str, parts: dict[str, list[str]], mode: str,
              new_rows: dict[str, int], rows: dict[tuple[str, str], str]) -> dict:
    """What the zone covers, for the next incremental run: files (name, SHA-256), parts per source, settings."""
    out = {"settings_digest": digest, "parts": parts, "mode": mode, "rows_encoded": new_rows}
    if increment:
        out["files"] = increment.files
    else:
        try:
            staged = json.loads((ws.zone("staged") / "manifest.json").read_text())["files"]
            out["files"] = [_file_entry(f, rows) for f in staged]
        except (OSError, ValueError, KeyError):
            pass   # no manifest: the next run is a full one
    return out


def _crosswalk_part(ws: Workspace, out: Path, key: MasterKey, con: duckdb.DuckDBPyConnection,
                    work: list[Source]) -> dict:
    """An incremental run's crosswalk: the previous parts linked unchanged, the new rows in a part of their own.

    Returns the whole crosswalk's summary (rows, segments and bytes over every part, the parts' names).
    """
    previous = zone_metadata(ws.zone("pseudonymised")).get("crosswalk") or {}
    names = list(previous.get("parts", [CROSSWALK_FILE]))
    for name in names:
        carry_file(ws.zone("pseudonymised") / name, out / name)
    total = {k: int(previous.get(k, 0)) for k in ("rows", "segments", "bytes")}
    if work:
        target = part_path(out / CROSSWALK_FILE, len(names))
        written = write_crosswalk(target, key, _crosswalk_batches(con, work), _CROSSWALK_SCHEMA,
                                  part=len(names))
        names.append(target.name)
        total = {k: total[k] + written[k] for k in total}
    return {**total, "parts": names}


def pseudonymise(config: Config, workspace: Path | str, key: MasterKey | None = None) -> dict:
    """Pseudonymise the staged zone into ``pseudonymised/``.

    Args:
        config: the hhlink config (``config.pseudonymise`` holds the encoding parameters).
        workspace: the workspace folder; reads ``staged/``, writes ``pseudonymised/``.
        key: the master key; default: loaded from ``HHLINK_KEY``, ``HHLINK_KEY_FILE`` or the default key file.

    Returns:
        A summary: rows per source, distinct values encoded per identifier, seconds per step,
        the key fingerprint and the crosswalk's size. Never a record value.

    Raises:
        SecretKeyError: no usable key (nothing is written).
        WorkspaceError: no staged zone.
        PseudonymiseError: a staged file off its contract, or an engine failure (the previous
            zone, if any, is left as it was).

    Example:
        >>> pseudonymise(load_config(), "workspace")["key_fingerprint"]   # doctest: +SKIP
        '3f9c0b6d2a1e4f70'
    """
    t0 = time.perf_counter()
    cfg = config.pseudonymise
    ws = Workspace(workspace)
    staged = ws.zone("staged")
    if not staged.is_dir():
        raise WorkspaceError(f"{staged}: no staged zone; run 'hhlink ingest' first")
    # the key first: a missing or unusable key must stop the run before anything is written
    key = key if key is not None else load_master_key(workspace=ws.root)
    ws.ensure()
    plans = plan_sources(config, staged)
    schemas = {p.name: p.schema for p in plans}
    if not plans:
        raise WorkspaceError(f"{staged}: no staged source files ({', '.join(s + '.parquet' for s in SOURCES)})")
    digest = settings_digest(cfg, schemas)
    previous = zone_metadata(ws.zone("pseudonymised")).get("key_fingerprint")
    if previous and previous != key.fingerprint:
        log.warning("re-pseudonymising under a different key (was %s, now %s): zones built on the old "
                    "pseudonymised/ no longer match it", previous, key.fingerprint)

    coder = Encoders(key, cfg)
    context = ContextEncoders(coder)
    roles = sorted({r for p in plans for r in p.role_column})
    encoders: dict[str, _Encoder | _ContextEncoder] = {r: e for r in roles if (e := context.for_role(r)) is not None}
    encoders["names_dates"] = context.names_and_dates()
    encoders["sex_place"] = context.sex_in_place()
    for column in sorted({c for p in plans for c in p.references}):
        encoders[f"ref:{column}"] = coder.for_reference(column, cfg.references[column])
    link_refs = {c: cfg.references[c] for c in cfg.link_references}

    seconds: dict[str, float] = {}
    spill = Path(tempfile.mkdtemp(prefix=".pseudonymise-spill-", dir=ws.root))
    con = _connect(spill, cfg)
    try:
        try:
            manifest = json.loads((staged / "manifest.json").read_text())
        except (OSError, ValueError):
            manifest = None     # hashed here, every row (and plan_increment then runs in full)
        rows_now = staged_digests(con, plans, manifest if isinstance(manifest, dict) else None)
        increment, mode = plan_increment(ws, digest, key, cfg, rows_now)
        log.info("pseudonymise: %s", mode)
        carried = increment.carry if increment else {}
        if increment:   # only the new files' rows are encoded; the rest of the zone is carried over
            work = [_plan_source(p.name, _subset(con, p.path, increment.new_files[p.name], spill / f"{p.name}.new.parquet"),
                                 p.schema, cfg) for p in plans if p.name in increment.new_files]
        else:
            work = plans
        t = time.perf_counter()
        distinct = build_dictionaries(con, work, encoders)
        seconds["encode_distinct"] = time.perf_counter() - t
        t = time.perf_counter()
        context_u = zone_metadata(ws.zone("pseudonymised")).get("context_u") if increment else None
        if context_u is None:   # the u of the context-keyed levels, from a sample in one context
            context_u = measure_context_u(con, plans, context, config.link.seed)
        seconds["context_u"] = time.perf_counter() - t
        log.info("encoded distinct values: %s", distinct)
        for plan in work:
            con.register(f"rt_{plan.name}", _record_tokens(plan.rows, key.subkey("row_order"),
                                                              key.subkey(SEAL_SUBKEY)))
        payload_columns = {p.name: _payload_sql(p, encoders)[1] for p in plans}
        parts = {p.name: list(carried.get(p.name, [])) for p in plans}
        with ws.publish_dir("pseudonymised") as out:
            (out / "identifiers").mkdir()
            (out / "payload").mkdir()
            for source, names in carried.items():
                for name in names:
                    for sub in ("identifiers", "payload"):
                        carry_file(ws.zone("pseudonymised") / sub / name, out / sub / name)
            t = time.perf_counter()
            new_parts = {plan.name: _part_name(plan.name, parts[plan.name]) for plan in work}
            for plan in work:
                target = out / "identifiers" / new_parts[plan.name]
                sql = identifiers_sql(plan, encoders, link_refs, ROW_ORDERS["identifiers"][0])
                _write_zone(con, sql, target, key, "identifiers", f"{plan.name}: identifiers")
                log.info("%s: identifiers written (%d rows)", plan.name, plan.rows)
            seconds["identifiers"] = time.perf_counter() - t
            t = time.perf_counter()
            for plan in work:
                sql, _ = _payload_sql(plan, encoders, ROW_ORDERS["payload"][0])
                _write_zone(con, sql, out / "payload" / new_parts[plan.name], key, "payload", f"{plan.name}: payload")
                parts[plan.name].append(new_parts[plan.name])
            seconds["payload"] = time.perf_counter() - t
            t = time.perf_counter()
            if increment:   # the earlier rows' mapping is not read again: the new rows go into a part file
                crosswalk = _crosswalk_part(ws, out, key, con, work)
            else:
                crosswalk = {**write_crosswalk(out / CROSSWALK_FILE, key, _crosswalk_batches(con, work),
                                               _CROSSWALK_SCHEMA), "parts": [CROSSWALK_FILE]}
            seconds["crosswalk"] = time.perf_counter() - t
            seconds["total"] = time.perf_counter() - t0
            summary = _metadata(config, key, plans, payload_columns, distinct, crosswalk, link_refs, seconds)
            summary.update(_coverage(ws, increment, digest, parts, mode, {p.name: p.rows for p in work}, rows_now))
            summary["context_u"] = context_u
            (out / "metadata.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
    log.info("pseudonymised %d rows in %.1fs (key %s)", sum(p.rows for p in plans), seconds["total"], key.fingerprint)
    if cfg.purge_cleartext_after == "pseudonymise":
        summary = {**summary, "purged": purge_cleartext(ws)}
    return summary


def purge_cleartext(ws: Workspace) -> dict[str, int]:
    """Delete the row files of ``staged/`` and ``quarantine/`` (every identifier in clear).

    Kept: ``staged/manifest.json`` and ``staged/ledger.json`` (counts and file hashes, no
    record value). Deleting unlinks the files; on SSDs and copy-on-write filesystems the
    blocks may persist until reused, so the workspace's volume should be encrypted too.

    Returns:
        The number of files deleted per zone.
    """
    purged = {}
    for zone in ("staged", "quarantine"):
        files = sorted(ws.zone(zone).glob("*.parquet")) if ws.zone(zone).is_dir() else []
        for f in files:
            f.unlink()
        purged[zone] = len(files)
    log.info("purged the cleartext rows of staged/ and quarantine/ (%s files), as pseudonymise.purge_cleartext_after "
             "says", purged)
    return purged


def _metadata(config: Config, key: MasterKey, plans: list[Source], payload_columns: dict[str, list[str]],
              distinct: dict[str, int], crosswalk: dict, link_refs: dict[str, str], seconds: dict) -> dict:
    cfg = config.pseudonymise
    return {
        "stage": "pseudonymise",
        "created_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "key_fingerprint": key.fingerprint,
        "rows": {p.name: p.rows for p in plans},
        "distinct_values_encoded": distinct,
        "tokens": {"algorithm": "HMAC-SHA256", "key": "HKDF-SHA256 subkey 'tokens'",
                   "bits": TOKEN_BYTES * 8, "encoding": "lower-case hex",
                   "domain_separation": "field name and NUL prefixed to the value",
                   "phonetic": cfg.phonetic,
                   "context": {"encoding_version": ENCODING_VERSION,
                               "dobc_tok": "token (domain 'dobc') of the year and the sorted day and month of birth",
                               "keyed": [c for role in CONTEXT_ROLES for c in _CONTEXT_COLUMNS[role]],
                               "tokens": "domain '<field>@dobc' of the value, US, the record's dobc_tok ('' without)",
                               "bloom_filters": "stored bits permuted per dobc_tok: PCG64 seeded with HMAC-SHA256("
                                                "the filter's key, 'context' NUL dobc_tok)",
                               "name_dates": list(NAME_DATE_PARTS)}},
        "bloom_filters": {name: {**p.as_dict(), "key": f"HKDF-SHA256 subkey 'bloom:{field}'"}
                          for (name, p), field in zip(bloom_params(cfg).items(),
                                                      ("first_name", "surname", "address"))}
                         | {"sn_swap_bf": {**bloom_params(cfg)["fn_bf"].as_dict(),
                                           "key": "HKDF-SHA256 subkey 'bloom:first_name' (surnames under the "
                                                  "forename key, to detect swapped names)"}},
        "record_token": {"bits": TOKEN_BYTES * 8, "source": "os.urandom (secrets), not derived from any value"},
        "sex_seal": {"cipher": "8-byte random nonce per record, then the code zero-padded to 8 bytes XOR the "
                               "first 8 bytes of AES-256-ECB(nonce zero-padded to 16)",
                     "key": f"HKDF-SHA256 subkey '{SEAL_SUBKEY}'", "reader": "hhlink assemble"},
        "sex_tok": "token (domain 'sex_place@dobc') of the code US dobc_tok US the postcode unit: shared only by "
                   "records of one date of birth and one postcode; NULL without either (link only)",
        "row_order": {zone: f"sorted by AES-256 of the record token's bytes under HMAC-SHA256(HKDF-SHA256 "
                            f"subkey 'row_order', '{domain}')" for zone, (_, domain) in ROW_ORDERS.items()},
        "identifiers_columns": [c for c, _ in IDENTIFIER_COLUMNS] + list(link_refs.values()),
        "payload": {p.name: {"columns": payload_columns.get(p.name, []),
                             "tokenised_references": p.references} for p in plans},
        "crosswalk": {"file": CROSSWALK_FILE, "cipher": "AES-256-GCM", "key": "HKDF-SHA256 subkey 'crosswalk'",
                      **crosswalk},
        "purge_cleartext_after": cfg.purge_cleartext_after,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
