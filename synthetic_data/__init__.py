"""The synthetic population generator: landing extracts plus the ground truth.

Example:
    >>> from linkage.config import load_config
    >>> from synthetic_data import generate_population
    >>> summary = generate_population(load_config(generate={"persons": 2000}).generate, "/tmp/ws")
    >>> sorted(summary["rows"])
    ['benefits', 'earnings', 'education']
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from linkage.config import GenerateConfig
from linkage.workspace import Workspace, atomic_path
from synthetic_data.corruptions import BIT, CORRUPTIONS
from synthetic_data.deliveries import arrival_months, split
from synthetic_data.economy import INCOME_BENEFITS, simulate_economy
from synthetic_data.extracts import Extract, Shared, benefits, earnings, education
from synthetic_data.population import KIND_NAMES, ROLE_NAMES, simulate_population
from synthetic_data.reference import ETHNICITIES, load_names, load_places

__all__ = ["generate", "generate_population"]


def _return_freed_memory_to_os() -> None:
    """Keep glibc from hoarding freed arrays: a fixed mmap threshold returns big blocks on free.

    glibc raises its mmap threshold after large frees, so later big numpy arrays land on
    the heap and their memory is never given back; at 1M persons that cost gigabytes of
    peak memory.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)   # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):
        pass


def _peak_gb() -> float:
    rss = [l for l in open("/proc/self/status") if l.startswith("VmRSS")]
    log.debug("rss now %s arrow %.0f MB pool %s", rss[0].split()[1] if rss else "?", pa.total_allocated_bytes() / 1e6, pa.default_memory_pool().backend_name)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
log = logging.getLogger(__name__)


def _write_extract(ext: Extract, folder: Path, fmt: str, arrivals: list | None = None) -> Path:
    """Write an extract a batch at a time, so its strings never all sit in memory at once.

    With ``arrivals`` (a list), the arrival month of every row is appended to it.
    """
    final = folder / f"{ext.source}.{fmt}"
    with atomic_path(final) as tmp:
        writer = None
        try:
            for batch in ext.batches():
                if arrivals is not None:
                    arrivals.append(arrival_months(ext.source, batch))
                if writer is None:
                    writer = (pacsv.CSVWriter(tmp, batch.schema, write_options=pacsv.WriteOptions(quoting_style="needed"))
                              if fmt == "csv" else pq.ParquetWriter(tmp, batch.schema, compression="zstd"))
                writer.write_batch(batch)
        finally:
            if writer is not None:
                writer.close()
    return final


