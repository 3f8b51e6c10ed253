"""Benchmarks for the two cores: engine.select in pools of 10 to 1,000 keys, and the store's write rate.

Run: python benchmarks/bench_engine.py [--sizes 10,50,200,1000] [--no-store]   (about 25 s; prints small tables)

Selection is timed with timeit on a ready Roster (what the addon holds in memory), per strategy and pool size:
  current fine    the current key is healthy and eligible (the usual request)
  current cools   the current key is cooling, so the engine looks for another
  rotate          `kimi-rotate rotate`: the current key is left out
  most cooling    every key but one is cooling
  busy pool       the current key cools and every other key is at full health and was used in the last hour, so
                  all of them score within one point of the best
twice: just after the index behind selection (kimi_rotator/roster.py) was built, and when it is about to be rebuilt
(its bounds are loosest then). Then what the index costs to build and to keep current, and what the proxy's check
for CLI commands costs on each pick (LivePool.catch_up), with nothing new and right after a command.
The store is timed with writer processes that record outcomes through Store.record in batches, as the proxy does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Sequence
from pathlib import Path

from kimi_rotator import engine
from kimi_rotator.models import KeyRecord, Outcome, OutcomeKind, PoolSettings, Secret, Strategy, Surface
from kimi_rotator.pool import LivePool
from kimi_rotator.roster import RERANK_AFTER, Roster
from kimi_rotator.store import NewKey
from kimi_rotator.store_sqlite import SqliteStore

NOW = 1_750_000_000.0
SIZES = (10, 50, 200, 1000)


def roster(n: int, cooling: set[int], busy: bool = False) -> Roster:
    """n keys of one surface with spread-out healths and idle times; `busy`: every key at full health and used in
    the last hour, so that all scores sit within one point of the best."""
    keys = [
        KeyRecord(
            id=i + 1,
            secret=Secret(f"sk-kimi-bench{i:020d}"),
            fingerprint=f"{i:010x}",
            name=f"key {i}",
            surface=Surface.KIMI_CODE,
            account=f"acct-{i // 4}",
            added_at=NOW - 86_400,
            last_used=NOW - ((i % 60) if busy else (i % 97)) * 60.0,
            health=100.0 if busy else 60.0 + (i % 41),
            health_at=NOW - (i % 13) * 600.0,
            cooldown_until=NOW + 60 if i in cooling else None,
        )
        for i in range(n)
    ]
    return Roster(keys)


def time_select(r: Roster, settings: PoolSettings, forced: bool, built_at: float) -> float:
    """Best-of-5 microseconds per engine.select call at NOW, on an index built at `built_at`."""
    engine.select(r, settings, built_at, surface=Surface.KIMI_CODE, forced=forced)
    result = engine.select(r, settings, NOW, surface=Surface.KIMI_CODE, forced=forced)
    assert isinstance(result, engine.Selection), result
    timer = timeit.Timer(lambda: engine.select(r, settings, NOW, surface=Surface.KIMI_CODE, forced=forced))
    number = max(int(0.04 / (timer.timeit(10) / 10)), 1)  # about 40 ms a round
    return min(timer.repeat(repeat=5, number=number)) / number * 1e6


# name, which keys cool (of n, current key at n // 2), rotate?, busy pool?
CASES: list[tuple[str, Callable[[int], set[int]], bool, bool]] = [
    ("current fine", lambda n: set(), False, False),
    ("current cools", lambda n: {n // 2}, False, False),
    ("rotate", lambda n: set(), True, False),
    ("most cooling", lambda n: set(range(n)) - {n // 2 - 1}, False, False),  # the one free key is read last
    ("busy pool", lambda n: {n // 2}, False, True),
]


def bench_select(sizes: Sequence[int], index_age: float) -> None:
    print(f"engine.select, index {index_age:.0f} s old (µs per selection, best of 5)")
    print(f"{'strategy':<14}{'keys':>6}" + "".join(f"{name:>15}" for name, _, _, _ in CASES) + f"{'worst':>9}")
    for strategy in Strategy:
        for n in sizes:
            settings = PoolSettings(strategy=strategy, active_key_id=n // 2 + 1)
            row = [time_select(roster(n, cooling(n), busy), settings, forced, NOW - index_age)
                   for _, cooling, forced, busy in CASES]
            print(f"{strategy.value:<14}{n:>6}" + "".join(f"{us:>15.1f}" for us in row) + f"{max(row):>9.1f}")


def bench_index_upkeep(sizes: Sequence[int]) -> None:
    """What the index costs: building it (the first search on a roster the pool has just loaded) and keeping it
    current as each outcome replaces a key (apply_outcome + with_updates, as the pool runs them)."""
    settings = PoolSettings(strategy=Strategy.HEALTH_BASED)
    outcome = Outcome(kind=OutcomeKind.SUCCESS, latency_ms=5.0)

    def per_outcome(r: Roster, n: int) -> float:
        t = time.perf_counter()
        for i in range(2000):
            r = r.with_updates(engine.apply_outcome(r, (i * 7) % n + 1, outcome, NOW + i))
        return (time.perf_counter() - t) / 2000 * 1e6

    print(f"{'keys':>6} {'index build ms':>15} {'outcome µs':>11} {'(no index)':>11}")
    for n in sizes:
        builds = []
        for r in [roster(n, set()) for _ in range(20)]:
            t = time.perf_counter()
            engine.select(r, settings, NOW, surface=Surface.KIMI_CODE, forced=True)
            builds.append(time.perf_counter() - t)
        indexed = roster(n, set())
        engine.select(indexed, settings, NOW, surface=Surface.KIMI_CODE, forced=True)
        print(f"{n:>6} {statistics.median(builds) * 1e3:>15.3f} {per_outcome(indexed, n):>11.1f} "
              f"{per_outcome(roster(n, set()), n):>11.1f}")


# A proxy's writer process: outcomes batched through Store.record, timing each transaction.
WRITER = r"""
import json, sys, time
from collections.abc import Callable, Sequence
from pathlib import Path
from kimi_rotator.models import Outcome, OutcomeKind
from kimi_rotator.store import Attempt
from kimi_rotator.store_sqlite import SqliteStore

