"""Model lifecycle and monthly releases (issue 19 items 4-5), on real DuckDB, Splink, Prefect and the portal.

One 1,000-person population with its last three deliveries held back is linked once (the
model is trained and stored); each test works on a copy. Drift is made real: the same
population generated with higher error rates delivers the months instead. The monthly
flow runs on a temporary Prefect server, in process and, to be killed with SIGKILL, in a
process group of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.drift import DRIFTED, land_drifted
from linkage.config import load_config
from linkage.stages import run_stage
from linkage.link.linked_records import records_relation
from synthetic_data import generate_population
from synthetic_data.deliveries import deliver_next, pending

KEY = "7c" * 32
ROOT = Path(__file__).resolve().parents[1]
PERSONS, SEED, N = 1000, 3, 3


def _config(**generate):
    # small samples and no sensitivity re-clustering: what these tests check is the releases, not them
    return load_config(generate={"persons": PERSONS, "seed": SEED, "deliveries": N, **generate},
                       ingest={"data_docs": False}, link={"u_max_pairs": 3e5, "em_max_pairs": 3e5},
                       assemble={"data_docs": False, "bootstrap_replicates": 20, "sensitivity_thresholds": []})


@pytest.fixture(scope="module")
def key():
    mp = pytest.MonkeyPatch()
    mp.setenv("HHLINK_KEY", KEY)
    yield KEY
    mp.undo()


@pytest.fixture(scope="module")
def first_release(key, tmp_path_factory):
    """The history linked once: (config, workspace, link summary)."""
    cfg = _config()
    ws = tmp_path_factory.mktemp("lifecycle") / "ws"
    generate_population(cfg.generate, ws)
    for stage in ("ingest", "pseudonymise", "link"):
        summary = run_stage(stage, cfg, ws)
    return cfg, ws, summary


def _copy(ws: Path, dest: Path) -> Path:
    shutil.copytree(ws, dest)
    return dest


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- model lifecycle (item 4) ----------------------------------------------------------------


def test_the_first_release_trains_and_stores_the_model_with_its_fingerprint(first_release):
    _, ws, summary = first_release
    model = summary["model"]
    assert model["mode"] == "trained" and model["previous_fingerprint"] is None
    current = json.loads((ws / "linked" / "models" / "current.json").read_text())
    assert current["fingerprint"] == model["fingerprint"] == _sha(ws / "linked" / "model.json")[:16]
    assert (ws / "linked" / "models" / f"{model['fingerprint']}.json").read_bytes() == \
        (ws / "linked" / "model.json").read_bytes()
    assert current["trained_on"]["records"] == summary["records"] and current["reason"] == "no stored model"
    # the training data's profile is the baseline of every later release's drift
    assert set(current["profile"]) == {"m", "u", "records_matched"} and current["profile"]["m"]
    assert summary["drift"] is None


def test_a_delivery_reuses_the_stored_model_and_reports_drift_within_the_bound(first_release, tmp_path):
    cfg, root, first = first_release
    ws = _copy(root, tmp_path / "ws")
    while deliver_next(ws):
        pass
    for stage in ("ingest", "pseudonymise", "link"):
        summary = run_stage(stage, cfg, ws)
    model, drift = summary["model"], summary["drift"]
    assert model["mode"] == "reused" and model["fingerprint"] == first["model"]["fingerprint"]
    # linked/model.json is the stored file byte for byte: nothing was re-estimated
    assert (ws / "linked" / "model.json").read_bytes() == (root / "linked" / "model.json").read_bytes()
    assert summary["training_seconds"] < first["training_seconds"]
    # judged on enough matches, within the default bound
    assert drift["gate"]["judged"] and drift["gate"]["passed"]
    assert drift["matched_pairs"] >= cfg.link.drift_min_pairs and drift["largest"]["drift"] <= cfg.link.max_drift
    assert 0 < drift["new_identities"] < summary["identities"]
    # per level: the model's m and u beside the shares at training and now
    forename = {r["level"]: r for r in drift["levels"] if r["comparison"] == "forename"}
    exact = forename["Exact match on fn_tok"]
    assert exact["model_m"] > 0.5 and exact["model_u"] < 0.01 and 0.5 < exact["m_now"] <= 1
    assert abs(exact["m_now"] - exact["m_at_training"]) <= cfg.link.max_drift
    assert 0.8 < drift["records_matched"]["now"] <= 1 and 0.8 < drift["records_matched"]["at_training"] <= 1
    # and the linkage report shows it
    report = json.loads((ws / "reports" / "linkage" / "report.json").read_text())
    assert report["model"]["mode"] == "reused" and report["drift"]["levels"] == drift["levels"]
    html = (ws / "reports" / "linkage" / "report.html").read_text()
    assert "Model and drift since it was trained" in html and model["fingerprint"] in html
    # the report's figures and the drift's records matched, computed the fast way, are what a
    # computation over every record finds (an incremental release: carried and new records)
    _assert_report_figures_as_per_record(cfg, ws)
    _assert_records_matched_as_per_record(ws, previous=root / "linked" / "identities.parquet")


def test_drifted_data_stops_the_release_naming_the_level_and_retrain_is_deliberate_and_audited(
        first_release, tmp_path, run_cli):
    cfg, root, first = first_release
    ws = _copy(root, tmp_path / "ws")
    # a department's data entry got worse: many more typos, nicknames and mistyped NINOs and postcodes
    land_drifted(cfg.generate, DRIFTED, ws / "landing", tmp_path / "drifted")
    for stage in ("ingest", "pseudonymise"):
        run_stage(stage, cfg, ws)
    before = {p.name: _sha(p) for p in (ws / "linked").glob("*") if p.is_file()}
    args = ("--workspace", str(ws), "--config", str(tmp_path / "lifecycle.toml"))
    (tmp_path / "lifecycle.toml").write_text('[link]\nu_max_pairs = 3e5\nem_max_pairs = 3e5\n')

    code, out, err = run_cli("link", *args)
    assert code == 2, err
    line = err.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in err
    m = re.match(r"error: drift gate: comparison '(\w+)' level '([^']+)' moved from ([\d.]+) to ([\d.]+) .*"
                 r"drift ([\d.]+) > link.max_drift 0.2\)", line)
    assert m, line
    # the release is stopped: linked/ is the previous release's, file for file
    assert {p.name: _sha(p) for p in (ws / "linked").glob("*") if p.is_file()} == before
    drift = json.loads((ws / "reports" / "linkage" / "drift.json").read_text())["drift"]
    assert not drift["gate"]["passed"] and drift["largest"]["comparison"] == m.group(1)
    assert drift["largest"]["level"] == m.group(2) and float(m.group(5)) > 0.2
    # the names' typos show: fewer exact forename agreements among the delivery's matches
    exact = next(r for r in drift["levels"] if r["comparison"] == "forename" and r["level"] == "Exact match on fn_tok")
    assert exact["m_now"] < exact["m_at_training"] - 0.1

    # retraining is the deliberate way on: a new model, stored beside the old, in the audit log
    code, out, err = run_cli("link", "--retrain", *args)
    assert code == 0, err
    summary = json.loads((ws / "linked" / "summary.json").read_text())
    assert summary["model"]["mode"] == "retrained"
    assert summary["model"]["previous_fingerprint"] == first["model"]["fingerprint"] != summary["model"]["fingerprint"]
    assert summary["drift"]["gate"]["judged"] is False      # shown against the replaced model, not gated
    store = ws / "linked" / "models"
    current = json.loads((store / "current.json").read_text())
    assert [h["reason"] for h in current["history"]] == ["no stored model", "retrain requested"]
    assert {p.name for p in store.glob("*.json")} == {"current.json", *(f"{h['fingerprint']}.json" for h in current["history"])}
    assert f"model {summary['model']['fingerprint']} retrained" in out
    log = [json.loads(line) for line in (ws / "audit" / "log.jsonl").read_text().splitlines()]
    assert [(e["action"], e["outcome"]) for e in log] == [("link.drift_gate", "refused"), ("link.model_retrained", "ok")]
    assert log[1]["params"] == {"fingerprint": summary["model"]["fingerprint"],
                                "previous_fingerprint": first["model"]["fingerprint"]}
    code, out, err = run_cli("audit", "verify", "--workspace", str(ws))
    assert code == 0, out + err


# --- monthly releases (item 5) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_server(key, prefect_server):
    """conftest's Prefect server, with this module's key in ``HHLINK_KEY``; yields its API URL."""
    return prefect_server


def _release_process(ws: Path, config: Path, server: str) -> subprocess.Popen:
    """One run of monthly-release in a process group of its own (so SIGKILL takes all of it)."""
    code = ("import sys; from flows.monthly_release import monthly_release_flow; "
            "r = monthly_release_flow(sys.argv[1], config_path=sys.argv[2]); "
            "print((r['release'] or {}).get('release'), r['delivered'])")
    return subprocess.Popen([sys.executable, "-c", code, str(ws), str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True,
                            env={**os.environ, "HHLINK_KEY": KEY, "PREFECT_API_URL": server})


def test_a_release_killed_mid_link_resumes_and_lands_no_second_delivery(prefect_server, tmp_path):
    from linkage.releases import read_releases

    cfg = _config()
    ws = tmp_path / "ws"
    generate_population(cfg.generate, ws)
    shutil.rmtree(ws / "truth")
    config = tmp_path / "hhlink.toml"
    config.write_text("[ingest]\ndata_docs = false\n[link]\nu_max_pairs = 3e5\nem_max_pairs = 3e5\n"
                      "[assemble]\ndata_docs = false\nbootstrap_replicates = 20\nsensitivity_thresholds = []\n")
    proc = _release_process(ws, config, prefect_server)
    deadline = time.monotonic() + 600
    while not list(ws.glob(".linked.tmp-*")):   # link has started building its zone
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "link never started"
        time.sleep(0.2)
    time.sleep(1.5)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert read_releases(ws) == [] and len(pending(ws)) == N

    proc = _release_process(ws, config, prefect_server)
    out, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, err[-2000:]
    # the history became release 1; no delivery landed, neither by the killed run nor by the rerun
    assert out.split() == ["1", "None"]
    releases = read_releases(ws)
    assert len(releases) == 1 and {f["name"] for f in releases[0]["files"]} == {"education.csv", "benefits.csv",
                                                                                 "earnings.csv"}
    assert len(pending(ws)) == N and not list(ws.glob(".linked.tmp-*"))
    assert (ws / "published" / "index.json").exists() and releases[0]["counts"]["published_tables"] > 0


def test_the_monthly_flow_makes_one_release_per_run_and_the_runs_page_shows_them(prefect_server, tmp_path):
    from fastapi.testclient import TestClient

    from flows.monthly_release import monthly_release_flow, take_deliveries
    from linkage.keys import MasterKey
    from linkage.releases import read_releases, unreleased_files
    from linkage.serve import UserStore, create_app

    cfg = _config()
    ws = tmp_path / "ws"
    generate_population(cfg.generate, ws)
    shutil.rmtree(ws / "truth")    # as with real deliveries: no evaluation stage, which has its own tests
    index = json.loads((ws / "deliveries" / "index.json").read_text())["deliveries"]

    # run 1: the history waits in landing/, so no delivery lands; run 2: exactly one lands
    first = monthly_release_flow(str(ws), cfg)
    assert first["delivered"] is None and first["release"]["release"] == 1 and len(pending(ws)) == N
    second = monthly_release_flow(str(ws), cfg)
    assert second["delivered"] == index[0]["month"] and len(pending(ws)) == N - 1
    releases = read_releases(ws)
    assert [r["release"] for r in releases] == [1, 2]
    assert [f["name"] for f in releases[1]["files"]] == sorted(f["name"] for f in index[0]["files"])
    assert {f["name"] for f in releases[0]["files"]} == {"education.csv", "benefits.csv", "earnings.csv"}
    assert {f["name"]: f["rows_staged"] for f in releases[1]["files"]} == {f["name"]: f["rows"] for f in index[0]["files"]}
    assert releases[0]["model"]["mode"] == "trained" and releases[1]["model"]["mode"] == "reused"
    assert releases[1]["model"]["fingerprint"] == releases[0]["model"]["fingerprint"]
    assert releases[0]["key_changes"]["first_release"] and not releases[1]["key_changes"]["first_release"]
    assert releases[1]["counts"]["persons"] >= releases[0]["counts"]["persons"] > 0
    assert releases[1]["counts"]["published_tables"] > 0
    assert unreleased_files(ws) == []

    # a run killed after landing a delivery lands no second one when it starts again
    assert take_deliveries.fn(str(ws))["delivered"] == index[1]["month"]
    again = take_deliveries.fn(str(ws))
    assert again["delivered"] is None and again["files"] == sorted(f["name"] for f in index[1]["files"])
    assert len(pending(ws)) == N - 2

    # the runs page lists both releases, newest first, with their files, counts, key changes and model
    token = UserStore(ws).add("eng", "engineer")
    with TestClient(create_app(ws, cfg, key=MasterKey(bytes.fromhex(KEY), "test")), follow_redirects=False) as client:
        form = client.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        assert client.post("/login", data={"token": token, "csrf": csrf, "next": ""}).status_code == 303
        page = client.get("/runs")
    assert page.status_code == 200
    html = page.text
    assert html.index("<td>2</td>") < html.index("<td>1</td>")
    for name in (f["name"] for r in releases for f in r["files"]):
        assert f"<code>{name}</code>" in html
    assert f"<code>{releases[0]['model']['fingerprint']}</code> reused" in html
    assert f"new {releases[1]['key_changes']['new']}" in html and "first release" in html


def test_the_training_baseline_for_drift_is_each_sources_newest_identities():
    """A delivery's new identities are its newest, so training's m side is the history's newest, per source."""
    from linkage.db import connect
    from linkage.link.drift import recent_identities_sql

    con = connect()
    con.execute("""create table identities as select * from (values
                   ('a1', 'education', 2019), ('a2', 'education', 2021), ('a3', 'education', 2021),
                   ('b1', 'earnings', 2023), ('b2', 'earnings', 2022), ('c1', 'benefits', 2020))
                   t(unique_id, source, first_year)""")
    con.execute(recent_identities_sql())
    newest = {u for (u,) in con.execute("select unique_id from new_identities").fetchall()}
    assert newest == {"a2", "a3", "b1", "c1"}


