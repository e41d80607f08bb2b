"""Great Expectations quality gates on the staged tables, and the auditors' reports.

Each source has one suite, ``expectations/<source>.json``, loaded at run time. Every
expectation in it states its ``severity``: ``critical`` (a failure stops the run before
anything downstream) or ``warning`` (reported). A suite's ``meta.hhlink.derived_columns``
names SQL expressions added to the validated table, which is how cross-field rules such
as "the pupil's age fits the year group" become ordinary column expectations.

How validation scales: GX runs through its **SQL execution engine on DuckDB**, over the
staged Parquet files in place (one DuckDB view per source, read by GX as a table
asset). Every expectation becomes an aggregate query that DuckDB
answers from the columnar file (multi-threaded, projection push-down), so no table is
pulled into pandas, nothing is sampled, and the counts in the reports are exact at any
size. GX 1.24 has no DuckDB data source of its own; its generic SQL data source works
through ``duckdb_engine`` with the buffering fix in :mod:`linkage.compat.gx_duckdb`. GX's
regex expectations are not available on that dialect, so format rules are
``UnexpectedRowsExpectation`` queries using DuckDB's ``regexp_full_match``.

Incremental validation (an ingest that carries earlier deliveries' staged rows): GX runs on
the rows new in the run for the *row-wise* expectation types (:data:`ROW_WISE`: each row is
judged on its own values, so counts over a table are the sums of counts over its parts), and
their counts are added to the counts carried from the previous run for the earlier rows
(``staged/quality.json``); when ingest says which staged parts hold the carried rows
(:attr:`Carried.parts`), the new rows are read from the other parts alone. Percentages and
the pass/fail judgement are recomputed from the summed counts exactly as GX computes them.
Uniqueness (:data:`ACROSS_PARTS`) is validated the same way when the earlier rows are staged
files of their own: GX on the new rows, plus the rows that a value shared by new and earlier
rows repeats (:func:`_across`, over the key columns of the earlier files), plus the carried
counts. Every other type (table row count, proportions of non-null values, means, ...) runs
on the whole staged table (all its parts) each time. A source
with no new staged rows carries every result (no GX run, so no Data Docs page for it this time),
unless no source has new rows and Data Docs are wanted: then all are validated whole. Counts
are carried only when the suite, the GX version and the carried files and rows are those they
were counted on; otherwise the source is validated whole. ``quality_summary.json`` says per source how it was validated, when, and on
which rows (``validated``), and per expectation which counts were carried (``scope``).

Privacy: results are requested with ``partial_unexpected_count: 0`` and unexpected-row
queries return no rows to the report (GX keeps rows only in ``COMPLETE`` format), so the
reports carry counts and rates, never record values.

Offline reports: the Data Docs pages GX builds link their CSS, fonts and scripts from
public CDNs. :func:`offline_data_docs` copies the project's vendored copies
(``gx/vendor/``, fetched once from the npm registry) next to the pages and rewrites every
link, then refuses to publish if any page still refers to an http(s) asset.

GX runs offline: analytics are disabled in ``gx/great_expectations.yml``, by
``GX_ANALYTICS_ENABLED=false`` and by ``context.enable_analytics(False)``; the context is
a file context whose config is kept in the project (``gx/``) and copied into a scratch
folder of the workspace for each run.

Example:
    >>> from linkage.quality import load_suite_file
    >>> suite = load_suite_file("expectations/education.json")
    >>> {e["severity"] for e in suite["expectations"]} == {"critical", "warning"}
    True
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from linkage import resources
from linkage.db import connect, read_literal
from linkage.db import quote_ident as q
from linkage.db import quote_literal as q_lit
from linkage.errors import HhlinkError

log = logging.getLogger(__name__)

SEVERITIES = ("critical", "warning")
GX_PROJECT = resources.packaged("gx")
VENDOR = GX_PROJECT / "vendor"
RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": 0, "include_unexpected_rows": False}

# CDN asset -> file under gx/vendor/ (Data Docs of GX 1.24; an unknown one stops publication)
CDN_ASSETS = {
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": "bootstrap/css/bootstrap.min.css",
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": "bootstrap/js/bootstrap.min.js",
    "https://code.jquery.com/jquery-3.7.1.min.js": "jquery/jquery.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": "popper/popper.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": "bootstrap-table/bootstrap-table.min.css",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": "bootstrap-table/bootstrap-table.min.js",
    "https://unpkg.com/bootstrap-table@1.19.1/dist/extensions/filter-control/bootstrap-table-filter-control.min.js":
        "bootstrap-table/filter-control/bootstrap-table-filter-control.min.js",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.css":
        "bootstrap-table/filter-control/bootstrap-table-filter-control.min.css",
    "https://unpkg.com/bootstrap-table@1.19.0/dist/extensions/filter-control/bootstrap-table-filter-control.min.css":
        "bootstrap-table/filter-control/bootstrap-table-filter-control.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css":
        "bootstrap-datepicker/bootstrap-datepicker.min.css",
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js":
        "bootstrap-datepicker/bootstrap-datepicker.min.js",
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": "fontawesome/css/all.min.css",
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css":
        "bootstrap-dark/bootstrap-prefers-dark.css",
    "https://cdn.jsdelivr.net/npm/vega@5": "vega/vega.min.js",
    "https://cdn.jsdelivr.net/npm/vega-lite@5": "vega/vega-lite.min.js",
    "https://cdn.jsdelivr.net/npm/vega-embed@6": "vega/vega-embed.min.js",
}
#: Expectation types whose counts over a table are the sums of their counts over any split of its
#: rows (each row judged on its own values), and how GX judges the summed counts. Any other type
#: is validated over the whole table (see :func:`validate`).
ROW_WISE = {
    "expect_column_values_to_not_be_null": "not_null",         # nulls out of every row
    "expect_column_values_to_be_in_set": "column_map",         # out of the non-null rows
    "expect_column_values_to_be_between": "column_map",
    "expect_column_pair_values_a_to_be_greater_than_b": "pair_map",   # out of the rows not ignored
    "unexpected_rows_expectation": "row_query",                # rows returned, if the query is a plain row filter
}
#: Uniqueness expectations, validated on the new rows when the earlier rows are staged files of their own
#: (:attr:`Carried.parts`): GX counts the repeats among the new rows, :func:`_across` the rows that a value
#: shared by new and earlier rows makes repeats although neither part repeats it alone (reading the key
#: columns of the earlier files), and with the carried counts they add up as a column map's.
ACROSS_PARTS = {"expect_column_values_to_be_unique": "column", "expect_compound_columns_to_be_unique": "column_list"}
_COUNTS = {"not_null": ("element_count", "unexpected_count"),
           "unique": ("element_count", "unexpected_count", "missing_count"),
           "column_map": ("element_count", "unexpected_count", "missing_count"),
           "pair_map": ("element_count", "unexpected_count", "missing_count"),
           "row_query": ("observed_value",)}
_PROVENANCE = ("scope", "now", "carried", "across")      # report-only keys of an expectation's result
_GX_IMAGES = "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/"
_ASSET_ATTR = re.compile(r'<(link|script|img)\b[^>]*?\b(href|src)\s*=\s*"(https?://[^"]*)"', re.IGNORECASE)
_CSS_URL = re.compile(r"url\(\s*['\"]?(https?://[^'\")]+)", re.IGNORECASE)


class QualityError(HhlinkError):
    """A suite file is malformed, or the quality reports cannot be produced."""


class QualityGateError(HhlinkError):
    """A critical expectation failed: the run stops before anything downstream."""


def load_suite_file(path: Path | str) -> dict:
    """Read and check one suite file: GX suite JSON where every expectation has a severity.

    Raises:
        QualityError: missing file, bad JSON, or an expectation without a valid severity.
    """
    path = resources.resolve(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QualityError(f"{path}: expectation suite not found") from None
    except json.JSONDecodeError as exc:
        raise QualityError(f"{path}: not valid JSON ({exc})") from None
    for i, exp in enumerate(data.get("expectations", [])):
        if exp.get("severity") not in SEVERITIES:
            raise QualityError(f"{path}: expectation {i} ({exp.get('type')}) needs \"severity\": "
                               f"one of {', '.join(SEVERITIES)}")
    if not data.get("expectations"):
        raise QualityError(f"{path}: the suite holds no expectations")
    return data


def _gx():
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # pyspark (optional extra) warns about pandas 3 when GX imports it
        import great_expectations as gx
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("great_expectations").setLevel(logging.WARNING)

    import linkage.compat.gx_duckdb  # noqa: F401  (registers the duckdb+hhlink dialect)
    return gx


def _context(gx, scratch: Path):
    from great_expectations.data_context.types.base import ProgressBarsConfig

    (scratch / "gx").mkdir(parents=True, exist_ok=True)
    shutil.copy(GX_PROJECT / "great_expectations.yml", scratch / "gx" / "great_expectations.yml")
    ctx = gx.get_context(mode="file", project_root_dir=str(scratch))
    ctx.enable_analytics(False)
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return ctx


def _suite(gx, name: str, data: dict, indices: list[int] | None = None, notes: str | None = None):
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    suite = gx.ExpectationSuite(name=name, meta={k: v for k, v in data.get("meta", {}).items() if k != "hhlink"},
                                notes=notes)
    for i, exp in enumerate(data["expectations"]):
        if indices is not None and i not in indices:
            continue
        cfg = ExpectationConfiguration(type=exp["type"], kwargs=exp["kwargs"], meta=exp.get("meta"),
                                       notes=exp.get("notes"), description=exp.get("description"),
                                       severity=exp["severity"])
        suite.add_expectation(cfg.to_domain_obj())
    return suite


def _summarise(result, data: dict) -> dict:
    """Counts and rates of one expectation's result (never values)."""
    exp = result.expectation_config
    res = result.result or {}
    out = {
        "type": exp.type,
        "column": exp.kwargs.get("column") or exp.kwargs.get("column_list")
        or ([exp.kwargs["column_A"], exp.kwargs["column_B"]] if "column_A" in exp.kwargs else None),
        "description": exp.description,
        "severity": str(getattr(exp.severity, "value", exp.severity)),
        "success": bool(result.success),
    }
    for key in ("element_count", "unexpected_count", "unexpected_percent", "missing_count"):
        if key in res:
            out[key] = res[key]
    obs = res.get("observed_value")
    if isinstance(obs, (int, float)):
        out["observed_value"] = obs
    if "mostly" in exp.kwargs:
        out["mostly"] = exp.kwargs["mostly"]
    info = result.exception_info or {}
    raised = info.get("raised_exception") if "raised_exception" in info else any(
        isinstance(v, dict) and v.get("raised_exception") for v in info.values())
    if raised:
        out["success"] = False
        out["error"] = "the expectation could not be evaluated (see GX logs with HHLINK_DEBUG=1)"
        log.debug("expectation %s raised: %s", exp.type, info)
    return out


