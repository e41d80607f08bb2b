"""Quality gates: the suite files, GX on DuckDB through SQL, and offline Data Docs."""

from __future__ import annotations

import json
import re

import duckdb
import pytest
import sqlalchemy as sa

from linkage import resources
from linkage.quality import CDN_ASSETS, VENDOR, QualityError, load_suite_file, offline_data_docs, validate
from linkage.db import quote_literal as lit
from linkage.schemas import SOURCES, load_schema


@pytest.mark.parametrize("source", SOURCES)
def test_suites_are_files_with_a_severity_on_every_expectation(source):
    suite = load_suite_file(resources.packaged("expectations") / f"{source}.json")
    assert suite["name"] == source
    severities = [e["severity"] for e in suite["expectations"]]
    assert set(severities) == {"critical", "warning"}
    schema = load_schema(source)
    derived = set(suite["meta"]["hhlink"]["derived_columns"])
    known = set(schema.names) | derived
    for e in suite["expectations"]:
        cols = [e["kwargs"][k] for k in ("column", "column_A", "column_B") if k in e["kwargs"]]
        cols += e["kwargs"].get("column_list", [])
        assert set(cols) <= known, (e["type"], cols)
    kinds = {e["type"] for e in suite["expectations"]}
    # what the issue asks each suite to cover: completeness, value sets or ranges, formats,
    # uniqueness, a cross-field rule and a distribution check
    assert {"expect_column_values_to_not_be_null", "expect_column_values_to_be_between",
            "unexpected_rows_expectation", "expect_column_values_to_be_unique"} <= kinds
    assert kinds & {"expect_column_mean_to_be_between", "expect_column_proportion_of_non_null_values_to_be_between"}


def test_a_suite_without_severity_is_refused(tmp_path):
    path = tmp_path / "education.json"
    path.write_text(json.dumps({"name": "education", "expectations": [
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "upn"}}]}))
    with pytest.raises(QualityError, match="expectation 0 .* needs \"severity\""):
        load_suite_file(path)


def test_buffered_duckdb_dialect_returns_rows_after_the_connection_closes():
    # GX fetches after closing the connection; plain duckdb_engine then returns nothing
    import linkage.compat.gx_duckdb  # noqa: F401

    engine = sa.create_engine("duckdb+hhlink:///:memory:")
    with engine.connect() as con:
        result = con.execute(sa.text("SELECT * FROM range(3)"))
    assert result.fetchall() == [(0,), (1,), (2,)]


def _suite(tmp_path, expectations, derived=None):
    (tmp_path / "suites").mkdir(exist_ok=True)
    (tmp_path / "suites" / "toy.json").write_text(json.dumps({
        "name": "toy", "meta": {"hhlink": {"derived_columns": derived or {}}}, "expectations": expectations}))
    return tmp_path / "suites"


