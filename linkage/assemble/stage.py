"""The research zone: person, person-year, household-year, parent-child and cohort tables, and measures.

``hhlink assemble`` reads ``linked/`` (persons, households, parent-child relations, scored
pairs) and ``pseudonymised/payload/`` (attributes by record token) and writes ``research/``:

* ``person``, ``person_year``, ``household_year``, ``parent_child`` and ``cohort`` (the
  intergenerational cohort: childhood circumstances and the child's own outcomes), built
  by the SQL in :mod:`linkage.assemble.sql`;
* ``mobility`` and ``transition_matrix``: the measures of :mod:`linkage.assemble.mobility` with
  bootstrap confidence intervals, nationally and per birth cohort, region and LA;
* ``key_changes`` and ``household_key_changes``: the persons (households) merged, split or
  retired since the last release, in the
  project's keys (person keys are otherwise stable across releases);
* ``metadata.json``: project id and key fingerprint, row counts, schema versions, settings.

Every table is declared in ``schemas/research/<table>.toml`` (columns, types, roles) and
written in that column order and type; a table that does not match its declaration stops
the run. Keys are per research project: a person's ``person_id`` is the keyed
HMAC-SHA256 of its linkage key under the project's subkey (``linkage.keys.project_key``),
and no linkage key, record token or identifier reaches ``research/``. Every table is
encrypted at rest under the project's own subkey (HKDF purpose ``zone:research:<project>``,
:mod:`linkage.pseudonymise.store`; ``metadata.json`` holds no record value and stays in
clear), so a party holding two projects' extracts without their keys reads neither, and
cannot join them on pay sequences either. Sex, an identifier role, is recovered from its keyed
token only as M or F.

The Great Expectations suites in ``expectations/research/`` run on the new tables before
they replace ``research/`` (a critical failure keeps the old zone); their results go to
``reports/quality/research/``. The linkage-error sensitivity analysis (headline measures
with persons re-clustered at ``assemble.sensitivity_thresholds``) goes to
``reports/mobility.json``; ``hhlink evaluate`` adds the estimates on true links.

Example:
    >>> from linkage.config import load_config
    >>> summary = assemble(load_config(), "workspace")          # doctest: +SKIP
    >>> summary["headline"]["ige"]                               # doctest: +SKIP
    0.38...
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from linkage.assemble import sql
from linkage.assemble import mobility
from linkage import resources
from linkage.config import Config
from linkage.db import connect, quote_ident, read_literal
from linkage.errors import HhlinkError, SchemaError, WorkspaceError, read_toml
from linkage.keys import MasterKey
from linkage.link.linked_records import record_files, records_relation
from linkage.pseudonymise.store import batches_encrypted, read_encrypted_schema, research_zone, write_research
from linkage.workspace import Workspace, atomic_path, publish

__all__ = ["COHORT_NUMERIC", "COHORT_TEXT", "RESEARCH_TABLES", "AssembleError", "TableSchema", "assemble",
           "build_panel", "load_inputs", "load_pairs", "load_research_schema", "prepared_cohort", "spread",
           "use_linked_links", "variant"]

log = logging.getLogger(__name__)

RESEARCH_TABLES = ("person", "person_year", "household_year", "parent_child", "cohort", "mobility",
                   "transition_matrix")
_TYPES = {"string": ("VARCHAR", pa.string()), "int": ("BIGINT", pa.int64()), "float": ("DOUBLE", pa.float64()),
          "bool": ("BOOLEAN", pa.bool_())}
_ROLES = ("key", "period", "attribute", "circumstance", "outcome", "statistic")


class AssembleError(HhlinkError):
    """Assembly cannot run (missing zone) or a research table breaks its declared schema."""


@dataclass(frozen=True)
class TableSchema:
    """A research table's contract, as declared in ``schemas/research/<table>.toml``."""

    table: str
    version: str
    description: str
    columns: tuple[dict, ...]
    unique: tuple[tuple[str, ...], ...]

    @property
    def names(self) -> list[str]:
        """Column names in declared order."""
        return [c["name"] for c in self.columns]

    def arrow(self) -> pa.Schema:
        """The table's Arrow schema."""
        return pa.schema([(c["name"], _TYPES[c["type"]][1]) for c in self.columns])


