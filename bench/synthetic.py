"""Linkage on the synthetic population against its truth: persons, households and parent-child relations.

Builds a population (``generate``, ``ingest``, ``pseudonymise``, ``link``, ``evaluate``
through the stage registry, as ``hhlink run`` does, under the public benchmark key) and
prints issue 15's synthetic targets beside the measured figures and the ceilings
(``reports/evaluation.json``: the share of true relations with any evidence in the
extracts), then writes ``bench/results/synthetic.md`` and ``.json``.

Usage:
    python -m bench.synthetic --persons 20000 --seed 42 --workspace /tmp/hhlink-synthetic
"""

from __future__ import annotations

import argparse
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
CEILINGS = ("coresidence_evidence_ceiling", "parent_child_evidence_same_year", "parent_child_evidence_ceiling",
            "parent_child_evidence_within_age_gap")


def run(persons: int, seed: int, workspace: Path) -> dict:
    from linkage.config import load_config
    from linkage.stages import run_stage

    os.environ.setdefault("HHLINK_KEY", BENCH_KEY)
    shutil.rmtree(workspace, ignore_errors=True)
    cfg = load_config(generate={"persons": persons, "seed": seed})
    seconds = {}
    for stage in STAGES:
        t = time.perf_counter()
        run_stage(stage, cfg, workspace)
        seconds[stage] = round(time.perf_counter() - t, 1)
        print(f"{stage}: {seconds[stage]} s")
    ev = json.loads((workspace / "reports" / "evaluation.json").read_text())
    return {"persons": persons, "seed": seed, "seconds": seconds,
            "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "figures": {k: ev[k] for k, *_ in TARGETS} | {k: ev.get(k) for k in CEILINGS},
            "parent_child_recall_at_precision_target": ev.get("parent_child_recall_at_precision_target")}


def write(result: dict) -> str:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "synthetic.json").write_text(json.dumps(result, indent=2) + "\n")
    f = result["figures"]
    lines = ["# Linkage on the synthetic population against its truth", "",
             f"{result['persons']:,} persons, seed {result['seed']}, measured {result['measured']} "
             f"(`python -m bench.synthetic --persons {result['persons']} --seed {result['seed']}`; stages through the "
             "registry as `hhlink run` runs them, under the public benchmark key). Targets from issue 15.", "",
             "| figure | measured | target | met |", "| --- | ---: | --- | --- |"]
    for name, target, _, wording in TARGETS:
        lines.append(f"| {name} | {f[name]:.4f} | {wording} | {'yes' if f[name] >= target else 'no'} |")
    at = result.get("parent_child_recall_at_precision_target") or {}
    if at:
        lines.append(f"| parent-child recall at the best confidence cut with precision >= {at['precision_target']} "
                     f"| {at['recall']:.4f} | >= 0.97 | {'yes' if at['recall'] >= 0.97 else 'no'} |")
    lines += ["", "Ceilings: the share of true relations with any evidence in the extracts, whatever the linkage did "
              "(`relation_evidence_sql` in linkage/evaluate/stage.py):", "", "| ceiling | share |", "| --- | ---: |"]
    lines += [f"| {name} | {f[name]:.4f} |" for name in CEILINGS if f.get(name) is not None]
    lines += ["", "Seconds per stage: " + ", ".join(f"{k} {v}" for k, v in result["seconds"].items()) + "."]
    text = "\n".join(lines) + "\n"
    (RESULTS / "synthetic.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--persons", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--workspace", type=Path, default=Path("/tmp/hhlink-synthetic"))
    a = ap.parse_args()
    print(write(run(a.persons, a.seed, a.workspace)))


if __name__ == "__main__":
    main()
