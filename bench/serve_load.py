"""Load benchmark of the portal (``hhlink serve``) on loopback, bounded in count and time.

Starts ``hhlink serve`` (uvicorn) in a subprocess over a scratch workspace that links to a
real workspace's ``research/``, ``published/`` and ``reports/`` (the portal's own users and
audit log go to the scratch folder), then measures:

* published-table requests (``GET /api/tables/{name}/data``, every published table in
  turn, CSV) from keep-alive connections: throughput and latency percentiles
  (targets: >= 500 requests/s, p99 < 50 ms);
* table-builder requests (``POST /api/builder``): distinct requests drawn at random
  (seeded) from the allowed dimensions and measures, one at a time, each computed through
  the disclosure engine (cold), then the same requests again (answered from memory)
  (target: p95 < 1 s at 100,000 persons). Requests the service refuses as too large
  (``service.max_cells``) are counted, not timed.

Usage:
    python -m bench.serve_load --workspace WS          # WS holds research/ (published/ is made if missing)
    python -m bench.serve_load --persons 100000        # builds a workspace through every stage first

The key comes from HHLINK_KEY, HHLINK_KEY_FILE or the default key file, as for the stages.
Results: bench/results/serve_load.json and .md, each figure beside its target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from linkage.config import DEFAULT_CONFIG_PATH, load_config

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"table_rps": 500.0, "table_p99_ms": 50.0, "builder_p95_s": 1.0}


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


def build_workspace(root: Path, persons: int, seed: int) -> Path:
    """A workspace through generate, ingest, pseudonymise, link, assemble and disclose."""
    from linkage.disclose.stage import disclose
    from linkage.ingest.stage import ingest
    from linkage.link.stage import link
    from linkage.assemble.stage import assemble
    from linkage.pseudonymise.stage import pseudonymise
    from synthetic_data import generate_population

    cfg = load_config(generate={"persons": persons, "seed": seed}, ingest={"data_docs": False},
                      assemble={"data_docs": False})
    for name, step in (("generate", lambda: generate_population(cfg.generate, root)), ("ingest", lambda: ingest(cfg, root)),
                       ("pseudonymise", lambda: pseudonymise(cfg, root)), ("link", lambda: link(cfg, root)),
                       ("assemble", lambda: assemble(cfg, root)), ("disclose", lambda: disclose(cfg, root))):
        t = time.perf_counter()
        step()
        print(f"  {name}: {time.perf_counter() - t:.0f}s", flush=True)
    return root


def _scratch(source: Path) -> Path:
    scratch = Path(tempfile.mkdtemp(prefix="hhlink-serve-bench-"))
    for zone in ("research", "published", "reports"):
        if (source / zone).exists():
            os.symlink((source / zone).resolve(), scratch / zone)
    return scratch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """A minimal HTTP/1.1 keep-alive client (the load generator must cost less than the server)."""

    def __init__(self, port: int, token: str):
        self.port, self.token = port, token

    async def open(self):
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {self.token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        await self.writer.drain()
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next(int(h.split(b":")[1]) for h in lines[1:] if h.lower().startswith(b"content-length"))
        return status, await self.reader.readexactly(length)

    def close(self):
        self.writer.close()


async def table_load(port: int, token: str, tables: list[str], total: int, concurrency: int, seconds: float) -> dict:
    """``total`` published-table requests over ``concurrency`` connections, stopping after ``seconds``."""
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))
    deadline = time.perf_counter() + seconds

    async def worker():
        nonlocal errors
        c = await Client(port, token).open()
        try:
            for i in counter:
                if time.perf_counter() > deadline:
                    break
                t = time.perf_counter()
                status, _ = await c.request("GET", f"/api/tables/{tables[i % len(tables)]}/data?format=csv")
                latencies.append(time.perf_counter() - t)
                errors += status != 200
        finally:
            c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return {"requests": len(latencies), "errors": errors, "seconds": round(elapsed, 2),
            "rps": round(len(latencies) / elapsed, 1), "p50_ms": round(_pct(latencies, 0.5) * 1e3, 2),
            "p95_ms": round(_pct(latencies, 0.95) * 1e3, 2), "p99_ms": round(_pct(latencies, 0.99) * 1e3, 2),
            "max_ms": round(max(latencies) * 1e3, 2)}


def builder_requests(config, n: int, seed: int) -> list[dict]:
    """``n`` distinct requests: one to three allowed dimensions and an allowed measure, drawn at random."""
    from linkage.sdc.standard import MEASURES

    rng = random.Random(seed)
    dims = list(config.disclosure.allowed_dimensions)
    measures = [m for m in config.disclosure.allowed_measures if m in MEASURES]
    seen, out = set(), []
    while len(out) < n and len(seen) < 10_000:
        k = rng.choice((1, 2, 2, 3))
        req = {"dimensions": sorted(rng.sample(dims, k)), "measure": rng.choice(measures)}
        key = json.dumps(req, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(req)
    return out


async def builder_load(port: int, token: str, requests: list[dict], seconds: float) -> dict:
    """Each request once (cold, one at a time), then the answered ones again (from memory)."""
    c = await Client(port, token).open()
    cold, warm, answered, refused, failed, cells, lps = [], [], [], 0, 0, [], []
    deadline = time.perf_counter() + seconds
    try:
        for req in requests:
            if time.perf_counter() > deadline:
                break
            t = time.perf_counter()
            status, body = await c.request("POST", "/api/builder", json.dumps(req).encode())
            dt = time.perf_counter() - t
            if status == 200:
                cold.append(dt)
                answered.append(req)
                doc = json.loads(body)
                cells.append(doc["disclosure"]["cells"])
                lps.append(doc["disclosure"]["lp_audit"]["linear_programs"])
            elif status == 422:
                refused += 1
            else:
                failed += 1
        for req in answered:
            t = time.perf_counter()
            status, _ = await c.request("POST", "/api/builder", json.dumps(req).encode())
            warm.append(time.perf_counter() - t)
            failed += status != 200
    finally:
        c.close()
    slowest = sorted(zip(cold, answered, cells, lps), key=lambda x: -x[0])[:3]
    return {"answered": len(cold), "refused_too_large": refused, "failed": failed,
            "cold_p50_s": round(_pct(cold, 0.5), 3), "cold_p95_s": round(_pct(cold, 0.95), 3),
            "cold_max_s": round(max(cold), 3) if cold else None, "warm_p95_s": round(_pct(warm, 0.95), 4),
            "median_cells": sorted(cells)[len(cells) // 2] if cells else None,
            "median_linear_programs": sorted(lps)[len(lps) // 2] if lps else None,
            "slowest": [{"seconds": round(s, 2), **r, "cells": c, "linear_programs": n} for s, r, c, n in slowest]}


def run(workspace: Path, args) -> dict:
    """Serve ``workspace`` from a scratch copy and run both loads; returns the figures."""
    import pyarrow.parquet as pq

    from linkage.serve import UserStore

    if not (workspace / "published" / "index.json").exists():
        from linkage.disclose.stage import disclose

        print("publishing the standard tables first (hhlink disclose)", flush=True)
        disclose(load_config(), workspace)
    persons = pq.read_metadata(workspace / "research" / "person.parquet").num_rows
    children = pq.read_metadata(workspace / "research" / "cohort.parquet").num_rows
    scratch = _scratch(workspace)
    cfg_path = scratch / "hhlink.toml"
    # the benchmark's researcher is not rationed: every request is measured
    text, n = re.subn(r"(?m)^daily_quota\s*=\s*\d+", "daily_quota = 1000000", DEFAULT_CONFIG_PATH.read_text())
    cfg_path.write_text(text if n == 1 else text + "\n[service]\ndaily_quota = 1000000\n")
    token = UserStore(scratch).add("bench", "researcher")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "linkage.cli", "serve", "--workspace", str(scratch), "--config",
                             str(cfg_path), "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the portal did not start: {proc.stderr.read().decode()[-500:]}") from None
                time.sleep(0.3)
        tables = json.loads((workspace / "published" / "index.json").read_text())["tables"]
        load = os.getloadavg()[0]
        asyncio.run(table_load(port, token, tables, 200, args.concurrency, 10))          # warm-up
        tab = asyncio.run(table_load(port, token, tables, args.requests, args.concurrency, args.seconds))
        reqs = builder_requests(load_config(cfg_path), args.builder_requests, args.seed)
        bld = asyncio.run(builder_load(port, token, reqs, args.builder_seconds))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(scratch, ignore_errors=True)
    return {"workspace": str(workspace), "persons": persons, "cohort_children": children, "tables": len(tables),
            "cores": os.cpu_count(), "load_average_at_start": round(load, 2), "published": tab, "builder": bld}


def report(res: dict) -> str:
    """The results as Markdown, each figure beside its target."""
    tab, bld = res["published"], res["builder"]
    rows = [("published-table requests/s", tab["rps"], f">= {TARGETS['table_rps']:.0f}", tab["rps"] >= TARGETS["table_rps"]),
            ("published-table p99 (ms)", tab["p99_ms"], f"< {TARGETS['table_p99_ms']:.0f}",
             tab["p99_ms"] < TARGETS["table_p99_ms"]),
            (f"table builder p95, cold (s; {res['persons']:,} persons)", bld["cold_p95_s"],
             f"< {TARGETS['builder_p95_s']:.0f}", bld["cold_p95_s"] < TARGETS["builder_p95_s"]),
            ("table builder p95, repeated request (s)", bld["warm_p95_s"], f"< {TARGETS['builder_p95_s']:.0f}",
             bld["warm_p95_s"] < TARGETS["builder_p95_s"])]
    lines = ["# Portal load (loopback)", "",
             f"Workspace: {res['persons']:,} persons ({res['cohort_children']:,} cohort children), {res['tables']} "
             f"published tables; {res['cores']} cores, load average {res['load_average_at_start']} at the start "
             "(other work on the machine shares the cores).", "",
             "| measure | figure | target | meets |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {m} | {v} | {t} | {'yes' if ok else 'NO'} |" for m, v, t, ok in rows]
    lines += ["", f"Published tables: {tab['requests']:,} requests ({tab['errors']} errors) over {tab['seconds']} s; "
                  f"p50 {tab['p50_ms']} ms, p95 {tab['p95_ms']} ms, max {tab['max_ms']} ms.",
              f"Table builder: {bld['answered']} distinct requests answered (median {bld['median_cells']} cells and "
              f"{bld['median_linear_programs']} linear programs in the secondary-suppression audit), "
              f"{bld['refused_too_large']} refused as larger than service.max_cells, {bld['failed']} failed; cold p50 "
              f"{bld['cold_p50_s']} s, max {bld['cold_max_s']} s. Slowest: "
              + "; ".join(f"{s['dimensions']} {s['measure']} {s['seconds']} s ({s['cells']} cells, {s['linear_programs']} LPs)"
                          for s in bld["slowest"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--workspace", type=Path, help="a workspace with research/ (and published/)")
    where.add_argument("--persons", type=int, help="build a workspace of this many persons first")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--requests", type=int, default=6000, help="published-table requests (bounded)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30, help="time bound of the published-table load")
    ap.add_argument("--builder-requests", type=int, default=40)
    ap.add_argument("--builder-seconds", type=float, default=300, help="time bound of the table-builder load")
    ap.add_argument("--out", type=Path, default=RESULTS / "serve_load")
    args = ap.parse_args(argv)
    workspace = args.workspace
    if workspace is None:
        workspace = Path(tempfile.mkdtemp(prefix=f"hhlink-bench-{args.persons}-"))
        print(f"building a {args.persons:,}-person workspace in {workspace}", flush=True)
        build_workspace(workspace, args.persons, args.seed)
    res = run(workspace, args)
    md = report(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
