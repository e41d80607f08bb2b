"""Ingest: landing/ -> staged/ and quarantine/, behind Great Expectations quality gates.

For each source declared in ``schemas/``, every landing file (``<file_stem>*.csv`` or
``*.parquet``) is read against its schema, its values are normalised and typed, and each
row goes to exactly one place: the source's staged table (``staged/<source>.parquet``, plus
one part per incremental delivery, see below) or, with a reason code, ``quarantine/<source>.parquet``. Per file, rows read = rows staged + rows quarantined,
checked on every run. Then each source's expectation suite runs on the staged table; a
critical failure stops the run with the reports written and ``staged/`` left as it was.

What it writes (zones are published atomically, whole):

- ``staged/<source>.parquet``: the schema's columns, typed and normalised (see
  :mod:`linkage.normalise`), ``<name>_raw`` beside every identifier but ``record_id``,
  and ``_file``, ``_line``, ``_row``; rows in file order. After incremental runs the source's
  table is that file followed by its parts ``staged/<source>.0001.parquet``, ``.0002``, ...
  (one per run that staged new rows of the source): :func:`staged_paths` lists them in order,
  :func:`parquet_source` / :func:`staged_scan` read them as one table. Every reader of staged
  rows goes through those (``pseudonymise`` and the quality gates do).
- ``staged/manifest.json``: per file, its SHA-256, schema version, reader, the rows
  read, staged and quarantined (with reason counts) and ``staged_digest``, the count and
  order-free hash of its staged rows (:func:`staged_row_digests`, made as they are staged,
  carried with the file's entry); and per source, ``staged_parts`` (its files, in order) and
  ``staged_files``, their signature as written (:func:`staged_file_signature`).
  ``pseudonymise`` takes the digests from here for a source whose files still have that
  signature, instead of hashing every row.
- ``staged/ledger.json``: every (file name, SHA-256) ever ingested, carried from run to
  run; a file whose checksum was ingested under another name is refused as re-sent. An entry
  also keeps the file's stat signature (size, mtime, ctime, inode, device) from when it was
  hashed, if the file had settled: an incremental run takes the SHA-256 of a file with that
  same signature from the ledger rather than reading it again (a write always moves the ctime).
- ``staged/quality.json``: per source, the expectation counts over the staged rows, the suite
  digest and the dated validations they come from: what the next incremental run carries.
- ``quarantine/<source>.parquet``: ``_file, _line, _row, raw, column, reason``.

Incremental by default (``ingest.incremental``): a monthly delivery stages only the files
not staged before; the earlier files' staged and quarantined rows and manifest entries are
carried over (they come first), and a new row repeating a record id staged from an earlier
delivery is quarantined as ``duplicate``/``duplicate_id``, the earlier one kept. A full run
happens when a schema file or the staging code changed (``staged/manifest.json`` holds
their digest) or a file staged before is gone from ``landing/`` or changed, so a withdrawn
file leaves no row behind. Either way the outputs are the same as a full run's. The quality
gates then run the row-wise and uniqueness expectations on the new rows only and add the
counts carried for the earlier rows (:func:`linkage.quality.validate`), reading the new part
alone (and, for uniqueness, the key columns of the earlier parts); the others run on the whole
table (all parts). A source's earlier parts are carried into the new zone by hard link, never
rewritten, and its new rows are written into a new part: a monthly delivery writes and hashes
(``staged_digest``) its own rows only, and reads of the earlier rows are key columns (record
ids, to quarantine repeats; the uniqueness keys) plus the few whole-table expectations (row
count, shares of non-null values, means). A full run
writes each source into ``<source>.parquet`` alone; its rows, in order, are the parts'.
- ``reports/quality/``: GX Data Docs (HTML, readable offline), ``quality_summary.json``
  and ``ingest_summary.json`` (counts, reasons, timings; never record values).

Design for scale (1M persons = 21M rows, 2.8 GB of CSV, 2 cores): the heavy lifting is
DuckDB SQL. A CSV is parsed by DuckDB's multi-threaded reader into VARCHAR columns
(:mod:`linkage.ingest.landing`); one SQL pass (:func:`linkage.normalise.checked_sql`) derives
the typed, normalised row and the first failing rule; staged and quarantined rows are
written from that one table. Validation uses **GX's SQL execution engine on DuckDB over
the staged Parquet files** rather than pandas or a sample (:mod:`linkage.quality`): each
expectation is an aggregate query over the columnar file, so the checks are exact on all
rows and nothing the size of a table enters Python. Sampling would have made uniqueness
and completeness estimates, and pandas would have needed several GB per table.

Example:
    >>> from linkage.config import load_config
    >>> from linkage.ingest.stage import ingest
    >>> summary = ingest(load_config(), "/tmp/ws")          # doctest: +SKIP
    >>> summary["rows"]["read"] == summary["rows"]["staged"] + summary["rows"]["quarantined"]
    True
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from linkage.config import Config
from linkage.errors import HhlinkError, WorkspaceError
from linkage.ingest.landing import (IngestError, LandingFile, Loaded, read_header, drop, find_files, fingerprint, load,
                             parquet_rows_json, raw_lines)
from linkage.db import connect, path_literal, read_literal
from linkage.db import quote_ident as q
from linkage.db import quote_literal as lit
from linkage.normalise import fail_sql, staged_select, typed_sql
from linkage.quality import Carried, QualityGateError, carry_record, validate
from linkage.schemas import Schema, load_schemas
from linkage.workspace import Workspace, carry_file, publish

__all__ = ["IngestError", "QualityGateError", "QUARANTINE_REASONS", "ingest", "parquet_source", "stage_files",
           "staged_file_signature", "staged_paths", "staged_row_digests", "staged_scan"]

# every reason a quarantined row can carry (the README lists them all; a test checks both ways)
QUARANTINE_REASONS = {
    "field_count": "too few or too many fields for the header",
    "blank_line": "an empty line",
    "quote": "a quoted value that does not close on its line (or within the next lines as a valid record)",
    "encoding": "bytes that are not valid in the declared encoding",
    "control_char": "a NUL or other control character (a lone carriage return included) in a value",
    "no_final_newline": "the file's last line has no line break, so it may be cut short",
    "parse": "any other CSV fault DuckDB reports",
    "too_long": "a value longer than the schema's max_length / max_field_length",
    "bad_int": "not a whole number (strictly: no '1_000', no '5.0')",
    "bad_float": "not a finite decimal number (strictly: no '1_000', no 'inf')",
    "bad_date": "not a date in the declared format",
    "bad_bool": "not a boolean",
    "not_null": "a required value is missing",
    "pattern": "does not match the declared pattern",
    "not_allowed": "not one of the allowed values",
    "out_of_range": "outside the declared minimum and maximum",
    "duplicate": "repeats an earlier row of the source exactly (the first is staged)",
    "duplicate_id": "repeats an earlier row's record id with other values (the first is staged)",
}

log = logging.getLogger(__name__)

LEDGER = "ledger.json"
MANIFEST = "manifest.json"
QUALITY = "quality.json"
QUARANTINE_COLUMNS = "_file VARCHAR, _line BIGINT, _row BIGINT, raw VARCHAR, \"column\" VARCHAR, reason VARCHAR"


def ingest(config: Config, workspace: Path | str, key=None) -> dict:
    """Stage every landing extract, quarantine what cannot be staged, and run the quality gates.

    Args:
        config: the hhlink configuration (``config.ingest``, ``config.paths``).
        workspace: the workspace folder; ``landing/`` must exist.
        key: unused (ingest needs no key); present so every stage has one signature.

    Returns:
        A summary: ``rows`` (read, staged, quarantined), per-source ``sources`` with each
        file's manifest entry, ``quality`` (the GX results), ``seconds`` and ``reports``.

    Raises:
        IngestError: a file-level fault (unreadable, empty, missing column, wrong
            encoding, a re-sent file), naming the file and the column.
        QualityGateError: a critical expectation failed; the reports are written and
            ``staged/`` keeps its previous contents.

    Example:
        >>> ingest(load_config(), "workspace")["rows"]   # doctest: +SKIP
        {'read': 210972, 'staged': 210972, 'quarantined': 0}
    """
    t0 = time.perf_counter()
    cfg = config.ingest
    ws = Workspace(workspace).ensure()
    landing = ws.zone("landing")
    if not landing.is_dir():
        raise WorkspaceError(f"{landing}: no landing zone (run 'hhlink generate' or deliver extracts there)")
    schemas = load_schemas(config.paths.resolve(config.paths.schemas))
    suites_dir = config.paths.resolve(config.paths.expectations)
    files = {}
    for source, schema in schemas.items():
        found = find_files(landing, schema)
        if not found:
            raise IngestError(f"landing/: no file for source '{source}' (expected "
                              f"landing/{schema.file_stem}.csv or landing/{schema.file_stem}.parquet)")
        files[source] = found
    everything = [f for fs in files.values() for f in fs]
    ledger = _read_ledger(ws)
    # an incremental run takes a landing file's SHA-256 from the ledger when the file's stat
    # signature is the one it had when hashed; any file it then has to stage is hashed after all
    stats = _unchanged_since_hashed(everything, ledger) if cfg.incremental else {}
    unhashed = set(stats)
    stats.update(_hash([f for f in everything if _key(f) not in unhashed]))
    _refuse_resent(everything, ledger)
    digest = ingest_digest(schemas)
    carried, mode = plan_ingest(ws, files, digest, cfg.incremental)
    redo = [f for f in everything if _key(f) in unhashed and not _is_carried(f, _prior(ws, carried, f.source))]
    if redo:        # a file to stage after all (or a full run): its fingerprint is needed to read it
        shas = [f.sha256 for f in redo]
        unhashed -= {_key(f) for f in redo}
        stats.update(_hash(redo))
        if [f.sha256 for f in redo] != shas:     # content changed under an unchanged stat: trust no signature
            stats.update(_hash([f for f in everything if _key(f) in unhashed]))
            unhashed = set()
            _refuse_resent(everything, ledger)
            carried, mode = plan_ingest(ws, files, digest, cfg.incremental)
    priors = {s: _prior(ws, carried, s) for s in schemas} if carried is not None else {}
    log.info("ingest: %s", mode)
    for source, fs in files.items():
        for f in fs:
            if _key(f) not in unhashed:    # the others are carried: unchanged since they were checked and staged
                _precheck(f, schemas[source])
    seconds: dict[str, float] = {"fingerprint": round(time.perf_counter() - t0, 2)}
    fresh = {s: [f for f in files[s] if not _is_carried(f, priors.get(s))] for s in schemas}

    scratch = Path(tempfile.mkdtemp(prefix=".ingest-", dir=ws.root))
    con = connect(cfg, spill=scratch / "duckdb")
    try:
        with ws.publish_dir("staged") as staged_dir, ws.publish_dir("quarantine") as quarantine_dir:
            sources = {}
            for source, schema in schemas.items():
                t = time.perf_counter()
                sources[source] = _stage_source(con, schema, fresh[source], staged_dir, quarantine_dir, scratch,
                                                cfg.max_encoding_error_share, priors.get(source))
                seconds[f"stage_{source}"] = round(time.perf_counter() - t, 2)
                log.info("%s: %d read, %d staged, %d quarantined", source, sources[source]["rows_read"],
                         sources[source]["rows_staged"], sources[source]["rows_quarantined"])
            con.close()
            rows = {k: sum(s[f"rows_{k}"] for s in sources.values()) for k in ("read", "staged", "quarantined")}
            t = time.perf_counter()
            reports_tmp = Path(tempfile.mkdtemp(prefix=".quality.tmp-", dir=ws.root))
            try:
                quality = validate({s: staged_paths(staged_dir, s) for s in schemas}, suites_dir, reports_tmp,
                                   scratch / "gx", data_docs=cfg.data_docs,
                                   carried=_carried_counts(ws, priors, staged_dir))
                seconds["quality"] = round(time.perf_counter() - t, 2)
                seconds["total"] = round(time.perf_counter() - t0, 2)
                summary = {"workspace": str(ws.root), "rows": rows, "sources": sources, "quality": quality,
                           "seconds": seconds, "reports": str(ws.zone("reports") / "quality"),
                           "passed": not quality["critical_failed"], "mode": mode,
                           "files_staged_now": [f.name for fs in fresh.values() for f in fs],
                           "files_hashed_now": [f.name for f in everything if _key(f) not in unhashed]}
                _write_json(reports_tmp / "ingest_summary.json", _ingest_report(summary))
                _publish_reports(ws, reports_tmp)
            finally:
                shutil.rmtree(reports_tmp, ignore_errors=True)
            if quality["critical_failed"]:
                raise QualityGateError(
                    "critical expectation failed, staged/ not updated (reports in reports/quality/): "
                    + "; ".join(quality["critical_failed"][:5])
                    + (f" (+{len(quality['critical_failed']) - 5} more)" if len(quality["critical_failed"]) > 5 else ""))
            _write_json(staged_dir / MANIFEST, {"files": [f for s in sources.values() for f in s["files"]],
                                                "digest": digest, "staged_files": {
                                                    s: staged_file_signature(staged_paths(staged_dir, s))
                                                    for s in schemas},
                                                "staged_parts": {s: sources[s]["staged_parts"] for s in schemas}})
            _write_json(staged_dir / QUALITY, {"sources": {
                s: carry_record(quality, s, [e["file"] for e in sources[s]["files"]]) for s in schemas}})
            _write_json(staged_dir / LEDGER, _updated_ledger(ledger, everything, stats))
    finally:
        try:
            con.close()
        except duckdb.Error:
            pass
        shutil.rmtree(scratch, ignore_errors=True)
    return summary


def stage_files(schema: Schema, paths: list[Path], out_dir: Path, max_encoding_error_share: float = 0.01) -> dict:
    """Stage some landing files of one source, without quality gates, ledger or zones.

    Writes ``out_dir/staged/<source>.parquet`` and ``out_dir/quarantine/<source>.parquet``
    exactly as :func:`ingest` does; for tests and for checking a delivery by hand.

    Returns:
        The source's counts and per-file manifest entries.

    Example:
        >>> stage_files(load_schema("education"), [Path("landing/education.csv")], Path("/tmp/x"))  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    (out_dir / "staged").mkdir(parents=True, exist_ok=True)
    (out_dir / "quarantine").mkdir(parents=True, exist_ok=True)
    files = fingerprint([LandingFile(Path(p), schema.source, Path(p).suffix.lstrip(".")) for p in paths])
    for f in files:
        _precheck(f, schema)
    scratch = Path(tempfile.mkdtemp(prefix=".stage-", dir=out_dir))
    con = connect(spill=scratch / "duckdb")
    try:
        return _stage_source(con, schema, files, out_dir / "staged", out_dir / "quarantine", scratch,
                             max_encoding_error_share)
    finally:
        con.close()
        shutil.rmtree(scratch, ignore_errors=True)


