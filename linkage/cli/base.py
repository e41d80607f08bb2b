"""The ``hhlink`` command line: each command calls one library function.

Every command takes ``--workspace DIR`` (default ``./workspace``) and ``--config FILE``
(default the project's ``hhlink.toml``). Errors are one line on stderr with a non-zero
exit status, never a traceback (set ``HHLINK_DEBUG=1`` to see one).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from linkage.config import load_config
from linkage.errors import HhlinkError

log = logging.getLogger("hhlink")

WORKSPACE_HELP = "Workspace folder holding the run's zones (landing/, truth/, staged/, ...)."
CONFIG_HELP = "Configuration file (TOML); default: the project's hhlink.toml."


def common_options(fn):
    """Add ``--workspace`` and ``--config`` to a command."""
    fn = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                      default=None, help=CONFIG_HELP)(fn)
    fn = click.option("--workspace", type=click.Path(file_okay=False, path_type=Path),
                      default=Path("workspace"), show_default=True, help=WORKSPACE_HELP)(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log progress (never record values).")
def cli(verbose: bool) -> None:
    """hhlink: household-level linkage of education, benefits and earnings records.

    \b
    Example:
      hhlink generate --persons 20000 --seed 42 --workspace ./workspace
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and turn every error into one line and an exit status."""
    debug = os.environ.get("HHLINK_DEBUG") == "1"
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



