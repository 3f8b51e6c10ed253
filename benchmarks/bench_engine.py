"""Benchmarks for the two cores: engine.select among 1,000 keys, and the store's write rate.

Run: python benchmarks/bench_engine.py   (about 25 s on a quiet machine; prints two small tables)

Selection is timed with timeit on a ready Roster (what the addon holds in memory), for each strategy:
  common          the current key is healthy and eligible (the usual request)
  current cooling the current key is cooling, so the engine looks for another
  forced rotate   `kimi-rotate rotate`: the current key is left out
  999 cooling     every key but one is cooling
Then what the index behind selection (kimi_rotator/roster.py) costs to build and to keep current, and what the
proxy's check for CLI commands costs on each pick (LivePool.catch_up), with nothing new and right after a command.
The store is timed with writer processes that record outcomes through Store.record in batches, as the proxy does.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

from pydantic import SecretStr

from kimi_rotator import engine
from kimi_rotator.models import KeyRecord, Outcome, OutcomeKind, PoolSettings, Strategy, Surface
from kimi_rotator.pool import LivePool
from kimi_rotator.roster import REINDEX_AFTER, Roster
from kimi_rotator.store import NewKey, Store

N_KEYS = 1000
NOW = 1_750_000_000.0
CURRENT = N_KEYS // 2


def roster(cooling: set[int]) -> Roster:
    keys = [
        KeyRecord(
            id=i + 1,
            secret=SecretStr(f"sk-kimi-bench{i:020d}"),
            fingerprint=f"{i:010x}",
            name=f"key {i}",
            surface=Surface.KIMI_CODE,
            account=f"acct-{i // 4}",
            added_at=NOW - 86_400,
            last_used=NOW - (i % 97) * 60.0,
            health=60.0 + (i % 41),
            health_at=NOW - (i % 13) * 600.0,
            cooldown_until=NOW + 60 if i in cooling else None,
        )
        for i in range(N_KEYS)
    ]
    return Roster(keys)


def time_select(r: Roster, settings: PoolSettings, forced: bool, at: float = NOW) -> float:
    """Best-of-5 microseconds per engine.select call."""
    result = engine.select(r, settings, at, surface=Surface.KIMI_CODE, forced=forced)
    assert isinstance(result, engine.Selection), result
    timer = timeit.Timer(lambda: engine.select(r, settings, at, surface=Surface.KIMI_CODE, forced=forced))
    number, _ = timer.autorange()
    number = max(number // 4, 1)  # autorange aims at 0.2 s; a quarter of that, five times, is plenty
    return min(timer.repeat(repeat=5, number=number)) / number * 1e6


def bench_index_upkeep() -> None:
    """What the index costs: building it (the first scan on a roster the pool has just loaded) and keeping it
    current as each outcome replaces a key."""
    settings = PoolSettings(strategy=Strategy.HEALTH_BASED, active_key_id=CURRENT + 1)
    fresh = [roster({CURRENT}) for _ in range(20)]
    builds = []
    for r in fresh:
        t = time.perf_counter()
        engine.select(r, settings, NOW, surface=Surface.KIMI_CODE)
        builds.append(time.perf_counter() - t)
    outcome = Outcome(kind=OutcomeKind.SUCCESS, latency_ms=5.0)

    def per_outcome(r: Roster) -> float:
        t = time.perf_counter()
        for i in range(2000):
            r = r.with_updates(engine.apply_outcome(r, (i * 7) % N_KEYS + 1, outcome, NOW + i))
        return (time.perf_counter() - t) / 2000 * 1e6

    # The index is rebuilt once it is REINDEX_AFTER seconds old: just before that its bounds are loosest.
    aged = roster({CURRENT})
    engine.select(aged, settings, NOW - REINDEX_AFTER + 1, surface=Surface.KIMI_CODE)
    aged_us = time_select(aged, settings, False, at=NOW)
    # A busy pool: every key at full health and used within the last hour, so all scores sit within one point.
    busy = Roster(k.model_copy(update={"health": 100.0, "last_used": NOW - (k.id % 60) * 60.0}) for k in aged.keys)
    engine.select(busy, settings, NOW - REINDEX_AFTER + 1, surface=Surface.KIMI_CODE)
    busy_us = time_select(busy, settings, False, at=NOW)
    print(f"current cooling, index {REINDEX_AFTER - 1:.0f} s old: {aged_us:.1f} µs; the same in a busy pool "
          f"(every key within one point of the best): {busy_us:.1f} µs")

    indexed = roster(set())
    engine.select(indexed, settings, NOW, surface=Surface.KIMI_CODE, forced=True)
    build_ms = statistics.median(builds) * 1e3
    print(f"first full scan on a new roster (builds the index): {build_ms:.2f} ms (median of 20)")
    print(
        f"one outcome (apply_outcome + with_updates): {per_outcome(indexed):.1f} µs with the index, "
        f"{per_outcome(roster(set())):.1f} µs without"
    )


def bench_select() -> None:
    scenarios = [
        ("common", set(), False),
        ("current cooling", {CURRENT}, False),
        ("forced rotate", set(), True),
        ("999 cooling", set(range(N_KEYS)) - {CURRENT - 1}, False),  # the only free key is the last one looked at
    ]
    rosters = {name: roster(cooling) for name, cooling, _ in scenarios}
    print(f"engine.select among {N_KEYS:,} keys (µs per selection, best of 5)")
    print(f"{'strategy':<14}" + "".join(f"{name:>17}" for name, _, _ in scenarios))
    for strategy in Strategy:
        settings = PoolSettings(strategy=strategy, active_key_id=CURRENT + 1)
        row = [time_select(rosters[name], settings, forced) for name, _, forced in scenarios]
        print(f"{strategy.value:<14}" + "".join(f"{us:>17.1f}" for us in row))


# A proxy's writer process: outcomes batched through Store.record, timing each transaction.
WRITER = r"""
import json, sys, time
from pathlib import Path
from kimi_rotator.models import Outcome, OutcomeKind
from kimi_rotator.store import Attempt, Store

home, wid, count, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ids = json.loads(sys.argv[5])
KINDS = [OutcomeKind.SUCCESS, OutcomeKind.SUCCESS, OutcomeKind.SUCCESS, OutcomeKind.RATE_LIMITED]
store = Store(home)
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
            mine, cli = Store(home), Store(home)
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
        store = Store(home)
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
        with contextlib.closing(Store(home)) as check:
            stored = check.keys()
            assert sum(k.total_requests for k in stored) == writers * per_writer, "lost updates"
    waits = sorted(w for r in results for w in r["waits"])
    p99 = statistics.quantiles(waits, n=100, method="inclusive")[98]
    return writers * per_writer / wall, statistics.median(waits) * 1e3, p99 * 1e3, waits[-1] * 1e3


def main() -> None:
    t0 = time.perf_counter()
    bench_select()
    bench_index_upkeep()
    bench_catch_up()
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
