"""The portal's outermost layer: security headers on every response, and requests screened
before any route sees them.

:class:`Guard` is ASGI middleware that

* adds the security headers (no caching, no sniffing, no framing by others, a
  Content-Security-Policy) to every response, errors included;
* answers HEAD as GET without the body;
* refuses with 400 a request target holding a control character (``%00``, ``%0a`` ...) or
  percent-encoding that is not UTF-8, before routing (file names are built from paths);
* refuses with 414 a request target (path and query) longer than :data:`MAX_TARGET` bytes;
* refuses with 413 a body larger than :data:`MAX_BODY` bytes, whether it declares its
  length or streams it, so no form or JSON parser ever holds more;
* answers 500 itself (with the headers, and without the exception's text) if a route
  fails anyway, so nothing reaches the client unscreened.

Each refusal is handed to the portal's audit (aggregated there: see
:class:`linkage.serve.denials.Denials`).

Example:
    >>> bad_target(b"/reports/linkage/a%00b", b"")
    'the request target holds a control character'
    >>> bad_target(b"/catalogue/transition_region", b"x=1") is None
    True
"""

from __future__ import annotations

import json
import logging
from urllib.parse import unquote_to_bytes

log = logging.getLogger(__name__)

__all__ = ["MAX_BODY", "MAX_TARGET", "PAGE_CSP", "REPORT_CSP", "Guard", "bad_target", "is_api"]

PAGE_CSP = ("default-src 'self'; script-src 'none'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
# generated reports (GX Data Docs) run their own vendored scripts and inline styles; they may not fetch
# anything (connect-src 'none'), so a script in a report can read nothing the auditor is not already looking at
REPORT_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
              "img-src 'self' data:; font-src 'self' data:; connect-src 'none'; object-src 'none'; base-uri 'self'; "
              "form-action 'none'; frame-ancestors 'self'")
#: the largest request body the portal reads (forms and JSON are a few hundred bytes)
MAX_BODY = 16 * 1024
#: the longest request target (path and query string) the portal reads; its own links are a few hundred bytes
MAX_TARGET = 8 * 1024
_CONTROL = bytes(range(0x20)) + b"\x7f"


def is_api(path: str) -> bool:
    """Whether a path is answered in JSON (the API, the spec, the health check)."""
    return path.startswith("/api/") or path in ("/api", "/openapi.json", "/healthz")


def bad_target(raw_path: bytes, query: bytes) -> str | None:
    """Why a request target is refused (a control character, or not UTF-8 once decoded), or ``None``."""
    for part in (raw_path, query.replace(b"+", b" ")):
        try:
            decoded = unquote_to_bytes(part)
        except (TypeError, ValueError):
            return "the request target is not valid percent-encoding"
        if any(b in _CONTROL for b in decoded):
            return "the request target holds a control character"
        try:
            decoded.decode("utf-8")
        except UnicodeDecodeError:
            return "the request target is not UTF-8"
    return None


class _TooLarge(Exception):
    pass


def _security_headers(path: str) -> list[tuple[bytes, bytes]]:
    csp = REPORT_CSP if path.startswith("/reports/") and not path.startswith("/reports/summary/") else PAGE_CSP
    return [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
            (b"x-frame-options", b"SAMEORIGIN"), (b"cache-control", b"no-store"),
            (b"content-security-policy", csp.encode())]


class Guard:
    """ASGI middleware: security headers on every response; bad targets, oversized bodies and failures
    answered here with a 4xx (or a bare 500) instead of reaching, or escaping from, a route.

    Args:
        app: the application.
        on_refusal: ``callable(scope, status, reason)`` called for each request refused here (the audit).
        before: a callable run before each request (the audit's pending summaries).
        max_body: the largest body read, in bytes.
    """

    def __init__(self, app, on_refusal=None, before=None, max_body: int = MAX_BODY):
        self.app = app
        self.on_refusal = on_refusal
        self.before = before
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.before is not None:
            self.before()
        path = scope.get("path", "")
        extra = _security_headers(path)
        started = False
        # HEAD is answered as GET without the body (same status and headers, audited alike)
        head = scope.get("method") == "HEAD"
        if head:
            scope = {**scope, "method": "GET"}

        async def send_with_headers(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                message = {**message, "headers": headers + [(k, v) for k, v in extra if k not in names]}
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        raw_path = scope.get("raw_path") or path.encode("utf-8", "surrogateescape")
        if len(raw_path) + len(scope.get("query_string", b"")) > MAX_TARGET:
            return await self._refuse(scope, send_with_headers, 414, f"request target over {MAX_TARGET} bytes")
        reason = bad_target(raw_path, scope.get("query_string", b""))
        if reason is not None:
            return await self._refuse(scope, send_with_headers, 400, reason)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body:
            return await self._refuse(scope, send_with_headers, 413, f"request body over {self.max_body} bytes")
        seen = 0

        async def bounded_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, bounded_receive, send_with_headers)
        except _TooLarge:
            if started:
                raise
            await self._refuse(scope, send_with_headers, 413, f"request body over {self.max_body} bytes")
        except Exception as exc:  # noqa: BLE001 - the last line of defence: never a traceback, always the headers
            log.error("unhandled %s answering %s %s", exc.__class__.__name__, scope.get("method"), path[:200])
            if started:
                raise
            await _answer(send_with_headers, 500, "internal error: the request was not completed", is_api(path))

    async def _refuse(self, scope, send, status: int, reason: str) -> None:
        if self.on_refusal is not None:
            try:
                self.on_refusal(scope, status, reason)
            except Exception as exc:  # noqa: BLE001 - a refusal is answered even if its audit entry fails
                log.error("could not audit a refused request: %s", exc.__class__.__name__)
        await _answer(send, status, reason, is_api(scope.get("path", "")))


def _content_length(scope) -> int | None:
    for k, v in scope.get("headers", []):
        if k.lower() == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


async def _answer(send, status: int, message: str, api: bool) -> None:
    if api:
        body, media = json.dumps({"detail": message}).encode(), b"application/json"
    else:
        body = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Error {status}</title></head>"
                f"<body><h1>Error {status}</h1><p>{message}</p><p><a href=\"/\">Back to the start</a></p></body>"
                "</html>").encode()
        media = b"text/html; charset=utf-8"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", media), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
