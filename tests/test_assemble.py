"""``hhlink assemble`` end to end on a small population: generate, ingest, pseudonymise, link, assemble, evaluate."""

from __future__ import annotations

import json
import math
import shutil

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from linkage.config import load_config
from linkage.assemble.stage import RESEARCH_TABLES, AssembleError, assemble, load_research_schema
from linkage.keys import KeyMismatchError, MasterKey
from linkage.pseudonymise.store import (EncryptedZoneError, is_encrypted, read_encrypted_schema, read_research,
                                        register_research, research_key, research_zone)
from linkage.quality import validate
from linkage.link.linked_records import records_relation
from tests.conftest import PORTAL_KEY_HEX, copy_workspace

KEY = PORTAL_KEY_HEX               # the key of conftest's shared linked_4000
MASTER = MasterKey(bytes.fromhex(KEY), "test")
PERSONS = 4000                     # conftest's linked_4000


@pytest.fixture(scope="module")
def assembled(linked_4000, tmp_path_factory):
    """A 4,000-person population through every stage, assembled for project ``proj-a``, then evaluated.

    Generated, ingested, pseudonymised and linked once per session (conftest's ``linked_4000``, which
    ``test_link`` shares); assembled and evaluated here on a copy."""
    from linkage.evaluate.stage import evaluate

    mp = pytest.MonkeyPatch()
    mp.setenv("HHLINK_KEY", KEY)
    root = copy_workspace(linked_4000[0], tmp_path_factory.mktemp("assembled") / "ws")
    cfg = load_config(generate={"persons": PERSONS, "seed": 5}, assemble={"project": "proj-a"})
    summary = assemble(cfg, root)
    metrics = evaluate(cfg, root)
    yield root, cfg, summary, metrics
    mp.undo()


def _table(root, name):
    # research/ is encrypted at rest: every reader decrypts through the store
    return read_research(root, MASTER, name)


def test_research_tables_match_their_schemas(assembled):
    root, _, summary, _ = assembled
    for name in RESEARCH_TABLES:
        schema = load_research_schema(name)
        got = read_encrypted_schema(root / "research" / f"{name}.parquet", MASTER, research_zone("proj-a"))
        assert [(f.name, f.type) for f in got] == [(f.name, f.type) for f in schema.arrow()], name
        assert summary["rows"][name] == _table(root, name).num_rows
    meta = json.loads((root / "research" / "metadata.json").read_text())
    assert meta["project"] == "proj-a" and len(meta["project_key_fingerprint"]) == 16
    assert summary["rows"]["person"] > PERSONS * 0.9
    assert summary["rows"]["cohort"] > 300


def test_sex_decodes_from_its_seals(assembled):
    """Sex is stored only as ``sex_seal`` (randomised encryption, issue 16): assemble decrypts it with the
    key's ``seal:sex`` subkey, and every person with a recorded sex gets it back."""
    root = assembled[0]
    sex = _table(root, "person").column("sex").to_pylist()
    known = [s for s in sex if s is not None]
    assert set(known) == {"M", "F"} and len(known) >= 0.99 * len(sex)
    assert 0.4 < known.count("M") / len(known) < 0.6


def test_research_tables_are_consistent(assembled):
    root, _, _, _ = assembled
    con = duckdb.connect()
    register_research(con, root, MASTER, RESEARCH_TABLES, prefix="")
    one = lambda q: con.execute(q).fetchall()[0][0]  # noqa: E731
    assert one("select count(*) - count(distinct person_id) from person") == 0
    assert one("select count(*) from person_year where person_id not in (select person_id from person)") == 0
    assert one("select count(*) from cohort where child_id not in (select child_id from parent_child)") == 0
    # household-year members are exactly the person-years that point at them
    assert one("""select count(*) from household_year h join (select household_id, year, count(*) n from person_year
                  where household_id is not null group by all) m using (household_id, year) where h.members <> m.n""") == 0
    # the cohort's parental earnings come from the parents' own PAYE rows
    assert one("select count(*) from cohort where parents_earnings < 0 or household_income < 0") == 0
    assert one("select count(*) from cohort where log_parents_earnings is not null") > 100
    # every measure group exists and intervals bracket their estimates
    assert {r[0] for r in con.execute("select distinct group_type from mobility").fetchall()} == {
        "national", "birth_cohort", "region", "la"}
    assert one("""select count(*) from mobility where estimate is not null and ci_low is not null
                  and not (ci_low <= estimate and estimate <= ci_high)""") <= 2


