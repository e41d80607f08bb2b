"""The standard published tables and the catalogue that on-demand requests choose from.

Every table is built from record-level contributions of the intergenerational cohort
(``research/cohort.parquet``, one row per child, joined to ``research/person.parquet`` for
ethnicity), never from the unprotected aggregates in ``research/mobility`` or
``research/transition_matrix``. The unit is the child (``child_id``, the project key).

Standard tables (``hhlink disclose``):

================================== ==================================================================
table                              content
================================== ==================================================================
``mobility_la_cohort``             intergenerational elasticity, rank-rank slope, absolute upward
                                   mobility and mean pay at 25-30, by LA within region x birth cohort band
``attainment_<measure>_la``        KS4 Attainment 8 (mean, median) by LA within region x each
                                   disadvantage measure: ever FSM, years on FSM, household income
                                   quintile, benefit spell, parental earnings quintile
``pay_parent_quintile_region``     pay at 25-30 (mean, median) by parents' earnings quintile x region
``transition_region``              children by parents' earnings quintile x own pay quintile, by region
                                   (the quintile transition matrix: each row's shares are its cells
                                   over its ``Total``)
================================== ==================================================================

Categories: quintiles are fifths of the within-cohort percentile rank (1 = bottom);
birth cohorts are bands of ``disclosure.cohort_band`` years; every local authority of
the ONS lookup (``assemble.la_lookup``) appears, so an LA without children shows as an
empty (suppressed) cell rather than vanishing.

Missing categories (``disclosure.missing_categories``): by default a table's population is
the children with a known category on each of its dimensions (a child without a parental
earnings quintile is not in the quintile tables), so no ``Unknown`` column of mostly empty
cells forces suppression and national and regional totals survive; the table's
description says whom it covers. ``unknown`` keeps them as an ``Unknown`` category.

On-demand requests are declared in a canonical order (dimensions sorted by name, ``la``
bringing its region), so the same request named in any order is the same table.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import duckdb

from linkage.config import Config
from linkage.db import quote_ident as _q
from linkage.errors import WorkspaceError
from linkage.sdc.cells import ContributionError
from linkage.sdc.spec import Dimension, Measure, TableSpec

#: the derived, record-level view of the cohort every table and request reads
_BASE_SQL = """
    select c.child_id as child,
           c.region_at_16 as region, c.la_at_16 as la,
           cast(c.birth_year - c.birth_year % {band} as varchar) || '-' ||
               cast(c.birth_year - c.birth_year % {band} + {band} - 1 as varchar) as cohort,
           c.sex, p.ethnicity,
           {quintile(c.parents_earnings_percentile)} as parent_income_quintile,
           {quintile(c.adult_pay_percentile)} as child_income_quintile,
           {quintile(c.household_income_percentile)} as household_income_quintile,
           case when c.ever_fsm then 'yes' when not c.ever_fsm then 'no' end as fsm_ever,
           case when c.persistent_fsm then 'yes' when not c.persistent_fsm then 'no' end as persistent_fsm,
           case when c.fsm_years is null then null when c.fsm_years = 0 then '0' when c.fsm_years <= 2 then '1-2'
                when c.fsm_years <= 5 then '3-5' else '6+' end as fsm_years_band,
           case when coalesce(c.benefit_spells, 0) = 0 then 'none'
                when c.longest_spell_months >= {long_spell} then 'long' else 'short' end as benefit_spell,
           c.ks2_score::double as ks2_score, c.ks4_att8, c.adult_pay, c.log_adult_pay, c.log_parents_earnings,
           c.adult_pay_percentile, c.parents_earnings_percentile,
           case when c.neet_window_years > 0 then (c.neet_years > 0)::int end::double as neet_any
    from {cohort} c
    left join (select person_id, ethnicity from {person}) p
           on p.person_id = c.child_id