def test_gx_counts_are_exact_on_a_hand_made_table(tmp_path):
    # 10 rows: one duplicated key pair, one missing NINO, one claim ending before it starts
    duckdb.execute(f"""COPY (SELECT * FROM (VALUES
        ('C1', 1, 'AB123456C', DATE '2020-01-01', DATE '2020-02-01', 10.0),
        ('C1', 1, 'AB123456C', DATE '2020-01-01', DATE '2020-02-01', 20.0),
        ('C2', 1, NULL,        DATE '2020-01-01', NULL,              30.0),
        ('C3', 1, 'AB12345XC', DATE '2020-03-01', DATE '2020-02-01', 40.0),
        ('C4', 1, 'CE654321A', DATE '2020-01-01', DATE '2020-01-01', 50.0),
        ('C5', 1, 'CE654321B', DATE '2020-01-01', DATE '2021-01-01', 60.0),
        ('C6', 1, 'CE654321C', DATE '2020-01-01', DATE '2021-01-01', 70.0),
        ('C7', 1, 'CE654321D', DATE '2020-01-01', DATE '2021-01-01', 80.0),
        ('C8', 1, 'CE654322A', DATE '2020-01-01', DATE '2021-01-01', 90.0),
        ('C9', 1, 'CE654323A', DATE '2020-01-01', DATE '2021-01-01', 100.0))
        t(claim_id, member_no, nino, start_date, end_date, pay)) TO '{tmp_path}/toy.parquet'""")
    suites = _suite(tmp_path, [
        {"type": "expect_compound_columns_to_be_unique", "kwargs": {"column_list": ["claim_id", "member_no"]},
         "severity": "critical"},
        {"type": "expect_column_proportion_of_non_null_values_to_be_between",
         "kwargs": {"column": "nino", "min_value": 0.95}, "severity": "warning"},
        {"type": "expect_column_pair_values_a_to_be_greater_than_b",
         "kwargs": {"column_A": "end_date", "column_B": "start_date", "or_equal": True,
                    "ignore_row_if": "either_value_is_missing"}, "severity": "critical"},
        {"type": "unexpected_rows_expectation", "description": "NINO format",
         "kwargs": {"unexpected_rows_query":
                    "SELECT * FROM {batch} WHERE NOT regexp_full_match(nino, '[A-Z]{{2}}[0-9]{{6}}[A-D]')"},
         "severity": "critical"},
        {"type": "expect_column_mean_to_be_between", "kwargs": {"column": "pay_k", "min_value": 0.05,
                                                                "max_value": 0.06}, "severity": "warning"},
    ], derived={"pay_k": "pay / 1000"})
    out = validate({"toy": tmp_path / "toy.parquet"}, suites, tmp_path / "reports", tmp_path / "gx", data_docs=False)
    got = {e["type"]: e for e in out["sources"]["toy"]["expectations"]}
    assert got["expect_compound_columns_to_be_unique"]["unexpected_count"] == 2
    assert got["expect_column_proportion_of_non_null_values_to_be_between"]["observed_value"] == pytest.approx(0.9)
    assert got["expect_column_pair_values_a_to_be_greater_than_b"]["unexpected_count"] == 1
    assert got["unexpected_rows_expectation"]["observed_value"] == 1
    assert got["expect_column_mean_to_be_between"]["observed_value"] == pytest.approx(0.055)
    assert got["expect_column_mean_to_be_between"]["success"]
    assert out["sources"]["toy"]["critical_failed"] == 3 and out["sources"]["toy"]["warnings_failed"] == 1
    assert len(out["critical_failed"]) == 3 and all(c.startswith("toy: ") for c in out["critical_failed"])
    assert "error" not in json.dumps(out)                # every expectation evaluated on DuckDB
    assert json.loads((tmp_path / "reports" / "quality_summary.json").read_text())["sources"]["toy"]["evaluated"] == 5


def _site(tmp_path, body):
    site = tmp_path / "site"
    (site / "static" / "styles").mkdir(parents=True)
    (site / "static" / "styles" / "x.css").write_text("body{}")
    (site / "validations").mkdir()
    (site / "validations" / "v.html").write_text(body)
    return site


def test_offline_data_docs_rewrites_every_cdn_asset(tmp_path):
    links = "".join(f'<script src="{u}" integrity="sha384-x" crossorigin="anonymous"></script>' for u in CDN_ASSETS)
    site = _site(tmp_path, f'<html><head>{links}<img src="https://great-expectations-web-assets.s3.us-east-2.'
                           f'amazonaws.com/logo-long.png?d=1"></head><a href="https://example.org">docs</a></html>')
    offline_data_docs(site, tmp_path / "out")
    html = (tmp_path / "out" / "validations" / "v.html").read_text()
    assert not re.search(r'<(script|link|img)[^>]+(src|href)="https?://', html)
    assert "integrity=" not in html and "crossorigin" not in html
    for local in set(CDN_ASSETS.values()):
        assert f'"../static/vendor/{local}"' in html
        assert (tmp_path / "out" / "static" / "vendor" / local).stat().st_size > 100
    assert 'href="https://example.org"' in html          # a plain link fetches nothing


def test_offline_data_docs_refuses_an_unknown_cdn_asset(tmp_path):
    site = _site(tmp_path, '<html><script src="https://cdn.example.com/new-lib.js"></script></html>')
    with pytest.raises(QualityError, match="cdn.example.com/new-lib.js"):
        offline_data_docs(site, tmp_path / "out")


def test_vendored_assets_are_the_minified_builds_the_pages_expect():
    assert (VENDOR / "README.md").exists()
    for local in set(CDN_ASSETS.values()):
        head = (VENDOR / local).read_bytes()[:400].decode("utf-8", "replace")
        assert "<html" not in head.lower(), local                 # not an error page saved by mistake
    assert sorted(p.name for p in (VENDOR / "fontawesome" / "webfonts").iterdir())[0].endswith(".woff2")


# --- incremental validation: new rows' counts plus carried counts = a full validation's ---------------

