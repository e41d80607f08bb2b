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

import json
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path

from linkage import resources
from linkage.db import connect, read_literal
from linkage.db import quote_ident as q
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


def _suite(gx, name: str, data: dict):
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    suite = gx.ExpectationSuite(name=name, meta={k: v for k, v in data.get("meta", {}).items() if k != "hhlink"})
    for exp in data["expectations"]:
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


def validate(staged: dict[str, Path], suites_dir: Path, reports_dir: Path, scratch: Path,
             data_docs: bool = True) -> dict:
    """Run each source's suite on its staged Parquet file and write the quality reports.

    Args:
        staged: source name -> staged Parquet file, or an Arrow ``RecordBatchReader`` of a file
            encrypted at rest (``research/``): its rows are copied into the scratch database,
            which the caller removes.
        suites_dir: folder of ``<source>.json`` suites.
        reports_dir: folder to write (``data_docs/`` and ``quality_summary.json``).
        scratch: an empty folder for GX's file context (removed by the caller).
        data_docs: build the HTML Data Docs as well as the JSON summary.

    Returns:
        ``{"sources": {source: {"success", "critical_failed", "warnings_failed",
        "expectations": [...]}}, "critical_failed": [...], "seconds": ...}``.
    """
    t0 = time.perf_counter()
    gx = _gx()
    ctx = _context(gx, scratch)
    # one view per source (staged columns + the suite's derived columns) in a scratch
    # DuckDB file; GX reads them as table assets, so every metric is a query DuckDB
    # answers from the Parquet file
    suites = {source: load_suite_file(suites_dir / f"{source}.json") for source in staged}
    db = scratch / "staged_views.duckdb"
    with connect(database=db) as con:
        for source, path in staged.items():
            derived = suites[source].get("meta", {}).get("hhlink", {}).get("derived_columns", {})
            extra = "".join(f", {expr} AS {q(name)}" for name, expr in derived.items())
            if isinstance(path, Path | str):
                con.execute(f"CREATE VIEW {q(source)} AS SELECT *{extra} FROM read_parquet({read_literal(path)})")
                continue
            con.register("_rows_in", path)
            try:
                con.execute(f"CREATE TABLE {q(source)} AS SELECT *{extra} FROM _rows_in")
            finally:
                con.unregister("_rows_in")
    ds = ctx.data_sources.add_sql(name="staged", connection_string=f"duckdb+hhlink:///{db}")
    summary: dict = {"engine": "great_expectations SQL engine on DuckDB (duckdb_engine)",
                     "gx_version": gx.__version__, "sources": {}, "critical_failed": []}
    for source, path in staged.items():
        data = suites[source]
        asset = ds.add_table_asset(name=source, table_name=source)
        batch = asset.add_batch_definition_whole_table(f"{source}_staged")
        suite = ctx.suites.add(_suite(gx, source, data))
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{source}_ingest", data=batch, suite=suite))
        t = time.perf_counter()
        run = vd.run(result_format=RESULT_FORMAT)
        items = [_summarise(r, data) for r in run.results]
        crit = [i for i in items if not i["success"] and i["severity"] == "critical"]
        warn = [i for i in items if not i["success"] and i["severity"] == "warning"]
        summary["sources"][source] = {
            "suite": f"expectations/{source}.json", "expectations": items,
            "evaluated": len(items), "passed": sum(i["success"] for i in items),
            "critical_failed": len(crit), "warnings_failed": len(warn), "success": not crit,
            "seconds": round(time.perf_counter() - t, 2),
        }
        summary["critical_failed"] += [f"{source}: {_label(i)}" for i in crit]
        log.info("%s: %d expectations, %d critical and %d warning failures", source, len(items), len(crit), len(warn))
    reports_dir.mkdir(parents=True, exist_ok=True)
    if data_docs:
        ctx.build_data_docs()
        site = scratch / "gx" / "uncommitted" / "data_docs" / "local_site"
        offline_data_docs(site, reports_dir / "data_docs")
        summary["data_docs"] = "data_docs/index.html"
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    (reports_dir / "quality_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


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
