"""Linkage quality gates: the run stops before ``assemble`` and ``disclose`` when linkage falls short.

The data-quality gates are the stages' own: ``ingest`` and ``assemble`` raise
:class:`~linkage.quality.QualityGateError` on a critical Great Expectations failure. The
linkage gates compare the linkage-quality report with ``[flow]`` in ``hhlink.toml``.

Example:
    >>> from linkage.config import FlowConfig
    >>> report = {"expected_vs_true": {"expected_precision_at_threshold": 0.95},
    ...           "match_rates": [{"source": "education", "with_another_source": 0.99}]}
    >>> rows, failures = linkage_checks(report, FlowConfig(min_match_rate={"education": 0.9}))
    >>> failures
    ['expected precision at the threshold 0.95000 is below the minimum 0.99']
"""

from __future__ import annotations

from linkage.config import FlowConfig

__all__ = ["linkage_checks"]


def linkage_checks(report: dict, cfg: FlowConfig) -> tuple[list[dict], list[str]]:
    """Compare a linkage-quality report (``reports/linkage/report.json``) with the minimums.

    Args:
        report: the report's JSON.
        cfg: the ``[flow]`` settings.

    Returns:
        ``(rows, failures)``: one row per check (``check``, ``value``, ``minimum``, ``passed``)
        for the artifact, and one sentence per failed check (figures only).
    """
    rows: list[dict] = []
    failures: list[str] = []
    precision = (report.get("expected_vs_true") or {}).get("expected_precision_at_threshold")
    ok = precision is not None and precision >= cfg.min_expected_precision
    rows.append({"check": "expected precision at threshold", "value": precision,
                 "minimum": cfg.min_expected_precision, "passed": ok})
    if not ok:
        failures.append("no pairs at the threshold, so no expected precision" if precision is None else
                        f"expected precision at the threshold {precision:.5f} is below the minimum "
                        f"{cfg.min_expected_precision:g}")
    rates = {r["source"]: r.get("with_another_source") for r in report.get("match_rates", [])}
    for source, minimum in sorted(cfg.min_match_rate.items()):
        rate = rates.get(source)
        ok = rate is not None and rate >= minimum
        rows.append({"check": f"match rate {source}", "value": rate, "minimum": minimum, "passed": ok})
        if not ok:
            failures.append(f"{source}: no records linked (source missing from the report)" if rate is None else
                            f"{source}: match rate {rate:.4f} is below the minimum {minimum:g}")
    return rows, failures