@dataclass
class Carried:
    """The earlier rows of one source in an incremental ingest, and the counts carried for them.

    Attributes:
        files: the landing files whose staged rows are carried unchanged (``_file`` values).
        rows: how many staged rows those files hold.
        record: this source's entry of the previous run's ``staged/quality.json`` (what
            :func:`carry_record` made), or None when there is none.
        parts: the staged files holding the carried rows and no other (ingest's parts carried
            unchanged), among those validated; the new rows are then read from the other files
            alone, so a delivery's validation reads no earlier row for its row-wise checks.
            None: the new rows are told apart by ``_file`` over the whole table.
    """

    files: list[str]
    rows: int
    record: dict | None
    parts: list[Path] | None = None


@dataclass
class _Plan:
    how: str                        # "full", "incremental" or "carried"
    why: str = ""                   # why a source with carried rows is validated whole
    rows_now: int = 0
    files_now: tuple[str, ...] = ()
    row_wise: dict[int, str] | None = None     # suite position -> ROW_WISE kind (incremental only)
    new_parts: list | None = None              # the staged files holding the new rows only (else None)
    across: dict[int, int] | None = None       # uniqueness expectation -> rows repeating across old and new


def suite_digest(data: dict) -> str:
    """SHA-256 of a suite's content (what carried counts were counted under)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _walk(node) -> list:
    out = [node]
    for child in (node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()):
        out += _walk(child)
    return out


def _parse(con, sql: str) -> dict | None:
    """DuckDB's syntax tree of one SELECT statement, or None."""
    got = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0])
    return None if got.get("error") or len(got.get("statements", [])) != 1 else got["statements"][0]["node"]


