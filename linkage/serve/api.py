"""The JSON API (``/api``): bearer tokens only; each route names the roles it admits.

================================== ============== ==============================================
route                              roles          returns
================================== ============== ==============================================
``GET /api/me``                    any            the caller's name and role
``GET /api/tables``                researcher     the catalogue of published tables
``GET /api/tables/{name}``         researcher     a table's data dictionary and SDC metadata
``GET /api/tables/{name}/data``    researcher     its protected rows (JSON or CSV)
``POST /api/builder``              researcher     an on-demand protected table (quota, audited)
``GET /api/builder/quota``         researcher     the caller's quota today
``GET /api/builder/results/{n}``   researcher     a table the caller requested again, no new request
``GET /api/reports``               auditor, eng.  the reports and when they were written
``GET /api/reports/{name}``        auditor, eng.  a report's JSON summary
``GET /api/audit``                 auditor        audit entries, newest first
``GET /api/audit/verify``          auditor        the audit log's integrity check
``GET /api/runs``                  engineer       each stage's output and counts
``GET /api/quarantine``            engineer       rejected rows per source, column and reason
================================== ============== ==============================================
"""

from __future__ import annotations

import datetime
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from linkage.serve.auth import api_user, who
from linkage.serve.builder import Refusal
from linkage.serve.catalogue import NAME_PATTERN, NotFound
from linkage.serve.status import (REPORT_NAME_PATTERN, json_report, quarantine_summary, report_info, reports_index,
                                  run_status)
from linkage.serve.users import User

MAX_BODY = 4096


class Problem(BaseModel):
    """An error: what was wrong (never a record value)."""

    detail: Any


class Me(BaseModel):
    """The caller."""

    name: str
    role: str


class TableSummary(BaseModel):
    """A published table in the catalogue."""

    name: str
    title: str
    description: str
    unit: str
    dimensions: list[str]
    measures: list[str]
    rows: int
    cells: int | None
    suppressed_cells: int


class TableData(BaseModel):
    """A protected table's rows: dimension columns, ``measure``, ``value`` (null when suppressed), ``status``."""

    table: str
    columns: list[str]
    rows: list[dict[str, Any]]


class Quota(BaseModel):
    """Table-builder requests today (UTC)."""

    limit: int
    used: int
    remaining: int
    resets_in_seconds: int


class BuilderAnswer(BaseModel):
    """An on-demand table after disclosure control, and what control did (counts only)."""

    request: dict[str, Any]
    table: str
    title: str
    cached: bool
    seconds: float
    quota: Quota
    disclosure: dict[str, Any]
    dictionary: dict[str, Any]
    columns: list[str]
    rows: list[dict[str, Any]]


class ReportInfo(BaseModel):
    """A report, when it was written, and the URLs of its page and JSON summary (``null`` when not written)."""

    name: str
    title: str
    present: bool
    updated: str | None
    page: str | None
    summary: str | None


class ReportDoc(BaseModel):
    """A report: when it was written, the URL of its page, and its JSON summary (``null`` if it has none)."""

    name: str
    title: str
    present: bool
    updated: str | None
    page: str | None
    summary: dict[str, Any] | None


class AuditPage(BaseModel):
    """Audit entries, newest first: ``total`` lines in the log, ``matching`` the filters."""

    total: int
    matching: int
    offset: int
    entries: list[dict[str, Any]]


class VerificationOut(BaseModel):
    """The audit log's integrity check."""

    ok: bool
    entries: int
    head: str
    mac_checked: bool
    first_bad_line: int | None
    first_bad_seq: int | None
    problem: str | None
    message: str


class StageStatus(BaseModel):
    """One stage's output and a few counts."""

    stage: str
    output: str
    present: bool
    updated: str | None
    counts: dict[str, Any]


class QuarantineReason(BaseModel):
    """Rejected rows of one file for one column and reason."""

    file: str
    column: str
    reason: str
    rows: int


class QuarantineSource(BaseModel):
    """A source's rejected rows, counted."""

    source: str
    rows: int
    updated: str | None
    reasons: list[QuarantineReason]


def _errors(*codes: int) -> dict:
    text = {400: "Bad request", 401: "Missing or invalid token", 403: "The token's role may not use this route",
            404: "Not found", 413: "Request body too large", 414: "Request target (path and query) too long",
            422: "Invalid or refused request",
            429: "Daily quota reached", 503: "No research tables yet"}
    return {c: {"model": Problem, "description": text[c]} for c in codes}


AUTH = _errors(401, 403)
TableName = Annotated[str, Path(pattern=NAME_PATTERN, description="A published table's name.")]


