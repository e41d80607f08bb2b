"""The size ladder's stage runner: a registry stage at a size, and the figures it reports.

Every stage runs through :func:`linkage.stages.run_stage`, as the CLI and the flows do; only
the figures picked from each stage's summary are benchmark-specific.
"""

from __future__ import annotations

from pathlib import Path

from linkage.config import load_config


# A fixed, public benchmark key for synthetic data only: the runner sets it when no key is configured.
BENCH_KEY = "b5" * 32


def _standin_research(size: int, workspace: Path) -> None:
    """A stand-in research/ zone shaped like assemble's at ``size`` persons (used when assemble has not run).

    Shares measured on the assembled 3,000-person demo population: 45% of persons are
    cohort children, 79% of them with parental earnings, 68% with a KS4 score, 43% with pay
    at 25-30; LAs and regions from the ONS lookup; birth years 1982-2025.
    """
    import csv

    import numpy as np
    import pandas as pd

    from linkage import resources

    rng = np.random.default_rng(42)
    n = int(size * 0.45)
    with resources.packaged("synthetic_data/reference/upper_tier_local_authorities.csv").open() as fh:
        las = [(r["utla_code"], r["region_code"]) for r in csv.DictReader(fh)]
    la = rng.integers(0, len(las), n)
    birth = rng.integers(1982, 2026, n)
    has_par, has_ks4, has_pay = rng.random(n) < 0.79, rng.random(n) < 0.68, (rng.random(n) < 0.43) & (birth <= 2000)
    par = np.where(has_par, rng.lognormal(10.3, 0.6, n), np.nan)
    pay = np.where(has_pay, np.exp(6 + 0.4 * np.log(np.where(has_par, par, 3e4)) + rng.normal(0, 0.5, n)), np.nan)

    def pct(x):
        s = pd.Series(x)
        return (s.groupby(birth).rank(pct=True) * 100).to_numpy()

    fsm_years = np.where(rng.random(n) < 0.7, 0, rng.integers(1, 12, n))
    ids = [f"{i:032x}" for i in rng.permutation(n)]
    cohort = pd.DataFrame({
        "child_id": ids, "birth_year": birth, "sex": rng.choice(["M", "F"], n),
        "la_at_16": [las[i][0] for i in la], "region_at_16": [las[i][1] for i in la],
        "parents_earnings_percentile": pct(par), "household_income_percentile": pct(par * rng.uniform(0.4, 0.7, n)),
        "log_parents_earnings": np.log(par), "ever_fsm": fsm_years > 0, "persistent_fsm": fsm_years > 8,
        "fsm_years": fsm_years, "benefit_spells": rng.poisson(1.4, n), "longest_spell_months": rng.exponential(14, n),
        "ks2_score": np.where(has_ks4, rng.integers(80, 121, n), np.nan),
        "ks4_att8": np.where(has_ks4, np.clip(rng.normal(46, 15, n), 0, 90), np.nan),
        "adult_pay": pay, "log_adult_pay": np.log(pay), "adult_pay_percentile": pct(pay),
        "neet_years": rng.poisson(2.4, n), "neet_window_years": rng.integers(0, 10, n)})
    person = pd.DataFrame({"person_id": ids, "ethnicity": rng.choice(["WBRI", "WOTH", "APKN", "AIND", "BAFR"], n)})
    # research/ is encrypted at rest under the project's subkey, as assemble writes it
    import json

    import pyarrow as pa

    from linkage.keys import load_master_key
    from linkage.pseudonymise.store import write_research

    research = workspace / "research"
    research.mkdir(parents=True, exist_ok=True)
    key, project = load_master_key(), load_config().assemble.project
    for name, frame in (("cohort", cohort), ("person", person)):
        table = pa.Table.from_pandas(frame, preserve_index=False)
        write_research(research / f"{name}.parquet", table, table.schema, key, project)
    (research / "metadata.json").write_text(json.dumps({"stage": "bench stand-in", "project": project,
                                                        "rows": {"cohort": n, "person": n}}) + "\n")


def _figures(name: str, s: dict) -> dict:
    """The figures the ladder records from a stage's summary (``rows`` always)."""
    if name == "generate":
        return {"rows": sum(s["rows"].values())}
    if name == "ingest":
        return {"rows": s["rows"]["read"], "staged": s["rows"]["staged"], "quarantined": s["rows"]["quarantined"],
                "stage_seconds": s["seconds"]}
    if name == "pseudonymise":
        return {"rows": sum(s["rows"].values()), "stage_seconds": s["seconds"]}
    if name == "link":
        return {"rows": s["records"], "identities": s["identities"], "pairs": s["pairs_scored"],
                **{k: s[k] for k in ("training_seconds", "predict_seconds", "households_seconds")}}
    if name == "assemble":
        return {"rows": sum(s["rows"].values()), "persons": s["rows"]["person"], "stage_seconds": s["seconds"]}
    if name == "disclose":
        return {"rows": sum(t["cells"] for t in s["tables"]), "tables": len(s["tables"]), "stage_seconds": s["seconds"],
                "per_table": {t["table"]: t["seconds"] for t in s["tables"]}}
    return {"rows": 0}


def run(name: str, size: int, workspace: Path) -> dict:
    """Run registry stage ``name`` on the workspace of the ``size``-person rung; return its figures.

    Keyed stages use ``HHLINK_KEY`` (a fixed public benchmark key when none is set: synthetic
    data only); disclose runs on a stand-in research/ when assemble has not run.
    """
    import os

    from linkage.stages import run_stage

    if not (os.environ.get("HHLINK_KEY") or os.environ.get("HHLINK_KEY_FILE")):
        os.environ["HHLINK_KEY"] = BENCH_KEY
    if name == "disclose" and not (workspace / "research" / "cohort.parquet").exists():
        _standin_research(size, workspace)
    return _figures(name, run_stage(name, load_config(generate={"persons": size}), workspace))
