"""``hhlink config``: validate the configuration and print it."""

from __future__ import annotations

import json
from pathlib import Path

import click

from linkage.cli.base import cli, common_options
from linkage.config import load_config


@cli.command("config")
@common_options
def show_config(workspace: Path, config_path: Path | None) -> None:
    """Validate the configuration and print it as JSON, after a line naming the file read.

    The file is the first of: --config, $HHLINK_CONFIG, ./hhlink.toml, the packaged default.
    Relative paths inside it are read from its folder, else from the packaged defaults.

    \b
    Example:
      hhlink config --config hhlink.toml
    """
    cfg = load_config(config_path)
    path, reason = cfg.source
    click.echo(f"# config: {path} ({reason})")
    if cfg.defaulted_sections:
        click.echo("# not in the file, every value the default: " + ", ".join(f"[{s}]" for s in cfg.defaulted_sections))
    click.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))
