"""The size ladder: time and peak memory of every stage at 100k and 1M persons.

Each stage runs in its own subprocess so its peak resident memory is its own. The
results table (`bench/results/ladder.md`, and `.json` beside it) puts each target beside
its figure. The stages are the registry's (:mod:`linkage.stages`), in pipeline order.

Usage:
    python -m bench.ladder                       # 100k, 1M
    python -m bench.ladder --sizes 10000 100000  # some rungs
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Stage:
    """A benchmarked registry stage (:data:`linkage.stages.STAGES`) and its targets at 1M persons."""

    name: str
    target_seconds_1m: float
    target_peak_gb_1m: float


# Targets at 1M persons per registry stage; evaluate reads the truth and has no target.
_TARGETS = {"generate": (180.0, 6.0), "ingest": (180.0, 12.0), "pseudonymise": (180.0, 12.0),
            "link": (600.0, 12.0), "assemble": (180.0, 10.0), "disclose": (120.0, 8.0)}


def _stages() -> list[Stage]:
    from linkage.stages import STAGES as REGISTRY

    return [Stage(name, *_TARGETS[name]) for name in REGISTRY if name in _TARGETS]


STAGES: list[Stage] = _stages()


def _run_stage(stage: Stage, size: int, workspace: Path) -> dict:
    from bench.stages import run

    t = time.perf_counter()
    out = run(stage.name, size, workspace)
    out["seconds"] = time.perf_counter() - t
    out["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return out


def _scaled_target(value: float, size: int) -> float:
    # targets are stated at 1M persons; smaller rungs get the linear share (never below 1 s)
    return max(1.0, value * size / 1_000_000)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--stages", nargs="+", default=[s.name for s in STAGES])
    ap.add_argument("--workdir", type=Path, default=None, help="where workspaces go (default: a temp folder)")
    ap.add_argument("--one", nargs=3, metavar=("STAGE", "SIZE", "WORKSPACE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        stage = next(s for s in STAGES if s.name == args.one[0])
        print(json.dumps(_run_stage(stage, int(args.one[1]), Path(args.one[2]))))
        return 0

    root = args.workdir or Path(tempfile.mkdtemp(prefix="hhlink-bench-"))
    results = []
    try:
        for size in args.sizes:
            ws = root / f"ws-{size}"
            for stage in (s for s in STAGES if s.name in args.stages):
                proc = subprocess.run([sys.executable, "-m", "bench.ladder", "--one", stage.name, str(size), str(ws)],
                                      capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
                if proc.returncode != 0:
                    print(proc.stderr, file=sys.stderr)
                    return proc.returncode
                out = json.loads(proc.stdout.strip().splitlines()[-1])
                row = {
                    "stage": stage.name, "persons": size, "rows": out.get("rows", 0),
                    "seconds": round(out["seconds"], 1),
                    "target_seconds": round(_scaled_target(stage.target_seconds_1m, size), 1),
                    "rows_per_second": round(out.get("rows", 0) / out["seconds"]) if out["seconds"] else None,
                    "peak_gb": round(out["peak_gb"], 2), "target_peak_gb": stage.target_peak_gb_1m,
                }
                row["meets_target"] = row["seconds"] <= row["target_seconds"] and row["peak_gb"] <= row["target_peak_gb"]
                results.append(row)
                print(f"{stage.name:<12} {size:>9,} persons  {row['seconds']:>7.1f} s (target {row['target_seconds']:.0f} s)"
                      f"  peak {row['peak_gb']:.2f} GB (target {row['target_peak_gb']:.0f} GB)"
                      f"  {row['rows']:,} rows  {'OK' if row['meets_target'] else 'MISSED'}", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    _write(results)
    return 0


def _write(results: list[dict]) -> None:
    """Merge this run's rows into the stored table: a rerun of some rungs keeps the others."""
    RESULTS.mkdir(exist_ok=True)
    stored = RESULTS / "ladder.json"
    fresh = {(r["stage"], r["persons"]) for r in results}
    kept = [r for r in (json.loads(stored.read_text()) if stored.exists() else [])
            if (r["stage"], r["persons"]) not in fresh]
    order = {s.name: i for i, s in enumerate(STAGES)}
    results = sorted(kept + results, key=lambda r: (r["persons"], order.get(r["stage"], len(order))))
    (RESULTS / "ladder.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Size ladder", "",
             "Targets are stated at 1M persons; smaller rungs show the linear share. "
             "Machine: 2 cores, 24 GB.", "",
             "| stage | persons | rows | seconds | target s | rows/s | peak GB | target GB | meets |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        lines.append(f"| {r['stage']} | {r['persons']:,} | {r['rows']:,} | {r['seconds']} | {r['target_seconds']} | "
                     f"{r['rows_per_second']:,} | {r['peak_gb']} | {r['target_peak_gb']} | "
                     f"{'yes' if r['meets_target'] else 'NO'} |")
    (RESULTS / "ladder.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
