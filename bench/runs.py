"""Benchmark results kept one run per population size: ``bench/results/<name>.json`` and ``.md``.

A benchmark measured at several sizes answers different questions at each (targets set at
20,000 persons, whether they hold at 100,000; a 1,000,000-person timing), so a new run of one
size replaces that size's run and leaves the others.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def keep(name: str, result: dict, title: str, section: Callable[[dict], list[str]],
         results: Path = RESULTS) -> str:
    """Store ``result`` (which names its ``persons``) beside the other sizes' runs and render them all.

    Returns the Markdown written to ``results/<name>.md``: ``title``, then ``section(run)`` per
    size, smallest first. A file holding a single run (the format before sizes were kept) is read
    as that size's run.
    """
    results.mkdir(exist_ok=True)
    path = results / f"{name}.json"
    try:
        saved = json.loads(path.read_text())
        runs = saved.get("runs", {str(saved["persons"]): saved} if "persons" in saved else {})
    except (OSError, ValueError):
        runs = {}
    runs[str(result["persons"])] = result
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    lines = [f"# {title}", ""]
    for persons in sorted(runs, key=int):
        lines += section(runs[persons]) + [""]
    text = "\n".join(lines)
    (results / f"{name}.md").write_text(text)
    return text