# --- files, ledger, manifest --------------------------------------------------------------


def _precheck(f: LandingFile, schema: Schema) -> None:
    """File-level faults found before any row is read (the Parquet reader checks its own)."""
    if f.fmt == "csv" and schema.encoding.lower().replace("_", "-") in ("utf-8", "utf8"):
        read_header(f, schema)


def _read_ledger(ws: Workspace) -> list[dict]:
    path = ws.zone("staged") / LEDGER
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError) as exc:
        raise IngestError(f"{path}: the ingest ledger is unreadable ({exc.__class__.__name__}); "
                          f"restore it or remove staged/ to start afresh") from None


def _refuse_resent(files: list[LandingFile], ledger: list[dict]) -> None:
    seen: dict[str, str] = {}
    for f in files:
        if f.sha256 in seen:
            raise IngestError(f"landing/{f.name}: same content (SHA-256 {f.sha256[:12]}...) as landing/{seen[f.sha256]}: "
                              f"the file was delivered twice; refused")
        seen[f.sha256] = f.name
        for e in ledger:
            if e["sha256"] == f.sha256 and e["file"] != f.name:
                raise IngestError(f"landing/{f.name}: re-sent file: same SHA-256 ({f.sha256[:12]}...) as "
                                  f"'{e['file']}', ingested {e.get('ingested', 'earlier')}; refused")


