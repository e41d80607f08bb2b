"""CLI commands: one module per command; importing a module registers its command on ``cli``."""

from linkage.commands import config, generate  # noqa: F401
