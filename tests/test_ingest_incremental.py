"""Incremental ingest does work in proportion to the delivery: GX on the new rows (plus carried counts),
carried landing files not read again. Its results must be a full ingest's."""

from __future__ import annotations

import json
import os
import shutil

import duckdb
import pytest

from linkage.config import load_config
from linkage.ingest import stage
from linkage.ingest.stage import IngestError, QualityGateError, ingest
from synthetic_data import generate_population
from synthetic_data.deliveries import deliver_next

PERSONS, SEED, N = 1200, 5, 4
KEYS = ("success", "element_count", "unexpected_count", "unexpected_percent", "missing_count")


def _cfg(incremental=True):
    return load_config(generate={"persons": PERSONS, "seed": SEED, "deliveries": N},
                       ingest={"incremental": incremental, "data_docs": False})


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A population with its history in landing/ and 4 deliveries held back (nothing ingested)."""
    root = tmp_path_factory.mktemp("ingest_incremental") / "ws"
    generate_population(_cfg().generate, root)
    return root


def _corrupt(path, replace: str) -> None:
    """Rewrite a delivered CSV with ``replace``: a DuckDB REPLACE list over its text columns (``n``: row number)."""
    tmp = path.with_suffix(".tmp")
    duckdb.execute(f"""COPY (SELECT * EXCLUDE (n) REPLACE ({replace}) FROM
        (SELECT *, row_number() OVER () AS n FROM read_csv('{path}', all_varchar=true)))
        TO '{tmp}' (HEADER, QUOTE '"')""")
    tmp.replace(path)


def _by_index(summary, source):
    return {e["index"]: e for e in summary["quality"]["sources"][source]["expectations"]}


def test_a_delivery_validated_on_its_new_rows_reports_what_a_full_validation_reports(generated, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(generated, ws)
    ingest(_cfg(), ws)
    while deliver_next(ws):
        pass
    landing = ws / "landing"
    # one pay above the warning's bound (alone: 1 of 786 fails 'mostly 0.9999'; with the history: 1 of 15,960
    # passes), an employee too young for the tax year, a missing sex, a missing end date, ...
    _corrupt(landing / "earnings_2026-05.csv", "CASE WHEN n = 1 THEN '2000000' ELSE pay END AS pay, "
             "CASE WHEN n = 2 THEN '2020-01-01' ELSE dob END AS dob, CASE WHEN n = 3 THEN NULL ELSE sex END AS sex")
    _corrupt(landing / "benefits_2025-06.csv", "CASE WHEN n = 1 THEN NULL ELSE end_date END AS end_date")
    _corrupt(landing / "education_2026-02.csv", "CASE WHEN n <= 2 THEN NULL ELSE sex END AS sex")

    inc = ingest(_cfg(), ws)
    assert inc["mode"] == "incremental: 4 new file(s), 3 carried"
    full = ingest(_cfg(incremental=False), shutil.copytree(ws, tmp_path / "full"))
    assert full["mode"] == "full: ingest.incremental is false"
    for source in ("education", "benefits", "earnings"):
        got, want = _by_index(inc, source), _by_index(full, source)
        assert inc["quality"]["sources"][source]["validated"]["how"] == "incremental"
        assert sorted(got) == sorted(want)
        for i, w in want.items():
            assert {k: got[i].get(k) for k in KEYS} == {k: w.get(k) for k in KEYS}, (source, i, w["type"])
            if w["type"] != "expect_column_mean_to_be_between":      # a float sum in DuckDB's order
                assert got[i].get("observed_value") == w.get("observed_value"), (source, i, w["type"])
        for k in ("evaluated", "passed", "critical_failed", "warnings_failed", "success"):
            assert inc["quality"]["sources"][source][k] == full["quality"]["sources"][source][k], (source, k)
    assert inc["quality"]["critical_failed"] == full["quality"]["critical_failed"] == []
    pay = next(e for e in _by_index(inc, "earnings").values()
               if e["column"] == "pay" and e.get("mostly") == 0.9999)
    assert pay["now"] == {"element_count": 786, "unexpected_count": 1, "missing_count": 0}
    assert pay["carried"]["unexpected_count"] == 0 and pay["success"]      # judged on 1 of 15,960
    young = next(e for e in _by_index(inc, "earnings").values() if (e["description"] or "").startswith("Cross-field"))
    assert young["now"] == {"observed_value": 1} and not young["success"]
    assert inc["quality"]["sources"]["earnings"]["warnings_failed"] == 1
    sex = next(e for e in _by_index(inc, "education").values()
               if e["column"] == "sex" and e["type"] == "expect_column_values_to_be_in_set")
    assert sex["now"]["missing_count"] == 2 and sex["carried"]["missing_count"] > 0
    # the report says what ran on which rows, and the record the next delivery will carry matches it
    v = inc["quality"]["sources"]["benefits"]["validated"]
    assert v["files_now"] == ["benefits_2025-06.csv", "benefits_2025-07.csv"] and v["rows_now"] == 34
    assert [h["how"] for h in v["history"]] == ["full", "new rows"]
    record = json.loads((ws / "staged" / "quality.json").read_text())["sources"]["benefits"]
    assert record["rows"] == v["rows"] == v["rows_carried"] + 34 and record["validations"] == v["history"]


def test_a_critical_failure_among_the_new_rows_stops_the_run(generated, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(generated, ws)
    ingest(_cfg(), ws)
    before = {p.name: p.read_bytes() for p in (ws / "staged").iterdir()}
    deliver_next(ws)
    _corrupt(ws / "landing" / "benefits_2025-06.csv", "CASE WHEN n = 1 THEN '2000-01-01' ELSE start_date END AS "
             "start_date, CASE WHEN n = 1 THEN '1999-01-01' ELSE end_date END AS end_date")
    with pytest.raises(QualityGateError, match="expect_column_pair_values_a_to_be_greater_than_b"):
        ingest(_cfg(), ws)
    assert {p.name: p.read_bytes() for p in (ws / "staged").iterdir()} == before
    report = json.loads((ws / "reports" / "quality" / "quality_summary.json").read_text())["sources"]["benefits"]
    pair = next(e for e in report["expectations"] if e["type"] == "expect_column_pair_values_a_to_be_greater_than_b")
    assert report["validated"]["how"] == "incremental" and pair["now"]["unexpected_count"] == 1
    assert pair["unexpected_count"] == pair["carried"]["unexpected_count"] + 1 and not pair["success"]


def test_carried_landing_files_are_not_read_again_and_the_refusals_still_hold(generated, tmp_path, monkeypatch):
    # landing files written by this test are at once 'settled' (in real use they settle for 2 s first)
    monkeypatch.setattr(stage, "SETTLED_SECONDS", 0.0)
    ws = tmp_path / "ws"
    shutil.copytree(generated, ws)
    first = ingest(_cfg(), ws)
    assert sorted(first["files_hashed_now"]) == ["benefits.csv", "earnings.csv", "education.csv"]
    ledger = json.loads((ws / "staged" / "ledger.json").read_text())["files"]
    assert all(len(e["stat"]) == 5 for e in ledger)
    d = deliver_next(ws)
    second = ingest(_cfg(), ws)
    assert second["files_hashed_now"] == [f["name"] for f in d["files"]]     # the carried ones: from the ledger
    assert second["mode"] == "incremental: 1 new file(s), 3 carried"
    hows = {s: q["validated"]["how"] for s, q in second["quality"]["sources"].items()}
    assert hows == {"education": "carried", "benefits": "incremental", "earnings": "carried"}
    # a carried file delivered again under another name is still refused
    shutil.copy(ws / "landing" / "earnings.csv", ws / "landing" / "earnings_again.csv")
    with pytest.raises(IngestError, match="earnings_again.csv: same content .* as landing/earnings.csv"):
        ingest(_cfg(), ws)
    (ws / "landing" / "earnings_again.csv").unlink()
    # a carried file changed in place, same size and same modification time: read again, so a full run
    path = ws / "landing" / "education.csv"
    st = os.stat(path)
    text = path.read_bytes()
    line = text.index(b"\n") + 1
    row = text.index(b'"', text.index(b",", line) + 1) + 1          # the first character of the second field
    swap = b"0" if text[row:row + 1] != b"0" else b"1"
    path.write_bytes(text[:row] + swap + text[row + 1:])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    third = ingest(_cfg(), ws)
    assert "education.csv" in third["files_hashed_now"]
    assert third["mode"] == "full: landing/education.csv was staged before and is gone or changed"


def _table(ws, source):
    """A source's staged table as readers see it: its parts in order (one file after a full run)."""
    return duckdb.sql(f"SELECT * FROM {stage.parquet_source(stage.staged_paths(ws / 'staged', source))}").df()