#: a file changed less than this long before it is hashed gets no stat signature: file times are
#: stamped from a coarse clock, so a second write within the same tick could leave them unchanged
SETTLED_SECONDS = 2.0


def stat_signature(path: Path) -> list[int]:
    """Size, mtime, ctime (ns), inode and device of a file. Every write moves the ctime, which no
    user-space call sets back, so an unchanged signature means unchanged content."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _hash(files: list[LandingFile]) -> dict[tuple[str, str], list[int]]:
    """Fingerprint ``files``; returns the stat signatures of those settled before and unchanged while read."""
    start = time.time_ns()
    before = {}
    for f in files:
        try:
            before[_key(f)] = stat_signature(f.path)
        except OSError:
            pass            # fingerprint reports it
    fingerprint(files, threads=2)
    settled = {}
    for f in files:
        sig = before.get(_key(f))
        if sig and sig[2] <= start - SETTLED_SECONDS * 1e9 and sig[0] == f.size and stat_signature(f.path) == sig:
            settled[_key(f)] = sig
    return settled


def staged_paths(staged_dir: Path | str, source: str) -> list[Path]:
    """The staged files of ``source`` in row order: ``<source>.parquet`` (the rows of a full run, or of
    the first one), then one part per incremental delivery, ``<source>.0001.parquet``, ...; [] if none.

    Read together (``read_parquet([...])``, in this order) they are the source's staged table: the
    same rows in the same order as a full run over the same landing files writes into
    ``<source>.parquet`` alone.
    """
    staged_dir = Path(staged_dir)
    base = staged_dir / f"{source}.parquet"
    if not base.is_file():
        return []
    pattern = re.compile(re.escape(source) + r"\.(\d{4})\.parquet")
    parts = sorted((int(m.group(1)), p) for p in staged_dir.iterdir() if (m := pattern.fullmatch(p.name)))
    return [base, *(p for _, p in parts)]


def parquet_source(paths: Path | list[Path]) -> str:
    """``read_parquet(...)`` of one staged file or of a source's parts (in order), for SQL."""
    if isinstance(paths, list | tuple):
        if len(paths) == 1:
            return f"read_parquet({read_literal(paths[0])})"
        return f"read_parquet([{', '.join(read_literal(p) for p in paths)}])"
    return f"read_parquet({read_literal(paths)})"


