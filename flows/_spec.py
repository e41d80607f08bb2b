"""What each stage reads, publishes and depends on: the facts its fingerprint is built from.

``modules`` are the stage's entry modules (their imports are followed to find the code
it runs). ``inputs`` and ``outputs`` are workspace-relative files, folders or globs. A stage's
outputs are checked on a cache hit, so they list only what that stage alone writes
(``reports/linkage/`` is left out of ``link``: ``evaluate`` rewrites it with the true
figures). ``config`` names the config sections (dotted for one field) that change the
stage's output; ``keyed`` stages' outputs depend on the master key, so its public
fingerprint enters theirs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from linkage.config import Config


def _none(config: Config) -> list[Path]:
    return []


def _la_lookup(config: Config) -> list[Path]:
    return [config.paths.resolve(config.assemble.la_lookup)]


@dataclass(frozen=True)
class StageSpec:
    """One stage's inputs, outputs and the settings its output depends on."""

    name: str
    modules: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    config: tuple[str, ...]
    keyed: bool = False
    project_files: Callable[[Config], list[Path]] = field(default=_none)


STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("generate", ("synthetic_data",), (), ("landing", "truth"), ("generate",)),
    # staged/ledger.json is a guard against re-sent files, not data: leaving it out keeps a
    # re-run over the same landing files cached
    StageSpec("ingest", ("linkage.ingest.stage",), ("landing",),
              ("staged", "quarantine", "reports/quality/quality_summary.json", "reports/quality/ingest_summary.json"),
              ("ingest", "paths")),
    StageSpec("pseudonymise", ("linkage.pseudonymise.stage",), ("staged/*.parquet",), ("pseudonymised",), ("pseudonymise", "paths"), keyed=True),
    StageSpec("link", ("linkage.link.stage", "linkage.link.report"), ("pseudonymised/identifiers",), ("linked",), ("link", "generate.end_year")),
    StageSpec("assemble", ("linkage.assemble.stage",), ("linked", "pseudonymised/payload"),
              ("research", "reports/mobility.json", "reports/quality/research/quality_summary.json"),
              ("assemble", "link", "paths"), keyed=True, project_files=_la_lookup),
    StageSpec("evaluate", ("linkage.evaluate.stage", "linkage.link.report"), ("truth", "linked", "pseudonymised/crosswalk.enc", "research/mobility.parquet",
                           "reports/mobility.json"),
              ("reports/evaluation.json",), ("link", "assemble", "generate.end_year", "paths"), keyed=True,
              project_files=_la_lookup),
    StageSpec("disclose", ("linkage.disclose.stage",), ("research",), ("published", "reports/disclosure/report.json"),
              ("disclosure", "assemble", "paths"), keyed=True, project_files=_la_lookup),
)}

ORDER = ("generate", "ingest", "pseudonymise", "link", "assemble", "evaluate", "disclose")
