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
import importlib.util
import types
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path

from linkage import resources
from linkage.config import Config
from linkage.lineage import digest, manifest
from linkage.stages import STAGES
from linkage.workspace import FLOW_DIR

__all__ = ["code_versions", "stage_modules", "input_fingerprint", "output_digest", "manifest"]

# Libraries whose version can change a stage's output bytes.
_PACKAGES = ("linkage", "synthetic_data")
_LIBRARIES = ("splink", "duckdb", "great_expectations", "pyarrow", "numpy", "pandas", "scipy", "cryptography",
              "jellyfish")


def _module_file(name: str) -> Path | None:
    """The source file of a project module, wherever the package is installed (checkout or wheel)."""
    top = importlib.util.find_spec(name.split(".")[0])
    if top is None or not top.submodule_search_locations:
        return None
    base = Path(next(iter(top.submodule_search_locations))).joinpath(*name.split(".")[1:])
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


def stage_modules(stage: str) -> list[tuple[str, Path]]:
    """The project source files a stage can execute: its entry module's imports, transitively.

    Read from the compiled source, so imports inside functions count; every package
    ``__init__`` on the way counts too. Over-approximates, which is the safe direction.
    """
    todo = [STAGES[stage].module]
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
    return sorted(seen.items())


def _files_digest(paths: Iterable[Path], base: Path) -> list[tuple[str, str]]:
    """(label, SHA-256) per file; labels relative to ``base`` so a moved checkout keeps its cache."""
    return [(p.relative_to(base).as_posix() if p.is_relative_to(base) else str(p),
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
    schemas, expectations = config.paths.resolve(config.paths.schemas), config.paths.resolve(config.paths.expectations)
    contracts = _files_digest(_tree(schemas), schemas.parent) + _files_digest(_tree(expectations), expectations.parent)
    reference = resources.packaged("synthetic_data/reference")
    reference_digest = _files_digest(_tree(reference), reference)

    def modules(stage: str) -> list[tuple[str, str]]:
        return [(name, hashlib.sha256(path.read_bytes()).hexdigest()) for name, path in stage_modules(stage)]

    return {stage: digest({"modules": modules(stage), "versions": versions,
                           "data": reference_digest if stage == "generate" else contracts})
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
        stage: a stage name from :data:`linkage.stages.STAGES`.
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
    files = manifest(root, spec.reads)
    project_files = [{"path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None}
                     for p in spec.project_files(config)]
    if spec.keyed and not key_fingerprint:
        raise ValueError(f"{stage}: the key fingerprint is part of this stage's fingerprint")
    parts = {"stage": stage, "code": code, "config": {s: _section(config, s) for s in spec.config},
             "key": key_fingerprint if spec.keyed else None, "inputs": files, "project_files": project_files}
    return digest(parts), files


def output_digest(stage: str, workspace: Path | str) -> str:
    """SHA-256 of the manifest of what ``stage`` published in ``workspace``."""
    return digest(manifest(Path(workspace), STAGES[stage].writes))


def flow_dir(workspace: Path | str) -> Path:
    """The workspace's orchestration folder (cached results, file digests, the run lock)."""
    return Path(workspace) / FLOW_DIR