def test_research_zone_holds_no_identifiers_or_linkage_keys(assembled):
    root, _, _, _ = assembled
    con = duckdb.connect()
    banned = set()
    for source, cols in (("education", "forename, surname, upn, postcode, cast(dob as varchar)"),
                         ("benefits", "forename, surname, nino, postcode, address_line, claim_id, benefit_unit_id"),
                         ("earnings", "forename, surname, nino, postcode, address_line, employer_ref")):
        for row in con.execute(f"select distinct {cols} from read_csv('{root}/landing/{source}.csv', "
                               "all_varchar=true)").fetchall():
            banned.update(v for v in row if v and len(v) >= 4)
    linked = root / "linked"
    for q in (f"select distinct person_key from {records_relation(linked)}",
              f"select distinct record_token from {records_relation(linked)}",
              f"select distinct unique_id from {records_relation(linked)}",
              f"select distinct household_key from '{linked}/households.parquet'"):
        banned.update(v for (v,) in con.execute(q).fetchall() if v)
    from linkage.keys import MasterKey
    from linkage.pseudonymise.store import read_identifiers   # identifiers/ are encrypted at rest

    banned.update(v for v in read_identifiers(root, MasterKey(bytes.fromhex(KEY), "test"), ["nino_tok"])
                  .column("nino_tok").to_pylist() if v)
    assert len(banned) > 10_000
    # one Arrow column, not executemany: DuckDB runs executemany row by row (~2 minutes for these values)
    con.register("banned_arrow", pa.table({"v": pa.array(sorted(banned) + sorted(v.upper() for v in banned),
                                                      pa.string())}))
    con.execute("create table banned as select v from banned_arrow")
    scanned = 0
    for path in (root / "research").iterdir():
        if path.suffix == ".parquet":
            (name,) = register_research(con, root, MASTER, [path.stem], prefix="scan_")
            cols = [c for c, t, *_ in con.execute(f"describe select * from {name}").fetchall() if t == "VARCHAR"]
            for col in cols:
                hits = con.execute(f'select count(*) from {name} where "{col}" in (select v from banned)').fetchall()
                assert hits[0][0] == 0, (path.name, col)
                scanned += 1
        else:
            text = path.read_text()
            assert not [v for v in banned if len(v) >= 8 and v in text], path.name
    assert scanned >= 15


def test_two_projects_get_different_keys_for_the_same_people(assembled, run_cli, tmp_path):
    root, _, _, _ = assembled
    other = tmp_path / "ws"
    for zone in ("linked", "pseudonymised"):
        shutil.copytree(root / zone, other / zone)
    code, out, err = run_cli("assemble", "--workspace", str(other), "--project", "proj-b")
    assert code == 0, err
    assert "research tables for project proj-b" in out
    for table, key in (("person", "person_id"), ("cohort", "child_id"), ("household_year", "household_id")):
        a, b = _table(root, table), _table(other, table)
        assert a.num_rows == b.num_rows
        assert not set(a[key].to_pylist()) & set(b[key].to_pylist()), table
    # the same people and values underneath: the tables agree once keys are dropped
    con = duckdb.connect()
    for table, key in (("person", "person_id"), ("cohort", "child_id")):
        rest = [c for c in _table(root, table).column_names if c != key]
        cols = ", ".join(rest)
        a, b = _table(root, table), _table(other, table)   # noqa: F841 - scanned by DuckDB below
        diff = con.execute(f"select count(*) from (select {cols} from a except all select {cols} from b)").fetchall()[0][0]
        assert diff == 0, table
    # within one project the keys join: every parent and child is a person
    persons = set(_table(other, "person")["person_id"].to_pylist())
    pc = _table(other, "parent_child")
    assert set(pc["parent_id"].to_pylist()) <= persons and set(pc["child_id"].to_pylist()) <= persons
    meta_a = json.loads((root / "research" / "metadata.json").read_text())
    meta_b = json.loads((other / "research" / "metadata.json").read_text())
    assert meta_a["project_key_fingerprint"] != meta_b["project_key_fingerprint"]
    assert meta_a["master_key_fingerprint"] == meta_b["master_key_fingerprint"]


