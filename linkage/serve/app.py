"""The portal's application: :func:`create_app` wires users, sessions, the audit log, the
catalogue and the table builder into one FastAPI app (API under ``/api``, pages elsewhere).

Example:
    >>> app = create_app("workspace", load_config())          # doctest: +SKIP
    >>> [r.path for r in app.routes if r.path.startswith("/api/tables")][:1]   # doctest: +SKIP
    ['/api/tables']
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from linkage.config import Config, load_config
from linkage.errors import WorkspaceError
from linkage.keys import MasterKey, load_master_key
from linkage.serve.audit import AuditLog
from linkage.serve.auth import Gatekeeper, PageForbidden, PageLogin, Sessions, who
from linkage.serve.builder import Builder
from linkage.serve.catalogue import Catalogue, suppressed_total
from linkage.serve.denials import Denials
from linkage.serve.guard import Guard, is_api
from linkage.serve.users import User, UserStore

log = logging.getLogger(__name__)

#: the portal's templates and style sheet are package data, read through importlib.resources so the
#: portal runs from an installed wheel and from a wheel imported as a zip alike (no file-system path)
RESOURCES = importlib.resources.files("linkage.serve")
_STATIC_NAME = re.compile(r"[a-z0-9_-]{1,40}\.css")
HOME = {"researcher": "/catalogue", "auditor": "/reports", "engineer": "/runs"}


@dataclass
class Portal:
    """Everything the routes share: the workspace, config, key (never shown) and the stores."""

    workspace: Path
    config: Config
    key: MasterKey
    users: UserStore
    sessions: Sessions
    audit: AuditLog
    catalogue: Catalogue
    builder: Builder
    templates: jinja2.Environment
    denials: Denials
    gate: Gatekeeper

    def record(self, request: Request, user: User, action: str, params: dict | None = None, outcome: str = "ok",
               detail: dict | None = None) -> dict:
        """Audit what ``user`` did in ``request``: its parameters, the client address and the token id."""
        return self.audit.append(user.name, user.role, action, {**(params or {}), **who(request)}, outcome, detail)

    def refused(self, request: Request, status: int, reason: str) -> None:
        """Audit a refused request (aggregated): who, if known, the path and why."""
        user = getattr(request.state, "user", None)
        self.denials.record(user.name if user else "-", user.role if user else "-", "request.refused",
                            {"path": request.url.path[:300], "method": request.method, "status": status,
                             "reason": reason[:200], **who(request)}, "refused")

    def render(self, request: Request, template: str, status: int = 200, headers: dict | None = None,
               **context) -> HTMLResponse:
        """Render a page template (autoescaped)."""
        from linkage.serve.auth import optional_page_user

        context.setdefault("me", optional_page_user(request))
        context.setdefault("home", HOME)
        html = self.templates.get_template(template).render(request=request, **context)
        return HTMLResponse(html, status_code=status, headers=headers)


@functools.lru_cache(maxsize=64)
def _template_source(name: str) -> str | None:
    # template names come from the code, never from a request; a name that is not a plain file name is not one
    if not re.fullmatch(r"_?[a-z_]{1,40}\.html", name):
        return None
    try:
        return (RESOURCES / "templates" / name).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError, KeyError):
        return None


@functools.lru_cache(maxsize=16)
def static_file(name: str) -> bytes | None:
    """A style sheet shipped with the portal (``static/<name>.css``), or ``None``."""
    if not _STATIC_NAME.fullmatch(name):
        return None
    try:
        return (RESOURCES / "static" / name).read_bytes()
    except (FileNotFoundError, NotADirectoryError, KeyError):
        return None


def _templates() -> jinja2.Environment:
    def load(name: str):
        source = _template_source(name)
        return None if source is None else (source, None, lambda: True)

    env = jinja2.Environment(loader=jinja2.FunctionLoader(load), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda v: "" if v is None else (f"{v:,.0f}" if float(v).is_integer() or abs(v) >= 1000
                                                          else f"{v:,.3g}" if abs(v) < 10 else f"{v:,.1f}")
    env.filters["kv"] = _kv
    env.filters["suppressed_total"] = suppressed_total
    return env


def _kv(v) -> str:
    # an audit parameter as text: lists joined, mappings as "key value" pairs, no JSON punctuation
    if isinstance(v, dict):
        return "; ".join(f"{k} {_kv(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(_kv(x) for x in v)
    if isinstance(v, bool):
        return "yes" if v else "no"
    return "" if v is None else str(v)


def create_app(workspace: Path | str, config: Config | None = None, key: MasterKey | None = None) -> FastAPI:
    """Build the portal for one workspace.

    Args:
        workspace: the workspace folder (reads ``published/``, ``research/`` through the
            disclosure engine, ``reports/``, ``quarantine/``; writes ``service/`` and ``audit/``).
        config: the configuration (default: the project's ``hhlink.toml``).
        key: the master key (decrypting ``research/``, perturbation of on-demand tables and the
            audit log's MACs);
            default: the configured key (``HHLINK_KEY`` etc.). It never appears in a response.

    Returns:
        The FastAPI application (serve it with uvicorn, or :func:`linkage.serve.serve`).

    Raises:
        WorkspaceError: the workspace folder does not exist.
    """
    from linkage.serve import api, pages

    ws = Path(workspace)
    if not ws.is_dir():
        raise WorkspaceError(f"{ws}: workspace not found")
    config = config or load_config()
    key = key or load_master_key(workspace=ws)
    audit = AuditLog(ws, key, fsync=config.service.audit_fsync)
    users, denials = UserStore(ws), Denials(audit)
    portal = Portal(ws, config, key, users,
                    Sessions(config.service.session_minutes, config.service.session_max_minutes), audit,
                    Catalogue(ws, config), Builder(ws, config, key, audit), _templates(), denials,
                    Gatekeeper(users, audit, denials))
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        denials.flush(everything=True)

    app = FastAPI(title="hhlink portal", version="1.0", lifespan=lifespan,
                  description="Published aggregate tables, the table builder (answered through disclosure "
                              "control), reports and the audit log. Bearer tokens come from `hhlink users add`.",
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.portal = portal
    # no redirect from "/x/" to "/x": Starlette builds it as an absolute URL from the request's Host header,
    # which a client chooses (an open redirect); every link the portal draws is exact
    app.router.redirect_slashes = False

    def guard_refusal(scope, status: int, reason: str) -> None:
        client = scope.get("client")
        denials.record("-", "-", "request.refused", {"path": scope.get("path", "")[:300].encode("unicode_escape")
                                                     .decode("ascii"), "method": str(scope.get("method", ""))[:20],
                                                     "status": status, "reason": reason,
                                                     "client": client[0] if client else "-"}, "refused")

    # summaries of refusal bursts that have ended are written as soon as anything else happens
    app.add_middleware(Guard, on_refusal=guard_refusal, before=denials.flush)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        body = static_file(name)
        if body is None:
            raise HTTPException(404, "no such file")
        return Response(body, media_type="text/css; charset=utf-8")

    app.include_router(api.build_router(portal))
    app.include_router(pages.router)

    @app.exception_handler(PageLogin)
    async def _login(request: Request, exc: PageLogin):
        from urllib.parse import quote

        return RedirectResponse(f"/login?next={quote(exc.next_path, safe='/')}", status_code=303)

    @app.exception_handler(PageForbidden)
    async def _forbidden(request: Request, exc: PageForbidden):
        return portal.render(request, "error.html", 403, title="Not for your role",
                             message=f"Your role ({exc.user.role}) may not open this page.")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: HTTPException):
        headers = getattr(exc, "headers", None)
        if exc.status_code not in (401, 429) and not getattr(request.state, "audited", False):
            # 401 and 429 are audited by the gatekeeper, role refusals and the rest where they are decided
            portal.refused(request, exc.status_code, str(exc.detail))
        if is_api(request.url.path):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)
        return portal.render(request, "error.html", exc.status_code, title=f"Error {exc.status_code}",
                             message=str(exc.detail), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0].get("loc", ())) if errors else "request"
        reason = f"{where}: {errors[0].get('msg', 'invalid')}" if errors else "invalid request"
        portal.refused(request, 422, reason)
        if is_api(request.url.path):
            # the offending input is not echoed back (it may be long or odd); the place and the rule are
            return JSONResponse({"detail": [{"loc": e.get("loc"), "msg": e.get("msg"), "type": e.get("type")}
                                            for e in errors[:10]]}, status_code=422)
        return portal.render(request, "error.html", 400, title="Error 400", message=reason)

    return app
