"""Probabilistic linkage on pseudonymised identifiers: records into persons.

Reads only ``pseudonymised/identifiers/`` (keyed tokens and Bloom filters; no cleartext,
no attributes) and writes ``linked/``:

* ``model.json`` - the trained Splink model (Splink's own JSON);
* ``pairs.parquet`` - scored pairs of identities with match probability and weight;
* ``identities.parquet`` - each distinct identity (records equal on every encoding,
  collapsed so a pupil's twelve school years are compared once) and its person key;
* ``records.NNNN.parquet`` - every record token with its identity, in append-only segments
  (:mod:`linkage.link.linked_records`; a record's person key is its identity's);
* ``households.parquet`` - household membership per person and year, with household keys;
* ``parent_child.parquet`` - parent-child relations with their evidence and confidence;
* ``summary.json`` - counts, timings, training and clustering facts.

The model (``linkage.link.model``) is one Splink model over all three sources
(link and dedupe): u by random sampling, m by EM over several blocking rules,
term-frequency adjustments on name tokens only when they are not context-keyed (by default
they are: a context-keyed token's frequency is one person's). Persons are the connected components of pairs at
or above the threshold (:func:`effective_threshold`).

Example:
    >>> from linkage.config import load_config
    >>> summary = link(load_config(), "workspace")      # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import duckdb

from linkage.config import Config
from linkage.db import connect, path_literal, quote_ident, quote_literal, read_literal, table_exists
from linkage.errors import HhlinkError
from linkage.link import model_store
from linkage.link.households import assemble_households
from linkage.link.model import (ADDRESS_COLUMNS, CONTEXT_COMPARISONS, IDENTITY_COLUMNS, TRAINING_BLOCKS, floor_levels,
                                 model_settings, rule_sql)
from linkage.schemas import SOURCES
from linkage.workspace import Workspace

log = logging.getLogger(__name__)


#: predict an incremental release on the identities a rule can pair with a touched one only
#: (:func:`linkage.link.incremental.reachable_identities`); False gives every identity to Splink, the
#: reference ``tests/test_link_state.py`` compares the pairs with
PREDICT_REACHABLE_ONLY = True


class LinkError(HhlinkError):
    """Linkage cannot run (missing input, or an engine problem)."""


def records_sql(identifiers: str) -> str:
    """SELECT: each record of ``identifiers`` with the few columns later steps use and its identity key."""
    key_parts = ", ".join(
        f"coalesce(hex({c}), '')" if c.endswith("_bf") else f"coalesce({c}, '')" for c in IDENTITY_COLUMNS)
    return f"""
        select record_token, source, year, birth_year, benefit_unit_tok, bu_role, claim_tok,
               source || '-' || left(md5(concat_ws('|', source, {key_parts})), 20) as unique_id, {", ".join(ADDRESS_COLUMNS)}
        from {identifiers}"""


def identity_facts_sql(records: str) -> str:
    """Tables ``identity_address`` (each identity's most frequent address) and ``identity_facts`` from ``records``."""
    addr = ", ".join(ADDRESS_COLUMNS)
    return f"""
        create or replace table identity_address as
        select unique_id, {addr} from (
            select unique_id, {addr}, row_number() over (
                partition by unique_id order by count(*) desc, postcode_tok nulls last, hex(addr_bf) nulls last,
                sex_tok nulls last) rn
            from {records} group by unique_id, {addr})
        where rn = 1;
        create or replace table identity_facts as
        select unique_id, min(source) as source, min(birth_year) as birth_year,
               count(*) as n_records, min(year) as first_year, max(year) as last_year,
               min(record_token) as representative,
               list_sort(list(distinct postcode_tok) filter (where postcode_tok is not null)) as postcode_toks
        from {records} group by unique_id;
    """


def identities_select_sql(encodings: str) -> str:
    """SELECT: ``identities`` from ``identity_facts`` and ``identity_address``, the encodings taken from
    ``encodings``' row (record_token and the encodings) for each identity's representative record."""
    return f"""
        select f.unique_id, f.source, f.birth_year, f.n_records, f.first_year, f.last_year,
               {", ".join(f"p.{c}" for c in IDENTITY_COLUMNS)}, f.postcode_toks, a.* exclude (unique_id)
        from identity_facts f
             join {encodings} p on p.record_token = f.representative
             join identity_address a using (unique_id)"""


def _identities_sql(identifiers: str = "identifiers_in") -> str:
    """Collapse a source's records equal on every identity encoding into identities, keyed deterministically.

    The identity encodings (16 columns, two of them Bloom filters) are not kept on every
    record: at 1M persons the 21M records with them came to about 20 GB and spilled. The
    records table holds the few columns later steps use and each record's identity key;
    the identity facts are aggregated from it, and the encodings are read once more from
    the Parquet files for one representative record per identity (a join on the record
    token), rather than aggregated over every record (81 s of 139 s at 1M persons).
    Leaves ``records``, ``identity_address``, ``identities`` and ``identity_representative``
    (each identity's representative record, which the link state keeps).
    """
    return f"""
        create or replace table records as {records_sql(identifiers)};
        {identity_facts_sql("records")}
        create or replace table identities as
        {identities_select_sql(f"(select record_token, {', '.join(IDENTITY_COLUMNS)} from {identifiers})")}
        order by unique_id;
        create or replace table identity_representative as select unique_id, representative from identity_facts;
        drop table identity_facts;
    """


# public: bench/blocking.py counts comparisons on the identities exactly as link builds them
identities_sql = _identities_sql


def _db_api(config: Config, con: duckdb.DuckDBPyConnection, tmp: Path):
    if config.link.engine == "spark":
        from linkage.link.spark import spark_db_api

        return spark_db_api(config, tmp)
    from splink import DuckDBAPI

    return DuckDBAPI(connection=con)


def _to_spark(con: duckdb.DuckDBPyConnection, db_api, table: str, tmp: Path):
    """A DuckDB table as a Spark DataFrame, through Parquet: BLOB, SMALLINT and VARCHAR keep their types."""
    path = tmp / "spark_in" / f"{table}.parquet"
    path.parent.mkdir(exist_ok=True)
    con.execute(f"copy {quote_ident(table)} to {path_literal(path)} (compression zstd)")
    return db_api.spark.read.parquet(str(path))


def _from_spark(con: duckdb.DuckDBPyConnection, sdf, tmp: Path) -> str:
    """A Splink table on Spark as a DuckDB view over Parquet (no rows through the driver); returns its name."""
    path = tmp / "spark_out" / sdf.physical_name
    sdf.db_api.spark.table(sdf.physical_name).write.mode("overwrite").parquet(str(path))
    name = f"spark_{sdf.templated_name.strip('_')}"
    con.execute(f"create or replace view {quote_ident(name)} as select * from read_parquet({read_literal(path, '*.parquet')})")
    return name


def _predict_on_spark(linker, threshold_match_probability: float):
    """Score the blocked pairs on Spark and keep those at or above the threshold, as Splink's predict does.

    Given the threshold, Spark pushes Splink's filter on the summed match weight into the
    blocking join with every term expanded, so each Dice level runs some fifteen times per
    pair (predict took 5x longer); filtering the materialised scores gives the same pairs.
    """
    scored = linker.inference.predict()
    weight = math.log2(threshold_match_probability / (1 - threshold_match_probability))
    kept = scored.db_api.spark.table(scored.physical_name).where(f"match_weight >= {weight!r}")
    return scored.db_api.register(kept, table_name=f"{scored.physical_name}_kept")


def _trained_settings(model: Path | str, dialect: str) -> dict:
    """The saved model's parameters on this version's comparisons, with their SQL in ``dialect``.

    A model trained on one engine holds that engine's SQL (the Dice levels differ), so the
    comparisons are rebuilt for ``dialect`` and each level takes the saved m, u and term
    frequency settings; the levels must line up one to one (same comparisons, same labels).
    """
    try:
        saved = json.loads(Path(model).read_text())
    except (OSError, ValueError) as exc:
        raise LinkError(f"{model}: cannot read the model ({exc.__class__.__name__})") from None
    settings = model_settings(dialect).create_settings_dict(dialect)
    saved_comparisons = {c.get("output_column_name"): c for c in saved.get("comparisons", [])}
    if sorted(saved_comparisons) != sorted(c["output_column_name"] for c in settings["comparisons"]):
        raise LinkError(f"{model}: its comparisons are not this version's model; retrain it with 'hhlink link --retrain'")
    for comparison in settings["comparisons"]:
        saved_levels = saved_comparisons[comparison["output_column_name"]]["comparison_levels"]
        levels = comparison["comparison_levels"]
        if [lv.get("label_for_charts") for lv in saved_levels] != [lv.get("label_for_charts") for lv in levels]:
            raise LinkError(f"{model}: comparison '{comparison['output_column_name']}' has other levels "
                            "than this version's model; retrain it with 'hhlink link --retrain'")
        for level, old in zip(levels, saved_levels):
            level.update({k: old[k] for k in ("m_probability", "u_probability", "fix_m_probability",
                                              "fix_u_probability", "tf_adjustment_column",
                                              "tf_adjustment_weight", "tf_minimum_u_value") if k in old})
    settings["probability_two_random_records_match"] = saved["probability_two_random_records_match"]
    return settings


def context_u(settings: dict, measured: dict | None) -> list[str]:
    """Set the u of the context-keyed comparisons' levels to the pseudonymiser's measurement, in place.

    See :data:`linkage.link.model.CONTEXT_COMPARISONS` and :mod:`linkage.pseudonymise.context_u`:
    a random sample of pairs here holds few pairs of one date context, mostly the same person,
    so their sampled u is far too high (0.30 for an exact forename at 20,000 persons, against
    0.006 measured). Returns the levels set, as "comparison: level".
    """
    if not measured or not measured.get("comparisons"):
        raise LinkError("pseudonymised/metadata.json has no measured u of the context-keyed name levels "
                        "(context_u): the zone predates them; re-run 'hhlink pseudonymise'")
    done = []
    for comparison in settings["comparisons"]:
        shares = measured["comparisons"].get(comparison["output_column_name"])
        if comparison["output_column_name"] not in CONTEXT_COMPARISONS or not shares:
            continue
        for level in comparison["comparison_levels"]:
            u = shares.get(level.get("label_for_charts"))
            if not level.get("is_null_level") and u:
                level["u_probability"] = u
                done.append(f"{comparison['output_column_name']}: {level['label_for_charts']}")
    return done


YEAR_TYPO_LEVEL = ("dob", "same day and month, year one apart")


def year_typo_u(settings: dict, con: duckdb.DuckDBPyConnection) -> list[str]:
    """Set the u of "same day and month, year one apart" to the chance of that date coincidence, in place.

    On the zone's encodings the level reads the month and day through the names' token of them
    (``name_md_tok``; :func:`linkage.link.model._dob_comparison`), so random pairs agree on it only
    when they also share the full name, which ``names_partial_date`` already counts: sampled, its u
    was 1.3e-6 against about 1e-4 for the dates alone, a Bayes factor some 50 times too strong.
    Here u is the dates' own coincidence: the share of identity pairs born one year apart (from
    ``birth_year``, in clear) times 1/365.25 for the day and month. Returns the level set.
    """
    comparison, label = YEAR_TYPO_LEVEL
    n, apart = con.execute("""with y as (select birth_year, count(*) n from identities
                                         where birth_year is not null group by 1)
                              select (select sum(n) from y),
                                     (select sum(a.n * b.n) from y a join y b on b.birth_year = a.birth_year + 1)
                           """).fetchall()[0]
    if not n or not apart:
        return []
    u = 2 * float(apart) / (float(n) * float(n)) / 365.25
    for c in settings["comparisons"]:
        if c["output_column_name"] != comparison:
            continue
        for level in c["comparison_levels"]:
            if level.get("label_for_charts") == label and "name_md_tok" in level.get("sql_condition", ""):
                level["u_probability"] = u
                return [f"{comparison}: {label}"]
    return []


def effective_threshold(lc, prior: float) -> float:
    """The match probability at or above which two identities are one person, for a model whose
    probability that two random records match is ``prior``.

    A pair is linked when its posterior reaches ``link.threshold`` or, unless
    ``link.threshold_evidence_bits`` is 0, when its Bayes factor (the match weight without the prior)
    reaches that many bits: the probability ``1 / (1 + 2 ** -(bits + log2(prior / (1 - prior))))``
    when that is lower, but never below 0.5 (a pair the model finds more likely two people) nor
    ``keep_pairs_above``. The prior of a random pair falls as the population grows, so a fixed
    probability asks for more evidence the larger the population: at 100,000 persons 0.999
    left apart people recorded with their full name and date of birth at another address, which
    20,000 persons had linked (pairwise recall 0.98722 at 0.999, 0.9997 at this threshold:
    ``bench/results/synthetic.md``).
    """
    if not lc.threshold_evidence_bits:
        return lc.threshold
    if not 0 < prior < 1:
        raise LinkError(f"the model's probability that two random records match is {prior}: cannot set a threshold")
    weight = lc.threshold_evidence_bits + math.log2(prior / (1 - prior))
    return min(lc.threshold, max(0.5, lc.keep_pairs_above, 1 / (1 + 2 ** -weight)))


def linked_threshold(config: Config, linked: Path) -> float:
    """The threshold ``linked/`` was clustered at (its summary), or ``link.threshold`` for an older one."""
    try:
        return float(json.loads((Path(linked) / "summary.json").read_text())["threshold"])
    except (OSError, ValueError, KeyError, TypeError):
        return config.link.threshold


def train_and_predict(config: Config, con: duckdb.DuckDBPyConnection, tmp: Path, out: Path,
                      model: Path | str | None = None, measured_u: dict | None = None,
                      carried: dict | None = None) -> dict:
    """Train the model on the ``identities`` table, score pairs, cluster into persons.

    Writes ``model.json`` and ``pairs.parquet`` into ``out`` and leaves the table
    ``clusters`` (unique_id, cluster_id) on ``con``. Returns training facts. With
    ``model`` (a ``model.json`` from an earlier run, on either engine) nothing is trained:
    that model's parameters score the pairs. With ``carried`` (tables ``touched`` and
    ``previous_keys`` from :func:`linkage.link.state.load`) the blocking keys of identities
    no touched one reaches are carried (:func:`linkage.link.blocking.update_blocking_keys`, which
    names the rebuilt ones in table ``carried["rebuilt"]``) and the touched identities are known
    without reading the previous records. Leaves the table
    ``blocking_keys`` on ``con`` (the link state keeps it).
    """
    from splink import Linker, block_on

    lc = config.link
    increment, prediction = None, "full: a model is trained"
    if model is not None:
        from linkage.link.incremental import scope

        try:
            prior = json.loads(Path(model).read_text())["probability_two_random_records_match"]
        except (OSError, ValueError, KeyError) as exc:
            raise LinkError(f"{model}: cannot read the model's prior ({exc.__class__.__name__})") from None
        threshold = effective_threshold(lc, prior)
        t = time.perf_counter()
        # publish_dir builds ``out`` beside the zone: the previous release is still ``linked/``
        increment, prediction = scope(con, out.parent / "linked", Path(model), lc, threshold,
                                      touched=carried["touched"] if carried else None)
        scope_seconds = round(time.perf_counter() - t, 1)
    log.info("prediction: %s", prediction)
    db_api = _db_api(config, con, tmp)
    dialect = "spark" if lc.engine == "spark" else "duckdb"
    from linkage.link.blocking import anchored_rules, build_blocking_keys, rule_sides, update_blocking_keys

    rules = anchored_rules()
    t = time.perf_counter()
    if carried:
        anchors = update_blocking_keys(con, "identities", "blocking_keys", rules, carried["previous_keys"],
                                       carried["touched"], rebuilt_table=carried.get("rebuilt"))
    else:
        anchors = build_blocking_keys(con, "identities", "blocking_keys", rules)
    anchors["seconds"] = round(time.perf_counter() - t, 1)
    settings = (model_settings(dialect).create_settings_dict(dialect) if model is None
                else _trained_settings(model, dialect))
    # Splink takes term frequencies from its input: with any, it must see every identity
    term_frequencies = any(lv.get("tf_adjustment_column") for c in settings["comparisons"]
                           for lv in c["comparison_levels"])
    only = ""
    if increment and PREDICT_REACHABLE_ONLY and not term_frequencies:
        from linkage.link.incremental import reachable_identities

        # only identities a rule can pair with a touched one reach Splink: the restricted rules
        # keep no other pair, so the pairs are those of predicting on every identity
        used = sorted({c for r in rules for side in rule_sides(r.rule) for c in side})
        con.execute(f"""create or replace temp table _rule_values as
            select i.unique_id, i.touched, {", ".join(f"{quote_ident(c)}" for c in used)}
            from identities i join blocking_keys k using (unique_id)""")
        increment["reachable_identities"] = reachable_identities(con, "_rule_values", rules, "reachable")
        # and one identity of each source, so that no input is empty: it pairs with a touched one only if reachable
        con.execute("""insert into reachable select min(unique_id) from identities group by source
                       except select unique_id from reachable""")
        con.execute("drop table _rule_values")
        only = "semi join reachable using (unique_id)"
    sdfs = []
    for source in SOURCES:
        # each rule's key columns sit beside the encodings for this run only; identities.parquet has none
        con.execute(f"""create or replace table ids_{source} as
            select i.*, k.* exclude (unique_id) from identities i join blocking_keys k using (unique_id) {only}
            where i.source = {quote_literal(source)}""")
        if lc.engine == "spark":
            sdfs.append(db_api.register(_to_spark(con, db_api, f"ids_{source}", tmp), dataset_display_name=source))
        else:
            sdfs.append(db_api.register(f"ids_{source}", dataset_display_name=source))
    settings["blocking_rules_to_generate_predictions"] = [
        {"blocking_rule": rule_sql(r.rule), "sql_dialect": dialect} for r in rules]
    if increment:
        from linkage.link.incremental import restricted_rules

        settings["blocking_rules_to_generate_predictions"] = restricted_rules(rules, dialect)
    linker = Linker(sdfs, settings, log_level=None)   # the CLI decides what reaches the console (-v)
    t = time.perf_counter()
    if model is None:
        from linkage.compat.splink_em import allow_zero_em_estimates

        allow_zero_em_estimates()
        deterministic = [block_on("nino_tok", "dob_tok"), block_on("upn_tok", "dob_tok"),
                         block_on("fn_tok", "sn_tok", "dob_tok")]
        linker.training.estimate_probability_two_random_records_match(deterministic, recall=0.9)
        # on Spark each u chunk is a separate job with seconds of overhead: sample in one chunk
        chunking = {"num_chunks": 1} if lc.engine == "spark" else {}
        linker.training.estimate_u_using_random_sampling(max_pairs=lc.u_max_pairs, seed=lc.seed, **chunking)
        sampled = linker.misc.save_model_to_json()
        set_from_sample = context_u(sampled, measured_u)
        set_from_sample += year_typo_u(sampled, con)
        linker = Linker(sdfs, sampled, log_level=None)
        for cols in TRAINING_BLOCKS:
            linker.training.estimate_parameters_using_expectation_maximisation(
                block_on(*cols), max_pairs=lc.em_max_pairs)
        trained = linker.misc.save_model_to_json()
        floored = floor_levels(trained)
        linker = Linker(sdfs, trained, log_level=None)
    facts = {"training_seconds": round(time.perf_counter() - t, 1)}
    if model is None:
        threshold = effective_threshold(lc, linker._settings_obj._probability_two_random_records_match)
        facts["levels_floored"] = floored
        facts["context_u_levels"] = set_from_sample
    facts["threshold"], facts["threshold_evidence_bits"] = threshold, lc.threshold_evidence_bits
    if model is not None:
        facts["model_loaded_from"] = str(model)
    linker.misc.save_model_to_json(str(out / "model.json"), overwrite=True)
    _save_charts(linker, out / "charts")
    t = time.perf_counter()
    if increment:
        # exact counts join every identity's keys (60 s at 1M persons); the rules and the
        # identities barely move with one delivery, so the last full count is carried and dated
        facts.update(increment["previous_blocking"], blocking_counted_at=increment["blocking_counted_at"])
    else:
        facts["blocking"], facts["uncompared"] = blocking_counts(con, [f"ids_{s}" for s in sorted(SOURCES)], rules)
        facts["blocking_counted_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    facts["blocking_count_seconds"] = round(time.perf_counter() - t, 1)
    facts["anchors"] = anchors
    t = time.perf_counter()
    if lc.engine == "spark":
        pairs = _predict_on_spark(linker, lc.keep_pairs_above)
    else:
        n_identities = sum(con.execute(f"select count(*) from ids_{s}").fetchall()[0][0] for s in SOURCES)
        chunks = max(1, math.ceil(n_identities / lc.predict_chunk_identities))
        facts["predict_chunks"] = chunks * chunks
        pairs = linker.inference.predict(threshold_match_probability=lc.keep_pairs_above,
                                         **({"num_chunks_left": chunks, "num_chunks_right": chunks} if chunks > 1 else {}))
    if increment:
        from linkage.link.incremental import cluster_affected, merge_pairs

        facts["pairs_scored_now"] = con.execute(f"select count(*) from {pairs.physical_name}").fetchall()[0][0]
        merged = merge_pairs(con, pairs.physical_name, increment)
        affected = cluster_affected(con, pairs.physical_name, merged, threshold)
        facts["incremental"] = {"reachable_identities": increment.get("reachable_identities", increment["identities"]),
                                **{k: increment[k] for k in ("touched_identities", "identities")}, **affected}
        pairs_name, clusters_name = merged, "clusters"
    else:
        clusters = linker.clustering.cluster_pairwise_predictions_at_threshold(
            pairs, threshold_match_probability=threshold)
        if lc.engine == "spark":
            pairs_name, clusters_name = (_from_spark(con, sdf, tmp) for sdf in (pairs, clusters))
        else:
            pairs_name, clusters_name = pairs.physical_name, clusters.physical_name
    facts["predict_seconds"] = round(time.perf_counter() - t, 1)
    facts["prediction"], facts["keep_pairs_above"] = prediction, lc.keep_pairs_above
    if model is not None:
        facts["scope_seconds"] = scope_seconds
    t = time.perf_counter()
    # zstd's fastest level: 11.2 million pairs wrote in 4.9 s against the default level's 5.9 s
    # (offline, 1,000,000 persons), to a smaller file (193 MB against 208 MB)
    con.execute(f"""
        copy (select unique_id_l, unique_id_r, source_dataset_l as source_l, source_dataset_r as source_r,
                     match_weight, match_probability
              from {pairs_name} order by unique_id_l, unique_id_r)
        to {path_literal(out / 'pairs.parquet')} (compression zstd, compression_level 1)""")
    if clusters_name != "clusters":
        con.execute(f"create or replace table clusters as select unique_id, cluster_id from {clusters_name}")
    facts["pairs_scored"] = con.execute(f"select count(*) from {pairs_name}").fetchall()[0][0]
    facts["pairs_write_seconds"] = round(time.perf_counter() - t, 1)
    facts["probability_two_random_records_match"] = linker._settings_obj._probability_two_random_records_match
    return facts


def _save_charts(linker, folder: Path) -> None:
    """Keep Splink's own charts as Vega-Lite specs; the report renders them offline."""
    folder.mkdir(exist_ok=True)
    charts = {"match_weights": linker.visualisations.match_weights_chart(),
              "m_u_parameters": linker._settings_obj.m_u_parameters_chart()}
    for name, chart in charts.items():
        (folder / f"{name}.vl.json").write_text(json.dumps(chart.chart_dict, default=str))


def blocking_counts(con: duckdb.DuckDBPyConnection, tables: list[str], rules) -> tuple[list[dict], dict]:
    """Comparisons each prediction rule adds (marginal) and in total, and the identities no rule compares.

    Exact, on every identity: one SQL pass over the rules' join columns
    (:func:`linkage.link_files.model.blocking_coverage`). ``tables`` are the ``ids_<source>``
    tables in Splink's order (by name); ``rules`` the :func:`linkage.link.blocking.anchored_rules`.
    The uncompared identities can only become persons of their own (or with their identical records).
    """
    from linkage.link_files.model import blocking_coverage

    counts, _ = blocking_coverage(con, tables, [r.rule for r in rules], "link_and_dedupe",
                                  labels=[r.label for r in rules], keep="__hh_compared")
    n, records, alone, alone_records = con.execute(f"""
        with ids as ({" union all ".join(f"select unique_id, n_records from {t}" for t in tables)})
        select count(*), sum(n_records), count(*) filter (where unique_id not in (select unique_id from __hh_compared)),
               coalesce(sum(n_records) filter (where unique_id not in (select unique_id from __hh_compared)), 0)
        from ids""").fetchall()[0]
    con.execute("drop table __hh_compared")
    return counts, {"identities": int(n), "identities_no_rule_compares": int(alone),
                    "identities_share": round(alone / n, 6) if n else 0.0,
                    "records_share": round(int(alone_records) / int(records), 6) if records else 0.0}


def _model_lifecycle(config: Config, ws: Workspace, con: duckdb.DuckDBPyConnection, out: Path, mode: str,
                     stored: dict | None, threshold: float) -> dict:
    """Keep or reuse the model, measure drift against the stored one, and apply the drift gate.

    The previous release's ``linked/`` is still in place: its identities tell which are new,
    and its model store is carried into ``out``.
    """
    from linkage.link import drift as dr
    from linkage.link.model import model_settings

    t = time.perf_counter()
    lc = config.link
    previous = ws.zone("linked") / "identities.parquet"
    if table_exists(con, "new_identities"):
        pass   # the link state said which identities are new (linkage.link.state.load)
    elif previous.is_file():
        con.execute(f"""create or replace temp table new_identities as select unique_id from identities
                        anti join read_parquet({read_literal(previous)}) using (unique_id)""")
    else:
        con.execute("create or replace temp table new_identities as select unique_id from identities")
    con.execute(f"""create or replace temp view _matched as select unique_id_l, unique_id_r
                    from read_parquet({read_literal(out / 'pairs.parquet')}) where match_probability >= {threshold!r}""")
    comparisons = model_settings("duckdb").create_settings_dict("duckdb")["comparisons"]
    options = {"sample_side": lc.drift_sample_side, "seed": lc.seed}
    model_store.carry(ws.zone("linked"), out)
    facts: dict = {"model": {"mode": mode, "previous_fingerprint": stored["fingerprint"] if stored else None}}
    if mode == "reused":
        # score with the stored model, byte for byte: linked/model.json is the stored file
        shutil.copyfile(stored["path"], out / "model.json")
        facts["model"].update(fingerprint=stored["fingerprint"], trained_at=stored["trained_at"])
        new, total = con.execute("select (select count(*) from new_identities), (select count(*) from identities)").fetchall()[0]
        scope = "identities new in this release"
        if new == total:
            # nothing carried over (a new key re-encodes every identity): the newest, as at training
            con.execute(dr.recent_identities_sql())
            new = con.execute("select count(*) from new_identities").fetchall()[0][0]
            scope = "every identity re-encoded (a new key): the newest, as at training"
        now = dr.profile(con, comparisons, "_matched", new_only=True, **options)
        drift = dr.compare_profiles(json.loads(stored["path"].read_text()), stored["profile"], now)
        drift.update(scope=scope, new_identities=int(new), seconds=round(time.perf_counter() - t, 1))
        try:
            drift["gate"] = dr.check_drift(drift, lc.max_drift, lc.drift_min_pairs)
        except dr.DriftGateError as exc:
            drift["gate"] = {"bound": lc.max_drift, "min_pairs": lc.drift_min_pairs, "judged": True,
                             "passed": False, "reason": str(exc)}
            _write_drift(ws, {**facts, "drift": drift})
            raise
    else:
        # the baseline each delivery is compared with: matches of the history's newest identities
        con.execute(dr.recent_identities_sql())
        newest = dr.profile(con, comparisons, "_matched", new_only=True, **options)
        counts = con.execute("select (select count(*) from identities), (select count(*) from records)").fetchone()
        drift = None
        if stored is not None:
            # a deliberate retrain (or a given model): how far the data had moved from the old model, not gated
            drift = dr.compare_profiles(json.loads(stored["path"].read_text()), stored["profile"], newest)
            drift.update(scope="the newest identities, against the model replaced", new_identities=None,
                         gate={"bound": lc.max_drift, "judged": False, "passed": True,
                               "reason": f"not applied: model {mode} deliberately"})
        info = model_store.keep(out, out / "model.json", profile=newest,
                                reason={"trained": "no stored model", "retrained": "retrain requested",
                                        "given": "model file given"}[mode],
                                trained_on={"identities": int(counts[0]), "records": int(counts[1])})
        facts["model"].update(fingerprint=info["fingerprint"], trained_at=info["trained_at"])
        if drift is not None:
            drift["seconds"] = round(time.perf_counter() - t, 1)
    facts["drift"] = drift
    _write_drift(ws, facts)
    con.execute("drop view _matched; drop table new_identities")
    if mode != "reused":
        log.info("model %s: %s", mode, facts["model"]["fingerprint"])
    return facts


#: the columns of ``records_linked``, which the households read (:mod:`linkage.link.households`)
LINKED_RECORD_COLUMNS = ("record_token", "source", "year", "birth_year", "unique_id", "person_key",
                         "benefit_unit_tok", "bu_role", "claim_tok", "postcode_tok", "addr_bf")


def _link_records(con: duckdb.DuckDBPyConnection) -> None:
    """``records`` becomes ``records_linked``: each record with its person's key (``persons``), in
    :data:`LINKED_RECORD_COLUMNS`; a record whose identity has no person is dropped, as an inner join would.

    The table gains a column in place rather than being copied by a join: at 1,000,000 persons
    the join wrote every record's tokens and address encodings again (18.7 million rows, 18-22 s
    of a monthly delivery) where the update writes one column (4.3 s, offline; the table then
    scans as fast). The columns the households do not read are dropped (a catalogue change).
    """
    con.execute("alter table records add column person_key varchar")
    con.execute("update records set person_key = p.person_key from persons p where p.unique_id = records.unique_id")
    con.execute("delete from records where person_key is null")
    for (column,) in con.execute("select column_name from duckdb_columns() where table_name = 'records' "
                                 "and not internal").fetchall():
        if column not in LINKED_RECORD_COLUMNS:
            con.execute(f"alter table records drop column {quote_ident(column)}")
    con.execute("drop table if exists records_linked; alter table records rename to records_linked")


def _drop_tables(con: duckdb.DuckDBPyConnection, keep: set[str]) -> None:
    """Drop every table and view on ``con`` but ``keep`` (views first: they may read the tables)."""
    for kind in ("view", "table"):
        for (name,) in con.execute(f"select {kind}_name from duckdb_{kind}s() where not internal").fetchall():
            if name not in keep:
                con.execute(f"drop {kind} if exists {quote_ident(name)}")


def _write_drift(ws: Workspace, facts: dict) -> None:
    """``reports/linkage/drift.json``: written even when the gate stops the release, so the engineer sees why."""
    from linkage.workspace import atomic_path

    with atomic_path(ws.zone("reports") / "linkage" / "drift.json") as tmp:
        tmp.write_text(json.dumps(facts, indent=1, default=str))


def link(config: Config, workspace: Path | str, key=None, *, model: Path | str | None = None,
         retrain: bool = False) -> dict:
    """Link the pseudonymised identifiers into persons and write ``linked/``.

    Args:
        config: the hhlink configuration (``config.link`` holds the settings; ``engine``
            picks DuckDB or Spark).
        workspace: the workspace folder; reads ``pseudonymised/identifiers/``.
        key: the master key (default: ``HHLINK_KEY``, ``HHLINK_KEY_FILE`` or the default file):
            the identifiers are encrypted at rest and decrypted into memory here only
            (:mod:`linkage.pseudonymise.store`); linkage itself sees only keyed encodings.
        model: a trained ``model.json`` (from either engine) to score with and keep as the
            stored model; default: the stored model (:mod:`linkage.link.model_store`), or a
            new one trained when none is stored.
        retrain: train a new model even though one is stored (a deliberate step: the
            summary's ``model.mode`` says ``retrained``).

    Returns:
        A summary: counts of records, identities, persons and pairs, timings, ``model``
        (fingerprint, mode: ``trained``/``reused``/``retrained``/``given``) and ``drift``
        (:mod:`linkage.link.drift`).

    Raises:
        LinkError: the identifiers zone is missing or empty.
        DriftGateError: the stored model was reused and the release's data drifted beyond
            ``link.max_drift``; ``linked/`` is kept as it was.
    """
    from linkage.keys import load_master_key
    from linkage.link.report import completeness_counts, completeness_rows
    from linkage.link.linked_records import write_records
    from linkage.link.stable_keys import household_keys, person_keys
    from linkage.link import state as link_state
    from linkage.pseudonymise.store import load_zone, zone_files, zone_metadata

    ws = Workspace(workspace)
    identifiers = ws.zone("pseudonymised") / "identifiers"
    if not identifiers.is_dir() or not any(identifiers.glob("*.parquet")):
        raise LinkError(f"{identifiers}: no identifiers to link; run 'hhlink pseudonymise' first")
    key = key if key is not None else load_master_key(workspace=ws.root)
    t0 = time.perf_counter()
    summary: dict = {"engine": config.link.engine, "threshold": config.link.threshold}
    stored = model_store.current(ws.zone("linked"))
    if model is not None:
        mode, use = "given", Path(model)
    elif stored is None or retrain:
        mode, use = ("retrained" if stored is not None else "trained"), None
    else:
        mode, use = "reused", stored["path"]
    files = zone_files(ws.root, "identifiers")
    # the previous release's link state (linked/ is still the old one): only the new zone files are read
    carried, summary["link_state"] = link_state.plan(config, ws.zone("linked"), files, key)
    with ws.publish_dir("linked") as out:
        tmp = out / ".tmp"
        tmp.mkdir()
        con = connect(config.link, spill=tmp, preserve_insertion_order=False)
        if carried is not None:
            try:
                counts = link_state.load(con, carried, key)
            except (HhlinkError, OSError, ValueError, duckdb.Error) as exc:
                log.warning("link state unusable (%s): linking in full", exc.__class__.__name__)
                summary["link_state"] = f"full: the link state cannot be read ({exc.__class__.__name__})"
                carried = None
                _drop_tables(con, keep=set())
            else:
                summary["completeness"] = completeness_rows(counts)
                summary["zone_seconds"] = round(carried.decrypted_at - t0, 1)
        if carried is None:
            load_zone(con, "identifiers_in", ws.root, "identifiers", key)
            # the report's completeness, while the zone is decrypted here (the link state carries the counts)
            counts = completeness_counts(con, "identifiers_in")
            summary["completeness"] = completeness_rows(counts)
            summary["zone_seconds"] = round(time.perf_counter() - t0, 1)
            con.execute(_identities_sql("identifiers_in"))
            con.execute("drop table identifiers_in")
        summary["identities_seconds"] = round(time.perf_counter() - t0, 1)
        log.info("link state: %s", summary["link_state"])
        t = time.perf_counter()
        try:
            summary.update(train_and_predict(config, con, tmp, out, use,
                                             zone_metadata(ws.zone("pseudonymised")).get("context_u"),
                                             carried={"touched": "state_touched", "previous_keys": "state_keys",
                                                      "rebuilt": "state_rebuilt"}
                                             if carried is not None else None))
        finally:
            if config.link.engine == "spark":
                from linkage.link.spark import release_spark

                release_spark()
        t_state = time.perf_counter()
        # what the next release carries instead of re-reading the zone (encrypted as the zone is)
        summary["state"] = link_state.write(con, out, key, files, counts, carried)
        summary["state_seconds"] = round(time.perf_counter() - t_state, 1)
        for table in ("blocking_keys", "identity_representative", "identity_address", "state_keys", "state_touched",
                      "state_rebuilt"):
            con.execute(f"drop table if exists {table}")
        summary.update(_model_lifecycle(config, ws, con, out, mode, stored, summary["threshold"]))
        t_keys = time.perf_counter()
        # person keys carried over from the previous release by greatest overlap (linked/ is still the old one)
        # an incremental link clustered only the persons the delivery reached: only those are matched
        summary.update(person_keys(con, ws.zone("linked") / "identities.parquet", out,
                                   recomputed_only=summary["prediction"].startswith("incremental")))
        summary["person_keys_seconds"] = round(time.perf_counter() - t_keys, 1)
        t_write = time.perf_counter()
        # without the encodings: the tokens and Bloom filters stay in the encrypted identifiers zone
        con.execute(f"""copy (select i.unique_id, i.source, i.birth_year, i.n_records, i.first_year, i.last_year,
                                     p.person_key from identities i join persons p using (unique_id)
                              order by unique_id) to {path_literal(out / 'identities.parquet')} (compression zstd)""")
        # append-only: each record's identity never changes, its person key is read through identities.parquet
        summary.update(write_records(con, out, "records", previous=ws.zone("linked") if carried is not None else None,
                                     new="new_records" if carried is not None else None))
        counts = con.execute("""select (select count(*) from records), (select count(*) from identities),
                                       (select count(distinct person_key) from persons)""").fetchall()[0]
        summary.update(records=counts[0], identities=counts[1], persons=counts[2])
        summary["records_write_seconds"] = round(time.perf_counter() - t_write, 1)
        t_join = time.perf_counter()
        # households read records_linked (and, from the link state, the new records and the persons'
        # identities) only: the rest (identities with their encodings, the blocked copies, Splink's
        # predictions) would be spilled to disk beside them (44 GB at 1M persons), so it goes first
        _drop_tables(con, keep={"records", "new_records", "persons"})
        summary["drop_seconds"] = round(time.perf_counter() - t_join, 1)
        _link_records(con)
        from linkage.link.report import claim_implausible_sql

        # the report's implausible links on claims, counted on the records held here (not read again)
        summary["implausible_claims"] = [int(n) for n in con.execute(claim_implausible_sql("records_linked")).fetchall()[0]]
        summary["records_join_seconds"] = round(time.perf_counter() - t_join - summary["drop_seconds"], 1)
        t_hh = time.perf_counter()
        # the previous release's linked/, still in place; with the state, records_linked holds its records and new_records
        summary.update(assemble_households(con, config.link, ws.zone("linked"),
                                           arrived="new_records" if carried is not None else None, persons="persons",
                                           consume=True))
        _drop_tables(con, keep={"households", "parent_child"})
        t_hk = time.perf_counter()
        # household keys carried over from the previous release by greatest overlap of person-years
        summary.update(household_keys(con, ws.zone("linked") / "households.parquet", out,
                                      recomputed_only=summary["households_mode"].startswith("incremental")))
        summary["household_keys_seconds"] = round(time.perf_counter() - t_hk, 1)
        con.execute(f"copy households to {path_literal(out / 'households.parquet')} (compression zstd)")
        con.execute(f"copy parent_child to {path_literal(out / 'parent_child.parquet')} (compression zstd)")
        summary["households_seconds"] = round(time.perf_counter() - t_hh, 1)
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        summary["model_seconds"] = round(time.perf_counter() - t, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        shutil.rmtree(tmp, ignore_errors=True)
    con.close()
    from linkage.link.report import write_report

    t = time.perf_counter()
    write_report(config, workspace, key)
    summary["report_seconds"] = round(time.perf_counter() - t, 1)   # after summary.json: for the caller
    log.info("linked %d records into %d persons", summary["records"], summary["persons"])
    return summary
