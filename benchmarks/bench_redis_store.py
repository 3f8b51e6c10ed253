"""Loopback benchmark: what the Redis store costs `kimi-rotate proxy` against the SQLite store (issue 11, section 4).

One run starts its own TLS upstream and load generator (bench_proxy.py's, each in its own process), a real
redis-server on loopback (no persistence, an ACL user, as tests/redis_server.py starts it), and per round three fresh
proxies side by side: a stock mitmdump (the baseline), `kimi-rotate proxy` on its SQLite store and `kimi-rotate
proxy --set kimi_store=redis://…` on an emptied Redis; the load generator alternates short slices between them, so
background load hits all alike. Prints per proxy and phase the throughput and the p50 / p99 latency of a request
(medians over rounds), then Redis against SQLite paired within each round: the differences in ms and the ratios.
Target (the issue): the Redis store costs <= 0.3 ms p50 and <= 10% throughput. Nothing leaves 127.0.0.1.

    python benchmarks/bench_redis_store.py [--quick] [--rounds N] [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_proxy, run as a script or imported
import bench_proxy as bp

CONFIGS = ("stock", "sqlite", "redis")
LABELS = {"stock": "a stock mitmdump", "sqlite": "b kimi-rotate proxy, SQLite", "redis": "c kimi-rotate proxy, Redis"}
PHASES = (("json_c1", False, 1), ("json_c10", False, 10), ("sse_c10", True, 10))
P50_TARGET_MS, THROUGHPUT_TARGET = 0.3, 0.90


def loadgen_main(targets: dict[str, bp.Target], plan: dict[str, int], out: Connection) -> None:
    """Every phase against every target in alternating slices (bench_proxy's phases, with p99 kept)."""
    async def run() -> dict[str, dict[str, dict[str, float]]]:
        for t in targets.values():  # warm up: certificates, connection pools, caches
            await bp.phase(t, False, 10, plan["warmup"], bp.Samples())
        res: dict[str, dict[str, dict[str, float]]] = {name: {} for name in targets}
        names = list(targets)
        for ph, stream, conc in PHASES:
            acc = {name: bp.Samples() for name in names}
            for i in range(bp.SLICES):
                for name in names[i % len(names):] + names[:i % len(names)]:
                    await bp.phase(targets[name], stream, conc, -(-plan[ph] // bp.SLICES), acc[name])
            for name in names:
                res[name][ph] = {**acc[name].summary(stream), "p99_ms": bp.pct(acc[name].lat, 99) * 1e3}
        return res

    out.send(asyncio.run(run()))


def run_round(work: Path, up_port: int, ca: Path, redis_url: str, flush: Any, plan: dict[str, int],
              timeout: float, commands: dict[str, str]) -> Any:
    targets: dict[str, bp.Target] = {}
    procs = []
    flush()  # every round's Redis store starts empty, as its SQLite one does
    try:
        for kind in CONFIGS:
            proc, targets[kind], cmd = bp.start_proxy("stock" if kind == "stock" else "slim", work / kind, up_port,
                                                      ca, store_url=redis_url if kind == "redis" else None)
            procs.append(proc)
            commands.setdefault(kind, cmd)
        return bp.answer(*bp.spawn(loadgen_main, targets, plan), timeout)
    except RuntimeError as e:
        logs = "".join(f"\n{p}:\n{p.read_text()[-1500:]}" for p in work.glob("*/proxy.log"))
        raise RuntimeError(f"{e}{logs}") from None
    finally:
        for proc in procs:
            bp.stop_proxy(proc)


def report(rounds: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    lines = ["", f"{'(medians over rounds)':30}" + "".join(
        f"{ph + ' ' + h:>16}" for ph, _, _ in PHASES for h in ("req/s", "p50 ms", "p99 ms"))]
    medians = {cfg: {f"{ph}.{m}": statistics.median(bp.val(r, cfg, f"{ph}.{m}") for r in rounds)
                     for ph, _, _ in PHASES for m in ("rps", "p50_ms", "p99_ms")} for cfg in CONFIGS}
    for cfg in CONFIGS:
        lines.append(f"{LABELS[cfg]:30}" + "".join(f"{v:16.2f}" for v in medians[cfg].values()))
    lines += ["", f"{'Redis against SQLite, paired per round':40}{'value':>10}{'target':>14}{'per round':>30}"]
    checks: dict[str, Any] = {}
    for ph, _, _ in PHASES:
        rows = ((f"{ph}: p50 added (ms)", "p50_ms", "diff", P50_TARGET_MS if ph == "json_c1" else None),
                (f"{ph}: p99 added (ms)", "p99_ms", "diff", None),
                (f"{ph}: throughput ratio", "rps", "ratio", THROUGHPUT_TARGET),
                (f"{ph}: p50 ratio", "p50_ms", "ratio", None))
        for label, metric, kind, target in rows:
            key = f"{ph}.{metric}"
            per_round = [bp.val(r, "redis", key) - bp.val(r, "sqlite", key) if kind == "diff"
                         else bp.val(r, "redis", key) / bp.val(r, "sqlite", key) for r in rounds]
            v = statistics.median(per_round)
            met = None if target is None else v <= target if kind == "diff" else v >= target
            checks[label] = {"value": v, "per_round": per_round, "target": target, "met": met}
            tgt = "" if target is None else f"{'<=' if kind == 'diff' else '>='}{target:.2f} {'ok' if met else 'MISS'}"
            lines.append(f"{label:40}{v:10.3f}{tgt:>14}{' '.join(f'{x:.3f}' for x in per_round):>30}")
    lines += ["", "stock mitmdump is the floor: the cost of kimi-rotate itself is b - a, the Redis store's c - b."]
    errors = sum(int(p.get("errors", 0)) for r in rounds for c in r.values() for p in c.values())
    lines.append(f"failed requests: {errors}")
    return lines, {"medians": medians, "checks": checks, "errors": errors}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round, fewer requests (about 30 s)")
    ap.add_argument("--rounds", type=int, help="rounds, each with fresh proxies and stores (default 3, quick 1)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    rounds_n = max(1, min(9, args.rounds or (1 if args.quick else 3)))
    plan = ({"warmup": 100, "json_c1": 300, "json_c10": 600, "sse_c10": 60} if args.quick else
            {"warmup": 200, "json_c1": 800, "json_c10": 2000, "sse_c10": 120})
    sys.path.insert(0, str(bp.ROOT))
    import mitmproxy.version

    from kimi_rotator.store_redis import redacted
    from tests.certs import make_test_pki
    from tests.redis_server import RedisServer

    load_before = os.getloadavg()[0]
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    machine = {"nproc": os.cpu_count(), "python": platform.python_version(), "mitmproxy": mitmproxy.version.VERSION,
               "redis": next((w.removeprefix("v=") for w in redis_version if w.startswith("v=")), "?"),
               "platform": platform.platform()}
    command = shlex.join([sys.executable, *sys.argv])
    print(f"machine: nproc {machine['nproc']}, Python {machine['python']}, mitmproxy {machine['mitmproxy']}, "
          f"redis-server {machine['redis']}, {machine['platform']}\ncommand: {command}\n"
          f"plan: {rounds_n} round(s) x {plan}", flush=True)
    rounds: list[dict[str, Any]] = []
    commands: dict[str, str] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kimi-bench-redis-") as tmp, \
            RedisServer(Path(tmp) / "redis", username="kimi") as redis:
        pki = make_test_pki(Path(tmp) / "pki")
        upstream, port_pipe = bp.spawn(bp.upstream_main, str(pki.server_chain), str(pki.server_key), 5, 0.02)
        try:
            up_port = bp.answer(upstream, port_pipe, 15)
            for i in range(rounds_n):
                rounds.append(run_round(Path(tmp) / f"round{i}", up_port, pki.ca_cert, redis.url, redis.flushall,
                                        plan, 300.0, commands))
                print(f"round {i + 1}/{rounds_n} done at {time.monotonic() - started:.0f} s", flush=True)
        finally:
            upstream.terminate()
            upstream.join(5)
        shown = {kind: cmd.replace(redis.url, redacted(redis.url)) for kind, cmd in commands.items()}
    print("\nproxies (round 1), all against the same upstream, clients CONNECT api.kimi.com:443 through each:")
    print("\n".join(f"  {kind}: {cmd}" for kind, cmd in shown.items()))
    lines, summary = report(rounds)
    load_after = os.getloadavg()[0]
    machine["loadavg"] = [load_before, load_after]
    lines.append(f"load average before / after: {load_before:.2f} / {load_after:.2f}"
                 + (": other work was running, absolute numbers are noisy; ratios are paired"
                    if max(load_before, load_after) > 1 else ""))
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "command": command, "plan": plan,
                                         "proxy_commands": shown, "rounds": rounds, **summary}, indent=2))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