_OLD = [  # (_file, id, a, b, s, e): 1 null a, 1 'z' b and 1 null b, 1 end before start, 1 null end
    ("old.csv", 1, 1, "x", "2020-01-01", "2020-02-01"), ("old.csv", 2, 2, "x", "2020-01-01", "2020-02-01"),
    ("old.csv", 3, 3, "y", "2020-01-01", "2020-02-01"), ("old.csv", 4, 4, "x", "2020-01-01", "2020-02-01"),
    ("old.csv", 5, 5, "z", "2020-01-01", "2020-02-01"), ("old.csv", 6, 6, "x", "2020-01-01", "2020-02-01"),
    ("old.csv", 7, None, "x", "2020-01-01", "2020-02-01"), ("old.csv", 8, 1, "y", "2020-01-01", "2020-02-01"),
    ("old.csv", 9, 2, "x", "2020-01-01", None), ("old.csv", 10, 3, None, "2020-01-01", "2019-12-01")]
_NEW = [  # alone, the new rows fail the 'mostly' of a, b and the pair; with the old ones only b fails
    ("new.csv", 11, None, "z", "2020-01-01", "2021-01-01"), ("new.csv", 12, None, "z", "2020-01-01", None),
    ("new.csv", 13, 7, "x", "2020-01-01", "2019-01-01"), ("new.csv", 14, 11, "x", "2020-01-01", "2020-01-01"),
    ("new.csv", 15, 2, "x", "2020-01-01", "2020-06-01")]
_ROW_WISE = [
    {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "a", "mostly": 0.8}, "severity": "critical"},
    {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "b", "value_set": ["x", "y"], "mostly": 0.8},
     "severity": "warning"},
    {"type": "expect_column_values_to_be_between", "kwargs": {"column": "a", "min_value": 0, "max_value": 10},
     "severity": "critical"},
    {"type": "expect_column_pair_values_a_to_be_greater_than_b",
     "kwargs": {"column_A": "e", "column_B": "s", "or_equal": True, "ignore_row_if": "either_value_is_missing",
                "mostly": 0.8}, "severity": "critical"},
    {"type": "unexpected_rows_expectation", "description": "a above 5",
     "kwargs": {"unexpected_rows_query": "SELECT id FROM {batch} WHERE a > 5"}, "severity": "warning"},
    {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "odd", "value_set": [1], "mostly": 0.5},
     "severity": "warning"},
]
_WHOLE = [
    {"type": "unexpected_rows_expectation", "description": "a value repeated (needs every row)",
     "kwargs": {"unexpected_rows_query":
                "SELECT id FROM {batch} WHERE a IN (SELECT a FROM {batch} GROUP BY a HAVING count(*) > 1)"},
     "severity": "warning"},
    {"type": "expect_column_values_to_be_unique", "kwargs": {"column": "id"}, "severity": "critical"},
    {"type": "expect_column_mean_to_be_between", "kwargs": {"column": "a", "min_value": 0, "max_value": 4},
     "severity": "warning"},
    {"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": 12}, "severity": "critical"},
    {"type": "expect_column_proportion_of_non_null_values_to_be_between", "kwargs": {"column": "a", "min_value": 0.85},
     "severity": "warning"},
]


def _toy(path, rows):
    sql = lambda v, cast="": "NULL" if v is None else cast + (lit(v) if isinstance(v, str) else str(v))  # noqa: E731
    values = ", ".join(f"({lit(f)}, {i}, {sql(a)}, {sql(b)}, {sql(s, 'DATE ')}, {sql(e, 'DATE ')})"
                       for f, i, a, b, s, e in rows)
    duckdb.execute(f"COPY (SELECT * FROM (VALUES {values}) t(_file, id, a, b, s, e)) TO '{path}'")
    return path


