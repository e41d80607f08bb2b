"""``hhlink assemble``: research tables, mobility measures and the linkage-error sensitivity analysis."""

from __future__ import annotations

from pathlib import Path

import click

from linkage.cli.base import cli, common_options, key_option, run_stage_command
from linkage.config import load_config


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@cli.command()
@common_options
@click.option("--project", default=None,
              help="Research project id; research/ keys are derived for it (default from config: assemble.project).")
@key_option
def assemble(workspace: Path, config_path: Path | None, project: str | None, key_file: Path | None) -> None:
    """Build DIR/research/ from DIR/linked/ and the payload, with mobility measures.

    Writes the person, person-year, household-year, parent-child and intergenerational
    cohort tables (declared in schemas/research/) keyed per research project, and the
    mobility measures (elasticity, rank-rank slope, absolute upward mobility, quintile
    transitions, attainment gaps by disadvantage) nationally and per birth cohort, region
    and local authority with bootstrap intervals. The Great Expectations suites in
    expectations/research/ check the tables (reports in DIR/reports/quality/research/); the
    headline measures are re-estimated with persons re-clustered at other thresholds
    (DIR/reports/mobility.json).

    \b
    Example:
      hhlink assemble --workspace ./workspace
      hhlink assemble --project smc-2026-07 --workspace ./workspace
    """
    cfg = load_config(config_path, assemble={"project": project})
    s = run_stage_command("assemble", cfg, workspace, key_file)
    rows = s["rows"]
    click.echo(f"research tables for project {s['project']}: {rows['person']:,} persons, "
               f"{rows['person_year']:,} person-years, {rows['household_year']:,} household-years, "
               f"{rows['parent_child']:,} parent-child relations, {rows['cohort']:,} children "
               f"({s['seconds']['total']:.0f}s)")
    n = s["national"]
    for m, label in (("ige", "elasticity"), ("rank_slope", "rank-rank slope"),
                     ("absolute_upward_mobility", "absolute upward mobility"), ("bottom_to_top", "bottom-to-top")):
        click.echo(f"  {label:<25} {_fmt(n[m]['estimate'])} [{_fmt(n[m]['ci_low'])}, {_fmt(n[m]['ci_high'])}]"
                   f"  (n = {n[m]['n']:,})")
    spread = [v["ige"] for v in s["sensitivity"] if v["ige"] is not None]
    if spread:
        click.echo(f"  elasticity across linkage thresholds: {min(spread):.3f} to {max(spread):.3f}")
    click.echo(f"  {workspace / 'research'}/, {workspace / 'reports' / 'mobility.json'}")
