"""Linkage on the synthetic population against its truth: persons, households and parent-child relations.

Builds a population (``generate``, ``ingest``, ``pseudonymise``, ``link``, ``evaluate``
through the stage registry, as ``hhlink run`` does, under the public benchmark key) and
prints issue 15's synthetic targets beside the measured figures and the ceilings
(``reports/evaluation.json``: the share of true relations with any evidence in the
extracts), then writes ``bench/results/synthetic.md`` and ``.json``.

With ``--keys K`` the same population is linked again under K-1 further keys (derived from
the key number, so the run is reproducible) and each key's figures are printed beside the
benchmark key's: a Bloom filter's collisions, and so its Dice similarities, depend on the key,
and a deployment runs under a key nobody benchmarked. The targets are judged on the worst key.

Usage:
    python -m bench.synthetic --persons 20000 --seed 42 --workspace /tmp/hhlink-synthetic [--keys 4]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from bench.stages import BENCH_KEY

RESULTS = Path(__file__).parent / "results"
STAGES = ("generate", "ingest", "pseudonymise", "link", "evaluate")
# (figure in evaluation.json, target, how it is judged, issue 15's wording)
TARGETS = (
    ("person_pairwise_f1", 0.9997, ">=", "no worse than before issue 15 (0.9997)"),
    ("household_accuracy", 0.98, ">=", ">= 0.98"),
    ("parent_child_precision", 0.999, ">=", ">= 0.999"),
    ("parent_child_recall", 0.97, ">=", ">= 0.97 at precision >= 0.999"),
)
PERSONS = ("person_pairwise_precision", "person_pairwise_recall", "person_cluster_f1")
CEILINGS = ("coresidence_evidence_ceiling", "parent_child_evidence_same_year", "parent_child_evidence_ceiling",
            "parent_child_evidence_within_age_gap")


def bench_key(number: int) -> str:
    """Key 0 is the public benchmark key; key n > 0 is SHA-256 of its number (hex): public, reproducible."""
    return BENCH_KEY if number == 0 else hashlib.sha256(f"hhlink bench.synthetic key {number}".encode()).hexdigest()


def _figures(workspace: Path) -> dict:
    ev = json.loads((workspace / "reports" / "evaluation.json").read_text())
    return {"figures": {k: ev[k] for k, *_ in TARGETS} | {k: ev.get(k) for k in (*CEILINGS, *PERSONS)},
            "parent_child_recall_at_precision_target": ev.get("parent_child_recall_at_precision_target"),
            "by_threshold": ev.get("person_metrics_by_threshold")}


def run(persons: int, seed: int, workspace: Path, keys: int = 1) -> dict:
    from linkage.config import load_config
    from linkage.stages import run_stage

    if keys > 1 or not (os.environ.get("HHLINK_KEY") or os.environ.get("HHLINK_KEY_FILE")):
        os.environ["HHLINK_KEY"] = bench_key(0)
    shutil.rmtree(workspace, ignore_errors=True)
    cfg = load_config(generate={"persons": persons, "seed": seed})
    seconds = {}
    for stage in STAGES:
        t = time.perf_counter()
        run_stage(stage, cfg, workspace)
        seconds[stage] = round(time.perf_counter() - t, 1)
        print(f"{stage}: {seconds[stage]} s")
    result = {"persons": persons, "seed": seed, "seconds": seconds,
              "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **_figures(workspace),
              "threshold": json.loads((workspace / "linked" / "summary.json").read_text()).get("threshold")}
    if keys > 1:
        # the same extracts under other keys: everything from pseudonymise on is keyed
        result["keys"] = [{"key": 0, **{k: result[k] for k in ("figures", "parent_child_recall_at_precision_target")}}]
        for number in range(1, keys):
            other = workspace.with_name(f"{workspace.name}-key{number}")
            shutil.rmtree(other, ignore_errors=True)
            # the generated extracts and their staging only: every keyed zone, and the lineage naming its key, is rebuilt
            shutil.copytree(workspace, other, ignore=shutil.ignore_patterns(
                "pseudonymised", "linked", "reports", "research", "assembled", "published", ".flow"))
            os.environ["HHLINK_KEY"] = bench_key(number)
            try:
                for stage in STAGES[2:]:
                    run_stage(stage, cfg, other)
            finally:
                os.environ["HHLINK_KEY"] = bench_key(0)
            result["keys"].append({"key": number, **_figures(other)})
            print(f"key {number}: {json.dumps(result['keys'][-1]['figures'])}")
            shutil.rmtree(other, ignore_errors=True)
    return result


def write(result: dict) -> str:
    """Keep ``result`` in ``bench/results/synthetic.json`` beside the runs of other sizes, and render them all:
    the targets were set at 20,000 persons, and a larger run shows whether they hold as the population grows."""
    from bench.runs import keep

    return keep("synthetic", result, "Linkage on the synthetic population against its truth", _section, RESULTS)


def _section(result: dict) -> list[str]:
    f = result["figures"]
    lines = [f"## {result['persons']:,} persons", "",
             f"{result['persons']:,} persons, seed {result['seed']}, measured {result['measured']} "
             f"(`python -m bench.synthetic --persons {result['persons']} --seed {result['seed']}"
             + (f" --keys {len(result['keys'])}" if result.get("keys") else "") + "`; stages through the "
             "registry as `hhlink run` runs them, under the public benchmark key). Targets from issue 15."
             + (f" Linkage threshold: {result['threshold']:.5f}." if result.get("threshold") else ""), "",
             "| figure | measured | target | met |", "| --- | ---: | --- | --- |"]
    for name, target, _, wording in TARGETS:
        lines.append(f"| {name} | {f[name]:.4f} | {wording} | {'yes' if f[name] >= target else 'no'} |")
    for name in PERSONS:
        if f.get(name) is not None:
            lines.append(f"| {name} | {f[name]:.4f} | - | - |")
    at = result.get("parent_child_recall_at_precision_target") or {}
    if at:
        lines.append(f"| parent-child recall at the best confidence cut with precision >= {at['precision_target']} "
                     f"| {at['recall']:.4f} | >= 0.97 | {'yes' if at['recall'] >= 0.97 else 'no'} |")
    lines += ["", "Ceilings: the share of true relations with any evidence in the extracts, whatever the linkage did "
              "(`relation_evidence_sql` in linkage/evaluate/stage.py):", "", "| ceiling | share |", "| --- | ---: |"]
    lines += [f"| {name} | {f[name]:.4f} |" for name in CEILINGS if f.get(name) is not None]
    if result.get("by_threshold"):
        lines += ["", "Persons re-clustered from the same scored pairs at fixed probability thresholds (`hhlink evaluate`'s "
                  "`person_metrics_by_threshold`); the run's own threshold is above.", "",
                  "| threshold | pairwise precision | pairwise recall | pairwise F1 | cluster F1 |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['threshold']} | {r['pairwise_precision']:.5f} | {r['pairwise_recall']:.5f} | "
                  f"{r['pairwise_f1']:.5f} | {r['cluster_f1']:.5f} |" for r in result["by_threshold"]]
    if result.get("keys"):
        runs = result["keys"]
        lines += ["", f"The same extracts under {len(runs)} keys (`--keys {len(runs)}`: key 0 is the benchmark key, "
                  "key n the SHA-256 of its number). Everything from pseudonymise on depends on the key: a Bloom "
                  "filter's collisions, so its Dice similarities, and the sampled u. Targets judged on the worst key.",
                  "", "| key | " + " | ".join(name for name, *_ in TARGETS) + " |",
                  "| --- |" + " ---: |" * len(TARGETS)]
        lines += [f"| {r['key']} | " + " | ".join(f"{r['figures'][name]:.4f}" for name, *_ in TARGETS) + " |"
                  for r in runs]
        worst = {name: min(r["figures"][name] for r in runs) for name, *_ in TARGETS}
        lines.append("| worst | " + " | ".join(f"{worst[name]:.4f}" for name, *_ in TARGETS) + " |")
        lines.append("| target met on every key | " + " | ".join(
            "yes" if worst[name] >= target else "no" for name, target, *_ in TARGETS) + " |")
    lines += ["", "Seconds per stage: " + ", ".join(f"{k} {v}" for k, v in result["seconds"].items()) + "."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--persons", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--workspace", type=Path, default=Path("/tmp/hhlink-synthetic"))
    ap.add_argument("--keys", type=int, default=1, help="link the same extracts under this many keys (>= 1)")
    a = ap.parse_args()
    print(write(run(a.persons, a.seed, a.workspace, max(1, a.keys))))


if __name__ == "__main__":
    main()