def _beyond_row(node: dict) -> bool:
    """Whether a syntax tree holds a subquery or a window function (values from other rows)."""
    return any(isinstance(n, dict) and n.get("class") in ("SUBQUERY", "WINDOW") for n in _walk(node))


def _not_a_row_filter(con, sql: str) -> str | None:
    """Why ``sql`` (``_batch`` standing for the table) is not ``SELECT columns FROM _batch WHERE <row
    condition>``, or None when it is: only then do its row counts over parts of a table add up."""
    node = _parse(con, sql)
    if node is None:
        return "not one statement DuckDB parses"
    if node.get("type") != "SELECT_NODE" or node.get("modifiers") or node.get("cte_map", {}).get("map") \
            or node.get("group_expressions") or node.get("group_sets") or node.get("having") \
            or node.get("qualify") or node.get("sample") or node.get("aggregate_handling") != "STANDARD_HANDLING":
        return "not a plain SELECT ... WHERE (grouping, DISTINCT, LIMIT, ORDER BY, CTE or sample)"
    table = node.get("from_table") or {}
    if table.get("type") != "BASE_TABLE" or table.get("table_name") != "_batch" or table.get("sample"):
        return "reads something else than the batch alone"
    if any(item.get("class") not in ("COLUMN_REF", "CONSTANT", "STAR") for item in node.get("select_list", [])):
        return "its select list computes values"
    if _beyond_row(node):
        return "a subquery or window function looks beyond the row"
    return None