home, wid, count, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ids = json.loads(sys.argv[5])
KINDS = [OutcomeKind.SUCCESS, OutcomeKind.SUCCESS, OutcomeKind.SUCCESS, OutcomeKind.RATE_LIMITED]
store = SqliteStore(home)
print("ready", flush=True)
sys.stdin.readline()
waits = []
start = time.perf_counter()
for first in range(0, count, batch):
    attempts = []
    for j in range(first, min(first + batch, count)):
        kind = KINDS[(wid + j) % len(KINDS)]
        attempts.append(Attempt(ids[j % len(ids)], Outcome(kind=kind, latency_ms=float(j % 50)), time.time()))
    t = time.perf_counter()
    store.record(attempts)
    waits.append(time.perf_counter() - t)
print(json.dumps({"waits": waits, "elapsed": time.perf_counter() - start}), flush=True)
"""


def bench_catch_up() -> None:
    print()
    print("LivePool.catch_up before each pick: nothing changed (µs, best of 5 × 20,000) / after a command (ms, median)")
    for size in (10, 200, 1000):
        with tempfile.TemporaryDirectory() as tmp:
            home = Path(tmp) / "home"
            mine, cli = SqliteStore(home), SqliteStore(home)
            added, _ = cli.add_keys(
                [NewKey(secret=f"sk-kimi-bench{i:020d}", surface=Surface.KIMI_CODE) for i in range(size)], NOW
            )
            pool = LivePool(mine)  # not started: catch_up alone reads the store
            idle_us = min(timeit.repeat(pool.catch_up, number=20_000, repeat=5)) / 20_000 * 1e6
            after: list[float] = []
            for i in range(20):
                cli.use_key(added[i % size].id)
                started = time.perf_counter()
                pool.catch_up()
                after.append(time.perf_counter() - started)
            assert pool.settings.active_key_id == added[19 % size].id
            mine.close()
            cli.close()
        print(f"{size:>5} keys: {idle_us:6.2f} µs / {statistics.median(after) * 1e3:6.2f} ms")


def bench_store(writers: int, per_writer: int, batch: int, pool_size: int) -> tuple[float, float, float, float]:
    """(outcomes/s, p50 ms, p99 ms, max ms) for `writers` processes writing at once."""
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        store = SqliteStore(home)
        added, _ = store.add_keys(
            [NewKey(secret=f"sk-kimi-bench{i:020d}", surface=Surface.KIMI_CODE) for i in range(pool_size)], NOW
        )
        store.close()
        ids = json.dumps([k.id for k in added])
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", WRITER, str(home), str(w), str(per_writer), str(batch), ids],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for w in range(writers)
        ]
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        started = time.perf_counter()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
        wall = time.perf_counter() - started
        with contextlib.closing(SqliteStore(home)) as check:
            stored = check.keys()
            assert sum(k.total_requests for k in stored) == writers * per_writer, "lost updates"
    waits = sorted(w for r in results for w in r["waits"])
    p99 = statistics.quantiles(waits, n=100, method="inclusive")[98]
    return writers * per_writer / wall, statistics.median(waits) * 1e3, p99 * 1e3, waits[-1] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description="Time key selection and the store's write rate.")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="pool sizes, comma-separated")
    parser.add_argument("--no-store", action="store_true", help="time selection only")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    t0 = time.perf_counter()
    bench_select(sizes, 0.0)
    bench_select(sizes, RERANK_AFTER - 1)  # the ranking is rebuilt once it is RERANK_AFTER seconds old
    bench_index_upkeep(sizes)
    bench_catch_up()
    if args.no_store:
        return
    print()
    print("Store.record write rate (separate writer processes, one SQLite file in WAL mode)")
    print(
        f"{'writers':>7} {'batch':>5} {'keys':>5} {'outcomes':>9} {'outcomes/s':>11} {'txn p50 ms':>11} "
        f"{'txn p99 ms':>11} {'txn max ms':>11}"
    )
    for writers, per_writer, batch, keys in [
        (1, 10_000, 25, 10),
        (4, 2_500, 25, 10),
        (4, 1_000, 25, 1000),
        (4, 500, 1, 10),
    ]:
        rate, p50, p99, worst = bench_store(writers, per_writer, batch, keys)
        print(
            f"{writers:>7} {batch:>5} {keys:>5} {writers * per_writer:>9,} {rate:>11,.0f} {p50:>11.2f} "
            f"{p99:>11.2f} {worst:>11.2f}"
        )
    print(f"\n(total {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
