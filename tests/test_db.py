"""The DuckDB helper: connection settings, and quoting checked in a real DuckDB query."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from linkage.config import load_config
from linkage.db import connect, path_literal, quote_ident, quote_literal, read_literal
from linkage.errors import WorkspaceError

# every character Python can hand DuckDB as UTF-8: no lone surrogates; NUL, quotes, newlines included
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)


@pytest.fixture(scope="module")
def con():
    c = connect(threads=1)
    yield c
    c.close()


def _setting(con, name: str):
    return con.execute(f"select current_setting({quote_literal(name)})").fetchall()[0][0]


def test_connect_sets_limits_spill_and_splink_settings(tmp_path):
    spill = tmp_path / "o'brien ł spill"
    with connect(memory_limit="512MB", threads=1, spill=spill, preserve_insertion_order=False) as c:
        assert _setting(c, "threads") == 1
        assert _setting(c, "memory_limit") in ("488.2 MiB", "512.0 MB", "488.2MiB")
        assert _setting(c, "temp_directory") == str(spill)
        assert _setting(c, "preserve_insertion_order") is False
        assert _setting(c, "lambda_syntax") == "ENABLE_SINGLE_ARROW"
        assert c.execute("select list_transform([1, 2], x -> x + 1)").fetchall() == [([2, 3],)]


def test_connect_takes_a_config_section_and_keywords_override_it():
    cfg = load_config(link={"memory_limit": "1GB", "threads": 1})
    with connect(cfg.link) as c:
        assert _setting(c, "threads") == 1
        assert _setting(c, "memory_limit").startswith(("953.6", "1.0"))
    with connect(cfg.link, threads=2) as c:
        assert _setting(c, "threads") == 2


def test_a_memory_limit_may_be_a_share_of_the_machine():
    """``"60%"`` (the link stage's default) is DuckDB's share of physical memory; out of range is refused."""
    from linkage.errors import ConfigError

    units = {"KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30, "TiB": 2 ** 40}
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def limit(c) -> float:
        amount, unit = _setting(c, "memory_limit").split()
        return float(amount) * units[unit]

    with connect(load_config(link={"memory_limit": "50%"}).link) as half, connect(memory_limit="25%") as quarter:
        assert limit(half) == pytest.approx(0.5 * machine, rel=0.1)
        assert limit(quarter) == pytest.approx(0.25 * machine, rel=0.1)
    for bad in ("0%", "95%", "100%", "60 %", "lots"):
        with pytest.raises(ConfigError, match="link.memory_limit"):
            load_config(link={"memory_limit": bad})


def test_connect_opens_a_database_file(tmp_path):
    db = tmp_path / "a 'b' ł.duckdb"
    with connect(database=db) as c:
        c.execute("create table t as select 1 as x")
    with connect(database=db) as c:
        assert c.execute("select x from t").fetchall() == [(1,)]


def test_connect_refuses_a_bad_memory_limit_without_leaking_the_connection():
    with pytest.raises(duckdb.Error):
        connect(memory_limit="lots")


@settings(max_examples=300, deadline=None)
@given(TEXT)
def test_any_string_round_trips_through_quote_literal(con, text):
    assert con.execute(f"select {quote_literal(text)}").fetchall() == [(text,)]


@settings(max_examples=300, deadline=None)
@given(TEXT.filter(bool))
def test_any_name_round_trips_through_quote_ident(con, name):
    cur = con.execute(f"select 1 as {quote_ident(name)}")
    assert cur.description[0][0] == name
    con.execute(f"create or replace temp table {quote_ident(name)} ({quote_ident(name)} integer)")
    con.execute(f"insert into {quote_ident(name)} values (7)")
    assert con.execute(f"select {quote_ident(name)} from {quote_ident(name)}").fetchall() == [(7,)]
    con.execute(f"drop table {quote_ident(name)}")


def test_quote_ident_refuses_the_empty_name():
    with pytest.raises(ValueError, match="empty"):
        quote_ident("")


def test_quoting_by_hand_worked_cases():
    assert quote_literal("o'brien") == "'o''brien'"
    assert quote_literal("''") == "''''''"
    assert quote_ident('a"b') == '"a""b"'
    assert quote_ident("x'; drop table t; --") == '"x\'; drop table t; --"'
    assert path_literal(Path("/w/o'b ł/x.parquet")) == "'/w/o''b ł/x.parquet'"
    assert read_literal("/w/r[1]*?", "*.parquet") == "'/w/r[[]1][*][?]/*.parquet'"


@pytest.mark.parametrize("folder", ["o'brien ł ws", "a [1]", "star*", "q?", "{a,b}", "tab\tand\nnewline"])
def test_paths_with_awkward_characters_write_and_read_back(con, tmp_path, folder):
    d = tmp_path / folder
    d.mkdir()
    twin = folder.replace("*", "X").replace("?", "Y").replace("[1]", "1")    # what a glob of the folder matches
    twin = tmp_path / (twin if twin != folder else twin + "-twin")
    twin.mkdir()
    for target, value in ((d, 1), (twin, 2)):
        con.execute(f"copy (select {value} as v) to {path_literal(target / 'a.parquet')}")
    assert con.execute(f"select v from read_parquet({read_literal(d, '*.parquet')})").fetchall() == [(1,)]
    assert con.execute(f"select v from {read_literal(d / 'a.parquet')}").fetchall() == [(1,)]


def test_a_backslash_folder_reads_one_file_and_refuses_a_glob(con, tmp_path):
    d = tmp_path / "back\\slash"
    d.mkdir()
    con.execute(f"copy (select 3 as v) to {path_literal(d / 'a.parquet')}")
    assert con.execute(f"select v from {read_literal(d / 'a.parquet')}").fetchall() == [(3,)]
    with pytest.raises(WorkspaceError, match="backslash"):
        read_literal(d, "*.parquet")


def test_no_module_builds_its_own_connection_or_quotes_a_path_by_hand():
    """Every connection comes from linkage.db.connect; no path is pasted into SQL between bare quotes."""
    import re

    root = Path(__file__).resolve().parents[1]
    by_hand = re.compile(r"duckdb\.connect\(|duckdb\.sql\(|(read_parquet|read_csv|from|to|join)\s*\(?'\{"
                         r"|\bset\s+\w+\s*=\s*'\{", re.I)
    offenders = [f"{p.relative_to(root)}:{i}" for folder in ("linkage", "flows", "bench")
                 for p in sorted((root / folder).rglob("*.py")) if p.name != "db.py"
                 and not any(part.startswith(".") for part in p.relative_to(root).parts)   # bench/.peers: a venv
                 for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if by_hand.search(line)]
    assert offenders == []
