"""Fingerprints of what a stage reads and writes, so an unchanged stage is skipped on re-run.

A stage's **input fingerprint** is the SHA-256 of: the stage's name, the code version
(:func:`code_versions`), the config sections it reads, the master key's public fingerprint
when its output depends on the key, and the manifest (path, size, SHA-256) of every file it
reads from the workspace. Its **output digest** is the same kind of manifest over what it
publishes; it is stored with the cached result and checked on a cache hit, so a zone
deleted or edited since is rebuilt rather than trusted.

Hashing a 1M-person landing zone (2.8 GB) takes seconds, so file digests are kept in
``.flow/hashes.json`` keyed by (size, mtime, inode, ctime), as git's index does: a file
that has not been touched is not read again.

Example:
    >>> from linkage.config import load_config
    >>> digest, manifest = input_fingerprint("link", "workspace", load_config(), "0" * 64)  # doctest: +SKIP
"""

from __future__ import annotations

import dis
import hashlib
import json
import types
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path

from linkage.config import PROJECT_ROOT, Config
from linkage.workspace import atomic_path
from flows._spec import STAGES

__all__ = ["code_versions", "stage_modules", "input_fingerprint", "output_digest", "manifest"]

FLOW_DIR = ".flow"
_HASHES = "hashes.json"
_CHUNK = 1 << 20
# Libraries whose version can change a stage's output bytes.
_PACKAGES = ("linkage", "synthetic_data")
_LIBRARIES = ("splink", "duckdb", "great_expectations", "pyarrow", "numpy", "pandas", "scipy", "cryptography",
              "jellyfish")


class _DigestCache:
    """File SHA-256s remembered by stat signature in ``<workspace>/.flow/hashes.json``."""

    def __init__(self, workspace: Path):
        self.path = workspace / FLOW_DIR / _HASHES
        try:
            self.known = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def digest(self, path: Path, key: str) -> str:
        st = path.stat()
        signature = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
        hit = self.known.get(key)
        if hit and hit[:4] == signature:
            return hit[4]
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while block := fh.read(_CHUNK):
                h.update(block)
        self.known[key] = [*signature, h.hexdigest()]
        self.changed = True
        return h.hexdigest()

    def save(self) -> None:
        if self.changed:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(self.known, sort_keys=True))


def _files(root: Path, entry: str) -> list[Path] | None:
    """The files an entry names (a file, a folder walked recursively, or a glob); None if absent."""
    if any(c in entry for c in "*?["):
        found = sorted(p for p in root.glob(entry) if p.is_file())
        return found or None
    path = root / entry
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(path).parts))
    return None


def manifest(root: Path | str, entries: Iterable[str]) -> list[dict]:
    """Path, size and SHA-256 of every file under ``entries`` (workspace-relative); hidden files skipped.

    An absent entry is listed as ``{"path": entry, "missing": True}``, so its later
    appearance changes the fingerprint.
    """
    root = Path(root)
    cache = _DigestCache(root)
    out: list[dict] = []
    for entry in entries:
        files = _files(root, entry)
        if files is None:
            out.append({"path": entry, "missing": True})
            continue
        for f in files:
            rel = f.relative_to(root).as_posix()
            out.append({"path": rel, "bytes": f.stat().st_size, "sha256": cache.digest(f, rel)})
    cache.save()
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    base = PROJECT_ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _imports(path: Path, package: str) -> set[str]:
    """Project modules ``path`` imports anywhere (function-level imports included).

    Read from the compiled bytecode (``IMPORT_NAME`` with its level and from-list) rather
    than ``ast.parse``: on CPython 3.11 building AST objects while another thread compiles
    (Prefect's in-process server does) can fail with "AST constructor recursion depth
    mismatch", which failed whole flow runs; compiling to bytecode builds no AST objects.
    """
    found: set[str] = set()
    for code in _code_objects(compile(path.read_text(), str(path), "exec", dont_inherit=True)):
        ins = list(dis.get_instructions(code))
        for i, op in enumerate(ins):
            if op.opname != "IMPORT_NAME":
                continue
            level, fromlist = (ins[i - 2].argval, ins[i - 1].argval) if i >= 2 else (0, None)
            if level:   # relative: resolve against the importing module's package
                base = package.split(".")[: len(package.split(".")) - level + 1]
                mod = ".".join(base + ([op.argval] if op.argval else []))
            else:
                mod = op.argval
            found.add(mod)
            found.update(f"{mod}.{name}" for name in (fromlist or ()) if name != "*")   # "from linkage import panel"
    return {m for m in found if m and m.split(".")[0] in _PACKAGES}


