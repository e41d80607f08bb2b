"""One Prefect flow per stage: fingerprint the inputs, run (or skip) the stage, publish its artifacts.

Each flow runs on its own (``generate_flow(workspace, config)``) or as a subflow of
``household-linkage``. Their parameters: ``workspace``; ``config``, the typed
configuration (Prefect validates it); ``code``, the stage's code version (computed when
omitted; the parent computes all once); ``refresh``, run even when unchanged; and, for
stages that need the key, ``key_file`` (a path, never the key) and ``key_fp`` (the key's
public fingerprint, computed when omitted).

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
from flows._fingerprint import code_versions, flow_dir
from flows._guard import workspace_run
from flows._spec import STAGES
from flows.gates import linkage_checks
from flows.progress import emit

__all__ = ["assemble_flow", "disclose_flow", "evaluate_flow", "generate_flow", "ingest_flow", "key_fingerprint",
           "link_flow", "pseudonymise_flow", "run_stage"]


def key_fingerprint(key_file: str | None, workspace: str) -> str:
    """The master key's public fingerprint; the key itself stays in this function."""
    from linkage.keys import load_master_key

    return load_master_key(key_file, workspace=workspace).fingerprint


def run_stage(stage: str, stage_task, workspace: str, config: Config, code: str | None = None,
              key_fp: str | None = None, refresh: bool = False, **params) -> dict:
    """Fingerprint the inputs, then run ``stage_task`` or take its cached result.

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
        runner = stage_task.with_options(result_storage=flow_dir(workspace) / "results",
                                         refresh_cache=True if refresh else None)
        state = runner(workspace=workspace, config=config, fingerprint=fp, return_state=True, **params)
        result = state.result()
        cached = state.name == "Cached"
        if cached and not tasks.outputs_unchanged(stage, workspace, result["outputs"]):
            logger.warning("%s: inputs unchanged but its outputs changed since it ran: running it again", stage)
            state = runner.with_options(refresh_cache=True)(workspace=workspace, config=config, fingerprint=fp,
                                                             return_state=True, **params)
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


@flow(name="generate")
def generate_flow(workspace: str, config: Config, code: str | None = None, refresh: bool = False) -> dict:
    """Generate the synthetic population (the demo's landing/ and truth/)."""
    with workspace_run(workspace):
        return run_stage("generate", tasks.generate_task, workspace, config, code, refresh=refresh)


@flow(name="ingest")
def ingest_flow(workspace: str, config: Config, code: str | None = None, refresh: bool = False) -> dict:
    """Stage and check landing/; a critical expectation failure stops the run (reports still published)."""
    with workspace_run(workspace):
        try:
            result = run_stage("ingest", tasks.ingest_task, workspace, config, code, refresh=refresh)
        except QualityGateError:
            quality = Path(workspace) / "reports" / "quality" / "quality_summary.json"
            if quality.exists():
                art.publish([{"key": "ingest-quality", "markdown": art.quality_markdown(json.loads(quality.read_text()))}],
                            _description(workspace))
            raise
        s = result["summary"]
        art.publish([
            {"key": "ingest-conservation", "table": art.conservation_rows(s)},
            {"key": "ingest-quality", "markdown": art.quality_markdown(s.get("quality", {}))},
        ], _description(workspace))
        return result


@flow(name="pseudonymise")
def pseudonymise_flow(workspace: str, config: Config, code: str | None = None, key_file: str | None = None,
                      key_fp: str | None = None, refresh: bool = False) -> dict:
    """Split staged/ into keyed identifiers, payload and the encrypted crosswalk."""
    with workspace_run(workspace):
        return run_stage("pseudonymise", tasks.pseudonymise_task, workspace, config, code, key_fp, refresh,
                         key_file=key_file)


@flow(name="link")
def link_flow(workspace: str, config: Config, code: str | None = None, refresh: bool = False) -> dict:
    """Link into persons and households, then apply the linkage gates (``[flow]`` minimums)."""
    with workspace_run(workspace):
        result = run_stage("link", tasks.link_task, workspace, config, code, refresh=refresh)
        report = tasks.linkage_report_task(workspace, config)
        checks, failures = linkage_checks(report, config.flow)
        summary = json.loads((Path(workspace) / "linked" / "summary.json").read_text())
        art.publish([{"key": "linkage-metrics", "table": art.linkage_rows(summary, checks)}], _description(workspace))
        result["checks"] = checks
        if failures:
            raise QualityGateError("linkage quality below the minimums in [flow]: " + "; ".join(failures))
        return result


@flow(name="assemble")
def assemble_flow(workspace: str, config: Config, code: str | None = None, key_file: str | None = None,
                  key_fp: str | None = None, refresh: bool = False) -> dict:
    """Build research/ (the research suites' critical failures stop the run)."""
    with workspace_run(workspace):
        result = run_stage("assemble", tasks.assemble_task, workspace, config, code, key_fp, refresh,
                           key_file=key_file)
        art.publish([{"key": "research-summary", "table": art.research_rows(result["summary"])}],
                    _description(workspace))
        return result


@flow(name="evaluate")
def evaluate_flow(workspace: str, config: Config, code: str | None = None, key_file: str | None = None,
                  key_fp: str | None = None, refresh: bool = False) -> dict:
    """Measure linkage and mobility estimates against truth/ (synthetic runs)."""
    with workspace_run(workspace):
        result = run_stage("evaluate", tasks.evaluate_task, workspace, config, code, key_fp, refresh,
                           key_file=key_file)
        art.publish([{"key": "linkage-evaluation", "table": art.evaluation_rows(result["summary"])}],
                    _description(workspace))
        return result


@flow(name="disclose")
def disclose_flow(workspace: str, config: Config, code: str | None = None, key_file: str | None = None,
                  key_fp: str | None = None, refresh: bool = False) -> dict:
    """Publish the standard tables under disclosure control."""
    with workspace_run(workspace):
        result = run_stage("disclose", tasks.disclose_task, workspace, config, code, key_fp, refresh,
                           key_file=key_file)
        art.publish([{"key": "disclosure-summary", "table": art.disclosure_rows(result["summary"])}],
                    _description(workspace))
        return result

