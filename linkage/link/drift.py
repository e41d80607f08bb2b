"""Drift between a stored linkage model and the data of a new release; the gate that stops a drifted release.

A model trained once and reused for every delivery (:func:`linkage.link.stage.link`) is only
right while the data look like the data it was trained on. This module measures, per
comparison level, how the data moved:

* **m side**: the share of *predicted matches* (pairs at or above the linkage threshold) at each
  level, over the predicted matches that involve a *newest* identity: at a later release
  those new in that release (the delivery); at training, its mirror, those first seen in
  the history's latest year of their source (:func:`recent_identities_sql`). Both are
  the newest records matched across the same kind of time gap to older ones, so people
  moving house between the two is not drift (over every match, training saw far more
  same-year pairs, and a 100,000-person delivery's postcode moved 0.28 by that alone).
  A release in which every identity is new (a new key re-encodes them all) takes the
  training's definition instead: its newest by ``first_year``.
  A delivery whose names carry more typos shows fewer exact-name agreements among its
  matches.
* **u side**: the share of *random pairs* at each level (u by random sampling: a seeded
  sample of identities crossed with another), over every identity of the release, as a
  retrain would re-estimate it. Not over the new identities alone: who is new (pupils
  starting school, say) is no random sample of the population, so their random pairs
  differ in age by construction, not by drift.
* **records matched**: the share of records whose person holds records of another source.

Each share is taken per source pair (``benefits-earnings``, ...) and the training profile
is reweighted to the release's mix of source pairs, so a delivery of PAYE returns only is
compared with how PAYE matches looked at training, not with a mix of school records. A
level's drift is the larger of its absolute change on the m side and on the u side
(probability points, 0 to 1); the null level ("not recorded") is a level too, so a source
that stops sending an identifier drifts. The stored model's own m and u are shown beside.

The gate (:func:`check_drift`) stops a release whose largest drift passes
``link.max_drift``, naming the level, when the m side rests on at least
``link.drift_min_pairs`` predicted matches (fewer cannot tell drift from chance).

The SQL is built by pure functions (``*_sql``) and run on the link stage's DuckDB
connection, over the ``identities`` table (keyed encodings only; only counts come out).

Example:
    >>> comparisons = [{"output_column_name": "sex", "comparison_levels": [
    ...     {"sql_condition": '"sex_tok_l" IS NULL OR "sex_tok_r" IS NULL', "label_for_charts": "null",
    ...      "is_null_level": True},
    ...     {"sql_condition": '"sex_tok_l" = "sex_tok_r"', "label_for_charts": "same"},
    ...     {"sql_condition": "ELSE", "label_for_charts": "other"}]}]
    >>> print(level_case_sql(comparisons[0]))
    case when "sex_tok_l" IS NULL OR "sex_tok_r" IS NULL then 'null' when "sex_tok_l" = "sex_tok_r" then 'same' else 'other' end
"""

from __future__ import annotations

import duckdb

from linkage.db import quote_ident, quote_literal
from linkage.quality import QualityGateError

__all__ = ["DriftGateError", "check_drift", "compare_profiles", "level_case_sql", "matched_share_sql", "profile",
           "recent_identities_sql"]


class DriftGateError(QualityGateError):
    """The release's data drifted from the stored model beyond ``link.max_drift`` (a quality gate: the flow stops)."""


def level_case_sql(comparison: dict) -> str:
    """A CASE expression giving each pair's level label for one comparison (Splink's levels, in order)."""
    parts = []
    for level in comparison["comparison_levels"]:
        label = quote_literal(level.get("label_for_charts") or level["sql_condition"])
        if level["sql_condition"].strip().upper() == "ELSE":
            parts.append(f"else {label}")
        else:
            parts.append(f"when {level['sql_condition']} then {label}")
    if not parts[-1].startswith("else"):
        parts.append("else null")
    return "case " + " ".join(parts) + " end"


