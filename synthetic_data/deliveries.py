"""Deliveries: the extracts split into an initial history and the monthly deliveries after it.

A department does not send its whole history every month. With ``generate.deliveries = N``
the generator keeps in ``landing/`` only the rows that had arrived before the last N
months in which any department delivered, and writes each of those N months to
``deliveries/<YYYY-MM>/`` (outside ``landing/``, where no stage looks), one file per
source that delivered that month, named ``<source>_<YYYY-MM>.<csv|parquet>`` so that
ingest picks it up beside the history. :func:`deliver_next` drops the next delivery
into ``landing/`` as the department would. The truth in ``truth/`` covers every row of
every delivery (its ``record_id`` is the row's delivered ``record_id``).

When a row arrives, in months counted as ``year * 12 + month - 1``:

- education: the census return for academic year ``Y/Y+1`` arrives in February ``Y+1``
  (the census is taken in January);
- earnings: the PAYE year-end return for tax year ``Y-Y+1`` arrives in May ``Y+1``
  (after the tax year ends on 5 April);
- benefits: a claim's rows arrive the month after the claim starts.

Months in which nobody delivered are not deliveries: the N deliveries are the last N
months with rows.

Example:
    >>> month_label(2025 * 12 + 1)
    '2025-02'
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from linkage.errors import HhlinkError
from linkage.workspace import atomic_path

__all__ = ["DeliveryError", "arrival_months", "deliver_next", "month_label", "pending", "split", "INDEX"]

INDEX = "index.json"
# the month (0-11) after the end of the year a row belongs to, in which its return arrives
_ARRIVES = {"education": 1, "earnings": 4}


class DeliveryError(HhlinkError):
    """A delivery cannot be made: the workspace's deliveries or landing files disagree."""


def month_label(month: int) -> str:
    """``year * 12 + month - 1`` as ``YYYY-MM``."""
    return f"{month // 12:04d}-{month % 12 + 1:02d}"


def arrival_months(source: str, batch: pa.RecordBatch) -> np.ndarray:
    """The month each row of a delivered batch arrives (see the module docstring)."""
    if source in _ARRIVES:
        col = batch.column("academic_year" if source == "education" else "tax_year")
        if pa.types.is_dictionary(col.type):
            col = col.dictionary_decode()
        year = pc.cast(pc.utf8_slice_codeunits(col, 0, 4), pa.int32()).to_numpy(zero_copy_only=False)
        return ((year + 1) * 12 + _ARRIVES[source]).astype(np.int32)
    start = batch.column("start_date")
    if start.null_count:
        raise DeliveryError(f"{source}: {start.null_count} rows have no start_date, so their arrival is unknown")
    months = start.to_numpy(zero_copy_only=False).astype("datetime64[M]").astype(np.int64)
    return (months + 1970 * 12 + 1).astype(np.int32)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def split(landing: Path, out: Path, files: dict[str, tuple[Path, np.ndarray]], n: int) -> dict:
    """Move the rows of the last ``n`` delivery months out of the landing files into ``out``.

    Args:
        landing: the folder holding the whole extracts (rewritten to hold the history).
        out: the (empty) deliveries folder to fill.
        files: per source, its whole extract and the arrival month of each of its rows.
        n: how many deliveries to hold back.

    Returns:
        The index written to ``out/index.json``: the history's rows per source and, per
        delivery in order, its month and files with their rows and SHA-256.
    """
    months = sorted(set().union(*(np.unique(m).tolist() for _, m in files.values())))
    if n >= len(months):
        raise DeliveryError(f"generate.deliveries = {n}, but the extracts arrive in only {len(months)} months: "
                            f"at most {len(months) - 1} deliveries can follow the history")
    held = months[-n:]
    index: dict = {"history_through": month_label(months[-n - 1]), "history_rows": {}, "deliveries": []}
    parts: dict[int, list[dict]] = {m: [] for m in held}
    for source, (path, arrive) in files.items():
        fmt = path.suffix.lstrip(".")
        names = {m: f"{source}_{month_label(m)}.{fmt}" for m in held if (arrive == m).any()}
        for m, name in names.items():
            (out / month_label(m)).mkdir(parents=True, exist_ok=True)
        rows = (_split_csv if fmt == "csv" else _split_parquet)(path, arrive, {m: out / month_label(m) / nm for m, nm in names.items()}, held[0])
        index["history_rows"][source] = rows.pop(None)
        for m, name in names.items():
            parts[m].append({"source": source, "name": name, "rows": rows[m], "sha256": _sha256(out / month_label(m) / name)})
    index["deliveries"] = [{"month": month_label(m), "files": parts[m]} for m in held]
    with atomic_path(out / INDEX) as tmp:
        tmp.write_text(json.dumps(index, indent=2) + "\n")
    return index


