"""Errors that hhlink reports to its user as one line, never a traceback."""

from __future__ import annotations

import tomllib
from pathlib import Path


class HhlinkError(Exception):
    """Base class: the message is complete and safe to show (it holds no record values)."""


class ConfigError(HhlinkError):
    """The configuration file or a command-line setting is invalid."""


class WorkspaceError(HhlinkError):
    """The workspace folder cannot be used (missing, unwritable, or a zone is absent)."""


class StaleInputError(WorkspaceError):
    """A stage's input zone was built from other inputs than the ones in the workspace now."""


class SchemaError(HhlinkError):
    """A schema file under ``schemas/`` is missing or malformed."""


def read_toml(path: Path, error: type[HhlinkError], what: str) -> dict:
    """Parse a TOML file, or raise ``error`` with one line naming the file (config, schemas, maps)."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read the {what} ({exc.__class__.__name__})") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: the {what} is not valid TOML ({exc})") from None