def _pairs_sql(pairs: str, columns: list[str], identities: str = "identities") -> str:
    """Pairs ``(unique_id_l, unique_id_r)`` with every identity column as ``<col>_l``, ``<col>_r`` and their source pair."""
    sides = ", ".join(f"{s}.{quote_ident(c)} as {quote_ident(c + '_' + s)}" for c in columns for s in ("l", "r"))
    return f"""select least(l.source, r.source) || '-' || greatest(l.source, r.source) as source_pair,
                      l.source as source_dataset_l, r.source as source_dataset_r, {sides}
               from {pairs} x join {identities} l on l.unique_id = x.unique_id_l
                              join {identities} r on r.unique_id = x.unique_id_r"""


def level_counts_sql(comparisons: list[dict], pairs: str, columns: list[str], identities: str = "identities") -> str:
    """Rows ``(source_pair, comparison, level, n)``: how many of ``pairs`` fall at each level of each comparison."""
    cases = ", ".join(f"{level_case_sql(c)} as {quote_ident('g_' + c['output_column_name'])}" for c in comparisons)
    unions = " union all ".join(
        f"select source_pair, {quote_literal(c['output_column_name'])} as comparison, "
        f"{quote_ident('g_' + c['output_column_name'])} as level, count(*) as n from g group by all"
        for c in comparisons)
    return f"with p as ({_pairs_sql(pairs, columns, identities)}), g as (select source_pair, {cases} from p) {unions}"


def random_pairs_sql(left: str, identities: str = "identities", side: int = 1000, seed: int = 1) -> str:
    """About ``side`` x ``side`` random pairs: a seeded sample of ``left``'s identities crossed with one of ``identities``."""
    return f"""select a.unique_id as unique_id_l, b.unique_id as unique_id_r
               from (select unique_id from {left} using sample reservoir({int(side)} rows) repeatable ({int(seed)})) a
               cross join (select unique_id from {identities}
                           using sample reservoir({int(side)} rows) repeatable ({int(seed) + 1})) b
               where a.unique_id <> b.unique_id"""


def _shares(con: duckdb.DuckDBPyConnection, sql: str) -> dict:
    """``{source_pair: {"n": pairs, "levels": {comparison: {level: share}}}}`` from level counts."""
    out: dict = {}
    for source_pair, comparison, level, n in con.execute(sql).fetchall():
        sp = out.setdefault(source_pair, {"levels": {}})
        sp["levels"].setdefault(comparison, {})[level] = int(n)
    for sp in out.values():
        totals = {c: sum(levels.values()) for c, levels in sp["levels"].items()}
        sp["n"] = max(totals.values(), default=0)
        sp["levels"] = {c: {lv: round(n / totals[c], 6) for lv, n in levels.items()} for c, levels in sp["levels"].items()}
    return out


def matched_share_sql(new_only: bool) -> str:
    """Per source: records, and records whose person (cluster) holds records of another source.

    From the identities, each counting its records (``n_records``) and of one source, rather
    than from every record; and, for the new identities' records, only the persons holding
    them: a monthly delivery's few thousand persons, not the whole population's records
    (19.4 million at 1M persons). The same counts as a join of the records.
    """
    scope = "where i.unique_id in (select unique_id from new_identities)" if new_only else ""
    persons = "where c.cluster_id in (select cluster_id from rc)" if new_only else ""
    return f"""
        with rc as (select i.source, i.n_records, c.cluster_id
                    from identities i join clusters c using (unique_id) {scope}),
        ps as (select c.cluster_id, count(distinct i.source) n_sources
               from identities i join clusters c using (unique_id) {persons} group by 1)
        select rc.source, sum(rc.n_records), coalesce(sum(rc.n_records) filter (where ps.n_sources > 1), 0)
        from rc join ps using (cluster_id) group by 1 order by 1"""


