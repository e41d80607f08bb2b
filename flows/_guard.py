"""One run per workspace at a time, and repair of what a killed run left behind.

The lock is an ``flock`` on ``<workspace>/.flow/lock``: the kernel releases it when the
process dies, even by SIGKILL, so a killed run never blocks the next one. Only the holder
repairs the workspace (:meth:`linkage.workspace.Workspace.recover`), so it never removes
another live run's temporary folders. The lock is re-entrant within a process (the parent
flow holds it while its stage flows run).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from linkage.errors import WorkspaceError
from linkage.workspace import Workspace
from flows._fingerprint import flow_dir

log = logging.getLogger(__name__)

_held: dict[str, tuple[int, int]] = {}   # workspace -> (fd, depth)
_mutex = threading.Lock()


@contextlib.contextmanager
def workspace_run(workspace: Path | str) -> Iterator[list[str]]:
    """Hold the workspace for a run; on first entry repair it. Yields the repairs made.

    Raises:
        WorkspaceError: another process is running a flow on this workspace.
    """
    ws = Workspace(workspace).ensure()
    key = str(ws.root.resolve())
    with _mutex:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            first = False
        else:
            folder = flow_dir(ws.root)
            folder.mkdir(exist_ok=True)
            fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise WorkspaceError(f"{ws.root}: another hhlink run is using this workspace") from None
            _held[key] = (fd, 1)
            first = True
    try:
        repairs = ws.recover() if first else []
        for line in repairs:
            log.warning("%s", line)
        yield repairs
    finally:
        with _mutex:
            fd, depth = _held[key]
            if depth == 1:
                del _held[key]
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            else:
                _held[key] = (fd, depth - 1)
