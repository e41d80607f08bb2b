"""``hhlink serve``: the researcher and auditor portal over one workspace."""

from __future__ import annotations

from pathlib import Path

import click

from linkage.cli.base import cli, common_options
from linkage.config import load_config


@cli.command()
@common_options
@click.option("--host", default=None, help="Address to bind (default: service.host, 127.0.0.1).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="TCP port (default: service.port, 8080).")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Master key file for on-demand tables' perturbation and the audit log's MACs (default: "
                   "HHLINK_KEY, HHLINK_KEY_FILE or ~/.config/hhlink/master.key).")
def serve(workspace: Path, config_path: Path | None, host: str | None, port: int | None, key_file: Path | None) -> None:
    """Serve the portal: published tables, the table builder, reports and the audit log.

    Researchers browse DIR/published/ (data dictionaries, charts, CSV and JSON) and build
    tables from the allowed dimensions and measures, answered only through disclosure
    control, within a daily quota; auditors read the data-quality, linkage-quality and
    disclosure reports and check the audit log; engineers see run status and quarantine
    counts. Sign in with a token from 'hhlink users add'. The OpenAPI spec is at
    /openapi.json; every API route takes 'Authorization: Bearer TOKEN'. Binds to
    127.0.0.1 unless --host says otherwise; stop with Ctrl-C.

    \b
    Example:
      hhlink users add alice --role researcher --workspace ./workspace
      hhlink serve --workspace ./workspace --port 8080
    """
    from linkage.keys import load_master_key
    from linkage.serve import serve as run

    cfg = load_config(config_path)
    key = load_master_key(key_file, workspace=workspace)
    h, p = host or cfg.service.host, port or cfg.service.port
    click.echo(f"hhlink portal for {workspace} on http://{h}:{p}/ (Ctrl-C stops it)")
    run(workspace, cfg, key=key, host=h, port=p)
