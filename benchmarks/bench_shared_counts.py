"""The cost of counting a request in Redis (kimi_rotator/shared_counts.py): one acquire and its release, on loopback.

Run: python benchmarks/bench_shared_counts.py [--requests 5000] [--concurrency 1,16]   (a few seconds)

Starts its own redis-server (no persistence) on a free loopback port. Sequential: each request awaits its acquire
(the latency a request sees before it is sent), then its release is sent and awaited (in the proxy the writer task
sends it, and the request does not wait): a round trip is both scripts. Concurrent: N
clients at once, the figure per acquire and the throughput of acquire+release pairs.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

from kimi_rotator.models import Surface
from kimi_rotator.shared_counts import SharedCounts

GROUP = (Surface.MOONSHOT_AI, "uid:bench")


def start_redis(workdir: str) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", workdir], stdout=subprocess.DEVNULL)
    for _ in range(500):
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            return proc, port
        except OSError:
            time.sleep(0.01)
    proc.kill()
    raise SystemExit("redis-server did not start")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def sequential(counts: SharedCounts, n: int) -> list[float]:
    took = []
    for _ in range(n):
        started = time.perf_counter()
        got = await counts.acquire(GROUP, (1, 10**9))
        assert got.lease_id is not None, "refused: the previous release has not reached Redis"
        counts.release(got.lease_id)
        await counts._send_releases()  # the writer task's call, awaited here: the release's round trip too
        took.append(time.perf_counter() - started)
    return took


async def concurrent(counts: SharedCounts, n: int, clients: int) -> tuple[list[float], float]:
    took: list[float] = []

    async def client() -> None:
        for _ in range(n // clients):
            started = time.perf_counter()
            got = await counts.acquire(GROUP, (clients, 10**9))
            took.append(time.perf_counter() - started)
            if got.lease_id is not None:
                counts.release(got.lease_id)
            await asyncio.sleep(0)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return took, len(took) / (time.perf_counter() - started)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        proc, port = start_redis(workdir)
        try:
            counts = SharedCounts.from_url(f"redis://127.0.0.1:{port}/0", "bench:", "bench")
            await sequential(counts, 200)  # warm up: scripts loaded, connections open
            pings = []
            for _ in range(args.requests):
                started = time.perf_counter()
                await counts.client.ping()
                pings.append(time.perf_counter() - started)
            print(f"PING through redis-py asyncio (the floor): p50 {pct(pings, 50) * 1e3:.3f} ms  "
                  f"p99 {pct(pings, 99) * 1e3:.3f} ms")
            took = await sequential(counts, args.requests)
            print(f"sequential acquire+release round trip, {args.requests} requests: "
                  f"p50 {pct(took, 50) * 1e3:.3f} ms  p99 {pct(took, 99) * 1e3:.3f} ms  "
                  f"mean {statistics.fmean(took) * 1e3:.3f} ms")
            for clients in (int(c) for c in args.concurrency.split(",")):
                took, rate = await concurrent(counts, args.requests, clients)
                print(f"{clients:3d} clients: acquire p50 {pct(took, 50) * 1e3:.3f} ms  "
                      f"p99 {pct(took, 99) * 1e3:.3f} ms  {rate:,.0f} acquire+release/s")
            await counts.aclose()
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", default="1,16")
    asyncio.run(main(parser.parse_args()))
