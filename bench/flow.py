"""The whole Prefect flow at one size: seconds and peak memory per stage, and in total.

Runs ``household-linkage`` with generation, in this process, against a temporary local
Prefect server (or ``PREFECT_API_URL``), every stage forced to run (no cache). A sampler
thread reads the resident memory of this process and its children (the Prefect server,
Spark if used) from ``/proc`` every 0.2 s and keeps each stage's peak. The target is for
1M persons: the pipeline (ingest to disclose) in at most 25 minutes with a peak under
12 GB on this machine (2 cores); smaller sizes print the linear share of the time target.
Results are merged into ``bench/results/flow.json`` and ``flow.md``.

Usage:
    python -m bench.flow --persons 100000
    python -m bench.flow --persons 1000000 --workspace /data/bench-1m
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_SECONDS_1M = 25 * 60
TARGET_PEAK_GB = 12.0
PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree_rss_bytes(root: int) -> int:
    """Resident bytes of ``root`` and every descendant process."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            parents[int(entry.name)] = int(fields[1])
            rss[int(entry.name)] = int(fields[21]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [root]
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


class _Sampler:
    """Peak resident memory of the process tree, per stage (the stage the flow reports running)."""

    def __init__(self):
        self.stage = "start-up"
        self.peaks: dict[str, int] = {}
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = os.getpid()
        while not self._stop.wait(0.2):
            used = _tree_rss_bytes(me)
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), used)

    def __call__(self, stage: str, status: str, detail: str) -> None:
        if status == "running":
            self.stage, self.started[stage] = stage, time.perf_counter()
        elif status in ("ran", "cached", "failed"):
            self.ended[stage], self.status[stage] = time.perf_counter(), status
            self.stage = "between stages"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--persons", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--workspace", type=Path, default=None, help="default: a temporary folder, removed after")
    args = ap.parse_args(argv)

    from bench.stages import BENCH_KEY

    if not (os.environ.get("HHLINK_KEY") or os.environ.get("HHLINK_KEY_FILE")):
        os.environ["HHLINK_KEY"] = BENCH_KEY
    from linkage.cli.run import prefect_environment

    prefect_environment(verbose=False)
    from flows import household_linkage_flow
    from flows.progress import listening
    from linkage.config import load_config

    cfg = load_config(generate={"persons": args.persons, "seed": args.seed})
    ws = args.workspace or Path(tempfile.mkdtemp(prefix=f"hhlink-flow-{args.persons}-"))
    t0 = time.perf_counter()
    try:
        with _Sampler() as sampler, listening(sampler):
            state = household_linkage_flow(str(ws), cfg, generate=True, refresh=True, return_state=True)
        wall = time.perf_counter() - t0
        if not state.is_completed():
            print(f"the flow failed: {state.message}", file=sys.stderr)
            return 1
    finally:
        if args.workspace is None:
            shutil.rmtree(ws, ignore_errors=True)
    stages = [s for s in sampler.started if s in sampler.ended]
    rows = [{"stage": s, "seconds": round(sampler.ended[s] - sampler.started[s], 1),
             "peak_gb": round(sampler.peaks.get(s, 0) / 1e9, 2)} for s in stages]
    pipeline = [r for r in rows if r["stage"] != "generate"]
    total = {"persons": args.persons, "pipeline_seconds": round(sum(r["seconds"] for r in pipeline), 1),
             "wall_seconds": round(wall, 1), "peak_gb": round(max(sampler.peaks.values()) / 1e9, 2),
             "target_seconds": round(TARGET_SECONDS_1M * args.persons / 1_000_000, 1),
             "target_peak_gb": TARGET_PEAK_GB, "stages": rows, "cores": os.cpu_count(),
             "date": time.strftime("%Y-%m-%d")}
    total["meets_target"] = (total["pipeline_seconds"] <= total["target_seconds"]
                             and total["peak_gb"] <= TARGET_PEAK_GB)
    print(f"household-linkage at {args.persons:,} persons ({os.cpu_count()} cores)")
    for r in rows:
        print(f"  {r['stage']:<13} {r['seconds']:>8.1f} s   peak {r['peak_gb']:>5.2f} GB")
    print(f"  pipeline (ingest..disclose) {total['pipeline_seconds']:.1f} s (target {total['target_seconds']:.0f} s = "
          f"25 min x {args.persons / 1e6:g}); wall with generate and Prefect {total['wall_seconds']:.1f} s; "
          f"peak {total['peak_gb']:.2f} GB (target {TARGET_PEAK_GB:g} GB): "
          f"{'meets' if total['meets_target'] else 'MISSES'} the target")
    _write(total)
    return 0


def _write(result: dict) -> None:
    """Merge into ``bench/results/flow.json`` (one entry per size) and rewrite ``flow.md``."""
    RESULTS.mkdir(exist_ok=True)
    stored = RESULTS / "flow.json"
    kept = [r for r in (json.loads(stored.read_text()) if stored.exists() else []) if r["persons"] != result["persons"]]
    results = sorted([*kept, result], key=lambda r: r["persons"])
    stored.write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# The whole flow (household-linkage)", "",
             "Every stage forced to run; peak = resident memory of the process and its children "
             "(the Prefect server). Target at 1M persons: pipeline (ingest to disclose) <= 25 min, "
             "peak < 12 GB; smaller sizes show the linear share of the time.", ""]
    for r in results:
        lines += [f"## {r['persons']:,} persons ({r['date']}, {r['cores']} cores)", "",
                  "| stage | seconds | peak GB |", "| --- | ---: | ---: |"]
        lines += [f"| {s['stage']} | {s['seconds']} | {s['peak_gb']} |" for s in r["stages"]]
        lines += [f"| **pipeline (ingest..disclose)** | **{r['pipeline_seconds']}** (target {r['target_seconds']}) "
                  f"| **{r['peak_gb']}** (target {r['target_peak_gb']}) |",
                  f"| wall, with generate and Prefect | {r['wall_seconds']} | |", "",
                  f"Meets the target: {'yes' if r['meets_target'] else 'NO'}.", ""]
    (RESULTS / "flow.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
