"""``hhlink link``: link the pseudonymised identifiers into persons and households."""

from __future__ import annotations

from pathlib import Path

import click

from linkage.cli.base import cli, common_options, key_option, run_stage_command
from linkage.config import load_config


@cli.command()
@common_options
@click.option("--engine", type=click.Choice(["duckdb", "spark"]), default=None,
              help="Linkage engine (default from config: duckdb).")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Match probability for 'same person', between 0 and 1 (default from config).")
@key_option
def link(workspace: Path, config_path: Path | None, engine: str | None, threshold: float | None,
         key_file: Path | None) -> None:
    """Link DIR/pseudonymised/identifiers/ into persons and households in DIR/linked/.

    Trains one Splink model over the three sources on keyed encodings only (u by random
    sampling, m by EM), scores pairs, clusters them into persons at the threshold, and
    derives household membership per year and parent-child relations. The model is
    saved as Splink JSON in DIR/linked/model.json. The identifiers are encrypted at rest:
    the key decrypts them into this process's memory only.

    \b
    Example:
      hhlink link --workspace ./workspace
      hhlink link --engine spark --workspace ./workspace
    """
    cfg = load_config(config_path, link={"engine": engine, "threshold": threshold})
    s = run_stage_command("link", cfg, workspace, key_file)
    click.echo(f"linked {s['records']:,} records ({s['identities']:,} distinct identities) into "
               f"{s['persons']:,} persons and {s['household_years']:,} household-years "
               f"({s['parent_child_relations']:,} parent-child relations) in {s['seconds']:.0f}s")
    click.echo(f"  model: {workspace / 'linked' / 'model.json'}")