def profile(con: duckdb.DuckDBPyConnection, comparisons: list[dict], matched_pairs: str, *, new_only: bool,
            sample_side: int = 1000, max_matched_pairs: int = 200_000, seed: int = 1) -> dict:
    """Level shares among predicted matches and random pairs, and the share of records matched.

    Args:
        con: the link stage's connection: ``identities`` (with ``source`` and ``n_records``, the
            records of each), ``clusters`` (``unique_id, cluster_id``) and, when ``new_only``,
            ``new_identities`` (``unique_id``).
        comparisons: the model's comparisons in DuckDB SQL (Splink settings, ``comparison_levels``).
        matched_pairs: a table of predicted matches ``(unique_id_l, unique_id_r)``.
        new_only: restrict the predicted matches and the records matched to those involving a
            new identity (random pairs are always drawn from every identity).
        sample_side: random pairs are about ``sample_side`` squared.
        max_matched_pairs: predicted matches beyond this are sampled (seeded).
        seed: the sampling seed.

    Returns:
        ``{"m": shares, "u": shares, "records_matched": {source: [records, matched]}}`` where
        shares are ``{source_pair: {"n", "levels": {comparison: {level: share}}}}``.
    """
    columns = [r[0] for r in con.execute("describe identities").fetchall() if r[0] not in ("unique_id", "source")]
    scope = ("where unique_id_l in (select unique_id from new_identities) "
             "or unique_id_r in (select unique_id from new_identities)") if new_only else ""
    con.execute(f"""create or replace temp table _drift_matched as
                    select unique_id_l, unique_id_r from {matched_pairs} {scope}
                    using sample reservoir({int(max_matched_pairs)} rows) repeatable ({int(seed)})""")
    con.execute(f"create or replace temp table _drift_random as "
                f"{random_pairs_sql('identities', side=sample_side, seed=seed)}")
    # the pairs' identities first: joining the pairs to every identity's encodings twice took
    # 5.9 s of a monthly delivery's drift at 1,000,000 persons, against 2.2 s through these few
    con.execute("""create or replace temp table _drift_ids as select * from identities semi join (
                       select unique_id_l as unique_id from _drift_matched union select unique_id_r from _drift_matched
                       union select unique_id_l from _drift_random union select unique_id_r from _drift_random)
                   using (unique_id)""")
    out = {"m": _shares(con, level_counts_sql(comparisons, "_drift_matched", columns, "_drift_ids")),
           "u": _shares(con, level_counts_sql(comparisons, "_drift_random", columns, "_drift_ids")),
           "records_matched": {s: [int(n), int(k)] for s, n, k in con.execute(matched_share_sql(new_only)).fetchall()}}
    con.execute("drop table _drift_matched; drop table _drift_random; drop table _drift_ids")
    return out


def recent_identities_sql(identities: str = "identities") -> str:
    """``new_identities`` at training: each source's identities first seen in its latest year.

    The m side's baseline: a delivery's new identities are its newest, so the training
    profile is taken over the history's newest too (an identity's ``first_year``, per source,
    as each source keeps its own calendar). With a history of one year, that is every identity.
    """
    return f"""create or replace temp table new_identities as
               select unique_id from {identities}
               qualify first_year = max(first_year) over (partition by source)"""


def _standardised(base: dict, now: dict) -> tuple[dict, dict, int, list[str]]:
    """Per comparison and level, the share at training and now, both weighted by now's mix of source pairs."""
    common = [sp for sp in now if sp in base and now[sp]["n"]]
    total = sum(now[sp]["n"] for sp in common)
    b: dict = {}
    n: dict = {}
    for sp in common:
        w = now[sp]["n"] / total
        for which, src in ((b, base[sp]), (n, now[sp])):
            for comparison, levels in src["levels"].items():
                for level, share in levels.items():
                    key = (comparison, level)
                    which[key] = which.get(key, 0.0) + w * share
    return b, n, total, sorted(sp for sp in now if sp not in base)


def _records_matched(counts: dict, weights: dict) -> float | None:
    """The share of records matched, per source reweighted to ``weights`` (records per source)."""
    total = sum(weights.get(s, 0) for s in counts)
    if not total:
        return None
    return round(sum(weights.get(s, 0) / total * (k / n if n else 0.0) for s, (n, k) in counts.items()), 6)


