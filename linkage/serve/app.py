"""The portal's application: :func:`create_app` wires users, sessions, the audit log, the
catalogue and the table builder into one FastAPI app (API under ``/api``, pages elsewhere).

Example:
    >>> app = create_app("workspace", load_config())          # doctest: +SKIP
    >>> [r.path for r in app.routes if r.path.startswith("/api/tables")][:1]   # doctest: +SKIP
    ['/api/tables']
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from linkage.config import Config, load_config
from linkage.errors import WorkspaceError
from linkage.keys import MasterKey, load_master_key
from linkage.serve.audit import AuditLog
from linkage.serve.auth import PageForbidden, PageLogin, Sessions
from linkage.serve.builder import Builder
from linkage.serve.catalogue import Catalogue
from linkage.serve.users import UserStore

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
PAGE_CSP = ("default-src 'self'; script-src 'none'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
# generated reports (GX Data Docs) run their own vendored scripts and inline styles; they may not fetch
# anything (connect-src 'none'), so a script in a report can read nothing the auditor is not already looking at
REPORT_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
              "img-src 'self' data:; font-src 'self' data:; connect-src 'none'; object-src 'none'; base-uri 'self'; "
              "form-action 'none'; frame-ancestors 'self'")
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

    def render(self, request: Request, template: str, status: int = 200, **context) -> HTMLResponse:
        """Render a page template (autoescaped)."""
        from linkage.serve.auth import optional_page_user

        context.setdefault("me", optional_page_user(request))
        context.setdefault("home", HOME)
        html = self.templates.get_template(template).render(request=request, **context)
        return HTMLResponse(html, status_code=status)


class SecurityHeaders:
    """ASGI middleware: no caching, no sniffing, no framing, and a Content-Security-Policy on every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        csp = (REPORT_CSP if scope.get("path", "").startswith("/reports/") else PAGE_CSP).encode()

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                         (b"x-frame-options", b"SAMEORIGIN"), (b"cache-control", b"no-store"),
                         (b"content-security-policy", csp)]
                headers += [(k, v) for k, v in extra if k not in names]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda v: "" if v is None else (f"{v:,.0f}" if float(v).is_integer() or abs(v) >= 1000
                                                          else f"{v:,.3g}" if abs(v) < 10 else f"{v:,.1f}")
    return env


def create_app(workspace: Path | str, config: Config | None = None, key: MasterKey | None = None) -> FastAPI:
    """Build the portal for one workspace.

    Args:
        workspace: the workspace folder (reads ``published/``, ``research/`` through the
            disclosure engine, ``reports/``, ``quarantine/``; writes ``service/`` and ``audit/``).
        config: the configuration (default: the project's ``hhlink.toml``).
        key: the master key (perturbation of on-demand tables and the audit log's MACs);
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
    portal = Portal(ws, config, key, UserStore(ws), Sessions(config.service.session_minutes), audit,
                    Catalogue(ws, config), Builder(ws, config, key, audit), _templates())
    app = FastAPI(title="hhlink portal", version="1.0",
                  description="Published aggregate tables, the table builder (answered through disclosure "
                              "control), reports and the audit log. Bearer tokens come from `hhlink users add`.",
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.portal = portal
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
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
        if request.url.path.startswith("/api/") or request.url.path in ("/openapi.json", "/healthz"):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)
        return portal.render(request, "error.html", exc.status_code, title=f"Error {exc.status_code}",
                             message=str(exc.detail))

    return app
