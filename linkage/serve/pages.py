"""The portal's web pages: server-rendered, no scripts; session cookie and CSRF-protected forms.

================================ ============== =================================================
page                             roles          shows
================================ ============== =================================================
``/login``, ``/logout``          -              sign in with a token; sign out (POST, CSRF)
``/catalogue``                   researcher     published tables
``/catalogue/{name}``            researcher     data dictionary, chart or heat map, rows, downloads
``/builder``                     researcher     the table builder (POST, CSRF, quota, audited)
``/reports``, ``/reports/...``   auditor, eng.  data-quality, linkage-quality and disclosure reports
``/audit``, ``/audit/verify``    auditor        the audit log (paged; by user, action, day), its check
``/runs``, ``/quarantine``       engineer       run status; quarantine counts and reasons
================================ ============== =================================================
"""

from __future__ import annotations

import re
import secrets
from html import escape as html_escape
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from linkage.serve.api import check_days
from linkage.serve.app import HOME
from linkage.serve.auth import (LOGIN_COOKIE, SESSION_COOKIE, PageUser, csrf_ok, optional_page_user,
                                page_user, who)
from linkage.serve.builder import BuildResult, Refusal, decisions
from linkage.serve.catalogue import NAME_PATTERN, NotFound, TableView
from linkage.serve.charts import bar_svg, heat_cells
from linkage.serve.status import REPORTS, json_report, quarantine_summary, read_report, reports_index, run_status
from linkage.serve.words import plain

router = APIRouter(include_in_schema=False)
researcher = page_user("researcher")
auditor = page_user("auditor")
engineer = page_user("engineer")
reader = page_user("auditor", "engineer")


def _portal(request: Request):
    return request.app.state.portal


