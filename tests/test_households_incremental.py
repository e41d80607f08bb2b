"""Households after a delivery: recomputing only the persons changed records reach gives a full computation's tables."""

from __future__ import annotations

import json
import random

import duckdb
import pyarrow as pa
import pytest

from linkage.config import LinkConfig
from linkage.keys import MasterKey
from linkage.link.households import assemble_households, households_fingerprint
from linkage.link.stable_keys import household_keys
from linkage.pseudonymise.store import load_zone
from linkage.link.linked_records import records_relation
from tests.conftest import PORTAL_KEY_HEX

COLUMNS = ("record_token", "source", "year", "birth_year", "unique_id", "benefit_unit_tok", "bu_role", "claim_tok")


@pytest.fixture(scope="module")
def records(linked_4000, tmp_path_factory):
    """``linked_4000``'s records as the link stage's ``records_linked`` holds them, in a DuckDB file."""
    ws, _ = linked_4000
    path = tmp_path_factory.mktemp("hh_incremental") / "records.duckdb"
    con = duckdb.connect(str(path))
    load_zone(con, "z", ws, "identifiers", MasterKey(bytes.fromhex(PORTAL_KEY_HEX), "test"),
              ["record_token", "postcode_tok", "addr_bf"])
    con.execute(f"""create table base as
                    select {", ".join(f"r.{c}" for c in COLUMNS)}, r.person_key, z.postcode_tok, z.addr_bf
                    from {records_relation(ws / "linked")} r join z using (record_token)""")
    con.close()
    return path


