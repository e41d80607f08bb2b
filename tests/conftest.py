"""Shared fixtures: generated populations are built once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from linkage.config import load_config
from synthetic_data import generate_population

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

#: the pytest-xdist worker this process is ("gw0", "gw1", ...), or None in a plain run (``make test`` runs two)
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    # an ``hhlink run`` without PREFECT_API_URL starts a temporary Prefect server on PREFECT_HOME's SQLite
    # database: each worker gets a home of its own, so two workers' runs never migrate or lock one database
    _home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    os.environ["PREFECT_HOME"] = str(_home.with_name(f"{_home.name}-xdist-{XDIST_WORKER}"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)

#: u estimated from 300,000 random pairs instead of the default 5,000,000, for tests that check what the
#: pipeline does (orchestration, caching, leaks, keys) rather than how precise u is: at 1,000-2,000
#: persons sampling 5,000,000 pairs was most of each link's time (42 s of a 57 s link at 1,500 persons)
FAST_LINK = {"u_max_pairs": 3e5}


def pytest_collection_finish(session):
    """Start test_install's wheel build, fresh install and pipeline run in the background as soon as the
    tests are collected: that module's tests then wait for results made on the otherwise idle core."""
    install = sys.modules.get("tests.test_install")
    if install is None or session.config.option.collectonly or "PYTEST_XDIST_WORKER" in os.environ:
        return   # an xdist worker collects every test but runs only some: there the first fixture starts it
    if any(getattr(item, "module", None) is install and "wheel" in item.fixturenames for item in session.items):
        install.background(session)


#: With pytest-xdist (``make test``: ``-n 2 --dist loadfile``) each module runs in one worker, and the
#: modules that share an expensive session fixture run in one worker together, so it is built once,
#: not once per worker: the three Prefect modules share one server, the portal's modules one
#: assembled workspace, test_link's, test_assemble's and test_households_incremental's one linked
#: population. Cheap session fixtures (the 5k population) may be built in both workers.
#: (xdist's own ``--dist loadgroup`` renames each test's node id, which pytest 9.2 ignores: every test
#: would then be scheduled alone and module fixtures built in both workers.)
SHARED_FIXTURE_GROUPS = {"prefect_server": "prefect", "assembled_2000": "assembled_2000",
                         "portal_workspace": "assembled_2000", "linked_4000": "linked_4000"}
#: module -> its group, for the scheduler (which sees node ids only); checked against the fixtures
#: each module's tests use when the workers collect (:func:`pytest_collection_modifyitems`)
MODULE_GROUPS = {
    "tests/test_flows.py": "prefect", "tests/test_lifecycle.py": "prefect", "tests/test_release_e2e.py": "prefect",
    "tests/test_disclose_command.py": "assembled_2000", "tests/test_privacy.py": "assembled_2000",
    "tests/test_service.py": "assembled_2000", "tests/test_service_browser.py": "assembled_2000",
    "tests/test_assemble.py": "linked_4000", "tests/test_link.py": "linked_4000",
    "tests/test_households_incremental.py": "linked_4000",
}
#: Groups in the order the workers take them (``--no-loadscope-reorder``): the longest first, so the
#: run does not end with one worker on a long group while the other idles. test_install comes early:
#: its tests wait for the wheel, install and pipeline run of its background thread, which use a core
#: while the other worker runs. A group not listed follows in collection order.
GROUP_ORDER = ("prefect", "tests/test_install.py", "assembled_2000", "tests/test_spark.py", "linked_4000",
               "tests/test_stages.py", "tests/test_no_cleartext.py", "tests/test_incremental_stages.py")


def _group(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0]
    return MODULE_GROUPS.get(module, module)


