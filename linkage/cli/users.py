"""``hhlink users``: portal users and their roles; a token is printed once, only its hash is kept."""

from __future__ import annotations

from pathlib import Path

import click

from linkage.cli.base import actor, audit_log, cli, common_options
from linkage.cli.keys import group_workspace

KEY_HELP = ("Master key file (the audit log's MACs; default: HHLINK_KEY, HHLINK_KEY_FILE or "
            "~/.config/hhlink/master.key).")


def _store(workspace: Path):
    from linkage.errors import WorkspaceError
    from linkage.serve.users import UserStore

    if not workspace.is_dir():
        raise WorkspaceError(f"{workspace}: workspace not found")
    return UserStore(workspace)


@cli.group("users")
@common_options
@click.pass_context
def users(ctx: click.Context, workspace: Path, config_path: Path | None) -> None:
    """Manage the portal's users (DIR/service/users.json): researcher, auditor or engineer.

    A token is printed once, when it is made; only its salted scrypt hash is stored.
    Every change is written to the audit log (which needs the master key).

    \b
    Example:
      hhlink users add alice --role researcher --workspace ./workspace
      hhlink users list --workspace ./workspace
    """
    ctx.obj = {"workspace": workspace}


@users.command("add")
@common_options
@click.argument("name")
@click.option("--role", type=click.Choice(["researcher", "auditor", "engineer"]), required=True,
              help="What the user may see: researcher (tables, builder), auditor (reports, audit log), "
                   "engineer (run status, quarantine).")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None, help=KEY_HELP)
@click.pass_context
def users_add(ctx: click.Context, workspace: Path, config_path: Path | None, name: str, role: str,
              key_file: Path | None) -> None:
    """Add a user and print their token once (only its hash is kept).

    \b
    Example:
      hhlink users add alice --role researcher --workspace ./workspace
    """
    workspace = group_workspace(ctx, workspace)
    store = _store(workspace)
    log = audit_log(workspace, key_file)
    token = store.add(name, role)
    log.append(actor(), "engineer", "user.add", {"user": name, "role": role})
    click.echo(f"added {name} ({role}); token (shown once, keep it secret):")
    click.echo(token)


@users.command("rotate")
@common_options
@click.argument("name")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None, help=KEY_HELP)
@click.pass_context
def users_rotate(ctx: click.Context, workspace: Path, config_path: Path | None, name: str,
                 key_file: Path | None) -> None:
    """Give a user a new token (printed once); the old one stops working.

    \b
    Example:
      hhlink users rotate alice --workspace ./workspace
    """
    workspace = group_workspace(ctx, workspace)
    store = _store(workspace)
    log = audit_log(workspace, key_file)
    token = store.rotate(name)
    log.append(actor(), "engineer", "user.rotate", {"user": name})
    click.echo(f"new token for {name} (shown once, keep it secret):")
    click.echo(token)


@users.command("remove")
@common_options
@click.argument("name")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None, help=KEY_HELP)
@click.pass_context
def users_remove(ctx: click.Context, workspace: Path, config_path: Path | None, name: str,
                 key_file: Path | None) -> None:
    """Remove a user; their token and sessions stop working.

    \b
    Example:
      hhlink users remove alice --workspace ./workspace
    """
    workspace = group_workspace(ctx, workspace)
    store = _store(workspace)
    log = audit_log(workspace, key_file)
    store.remove(name)
    log.append(actor(), "engineer", "user.remove", {"user": name})
    click.echo(f"removed {name}")


@users.command("list")
@common_options
@click.pass_context
def users_list(ctx: click.Context, workspace: Path, config_path: Path | None) -> None:
    """List users: name, role, created (never a token or hash).

    \b
    Example:
      hhlink users list --workspace ./workspace
    """
    workspace = group_workspace(ctx, workspace)
    for u in _store(workspace).list():
        click.echo(f"{u['name']:<24} {u['role']:<11} {u['created']}")
