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
    """Validate the configuration and print it as JSON.

    \b
    Example:
      hhlink config --config hhlink.toml
    """
    cfg = load_config(config_path)
    click.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))
