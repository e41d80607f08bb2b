"""``hhlink ingest``: stage the landing extracts, quarantine bad rows, run the quality gates."""

from __future__ import annotations

from pathlib import Path

import click

from linkage.cli.base import cli, common_options, run_stage_command
from linkage.config import load_config


@cli.command("ingest")
@common_options
def ingest_command(workspace: Path, config_path: Path | None) -> None:
    """Read DIR/landing/ against schemas/, write DIR/staged/ and DIR/quarantine/, run the GX suites.

    Every landing row is staged (typed, identifiers normalised) or quarantined with a
    reason code; a file-level fault (unreadable, empty, a missing column, the wrong
    encoding, a re-sent file) stops the run naming the file. A critical expectation
    failure stops the run with the reports written and staged/ left as it was. Reports
    for auditors (Data Docs HTML, JSON summaries) go to DIR/reports/quality/.

    \b
    Example:
      hhlink ingest --workspace ./workspace
    """
    summary = run_stage_command("ingest", load_config(config_path), workspace)
    rows = summary["rows"]
    click.echo(f"ingested {rows['read']:,} rows: {rows['staged']:,} staged, {rows['quarantined']:,} quarantined "
               f"({summary['seconds']['total']:.1f}s)")
    for source, s in summary["sources"].items():
        q = summary["quality"]["sources"][source]
        reasons = ", ".join(f"{k} {v:,}" for k, v in s["reasons"].items()) or "none"
        click.echo(f"  {source:<10} {s['rows_staged']:>12,} staged {s['rows_quarantined']:>9,} quarantined "
                   f"(reasons: {reasons}); expectations {q['passed']}/{q['evaluated']} passed, "
                   f"{q['warnings_failed']} warning(s)")
    click.echo(f"  reports: {summary['reports']}")
