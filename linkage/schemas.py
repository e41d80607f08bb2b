"""Data contracts: load the source schemas declared in ``schemas/*.toml``.

A schema is a value: the stages read it at run time and derive their checks from it,
so a column, type, role or allowed value is declared once, in its file.

Example:
    >>> from linkage.schemas import load_schema
    >>> edu = load_schema("education")
    >>> edu.columns_with_role("upn")[0].name
    'upn'
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from linkage import resources
from linkage.errors import SchemaError, read_toml

SOURCES = ("education", "benefits", "earnings")
TYPES = ("string", "int", "float", "date", "bool")
IDENTIFIER_ROLES = frozenset(
    {"record_id", "upn", "nino", "first_name", "middle_names", "surname", "dob", "sex",
     "postcode", "address", "benefit_unit"}
)
ROLES = IDENTIFIER_ROLES | {"attribute", "period"}


@dataclass(frozen=True)
class Column:
    """One declared column: name, type, role, nullability and its value rules."""

    name: str
    type: str
    role: str
    nullable: bool
    description: str
    pattern: str | None = None
    allowed: tuple | None = None
    min: object | None = None
    max: object | None = None
    format: str | None = None
    max_length: int | None = None       # longest value in characters (reason ``too_long`` beyond it)

    @property
    def is_identifier(self) -> bool:
        """True when the column identifies a person (never leaves pseudonymisation in clear)."""
        return self.role in IDENTIFIER_ROLES


@dataclass(frozen=True)
class Schema:
    """A source extract's contract, as declared in ``schemas/<source>.toml``."""

    source: str
    version: str
    description: str
    file_stem: str
    encoding: str
    columns: tuple[Column, ...]
    unique: tuple[tuple[str, ...], ...] = field(default=())
    path: Path | None = None

    @property
    def names(self) -> list[str]:
        """Column names in declared order (the expected header)."""
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column:
        """Return the column called ``name``."""
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    def columns_with_role(self, role: str) -> list[Column]:
        """Columns playing ``role`` (e.g. ``"first_name"``), in declared order."""
        return [c for c in self.columns if c.role == role]


def _column(raw: dict, where: str, max_length: int | None = None) -> Column:
    try:
        col = Column(
            name=raw["name"], type=raw["type"], role=raw["role"],
            nullable=bool(raw["nullable"]), description=raw.get("description", ""),
            pattern=raw.get("pattern"),
            allowed=tuple(raw["allowed"]) if "allowed" in raw else None,
            min=raw.get("min"), max=raw.get("max"), format=raw.get("format"),
            max_length=raw.get("max_length", max_length),
        )
    except KeyError as exc:
        raise SchemaError(f"{where}: column is missing '{exc.args[0]}'") from None
    if col.type not in TYPES:
        raise SchemaError(f"{where}: column '{col.name}' has unknown type '{col.type}'")
    if col.role not in ROLES:
        raise SchemaError(f"{where}: column '{col.name}' has unknown role '{col.role}'")
    if col.max_length is not None and (not isinstance(col.max_length, int) or isinstance(col.max_length, bool)
                                       or col.max_length < 1):
        raise SchemaError(f"{where}: column '{col.name}' max_length must be a positive whole number")
    if col.type == "date" and not col.format:
        raise SchemaError(f"{where}: date column '{col.name}' needs a 'format'")
    if col.pattern:
        try:
            re.compile(col.pattern)
        except re.error as exc:
            raise SchemaError(f"{where}: column '{col.name}' pattern is invalid ({exc})") from None
    return col


def load_schema(source: str, folder: Path | str | None = None) -> Schema:
    """Load and check one source schema.

    Args:
        source: the source name (``education``, ``benefits`` or ``earnings``).
        folder: the schemas folder; default the packaged ``schemas/``.

    Returns:
        The :class:`Schema`.

    Raises:
        SchemaError: missing file, bad TOML or a malformed column declaration.
    """
    folder = Path(folder) if folder is not None else resources.packaged("schemas")
    path = folder / f"{source}.toml"
    raw = read_toml(path, SchemaError, "schema file")
    cols = tuple(_column(c, str(path), raw.get("max_field_length")) for c in raw.get("columns", []))
    if not cols:
        raise SchemaError(f"{path}: declares no columns")
    names = [c.name for c in cols]
    if len(set(names)) != len(names):
        raise SchemaError(f"{path}: duplicate column names")
    unique = tuple(tuple(u) for u in raw.get("unique", []))
    for key in unique:
        for name in key:
            if name not in names:
                raise SchemaError(f"{path}: unique key names unknown column '{name}'")
    try:
        return Schema(
            source=raw["source"], version=raw["version"], description=raw.get("description", ""),
            file_stem=raw.get("file_stem", source), encoding=raw.get("encoding", "utf-8"),
            columns=cols, unique=unique, path=path,
        )
    except KeyError as exc:
        raise SchemaError(f"{path}: missing top-level key '{exc.args[0]}'") from None


def load_schemas(folder: Path | str | None = None) -> dict[str, Schema]:
    """Load the three source schemas, keyed by source name."""
    return {s: load_schema(s, folder) for s in SOURCES}
