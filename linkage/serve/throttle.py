"""Failed sign-ins counted per client address and per token id: free at first, then slowed,
then refused.

Within ``window`` seconds of a key's first failure, its first ``free`` failures cost nothing;
the next ones are answered after a delay that doubles each time (up to ``max_delay``
seconds, awaited without holding a thread); from ``limit`` failures on, every attempt is
refused with HTTP 429 and ``Retry-After`` until the window ends, without checking the token
at all, each answer also held back ``max_delay`` seconds so a client that keeps guessing
sends few requests. A valid token already verified is never throttled: throttling stops guessing, not
work (see :mod:`linkage.serve.auth`).

Example:
    >>> t = Throttle(free=2, limit=4, window=60)
    >>> for _ in range(3):
    ...     t.fail(["client:10.0.0.9"])
    >>> t.delay(["client:10.0.0.9"]) > 0, t.retry_after(["client:10.0.0.9"])
    (True, None)
    >>> t.fail(["client:10.0.0.9"])
    >>> t.retry_after(["client:10.0.0.9"]) > 0
    True
"""

from __future__ import annotations

import math
import threading
import time

__all__ = ["Throttle"]

_MAX_KEYS = 100_000


class Throttle:
    """Failure counts per key (``client:<address>``, ``token:<id>``) in a fixed window.

    Args:
        free: failures per window answered without delay.
        limit: failures per window after which attempts get 429.
        window: seconds from a key's first failure until its count starts again.
        max_delay: the longest back-off delay, in seconds.
    """

    def __init__(self, free: int = 5, limit: int = 20, window: float = 300.0, max_delay: float = 2.0):
        self.free, self.limit, self.window, self.max_delay = free, limit, window, max_delay
        self._lock = threading.Lock()
        self._fails: dict[str, list[float]] = {}        # key -> [window start, failures]

    def _count(self, key: str, now: float) -> tuple[float, int]:
        s = self._fails.get(key)
        if s is None or now - s[0] >= self.window:
            return now, 0
        return s[0], int(s[1])

    def retry_after(self, keys: list[str]) -> int | None:
        """Seconds until any of ``keys`` may try again, or ``None`` when none is over the limit."""
        now = time.monotonic()
        waits = [math.ceil(start + self.window - now) for start, n in (self._count(k, now) for k in keys)
                 if n >= self.limit]
        return max(1, max(waits)) if waits else None

    def delay(self, keys: list[str]) -> float:
        """The back-off delay before answering a failure of ``keys`` (0 within the free failures)."""
        now = time.monotonic()
        n = max((self._count(k, now)[1] for k in keys), default=0)
        return 0.0 if n <= self.free else min(self.max_delay, 0.05 * 2 ** (n - self.free))

    def fail(self, keys: list[str]) -> None:
        """Count one failure against each key."""
        now = time.monotonic()
        with self._lock:
            if len(self._fails) > _MAX_KEYS:
                self._fails = {k: s for k, s in self._fails.items() if now - s[0] < self.window}
            for k in keys:
                start, n = self._count(k, now)
                self._fails[k] = [start, n + 1]

    def clear(self, key: str) -> None:
        """Forget a key's failures (a token id after its owner signs in)."""
        with self._lock:
            self._fails.pop(key, None)
