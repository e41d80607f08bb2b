"""The ``hhlink`` command line: each command calls one library function.

Every command takes ``--workspace DIR`` (default ``./workspace``) and ``--config FILE``
(default the project's ``hhlink.toml``). Errors are one line on stderr with a non-zero
exit status, never a traceback (set ``HHLINK_DEBUG=1`` to see one).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import click

from linkage.config import load_config
from linkage.errors import HhlinkError

log = logging.getLogger("hhlink")

WORKSPACE_HELP = "Workspace folder holding the run's zones (landing/, truth/, staged/, ...)."
CONFIG_HELP = ("Configuration file (TOML); default: $HHLINK_CONFIG, then ./hhlink.toml, then the packaged "
               "default ('hhlink config' shows which).")
KEY_FILE_HELP = ("Master key file (one line of hex, mode 0600). Default: $HHLINK_KEY, then $HHLINK_KEY_FILE, "
                 "then ~/.config/hhlink/master.key.")
# Libraries whose warnings are for developers: shown with -v, else kept off the console
# (untrained model levels are reported in the linkage report instead).
_CHATTY = ("splink", "py4j", "pyspark", "great_expectations", "prefect", "httpx", "urllib3")
# Commands after the pipeline stages, in the order a data engineer meets them.
_AFTER_STAGES = ("deliver", "serve", "run", "schedule", "link-files", "keys", "users", "crosswalk", "audit", "config")


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore")


def _verbose(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    root = ctx.find_root()
    value = bool(value) or bool(root.params.get("verbose")) or bool(getattr(root, "_hhlink_verbose", False))
    root._hhlink_verbose = value
    _logging(value)
    return value


def verbose_option(fn):
    """``-v/--verbose``, accepted before or after the subcommand."""
    return click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=_verbose, is_eager=True,
                        help="Log progress (never record values).")(fn)


def is_verbose() -> bool:
    """Whether ``-v`` was given anywhere on the command line."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx and getattr(ctx.find_root(), "_hhlink_verbose", False))


def common_options(fn):
    """Add ``--workspace``, ``--config`` and ``-v`` to a command."""
    fn = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                      default=None, help=CONFIG_HELP)(fn)
    fn = click.option("--workspace", type=click.Path(file_okay=False, path_type=Path),
                      default=Path("workspace"), show_default=True, help=WORKSPACE_HELP)(fn)
    return verbose_option(fn)


def key_option(fn):
    """Add ``--key-file`` (a path; the key itself is never an argument)."""
    return click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help=KEY_FILE_HELP)(fn)


def audit_log(workspace: Path, key_file: Path | None):
    """The workspace's audit log, keyed: loaded before any change, so without the key nothing changes unaudited."""
    from linkage.keys import load_master_key
    from linkage.serve.audit import AuditLog

    return AuditLog(workspace, load_master_key(key_file, workspace=workspace))


def actor() -> str:
    """Who runs this command, as the audit log names a CLI user."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def run_stage_command(name: str, config, workspace: Path, key_file: Path | None = None, **options) -> dict:
    """Run a registry stage for its command: locked, lineage- and key-checked (:func:`linkage.stages.run_stage`)."""
    from linkage.stages import run_stage

    return run_stage(name, config, workspace, key_file=key_file, **options)


class _PipelineOrder(click.Group):
    """Lists the commands in pipeline order (the stage registry's), then the others."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from linkage.stages import STAGES

        order = [*STAGES, *_AFTER_STAGES]
        known = super().list_commands(ctx)
        return [c for c in order if c in known] + sorted(c for c in known if c not in order)


@click.group(cls=_PipelineOrder, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@verbose_option
def cli() -> None:
    """hhlink: household-level linkage of education, benefits and earnings records.

    \b
    Example:
      hhlink generate --persons 20000 --seed 42 --workspace ./workspace
    """


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and turn every error into one line and an exit status."""
    debug = os.environ.get("HHLINK_DEBUG") == "1"
    # Everything hhlink writes (zones, truth/, reports, .flow/, the portal's files, Prefect's
    # local database) is the data engineer's alone or their group's to read: 0640 and 0750.
    os.umask(0o027)
    try:
        cli.main(args=argv, prog_name="hhlink", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        return 1
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        return exc.exit_code
    except HhlinkError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    except Exception as exc:  # noqa: BLE001 - the user gets one line; details only when debugging
        if debug:
            raise
        click.echo(f"error: unexpected {exc.__class__.__name__}; rerun with HHLINK_DEBUG=1 for details",
                   err=True)
        return 1
    return 0



