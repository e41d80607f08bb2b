"""The Prefect flows on a real (temporary) Prefect server: a full run, caching, quality gates, SIGKILL resume.

One reference run of ``household-linkage`` on a 1,000-person population is shared by the
tests; gate tests work on copies of its workspace. The fault test runs ``hhlink run`` in a
separate process group against the same server, kills it with SIGKILL while it links,
runs it again, and compares published/ byte for byte and research/ row for row with the reference;
those two runs go in a background thread beside the reference run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flows import household_linkage_flow
from flows.fingerprint import input_fingerprint, stage_modules
from linkage.workspace import hold as workspace_run
from flows.gates import linkage_checks
from linkage.config import FlowConfig, load_config
from linkage.workspace import Workspace
from tests.conftest import FAST_LINK, config_file

KEY = "5e" * 32
PERSONS, SEED = 1000, 11
ROOT = Path(__file__).resolve().parents[1]


def _tree(folder: Path) -> dict[str, str]:
    """relative path -> SHA-256 of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _contents(ws: Path, zone: str) -> dict[str, str]:
    """Like :func:`_tree`, but research/ tables by their decrypted rows: encrypted files differ byte
    for byte on every write (random data keys and nonces) even when their rows are the same."""
    if zone != "research":
        return _tree(ws / zone)
    import pyarrow as pa

    from linkage.keys import MasterKey
    from linkage.pseudonymise.store import read_research

    key = MasterKey(bytes.fromhex(KEY), "test")
    out = {}
    for p in sorted((ws / zone).rglob("*")):
        if p.suffix == ".parquet":
            sink = pa.BufferOutputStream()
            table = read_research(ws, key, p.stem)
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            out[p.name] = hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()
        elif p.is_file():
            out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _config(**sections):
    return load_config(generate={"persons": PERSONS, "seed": SEED}, link=FAST_LINK, **sections)


@pytest.fixture(scope="module")
def server(prefect_server):
    """conftest's Prefect server, with this module's key in ``HHLINK_KEY``; yields its API URL."""
    saved = os.environ.get("HHLINK_KEY")
    os.environ["HHLINK_KEY"] = KEY
    yield prefect_server
    if saved is None:
        os.environ.pop("HHLINK_KEY", None)
    else:
        os.environ["HHLINK_KEY"] = saved


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory, request):
    """An uninterrupted run of household-linkage with generation: (workspace, final state).

    When the session runs the SIGKILL test, its two ``hhlink run`` processes (:class:`KilledRun`)
    start first and run beside this in-process flow, on the core it leaves idle.
    """
    killed = None
    if any(item.name == "test_sigkill_mid_link_then_rerun_gives_the_uninterrupted_outputs"
           and getattr(item, "module", None) is sys.modules[__name__] for item in request.session.items):
        killed = KILLED[server] = KilledRun(tmp_path_factory.mktemp("flow") / "killed", server).start()
    ws = tmp_path_factory.mktemp("flow") / "reference"
    try:
        yield ws, household_linkage_flow(str(ws), _config(), generate=True, return_state=True)
    finally:
        if killed is not None:
            killed.stop()


def _copy(ws: Path, dest: Path) -> Path:
    shutil.copytree(ws, dest, symlinks=True)
    return dest


# --- a full run -----------------------------------------------------------------------------


def test_parent_flow_runs_every_stage_and_publishes(reference):
    ws, state = reference
    assert state.is_completed(), state.message
    result = state.result()
    assert list(result["stages"]) == ["generate", "ingest", "pseudonymise", "link", "assemble", "evaluate",
                                      "disclose"]
    assert all(s["status"] == "ran" for s in result["stages"].values())
    index = json.loads((ws / "published" / "index.json").read_text())
    assert index["tables"] and all((ws / "published" / f"{t}.parquet").exists() for t in index["tables"])
    assert (ws / "research" / "cohort.parquet").exists()
    for report in ("reports/quality/data_docs/index.html", "reports/linkage/report.html",
                   "reports/disclosure/report.html", "reports/evaluation.json"):
        assert (ws / report).exists(), report
    # nothing half-built is left beside the zones: the hidden folders are the orchestration state
    # and the disclosure ledger (exact counts of what each release withheld, never served)
    assert sorted(p.name for p in ws.iterdir() if p.name.startswith(".")) == [".flow", ".sdc"]