def load_research_schema(table: str, folder: Path | str | None = None) -> TableSchema:
    """Load one research table's schema.

    Raises:
        SchemaError: missing file, bad TOML, or a column with an unknown type or role.

    Example:
        >>> load_research_schema("person").names[:3]
        ['person_id', 'birth_year', 'sex']
    """
    folder = Path(folder) if folder is not None else resources.packaged("schemas") / "research"
    path = folder / f"{table}.toml"
    raw = read_toml(path, SchemaError, "schema file")
    cols = tuple(raw.get("columns", []))
    for c in cols:
        if c.get("type") not in _TYPES or c.get("role") not in _ROLES or "name" not in c:
            raise SchemaError(f"{path}: column {c.get('name')!r} needs a name, a type in {sorted(_TYPES)} "
                              f"and a role in {list(_ROLES)}")
    if not cols or raw.get("table") != table:
        raise SchemaError(f"{path}: must declare table = \"{table}\" and its columns")
    return TableSchema(table, raw.get("version", ""), raw.get("description", ""), cols,
                       tuple(tuple(u) for u in raw.get("unique", [])))


# -- inputs and links ------------------------------------------------------------------------

def _sex_codes(con: duckdb.DuckDBPyConnection, key) -> None:
    """Table ``record_sex`` from ``record_seal``: the sex each seal holds ('M', 'F' or NULL), ``sealed`` per seal.

    The pseudonymiser stores sex only as ``sex_seal``, randomised encryption under the subkey
    ``seal:sex`` (:mod:`linkage.pseudonymise.seal`): no token to compare, decoded here in memory.
    """
    from linkage.pseudonymise.seal import SEAL_SUBKEY, code_int, unseal_codes

    seals = con.sql("select record_token, sex_seal from record_seal").to_arrow_table()
    con.execute("drop table record_seal")
    codes = pa.table({"record_token": seals.column("record_token"),
                      "code": unseal_codes(key.subkey(SEAL_SUBKEY), seals.column("sex_seal")),
                      "sealed": seals.column("sex_seal").is_valid()})
    del seals
    con.register("sex_codes_arrow", codes)
    con.execute(f"""create or replace table record_sex as
                    select record_token, case code when {code_int('M')} then 'M' when {code_int('F')} then 'F' end sex,
                           sealed
                    from sex_codes_arrow""")
    con.unregister("sex_codes_arrow")


def load_inputs(con: duckdb.DuckDBPyConnection, ws: Workspace, key, la_lookup: Path) -> None:
    """Load the run's fixed inputs (records, payloads, sex, LA lookup) and the linkage's links.

    The linkage's identity, person and household keys become integers (``identity_map``,
    ``person_map``, ``household_map`` keep the originals): every join of the panel runs on
    integers, and the project keys are derived from the original keys.
    """
    from linkage.pseudonymise.store import load_zone

    linked = ws.zone("linked")
    # the payload and the sex tokens are encrypted at rest: decrypted here, into memory only
    for source in ("education", "benefits", "earnings"):
        load_zone(con, f"payload_{source}", ws.root, "payload", key, sources=[source])
    load_zone(con, "record_seal", ws.root, "identifiers", key, ["record_token", "sex_seal"])
    _sex_codes(con, key)
    con.execute(f"""
        create or replace table identity_map as
        select unique_id as linkage_id, (row_number() over (order by unique_id))::integer uid
        from read_parquet({read_literal(linked / 'identities.parquet')});
        create or replace table person_map as
        select person_key as linkage_key, (row_number() over (order by person_key))::integer pid
        from (select distinct person_key from read_parquet({read_literal(linked / 'identities.parquet')}));
        create or replace table household_map as
        select household_key as linkage_key, (row_number() over (order by household_key))::integer hid
        from (select distinct household_key from read_parquet({read_literal(linked / 'households.parquet')}));
        create or replace table recs as
        select r.record_token, i.uid as unique_id, r.source, r.year::int as year, r.birth_year::int as birth_year,
               r.claim_tok, r.bu_role, p.pid as base_key
        from {records_relation(linked)} r
        join identity_map i on i.linkage_id = r.unique_id join person_map p on p.linkage_key = r.person_key;
        create or replace table unique_sex as
        select r.unique_id, any_value(d.sex) sex
        from recs r join record_sex d using (record_token) group by 1;
        create or replace table la_region as
        select utla_code la_code, region_code from read_csv({read_literal(la_lookup)}, header = true, all_varchar = true);
        create or replace table households_base as
        select p.pid as person_key, h.year::int as year, h.birth_year::int as birth_year, m.hid as household_key
        from read_parquet({read_literal(linked / 'households.parquet')}) h join person_map p on p.linkage_key = h.person_key
        join household_map m on m.linkage_key = h.household_key;
        create or replace table parent_child_base as
        select p.pid as parent_key, c.pid as child_key, r.confidence, r.bu_years::int bu_years,
               r.coresident_years::int coresident_years, r.age_gap::int age_gap
        from read_parquet({read_literal(linked / 'parent_child.parquet')}) r join person_map p on p.linkage_key = r.parent_key
        join person_map c on c.linkage_key = r.child_key;
    """)
    _check_inputs_join(con)
    con.execute("drop table record_sex")
    con.execute(sql.inputs_sql())


