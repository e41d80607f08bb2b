"""Blocking growth: comparisons per prediction blocking rule of ``hhlink link`` at 100k and 1M persons.

For the synthetic population (``hhlink generate``, seed fixed) at each size, the workspace is
built for real (generate, ingest, pseudonymise) unless it already holds pseudonymised
identifiers under the given key; then the identities ``hhlink link`` compares are built
exactly as the link stage builds them, with the same anchored rules
(:func:`linkage.link.blocking.anchored_rules` on :data:`linkage.link.model.PREDICTION_BLOCKS`,
keys from :func:`linkage.link.blocking.build_blocking_keys`), and one exact SQL pass on the
join columns (:func:`linkage.link.stage.blocking_counts`) gives the comparisons each rule adds
(marginal: not already made by an earlier rule) and the running total - what prediction
would score, without scoring anything. Up to a million identities Splink's own
``count_comparisons_from_blocking_rules`` runs beside it as a cross-check (it carries every
column through every pair: at 1M persons its spill passed 30 GB); "count seconds" is our
pass alone. Beside them: the share of identities (and of records) that no rule pairs with
any other identity, the pair and connected recall of blocking against the truth
(:func:`connected_recall`), and the growth ratio of each count from 100k to 1M persons
beside the linear expectation (10x). Nothing is trained or predicted.

Building 1M persons takes about ten minutes of both cores; on a shared machine run it
niced with few threads (``--threads 1``) in the background.

Usage:
    python -m bench.blocking --workspace 100000=/tmp/w100k=/tmp/k100/k.key \\
                             --workspace 1000000=/tmp/w1m=/tmp/k1m/k.key      # writes bench/results/blocking.{md,json}
    python -m bench.blocking --build 1000000=/tmp/w1m=/tmp/k1m/k.key --threads 1   # only build a workspace
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 42
SPLINK_CHECK_MAX = 1_000_000   # identities up to which Splink's own count is run beside ours
LINEAR = 10.0      # 100k -> 1M persons: a linearly growing count grows tenfold


def _spec(text: str) -> tuple[int, Path, Path]:
    size, ws, key = text.split("=")
    return int(size), Path(ws), Path(key)


def _config(size: int, threads: int):
    from linkage.config import load_config

    return load_config(generate={"persons": size, "seed": SEED},
                       ingest={"data_docs": False, "threads": threads},
                       link={"threads": threads, "memory_limit": "10GB"})


def _check_workspace(size: int, root: Path, key) -> None:
    """Refuse a workspace built for another size or seed, or under another key."""
    planted = json.loads((root / "truth" / "planted.json").read_text())["generator_config"]
    if (planted.get("persons"), planted.get("seed")) != (size, SEED):
        raise SystemExit(f"{root}: built for {planted.get('persons')} persons, seed {planted.get('seed')}; "
                         f"wanted {size}, seed {SEED}")
    meta = json.loads((root / "pseudonymised" / "metadata.json").read_text())
    if meta.get("key_fingerprint") != key.fingerprint:
        raise SystemExit(f"{root}: pseudonymised under another key (fingerprint {meta.get('key_fingerprint')})")


def build(size: int, root: Path, key_file: Path, threads: int) -> dict:
    """Generate, ingest and pseudonymise ``size`` persons into ``root`` (skipped where already done)."""
    from linkage.keys import load_master_key
    from linkage.stages import run_stage

    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        subprocess.run([sys.executable, "-m", "linkage.cli", "keys", "init", "--key-file", str(key_file)],
                       check=True, capture_output=True)
    key = load_master_key(key_file)
    cfg = _config(size, threads)
    seconds = {}
    done = {"generate": (root / "truth" / "planted.json").exists(),
            "ingest": (root / "staged" / "manifest.json").exists(),
            "pseudonymise": any((root / "pseudonymised" / "identifiers").glob("*.parquet"))}
    if not done["pseudonymise"]:
        for stage in (s for s in ("generate", "ingest", "pseudonymise") if not done[s]):
            t = time.perf_counter()
            run_stage(stage, cfg, root, key=key if stage == "pseudonymise" else None)
            seconds[stage] = round(time.perf_counter() - t, 1)
            print(f"  {size:,} persons: {stage} {seconds[stage]} s", flush=True)
    _check_workspace(size, root, key)
    return seconds


def count(size: int, root: Path, key_file: Path, threads: int) -> dict:
    """Comparisons per prediction blocking rule and the identities no rule compares, for one workspace."""
    from splink import DuckDBAPI
    from splink.blocking_analysis import count_comparisons_from_blocking_rules

    from linkage.db import connect
    from linkage.db import quote_literal as lit
    from linkage.keys import load_master_key
    from linkage.link.blocking import AnchoredRule, anchored_rules, build_blocking_keys
    from linkage.link.model import PREDICTION_BLOCKS, rule_creator, rule_label
    from linkage.link.stage import blocking_counts, identities_sql
    from linkage.pseudonymise.store import load_zone
    from linkage.schemas import SOURCES

    key = load_master_key(key_file)
    _check_workspace(size, root, key)
    cfg = _config(size, threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="blocking-", dir=root) as tmp:
        con = connect(cfg.link, spill=Path(tmp), preserve_insertion_order=False)
        load_zone(con, "identifiers_in", root, "identifiers", key)   # batch by batch: 1M would not fit as one table
        con.execute(identities_sql("identifiers_in"))     # the link stage's identities, as it builds them
        con.execute("drop table identifiers_in")
        identities, records = con.execute("select count(*), sum(n_records) from identities").fetchall()[0]
        t = time.perf_counter()
        prediction = anchored_rules()
        anchors = build_blocking_keys(con, "identities", "blocking_keys", prediction)   # as the link stage does
        anchor_seconds = round(time.perf_counter() - t, 1)
        tables = []
        for source in sorted(SOURCES):      # Splink's order of datasets: by name
            con.execute(f"""create or replace table ids_{source} as select i.*, k.* exclude (unique_id)
                from identities i join blocking_keys k using (unique_id) where i.source = {lit(source)}""")
            tables.append(f"ids_{source}")
        con.execute("drop table blocking_keys")
        t = time.perf_counter()
        # exact, every identity: each pair the rules join, under the first rule that reaches it (as
        # prediction attributes it), counted on the join columns only
        counted, alone = blocking_counts(con, tables, prediction)
        rules = [{"rule": c["rule"], "marginal": c["marginal_comparisons"], "cumulative": c["cumulative_comparisons"]}
                 for c in counted]
        count_seconds = round(time.perf_counter() - t, 1)
        splink_check = None
        if identities <= SPLINK_CHECK_MAX:
            # Splink's own count, every record: materialises each pair with every column, so it is
            # run only where that fits (at 1M its spill passed 30 GB)
            db_api = DuckDBAPI(connection=con)
            sdfs = [db_api.register(t, dataset_display_name=t.removeprefix("ids_")) for t in tables]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                splink = count_comparisons_from_blocking_rules(
                    sdfs, blocking_rules=[rule_creator(r.rule) for r in prediction], link_type="link_and_dedupe",
                    record_sample_proportion=1.0)
            splink_check = {"equal": [int(c["marginal_comparison_count"]) for c in splink]
                            == [r["marginal"] for r in rules],
                            "splink_marginal": [int(c["marginal_comparison_count"]) for c in splink]}
        reach = connected_recall(con, root, key, tables, prediction)
        # the same rules without anchors, in the same run: every identity of a block compared
        t = time.perf_counter()
        plain = [AnchoredRule(r, rule_label(r)) for r in PREDICTION_BLOCKS]
        plain_counted, _ = blocking_counts(con, tables, plain)
        without = {"comparisons": plain_counted[-1]["cumulative_comparisons"],
                   "reach": connected_recall(con, root, key, tables, plain),
                   "seconds": round(time.perf_counter() - t, 1)}
        con.close()
    return {"persons": size, "reach": reach, "without_anchors": without, "records": int(records), "identities": int(identities), "rules": rules,
            "comparisons": rules[-1]["cumulative"] if rules else 0, "uncompared": alone, "splink_check": splink_check,
            "anchors": anchors, "anchor_seconds": anchor_seconds, "count_seconds": count_seconds, "seconds": round(time.perf_counter() - t0, 1),
            "peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


def _truth(con, root: Path, key) -> None:
    """``id_ix``: each identity's true person (through its first record and the crosswalk) and a row index."""
    from linkage.crosswalk import CROSSWALK_FILE, crosswalk_table
    from linkage.db import read_literal

    crosswalk_table(con, root / "pseudonymised" / CROSSWALK_FILE, key)
    con.execute(f"""create or replace temp table id_truth as
        select f.unique_id, t.person_id as truth from (select unique_id, min(record_token) rep from records group by 1) f
        join xw on xw.record_token = f.rep
        join {read_literal(root / 'truth' / 'source_rows.parquet')} t on t.source = xw.source and t.record_id = xw.record_id""")
    con.execute("drop table xw")
    con.execute("""create or replace temp table id_ix as
        select unique_id, truth, (row_number() over (order by unique_id) - 1)::BIGINT ix from id_truth""")


