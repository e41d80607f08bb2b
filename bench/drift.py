"""Model drift across releases: does the gate let ordinary deliveries through and stop a drifted one?

Generates a population with its last N deliveries held back, links the history (the
model is trained and stored), then makes two releases from copies of that workspace:

- **ordinary**: the held-back deliveries as generated (the same error rates as the
  history); the drift gate should let it through;
- **drifted**: the same months delivered by the same population generated with higher
  error rates (:data:`DRIFTED`: more name typos, nicknames, mistyped NINOs and postcodes),
  its rows numbered afresh by the department; the gate should stop it, naming a level.

For each it prints the largest drift (comparison, level, side) beside ``link.max_drift``,
the predicted matches the m side rests on, the records matched at training and now, the
gate's decision, and the link stage's seconds (reusing the model) beside the history's
(training it).

Usage:
    python -m bench.drift --persons 1000 --deliveries 3 --workspace /tmp/hhlink-drift
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path

from bench.stages import BENCH_KEY

RESULTS = Path(__file__).parent / "results"
#: a department's data entry got worse
DRIFTED = {"name_typo": 0.5, "nickname": 0.4, "nino_mistyped": 0.3, "postcode_typo": 0.5}


def land_drifted(generate_cfg, errors: dict, landing: Path, scratch: Path) -> list[str]:
    """Land the held-back months as the same population, generated with ``errors``, delivers them.

    The department numbers the delivery's rows afresh (``EDU0...`` becomes ``EDU9...``): the
    drifted generation's ids would otherwise repeat ids of the history, which ingest
    quarantines. Returns the names of the files landed.
    """
    from synthetic_data import generate_population

    generate_population(generate_cfg.model_copy(update={"errors": generate_cfg.errors.model_copy(update=errors)}),
                        scratch)
    names = []
    for d in json.loads((scratch / "deliveries" / "index.json").read_text())["deliveries"]:
        for f in d["files"]:
            lines = (scratch / "deliveries" / d["month"] / f["name"]).read_text().splitlines(keepends=True)
            renumbered = [lines[0]] + [re.sub(r'^"([A-Z]{3})0', r'"\g<1>9', line) for line in lines[1:]]
            (landing / f["name"]).write_text("".join(renumbered))
            names.append(f["name"])
    return names


def _release(cfg, ws: Path) -> dict:
    """ingest, pseudonymise and link; the link facts, or the gate's stop."""
    from linkage.link.drift import DriftGateError
    from linkage.stages import run_stage

    for stage in ("ingest", "pseudonymise"):
        run_stage(stage, cfg, ws)
    t = time.perf_counter()
    try:
        s = run_stage("link", cfg, ws)
        stopped = None
    except DriftGateError as exc:
        s, stopped = {}, str(exc)
    facts = json.loads((ws / "reports" / "linkage" / "drift.json").read_text())
    d = facts["drift"]
    top = d["largest"]
    return {"link_seconds": round(time.perf_counter() - t, 1), "model": facts["model"]["mode"],
            "largest": {k: top[k] for k in ("comparison", "level", "side", "drift", "m_at_training", "m_now",
                                            "u_at_training", "u_now")},
            "matched_pairs": d["matched_pairs"], "records_matched": d["records_matched"],
            "judged": d["gate"]["judged"], "passed": d["gate"]["passed"], "stopped": stopped,
            "persons": s.get("persons")}


def run(persons: int, deliveries: int, seed: int, workspace: Path) -> dict:
    from linkage.config import load_config
    from linkage.stages import run_stage
    from synthetic_data import generate_population
    from synthetic_data.deliveries import deliver_next

    os.environ.setdefault("HHLINK_KEY", BENCH_KEY)
    shutil.rmtree(workspace, ignore_errors=True)
    cfg = load_config(generate={"persons": persons, "seed": seed, "deliveries": deliveries},
                      ingest={"data_docs": False})
    history = workspace / "history"
    generate_population(cfg.generate, history)
    for stage in ("ingest", "pseudonymise"):
        run_stage(stage, cfg, history)
    t = time.perf_counter()
    run_stage("link", cfg, history)
    out = {"persons": persons, "deliveries": deliveries, "seed": seed, "max_drift": cfg.link.max_drift,
           "drift_min_pairs": cfg.link.drift_min_pairs, "drifted_errors": DRIFTED,
           "history_link_seconds": round(time.perf_counter() - t, 1), "releases": {}}
    ordinary = shutil.copytree(history, workspace / "ordinary")
    while deliver_next(ordinary):
        pass
    out["releases"]["ordinary"] = _release(cfg, ordinary)
    print(json.dumps(out["releases"]["ordinary"]))
    drifted = shutil.copytree(history, workspace / "drifted")
    land_drifted(cfg.generate, DRIFTED, drifted / "landing", workspace / "drifted-generation")
    out["releases"]["drifted"] = _release(cfg, drifted)
    print(json.dumps(out["releases"]["drifted"]))
    return out


def write(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "drift.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Model drift across releases: the drift gate",
        "",
        f"{result['persons']:,} persons, seed {result['seed']}, the last {result['deliveries']} deliveries landed "
        f"as one release (`python -m bench.drift --persons {result['persons']} --deliveries {result['deliveries']}"
        f" --seed {result['seed']}`). The model is trained on the history and reused; drift is a level's absolute "
        "change in its share among the predicted matches involving the newest records (m side: the release's new "
        "identities now, the history's latest year at training) or among random pairs (u side). Target: the ordinary release passes and the drifted one "
        f"({', '.join(f'{k} {v}' for k, v in result['drifted_errors'].items())}) is stopped by "
        f"link.max_drift = {result['max_drift']}.",
        "",
        "| release | largest drift (bound " f"{result['max_drift']}) | level | side: training -> now "
        "| predicted matches | records matched: training -> now | gate | link seconds (history, training: "
        f"{result['history_link_seconds']}) |",
        "| --- | ---: | --- | --- | ---: | --- | --- | ---: |",
    ]
    for name, r in result["releases"].items():
        top, rm = r["largest"], r["records_matched"]
        side = (f"m {top['m_at_training']:.3f} -> {top['m_now']:.3f}" if top["side"] == "m"
                else f"u {top['u_at_training']:.3f} -> {top['u_now']:.3f}")
        gate = "stopped" if not r["passed"] else ("passed" if r["judged"] else "not judged (too few matches)")
        lines.append(f"| {name} | {top['drift']:.3f} | {top['comparison']}: {top['level']} | {side} | "
                     f"{r['matched_pairs']:,} | {rm['at_training']:.3f} -> {rm['now']:.3f} | {gate} | "
                     f"{r['link_seconds']} |")
    (RESULTS / "drift.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--persons", type=int, default=1000)
    ap.add_argument("--deliveries", type=int, default=3)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--workspace", type=Path, default=Path("/tmp/hhlink-drift"))
    a = ap.parse_args()
    write(run(a.persons, a.deliveries, a.seed, a.workspace))


if __name__ == "__main__":
    main()