def test_a_delivery_validated_on_its_new_rows_with_carried_counts_equals_a_full_validation(tmp_path):
    """Counts add, percentages and pass/fail come from the sums (here: the new rows alone fail three 'mostly'
    thresholds that the whole table meets, and meet one it fails); the rest runs on the whole table."""
    from linkage.quality import Carried, carry_record

    suite = _WHOLE[:1] + _ROW_WISE[:3] + _WHOLE[1:] + _ROW_WISE[3:]
    wise = [i for i, e in enumerate(suite) if e in _ROW_WISE]
    suites = _suite(tmp_path, suite, derived={"odd": "a % 2"})
    before = validate({"toy": _toy(tmp_path / "old.parquet", _OLD)}, suites, tmp_path / "r1", tmp_path / "gx1",
                      data_docs=False)
    record = carry_record(before, "toy", ["old.csv"])
    both = _toy(tmp_path / "both.parquet", _OLD + _NEW)
    inc = validate({"toy": both}, suites, tmp_path / "r2", tmp_path / "gx2", data_docs=False,
                   carried={"toy": Carried(["old.csv"], len(_OLD), record)})
    full = validate({"toy": both}, suites, tmp_path / "r3", tmp_path / "gx3", data_docs=False)

    got, want = inc["sources"]["toy"], full["sources"]["toy"]
    assert got["validated"]["how"] == "incremental" and got["validated"]["rows_now"] == len(_NEW)
    assert got["validated"]["files_now"] == ["new.csv"] and want["validated"]["how"] == "full"
    keys = ("success", "element_count", "unexpected_count", "unexpected_percent", "missing_count", "observed_value")
    by_index = {i["index"]: i for i in got["expectations"]}
    assert sorted(by_index) == list(range(len(_ROW_WISE) + len(_WHOLE)))
    for w in want["expectations"]:
        g = by_index[w["index"]]
        assert {k: g.get(k) for k in keys} == {k: w.get(k) for k in keys}, (w["type"], w["column"])
        assert g["scope"].startswith("row-wise" if w["index"] in wise else "whole table"), (w["index"], g["scope"])
    for k in ("evaluated", "passed", "critical_failed", "warnings_failed", "success"):
        assert got[k] == want[k], k
    assert inc["critical_failed"] == full["critical_failed"] == ["toy: expect_column_values_to_be_between(a) "
                                                                "[8.33% unexpected]"]
    # the new rows alone would fail 'mostly' here; the sums pass (0.8 exactly for not-null) ...
    nulls, in_set, pair = (by_index[suite.index(e)] for e in (_ROW_WISE[0], _ROW_WISE[1], _ROW_WISE[3]))
    assert nulls["now"] == {"element_count": 5, "unexpected_count": 2} and nulls["success"]
    assert nulls["carried"] == {"element_count": 10, "unexpected_count": 1}
    assert pair["now"] == {"element_count": 5, "unexpected_count": 1, "missing_count": 1} and pair["success"]
    # ... and the earlier rows alone pass the value set, the sums do not (3 of 14)
    assert in_set["carried"]["unexpected_count"] == 1 and not in_set["success"]


def test_carried_counts_are_used_only_for_the_rows_they_were_counted_on(tmp_path):
    from linkage.quality import Carried, carry_record

    suites = _suite(tmp_path, _ROW_WISE[:2])
    before = validate({"toy": _toy(tmp_path / "old.parquet", _OLD)}, suites, tmp_path / "r1", tmp_path / "gx1",
                      data_docs=False)
    record = carry_record(before, "toy", ["old.csv"])
    both = _toy(tmp_path / "both.parquet", _OLD + _NEW)
    cases = {"other_rows": Carried(["old.csv"], 9, record),
             "other_files": Carried(["old.csv", "older.csv"], 10, record),
             "suite": Carried(["old.csv"], 10, {**record, "suite_sha256": "0" * 64}),
             "none": Carried(["old.csv"], 10, None)}
    out = validate({s: both for s in cases}, _suites_as(tmp_path, suites, cases), tmp_path / "r2", tmp_path / "gx2",
                   data_docs=False, carried=cases)
    for source, why in (("other_rows", "cover other files or rows"), ("other_files", "cover other files or rows"),
                        ("suite", "the suite changed"), ("none", "no counts were carried")):
        v = out["sources"][source]["validated"]
        assert v["how"] == "full" and why in v["note"], (source, v)
        assert out["sources"][source]["expectations"][0]["element_count"] == 15


def _suites_as(tmp_path, suites, names):
    for name in names:
        (suites / f"{name}.json").write_text((suites / "toy.json").read_text())
    return suites


@pytest.mark.parametrize("sql, row_wise", [
    ("SELECT id FROM _batch WHERE a > 5 AND NOT regexp_full_match(b, '[a-z]{2}')", True),
    ("SELECT * FROM _batch WHERE b IS NULL", True),
    ("SELECT DISTINCT id FROM _batch WHERE a > 5", False),
    ("SELECT id FROM _batch WHERE a > 5 LIMIT 3", False),
    ("SELECT a FROM _batch GROUP BY a HAVING count(*) > 1", False),
    ("SELECT id FROM _batch WHERE a IN (SELECT a FROM _batch WHERE b = 'x')", False),
    ("SELECT count(*) FROM _batch WHERE a > 5", False),
    ("SELECT id, row_number() OVER () FROM _batch", False),
    ("SELECT id FROM _batch JOIN other USING (id)", False),
    ("WITH t AS (SELECT * FROM _batch) SELECT id FROM t", False),
    ("SELECT id FROM _batch; SELECT 1", False),
])
def test_only_a_plain_row_filter_query_counts_as_row_wise(sql, row_wise):
    from linkage.quality import _not_a_row_filter

    assert (_not_a_row_filter(duckdb.connect(), sql) is None) == row_wise


