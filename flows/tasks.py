"""Prefect tasks: one generic task for every registry stage, plus the I/O around it.

The stage task is cached on their input fingerprint (:mod:`flows._fingerprint`), passed in
as the ``fingerprint`` parameter: an unchanged stage is skipped and its stored summary
returned. Results (the stage's summary, counts only) are kept as JSON in the workspace
(``.flow/results/``), so the cache travels with the zones it describes. Stage tasks are
not retried: they are deterministic, so a failure is a data or code problem, and a re-run
picks up after the last completed stage. I/O tasks (hashing files, reading reports,
calling the Prefect API) retry with back-off.

A stage's unexpected error (not an :class:`~linkage.errors.HhlinkError`, whose messages are
safe by contract) is replaced by its class name: a DuckDB or pandas message can quote a
value, and task failures go to the Prefect server's logs. ``HHLINK_DEBUG=1`` keeps it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from prefect import task

from linkage.config import Config
from linkage.errors import HhlinkError
from flows.fingerprint import input_fingerprint, output_digest
from flows.progress import stage_logs

__all__ = ["StageError", "fingerprint_task", "linkage_report_task", "outputs_unchanged", "stage_task"]

IO_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 5, 15]}


class StageError(HhlinkError):
    """A stage failed for a reason its own errors do not describe (details withheld from logs)."""


def _by_fingerprint(context, parameters: dict) -> str:
    return parameters["fingerprint"]


STAGE_OPTIONS = {"cache_key_fn": _by_fingerprint, "persist_result": True, "result_serializer": "json"}


def _plain(value):
    """JSON-safe copy of a summary (paths as text, numpy numbers as Python numbers)."""
    def default(o):
        if hasattr(o, "item"):
            return o.item()
        return str(o)
    return json.loads(json.dumps(value, default=default))


def _run(stage: str, workspace: str, fingerprint: str, call) -> dict:
    t = time.perf_counter()
    with stage_logs(stage):
        try:
            summary = call()
        except HhlinkError:
            raise
        except Exception as exc:
            if os.environ.get("HHLINK_DEBUG") == "1":
                raise
            raise StageError(f"{stage}: unexpected {exc.__class__.__name__} (details withheld: they can quote "
                             f"record values); rerun with HHLINK_DEBUG=1 to see them") from None
    return {"stage": stage, "summary": _plain(summary), "outputs": output_digest(stage, workspace),
            "fingerprint": fingerprint, "seconds": round(time.perf_counter() - t, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


@task(name="fingerprint-inputs", **IO_RETRIES)
def fingerprint_task(stage: str, workspace: str, config: Config, code: str, key_fingerprint: str | None) -> str:
    """Hash what ``stage`` reads (files, config sections, code version, key fingerprint)."""
    digest, _ = input_fingerprint(stage, workspace, config, code, key_fingerprint)
    return digest


@task(name="check-outputs", **IO_RETRIES)
def outputs_unchanged(stage: str, workspace: str, expected: str) -> bool:
    """Whether ``stage``'s published outputs are still the ones its cached result recorded."""
    return output_digest(stage, workspace) == expected


@task(name="stage", task_run_name="{stage}", **STAGE_OPTIONS)
def stage_task(stage: str, workspace: str, config: Config, fingerprint: str, key_file: str | None = None) -> dict:
    """Run one registry stage (:func:`linkage.stages.run_stage`); the key is read here, never passed.

    Cached on ``fingerprint`` (the stage's inputs, code, config and key fingerprint).
    """
    from linkage.stages import run_stage

    return _run(stage, workspace, fingerprint, lambda: run_stage(stage, config, workspace, key_file=key_file))


@task(name="read-linkage-report", **IO_RETRIES)
def linkage_report_task(workspace: str, config: Config) -> dict:
    """``reports/linkage/report.json``, rebuilt from linked/ if it has gone missing since link ran."""
    path = Path(workspace) / "reports" / "linkage" / "report.json"
    if not path.exists():
        from linkage.link.report import write_report

        write_report(config, workspace)
    return json.loads(path.read_text())