"""


def _quintile_sql(pct: str) -> str:
    # DuckDB's least() skips NULLs, so a missing percentile must stay missing explicitly
    return f"case when {pct} is not null then cast(least(5, floor({pct} / 20) + 1) as bigint)::varchar end"


@dataclass(frozen=True)
class Source:
    """A table's population: the cohort's derived view, restricted to rows with every needed column.

    Fields:
        needs: columns that must be present (non-null) for a child to count.
        columns: the columns the table reads (dimensions and measure inputs).
    """

    needs: tuple[str, ...]
    columns: tuple[str, ...]


def population(con: duckdb.DuckDBPyConnection, workspace: Path, source: Source, config: Config, key) -> str:
    """The SELECT that yields one row per child of ``source``'s population (reads ``research/``).

    ``research/`` is encrypted at rest: ``cohort`` and ``person`` are decrypted with ``key``
    (the master key or the project's research subkey) through
    :func:`linkage.pseudonymise.store.register_research`, which keeps them in memory once
    decrypted, and registered in ``con`` as ``research_cohort`` and ``research_person``.
    """
    from linkage.pseudonymise.store import register_research

    research = Path(workspace) / "research"
    for table in ("cohort", "person"):
        if not (research / f"{table}.parquet").exists():
            raise WorkspaceError(f"{research}/{table}.parquet not found; run hhlink assemble first")
    cohort, person = register_research(con, workspace, key, ("cohort", "person"))
    base = _BASE_SQL
    for pct in ("parents_earnings_percentile", "adult_pay_percentile", "household_income_percentile"):
        base = base.replace(f"{{quintile(c.{pct})}}", _quintile_sql(f"c.{pct}"))
    base = base.format(cohort=_q(cohort), person=_q(person), band=config.disclosure.cohort_band,
                       long_spell=float(config.assemble.long_spell_months))
    where = " and ".join(f"{_q(c)} is not null" for c in source.needs) or "true"
    cols = ", ".join(_q(c) for c in ("child", *source.columns))
    return f"select {cols} from ({base}) where {where}"


def _la_categories(config: Config) -> tuple[tuple[str, str], ...]:
    path = config.paths.resolve(config.assemble.la_lookup)
    with path.open(newline="", encoding="utf-8") as fh:
        return tuple((r["region_code"], r["utla_code"]) for r in csv.DictReader(fh))


def _regions(config: Config) -> tuple[tuple[str], ...]:
    return tuple(sorted({(r,) for r, _ in _la_categories(config)}))


_QUINTILES = tuple((str(i),) for i in range(1, 6))

#: categories that are another dimension's category by definition: the disclosure audit
#: treats such cells of two tables as one cell (no years on FSM is never on FSM)
ALIASES: dict[tuple[str, str], tuple[str, str]] = {("fsm_years_band", "0"): ("fsm_ever", "no")}
_YESNO = (("no",), ("yes",))


def dimension(name: str, config: Config) -> Dimension:
    """The catalogue's dimension called ``name`` (``la`` is local authority within region)."""
    d = {
        "region": Dimension("region", ("region",), _regions(config), "ONS region of the school LA at 16"),
        "la": Dimension("geography", ("region", "la"), _la_categories(config),
                        "Upper-tier local authority of the school at 16, within its ONS region"),
        "cohort": Dimension("cohort", ("cohort",), None,
                            f"Birth cohort, in bands of {config.disclosure.cohort_band} years"),
        "sex": Dimension("sex", ("sex",), (("F",), ("M",)), "Sex (M or F)"),
        "ethnicity": Dimension("ethnicity", ("ethnicity",), None, "DfE ethnicity code"),
        "parent_income_quintile": Dimension("parent_income_quintile", ("parent_income_quintile",), _QUINTILES,
                                            "Quintile of parental PAYE earnings in childhood within the birth "
                                            "cohort (1 = bottom fifth)"),
        "child_income_quintile": Dimension("child_income_quintile", ("child_income_quintile",), _QUINTILES,
                                           "Quintile of the child's own pay at 25-30 within the birth cohort"),
        "household_income_quintile": Dimension("household_income_quintile", ("household_income_quintile",),
                                               _QUINTILES, "Quintile of equivalised household income in "
                                                           "childhood within the birth cohort"),
        "fsm_ever": Dimension("fsm_ever", ("fsm_ever",), _YESNO, "Ever on free school meals"),
        "persistent_fsm": Dimension("persistent_fsm", ("persistent_fsm",), _YESNO,
                                    "On FSM in most school years (assemble.persistent_fsm_share)"),
        "fsm_years_band": Dimension("fsm_years_band", ("fsm_years_band",), (("0",), ("1-2",), ("3-5",), ("6+",)),
                                    "Persistent disadvantage: school years on FSM"),
        "benefit_spell": Dimension("benefit_spell", ("benefit_spell",), (("long",), ("none",), ("short",)),
                                   "Benefit spells as a dependant: none, short, or long (at least "
                                   "assemble.long_spell_months)"),
    }
    if name not in d:
        raise ContributionError(f"unknown dimension '{name}'")
    return d[name]


#: measures a request may ask for: (kind, column, extra) - the population is children with the column
MEASURES: dict[str, tuple[str, str | None, dict, str]] = {
    "count": ("count", None, {}, "children in the cohort"),
    "mean_ks2": ("mean", "ks2_score", {}, "mean key stage 2 scaled score"),
    "mean_ks4": ("mean", "ks4_att8", {}, "mean key stage 4 Attainment 8"),
    "median_ks4": ("quantile", "ks4_att8", {"q": 0.5}, "median key stage 4 Attainment 8 (window mean)"),
    "mean_pay_25_30": ("mean", "adult_pay", {}, "mean PAYE pay at ages 25-30 (GBP a year)"),
    "median_pay_25_30": ("quantile", "adult_pay", {"q": 0.5}, "median PAYE pay at ages 25-30 (window mean)"),
    "neet_rate": ("proportion", "neet_any", {}, "share with a year at 16-24 with neither a pupil nor a PAYE "
                                                "record (NEET proxy)"),
}


def _measure(name: str) -> Measure:
    kind, col, extra, desc = MEASURES[name]
    return Measure(name, kind, col, description=desc, **extra)


def _dims(names: list[str], config: Config) -> tuple[Dimension, ...]:
    # "la" brings its region with it (the hierarchy); asking for both is the same dimension.
    # Sorted: the table, its cell order and so every tie-break are the same for any order asked.
    names = sorted(n for n in names if not (n == "region" and "la" in names))
    return tuple(dimension(n, config) for n in names)


def _source(needs: tuple[str, ...], columns: tuple[str, ...], dims: tuple[str, ...], config: Config) -> Source:
    # with missing_categories = "exclude", a child without a category on a dimension is not in the table
    if config.disclosure.missing_categories == "exclude":
        needs = tuple(dict.fromkeys((*needs, *dims)))
    return Source(needs, columns)


_KNOWN = " Only children with a known {} are counted."


def standard_tables(research: Path, config: Config) -> list[tuple[TableSpec, Source]]:
    """The standard tables: their declarations and populations."""
    geo = dimension("la", config)
    out = []
    mob = TableSpec(
        "mobility_la_cohort", (geo, dimension("cohort", config)),
        (Measure("ige", "slope", "log_adult_pay", x="log_parents_earnings",
                 description="intergenerational income elasticity: OLS slope of log pay at 25-30 on log "
                             "parental earnings"),
         Measure("rank_slope", "slope", "adult_pay_percentile", x="parents_earnings_percentile",
                 description="rank-rank slope: OLS slope of the pay percentile on the parental earnings percentile"),
         Measure("absolute_upward_mobility", "predict", "adult_pay_percentile", x="parents_earnings_percentile",
                 at=25.0, description="expected pay percentile of a child whose parents were at the 25th "
                                      "percentile (rank-rank line at 25)"),
         Measure("mean_pay_25_30", "mean", "adult_pay", description="mean PAYE pay at 25-30 (GBP a year)")),
        unit="child", unit_label="children", title="Intergenerational mobility by local authority and birth cohort",
        description="Children with parental earnings in childhood and PAYE pay at 25-30, by the local authority "
                    "(and region) of their school at 16 and their birth cohort.")
    out.append((mob, _source(("log_adult_pay", "log_parents_earnings", "adult_pay_percentile",
                              "parents_earnings_percentile", "adult_pay"),
                             ("region", "la", "cohort", "log_adult_pay", "log_parents_earnings",
                              "adult_pay_percentile", "parents_earnings_percentile", "adult_pay"),
                             ("region", "la", "cohort"), config)))
    for dim in ("fsm_ever", "fsm_years_band", "household_income_quintile", "benefit_spell", "parent_income_quintile"):
        d = dimension(dim, config)
        spec = TableSpec(
            f"attainment_{dim}_la", (geo, d), (_measure("mean_ks4"), _measure("median_ks4")),
            unit="child", unit_label="children", title=f"KS4 attainment by {d.description.lower()} and local authority",
            description=f"Children with a key stage 4 Attainment 8 score, by {d.description.lower()} and the "
                        "local authority (and region) of their school at 16."
                        + (_KNOWN.format(d.name.replace("_", " ")) if config.disclosure.missing_categories == "exclude"
                           else ""))
        out.append((spec, _source(("ks4_att8",), ("region", "la", dim, "ks4_att8"), ("region", "la", dim), config)))
    pay = TableSpec(
        "pay_parent_quintile_region", (dimension("parent_income_quintile", config), dimension("region", config)),
        (_measure("mean_pay_25_30"), _measure("median_pay_25_30")), unit="child", unit_label="children",
        title="Pay at 25-30 by parents' earnings quintile and region",
        description="Children with PAYE pay at 25-30, by the quintile of their parents' earnings in childhood "
                    "(within birth cohort) and the region of their school at 16.")
    out.append((pay, _source(("adult_pay",), ("parent_income_quintile", "region", "adult_pay"),
                             ("parent_income_quintile", "region"), config)))
    trans = TableSpec(
        "transition_region", (dimension("region", config), dimension("parent_income_quintile", config),
                              dimension("child_income_quintile", config)),
        (), unit="child", unit_label="children", title="Quintile transition matrices by region",
        description="Children by parents' earnings quintile and own pay quintile at 25-30 (both within birth "
                    "cohort), by region of school at 16. A row of the matrix is a parent quintile; its shares "
                    "are its cells over its Total.")
    out.append((trans, _source(("parent_income_quintile", "child_income_quintile"),
                               ("region", "parent_income_quintile", "child_income_quintile"),
                               ("region",), config)))
    return out


def request_spec(request: dict, config: Config) -> tuple[TableSpec, Source]:
    """Validate a table request against the allowed list and declare its table.

    Raises:
        RequestError: unknown keys, a dimension or measure not allowed, more than three dimensions.
    """
    from linkage.disclose.stage import RequestError

    if not isinstance(request, dict) or set(request) - {"dimensions", "measure"}:
        raise RequestError("a request is {'dimensions': [...], 'measure': '...'}")
    dims = list(request.get("dimensions") or [])
    measure = request.get("measure", "count")
    allowed_d, allowed_m = set(config.disclosure.allowed_dimensions), set(config.disclosure.allowed_measures)
    bad = [d for d in dims if d not in allowed_d or not isinstance(d, str)]
    if bad:
        raise RequestError(f"dimension(s) not allowed: {', '.join(map(str, bad))}; allowed: {', '.join(sorted(allowed_d))}")
    if measure not in allowed_m or measure not in MEASURES:
        raise RequestError(f"measure '{measure}' not allowed; allowed: {', '.join(sorted(allowed_m & set(MEASURES)))}")
    if len(set(dims)) != len(dims) or not dims:
        raise RequestError("name one to three distinct dimensions")
    table_dims = _dims(dims, config)
    if len(table_dims) > 3:
        raise RequestError("at most three dimensions")
    m = _measure(measure)
    canon = json.dumps({"dimensions": sorted(dims), "measure": measure}, sort_keys=True)
    name = "request_" + hashlib.sha256(canon.encode()).hexdigest()[:12]
    spec = TableSpec(name, table_dims, (m,) if m.kind != "count" else (), unit="child", unit_label="children",
                     title=f"{m.description} by {', '.join(dims)}", description=f"On-demand table: {canon}",
                     perturb=True)
    cols = tuple(c for d in table_dims for c in d.levels)
    needs = (m.column,) if m.column else ()
    return spec, _source(needs, cols + needs, cols, config)
