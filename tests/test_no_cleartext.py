"""No cleartext identifier from landing/ appears in anything pseudonymisation or a later stage writes.

A small population is taken through every stage command that exists, in pipeline order
(ingest, pseudonymise, link, ...), each run as ``hhlink -v`` so its console output and
log lines are scanned too. Then every file in the zones from pseudonymisation on
(pseudonymised/, linked/, research/, published/, reports/, audit/, logs/) is scanned for
every identifier value in landing/ (names, NINOs, UPNs, dates of birth, postcodes,
address lines). The scan grows as later stages land: add a stage's command to
``PIPELINE`` and its zone is covered.

How files are read, so that a value cannot hide:

* Parquet is compressed, so it is decoded: every string cell is matched whole and word
  by word; DATE cells of tables keyed by record token are matched against each record's
  own date of birth through the crosswalk (a date column may hold an attribute such as a
  claim's start date, which can coincide with some person's birthday, so a bare date
  cannot be judged on its own); key-value metadata is matched as text.
* JSON is parsed and each string matched like a cell; HTML has scripts, styles and tags
  removed and its text matched word by word; other text likewise.
* Binary files (the encrypted crosswalk) are matched for values of 8 bytes or more, and
  must not hold a Parquet or text preamble.

Words that software writes anyway are not evidence: a single word without digits counts
only when it is not in the vocabulary of the software that writes the zones (Splink,
Great Expectations and the web assets vendored for its Data Docs in ``gx/``) or of the
attribute contracts (schemas,
expectations, local authority and region names, ethnic groups). So "GREEN" in a CSS
file, "MAX" in a chart spec or "WEST" in "North West" do not count, while a NINO, UPN,
postcode, date, address line or multi-word name always does. The price: a leak of only
such common-word names (Green, Max, June...) would go unseen; a real leak carries the
other names with it.
"""

from __future__ import annotations

import datetime as dt
import functools
import html
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import linkage.cli  # noqa: F401  (registers the commands)
from linkage.cli import cli
from linkage.config import load_config
from linkage.crosswalk import read_crosswalk
from linkage.keys import MasterKey
from linkage.pseudonymise.store import is_encrypted, read_encrypted
from linkage.schemas import SOURCES, load_schema
from tests.conftest import FAST_LINK, config_file

# Stage commands in pipeline order; those registered on the CLI run. Add later stages here.
PIPELINE = ("ingest", "pseudonymise", "link", "evaluate", "assemble", "disclose", "publish")
SCANNED_ZONES = ("pseudonymised", "linked", "research", "published", "reports", "audit", "logs")
IDENTIFIER_ROLES = ("first_name", "middle_names", "surname", "nino", "upn", "dob", "postcode", "address")
_WORD = re.compile(r"[A-Z0-9'/-]+")
_MAX_WINDOW = 5                      # words in the longest multi-word value matched in text


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A 2,000-person population through every available stage; returns (root, key, console output)."""
    from synthetic_data import generate_population

    root = tmp_path_factory.mktemp("cleartext")
    generate_population(load_config(generate={"persons": 2000, "seed": 11}).generate, root)
    secret = secrets.token_bytes(32)                               # generated here; never a key file
    env = {**os.environ, "HHLINK_KEY": secret.hex()}
    env.pop("HHLINK_KEY_FILE", None)
    # the packaged settings with a smaller u sample (FAST_LINK): every zone is written as before
    config = config_file(tmp_path_factory.mktemp("cleartext_config"), link=FAST_LINK)
    console = []
    ran = []
    for command in PIPELINE:
        if command not in cli.commands:
            continue
        proc = subprocess.run([sys.executable, "-m", "linkage.cli", "-v", command, "--workspace", str(root),
                               "--config", str(config)],
                              capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
        console.append((command, proc.stdout + "\n" + proc.stderr))
        ran.append(command)
    assert ran[:2] == ["ingest", "pseudonymise"]
    return root, MasterKey(secret, "test"), console


def _reader(root: Path, source: str) -> str:
    schema = load_schema(source)
    (path,) = [p for p in (root / "landing").iterdir() if p.stem == schema.file_stem]
    return (f"read_csv('{path}', all_varchar = true, header = true)" if path.suffix == ".csv"
            else f"read_parquet('{path}')")


def _date(text: str) -> dt.date | None:
    try:
        return dt.date.fromisoformat(text[:10])
    except ValueError:
        return None


def _landing_values(root: Path) -> tuple[set[str], dict[tuple[str, str], dt.date]]:
    """Every identifier value in landing/, upper-cased, and each record's date of birth."""
    con = duckdb.connect()
    values: set[str] = set()
    dobs: dict[tuple[str, str], dt.date] = {}
    codes = set()
    for source in SOURCES:
        schema = load_schema(source)
        for c in schema.columns:
            codes |= {str(v).upper() for v in (c.allowed or ())}
        reader = _reader(root, source)
        rid = schema.columns_with_role("record_id")[0].name
        for role in IDENTIFIER_ROLES:
            for col in schema.columns_with_role(role):
                rows = con.execute(f"SELECT DISTINCT CAST({col.name} AS VARCHAR) FROM {reader} "
                                   f"WHERE {col.name} IS NOT NULL").fetchall()
                for (v,) in rows:
                    v = " ".join(v.upper().split())
                    if role == "dob":
                        d = _date(v)
                        values |= {d.isoformat(), d.strftime("%d/%m/%Y"), d.strftime("%Y%m%d")} if d else {v}
                    elif role == "postcode":
                        values |= {v, v.replace(" ", "")}
                    elif role == "middle_names":
                        values |= set(v.split())
                    else:
                        values.add(v)
                if role == "dob":
                    for r, d in con.execute(f"SELECT {rid}, CAST({col.name} AS VARCHAR) FROM {reader}").fetchall():
                        if d and _date(d):
                            dobs[(source, r)] = _date(d)
    values = {v for v in values if len(v) >= 2} - codes
    return values, dobs


