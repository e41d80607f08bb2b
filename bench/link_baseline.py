"""Encoded linkage versus a cleartext Splink baseline on the same population.

The baseline reads ``staged/`` (cleartext, normalised), links with Jaro-Winkler on names
and the same blocking rules expressed on cleartext columns, clusters at the same
threshold, and is scored against ``truth/`` exactly as ``hhlink evaluate`` scores the
encoded run. Prints both F1s and the gap (target: encoded within 0.5 points).

Usage:
    python -m bench.link_baseline WORKSPACE            # link + evaluate on encodings, then the baseline
    python -m bench.link_baseline WORKSPACE --reuse    # baseline only, beside an existing evaluation

WORKSPACE must hold staged/, pseudonymised/ and truth/; the key comes from HHLINK_KEY etc.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import splink.comparison_level_library as cll
import splink.comparison_library as cl
from splink import DuckDBAPI, Linker, SettingsCreator, block_on

from linkage.config import load_config
from linkage.db import connect, quote_ident, quote_literal, read_literal
from linkage.evaluate.stage import person_metrics
from linkage.ingest.stage import parquet_source, staged_paths
from linkage.schemas import SOURCES, load_schema

ROLES = ("first_name", "middle_names", "surname", "dob", "sex", "postcode", "nino", "upn", "address")
# linkage.link.model.PREDICTION_BLOCKS on cleartext columns (a phonetic code becomes the first three letters)
BLOCKS = (("nino",), ("upn",), ("dob", "fn_sound"), ("dob", "sn_sound"),
          ("first_name", "surname", "dob_year", "dob_month"), ("first_name", "surname", "dob_year", "dob_day"),
          ("first_name", "surname", "dob_month", "dob_day"), ("postcode", "fn_sound", "dob_year"),
          "l.dob_swap = r.dob AND l.fn_sound = r.fn_sound", "l.dob = r.dob_swap AND l.fn_sound = r.fn_sound")


def _cleartext_sql(staged: Path) -> str:
    parts = []
    for source in SOURCES:
        schema = load_schema(source)
        cols = {}
        for role in ROLES:
            found = schema.columns_with_role(role)
            cols[role] = found[0].name if found else None
        e = {r: (f"{quote_ident(c)}::varchar" if c else "null::varchar") for r, c in cols.items()}
        parts.append(f"""select record_id, {quote_literal(source)} source, {e['first_name']} first_name, {e['surname']} surname,
                         {e['dob']} dob, {e['sex']} sex, {e['postcode']} postcode, {e['nino']} nino, {e['upn']} upn,
                         {e['address']} address, left({e['middle_names']}, 1) middle_initial
                         from {parquet_source(staged_paths(staged, source))}""")   # every delivery's part
    union = " union all ".join(parts)
    return f"""
        create or replace table clear_records as
        select *, md5(concat_ws('|', source, first_name, surname, dob, sex, postcode, nino, upn, address, middle_initial))
                  as unique_id,
               left(first_name, 1) fn_initial, left(dob, 4) dob_year, substr(dob, 6, 2) dob_month, substr(dob, 9, 2) dob_day,
               left(first_name, 3) fn_sound, left(surname, 3) sn_sound,
               case when try_cast(substr(dob, 9, 2) as int) <= 12
                    then left(dob, 5) || substr(dob, 9, 2) || '-' || substr(dob, 6, 2) end dob_swap,
               regexp_replace(postcode, '[A-Z]{{2}}$', '') pc_sector, split_part(postcode, ' ', 1) pc_district
        from ({union});
        create or replace table clear_ids as select * exclude (record_id), count(*) over (partition by unique_id) n
        from (select distinct on (unique_id) * from clear_records);
    """


def _settings() -> SettingsCreator:
    def name(col):
        return cl.CustomComparison(output_column_name=col, comparison_levels=[
            cll.NullLevel(col), cll.ExactMatchLevel(col, term_frequency_adjustments=True),
            cll.JaroWinklerLevel(col, 0.92), cll.JaroWinklerLevel(col, 0.8), cll.ElseLevel()])

    return SettingsCreator(
        link_type="link_and_dedupe",
        comparisons=[
            name("first_name"), name("surname"),
            cl.CustomComparison(output_column_name="dob", comparison_levels=[
                cll.NullLevel("dob"), cll.ExactMatchLevel("dob"),
                cll.CustomLevel("dob_year_l || '-' || dob_day_l || '-' || dob_month_l = dob_r", "swapped"),
                cll.CustomLevel("dob_month_l = dob_month_r and dob_day_l = dob_day_r "
                                "and abs(dob_year_l::int - dob_year_r::int) = 1", "year one apart"),
                cll.CustomLevel("dob_year_l = dob_year_r and dob_month_l = dob_month_r", "year and month"),
                cll.CustomLevel("dob_year_l = dob_year_r", "year"), cll.ElseLevel()]),
            cl.CustomComparison(output_column_name="postcode", comparison_levels=[
                cll.NullLevel("postcode"), cll.ExactMatchLevel("postcode"),
                cll.CustomLevel("pc_sector_l = pc_sector_r", "sector"),
                cll.CustomLevel("pc_district_l = pc_district_r", "district"), cll.ElseLevel()]),
            cl.CustomComparison(output_column_name="address", comparison_levels=[
                cll.NullLevel("address"), cll.JaroWinklerLevel("address", 0.95), cll.JaroWinklerLevel("address", 0.85),
                cll.ElseLevel()]),
            cl.ExactMatch("nino"), cl.ExactMatch("upn"), cl.ExactMatch("sex"), cl.ExactMatch("middle_initial"),
        ],
        blocking_rules_to_generate_predictions=[b if isinstance(b, str) else block_on(*b) for b in BLOCKS],
        retain_matching_columns=False,
    )


def cleartext_baseline(workspace: Path | str) -> dict:
    """Link ``staged/`` in clear with Splink and score it against ``truth/``."""
    ws = Path(workspace)
    cfg = load_config()
    con = connect(cfg.link)
    t = time.perf_counter()
    con.execute(_cleartext_sql(ws / "staged"))
    db = DuckDBAPI(connection=con)
    sdfs = []
    for source in SOURCES:
        con.execute(f"create or replace table clear_{source} as select * from clear_ids where source = {quote_literal(source)}")
        sdfs.append(db.register(f"clear_{source}", dataset_display_name=source))
    linker = Linker(sdfs, _settings())
    linker.training.estimate_probability_two_random_records_match(
        [block_on("nino", "dob"), block_on("upn", "dob"), block_on("first_name", "surname", "dob")], recall=0.9)
    linker.training.estimate_u_using_random_sampling(max_pairs=cfg.link.u_max_pairs, seed=cfg.link.seed)
    for rule in (block_on("nino"), block_on("dob")):
        linker.training.estimate_parameters_using_expectation_maximisation(rule, max_pairs=cfg.link.em_max_pairs)
    pairs = linker.inference.predict(threshold_match_probability=cfg.link.keep_pairs_above)
    clusters = linker.clustering.cluster_pairwise_predictions_at_threshold(pairs, cfg.link.threshold)
    m = person_metrics(con, f"""(select c.cluster_id pred, t.person_id truth from clear_records r
                                 join {clusters.physical_name} c using (unique_id)
                                 join {read_literal(ws / 'truth' / 'source_rows.parquet')} t
                                   on t.source = r.source and t.record_id = r.record_id)""")
    return {**m, "seconds": round(time.perf_counter() - t, 1)}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--reuse", action="store_true", help="keep the workspace's linked/ and evaluation")
    args = ap.parse_args(argv)
    ws = args.workspace
    if not args.reuse:
        from linkage.evaluate.stage import evaluate
        from linkage.link.stage import link

        t = time.perf_counter()
        link(load_config(), ws)
        print(f"hhlink link on encodings: {time.perf_counter() - t:.1f} s", flush=True)
        evaluate(load_config(), ws)
    base = cleartext_baseline(ws)
    encoded = json.loads((ws / "reports" / "evaluation.json").read_text())
    gap = 100 * (base["pairwise_f1"] - encoded["person_pairwise_f1"])
    print(f"cleartext baseline (Jaro-Winkler): pairwise F1 {base['pairwise_f1']:.5f}  "
          f"precision {base['pairwise_precision']:.5f}  recall {base['pairwise_recall']:.5f}  ({base['seconds']} s)")
    print(f"hhlink on encodings:               pairwise F1 {encoded['person_pairwise_f1']:.5f}  "
          f"precision {encoded['person_pairwise_precision']:.5f}  recall {encoded['person_pairwise_recall']:.5f}")
    print(f"gap: {gap:+.3f} F1 points (target: encoded within 0.5 points of cleartext)  "
          f"{'OK' if gap <= 0.5 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
