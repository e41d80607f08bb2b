"""What engineers and auditors read: run status, quarantine summaries and the reports.

Run status is read from the summary files each stage writes (counts and timings, never
records). Quarantine summaries count rejected rows per source, file, column and reason
(DuckDB over ``quarantine/*.parquet``); the rejected lines themselves (``raw``) are never
read. Reports are served from an allow-list of folders and file types inside
``reports/``; a path that leaves its folder, names a hidden file or an unlisted type, or
passes through a symbolic link is not found. Each report has one name, used alike by the
list (``/api/reports``), the item route and the pages.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import duckdb

from linkage.db import connect, read_literal
from linkage.serve.files import confined, read_confined

@dataclass(frozen=True)
class Report:
    """A report auditors and engineers read: a page (HTML, its folder under ``reports/``) and/or a JSON summary."""

    title: str
    folder: str | None = None          # the HTML report's folder under reports/
    index: str = "index.html"          # its first page
    summary: str | None = None         # the JSON summary, under reports/


#: every report, by the one name the list, the item route and the pages all use
REPORTS: dict[str, Report] = {
    "quality": Report("Data quality of the delivered extracts (Great Expectations, ingest)", "quality/data_docs",
                      summary="quality/quality_summary.json"),
    "ingest": Report("Ingest counts: rows read, staged and quarantined", summary="quality/ingest_summary.json"),
    "research-quality": Report("Data quality of the research tables (Great Expectations, assemble)",
                               "quality/research/data_docs", summary="quality/research/quality_summary.json"),
    "linkage": Report("Linkage quality", "linkage", "report.html", summary="linkage/report.json"),
    "disclosure": Report("Disclosure decisions", "disclosure", "report.html", summary="disclosure/report.json"),
    "evaluation": Report("Linkage accuracy against the synthetic truth", summary="evaluation.json"),
}
REPORT_NAME_PATTERN = "^(" + "|".join(re.escape(n) for n in REPORTS) + ")$"
SERVED_SUFFIXES = {".html", ".css", ".js", ".json", ".png", ".gif", ".svg", ".ico", ".woff", ".woff2", ".ttf",
                   ".eot", ".otf", ".map"}
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css", ".js": "text/javascript",
               ".json": "application/json", ".png": "image/png", ".gif": "image/gif", ".svg": "image/svg+xml",
               ".ico": "image/x-icon", ".woff": "font/woff", ".woff2": "font/woff2", ".ttf": "font/ttf",
               ".eot": "application/vnd.ms-fontobject", ".otf": "font/otf", ".map": "application/json"}


def _mtime(path: Path) -> str | None:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(path.stat().st_mtime))
    except FileNotFoundError:
        return None


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def report_file(workspace: Path | str, report: str, path: str = "") -> Path | None:
    """The file of an HTML report (its first page when ``path`` is empty), or ``None`` when not allowed
    or absent: only regular files of the listed types, inside the report's folder, reached through no
    symbolic link (see :func:`linkage.serve.files.confined`)."""
    spec = REPORTS.get(report)
    if spec is None or spec.folder is None:
        return None
    rel = path or spec.index
    if PurePosixPath(rel).suffix.lower() not in SERVED_SUFFIXES:
        return None
    return confined(Path(workspace) / "reports", f"{spec.folder}/{rel}")


def read_report(workspace: Path | str, report: str, path: str = "") -> tuple[bytes, str] | None:
    """The bytes and media type of :func:`report_file`, opened without following links; ``None`` if refused."""
    target = report_file(workspace, report, path)
    if target is None:
        return None
    spec = REPORTS[report]
    body = read_confined(Path(workspace) / "reports", f"{spec.folder}/{path or spec.index}")
    return (body, MEDIA_TYPES[target.suffix.lower()]) if body is not None else None


def json_report(workspace: Path | str, name: str) -> dict | None:
    """A report's JSON summary, or ``None`` if it has none or it is absent (read only from inside ``reports/``)."""
    spec = REPORTS.get(name)
    if spec is None or spec.summary is None:
        return None
    raw = read_confined(Path(workspace) / "reports", spec.summary)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def report_info(workspace: Path | str, name: str) -> dict:
    """A report's name, title, when written, and where to read it: ``page`` (URL of the HTML report) and
    ``summary`` (URL of the JSON summary), each ``None`` when not written."""
    spec = REPORTS[name]
    zone = Path(workspace) / "reports"
    page = confined(zone, f"{spec.folder}/{spec.index}") if spec.folder else None
    summary = confined(zone, spec.summary) if spec.summary else None
    written = [t for t in (_mtime(page) if page else None, _mtime(summary) if summary else None) if t]
    return {"name": name, "title": spec.title, "present": bool(page or summary), "updated": max(written, default=None),
            "page": f"/reports/{name}/" if page else None, "summary": f"/api/reports/{name}" if summary else None}


