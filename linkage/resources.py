"""Where hhlink finds the files it ships: default config, schemas, suites, GX assets, reference data.

Every packaged default is found through this module, by :mod:`importlib.resources`, so an
editable install, a wheel and a zip read the same files. The shipped tree mirrors the
repository's top level: ``hhlink.toml``, ``schemas/``, ``expectations/`` and ``gx/`` ship in
the package ``linkage._defaults`` (in a checkout, links to the top-level entries), and
``synthetic_data/reference/`` ships in the ``synthetic_data`` package.

Relative paths in a config file follow one rule (:func:`resolve`): a path is read from the
config file's folder when it exists there, otherwise from the shipped default of the same
name (``schemas``, ``expectations``,
``synthetic_data/reference/upper_tier_local_authorities.csv``). A path that is neither
names the config file's folder in its error.

Example:
    >>> from linkage import resources
    >>> (resources.packaged("schemas") / "education.toml").is_file()
    True
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from functools import reduce
from importlib import resources as _resources
from importlib.resources.abc import Traversable
from pathlib import Path, PurePath

__all__ = ["CONFIG_NAME", "default_config", "packaged", "resolve"]

CONFIG_NAME = "hhlink.toml"
_DEFAULTS = "linkage._defaults"
# a top-level folder of the repository that is itself a package ships from that package
_PACKAGES = ("synthetic_data",)
_extracted: Path | None = None
_lock = threading.Lock()


def _locate(relative: PurePath) -> tuple[Traversable, int] | None:
    """The shipped entry for ``relative`` and how many leading parts name its top-level entry."""
    parts = relative.parts
    if not parts or relative.is_absolute() or ".." in parts:
        return None
    if parts[0] in _PACKAGES and len(parts) > 1:
        root, rest, top = _resources.files(parts[0]), parts[1:], 2
    else:
        root, rest, top = _resources.files(_DEFAULTS), parts, 1
    node = reduce(lambda node, part: node / part, rest, root)
    return (node, top) if node.is_file() or node.is_dir() else None


def _copy(node: Traversable, target: Path) -> None:
    if node.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        for child in node.iterdir():
            _copy(child, target / child.name)
    else:
        target.write_bytes(node.read_bytes())


def _on_disk(relative: PurePath, top: int) -> Path:
    """Extract a default shipped in a zip once per process (DuckDB and GX need real files)."""
    global _extracted
    with _lock:
        if _extracted is None:
            _extracted = Path(tempfile.mkdtemp(prefix="hhlink-defaults-"))
            atexit.register(shutil.rmtree, _extracted, True)
        head = PurePath(*relative.parts[:top])
        target = _extracted / head
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            _copy(_locate(head)[0], target)
        return _extracted / relative


def packaged(relative: str | PurePath) -> Path:
    """Return the file or folder hhlink ships under ``relative`` (a repository-style path).

    Args:
        relative: e.g. ``"hhlink.toml"``, ``"schemas"``, ``"gx/vendor"`` or
            ``"synthetic_data/reference/upper_tier_local_authorities.csv"``.

    Returns:
        A path on the file system (a zip install is extracted to a temporary folder once).

    Raises:
        FileNotFoundError: hhlink ships nothing under that name.

    Example:
        >>> packaged("hhlink.toml").name
        'hhlink.toml'
    """
    relative = PurePath(relative)
    found = _locate(relative)
    if found is None:
        raise FileNotFoundError(f"{relative}: not one of hhlink's packaged defaults")
    node, top = found
    return node if isinstance(node, Path) else _on_disk(relative, top)


def default_config() -> Path:
    """The packaged ``hhlink.toml``: the configuration read when no other is found."""
    return packaged(CONFIG_NAME)


def resolve(path: str | PurePath, base: Path | None = None) -> Path:
    """Resolve a path from a config: its folder first, then hhlink's packaged defaults.

    Args:
        path: the path as written in the config.
        base: the config file's folder; ``None`` for a config built in code, where a
            relative path is a packaged default or else relative to the current folder.

    Returns:
        ``path`` itself when absolute; ``base / path`` when that exists; the packaged
        default of that name when hhlink ships one; otherwise ``base / path`` (or
        ``./path``), which does not exist, so the caller's error names it.

    Example:
        >>> resolve("schemas").name
        'schemas'
    """
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    local = (base if base is not None else Path.cwd()) / path
    if base is not None and local.exists():
        return local
    try:
        return packaged(path)
    except FileNotFoundError:
        return local
