"""``hhlink crosswalk``: the data engineer's way back from a record token to its source row."""

from __future__ import annotations

from pathlib import Path

import click

from linkage.cli.base import KEY_FILE_HELP, cli, common_options
from linkage.cli.keys import group_workspace


@cli.group("crosswalk")
@common_options
@click.pass_context
def crosswalk(ctx: click.Context, workspace: Path, config_path: Path | None) -> None:
    """Look record tokens up in the encrypted crosswalk (data engineer only; needs the key).

    The crosswalk (DIR/pseudonymised/crosswalk.enc) maps each record token to its source,
    landing file, line, row and the department's record_id, e.g. to answer a data
    owner's query about one record. A key other than the one that wrote it is refused.

    \b
    Example:
      hhlink crosswalk lookup 3f9c0b6d2a1e4f7081c2d3e4f5a6b7c8 --workspace ./workspace
    """
    ctx.obj = {"workspace": workspace}


@crosswalk.command("lookup")
@common_options
@click.argument("token")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None, help=KEY_FILE_HELP)
@click.pass_context
def crosswalk_lookup_command(ctx: click.Context, workspace: Path, config_path: Path | None, token: str, key_file: Path | None) -> None:
    """Print the source row of record TOKEN: source, file, line, row, record_id.

    Exits with status 1 when the token is not in the crosswalk.

    \b
    Example:
      hhlink crosswalk lookup 3f9c0b6d2a1e4f7081c2d3e4f5a6b7c8 --workspace ./workspace
    """
    from linkage.crosswalk import crosswalk_lookup
    from linkage.keys import load_master_key

    workspace = group_workspace(ctx, workspace)
    key = load_master_key(key_file, workspace=workspace)
    hit = crosswalk_lookup(workspace, token, key)
    if hit is None:
        raise click.ClickException("record token not found in the crosswalk")
    click.echo(f"record_token {hit['record_token']}\nsource       {hit['source']}\nfile         {hit['file']}\n"
               f"line         {hit['line']}\nrow          {hit['row']}\nrecord_id    {hit['record_id']}")
