"""CLI commands: one module per command; importing a module registers its command on ``cli``."""

from linkage.commands import assemble, audit, config, crosswalk, disclose, evaluate, generate, ingest, keys, link, link_files, pseudonymise, run, schedule, serve, users  # noqa: F401
