"""Refusals written to the audit log once per burst, not once per request.

A refused request (a failed sign-in, a wrong role, a CSRF failure, a path that names
nothing, a malformed request) is audited; but one client can send thousands a minute, and
an audit log that grows by a line per refusal buries what matters. :class:`Denials` writes
the first refusal of a kind (same actor, client address, action, outcome and reason) in
full, counts the repeats for ``window`` seconds, then writes one summary entry with the
count, the first and last time, and a few of the paths asked for. Summaries of windows
that closed are written on the next refusal, on :meth:`Denials.flush` (the portal calls it
on every request and when it stops), or when too many windows are open.

Example:
    >>> import secrets, tempfile
    >>> from linkage.keys import MasterKey
    >>> from linkage.serve.audit import AuditLog
    >>> log = AuditLog(tempfile.mkdtemp(), MasterKey(secrets.token_bytes(32), "example"))
    >>> d = Denials(log, window=60)
    >>> for _ in range(50):
    ...     d.record("-", "-", "auth.failed", {"client": "10.0.0.9", "reason": "unknown token", "path": "/api/me"})
    >>> d.flush(everything=True)
    >>> [(e["action"], e["params"].get("repeated")) for e in log.entries()[0]]
    [('auth.failed', None), ('auth.failed', 49)]
"""

from __future__ import annotations

import threading
import time

__all__ = ["Denials"]

_KEY_FIELDS = ("client", "reason", "token_id", "account", "status", "via")
_SAMPLE_PATHS = 5
_MAX_OPEN = 10_000


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Denials:
    """Aggregates repeated refusals into one audit entry per kind and window.

    Args:
        audit: the :class:`~linkage.serve.audit.AuditLog`.
        window: seconds during which repeats of the first refusal are only counted.
    """

    def __init__(self, audit, window: float = 60.0):
        self.audit = audit
        self.window = window
        self._lock = threading.Lock()
        self._open: dict[tuple, dict] = {}
        self._next_close = float("inf")

    def record(self, actor: str, role: str, action: str, params: dict, outcome: str = "denied") -> None:
        """Audit one refusal: in full if it is the first of its kind in the window, else counted."""
        now = time.time()
        key = (actor, role, action, outcome, *(str(params.get(k, "")) for k in _KEY_FIELDS))
        first = False
        with self._lock:
            w = self._open.get(key)
            if w is None:
                self._open[key] = {"actor": actor, "role": role, "action": action, "outcome": outcome,
                                   "params": {k: params[k] for k in _KEY_FIELDS if k in params},
                                   "start": now, "last": now, "count": 0, "paths": []}
                self._next_close = min(self._next_close, now + self.window)
                first = True
            else:
                w["count"] += 1
                w["last"] = now
                p = params.get("path")
                if p and len(w["paths"]) < _SAMPLE_PATHS and p not in w["paths"]:
                    w["paths"].append(str(p)[:200])
        if first:
            self.audit.append(actor, role, action, params, outcome)
        self.flush(everything=len(self._open) > _MAX_OPEN)

    def flush(self, everything: bool = False) -> None:
        """Write the summaries of windows that have closed (all of them with ``everything``)."""
        now = time.time()
        if not everything and now < self._next_close:
            return
        with self._lock:
            closed = [k for k, w in self._open.items() if everything or now - w["start"] >= self.window]
            done = [self._open.pop(k) for k in closed]
            self._next_close = min((w["start"] + self.window for w in self._open.values()), default=float("inf"))
        for w in done:
            if w["count"]:
                params = {**w["params"], "repeated": w["count"], "paths": w["paths"]}
                self.audit.append(w["actor"], w["role"], w["action"], params, w["outcome"],
                                  {"aggregated": True, "first": _utc(w["start"]), "last": _utc(w["last"]),
                                   "window_seconds": self.window})