def staged_scan(path: Path | list[Path]) -> str:
    """``read_parquet(...)`` of a staged source with ``file_row_number``: the row's position in the
    source's table, counted on across its parts (ingest writes one part per delivery)."""
    if not isinstance(path, list) or len(path) == 1:
        return f"read_parquet({read_literal(path[0] if isinstance(path, list) else path)}, file_row_number = true)"
    offsets, n = [], 0
    for part in path:
        offsets.append(n)
        n += pq.ParquetFile(part).metadata.num_rows
    files = ", ".join(read_literal(part) for part in path)
    return (f"(SELECT * EXCLUDE (file_row_number), file_row_number + {offsets}[CAST(file_index AS BIGINT) + 1] AS file_row_number "
            f"FROM read_parquet([{files}], file_row_number = true))")


def staged_row_digests(con: duckdb.DuckDBPyConnection, path: Path | list[Path],
                       files: list[str] | None = None) -> dict[str, str]:
    """Per landing file with staged rows in ``path`` (a file, or a source's parts: :func:`staged_paths`),
    or only those of ``files``: ``"<rows>:<hash>"``.

    The hash is DuckDB's row hash XORed over the file's staged rows (each row holds its own
    line number, so no two cancel): equal exactly when the rows are, whatever their order.
    """
    if files is not None and not files:
        return {}
    where = f" WHERE CAST(_file AS VARCHAR) IN ({', '.join(lit(f) for f in files)})" if files else ""
    rows = con.execute(f"SELECT CAST(_file AS VARCHAR), count(*), bit_xor(hash(s)) "
                       f"FROM {parquet_source(path)} s{where} GROUP BY 1").fetchall()
    return {f: f"{n}:{h:016x}" for f, n, h in rows}


def staged_file_signature(path: Path | list[Path]) -> list:
    """Size, mtime (ns), inode and device of a staged file. Not the ctime: carrying a file into the
    next zone by a hard link moves it. Rewriting the file moves the inode or the mtime.

    For a source's parts (:func:`staged_paths`): one file alone has its own signature; several,
    ``[[name, size, mtime, inode, device], ...]`` in order, so a part added, removed or rewritten
    changes it."""
    if isinstance(path, list | tuple):
        if len(path) == 1:
            return staged_file_signature(path[0])
        return [[Path(p).name, *staged_file_signature(p)] for p in path]
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def _with_digests(con: duckdb.DuckDBPyConnection, path: Path | list[Path], entries: list[dict], new: list[str],
                  carried_ok: bool, new_path: list[Path] | None = None) -> list[dict]:
    """``entries`` with ``staged_digest`` set: the new files' hashed (their rows only, from ``new_path``
    when given: the part holding them), the carried ones' kept when ``carried_ok`` and present, else
    every file hashed again from ``path`` (the source's staged file or parts)."""
    old = [e for e in entries if e["file"] not in new]
    again = not carried_ok or any("staged_digest" not in e for e in old)
    if again or new_path is None:
        digests = staged_row_digests(con, path, None if again else new)
    else:
        digests = staged_row_digests(con, new_path, new) if new_path and new else {}
    return [e if (e["file"] not in new and not again)
            else {**e, "staged_digest": digests.get(e["file"])} for e in entries]


def _key(f: LandingFile) -> tuple[str, str]:
    return f.source, f.name