# --- the report and drift, computed cheaply, say what a computation over every record says ----------


# the report's figures as first written: over a copy of every linked record (19.4 million at
# 1M persons), the match rates over each record's person, the implausible links by a self-join
MATCH_RATES_BY_RECORD = """
    with person_sources as (select person_key, list(distinct source order by source) sources from rec group by 1)
    select r.source, count(*) records,
           round(avg(list_contains(p.sources, 'education')::int), 4) with_education,
           round(avg(list_contains(p.sources, 'benefits')::int), 4) with_benefits,
           round(avg(list_contains(p.sources, 'earnings')::int), 4) with_earnings,
           round(avg((len(p.sources) > 1)::int), 4) with_another_source
    from rec r join person_sources p using (person_key) group by 1 order by 1"""
IMPLAUSIBLE_BY_RECORD = """
    with claim as (select person_key, claim_tok, year, bu_role, record_token from rec where claim_tok is not null),
    same as (select a.person_key, a.bu_role ra, b.bu_role rb from claim a join claim b
             on a.claim_tok = b.claim_tok and a.year = b.year and a.person_key = b.person_key
             and a.record_token < b.record_token),
    span as (select person_key, max(birth_year) - min(birth_year) gap from rec group by 1)
    select (select count(distinct person_key) from same where (ra = 'dependant') != (rb = 'dependant')),
           (select count(distinct person_key) from same where ra != 'dependant' and rb != 'dependant' and ra != rb),
           (select count(*) from span where gap > 1)"""