def _cookie(response: Response, request: Request, name: str, value: str, max_age: int | None = None) -> None:
    response.set_cookie(name, value, max_age=max_age, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")


_LOCAL_PATH = re.compile(r"/(?![/\\])[A-Za-z0-9/_.~%=&?+-]{0,299}")


def _safe_next(path: str | None) -> str | None:
    # only a local path: never another host ("//evil", "/\\evil", "/\t/evil", "https://...")
    return path if path and _LOCAL_PATH.fullmatch(path) and "//" not in path else None


async def _form(request: Request) -> dict:
    form = await request.form()
    return {"csrf": form.get("csrf"), "token": form.get("token"), "next": form.get("next"),
            "dimensions": [str(v) for v in form.getlist("dimensions")][:10], "measure": form.get("measure")}


# -- sign in and out --------------------------------------------------------------------------

@router.get("/")
async def root(request: Request):
    me = optional_page_user(request)
    return RedirectResponse(HOME[me.user.role] if me else "/login", status_code=303)


@router.get("/healthz")
async def health():
    return {"status": "ok"}


@router.get("/favicon.ico")
async def favicon():
    # browsers ask for it on every report page; nothing to show
    return Response(status_code=204)


@router.get("/login")
async def login_form(request: Request, next: str | None = Query(None, max_length=300)):
    token = secrets.token_urlsafe(24)
    response = _portal(request).render(request, "login.html", title="Sign in", csrf=token, next=_safe_next(next) or "",
                                       error=None, me=None)
    _cookie(response, request, LOGIN_COOKIE, token, max_age=1800)
    return response


@router.post("/login")
async def login(request: Request):
    portal = _portal(request)
    form = await _form(request)
    nxt = _safe_next(form["next"])
    if not csrf_ok(request.cookies.get(LOGIN_COOKIE), form["csrf"]):
        raise HTTPException(403, "the sign-in form expired or did not come from this site; reload it and try again")
    token = str(form["token"] or "").strip()
    user, status, headers = await portal.gate.authenticate(request, token, "page")
    if user is None:
        fresh = secrets.token_urlsafe(24)
        error = ("Too many failed sign-ins from this address or for this token: try again in "
                 f"{headers.get('Retry-After', 'a few')} seconds." if status == 429 else "That token is not valid.")
        response = portal.render(request, "login.html", status, headers=headers or None, title="Sign in", csrf=fresh,
                                 next=nxt or "", error=error, me=None)
        _cookie(response, request, LOGIN_COOKIE, fresh, max_age=1800)
        return response
    sid, _ = portal.sessions.create(user)
    portal.record(request, user, "login", {"via": "page"})
    response = RedirectResponse(nxt or HOME[user.role], status_code=303)
    _cookie(response, request, SESSION_COOKIE, sid)
    response.delete_cookie(LOGIN_COOKIE, path="/", httponly=True, samesite="strict")
    return response


@router.post("/logout")
async def logout(request: Request):
    portal = _portal(request)
    me = optional_page_user(request)
    form = await _form(request)
    if me is None:
        return RedirectResponse("/login", status_code=303)
    if not csrf_ok(me.csrf, form["csrf"]):
        raise HTTPException(403, "missing or wrong CSRF token")
    portal.sessions.end(request.cookies.get(SESSION_COOKIE))
    portal.record(request, me.user, "logout", {"via": "page"})
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# -- researchers ------------------------------------------------------------------------------

@router.get("/catalogue")
async def catalogue(request: Request, me: PageUser = Depends(researcher)):
    portal = _portal(request)
    tables = portal.catalogue.summaries()
    portal.record(request, me.user, "catalogue.list", {"via": "page"})
    return portal.render(request, "catalogue.html", title="Published tables", tables=tables)


def _chart(view: TableView, params: dict, labels: dict) -> dict:
    """The chart (bar or heat map) a table page shows, from its query parameters (validated here)."""
    dims = view.dimension_columns
    measures = [m for m in view.measures if not _companion(m, view.measures)]
    count = view.count_measure()
    measure = params.get("measure") or next((m for m in measures if m != count), measures[0])
    if measure not in measures:
        raise HTTPException(400, "unknown measure")
    levels = {c: view.column_dimension(c) for c in dims}
    distinct = list(dict.fromkeys(d for d, _ in levels.values()))
    finest = {d: c for c, (d, _) in levels.items()}          # finest column of each dimension
    coarsest = {d: c for c, (d, _) in reversed(levels.items())}
    # local authorities (150 categories) are a geography: the comparison a table is for is the other
    # dimension, drawn as grouped bars by region; two small dimensions read best as a matrix
    geo = next((d for d in distinct if finest[d] == "la"), None)
    small = [d for d in distinct if d != geo]
    comparison = next((finest[d] for d in small if 2 <= len(view.categories(finest[d])) - 1 <= 8), None)
    default = "bar" if geo and comparison else "heat" if len(small) >= 2 else "bar"
    kind = params.get("chart") or default
    if kind not in ("bar", "heat") or (kind == "heat" and len(distinct) < 2):
        raise HTTPException(400, "unknown chart")
    fixed = {}
    for col in dims:
        v = params.get(f"f.{col}")
        if v:
            if v not in view.categories(col):
                raise HTTPException(400, f"unknown category for {col}")
            fixed[col] = v
    zero = view.measure_kind(measure) in ("count", "proportion", "sum", "")
    if kind == "bar":
        default_x = coarsest[geo] if geo else finest[distinct[0]]
        x = params.get("x") or default_x
        group = params["g"] if "g" in params else (comparison if geo and x == default_x else "")
        if x not in dims or (group and (group not in dims or levels[group][0] == levels[x][0])):
            raise HTTPException(400, "unknown column")
        fixed.pop(x, None)
        if group:
            fixed.pop(group, None)
        items = view.points(measure, [x, group] if group else [x], fixed)
        for i in items:
            i["category"], i["group"] = i[x], i.get(group) if group else None
        groups = [c for c in view.categories(group) if c != "Total"] if group else []
        title = f"{measure} by {x}" + (f" and {group}" if group else "")
        return {"kind": "bar", "measure": measure, "x": x, "g": group or "", "fixed": fixed, "zero": zero,
                "suppressed": sum(i["value"] is None for i in items), "items": len(items),
                "intervals": sum(i.get("low") is not None for i in items),
                "svg": bar_svg(items, title, labels, zero=zero, groups=groups, group_title=group or "")}
    cols_default = [finest[d] for d in (small if len(small) >= 2 else distinct)[-2:]]
    if len(view.categories(cols_default[1])) > len(view.categories(cols_default[0])):
        cols_default.reverse()             # the longer list down the side: the matrix fits the page's width
    rows, cols = params.get("x") or cols_default[0], params.get("y") or cols_default[1]
    if rows not in dims or cols not in dims or levels[rows][0] == levels[cols][0]:
        raise HTTPException(400, "choose two columns of different dimensions")
    fixed.pop(rows, None)
    fixed.pop(cols, None)
    only_counts = all(m == count for m in measures)
    share = params.get("share", "row" if only_counts else "") == "row"
    heat = heat_cells(view.matrix(measure, rows, cols, fixed), share=share, zero=zero)
    return {"kind": "heat", "measure": measure, "x": rows, "y": cols, "g": "", "fixed": fixed, "share": share,
            "heat": heat, "zero": zero, "intervals": 0,
            "suppressed": sum(c["cls"] == "suppressed" for line in heat["grid"] for c in line)}


COMPANION_SUFFIXES = ("_ci_lower", "_ci_upper", "_ci_low", "_ci_high", "_lower", "_upper", "_n")


def _companion(measure: str, measures: list[str]) -> bool:
    # an interval's bounds or an n published as measures of their own are drawn with their measure
    return any(measure == f"{m}{suffix}" for m in measures
               for suffix in COMPANION_SUFFIXES)


@router.get("/catalogue/{name}")
async def table_page(request: Request, name: str, me: PageUser = Depends(researcher)):
    portal = _portal(request)
    try:
        view = portal.catalogue.get(name)
    except NotFound:
        raise HTTPException(404, f"no published table '{name}'") from None
    params = {k: v for k, v in request.query_params.items() if len(v) <= 100}
    labels = portal.catalogue.labels()
    try:
        chart = _chart(view, params, labels)
        filters = {c: params[f"r.{c}"] for c in view.dimension_columns if params.get(f"r.{c}")}
        rows = view.select(filters, params.get("r.measure") or None)
    except NotFound:
        raise HTTPException(400, "unknown column") from None
    page = _page_number(params.get("page"))
    portal.record(request, me.user, "table.view", {"table": name, "via": "page"})
    return portal.render(request, "table.html", title=view.meta.get("title", name), view=view, chart=chart,
                         labels=labels, params=params, filters=filters,
                         **_rows_page(rows, page, {k: v for k, v in params.items() if k != "page"}))


ROWS_PER_PAGE = 50


def _page_number(raw: str | None) -> int:
    try:
        return max(1, min(10**6, int(raw or 1)))
    except ValueError:
        raise HTTPException(400, "page must be a number") from None


def _rows_page(rows, page: int, keep: dict) -> dict:
    """One page of a table's rows and the links to the others (``keep``: the query to carry along)."""
    total = len(rows)
    pages = max(1, -(-total // ROWS_PER_PAGE))
    page = min(page, pages)
    start = (page - 1) * ROWS_PER_PAGE
    return {"rows": rows.iloc[start:start + ROWS_PER_PAGE].to_dict("records"), "total_rows": total,
            "first_row": start + 1 if total else 0, "last_row": min(total, start + ROWS_PER_PAGE), "page": page,
            "pages": pages, "page_query": lambda n: urlencode({**keep, "page": n}) + "#rows"}


@router.get("/catalogue/{name}/download")
async def table_download(request: Request, name: str, format: str = Query("csv", pattern="^(csv|json)$"),
                         me: PageUser = Depends(researcher)):
    portal = _portal(request)
    try:
        view = portal.catalogue.get(name)
    except NotFound:
        raise HTTPException(404, f"no published table '{name}'") from None
    portal.record(request, me.user, "table.download", {"table": name, "format": format, "via": "page"})
    return _download(view, format)


def _download(view: TableView, format: str) -> Response:
    body, media = (view.csv, "text/csv; charset=utf-8") if format == "csv" else (view.json, "application/json")
    return Response(body, media_type=media,
                    headers={"Content-Disposition": f'attachment; filename="{view.name}.{format}"'})


def _builder_context(portal, me: PageUser) -> dict:
    from linkage.sdc import standard

    cfg = portal.config.disclosure
    dims = []
    for d in cfg.allowed_dimensions:
        try:
            dims.append({"name": d, "description": plain(standard.dimension(d, portal.config).description, portal.config)})
        except Exception:  # noqa: BLE001 - a name the catalogue does not know is not offered
            continue
    measures = [{"name": m, "description": standard.MEASURES[m][3]} for m in cfg.allowed_measures if m in standard.MEASURES]
    return {"dims": dims, "measures": measures, "quota": portal.builder.quota(me.user.name),
            "max_cells": portal.config.service.max_cells}


@router.get("/builder")
async def builder_form(request: Request, result: str | None = Query(None, pattern=NAME_PATTERN),
                       page: int = Query(1, ge=1, le=10**6), me: PageUser = Depends(researcher)):
    """The table builder's form; with ``result``, one of the caller's recent answers again, at a page of its
    rows (no new request, no quota; audited as a read of the result)."""
    portal = _portal(request)
    if result is None:
        return portal.render(request, "builder.html", title="Table builder", result=None, error=None, chosen=[],
                             chosen_measure=None, **_builder_context(portal, me))
    view = portal.builder.result(me.user, result)
    if view is None:
        raise HTTPException(404, "no recent result of yours by that name")
    portal.record(request, me.user, "builder.result", {"table": result, "format": "page", "page": page, "via": "page"})
    dims = [d.get("name") for d in view.meta.get("dimensions", []) if isinstance(d, dict)]
    answer = BuildResult({}, view, decisions(view.meta), False, portal.builder.quota(me.user.name), 0.0)
    return _builder_result(request, portal, me, answer, page, chosen=dims, chosen_measure=None)


def _builder_result(request: Request, portal, me: PageUser, res: BuildResult, page: int, **ctx):
    """The builder page showing an answer: chart, a page of its rows, its dictionary and downloads."""
    labels = portal.catalogue.labels()
    chart = _chart(res.view, {}, labels)
    # the measure asked for first, its counts after (the engine lists counts first)
    frame = res.view.frame.sort_values("measure", key=lambda m: m != chart["measure"], kind="stable")
    rows = _rows_page(frame, page, {"result": res.view.name})
    return portal.render(request, "builder.html", title="Table builder", result=res, chart=chart, error=None,
                         labels=labels, view=res.view, pager=True, **rows, **ctx, **_builder_context(portal, me))


@router.post("/builder")
async def builder(request: Request, me: PageUser = Depends(researcher)):
    portal = _portal(request)
    form = await _form(request)
    if not csrf_ok(me.csrf, form["csrf"]):
        raise HTTPException(403, "missing or wrong CSRF token")
    raw = {"dimensions": form["dimensions"], "measure": form["measure"] or "count"}
    ctx = dict(chosen=form["dimensions"], chosen_measure=form["measure"])
    try:
        res = await run_in_threadpool(portal.builder.answer, me.user, raw, "page", who(request))
    except Refusal as r:
        return portal.render(request, "builder.html", r.status, title="Table builder", result=None, error=r.message,
                             **ctx, **_builder_context(portal, me))
    return _builder_result(request, portal, me, res, 1, **ctx)


@router.get("/builder/results/{name}")
async def builder_download(request: Request, name: str, format: str = Query("csv", pattern="^(csv|json)$"),
                           me: PageUser = Depends(researcher)):
    portal = _portal(request)
    view = portal.builder.result(me.user, name)
    if view is None:
        raise HTTPException(404, "no recent result of yours by that name")
    portal.record(request, me.user, "builder.result", {"table": name, "format": format, "via": "page"})
    return _download(view, format)


# -- auditors and engineers -------------------------------------------------------------------

@router.get("/reports")
async def reports(request: Request, me: PageUser = Depends(reader)):
    portal = _portal(request)
    out = reports_index(portal.workspace)
    portal.record(request, me.user, "report.list", {"via": "page"})
    return portal.render(request, "reports.html", title="Reports", reports=out)


@router.get("/reports/summary/{name}.json")
async def report_summary(request: Request, name: str, me: PageUser = Depends(reader)):
    portal = _portal(request)
    doc = json_report(portal.workspace, name)
    if doc is None:
        raise HTTPException(404, "no such report")
    portal.record(request, me.user, "report.view", {"report": name, "via": "page"})
    return doc


@router.get("/reports/{report}")
async def report_root(report: str, me: PageUser = Depends(reader)):
    if report not in REPORTS or REPORTS[report].folder is None:
        raise HTTPException(404, "no such report")
    return RedirectResponse(f"/reports/{report}/", status_code=307)


@router.get("/reports/{report}/{path:path}")
async def report_page(request: Request, report: str, path: str, me: PageUser = Depends(reader)):
    portal = _portal(request)
    found = read_report(portal.workspace, report, path)
    if found is None:
        raise HTTPException(404, "no such report file")
    body, media = found
    if media.startswith("text/html"):
        portal.record(request, me.user, "report.view", {"report": report, "file": path or "index", "via": "page"})
        body = with_portal_nav(body, me, REPORTS[report].title)
    return Response(body, media_type=media)


AUDIT_PER_PAGE = 50
DAY = r"^\d{4}-\d{2}-\d{2}$"


@router.get("/audit")
async def audit_page(request: Request, page: int = Query(1, ge=1, le=10**6),
                     user: str = Query("", max_length=64, pattern=r"^[A-Za-z0-9._:@-]*$"),
                     action: str = Query("", max_length=40, pattern=r"^[a-z._-]*$"),
                     since: str = Query("", pattern=DAY + "|^$"), until: str = Query("", pattern=DAY + "|^$"),
                     me: PageUser = Depends(auditor)):
    portal = _portal(request)
    check_days(since, until)
    portal.denials.flush(everything=True)        # show refusal bursts counted so far
    filters = {"user": user, "action": action, "since": since, "until": until}
    entries, matching, total = portal.audit.search(user or None, action or None, since or None, until or None,
                                                   (page - 1) * AUDIT_PER_PAGE, AUDIT_PER_PAGE, newest_first=True)
    actors, actions = portal.audit.actors_and_actions()
    portal.record(request, me.user, "audit.view", {"page": page, "via": "page", **{k: v for k, v in filters.items() if v}})
    pages = max(1, -(-matching // AUDIT_PER_PAGE))
    return portal.render(request, "audit.html", title="Audit log", entries=entries, total=total, matching=matching,
                         page=page, pages=pages, filters=filters, actors=actors, actions=actions,
                         groups=sorted({a.split(".")[0] + "." for a in actions if "." in a}), verification=None,
                         per_page=AUDIT_PER_PAGE,
                         query=lambda **kw: urlencode({k: v for k, v in {**filters, **kw}.items() if v}))


@router.get("/audit/verify")
async def audit_verify(request: Request, me: PageUser = Depends(auditor)):
    portal = _portal(request)
    result = await run_in_threadpool(portal.audit.verify)
    portal.record(request, me.user, "audit.verify", {"via": "page"}, "ok" if result.ok else "tampered",
                        {"entries": result.entries, "first_bad_seq": result.first_bad_seq, "problem": result.problem})
    return portal.render(request, "audit.html", title="Audit log check", entries=[], total=result.entries,
                         matching=0, page=1, pages=1, filters={}, actors=[], actions=[], groups=[],
                         verification=result, query=lambda **kw: "", per_page=AUDIT_PER_PAGE)


@router.get("/runs")
async def runs(request: Request, me: PageUser = Depends(engineer)):
    portal = _portal(request)
    stages = run_status(portal.workspace)
    releases = await run_in_threadpool(_releases, portal.workspace)
    portal.record(request, me.user, "runs.view", {"via": "page"})
    return portal.render(request, "runs.html", title="Run status", stages=stages, releases=releases)


def _releases(workspace) -> list[dict] | str:
    """The recorded releases, newest first, or the ledger's one-line problem."""
    from linkage.errors import HhlinkError
    from linkage.releases import read_releases

    try:
        return read_releases(workspace)[::-1]
    except HhlinkError as exc:
        return str(exc)


@router.get("/quarantine")
async def quarantine(request: Request, me: PageUser = Depends(engineer)):
    portal = _portal(request)
    sources = quarantine_summary(portal.workspace)
    portal.record(request, me.user, "quarantine.view", {"via": "page"})
    return portal.render(request, "quarantine.html", title="Quarantine", sources=sources)



_BODY_OPEN = re.compile(rb"<body[^>]*>", re.IGNORECASE)


def with_portal_nav(html: bytes, me: PageUser, title: str) -> bytes:
    """A generated report page with the portal's navigation bar added at the top of its body (links
    only: the reports' policy allows no forms; styles inline, as the reports' own are)."""
    links = [("/reports", "All reports")] + ([("/audit", "Audit log")] if me.user.role == "auditor" else []) + (
        [("/runs", "Run status"), ("/quarantine", "Quarantine")] if me.user.role == "engineer" else [])
    a = "".join(f'<a href="{href}" style="color:#fff;margin-right:1rem;text-decoration:none">{text}</a>'
                for href, text in links)
    nav = (f'<nav class="hhlink-portal-nav" aria-label="portal" style="background:#0b3d62;color:#fff;'
           f'padding:.5rem 1.5rem;font:14px system-ui,sans-serif;position:relative;z-index:10000">'
           f'<a href="/" style="color:#fff;font-weight:700;margin-right:1.5rem;text-decoration:none">hhlink portal</a>'
           f'{a}<span style="opacity:.8">{html_escape(title)} · {html_escape(me.user.name)} '
           f'({html_escape(me.user.role)})</span></nav>').encode()
    m = _BODY_OPEN.search(html)
    return html[:m.end()] + nav + html[m.end():] if m else nav + html