def reports_index(workspace: Path | str) -> list[dict]:
    """Every report (:func:`report_info`), whether written or not."""
    return [report_info(workspace, name) for name in REPORTS]


def run_status(workspace: Path | str) -> list[dict]:
    """Per stage: whether its output is there, when it was written, and a few counts from its summary."""
    ws = Path(workspace)
    stages = []

    def add(stage: str, path: Path, counts: dict) -> None:
        stages.append({"stage": stage, "output": str(path.relative_to(ws)), "present": path.exists(),
                       "updated": _mtime(path), "counts": {k: v for k, v in counts.items() if v is not None}})

    planted = _json(ws / "truth" / "planted.json")
    add("generate", ws / "landing", {"persons": planted.get("persons")})
    ing = _json(ws / "reports" / "quality" / "ingest_summary.json")
    rows = ing.get("rows", {}) if isinstance(ing.get("rows"), dict) else {}
    add("ingest", ws / "staged" / "manifest.json",
        {"rows_read": rows.get("read"), "rows_staged": rows.get("staged"), "rows_quarantined": rows.get("quarantined"),
         "quality_passed": ing.get("passed")})
    pse = _json(ws / "pseudonymised" / "metadata.json")
    add("pseudonymise", ws / "pseudonymised" / "metadata.json",
        {"rows": sum(pse.get("rows", {}).values()) if isinstance(pse.get("rows"), dict) else None})
    lk = _json(ws / "linked" / "summary.json")
    add("link", ws / "linked" / "summary.json",
        {k: lk.get(k) for k in ("records", "persons", "pairs_scored", "household_years", "parent_child_relations",
                                "seconds")})
    ev = _json(ws / "reports" / "evaluation.json")
    add("evaluate", ws / "reports" / "evaluation.json",
        {k: ev.get(k) for k in ("person_pairwise_precision", "person_pairwise_recall", "person_pairwise_f1")})
    rs = _json(ws / "research" / "metadata.json")
    add("assemble", ws / "research" / "metadata.json", rs.get("rows", {}) if isinstance(rs.get("rows"), dict) else {})
    pub = _json(ws / "published" / "index.json")
    dis = _json(ws / "reports" / "disclosure" / "report.json")
    add("disclose", ws / "published" / "index.json",
        {"tables": len(pub.get("tables", [])) if pub else None,
         "seconds": dis.get("run", {}).get("seconds") if isinstance(dis.get("run"), dict) else None})
    return stages


def quarantine_summary(workspace: Path | str) -> list[dict]:
    """Rejected rows per source, file, column and reason (counts only; the rows are never read)."""
    folder = Path(workspace) / "quarantine"
    out = []
    for path in sorted(folder.glob("*.parquet")):
        con = connect(threads=1)
        try:
            rows = con.execute(
                'select coalesce(_file, \'\'), coalesce("column", \'\'), coalesce(reason, \'\'), count(*) '
                f"from read_parquet({read_literal(path)}) group by all order by 4 desc, 1, 2, 3").fetchall()
        except duckdb.Error:
            rows = []
        finally:
            con.close()
        out.append({"source": path.stem, "rows": sum(r[3] for r in rows), "updated": _mtime(path),
                    "reasons": [{"file": f, "column": c, "reason": r, "rows": n} for f, c, r, n in rows]})
    return out
