"""Who is asking: bearer tokens for the API, session cookies and CSRF tokens for the pages.

API routes take ``Authorization: Bearer <token>`` only; pages take the ``hhlink_session``
cookie only (HttpOnly, SameSite=Strict, Secure over HTTPS), set by signing in with a token
on ``/login``. Sessions live in the server's memory and end after ``service.session_minutes``
idle, ``service.session_max_minutes`` after sign-in however active (and at sign-out or restart). Every form carries the session's CSRF token; the sign-in
form, before any session exists, a double-submit token (cookie and field must match).

Each route names the roles it admits: no credentials or a wrong one gives 401 (API) or a
redirect to ``/login`` (pages); a valid user with another role gives 403 and an audit entry.
Every sign-in decision is audited, and guessing is slowed and then refused per client address
and per token id (:class:`Gatekeeper`, :class:`~linkage.serve.throttle.Throttle`).
"""

from __future__ import annotations

import asyncio
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

from linkage.serve.throttle import Throttle
from linkage.serve.users import User

log = logging.getLogger(__name__)

SESSION_COOKIE = "hhlink_session"
LOGIN_COOKIE = "hhlink_login"
bearer = HTTPBearer(auto_error=False, description="A token from `hhlink users add`.")


@dataclass
class Session:
    """A signed-in browser: its user, CSRF token, start and last activity."""

    name: str
    role: str
    token_id: str
    csrf: str
    seen: float = field(default_factory=time.monotonic)
    started: float = field(default_factory=time.monotonic)


class Sessions:
    """Server-side sessions, keyed by the SHA-256 of the cookie value (the value itself is not kept).

    A session ends after ``idle_minutes`` without a request, and in any case ``max_minutes`` after
    sign-in however active it is (then the user signs in again with their token).
    """

    def __init__(self, idle_minutes: int, max_minutes: int = 8 * 60):
        self.idle = idle_minutes * 60
        self.lifetime = max_minutes * 60
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
                self._sessions = {k: v for k, v in self._sessions.items() if self._live(v, now)}
            self._sessions[self._key(sid)] = s
        return sid, s

    def _live(self, s: Session, now: float) -> bool:
        return now - s.seen <= self.idle and now - s.started <= self.lifetime

    def get(self, sid: str | None) -> Session | None:
        """The live session for a cookie value, refreshed; ``None`` if unknown, idle too long or too old."""
        if not sid or len(sid) > 200:
            return None
        key = self._key(sid)
        with self._lock:
            s = self._sessions.get(key)
            if s is None:
                return None
            now = time.monotonic()
            if not self._live(s, now):
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
    # bytes: compare_digest refuses str with non-ASCII characters (a form may carry anything)
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected).encode("utf-8", "replace"),
                                                                  str(given).encode("utf-8", "replace"))


class PageLogin(Exception):
    """A page needs a signed-in session: redirect to the sign-in page."""

    def __init__(self, next_path: str):
        self.next_path = next_path


class PageForbidden(Exception):
    """A signed-in user's role may not open this page."""

    def __init__(self, user: User, roles: tuple[str, ...]):
        self.user, self.roles = user, roles


def client_address(request: Request) -> str:
    """The client's address as the server saw it (``-`` when unknown)."""
    return request.client.host if request.client else "-"


def who(request: Request) -> dict:
    """What every audit entry of a request records besides its own parameters: the client address and,
    once authenticated, the token id."""
    out = {"client": client_address(request)}
    token_id = getattr(request.state, "token_id", None)
    if token_id:
        out["token_id"] = token_id
    return out


def _deny(request: Request, user: User, roles: tuple[str, ...]) -> None:
    portal = request.app.state.portal
    request.state.audited = True
    portal.denials.record(user.name, user.role, "access.denied",
                          {"path": request.url.path, "method": request.method, "roles": list(roles),
                           "status": 403, **who(request)})