def _check_inputs_join(con: duckdb.DuckDBPyConnection) -> None:
    """Stop when linked/ and the payload, or the key, come from different runs: never an empty panel."""
    from linkage.keys import KeyMismatchError

    recs, joined, sexed, with_sex = con.execute("""
        select (select count(*) from recs),
               (select count(*) from recs r where r.record_token in (
                    select record_token from payload_education union all select record_token from payload_benefits
                    union all select record_token from payload_earnings)),
               (select count(*) from unique_sex where sex is not null),
               (select count(*) from record_sex where sealed)""").fetchall()[0]
    if recs and not joined:
        raise AssembleError(f"none of the {recs:,} linked records is in pseudonymised/payload/: they come from "
                            "different pseudonymisation runs; rebuild linked/ with 'hhlink link'")
    if with_sex and not sexed:
        raise KeyMismatchError("the key does not decode any token in linked/ (it is not the key the data was "
                               "pseudonymised under): pass the right --key-file")


def load_pairs(con: duckdb.DuckDBPyConnection, ws: Workspace) -> None:
    """``identity_nodes`` and the kept ``pairs`` (on integer identity keys), for re-clustering."""
    linked = ws.zone("linked")
    con.execute(f"""
        create or replace table identity_nodes as select uid as unique_id from identity_map;
        create or replace table pairs as
        select l.uid as unique_id_l, r.uid as unique_id_r, p.match_probability
        from read_parquet({read_literal(linked / 'pairs.parquet')}) p join identity_map l on l.linkage_id = p.unique_id_l
        join identity_map r on r.linkage_id = p.unique_id_r;
    """)


def use_linked_links(con: duckdb.DuckDBPyConnection) -> None:
    """Point ``id_person``, ``households`` and ``parent_child`` at the linkage's own links."""
    con.execute("""
        create or replace view id_person as select unique_id, base_key person_key from id_base;
        create or replace view households as select * from households_base;
        create or replace table parent_child as select * from parent_child_base;
    """)


def build_panel(con: duckdb.DuckDBPyConnection, config: Config, full: bool = True, only: str | None = None) -> None:
    """Build the ``t_*`` tables from the current links.

    ``full=False`` builds only what the headline measures need; ``only`` (a table of person
    keys) limits the cohort to those children.
    """
    a = config.assemble
    steps = [sql.person_sql(full), sql.pay_sql()]
    if full:
        steps += [sql.education_sql(), sql.claims_sql(), sql.person_year_sql(), sql.household_year_sql()]
    # the headline measures read only children who can have both parental earnings and adult pay
    def cohorts(alias: str) -> str | None:
        return None if full else sql.mobility_cohorts_sql(a.childhood_ages, a.adult_pay_ages, alias)

    steps += [sql.coresidence_sql(a.min_parent_confidence, cohorts("c")),
              sql.childhood_sql(a.childhood_ages, with_income=full), sql.adult_pay_sql(a.adult_pay_ages),
              sql.children_sql(a.min_parent_confidence, only, cohorts("p"))]
    steps.append(sql.cohort_sql(a.childhood_ages, a.neet_ages, a.persistent_fsm_share) if full
                 else sql.headline_cohort_sql())
    for step in steps:
        con.execute(step)


COHORT_NUMERIC = ("birth_year", "log_parents_earnings", "log_adult_pay", "parents_earnings", "adult_pay",
                   "ever_fsm", "persistent_fsm", "household_income_percentile", "parents_earnings_percentile",
                   "longest_spell_months", "ks2_score", "ks4_att8")