def _unchanged_since_hashed(files: list[LandingFile], ledger: list[dict]) -> dict[tuple[str, str], list[int]]:
    """The files whose stat signature is the one the ledger recorded when they were hashed (and those
    signatures): their SHA-256 and size are taken from the ledger instead of reading them again."""
    recorded = {(e.get("source"), e["file"]): e for e in ledger if e.get("stat")}
    out = {}
    for f in files:
        e = recorded.get(_key(f))
        if e is None:
            continue
        try:
            now = stat_signature(f.path)
        except OSError:
            continue            # hashing it reports the error
        if now == e["stat"]:
            f.sha256, f.size = e["sha256"], now[0]
            out[_key(f)] = now
    return out


def _updated_ledger(ledger: list[dict], files: list[LandingFile], stats: dict[tuple[str, str], list[int]]) -> dict:
    """The ledger with this run's new (file, SHA-256) entries; each entry of a file present now keeps
    the stat signature it was hashed under (none if it had just changed), so the next run can trust it."""
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    present = {(f.source, f.name, f.sha256): f for f in files}
    names = {_key(f) for f in files}
    out = []
    for e in ledger:
        e = dict(e)
        if (e.get("source"), e["file"]) in names:
            e.pop("stat", None)
            f = present.get((e.get("source"), e["file"], e["sha256"]))
            if f is not None and _key(f) in stats:
                e["stat"] = stats[_key(f)]
        out.append(e)
    known = {(e["file"], e["sha256"]) for e in ledger}
    for f in files:
        if (f.name, f.sha256) not in known:
            out.append({"file": f.name, "source": f.source, "sha256": f.sha256, "bytes": f.size, "ingested": now,
                        **({"stat": stats[_key(f)]} if _key(f) in stats else {})})
    return {"files": out}


def _carried_counts(ws: Workspace, priors: dict[str, Prior], staged_dir: Path) -> dict[str, Carried]:
    """Per source with carried rows: their files and rows, the parts (in ``staged_dir``, the zone being
    built) that hold them and nothing else, and the counts validated on them before."""
    try:
        records = json.loads((ws.zone("staged") / QUALITY).read_text())["sources"]
    except (OSError, ValueError, KeyError, TypeError):
        records = {}
    return {s: Carried([e["file"] for e in p.entries], sum(e["rows_staged"] for e in p.entries), records.get(s),
                       [staged_dir / part.name for part in p.staged])
            for s, p in priors.items() if p.entries}


def ingest_digest(schemas: dict[str, Schema]) -> str:
    """SHA-256 of what turns a landing row into a staged row: each schema file and the normalising code.

    A staged row carried over from an earlier run is only as good as the rules it was
    staged under: when a schema or the code changes, every file is staged afresh.
    """
    from linkage import normalise
    from linkage.ingest import landing

    h = hashlib.sha256()
    for name, schema in sorted(schemas.items()):
        h.update(name.encode() + b"\0" + schema.path.read_bytes() + b"\0")
    for module in (normalise, landing):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


@dataclass
class Prior:
    """The previous run's staged and quarantined rows of one source, and the manifest entries of the files kept."""
    staged: list[Path]          # the source's staged parts, in order (:func:`staged_paths`)
    quarantine: Path
    entries: list[dict]
    signature: list[int] | None = None     # the staged file's, as the previous run recorded it

    def digests_hold(self) -> bool:
        """True when the staged file is the one the previous run wrote (so its carried digests are its rows')."""
        try:
            return self.signature is not None and staged_file_signature(self.staged) == self.signature
        except OSError:
            return False


def _prior(ws: Workspace, carried: dict[str, list[dict]] | None, source: str) -> Prior | None:
    if carried is None:
        return None
    try:
        signature = json.loads((ws.zone("staged") / MANIFEST).read_text()).get("staged_files", {}).get(source)
    except (OSError, ValueError, AttributeError):
        signature = None
    return Prior(staged_paths(ws.zone("staged"), source), ws.zone("quarantine") / f"{source}.parquet",
                 carried.get(source, []), signature)


def _is_carried(f: LandingFile, prior: Prior | None) -> bool:
    return prior is not None and any(e["file"] == f.name and e["sha256"] == f.sha256 for e in prior.entries)


def plan_ingest(ws: Workspace, files: dict[str, list[LandingFile]], digest: str,
                incremental: bool) -> tuple[dict[str, list[dict]] | None, str]:
    """Which landing files keep their staged rows from the previous run (per source), and why, in a phrase.

    Incremental only when the previous ``staged/`` was built by these schemas and this code
    and every file it covers is still in ``landing/`` unchanged; a withdrawn or changed file
    means a full run, so none of its rows survive.
    """
    if not incremental:
        return None, "full: ingest.incremental is false"
    try:
        previous = json.loads((ws.zone("staged") / MANIFEST).read_text())
        entries = previous["files"]
    except (OSError, ValueError, KeyError):
        return None, "full: no previous staged zone"
    if previous.get("digest") != digest:
        return None, "full: the schemas or the staging code changed since the previous run"
    now = {(f.source, f.name): f.sha256 for fs in files.values() for f in fs}
    for e in entries:
        if now.get((e["source"], e["file"])) != e["sha256"]:
            return None, f"full: landing/{e['file']} was staged before and is gone or changed"
    carried: dict[str, list[dict]] = {source: [] for source in files}
    for e in entries:
        carried.setdefault(e["source"], []).append(e)
    for source, kept in carried.items():
        for zone in ("staged", "quarantine"):
            if kept and not (ws.zone(zone) / f"{source}.parquet").is_file():
                return None, f"full: {zone}/{source}.parquet is missing"
    new = sum(1 for fs in files.values() for f in fs if (f.source, f.name) not in {(e["source"], e["file"]) for e in entries})
    return carried, f"incremental: {new} new file(s), {len(entries)} carried"


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _ingest_report(summary: dict) -> dict:
    q = summary["quality"]
    return {
        "rows": summary["rows"], "passed": summary["passed"], "seconds": summary["seconds"],
        "mode": summary["mode"], "files_staged_now": summary["files_staged_now"],
        # the staged digests are for pseudonymise's carry-over check, not for readers of the report
        "sources": {k: {**v, "files": [{x: y for x, y in e.items() if x != "staged_digest"} for e in v["files"]]}
                    for k, v in summary["sources"].items()},
        "quality": {s: {k: v for k, v in r.items() if k != "expectations"} for s, r in q["sources"].items()},
        "critical_failed": q["critical_failed"],
    }