@functools.lru_cache(maxsize=1)
def _software_vocabulary() -> frozenset[str]:
    """Words the output-writing software and the attribute contracts use (see the module docstring)."""
    project = Path(__file__).resolve().parents[1]
    files = [p for m in ("splink", "great_expectations") for p in Path(importlib.util.find_spec(m).origin).parent.rglob("*")
             if p.suffix in (".py", ".json", ".html", ".j2", ".jinja", ".md", ".txt", ".css", ".js", ".svg", ".sql")]
    # the project's vendored web assets for offline Data Docs (gx/vendor/), copied into reports/quality/
    files += [p for p in (project / "gx").rglob("*") if p.suffix in (".js", ".css", ".svg", ".txt", ".html", ".json")]
    files += [*(project / "schemas").glob("*.toml"), *(project / "expectations").rglob("*.json"), project / "hhlink.toml",
              project / "synthetic_data" / "reference" / "upper_tier_local_authorities.csv"]
    words: set[str] = set()
    for path in files:
        try:
            words.update(_WORD.findall(path.read_text(errors="ignore").upper()))
        except OSError:
            continue
    con = duckdb.connect()
    for ref in ("forenames", "surnames"):                      # the ethnic-group column, not the names
        words.update(g.upper() for (g,) in con.execute(
            f"SELECT DISTINCT \"group\" FROM read_csv('{project}/synthetic_data/reference/{ref}.csv')").fetchall())
    return frozenset(words)


def _evidence(hits: set[str]) -> set[str]:
    """Drop single common words the software writes anyway; keep everything else."""
    vocabulary = _software_vocabulary()
    return {h for h in hits if " " in h or any(ch.isdigit() for ch in h) or h not in vocabulary}