def test_artifacts_are_keyed_per_stage_and_hold_no_record_values(reference):
    from prefect.client.orchestration import get_client

    ws, _ = reference
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
        logs, offset = [], 0
        while batch := client.read_logs(limit=200, offset=offset):
            logs += batch
            offset += len(batch)
    keys = {a.key for a in artifacts}
    assert {"ingest-conservation", "ingest-quality", "linkage-metrics", "linkage-evaluation", "research-summary",
            "disclosure-summary", "household-linkage-run"} <= keys
    conservation = next(a for a in artifacts if a.key == "ingest-conservation")
    rows = json.loads(conservation.data) if isinstance(conservation.data, str) else conservation.data
    assert {r["source"] for r in rows} == {"education", "benefits", "earnings"} and all(r["conserved"] for r in rows)
    run = next(a for a in artifacts if a.key == "household-linkage-run")
    assert "reports/linkage/report.html" in run.data and "file://" in run.data

    # identifiers from the landing extracts (5+ characters) appear in no artifact and no log line
    values: set[str] = set()
    for source, cols in (("education", ("forename", "surname", "upn", "postcode")),
                         ("benefits", ("forename", "surname", "nino", "address_line", "postcode")),
                         ("earnings", ("forename", "surname", "nino", "address_line", "postcode"))):
        with (ws / "landing" / f"{source}.csv").open(newline="") as fh:
            for row in csv.DictReader(fh):
                values.update(v for c in cols if len(v := (row.get(c) or "").strip()) >= 5)
    text = "\n".join([*(a.data if isinstance(a.data, str) else json.dumps(a.data) for a in artifacts),
                      *(log.message for log in logs)])
    tokens = set(re.split(r"[^A-Za-z0-9']+", text))
    leaked = sorted(v for v in values if (v in text if re.search(r"[^A-Za-z0-9']", v) else v in tokens))
    assert len(values) > 1000 and len(logs) > 50 and not leaked, leaked[:5]
    assert KEY not in text


def test_a_run_under_another_key_is_refused_before_anything_is_rewritten(reference, tmp_path):
    ws = _copy(reference[0], tmp_path / "ws")
    before = {zone: _tree(ws / zone) for zone in ("pseudonymised", "research", "published")}
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    other = keys / "other.key"
    other.write_text("6f" * 32 + "\n")
    other.chmod(0o600)
    state = household_linkage_flow(str(ws), _config(), key_file=str(other), return_state=True)
    assert not state.is_completed()
    with pytest.raises(Exception, match="hhlink keys rotate"):
        state.result()
    assert {zone: _tree(ws / zone) for zone in before} == before


def test_rerun_skips_every_cached_stage(reference):
    ws, _ = reference
    before = _tree(ws / "published")
    state = household_linkage_flow(str(ws), _config(), generate=True, return_state=True)
    assert state.is_completed(), state.message
    assert {s: v["status"] for s, v in state.result()["stages"].items()} == {
        s: "cached" for s in ("generate", "ingest", "pseudonymise", "link", "assemble", "evaluate", "disclose")}
    assert _tree(ws / "published") == before


def test_a_deleted_zone_is_rebuilt_even_though_its_inputs_are_unchanged(reference, tmp_path):
    ws = _copy(reference[0], tmp_path / "ws")
    published = _tree(ws / "published")
    shutil.rmtree(ws / "published")
    state = household_linkage_flow(str(ws), _config(), return_state=True)
    assert state.is_completed(), state.message
    stages = state.result()["stages"]
    assert stages["disclose"]["status"] == "ran" and stages["link"]["status"] == "cached"
    assert _tree(ws / "published") == published


# --- quality gates --------------------------------------------------------------------------


def _gate_artifact(reason_part: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["quality-gate"])))
    texts = [a.data for a in found if reason_part in a.data]
    assert texts, f"no quality-gate artifact mentions {reason_part!r}"
    return texts[-1]


