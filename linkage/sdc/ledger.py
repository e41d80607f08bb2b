"""The release ledger: what every release withheld, so later answers are audited against it.

Each release (the standard tables of ``hhlink disclose``, then each on-demand answer of
:func:`linkage.disclose.stage.build_table`) is recorded as a :class:`~linkage.sdc.lp.Block`:
its margin equations, its cells' identities (unit count and cell keys), which cells it
withheld, and the true cell totals the LP audit needs. A new answer is audited jointly with
the parts of every recorded release it can reach through withheld cells (:func:`coupled`), so
an adversary holding everything released cannot narrow a withheld cell, and a cell withheld
once is withheld in every later answer.

The ledger holds exact counts, so it lives in the workspace's hidden folder
``.sdc/ledger/`` (files mode 0600), beside ``research/`` and never in ``published/`` or
``reports/``; the portal does not serve it. ``hhlink disclose`` starts a new ledger.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import sparse

from linkage.sdc.lp import Block, linked_groups
from linkage.workspace import atomic_path

LEDGER = Path(".sdc") / "ledger"


def folder(workspace: Path | str) -> Path:
    """The ledger folder of a workspace."""
    return Path(workspace) / LEDGER


@contextmanager
def locked(workspace: Path | str) -> Iterator[Path]:
    """Hold the ledger's lock (one audit-and-record at a time, across processes)."""
    d = folder(workspace)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(d / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield d
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _index(d: Path) -> list[str]:
    p = d / "index.json"
    return json.loads(p.read_text())["releases"] if p.exists() else []


def _save_block(d: Path, b: Block, suppressed: np.ndarray) -> str:
    A = b.A.tocsr()
    arrays = {"A_data": A.data, "A_indices": A.indices, "A_indptr": A.indptr, "A_shape": np.array(A.shape),
              "ident": b.ident, "depth": b.depth, "suppressed": suppressed,
              "labels": np.array([] if b.labels is None else b.labels.tolist(), dtype=str)}
    names = list(b.systems)
    for i, n in enumerate(names):
        v, lo, need = b.systems[n]
        arrays[f"s{i}_values"], arrays[f"s{i}_lower"], arrays[f"s{i}_need"] = v, np.array([lo]), need
    file = f"{b.name}.npz"
    with atomic_path(d / file) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays, names=np.array(json.dumps(names)))
        os.chmod(tmp, 0o600)
    return file


def _load_block(path: Path) -> Block:
    z = np.load(path)
    A = sparse.csr_matrix((z["A_data"], z["A_indices"], z["A_indptr"]), shape=tuple(z["A_shape"]))
    names = json.loads(str(z["names"]))
    systems = {n: (z[f"s{i}_values"], float(z[f"s{i}_lower"][0]), z[f"s{i}_need"]) for i, n in enumerate(names)}
    labels = z["labels"].astype(object) if "labels" in z and len(z["labels"]) == len(z["ident"]) else None
    return Block(path.stem, A, z["ident"], z["depth"], z["suppressed"].astype(bool), systems, released=True,
                 labels=labels)


def record(d: Path, blocks: list[Block], masks: list[np.ndarray], reset: bool = False) -> None:
    """Add releases to the ledger (call inside :func:`locked`); ``reset`` starts a new ledger."""
    names = [] if reset else _index(d)
    if reset:
        for f in d.glob("*.npz"):
            f.unlink()
    for b, m in zip(blocks, masks):
        if b.name in names:
            continue   # the same request again: its cells, and so its pattern, are already recorded
        _save_block(d, b, m)
        names.append(b.name)
    published = len(names) if reset else _published_count(d)
    with atomic_path(d / "index.json") as tmp:
        tmp.write_text(json.dumps({"releases": names, "published": published}) + "\n")
        os.chmod(tmp, 0o600)


def _published_count(d: Path) -> int:
    p = d / "index.json"
    return json.loads(p.read_text()).get("published", 0) if p.exists() else 0


def releases(d: Path, published_only: bool = False) -> list[Block]:
    """Every recorded release, oldest first; or only the release's standard tables (call inside :func:`locked`)."""
    names = _index(d)
    if published_only:
        names = names[:_published_count(d)]
    return [_load_block(d / f"{n}.npz") for n in names if (d / f"{n}.npz").exists()]


def cell_keys(b: Block) -> list[tuple | None]:
    """Each cell's identity across releases: (units, two cell keys, label); ``None`` for an empty cell."""
    labels = b.labels.tolist() if b.labels is not None else [""] * len(b.ident)
    return [(*k, lab) if k[0] > 0 else None for k, lab in zip(map(tuple, b.ident.tolist()), labels)]


@dataclass
class _Entry:
    """One recorded release, loaded once per process: its block and its groups of withheld cells."""

    stat: tuple
    block: Block
    keys: list
    group: np.ndarray   # per cell, its group of withheld cells linked by equations (-1: published)


