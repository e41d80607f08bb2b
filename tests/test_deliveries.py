"""Deliveries: the generated extracts split into a history and later monthly deliveries, landed one at a time."""

from __future__ import annotations

import json
import shutil

import duckdb
import pytest

from linkage.config import load_config
from linkage.ingest import ingest
from linkage.schemas import SOURCES
from synthetic_data import generate_population
from synthetic_data.deliveries import DeliveryError, deliver_next, pending

PERSONS, SEED, N = 1200, 5, 6


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same population generated whole and with its last N deliveries held back."""
    root = tmp_path_factory.mktemp("deliveries")
    cfg = load_config(generate={"persons": PERSONS, "seed": SEED}).generate
    generate_population(cfg, root / "whole")
    summary = generate_population(cfg.model_copy(update={"deliveries": N}), root / "split")
    return root / "whole", root / "split", summary


def _lines(path):
    with open(path, "rb") as fh:
        return fh.readline(), fh.read().splitlines()


def test_every_row_is_in_the_history_or_exactly_one_delivery_byte_for_byte(pair):
    whole, split, summary = pair
    index = json.loads((split / "deliveries" / "index.json").read_text())
    assert len(index["deliveries"]) == N == len(summary["deliveries"])
    for source in SOURCES:
        header, rows = _lines(whole / "landing" / f"{source}.csv")
        got_header, got = _lines(split / "landing" / f"{source}.csv")
        assert got_header == header and len(got) == index["history_rows"][source]
        for d in index["deliveries"]:
            for f in (f for f in d["files"] if f["source"] == source):
                h, part = _lines(split / "deliveries" / d["month"] / f["name"])
                assert h == header and len(part) == f["rows"] > 0
                got += part
        assert sorted(got) == sorted(rows)        # nothing lost, nothing doubled, bytes unchanged
        assert index["history_rows"][source] < len(rows)      # every source delivers in the last N months


def test_deliveries_are_the_last_months_and_each_file_holds_only_its_month(pair):
    _, split, _ = pair
    index = json.loads((split / "deliveries" / "index.json").read_text())
    months = [d["month"] for d in index["deliveries"]]
    assert months == sorted(months) and index["history_through"] < months[0]
    con = duckdb.connect()
    arrive = {"education": "make_date(cast(left(academic_year, 4) as int) + 1, 2, 1)",
              "earnings": "make_date(cast(left(tax_year, 4) as int) + 1, 5, 1)",
              "benefits": "date_trunc('month', start_date) + interval 1 month"}
    for source in SOURCES:
        latest = con.execute(f"select strftime(max({arrive[source]}), '%Y-%m') from "
                             f"read_csv('{split}/landing/{source}.csv')").fetchone()[0]
        assert latest <= index["history_through"]
        for d in index["deliveries"]:
            for f in (f for f in d["files"] if f["source"] == source):
                got = con.execute(f"select distinct strftime({arrive[source]}, '%Y-%m') from "
                                  f"read_csv('{split}/deliveries/{d['month']}/{f['name']}')").fetchall()
                assert got == [(d["month"],)]
    # the truth covers every delivered row
    n = con.execute(f"select count(*) from '{split}/truth/source_rows.parquet'").fetchone()[0]
    assert n == sum(json.loads((split / "truth" / "planted.json").read_text())["rows"].values())


def test_deliver_lands_one_delivery_at_a_time_and_ingest_reconciles(pair, tmp_path, run_cli):
    _, split, _ = pair
    ws = tmp_path / "ws"
    shutil.copytree(split, ws)
    first, second = pending(ws)[:2]
    assert deliver_next(ws) == first and pending(ws)[0] == second
    for f in first["files"]:
        assert (ws / "landing" / f["name"]).exists()
    code, out, err = run_cli("deliver", "--workspace", str(ws))
    assert code == 0, err
    assert f"delivered {second['month']}" in out and f"{N - 2} deliveries pending" in out
    summary = ingest(load_config(), ws)
    index = json.loads((ws / "deliveries" / "index.json").read_text())
    expected = dict(index["history_rows"])
    for d in (first, second):
        for f in d["files"]:
            expected[f["source"]] += f["rows"]
    assert {s: v["rows_read"] for s, v in summary["sources"].items()} == expected
    assert all(v["rows_staged"] + v["rows_quarantined"] == v["rows_read"] for v in summary["sources"].values())
    code, out, err = run_cli("deliver", "--all", "--workspace", str(ws))
    assert code == 0 and "0 deliveries pending" in out and pending(ws) == []
    assert deliver_next(ws) is None


def test_a_changed_landed_file_and_impossible_counts_are_refused(pair, tmp_path, run_cli):
    _, split, _ = pair
    ws = tmp_path / "ws"
    shutil.copytree(split, ws)
    d = deliver_next(ws)
    path = ws / "landing" / d["files"][0]["name"]
    path.write_bytes(path.read_bytes() + b"\n")
    code, out, err = run_cli("deliver", "--workspace", str(ws))
    assert code != 0 and err.strip().count("\n") == 0 and d["files"][0]["name"] in err and "SHA-256" in err
    with pytest.raises(DeliveryError, match="deliveries = 600"):
        generate_population(load_config(generate={"persons": 300, "seed": 1, "deliveries": 600}).generate, tmp_path / "x")


def test_generate_without_deliveries_removes_an_earlier_deliveries_folder(tmp_path):
    cfg = load_config(generate={"persons": 300, "seed": 2}).generate
    generate_population(cfg.model_copy(update={"deliveries": 2}), tmp_path)
    assert (tmp_path / "deliveries" / "index.json").exists()
    generate_population(cfg, tmp_path)
    assert not (tmp_path / "deliveries").exists()