def _pq(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def generate(config, workspace: Path | str, key=None) -> dict:
    """The ``generate`` stage: :func:`generate_population` with the stage signature (no key used).

    Args:
        config: the whole hhlink configuration (``config.generate`` is read).
        workspace: the workspace folder.
        key: unused; present so every stage has one signature.
    """
    return generate_population(config.generate, workspace)


def generate_population(cfg: GenerateConfig, workspace: Path | str) -> dict:
    """Simulate the population and write ``landing/`` and ``truth/`` in the workspace.

    Args:
        cfg: the generator settings (``Config.generate``).
        workspace: the workspace folder (created if missing).

    Returns:
        A summary: rows per extract, persons, households, timings in seconds and files.
    """
    ws = Workspace(workspace).ensure()
    _return_freed_memory_to_os()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    places, names = load_places(), load_names()
    pop, facts = simulate_population(cfg, places, names)
    timings["population"] = time.perf_counter() - t0
    log.info("population simulated: peak %.2f GB", _peak_gb())
    t = time.perf_counter()
    eco = simulate_economy(cfg, pop, facts, len(places.la_code))
    timings["economy"] = time.perf_counter() - t
    log.info("economy simulated: peak %.2f GB", _peak_gb())
    sh = Shared(pop, names)
    summary: dict = {"persons": pop.n, "households": int(len(np.unique(pop.hy_hh))) if len(pop.hy_hh) else 0,
                     "rows": {}, "files": {}, "format": cfg.format, "seed": cfg.seed}
    upn_of_person = None
    arrivals: dict[str, tuple[Path, list]] = {}
    with ws.publish_dir("landing") as landing, ws.publish_dir("truth") as truth, \
            _TruthRows(truth) as truth_rows, \
            (ws.publish_dir("deliveries") if cfg.deliveries else contextlib.nullcontext()) as deliveries:
        for source in ("education", "benefits", "earnings"):
            t = time.perf_counter()
            if source == "education":
                ext, upn_of_person = education(sh, eco, places, cfg)
            else:
                ext = benefits(sh, eco, cfg) if source == "benefits" else earnings(sh, eco, cfg)
            arrivals[source] = (None, [] if cfg.deliveries else None)
            path = _write_extract(ext, landing, cfg.format, arrivals[source][1])
            arrivals[source] = (path, arrivals[source][1])
            summary["rows"][source] = ext.n
            summary["files"][source] = path.name
            truth_rows.write(source, ext.truth)
            del ext
            timings[source] = time.perf_counter() - t
            log.info("%s written: peak %.2f GB", source, _peak_gb())
        t = time.perf_counter()
        _write_truth(truth, cfg, pop, eco, places, upn_of_person, summary)
        timings["truth"] = time.perf_counter() - t
        if cfg.deliveries:
            t = time.perf_counter()
            index = split(landing, deliveries, {s: (p, np.concatenate(m)) for s, (p, m) in arrivals.items()},
                          cfg.deliveries)
            summary["deliveries"] = [d["month"] for d in index["deliveries"]]
            summary["history_rows"] = index["history_rows"]
            timings["deliveries"] = time.perf_counter() - t
    if not cfg.deliveries:
        shutil.rmtree(ws.zone("deliveries"), ignore_errors=True)    # none from an earlier generate
    timings["total"] = time.perf_counter() - t0
    summary["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    log.info("generated %d persons: %s", pop.n, summary["rows"])
    return summary


class _TruthRows:
    """Streams every source's truth rows, and the long form of their corruptions, to parquet."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.rows: pq.ParquetWriter | None = None
        self.long: pq.ParquetWriter | None = None

    def __enter__(self) -> _TruthRows:
        return self

    def write(self, source: str, truth: pa.Table) -> None:
        table = pa.table({"source": pa.array([source] * truth.num_rows, pa.string())
                          if truth.num_rows < 1000 else _constant(source, truth.num_rows).cast(pa.string()),
                          **{k: truth[k] for k in truth.column_names}})
        if self.rows is None:
            self.rows = pq.ParquetWriter(self.folder / "source_rows.parquet", table.schema, compression="zstd")
        self.rows.write_table(table)
        flags = truth["corruptions"].to_numpy()
        for name in CORRUPTIONS:
            hit = np.nonzero(flags & BIT[name])[0]
            part = pa.table({"source": pa.array([source] * len(hit), pa.string()),
                             "record_id": truth["record_id"].take(pa.array(hit)),
                             "corruption": pa.array([name] * len(hit), pa.string())})
            if self.long is None:
                self.long = pq.ParquetWriter(self.folder / "corruptions.parquet", part.schema, compression="zstd")
            self.long.write_table(part)

    def __exit__(self, *exc) -> None:
        for w in (self.rows, self.long):
            if w is not None:
                w.close()


def _constant(value: str, n: int) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value]))


def _dict(labels, idx: np.ndarray) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(np.asarray(idx, dtype=np.int32)), pa.array(list(labels)))


def _write_truth(folder: Path, cfg: GenerateConfig, pop, eco, places, upn_of_person, summary) -> None:
    vocab = pa.array(pop.vocab, type=pa.string())

    def names(ids):
        return vocab.take(pa.array(ids, mask=ids < 0, type=pa.int32()))

    middle = pa.compute.utf8_trim_whitespace(pa.compute.binary_join_element_wise(names(pop.middle1), names(pop.middle2), " ", null_handling="replace", null_replacement=""))
    middle = pa.compute.if_else(pa.compute.is_null(names(pop.middle1)), pa.nulls(pop.n, pa.string()), middle)
    by = pop.dob.astype("datetime64[Y]").astype(np.int64) + 1970
    upn = upn_of_person
    _pq(pa.table({
        "person_id": np.arange(pop.n), "kind": np.array(KIND_NAMES)[pop.kind], "sex": np.where(pop.sex == 1, "F", "M"),
        "dob": pa.array(pop.dob, type=pa.date32()), "birth_year": by,
        "ethnicity": np.array([e[0] for e in ETHNICITIES])[pop.ethnicity], "family_id": pop.family,
        "forename": names(pop.forename), "middle_names": middle, "surname": names(pop.surname_a),
        "surname_after_change": names(pop.surname_b),
        "surname_change_year": pa.array(pop.surname_change_year, mask=pop.surname_change_year == 9999),
        "hyphenated_surname": pop.hyphenated, "nino": pop.nino,
        "upn": upn,
    }), folder / "persons.parquet")
    _pq(pa.table({
        "person_id": pop.py_person, "year": pop.py_year, "household_id": pop.py_hh,
        "role": _dict(ROLE_NAMES, pop.py_role), "address_id": pop.py_addr,
        "paye_pay": eco.py_pay, "employments": eco.py_jobs,
    }), folder / "person_years.parquet")
    _pq(pa.table({
        "address_id": np.arange(len(pop.addr_hh), dtype=np.int32), "household_id": pop.addr_hh,
        "la_code": _dict(places.la_code, pop.addr_la), "postcode": pop.addr_postcode, "address_line": pop.addr_line,
    }), folder / "addresses.parquet")
    _pq(pa.table({
        "household_id": pop.hy_hh, "year": pop.hy_year, "address_id": pop.hy_addr,
        "la_code": _dict(places.la_code, pop.addr_la[pop.hy_addr]),
        "region_code": _dict(places.region_code, pop.addr_la[pop.hy_addr]), "moved": pop.hy_moved,
        "paye_income": eco.hy_paye, "other_income": eco.hy_other, "equivalised_income": eco.hy_equiv,
        "income_benefit": pa.DictionaryArray.from_arrays(
            pa.array(eco.hy_benefit.astype(np.int32), mask=eco.hy_benefit < 0), pa.array(list(INCOME_BENEFITS))),
        "child_benefit": eco.hy_cb, "fsm": eco.hy_fsm,
    }), folder / "household_years.parquet")
    _pq(pa.table({"parent_id": pop.pc_parent, "child_id": pop.pc_child,
                  "relation": np.array(["birth", "step"])[pop.pc_kind]}), folder / "parent_child.parquet")
    kids = np.nonzero(pop.kind == 2)[0]
    _pq(pa.table({
        "person_id": kids, "birth_year": by[kids],
        "parental_log_earnings_10_16": pa.array(eco.child_x[kids], mask=np.isnan(eco.child_x[kids])),
        "years_observed_10_16": eco.child_x_years[kids],
        "la_code_at_16": places.la_code[np.maximum(eco.child_la16[kids], 0)],
    }), folder / "children.parquet")
    _pq(pa.table({"la_code": places.la_code, "la_name": places.la_name, "region_code": places.region_code,
                  "parent_pay_effect": eco.la_delta, "child_adult_pay_effect": eco.la_gamma}),
        folder / "la_effects.parquet")
    planted = {
        "generator_config": cfg.model_dump(mode="json"),
        "ige": cfg.ige,
        "ige_definition": ("within-birth-cohort OLS slope of log(mean PAYE pay at ages 25-30) on "
                           "children.parental_log_earnings_10_16 (log mean PAYE earnings of the parents the "
                           "child lived with at ages 10-16, years inside the window)"),
        "corruption_bits": BIT,
        "persons": summary["persons"],
        "rows": summary["rows"],
        "years": [cfg.start_year, cfg.end_year],
        "tables": {
            "source_rows": "every landing row: source, record_id, true person and household, year, applied and eligible corruption bitmasks",
            "corruptions": "one row per applied corruption (source, record_id, corruption)",
            "persons": "every person's true identity",
            "person_years": "household membership by year, with address id and PAYE pay",
            "addresses": "address spells: household, LA, postcode and address line",
            "household_years": "household income, benefits and FSM by year",
            "parent_child": "true parent-child relations (birth and step)",
            "children": "founding children's planted-link inputs",
            "la_effects": "planted local-authority effects on log pay",
        },
    }
    with atomic_path(folder / "planted.json") as tmp:
        tmp.write_text(json.dumps(planted, indent=2, sort_keys=True))
