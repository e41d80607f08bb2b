"""The audit log: append-only, hash-chained and keyed, in ``DIR/audit/log.jsonl``.

Each line is one JSON entry: ``seq`` (1, 2, ...), ``time`` (UTC), ``actor`` and ``role``
(who), ``action`` (what), ``params`` (the request's parameters: table names, dimensions;
never a token, a key or a record value), ``outcome`` and ``detail`` (for a table request, its
disclosure decisions: counts of cells by status and of rules fired, never a value). Every
entry carries ``prev``, the SHA-256 ``hash`` of the entry before it (64 zeros for the
first), its own ``hash`` (SHA-256 of its canonical JSON without ``hash`` and ``mac``) and a
``mac``: HMAC-SHA256 of the hash under the HKDF subkey ``audit:log`` of the master key.

Editing an entry breaks its hash; recomputing that hash breaks its MAC (without the key)
and the next entry's ``prev``; removing or reordering entries breaks ``seq`` and ``prev``.
``audit/head.json`` holds the last entry's ``seq`` and ``hash`` (MACed), so cutting entries
off the end is detected too; an auditor who records the head hash elsewhere (``hhlink audit
verify`` prints it) detects a log and head rolled back together.

Example:
    >>> import secrets, tempfile
    >>> from linkage.keys import MasterKey
    >>> log = AuditLog(tempfile.mkdtemp(), MasterKey(secrets.token_bytes(32), "example"))
    >>> log.append("alice", "researcher", "table.view", {"table": "transition_region"})["seq"]
    1
    >>> log.verify().ok
    True
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from linkage.keys import MasterKey

__all__ = ["AUDIT_KEY_PURPOSE", "GENESIS", "AuditLog", "Verification", "entry_hash"]

AUDIT_KEY_PURPOSE = "audit:log"
GENESIS = "0" * 64
_HEAD_PURPOSE = b"hhlink-audit-head\x00"
_TAIL_BYTES = 1 << 16
_HEAD_BYTES = 256


def _canonical(entry: dict) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode()


def entry_hash(entry: dict) -> str:
    """SHA-256 (hex) of an entry's canonical JSON without its ``hash`` and ``mac`` fields."""
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k not in ("hash", "mac")})).hexdigest()


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


@dataclass
class Verification:
    """The result of checking the log.

    Fields:
        ok: every entry intact, in order, none missing.
        entries: lines read.
        head: the last intact entry's hash (record it elsewhere to detect a rollback).
        mac_checked: the entries' MACs were checked (the key was available).
        first_bad_line: line number (from 1) of the first entry that fails, if any.
        first_bad_seq: the sequence number expected there.
        problem: ``edited``, ``removed``, ``reordered``, ``inserted``, ``malformed`` or ``truncated``.
        message: one sentence for the auditor.
    """

    ok: bool
    entries: int
    head: str
    mac_checked: bool
    first_bad_line: int | None = None
    first_bad_seq: int | None = None
    problem: str | None = None
    message: str = ""

    def to_dict(self) -> dict:
        """The result as a JSON-ready dict."""
        return asdict(self)


