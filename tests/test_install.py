"""Installing hhlink: the wheel carries its defaults and runs the pipeline outside the checkout;
the config lookup order; relative paths in a config.

The wheel is built from a copy of the source tree (a build inside the checkout would leave a
``build/`` folder whose stale files could end up in a later wheel) and installed with
``constraints.txt`` into a fresh virtual environment in a temporary folder, as a data engineer
would install it: no test or Spark extras. Those steps and the pipeline run with the installed
``hhlink`` take minutes, so they run in a background thread from the start of the session
(:class:`InstallRun`) while the other tests run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import venv
import zipfile
from pathlib import Path

import pytest

from linkage import resources
from linkage.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, Config, find_config, load_config
from linkage.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "hhlink.toml", "linkage", "flows", "synthetic_data", "schemas",
           "expectations", "gx")
# every shipped default, as (folder in the repository, folder in the wheel)
SHIPPED = (("schemas", "linkage/_defaults/schemas"), ("expectations", "linkage/_defaults/expectations"),
           ("gx", "linkage/_defaults/gx"), ("synthetic_data/reference", "synthetic_data/reference"))


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that points Python or hhlink at the checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", CONFIG_ENV, "PREFECT_API_URL")}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", **extra)
    return env


def _run(args: list[str | Path], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[:3]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


class InstallRun:
    """The slow half of this module, run in a background thread: build the wheel, install it into a fresh
    virtual environment, then run the main job with it outside the checkout.

    ``tests/conftest.py`` starts it as soon as the session's tests are collected, so these
    subprocesses use the core that the rest of the suite (one pytest process) leaves idle. Each
    step records its result; the tests wait for the step they check and assert on what it
    recorded, exactly as if they had run it themselves. A failed step fails its tests and the
    tests of every later step, with the same message.
    """

    STEPS = ("wheel", "installed", "pipeline")

    def __init__(self, steps: tuple[str, ...] = STEPS) -> None:
        self.steps = steps
        self.base = Path(tempfile.mkdtemp(prefix="hhlink-install-"))
        self._results: dict[str, object] = {}
        self._done = {step: threading.Event() for step in self.STEPS}
        for step in self.STEPS[len(steps):]:
            self._results[step] = RuntimeError(f"step {step!r} was not started: no test of this session needs it")
            self._done[step].set()
        self._proc: subprocess.Popen | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="hhlink-install", daemon=True)

    def start(self) -> "InstallRun":
        self._thread.start()
        return self

    def wait(self, step: str):
        """The result of ``step`` once it has run; re-raises its failure (or an earlier step's)."""
        self._done[step].wait()
        result = self._results[step]
        if isinstance(result, BaseException):
            raise result
        return result

    def stop(self) -> None:
        """Kill a step still running (the session ended early) and remove the temporary folder."""
        self._stop = True
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        shutil.rmtree(self.base, ignore_errors=True)

    def run(self, args: list[str | Path], cwd: Path, env: dict[str, str], timeout: int = 900):
        """:func:`_run` in its own process group, so :meth:`stop` can kill it with its children."""
        if self._stop:
            raise RuntimeError("the session ended before this step ran")
        self._proc = subprocess.Popen([str(a) for a in args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = self._proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self._proc.pid, signal.SIGKILL)
            raise
        proc = subprocess.CompletedProcess(args, self._proc.returncode, out, err)
        assert proc.returncode == 0, f"{args[:3]} exited {proc.returncode}:\n{out[-3000:]}\n{err[-3000:]}"
        return proc

    def _work(self) -> None:
        failed: BaseException | None = None
        for step in self.steps:
            try:
                if failed is not None:
                    raise RuntimeError(f"not run: an earlier step failed: {failed!r}")
                self._results[step] = getattr(self, f"_{step}")()
            except BaseException as exc:  # noqa: BLE001 - handed to the tests that wait for this step
                self._results[step] = exc
                failed = failed or exc
            self._done[step].set()

    def _wheel(self) -> Path:
        """A wheel built with ``pip wheel`` from a copy of the source tree."""
        src = self.base / "src"
        src.mkdir()
        for name in SOURCES:
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, src / name, symlinks=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
            else:
                shutil.copy2(ROOT / name, src / name)
        dist = self.base / "dist"
        dist.mkdir()
        self.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, src], cwd=dist,
                 env=_clean_env())
        (found,) = dist.glob("hhlink-*.whl")
        return found

    def _installed(self) -> Path:
        """A fresh virtual environment outside the checkout with the wheel and the pinned dependencies.

        ``--no-compile``: byte-compiling every module of every dependency took half of pip's time;
        Python compiles the modules the run imports.
        """
        env_dir = self.base / "venv"
        venv.create(env_dir, with_pip=True)
        self.run([env_dir / "bin" / "python", "-m", "pip", "install", "-q", "--no-compile", "-c",
                  ROOT / "constraints.txt", self._results["wheel"]], cwd=env_dir, env=_clean_env())
        return env_dir

    def _pipeline(self) -> dict:
        """The installed ``hhlink`` outside the checkout: what it imports, ``pip check``, ``hhlink config``,
        ``hhlink keys init`` and ``hhlink run`` (the main job) on a 1,000-person population."""
        installed = self._results["installed"]
        here = self.base / "elsewhere"
        here.mkdir()
        bin_dir = installed / "bin"
        env = _clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PREFECT_HOME=str(self.base / "prefect"))
        done = {"here": here, "ws": self.base / "ws"}
        done["where"] = self.run([bin_dir / "python", "-c", "import linkage, importlib.util as u; "
                                  "print(linkage.__file__); print(u.find_spec('pyspark'), u.find_spec('pytest'))"],
                                 cwd=here, env=env).stdout.splitlines()
        self.run([bin_dir / "python", "-m", "pip", "check"], cwd=here, env=env)
        done["config"] = self.run([bin_dir / "hhlink", "config"], cwd=here, env=env).stdout.splitlines()
        key = self.base / "keys" / "master.key"
        self.run([bin_dir / "hhlink", "keys", "init", "--key-file", key], cwd=here, env=env)
        self.run([bin_dir / "hhlink", "run", "--persons", "1000", "--workspace", done["ws"], "--key-file", key],
                 cwd=here, env=env, timeout=1200)
        return done


