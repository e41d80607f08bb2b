"""SQL builders for ingest: normalise identifiers, coerce types and check each row.

Every builder is a pure function of a :class:`~linkage.schemas.Schema` that returns SQL
for DuckDB, so the rules live in one place, are derived from the schema file and can be
read as text. :func:`norm_select` turns delivered values (all VARCHAR) into normalised
text and keeps the ``<name>_raw`` copies; over that, :func:`staged_select` gives the typed
columns and :func:`fail_sql` one value per row: ``NULL`` when the row can be staged,
otherwise ``'reason:column'`` for the first failing rule in declared column order.

Normalisation (the staged contract):

- names (roles first_name, middle_names, surname): Unicode NFC, trimmed, runs of
  whitespace collapsed to one space, upper case;
- address: NFC, trimmed, whitespace collapsed (case kept);
- postcode: upper case, spaces removed, then one space before the last three characters;
- nino, upn: upper case, no whitespace;
- sex: trimmed, upper case, ``MALE``/``FEMALE`` read as ``M``/``F``;
- every other value: trimmed; an empty value is NULL.

Checks, per column in declared order and in this order within a column: the value is
no longer than its declared ``max_length`` (``too_long``), it parses as its type strictly
(``bad_int``, ``bad_float``, ``bad_date``, ``bad_bool``; ``1_000`` is not a number), a required
value is present (``not_null``), it matches the declared pattern (``pattern``), it is one
of the allowed values (``not_allowed``), it lies in ``[min, max]`` (``out_of_range``).

Example:
    >>> from linkage.schemas import load_schema
    >>> edu = load_schema("education")
    >>> "nfc_normalize" in norm_select(edu) and "'out_of_range:ks2_score'" in fail_sql(edu)
    True
"""

from __future__ import annotations

from linkage.db import quote_ident as q
from linkage.db import quote_literal as lit
from linkage.schemas import Column, Schema

NAME_ROLES = frozenset({"first_name", "middle_names", "surname"})
SQL_TYPES = {"string": "VARCHAR", "int": "BIGINT", "float": "DOUBLE", "date": "DATE", "bool": "BOOLEAN"}
WHITESPACE = " \t\r\n\v\f\u00a0"
_FLOAT_RE = "[+-]?([0-9]+[.]?[0-9]*|[.][0-9]+)([eE][+-]?[0-9]+)?"


def raw_columns(schema: Schema) -> list[Column]:
    """Columns that keep their delivered value beside the normalised one (identifiers but record_id)."""
    return [c for c in schema.columns if c.is_identifier and c.role != "record_id"]


def _odd_space_sql(v: str, full: bool = True) -> str:
    """True when a value has whitespace other than single inner spaces (cheap substring tests).

    ``full=False`` looks only for edge spaces and tabs: enough for codes, numbers and
    dates, where any other stray whitespace fails the column's checks anyway.
    """
    tests = [f"prefix({v}, ' ')", f"suffix({v}, ' ')", f"contains({v}, chr(9))"]
    if full:
        tests += [f"contains({v}, '  ')"] + [f"contains({v}, chr({c}))" for c in (10, 11, 12, 13, 160)]
    return "(" + " OR ".join(tests) + ")"


def _trimmed_sql(v: str) -> str:
    # trimming only values with odd whitespace is about 3x cheaper than trimming every value
    return f"nullif(CASE WHEN {_odd_space_sql(v, full=False)} THEN trim({v}, {lit(WHITESPACE)}) ELSE {v} END, '')"


def _collapsed_sql(v: str) -> str:
    """NFC, trimmed, whitespace runs collapsed (the regex runs only where there is something to fix)."""
    fix = f"trim(regexp_replace(nfc_normalize({v}), '\\s+', ' ', 'g'), {lit(WHITESPACE)})"
    return f"nullif(CASE WHEN {_odd_space_sql(v)} THEN {fix} ELSE nfc_normalize({v}) END, '')"


def normalised_sql(col: Column, v: str | None = None) -> str:
    """The normalised text of a delivered value ``v`` (default: the column); NULL when blank."""
    v = v or q(col.name)
    if col.role in NAME_ROLES:
        return f"upper({_collapsed_sql(v)})"
    if col.role == "address":
        return _collapsed_sql(v)
    if col.role == "postcode":
        p = f"upper(regexp_replace({v}, '\\s+', '', 'g'))"
        slow = (f"CASE WHEN length({p}) > 3 THEN left({p}, length({p}) - 3) || ' ' || right({p}, 3) "
                f"ELSE nullif({p}, '') END")
        return f"(CASE WHEN regexp_full_match({v}, '[A-Z]{{1,2}}[0-9][A-Z0-9]? [0-9][A-Z]{{2}}') THEN {v} ELSE {slow} END)"
    if col.role in ("nino", "upn"):
        return (f"(CASE WHEN regexp_matches({v}, '[\\sa-z]') THEN nullif(upper(regexp_replace({v}, '\\s+', '', 'g')), '') "
                f"ELSE nullif({v}, '') END)")
    if col.role == "sex":
        t = f"upper({_trimmed_sql(v)})"
        return f"(CASE WHEN {v} IN ('M', 'F') THEN {v} ELSE (CASE {t} WHEN 'MALE' THEN 'M' WHEN 'FEMALE' THEN 'F' ELSE {t} END) END)"
    return _trimmed_sql(v)