@dataclass
class _View:
    """Every release of a ledger, indexed by cell: who published a cell, which groups withhold it."""

    names: list[str] = field(default_factory=list)
    entries: list[_Entry] = field(default_factory=list)
    published: set = field(default_factory=set)
    withheld: dict = field(default_factory=dict)   # cell key -> [(release, group)]
    members: dict = field(default_factory=dict)    # (release, group) -> cell keys


_VIEWS: dict[tuple[str, bool], _View] = {}


def _entry(path: Path, stat: tuple) -> _Entry:
    b = _load_block(path)
    group = np.full(len(b.ident), -1, dtype=np.int64)
    hidden = np.flatnonzero(b.primary)
    if len(hidden) and b.A.shape[0]:
        for g, cols in enumerate(linked_groups(b.A.tocsr(), hidden)):
            group[cols] = g
    return _Entry(stat, b, cell_keys(b), group)


def _view(d: Path, published_only: bool) -> _View:
    # releases are appended, and replaced only by a new ledger (``record(reset=True)``): a file
    # whose stat changed, or a shorter index, rebuilds the view; new releases extend it
    names = _index(d)
    if published_only:
        names = names[:_published_count(d)]
    stats = []
    for n in names:
        st = (d / f"{n}.npz").stat()
        stats.append((st.st_ino, st.st_mtime_ns, st.st_size))
    key = (str(d.resolve()), published_only)
    view = _VIEWS.get(key)
    if view is None or view.names != names[:len(view.names)] or \
            any(e.stat != st for e, st in zip(view.entries, stats)):
        view = _View()
    for n, st in zip(names[len(view.names):], stats[len(view.names):]):
        e = _entry(d / f"{n}.npz", st)
        r = len(view.entries)
        view.names.append(n)
        view.entries.append(e)
        for k, g in zip(e.keys, e.group.tolist()):
            if k is None:
                continue
            if g < 0:
                view.published.add(k)
            else:
                view.withheld.setdefault(k, []).append((r, g))
                view.members.setdefault((r, g), []).append(k)
    _VIEWS[key] = view
    return view


def coupled(new: Block, d: Path, published_only: bool = False) -> tuple[list[Block], np.ndarray]:
    """What a new release must be audited with: the parts of earlier releases that can narrow its cells.

    With every published cell fixed at its value (the audit's adversary knows them exactly;
    within their noise he knows less), the joint equations of all releases fall apart into
    independent groups of cells withheld everywhere, linked by equations. A new release's
    withheld cells can only be narrowed through a group that holds one of its cells, and
    through the groups those groups share withheld cells with; every other group is as
    protected as when it was audited. So the joint audit takes, from each earlier release,
    only the groups reached that way (their equations and the published cells in them), not
    whole tables: its cost follows how much the new table overlaps what was withheld before,
    not how many releases were made. Each release is read from disk once per process.

    Args:
        new: the new release's block.
        d: the ledger folder (call inside :func:`locked`).
        published_only: only the release's standard tables, not earlier answers.

    Returns:
        (the earlier releases' restricted blocks, oldest first, each with ``known`` set; per
        cell of ``new``, whether an earlier release published it).
    """
    view = _view(d, published_only)
    keys = cell_keys(new)
    known_new = np.array([k is not None and k in view.published for k in keys], dtype=bool)
    todo = [k for k in keys if k is not None and k not in view.published and k in view.withheld]
    seen_keys, groups = set(todo), set()
    while todo:
        for rg in view.withheld.get(todo.pop(), ()):
            if rg in groups:
                continue
            groups.add(rg)
            for k in view.members[rg]:
                if k not in seen_keys and k not in view.published:
                    seen_keys.add(k)
                    todo.append(k)
    out = []
    for r in sorted({r for r, _ in groups}):
        e = view.entries[r]
        chosen = np.isin(e.group, [g for rr, g in groups if rr == r])
        out.append(_restrict(e.block, chosen, [k is not None and k in view.published for k in e.keys]))
    return out, known_new


def _restrict(b: Block, cells: np.ndarray, known: list[bool]) -> Block:
    # the equations holding one of `cells`, over every cell they hold (the published ones as known values)
    A = b.A.tocsr()
    rows = np.flatnonzero(np.asarray(abs(A[:, np.flatnonzero(cells)]).sum(axis=1)).ravel() > 0)
    cols = np.unique(A[rows].indices)
    systems = {n: (v[cols], lo, need[cols]) for n, (v, lo, need) in b.systems.items()}
    return Block(b.name, A[rows][:, cols], b.ident[cols], b.depth[cols], b.primary[cols], systems, released=True,
                 labels=None if b.labels is None else b.labels[cols], known=np.asarray(known, dtype=bool)[cols])