#: started by tests/conftest.py once the session's tests are collected (else by the first fixture that needs it)
BACKGROUND: list[InstallRun] = []


def background(session: pytest.Session) -> InstallRun:
    """The session's :class:`InstallRun`, started now if it is not running: every step when the session
    runs the installed-wheel test, else the wheel alone."""
    if not BACKGROUND:
        full = any(item.name == "test_installed_wheel_runs_the_pipeline_outside_the_checkout"
                   and getattr(item, "module", None) is sys.modules[__name__] for item in session.items)
        BACKGROUND.append(InstallRun(InstallRun.STEPS if full else ("wheel",)).start())
    return BACKGROUND[0]


@pytest.fixture(scope="module")
def wheel(request) -> Path:
    """A wheel built with ``pip wheel`` from a copy of the source tree."""
    return background(request.session).wait("wheel")


def test_wheel_carries_every_packaged_default(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "linkage/_defaults/hhlink.toml" in names
    for repo_dir, wheel_dir in SHIPPED:
        files = [p.relative_to(ROOT / repo_dir).as_posix() for p in (ROOT / repo_dir).rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts]
        assert files, repo_dir
        missing = [f for f in files if f"{wheel_dir}/{f}" not in names]
        assert not missing, f"{repo_dir}: not in the wheel: {missing[:5]}"
    assert any(n.startswith("linkage/_defaults/gx/vendor/") and n.endswith(".woff2") for n in names)
    assert {"linkage/serve/templates/base.html", "linkage/serve/static/portal.css"} <= names
    # the packaged config is the repository's, byte for byte
    assert zipfile.ZipFile(wheel).read("linkage/_defaults/hhlink.toml") == (ROOT / "hhlink.toml").read_bytes()


def test_wheel_imported_as_a_zip_reads_its_defaults(wheel, tmp_path):
    script = textwrap.dedent(f"""
        import linkage, synthetic_data.reference as ref
        from linkage import quality, resources
        from linkage.config import load_config
        from linkage.schemas import load_schemas
        assert linkage.__file__.startswith({str(wheel)!r}), linkage.__file__
        cfg = load_config()
        assert cfg.source[1] == "packaged default", cfg.source
        schemas = cfg.paths.resolve(cfg.paths.schemas)
        assert (schemas / "education.toml").is_file() and (schemas / "research" / "person.toml").is_file()
        assert sorted(load_schemas(schemas)) == ["benefits", "earnings", "education"]
        assert cfg.paths.resolve(cfg.assemble.la_lookup).stat().st_size > 1000
        assert (quality.GX_PROJECT / "great_expectations.yml").is_file()
        assert (quality.VENDOR / "jquery" / "jquery.min.js").is_file()
        assert ref.load_names() is not None
        print("ok", schemas)
    """)
    out = _run([sys.executable, "-c", script], cwd=tmp_path, env=_clean_env(PYTHONPATH=str(wheel)), timeout=300)
    assert out.stdout.startswith("ok ")
    assert str(ROOT) not in out.stdout   # extracted from the zip, not read from the checkout


@pytest.fixture(scope="module")
def installed(request) -> Path:
    """A fresh virtual environment outside the checkout with the wheel and the pinned dependencies."""
    return background(request.session).wait("installed")


@pytest.mark.slow
def test_installed_wheel_runs_the_pipeline_outside_the_checkout(installed, request):
    done = background(request.session).wait("pipeline")
    here, ws, where = done["here"], done["ws"], done["where"]
    assert where[0].startswith(str(installed)), where
    assert where[1] == "None None"   # the demo install has no Spark or test extras

    packaged = installed / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" \
        / "linkage" / "_defaults" / "hhlink.toml"
    assert done["config"][0] == f"# config: {packaged} (packaged default)"

    published = [p for p in (ws / "published").rglob("*") if p.is_file()]
    assert any(p.suffix == ".csv" for p in published), published
    assert (ws / "research").is_dir() and (ws / "linked" / "model.json").is_file()
    # Data Docs were rendered with the shipped GX project and vendored assets
    vendored = list((ws / "reports").rglob("static/vendor/jquery/jquery.min.js"))
    assert vendored, "no vendored Data Docs assets under reports/"
    assert not (here / "workspace").exists() and not list(here.iterdir())   # nothing written where it ran


# -- the config lookup order: --config, $HHLINK_CONFIG, ./hhlink.toml, the packaged default ----------------

def _config(folder: Path, persons: int, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "hhlink.toml"
    path.write_text(f"[generate]\npersons = {persons}\n{extra}")
    return path


def test_lookup_falls_back_to_the_packaged_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert find_config() == (DEFAULT_CONFIG_PATH, "packaged default")
    assert DEFAULT_CONFIG_PATH == resources.packaged("hhlink.toml")
    cfg = load_config()
    assert cfg.source == (DEFAULT_CONFIG_PATH.absolute(), "packaged default")
    assert cfg.generate.persons == 20000


def test_lookup_order_cwd_then_env_then_argument(tmp_path, monkeypatch):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    local = _config(tmp_path, 1111)
    assert load_config().generate.persons == 1111
    assert load_config().source == (local, "./hhlink.toml")

    from_env = _config(tmp_path / "env", 2222)
    monkeypatch.setenv(CONFIG_ENV, str(from_env))
    assert load_config().generate.persons == 2222
    assert load_config().source[1] == CONFIG_ENV

    given = _config(tmp_path / "given", 3333)
    assert load_config(given).generate.persons == 3333
    assert load_config(given).source == (given, "--config")

    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "typo.toml"))
    with pytest.raises(ConfigError, match=f"typo.toml: config file not found \\(named by {CONFIG_ENV}\\)"):
        load_config()


