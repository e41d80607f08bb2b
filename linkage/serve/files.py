"""Files the portal serves are read only from inside their zone (``published/``, ``reports/``).

Whatever an index or a URL names, :func:`confined` admits a path only if it stays inside
the zone folder: relative, no ``..``, no hidden names, no control characters, and no
symbolic link anywhere from the zone folder down (the zone folder included), ending at a
regular file. :func:`read_confined` then opens it without following a link
(``O_NOFOLLOW``), so a link swapped in after the check is refused too.

Example:
    >>> import tempfile, pathlib
    >>> zone = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (zone / "t.json").write_text("{}")
    >>> (zone / "passwd").symlink_to("/etc/passwd")
    >>> confined(zone, "t.json") is not None, confined(zone, "passwd"), confined(zone, "../t.json")
    (True, None, None)
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

__all__ = ["confined", "read_confined"]


def _bad_part(part: str) -> bool:
    return (part in ("", ".", "..") or part.startswith(".") or "\\" in part
            or any(ord(c) < 0x20 or ord(c) == 0x7F for c in part))


def confined(zone: Path | str, rel: str) -> Path | None:
    """The regular file ``zone/rel``, or ``None`` when ``rel`` would leave the zone, passes through a
    symbolic link, names a hidden entry, or is not a regular file."""
    if not rel or "\x00" in rel:
        return None
    pure = PurePosixPath(rel)
    if pure.is_absolute() or not pure.parts or any(_bad_part(p) for p in pure.parts):
        return None
    current = Path(os.path.abspath(zone))
    try:
        if not stat.S_ISDIR(os.lstat(current).st_mode):        # a link to a folder is not a folder here
            return None
        for i, part in enumerate(pure.parts):
            current = current / part
            mode = os.lstat(current).st_mode
            last = i == len(pure.parts) - 1
            if stat.S_ISLNK(mode) or (last and not stat.S_ISREG(mode)) or (not last and not stat.S_ISDIR(mode)):
                return None
    except (OSError, ValueError):
        return None
    return current


def read_confined(zone: Path | str, rel: str) -> bytes | None:
    """The bytes of :func:`confined` ``(zone, rel)``, opened without following links; ``None`` if refused."""
    path = confined(zone, rel)
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return None
        return fh.read()
