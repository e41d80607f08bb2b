"""Stage runners for the size ladder: each takes (persons, workspace) and returns a summary."""

from __future__ import annotations

from pathlib import Path

from linkage.config import load_config


def generate(size: int, workspace: Path) -> dict:
    """Generate the population of ``size`` persons (CSV extracts, seed 42)."""
    from synthetic_data import generate_population

    summary = generate_population(load_config(generate={"persons": size}).generate, workspace)
    return {"rows": sum(summary["rows"].values())}