def test_research_files_are_unreadable_without_the_project_key(assembled):
    """research/ is encrypted at rest: neither DuckDB nor Arrow reads a file (not even its schema)
    without a key, another project's research subkey cannot decrypt it, and the project's own
    subkey (not the master key) reads it."""
    root, _, summary, _ = assembled
    files = sorted((root / "research").glob("*.parquet"))
    assert {f.stem for f in files} == set(RESEARCH_TABLES) | {"key_changes", "household_key_changes"}
    con = duckdb.connect()
    for f in files:
        assert is_encrypted(f), f.name
        with pytest.raises(duckdb.Error, match="encrypted"):
            con.execute(f"select count(*) from '{f}'").fetchall()
        with pytest.raises(OSError, match="encrypted|decryption"):
            pq.read_table(f)
        with pytest.raises(OSError):
            pq.read_schema(f)
        assert f.stat().st_mode & 0o777 == 0o600, f.name
    other = research_key(MASTER, "proj-b")
    with pytest.raises(KeyMismatchError, match=r"research/ \(project proj-b\), which cannot read research/ "
                                               r"\(project proj-a\)"):
        read_research(root, other, "cohort")
    # the other project's subkey presented as proj-a's: the file's wrapped data key does not open
    from linkage.pseudonymise.store import ZoneKey, read_encrypted

    forged = ZoneKey(research_zone("proj-a"), MASTER.subkey("zone:research:proj-b"), MASTER.fingerprint)
    with pytest.raises(KeyMismatchError, match="cannot be decrypted with the key given"):
        read_encrypted(root / "research" / "cohort.parquet", forged, research_zone("proj-a"))
    own = research_key(MASTER, "proj-a")
    assert read_research(root, own, "cohort").num_rows == summary["rows"]["cohort"]
    with pytest.raises(EncryptedZoneError, match="needs the master key"):
        read_research(root, None, "cohort")
    # metadata.json stays in clear and holds counts and settings, no record value
    meta = json.loads((root / "research" / "metadata.json").read_text())
    assert set(meta) == {"stage", "project", "project_key_fingerprint", "master_key_fingerprint", "rows", "schemas",
                         "settings", "data_window"}


def test_assemble_is_reproducible(assembled, tmp_path):
    root, cfg, _, _ = assembled
    again = tmp_path / "ws"
    for zone in ("linked", "pseudonymised"):
        shutil.copytree(root / zone, again / zone)
    assemble(cfg, again)
    for name in RESEARCH_TABLES:
        assert _table(again, name).equals(_table(root, name)), name


def test_quality_report_covers_the_research_tables(assembled):
    root, _, summary, _ = assembled
    report = json.loads((root / "reports" / "quality" / "research" / "quality_summary.json").read_text())
    assert set(report["sources"]) == set(RESEARCH_TABLES)
    assert report["critical_failed"] == [] and summary["quality"]["critical_failed"] == []
    assert all(s["evaluated"] >= 3 for s in report["sources"].values())
    assert (root / "reports" / "quality" / "research" / "data_docs" / "index.html").exists()


def test_research_suite_catches_duplicate_keys_and_orphans(assembled, tmp_path):
    root, cfg, _, _ = assembled
    broken = tmp_path / "research"
    broken.mkdir()
    con = duckdb.connect()
    register_research(con, root, MASTER, RESEARCH_TABLES, prefix="r_")   # decrypted: the broken copies are plain
    for name in RESEARCH_TABLES:
        if name == "person":      # one person delivered twice
            con.execute(f"""copy (select * from r_person union all (select * from r_person order by person_id limit 1))
                            to '{broken}/person.parquet'""")
        else:
            con.execute(f"copy r_{name} to '{broken}/{name}.parquet'")
    con.execute(f"""copy (select * from r_parent_child
                          union all (select 'f' || left(parent_id, 31), child_id, confidence, benefit_unit_years,
                                            coresident_years, age_gap
                                     from r_parent_child limit 1))
                    to '{broken}/parent_child.parquet'""")
    scratch = tmp_path / "gx"
    scratch.mkdir()
    result = validate({n: broken / f"{n}.parquet" for n in RESEARCH_TABLES},
                      cfg.paths.resolve(cfg.paths.expectations) / "research", tmp_path / "reports", scratch,
                      data_docs=False)
    failed = " | ".join(result["critical_failed"])
    assert "person: expect_column_values_to_be_unique(person_id)" in failed
    assert "parent_child: No orphan relations" in failed
    assert not [f for f in result["critical_failed"] if f.split(":")[0] not in ("person", "parent_child")]