COHORT_TEXT = ("region_at_16", "la_at_16")


def cohort_arrays(con: duckdb.DuckDBPyConnection) -> dict[str, np.ndarray]:
    """The cohort columns the measures read, as numpy arrays (NaN or None for missing), in a fixed row order."""
    have = {r[0] for r in con.execute("describe t_cohort").fetchall()}
    cols = [c for c in COHORT_NUMERIC + COHORT_TEXT if c in have]
    t = con.sql(f"select {', '.join(cols)} from t_cohort order by child_key").to_arrow_table()
    out: dict[str, np.ndarray] = {}
    for c in COHORT_NUMERIC:
        out[c] = (t[c].cast(pa.float64()).to_numpy(zero_copy_only=False) if c in have
                  else np.full(t.num_rows, np.nan))
    for c in COHORT_TEXT:
        out[c] = np.array(t[c].to_pylist() if c in have else [None] * t.num_rows, dtype=object)
    return out


def prepared_cohort(con: duckdb.DuckDBPyConnection, config: Config) -> dict:
    """The cohort table's columns as arrays, ready for :mod:`linkage.assemble.mobility`."""
    return mobility.prepare(cohort_arrays(con), long_spell_months=config.assemble.long_spell_months)


# -- writing research/ --------------------------------------------------------------------

def _key_maps(con: duckdb.DuckDBPyConnection, project_secret: bytes) -> None:
    """``key_person`` and ``key_household``: panel key -> project key (keyed HMAC of the linkage's key, domain per kind)."""
    from linkage.encodings import Tokeniser

    for kind, table, column, ids, idcol in (("person", "t_person", "person_key", "person_map", "pid"),
                                            ("household", "t_household_year", "household_key", "household_map", "hid")):
        rows = con.execute(f"""select m.{idcol}, m.linkage_key from {ids} m
                               where m.{idcol} in (select {column} from {table}) order by 1""").fetchall()
        mapped = pa.table({column: pa.array([r[0] for r in rows], pa.int32()),
                           f"{kind}_id": pa.array(Tokeniser(project_secret, kind).many([r[1] for r in rows]),
                                                  pa.string())})
        con.register(f"_map_{kind}", mapped)
        con.execute(f"create or replace table key_{kind} as select * from _map_{kind}")
        con.unregister(f"_map_{kind}")


# research key-change tables: (file in linked/ and research/, kind of key, the count column)
KEY_CHANGES = {"person": ("key_changes", "identities"), "household": ("household_key_changes", "person_years")}


def _research_key_changes(con: duckdb.DuckDBPyConnection, project_secret: bytes, linked: Path, out: Path,
                          key: MasterKey, project: str, kind: str = "person") -> int:
    """``key_changes.parquet`` (persons) or ``household_key_changes.parquet``: the release's merged,
    split and retired keys of ``kind``, in the project's keys.

    A researcher carries an analysis to the next release with it: a ``merged`` row says
    ``old_person_id``'s records now belong to ``new_person_id``; ``split``, that some of them
    left for a new ``new_person_id``; ``retired``, that the person's records are gone. Keys
    not listed are the same person as in the last release (:mod:`linkage.link.stable_keys`).
    Households likewise (``old_household_id``, ``new_household_id``, counted in person-years).
    """
    from linkage.encodings import Tokeniser

    name, unit = KEY_CHANGES[kind]
    src = linked / f"{name}.parquet"
    rows = con.execute(f"select change, old_key, new_key, {unit} from read_parquet({read_literal(src)}) "
                       "where change <> 'new' order by all").fetchall() if src.is_file() else []
    tok = Tokeniser(project_secret, kind)

    def keyed(values):
        present = [v for v in values if v is not None]
        mapped = iter(tok.many(present))
        return pa.array([next(mapped) if v is not None else None for v in values], pa.string())

    table = pa.table({"change": pa.array([r[0] for r in rows], pa.string()),
                      f"old_{kind}_id": keyed([r[1] for r in rows]), f"new_{kind}_id": keyed([r[2] for r in rows]),
                      unit: pa.array([r[3] for r in rows], pa.int64())})
    return write_research(out / f"{name}.parquet", table, table.schema, key, project)


