"""The flow ``monthly-release``: one release per run from whatever arrived since the last release.

Each run (the monthly deployment, :mod:`flows.deployment`):

1. takes the landing files no release holds yet (:func:`linkage.releases.unreleased_files`);
   when there are none and the workspace holds held-back synthetic deliveries
   (``deliveries/``, ``hhlink generate --deliveries N``), it lands the next one, as a
   department would; a delivery cut short by a kill is finished first. With nothing new the
   run ends without a release;
2. runs ``household-linkage`` (ingest -> ... -> disclose) as a subflow: stages whose inputs
   are unchanged are skipped, so a run killed at any point (even SIGKILL) and started again
   picks up where it stopped, and lands no second delivery (the first is still unreleased);
3. once published, appends the release to ``releases.jsonl`` (its files, counts, key changes
   and model) and publishes a ``release`` artifact.

A quality gate (including the model-drift gate at link) stops the run before disclose: no
release is recorded, and the next run retries the same files (no further delivery lands
until they are released), so a drifted delivery waits for a deliberate ``hhlink link
--retrain``.

Example:
    >>> monthly_release_flow("workspace", config_path="hhlink.toml")   # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task

from flows import artifacts as art
from flows.household_linkage import household_linkage_flow
from flows.tasks import IO_RETRIES
from linkage.config import Config, load_config
from linkage.workspace import hold as workspace_run

__all__ = ["monthly_release_flow"]


@task(name="take-deliveries", **IO_RETRIES)
def take_deliveries(workspace: str) -> dict:
    """The landing files this release is made of; lands the next held-back delivery when none wait.

    Returns:
        ``{"delivered": month or None, "files": [names]}``.
    """
    from linkage.releases import unreleased_files

    ws = Path(workspace)
    waiting = unreleased_files(ws)
    delivered = None
    if (ws / "deliveries" / "index.json").is_file():
        from synthetic_data.deliveries import deliver_next, pending

        todo = pending(ws)
        cut_short = bool(todo) and any((ws / "landing" / f["name"]).exists() for f in todo[0]["files"])
        if todo and (cut_short or not waiting):
            delivered = deliver_next(ws)["month"]
            waiting = unreleased_files(ws)
    return {"delivered": delivered, "files": waiting}


@task(name="record-release", **IO_RETRIES)
def record_release_task(workspace: str, run: str | None) -> dict | None:
    """Append the release to ``releases.jsonl`` (nothing when its files are already recorded)."""
    from linkage.releases import record_release

    return record_release(workspace, run)


def release_markdown(entry: dict) -> str:
    """The release for the artifact: files, counts, key changes, model (no record values)."""
    kc = entry.get("key_changes") or {}
    m = entry.get("model") or {}
    lines = [f"# Release {entry['release']}", "", "| file | source | rows staged | rows quarantined |",
             "| --- | --- | ---: | ---: |"]
    lines += [f"| {f['name']} | {f['source']} | {f['rows_staged']} | {f['rows_quarantined']} |" for f in entry["files"]]
    lines += ["", "| " + " | ".join(entry["counts"]) + " |", "|" + " ---: |" * len(entry["counts"]),
              "| " + " | ".join(str(v) for v in entry["counts"].values()) + " |", "",
              "Person keys: " + ", ".join(f"{k} {v}" for k, v in kc.items() if k != "first_release"), "",
              f"Model `{m.get('fingerprint')}` ({m.get('mode')}); largest drift {m.get('largest_drift')} "
              f"({m.get('drift_level')})."]
    return "\n".join(lines) + "\n"


@flow(name="monthly-release")
def monthly_release_flow(workspace: str, config: Config | None = None, config_path: str | None = None,
                         key_file: str | None = None):
    """Make one release from what arrived since the last one (see the module).

    Args:
        workspace: the workspace folder.
        config: the configuration; default: read from ``config_path`` at run time.
        config_path: the TOML file read when ``config`` is not given.
        key_file: the master key file (a path; the key is never a parameter).

    Returns:
        ``{"workspace", "release": entry or None, "delivered": month or None}``, or the Failed
        state of ``household-linkage`` when a gate stopped it.
    """
    from prefect.runtime import flow_run

    logger = get_run_logger()
    cfg = config if config is not None else load_config(config_path)
    ws = str(Path(workspace).resolve())
    with workspace_run(ws):
        arrived = take_deliveries(ws)
        if not arrived["files"]:
            logger.info("nothing arrived since the last release: no release this run")
            return {"workspace": ws, "release": None, "delivered": None}
        logger.info("release from %d landing file(s)%s", len(arrived["files"]),
                    f" (delivery {arrived['delivered']} landed)" if arrived["delivered"] else "")
        state = household_linkage_flow(ws, cfg, key_file=key_file, return_state=True)
        if not state.is_completed():
            return state
        entry = record_release_task(ws, flow_run.get_id())
        if entry is not None:
            art.publish([{"key": "release", "markdown": release_markdown(entry)}], f"workspace {ws}")
            logger.info("release %d recorded", entry["release"])
    return {"workspace": ws, "release": entry, "delivered": arrived["delivered"]}
