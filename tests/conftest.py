"""Shared fixtures: generated populations are built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from linkage.config import load_config
from synthetic_data import generate_population

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


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


@pytest.fixture
def run_cli():
    """Run ``hhlink`` in a subprocess: returns (exit code, stdout, stderr)."""

    def run(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
        proc = subprocess.run([sys.executable, "-m", "linkage.cli", *args], capture_output=True, text=True,
                              cwd=cwd, timeout=600)
        return proc.returncode, proc.stdout, proc.stderr

    return run
