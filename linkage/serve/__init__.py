"""The ``serve`` stage: the researcher and auditor portal over one workspace.

Researchers browse ``published/`` and ask for new tables through the disclosure engine
(:func:`linkage.disclose.stage.build_table`); auditors read ``reports/`` and the audit log;
engineers see run status and quarantine counts. Nothing served is record-level. Users and
token hashes live in ``DIR/service/users.json``, the hash-chained audit log in
``DIR/audit/log.jsonl``.

Example:
    >>> from linkage.serve import UserStore, create_app
    >>> token = UserStore("workspace").add("alice", "researcher")     # doctest: +SKIP
    >>> serve("workspace", load_config())                              # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path

from linkage.config import Config
from linkage.keys import MasterKey
from linkage.serve.app import create_app
from linkage.serve.audit import AuditLog, Verification
from linkage.serve.users import ROLES, User, UserError, UserStore

__all__ = ["ROLES", "AuditLog", "User", "UserError", "UserStore", "Verification", "create_app", "serve"]

log = logging.getLogger(__name__)


def serve(workspace: Path | str, config: Config, key: MasterKey | None = None, host: str | None = None,
          port: int | None = None) -> None:
    """Run the portal with uvicorn until interrupted (one process: sessions and quotas live in it).

    Args:
        workspace: the workspace folder.
        config: the configuration (``service`` section: host, port, quota ...).
        key: the master key; default: the configured key.
        host: bind address (default ``service.host``, the loopback address).
        port: TCP port (default ``service.port``).
    """
    import uvicorn

    app = create_app(workspace, config, key)
    portal = app.state.portal
    host, port = host or config.service.host, port or config.service.port
    portal.audit.append("system", "system", "service.start", {"host": host, "port": port})
    try:
        # no access log: request lines go to the audit log instead, with who asked. No proxy headers: the
        # client address audited and throttled is the connection's, never an X-Forwarded-For a client wrote
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, server_header=False,
                    proxy_headers=False)
    finally:
        portal.audit.append("system", "system", "service.stop", {"host": host, "port": port})
