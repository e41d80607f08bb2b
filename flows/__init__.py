"""Prefect flows: thin orchestration of the stage functions in ``linkage/``.

``household_linkage_flow`` (``household-linkage``) runs every stage of the registry
(:mod:`linkage.stages`) in order; each stage is also a flow of its own, made by one factory
(:mod:`flows.stages`). ``monthly_release_flow`` (``monthly-release``) makes one release per
run from what arrived since the last one, and :mod:`flows.deployment` serves it on a
monthly schedule (``hhlink schedule``). The flows are imported on first
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

__all__ = ["household_linkage_flow", "monthly_release_flow", "stage_flow"]


def __getattr__(name: str):
    if name == "household_linkage_flow":
        return importlib.import_module("flows.household_linkage").household_linkage_flow
    if name == "monthly_release_flow":
        return importlib.import_module("flows.monthly_release").monthly_release_flow
    if name == "stage_flow":   # stage_flow("link"): the registry stage's own flow
        return importlib.import_module("flows.stages").STAGE_FLOWS.__getitem__
    raise AttributeError(f"module 'flows' has no attribute {name!r}")
