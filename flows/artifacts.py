"""Prefect artifacts: each run's reports for the UI, keyed so every key builds a history.

Builders are pure functions from a stage's summary (counts, rates, timings: never a record
value, never a key) to an artifact; :func:`publish` sends them with retries.

=========================== ======== ==========================================================
key                         kind     content
=========================== ======== ==========================================================
``ingest-conservation``     table    per landing file: rows read = staged + quarantined, reasons
``ingest-quality``          markdown Great Expectations results per source, critical failures
``linkage-metrics``         table    records, persons, households, pairs; the linkage gates
``linkage-evaluation``      table    precision, recall, F1 against the truth (synthetic runs)
``research-summary``        table    rows per research table and the research suites' results
``disclosure-summary``      table    per published table: cells, suppressions, LP protection
``household-linkage-run``   markdown stages run or cached, seconds, links to the HTML reports
``quality-gate``            markdown why a run stopped before publishing
=========================== ======== ==========================================================

Example:
    >>> rows = conservation_rows({"sources": {"education": {"files": [
    ...     {"file": "education.csv", "rows_read": 5, "rows_staged": 4, "rows_quarantined": 1,
    ...      "reasons": {"bad_date": 1}}]}}})
    >>> rows[0]["conserved"]
    True
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

__all__ = ["conservation_rows", "disclosure_rows", "evaluation_rows", "gate_markdown", "linkage_rows",
           "publish", "quality_markdown", "report_links", "research_rows", "run_markdown", "stage_artifacts"]

HTML_REPORTS = (
    ("Data quality (Great Expectations Data Docs)", "reports/quality/data_docs/index.html"),
    ("Research tables' data quality", "reports/quality/research/data_docs/index.html"),
    ("Linkage quality", "reports/linkage/report.html"),
    ("Disclosure decisions", "reports/disclosure/report.html"),
)
JSON_REPORTS = (
    ("Ingest summary", "reports/quality/ingest_summary.json"),
    ("Expectation results", "reports/quality/quality_summary.json"),
    ("Linkage quality (JSON)", "reports/linkage/report.json"),
    ("Mobility measures and sensitivity", "reports/mobility.json"),
    ("Evaluation against the truth", "reports/evaluation.json"),
    ("Disclosure decisions (JSON)", "reports/disclosure/report.json"),
)


def conservation_rows(summary: dict) -> list[dict]:
    """Ingest: one row per landing file; ``conserved`` is read == staged + quarantined."""
    rows = []
    for source, s in summary.get("sources", {}).items():
        for f in s.get("files", []):
            rows.append({"source": source, "file": f["file"], "rows_read": f["rows_read"],
                         "rows_staged": f["rows_staged"], "rows_quarantined": f["rows_quarantined"],
                         "conserved": f["rows_read"] == f["rows_staged"] + f["rows_quarantined"],
                         "quarantine_reasons": ", ".join(f"{k} {v}" for k, v in f.get("reasons", {}).items()) or "-"})
    return rows


def quality_markdown(quality: dict, title: str = "Data quality at ingest") -> str:
    """Ingest or research: expectation counts per suite and the critical failures (names and rates only)."""
    lines = [f"# {title}", "", "| suite | evaluated | passed | critical failed | warnings failed |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for source, s in quality.get("sources", {}).items():
        lines.append(f"| {source} | {s.get('evaluated', 0)} | {s.get('passed', 0)} | {s.get('critical_failed', 0)} "
                     f"| {s.get('warnings_failed', 0)} |")
    failed = quality.get("critical_failed") or []
    lines += ["", "**Critical failures**: " + ("none" if not failed else "")]
    lines += [f"- {f}" for f in failed]
    return "\n".join(lines) + "\n"


def linkage_rows(summary: dict, checks: list[dict]) -> list[dict]:
    """Link: the counts from ``linked/summary.json`` and the gate checks."""
    rows = [{"metric": k.replace("_", " "), "value": summary.get(k), "minimum": None, "passed": None}
            for k in ("records", "identities", "persons", "household_years", "parent_child_relations",
                      "pairs_scored", "threshold", "seconds") if k in summary]
    rows += [{"metric": c["check"], "value": c["value"], "minimum": c["minimum"], "passed": c["passed"]}
             for c in checks]
    return rows


def evaluation_rows(metrics: dict) -> list[dict]:
    """Evaluate: person, household and parent-child accuracy against the truth."""
    keys = ("person_pairwise_precision", "person_pairwise_recall", "person_pairwise_f1", "person_cluster_f1",
            "household_accuracy", "parent_child_precision", "parent_child_recall", "ige_planted",
            "ige_estimated", "ige_true_links")
    return [{"metric": k.replace("_", " "), "value": metrics.get(k)} for k in keys if k in metrics]


def research_rows(summary: dict) -> list[dict]:
    """Assemble: rows per research table (estimates stay in research/, not in the UI)."""
    failed = (summary.get("quality") or {}).get("critical_failed") or []
    rows = [{"table": t, "rows": n} for t, n in summary.get("rows", {}).items()]
    rows.append({"table": "research suites: critical failures", "rows": len(failed)})
    return rows


def disclosure_rows(summary: dict) -> list[dict]:
    """Disclose: per published table, cells, primary and secondary suppressions and the LP audit."""
    return [{"table": t["table"], "cells": t["cells"], "suppressed_primary": t["suppressed"]["primary"],
             "suppressed_secondary": t["suppressed"]["secondary"], "protected": t["protected"],
             "seconds": t.get("seconds")} for t in summary.get("tables", [])]


def stage_artifacts(stage: str, summary: dict) -> list[dict]:
    """The artifacts a stage's flow publishes after the stage ran (or was cached)."""
    if stage == "ingest":
        return [{"key": "ingest-conservation", "table": conservation_rows(summary)},
                {"key": "ingest-quality", "markdown": quality_markdown(summary.get("quality", {}))}]
    builders = {"assemble": ("research-summary", research_rows), "evaluate": ("linkage-evaluation", evaluation_rows),
                "disclose": ("disclosure-summary", disclosure_rows)}
    if stage in builders:
        key, build = builders[stage]
        return [{"key": key, "table": build(summary)}]
    return []


