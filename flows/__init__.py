"""Prefect flows: thin orchestration of the stage functions in ``linkage/``.

``household_linkage_flow`` (``household-linkage``) runs every stage in order; each stage
is also a flow of its own (:mod:`flows.stages`). :mod:`flows.deployment` serves the
parent flow on a monthly schedule (``hhlink schedule``). The flows are imported on first
use, so the helpers (fingerprints, the workspace lock) load without Prefect.

Example:
    >>> from flows import household_linkage_flow
    >>> household_linkage_flow("workspace")          # doctest: +SKIP
"""

import importlib
import os

# The local Prefect server would otherwise try to send telemetry to an unreachable host.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

_FLOWS = {"household_linkage_flow": "flows.household_linkage", **{
    f"{stage}_flow": "flows.stages"
    for stage in ("generate", "ingest", "pseudonymise", "link", "assemble", "evaluate", "disclose")}}

__all__ = sorted(_FLOWS)


def __getattr__(name: str):
    if name in _FLOWS:
        return getattr(importlib.import_module(_FLOWS[name]), name)
    raise AttributeError(f"module 'flows' has no attribute {name!r}")
