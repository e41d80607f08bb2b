"""Lineage: which version of each zone a stage's outputs were built from, and refusal of mixed inputs.

Every stage run through :func:`linkage.stages.run_stage` records, in
``<workspace>/.flow/lineage/<stage>.json``, the digest of each input it read, the digest
of what it wrote and the fingerprint of the master key its outputs depend on (its own
key for keyed stages, else the key its inputs were built under). Before a stage runs,
:func:`check` compares those records with the workspace as it is now:

- an input zone whose producer read inputs that have changed since (``linked/`` built
  from an older ``pseudonymised/``) is stale: the stage stops, naming the zone and the
  command that rebuilds it;
- an input zone edited or replaced since its producer wrote it is refused the same way;
- a keyed stage given a key other than the one its inputs (or, for the stage that
  applies the key, its own previous outputs) were written under stops: re-keying is
  ``hhlink keys rotate``, never a side effect of a wrong ``--key-file``.

A digest is the SHA-256 of a manifest (path, size, SHA-256 of every file; hidden files
skipped). File digests are cached by stat signature in ``.flow/hashes.json``, as git's
index does, so a check costs a ``stat`` per file when nothing changed.

Example:
    >>> digest = manifest_digest("workspace", ["linked"])   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable
from pathlib import Path

from linkage.errors import StaleInputError
from linkage.keys import KeyMismatchError
from linkage.workspace import FLOW_DIR, atomic_path

__all__ = ["check", "digest", "manifest", "manifest_digest", "read_record", "record"]

_HASHES = "hashes.json"
_CHUNK = 1 << 20


class _DigestCache:
    """File SHA-256s remembered by stat signature in ``<workspace>/.flow/hashes.json``."""

    def __init__(self, workspace: Path):
        self.path = workspace / FLOW_DIR / _HASHES
        try:
            self.known = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def digest(self, path: Path, key: str) -> str:
        st = path.stat()
        # not ctime: a release carries zone files into its new folder by hard link, which changes
        # their ctime and no byte; every file the stages write is a new inode (atomic_path)
        signature = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]
        hit = self.known.get(key)
        if hit and hit[:4] == signature:
            return hit[4]
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while block := fh.read(_CHUNK):
                h.update(block)
        self.known[key] = [*signature, h.hexdigest()]
        self.changed = True
        return h.hexdigest()

    def save(self) -> None:
        if self.changed:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(self.known, sort_keys=True))


def _files(root: Path, entry: str) -> list[Path] | None:
    """The files an entry names (a file, a folder walked recursively, or a glob); None if absent."""
    if any(c in entry for c in "*?["):
        found = sorted(p for p in root.glob(entry) if p.is_file())
        return found or None
    path = root / entry
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(path).parts))
    return None


def manifest(root: Path | str, entries: Iterable[str]) -> list[dict]:
    """Path, size and SHA-256 of every file under ``entries`` (workspace-relative); hidden files skipped.

    An absent entry is listed as ``{"path": entry, "missing": True}``, so its later
    appearance changes the digest.
    """
    root = Path(root)
    cache = _DigestCache(root)
    out: list[dict] = []
    for entry in entries:
        files = _files(root, entry)
        if files is None:
            out.append({"path": entry, "missing": True})
            continue
        for f in files:
            rel = f.relative_to(root).as_posix()
            out.append({"path": rel, "bytes": f.stat().st_size, "sha256": cache.digest(f, rel)})
    cache.save()
    return out


def digest(obj) -> str:
    """SHA-256 of a JSON-serialisable value (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def manifest_digest(root: Path | str, entries: Iterable[str]) -> str:
    """SHA-256 of :func:`manifest` over ``entries``."""
    return digest(manifest(root, entries))


def _record_path(root: Path, stage: str) -> Path:
    return root / FLOW_DIR / "lineage" / f"{stage}.json"


def read_record(root: Path | str, stage: str) -> dict | None:
    """The lineage a stage last recorded in this workspace, or None."""
    try:
        return json.loads(_record_path(Path(root), stage).read_text())
    except (OSError, ValueError):
        return None


def _overlaps(a: str, b: str) -> bool:
    a, b = a.split("*")[0].rstrip("/"), b.split("*")[0].rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _inherited_key(root: Path, stage) -> str | None:
    from linkage.stages import producer

    for entry in stage.reads:
        up = producer(entry)
        rec = read_record(root, up.name) if up is not None else None
        if rec and rec.get("key"):
            return rec["key"]
    return None


def record(root: Path | str, stage, key_fingerprint: str | None) -> dict:
    """Write ``stage``'s lineage after it ran: its inputs' and outputs' digests and its key."""
    root = Path(root)
    rec = {"stage": stage.name,
           "inputs": {entry: manifest_digest(root, [entry]) for entry in stage.reads},
           "outputs": {entry: manifest_digest(root, [entry]) for entry in stage.writes},
           "key": key_fingerprint if stage.keyed else _inherited_key(root, stage),
           "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = _record_path(root, stage.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
    return rec


def _zone(entry: str) -> str:
    return entry.split("*")[0].rstrip("/") + "/"


def _key_error(key_fingerprint: str, zone: str, recorded: str) -> KeyMismatchError:
    return KeyMismatchError(
        f"the key (fingerprint {key_fingerprint}) is not the one {zone} was written under (fingerprint "
        f"{recorded}): pass the right --key-file, or re-key on purpose with 'hhlink keys rotate'")


def check(root: Path | str, stage, key_fingerprint: str | None, rekey: bool = False) -> None:
    """Refuse to run ``stage`` on inputs of mixed lineage or under another key.

    Inputs with no recorded producer (extracts delivered into ``landing/``, a workspace
    built before lineage was recorded) are taken as they are, and so are the outputs of
    source stages (``generate``): landing/ is where departments deliver.

    Raises:
        StaleInputError: an input zone is older than the inputs it was built from, or was
            changed after its stage wrote it.
        KeyMismatchError: the key differs from the one the inputs (or this keyed stage's
            previous outputs) were written under.
    """
    from linkage.stages import producer

    root = Path(root)
    for entry in stage.reads:
        up = producer(entry)
        if up is None or up.name == stage.name or not up.reads:
            continue
        rec = read_record(root, up.name)
        if rec is None:
            continue
        zone = _zone(entry)
        for upstream, was in rec["inputs"].items():
            if manifest_digest(root, [upstream]) != was:
                raise StaleInputError(
                    f"{zone} is stale: it was built from an older {_zone(upstream)}; rebuild it with "
                    f"'hhlink {up.name}' (then the stages after it)")
        for out, was in rec["outputs"].items():
            if _overlaps(out, entry) and manifest_digest(root, [out]) != was:
                raise StaleInputError(f"{zone} has changed since 'hhlink {up.name}' wrote it; rebuild it with "
                                      f"'hhlink {up.name}'")
        if stage.keyed and rec.get("key") and key_fingerprint and rec["key"] != key_fingerprint:
            raise _key_error(key_fingerprint, zone, rec["key"])
    if stage.keyed and not rekey and key_fingerprint and _inherited_key(root, stage) is None:
        # the stage that first applies the key (pseudonymise): its own earlier outputs name the key
        own = read_record(root, stage.name)
        if own and own.get("key") and own["key"] != key_fingerprint and \
                all(manifest_digest(root, [out]) == was for out, was in own["outputs"].items()):
            raise _key_error(key_fingerprint, _zone(stage.writes[0]), own["key"])
