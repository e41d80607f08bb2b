"""``hhlink evaluate``: compare the linkage with the synthetic ground truth."""

from __future__ import annotations

from pathlib import Path

import click

from linkage.cli.base import cli, common_options, key_option, run_stage_command
from linkage.config import load_config


@cli.command()
@common_options
@key_option
def evaluate(workspace: Path, config_path: Path | None, key_file: Path | None) -> None:
    """Compare DIR/linked/ with DIR/truth/ and write DIR/reports/evaluation.json.

    Joins record tokens to the departments' records through the encrypted crosswalk
    (so it needs the key), then measures person linkage (pairwise and cluster precision,
    recall, F1, also at several thresholds), household membership and parent-child
    relations against the truth. The linkage-quality report is refreshed with the true
    figures beside the model's expected ones.

    \b
    Example:
      hhlink evaluate --workspace ./workspace
    """
    m = run_stage_command("evaluate", load_config(config_path), workspace, key_file)
    click.echo(f"persons: pairwise precision {m['person_pairwise_precision']:.5f}, recall "
               f"{m['person_pairwise_recall']:.5f}, F1 {m['person_pairwise_f1']:.5f}; cluster F1 "
               f"{m['person_cluster_f1']:.5f}")
    click.echo(f"households: accuracy {m['household_accuracy']:.4f}; parent-child: precision "
               f"{m['parent_child_precision']:.4f}, recall {m['parent_child_recall']:.4f}")
    click.echo(f"  {workspace / 'reports' / 'evaluation.json'}")
