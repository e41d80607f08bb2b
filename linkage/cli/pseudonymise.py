"""``hhlink pseudonymise``: split staged rows into keyed identifiers, a payload and an encrypted crosswalk."""

from __future__ import annotations

from pathlib import Path

import click

from linkage.cli.base import cli, common_options, key_option, run_stage_command
from linkage.config import load_config



@cli.command("pseudonymise")
@common_options
@key_option
def pseudonymise_command(workspace: Path, config_path: Path | None, key_file: Path | None) -> None:
    """Pseudonymise DIR/staged/ into DIR/pseudonymised/ (identifiers, payload, crosswalk).

    Each staged row gets a random record token. pseudonymised/identifiers/ holds the token
    with keyed HMAC tokens and Bloom-filter encodings of its identifiers (for linkage);
    pseudonymised/payload/ holds the token with the row's attributes and no identifiers;
    crosswalk.enc maps tokens back to source rows, encrypted for the data engineer. Only
    the key's fingerprint is recorded. Without a usable key nothing is written.

    \b
    Example:
      hhlink keys init
      hhlink pseudonymise --workspace ./workspace
    """
    summary = run_stage_command("pseudonymise", load_config(config_path), workspace, key_file)
    total = sum(summary["rows"].values())
    click.echo(f"pseudonymised {total:,} rows under key {summary['key_fingerprint']} "
               f"({summary['seconds']['total']:.1f}s)")
    click.echo(f"  {summary['mode']}")
    for source, n in summary["rows"].items():
        parts = summary["parts"][source]
        files = parts[0] if len(parts) == 1 else f"{parts[0]} + {len(parts) - 1} later part(s)"
        encoded = summary["rows_encoded"].get(source, 0)
        click.echo(f"  {source:<10} {n:>12,} rows ({encoded:,} encoded now) -> identifiers/ and payload/ {files}")
    click.echo(f"  crosswalk.enc: {summary['crosswalk']['rows']:,} rows in "
               f"{summary['crosswalk']['segments']} encrypted segment(s)")
