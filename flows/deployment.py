"""The monthly deployment of ``monthly-release``, served by this process (``hhlink schedule``).

Each run makes at most one release from what arrived since the last one
(:mod:`flows.monthly_release`): it runs every stage and records the release in
``releases.jsonl``.

Serving needs a Prefect server that outlives the process (schedules live there): start
one with ``prefect server start --host 127.0.0.1`` and set
``PREFECT_API_URL=http://127.0.0.1:4200/api``, or point ``PREFECT_API_URL`` (and
``PREFECT_API_KEY``, for Prefect Cloud) at a remote server. The deployment's parameters
are the workspace and the config file's path, read at each run, so edits to
``hhlink.toml`` apply to the next run without redeploying. The key is never a parameter:
each run reads it from the serving process's environment (``HHLINK_KEY_FILE`` or the
default key file).

Example:
    >>> from linkage.config import load_config
    >>> d = monthly_deployment("/srv/hhlink/workspace", load_config())   # doctest: +SKIP
    >>> d.name
    'monthly'
"""

from __future__ import annotations

from pathlib import Path

from linkage.config import DEFAULT_CONFIG_PATH, Config
from flows.monthly_release import monthly_release_flow

__all__ = ["monthly_deployment", "serve_monthly"]


def monthly_deployment(workspace: Path | str, config: Config, config_path: Path | str | None = None,
                       key_file: Path | str | None = None):
    """The ``monthly-release/<flow.deployment>`` deployment with its cron schedule.

    Args:
        workspace: the workspace each run works in (made absolute).
        config: the configuration; ``[flow]`` gives the schedule, time zone and name.
        config_path: the config file each run reads (made absolute); default the file
            ``config`` was read from (``config.source``), else the packaged ``hhlink.toml``.
        key_file: a key file path for the runs (the path, never the key); default: the
            serving process's ``HHLINK_KEY``, ``HHLINK_KEY_FILE`` or default key file.

    Returns:
        A Prefect ``RunnerDeployment`` (``.apply()`` registers it; :func:`serve_monthly` serves it).
    """
    from prefect.schedules import Cron

    f = config.flow
    read_from = config.source[0] if config.source else DEFAULT_CONFIG_PATH
    parameters = {"workspace": str(Path(workspace).resolve()),
                  "config_path": str(Path(config_path or read_from).resolve())}
    if key_file is not None:
        parameters["key_file"] = str(Path(key_file).resolve())
    return monthly_release_flow.to_deployment(
        name=f.deployment, schedules=[Cron(f.schedule, timezone=f.timezone)], parameters=parameters,
        description=f"hhlink: one release a run from what arrived since the last, every stage on "
                    f"{parameters['workspace']}, monthly ({f.schedule}, {f.timezone}); stops before publishing "
                    "when a quality gate fails.",
        tags=["hhlink"])


def serve_monthly(workspace: Path | str, config: Config, config_path: Path | str | None = None,
                  key_file: Path | str | None = None) -> None:
    """Register the monthly deployment and run its flow runs from this process until interrupted."""
    from prefect import serve

    serve(monthly_deployment(workspace, config, config_path, key_file), print_starting_message=False)