class AuditLog:
    """Append-only, hash-chained audit log of one workspace (safe across threads and processes)."""

    def __init__(self, workspace: Path | str, key: MasterKey | None, fsync: bool = False):
        self.folder = Path(workspace) / "audit"
        self.path = self.folder / "log.jsonl"
        self.head_path = self.folder / "head.json"
        self._mac_key = key.subkey(AUDIT_KEY_PURPOSE) if key is not None else None
        self._fsync = fsync
        self._lock = threading.Lock()
        self._size = -1
        self._last: tuple[int, str] = (0, GENESIS)
        self._index = _Index()
        self._index_lock = threading.Lock()

    # -- writing -----------------------------------------------------------------------------

    def _mac(self, data: str | bytes) -> str:
        assert self._mac_key is not None
        return hmac.new(self._mac_key, data.encode() if isinstance(data, str) else data, hashlib.sha256).hexdigest()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._lock, open(self.folder / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _tail(self) -> tuple[int, str]:
        # another process may have appended since our last write: read the last line again
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            self._size = 0
            return 0, GENESIS
        if size == self._size:
            return self._last
        with open(self.path, "rb") as fh:
            fh.seek(max(0, size - _TAIL_BYTES))
            lines = fh.read().splitlines()
        last = json.loads(lines[-1]) if lines else None
        self._size = size
        self._last = (int(last["seq"]), last["hash"]) if last else (0, GENESIS)
        return self._last

    def append(self, actor: str, role: str, action: str, params: dict | None = None, outcome: str = "ok",
               detail: dict | None = None) -> dict:
        """Append one entry and return it (with its ``seq``, ``prev``, ``hash`` and ``mac``).

        Args:
            actor: the user name (or ``cli:<os user>`` for commands).
            role: the actor's role.
            action: what was done, e.g. ``builder.request``.
            params: the request's parameters (no tokens, keys or record values).
            outcome: ``ok``, ``refused``, ``denied``, ``failed`` ...
            detail: further counts, e.g. a table's disclosure decisions.

        Raises:
            RuntimeError: the log was opened without the key.
        """
        if self._mac_key is None:
            raise RuntimeError("the audit log needs the master key to append entries")
        with self._locked():
            seq, prev = self._tail()
            entry = {"seq": seq + 1, "time": _now(), "actor": actor, "role": role, "action": action,
                     "params": params or {}, "outcome": outcome, "detail": detail or {}, "prev": prev}
            entry["hash"] = entry_hash(entry)
            entry["mac"] = self._mac(entry["hash"])
            line = _canonical(entry) + b"\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            self._size = self.path.stat().st_size
            self._last = (entry["seq"], entry["hash"])
            self._write_head(entry["seq"], entry["hash"])
        return entry

    def _head_mac(self, seq: int, digest: str) -> str:
        return self._mac(_HEAD_PURPOSE + f"{seq}:{digest}".encode())

    def _write_head(self, seq: int, digest: str) -> None:
        # one fixed-length write in place, under the lock (a rename per entry costs milliseconds here)
        line = json.dumps({"seq": seq, "hash": digest, "mac": self._head_mac(seq, digest)}).encode()
        fd = os.open(self.head_path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, line.ljust(_HEAD_BYTES - 1) + b"\n", 0)
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    # -- reading -----------------------------------------------------------------------------

    def entries(self, offset: int = 0, limit: int | None = None, newest_first: bool = False) -> tuple[list[dict], int]:
        """Entries (parsed lines; unparseable lines are skipped) and the total line count."""
        found, _, total = self.search(offset=offset, limit=limit, newest_first=newest_first)
        return found, total

    def search(self, actor: str | None = None, action: str | None = None, since: str | None = None,
               until: str | None = None, offset: int = 0, limit: int | None = None,
               newest_first: bool = False) -> tuple[list[dict], int, int]:
        """Entries matching every filter given, a page of them, read through an in-memory index that is
        extended with only the lines appended since the last call (the file is not re-read).

        Args:
            actor: the user name (exact).
            action: the action (exact), or a prefix ending in ``.`` (``auth.``).
            since: first day (``YYYY-MM-DD``, UTC), inclusive.
            until: last day, inclusive.
            offset: entries to skip (after filtering, in the chosen order).
            limit: entries to return (all when ``None``).
            newest_first: newest entry first.

        Returns:
            ``(entries, matching, total)``: the page, how many entries match, how many lines the log has.
        """
        with self._index_lock:
            idx = self._index.refresh(self.path)
            rows = idx.match(actor, action, since, until)
            matching, total = len(rows), idx.count
            if newest_first:
                rows = rows[::-1]
            chosen = rows[offset: None if limit is None else offset + limit]
            out = idx.read(self.path, chosen)
        return out, matching, total

    def actors_and_actions(self) -> tuple[list[str], list[str]]:
        """Every actor and action in the log (for the audit page's filters), sorted."""
        with self._index_lock:
            idx = self._index.refresh(self.path)
            return sorted(idx.actors.names), sorted(idx.actions.names)

    def verify(self) -> Verification:
        """Check every entry's hash, MAC (with the key), sequence and link to the one before.

        Returns:
            A :class:`Verification` naming the first entry edited, removed, reordered or inserted.
        """
        if not self.folder.is_dir():
            return Verification(True, 0, GENESIS, self._mac_key is not None, message="no audit entries yet")
        with self._locked():
            lines = self.path.read_bytes().splitlines() if self.path.exists() else []
            try:
                head = self._read_head()
                head_error = False
            except (ValueError, KeyError, TypeError):
                head, head_error = None, True
        parsed: list[dict | None] = []
        for raw in lines:
            try:
                e = json.loads(raw)
                parsed.append(e if isinstance(e, dict) and isinstance(e.get("seq"), int) else None)
            except ValueError:
                parsed.append(None)
        seqs_later = {}
        for i, e in enumerate(parsed):
            if e is not None:
                seqs_later.setdefault(e["seq"], i)
        checked = self._mac_key is not None
        prev, expected = GENESIS, 1

        def bad(line: int, seq: int, problem: str, message: str) -> Verification:
            return Verification(False, len(lines), prev, checked, line, seq, problem, message)

        for i, e in enumerate(parsed):
            line = i + 1
            if e is None:
                return bad(line, expected, "malformed", f"line {line} is not an audit entry (expected entry {expected})")
            if e["seq"] != expected:
                if e["seq"] > expected:
                    if seqs_later.get(expected, -1) > i:
                        return bad(line, expected, "reordered",
                                   f"entry {expected} is out of place: line {line} holds entry {e['seq']}")
                    return bad(line, expected, "removed",
                               f"entry {expected} is missing: line {line} holds entry {e['seq']}")
                if seqs_later.get(e["seq"], i) < i:
                    return bad(line, expected, "reordered",
                               f"entry {e['seq']} appears again or out of order at line {line} (expected {expected})")
                return bad(line, expected, "inserted", f"line {line} holds entry {e['seq']}, expected {expected}")
            digest = entry_hash(e)
            if digest != e.get("hash"):
                return bad(line, expected, "edited", f"entry {expected} (line {line}) was edited: its hash no longer matches")
            if checked and not hmac.compare_digest(self._mac(digest), str(e.get("mac", ""))):
                return bad(line, expected, "edited",
                           f"entry {expected} (line {line}) was edited and re-hashed: its MAC does not match")
            if e.get("prev") != prev:
                if expected == 1:
                    return bad(line, 1, "edited", "entry 1 (line 1) was changed: it does not start the chain")
                # this entry is intact, so the one before it was changed (and re-hashed without the key)
                return Verification(False, len(lines), prev, checked, line - 1, expected - 1, "edited",
                                    f"entry {expected - 1} (line {line - 1}) was changed: entry {expected} "
                                    "no longer links to it")
            prev, expected = digest, expected + 1
        if head_error:
            return bad(len(lines), expected - 1, "edited", "audit/head.json is unreadable")
        if head is None and lines:
            return bad(len(lines), expected - 1, "edited", "audit/head.json is missing")
        if head is not None:
            hseq, hhash, hmac_ = head
            if checked and not hmac.compare_digest(self._head_mac(hseq, hhash), hmac_):
                return bad(len(lines), expected, "edited", "audit/head.json was edited: its MAC does not match")
            if hseq >= expected:
                return bad(len(lines) + 1, expected, "truncated",
                           f"entries {expected} to {hseq} were removed from the end of the log")
            if hseq < expected - 1:
                return bad(hseq + 1, hseq + 1, "inserted",
                           f"entries {hseq + 1} to {expected - 1} were added after the recorded head")
            if hseq == expected - 1 and hhash != prev:
                return bad(len(lines), hseq, "edited", f"entry {hseq} does not match audit/head.json")
        return Verification(True, len(lines), prev, checked, message=f"{len(lines)} entries intact; head {prev}")

    def _read_head(self) -> tuple[int, str, str] | None:
        try:
            text = self.head_path.read_text()
        except FileNotFoundError:
            return None
        h = json.loads(text)
        return int(h["seq"]), str(h["hash"]), str(h.get("mac", ""))


class _Names:
    """Strings interned as small integers."""

    def __init__(self):
        self.ids: dict[str, int] = {}
        self.names: list[str] = []

    def id(self, name: str) -> int:
        i = self.ids.get(name)
        if i is None:
            i = self.ids[name] = len(self.names)
            self.names.append(name)
        return i


class _Column:
    """A growable int64 numpy column."""

    def __init__(self):
        self.data = np.zeros(1024, dtype=np.int64)
        self.n = 0

    def append(self, v: int) -> None:
        if self.n == len(self.data):
            self.data = np.concatenate([self.data, np.zeros(len(self.data), dtype=np.int64)])
        self.data[self.n] = v
        self.n += 1

    @property
    def values(self) -> np.ndarray:
        return self.data[: self.n]


class _Index:
    """Byte offset, actor, action and day of each line of the log, extended incrementally."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.size, self.head, self.mtime = 0, b"", 0
        self.offsets, self.actor, self.action, self.day = _Column(), _Column(), _Column(), _Column()
        self.ends = _Column()
        self.actors, self.actions = _Names(), _Names()

    @property
    def count(self) -> int:
        return self.offsets.n

    def refresh(self, path: Path) -> _Index:
        try:
            st = path.stat()
        except FileNotFoundError:
            self.reset()
            return self
        size = st.st_size
        with open(path, "rb") as fh:
            head = fh.read(64)
            # a log that shrank, whose start changed, or that changed without growing was rewritten (an
            # append always grows it): index it again from the start
            if (size < self.size or head[: len(self.head)] != self.head
                    or (size == self.size and st.st_mtime_ns != self.mtime)):
                self.reset()
            self.mtime = st.st_mtime_ns
            if size == self.size:
                return self
            fh.seek(self.size)
            chunk = fh.read(size - self.size)
        end = chunk.rfind(b"\n") + 1          # complete lines only; a line being written is read next time
        pos = self.size
        for line in chunk[:end].split(b"\n")[:-1]:
            self._add(line, pos)
            pos += len(line) + 1
        self.size, self.head = pos, head[:64]
        return self

    def _add(self, line: bytes, pos: int) -> None:
        try:
            e = json.loads(line)
            actor, action, day = str(e.get("actor", "")), str(e.get("action", "")), str(e.get("time", ""))[:10]
        except (ValueError, AttributeError):
            actor, action, day = "", "", ""
        self.offsets.append(pos)
        self.ends.append(pos + len(line))
        self.actor.append(self.actors.id(actor))
        self.action.append(self.actions.id(action))
        self.day.append(int(day.replace("-", "")) if len(day) == 10 and day.replace("-", "").isdigit() else 0)

    def match(self, actor: str | None, action: str | None, since: str | None, until: str | None) -> np.ndarray:
        keep = np.ones(self.count, dtype=bool)
        if actor:
            i = self.actors.ids.get(actor)
            keep &= self.actor.values == (-1 if i is None else i)
        if action:
            if action.endswith("."):
                ids = [i for n, i in self.actions.ids.items() if n.startswith(action)]
            else:
                ids = [self.actions.ids[action]] if action in self.actions.ids else []
            keep &= np.isin(self.action.values, ids)
        if since:
            keep &= self.day.values >= int(since.replace("-", ""))
        if until:
            keep &= self.day.values <= int(until.replace("-", ""))
        return np.flatnonzero(keep)

    def read(self, path: Path, rows: np.ndarray) -> list[dict]:
        out = []
        if len(rows) == 0:
            return out
        with open(path, "rb") as fh:
            for r in rows:
                start, end = int(self.offsets.values[r]), int(self.ends.values[r])
                raw = os.pread(fh.fileno(), end - start, start)
                try:
                    out.append(json.loads(raw))
                except ValueError:
                    continue
        return out
