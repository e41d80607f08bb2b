"""The parent flow ``household-linkage``: every stage in order, gated, resumable.

generate (optional) -> ingest -> pseudonymise -> link -> [linkage gates] -> assemble ->
evaluate (when truth/ exists) -> disclose. Each stage is a subflow (:mod:`flows.stages`)
whose work is skipped when its inputs are unchanged, so a run killed at any point and
started again redoes only the unfinished stages; every stage publishes its zone by atomic
rename, so no half-written zone is ever visible.

A quality gate (a critical expectation at ingest or assemble, or linkage below the
``[flow]`` minimums) stops the run before ``disclose``: ``published/`` keeps the last
release, a ``quality-gate`` artifact says why, and the flow run ends Failed with the reason.

Example:
    >>> from linkage.config import load_config
    >>> household_linkage_flow("workspace", load_config(), generate=True)   # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.states import Failed

from linkage.config import Config, load_config
from linkage.quality import QualityGateError
from flows import artifacts as art
from flows import stages
from linkage.stages import STAGES
from linkage.workspace import hold as workspace_run
from flows.fingerprint import code_versions
from flows.progress import emit

__all__ = ["household_linkage_flow"]


@flow(name="household-linkage")
def household_linkage_flow(workspace: str, config: Config | None = None, config_path: str | None = None,
                           generate: bool = False, key_file: str | None = None, refresh: bool = False):
    """Run every stage on the workspace; stop before publishing if a quality gate fails.

    Args:
        workspace: the workspace folder (``landing/`` holds the extracts unless ``generate``).
        config: the configuration; default: read from ``config_path`` at run time (what a
            schedule uses, so edits to ``hhlink.toml`` take effect without redeploying).
        config_path: the TOML file read when ``config`` is not given; default ``hhlink.toml``.
        generate: generate the synthetic population in ``config.generate`` first.
        key_file: the master key file; default ``HHLINK_KEY``, ``HHLINK_KEY_FILE`` or
            ``~/.config/hhlink/master.key``. The key never becomes a parameter.
        refresh: run every stage even when its inputs are unchanged.

    Returns:
        ``{"workspace", "stages": {stage: {"status", "seconds", "stage_seconds"}}}``, or a
        Failed state whose message is the quality gate's reason.
    """
    logger = get_run_logger()
    cfg = config if config is not None else load_config(config_path)
    ws = str(Path(workspace).resolve())
    done: dict[str, dict] = {}
    with workspace_run(ws) as repairs:
        if repairs:
            logger.warning("repaired the workspace after an interrupted run: %d item(s)", len(repairs))
        code = code_versions(cfg)
        key_fp = stages.key_fingerprint(key_file, ws)   # fails fast, before any stage, if there is no key
        names = [n for n in STAGES if n != "generate" or generate]
        for name in names:
            stage = STAGES[name]
            if not stage.applies(Path(ws)):
                continue   # evaluation needs the synthetic truth: real deliveries have none
            params = {"key_file": key_file, "key_fp": key_fp} if stage.keyed else {}
            t = time.perf_counter()
            try:
                result = stages.STAGE_FLOWS[name](ws, cfg, code[name], refresh=refresh, **params)
            except QualityGateError as exc:
                reason = f"quality gate at {name}: {exc}; published/ not updated"
                logger.error("%s", reason)
                emit(name, "failed", "stopped by a quality gate")
                art.publish([{"key": "quality-gate", "markdown": art.gate_markdown(name, str(exc), ws)}],
                            f"workspace {ws}")
                return Failed(message=reason, data=QualityGateError(reason))
            done[name] = {"status": result["status"], "seconds": round(time.perf_counter() - t, 2),
                          "stage_seconds": result["seconds"]}
        art.publish([{"key": "household-linkage-run", "markdown": art.run_markdown(ws, done)}], f"workspace {ws}")
    logger.info("household-linkage finished: %s", ", ".join(f"{k} {v['status']}" for k, v in done.items()))
    return {"workspace": ws, "stages": done}