# a pupil's facts over their school records; most frequent by a window, ties to the lowest
PUPILS_BY_RECORD = """
    with r as (select r.person_key, r.birth_year, p.fsm, p.ethnicity, p.la_code
               from rec r join payload_education p using (record_token) where r.source = 'education'),
    top_eth as (select person_key, ethnicity from (
                    select person_key, ethnicity, row_number() over (partition by person_key order by count(*) desc,
                                                                    ethnicity) rn
                    from r where ethnicity is not null group by 1, 2) where rn = 1),
    top_la as (select person_key, la_code from (
                   select person_key, la_code, row_number() over (partition by person_key order by count(*) desc,
                                                                 la_code) rn
                   from r where la_code is not null group by 1, 2) where rn = 1)
    select person_key, min(birth_year) birth_year, max(fsm) ever_fsm, any_value(t.ethnicity) ethnicity,
           any_value(l.la_code) la_code,
           person_key in (select person_key from rec where source in ('benefits', 'earnings')) linked
    from r left join top_eth t using (person_key) left join top_la l using (person_key) group by person_key"""
MATCHED_SHARE_BY_RECORD = """
    with rc as (select r.source, c.cluster_id from records r join clusters c using (unique_id) {scope}),
    ps as (select c.cluster_id, count(distinct r.source) n_sources
           from records r join clusters c using (unique_id) group by 1)
    select rc.source, count(*), count(*) filter (where ps.n_sources > 1)
    from rc join ps using (cluster_id) group by 1 order by 1"""


