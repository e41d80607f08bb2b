"""Portal users, their roles and their tokens: only salted scrypt hashes are stored.

``DIR/service/users.json`` (mode 0600) lists each user's name, role, token id and the
scrypt hash of their token; the token itself is shown once, by ``hhlink users add``, and
never stored, logged or returned again. A token reads ``hhl_<id>_<secret>``: the id finds
the user, the 256-bit secret proves it.

Roles: ``researcher`` (published tables and the table builder), ``auditor`` (reports,
the audit log and its check), ``engineer`` (run status and quarantine summaries).

Example:
    >>> import tempfile
    >>> store = UserStore(tempfile.mkdtemp())
    >>> token = store.add("alice", "researcher")
    >>> store.authenticate(token).role
    'researcher'
    >>> store.authenticate(token[:-1] + "x") is None
    True
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from linkage.errors import HhlinkError
from linkage.workspace import publish

__all__ = ["ROLES", "User", "UserError", "UserStore"]

ROLES = ("researcher", "auditor", "engineer")
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9._-]{0,62}\Z")  # \Z: "$" would admit a trailing newline
_TOKEN = re.compile(r"^hhl_([0-9a-f]{12})_([A-Za-z0-9_-]{43})\Z")
# scrypt cost: about 50 ms and 16 MiB per check on this machine (OWASP's minimum is N=2^17, r=8 for
# passwords; tokens here are 256 random bits, so the hash only has to stop a stolen file being used)
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
_CACHE_SECONDS = 300
# a secret that failed is not checked again for this long (its SHA-256 only, in memory, at most this many)
_FAILED_SECONDS = 600
_FAILED_MAX = 100_000
_TOKEN_ID = re.compile(r"^hhl_([0-9a-f]{12})_")


class UserError(HhlinkError):
    """A user name or role is invalid, or the user exists (or does not)."""


@dataclass(frozen=True)
class User:
    """An authenticated user.

    Fields:
        name: the user's name.
        role: ``researcher``, ``auditor`` or ``engineer``.
        token_id: the public id of the user's token.
    """

    name: str
    role: str
    token_id: str


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _hash(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(secret.encode("ascii"), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=64 * 1024 * 1024)


def hash_token(secret: str) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64) of a token's secret, with a fresh 16-byte salt."""
    salt = secrets.token_bytes(16)
    digest = _hash(secret, salt, **_SCRYPT)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${_b64(salt)}${_b64(digest)}"


