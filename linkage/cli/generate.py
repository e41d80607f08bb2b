"""``hhlink generate``: write a synthetic population to landing/ and truth/."""

from __future__ import annotations

from pathlib import Path

import click

from linkage.cli.base import cli, common_options, run_stage_command
from linkage.config import load_config


@cli.command()
@common_options
@click.option("--persons", type=click.IntRange(min=1), default=None, help="People in the population (default from config).")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Random seed (default from config).")
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet"]), default=None,
              help="Landing extract format (default from config: csv).")
@click.option("--deliveries", type=click.IntRange(min=0), default=None,
              help="Hold the last N monthly deliveries back in DIR/deliveries/ ('hhlink deliver' lands the next).")
def generate(workspace: Path, config_path: Path | None, persons: int | None, seed: int | None,
             fmt: str | None, deliveries: int | None) -> None:
    """Generate a synthetic population: extracts in DIR/landing/, ground truth in DIR/truth/.

    Writes education.csv (one row per pupil per academic year), benefits.csv (one row per
    benefit-unit member per claim) and earnings.csv (one row per employment per tax year),
    with identifier errors at the configured rates, and the truth that only evaluation reads.

    \b
    Example:
      hhlink generate --persons 20000 --seed 42 --workspace ./workspace
    """
    cfg = load_config(config_path, generate={"persons": persons, "seed": seed, "format": fmt,
                                             "deliveries": deliveries})
    summary = run_stage_command("generate", cfg, workspace)
    click.echo(f"generated {summary['persons']:,} persons in {summary['households']:,} households "
               f"({summary['seconds']['total']:.1f}s)")
    for source, n in summary.get("history_rows", summary["rows"]).items():
        click.echo(f"  landing/{summary['files'][source]:<18} {n:>12,} rows")
    if summary.get("deliveries"):
        held = {s: n - summary["history_rows"][s] for s, n in summary["rows"].items()}
        click.echo(f"  deliveries/ {len(summary['deliveries'])} monthly deliveries held back "
                   f"({summary['deliveries'][0]} to {summary['deliveries'][-1]}; "
                   + ", ".join(f"{s} {n:,} rows" for s, n in held.items()) + "): 'hhlink deliver' lands the next")
    click.echo(f"  truth/ ground truth (evaluation only) in {workspace / 'truth'}")
