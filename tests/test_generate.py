"""The synthetic population: determinism, truth, error rates, planted elasticity, schemas."""

from __future__ import annotations

import json
import math

import duckdb
import pytest

from linkage.config import load_config
from linkage.schemas import SOURCES, load_schema
from synthetic_data import generate_population
from synthetic_data.corruptions import BIT


def _landing(root, source):
    return f"read_csv('{root}/landing/{source}.csv', header=true, all_varchar=true)"


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    cfg = load_config(generate={"persons": 1500, "seed": 11}).generate
    generate_population(cfg, tmp_path / "a")
    generate_population(cfg, tmp_path / "b")
    generate_population(cfg.model_copy(update={"seed": 12}), tmp_path / "c")
    for source in SOURCES:
        a = (tmp_path / "a" / "landing" / f"{source}.csv").read_bytes()
        assert a == (tmp_path / "b" / "landing" / f"{source}.csv").read_bytes()
        assert a != (tmp_path / "c" / "landing" / f"{source}.csv").read_bytes()
    for name in ("source_rows", "persons", "person_years"):
        assert (tmp_path / "a" / "truth" / f"{name}.parquet").read_bytes() == \
            (tmp_path / "b" / "truth" / f"{name}.parquet").read_bytes()


def test_population_has_exactly_the_requested_persons(small_population):
    root, summary = small_population
    n = duckdb.execute(f"select count(*), count(distinct person_id) from '{root}/truth/persons.parquet'").fetchall()[0]
    assert n == (5000, 5000) == (summary["persons"], summary["persons"])


def test_every_source_row_has_a_true_person(small_population):
    root, _ = small_population
    con = duckdb.connect()
    for source in SOURCES:
        landing = con.execute(f"select count(*) from {_landing(root, source)}").fetchall()[0][0]
        joined = con.execute(f"""
            select count(*) from {_landing(root, source)} l
            join '{root}/truth/source_rows.parquet' t on t.record_id = l.record_id and t.source = '{source}'
            join '{root}/truth/persons.parquet' p on p.person_id = t.person_id""").fetchall()[0][0]
        assert landing > 0 and joined == landing, source


def test_every_childs_parents_appear_in_benefits_or_earnings(small_population):
    root, _ = small_population
    missing = duckdb.execute(f"""
        with kids as (select distinct t.person_id from '{root}/truth/source_rows.parquet' t where t.source = 'education'),
             seen as (select distinct person_id from '{root}/truth/source_rows.parquet'
                      where source in ('benefits', 'earnings'))
        select count(*) from '{root}/truth/parent_child.parquet' pc
        join kids on kids.person_id = pc.child_id
        where pc.parent_id not in (select person_id from seen)""").fetchall()[0][0]
    n_pairs = duckdb.execute(f"select count(*) from '{root}/truth/parent_child.parquet'").fetchall()[0][0]
    assert n_pairs > 1000
    assert missing == 0


def test_measured_error_rates_match_configured_rates(population_100k):
    root, _ = population_100k
    rates = load_config().generate.errors.model_dump()
    con = duckdb.connect()
    for name, rate in rates.items():
        bit = BIT[name]
        hit, eligible, total = con.execute(f"""
            select count(*) filter (where corruptions & {bit} != 0), count(*) filter (where eligible & {bit} != 0),
                   count(*) from '{root}/truth/source_rows.parquet'""").fetchall()[0]
        if name == "duplicate_record":
            eligible = total - hit   # a copy is made of an original row at this rate
        assert eligible > 200, name
        measured = hit / eligible
        tol = 4 * math.sqrt(rate * (1 - rate) / eligible) + 0.001
        assert abs(measured - rate) <= tol, (name, measured, rate)


def test_corruptions_recorded_in_truth_are_really_in_the_landing_values(small_population):
    root, _ = small_population
    con = duckdb.connect()
    con.sql(f"""create view r as select l.*, t.corruptions c, p.dob true_dob, p.nino true_nino,
                   a.postcode true_postcode, p.forename true_forename,
                   case when t.year >= p.surname_change_year then p.surname_after_change else p.surname end true_surname
            from {_landing(root, 'earnings')} l
            join '{root}/truth/source_rows.parquet' t on t.record_id = l.record_id and t.source = 'earnings'
            join '{root}/truth/persons.parquet' p using (person_id)
            join '{root}/truth/person_years.parquet' y on y.person_id = t.person_id and y.year = t.year
            join '{root}/truth/addresses.parquet' a on a.address_id = y.address_id""")
    dob_bits = BIT["dob_day_month_swap"] | BIT["dob_wrong_year"]
    assert con.execute(f"select count(*) from r where c & {dob_bits} = 0 and dob::date != true_dob").fetchall()[0][0] == 0
    swapped = con.execute(f"""select count(*), count(*) filter (where dob::date = make_date(year(true_dob),
                          day(true_dob), month(true_dob))) from r where c & {BIT['dob_day_month_swap']} != 0
                          and c & {BIT['dob_wrong_year']} = 0""").fetchall()[0]
    assert swapped[0] > 0 and swapped[0] == swapped[1]
    nino_bits = BIT["nino_missing"] | BIT["nino_mistyped"]
    assert con.execute(f"select count(*) from r where c & {nino_bits} = 0 and nino is distinct from true_nino").fetchall()[0][0] == 0
    assert con.execute(f"select count(*) from r where c & {BIT['nino_missing']} != 0 and nino is not null").fetchall()[0][0] == 0
    assert con.execute(f"select count(*) from r where c & {BIT['nino_mistyped']} != 0 and nino = true_nino").fetchall()[0][0] == 0
    pc_bits = BIT["postcode_typo"] | BIT["stale_address"] | BIT["missing_value"]
    assert con.execute(f"select count(*) from r where c & {pc_bits} = 0 and postcode != true_postcode").fetchall()[0][0] == 0
    assert con.execute(f"select count(*) from r where c & {BIT['postcode_typo']} != 0 and c & {BIT['stale_address']} = 0 "
                   f"and postcode = true_postcode").fetchall()[0][0] == 0
    name_bits = BIT["name_typo"] | BIT["name_transposition"] | BIT["nickname"] | BIT["hyphenated_surname_partial"]
    assert con.execute(f"select count(*) from r where c & {name_bits} = 0 and (forename != true_forename "
                   f"or surname != true_surname)").fetchall()[0][0] == 0
    changed = con.execute(f"select count(*) from r where c & {BIT['surname_after_partnership']} != 0").fetchall()[0][0]
    assert changed > 0


