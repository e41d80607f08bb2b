"""The whole pipeline in a workspace whose path holds a space, an apostrophe, a non-ASCII letter and
glob characters: every path reaches DuckDB quoted, and nothing is written outside the workspace."""

from __future__ import annotations

import fnmatch
import json
import os

import pytest

from linkage.config import load_config
from linkage.workspace import SCRATCH_PATTERNS
from synthetic_data import generate_population
from tests.conftest import FAST_LINK

NAME = "o'brien ł ws [1]"


@pytest.mark.slow
def test_pipeline_runs_in_a_workspace_with_quotes_spaces_unicode_and_glob_characters(tmp_path, monkeypatch):
    from linkage.assemble.stage import assemble
    from linkage.disclose.stage import disclose
    from linkage.evaluate.stage import evaluate
    from linkage.ingest.stage import ingest
    from linkage.link.stage import link
    from linkage.pseudonymise.stage import pseudonymise

    ws = tmp_path / NAME
    # a sibling a glob of the workspace path would also match ("[1]" matches "1"): it must never be read
    decoy = tmp_path / "o'brien ł ws 1"
    (decoy / "linked").mkdir(parents=True)
    (decoy / "linked" / "records.0000.parquet").write_text("not parquet")
    (decoy / "linked" / "identities.parquet").write_text("not parquet")
    monkeypatch.chdir(tmp_path)                 # DuckDB's default spill folder would land here
    monkeypatch.setenv("HHLINK_KEY", "5e" * 32)
    cfg = load_config(generate={"persons": 400, "seed": 11}, link=FAST_LINK,
                      assemble={"data_docs": False, "bootstrap_replicates": 20})
    generate_population(cfg.generate, ws)
    staged = ingest(cfg, ws)
    pseudonymise(cfg, ws)
    linked = link(cfg, ws)
    assemble(cfg, ws)
    evaluation = evaluate(cfg, ws)
    disclose(cfg, ws)

    assert staged["rows"]["staged"] > 0 and staged["passed"]
    assert linked["persons"] > 300
    assert evaluation["person_pairwise_f1"] > 0.9
    from linkage.keys import load_master_key
    from linkage.pseudonymise.store import read_research   # research/ is encrypted at rest

    assert read_research(ws, load_master_key(), "cohort").num_rows > 0
    index = json.loads((ws / "published" / "index.json").read_text())
    assert index["tables"] and all((ws / "published" / f"{t}.csv").exists() for t in index["tables"])
    assert (ws / "reports" / "linkage" / "report.html").exists()
    assert (ws / "reports" / "quality" / "research" / "quality_summary.json").exists()
    # no spill, temporary or half-swapped folder left behind, and nothing written outside the workspace
    assert not [p.name for p in ws.iterdir() if any(fnmatch.fnmatch(p.name, pat) for pat in SCRATCH_PATTERNS)]
    assert sorted(os.listdir(tmp_path)) == sorted([NAME, decoy.name])