def check_token(secret: str, stored: str) -> bool:
    """Whether ``secret`` matches a stored ``scrypt$...`` hash (constant-time comparison)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = _hash(secret, base64.b64decode(salt), int(n), int(r), int(p))
        return hmac.compare_digest(got, base64.b64decode(digest))
    except (ValueError, TypeError):
        return False


class UserStore:
    """The workspace's users (``service/users.json``); safe to share between threads."""

    def __init__(self, workspace: Path | str):
        self.folder = Path(workspace) / "service"
        self.path = self.folder / "users.json"
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._users: dict[str, dict] = {}
        self._by_token: dict[str, dict] = {}
        # successful checks, kept in memory only: sha256(token) -> (token id, expiry); cleared when the file changes
        self._verified: dict[bytes, tuple[str, float]] = {}
        # failed checks: sha256(token) -> expiry; a repeated bad secret never costs a second scrypt
        self._failed: dict[bytes, float] = {}

    # -- file ----------------------------------------------------------------------------------

    def _file_stamp(self) -> tuple | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _load(self) -> dict[str, dict]:
        stamp = self._file_stamp()
        if stamp != self._stamp:
            with self._lock:
                data = json.loads(self.path.read_text()) if stamp is not None else {"users": []}
                self._users = {u["name"]: u for u in data.get("users", [])}
                self._by_token = {u["token_id"]: u for u in self._users.values()}
                self._verified = {}
                self._failed = {}
                self._stamp = stamp
        return self._users

    def _save(self, users: dict[str, dict]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.folder / f".users.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"version": 1, "users": sorted(users.values(), key=lambda u: u["name"])}, fh, indent=2)
            fh.write("\n")
        publish(tmp, self.path)
        self._stamp = None

    # -- management ----------------------------------------------------------------------------

    def add(self, name: str, role: str) -> str:
        """Create a user and return their token (shown once; only its scrypt hash is stored).

        Raises:
            UserError: a bad name or role, or the user exists.
        """
        if not NAME_PATTERN.match(name or ""):
            raise UserError(f"user name '{name}' is invalid: lower-case letters, digits, '.', '_' or '-', "
                            "starting with a letter, at most 63 characters")
        if role not in ROLES:
            raise UserError(f"role '{role}' is invalid: one of {', '.join(ROLES)}")
        users = dict(self._load())
        if name in users:
            raise UserError(f"user '{name}' exists; remove it first to issue a new token")
        return self._issue(users, name, role)

    def _issue(self, users: dict[str, dict], name: str, role: str) -> str:
        token_ids = {u["token_id"] for u in users.values()}
        token_id = secrets.token_hex(6)
        while token_id in token_ids:
            token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        users[name] = {"name": name, "role": role, "token_id": token_id, "hash": hash_token(secret),
                       "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._save(users)
        return f"hhl_{token_id}_{secret}"

    def rotate(self, name: str) -> str:
        """Replace a user's token and return the new one; the old one stops working at once."""
        users = dict(self._load())
        if name not in users:
            raise UserError(f"no user '{name}'")
        return self._issue(users, name, users[name]["role"])

    def remove(self, name: str) -> None:
        """Delete a user; their token and sessions stop working at once."""
        users = dict(self._load())
        if name not in users:
            raise UserError(f"no user '{name}'")
        del users[name]
        self._save(users)

    def list(self) -> list[dict]:
        """Every user's name, role and creation time (never a hash)."""
        return [{"name": u["name"], "role": u["role"], "created": u["created"]} for u in self._load().values()]

    # -- authentication ------------------------------------------------------------------------

    def get(self, name: str) -> User | None:
        """The user called ``name``, if they still exist."""
        u = self._load().get(name)
        return User(u["name"], u["role"], u["token_id"]) if u else None

    def _known(self, token: str | None) -> tuple[str, str, dict, bytes] | None:
        """(token id, secret, stored user, cache key) of a well-formed token of a known user."""
        m = _TOKEN.match(token) if token else None
        if not m:
            return None
        self._load()
        token_id, secret = m.groups()
        user = self._by_token.get(token_id)
        if user is None:
            return None
        return token_id, secret, user, hashlib.sha256(token.encode("ascii")).digest()

    def _recently_verified(self, key: bytes, token_id: str) -> bool:
        hit = self._verified.get(key)
        return hit is not None and hit[0] == token_id and hit[1] > time.monotonic()

    def _recently_failed(self, key: bytes) -> bool:
        until = self._failed.get(key)
        return until is not None and until > time.monotonic()

    @staticmethod
    def token_id(token: str | None) -> str | None:
        """The id part of something shaped like a token (for the audit log), or ``None``."""
        m = _TOKEN_ID.match(token) if token else None
        return m.group(1) if m else None

    def has_token_id(self, token_id: str | None) -> bool:
        """Whether a token id belongs to a user (ids are public: they only find the user)."""
        self._load()
        return token_id is not None and token_id in self._by_token

    def owner(self, token_id: str | None) -> str | None:
        """The name of the user a token id belongs to, or ``None``."""
        self._load()
        u = self._by_token.get(token_id) if token_id else None
        return u["name"] if u else None

    def cached(self, token: str | None) -> User | None | bool:
        """The user of a token checked in the last minutes, ``None`` if malformed, unknown or a secret
        that failed its check in the last minutes, ``False`` when the slow scrypt check is needed
        (:meth:`authenticate`)."""
        known = self._known(token)
        if known is None:
            return None
        token_id, _, user, key = known
        if self._recently_verified(key, token_id):
            return User(user["name"], user["role"], token_id)
        return None if self._recently_failed(key) else False

    def check(self, token: str | None) -> tuple[User | None, str]:
        """The user a token belongs to and ``"ok"``, or ``None`` and why not: ``malformed``, ``unknown token
        id`` or ``wrong secret``. A wrong secret is remembered for a few minutes (only its SHA-256, in
        memory), so sending it again costs no second scrypt check."""
        known = self._known(token)
        if known is None:
            return None, "unknown token id" if self.token_id(token) else "malformed"
        token_id, secret, user, key = known
        if self._recently_verified(key, token_id):
            return User(user["name"], user["role"], token_id), "ok"
        if self._recently_failed(key):
            return None, "wrong secret"
        if not check_token(secret, user["hash"]):
            with self._lock:
                if len(self._failed) >= _FAILED_MAX:
                    now = time.monotonic()
                    self._failed = {k: t for k, t in self._failed.items() if t > now}
                    if len(self._failed) >= _FAILED_MAX:
                        self._failed.clear()
                self._failed[key] = time.monotonic() + _FAILED_SECONDS
            return None, "wrong secret"
        with self._lock:
            if len(self._verified) > 10_000:
                self._verified.clear()
            self._verified[key] = (token_id, time.monotonic() + _CACHE_SECONDS)
        return User(user["name"], user["role"], token_id), "ok"

    def authenticate(self, token: str | None) -> User | None:
        """The user a token belongs to, or ``None`` (malformed, unknown or wrong token)."""
        return self.check(token)[0]
