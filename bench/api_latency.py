"""POST /runs latency under concurrent clients: uvicorn on loopback, httpx async clients.

    python bench/api_latency.py [--requests 1000] [--concurrency 20] [--workers 1] [--database-url URL]

Starts ``uvicorn service.app:app`` in a subprocess on a free port over a fresh SQLite file (or
``--database-url``), warms it up, then ``--concurrency`` clients send ``--requests`` POST /runs
in total (a 5-trial digits spec), then as many GET /runs/{id}, then POST /runs from one client
(the service time), then POST /runs from ``--concurrency`` clients paced to ``--rate`` requests/s
in total (each request is due at a fixed time; latency counts from that time, so a server that
falls behind is charged for the wait — no coordinated omission). Prints a markdown table of
latency percentiles; the target is a POST /runs p50 of at most 20 ms under the concurrent load.
Back-to-back clients (a closed loop) saturate the server, so their p50 is about
concurrency / throughput (Little's law); the paced row is the latency a client sees at a given load.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"name": "latency", "estimators": ["aqe", "ste"], "bits": [{"w": 1, "a": 1}, {"w": 2, "a": 2}],
        "seeds": [0], "epochs": 2}
TARGET_P50_MS = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(database_url: str, port: int, workers: int) -> subprocess.Popen:
    env = {**os.environ, "DATABASE_URL": database_url, "BITBENCH_API_TOKEN": ""}
    cmd = [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--no-access-log", "--workers", str(workers)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("uvicorn did not start within 60 s")


async def load(client: httpx.AsyncClient, n: int, concurrency: int, send,
               rate: float | None = None) -> tuple[list[float], int, float]:
    """``n`` calls of ``send(client, i)`` from ``concurrency`` workers: (latencies in s, errors, wall s).

    With ``rate``, call i is due at start + i/rate and its latency counts from then.
    """
    latencies: list[float] = []
    errors = 0
    todo = iter(range(n))
    start = time.perf_counter()

    async def worker():
        nonlocal errors
        for i in todo:
            t0 = time.perf_counter()
            if rate:
                t0 = start + i / rate
                await asyncio.sleep(max(0.0, t0 - time.perf_counter()))
            ok = await send(client, i)
            latencies.append(time.perf_counter() - t0)
            errors += not ok

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - t0


def pct(values: list[float], q: int) -> float:
    """The ``q``-th percentile in milliseconds."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000


async def bench(base: str, n: int, concurrency: int, rate: float) -> list[tuple[str, list[float], int, float]]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        ids: list[int] = []

        async def post(c, _i):
            r = await c.post("/runs", json=SPEC)
            if r.status_code == 202:
                ids.append(r.json()["id"])
            return r.status_code == 202

        async def get(c, i):
            r = await c.get(f"/runs/{ids[i % len(ids)]}")
            return r.status_code == 200

        await load(client, min(100, n), concurrency, post)  # warm-up: connections, caches, the DB file
        return [(f"POST /runs, {concurrency} clients", *await load(client, n, concurrency, post)),
                (f"GET /runs/{{id}}, {concurrency} clients", *await load(client, n, concurrency, get)),
                ("POST /runs, 1 client (service time)", *await load(client, min(n, 300), 1, post)),
                (f"POST /runs, {concurrency} clients paced at {rate:.0f} req/s in total",
                 *await load(client, n, concurrency, post, rate=rate))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    parser.add_argument("--rate", type=float, default=100.0, help="offered load of the paced row, requests/s")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bitbench-bench-") as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'bench.sqlite'}"
        port = free_port()
        server = start_server(url, port, args.workers)
        try:
            rows = asyncio.run(bench(f"http://127.0.0.1:{port}", args.requests, args.concurrency, args.rate))
        finally:
            server.terminate()
            server.wait(10)

    backend = url.split(":", 1)[0]
    print(f"\n{args.requests} requests per {args.concurrency}-client row, "
          f"{args.workers} uvicorn worker(s), "
          f"{backend}, {os.cpu_count()} CPUs, Python {platform.python_version()}\n")
    print("| request | p50 ms | p90 ms | p99 ms | max ms | req/s | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, lat, errors, wall in rows:
        print(f"| {name} | {pct(lat, 50):.1f} | {pct(lat, 90):.1f} | {pct(lat, 99):.1f} | {max(lat) * 1000:.1f} "
              f"| {len(lat) / wall:.0f} | {errors} |")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    for name, lat, _, _ in (rows[0], rows[3]):
        p50 = pct(lat, 50)
        print(f"\n{name}: p50 {p50:.1f} ms {'meets' if p50 <= TARGET_P50_MS else 'misses'} "
              f"the {TARGET_P50_MS:.0f} ms target")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
