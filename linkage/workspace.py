"""The workspace folder: its zones, and atomic publication of files into them.

A run works in one workspace. Stages read the zone before theirs and write their own;
every file or folder is built at a temporary path and swapped into place by :func:`publish`,
so no half-written file is ever visible in a zone.

Example:
    >>> ws = Workspace("/tmp/ws").ensure()
    >>> ws.zone("landing")
    PosixPath('/tmp/ws/landing')
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from linkage.errors import WorkspaceError

log = logging.getLogger(__name__)

FLOW_DIR = ".flow"
"""The workspace's orchestration folder: the run lock, lineage records, cached stage results."""

ZONES = (
    "landing", "truth", "deliveries", "staged", "quarantine", "pseudonymised", "linked",
    "research", "published", "reports", "audit",
)


class Workspace:
    """A run's workspace folder and its zones."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def ensure(self) -> Workspace:
        """Create the workspace folder if needed and check it is writable.

        Raises:
            WorkspaceError: the folder cannot be created or written.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WorkspaceError(f"{self.root}: cannot create workspace ({exc.strerror})") from None
        if not self.root.is_dir():
            raise WorkspaceError(f"{self.root}: workspace is not a folder")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise WorkspaceError(f"{self.root}: workspace is not writable")
        try:
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as exc:
            raise WorkspaceError(f"{self.root}: workspace is not writable ({exc.strerror})") from None
        return self

    def zone(self, name: str) -> Path:
        """Return the path of a zone (not created)."""
        if name not in ZONES:
            raise WorkspaceError(f"unknown zone '{name}'")
        return self.root / name

    @contextlib.contextmanager
    def publish_dir(self, name: str) -> Iterator[Path]:
        """Build a whole zone in a temporary folder, then swap it into place.

        The previous contents of the zone are replaced only when the block finishes
        without error; on error the old zone stays as it was.
        """
        final = self.zone(name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=self.root))
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish(tmp, final)

    def recover(self) -> list[str]:
        """Repair what a killed run left behind; call only while no stage is writing the workspace.

        A process killed between :func:`publish`'s two renames leaves the zone missing and
        its previous contents in ``.<zone>.old-<pid>``: that folder is renamed back (the stage
        has not finished, so it runs again). Temporary folders and files of interrupted
        stages (``.<zone>.tmp-*``, spills, half-built reports) are removed: they are never
        part of a zone and can hold gigabytes of spilled data.

        Returns:
            One line per repair (paths only), for the run's log.
        """
        done: list[str] = []
        if not self.root.is_dir():
            return done
        folders = [self.root, self.root / "reports", *sorted(p for p in (self.root / "reports").glob("*") if p.is_dir())]
        for folder in folders:
            if not folder.is_dir():
                continue
            for old in sorted(folder.glob(".*.old-*")):
                final = folder / old.name[1:].split(".old-")[0]
                if not final.exists():
                    os.rename(old, final)
                    done.append(f"restored {final} (a run was killed while replacing it)")
            for entry in sorted(folder.iterdir()):
                if entry.name.startswith(".") and any(fnmatch.fnmatch(entry.name, p) for p in SCRATCH_PATTERNS):
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
                    done.append(f"removed {entry} (left by an interrupted stage)")
        return done


# Names of the temporary entries stages create beside the zones and reports (hidden, never read).
SCRATCH_PATTERNS = (".*.tmp-*", ".*.old-*", ".*.new-*", ".ingest-*", ".stage-*", ".pseudonymise-spill-*",
                    ".assemble-eval.tmp-*", ".gx-research-*")


def carry_file(src: Path | str, dst: Path | str) -> None:
    """A file of the previous zone into the zone being built: a hard link (no copy) where the
    filesystem allows, else a copy. Zones are replaced whole, never written in place, so the
    link is never written through."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def publish(built: Path | str, final: Path | str) -> None:
    """Swap a finished file or folder ``built`` into place at ``final``; the one way stages publish.

    A file replaces ``final`` in one atomic rename. A folder takes two renames: the previous
    ``final`` moves aside to ``.<name>.old-<pid>``, then ``built`` takes its name, then the old
    one is removed. Readers see the old or the new folder, never a mix; a process killed
    between the two renames leaves ``final`` missing and the old folder beside it, which
    :meth:`Workspace.recover` renames back. ``built`` elsewhere on the same file system is
    first moved beside ``final`` (as ``.<name>.new-*``) so the swap itself is a rename.

    Example:
        >>> with tempfile.TemporaryDirectory() as d:             # doctest: +SKIP
        ...     built = Path(tempfile.mkdtemp(dir=d)); (built / "a.txt").write_text("new")
        ...     publish(built, Path(d) / "zone")
    """
    built, final = Path(built), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if built.parent.resolve() != final.parent.resolve():
        beside = Path(tempfile.mkdtemp(prefix=f".{final.name}.new-", dir=final.parent))
        beside.rmdir()
        shutil.move(str(built), beside)
        built = beside
    if not built.is_dir() and not final.is_dir():
        os.replace(built, final)
        return
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.rename(final, old)
    os.rename(built, final)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it to ``final`` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        publish(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


_held: dict[str, tuple[int, int]] = {}   # workspace -> (fd, depth)
_mutex = threading.Lock()


@contextlib.contextmanager
def hold(workspace: Path | str) -> Iterator[list[str]]:
    """Hold the workspace for one command or run; on first entry repair it. Yields the repairs made.

    The lock is an ``flock`` on ``<workspace>/.flow/lock``: the kernel releases it when the
    process dies, even by SIGKILL, so a killed run never blocks the next one. Only the
    holder repairs the workspace (:meth:`Workspace.recover`), so it never removes another
    live command's temporary folders. Re-entrant within a process: ``hhlink run`` holds it
    while its stages take it again.

    Raises:
        WorkspaceError: another hhlink command is using this workspace.
    """
    ws = Workspace(workspace).ensure()
    key = str(ws.root.resolve())
    with _mutex:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            first = False
        else:
            folder = ws.root / FLOW_DIR
            folder.mkdir(exist_ok=True)
            fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise WorkspaceError(f"{ws.root}: another hhlink command is using this workspace") from None
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