def report_links(workspace: Path | str) -> list[tuple[str, str]]:
    """(title, file URI) of every report the workspace holds."""
    root = Path(workspace).resolve()
    return [(title, (root / rel).as_uri()) for title, rel in (*HTML_REPORTS, *JSON_REPORTS) if (root / rel).exists()]


def run_markdown(workspace: Path | str, stages: dict[str, dict]) -> str:
    """The run: each stage ran or cached with its seconds, and links to the reports."""
    root = Path(workspace).resolve()
    lines = [f"# household-linkage run on `{root}`", "", "| stage | status | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {name} | {s['status']} | {s['seconds']:.1f} |" for name, s in stages.items()]
    lines += ["", "## Reports", ""]
    lines += [f"- [{title}]({uri})" for title, uri in report_links(root)]
    lines += ["", f"Published tables: `{root / 'published'}`; research tables: `{root / 'research'}`."]
    return "\n".join(lines) + "\n"


def gate_markdown(stage: str, reason: str, workspace: Path | str) -> str:
    """A failed quality gate: where and why the run stopped, and that nothing was published."""
    root = Path(workspace).resolve()
    lines = ["# Run stopped by a quality gate", "", f"- **stage**: {stage}", f"- **reason**: {reason}",
             f"- `{root / 'published'}` was not changed: the last published tables stay in place.", "",
             "## Reports", ""]
    lines += [f"- [{title}]({uri})" for title, uri in report_links(root)]
    return "\n".join(lines) + "\n"


@task(name="publish-artifacts", retries=3, retry_delay_seconds=[2, 5, 15])
def publish(artifacts: list[dict], description: str = "") -> list[str]:
    """Create artifacts (``{"key", "table"}`` or ``{"key", "markdown"}``) on the Prefect server.

    Retries with back-off: this is a call to the API.
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    created = []
    for a in artifacts:
        if "table" in a:
            create_table_artifact(table=a["table"], key=a["key"], description=a.get("description", description))
        else:
            create_markdown_artifact(markdown=a["markdown"], key=a["key"],
                                     description=a.get("description", description))
        created.append(a["key"])
    return created