def test_hhlink_config_names_the_file_it_read(run_cli, tmp_path, monkeypatch):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    local = _config(tmp_path, 1111)
    code, out, err = run_cli("config", cwd=tmp_path)
    assert code == 0, err
    assert out.splitlines()[0] == f"# config: {local} (./hhlink.toml)"
    assert '"persons": 1111' in out

    from_env = _config(tmp_path / "env", 2222)
    monkeypatch.setenv(CONFIG_ENV, str(from_env))
    code, out, err = run_cli("config", cwd=tmp_path)
    assert out.splitlines()[0] == f"# config: {from_env} ({CONFIG_ENV})"

    given = _config(tmp_path / "given", 3333)
    code, out, err = run_cli("config", "--config", str(given), cwd=tmp_path)
    assert out.splitlines()[0] == f"# config: {given} (--config)"
    assert '"persons": 3333' in out


def test_relative_paths_read_the_config_folder_then_the_packaged_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # not the config's folder: the current folder plays no part
    folder = tmp_path / "project"
    path = _config(folder, 500, '[assemble]\nla_lookup = "lookups/la.csv"\n')
    (folder / "lookups").mkdir()
    (folder / "lookups" / "la.csv").write_text("utla_code,region_code\n")
    cfg = load_config(path)
    assert cfg.paths.resolve(cfg.assemble.la_lookup) == folder / "lookups" / "la.csv"
    # not in the config's folder: the packaged defaults of the same name
    assert cfg.paths.resolve(cfg.paths.schemas) == resources.packaged("schemas")
    assert cfg.paths.resolve(cfg.paths.expectations) == resources.packaged("expectations")
    assert cfg.paths.resolve(Path("synthetic_data/reference/upper_tier_local_authorities.csv")) == \
        resources.packaged("synthetic_data/reference/upper_tier_local_authorities.csv")
    # neither there nor shipped: the config's folder, so an error names where it was looked for
    assert cfg.paths.resolve(Path("lookups/other.csv")) == folder / "lookups" / "other.csv"

    shutil.copytree(resources.packaged("schemas"), folder / "schemas")
    assert cfg.paths.resolve(cfg.paths.schemas) == folder / "schemas"
    assert cfg.paths.resolve(cfg.paths.expectations) == resources.packaged("expectations")
    assert cfg.paths.resolve(tmp_path / "abs.csv") == tmp_path / "abs.csv"

    # a config built in code (no file) reads the packaged defaults
    assert Config().paths.resolve(Path("schemas")) == resources.packaged("schemas")


