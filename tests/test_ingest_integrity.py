"""Ingest accounts for every physical line of a delivered file (issue 14, items 1, 2, 4 and 7).

One test per corruption a data-integrity tester tried, each with the expected answer written
out, then a hypothesis property over generated malformed files: every physical data line is
staged or quarantined exactly once (as a record's first line or as a continuation line of
a record with a quoted line break), and the manifest's counts reconcile with a line count
taken here from the bytes, independently of any CSV parser.
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linkage.ingest import landing
from linkage.ingest.stage import QUARANTINE_REASONS, IngestError, stage_files
from linkage.schemas import load_schema

EDU = load_schema("education")
HEADER = ",".join(EDU.names)
GOOD = ["EDU000000001", "2015/16", "A123456789012", "Anne", "", "ONeil", "2004-05-06", "F", "WBRI",
        "SW1A 1AA", "E06000001", "123456", "6", "0", "N", "101", "45.5"]
README = Path(__file__).resolve().parents[1] / "README.md"


def _row(i: int, **changes) -> list[str]:
    row = list(GOOD)
    row[0] = f"EDU{i:09d}"
    for k, v in changes.items():
        row[EDU.names.index(k)] = v
    return row


def _csv(rows: list[list[str]]) -> list[str]:
    return [",".join(f'"{v}"' if any(c in v for c in ',"\n\r') else v for v in r) for r in rows]


def _stage(tmp_path: Path, data: bytes, name: str = "education.csv") -> tuple[dict, list[dict], list[dict]]:
    path = tmp_path / name
    path.write_bytes(data)
    out = stage_files(EDU, [path], tmp_path / "out", max_encoding_error_share=1.0)
    con = duckdb.connect()

    def rows(p: Path) -> list[dict]:
        cur = con.execute("SELECT * FROM read_parquet(?) ORDER BY _line", [str(p)])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    staged = rows(tmp_path / "out" / "staged" / "education.parquet")
    quarantine = rows(tmp_path / "out" / "quarantine" / "education.parquet")
    return out["files"][0], staged, quarantine


def _many(n: int) -> list[str]:
    return _csv([_row(i) for i in range(1, n + 1)])


# --- item 1: the file itself --------------------------------------------------------------

@pytest.mark.parametrize("blank", [False, True], ids=["fast-reader-file", "exact-reader-file"])
def test_an_open_quote_is_contained_to_its_own_line(tmp_path, blank):
    lines = _many(600)
    lines[99] = lines[99].replace(",Anne,", ',"Anne,', 1)         # row 100 opens a quote nothing closes
    if blank:
        lines.insert(300, "")                                      # forces the exact reader
    entry, staged, quarantine = _stage(tmp_path, ("\n".join([HEADER, *lines]) + "\n").encode())
    assert entry["reader"] == "exact"
    assert [(q["_line"], q["reason"]) for q in quarantine] == [(101, "quote")] + ([(302, "blank_line")] if blank else [])
    assert len(staged) == 599
    assert entry["data_lines"] == entry["rows_read"] == 600 + blank and entry["continuation_lines"] == 0


def test_an_open_quote_followed_by_another_quote_later_is_still_contained(tmp_path):
    lines = _many(50)
    lines[9] = lines[9].replace(",Anne,", ',"Anne,', 1)
    lines[29] = lines[29].replace(",ONeil,", ',O"Neil",', 1)       # a later quote must not close row 10's
    entry, staged, quarantine = _stage(tmp_path, ("\n".join([HEADER, *lines]) + "\n").encode())
    assert [(q["_line"], q["reason"]) for q in quarantine] == [(11, "quote")]
    assert len(staged) == 49 and entry["rows_read"] == 50


def test_a_quoted_line_break_is_one_record_and_counted_as_a_continuation_line(tmp_path):
    lines = _csv([_row(1), _row(2, middle_names="Anne\nMarie"), _row(3)])
    entry, staged, quarantine = _stage(tmp_path, ("\n".join([HEADER, *lines]) + "\n").encode())
    assert quarantine == [] and [s["_line"] for s in staged] == [2, 3, 5]
    assert (entry["rows_read"], entry["continuation_lines"], entry["data_lines"]) == (3, 1, 4)


@pytest.mark.parametrize("size", [300, 200_000], ids=["over-the-schema-limit", "over-pythons-csv-limit"])
@pytest.mark.parametrize("blank", [False, True], ids=["fast-reader-file", "exact-reader-file"])
def test_a_long_value_is_too_long_whatever_the_reader(tmp_path, size, blank):
    rows = _many(5)
    rows[2] = ",".join(_row(3, surname="x" * size))
    if blank:
        rows.insert(0, "")
    entry, staged, quarantine = _stage(tmp_path, ("\n".join([HEADER, *rows]) + "\n").encode())
    got = [(q["reason"], q["column"]) for q in quarantine]
    assert ("too_long", "surname") in got and len(staged) == 4
    assert EDU.column("surname").max_length == 255


def test_a_value_at_the_limit_is_staged(tmp_path):
    rows = _csv([_row(1, surname="x" * 255)])
    _, staged, quarantine = _stage(tmp_path, ("\n".join([HEADER, *rows]) + "\n").encode())
    assert quarantine == [] and staged[0]["surname"] == "X" * 255


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\x7f", "\r"])
def test_control_characters_in_a_value_are_quarantined(tmp_path, char):
    rows = _csv([_row(1), _row(2, surname=f"AN{char}WAR"), _row(3)])
    entry, staged, quarantine = _stage(tmp_path, ("\n".join([HEADER, *rows]) + "\n").encode())
    assert [(q["_line"], q["reason"], q["column"]) for q in quarantine] == [(3, "control_char", "surname")]
    assert [s["_line"] for s in staged] == [2, 4]
    assert entry["rows_read"] == 3


def test_control_characters_in_a_parquet_value_are_quarantined(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [_row(1), _row(2, surname="AN\x00WAR"), _row(3, forename="A\x07B"), _row(4)]
    pq.write_table(pa.table({n: [r[i] for r in rows] for i, n in enumerate(EDU.names)}), tmp_path / "education.parquet")
    out = stage_files(EDU, [tmp_path / "education.parquet"], tmp_path / "out")
    assert (out["rows_read"], out["rows_staged"], out["reasons"]) == (4, 2, {"control_char": 2})
    con = duckdb.connect()
    got = con.execute("SELECT _row, \"column\", reason FROM read_parquet(?) ORDER BY _row",
                      [str(tmp_path / "out" / "quarantine" / "education.parquet")]).fetchall()
    assert got == [(2, "surname", "control_char"), (3, "forename", "control_char")]


def test_an_unquoted_lone_carriage_return_is_a_control_character_not_a_line_end(tmp_path):
    rows = _many(3)
    rows[1] = rows[1].replace("ONeil", "AN\rWAR")
    entry, staged, quarantine = _stage(tmp_path, ("\n".join([HEADER, *rows]) + "\n").encode())
    assert [(q["_line"], q["reason"]) for q in quarantine] == [(3, "control_char")]
    assert entry["data_lines"] == 3 and len(staged) == 2


def test_a_file_with_cr_only_line_ends_is_read_and_says_so(tmp_path):
    entry, staged, quarantine = _stage(tmp_path, ("\r".join([HEADER, *_many(4)]) + "\r").encode())
    assert quarantine == [] and [s["_line"] for s in staged] == [2, 3, 4, 5]
    assert entry["line_ends"] == "CR" and entry["data_lines"] == 4


def test_a_cr_only_file_with_a_fault_names_its_line(tmp_path):
    rows = _many(4)
    rows[2] = rows[2][:-5]                                          # drops the last two fields
    entry, _, quarantine = _stage(tmp_path, "\r".join([HEADER, *rows]).encode() + b"\r")
    assert [(q["_line"], q["reason"]) for q in quarantine] == [(4, "field_count")]


def test_a_cut_last_line_is_flagged_and_never_staged_truncated(tmp_path):
    whole = _csv([_row(1), _row(2, ks4_att8="15028.42")])
    cut = ("\n".join([HEADER, *whole]))[:-3].encode()             # cut mid-value: ...,15028
    entry, staged, quarantine = _stage(tmp_path, cut)
    assert entry["final_newline"] is False
    assert [(q["_line"], q["reason"]) for q in quarantine] == [(3, "no_final_newline")]
    assert quarantine[0]["raw"].endswith(",15028")
    assert [s["_line"] for s in staged] == [2]


def test_a_last_line_without_a_newline_is_quarantined_by_the_exact_reader_too(tmp_path):
    rows = _many(3)
    data = ("\n".join([HEADER, rows[0], "", *rows[1:]])).encode()
    entry, staged, quarantine = _stage(tmp_path, data)
    assert entry["reader"] == "exact" and entry["final_newline"] is False
    assert [(q["_line"], q["reason"]) for q in quarantine] == [(3, "blank_line"), (5, "no_final_newline")]


@pytest.mark.parametrize("column, value, reason", [
    ("ks4_att8", "1_000", "bad_float"), ("ks4_att8", "1_000.5", "bad_float"), ("ks4_att8", "0x1A", "bad_float"),
    ("year_group", "1_0", "bad_int"), ("ks4_att8", "4.5e1", None), ("ks4_att8", "+.5", None), ("ks4_att8", "2.", None),
])
def test_numbers_are_parsed_strictly(tmp_path, column, value, reason):
    rows = _csv([_row(1, **{column: value})])
    _, staged, quarantine = _stage(tmp_path, ("\n".join([HEADER, *rows]) + "\n").encode())
    if reason:
        assert [(q["reason"], q["column"]) for q in quarantine] == [(reason, column)]
    else:
        assert quarantine == [] and len(staged) == 1


def test_a_reader_that_loses_a_line_is_caught_by_the_reconciliation(tmp_path, monkeypatch):
    real = landing._records

    def lossy(fh, n):
        for i, rec in enumerate(real(fh, n)):
            if i != 2:
                yield rec

    monkeypatch.setattr(landing, "_records", lossy)
    rows = _many(5)
    path = tmp_path / "education.csv"
    path.write_bytes(("\n".join([HEADER, "", *rows]) + "\n").encode())
    with pytest.raises(IngestError, match=r"landing/education.csv: 5 rows read \+ 0 continuation lines but the "
                                          r"file has 6 data lines; nothing published"):
        stage_files(EDU, [path], tmp_path / "out")
    assert not (tmp_path / "out" / "staged" / "education.parquet").exists()


# --- item 2: repeated rows ------------------------------------------------------------------

def test_repeated_rows_are_quarantined_and_the_first_kept(tmp_path):
    rows = _csv([_row(1), _row(2), _row(1), _row(3), _row(2, forename="Zed"), _row(1)])
    entry, staged, quarantine = _stage(tmp_path, ("\n".join([HEADER, *rows]) + "\n").encode())
    assert [(s["_line"], s["record_id"]) for s in staged] == [(2, "EDU000000001"), (3, "EDU000000002"),
                                                               (5, "EDU000000003")]
    assert [(q["_line"], q["reason"], q["column"]) for q in quarantine] == [
        (4, "duplicate", "record_id"), (6, "duplicate_id", "record_id"), (7, "duplicate", "record_id")]
    assert quarantine[0]["raw"] == rows[0]
    assert entry["reasons"] == {"duplicate": 2, "duplicate_id": 1}


def test_a_repeat_of_a_quarantined_row_is_staged_once(tmp_path):
    # the first copy fails a check: the second, a good row, is the one staged
    rows = _csv([_row(1, year_group="ten"), _row(1)])
    _, staged, quarantine = _stage(tmp_path, ("\n".join([HEADER, *rows]) + "\n").encode())
    assert [s["_line"] for s in staged] == [3] and [q["reason"] for q in quarantine] == ["bad_int"]


def test_repeats_across_two_files_keep_the_earlier_file(tmp_path):
    a, b = tmp_path / "education_a.csv", tmp_path / "education_b.csv"
    a.write_text("\n".join([HEADER, *_csv([_row(1), _row(2)])]) + "\n")
    b.write_text("\n".join([HEADER, *_csv([_row(2), _row(3)])]) + "\n")
    out = stage_files(EDU, [a, b], tmp_path / "out")
    assert out["rows_staged"] == 3 and out["reasons"] == {"duplicate": 1}
    assert [f["reasons"] for f in out["files"]] == [{}, {"duplicate": 1}]


# --- the README ------------------------------------------------------------------------------

def test_the_readme_lists_every_quarantine_reason_and_no_other():
    text = README.read_text()
    table = re.findall(r"^\| `([a-z_]+)` \| ", text[text.index("Quarantine reasons"):], re.M)
    assert set(table) == set(QUARANTINE_REASONS)


# --- item 7: the property ------------------------------------------------------------------

KINDS = ["ok", "ok", "ok", "ok", "open_quote", "quote_inside", "short", "long", "nul", "control", "huge", "over_limit",
         "multiline", "blank", "dup", "dup_id", "underscore", "non_utf8"]
# what each kind becomes when nothing else about the file interferes: (reason, column) or None (staged)
EXPECTED = {"ok": None, "quote_inside": None, "multiline": None, "open_quote": ("quote", None),
            "short": ("field_count", None), "long": ("field_count", None), "nul": ("control_char", "surname"),
            "control": ("control_char", "surname"), "huge": ("too_long", "surname"),
            "over_limit": ("too_long", "surname"), "blank": ("blank_line", None), "dup": ("duplicate", "record_id"),
            "dup_id": ("duplicate_id", "record_id"), "underscore": ("bad_float", "ks4_att8"),
            "non_utf8": ("encoding", "surname")}
READER_FAULTS = {"open_quote", "short", "long", "nul", "control", "blank", "non_utf8"}


@st.composite
def malformed_files(draw):
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=30))
    ends = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    final_newline = draw(st.booleans())
    if not final_newline and kinds[-1] == "blank":
        kinds.append("ok")
    nl = ends.encode()
    body, records, line, last_ok = [HEADER.encode()], [], 2, None
    for i, kind in enumerate(kinds, start=1):
        row = _row(i, forename=draw(st.sampled_from(["Anne", "Zoë", "o'Brien", "Jean Paul"])))
        if kind in ("dup", "dup_id") and last_ok is None:
            kind = "ok"
        if kind == "dup":
            row = list(last_ok)
        elif kind == "dup_id":
            row = list(last_ok)
            row[EDU.names.index("forename")] = "Different"
        elif kind == "short":
            row = row[:-draw(st.integers(1, 5))]
        elif kind == "long":
            row = row + ["extra"] * draw(st.integers(1, 3))
        elif kind == "nul":
            row[EDU.names.index("surname")] = "AN\x00WAR"
        elif kind == "control":
            row[EDU.names.index("surname")] = "AN" + draw(st.sampled_from(["\x01", "\x08", "\x0b", "\x1f", "\x7f"])) + "WAR"
        elif kind == "huge":
            row[EDU.names.index("surname")] = "y" * draw(st.sampled_from([140_000, 2_200_000]))
        elif kind == "over_limit":
            row[EDU.names.index("surname")] = "y" * 256
        elif kind == "multiline":
            row[EDU.names.index("middle_names")] = "Anne" + ends + "Marie"
        elif kind == "underscore":
            row[EDU.names.index("ks4_att8")] = "1_000"
        text = _csv([row])[0]
        if kind == "open_quote":
            text = text.replace(",ONeil,", ',"ONeil,', 1)
        elif kind == "quote_inside":
            text = text.replace(",ONeil,", ',O"Ne"il,', 1)
        raw = text.encode()
        if kind == "non_utf8":
            raw = raw.replace(b",ONeil,", b",O\xffNeil,", 1)
        elif kind == "blank":
            raw = b""
        if kind in ("ok", "multiline"):
            last_ok = row
        span = 1 + raw.count(nl)           # a multiline row, or a repeat of one
        body.append(raw)
        records.append({"line": line, "span": span, "kind": kind})
        line += span
    data = nl.join(body) + (nl if final_newline else b"")
    return data, records, final_newline


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow, HealthCheck.data_too_large])
@given(malformed_files())
def test_every_physical_data_line_is_staged_or_quarantined_exactly_once(tmp_path_factory, generated):
    data, records, final_newline = generated
    root = tmp_path_factory.mktemp("malformed")
    entry, staged, quarantine = _stage(root, data)
    # the line count, independently of any CSV parser: line ends in the bytes
    sep = b"\n" if b"\n" in data else b"\r"
    physical = data.count(sep) + (0 if data.endswith(sep) else 1)
    assert entry["data_lines"] == physical - 1 == sum(r["span"] for r in records)
    assert entry["rows_read"] + entry["continuation_lines"] == entry["data_lines"]
    assert entry["rows_read"] == len(records) == entry["rows_staged"] + entry["rows_quarantined"]
    assert (len(staged), len(quarantine)) == (entry["rows_staged"], entry["rows_quarantined"])
    assert entry["final_newline"] is final_newline
    # every physical line belongs to exactly one staged or quarantined record
    spans = {r["line"]: r["span"] for r in records}
    covered: list[int] = []
    for r in staged + quarantine:
        covered += range(r["_line"], r["_line"] + spans[r["_line"]])
    assert sorted(covered) == list(range(2, physical + 1))
    where = {r["_line"]: ("staged", r) for r in staged}
    where.update({r["_line"]: ("quarantine", r) for r in quarantine})
    last = records[-1]
    for rec in records:
        zone, row = where[rec["line"]]
        expected = EXPECTED[rec["kind"]]
        if rec is last and not final_newline and rec["kind"] not in READER_FAULTS:
            expected = ("no_final_newline", None)
        if expected is None:
            assert zone == "staged", (rec, row.get("reason"))
        else:
            assert zone == "quarantine", rec
            assert row["reason"] in QUARANTINE_REASONS
            assert (row["reason"], row["column"]) == expected, rec
