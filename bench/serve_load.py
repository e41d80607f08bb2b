"""Load benchmark of the portal (``hhlink serve``) on loopback, bounded in count and time.

Starts ``hhlink serve`` (uvicorn) in a subprocess over a scratch workspace that links to a
real workspace's ``research/``, ``published/`` and ``reports/`` (the portal's own users and
audit log go to the scratch folder), then measures:

* published-table requests (``GET /api/tables/{name}/data``, every published table in
  turn, CSV) from keep-alive connections: throughput and latency percentiles
  (targets: >= 500 requests/s, p99 < 50 ms);
* a bad-token flood: 50 connections send wrong secrets for a real token id (each one
  new, the worst case: a scrypt check unless throttled) and malformed tokens as fast as the
  server answers, while a signed-in researcher downloads published tables over two
  connections: the researcher's p95 during the flood (target < 50 ms), the flood's answers
  by status (401, then 429 once throttled), the server's peak memory and the audit lines
  the flood added (refusals are aggregated);
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
TARGETS = {"table_rps": 500.0, "table_p99_ms": 50.0, "builder_p95_s": 1.0, "flood_valid_p95_ms": 50.0}


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


def build_workspace(root: Path, persons: int, seed: int) -> Path:
    """A workspace through every registry stage but evaluate (the portal reads published/ and reports/)."""
    from linkage.stages import STAGES, run_stage

    cfg = load_config(generate={"persons": persons, "seed": seed}, ingest={"data_docs": False},
                      assemble={"data_docs": False})
    for name in (n for n in STAGES if n != "evaluate"):
        t = time.perf_counter()
        run_stage(name, cfg, root)
        print(f"  {name}: {time.perf_counter() - t:.0f}s", flush=True)
    return root


def _scratch(source: Path) -> Path:
    # the portal serves published/ and reports/ only as real folders (never through a link): copy them;
    # research/ is read by the disclosure engine, a link to it will do
    scratch = Path(tempfile.mkdtemp(prefix="hhlink-serve-bench-"))
    for zone in ("published", "reports"):
        if (source / zone).exists():
            shutil.copytree(source / zone, scratch / zone, symlinks=False)
    if (source / "research").exists():
        os.symlink((source / "research").resolve(), scratch / "research")
    return scratch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """A minimal HTTP/1.1 keep-alive client (the load generator must cost less than the server)."""

    def __init__(self, port: int, token: str):
        self.port, self.token = port, token
        self.last_headers: list[bytes] = []

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
        self.last_headers = lines[1:]
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


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


async def flood_load(port: int, pid: int, token: str, tables: list[str], seconds: float, attackers: int,
                     seed: int) -> dict:
    """``attackers`` connections send bad tokens while a researcher downloads tables over two connections."""
    rng = random.Random(seed)
    token_id = token.split("_")[1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    statuses: dict[int, int] = {}
    valid: list[float] = []
    valid_errors = 0
    peak = [_rss_mb(pid)]
    deadline = time.perf_counter() + seconds

    def bad() -> str:
        if rng.random() < 0.2:
            return "not-a-token-" + "".join(rng.choices(alphabet, k=20))
        return f"hhl_{token_id}_" + "".join(rng.choices(alphabet, k=43))

    async def attacker():
        c = None
        while time.perf_counter() < deadline:
            try:
                if c is None:
                    c = await Client(port, bad()).open()
                c.token = bad()
                status, _ = await c.request("GET", "/api/me")
                statuses[status] = statuses.get(status, 0) + 1
            except (OSError, asyncio.IncompleteReadError, ValueError, StopIteration):
                statuses[-1] = statuses.get(-1, 0) + 1
                c = None
        if c is not None:
            c.close()

    async def researcher():
        nonlocal valid_errors
        c = await Client(port, token).open()
        i = 0
        try:
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                status, _ = await c.request("GET", f"/api/tables/{tables[i % len(tables)]}/data?format=csv")
                valid.append(time.perf_counter() - t)
                valid_errors += status != 200
                i += 1
        finally:
            c.close()

    async def sampler():
        while time.perf_counter() < deadline:
            peak[0] = max(peak[0], _rss_mb(pid))
            await asyncio.sleep(0.2)

    rss_before = _rss_mb(pid)
    await asyncio.gather(*(attacker() for _ in range(attackers)), researcher(), researcher(), sampler())
    return {"attackers": attackers, "seconds": seconds, "flood_answers": dict(sorted(statuses.items())),
            "valid_requests": len(valid), "valid_errors": valid_errors,
            "valid_p50_ms": round(_pct(valid, 0.5) * 1e3, 2), "valid_p95_ms": round(_pct(valid, 0.95) * 1e3, 2),
            "valid_p99_ms": round(_pct(valid, 0.99) * 1e3, 2), "rss_before_mb": round(rss_before, 1),
            "rss_peak_mb": round(peak[0], 1)}


async def quiet_valid(port: int, token: str, tables: list[str], seconds: float) -> dict:
    """The same researcher's downloads (two connections) without a flood, for comparison."""
    res = await table_load(port, token, tables, 10**6, 2, seconds)
    return {"valid_p50_ms": res["p50_ms"], "valid_p95_ms": res["p95_ms"], "valid_p99_ms": res["p99_ms"],
            "requests": res["requests"]}


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


