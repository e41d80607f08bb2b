"""``hhlink disclose`` end to end on a small population, and on-demand tables (``build_table``).

A 2,000-person population goes through generate, ingest, pseudonymise, link and assemble
once per session (conftest's ``assembled_2000``, copied here); the published tables are then
checked against the research tables themselves.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linkage.config import load_config
from linkage.disclose.stage import STATUSES, RequestError, build_table, disclose
from linkage.keys import fingerprint, load_master_key
from linkage.sdc.standard import standard_tables
from tests.conftest import PORTAL_KEY_HEX, copy_workspace
from tests.test_disclosure_properties import _equations, _interval

KEY_HEX = PORTAL_KEY_HEX            # the key of the session's shared workspace (conftest.assembled_2000)


@pytest.fixture(scope="module")
def workspace(assembled_2000, tmp_path_factory):
    """A copy of the session's 2,000-person workspace through assemble (seed 5, key ``KEY_HEX``)."""
    return copy_workspace(assembled_2000, tmp_path_factory.mktemp("disclose") / "ws")


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("HHLINK_KEY", KEY_HEX)
    return load_master_key()


@pytest.fixture(scope="module")
def published(workspace, run_cli_module):
    code, out, err = run_cli_module("disclose", "--workspace", str(workspace))
    assert code == 0, err
    return workspace / "published", out


@pytest.fixture(scope="module")
def run_cli_module():
    import subprocess
    import sys

    def run(*args):
        env = {**__import__("os").environ, "HHLINK_KEY": KEY_HEX}
        p = subprocess.run([sys.executable, "-m", "linkage.cli", *args], capture_output=True, text=True,
                           env=env, timeout=600)
        return p.returncode, p.stdout, p.stderr

    return run


def _cohort(workspace, columns=None) -> pd.DataFrame:
    # research/ is encrypted at rest: decrypted with the workspace's key, as disclose does
    from linkage.keys import MasterKey
    from linkage.pseudonymise.store import read_research

    return read_research(workspace, MasterKey(bytes.fromhex(KEY_HEX), "test"), "cohort", columns).to_pandas()


def test_disclose_with_another_key_fails_in_one_line_and_keeps_the_release(published, workspace):
    """research/ is encrypted under the project's subkey of the master key: disclose under another
    master key cannot read it, says so in one line naming the file, and published/ is left as it was."""
    import secrets

    from linkage.keys import KeyMismatchError, MasterKey

    before = {p.name: p.read_bytes() for p in (workspace / "published").iterdir() if p.is_file()}
    with pytest.raises(KeyMismatchError) as err:
        disclose(load_config(), workspace, key=MasterKey(secrets.token_bytes(32), "other"))
    assert "research/" in str(err.value) and "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in (workspace / "published").iterdir() if p.is_file()} == before


def test_disclose_writes_every_standard_table(published, workspace):
    folder, out = published
    names = [spec.name for spec, _ in standard_tables(workspace / "research", load_config())]
    assert json.loads((folder / "index.json").read_text())["tables"] == names
    for name in names:
        assert name in out
        csv = pd.read_csv(folder / f"{name}.csv", keep_default_na=False)
        pq = pd.read_parquet(folder / f"{name}.parquet")
        meta = json.loads((folder / f"{name}.json").read_text())
        assert len(csv) == len(pq) == meta["sdc"]["rows"]
        assert set(pq["status"]) <= set(STATUSES)
        dims = [c for c in pq.columns if c not in ("measure", "value", "status")]
        assert dims == [c["name"] for c in meta["columns"] if c["role"] == "dimension"]
        assert (pq[dims] == "Total").all(axis=1).any(), "the grand total row is missing"
        hidden = pq["status"].str.startswith("suppressed")
        assert pq.loc[hidden, "value"].isna().all() and (csv.loc[hidden, "value"] == "").all()
        assert pq.loc[~hidden & (pq["measure"] == meta["unit"]), "value"].ge(10).all()
        assert meta["sdc"]["lp_audit"]["all_protected"]
        # no per-rule counts (the zero rule's is the number of empty cells) in what researchers read
        assert "rules_fired" not in meta["sdc"] and isinstance(meta["sdc"]["suppressed_cells"], int)
        assert "Unknown" not in set(pq[dims].to_numpy().ravel())
        assert meta["sdc"]["perturbation"]["key_fingerprint"] == fingerprint(bytes.fromhex(KEY_HEX))
    report = json.loads((folder.parent / "reports" / "disclosure" / "report.json").read_text())
    assert [t["table"] for t in report["tables"]] == names
    assert all("rules_fired" in t["sdc"] and "primary" in t["sdc"]["suppressed_cells"] for t in report["tables"])
    assert all(t["sdc"]["lp_audit"]["joint_with"] == names for t in report["tables"])
    html = (folder.parent / "reports" / "disclosure" / "report.html").read_text()
    assert all(n in html for n in names) and "<b>NO</b>" not in html