def _words_and_windows(text: str) -> set[str]:
    words = _WORD.findall(text.upper())
    out = set()
    for n in range(1, _MAX_WINDOW + 1):
        out.update(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
    return out


def _cells_hits(cells: set[str], values: set[str]) -> set[str]:
    hits = set()
    for cell in cells:
        norm = " ".join(cell.upper().split())
        if norm in values:
            hits.add(norm)
        hits |= _words_and_windows(norm) & values
    return hits


def _html_text(text: str) -> str:
    text = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", text)
    return html.unescape(re.sub(r"(?s)<[^>]+>", " ", text))


def _json_strings(node) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {s for v in node.values() for s in _json_strings(v)}
    if isinstance(node, list):
        return {s for v in node for s in _json_strings(v)}
    return {node} if isinstance(node, str) else set()


def _attribute_dates(root: Path) -> dict:
    """(source, record_id, column) -> date, for every non-identifier date column the landing row delivered."""
    con = duckdb.connect()
    out = {}
    for source in SOURCES:
        schema = load_schema(source)
        rid = schema.columns_with_role("record_id")[0].name
        for c in schema.columns:
            if c.type == "date" and not c.is_identifier:
                for r, d in con.execute(f"SELECT {rid}, CAST({c.name} AS VARCHAR) FROM {_reader(root, source)} "
                                        f"WHERE {c.name} IS NOT NULL").fetchall():
                    out[(source, r, c.name)] = _date(d)
    return out


def _binary_hits(data: bytes, values: set[str]) -> set[str]:
    """Values of 8 bytes or more found anywhere in ``data`` (upper-cased).

    A value's occurrence lies inside a run of bytes that all occur in some value, at least 8
    long; in ciphertext such runs are rare and short, so each value is looked for only in
    them rather than in the whole file (one pass over the file instead of one per value).
    """
    long = {v: v.encode() for v in values if len(v.encode()) >= 8}
    if not long:
        return set()
    alphabet = sorted({b for e in long.values() for b in e})
    runs = re.findall(b"[" + b"".join(re.escape(bytes([b])) for b in alphabet) + b"]{8,}", data.upper())
    return {v for v, e in long.items() if any(e in run for run in runs)}


def _scan_parquet(path: Path, values: set[str], dobs: dict, owners: dict, attribute_dates: dict,
                  key: MasterKey | None = None) -> set[str]:
    if is_encrypted(path):
        # an encrypted zone file: no value of 8+ bytes in its bytes, and none in what it decrypts to
        hits = _binary_hits(path.read_bytes(), values)
        plain = Path(tempfile.mkdtemp(prefix="scan-")) / path.name
        zone = path.parent.name
        if zone == "research":   # research/ is encrypted under its project's subkey
            from linkage.pseudonymise.store import research_project, research_zone

            zone = research_zone(research_project(path.parent.parent))
        pq.write_table(read_encrypted(path, key, zone), plain)
        try:
            return hits | _scan_parquet(plain, values, dobs, owners, attribute_dates)
        finally:
            shutil.rmtree(plain.parent, ignore_errors=True)
    con = duckdb.connect()
    hits = set()
    meta = pq.read_schema(path).metadata or {}
    hits |= _words_and_windows(" ".join(f"{k.decode(errors='replace')} {v.decode(errors='replace')}"
                                        for k, v in meta.items())) & values
    types = dict(con.execute(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM '{path}')").fetchall())
    for col, typ in types.items():
        if typ == "VARCHAR":
            cells = {v for (v,) in con.execute(f'SELECT DISTINCT "{col}" FROM \'{path}\' WHERE "{col}" IS NOT NULL').fetchall()}
            hits |= _cells_hits(cells, values)
        elif typ in ("DATE", "TIMESTAMP") and "record_token" in types and owners:
            for token, d in con.execute(f'SELECT record_token, "{col}" FROM \'{path}\' WHERE "{col}" IS NOT NULL').fetchall():
                owner = owners.get(token)
                d = d.date() if isinstance(d, dt.datetime) else d
                # a record's own birthday is a leak, unless the row delivered that date as this attribute
                if owner and dobs.get(owner) == d and attribute_dates.get((*owner, col)) != d:
                    hits.add(f"{col}=dob of {owner[0]} record")
    return hits


def _scan_other(path: Path, values: set[str]) -> set[str]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # binary (the encrypted crosswalk): no readable preamble, and no value of 8+ bytes inside
        assert not data.startswith((b"PAR1", b"{", b"<")), path
        return _binary_hits(data, values)
    if path.suffix == ".json":
        try:
            return _cells_hits(_json_strings(json.loads(text)), values)
        except ValueError:
            pass
    if path.suffix in (".html", ".htm"):
        text = _html_text(text)
    return _words_and_windows(text) & values


def test_no_cleartext_identifier_in_any_output_zone(pipeline):
    root, key, console = pipeline
    values, dobs = _landing_values(root)
    assert len(values) > 5000                                        # names, NINOs, UPNs, dates, postcodes, lines
    attribute_dates = _attribute_dates(root)
    crosswalk = pa.concat_tables(read_crosswalk(root / "pseudonymised" / "crosswalk.enc", key))
    owners = {t: (s, r) for t, s, r in zip(crosswalk["record_token"].to_pylist(), crosswalk["source"].to_pylist(),
                                           crosswalk["record_id"].to_pylist())}
    scanned: dict[str, int] = {}
    found: dict[str, set[str]] = {}
    for zone in SCANNED_ZONES:
        folder = root / zone
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            hits = (_scan_parquet(path, values, dobs, owners, attribute_dates, key) if path.suffix == ".parquet"
                    else _scan_other(path, values))
            scanned[zone] = scanned.get(zone, 0) + 1
            if _evidence(hits):
                found[str(path.relative_to(root))] = _evidence(hits)
    for command, text in console:
        hits = _evidence(_words_and_windows(text) & values)
        if hits:
            found[f"console of hhlink {command}"] = hits
    if found:
        # counts only: set HHLINK_DEBUG=1 to see the (synthetic) values themselves
        show = os.environ.get("HHLINK_DEBUG") == "1"
        pytest.fail("cleartext identifiers found: " + "; ".join(
            f"{k}: {sorted(v) if show else f'{len(v)} value(s)'}" for k, v in sorted(found.items())))
    assert scanned.get("pseudonymised", 0) >= 8, scanned             # 3 identifiers, 3 payload, crosswalk, metadata


def test_the_scan_finds_planted_cleartext(pipeline, tmp_path):
    """The scanner is not blind: values planted in each kind of file are found."""
    root, _, _ = pipeline
    values, dobs = _landing_values(root)
    con = duckdb.connect()
    row = con.execute(f"SELECT forename, surname, nino, postcode, dob, address_line FROM "
                      f"read_csv('{root}/landing/earnings.csv', all_varchar = true) WHERE nino IS NOT NULL "
                      "AND address_line IS NOT NULL LIMIT 1").fetchall()[0]
    forename, surname, nino, postcode, dob, address = row
    table = pa.table({"record_token": ["x" * 32], "note": [f"{surname.lower()}, {forename}"]})
    pq.write_table(table, tmp_path / "p.parquet", compression="zstd")
    assert {surname.upper(), forename.upper()} <= _scan_parquet(tmp_path / "p.parquet", values, dobs, {}, {})
    (tmp_path / "r.json").write_text(json.dumps({"rows": [{"id": 1, "v": nino}]}))
    assert nino in _scan_other(tmp_path / "r.json", values)
    (tmp_path / "r.html").write_text(f"<html><style>.x{{}}</style><td>{html.escape(address)}</td></html>")
    assert address.upper() in _scan_other(tmp_path / "r.html", values)
    (tmp_path / "log.txt").write_text(f"2025 INFO record {postcode.replace(' ', '')} born {dob}\n")
    assert {postcode.replace(" ", "").upper(), dob} <= _scan_other(tmp_path / "log.txt", values)
    (tmp_path / "bin").write_bytes(os.urandom(100) + nino.encode() + os.urandom(100))
    assert nino in _scan_other(tmp_path / "bin", values)
    # a record's own date of birth in a date column of a tokenised table is found
    token = "t" * 32
    owner = ("earnings", con.execute(f"SELECT record_id FROM read_csv('{root}/landing/earnings.csv', "
                                     "all_varchar = true) LIMIT 1").fetchall()[0][0])
    pq.write_table(pa.table({"record_token": [token], "when": pa.array([dobs[owner]], pa.date32())}),
                   tmp_path / "d.parquet")
    assert _scan_parquet(tmp_path / "d.parquet", values, dobs, {token: owner}, {})
    # ... but not when that row delivered the same date as the attribute of that name
    assert not _scan_parquet(tmp_path / "d.parquet", values, dobs, {token: owner}, {(*owner, "when"): dobs[owner]})


def test_log_lines_of_the_stage_hold_no_identifier(pipeline, tmp_path, caplog, monkeypatch):
    """The library's own log records at DEBUG level, captured in-process, name no value."""
    from linkage.pseudonymise.stage import pseudonymise

    root, key, _ = pipeline
    values, _ = _landing_values(root)
    shutil.copytree(root / "staged", tmp_path / "staged")
    monkeypatch.setenv("HHLINK_KEY", key.secret.hex())
    with caplog.at_level(logging.DEBUG):
        pseudonymise(load_config(), tmp_path)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert caplog.records and not _evidence(_words_and_windows(text) & values)


def test_the_scan_reads_encrypted_zone_files(pipeline, tmp_path):
    """A value planted in an encrypted zone file is found through decryption, not missed as ciphertext."""
    from linkage.pseudonymise.store import write_encrypted

    root, key, _ = pipeline
    values, dobs = _landing_values(root)
    surname = sorted(v for v in values if v.isalpha() and len(v) >= 6)[0]
    (tmp_path / "identifiers").mkdir()
    table = pa.table({"record_token": ["t" * 32], "note": [surname]})
    path = tmp_path / "identifiers" / "planted.parquet"
    write_encrypted(path, table.to_batches(), table.schema, key, "identifiers")
    assert is_encrypted(path) and surname.encode() not in path.read_bytes()
    assert surname in _scan_parquet(path, values, dobs, {}, {}, key)


def test_no_key_material_in_any_file_or_console(pipeline):
    """Neither the master key nor any subkey (zones, tokens, crosswalk, Bloom filters, row order) is written
    to any file of the workspace or printed by any stage, in raw, hex or base64 form."""
    import base64

    root, key, console = pipeline
    purposes = ("zone:identifiers", "zone:payload", "tokens", "crosswalk", "row_order", "bloom:first_name",
                "bloom:surname", "bloom:address")
    raw = [key.secret, *(key.subkey(p) for p in purposes)]
    forms = [f for r in raw for f in (r, r.hex().encode(), r.hex().upper().encode(), base64.b64encode(r))]
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(files) > 30
    for path in files:
        data = path.read_bytes()
        assert not [f for f in forms if f in data], path
    text = "\n".join(out for _, out in console).encode()
    assert not [f for f in forms if f in text]
