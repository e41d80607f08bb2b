"""The stage registry: every pipeline stage declared once, and the one way to run a stage.

Each :class:`Stage` names its command, the function that does the work (one signature:
``fn(config, workspace, key=None) -> summary``), the workspace entries it reads and
writes, whether it needs the master key, and the config sections its output depends on.
The CLI (``hhlink <stage>``), the Prefect flows (one generic task and one flow factory,
:mod:`flows.stages`) and the benchmarks (:mod:`bench.stages`) all read :data:`STAGES`;
adding a stage is one entry here plus its package under ``linkage/``.

:func:`run_stage` is how every caller runs a stage: it holds the workspace lock, loads
the key for keyed stages, refuses inputs of another lineage or key
(:mod:`linkage.lineage`), calls the stage and records the lineage of what it wrote.

Example:
    >>> [s.name for s in STAGES.values()]
    ['generate', 'ingest', 'pseudonymise', 'link', 'assemble', 'evaluate', 'disclose']
    >>> STAGES["assemble"].keyed
    True
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from linkage.config import Config

__all__ = ["STAGES", "Stage", "producer", "run_stage"]


def _none(config: Config) -> list[Path]:
    return []


def _la_lookup(config: Config) -> list[Path]:
    return [config.paths.resolve(config.assemble.la_lookup)]


def _always(workspace: Path) -> bool:
    return True


def _has_truth(workspace: Path) -> bool:
    return (Path(workspace) / "truth").is_dir()


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    Attributes:
        name: the CLI command and Prefect flow name.
        entry: ``"module:function"`` of the stage function, ``fn(config, workspace, key=None) -> dict``.
        summary: one line for ``--help`` and the README's architecture table.
        reads: workspace-relative files, folders or globs the stage reads.
        writes: what the stage alone writes (checked on a cache hit, digested for lineage).
        config: config sections (dotted for one field) that change the stage's output.
        keyed: the stage needs the master key (its outputs depend on it).
        project_files: files outside the workspace that the output depends on.
        applies: whether the stage applies to a workspace (``evaluate`` needs ``truth/``).
    """

    name: str
    entry: str
    summary: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    config: tuple[str, ...]
    keyed: bool = False
    project_files: Callable[[Config], list[Path]] = field(default=_none)
    applies: Callable[[Path], bool] = field(default=_always)

    @property
    def module(self) -> str:
        """The stage's entry module (its imports are followed to fingerprint the code)."""
        return self.entry.split(":")[0]

    def function(self) -> Callable:
        """Import and return the stage function."""
        module, name = self.entry.split(":")
        return getattr(importlib.import_module(module), name)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("generate", "synthetic_data:generate", "synthetic population into landing/ and truth/",
          (), ("landing", "truth"), ("generate",)),
    # staged/ledger.json is a guard against re-sent files, not data: leaving it out keeps a
    # re-run over the same landing files cached
    Stage("ingest", "linkage.ingest:ingest", "typed rows into staged/, rejects into quarantine/, quality gates",
          ("landing",),
          ("staged", "quarantine", "reports/quality/quality_summary.json", "reports/quality/ingest_summary.json"),
          ("ingest", "paths")),
    Stage("pseudonymise", "linkage.pseudonymise:pseudonymise",
          "keyed identifiers, payload and encrypted crosswalk into pseudonymised/",
          ("staged/*.parquet",), ("pseudonymised",), ("pseudonymise", "paths"), keyed=True),
    # reports/linkage/ is left out of link's outputs: evaluate rewrites it with the true figures
    Stage("link", "linkage.link:link", "persons, households and parent-child relations into linked/",
          ("pseudonymised/identifiers",), ("linked",), ("link", "generate.end_year"), keyed=True),
    Stage("assemble", "linkage.assemble:assemble", "research tables and mobility measures into research/",
          ("linked", "pseudonymised/payload"),
          ("research", "reports/mobility.json", "reports/quality/research/quality_summary.json"),
          ("assemble", "link", "paths"), keyed=True, project_files=_la_lookup),
    Stage("evaluate", "linkage.evaluate:evaluate", "linkage and mobility against the synthetic truth",
          ("truth", "linked", "pseudonymised/crosswalk*.enc", "research/mobility.parquet", "reports/mobility.json"),
          ("reports/evaluation.json",), ("link", "assemble", "generate.end_year", "paths"), keyed=True,
          project_files=_la_lookup, applies=_has_truth),
    Stage("disclose", "linkage.disclose:disclose", "protected aggregate tables into published/",
          ("research",), ("published", "reports/disclosure/report.json"),
          ("disclosure", "assemble", "paths"), keyed=True, project_files=_la_lookup),
)}


def _base(entry: str) -> str:
    return entry.split("*")[0].rstrip("/")


def producer(entry: str) -> Stage | None:
    """The stage that writes a workspace entry (``linked``, ``pseudonymised/payload``, ...), or None."""
    base = _base(entry)
    for stage in STAGES.values():
        for out in stage.writes:
            if base == out or base.startswith(out + "/") or out.startswith(base + "/"):
                return stage
    return None


def run_stage(name: str, config: Config, workspace: Path | str, key=None, key_file: Path | str | None = None,
              rekey: bool = False, **options) -> dict:
    """Run one stage the way every caller should: locked, keyed, lineage-checked and recorded.

    Args:
        name: a stage name from :data:`STAGES`.
        config: the configuration.
        workspace: the workspace folder.
        key: the master key for keyed stages; loaded from ``key_file`` (or the environment
            and default file) when not given.
        key_file: the master key file, used when ``key`` is None.
        rekey: allow a keyed stage to replace outputs written under another key (``hhlink keys rotate``).
        options: the stage function's own keyword options (``retrain=True`` for ``link``).

    Returns:
        The stage function's summary.

    Raises:
        WorkspaceError: another command holds the workspace, or an input zone is stale.
        KeyMismatchError: the key is not the one the inputs were written under.
    """
    from linkage import lineage
    from linkage.keys import load_master_key
    from linkage.workspace import hold

    stage = STAGES[name]
    root = Path(workspace)
    if stage.keyed and key is None:
        key = load_master_key(key_file, workspace=root)   # no usable key: stop before writing anything
    with hold(root):
        fp = key.fingerprint if stage.keyed else None
        lineage.check(root, stage, fp, rekey=rekey)
        fn = stage.function()
        summary = fn(config, root, key=key, **options)
        lineage.record(root, stage, fp)
    return summary