_OWN_REPORTS = ("data_docs", "quality_summary.json", "ingest_summary.json")   # what ingest writes in reports/quality/


def _publish_reports(ws: Workspace, built: Path) -> None:
    """Replace ingest's own entries of ``reports/quality/``, each by a rename; anything else there
    (``research/``, written by assemble) is left alone."""
    final = ws.zone("reports") / "quality"
    for name in _OWN_REPORTS:
        if (built / name).exists():
            publish(built / name, final / name)
        elif (final / name).is_dir():      # not built this time (data_docs off): no stale copy stays
            shutil.rmtree(final / name)
        else:
            (final / name).unlink(missing_ok=True)


# --- staging one source ---------------------------------------------------------------


def _carry_only(con: duckdb.DuckDBPyConnection, source: str, prior: Prior, staged_dir: Path,
                quarantine_dir: Path) -> dict:
    """A source with no new file: its previous staged and quarantined rows, linked into the new zone."""
    entries = _with_digests(con, prior.staged, list(prior.entries), [], prior.digests_hold())
    for part in prior.staged:
        carry_file(part, staged_dir / part.name)
    carry_file(prior.quarantine, quarantine_dir / f"{source}.parquet")
    reasons = Counter()
    for e in prior.entries:
        reasons.update(e["reasons"])
    return {
        "staged": f"staged/{source}.parquet", "quarantine": f"quarantine/{source}.parquet",
        "staged_parts": [p.name for p in prior.staged],
        **{f"rows_{k}": sum(e[f"rows_{k}"] for e in prior.entries) for k in ("read", "staged", "quarantined")},
        "reasons": dict(sorted(reasons.items())), "seconds": {}, "files": entries, "files_new": 0,
    }


