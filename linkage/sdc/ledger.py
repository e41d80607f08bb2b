"""The release ledger: what every release withheld, so later answers are audited against it.

Each release (the standard tables of ``hhlink disclose``, then each on-demand answer of
:func:`linkage.disclose.stage.build_table`) is recorded as a :class:`~linkage.sdc.lp.Block`:
its margin equations, its cells' identities (unit count and cell keys), which cells it
withheld, and the true cell totals the LP audit needs. A new answer is audited jointly with
every recorded release that shares a cell with it (directly or through another release), so
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
from pathlib import Path

import numpy as np
from scipy import sparse

from linkage.sdc.lp import Block
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


def related(new: Block, earlier: list[Block]) -> list[Block]:
    """The earlier releases sharing a non-empty cell with ``new``, directly or through each other.

    Releases sharing no cell with these constrain none of their cells, so the joint audit
    can leave them out.
    """
    def keys(b: Block) -> set[tuple]:
        labels = b.labels.tolist() if b.labels is not None else [""] * len(b.ident)
        return {(*k, lab) for k, lab in zip(map(tuple, b.ident.tolist()), labels) if k[0] > 0}

    reach, pending = keys(new), [(b, keys(b)) for b in earlier]
    chosen: list[Block] = []
    grew = True
    while grew:
        grew = False
        for item in list(pending):
            if item[1] & reach:
                chosen.append(item[0])
                reach |= item[1]
                pending.remove(item)
                grew = True
    order = {id(b): i for i, b in enumerate(earlier)}
    return sorted(chosen, key=lambda b: order[id(b)])