def connected_recall(con, root: Path, key, tables: list[str], prediction) -> dict:
    """How many true links blocking leaves within reach, scored with the truth.

    Pair recall: the share of true identity pairs (two identities of one person) that some
    rule compares. Connected recall: the share of true identity pairs joined by a chain of
    compared true pairs - the most clustering could link, since a person is the connected
    component of matched pairs. Anchored rules compare a few identities per anchor group, so
    pair recall falls by design while connected recall should not.
    """
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from linkage.link.model import rule_columns, rule_sql

    if not con.execute("select count(*) from duckdb_tables() where table_name = 'id_ix'").fetchall()[0][0]:
        _truth(con, root, key)

    # only true pairs are needed: each table gets its truth beside the rules' columns, and every
    # rule joins on the truth too (at 1M the pairs of all rules, then filtered, spilled 30 GB)
    cols = sorted(set().union(*(rule_columns(r_.rule) for r_ in prediction)))
    for t in tables:
        con.execute(f"""create or replace temp table tr_{t} as
            select i.unique_id, x.truth, x.ix, {', '.join(f'i.{c}' for c in cols)} from {t} i join id_ix x using (unique_id)""")
    joins = " UNION ".join(
        f"SELECT l.ix a, r.ix b FROM tr_{a} l JOIN tr_{b} r ON ({rule_sql(r_.rule)}) AND l.truth = r.truth"
        + (" AND l.unique_id < r.unique_id" if a == b else "")
        for i, a in enumerate(tables) for b in tables[i:] for r_ in prediction)
    edges = con.execute(joins).fetchnumpy()
    for t in tables:
        con.execute(f"drop table tr_{t}")
    n, true_pairs = con.execute("select sum(c), sum(c * (c - 1) / 2) from (select truth, count(*) c from id_ix group by 1)"
                                ).fetchall()[0]
    n = int(n)
    graph = coo_matrix((np.ones(len(edges["a"]), dtype=np.int8), (edges["a"], edges["b"])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    sizes = np.bincount(label).astype(np.float64)
    connected = float((sizes * (sizes - 1) / 2).sum())
    return {"true_pairs": int(true_pairs), "pair_recall": round(len(edges["a"]) / true_pairs, 6),
            "connected_recall": round(connected / true_pairs, 6)}


def _ratio(a: float, b: float) -> float | None:
    return round(b / a, 2) if a else None


def growth(small: dict, large: dict) -> dict:
    """Each count's ratio from the smaller size to the larger, beside the linear expectation."""
    scale = large["persons"] / small["persons"]
    rules = []
    for a, b in zip(small["rules"], large["rules"]):
        rules.append({"rule": a["rule"], "marginal_ratio": _ratio(a["marginal"], b["marginal"]),
                      "cumulative_ratio": _ratio(a["cumulative"], b["cumulative"])})
    return {"persons_ratio": scale, "identities_ratio": _ratio(small["identities"], large["identities"]),
            "comparisons_ratio": _ratio(small["comparisons"], large["comparisons"]),
            "without_anchors_ratio": (_ratio(small["without_anchors"]["comparisons"], large["without_anchors"]["comparisons"])
                                      if small.get("without_anchors") and large.get("without_anchors") else None),
            "comparisons_per_identity": [round(small["comparisons"] / small["identities"], 2),
                                         round(large["comparisons"] / large["identities"], 2)],
            "rules": rules}


def markdown(results: dict) -> str:
    from linkage.link.blocking import REPRESENTATIVES

    sizes = results["sizes"]
    head = " | ".join(f"{s['persons']:,}: marginal | cumulative" for s in sizes)
    ratio_head = " | growth (marginal)" if results.get("growth") else ""
    lines = [f"| rule | {head}{ratio_head} |", "|---|" + "---:|" * (2 * len(sizes) + bool(ratio_head))]
    for i, rule in enumerate(sizes[0]["rules"]):
        cells = " | ".join(f"{s['rules'][i]['marginal']:,} | {s['rules'][i]['cumulative']:,}" for s in sizes)
        ratio = ""
        if results.get("growth"):
            r = results["growth"]["rules"][i]["marginal_ratio"]
            ratio = f" | {r}x" if r is not None else " | -"
        lines.append(f"| `{rule['rule']}` | {cells}{ratio} |")
    summary = ["| persons | records | identities | anchor groups | comparisons | per identity | connected recall | "
               "pair recall | identities no rule compares (share) | records' share | anchor seconds | count seconds | "
               "peak GB |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in sizes:
        u, r = s["uncompared"], s["reach"]
        summary.append(f"| {s['persons']:,} | {s['records']:,} | {s['identities']:,} | "
                       f"{s['anchors']['anchor_groups']:,} | {s['comparisons']:,} | "
                       f"{s['comparisons'] / s['identities']:.2f} | {r['connected_recall']:.6f} | "
                       f"{r['pair_recall']:.4f} | {u['identities_no_rule_compares']:,} "
                       f"({u['identities_share']:.4%}) | {u['records_share']:.4%} | {s['anchor_seconds']} | "
                       f"{s['count_seconds']} | {s['peak_gb']} |")
    text = ["# Blocking growth: comparisons per prediction rule of `hhlink link`", "",
            f"Measured {results['when']} with `python -m bench.blocking` on the synthetic population (seed {SEED}), "
            "after generate, ingest and pseudonymise. The rules are the link stage's anchored rules "
            "(`linkage/link/blocking.py`): identities equal on a NINO, a UPN, or forename, surname and date of "
            f"birth together form anchor groups, whose members are all compared with each other; every other rule "
            f"(marked anchored) compares the {REPRESENTATIVES} identities with most records per anchor group and rule "
            "key. Counts are exact, on every identity (no sample): one SQL "
            "pass joins the identities under each rule on its join columns and gives each pair to the first "
            "rule that reaches it, as prediction does (`linkage.link.stage.blocking_counts`). Marginal = "
            "comparisons a rule adds beyond the rules above it, cumulative = all comparisons so far. Nothing is "
            "trained or scored. Scored with the truth: pair recall = share of true identity pairs (two "
            "identities of one person) some rule compares; connected recall = share joined by a chain of "
            "compared true pairs, the most clustering can link (comparing a few identities per anchor group "
            "lowers pair recall by design, not connected recall). \"No rule compares\" counts identities no rule pairs "
            "with any other.",            "", *summary, "", *lines]
    if all(s.get("without_anchors") for s in sizes):
        text += ["", "The same rules without anchors, in the same run (`PREDICTION_BLOCKS` as they are: every "
                 "identity of a block compared with every other):", "",
                 "| persons | comparisons: anchored | without anchors | connected recall: anchored | without anchors |",
                 "|---:|---:|---:|---:|---:|"]
        for s in sizes:
            w = s["without_anchors"]
            text.append(f"| {s['persons']:,} | {s['comparisons']:,} | {w['comparisons']:,} | "
                        f"{s['reach']['connected_recall']:.6f} | {w['reach']['connected_recall']:.6f} |")
    checks = [s for s in sizes if s.get("splink_check")]
    for s in checks:
        c = s["splink_check"]
        text += ["", f"Cross-check at {s['persons']:,} persons, in the same run: Splink's own "
                 "`count_comparisons_from_blocking_rules` (every record) gives "
                 + ("the same marginal count for every rule." if c["equal"] else
                    f"different counts: {c['splink_marginal']}.")]
    if sizes and not checks:
        text += ["", "No Splink cross-check in this run (it materialises every pair with every column; run only "
                 f"up to {SPLINK_CHECK_MAX:,} identities)."]
    g = results.get("growth")
    if not g:
        text += ["", "One size only: the growth ratio (and its linear expectation, "
                 f"{LINEAR:.0f}x from 100k to 1M persons) needs a second size."]
    if g:
        text += ["", f"Growth from {sizes[0]['persons']:,} to {sizes[-1]['persons']:,} persons "
                 f"({g['persons_ratio']:.0f}x; identities {g['identities_ratio']}x): comparisons "
                 f"{g['comparisons_ratio']}x against the linear expectation of {LINEAR:.0f}x; comparisons per "
                 f"identity {g['comparisons_per_identity'][0]} -> {g['comparisons_per_identity'][1]}."
                 + (f" Without anchors: {g['without_anchors_ratio']}x." if g.get("without_anchors_ratio") else "")]
    return "\n".join(text) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", action="append", default=[], metavar="PERSONS=FOLDER=KEY_FILE",
                    help="a size, its workspace and key file (built if it holds no pseudonymised identifiers)")
    ap.add_argument("--build", metavar="PERSONS=FOLDER=KEY_FILE", help="only build this workspace, then exit")
    ap.add_argument("--threads", type=int, default=1, help="DuckDB threads (default 1: the machine is shared)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if args.build:
        print(json.dumps(build(*_spec(args.build), args.threads)))
        return 0
    if not args.workspace:
        ap.error("give --workspace PERSONS=FOLDER=KEY_FILE (one per size)")
    sizes = []
    for spec in sorted(args.workspace, key=lambda s: _spec(s)[0]):
        size, root, key_file = _spec(spec)
        build(size, root, key_file, args.threads)
        print(f"counting {size:,} persons ...", flush=True)
        sizes.append(count(size, root, key_file, args.threads))
    results = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(),
               "threads": args.threads, "sizes": sizes,
               "growth": growth(sizes[0], sizes[-1]) if len(sizes) > 1 else None, "linear_expectation": LINEAR}
    print(markdown(results))
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "blocking.json").write_text(json.dumps(results, indent=2))
        (RESULTS / "blocking.md").write_text(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