def _assert_report_figures_as_per_record(cfg, ws: Path) -> None:
    from linkage.db import connect, read_literal
    from linkage.keys import load_master_key
    from linkage.link import report as rp
    from linkage.pseudonymise.store import load_zone

    linked = ws / "linked"
    con = connect()
    records = records_relation(linked)
    con.execute(f"create table rec as select * from {records}")
    rp.person_sources(con, read_literal(linked / "identities.parquet"))
    assert rp.match_rates(con) == rp.query_rows(con, MATCH_RATES_BY_RECORD)
    assert tuple(rp.implausible_counts(con, records)) == con.execute(IMPLAUSIBLE_BY_RECORD).fetchall()[0]
    load_zone(con, "payload_education", ws, "payload", load_master_key(workspace=ws), sources=["education"])
    la_lookup = cfg.paths.resolve(cfg.assemble.la_lookup)
    rp.subgroups(con, "payload_education", cfg.generate.end_year, la_lookup, records)
    con.execute(f"create table expected as select * from ({PUPILS_BY_RECORD}) "
                f"where birth_year <= {cfg.generate.end_year} - 22")
    got = con.execute("select person_key, birth_year, ever_fsm, ethnicity, la_code, linked from pupils "
                      "order by all").fetchall()
    assert got and got == con.execute("select * from expected order by all").fetchall()
    # and the report the link stage wrote says the same
    report = json.loads((ws / "reports" / "linkage" / "report.json").read_text())
    assert report["match_rates"] == rp.query_rows(con, MATCH_RATES_BY_RECORD)
    # the implausible links on claims, which the link stage counted on the records it held
    by_record = con.execute(IMPLAUSIBLE_BY_RECORD).fetchall()[0]
    assert json.loads((linked / "summary.json").read_text())["implausible_claims"] == list(by_record[:2])
    assert tuple(report["implausible_links"].values()) == by_record
    con.close()