def _release(records, seed: int, collide: bool = False):
    """A previous release and the next one (Arrow tables of records): 2% of persons with their
    latest year's records new (a delivery), ten pairs of persons merged and ten persons split
    (the records of half their identities under a new key), all chosen at random.

    With ``collide``, a fifth of the postcodes are folded onto a tenth as many (as postcodes
    are shared, or mistyped into others, in a large population): households at one postcode
    with other address lines, pupils placed by a postcode that several addresses share. At
    half of the folded postcodes holding several lines, one line is then made a near copy of
    another (one bit of its filter flipped, within the address dice): lines of different
    households that meet only through a third line's neighbours."""
    con = duckdb.connect(str(records), read_only=True)
    postcode = (f"""case when hash(postcode_tok || '{seed}') % 5 = 0
                         then 'C' || (hash(postcode_tok) % ((select count(distinct postcode_tok) from base) // 10))
                         else postcode_tok end""" if collide else "postcode_tok")
    base = con.sql(f"""select {', '.join(COLUMNS)}, person_key,
                              case when postcode_tok is not null then {postcode} end as postcode_tok, addr_bf
                       from base""").to_arrow_table()
    con.close()
    if collide:
        base = _near_copies(base, random.Random(seed))
    rng = random.Random(seed)
    keys = sorted(set(base.column("person_key").to_pylist()))
    merged = [rng.sample(keys, 2) for _ in range(10)]
    con = duckdb.connect()
    con.register("base", base)
    con.register("merged", pa.table({"target": [a for a, _ in merged], "key": [b for _, b in merged]}))
    con.register("split", pa.table({"key": rng.sample(keys, 10)}))
    con.register("delivered", pa.table({"key": rng.sample(keys, len(keys) // 50)}))
    previous = con.sql("""select * from base b
        where not (person_key in (select key from delivered)
                   and year = (select max(year) from base x where x.person_key = b.person_key))""").to_arrow_table()
    current = con.sql("""select b.* replace (
            case when b.person_key in (select key from split) and strpos('13579bdf', right(b.unique_id, 1)) > 0
                 then 'S' || b.person_key else coalesce(m.target, b.person_key) end as person_key)
        from base b left join (select key, min(target) as target from merged group by key) m on m.key = b.person_key""").to_arrow_table()
    con.close()
    return previous, current


def _near_copies(base: pa.Table, rng: random.Random) -> pa.Table:
    """``base`` with, at half of the folded postcodes holding several lines, the records of the
    last line (by bytes) given the first line's filter with one bit flipped."""
    postcodes, lines = base.column("postcode_tok").to_pylist(), base.column("addr_bf").to_pylist()
    at: dict[str, set] = {}
    for pc, line in zip(postcodes, lines):
        if pc is not None and pc.startswith("C") and line is not None:
            at.setdefault(pc, set()).add(line)
    moved = {}
    for pc in sorted(at):
        found = sorted(at[pc])
        if len(found) > 1 and rng.random() < 0.5:
            near = bytearray(found[0])
            near[0] ^= 1
            moved[(pc, found[-1])] = bytes(near)
    assert moved, "no folded postcode holds two lines"
    new = [moved.get((pc, line), line) for pc, line in zip(postcodes, lines)]
    return base.set_column(base.schema.get_field_index("addr_bf"), "addr_bf", pa.array(new, pa.binary()))


def _con(rows):
    con = duckdb.connect()
    con.register("_rows", rows)
    con.execute("create table records_linked as select * from _rows")
    con.unregister("_rows")
    return con


def _tables(con):
    households = con.execute("select * from households order by person_key, year").fetchall()
    relations = con.execute("select * from parent_child order by parent_key, child_key").fetchall()
    return households, relations


@pytest.mark.parametrize(("seed", "collide"), [(1, False), (2, True), (3, True)])
def test_recomputing_only_the_reached_persons_gives_the_full_tables(records, tmp_path, seed, collide):
    cfg = LinkConfig()
    previous_rows, current_rows = _release(records, seed, collide)
    linked = tmp_path / "linked"
    linked.mkdir()
    con = _con(previous_rows)
    first = assemble_households(con, cfg)
    household_keys(con, linked / "none.parquet", linked)   # a first release: its keys as computed
    # the linked zone's contract: record segments (no person key) and each identity's person key
    con.execute(f"copy (select record_token, unique_id from records_linked) to '{linked}/records.0000.parquet'")
    con.execute(f"copy (select distinct unique_id, person_key from records_linked) to '{linked}/identities.parquet'")
    con.execute(f"copy households to '{linked}/households.parquet'")
    con.execute(f"copy parent_child to '{linked}/parent_child.parquet'")
    # the previous release's counts, which an incremental one moves by its recomputed rows
    (linked / "summary.json").write_text(json.dumps(first))
    assert first["households_fingerprint"] == households_fingerprint(cfg)
    con.close()

    results, reached = {}, {}
    # incremental: the previous records are read to find what changed; arrived: the caller names the new
    # records (as the link state does) and the changed persons come from the identities' keys
    for mode, previous in (("full", None), ("incremental", linked), ("arrived", linked)):
        out = tmp_path / mode
        out.mkdir()
        con = _con(current_rows)
        persons = con.execute("select count(distinct person_key) from records_linked").fetchall()[0][0]
        if mode == "arrived":
            con.register("_previous", previous_rows)
            con.execute("""create table arrived as select record_token from records_linked
                           anti join _previous using (record_token);
                           create table persons as select distinct unique_id, person_key from records_linked""")
            # as the link stage calls it: the records go once the reached persons' are taken
            facts = assemble_households(con, cfg, previous, arrived="arrived", persons="persons", consume=True)
            assert not con.execute("select count(*) from duckdb_tables() where table_name in "
                                   "('records_linked', '_hh_records_all')").fetchall()[0][0]
        else:
            facts = assemble_households(con, cfg, previous)
        assert facts["households_mode"].startswith("full" if mode == "full" else "incremental"), facts["households_mode"]
        # incremental: only the recomputed households are matched against the previous keys
        counts = household_keys(con, linked / "households.parquet", out, recomputed_only=mode == "incremental")
        changes = con.execute(f"select * from '{out}/household_key_changes.parquet' "
                              "order by all").fetchall()
        results[mode] = (*_tables(con), changes, {k: facts[k] for k in
                                                  ("household_years", "parent_child_relations", "address_evidence",
                                                   "mean_household_size")},
                         counts)
        con.close()
        if mode != "full":
            # the delivery reached part of the population, not all of it
            assert 0 < facts["households_recomputed_persons"] < persons / 2
            reached[mode] = facts["households_recomputed_persons"]
    assert reached["arrived"] == reached["incremental"]
    full = results["full"]
    for incremental in (results["incremental"], results["arrived"]):
        assert incremental[0] == full[0]          # every person-year's household, key and evidence
        assert incremental[1] == full[1]          # every parent-child relation
        assert incremental[2] == full[2]          # every household key change
        assert incremental[3] == full[3]
        assert incremental[4] == full[4]          # carried, merged, split, new and retired household keys


def test_a_release_with_other_household_settings_recomputes_everything(records, tmp_path):
    previous_rows, current_rows = _release(records, 4)
    linked = tmp_path / "linked"
    linked.mkdir()
    con = _con(previous_rows)
    assemble_households(con, LinkConfig())
    con.execute(f"copy (select record_token, unique_id from records_linked) to '{linked}/records.0000.parquet'")
    con.execute(f"copy (select distinct unique_id, person_key from records_linked) to '{linked}/identities.parquet'")
    con.execute(f"copy households to '{linked}/households.parquet'")
    con.execute(f"copy parent_child to '{linked}/parent_child.parquet'")
    (linked / "summary.json").write_text(json.dumps({"households_fingerprint": households_fingerprint(LinkConfig())}))
    con.close()
    con = _con(current_rows)
    facts = assemble_households(con, LinkConfig(parent_min_age_gap=16), linked)
    assert facts["households_mode"].startswith("full: the households' settings")
    con = _con(current_rows)
    facts = assemble_households(con, LinkConfig(incremental=False), linked)
    assert facts["households_mode"] == "full: link.incremental is false"