class Gatekeeper:
    """Checks tokens for the API and the sign-in page, audits every decision and throttles guessing.

    * A token verified in the last minutes is accepted at once (no scrypt), and is never throttled.
    * Otherwise the client address and the token id are checked against :class:`Throttle`: over the
      limit, the answer is 429 (after the longest back-off delay) and the token is not looked at.
    * Only one scrypt check runs at a time (``SCRYPT_CONCURRENCY``); concurrent first requests with the
      same token share one check; a secret that failed is remembered (as a digest) and fails again
      without a check; when more than ``MAX_WAITING`` checks wait, the answer is 429 at once.
    * Each failure is audited (aggregated by :class:`~linkage.serve.denials.Denials`) with the token id
      when the token is shaped like one, the client address and the reason; each success is audited
      when the token is verified, and again when a verified token is used from a new address.
    """

    SCRYPT_CONCURRENCY = 1
    MAX_WAITING = 8
    SEEN_SECONDS = 300.0

    def __init__(self, users, audit, denials, throttle: Throttle | None = None):
        self.users, self.audit, self.denials = users, audit, denials
        self.throttle = throttle or Throttle()
        self._scrypt = threading.BoundedSemaphore(self.SCRYPT_CONCURRENCY)
        self._lock = threading.Lock()
        self._waiting = 0
        self._inflight: dict[str, tuple[threading.Event, list, float]] = {}
        self._seen: dict[tuple[str, str], float] = {}

    def _verify(self, token: str, flight: tuple, leader: bool, key: str) -> tuple[User | None, str]:
        # one check per distinct token at a time: followers wait for the leader's answer
        event, result, _ = flight
        if not leader:
            event.wait(timeout=30)
            return tuple(result) if result else (None, "busy")
        try:
            with self._scrypt:
                result.extend(self.users.check(token))
        finally:
            with self._lock:
                self._inflight.pop(key, None)
                self._waiting -= 1
            event.set()
        return tuple(result)

    def _success(self, user: User, request: Request, via: str, verified: bool) -> None:
        client = client_address(request)
        now = time.monotonic()
        with self._lock:
            fresh = self._seen.get((user.token_id, client), 0.0) < now
            if len(self._seen) > 10_000:
                self._seen = {k: t for k, t in self._seen.items() if t > now}
            self._seen[(user.token_id, client)] = now + self.SEEN_SECONDS
        if verified or fresh:
            self.audit.append(user.name, user.role, "auth.ok",
                              {"via": via, "client": client, "token_id": user.token_id,
                               "check": "scrypt" if verified else "recently verified"})

    def _failure(self, request: Request, via: str, token_id: str | None, reason: str, status: int) -> None:
        params = {"via": via, "client": client_address(request), "reason": reason, "status": status,
                  "path": request.url.path}
        if token_id:
            params["token_id"] = token_id
            owner = self.users.owner(token_id)
            if owner:
                params["account"] = owner          # whose token is being tried, for the auditor
        self.denials.record("-", "-", "auth.failed", params, "refused" if status == 429 else "failed")

    async def authenticate(self, request: Request, token: str | None, via: str) -> tuple[User | None, int, dict]:
        """Check a token: ``(user, 200, {})``, or ``(None, 401 or 429, headers)``; audited either way."""
        users = self.users
        token = token or ""
        token_id = users.token_id(token)
        hit = users.cached(token) if token else None
        if isinstance(hit, User):
            request.state.token_id = hit.token_id
            self._success(hit, request, via, verified=False)
            return hit, 200, {}
        if not token:
            # no credentials is not a guess: refused, audited, not counted
            self._failure(request, via, None, "no token", 401)
            return None, 401, {}
        keys = [f"client:{client_address(request)}"] + ([f"token:{token_id}"] if token_id else [])
        wait = self.throttle.retry_after(keys)
        if wait is not None:
            self._failure(request, via, token_id, "too many failed sign-ins", 429)
            # held back like a failure: a client that keeps guessing waits for each answer (no thread is held)
            await asyncio.sleep(self.throttle.max_delay)
            return None, 429, {"Retry-After": str(wait)}
        if hit is None:
            user, reason = None, ("malformed" if token_id is None else
                                  "wrong secret" if users.has_token_id(token_id) else "unknown token id")
        else:
            key = hashlib.sha256(token.encode("ascii", "replace")).hexdigest()
            with self._lock:
                flight = self._inflight.get(key)
                if flight is not None and time.monotonic() - flight[2] > 30:
                    flight = None                   # a check that never ran (its request was cancelled)
                leader = flight is None
                busy = leader and self._waiting >= self.MAX_WAITING
                if leader and not busy:
                    flight = self._inflight[key] = (threading.Event(), [], time.monotonic())
                    self._waiting += 1
            if busy:
                self._failure(request, via, token_id, "too many sign-in checks waiting", 429)
                await asyncio.sleep(self.throttle.max_delay)
                return None, 429, {"Retry-After": "1"}
            user, reason = await run_in_threadpool(self._verify, token, flight, leader, key)
        if user is None:
            self.throttle.fail(keys)
            self._failure(request, via, token_id, reason, 401)
            delay = self.throttle.delay(keys)
            if delay:
                await asyncio.sleep(delay)
            return None, 401, {}
        if token_id:
            self.throttle.clear(f"token:{token_id}")
        request.state.token_id = user.token_id
        self._success(user, request, via, verified=True)
        return user, 200, {}


def api_user(*roles: str):
    """A dependency admitting API callers whose bearer token belongs to one of ``roles``."""

    async def dependency(request: Request,
                         credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> User:
        gate = request.app.state.portal.gate
        token = credentials.credentials if credentials is not None and credentials.scheme.lower() == "bearer" else None
        user, status, headers = await gate.authenticate(request, token, "api")
        if user is None:
            if status == 429:
                raise HTTPException(429, "too many failed sign-ins from this address or for this token; "
                                         "try again later", headers=headers)
            raise HTTPException(401, "a bearer token is required" if token is None else "invalid token",
                                headers={"WWW-Authenticate": "Bearer"})
        request.state.user = user
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
        cookie = request.cookies.get(SESSION_COOKIE)
        session = portal.sessions.get(cookie)
        user = portal.users.get(session.name) if session else None
        if not _same(session, user):
            portal.denials.record("-", "-", "auth.failed",
                                  {"via": "page", "client": client_address(request), "path": request.url.path,
                                   "reason": "session ended or unknown" if cookie else "no session", "status": 303},
                                  "failed")
            raise PageLogin(request.url.path)
        request.state.user, request.state.token_id = user, user.token_id
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