def compare_profiles(model: dict, at_training: dict, now: dict) -> dict:
    """Per level: the stored model's m and u, the m and u shares at training and now, and the drift.

    Args:
        model: the stored model's settings (Splink JSON: comparisons with m and u).
        at_training: :func:`profile` of the training data (stored with the model).
        now: :func:`profile` of this release's new data.

    Returns:
        ``{"levels": [...], "largest": {...} | None, "matched_pairs", "random_pairs",
        "records_matched": {"at_training", "now"}, "source_pairs_not_seen_in_training"}``;
        each level row holds ``comparison, level, model_m, model_u, m_at_training, m_now,
        u_at_training, u_now, drift``.
    """
    m_base, m_now, m_pairs, m_unseen = _standardised(at_training["m"], now["m"])
    u_base, u_now, u_pairs, _ = _standardised(at_training["u"], now["u"])
    rows = []
    for comp in model["comparisons"]:
        name = comp["output_column_name"]
        for level in comp["comparison_levels"]:
            label = level.get("label_for_charts") or level["sql_condition"]
            key = (name, label)
            values = [m_base.get(key, 0.0), m_now.get(key, 0.0), u_base.get(key, 0.0), u_now.get(key, 0.0)]
            m_drift = abs(values[1] - values[0]) if m_pairs else 0.0
            u_drift = abs(values[3] - values[2]) if u_pairs else 0.0
            rows.append({"comparison": name, "level": label,
                         "model_m": None if level.get("is_null_level") else level.get("m_probability"),
                         "model_u": None if level.get("is_null_level") else level.get("u_probability"),
                         "m_at_training": round(values[0], 4), "m_now": round(values[1], 4),
                         "u_at_training": round(values[2], 4), "u_now": round(values[3], 4),
                         "drift": round(max(m_drift, u_drift), 4), "side": "m" if m_drift >= u_drift else "u"})
    largest = max(rows, key=lambda r: r["drift"], default=None)
    weights = {s: n for s, (n, _) in now["records_matched"].items()}
    return {"levels": rows, "largest": largest, "matched_pairs": m_pairs, "random_pairs": u_pairs,
            "source_pairs_not_seen_in_training": m_unseen,
            "records_matched": {"at_training": _records_matched(at_training["records_matched"], weights),
                                "now": _records_matched(now["records_matched"], weights),
                                "records": sum(weights.values())}}


def check_drift(drift: dict, max_drift: float | None, min_pairs: int) -> dict:
    """Apply the gate; returns ``{"bound", "min_pairs", "judged", "passed", "reason"}``.

    Raises:
        DriftGateError: the largest drift passes ``max_drift`` and enough matches were seen;
            the message names the comparison, the level and the side (m or u) in one line.
    """
    judged = max_drift is not None and drift["matched_pairs"] >= min_pairs
    gate = {"bound": max_drift, "min_pairs": min_pairs, "judged": judged, "passed": True, "reason": None}
    if max_drift is None:
        gate["reason"] = "no bound set (link.max_drift)"
    elif not judged:
        gate["reason"] = (f"{drift['matched_pairs']} predicted matches involve new records, fewer than "
                          f"link.drift_min_pairs = {min_pairs}: drift shown, not judged")
    top = drift["largest"]
    if judged and top is not None and top["drift"] > max_drift:
        before, after = (top["m_at_training"], top["m_now"]) if top["side"] == "m" else (top["u_at_training"], top["u_now"])
        where = "predicted matches" if top["side"] == "m" else "random pairs"
        gate.update(passed=False, reason=(
            f"drift gate: comparison '{top['comparison']}' level '{top['level']}' moved from {before:.3f} to "
            f"{after:.3f} of {where} ({top['side']} side, drift {top['drift']:.3f} > link.max_drift {max_drift:g}); "
            "the release is stopped and linked/ kept; if the data changed for good, retrain deliberately with "
            "'hhlink link --retrain'"))
        raise DriftGateError(gate["reason"])
    return gate