_UNIQUE = [
    {"type": "expect_column_values_to_be_unique", "kwargs": {"column": "id"}, "severity": "critical"},
    {"type": "expect_column_values_to_be_unique", "kwargs": {"column": "a", "mostly": 0.1}, "severity": "warning"},
    {"type": "expect_column_values_to_be_unique", "kwargs": {"column": "b", "mostly": 0.1}, "severity": "warning"},
    {"type": "expect_compound_columns_to_be_unique", "kwargs": {"column_list": ["a", "b"], "mostly": 0.1},
     "severity": "warning"},
    {"type": "expect_compound_columns_to_be_unique", "kwargs": {"column_list": ["b", "s"], "mostly": 0.1},
     "severity": "warning"},
    {"type": "expect_compound_columns_to_be_unique", "kwargs": {"column_list": ["a", "e"], "mostly": 0.1},
     "severity": "warning"},
]


def test_uniqueness_over_parts_new_rows_plus_repeats_across_plus_carried_equals_a_full_validation(tmp_path):
    """With the earlier rows in a file of their own, uniqueness runs in GX on the new rows, the repeats a value
    shared by new and earlier rows makes are counted on the key columns, and the sums are a full validation's
    (NULLs in a key, values repeated within a part and across parts, a value once on each side)."""
    from linkage.quality import Carried, carry_record

    extra = [("new.csv", 16, 1, "y", "2020-01-01", "2020-02-01"), ("new.csv", 17, 3, None, "2020-01-01", None),
             ("new.csv", 18, 3, None, "2020-01-01", None), ("new.csv", 19, None, None, None, None)]
    suite = _ROW_WISE[:2] + _UNIQUE + _WHOLE[2:3]
    suites = _suite(tmp_path, suite)
    old = _toy(tmp_path / "old.parquet", _OLD)
    before = validate({"toy": old}, suites, tmp_path / "r1", tmp_path / "gx1", data_docs=False)
    record = carry_record(before, "toy", ["old.csv"])
    parts = [old, _toy(tmp_path / "new.parquet", _NEW + extra)]
    inc = validate({"toy": parts}, suites, tmp_path / "r2", tmp_path / "gx2", data_docs=False,
                   carried={"toy": Carried(["old.csv"], len(_OLD), record, [old])})
    full = validate({"toy": _toy(tmp_path / "both.parquet", _OLD + _NEW + extra)}, suites, tmp_path / "r3",
                    tmp_path / "gx3", data_docs=False)
    got, want = inc["sources"]["toy"], full["sources"]["toy"]
    assert got["validated"]["how"] == "incremental" and got["validated"]["rows_now"] == len(_NEW + extra)
    keys = ("success", "element_count", "unexpected_count", "unexpected_percent", "missing_count", "observed_value")
    by_index = {i["index"]: i for i in got["expectations"]}
    for w in want["expectations"]:
        g = by_index[w["index"]]
        assert {k: g.get(k) for k in keys} == {k: w.get(k) for k in keys}, (w["type"], w["column"])
    unique = [by_index[suite.index(e)] for e in _UNIQUE]
    assert all(u["scope"].startswith("uniqueness") for u in unique)
    # a: 1 and 2 repeat among the earlier rows and occur once among the new (+2), 3 repeats on both sides (+0)
    assert [u["across"] for u in unique][:2] == [0, 2]
    assert any(u["unexpected_count"] > u["now"]["unexpected_count"] + u["carried"]["unexpected_count"]
               for u in unique[3:])
    assert by_index[suite.index(_WHOLE[2])]["scope"] == "whole table, validated now"
    # without the parts named, uniqueness needs the whole table as before
    plain = validate({"toy": parts}, suites, tmp_path / "r4", tmp_path / "gx4", data_docs=False,
                     carried={"toy": Carried(["old.csv"], len(_OLD), record)})
    assert all(plain["sources"]["toy"]["expectations"][suite.index(e)]["scope"] == "whole table, validated now"
               for e in _UNIQUE)
