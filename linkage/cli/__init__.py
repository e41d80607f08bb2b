"""The ``hhlink`` command line: one module per command, each calling one library function.

``linkage.cli.base`` holds the click group and the error handling; importing a command
module registers its command on the group. Library packages never import this one.
"""

from linkage.cli import assemble, audit, config, crosswalk, deliver, disclose, evaluate, generate, ingest, keys, link, link_files, pseudonymise, run, schedule, serve, users  # noqa: F401
from linkage.cli.base import cli, main

__all__ = ["cli", "main"]