def stage_modules(stage: str) -> list[Path]:
    """The project source files a stage can execute: its entry module's imports, transitively.

    Read from the compiled source, so imports inside functions count; every package
    ``__init__`` on the way counts too. Over-approximates, which is the safe direction.
    """
    todo = list(STAGES[stage].modules)
    seen: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]   # the packages' __init__
        package = name if path.name == "__init__.py" else ".".join(parts[:-1])
        todo += sorted(_imports(path, package))
    return sorted(set(seen.values()))


def _files_digest(paths: Iterable[Path]) -> list[tuple[str, str]]:
    return [(p.relative_to(PROJECT_ROOT).as_posix() if p.is_relative_to(PROJECT_ROOT) else str(p),
             hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths]


def _tree(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts) if folder.is_dir() else []


def code_versions(config: Config) -> dict[str, str]:
    """Per stage, the SHA-256 of the code and contracts that shape its outputs.

    Covers the stage's source files (:func:`stage_modules`), the generator's reference data
    (generate), the schemas and expectation suites the config points to (other stages),
    hhlink's version and the versions of the libraries in ``_LIBRARIES``. Editing a module
    re-runs the stages that import it, and those after them (their inputs change).
    """
    versions = {}
    for lib in ("hhlink", *_LIBRARIES):
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    contracts = _files_digest([*_tree(config.paths.resolve(config.paths.schemas)),
                               *_tree(config.paths.resolve(config.paths.expectations))])
    reference = _files_digest(_tree(PROJECT_ROOT / "synthetic_data" / "reference"))
    return {stage: _digest({"modules": _files_digest(stage_modules(stage)), "versions": versions,
                            "data": reference if stage == "generate" else contracts})
            for stage in STAGES}


def _section(config: Config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def input_fingerprint(stage: str, workspace: Path | str, config: Config, code: str,
                      key_fingerprint: str | None = None) -> tuple[str, list[dict]]:
    """The stage's input fingerprint and the manifest of the workspace files it read.

    Args:
        stage: a stage name from :data:`flows._spec.STAGES`.
        workspace: the workspace folder.
        config: the configuration; only the stage's sections enter the fingerprint.
        code: the stage's code version (:func:`code_versions`).
        key_fingerprint: the master key's public fingerprint (never the key); required
            for stages whose output depends on the key.

    Returns:
        ``(sha256 hex, manifest)``.
    """
    spec = STAGES[stage]
    root = Path(workspace)
    files = manifest(root, spec.inputs)
    project_files = [{"path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None}
                     for p in spec.project_files(config)]
    if spec.keyed and not key_fingerprint:
        raise ValueError(f"{stage}: the key fingerprint is part of this stage's fingerprint")
    parts = {"stage": stage, "code": code, "config": {s: _section(config, s) for s in spec.config},
             "key": key_fingerprint if spec.keyed else None, "inputs": files, "project_files": project_files}
    return _digest(parts), files


def output_digest(stage: str, workspace: Path | str) -> str:
    """SHA-256 of the manifest of what ``stage`` published in ``workspace``."""
    return _digest(manifest(Path(workspace), STAGES[stage].outputs))


def flow_dir(workspace: Path | str) -> Path:
    """The workspace's orchestration folder (cached results, file digests, the run lock)."""
    return Path(workspace) / FLOW_DIR

