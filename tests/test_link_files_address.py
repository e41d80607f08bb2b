"""``hhlink link-files`` with the address in parts: street and locality, each its own keyed Bloom filter."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from linkage.link_files.model import PART_DICE, PRIORS, base_settings
from linkage.link_files.stage import MapError, link_files, load_map

KEY = "5e" * 32
HEADER = "id,fn,sn,dob,pc,no,street,suburb,state\n"
# A2/B2 differ only in the suburb; A1/B1 are identical; A3/B3 are different people
A = HEADER + ("A1,Harriet,Okonjo,1971-04-03,2600,12,Howie Court,Kingston,act\n"
              "A2,Paul,Deane,1950-12-12,3070,4,Elm Road,Northcote,vic\n"
              "A3,Moira,Kells,1966-02-09,4000,9,Grey Street,Brisbane,qld\n")
B = HEADER + ("B1,Harriet,Okonjo,1971-04-03,2600,12,Howie Court,Kingston,act\n"
              "B2,Paul,Deane,1950-12-12,3070,4,Elm Road,Thornbury,vic\n"
              "B3,Lena,Fox,1982-07-21,5000,31,Pirie Street,Adelaide,sa\n")


def _map(address: str) -> str:
    return "link_only = true\n" + "".join(
        f'[files.{t}]\nrecord_id = "id"\nfirst_name = "fn"\nsurname = "sn"\npostcode = "pc"\n'
        f'dob = {{ column = "dob", format = "%Y-%m-%d" }}\n{address}\n' for t in ("a", "b"))


PARTS = 'street = ["no", "street"]\nlocality = ["suburb", "state"]'
JOINED = 'address = ["no", "street", "suburb", "state"]'


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("HHLINK_KEY", KEY)
    monkeypatch.delenv("HHLINK_KEY_FILE", raising=False)


def _run(folder: Path, address: str) -> tuple[dict, dict, dict, dict]:
    (folder / "a.csv").write_text(A)
    (folder / "b.csv").write_text(B)
    (folder / "map.toml").write_text(_map(address))
    s = link_files([folder / "a.csv", folder / "b.csv"], folder / "map.toml", folder / "out")
    with open(folder / "out" / "pairs.csv", newline="") as f:
        weights = {(r["record_id_l"], r["record_id_r"]): float(r["match_weight"]) for r in csv.DictReader(f)}
    with open(folder / "out" / "clusters.csv", newline="") as f:
        clusters = {r["record_id"]: r["cluster_id"] for r in csv.DictReader(f)}
    model = json.loads((folder / "out" / "model.json").read_text())
    return s, weights, clusters, model


def test_a_pair_differing_only_in_suburb_scores_lower_but_still_links(tmp_path, key):
    s, w, clusters, model = _run(tmp_path, PARTS)
    assert w[("A2", "B2")] < w[("A1", "B1")] - 1          # the locality's disagreement costs weight
    assert clusters["A1"] == clusters["B1"] and clusters["A2"] == clusters["B2"]
    assert clusters["A3"] != clusters["B3"]
    names = [c["output_column_name"] for c in model["comparisons"]]
    # the parts are scored, the joined address (kept for blocking) is not counted again
    assert "street" in names and "locality" in names and "address" not in names
    assert any("addr_bf" in r for r in s["blocking_rules"])
    for part in ("street", "locality"):
        [comp] = [c for c in model["comparisons"] if c["output_column_name"] == part]
        labels = [lv["label_for_charts"] for lv in comp["comparison_levels"] if not lv.get("is_null_level")]
        assert labels == [f"Dice >= {t}" for t in PART_DICE[part]] + ["All other comparisons"]
        assert not any(lv.get("tf_adjustment_column") for lv in comp["comparison_levels"])


def test_the_parts_are_bloom_filters_not_tokens(tmp_path, key):
    # the same suburb with a letter doubled keeps a high Dice (top level): a filter, not an equality token
    s, w, clusters, _ = _run(tmp_path, PARTS)
    (tmp_path / "b.csv").write_text(B.replace("Thornbury", "Northcotte"))
    link_files([tmp_path / "a.csv", tmp_path / "b.csv"], tmp_path / "map.toml", tmp_path / "out2")
    with open(tmp_path / "out2" / "pairs.csv", newline="") as f:
        typo = {(r["record_id_l"], r["record_id_r"]): float(r["match_weight"]) for r in csv.DictReader(f)}
    assert w[("A2", "B2")] < typo[("A2", "B2")] <= w[("A1", "B1")]


def test_a_map_without_parts_still_works(tmp_path, key):
    s, w, clusters, model = _run(tmp_path, JOINED)
    names = [c["output_column_name"] for c in model["comparisons"]]
    assert "address" in names and "street" not in names and "locality" not in names
    assert clusters["A1"] == clusters["B1"] and clusters["A2"] == clusters["B2"]
    assert clusters["A3"] != clusters["B3"]
    assert w[("A2", "B2")] < w[("A1", "B1")]


def test_parts_alone_give_the_joined_address_for_blocking(tmp_path):
    (tmp_path / "map.toml").write_text(_map(PARTS))
    spec = load_map(tmp_path / "map.toml")["a"]
    assert spec.columns["address"] == ("no", "street", "suburb", "state")
    (tmp_path / "bad.toml").write_text(_map('street = 3'))
    with pytest.raises(MapError, match="'street' must be a column name or a list"):
        load_map(tmp_path / "bad.toml")


def test_priors_cover_the_part_levels():
    settings = base_settings({"street", "locality", "address", "surname"}, [("sn_tok",)], "dedupe_only", False)
    for comp in settings["comparisons"]:
        for lv in comp["comparison_levels"]:
            if not lv.get("is_null_level"):
                assert lv["label_for_charts"] in PRIORS[comp["output_column_name"]]


def test_one_file_with_repeated_parts_keeps_each_record_once(tmp_path, key):
    # deduplication of one file whose records share street and locality values: every record once
    people = [("Harriet", "Okonjo", "1971-04-03"), ("Paul", "Deane", "1950-12-12"), ("Moira", "Kells", "1966-02-09"),
              ("Lena", "Fox", "1982-07-21"), ("Tomasz", "Wierzba", "1995-10-30"), ("Ada", "Quist", "2004-06-17")]
    rows = "".join(f"R{i},{fn},{sn},{dob},2600,12,Howie Court,Kingston,act\n" for i, (fn, sn, dob) in enumerate(people))
    (tmp_path / "one.csv").write_text(HEADER + rows + "R9,Paul,Deane,1950-12-12,2600,12,Howie Court,Kingston,act\n")
    (tmp_path / "map.toml").write_text(
        '[files.one]\nrecord_id = "id"\nfirst_name = "fn"\nsurname = "sn"\npostcode = "pc"\n'
        f'dob = {{ column = "dob", format = "%Y-%m-%d" }}\n{PARTS}\n')
    s = link_files([tmp_path / "one.csv"], tmp_path / "map.toml", tmp_path / "out")
    with open(tmp_path / "out" / "clusters.csv", newline="") as f:
        clusters = [r for r in csv.DictReader(f)]
    assert len(clusters) == s["records"] == 7
    by_id = {r["record_id"]: r["cluster_id"] for r in clusters}
    assert by_id["R1"] == by_id["R9"] and len(set(by_id.values())) == 6
    with open(tmp_path / "out" / "pairs.csv", newline="") as f:
        pairs = [(r["record_id_l"], r["record_id_r"]) for r in csv.DictReader(f)]
    assert len(pairs) == len(set(pairs))