def _split_csv(path: Path, arrive: np.ndarray, targets: dict[int, Path], cut: int) -> dict:
    """Route each physical line of a generated CSV (one line per row: no value holds a newline)."""
    rows: dict = {None: 0, **{m: 0 for m in targets}}
    tmp = path.with_name(f".{path.name}.history")
    outs: dict = {}
    try:
        with open(path, "rb") as src, open(tmp, "wb") as hist:
            header = src.readline()
            hist.write(header)
            for m, target in targets.items():
                outs[m] = open(target, "wb")
                outs[m].write(header)
            i = -1
            for i, line in enumerate(src):
                m = int(arrive[i])
                if m < cut:
                    hist.write(line)
                    rows[None] += 1
                else:
                    outs[m].write(line)
                    rows[m] += 1
            if i + 1 != len(arrive):
                raise DeliveryError(f"{path.name}: {i + 1} lines after the header for {len(arrive)} rows")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        for fh in outs.values():
            fh.close()
    os.replace(tmp, path)
    return rows


def _split_parquet(path: Path, arrive: np.ndarray, targets: dict[int, Path], cut: int) -> dict:
    table = pq.read_table(path)
    rows: dict = {}
    for m, target in targets.items():
        part = table.filter(pa.array(arrive == m))
        pq.write_table(part, target, compression="zstd")
        rows[m] = part.num_rows
    history = table.filter(pa.array(arrive < cut))
    with atomic_path(path) as tmp:
        pq.write_table(history, tmp, compression="zstd")
    rows[None] = history.num_rows
    return rows


def _index(workspace: Path) -> dict:
    path = Path(workspace) / "deliveries" / INDEX
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DeliveryError(f"{path}: no deliveries in this workspace (generate with --deliveries N)") from None


def _delivered(workspace: Path, delivery: dict) -> bool:
    """Whether a delivery's files are all in landing/ (and are the files delivered)."""
    landing = Path(workspace) / "landing"
    there = []
    for f in delivery["files"]:
        p = landing / f["name"]
        if p.exists():
            if _sha256(p) != f["sha256"]:
                raise DeliveryError(f"landing/{f['name']}: differs from delivery {delivery['month']} (SHA-256 changed)")
            there.append(True)
        else:
            there.append(False)
    if any(there) and not all(there):
        return False     # a delivery cut short: deliver_next finishes it
    return all(there)


def pending(workspace: Path | str) -> list[dict]:
    """The deliveries not yet in ``landing/``, oldest first (each ``{"month", "files"}``)."""
    return [d for d in _index(Path(workspace))["deliveries"] if not _delivered(Path(workspace), d)]


def deliver_next(workspace: Path | str) -> dict | None:
    """Copy the next delivery's files into ``landing/``, as its departments would.

    Each file is copied under a hidden name and renamed into place, so ingest never sees
    half a file; running it again after an interruption finishes the same delivery.

    Returns:
        The delivery made (``{"month", "files"}``), or None when every delivery is in.
    """
    ws = Path(workspace)
    todo = pending(ws)
    if not todo:
        return None
    d = todo[0]
    for f in d["files"]:
        final = ws / "landing" / f["name"]
        if final.exists():
            continue
        tmp = final.with_name(f".{f['name']}.part")
        shutil.copyfile(ws / "deliveries" / d["month"] / f["name"], tmp)
        os.replace(tmp, final)
    return d
