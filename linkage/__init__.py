"""hhlink: household-level linkage of administrative records for social mobility research.

Each stage is a module with one public entry point; see ARCHITECTURE in the README.
"""

from linkage.compat import pyspark_guard as _pyspark_guard
from linkage.config import Config, load_config
from linkage.errors import ConfigError, HhlinkError, SchemaError, WorkspaceError
from linkage.schemas import load_schema, load_schemas
from linkage.workspace import Workspace

__all__ = [
    "Config", "ConfigError", "HhlinkError", "SchemaError", "Workspace", "WorkspaceError",
    "load_config", "load_schema", "load_schemas",
]
__version__ = "0.1.0"

_pyspark_guard.install()   # python -c with the spark extra: see linkage/_pyspark_guard.py