def test_a_critical_expectation_stops_the_run_before_disclose(reference, tmp_path):
    ws = _copy(reference[0], tmp_path / "ws")
    published, research, staged = _tree(ws / "published"), _tree(ws / "research"), _tree(ws / "staged")
    earnings = ws / "landing" / "earnings.csv"
    with earnings.open(newline="") as fh:
        rows = list(csv.reader(fh))
    nino = rows[0].index("nino")
    for row in rows[1:len(rows) // 3]:   # a delivery with a third of its NINOs missing
        row[nino] = ""
    with earnings.open("w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)
    state = household_linkage_flow(str(ws), _config(), return_state=True)
    assert state.is_failed()
    assert state.message.startswith("quality gate at ingest: critical expectation failed")
    assert "nino" in state.message and "published/ not updated" in state.message
    assert _tree(ws / "published") == published and _tree(ws / "research") == research
    assert _tree(ws / "staged") == staged
    assert "nino" in _gate_artifact("nino")


def test_linkage_below_the_minimums_stops_the_run_before_assemble(reference, tmp_path):
    ws = _copy(reference[0], tmp_path / "ws")
    published, research = _tree(ws / "published"), _tree(ws / "research")
    cfg = _config(flow={"min_match_rate": {"education": 0.5, "benefits": 0.5, "earnings": 0.9999}})
    state = household_linkage_flow(str(ws), cfg, return_state=True)
    assert state.is_failed()
    assert state.message.startswith("quality gate at link: linkage quality below the minimums in [flow]")
    assert "earnings: match rate" in state.message and "below the minimum 0.9999" in state.message
    assert _tree(ws / "published") == published and _tree(ws / "research") == research
    _gate_artifact("earnings: match rate")


# --- SIGKILL mid-link and resume --------------------------------------------------------------


def _hhlink_run(ws: Path, server: str) -> subprocess.Popen:
    env = {**os.environ, "HHLINK_KEY": KEY, "PREFECT_API_URL": server}
    config = config_file(ws.parent, link=FAST_LINK)     # the reference's settings (_config())
    return subprocess.Popen([sys.executable, "-m", "linkage.cli", "run", "--workspace", str(ws),
                             "--config", str(config), "--persons", str(PERSONS), "--seed", str(SEED)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)


class KilledRun:
    """``hhlink run`` killed with SIGKILL while it links, then run again, in a background thread.

    It runs beside the reference run (the ``reference`` fixture starts it) and records what
    it saw at each point; the test waits for it and asserts on the record.
    """

    def __init__(self, ws: Path, server: str):
        self.ws, self.server = ws, server
        self.seen: dict = {}
        self.error: BaseException | None = None
        self.proc: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._work, name="killed-run", daemon=True)

    def start(self) -> "KilledRun":
        self._thread.start()
        return self

    def wait(self, timeout: float = 1200) -> dict:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the killed run and its rerun did not finish"
        if self.error is not None:
            raise self.error
        return self.seen

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._thread.join(60)

    def _work(self) -> None:
        try:
            self._kill_then_rerun()
        except BaseException as exc:  # noqa: BLE001 - raised again in the test
            self.error = exc

    def _kill_then_rerun(self) -> None:
        ws, seen = self.ws, self.seen
        proc = self.proc = _hhlink_run(ws, self.server)
        deadline = time.monotonic() + 300
        while not list(ws.glob(".linked.tmp-*")):   # link has started building its zone
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "link never started"
            time.sleep(0.2)
        time.sleep(1.5)   # into training
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        seen["killed"] = {"returncode": proc.returncode, "tmp": bool(list(ws.glob(".linked.tmp-*"))),
                          "zones": [z for z in ("linked", "research", "published") if (ws / z).exists()]}
        proc = self.proc = _hhlink_run(ws, self.server)
        out, err = proc.communicate(timeout=600)
        seen["rerun"] = {"returncode": proc.returncode, "out": out, "err": err,
                         "tmp": bool(list(ws.glob(".linked.tmp-*")))}


#: the module's KilledRun, by server URL
KILLED: dict[str, KilledRun] = {}


def test_sigkill_mid_link_then_rerun_gives_the_uninterrupted_outputs(reference, server):
    killed = KILLED[server]
    seen = killed.wait()
    assert seen["killed"]["returncode"] == -signal.SIGKILL
    assert seen["killed"]["tmp"] and seen["killed"]["zones"] == []   # killed mid-link, nothing visible

    rerun = seen["rerun"]
    assert rerun["returncode"] == 0, rerun["err"][-3000:]
    assert "ran link, assemble, evaluate, disclose; skipped (unchanged) generate, ingest, pseudonymise" in rerun["out"]
    assert not rerun["tmp"]   # the killed run's half-built zone was cleared
    ref = reference[0]
    for zone in ("published", "research"):
        assert _contents(killed.ws, zone) == _contents(ref, zone), zone


# --- pieces that need no server ---------------------------------------------------------------


def test_linkage_checks_hand_worked():
    report = {"expected_vs_true": {"expected_precision_at_threshold": 0.9995},
              "match_rates": [{"source": "education", "with_another_source": 0.99},
                              {"source": "earnings", "with_another_source": 0.70}]}
    rows, failures = linkage_checks(report, FlowConfig(min_expected_precision=0.999,
                                                       min_match_rate={"education": 0.95, "earnings": 0.75,
                                                                       "benefits": 0.9}))
    assert [(r["check"], r["passed"]) for r in rows] == [
        ("expected precision at threshold", True), ("match rate benefits", False),
        ("match rate earnings", False), ("match rate education", True)]
    assert failures == ["benefits: no records linked (source missing from the report)",
                        "earnings: match rate 0.7000 is below the minimum 0.75"]


def test_flow_config_refuses_unknown_sources_and_bad_cron():
    with pytest.raises(ValueError, match="unknown source"):
        FlowConfig(min_match_rate={"health": 0.5})
    with pytest.raises(ValueError, match="five-field cron"):
        FlowConfig(schedule="0 6 1 * * *")


def test_fingerprint_follows_inputs_settings_and_code(tmp_path):
    (tmp_path / "landing").mkdir()
    (tmp_path / "landing" / "education.csv").write_text("a,b\n1,2\n")
    cfg = load_config()
    first, files = input_fingerprint("ingest", tmp_path, cfg, "code-1")
    assert [f["path"] for f in files] == ["landing/education.csv"]
    assert input_fingerprint("ingest", tmp_path, cfg, "code-1")[0] == first
    assert input_fingerprint("ingest", tmp_path, load_config(link={"threshold": 0.9}), "code-1")[0] == first
    assert input_fingerprint("ingest", tmp_path, load_config(ingest={"max_encoding_error_share": 0.02}),
                             "code-1")[0] != first
    assert input_fingerprint("ingest", tmp_path, cfg, "code-2")[0] != first
    (tmp_path / "landing" / "education.csv").write_text("a,b\n1,3\n")   # same size, new content
    assert input_fingerprint("ingest", tmp_path, cfg, "code-1")[0] != first
    with pytest.raises(ValueError, match="key fingerprint"):
        input_fingerprint("pseudonymise", tmp_path, cfg, "code-1")
    names = {stage: {name for name, _ in stage_modules(stage)} for stage in ("link", "assemble")}
    assert "linkage.assemble.stage" in names["assemble"] and "linkage.assemble.stage" not in names["link"]
    assert "linkage.link.stage" in names["link"]


def test_recover_restores_a_zone_caught_mid_swap_and_clears_scratch(tmp_path):
    ws = Workspace(tmp_path).ensure()
    (tmp_path / ".staged.old-4242").mkdir()
    (tmp_path / ".staged.old-4242" / "education.parquet").write_text("previous")
    (tmp_path / ".linked.tmp-abc").mkdir()
    (tmp_path / ".pseudonymise-spill-x").mkdir()
    (tmp_path / "published").mkdir()
    (tmp_path / ".published.old-99").mkdir()   # the swap finished: the old copy is garbage
    (tmp_path / "reports" / "linkage").mkdir(parents=True)
    (tmp_path / "reports" / "linkage" / ".report.json.tmp-1").write_text("{")
    (tmp_path / ".flow").mkdir()
    done = ws.recover()
    assert (tmp_path / "staged" / "education.parquet").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".flow", "published", "reports", "staged"]
    assert not list((tmp_path / "reports" / "linkage").iterdir())
    assert len(done) == 5


def test_one_run_per_workspace(tmp_path):
    code = ("import sys; from linkage.workspace import hold as workspace_run\n"
            "try:\n    with workspace_run(sys.argv[1]): pass\nexcept Exception as e:\n    print(e); sys.exit(3)\n")
    with workspace_run(tmp_path):
        with workspace_run(tmp_path):   # re-entrant in this process (the parent flow and its stage flows)
            pass
        other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
        assert other.returncode == 3 and "another hhlink command is using this workspace" in other.stdout
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT).returncode == 0


def test_monthly_deployment_is_registered_with_its_cron_and_no_key(server, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.deployment import monthly_deployment

    cfg = _config(flow={"schedule": "0 6 1 * *", "timezone": "Europe/London", "deployment": "monthly-test"})
    deployment_id = monthly_deployment(tmp_path / "ws", cfg, ROOT / "hhlink.toml").apply()
    with get_client(sync_client=True) as client:
        d = client.read_deployment(deployment_id)
    assert d.name == "monthly-test"
    assert [(s.schedule.cron, s.schedule.timezone) for s in d.schedules] == [("0 6 1 * *", "Europe/London")]
    assert d.parameters == {"workspace": str((tmp_path / "ws").resolve()), "config_path": str(ROOT / "hhlink.toml")}
    assert KEY not in json.dumps(d.model_dump(mode="json"))


def test_run_without_a_key_is_a_one_line_error(run_cli, tmp_path):
    code, out, err = run_cli("run", "--workspace", str(tmp_path / "ws"), "--key-file", str(tmp_path / "none.key"))
    assert code != 0 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "none.key" in err
