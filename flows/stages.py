"""One Prefect flow per registry stage, made by one factory: fingerprint, run (or skip), publish artifacts.

Each flow runs on its own (``STAGE_FLOWS["generate"](workspace, config)``) or as a subflow
of ``household-linkage``; all take the same parameters (:func:`stage_flow`). What differs
per stage is data, not code: the registry (:mod:`linkage.stages`), the artifact builders
(:func:`flows.artifacts.stage_artifacts`) and two hooks below (ingest's quality report
when its gate stops the run; the linkage gates after link).

Sources are not ingested or pseudonymised concurrently: ``ingest`` and ``pseudonymise``
each take every source in one call and publish their zone in one atomic rename, and their
work is not independent per source (ingest's re-sent-file ledger spans all sources;
pseudonymise encodes each distinct value once across sources and writes one encrypted
crosswalk). Splitting them per source would move stage logic into the flow, and DuckDB
already keeps both cores busy within each SQL statement.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger

from linkage.config import Config
from linkage.quality import QualityGateError
from flows import artifacts as art
from flows import tasks
from linkage.stages import STAGES
from linkage.workspace import hold as workspace_run
from flows.fingerprint import code_versions, flow_dir
from flows.gates import linkage_checks
from flows.progress import emit

__all__ = ["STAGE_FLOWS", "cached_stage", "key_fingerprint", "stage_flow"]


def key_fingerprint(key_file: str | None, workspace: str) -> str:
    """The master key's public fingerprint; the key itself stays in this function."""
    from linkage.keys import load_master_key

    return load_master_key(key_file, workspace=workspace).fingerprint


def cached_stage(stage: str, workspace: str, config: Config, code: str | None = None,
                 key_fp: str | None = None, refresh: bool = False, **params) -> dict:
    """Fingerprint the inputs, then run the stage task or take its cached result.

    A cached result whose outputs have changed since (a zone deleted or edited) is not
    trusted: the stage runs again.

    Returns:
        The task's result (``summary``, ``outputs``, ``fingerprint``, ``seconds``) with
        ``status``: ``ran`` or ``cached``.
    """
    logger = get_run_logger()
    emit(stage, "running")
    try:
        code = code or code_versions(config)[stage]
        if STAGES[stage].keyed and key_fp is None:
            key_fp = key_fingerprint(params.get("key_file"), workspace)
        fp = tasks.fingerprint_task(stage, workspace, config, code, key_fp)
        runner = tasks.stage_task.with_options(result_storage=flow_dir(workspace) / "results",
                                         refresh_cache=True if refresh else None)
        state = runner(stage=stage, workspace=workspace, config=config, fingerprint=fp, return_state=True, **params)
        result = state.result()
        cached = state.name == "Cached"
        if cached and not tasks.outputs_unchanged(stage, workspace, result["outputs"]):
            logger.warning("%s: inputs unchanged but its outputs changed since it ran: running it again", stage)
            state = runner.with_options(refresh_cache=True)(stage=stage, workspace=workspace, config=config,
                                                             fingerprint=fp, return_state=True, **params)
            result = state.result()
            cached = False
    except BaseException as exc:
        emit(stage, "failed", str(exc) if isinstance(exc, Exception) else exc.__class__.__name__)
        raise
    status = "cached" if cached else "ran"
    logger.info("%s: %s (%s)", stage, "skipped: inputs unchanged since " + result["finished"] if cached else "ran",
                f"{result['seconds']:.1f}s")
    emit(stage, status, f"{result['seconds']:.1f}s")
    return {**result, "status": status}


def _description(workspace: str) -> str:
    return f"workspace {Path(workspace).resolve()}"


def _ingest_quality(workspace: str) -> None:
    """After a gate stopped ingest: publish the quality results it wrote before stopping."""
    quality = Path(workspace) / "reports" / "quality" / "quality_summary.json"
    if quality.exists():
        art.publish([{"key": "ingest-quality", "markdown": art.quality_markdown(json.loads(quality.read_text()))}],
                    _description(workspace))


def _linkage_gates(workspace: str, config: Config, result: dict) -> None:
    """After link: the ``[flow]`` minimums on the linkage report (a failure stops the run)."""
    report = tasks.linkage_report_task(workspace, config)
    checks, failures = linkage_checks(report, config.flow)
    summary = json.loads((Path(workspace) / "linked" / "summary.json").read_text())
    art.publish([{"key": "linkage-metrics", "table": art.linkage_rows(summary, checks)}], _description(workspace))
    result["checks"] = checks
    if failures:
        raise QualityGateError("linkage quality below the minimums in [flow]: " + "; ".join(failures))


# What a stage's flow does besides running the stage: artifacts for auditors, gates.
_ON_GATE = {"ingest": _ingest_quality}
_AFTER = {"link": _linkage_gates}


def stage_flow(name: str):
    """The Prefect flow of one registry stage (named as the stage), built from :data:`linkage.stages.STAGES`.

    Every stage flow takes the same parameters: ``workspace``; ``config``, the typed
    configuration (Prefect validates it); ``code``, the stage's code version (computed when
    omitted; the parent computes all once); ``key_file`` (a path, never the key) and
    ``key_fp`` (the key's public fingerprint, computed when omitted) for keyed stages;
    ``refresh``, run even when unchanged.
    """
    stage = STAGES[name]

    def run(workspace: str, config: Config, code: str | None = None, key_file: str | None = None,
            key_fp: str | None = None, refresh: bool = False) -> dict:
        with workspace_run(workspace):
            params = {"key_file": key_file} if stage.keyed else {}
            try:
                result = cached_stage(name, workspace, config, code, key_fp, refresh, **params)
            except QualityGateError:
                if name in _ON_GATE:
                    _ON_GATE[name](workspace)
                raise
            artifacts = art.stage_artifacts(name, result["summary"])
            if artifacts:
                art.publish(artifacts, _description(workspace))
            if name in _AFTER:
                _AFTER[name](workspace, config, result)
            return result

    run.__doc__ = f"The {name} stage: {stage.summary}."
    return flow(name=name, flow_run_name=f"{name}", validate_parameters=True)(run)


STAGE_FLOWS = {name: stage_flow(name) for name in STAGES}