def build_router(portal) -> APIRouter:
    """The API routes of one portal (the table request's schema lists the config's allowed names)."""
    # any route may answer 400 (a control character or bad encoding in the target) or 414 (too long): the
    # portal's outer layer refuses those before routing (linkage.serve.guard)
    router = APIRouter(prefix="/api", responses=_errors(400, 414))
    researcher, auditor = api_user("researcher"), api_user("auditor")
    engineer, reader = api_user("engineer"), api_user("auditor", "engineer")
    anyone = api_user("researcher", "auditor", "engineer")

    @router.get("/me", response_model=Me, responses=AUTH, tags=["users"])
    async def me(user: User = Depends(anyone)):
        """The caller's name and role."""
        return {"name": user.name, "role": user.role}

    @router.get("/tables", response_model=list[TableSummary], responses=AUTH, tags=["tables"])
    def tables(request: Request, user: User = Depends(researcher)):
        """The published tables: titles, dimensions, measures and suppression counts."""
        out = portal.catalogue.summaries()
        portal.record(request, user, "catalogue.list", {"via": "api"})
        return out

    @router.get("/tables/{name}", response_model=dict[str, Any], responses={**AUTH, **_errors(404, 422)},
                tags=["tables"])
    async def dictionary(request: Request, name: TableName, user: User = Depends(researcher)):
        """A table's data dictionary: columns, dimensions, measures, and its SDC metadata (counts only)."""
        meta = _published(name).meta
        portal.record(request, user, "table.dictionary", {"table": name, "via": "api"})
        return meta

    @router.get("/tables/{name}/data", response_model=TableData, tags=["tables"],
                responses={**AUTH, **_errors(404, 422), 200: {"content": {"text/csv": {}}}})
    async def data(request: Request, name: TableName, format: Literal["json", "csv"] = "json",
                   user: User = Depends(researcher)):
        """A table's protected rows as JSON or CSV (suppressed rows have no value)."""
        view = _published(name)
        portal.record(request, user, "table.download", {"table": name, "format": format, "via": "api"})
        if format == "csv":
            return Response(view.csv, media_type="text/csv; charset=utf-8",
                            headers={"Content-Disposition": f'attachment; filename="{name}.csv"'})
        return Response(view.json, media_type="application/json")

    def _published(name: str):
        try:
            return portal.catalogue.get(name)
        except NotFound:
            raise HTTPException(404, f"no published table '{name}'") from None

    model = portal.builder.model
    body_schema = model.model_json_schema()

    @router.post("/builder", response_model=BuilderAnswer, tags=["builder"],
                 responses={**AUTH, **_errors(413, 422, 429, 503)},
                 openapi_extra={"requestBody": {"required": True,
                                                "content": {"application/json": {"schema": body_schema}}}})
    async def build(request: Request, user: User = Depends(researcher)):
        """Build a table from allowed dimensions and a measure, through disclosure control (always perturbed).

        Every request is audited with its disclosure decisions and counts against the daily quota.
        """
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                portal.record(request, user, "builder.request", {"via": "api", "request": "<too large>"}, "refused",
                              {"status": 413, "reason": f"request body over {MAX_BODY} bytes", "quota_counted": False})
                request.state.audited = True
                raise HTTPException(413, f"request body over {MAX_BODY} bytes")
        raw = parse_json(body)
        try:
            res = await run_in_threadpool(portal.builder.answer, user, raw, "api", who(request))
        except Refusal as r:
            return JSONResponse({"detail": r.message}, status_code=r.status, headers=r.headers)
        return answer_json(res)

    @router.get("/builder/quota", response_model=Quota, responses=AUTH, tags=["builder"])
    async def quota(user: User = Depends(researcher)):
        """The caller's table-builder quota today (UTC)."""
        return portal.builder.quota(user.name)

    @router.get("/builder/results/{name}", response_model=TableData, tags=["builder"],
                responses={**AUTH, **_errors(404, 422), 200: {"content": {"text/csv": {}}}})
    async def result(request: Request, name: TableName, format: Literal["json", "csv"] = "json",
                     user: User = Depends(researcher)):
        """A table the caller requested recently, again (no new request, no quota)."""
        view = portal.builder.result(user, name)
        if view is None:
            raise HTTPException(404, f"no recent result '{name}' of yours")
        portal.record(request, user, "builder.result", {"table": name, "format": format, "via": "api"})
        if format == "csv":
            return Response(view.csv, media_type="text/csv; charset=utf-8",
                            headers={"Content-Disposition": f'attachment; filename="{name}.csv"'})
        return Response(view.json, media_type="application/json")

    @router.get("/reports", response_model=list[ReportInfo], responses=AUTH, tags=["reports"])
    def reports(request: Request, user: User = Depends(reader)):
        """Every report (data quality, linkage quality, disclosure, evaluation), when it was written, and
        where to read it; each ``name`` is accepted by ``/api/reports/{name}``."""
        out = reports_index(portal.workspace)
        portal.record(request, user, "report.list", {"via": "api"})
        return out

    @router.get("/reports/{name}", response_model=ReportDoc, responses={**AUTH, **_errors(404, 422)},
                tags=["reports"])
    def report(request: Request, name: Annotated[str, Path(pattern=REPORT_NAME_PATTERN)],
               user: User = Depends(reader)):
        """A report: its name, title, when written, the URL of its page, and its JSON summary (aggregates
        only; ``null`` when the report has only a page)."""
        info = report_info(portal.workspace, name)
        if not info["present"]:
            raise HTTPException(404, f"report '{name}' has not been written")
        doc = json_report(portal.workspace, name)
        portal.record(request, user, "report.view", {"report": name, "via": "api"})
        return {**info, "summary": doc}

    @router.get("/audit", response_model=AuditPage, responses={**AUTH, **_errors(422)}, tags=["audit"])
    def audit(request: Request, offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
              limit: Annotated[int, Query(ge=1, le=500)] = 100,
              actor: Annotated[str | None, Query(max_length=64, pattern=r"^[A-Za-z0-9._:@-]+$")] = None,
              action: Annotated[str | None, Query(max_length=40, pattern=r"^[a-z._-]+$",
                                                  description="an action, or a prefix ending in '.'")] = None,
              since: Annotated[str | None, Query(pattern=r"^\d{4}-\d{2}-\d{2}$")] = None,
              until: Annotated[str | None, Query(pattern=r"^\d{4}-\d{2}-\d{2}$")] = None,
              user: User = Depends(auditor)):
        """Audit entries, newest first, optionally only one actor's, one action's (or action group's, e.g.
        ``auth.``) and within a range of days (UTC)."""
        check_days(since, until)
        portal.denials.flush(everything=True)
        entries, matching, total = portal.audit.search(actor, action, since, until, offset, limit, newest_first=True)
        filters = {k: v for k, v in {"actor": actor, "action": action, "since": since, "until": until}.items() if v}
        portal.record(request, user, "audit.view", {"offset": offset, "limit": limit, "via": "api", **filters})
        return {"total": total, "matching": matching, "offset": offset, "entries": entries}

    @router.get("/audit/verify", response_model=VerificationOut, responses=AUTH, tags=["audit"])
    def verify(request: Request, user: User = Depends(auditor)):
        """Check the audit log: the first entry edited, removed or reordered, if any."""
        result = portal.audit.verify()
        portal.record(request, user, "audit.verify", {"via": "api"}, "ok" if result.ok else "tampered",
                            {"entries": result.entries, "first_bad_seq": result.first_bad_seq,
                             "problem": result.problem})
        return result.to_dict()

    @router.get("/runs", response_model=list[StageStatus], responses=AUTH, tags=["engineering"])
    def runs(request: Request, user: User = Depends(engineer)):
        """Each stage's output: present, when written, and a few counts from its summary."""
        out = run_status(portal.workspace)
        portal.record(request, user, "runs.view", {"via": "api"})
        return out

    @router.get("/quarantine", response_model=list[QuarantineSource], responses=AUTH, tags=["engineering"])
    def quarantine(request: Request, user: User = Depends(engineer)):
        """Rejected rows per source, file, column and reason (counts only, never the rows)."""
        out = quarantine_summary(portal.workspace)
        portal.record(request, user, "quarantine.view", {"via": "api"})
        return out

    return router


def check_days(*days: str | None) -> None:
    # the pattern admits 2026-13-45: a day must also exist
    for d in days:
        if d:
            try:
                datetime.date.fromisoformat(d)
            except ValueError:
                raise HTTPException(422, f"'{d}' is not a day (YYYY-MM-DD)") from None


def parse_json(body: bytes) -> object:
    """A request body as JSON, or a marker the builder refuses (not JSON, not UTF-8, or nested too deeply)."""
    try:
        return json.loads(body or b"null")
    except RecursionError:
        return "<JSON nested too deeply>"
    except (ValueError, UnicodeDecodeError):
        return "<not JSON>"


def answer_json(res) -> dict:
    """A :class:`~linkage.serve.builder.BuildResult` as the API's answer."""
    doc = json.loads(res.view.json)
    return {"request": res.request, "table": res.view.name, "title": res.view.meta.get("title", res.view.name),
            "cached": res.cached, "seconds": round(res.seconds, 3), "quota": res.quota, "disclosure": res.decisions,
            "dictionary": res.view.meta, "columns": doc["columns"], "rows": doc["rows"]}