def _row_wise(con, exp: dict, parts: bool = False) -> str | None:
    """The :data:`ROW_WISE` kind of one expectation, or None when its result needs the whole table.
    With ``parts`` (the earlier rows are files of their own), uniqueness (:data:`ACROSS_PARTS`) is ``unique``."""
    if parts and exp["type"] in ACROSS_PARTS and "row_condition" not in exp["kwargs"] \
            and exp["kwargs"].get("ignore_row_if", "all_values_are_missing") == "all_values_are_missing":
        return "unique"
    kind = ROW_WISE.get(exp["type"])
    if kind is None or "row_condition" in exp["kwargs"]:
        return None
    if kind == "row_query":
        try:
            sql = exp["kwargs"]["unexpected_rows_query"].format(batch="_batch")
        except (KeyError, IndexError, ValueError, AttributeError):
            return None
        if _not_a_row_filter(con, sql):
            return None
    return kind


def _scan(paths) -> str:
    """``read_parquet(...)`` of one file or of several read as one table (in order)."""
    if isinstance(paths, list | tuple):
        if len(paths) != 1:
            return f"read_parquet([{', '.join(read_literal(p) for p in paths)}])"
        paths = paths[0]
    return f"read_parquet({read_literal(paths)})"


def _new_parts(path, carried: Carried) -> list | None:
    """The staged files that hold no carried row, when ``carried.parts`` says which do; else None."""
    if carried.parts is None or not isinstance(path, list | tuple):
        return None
    held = {str(p) for p in carried.parts}
    if not held <= {str(p) for p in path}:
        return None
    return [p for p in path if str(p) not in held]


def _plan(con, source: str, path, data: dict, carried: Carried | None, version: str) -> _Plan:
    """How to validate one source: whole, new rows plus carried counts, or nothing new (all carried)."""
    if carried is None or not carried.files:
        return _Plan("full")
    rec = carried.record
    if not rec:
        return _Plan("full", "no counts were carried from the previous run (staged/quality.json)")
    if rec.get("suite_sha256") != suite_digest(data):
        return _Plan("full", "the suite changed since the carried counts were made")
    if rec.get("gx_version") != version:
        return _Plan("full", f"the carried counts were made by GX {rec.get('gx_version')}, this is {version}")
    if sorted(rec.get("files", [])) != sorted(carried.files) or rec.get("rows") != carried.rows:
        return _Plan("full", "the carried counts cover other files or rows than those carried")
    for name, expr in data.get("meta", {}).get("hhlink", {}).get("derived_columns", {}).items():
        node = _parse(con, f"SELECT {expr} AS x FROM _batch")
        if node is None or _beyond_row(node):
            return _Plan("full", f"derived column '{name}' depends on other rows")
    exps = data["expectations"]
    items = {i.get("index"): i for i in rec.get("expectations", [])}
    if set(items) != set(range(len(exps))) or any(items[i]["type"] != e["type"] for i, e in enumerate(exps)):
        return _Plan("full", "the carried counts do not match the suite's expectations")
    fresh = _new_parts(path, carried)
    row_wise = {i: k for i, e in enumerate(exps) if (k := _row_wise(con, e, fresh is not None))}
    for i, kind in row_wise.items():
        if "error" in items[i] or any(not isinstance(items[i].get(k), int) for k in _COUNTS[kind]):
            return _Plan("full", f"expectation {i} ({exps[i]['type']}) has no carried counts")
    files = ", ".join(q_lit(f) for f in carried.files)
    if fresh is not None:
        # the carried parts hold the carried rows alone (ingest carried them unchanged); their row
        # counts come from the Parquet footers, and only the new parts are read
        old = con.execute(f"SELECT count(*) FROM {_scan(carried.parts)}").fetchall()[0][0]
        if fresh:
            stray, total_new = con.execute(f"SELECT count(*) FILTER (WHERE _file IN ({files})), count(*) "
                                           f"FROM {_scan(fresh)}").fetchall()[0]
        else:
            stray = total_new = 0
        if stray:
            return _Plan("full", f"the new staged parts of {source} hold {stray:,} rows of the carried files")
        total = old + total_new
    else:
        old, total = con.execute(f"SELECT count(*) FILTER (WHERE _file IN ({files})), count(*) "
                                 f"FROM {_scan(path)}").fetchall()[0]
    if old != carried.rows:
        return _Plan("full", f"staged/{source}.parquet holds {old:,} rows of the carried files, "
                             f"the carried counts cover {carried.rows:,}")
    if total == old:
        return _Plan("carried", rows_now=0)
    new = [r[0] for r in con.execute(f"SELECT DISTINCT _file FROM {_scan(fresh if fresh else path)} "
                                     f"WHERE _file NOT IN ({files}) ORDER BY 1").fetchall()]
    return _Plan("incremental", rows_now=total - old, files_now=tuple(new), row_wise=row_wise, new_parts=fresh)