def test_transition_counts_match_the_research_table(published, workspace):
    # true counts of children by region x parent quintile x child quintile (margins included),
    # computed here from research/cohort.parquet: every published count is within the p-table's
    # reach (2) of a true count of at least 10; suppressed cells hold no value
    folder, _ = published
    # children without a region are not in the table (disclosure.missing_categories = "exclude")
    c = _cohort(workspace).dropna(subset=["parents_earnings_percentile", "adult_pay_percentile", "region_at_16"])
    c = c.assign(region=c["region_at_16"],
                 parent_income_quintile=np.minimum(5, c["parents_earnings_percentile"] // 20 + 1).astype(int).astype(str),
                 child_income_quintile=np.minimum(5, c["adult_pay_percentile"] // 20 + 1).astype(int).astype(str))
    pub = pd.read_parquet(folder / "transition_region.parquet")
    dims = ["region", "parent_income_quintile", "child_income_quintile"]
    checked = 0
    for row in pub.to_dict("records"):
        mask = np.ones(len(c), dtype=bool)
        for d in dims:
            if row[d] != "Total":
                mask &= (c[d] == row[d]).to_numpy()
        n = int(mask.sum())
        if row["status"].startswith("suppressed"):
            assert np.isnan(row["value"])
            continue
        assert n >= 10 and abs(row["value"] - n) <= 2
        checked += 1
    assert checked > 0
    # an adversary with the exact published counts cannot narrow a suppressed count below 5
    spec = next(s for s, _ in standard_tables(workspace / "research", load_config()) if s.name == "transition_region")
    cells = pub[pub["measure"] == "children"].reset_index(drop=True)
    truth = np.array([int(np.logical_and.reduce([(c[d] == r[d]).to_numpy() if r[d] != "Total" else
                                                  np.ones(len(c), bool) for d in dims]).sum())
                      for r in cells.to_dict("records")], dtype=float)
    hidden = cells["status"].str.startswith("suppressed").to_numpy()
    eqs = _equations(cells, spec)
    for i in np.flatnonzero(hidden)[:40]:
        lo, hi = _interval(eqs, truth, hidden, i, 0.0)
        assert hi - lo >= max(5.0, 0.1 * truth[i]) - 1e-6


def test_disclose_is_reproducible(published, workspace, key):
    folder, _ = published
    before = {p.name: p.read_text() for p in folder.glob("*.csv")}
    disclose(load_config(), workspace, key=key)
    after = {p.name: p.read_text() for p in folder.glob("*.csv")}
    assert sorted(before) == sorted(after)
    # on failure, name each table and its first differing published rows (aggregates, never records)
    changed = {name: [(a, b) for a, b in zip(before[name].splitlines(), after[name].splitlines()) if a != b][:5]
               for name in before if before[name] != after[name]}
    assert not changed, changed


def test_build_table_perturbs_and_is_consistent(published, workspace, key):
    cfg = load_config(disclosure={"perturb": False})   # requests are perturbed whatever the config says
    req = {"dimensions": ["region", "sex"], "measure": "mean_pay_25_30"}
    a = build_table(req, workspace, cfg, key=key)
    b = build_table(dict(reversed(list(req.items()))), workspace, cfg, key=key)
    pd.testing.assert_frame_equal(a.frame, b.frame)
    assert set(a.frame["status"]) <= {"perturbed", "suppressed"}
    assert "perturbed" in set(a.frame["status"])
    # the same children in the same cell get the same perturbed count in every table: the
    # national cells of a region x quintile x quintile request hold exactly the children of
    # the quintile x quintile request's cells, and, where both quintiles are known, of the
    # standard transition table's national cells
    dims = ["region", "parent_income_quintile", "child_income_quintile"]
    three = build_table({"dimensions": dims, "measure": "count"}, workspace, cfg, key=key).frame
    two = build_table({"dimensions": dims[1:], "measure": "count"}, workspace, cfg, key=key).frame
    national = three[three["region"] == "Total"].drop(columns="region")
    both = national.merge(two, on=dims[1:] + ["measure"], suffixes=("_3", "_2"))
    assert len(both) == len(two)
    shown = both[(both["status_3"] == "perturbed") & (both["status_2"] == "perturbed")]
    assert len(shown) >= 5
    assert (shown["value_3"] == shown["value_2"]).all()
    std = pd.read_parquet(published[0] / "transition_region.parquet")
    known = two[(two[dims[1:]] != "Total").all(axis=1) & (two[dims[1:]] != "Unknown").all(axis=1)]
    cross = known.merge(std[std["region"] == "Total"].drop(columns="region"), on=dims[1:] + ["measure"],
                        suffixes=("_r", "_s"))
    cross = cross[(cross["status_r"] == "perturbed") & (cross["status_s"] == "perturbed")]
    assert (cross["value_r"] == cross["value_s"]).all()


def test_build_table_refuses_what_is_not_allowed(published, workspace, key):
    cfg = load_config()
    with pytest.raises(RequestError, match="not allowed"):
        build_table({"dimensions": ["child"], "measure": "count"}, workspace, cfg, key=key)
    with pytest.raises(RequestError, match="not allowed"):
        build_table({"dimensions": ["region"], "measure": "max_pay"}, workspace, cfg, key=key)
    with pytest.raises(RequestError, match="dimensions"):
        build_table({"dimensions": ["region"], "measure": "count", "filter": "x"}, workspace, cfg, key=key)
    narrow = load_config(disclosure={"allowed_dimensions": ["region"]})
    with pytest.raises(RequestError, match="not allowed"):
        build_table({"dimensions": ["sex"], "measure": "count"}, workspace, narrow, key=key)


def test_disclose_needs_research_tables(run_cli_module, tmp_path):
    code, out, err = run_cli_module("disclose", "--workspace", str(tmp_path))
    assert code != 0 and err.startswith("error:") and "assemble" in err and "Traceback" not in err


def _statuses(frame: pd.DataFrame, measure: str, fixed: dict) -> pd.DataFrame:
    sub = frame[frame["measure"] == measure]
    for col, value in fixed.items():
        sub = sub[sub[col] == value]
    return sub


def test_standard_tables_share_one_suppression_pattern(published, workspace):
    # fsm_ever = "no" holds exactly the children of fsm_years_band = "0", and every attainment
    # table's LA totals (other dimension at Total) are the same children when the populations
    # agree: such a cell is withheld in every table or in none
    folder, _ = published
    ever = pd.read_parquet(folder / "attainment_fsm_ever_la.parquet")
    years = pd.read_parquet(folder / "attainment_fsm_years_band_la.parquet")
    a = _statuses(ever, "children", {"fsm_ever": "no"}).drop(columns="fsm_ever")
    b = _statuses(years, "children", {"fsm_years_band": "0"}).drop(columns="fsm_years_band")
    both = a.merge(b, on=["region", "la", "measure"], suffixes=("_a", "_b"))
    assert len(both) > 10
    assert (both["status_a"] == both["status_b"]).all()
    assert (both.loc[both["status_a"] == "perturbed", "value_a"] == both.loc[both["status_a"] == "perturbed",
                                                                              "value_b"]).all()


def test_ledger_records_each_release(published, workspace, key):
    from linkage.sdc import ledger

    names = [spec.name for spec, _ in standard_tables(workspace / "research", load_config())]
    with ledger.locked(workspace) as d:
        assert [b.name for b in ledger.releases(d)][:len(names)] == names
        assert all(oct(p.stat().st_mode)[-3:] == "600" for p in d.glob("*.npz"))
    req = {"dimensions": ["fsm_ever", "la"], "measure": "mean_ks4"}
    pt = build_table(req, workspace, load_config(), key=key)
    with ledger.locked(workspace) as d:
        assert pt.spec.name in [b.name for b in ledger.releases(d)]


def test_on_demand_answers_are_recorded_after_the_published_release(published, workspace, key):
    from linkage.sdc import ledger

    names = [spec.name for spec, _ in standard_tables(workspace / "research", load_config())]
    build_table({"dimensions": ["sex", "region"], "measure": "count"}, workspace, load_config(), key=key)
    with ledger.locked(workspace) as d:
        assert [b.name for b in ledger.releases(d, published_only=True)] == names
        assert len(ledger.releases(d)) > len(names)   # the answer is recorded for an "all" audit later


def test_on_demand_answers_keep_what_earlier_releases_withheld(published, workspace, key):
    # the request is the standard attainment-by-FSM table's geography x fsm_ever grid over the
    # same population (children with a KS4 score): every cell withheld in the published table
    # is withheld in the answer. (A count request's population is every child, with or
    # without KS4: other cells, audited on their own.)
    folder, _ = published
    std = pd.read_parquet(folder / "attainment_fsm_ever_la.parquet")
    std = std[std["measure"] == "children"]
    for measure in ("mean_ks4",):
        got = build_table({"dimensions": ["la", "fsm_ever"], "measure": measure}, workspace, load_config(),
                          key=key).frame
        got = got[got["measure"] == "children"]
        both = std.merge(got, on=["region", "la", "fsm_ever"], suffixes=("_s", "_r"))
        assert len(both) == len(std)
        withheld = both["status_s"] == "suppressed"
        assert withheld.any() and (both.loc[withheld, "status_r"] == "suppressed").all()


def test_a_request_over_its_lp_budget_is_refused(published, workspace, key):
    cfg = load_config(disclosure={"request_max_lps": 1})
    with pytest.raises(RequestError, match="request_max_lps"):
        build_table({"dimensions": ["la", "sex", "cohort"], "measure": "count"}, workspace, cfg, key=key,
                    record=False)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.permutations(["sex", "region", "cohort"]), st.sampled_from(["count", "mean_ks4"]))
def test_answers_do_not_depend_on_dimension_order(published, workspace, key, dims, measure):
    cfg = load_config()

    def answer(order):
        try:
            return build_table({"dimensions": order, "measure": measure}, workspace, cfg, key=key, record=False)
        except RequestError as e:   # a refusal must not depend on the order either
            return str(e)

    a, b = answer(dims), answer(sorted(dims))
    if isinstance(a, str) or isinstance(b, str):
        assert a == b
        return
    pd.testing.assert_frame_equal(a.frame, b.frame)
    assert a.spec.name == b.spec.name


def test_mobility_report_gives_each_sample_size_as_a_published_count(published, workspace, key):
    # reports/mobility.json is read beyond the engineers: its n is the count the engine would
    # publish for the same children (same cell key, so the same noise), never the exact count,
    # and below the threshold there is none
    from linkage.disclose.stage import record_key_secret
    from linkage.sdc.cells import record_keys
    from linkage.sdc.perturb import count_noise

    report = json.loads((workspace / "reports" / "mobility.json").read_text())
    from linkage.pseudonymise.store import read_research

    exact = {r["measure"]: r["n"] for r in read_research(workspace, key, "mobility").to_pylist()
             if r["group_type"] == "national"}
    cohort = _cohort(workspace, ["child_id", "log_parents_earnings", "log_adult_pay"])
    sample = cohort.dropna(subset=["log_parents_earnings", "log_adult_pay"])["child_id"].astype(str).tolist()
    assert len(sample) == exact["ige"] >= 10
    ck = (int(record_keys(sample, record_key_secret(key))[:, 0].astype(np.int64).sum()) % 2**32) / 2**32
    cfg = load_config().disclosure
    expected = len(sample) + int(count_noise(np.array([len(sample)]), np.array([ck]), cfg)[0])
    assert report["national"]["ige"]["n"] == report["headline"]["n"] == expected
    assert all(v["n"] is None or abs(v["n"] - exact[m]) <= len(cfg.count_ptable) // 2
               for m, v in report["national"].items())
    assert all("n" not in v for v in report["sensitivity"]["variants"])


def test_an_lp_attacker_over_published_tables_and_answers_recovers_nothing(published, workspace, key):
    # the benchmark's attacker (bench/disclosure.py) over the standard tables and a batch of
    # answers that overlap them and each other (the same grid in both orders, LA tables over
    # the attainment tables' categories): with each answer audited against everything released
    # before (the default), no withheld cell is narrowed below its protection, noise or not
    from bench.disclosure import attack, load_release

    cfg = load_config()
    assert cfg.disclosure.on_demand_audit == "all"
    frames = {n: pd.read_parquet(published[0] / f"{n}.parquet")
              for n in json.loads((published[0] / "index.json").read_text())["tables"]}
    for dims in (["la", "sex"], ["sex", "la"], ["la", "fsm_ever"], ["region", "fsm_ever"], ["la", "cohort"],
                 ["sex", "fsm_years_band"], ["region", "sex", "fsm_ever"]):
        try:
            pt = build_table({"dimensions": dims, "measure": "count"}, workspace, cfg, key=key)
        except RequestError:
            continue
        frames[pt.spec.name] = pt.frame
    assert len(frames) > len(json.loads((published[0] / "index.json").read_text())["tables"]) + 3
    release = load_release(workspace, list(frames), frames)
    for exact in (True, False):
        got = attack(release, cfg.disclosure, exact=exact)
        assert got["withheld"] > 0 and got["recoverable"] == 0, got