@pytest.hookimpl(optionalhook=True)   # xdist's hook: a run without the plugin (-p no:xdist) still loads this file
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile``, with the modules of one :data:`MODULE_GROUPS` group scheduled as one unit."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class GroupedFileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    return GroupedFileScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    """Under xdist: check :data:`MODULE_GROUPS` against the shared fixtures each module uses, and order
    the groups by :data:`GROUP_ORDER`, keeping the order of the tests within a module (the order the
    scheduler hands them out). A plain run is left exactly as collected."""
    if not XDIST_WORKER:
        return
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        for name in item.fixturenames:
            if name in SHARED_FIXTURE_GROUPS and MODULE_GROUPS.get(module) != SHARED_FIXTURE_GROUPS[name]:
                raise pytest.UsageError(f"{module} uses the session fixture {name}: add it to tests/conftest.py's "
                                        f"MODULE_GROUPS as {SHARED_FIXTURE_GROUPS[name]!r}, so xdist runs it in the "
                                        "worker that builds the fixture")
    rank = {g: i for i, g in enumerate(GROUP_ORDER)}
    first_seen: dict[str, int] = {}
    for i, item in enumerate(items):
        first_seen.setdefault(_group(item.nodeid), i)
    items.sort(key=lambda it: (rank.get(_group(it.nodeid), len(rank)), first_seen[_group(it.nodeid)]))


def pytest_sessionfinish(session):
    install = sys.modules.get("tests.test_install")
    if install is not None and install.BACKGROUND:
        install.BACKGROUND[0].stop()


def _generate(root: Path, persons: int, seed: int, fmt: str = "csv") -> tuple[Path, dict]:
    cfg = load_config(generate={"persons": persons, "seed": seed, "format": fmt})
    summary = generate_population(cfg.generate, root)
    return root, summary


@pytest.fixture(scope="session")
def small_population(tmp_path_factory) -> tuple[Path, dict]:
    """A 5,000-person population (seed 7), CSV extracts."""
    return _generate(tmp_path_factory.mktemp("pop5k"), 5000, 7)


@pytest.fixture(scope="session")
def population_100k(tmp_path_factory) -> tuple[Path, dict]:
    """The 100,000-person population the issue's statistical checks are stated at."""
    return _generate(tmp_path_factory.mktemp("pop100k"), 100_000, 42)


@pytest.fixture(scope="session")
def ingested_5k(small_population, tmp_path_factory) -> tuple[Path, dict]:
    """``small_population``'s landing zone ingested once with the default config: (workspace, ingest
    summary). READ-ONLY: a module that writes into it (pseudonymise, a re-run) takes a
    :func:`copy_workspace` first. Its landing files are hard links to the population's."""
    from linkage.ingest.stage import ingest

    ws = tmp_path_factory.mktemp("ingested5k") / "ws"
    (ws / "landing").mkdir(parents=True)
    for f in (small_population[0] / "landing").iterdir():
        os.link(f, ws / "landing" / f.name)     # landing files are never modified
    return ws, ingest(load_config(), ws)


@pytest.fixture(scope="session")
def linked_4000(tmp_path_factory) -> tuple[Path, dict]:
    """A 4,000-person population (seed 5) through generate, ingest, pseudonymise and link under
    ``HHLINK_KEY = 5e * 32``: (workspace, link summary). READ-ONLY: ``test_link`` evaluates and
    ``test_assemble`` assembles a :func:`copy_workspace` of it, so the population is linked once."""
    from linkage.ingest.stage import ingest
    from linkage.link.stage import link
    from linkage.pseudonymise.stage import pseudonymise

    ws = tmp_path_factory.mktemp("linked4000") / "ws"
    cfg = load_config(generate={"persons": 4000, "seed": 5})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HHLINK_KEY", PORTAL_KEY_HEX)
        generate_population(cfg.generate, ws)
        ingest(cfg, ws)
        pseudonymise(cfg, ws)
        return ws, link(cfg, ws)


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (SQLite) for the session, started when a test first needs it: yields
    its API URL. In-process flows run against it; a subprocess gets it as ``PREFECT_API_URL``.
    Starting one took 15-24 s measured niced under load, so the modules that need one share it."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield PREFECT_API_URL.value()