def _across(con, old: str, new: str, columns: list[str]) -> int:
    """Rows that a key (value, or tuple of values none NULL) found among both the earlier rows (view ``old``)
    and the new ones (``new``) makes repeats, beyond those each part repeats alone: per shared key, the
    side(s) holding it once. GX counts a row unexpected when its key, none of it NULL, occurs more than once
    (a NULL in a compound key never matches, so such a row is not); the repeats within each part are GX's."""
    cols = ", ".join(q(c) for c in columns)
    given = " AND ".join(f"{q(c)} IS NOT NULL" for c in columns)
    on = " AND ".join(f"o.{q(c)} = n.{q(c)}" for c in columns)
    return con.execute(f"""WITH n AS (SELECT {cols}, count(*) AS c FROM {q(new)} WHERE {given} GROUP BY ALL),
        o AS (SELECT {', '.join('o.' + q(c) for c in columns)}, count(*) AS c FROM {q(old)} o SEMI JOIN n ON {on}
              GROUP BY ALL)
        SELECT coalesce(sum(CAST(o.c = 1 AS BIGINT) + CAST(n.c = 1 AS BIGINT)), 0) FROM o JOIN n ON {on}""").fetchall()[0][0]


def _combine(kind: str, exp: dict, now: dict, before: dict) -> dict:
    """An expectation's result over carried and new rows from both parts' counts, judged as GX judges
    (``ColumnMapExpectation._validate``, ``ExpectColumnValuesToNotBeNull._validate``,
    ``ColumnPairMapExpectation._validate``, ``UnexpectedRowsExpectation._validate``)."""
    out = {k: now.get(k) for k in ("type", "column", "description", "severity")}
    keys = _COUNTS[kind]
    if "error" in now or any(not isinstance(now.get(k), int) for k in keys):
        return {**out, "success": False, "error": now.get("error", "GX returned no counts for the new rows"),
                "index": now["index"]}
    total = {k: now[k] + before[k] for k in keys}
    mostly = exp["kwargs"].get("mostly", 1)
    if kind == "row_query":
        out.update(success=total["observed_value"] == 0, observed_value=total["observed_value"])
    elif kind == "not_null":
        e, u = total["element_count"], total["unexpected_count"]
        out.update(success=True if e == 0 else (e - u) / e >= mostly, element_count=e, unexpected_count=u,
                   unexpected_percent=u / e * 100 if e > 0 else None)
    else:
        e, u, m = total["element_count"], total["unexpected_count"], total["missing_count"]
        considered = e - m          # non-null rows (column map) or rows not ignored (column pair)
        ok = True if e == 0 or considered == 0 else (float(considered) - float(u)) / float(considered) >= mostly
        out.update(success=ok, element_count=e, unexpected_count=u,
                   unexpected_percent=u / considered * 100 if e > 0 and considered > 0 else None, missing_count=m)
    if "mostly" in exp["kwargs"]:
        out["mostly"] = exp["kwargs"]["mostly"]
    out["index"] = now["index"]
    return out


