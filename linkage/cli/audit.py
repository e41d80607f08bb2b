"""``hhlink audit``: read and verify the workspace's hash-chained audit log."""

from __future__ import annotations

import json
from pathlib import Path

import click

from linkage.cli.base import cli, common_options
from linkage.cli.keys import group_workspace


@cli.group("audit")
@common_options
@click.pass_context
def audit(ctx: click.Context, workspace: Path, config_path: Path | None) -> None:
    """Read and verify the audit log (DIR/audit/log.jsonl).

    Every entry holds who, what, when, parameters, outcome and (for table requests) the
    disclosure decisions, and the SHA-256 hash of the entry before it; a keyed MAC
    (HKDF subkey of the master key) stops the chain being recomputed after an edit.

    \b
    Example:
      hhlink audit verify --workspace ./workspace
      hhlink audit show --workspace ./workspace --last 20
    """
    ctx.obj = {"workspace": workspace}


def _log(workspace: Path, key_file: Path | None, need_key: bool):
    from linkage.errors import WorkspaceError
    from linkage.keys import KeyNotFoundError, load_master_key
    from linkage.serve.audit import AuditLog

    if not workspace.is_dir():
        raise WorkspaceError(f"{workspace}: workspace not found")
    try:
        key = load_master_key(key_file, workspace=workspace)
    except KeyNotFoundError:
        if need_key:
            raise
        key = None
    return AuditLog(workspace, key)


@audit.command("verify")
@common_options
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Master key file, to check the entries' MACs too (without a key only the hash chain is checked).")
@click.option("--expect-head", default=None, help="A head hash recorded earlier: fail if the log no longer contains it "
                                                  "as an entry's hash (detects a rollback of log and head together).")
@click.pass_context
def audit_verify(ctx: click.Context, workspace: Path, config_path: Path | None, key_file: Path | None,
                 expect_head: str | None) -> None:
    """Check the audit log; report the first entry edited, removed or reordered.

    Exit status 0 when intact; otherwise the finding on stdout, one error line and status 2.

    \b
    Example:
      hhlink audit verify --workspace ./workspace
    """
    workspace = group_workspace(ctx, workspace)
    from linkage.errors import WorkspaceError

    if not (workspace / "audit" / "log.jsonl").is_file():
        raise WorkspaceError(f"{workspace / 'audit' / 'log.jsonl'}: no audit log (is --workspace right? the portal "
                             "writes it from its first request)")
    log = _log(workspace, key_file, need_key=False)
    result = log.verify()
    if result.ok and expect_head:
        entries, _ = log.entries()
        if not any(e.get("hash") == expect_head for e in entries):
            result.ok, result.problem = False, "truncated"
            result.message = f"no entry has the expected head hash {expect_head}: entries were removed"
    macs = "hash chain and MACs checked" if result.mac_checked else "hash chain checked (no key: MACs not checked)"
    if result.ok:
        click.echo(f"ok: {result.entries} entries intact ({macs}); head {result.head}")
        return
    click.echo(f"TAMPERED: {result.message} ({macs})")
    if result.first_bad_seq is not None:
        click.echo(f"first bad entry: {result.first_bad_seq} (line {result.first_bad_line}, {result.problem})")
    from linkage.errors import HhlinkError

    raise HhlinkError(f"the audit log in {workspace / 'audit'} is not intact ({result.problem})")


@audit.command("show")
@common_options
@click.option("--last", type=click.IntRange(1, 100_000), default=20, show_default=True, help="How many entries.")
@click.option("--actor", default=None, help="Only this user's entries.")
@click.option("--action", default=None, help="Only this action, or an action group ending in '.' (e.g. 'auth.').")
@click.option("--since", type=click.DateTime(["%Y-%m-%d"]), default=None, help="From this day (UTC), inclusive.")
@click.option("--until", type=click.DateTime(["%Y-%m-%d"]), default=None, help="To this day (UTC), inclusive.")
@click.pass_context
def audit_show(ctx: click.Context, workspace: Path, config_path: Path | None, last: int, actor: str | None,
               action: str | None, since, until) -> None:
    """Print the last entries, one JSON object a line, newest last (optionally one user's, one action's,
    or within days).

    \b
    Example:
      hhlink audit show --workspace ./workspace --last 20
      hhlink audit show --workspace ./workspace --action auth. --since 2026-12-01
    """
    workspace = group_workspace(ctx, workspace)
    day = (lambda d: d.strftime("%Y-%m-%d") if d else None)
    entries, _, _ = _log(workspace, None, need_key=False).search(actor, action, day(since), day(until), 0, last,
                                                                 newest_first=True)
    for e in reversed(entries):
        click.echo(json.dumps(e, sort_keys=True))
