"""CLI commands: one module per command; importing a module registers its command on ``cli``."""

from linkage.commands import config, evaluate, generate, link  # noqa: F401
