"""``hhlink disclose``: the standard tables under disclosure control, and the auditors' report."""

from __future__ import annotations

from pathlib import Path

import click

from linkage.cli.base import cli, common_options
from linkage.config import load_config


@cli.command()
@common_options
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Master key file for the perturbation's record keys (default: HHLINK_KEY, HHLINK_KEY_FILE "
                   "or ~/.config/hhlink/master.key).")
def disclose(workspace: Path, config_path: Path | None, key_file: Path | None) -> None:
    """Publish the standard tables from DIR/research/ into DIR/published/, protected.

    Every cell passes the threshold (10 units), dominance and p% rules or is suppressed;
    secondary suppression over row, column and hierarchical margins (LA within region,
    totals) is checked by linear programming; published values get cell-key perturbation
    (or 10-5 rounding, by config). Each table is written as CSV and Parquet in long form
    (dimension columns, measure, value, status; margins as 'Total') with a JSON data
    dictionary. The auditors' report is DIR/reports/disclosure/report.html (and .json).

    \b
    Example:
      hhlink disclose --workspace ./workspace
    """
    from linkage.disclose.stage import disclose as run
    from linkage.keys import load_master_key

    key = load_master_key(key_file, workspace=workspace)
    s = run(load_config(config_path), workspace, key=key)
    click.echo(f"published {len(s['tables'])} tables in {s['seconds']:.1f}s to {workspace / 'published'}/")
    for t in s["tables"]:
        click.echo(f"  {t['table']:<40} {t['cells']:>7,} cells  {t['suppressed']['primary']:>6,} primary  "
                   f"{t['suppressed']['secondary']:>6,} secondary  {'protected' if t['protected'] else 'NOT PROTECTED'}")
    click.echo(f"  report: {s['report'][1]}")
