"""``hhlink deliver``: land the next held-back delivery of a generated population."""

from __future__ import annotations

from pathlib import Path

import click

from linkage.cli.base import cli, common_options


@cli.command()
@common_options
@click.option("--all", "every", is_flag=True, help="Land every pending delivery, oldest first.")
def deliver(workspace: Path, config_path: Path | None, every: bool) -> None:
    """Copy the next delivery from DIR/deliveries/ into DIR/landing/, as its departments would.

    'hhlink generate --deliveries N' holds the last N monthly deliveries back; each run of
    this command lands the oldest one still pending (each file is renamed into place
    whole), after which 'hhlink run' ingests it beside the history. Prints what landed
    and what is still pending; exits 0 with a message when nothing is pending.

    \b
    Example:
      hhlink generate --persons 20000 --deliveries 12 --workspace ./workspace
      hhlink deliver --workspace ./workspace && hhlink run --workspace ./workspace
    """
    from synthetic_data.deliveries import deliver_next, pending

    landed = 0
    while True:
        d = deliver_next(workspace)
        if d is None:
            if not landed:
                click.echo("no delivery pending: every delivery is in landing/")
                return
            break
        landed += 1
        rows = sum(f["rows"] for f in d["files"])
        click.echo(f"delivered {d['month']}: " + ", ".join(f"landing/{f['name']} ({f['rows']:,} rows)" for f in d["files"])
                   + ("" if d["files"] else "nothing") + f" [{rows:,} rows]")
        if not every:
            break
    left = pending(workspace)
    click.echo(f"{len(left)} deliveries pending" + (f" (next {left[0]['month']})" if left else ""))