def _assert_records_matched_as_per_record(ws: Path, previous: Path) -> None:
    from linkage.db import connect, read_literal
    from linkage.link.drift import matched_share_sql

    linked = ws / "linked"
    con = connect()
    identities, records = read_literal(linked / "identities.parquet"), records_relation(linked)
    con.execute(f"create table identities as select unique_id, source, n_records from {identities}")
    con.execute(f"create table clusters as select unique_id, person_key cluster_id from {identities}")
    con.execute(f"create table records as select unique_id, source from {records}")
    con.execute(f"create table new_identities as select unique_id from identities "
                f"anti join {read_literal(previous)} using (unique_id)")
    assert con.execute("select count(*) from new_identities").fetchall()[0][0] > 0
    for new_only in (True, False):
        scope = "where r.unique_id in (select unique_id from new_identities)" if new_only else ""
        assert con.execute(matched_share_sql(new_only)).fetchall() == \
            con.execute(MATCHED_SHARE_BY_RECORD.format(scope=scope)).fetchall()
    con.close()


def test_implausible_links_and_records_matched_count_as_the_per_record_queries_on_awkward_rows():
    """Claims with a parent and their dependant, two adults, re-deliveries and unknown roles; persons
    spanning sources, new identities among old: the grouped queries count as the per-record ones."""
    from linkage.db import connect
    from linkage.link import report as rp
    from linkage.link.drift import matched_share_sql

    con = connect()
    # record_token, source, year, birth_year, unique_id, person_key, bu_role, claim_tok
    con.execute("""create table rec as select * from (values
        ('r01', 'benefits', 2020, 1980, 'b-1', 'P1', 'claimant', 'c1'),
        ('r02', 'benefits', 2020, 1980, 'b-1', 'P1', 'dependant', 'c1'),     -- a parent and their dependant
        ('r03', 'benefits', 2020, 1981, 'b-2', 'P2', 'claimant', 'c2'),
        ('r04', 'benefits', 2020, 1981, 'b-2', 'P2', 'claimant', 'c2'),      -- a re-delivery: not two adults
        ('r05', 'benefits', 2021, 1981, 'b-2', 'P2', 'partner', 'c2'),       -- another year
        ('r06', 'benefits', 2020, 1970, 'b-3', 'P3', 'claimant', 'c3'),
        ('r07', 'benefits', 2020, 1970, 'b-3', 'P3', 'partner', 'c3'),       -- two adults
        ('r08', 'benefits', 2020, 1970, 'b-3', 'P3', 'dependant', 'c3'),     -- and a dependant
        ('r09', 'benefits', 2020, 1990, 'b-4', 'P4', null, 'c4'),
        ('r10', 'benefits', 2020, 1990, 'b-4', 'P4', 'dependant', 'c4'),     -- an unknown role: neither
        ('r11', 'benefits', 2020, 1990, 'b-5', 'P5', 'claimant', 'c5'),
        ('r12', 'benefits', 2020, 1990, 'b-6', 'P6', 'dependant', 'c5'),     -- one claim, two persons
        ('r13', 'education', 2005, 1990, 'e-1', 'P5', null, null),
        ('r14', 'education', 2006, 1990, 'e-1', 'P5', null, null),
        ('r15', 'earnings', 2015, 1993, 'n-1', 'P5', null, null),            -- birth years three apart
        ('r16', 'earnings', 2015, 1991, 'n-2', 'P6', null, null),
        ('r17', 'earnings', 2016, 1991, 'n-2', 'P6', null, null),
        ('r18', 'education', 2007, 2000, 'e-2', 'P7', null, null))
        t(record_token, source, year, birth_year, unique_id, person_key, bu_role, claim_tok)""")
    con.execute("""create table ids as select unique_id, min(source) source, min(birth_year) birth_year,
                   count(*) n_records, any_value(person_key) person_key from rec group by 1""")
    rp.person_sources(con, "ids")
    assert rp.match_rates(con) == rp.query_rows(con, MATCH_RATES_BY_RECORD)
    assert tuple(rp.implausible_counts(con, "rec")) == con.execute(IMPLAUSIBLE_BY_RECORD).fetchall()[0] == (2, 1, 1)
    con.execute("create table identities as select unique_id, source, n_records from ids")
    con.execute("create table clusters as select unique_id, person_key cluster_id from ids")
    con.execute("create table records as select unique_id, source from rec")
    for new in (["e-1"], ["n-2", "e-2"], ["b-1", "b-2", "b-3"]):
        con.execute(f"create or replace table new_identities as select unnest({new!r}) unique_id")
        for new_only in (True, False):
            scope = "where r.unique_id in (select unique_id from new_identities)" if new_only else ""
            assert con.execute(matched_share_sql(new_only)).fetchall() == \
                con.execute(MATCHED_SHARE_BY_RECORD.format(scope=scope)).fetchall()