_VIEWS = {
    "person": """
        select k.person_id, p.*, c.la_at_16, r.region_code region_at_16
        from t_person p join key_person k using (person_key)
        left join (select e.person_key, arg_max(e.la_code, e.year) la_at_16 from t_edu e join t_person q using (person_key)
                   where e.year - q.birth_year <= 16 group by 1) c using (person_key)
        left join la_region r on r.la_code = c.la_at_16""",
    "person_year": """
        select k.person_id, h.household_id, py.* from t_person_year py join key_person k using (person_key)
        left join key_household h using (household_key)""",
    "household_year": "select k.household_id, h.* from t_household_year h join key_household k using (household_key)",
    "parent_child": """
        select p.person_id parent_id, c.person_id child_id, r.confidence, r.bu_years benefit_unit_years,
               r.coresident_years, cb.birth_year - pb.birth_year age_gap
        from parent_child r join key_person p on p.person_key = r.parent_key
        join key_person c on c.person_key = r.child_key
        join t_person pb on pb.person_key = r.parent_key join t_person cb on cb.person_key = r.child_key""",
    "cohort": "select k.person_id child_id, c.* from t_cohort c join key_person k on k.person_key = c.child_key",
}


# pay columns coarsened in the extracts (assemble.research_pay_rounding): exact (year, pay)
# values join two projects' extracts whatever their keys (bench/privacy.py measures it)
PAY_COLUMNS = {"person_year": ("paye_pay",), "household_year": ("paye_income", "equivalised_income")}


def pay_rounding_sql(column: str, base: int) -> str:
    """``column`` rounded to ``base`` pounds, a positive pay never below ``base`` (0: unchanged)."""
    c = quote_ident(column)
    if not base:
        return c
    return f"(CASE WHEN {c} > 0 THEN greatest(round({c} / {base}), 1) * {base} ELSE {c} END)"


def _write_table(con: duckdb.DuckDBPyConnection, schema: TableSchema, out: Path, key: MasterKey, project: str,
                 pay_rounding: int = 0) -> int:
    """Write ``research/<table>.parquet`` (encrypted) in the declared column order and types; returns rows."""
    pay = PAY_COLUMNS.get(schema.table, ())
    cols = ", ".join(f'CAST({pay_rounding_sql(c["name"], pay_rounding) if c["name"] in pay else quote_ident(c["name"])}'
                     f' AS {_TYPES[c["type"]][0]}) AS {quote_ident(c["name"])}'
                     for c in schema.columns)
    order = ", ".join(map(quote_ident, schema.unique[0] if schema.unique else schema.names[:1]))
    path = out / f"{schema.table}.parquet"
    try:
        reader = con.sql(f"select {cols} from ({_VIEWS[schema.table]}) order by {order}").to_arrow_reader(100_000)
    except duckdb.BinderException as exc:
        raise AssembleError(f"research/{schema.table}: does not match schemas/research/{schema.table}.toml "
                            f"({str(exc).splitlines()[0]})") from None
    return write_research(path, reader, schema.arrow(), key, project)


def _write_rows(rows: list[dict], schema: TableSchema, out: Path, key: MasterKey, project: str) -> int:
    return write_research(out / f"{schema.table}.parquet", pa.Table.from_pylist(rows, schema=schema.arrow()),
                          schema.arrow(), key, project)


def _check_written(out: Path, schemas: dict[str, TableSchema], key: MasterKey, project: str) -> None:
    """Every file's columns and types are exactly its declaration's."""
    for name, schema in schemas.items():
        got = read_encrypted_schema(out / f"{name}.parquet", key, research_zone(project))
        if [(f.name, f.type) for f in got] != [(f.name, f.type) for f in schema.arrow()]:
            raise AssembleError(f"research/{name}.parquet does not match schemas/research/{name}.toml")