def test_planted_elasticity_recovered_from_truth_tables(population_100k):
    """The within-cohort slope of child log pay at 25-30 on parents' log PAYE earnings at 10-16."""
    root, _ = population_100k
    planted = json.loads((root / "truth" / "planted.json").read_text())["ige"]
    slope, n = duckdb.execute(f"""
        with pay as (
            select y.person_id, ln(avg(y.paye_pay)) as y
            from '{root}/truth/person_years.parquet' y
            join '{root}/truth/persons.parquet' p using (person_id)
            where p.kind = 'child' and y.year - p.birth_year between 25 and 30 and y.paye_pay > 0
            group by 1),
        d as (select c.birth_year, c.parental_log_earnings_10_16 as x, pay.y
              from '{root}/truth/children.parquet' c join pay using (person_id)
              where c.parental_log_earnings_10_16 is not null),
        w as (select x - avg(x) over (partition by birth_year) as x, y - avg(y) over (partition by birth_year) as y from d)
        select regr_slope(y, x), count(*) from w""").fetchall()[0]
    assert n > 5000
    assert abs(slope - planted) <= 0.02, slope


def test_fsm_and_paye_income_disagree_for_some_families(small_population):
    root, _ = small_population
    fsm_with_paye, no_fsm_low_paye = duckdb.execute(f"""
        select count(*) filter (where fsm and paye_income > 20000),
               count(*) filter (where not fsm and paye_income < 7400 and other_income > 0)
        from '{root}/truth/household_years.parquet'""").fetchall()[0]
    assert no_fsm_low_paye > 0


def _check_column(con, table, col, source):
    where = []
    if not col.nullable:
        where.append(f"{col.name} is null")
    if col.pattern:
        where.append(f"not regexp_full_match({col.name}, '{col.pattern}')")
    if col.allowed:
        values = ", ".join(f"'{v}'" for v in col.allowed)
        where.append(f"{col.name} not in ({values})")
    if col.type == "date":
        parsed = f"try_strptime({col.name}, '{col.format}')"
        where.append(f"{col.name} is not null and {parsed} is null")
        if col.min:
            where.append(f"{parsed} < '{col.min}'::timestamp or {parsed} > '{col.max}'::timestamp")
    if col.type in ("int", "float"):
        cast = f"try_cast({col.name} as {'bigint' if col.type == 'int' else 'double'})"
        where.append(f"{col.name} is not null and {cast} is null")
        if col.min is not None:
            where.append(f"{cast} < {col.min}")
        if col.max is not None:
            where.append(f"{cast} > {col.max}")
    for w in where:
        bad = con.execute(f"select count(*) from {table} where {w}").fetchall()[0][0]
        assert bad == 0, f"{source}.{col.name}: {bad} rows fail '{w}'"


@pytest.mark.parametrize("source", SOURCES)
def test_generated_files_conform_to_schemas(small_population, source):
    root, _ = small_population
    schema = load_schema(source)
    con = duckdb.connect()
    table = _landing(root, source)
    header = [d[0] for d in con.execute(f"select * from {table} limit 0").description]
    assert header == schema.names
    for col in schema.columns:
        _check_column(con, table, col, source)
    for key in schema.unique:
        cols = ", ".join(key)
        dups = con.execute(f"""select count(*) from (select {cols} from {table} l
                           join '{root}/truth/source_rows.parquet' t using (record_id)
                           where t.corruptions & {BIT['duplicate_record']} = 0
                           group by all having count(*) > 1)""").fetchall()[0][0]
        assert dups == 0, (source, key)


def test_parquet_format_writes_parquet_only(tmp_path):
    cfg = load_config(generate={"persons": 800, "format": "parquet"}).generate
    generate_population(cfg, tmp_path)
    files = sorted(p.name for p in (tmp_path / "landing").iterdir())
    assert files == ["benefits.parquet", "earnings.parquet", "education.parquet"]
    n = duckdb.execute(f"select count(*) from '{tmp_path}/landing/education.parquet'").fetchall()[0][0]
    assert n > 0
