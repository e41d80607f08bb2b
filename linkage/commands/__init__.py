"""CLI commands: one module per command; importing a module registers its command on ``cli``."""

from linkage.commands import config, crosswalk, evaluate, generate, ingest, keys, link, link_files, pseudonymise  # noqa: F401