def test_evaluation_holds_the_mobility_figures(assembled):
    root, _, summary, metrics = assembled
    ev = json.loads((root / "reports" / "evaluation.json").read_text())
    assert ev["person_pairwise_f1"] > 0.9          # evaluate's own keys are kept
    assert ev["ige_planted"] == load_config().generate.ige
    for key in ("ige_estimated", "ige_true_links", "ige_true_person_links", "ige_population",
                "rank_slope_planted", "rank_slope_estimated", "rank_slope_true_links"):
        assert isinstance(ev[key], float) and math.isfinite(ev[key]), key
        assert 0.0 < ev[key] < 1.0, key
    assert ev["ige_estimated"] == pytest.approx(summary["national"]["ige"]["estimate"])
    variants = [v["variant"] for v in ev["mobility_sensitivity"]["variants"]]
    assert variants == ["linked"] + [
        f"threshold {t:g}" for t in load_config().assemble.sensitivity_thresholds] + ["true person links", "true links"]
    spread = ev["mobility_sensitivity"]["spread"]["ige"]
    assert spread["min"] <= ev["ige_estimated"] <= spread["max"]


def test_assemble_without_a_linkage_run_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HHLINK_KEY", KEY)
    with pytest.raises(AssembleError, match="run 'hhlink pseudonymise' and 'hhlink link' first"):
        assemble(load_config(), tmp_path)


def test_incremental_threshold_variants_equal_a_full_rebuild(assembled, tmp_path):
    """Oracle: rebuilding only the children a threshold can change gives the cohort a full rebuild gives."""
    from linkage.assemble import mobility, sql as _panel_sql, stage as panel
    from linkage.assemble.sensitivity import Incremental, recluster
    from linkage.keys import load_master_key

    root, cfg, _, _ = assembled
    from linkage.db import connect

    con = connect(cfg.assemble, spill=tmp_path, preserve_insertion_order=False)
    panel.load_inputs(con, panel.Workspace(root), load_master_key(), cfg.paths.resolve(cfg.assemble.la_lookup))
    panel.load_pairs(con, panel.Workspace(root))
    panel.use_linked_links(con)
    panel.build_panel(con, cfg)
    linked = mobility.headline(panel.prepared_cohort(con, cfg))
    a = cfg.assemble
    inc = Incremental(con, cfg.link, cfg.link.threshold, lambda only: panel.build_panel(con, cfg, False, only),
                      _panel_sql.mobility_cohorts_sql(a.childhood_ages, a.adult_pay_ages, alias="t_cohort"))
    rows = "select child_key, birth_year, parents_earnings, adult_pay from t_cohort order by all"
    partition = "select list(unique_id order by unique_id) from id_person_v group by person_key order by 1"
    changed = 0
    for t in (0.5, 0.9, cfg.link.threshold, 0.99999):
        persons = inc.variant(t)
        groups = con.execute(partition).fetchall()
        changed += con.execute("select count(*) from v_new").fetchall()[0][0]
        fast, fast_headline = con.execute(rows).fetchall(), mobility.headline(panel.prepared_cohort(con, cfg))
        panel.build_panel(con, cfg, full=False)             # everyone, on the same links
        assert fast == con.execute(rows).fetchall(), t
        assert fast_headline == pytest.approx(mobility.headline(panel.prepared_cohort(con, cfg)), rel=1e-12, abs=1e-12)
        if t == cfg.link.threshold:
            assert fast_headline == pytest.approx(linked, rel=1e-12, abs=1e-12)
        # every person re-clustered and re-derived: the same persons, nearly the same measures
        assert persons == recluster(con, t, cfg.link)
        assert groups == con.execute(partition).fetchall(), t      # the same persons as clustering everyone
        panel.build_panel(con, cfg, full=False)
        full = mobility.headline(panel.prepared_cohort(con, cfg))
        assert abs(full["ige"] - fast_headline["ige"]) < 0.01 and full["n"] == pytest.approx(fast_headline["n"], rel=0.01)
    assert changed > 10          # the thresholds did split and join persons
