"""What engineers and auditors read: run status, quarantine summaries and the reports.

Run status is read from the summary files each stage writes (counts and timings, never
records). Quarantine summaries count rejected rows per source, file, column and reason
(DuckDB over ``quarantine/*.parquet``); the rejected lines themselves (``raw``) are never
read. Reports are served from an allow-list of folders and file types inside
``reports/``; a path that leaves its folder, names a hidden file or an unlisted type is
not found.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import duckdb

from linkage.db import connect, read_literal

#: report name -> (folder under reports/, index file, title, audience)
REPORTS: dict[str, tuple[str, str, str]] = {
    "quality": ("quality/data_docs", "index.html", "Data quality: Great Expectations Data Docs (ingest)"),
    "research-quality": ("quality/research/data_docs", "index.html", "Data quality: research tables (assemble)"),
    "linkage": ("linkage", "report.html", "Linkage quality"),
    "disclosure": ("disclosure", "report.html", "Disclosure decisions"),
}
#: JSON summaries an auditor may fetch through the API
JSON_REPORTS: dict[str, str] = {
    "quality": "quality/quality_summary.json",
    "ingest": "quality/ingest_summary.json",
    "linkage": "linkage/report.json",
    "disclosure": "disclosure/report.json",
    "evaluation": "evaluation.json",
}
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
    """The file of a report (its index when ``path`` is empty), or ``None`` when not allowed or absent."""
    if report not in REPORTS:
        return None
    folder, index, _ = REPORTS[report]
    base = (Path(workspace) / "reports" / folder).resolve()
    rel = path or index
    parts = Path(rel).parts
    if not parts or any(p.startswith(".") or p in ("", "..") for p in parts) or Path(rel).is_absolute():
        return None
    target = (base / rel).resolve()
    try:
        target.relative_to(base)
    except ValueError:
        return None
    if target.suffix.lower() not in SERVED_SUFFIXES or not target.is_file():
        return None
    return target


def json_report(workspace: Path | str, name: str) -> dict | None:
    """One of the JSON summaries in :data:`JSON_REPORTS`, or ``None`` if absent."""
    if name not in JSON_REPORTS:
        return None
    path = Path(workspace) / "reports" / JSON_REPORTS[name]
    return _json(path) if path.is_file() else None


def reports_index(workspace: Path | str) -> list[dict]:
    """Every report: name, title, whether present, when written."""
    ws = Path(workspace)
    out = []
    for name, (folder, index, title) in REPORTS.items():
        p = ws / "reports" / folder / index
        out.append({"name": name, "title": title, "kind": "html", "present": p.is_file(), "updated": _mtime(p)})
    for name, rel in JSON_REPORTS.items():
        p = ws / "reports" / rel
        out.append({"name": name, "title": f"{name} summary (JSON)", "kind": "json", "present": p.is_file(),
                    "updated": _mtime(p)})
    return out


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