@pytest.fixture
def run_cli():
    """Run ``hhlink`` in a subprocess: returns (exit code, stdout, stderr)."""

    def run(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
        proc = subprocess.run([sys.executable, "-m", "linkage.cli", *args], capture_output=True, text=True,
                              cwd=cwd, timeout=600)
        return proc.returncode, proc.stdout, proc.stderr

    return run


PORTAL_KEY_HEX = "5e" * 32
#: a line of an extract that ingest must quarantine (too few fields); the portal must never show it
QUARANTINE_MARKER = "ZZQUARANTINEMARKER"


@pytest.fixture(scope="session")
def assembled_2000(tmp_path_factory) -> Path:
    """A 2,000-person workspace (seed 5) through assemble, under ``HHLINK_KEY = 5e * 32``: READ-ONLY.

    Built once for the modules that need such a workspace (the portal's, ``test_disclose_command``):
    a module that writes into it takes a copy (``shutil.copytree``), far cheaper than rebuilding it.
    Two malformed lines are appended to the education extract so ``quarantine/`` has rows.
    """
    from linkage.assemble.stage import assemble
    from linkage.ingest.stage import ingest
    from linkage.link.stage import link
    from linkage.pseudonymise.stage import pseudonymise

    ws = tmp_path_factory.mktemp("assembled2000") / "ws"
    cfg = load_config(generate={"persons": 2000, "seed": 5}, link=FAST_LINK,
                      assemble={"data_docs": False, "bootstrap_replicates": 20})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HHLINK_KEY", PORTAL_KEY_HEX)
        generate_population(cfg.generate, ws)
        with open(ws / "landing" / "education.csv", "a", encoding="utf-8") as fh:
            fh.write(f"{QUARANTINE_MARKER},A,B\n{QUARANTINE_MARKER}2,C\n")
        ingest(cfg, ws)
        pseudonymise(cfg, ws)
        link(cfg, ws)
        assemble(cfg, ws)
    return ws


def config_file(folder: Path, **sections: dict) -> Path:
    """The packaged ``hhlink.toml`` with ``sections``' settings replaced, as ``folder/hhlink.toml``: an
    ``hhlink`` subprocess given ``--config`` runs with the settings ``load_config(**sections)`` gives
    in process (every other setting as packaged). Each key must appear once in the file."""
    import re

    text = (Path(__file__).resolve().parents[1] / "hhlink.toml").read_text()
    for values in sections.values():
        for name, value in values.items():
            text, n = re.subn(rf"(?m)^{re.escape(name)} = \S+", f"{name} = {value!r}", text)
            assert n == 1, f"{name} is not set exactly once in hhlink.toml"
    path = folder / "hhlink.toml"
    path.write_text(text)
    return path


def copy_workspace(src: Path, dest: Path) -> Path:
    """A private copy of a shared read-only workspace (symlinks kept, modes and times preserved)."""
    shutil.copytree(src, dest, symlinks=True)
    return dest


@pytest.fixture(scope="session")
def portal_workspace(assembled_2000, tmp_path_factory) -> Path:
    """A copy of ``assembled_2000`` taken through disclose to ``published/`` (for the portal's tests).

    Its education extract has two malformed lines, so ``quarantine/`` has rows.
    The key is ``HHLINK_KEY = 5e * 32``.
    """
    from linkage.disclose.stage import disclose

    ws = copy_workspace(assembled_2000, tmp_path_factory.mktemp("portal") / "ws")
    cfg = load_config(generate={"persons": 2000, "seed": 5}, link=FAST_LINK,
                      assemble={"data_docs": False, "bootstrap_replicates": 20})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HHLINK_KEY", PORTAL_KEY_HEX)
        disclose(cfg, ws)
    return ws
