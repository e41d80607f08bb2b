"""Stage runners for the size ladder: each takes (persons, workspace) and returns a summary."""

from __future__ import annotations

from pathlib import Path

from linkage.config import load_config


def generate(size: int, workspace: Path) -> dict:
    """Generate the population of ``size`` persons (CSV extracts, seed 42)."""
    from synthetic_data import generate_population

    summary = generate_population(load_config(generate={"persons": size}).generate, workspace)
    return {"rows": sum(summary["rows"].values())}


def ingest(size: int, workspace: Path) -> dict:
    """Ingest and validate the landing zone ``generate`` wrote (staged/, quarantine/, GX gates, reports)."""
    from linkage.ingest import ingest as run

    summary = run(load_config(), workspace)
    return {"rows": summary["rows"]["read"], "staged": summary["rows"]["staged"],
            "quarantined": summary["rows"]["quarantined"], "stage_seconds": summary["seconds"]}


# A fixed, public benchmark key for synthetic data only: the runner sets it when no key is configured.
BENCH_KEY = "b5" * 32


def pseudonymise(size: int, workspace: Path) -> dict:
    """Pseudonymise the staged zone ``ingest`` wrote (identifiers, payload, encrypted crosswalk)."""
    import os

    from linkage.pseudonymise import pseudonymise as run

    if not (os.environ.get("HHLINK_KEY") or os.environ.get("HHLINK_KEY_FILE")):
        os.environ["HHLINK_KEY"] = BENCH_KEY
    summary = run(load_config(), workspace)
    return {"rows": sum(summary["rows"].values()), "stage_seconds": summary["seconds"]}
