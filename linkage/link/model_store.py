"""The model store: the trained linkage model kept in ``linked/models/`` and carried from release to release.

A release reuses the stored model (``hhlink link``) unless the engineer retrains on purpose
(``hhlink link --retrain``): scores stay comparable from month to month and a delivery is
not a new model's experiment. The store holds every model trained in this workspace,
each named by its fingerprint (the first 16 hex digits of the SHA-256 of its Splink JSON),
and ``current.json``::

    {"fingerprint": "...", "file": "<fingerprint>.json", "trained_at": "...", "reason": "...",
     "trained_on": {"identities": n, "records": n}, "profile": {...},
     "history": [{"fingerprint", "trained_at", "reason"}, ...]}

``profile`` is what the training data looked like to the model
(:func:`linkage.link.drift.profile`), the baseline each later release's drift is measured
against. ``linked/`` is rebuilt by every run, so the link stage copies the store from the
previous ``linked/`` into the new one (:func:`carry`) before adding to it (:func:`keep`).

Example:
    >>> import pathlib, tempfile
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (out / "model.json").write_text('{"comparisons": []}')
    >>> info = keep(out, out / "model.json", reason="first release", trained_on={}, profile={})
    >>> current(out)["fingerprint"] == info["fingerprint"] == fingerprint(out / "model.json")
    True
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from linkage.errors import HhlinkError
from linkage.workspace import atomic_path

__all__ = ["STORE", "carry", "current", "fingerprint", "keep"]

STORE = "models"
CURRENT = "current.json"


def fingerprint(path: Path | str) -> str:
    """The model file's fingerprint: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def current(linked: Path | str) -> dict | None:
    """The stored model's ``current.json`` with ``path`` (its file), or None when none is stored.

    Raises:
        HhlinkError: the store is there but its model file is missing or altered.
    """
    folder = Path(linked) / STORE
    try:
        info = json.loads((folder / CURRENT).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise HhlinkError(f"{folder / CURRENT}: unreadable ({exc.__class__.__name__}); "
                          "retrain deliberately with 'hhlink link --retrain'") from None
    path = folder / info.get("file", "")
    if not path.is_file() or fingerprint(path) != info.get("fingerprint"):
        raise HhlinkError(f"{path}: the stored model is missing or does not match its fingerprint "
                          f"{info.get('fingerprint')}; retrain deliberately with 'hhlink link --retrain'")
    return {**info, "path": path}


def carry(previous: Path | str, out: Path | str) -> None:
    """Copy the previous ``linked/models/`` (every model and ``current.json``) into the new ``linked/``."""
    src = Path(previous) / STORE
    if src.is_dir():
        shutil.copytree(src, Path(out) / STORE, dirs_exist_ok=True)


def keep(out: Path | str, model: Path | str, *, reason: str, trained_on: dict, profile: dict) -> dict:
    """Store ``model`` in ``out/models/`` as the current model and return its ``current.json``.

    Args:
        out: the new ``linked/`` folder (already holding the carried store, if any).
        model: the model file to keep (Splink JSON).
        reason: why a model was trained (``first release``, ``retrain requested``, ...).
        trained_on: counts of the data it was trained on.
        profile: the training data's drift profile (:func:`linkage.link.drift.profile`).
    """
    folder = Path(out) / STORE
    folder.mkdir(exist_ok=True)
    fp = fingerprint(model)
    shutil.copyfile(model, folder / f"{fp}.json")
    previous = current(out)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    history = (previous or {}).get("history", []) + [{"fingerprint": fp, "trained_at": now, "reason": reason}]
    info = {"fingerprint": fp, "file": f"{fp}.json", "trained_at": now, "reason": reason,
            "trained_on": trained_on, "profile": profile, "history": history}
    with atomic_path(folder / CURRENT) as tmp:
        tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
    return info