def _run(gx, ctx, ds, name: str, table: str, data: dict, indices: list[int], notes: str | None = None) -> list[dict]:
    """One GX validation of ``table`` with the suite's expectations at ``indices``: their summaries."""
    asset = ds.add_table_asset(name=table, table_name=table)
    batch = asset.add_batch_definition_whole_table(f"{table}_staged")
    suite = ctx.suites.add(_suite(gx, name, data, indices, notes))
    position = {e.id: i for e, i in zip(suite.expectations, indices)}
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{name}_ingest", data=batch, suite=suite))
    run = vd.run(result_format=RESULT_FORMAT)
    return [{**_summarise(r, data), "index": position[r.expectation_config.id]} for r in run.results]


def _dates(history: list[dict]) -> str:
    days = sorted({h["at"] for h in history})
    return days[0] if len(days) == 1 else f"in {len(days)} runs, {days[0]} to {days[-1]}"


def validate(staged: dict[str, Path], suites_dir: Path, reports_dir: Path, scratch: Path,
             data_docs: bool = True, carried: dict[str, Carried] | None = None) -> dict:
    """Run each source's suite on its staged Parquet file and write the quality reports.

    Args:
        staged: source name -> staged Parquet file (or the list of files read as its one table, in
            order: ingest's parts), or an Arrow ``RecordBatchReader`` of a file
            encrypted at rest (``research/``): its rows are copied into the scratch database,
            which the caller removes.
        suites_dir: folder of ``<source>.json`` suites.
        reports_dir: folder to write (``data_docs/`` and ``quality_summary.json``).
        scratch: an empty folder for GX's file context (removed by the caller).
        data_docs: build the HTML Data Docs as well as the JSON summary.
        carried: per source of a staged file, its rows carried unchanged from the previous ingest
            and their counts: the row-wise expectations then run on the other (new) rows only.

    Returns:
        ``{"sources": {source: {"success", "critical_failed", "warnings_failed", "validated",
        "expectations": [...]}}, "critical_failed": [...], "seconds": ...}``; each expectation's
        ``index`` is its position in the suite (:func:`carry_record` keeps them for the next run).

    Example:
        >>> validate({"education": Path("staged/education.parquet")}, Path("expectations"),
        ...          Path("reports/quality"), Path("/tmp/gx"))["critical_failed"]    # doctest: +SKIP
        []
    """
    t0 = time.perf_counter()
    at = _now()
    carried = carried or {}
    version = importlib.metadata.version("great_expectations")
    # one view per source (staged columns + the suite's derived columns) in a scratch
    # DuckDB file; GX reads them as table assets, so every metric is a query DuckDB
    # answers from the Parquet file
    suites = {source: load_suite_file(suites_dir / f"{source}.json") for source in staged}
    scratch.mkdir(parents=True, exist_ok=True)
    db = scratch / "staged_views.duckdb"
    plans: dict[str, _Plan] = {}
    rows: dict[str, int] = {}
    with connect(database=db) as con:
        for source, path in staged.items():
            derived = suites[source].get("meta", {}).get("hhlink", {}).get("derived_columns", {})
            extra = "".join(f", {expr} AS {q(name)}" for name, expr in derived.items())
            if isinstance(path, Path | str | list | tuple):
                con.execute(f"CREATE VIEW {q(source)} AS SELECT *{extra} FROM {_scan(path)}")
                plans[source] = _plan(con, source, path, suites[source], carried.get(source), version)
                plan = plans[source]
                if plan.how == "incremental":
                    files = ", ".join(q_lit(f) for f in carried[source].files)
                    con.execute(f"CREATE VIEW {q(source + '_new_rows')} AS SELECT *{extra} FROM "
                                f"{_scan(plan.new_parts or path)} WHERE _file NOT IN ({files})")
                    unique = {i: k for i, k in plan.row_wise.items() if k == "unique"}
                    if unique:
                        con.execute(f"CREATE VIEW {q(source + '_old_rows')} AS SELECT *{extra} FROM "
                                    f"{_scan(carried[source].parts)}")
                        plan.across = {}
                        for i in unique:
                            kw = suites[source]["expectations"][i]["kwargs"]
                            key = ACROSS_PARTS[suites[source]["expectations"][i]["type"]]
                            plan.across[i] = _across(con, source + "_old_rows", source + "_new_rows",
                                                     [kw[key]] if key == "column" else list(kw[key]))
            else:
                con.register("_rows_in", path)
                try:
                    con.execute(f"CREATE TABLE {q(source)} AS SELECT *{extra} FROM _rows_in")
                finally:
                    con.unregister("_rows_in")
                plans[source] = _Plan("full")
            rows[source] = con.execute(f"SELECT count(*) FROM {q(source)}").fetchall()[0][0]
    if data_docs and plans and all(p.how == "carried" for p in plans.values()):
        # a re-run with nothing new: validated whole (as a full run) so that Data Docs are built
        plans = {s: _Plan("full", "nothing new to validate, and Data Docs are built from a run") for s in plans}
    summary: dict = {"engine": "great_expectations SQL engine on DuckDB (duckdb_engine)",
                     "gx_version": version, "sources": {}, "critical_failed": [],
                     "row_wise_types": sorted(ROW_WISE)}
    gx = ctx = ds = None
    if any(p.how != "carried" for p in plans.values()):
        gx = _gx()
        ctx = _context(gx, scratch)
        ds = ctx.data_sources.add_sql(name="staged", connection_string=f"duckdb+hhlink:///{db}")
    for source in staged:
        data, plan, t = suites[source], plans[source], time.perf_counter()
        exps = data["expectations"]
        before = {i["index"]: i for i in carried[source].record["expectations"]} if plan.how != "full" else {}
        if plan.how == "full":
            items = _run(gx, ctx, ds, source, source, data, list(range(len(exps))))
            history = [{"at": at, "how": "full", "rows": rows[source]}]
            note = "every expectation ran on the whole table" + (f" (not incremental: {plan.why})" if plan.why else "")
        elif plan.how == "carried":
            history = carried[source].record["validations"]
            items = [{**{k: v for k, v in before[i].items() if k not in _PROVENANCE},
                      "scope": "carried whole: the table has no new rows"}
                     for i in range(len(exps))]
            note = f"no new staged rows: every result carried (validated {_dates(history)})"
        else:
            earlier = carried[source].record["validations"]
            history = [*earlier, {"at": at, "how": "new rows", "rows": plan.rows_now, "files": list(plan.files_now)}]
            wise = sorted(plan.row_wise)
            whole = [i for i in range(len(exps)) if i not in plan.row_wise]
            news = ", ".join(plan.files_now)
            items = []
            if wise:
                now = _run(gx, ctx, ds, f"{source}_new_rows", f"{source}_new_rows", data, wise,
                           notes=f"Row-wise expectations on the {plan.rows_now:,} staged rows new in this run "
                                 f"({news}) only. Their counts plus those carried for the earlier "
                                 f"{carried[source].rows:,} rows are in quality_summary.json.")
                for n in now:
                    i, kind = n["index"], plan.row_wise[n["index"]]
                    keys = _COUNTS[kind]
                    if kind == "unique":
                        shared = (plan.across or {})[i]
                        both = {**n, "unexpected_count": n["unexpected_count"] + shared} \
                            if isinstance(n.get("unexpected_count"), int) else n
                        item = _combine(kind, exps[i], both, before[i])
                        item["scope"] = (f"uniqueness: {plan.rows_now:,} new rows validated now + {shared:,} rows "
                                         f"repeating a value across new and earlier rows + counts carried for "
                                         f"{carried[source].rows:,} earlier rows")
                        item["across"] = shared
                    else:
                        item = _combine(kind, exps[i], n, before[i])
                        item["scope"] = (f"row-wise: {plan.rows_now:,} new rows validated now + counts carried for "
                                         f"{carried[source].rows:,} earlier rows")
                    item["now"] = {k: n.get(k) for k in keys}
                    item["carried"] = {k: before[i][k] for k in keys}
                    items.append(item)
            if whole:
                items += [{**i, "scope": "whole table, validated now"}
                          for i in _run(gx, ctx, ds, f"{source}_whole_table", source, data, whole,
                                        notes="Expectations that need the whole staged table, on all of it.")]
            items.sort(key=lambda i: i["index"])
            uniq = sum(1 for i in wise if plan.row_wise[i] == "unique")
            note = (f"row-wise expectations ({len(wise) - uniq}) ran on the {plan.rows_now:,} rows new in this run "
                    f"({news}) and their counts were added to those carried for the {carried[source].rows:,} "
                    f"earlier rows (validated {_dates(earlier)})"
                    + (f"; uniqueness ({uniq}) likewise, plus the rows a value shared by new and earlier rows "
                       f"repeats (key columns of the earlier rows read)" if uniq else "")
                    + f"; the other {len(whole)} ran on the whole table")
        crit = [i for i in items if not i["success"] and i["severity"] == "critical"]
        warn = [i for i in items if not i["success"] and i["severity"] == "warning"]
        summary["sources"][source] = {
            "suite": f"expectations/{source}.json", "expectations": items,
            "evaluated": len(items), "passed": sum(i["success"] for i in items),
            "critical_failed": len(crit), "warnings_failed": len(warn), "success": not crit,
            "seconds": round(time.perf_counter() - t, 2),
            "validated": {"how": plan.how, "at": at, "note": note, "rows": rows[source],
                          "rows_now": rows[source] if plan.how == "full" else plan.rows_now,
                          **({"files_now": list(plan.files_now)} if plan.files_now else {}),
                          **({"rows_carried": carried[source].rows} if plan.how != "full" else {}),
                          "history": history},
            "suite_sha256": suite_digest(data),
        }
        summary["critical_failed"] += [f"{source}: {_label(i)}" for i in crit]
        log.info("%s (%s): %d expectations, %d critical and %d warning failures", source, plan.how, len(items),
                 len(crit), len(warn))
    reports_dir.mkdir(parents=True, exist_ok=True)
    if data_docs and ctx is not None:
        ctx.build_data_docs()
        site = scratch / "gx" / "uncommitted" / "data_docs" / "local_site"
        offline_data_docs(site, reports_dir / "data_docs")
        summary["data_docs"] = "data_docs/index.html"
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    (reports_dir / "quality_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def carry_record(summary: dict, source: str, files: list[str]) -> dict:
    """What the next incremental validation of ``source`` needs from this one (``staged/quality.json``).

    Args:
        summary: what :func:`validate` returned.
        source: the source.
        files: the landing files whose staged rows were validated (every file of the staged table).
    """
    s = summary["sources"][source]
    return {"suite": s["suite"], "suite_sha256": s["suite_sha256"], "gx_version": summary["gx_version"],
            "files": list(files), "rows": s["validated"]["rows"], "validations": s["validated"]["history"],
            "expectations": [{k: v for k, v in i.items() if k not in _PROVENANCE} for i in s["expectations"]]}


def _label(item: dict) -> str:
    col = item["column"]
    col = ",".join(col) if isinstance(col, list) else col
    what = item["description"] or (f"{item['type']}({col})" if col else item["type"])
    if "observed_value" in item:
        what += f" [observed {item['observed_value']:.4g}]"
    elif "unexpected_percent" in item and item["unexpected_percent"] is not None:
        what += f" [{item['unexpected_percent']:.2f}% unexpected]"
    return what


def _copy_tree(src: Path, dest: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy a folder's files without their modes: copies get the process's umask, like every file hhlink writes."""
    for path in sorted(Path(src).rglob("*")):
        target = dest / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.name not in skip:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def offline_data_docs(site: Path, dest: Path) -> None:
    """Copy a built Data Docs site to ``dest`` with every CDN asset replaced by a local copy.

    Raises:
        QualityError: a page or stylesheet still refers to an http(s) asset after rewriting
            (an asset this project has not vendored, e.g. after a GX upgrade).
    """
    if dest.exists():
        shutil.rmtree(dest)
    _copy_tree(site, dest)
    vendor = dest / "static" / "vendor"
    _copy_tree(VENDOR, vendor, skip=("README.md",))
    leftovers = []
    for page in dest.rglob("*.html"):
        rel = os.path.relpath(dest / "static", page.parent)
        html = page.read_text(encoding="utf-8")
        for url, local in CDN_ASSETS.items():
            html = html.replace(f'"{url}"', f'"{rel}/vendor/{local}"')
        # GX's logo images are fetched from S3 with a tracking query: use the local logo
        html = re.sub(r'"' + re.escape(_GX_IMAGES) + r'[^"]*"', f'"{rel}/images/logo-long-vector.svg"', html)
        # subresource-integrity and CORS attributes block local file:// scripts
        html = re.sub(r'\s(integrity|crossorigin)="[^"]*"', "", html)
        page.write_text(html, encoding="utf-8")
        leftovers += [f"{page.relative_to(dest)}: {m.group(3)}" for m in _ASSET_ATTR.finditer(html)]
    for css in dest.rglob("*.css"):
        text = css.read_text(encoding="utf-8", errors="replace")
        if _GX_IMAGES in text:
            text = re.sub(re.escape(_GX_IMAGES) + r"[^'\")]*", "../images/logo-long-vector.svg", text)
            css.write_text(text, encoding="utf-8")
        leftovers += [f"{css.relative_to(dest)}: {u}" for u in _CSS_URL.findall(text)]
    if leftovers:
        raise QualityError("Data Docs would fetch assets from the internet (vendor them in gx/vendor/): "
                           + "; ".join(sorted(set(leftovers))[:5]))
