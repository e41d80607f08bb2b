"""``hhlink disclose``: the standard tables under disclosure control, and the auditors' report."""

from __future__ import annotations

from pathlib import Path

import click

from linkage.cli.base import cli, common_options, key_option, run_stage_command
from linkage.config import load_config


@cli.command()
@common_options
@key_option
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
    s = run_stage_command("disclose", load_config(config_path), workspace, key_file)
    click.echo(f"published {len(s['tables'])} tables in {s['seconds']:.1f}s to {workspace / 'published'}/")
    for t in s["tables"]:
        click.echo(f"  {t['table']:<40} {t['cells']:>7,} cells  {t['suppressed']['primary']:>6,} primary  "
                   f"{t['suppressed']['secondary']:>6,} secondary  {'protected' if t['protected'] else 'NOT PROTECTED'}")
    click.echo(f"  report: {s['report'][1]}")