def _flag_prior(con: duckdb.DuckDBPyConnection, schema: Schema, src: str, flags: str, prior: list[Path]) -> None:
    """Quarantine new rows repeating a record id staged from an earlier delivery (kept: the earlier one).

    ``duplicate`` when every typed value is the same, ``duplicate_id`` when they differ, as
    :func:`_flag_duplicates` does within one run.
    """
    rid = schema.columns_with_role("record_id")
    if not rid:
        return
    name = rid[0].name
    typed = ", ".join(typed_sql(c) for c in schema.columns)
    old = ", ".join(q(c.name) for c in schema.columns)
    # first the new stageable rows' ids alone against the earlier ids (one column of the earlier
    # staged rows is read); only the rows whose id is found there are compared value by value
    con.execute(f"""CREATE OR REPLACE TEMP TABLE _prior_keys AS
        SELECT f._pos, CAST(s.{q(name + '__t')} AS VARCHAR) AS k
        FROM {src} s POSITIONAL JOIN (SELECT rowid AS _pos, _fail FROM {flags}) f WHERE f._fail IS NULL""")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE _prior_hits AS SELECT DISTINCT o.k
        FROM (SELECT CAST({q(name)} AS VARCHAR) AS k FROM {parquet_source(prior)}) o
        SEMI JOIN _prior_keys n ON o.k = n.k""")
    if con.execute("SELECT count(*) FROM _prior_hits").fetchall()[0][0]:
        con.execute(f"""CREATE OR REPLACE TEMP TABLE _prior_dups AS
            WITH good AS (SELECT s.*, f._pos FROM {src} s POSITIONAL JOIN (SELECT rowid AS _pos, _fail FROM {flags}) f
                          WHERE f._fail IS NULL AND CAST(s.{q(name + '__t')} AS VARCHAR) IN (SELECT k FROM _prior_hits)),
            old AS (SELECT CAST({q(name)} AS VARCHAR) AS k, row({old}) AS v FROM {parquet_source(prior)}
                    WHERE CAST({q(name)} AS VARCHAR) IN (SELECT k FROM _prior_hits))
            SELECT g._pos, CASE WHEN row({typed}) IS NOT DISTINCT FROM old.v THEN 'duplicate' ELSE 'duplicate_id' END
                           || ':' || {lit(name)} AS reason
            FROM good g JOIN old ON CAST(g.{q(name + '__t')} AS VARCHAR) = old.k""")
        con.execute(f"UPDATE {flags} SET _fail = d.reason FROM _prior_dups d WHERE {flags}.rowid = d._pos")
        con.execute("DROP TABLE _prior_dups")
    con.execute("DROP TABLE _prior_keys; DROP TABLE _prior_hits")


def _stage_source(con: duckdb.DuckDBPyConnection, schema: Schema, files: list[LandingFile], staged_dir: Path,
                  quarantine_dir: Path, scratch: Path, max_encoding_share: float, prior: Prior | None = None) -> dict:
    """Read, check and write one source; returns its counts and per-file manifest entries.

    With ``prior`` (an incremental run), ``files`` are the new files only: the previous staged
    parts are carried into the new zone unchanged (hard links) and the new rows go into a part of
    their own, ``<source>.NNNN.parquet`` (:func:`staged_paths`), so a delivery's run writes and
    hashes its own rows only; the quarantine file holds the previous rows, then the new ones;
    the manifest entries of the earlier files are carried over.
    """
    source = schema.source
    if prior is not None and prior.entries and not files:
        return _carry_only(con, source, prior, staged_dir, quarantine_dir)
    if prior is not None and not prior.entries:
        prior = None
    rejects_table, fails, flags = f"rejects_{source}", f"fails_{source}", f"flags_{source}"
    con.execute(f"CREATE OR REPLACE TEMP TABLE {rejects_table} ({QUARANTINE_COLUMNS})")
    loaded: dict[str, Loaded] = {}
    t0 = time.perf_counter()
    for i, f in enumerate(files):
        got = load(con, f, schema, f"rows_{source}_{i}", scratch)
        loaded[f.name] = got
        _refuse_wrong_encoding(f, schema, got, max_encoding_share)
        if got.rejects:
            con.executemany(f"INSERT INTO {rejects_table} VALUES (?, ?, ?, ?, ?, ?)", got.rejects)
    if len(files) == 1:
        src = loaded[files[0].name].table
    else:   # several deliveries: one table, in file-name order then line order
        src = f"all_{source}"
        for i, f in enumerate(files):
            t = loaded[f.name].table
            con.execute(f"INSERT INTO {src} SELECT * FROM {t}" if i else f"CREATE OR REPLACE TEMP TABLE {src} AS SELECT * FROM {t}")
            drop(con, loaded[f.name])
    staged_path, quarantine_path = staged_dir / f"{source}.parquet", quarantine_dir / f"{source}.parquet"
    if prior is not None:      # the earlier parts as they are; this run's rows in the next part
        for part in prior.staged:
            carry_file(part, staged_dir / part.name)
        staged_path = staged_dir / f"{source}.{len(prior.staged):04d}.parquet"
    # the rules run once, into a flag per row; a positional join lines the flags up with
    # the rows again without a sort, so both outputs keep the file's order
    t1 = time.perf_counter()
    con.execute(f"CREATE OR REPLACE TEMP TABLE {flags} AS SELECT {fail_sql(schema)} AS _fail FROM {src}")
    _flag_duplicates(con, schema, src, flags, [f.name for f in files])
    if prior is not None:
        _flag_prior(con, schema, src, flags, prior.staged)
    staged_total = con.execute(
        f"COPY (SELECT {staged_select(schema)} FROM {src} POSITIONAL JOIN {flags} WHERE _fail IS NULL) "
        f"TO {path_literal(staged_path)} (FORMAT parquet, COMPRESSION zstd, COMPRESSION_LEVEL 1)").fetchall()[0][0]
    if prior is not None and not staged_total:
        staged_path.unlink()        # every new row quarantined: no empty part
    con.execute(f"""CREATE OR REPLACE TEMP TABLE {fails} AS SELECT _file, _line, _row, _rawtext AS raw,
        nullif(split_part(_fail, ':', 2), '') AS "column", split_part(_fail, ':', 1) AS reason
        FROM {src} POSITIONAL JOIN {flags} WHERE _fail IS NOT NULL""")
    t2 = time.perf_counter()
    _fill_raw(con, fails, schema, files, loaded)
    earlier = f"SELECT * FROM read_parquet({path_literal(prior.quarantine)}) UNION ALL " if prior is not None else ""
    con.execute(f"""COPY (SELECT * FROM ({earlier}SELECT * FROM {fails} UNION ALL SELECT * FROM {rejects_table})
        ORDER BY _file, _line) TO {path_literal(quarantine_path)} (FORMAT parquet, COMPRESSION zstd)""")
    entries = _manifest_entries(con, schema, files, loaded, src, fails, rejects_table, staged_total)
    new_files = len(entries)
    if prior is not None:
        entries = list(prior.entries) + entries
    # the digests pseudonymise checks its carry-over against: the new files' rows only, read back as written
    parts = staged_paths(staged_dir, source)
    entries = _with_digests(con, parts, entries, [f.name for f in files],
                            prior is not None and prior.digests_hold(), [staged_path] if staged_total else [])
    for got in loaded.values():
        drop(con, got)
    con.execute(f"DROP TABLE IF EXISTS all_{source}; DROP TABLE {fails}; DROP TABLE {flags}; DROP TABLE {rejects_table}")
    reasons = Counter()
    for e in entries:
        reasons.update(e["reasons"])
    seconds = {"read_normalise": round(t1 - t0, 2), "check_write_staged": round(t2 - t1, 2),
               "quarantine": round(time.perf_counter() - t2, 2)}
    log.info("%s: %s", source, seconds)
    return {
        "staged": f"staged/{source}.parquet", "quarantine": f"quarantine/{source}.parquet",
        "staged_parts": [p.name for p in parts],
        "rows_read": sum(e["rows_read"] for e in entries), "rows_staged": sum(e["rows_staged"] for e in entries),
        "rows_quarantined": sum(e["rows_quarantined"] for e in entries), "reasons": dict(sorted(reasons.items())),
        "seconds": seconds, "files": entries, "files_new": new_files,
    }


def _flag_duplicates(con: duckdb.DuckDBPyConnection, schema: Schema, src: str, flags: str, order: list[str]) -> None:
    """Quarantine later rows repeating an earlier stageable row's record id: ``duplicate`` when every
    value is the same, ``duplicate_id`` when the values differ; the first (file, then line order) is kept."""
    rid = schema.columns_with_role("record_id")
    if not rid:
        return
    key, name = q(rid[0].name + "__t"), rid[0].name
    # the common case costs one aggregate: no repeated id, nothing more to do
    good = f"(SELECT s.*, f._pos FROM {src} s POSITIONAL JOIN (SELECT rowid AS _pos, _fail FROM {flags}) f " \
           f"WHERE f._fail IS NULL)"
    if not con.execute(f"SELECT count(*) FROM (SELECT {key} FROM {good} GROUP BY 1 HAVING count(*) > 1)").fetchall()[0][0]:
        return
    values = ", ".join(q(c.name + "__t") for c in schema.columns)
    files = "[" + ", ".join(lit(n) for n in order) + "]"
    con.execute(f"""CREATE OR REPLACE TEMP TABLE _dups AS
        WITH rep AS (SELECT {key} AS k FROM {good} GROUP BY 1 HAVING count(*) > 1),
        r AS (SELECT g.{key} AS k, g._pos, row({values}) AS v, list_position({files}, g._file) AS fi, g._line
              FROM {good} g WHERE g.{key} IN (SELECT k FROM rep))
        SELECT _pos, CASE WHEN v IS NOT DISTINCT FROM first_value(v) OVER w THEN 'duplicate' ELSE 'duplicate_id' END
                   || ':' || {lit(name)} AS reason,
               row_number() OVER w AS n
        FROM r WINDOW w AS (PARTITION BY k ORDER BY fi, _line)""")
    con.execute(f"UPDATE {flags} SET _fail = d.reason FROM _dups d WHERE {flags}.rowid = d._pos AND d.n > 1")
    con.execute("DROP TABLE _dups")


def _refuse_wrong_encoding(f: LandingFile, schema: Schema, got: Loaded, max_share: float) -> None:
    bad = [r for r in got.rejects if r[5] == "encoding"]
    if got.rows_read and len(bad) / got.rows_read > max_share:
        first = min(bad, key=lambda r: r[1])
        raise IngestError(f"landing/{f.name}: {len(bad):,} of {got.rows_read:,} rows are not valid "
                          f"{schema.encoding} (first at line {first[1]}, column '{first[4]}'): the file is in "
                          f"another encoding; declare it as 'encoding' in {schema.path.name}")


def _fill_raw(con: duckdb.DuckDBPyConnection, fails: str, schema: Schema, files: list[LandingFile],
              loaded: dict[str, Loaded]) -> None:
    """Fill ``raw`` of failing rows: the CSV line (one file pass) or, for Parquet, the row as JSON."""
    fmt = {f.name: f.fmt for f in files}
    missing = con.execute(f"SELECT _file, list(_line), list(_row) FROM {fails} WHERE raw IS NULL GROUP BY _file").fetchall()
    for name, lines, rows in missing:
        got = loaded[name]
        if got.raw_lookup is None:
            continue
        if fmt[name] == "parquet":
            by_row = parquet_rows_json(con, got.raw_lookup, schema, rows)
            text = {ln: by_row.get(r, "") for ln, r in zip(lines, rows)}
        else:
            text = raw_lines(got.raw_lookup, set(lines))
        con.execute("CREATE OR REPLACE TEMP TABLE _rawfill (_line BIGINT, raw VARCHAR)")
        con.executemany("INSERT INTO _rawfill VALUES (?, ?)", list(text.items()))
        con.execute(f"""UPDATE {fails} SET raw = r.raw FROM _rawfill r
                        WHERE {fails}._file = {lit(name)} AND {fails}._line = r._line""")
        con.execute("DROP TABLE _rawfill")


def _manifest_entries(con, schema: Schema, files: list[LandingFile], loaded: dict[str, Loaded], src: str,
                      fails: str, rejects_table: str, staged_total: int) -> list[dict]:
    parsed = dict(con.execute(f"SELECT _file, count(*) FROM {src} GROUP BY _file").fetchall())
    failed = dict(con.execute(f"SELECT _file, count(*) FROM {fails} GROUP BY _file").fetchall())
    reasons: dict[str, Counter] = {f.name: Counter() for f in files}
    for name, reason, n in con.execute(
            f"SELECT _file, reason, count(*) FROM (SELECT * FROM {fails} UNION ALL SELECT * FROM {rejects_table}) "
            f"GROUP BY ALL").fetchall():
        reasons[name][reason] += n
    entries = []
    for f in files:
        got = loaded[f.name]
        staged = parsed.get(f.name, 0) - failed.get(f.name, 0)
        quarantined = failed.get(f.name, 0) + len(got.rejects)
        if staged + quarantined != got.rows_read:
            # a bug, never a data problem: refuse to publish rather than lose a row
            raise HhlinkError(f"landing/{f.name}: internal error: {got.rows_read} rows read but {staged} staged "
                              f"+ {quarantined} quarantined; nothing published")
        entries.append({
            "file": f.name, "source": schema.source, "format": f.fmt, "bytes": f.size, "sha256": f.sha256,
            "schema": f"schemas/{schema.path.name}", "schema_version": schema.version, "reader": got.reader,
            "rows_read": got.rows_read, "rows_staged": staged, "rows_quarantined": quarantined,
            "reasons": dict(sorted(reasons[f.name].items())),
        })
        if f.fmt == "csv":
            # reconciled against the file's own line count in linkage.ingest.landing.load_csv
            entries[-1].update({"data_lines": got.data_lines, "continuation_lines": got.continuation_lines,
                                "final_newline": got.final_newline, "line_ends": f.line_ends})
    if sum(e["rows_staged"] for e in entries) != staged_total:
        raise HhlinkError(f"{schema.source}: internal error: {staged_total} rows written to staged/ but "
                          f"{sum(e['rows_staged'] for e in entries)} counted; nothing published")
    return entries