def _median(values: list) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


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
                lps.append(doc["disclosure"].get("lp_audit", {}).get("linear_programs"))   # None: not reported
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
            "median_linear_programs": _median([n for n in lps if n is not None]),
            "slowest": [{"seconds": round(s, 2), **r, "cells": c, "linear_programs": n} for s, r, c, n in slowest]}


def run(workspace: Path, args) -> dict:
    """Serve ``workspace`` from a scratch copy and run both loads; returns the figures."""
    from linkage.serve import UserStore

    if not (workspace / "published" / "index.json").exists():
        from linkage.disclose.stage import disclose

        print("publishing the standard tables first (hhlink disclose)", flush=True)
        disclose(load_config(), workspace)
    rows = json.loads((workspace / "research" / "metadata.json").read_text())["rows"]   # kept in clear: counts only
    persons, children = rows["person"], rows["cohort"]
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
        quiet = asyncio.run(quiet_valid(port, token, tables, min(10.0, args.flood_seconds)))
        lines_before = _lines(scratch / "audit" / "log.jsonl")
        flood = asyncio.run(flood_load(port, proc.pid, token, tables, args.flood_seconds, args.attackers, args.seed))
        time.sleep(1.0)
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).close()   # let pending summaries out
        flood["audit_lines_added"] = _lines(scratch / "audit" / "log.jsonl") - lines_before
        flood["audit_refusal_lines"] = _actions(scratch / "audit" / "log.jsonl", lines_before,
                                                ("auth.failed", "request.refused"))
        flood["quiet"] = quiet
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
            "cores": os.cpu_count(), "load_average_at_start": round(load, 2), "published": tab, "flood": flood,
            "builder": bld}


def _actions(path: Path, skip: int, actions: tuple[str, ...]) -> int:
    with open(path, "rb") as fh:
        return sum(1 for i, line in enumerate(fh) if i >= skip and json.loads(line).get("action") in actions)


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            return sum(1 for _ in fh)
    except FileNotFoundError:
        return 0


def report(res: dict) -> str:
    """The results as Markdown, each figure beside its target."""
    tab, bld, fl = res["published"], res["builder"], res["flood"]
    rows = [("published-table requests/s", tab["rps"], f">= {TARGETS['table_rps']:.0f}", tab["rps"] >= TARGETS["table_rps"]),
            ("published-table p99 (ms)", tab["p99_ms"], f"< {TARGETS['table_p99_ms']:.0f}",
             tab["p99_ms"] < TARGETS["table_p99_ms"]),
            (f"table builder p95, cold (s; {res['persons']:,} persons)", bld["cold_p95_s"],
             f"< {TARGETS['builder_p95_s']:.0f}", bld["cold_p95_s"] < TARGETS["builder_p95_s"]),
            ("table builder p95, repeated request (s)", bld["warm_p95_s"], f"< {TARGETS['builder_p95_s']:.0f}",
             bld["warm_p95_s"] < TARGETS["builder_p95_s"]),
            (f"researcher's table p95 during a {fl['attackers']}-connection bad-token flood (ms)", fl["valid_p95_ms"],
             f"< {TARGETS['flood_valid_p95_ms']:.0f}", fl["valid_p95_ms"] < TARGETS["flood_valid_p95_ms"])]
    lines = ["# Portal load (loopback)", "",
             f"Workspace: {res['persons']:,} persons ({res['cohort_children']:,} cohort children), {res['tables']} "
             f"published tables; {res['cores']} cores, load average {res['load_average_at_start']} at the start "
             "(other work on the machine shares the cores).", "",
             "| measure | figure | target | meets |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {m} | {v} | {t} | {'yes' if ok else 'NO'} |" for m, v, t, ok in rows]
    lines += ["", f"Published tables: {tab['requests']:,} requests ({tab['errors']} errors) over {tab['seconds']} s; "
                  f"p50 {tab['p50_ms']} ms, p95 {tab['p95_ms']} ms, max {tab['max_ms']} ms.",
              f"Bad-token flood: {fl['attackers']} connections for {fl['seconds']} s sending wrong secrets for a real "
              f"token id (and malformed tokens) got answers by status {fl['flood_answers']}; meanwhile the researcher's "
              f"{fl['valid_requests']:,} downloads ({fl['valid_errors']} errors) took p50 {fl['valid_p50_ms']} ms, p95 "
              f"{fl['valid_p95_ms']} ms, p99 {fl['valid_p99_ms']} ms (without the flood: p50 {fl['quiet']['valid_p50_ms']}"
              f" ms, p95 {fl['quiet']['valid_p95_ms']} ms); server memory {fl['rss_before_mb']} MB before, "
              f"{fl['rss_peak_mb']} MB at the peak; the flood's refusals took {fl['audit_refusal_lines']} audit lines "
              f"(repeats aggregated), the researcher's downloads the other {fl['audit_lines_added'] - fl['audit_refusal_lines']}.",
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
    ap.add_argument("--attackers", type=int, default=50, help="connections of the bad-token flood")
    ap.add_argument("--flood-seconds", type=float, default=20, help="how long the flood lasts")
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
