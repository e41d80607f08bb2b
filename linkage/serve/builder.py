"""The table builder: researchers' on-demand tables, answered only through disclosure control.

A request names one to three dimensions and one measure, each from the config's
``disclosure.allowed_dimensions`` and ``allowed_measures``; nothing else is accepted (no
filters, no free text: a name outside the lists, a repeated name, an unknown key or a
value that is not a plain name is refused with HTTP 422 before any data is read). A
request whose table would exceed ``service.max_cells`` cells is refused too. Each user has
``service.daily_quota`` requests per UTC day (HTTP 429 beyond). The answer is
:func:`linkage.disclose.stage.build_table`'s protected, perturbed table; identical requests
are served from memory (cell-key perturbation gives them the same answer anyway).
``research/`` is encrypted at rest: its tables are decrypted with the portal's key once
per file version and kept in memory (:func:`linkage.pseudonymise.store.read_research`),
warmed in the background when the portal starts, so a request does not decrypt.

Every request, answered or refused, is written to the audit log with its parameters and,
when answered, its disclosure decisions: counts of cells by status and of the rules that
fired, never a value.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import duckdb
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from linkage.config import Config
from linkage.db import connect
from linkage.errors import HhlinkError, WorkspaceError
from linkage.keys import MasterKey
from linkage.serve.audit import AuditLog
from linkage.serve.catalogue import TableView, stamp, table_view
from linkage.serve.users import User
from linkage.serve.words import plain_meta

log = logging.getLogger(__name__)

MAX_DIMENSIONS = 3


class Refusal(Exception):
    """A request the builder will not answer: an HTTP status and a message safe to show."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class BuildResult:
    """An answered request: the protected table and what disclosure control did."""

    request: dict
    view: TableView
    decisions: dict
    cached: bool
    quota: dict
    seconds: float


def request_model(config: Config) -> type[BaseModel]:
    """The pydantic model of a request, with the allowed names as enumerations (for the OpenAPI spec)."""
    from linkage.sdc.standard import MEASURES

    dims = tuple(config.disclosure.allowed_dimensions) or ("region",)
    measures = tuple(m for m in config.disclosure.allowed_measures if m in MEASURES) or ("count",)
    return create_model(
        "TableRequest",
        __config__=ConfigDict(extra="forbid", json_schema_extra={
            "example": {"dimensions": [dims[0]], "measure": measures[0]}}),
        dimensions=(list[Literal[dims]], Field(min_length=1, max_length=MAX_DIMENSIONS,
                                               json_schema_extra={"uniqueItems": True},
                                               description="One to three distinct dimensions from "
                                                           "disclosure.allowed_dimensions.")),
        measure=(Literal[measures], Field(measures[0], description="A measure from disclosure.allowed_measures.")),
    )


def decisions(meta: dict) -> dict:
    """What disclosure control did to a table: counts only, never a value."""
    sdc = meta.get("sdc", {})
    lp = sdc.get("lp_audit", {})
    return {"cells": sdc.get("cells"), "status_rows": sdc.get("status_rows", {}),
            "suppressed_cells": sdc.get("suppressed_cells", {}), "rules_fired": sdc.get("rules_fired", {}),
            "lp_audit": {k: lp.get(k) for k in ("all_protected", "whole_table_suppressed", "linear_programs")}}




def _day() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def _seconds_to_midnight() -> int:
    now = time.time()
    return int(86400 - now % 86400) + 1