def test_no_module_finds_files_through_the_checkout():
    offenders = [str(p.relative_to(ROOT)) for d in ("linkage", "flows", "synthetic_data", "bench", "tests")
                 for p in (ROOT / d).rglob("*.py") if "PROJECT_ROOT" in p.read_text() and p.name != "test_install.py"]
    assert not offenders, offenders


# -- reproducible install: declared dependencies and the Makefile's use of constraints.txt ----------------

def _requirement_name(spec: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(spec).name.lower().replace("_", "-")


def test_every_imported_package_is_declared():
    import ast
    import tomllib
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    extras = {name: {_requirement_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    dists = packages_distributions()
    undeclared = {}
    for package, allowed in (("linkage", core | extras["spark"]), ("flows", core), ("synthetic_data", core),
                             ("tests", core | extras["spark"] | extras["test"])):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
                for top in {n.split(".")[0] for n in names}:
                    if top in sys.stdlib_module_names or top in ("linkage", "flows", "synthetic_data", "tests", "bench"):
                        continue
                    found = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
                    if not found & allowed:
                        undeclared.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_constraints_pin_every_declared_dependency():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = {line.split("==")[0].lower().replace("_", "-") for line in (ROOT / "constraints.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    declared = {_requirement_name(r) for r in project["dependencies"]}
    declared |= {_requirement_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    assert not declared - pinned, f"declared but not pinned in constraints.txt: {sorted(declared - pinned)}"


def _make_dry_run(target: str, venv_dir: Path) -> str:
    return _run(["make", "-n", target, f"VENV={venv_dir}"], cwd=ROOT, env=_clean_env()).stdout


def test_make_installs_the_pinned_versions_and_demo_leaves_out_the_extras(tmp_path):
    checksum = _run(["sh", "-c", "cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1"], cwd=ROOT,
                    env=_clean_env()).stdout.strip()
    demo = _make_dry_run("demo", tmp_path / "v")
    assert "pip install -q -c constraints.txt -e .\n" in demo
    assert "[test" not in demo and "spark" not in demo
    assert f".installed-run-{checksum}" in demo   # the stamp names the checksum of pyproject.toml + constraints.txt
    test = _make_dry_run("test", tmp_path / "v")
    assert 'pip install -q -c constraints.txt -e ".[test,spark]"' in test and "pytest" in test
    assert f".installed-test-{checksum}" in test
