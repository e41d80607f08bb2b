"""``hhlink link``: link the pseudonymised identifiers into persons and households."""

from __future__ import annotations

from pathlib import Path

import click

from linkage.cli.base import actor, audit_log, cli, common_options, key_option, run_stage_command
from linkage.config import load_config


def link_overrides(engine: str | None, threshold: float | None) -> dict:
    """The ``[link]`` settings the command line gives: a threshold given there is the threshold,
    so the evidence rule (``link.threshold_evidence_bits``) is set aside; None keeps the config's."""
    return {"engine": engine, "threshold": threshold,
            "threshold_evidence_bits": 0 if threshold is not None else None}


@cli.command()
@common_options
@click.option("--engine", type=click.Choice(["duckdb", "spark"]), default=None,
              help="Linkage engine (default from config: duckdb).")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Match probability for 'same person', between 0 and 1; given here, it alone decides "
                   "(default from config, with link.threshold_evidence_bits).")
@click.option("--retrain", is_flag=True,
              help="Train a new model although one is stored (a deliberate step, written to the audit log).")
@key_option
def link(workspace: Path, config_path: Path | None, engine: str | None, threshold: float | None,
         retrain: bool, key_file: Path | None) -> None:
    """Link DIR/pseudonymised/identifiers/ into persons and households in DIR/linked/.

    The first release trains one Splink model over the three sources on keyed encodings
    only (u by random sampling, m by EM) and keeps it in DIR/linked/models/ with its
    fingerprint; later releases reuse it, and the linkage report shows how far each
    release's data drifted from it (m and u per level, records matched). A release that
    drifted beyond link.max_drift is stopped, naming the level; --retrain trains a new
    model deliberately and records it in the audit log. Pairs are scored, clustered into
    persons at the threshold (person keys carried over from the last release), and
    household membership per year and parent-child relations derived. The identifiers are
    encrypted at rest: the key decrypts them into this process's memory only.

    \b
    Example:
      hhlink link --workspace ./workspace
      hhlink link --retrain --workspace ./workspace
      hhlink link --engine spark --workspace ./workspace
    """
    from linkage.link.drift import DriftGateError

    cfg = load_config(config_path, link=link_overrides(engine, threshold))
    audit = audit_log(workspace, key_file)   # no key, no run: a retrain must reach the audit log
    try:
        s = run_stage_command("link", cfg, workspace, key_file, retrain=retrain)
    except DriftGateError as exc:
        audit.append(actor(), "engineer", "link.drift_gate", {}, "refused", {"reason": str(exc)})
        raise
    m = s["model"]
    if m["mode"] != "reused":
        top = (s.get("drift") or {}).get("largest") or {}
        audit.append(actor(), "engineer", f"link.model_{m['mode']}",
                     {"fingerprint": m["fingerprint"], "previous_fingerprint": m["previous_fingerprint"]}, "ok",
                     {"largest_drift": top.get("drift"), "level": f"{top.get('comparison')}: {top.get('level')}"
                      if top else None})
    click.echo(f"linked {s['records']:,} records ({s['identities']:,} distinct identities) into "
               f"{s['persons']:,} persons and {s['household_years']:,} household-years "
               f"({s['parent_child_relations']:,} parent-child relations) in {s['seconds']:.0f}s")
    drift = s.get("drift") or {}
    top = drift.get("largest")
    click.echo(f"  model {m['fingerprint']} {m['mode']}: {workspace / 'linked' / 'model.json'}"
               + (f"; largest drift {top['drift']:.3f} ({top['comparison']}: {top['level']}, bound "
                  f"{cfg.link.max_drift:g})" if top else ""))