def _validate(config: Config, ws: Workspace, out: Path, schemas: dict, key: MasterKey) -> dict:
    """Run the research suites on the new tables; results to ``reports/quality/research/``.

    The tables are encrypted: each is decrypted batch by batch into GX's scratch database
    (a 0700 folder in the workspace, removed when the suites have run).
    """
    from linkage.quality import validate

    suites = config.paths.resolve(config.paths.expectations) / "research"
    reports = ws.zone("reports") / "quality"
    reports.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".gx-research-", dir=ws.root))
    built = Path(tempfile.mkdtemp(prefix=".research.new-", dir=reports))
    try:
        zone = research_zone(config.assemble.project)
        summary = validate({name: batches_encrypted(out / f"{name}.parquet", key, zone) for name in schemas},
                           suites, built, scratch,
                           data_docs=config.assemble.data_docs)
        for s in summary["sources"].values():
            s["suite"] = s["suite"].replace("expectations/", "expectations/research/")
        (built / "quality_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        publish(built, reports / "research")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(built, ignore_errors=True)
    return summary


# -- the linkage-error sensitivity analysis ---------------------------------------------------

def variant(con: duckdb.DuckDBPyConnection, config: Config, name: str, persons: int, threshold=None,
             build: bool = True) -> dict:
    """The headline measures for one sensitivity variant (``persons`` re-clustered; rebuilt unless ``build`` is False)."""
    if build:
        build_panel(con, config, full=False)
    h = mobility.headline(prepared_cohort(con, config))
    return {"variant": name, "threshold": threshold, "persons": persons, **h}


def _public_n(con: duckdb.DuckDBPyConnection, prepared: dict, key, config: Config) -> dict:
    """Each national measure's sample size, perturbed as a published count of the same children."""
    from linkage.disclose.stage import record_key_secret

    ids = [r[0] for r in con.execute("select k.person_id from t_cohort c left join key_person k "
                                     "on k.person_key = c.child_key order by c.child_key").fetchall()]
    samples = mobility.national_samples(prepared)
    return mobility.public_n(samples, ids, record_key_secret(key), config.disclosure)


def spread(variants: list[dict]) -> dict:
    """Per measure, the lowest and highest estimate across the sensitivity variants."""
    out = {}
    for m in mobility.MOBILITY_MEASURES:
        vals = [v[m] for v in variants if v.get(m) is not None]
        out[m] = {"min": min(vals), "max": max(vals), "range": max(vals) - min(vals)} if vals else None
    return out


def sensitivity(con: duckdb.DuckDBPyConnection, config: Config, ws: Workspace, baseline: dict) -> list[dict]:
    """Headline measures with persons re-clustered at each of ``assemble.sensitivity_thresholds``.

    Needs the full panel built on the linkage's links (its ``t_cohort``); replaces the links.
    """
    from linkage.assemble.sensitivity import Incremental

    from linkage.link.stage import linked_threshold

    threshold = linked_threshold(config, ws.zone("linked"))
    rows = [{"variant": "linked", "threshold": threshold, **baseline}]
    if not config.assemble.sensitivity_thresholds:
        return rows
    load_pairs(con, ws)
    a = config.assemble
    inc = Incremental(con, config.link, threshold,
                      lambda only: build_panel(con, config, full=False, only=only),
                      sql.mobility_cohorts_sql(a.childhood_ages, a.adult_pay_ages, alias="t_cohort"))
    for t in config.assemble.sensitivity_thresholds:
        persons = inc.variant(t)
        rows.append(variant(con, config, f"threshold {t:g}", persons, t, build=False))
    return rows


# -- the stage -------------------------------------------------------------------------------

def assemble(config: Config, workspace: Path | str, key: MasterKey | None = None) -> dict:
    """Build ``research/`` from ``linked/`` and the payload, compute the measures, check and report them.

    Args:
        config: the hhlink configuration (``config.assemble`` holds the settings).
        workspace: the workspace folder; reads ``linked/`` and ``pseudonymised/payload/``.
        key: the master key (default: loaded from ``HHLINK_KEY``, ``HHLINK_KEY_FILE`` or the
            default file); the project's keys are derived from it.

    Returns:
        A summary: rows per research table, the national headline measures with their
        intervals, the sensitivity analysis, the quality results and timings.

    Raises:
        AssembleError: ``linked/`` or the payload is missing, or a table breaks its schema.
        QualityGateError: a critical expectation failed (reports written, ``research/`` kept).
    """
    from linkage.keys import fingerprint, load_master_key, project_key
    from linkage.quality import QualityGateError

    ws = Workspace(workspace)
    for need in (ws.zone("linked") / "identities.parquet", ws.zone("pseudonymised") / "payload"):
        if not need.exists():
            raise AssembleError(f"{need}: missing; run 'hhlink pseudonymise' and 'hhlink link' first")
    if not record_files(ws.zone("linked")):
        raise AssembleError(f"{ws.zone('linked') / 'records.0000.parquet'}: missing; run 'hhlink link' again "
                            "(a release linked by an earlier version kept its records in one file)")
    a = config.assemble
    key = key if key is not None else load_master_key(workspace=ws.root)
    secret = project_key(key, a.project)
    schemas = {t: load_research_schema(t, config.paths.resolve(config.paths.schemas) / "research")
               for t in RESEARCH_TABLES}
    lookup = config.paths.resolve(a.la_lookup)
    if not lookup.is_file():
        raise WorkspaceError(f"{lookup}: LA lookup not found (assemble.la_lookup)")
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    spill = Path(tempfile.mkdtemp(prefix=".assemble.tmp-", dir=ws.root))
    con = connect(config.assemble, spill=spill, preserve_insertion_order=False)
    try:
        load_inputs(con, ws, key, lookup)
        use_linked_links(con)
        build_panel(con, config)
        seconds["tables"] = time.perf_counter() - t0
        t = time.perf_counter()
        prepared = prepared_cohort(con, config)
        measures, transitions = mobility.bootstrap_measures(
            prepared, a.bootstrap_replicates, a.bootstrap_seed, a.confidence_level, a.min_group_size)
        baseline = mobility.headline(prepared)
        # the "linked" variant is the published national estimate itself: the headline computes each
        # measure directly, the table from sums of its columns, equal but for the last bits of a float
        baseline.update({m["measure"]: m["estimate"] for m in measures
                         if m["group_type"] == "national" and m["measure"] in baseline})
        seconds["measures"] = time.perf_counter() - t
        with ws.publish_dir("research") as out:
            t = time.perf_counter()
            _key_maps(con, secret)
            rows = {name: _write_table(con, schemas[name], out, key, a.project, a.research_pay_rounding)
                    for name in _VIEWS}
            for kind, (name, _) in KEY_CHANGES.items():
                rows[name] = _research_key_changes(con, secret, ws.zone("linked"), out, key, a.project, kind)
            # the report is readable beyond the engineers: sample sizes as the published tables give
            # them (computed here, before the sensitivity variants rebuild the cohort table)
            public = _public_n(con, prepared, key, config)
            rows["mobility"] = _write_rows(measures, schemas["mobility"], out, key, a.project)
            rows["transition_matrix"] = _write_rows(transitions, schemas["transition_matrix"], out, key, a.project)
            _check_written(out, schemas, key, a.project)
            seconds["write"] = time.perf_counter() - t
            t = time.perf_counter()
            quality = _validate(config, ws, out, schemas, key)
            seconds["quality"] = time.perf_counter() - t
            if quality["critical_failed"]:
                raise QualityGateError("critical expectation failed on the research tables, research/ not "
                                       "updated (reports in reports/quality/research/): "
                                       + "; ".join(quality["critical_failed"][:5]))
            meta = {"stage": "assemble", "project": a.project, "project_key_fingerprint": fingerprint(secret),
                    "master_key_fingerprint": key.fingerprint, "rows": rows,
                    "schemas": {t: schemas[t].version for t in RESEARCH_TABLES},
                    "settings": a.model_dump(mode="json", exclude={"memory_limit", "threads", "data_docs"}),
                    "data_window": list(con.execute("select y0, y1 from data_window").fetchall()[0])}
            (out / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        t = time.perf_counter()
        variants = sensitivity(con, config, ws, baseline)
        seconds["sensitivity"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - t0
        national = {m["measure"]: {k: m[k] for k in ("estimate", "ci_low", "ci_high", "n")}
                    for m in measures if m["group_type"] == "national"}
        report = {"project": a.project, "national": {m: {**v, "n": public.get(m)} for m, v in national.items()},
                  "headline": {**baseline, "n": public.get("ige")},
                  "sensitivity": {"variants": [{k: v for k, v in r.items() if k != "n"} for r in variants],
                                  "spread": spread(variants)},
                  "seconds": {k: round(v, 2) for k, v in seconds.items()}}
        with atomic_path(ws.zone("reports") / "mobility.json") as tmp:
            tmp.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
    log.info("assembled research tables for project %s in %.1fs", a.project, seconds.get("total", 0))
    return {"project": a.project, "rows": rows, "headline": baseline, "national": national,
            "sensitivity": variants, "quality": {k: quality[k] for k in ("critical_failed",)},
            "seconds": report["seconds"]}
