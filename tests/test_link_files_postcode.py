"""``hhlink link-files``: transposed postcodes and names within a locality.

FEBRL's duplicates swap two adjacent postcode digits (``4117`` / ``4171``) far more often
than they mistype the last one: the sector and district levels miss such a swap before the
end, so it has a level of its own; and a pair whose date of birth, postcode and one name
are all off is still reached through the other name within the same locality.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import duckdb
import pytest

from linkage.link_files.model import PC_SWAP_LABEL, PC_SWAP_SQL, PRIORS, base_settings, prediction_rules
from linkage.link_files.stage import link_files, transposed

KEY = "5e" * 32


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("HHLINK_KEY", KEY)
    monkeypatch.delenv("HHLINK_KEY_FILE", raising=False)


def _weights(out: Path) -> dict[tuple[str, str], float]:
    with open(out / "pairs.csv", newline="") as f:
        return {(r["record_id_l"], r["record_id_r"]): float(r["match_weight"]) for r in csv.DictReader(f)}


def test_transposed_swaps_each_pair_of_adjacent_characters():
    assert transposed("4117") == ["1417", "4171"]          # 1-1 equal: no variant there
    assert transposed("2259") == ["2529", "2295"]
    assert transposed("SW1A 1AA") == ["WS1A 1AA", "S1WA 1AA", "SWA1 1AA", "SW1A A1A"]   # never across the space
    assert transposed("7") == [] and transposed("") == []


def test_the_transposition_level_sits_between_exact_and_sector_and_matches_one_way():
    settings = base_settings({"postcode", "surname"}, [("sn_tok",)], "dedupe_only", False)
    pc = next(c for c in settings["comparisons"] if c["output_column_name"] == "postcode")
    labels = [lv["label_for_charts"] for lv in pc["comparison_levels"] if not lv.get("is_null_level")]
    assert labels.index("Exact match on postcode_tok") < labels.index(PC_SWAP_LABEL) < labels.index("same sector")
    assert PC_SWAP_LABEL in PRIORS["postcode"]
    con = duckdb.connect()

    def level(swaps_l: list[str], tok_r: str) -> bool:
        return con.execute(f"SELECT {PC_SWAP_SQL} FROM (SELECT ?::VARCHAR[] AS pc_swap_toks_l, ? AS postcode_tok_r)",
                           [swaps_l, tok_r]).fetchall()[0][0]

    assert level(["t1", "t2"], "t2") and not level(["t1"], "t3") and not level([], "t1")


def test_a_transposed_postcode_outweighs_an_unrelated_one(tmp_path, key):
    # the same person twice (A1/B1: postcode digits 2 and 3 swapped) and a namesake born the same
    # day elsewhere (A2/B2: the postcode unrelated); nothing else differs
    (tmp_path / "a.csv").write_text("id,fn,sn,dob,pc\nA1,Lara,Osfield,1950-03-16,4117\n"
                                    "A2,Tom,Rudd,1961-12-15,3070\n")
    (tmp_path / "b.csv").write_text("id,fn,sn,dob,pc\nB1,Lara,Osfield,1950-03-16,4171\n"
                                    "B2,Tom,Rudd,1961-12-15,6290\n")
    (tmp_path / "map.toml").write_text("link_only = true\n" + "".join(
        f'[files.{t}]\nrecord_id = "id"\nfirst_name = "fn"\nsurname = "sn"\npostcode = "pc"\n'
        f'dob = {{ column = "dob", format = "%Y-%m-%d" }}\n' for t in ("a", "b")))
    link_files([tmp_path / "a.csv", tmp_path / "b.csv"], tmp_path / "map.toml", tmp_path / "out")
    w = _weights(tmp_path / "out")
    m, u = PRIORS["postcode"][PC_SWAP_LABEL]
    m_other, u_other = PRIORS["postcode"]["All other comparisons"]
    # with two records a side the priors stand, so the gap is exactly the two levels' weights apart
    assert w[("A1", "B1")] - w[("A2", "B2")] == pytest.approx(math.log2(m / u) - math.log2(m_other / u_other), abs=1e-6)
    model = json.loads((tmp_path / "out" / "model.json").read_text())
    pc = next(c for c in model["comparisons"] if c["output_column_name"] == "postcode")
    assert PC_SWAP_LABEL in [lv.get("label_for_charts") for lv in pc["comparison_levels"]]


def test_names_within_a_locality_reach_a_pair_with_date_postcode_and_surname_off(tmp_path, key):
    # B1 is A1 with the surname mistyped, another date of birth, the postcode transposed and the
    # street line dropped: only "forename and locality" compares them; B2 (same forename,
    # another town) is never compared with A1
    header = "id,fn,sn,dob,pc,no,street,suburb,state\n"
    (tmp_path / "a.csv").write_text(header + "A1,Lara,Osfield,1950-03-16,2259,144,Hall Street,Glenwood,nsw\n")
    (tmp_path / "b.csv").write_text(header + "B1,Lara,Osfoeld,1991-10-30,2295,,,Glenwood,nsw\n"
                                    "B2,Lara,Quill,1972-05-06,6290,9,Grey Street,Broome,wa\n")
    (tmp_path / "map.toml").write_text("link_only = true\n" + "".join(
        f'[files.{t}]\nrecord_id = "id"\nfirst_name = "fn"\nsurname = "sn"\npostcode = "pc"\n'
        f'dob = {{ column = "dob", format = "%Y-%m-%d" }}\nstreet = ["no", "street"]\n'
        f'locality = ["suburb", "state"]\n' for t in ("a", "b")))
    s = link_files([tmp_path / "a.csv", tmp_path / "b.csv"], tmp_path / "map.toml", tmp_path / "out")
    by_rule = {b["rule"]: b["marginal_comparisons"] for b in s["blocking"]}
    assert by_rule["fn_tok and locality_bf"] == 1
    assert by_rule["sn_tok and locality_bf"] == 0
    assert set(_weights(tmp_path / "out")) == {("A1", "B1")}
    assert s["records_not_compared"]["records"] == 1          # B2


def test_locality_rules_need_the_locality_role():
    rules, _ = prediction_rules({"a": {"first_name", "surname", "postcode"}, "b": {"first_name", "surname"}})
    assert ("fn_tok", "locality_bf") not in rules
    rules, _ = prediction_rules({"a": {"first_name", "surname", "locality"}})
    assert ("fn_tok", "locality_bf") in rules and ("sn_tok", "locality_bf") in rules


def _link_two(folder: Path, a: str, b: str, roles: str) -> dict:
    (folder / "a.csv").write_text(a)
    (folder / "b.csv").write_text(b)
    (folder / "map.toml").write_text("link_only = true\n" + "".join(
        f'[files.{t}]\nrecord_id = "id"\n{roles}' for t in ("a", "b")))
    return link_files([folder / "a.csv", folder / "b.csv"], folder / "map.toml", folder / "out")


def test_a_name_with_a_transposed_postcode_brings_a_pair_into_comparison(tmp_path, key):
    # forename replaced, date of birth and postcode off (transposed): only the surname with the
    # transposed postcode compares A1 and B1; B2, the same surname two digits away, is not compared
    s = _link_two(tmp_path, "id,fn,sn,dob,pc\nA1,Matilda,Madigan,1930-11-07,2135\n",
                  "id,fn,sn,dob,pc\nB1,Kody,Madigan,1901-08-28,2315\nB2,Ann,Madigan,1971-01-02,2531\n",
                  'first_name = "fn"\nsurname = "sn"\npostcode = "pc"\n'
                  'dob = { column = "dob", format = "%Y-%m-%d" }\n')
    by_rule = {b["rule"]: b["marginal_comparisons"] for b in s["blocking"]}
    assert by_rule["l.sn_tok = r.sn_tok AND list_contains(l.pc_swap_toks, r.postcode_tok)"] == 1
    assert sum(by_rule.values()) == 1 and s["records_not_compared"]["records"] == 1


def test_one_name_in_the_others_place_and_the_same_birthday_bring_a_pair_into_comparison(tmp_path, key):
    # B1 is A1 with the names swapped and the (now) surname mistyped: the exact swap rule misses
    # it, the surname-in-the-forename's-place rule with the date of birth does not
    s = _link_two(tmp_path, "id,fn,sn,dob\nA1,Harriet,Okonjo,1971-04-03\n",
                  "id,fn,sn,dob\nB1,Okonjo,Harriett,1971-04-03\nB2,Okonjo,Bell,1980-01-01\n",
                  'first_name = "fn"\nsurname = "sn"\ndob = { column = "dob", format = "%Y-%m-%d" }\n')
    by_rule = {b["rule"]: b["marginal_comparisons"] for b in s["blocking"]}
    assert by_rule["l.sn_swap_bf = r.fn_bf AND l.dob_tok = r.dob_tok"] == 1
    assert sum(by_rule.values()) == 1 and s["records_not_compared"]["records"] == 1
