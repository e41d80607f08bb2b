"""Who is asking: bearer tokens for the API, session cookies and CSRF tokens for the pages.

API routes take ``Authorization: Bearer <token>`` only; pages take the ``hhlink_session``
cookie only (HttpOnly, SameSite=Strict, Secure over HTTPS), set by signing in with a token
on ``/login``. Sessions live in the server's memory and end after ``service.session_minutes``
idle (and at sign-out or restart). Every form carries the session's CSRF token; the sign-in
form, before any session exists, a double-submit token (cookie and field must match).

Each route names the roles it admits: no credentials or a wrong one gives 401 (API) or a
redirect to ``/login`` (pages); a valid user with another role gives 403 and an audit entry.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from linkage.serve.users import User

log = logging.getLogger(__name__)

SESSION_COOKIE = "hhlink_session"
LOGIN_COOKIE = "hhlink_login"
bearer = HTTPBearer(auto_error=False, description="A token from `hhlink users add`.")


@dataclass
class Session:
    """A signed-in browser: its user, CSRF token and last activity."""

    name: str
    role: str
    token_id: str
    csrf: str
    seen: float = field(default_factory=time.monotonic)


class Sessions:
    """Server-side sessions, keyed by the SHA-256 of the cookie value (the value itself is not kept)."""

    def __init__(self, idle_minutes: int):
        self.idle = idle_minutes * 60
        self._lock = threading.Lock()
        self._sessions: dict[bytes, Session] = {}

    @staticmethod
    def _key(sid: str) -> bytes:
        return hashlib.sha256(sid.encode("utf-8", "replace")).digest()

    def create(self, user: User) -> tuple[str, Session]:
        """Start a session; returns the cookie value and the session."""
        sid = secrets.token_urlsafe(32)
        s = Session(user.name, user.role, user.token_id, secrets.token_urlsafe(32))
        with self._lock:
            now = time.monotonic()
            if len(self._sessions) > 10_000:
                self._sessions = {k: v for k, v in self._sessions.items() if now - v.seen < self.idle}
            self._sessions[self._key(sid)] = s
        return sid, s

    def get(self, sid: str | None) -> Session | None:
        """The live session for a cookie value, refreshed; ``None`` if unknown or idle too long."""
        if not sid or len(sid) > 200:
            return None
        key = self._key(sid)
        with self._lock:
            s = self._sessions.get(key)
            if s is None:
                return None
            now = time.monotonic()
            if now - s.seen > self.idle:
                del self._sessions[key]
                return None
            s.seen = now
            return s

    def end(self, sid: str | None) -> None:
        """Sign out."""
        if sid:
            with self._lock:
                self._sessions.pop(self._key(sid), None)

    def end_user(self, name: str) -> None:
        """End every session of a user (removed or rotated)."""
        with self._lock:
            self._sessions = {k: v for k, v in self._sessions.items() if v.name != name}


def csrf_ok(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison of CSRF tokens; missing tokens never match."""
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))


class PageLogin(Exception):
    """A page needs a signed-in session: redirect to the sign-in page."""

    def __init__(self, next_path: str):
        self.next_path = next_path


class PageForbidden(Exception):
    """A signed-in user's role may not open this page."""

    def __init__(self, user: User, roles: tuple[str, ...]):
        self.user, self.roles = user, roles


def _deny(request: Request, user: User, roles: tuple[str, ...]) -> None:
    portal = request.app.state.portal
    portal.audit.append(user.name, user.role, "access.denied", {"path": request.url.path, "method": request.method,
                                                                "roles": list(roles)}, outcome="denied")


def api_user(*roles: str):
    """A dependency admitting API callers whose bearer token belongs to one of ``roles``."""

    async def dependency(request: Request,
                         credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> User:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise HTTPException(401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"})
        users = request.app.state.portal.users
        user = users.cached(credentials.credentials)
        if user is False:
            # the scrypt check takes ~50 ms: off the event loop
            user = await run_in_threadpool(users.authenticate, credentials.credentials)
        if user is None:
            log.info("API request with an invalid token refused: %s %s", request.method, request.url.path)
            raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
        if user.role not in roles:
            _deny(request, user, roles)
            raise HTTPException(403, f"role '{user.role}' may not use this route")
        return user

    return dependency


@dataclass(frozen=True)
class PageUser:
    """A signed-in page user and their session's CSRF token."""

    user: User
    csrf: str


def page_user(*roles: str):
    """A dependency admitting page requests with a live session of one of ``roles``."""

    def dependency(request: Request) -> PageUser:
        portal = request.app.state.portal
        session = portal.sessions.get(request.cookies.get(SESSION_COOKIE))
        user = portal.users.get(session.name) if session else None
        if not _same(session, user):
            raise PageLogin(request.url.path)
        if user.role not in roles:
            _deny(request, user, roles)
            raise PageForbidden(user, roles)
        return PageUser(user, session.csrf)

    return dependency


def optional_page_user(request: Request) -> PageUser | None:
    """The signed-in user of any role, or ``None``."""
    portal = request.app.state.portal
    session = portal.sessions.get(request.cookies.get(SESSION_COOKIE))
    user = portal.users.get(session.name) if session else None
    if not _same(session, user):
        return None
    return PageUser(user, session.csrf)


def _same(session: Session | None, user: User | None) -> bool:
    # a session ends when its user is removed, changes role or gets a new token
    return (session is not None and user is not None and user.role == session.role
            and user.token_id == session.token_id)
