"""``hhlink keys``: create the pseudonymisation master key and show its fingerprint."""

from __future__ import annotations

from pathlib import Path

import click

from linkage.cli.base import KEY_FILE_HELP, cli, common_options


def group_workspace(ctx: click.Context, workspace: Path) -> Path:
    """The subcommand's --workspace if given, else the group's (``hhlink keys --workspace X init``)."""
    from click.core import ParameterSource

    if ctx.get_parameter_source("workspace") == ParameterSource.DEFAULT and ctx.obj and "workspace" in ctx.obj:
        return ctx.obj["workspace"]
    return workspace


@cli.group("keys")
@common_options
@click.pass_context
def keys(ctx: click.Context, workspace: Path, config_path: Path | None) -> None:
    """Manage the pseudonymisation master key (kept outside the workspace).

    The key comes from --key-file, $HHLINK_KEY (hex or base64 of >= 32 bytes),
    $HHLINK_KEY_FILE or ~/.config/hhlink/master.key. A key file must be mode 0600 or
    stricter. Only its fingerprint is ever printed or recorded. --workspace is accepted
    for uniformity; a key file inside the workspace is refused.

    \b
    Example:
      hhlink keys init --key-file ~/.config/hhlink/master.key
      hhlink keys fingerprint --workspace ./workspace
    """
    ctx.obj = {"workspace": workspace}


@keys.command("init")
@common_options
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to create the key (default ~/.config/hhlink/master.key).")
@click.pass_context
def keys_init(ctx: click.Context, workspace: Path, config_path: Path | None, key_file: Path | None) -> None:
    """Create a random 32-byte master key in a new 0600 file; never overwrites one.

    \b
    Example:
      hhlink keys init --key-file ~/.config/hhlink/master.key
    """
    from linkage.keys import check_outside_workspace, default_key_path, init_key_file

    workspace = group_workspace(ctx, workspace)
    path = key_file or default_key_path()
    check_outside_workspace(path, workspace if workspace.exists() else None)
    key = init_key_file(path)
    click.echo(f"created {key.path} (mode 0600), fingerprint {key.fingerprint}")
    click.echo("keep a copy somewhere safe: without it, new data cannot be linked to data pseudonymised under it")


@keys.command("fingerprint")
@common_options
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None, help=KEY_FILE_HELP)
@click.pass_context
def keys_fingerprint(ctx: click.Context, workspace: Path, config_path: Path | None, key_file: Path | None) -> None:
    """Print the fingerprint of the current key, and whether it wrote DIR/pseudonymised/.

    \b
    Example:
      hhlink keys fingerprint --workspace ./workspace
    """
    import json

    from linkage.keys import load_master_key

    workspace = group_workspace(ctx, workspace)
    key = load_master_key(key_file, workspace=workspace)
    click.echo(f"{key.fingerprint}  ({key.origin})")
    meta = workspace / "pseudonymised" / "metadata.json"
    if meta.exists():
        try:
            recorded = json.loads(meta.read_text()).get("key_fingerprint")
        except ValueError:
            recorded = None
        status = "matches" if recorded == key.fingerprint else f"does NOT match (zone written under {recorded})"
        click.echo(f"{meta.parent}: {status}")


@keys.command("rotate")
@common_options
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The key DIR/pseudonymised/ is written under now (default: $HHLINK_KEY, $HHLINK_KEY_FILE, "
                   "~/.config/hhlink/master.key).")
@click.option("--new-key-file", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The key to re-pseudonymise under (create it first with 'hhlink keys init').")
@click.pass_context
def keys_rotate(ctx: click.Context, workspace: Path, config_path: Path | None, key_file: Path | None,
                new_key_file: Path) -> None:
    """Re-key DIR on purpose: re-pseudonymise DIR/staged/ under a new key and record the change.

    Proves the current key first (it must be the one DIR/pseudonymised/ was written
    under), then rewrites DIR/pseudonymised/ under the new key and appends the change
    (both fingerprints, the time) to DIR/.flow/key-history.json. Linked, research and
    published zones then refuse either key until rebuilt: run 'hhlink run --key-file NEW'.
    Publishing the same tables under two keys gives two independent noise draws, so
    a re-keyed release should replace the old one, not sit beside it.

    \b
    Example:
      hhlink keys init --key-file ~/.config/hhlink/new.key
      hhlink keys rotate --workspace ./workspace --new-key-file ~/.config/hhlink/new.key
    """
    from linkage.config import load_config
    from linkage.keys import rotate

    workspace = group_workspace(ctx, workspace)
    change = rotate(load_config(config_path), workspace, key_file, new_key_file)
    click.echo(f"re-pseudonymised {workspace / 'pseudonymised'}/ under key {change['to']} (was {change['from']}); "
               f"recorded in {workspace / '.flow' / 'key-history.json'}")
    click.echo(f"  next: hhlink run --workspace {workspace} --key-file {new_key_file}")
