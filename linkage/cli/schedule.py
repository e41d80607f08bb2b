"""``hhlink schedule``: serve the monthly ``monthly-release`` deployment from this process."""

from __future__ import annotations

import os
from pathlib import Path

import click

from linkage.cli.base import KEY_FILE_HELP, cli, common_options
from linkage.cli.run import check_prefect_server, prefect_environment
from linkage.config import load_config
from linkage.errors import HhlinkError


@cli.command("schedule")
@common_options
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=KEY_FILE_HELP + " Only the path is stored in the deployment, never the key.")
def schedule_command(workspace: Path, config_path: Path | None, key_file: Path | None) -> None:
    """Serve 'monthly-release' on DIR on the [flow] cron schedule (monthly) until stopped.

    Each run makes one release from what arrived since the last (every stage, then the
    release recorded in DIR/releases.jsonl and shown on the portal's runs page).
    Registers the deployment monthly-release/<flow.deployment> with the cron schedule and
    time zone in hhlink.toml's [flow] section, then runs its scheduled (and manually
    triggered) flow runs in this process; Ctrl-C stops serving and pauses the schedule.
    Each run reads the config file afresh and the key from this process's environment.
    Needs a Prefect server that outlives this process: start one with
    'prefect server start --host 127.0.0.1' and set PREFECT_API_URL (see the README).

    \b
    Example:
      export PREFECT_API_URL=http://127.0.0.1:4200/api
      hhlink schedule --workspace /srv/hhlink/workspace
    """
    prefect_environment(verbose=True)   # serving is a long-lived process: show its runs
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise HhlinkError("hhlink schedule needs a Prefect server: run 'prefect server start --host 127.0.0.1' "
                              "and set PREFECT_API_URL=http://127.0.0.1:4200/api (see the README)")
    check_prefect_server()
    cfg = load_config(config_path)
    from linkage.keys import load_master_key

    load_master_key(key_file, workspace=workspace)   # scheduled runs would fail without a key: say so now
    from flows.deployment import serve_monthly

    f = cfg.flow
    click.echo(f"serving monthly-release/{f.deployment} on {workspace.resolve()}: cron '{f.schedule}' "
               f"({f.timezone}); Ctrl-C to stop")
    serve_monthly(workspace, cfg, config_path, key_file)