class Builder:
    """Validates, rations, computes (through the disclosure engine), caches and audits table requests."""

    def __init__(self, workspace: Path | str, config: Config, key: MasterKey, audit: AuditLog):
        self.workspace = Path(workspace)
        self.config = config
        self.key = key
        self.audit = audit
        self.model = request_model(config)
        self._gate = threading.BoundedSemaphore(config.service.builder_concurrency)
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, tuple[TableView, dict]] = OrderedDict()
        self._results: dict[str, OrderedDict[str, TableView]] = {}
        self._sizes: tuple[tuple | None, dict[str, int]] = ((), {})
        self._used = self._quota_from_log()
        # decrypt the research tables once, off the request path (later versions on first use)
        threading.Thread(target=self._warm, name="research-warm", daemon=True).start()

    def _warm(self) -> None:
        from linkage.pseudonymise.store import read_research

        for table in ("cohort", "person"):
            try:
                read_research(self.workspace, self.key, table)
            except Exception:  # noqa: BLE001 - no research/ yet, or a key that cannot read it: a request says so
                return

    # -- quota ---------------------------------------------------------------------------------

    def _quota_from_log(self) -> dict[tuple[str, str], int]:
        # the audit log is the record of requests: today's counted ones survive a restart
        used: dict[tuple[str, str], int] = {}
        entries, _ = self.audit.entries()
        for e in entries:
            if e.get("action") == "builder.request" and e.get("detail", {}).get("quota_counted"):
                k = (e.get("actor", ""), str(e.get("time", ""))[:10])
                used[k] = used.get(k, 0) + 1
        return used

    def quota(self, user: str) -> dict:
        """A user's quota today: ``limit``, ``used``, ``remaining`` and ``resets_in_seconds``."""
        limit = self.config.service.daily_quota
        used = self._used.get((user, _day()), 0)
        return {"limit": limit, "used": used, "remaining": max(0, limit - used),
                "resets_in_seconds": _seconds_to_midnight()}

    def _reserve(self, user: str) -> bool:
        with self._lock:
            k = (user, _day())
            if self._used.get(k, 0) >= self.config.service.daily_quota:
                return False
            self._used[k] = self._used.get(k, 0) + 1
            return True

    def _refund(self, user: str) -> None:
        with self._lock:
            k = (user, _day())
            self._used[k] = max(0, self._used.get(k, 0) - 1)

    # -- validation ----------------------------------------------------------------------------

    def validate(self, raw: object) -> dict:
        """The canonical request (sorted dimensions, measure) or a :class:`Refusal` (422)."""
        if not isinstance(raw, dict):
            raise Refusal(422, "a request is a JSON object: {\"dimensions\": [...], \"measure\": \"...\"}")
        try:
            req = self.model.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "request"
            if first["type"] == "extra_forbidden":
                raise Refusal(422, f"unknown field '{where}': a request has only 'dimensions' and 'measure'") from None
            if first["type"] == "literal_error":
                field = "dimension" if first["loc"][0] == "dimensions" else "measure"
                allowed = (self.config.disclosure.allowed_dimensions if field == "dimension"
                           else self.config.disclosure.allowed_measures)
                raise Refusal(422, f"{where}: {field} not allowed; allowed: {', '.join(allowed)}") from None
            raise Refusal(422, f"{where}: {first['msg']}") from None
        dims = list(req.dimensions)
        if len(set(dims)) != len(dims):
            raise Refusal(422, "dimensions must be distinct")
        request = {"dimensions": sorted(dims), "measure": req.measure}
        cells = self.estimate_cells(request["dimensions"])
        if cells > self.config.service.max_cells:
            raise Refusal(422, f"the table would have about {cells:,} cells; the builder computes at most "
                               f"{self.config.service.max_cells:,} (service.max_cells): choose fewer or coarser "
                               "dimensions")
        return request

    def _category_counts(self) -> dict[str, int]:
        # categories of the dimensions the catalogue leaves open (cohort bands, ethnicity codes)
        research = self.workspace / "research"
        signature = stamp(research / "cohort.parquet")
        if signature == self._sizes[0]:
            return self._sizes[1]
        from linkage.sdc import standard

        sizes: dict[str, int] = {}
        if signature is not None:
            con = connect()
            try:
                sql = standard.population(con, self.workspace, standard.Source((), ("cohort", "ethnicity")), self.config,
                                          self.key)
                n_cohort, n_eth = con.execute(f"select count(distinct cohort), count(distinct ethnicity) from ({sql})"
                                              ).fetchone()
                sizes = {"cohort": int(n_cohort), "ethnicity": int(n_eth)}
            except (duckdb.Error, HhlinkError):   # no research/ yet, or one this key cannot read
                sizes = {}
            finally:
                con.close()
        self._sizes = (signature, sizes)
        return sizes

    def estimate_cells(self, dims: list[str]) -> int:
        """Cells of the requested table, margins included (an upper estimate: one 'Unknown' per level)."""
        from linkage.sdc import standard

        names = [d for d in dims if not (d == "region" and "la" in dims)]
        total = 1
        for name in names:
            d = standard.dimension(name, self.config)
            if d.categories is not None:
                nodes = 1 + sum(len({c[: i + 1] for c in d.categories}) + 1 for i in range(len(d.levels)))
            else:
                nodes = 2 + self._category_counts().get(name, 50)
            total *= nodes
        return total

    # -- answering -----------------------------------------------------------------------------

    def _research_stamp(self) -> tuple:
        research = self.workspace / "research"
        return stamp(research / "cohort.parquet"), stamp(research / "person.parquet")

    def answer(self, user: User, raw: object, via: str, context: dict | None = None) -> BuildResult:
        """Validate, ration and answer one request, and audit it whatever happens.

        Args:
            user: the researcher.
            raw: the request as sent (a dict, from JSON or a form).
            via: ``api`` or ``page`` (recorded in the audit entry).
            context: further parameters for the audit entry (the client address and token id).

        Returns:
            The :class:`BuildResult`.

        Raises:
            Refusal: 422 (invalid or too large), 429 (quota), 503 (no research tables), 500 (the engine
                failed; logged and audited by error class only, never its message).
        """
        params = {"via": via, "request": _safe_params(raw), **(context or {})}
        try:
            request = self.validate(raw)
        except Refusal as r:
            self.audit.append(user.name, user.role, "builder.request", params, "refused",
                              {"status": r.status, "reason": r.message, "quota_counted": False})
            raise
        params["request"] = request
        if not self._reserve(user.name):
            q = self.quota(user.name)
            self.audit.append(user.name, user.role, "builder.request", params, "refused",
                              {"status": 429, "reason": "daily quota reached", "quota_counted": False})
            raise Refusal(429, f"daily quota of {q['limit']} table requests reached; it resets at 00:00 UTC",
                          {"Retry-After": str(q["resets_in_seconds"])})
        t0 = time.perf_counter()
        try:
            view, meta, cached = self._compute(request)
        except Refusal as r:
            self._refund(user.name)
            self.audit.append(user.name, user.role, "builder.request", params, "failed",
                              {"status": r.status, "reason": r.message, "quota_counted": False})
            raise
        except Exception as exc:  # noqa: BLE001 - an engine message could quote a value: only its class is kept
            self._refund(user.name)
            log.error("table request failed: %s", exc.__class__.__name__)
            self.audit.append(user.name, user.role, "builder.request", params, "failed",
                              {"status": 500, "error": exc.__class__.__name__, "quota_counted": False})
            raise Refusal(500, "the table could not be built (internal error); it was not counted") from None
        seconds = time.perf_counter() - t0
        dec = decisions(meta)
        self.audit.append(user.name, user.role, "builder.request", params, "ok",
                          {"table": view.name, "disclosure": dec, "cached": cached, "seconds": round(seconds, 3),
                           "quota_counted": True})
        with self._lock:
            mine = self._results.setdefault(user.name, OrderedDict())
            mine[view.name] = view
            mine.move_to_end(view.name)
            while len(mine) > 20:
                mine.popitem(last=False)
        return BuildResult(request, view, dec, cached, self.quota(user.name), seconds)

    def _compute(self, request: dict) -> tuple[TableView, dict, bool]:
        from linkage.disclose.stage import RequestError, build_table

        key = (json.dumps(request, sort_keys=True), self._research_stamp())
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit[0], hit[1], True
        if key[1][0] is None:
            raise Refusal(503, "no research tables in this workspace yet (run hhlink assemble)")
        with self._gate:
            try:
                pt = build_table(dict(request), self.workspace, self.config, key=self.key)
            except RequestError as exc:
                raise Refusal(422, str(exc)) from None
            except WorkspaceError:
                raise Refusal(503, "no research tables in this workspace yet (run hhlink assemble)") from None
        view = table_view(pt.spec.name, plain_meta(pt.metadata, self.config), pt.frame)
        if self.config.service.builder_cache:
            with self._lock:
                self._cache[key] = (view, pt.metadata)
                while len(self._cache) > self.config.service.builder_cache:
                    self._cache.popitem(last=False)
        return view, pt.metadata, False

    def result(self, user: User, name: str) -> TableView | None:
        """A table this user requested recently (for downloading it again without a new request)."""
        return self._results.get(user.name, {}).get(name)


def _safe_params(raw: object) -> dict | str:
    # what a refused request asked for, bounded, for the audit entry (names only, never long text)
    if not isinstance(raw, dict):
        return f"<{type(raw).__name__}>"
    out: dict = {}
    for k, v in list(raw.items())[:5]:
        key = str(k)[:40]
        if isinstance(v, list):
            out[key] = [str(x)[:40] for x in v[:5]]
        else:
            out[key] = str(v)[:40]
    return out