def _typed_sql(col: Column, text: str) -> str:
    """Cast normalised text to the column's type; NULL when it does not parse."""
    if col.type == "string":
        return text
    if col.type == "int":
        return f"(CASE WHEN regexp_full_match({text}, '[+-]?[0-9]+') THEN TRY_CAST({text} AS BIGINT) END)"
    if col.type == "float":
        # strict: DuckDB's cast alone reads '1_000' as 1000
        d = f"TRY_CAST({text} AS DOUBLE)"
        return (f"(CASE WHEN regexp_full_match({text}, {lit(_FLOAT_RE)}) AND isfinite({d}) THEN {d} END)")
    if col.type == "date":
        return f"CAST(TRY_STRPTIME({text}, {lit(col.format)}) AS DATE)"
    if col.type == "bool":
        return f"TRY_CAST({text} AS BOOLEAN)"
    raise ValueError(f"unknown type {col.type}")


def _bound_sql(col: Column, value) -> str:
    if col.type == "date":
        return f"DATE {lit(value)}"
    return repr(value) if col.type in ("int", "float") else lit(value)


def _failures(col: Column, t: str, v: str) -> list[tuple[str, str]]:
    """(condition, reason) pairs for one column; ``t`` is the normalised text, ``v`` the typed value."""
    out: list[tuple[str, str]] = []
    if col.max_length is not None:
        # strlen (bytes) is O(1) and never below the character count: length() runs only past it
        m = int(col.max_length)
        out.append((f"strlen({t}) > {m} AND length({t}) > {m}", "too_long"))
    if col.type != "string":
        out.append((f"{v} IS NULL AND {t} IS NOT NULL", f"bad_{col.type}"))
    if not col.nullable:
        out.append((f"{v} IS NULL", "not_null"))
    if col.pattern:
        out.append((f"{v} IS NOT NULL AND NOT regexp_full_match({v}, {lit(col.pattern)})", "pattern"))
    if col.allowed is not None:
        values = ", ".join(_bound_sql(col, a) for a in col.allowed)
        out.append((f"{v} IS NOT NULL AND {v} NOT IN ({values})", "not_allowed"))
    bounds = []
    if col.min is not None:
        bounds.append(f"{v} < {_bound_sql(col, col.min)}")
    if col.max is not None:
        bounds.append(f"{v} > {_bound_sql(col, col.max)}")
    if bounds:
        out.append((f"({' OR '.join(bounds)})", "out_of_range"))
    return out


def norm_select(schema: Schema) -> str:
    """Select list of normalised text (``<name>__t``) and ``<name>_raw`` copies, from delivered values.

    The normalised text is materialised once; the typed values and checks
    (:func:`fail_sql`, :func:`staged_select`) are cheap expressions over it, which
    DuckDB may inline and re-evaluate freely.
    """
    parts = [f"{normalised_sql(c)} AS {q(c.name + '__t')}" for c in schema.columns]
    parts += [f"nullif({q(c.name)}, '') AS {q(c.name + '_raw')}" for c in raw_columns(schema)]
    return ", ".join(parts)


def typed_sql(col: Column) -> str:
    """The column's typed value from its normalised text."""
    return _typed_sql(col, q(col.name + "__t"))


def fail_sql(schema: Schema) -> str:
    """``'reason:column'`` of the first failing rule in declared column order, NULL for a good row."""
    cases = ["WHEN _bad_shape THEN 'field_count:'"]     # a CSV row with too few or too many fields
    for col in schema.columns:
        for cond, reason in _failures(col, q(col.name + "__t"), f"({typed_sql(col)})"):
            cases.append(f"WHEN {cond} THEN {lit(reason + ':' + col.name)}")
    return "(CASE " + " ".join(cases) + " END)" if cases else "CAST(NULL AS VARCHAR)"


def staged_select(schema: Schema) -> str:
    """The staged file's columns, in order: typed schema columns, ``<name>_raw``, provenance."""
    cols = [f"{typed_sql(c)} AS {q(c.name)}" for c in schema.columns]
    cols += [q(c.name + "_raw") for c in raw_columns(schema)]
    return ", ".join(cols + ["_file", "_line", "_row"])
