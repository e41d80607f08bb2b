"""Declarations of a protected table: its dimensions (with hierarchies), measures and population.

Example:
    >>> geo = Dimension("geography", levels=("region", "la"))
    >>> spec = TableSpec("pay", dimensions=(geo,), measures=(Measure("mean_pay", "mean", "pay"),))
    >>> spec.columns
    ('region', 'la')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

TOTAL = "Total"

MeasureKind = Literal["count", "sum", "mean", "quantile", "slope", "predict", "proportion"]
#: measures whose cell values add up over margins (checked by the linear-programming audit)
ADDITIVE = ("sum", "mean")


@dataclass(frozen=True)
class Dimension:
    """A classification of a table, possibly hierarchical (coarsest level first).

    Fields:
        name: the dimension's name (for the data dictionary).
        levels: the columns from the coarsest to the finest level, e.g. ``("region", "la")``:
            each finer category nests in exactly one coarser one.
        categories: the full list of leaf categories as tuples (one value per level), so that
            a category empty in the data still appears (as a zero); ``None`` takes them from
            the data.
        description: what the dimension means.
    """

    name: str
    levels: tuple[str, ...]
    categories: tuple[tuple[str, ...], ...] | None = None
    description: str = ""

    def __post_init__(self):
        if not self.levels:
            raise ValueError(f"dimension {self.name} has no levels")


@dataclass(frozen=True)
class Measure:
    """One released statistic per cell.

    Fields:
        name: the value of the output's ``measure`` column.
        kind: ``count`` (contributing units), ``sum``, ``mean``, ``quantile`` (``q`` in 0..1),
            ``slope`` (OLS slope of ``column`` on ``x``), ``predict`` (the OLS line of
            ``column`` on ``x`` evaluated at ``at``), ``proportion`` (share of units whose
            0/1 ``column`` is 1).
        column: the value column of the contributions (not for ``count``).
        x: the regressor column of ``slope`` and ``predict``.
        q: the quantile of ``quantile`` (0.5 is the median).
        at: where ``predict`` evaluates the fitted line.
        description: what the measure means, and its unit.
    """

    name: str
    kind: MeasureKind
    column: str | None = None
    x: str | None = None
    q: float | None = None
    at: float | None = None
    description: str = ""

    def __post_init__(self):
        if self.kind != "count" and not self.column:
            raise ValueError(f"measure {self.name} ({self.kind}) needs a column")
        if self.kind in ("slope", "predict") and not self.x:
            raise ValueError(f"measure {self.name} ({self.kind}) needs a regressor column x")
        if self.kind == "quantile" and not (self.q is not None and 0 <= self.q <= 1):
            raise ValueError(f"measure {self.name} needs a quantile q in [0, 1]")
        if self.kind == "predict" and self.at is None:
            raise ValueError(f"measure {self.name} needs 'at'")

    @property
    def columns(self) -> tuple[str, ...]:
        """The contribution columns this measure reads."""
        return tuple(c for c in (self.column, self.x) if c)


@dataclass(frozen=True)
class TableSpec:
    """A table to protect: its population is the contributions given, one row per unit.

    Fields:
        name: file stem in ``published/`` (``[a-z0-9_]+``).
        dimensions: the table's dimensions; every combination of their categories, with
            margins (``Total``) at every level, is a cell.
        measures: the statistics released per cell; a ``count`` of units is always added.
        unit: the contributions' unit-key column (person or household key).
        unit_label: ``persons`` or ``households``: what the count counts.
        title: a human title.
        description: what the table shows and its population.
        perturb: override the config's ``perturb`` (``build_table`` forces ``True``).
    """

    name: str
    dimensions: tuple[Dimension, ...]
    measures: tuple[Measure, ...] = ()
    unit: str = "unit"
    unit_label: str = "persons"
    title: str = ""
    description: str = ""
    perturb: bool | None = None
    _count: Measure = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        import re

        if not re.fullmatch(r"[a-z0-9_]+", self.name):
            raise ValueError(f"table name {self.name!r} must match [a-z0-9_]+")
        names = [m.name for m in self.measures]
        if len(set(names)) != len(names):
            raise ValueError(f"table {self.name}: measure names repeat")
        cols = self.columns
        if len(set(cols)) != len(cols):
            raise ValueError(f"table {self.name}: a dimension column appears twice")
        object.__setattr__(self, "_count", Measure(self.unit_label, "count",
                                                   description=f"number of {self.unit_label}"))

    @property
    def columns(self) -> tuple[str, ...]:
        """Every dimension column, coarsest level first within each dimension."""
        return tuple(c for d in self.dimensions for c in d.levels)

    @property
    def all_measures(self) -> tuple[Measure, ...]:
        """The unit count followed by the declared measures (a declared ``count`` is not repeated)."""
        declared = tuple(m for m in self.measures if m.kind != "count")
        return (self._count, *declared)
