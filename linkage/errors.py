"""Errors that hhlink reports to its user as one line, never a traceback."""


class HhlinkError(Exception):
    """Base class: the message is complete and safe to show (it holds no record values)."""


class ConfigError(HhlinkError):
    """The configuration file or a command-line setting is invalid."""


class WorkspaceError(HhlinkError):
    """The workspace folder cannot be used (missing, unwritable, or a zone is absent)."""


class SchemaError(HhlinkError):
    """A schema file under ``schemas/`` is missing or malformed."""