def test_each_delivery_is_staged_into_a_part_of_its_own_and_the_parts_are_a_full_ingest(generated, tmp_path):
    """Deliveries one at a time: each writes one new part holding exactly its staged rows, the earlier parts
    are carried untouched (same inode), no row is lost or repeated, and the parts read in order are, row for
    row and in the same order, what a full ingest of the same landing files writes into one file."""
    ws = tmp_path / "ws"
    shutil.copytree(generated, ws)
    ingest(_cfg(), ws)
    # a repeat of a staged history row (same record id and values) and a changed one ride with the first
    # delivery, in a file of their own (named to sort after it and before the next month's)
    d = deliver_next(ws)
    delivered = next(f["name"] for f in d["files"] if f["source"] == "benefits")
    history = (ws / "landing" / "benefits.csv").read_text().splitlines()
    fields = history[2].split(",")
    fields[6] = '"Zed"'
    (ws / "landing" / delivered.replace(".csv", "_extra.csv")).write_text(
        "\n".join([history[0], history[1], ",".join(fields), history[3]]) + "\n")
    runs = 0
    while True:
        before = {p.name: os.stat(p).st_ino for p in (ws / "staged").glob("*.parquet")}
        summary = ingest(_cfg(), ws)
        runs += 1
        assert summary["mode"].startswith("incremental")
        staged_now = set(summary["files_staged_now"])
        manifest = json.loads((ws / "staged" / "manifest.json").read_text())
        for source in ("education", "benefits", "earnings"):
            parts = stage.staged_paths(ws / "staged", source)
            assert [p.name for p in parts] == manifest["staged_parts"][source]
            assert manifest["staged_files"][source] == stage.staged_file_signature(parts)
            for p in parts:
                if p.name in before:
                    assert os.stat(p).st_ino == before[p.name], f"{p.name} was rewritten"
            new = [p for p in parts if p.name not in before]
            files_now = {e["file"] for e in manifest["files"] if e["source"] == source and e["file"] in staged_now
                         and e["rows_staged"]}
            assert len(new) == (1 if files_now else 0)
            if new:
                got = duckdb.sql(f"SELECT _file, count(*) FROM '{new[0]}' GROUP BY 1").fetchall()
                assert dict(got) == {e["file"]: e["rows_staged"] for e in manifest["files"]
                                     if e["file"] in files_now}
            table = _table(ws, source)
            assert not table.duplicated(["_file", "_line"]).any()
            entries = [e for e in manifest["files"] if e["source"] == source]
            assert table.groupby("_file").size().to_dict() == {e["file"]: e["rows_staged"] for e in entries
                                                                if e["rows_staged"]}
            for e in entries:       # every data line of the file staged or quarantined, once
                assert e["rows_read"] == e["rows_staged"] + e["rows_quarantined"]
                assert e["rows_read"] + e["continuation_lines"] == e["data_lines"]
        if not deliver_next(ws):
            break
    assert runs == N
    quarantined = duckdb.sql(f"SELECT reason FROM '{ws / 'quarantine' / 'benefits.parquet'}'").df()
    assert {"duplicate", "duplicate_id"} <= set(quarantined.reason)

    incremental = {s: _table(ws, s) for s in ("education", "benefits", "earnings")}
    inc_quarantine = duckdb.sql(f"SELECT * FROM '{ws / 'quarantine' / 'benefits.parquet'}'").df()
    inc_manifest = json.loads((ws / "staged" / "manifest.json").read_text())
    full = ingest(_cfg(incremental=False), ws)
    assert full["mode"] == "full: ingest.incremental is false"
    assert sorted(p.name for p in (ws / "staged").glob("*.parquet")) == \
        ["benefits.parquet", "earnings.parquet", "education.parquet"]
    for source, rows in incremental.items():
        assert rows.equals(_table(ws, source)), source        # same rows, same order
    assert inc_quarantine.equals(duckdb.sql(f"SELECT * FROM '{ws / 'quarantine' / 'benefits.parquet'}'").df())
    strip = lambda files: sorted(json.dumps(e, sort_keys=True) for e in files)  # noqa: E731
    assert strip(inc_manifest["files"]) == strip(json.loads((ws / "staged" / "manifest.json").read_text())["files"])
