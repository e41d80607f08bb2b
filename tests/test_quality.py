"""Quality gates: the suite files, GX on DuckDB through SQL, and offline Data Docs."""

from __future__ import annotations

import json
import re

import duckdb
import pytest
import sqlalchemy as sa

from linkage import resources
from linkage.quality import CDN_ASSETS, VENDOR, QualityError, load_suite_file, offline_data_docs, validate
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
