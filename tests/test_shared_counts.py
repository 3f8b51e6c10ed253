"""Per-account counts shared by several proxies on one real redis-server (shared_counts.py), and the scheduler."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis_server import RedisServer

from kimi_rotator import shared_counts
from kimi_rotator.admission import RPM_WINDOW
from kimi_rotator.failover import Job
from kimi_rotator.models import AccountRecord, Group, Limit, Surface
from kimi_rotator.pool import LivePool
from kimi_rotator.scheduler import Capped, Scheduler
from kimi_rotator.shared_counts import SharedCounts
from kimi_rotator.store import NewKey
from kimi_rotator.store_sqlite import SqliteStore

A: Group = (Surface.MOONSHOT_AI, "uid:a")
B: Group = (Surface.MOONSHOT_AI, "uid:b")


@pytest.fixture
def server(private_redis_server: RedisServer) -> RedisServer:
    """A Redis of the test's own (some stop and start it), with a password that must never appear in a log line."""
    return private_redis_server


@pytest.fixture
async def proxies(server: RedisServer) -> AsyncIterator[list[SharedCounts]]:
    """Three proxies' counts on the one Redis."""
    made = [SharedCounts.from_url(server.url, "test:", f"p{i}") for i in range(3)]
    yield made
    for counts in made:
        await counts.aclose()


async def subscribed(counts: SharedCounts, expected: int) -> None:
    """Wait until `expected` proxies listen for releases (bounded)."""
    for _ in range(200):
        found = await counts.client.pubsub_numsub("test:freed")
        if found and found[0][1] >= expected:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the subscribers did not subscribe")


# -- the counts ------------------------------------------------------------------------------------------------------

async def test_three_proxies_hold_a_concurrency_cap_exactly_under_a_storm(proxies: list[SharedCounts]) -> None:
    cap = 5
    first = await asyncio.gather(*(proxies[i % 3].acquire(A, (cap, None)) for i in range(60)))
    admitted = [(i, got) for i, got in enumerate(first) if got.admitted]
    assert len(admitted) == cap  # reached, and not exceeded
    assert all(got.shared for got in first)
    assert await proxies[0].counts(A) == (cap, cap)
    for i, got in admitted:
        assert got.lease_id is not None
        proxies[i % 3].release(got.lease_id)

    # Requests coming and going on all three: never more than the cap in flight, and the cap is reached.
    flying, most = 0, 0

    async def client(counts: SharedCounts) -> None:
        nonlocal flying, most
        for _ in range(40):
            got = await counts.acquire(A, (cap, None))
            if got.lease_id is None:
                await asyncio.sleep(0.002)
                continue
            flying += 1
            most = max(most, flying)
            await asyncio.sleep(0.003)
            flying -= 1  # before the release reaches Redis: the test's count is never above Redis's
            counts.release(got.lease_id)

    await asyncio.wait_for(asyncio.gather(*(client(proxies[i % 3]) for i in range(30))), 30)
    assert most == cap


async def test_the_minute_holds_an_rpm_cap_and_a_refusal_is_refunded(proxies: list[SharedCounts]) -> None:
    leases = [await proxies[i].acquire(B, (None, 3)) for i in range(3)]
    assert all(got.admitted for got in leases)
    for i, got in enumerate(leases):
        proxies[i].release(got.lease_id or "")
    refused = await proxies[0].acquire(B, (None, 3))
    assert not refused.admitted and refused.recent == 3  # ended, but still in the minute
    assert refused.frees_in is not None and RPM_WINDOW - 1 < refused.frees_in <= RPM_WINDOW
    # Kimi refused one of them: it used none of the minute.
    again = await proxies[1].acquire(A, (None, 1))
    proxies[1].release(again.lease_id or "", refund=True)
    for _ in range(100):
        if (await proxies[2].acquire(A, (None, 1))).admitted:
            break
        await asyncio.sleep(0.005)
    else:
        raise AssertionError("the refund never reached Redis")


async def test_starts_leave_the_window_by_redis_time(
        proxies: list[SharedCounts], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared_counts, "RPM_WINDOW", 0.3)
    assert (await proxies[0].acquire(A, (None, 1))).admitted
    refused = await proxies[1].acquire(A, (None, 1))
    assert not refused.admitted and refused.frees_in is not None and 0.2 < refused.frees_in <= 0.3
    await asyncio.sleep(refused.frees_in + 0.01)
    assert (await proxies[1].acquire(A, (None, 1))).admitted


async def test_a_release_wakes_a_waiter_on_another_proxy_within_100_ms(proxies: list[SharedCounts]) -> None:
    heard: asyncio.Queue[tuple[Group, float]] = asyncio.Queue()
    proxies[1].on_freed = lambda g: heard.put_nowait((g, time.perf_counter()))
    for counts in proxies:
        counts.start()
    await subscribed(proxies[0], 3)
    held = await proxies[0].acquire(A, (1, None))
    assert held.lease_id is not None
    assert not (await proxies[1].acquire(A, (1, None))).admitted
    other = await proxies[2].acquire(B, (2, None))
    proxies[2].release(other.lease_id or "")  # B was under its cap: nobody needs waking
    sent = time.perf_counter()
    proxies[0].release(held.lease_id)
    group, at = await asyncio.wait_for(heard.get(), 1.0)
    assert group == A and at - sent < 0.1
    assert heard.empty()
    assert (await proxies[1].acquire(A, (1, None))).admitted


async def test_a_request_gone_while_redis_is_asked_leaves_no_lease(proxies: list[SharedCounts]) -> None:
    cancelled = 0
    for turn in range(40):
        task = asyncio.create_task(proxies[0].acquire(A, (50, None)))
        for _ in range(turn % 4):  # cancelled before, while and after the script runs
            await asyncio.sleep(0)
        task.cancel()
        try:
            got = await task
        except asyncio.CancelledError:
            cancelled += 1
        else:
            proxies[0].release(got.lease_id or "", refund=True)
    assert cancelled
    for _ in range(100):
        if await proxies[1].counts(A) == (0, 0):
            break
        await asyncio.sleep(0.01)
    assert await proxies[1].counts(A) == (0, 0)  # not even a start: the requests were never sent


# -- leases ----------------------------------------------------------------------------------------------------------

async def test_renewed_leases_outlive_their_ttl(server: RedisServer) -> None:
    counts = SharedCounts.from_url(server.url, "test:", "live", lease_ttl=0.4, renew_every=0.1)
    try:
        assert (await counts.acquire(A, (1, None))).admitted
        await asyncio.sleep(1.2)
        assert await counts.counts(A) == (1, 1)
    finally:
        await counts.aclose()


_HOLDER = """
import asyncio, sys
from kimi_rotator.models import Surface
from kimi_rotator.shared_counts import SharedCounts

async def main():
    counts = SharedCounts.from_url(sys.argv[1], "test:", "doomed", lease_ttl=float(sys.argv[2]), renew_every=0.1)
    for _ in range(3):
        assert (await counts.acquire((Surface.MOONSHOT_AI, "uid:a"), (3, None))).admitted
    print("held", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_a_proxy_killed_with_kill_9_leaves_nothing_in_flight_after_its_lease(server: RedisServer) -> None:
    ttl = 0.6
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, server.url, str(ttl)], stdout=subprocess.PIPE)
    counts = SharedCounts.from_url(server.url, "test:", "survivor")
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert line.strip() == b"held"
        await asyncio.sleep(2 * ttl)  # renewed meanwhile
        assert (await counts.counts(A))[0] == 3
        assert not (await counts.acquire(A, (3, None))).admitted
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(10)
        while (await counts.counts(A))[0] and time.monotonic() - killed < 5:
            await asyncio.sleep(0.02)
        assert (await counts.counts(A))[0] == 0 and time.monotonic() - killed <= ttl + 0.3
        assert (await counts.acquire(A, (3, None))).admitted
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        await counts.aclose()


# -- faults ----------------------------------------------------------------------------------------------------------

async def test_redis_down_counts_locally_and_redis_back_counts_again(
        server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    counts = SharedCounts.from_url(server.url, "test:", "p0")
    health: list[bool] = []
    counts.on_health = health.append
    try:
        before = await counts.acquire(A, (10, 1000))
        assert before.shared and before.lease_id is not None
        server.stop()
        with caplog.at_level(logging.WARNING, logger="kimi_rotator.shared_counts"):
            started = time.monotonic()
            cut_off = [await counts.acquire(A, (10, 1000)) for _ in range(4)]
            assert time.monotonic() - started < 0.5  # one timeout at most, then no wait at all
            assert all(got.admitted and not got.shared for got in cut_off)
            assert not counts.healthy and health == [False]
            counts.release(cut_off[0].lease_id or "")  # ended during the outage: its start still counts
            counts.release(cut_off[1].lease_id or "", refund=True)  # refused by Kimi: not even that
            counts.release(before.lease_id)
            server.start()  # empty: no persistence
            for _ in range(300):
                if counts.healthy:
                    break
                await asyncio.sleep(0.01)
            assert health == [False, True]
        # Requests still in flight (2), and every start of the outage but the refunded one (3).
        assert await counts.counts(A) == (2, 3)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 2 and "does not answer" in warnings[0] and "answers again" in warnings[1]
        assert server.password and not any(server.password in w for w in warnings)
        for got in cut_off[2:]:
            counts.release(got.lease_id or "")
        for _ in range(100):
            if (await counts.counts(A))[0] == 0:
                break
            await asyncio.sleep(0.01)
        assert (await counts.counts(A))[0] == 0
    finally:
        await counts.aclose()


async def test_a_concurrency_only_account_reuses_spare_slots_and_gives_them_back(server: RedisServer) -> None:
    """Kimi Code's default cap (concurrency, no rpm): an ended request's lease stays this proxy's spare, so its next
    request costs no round trip; another proxy refused on the account gets it back at once; an idle one goes back."""
    mine, other = (SharedCounts.from_url(server.url, "test:", p) for p in ("mine", "other"))
    caps = (1, None)
    try:
        first = await mine.acquire(A, caps)
        assert first.lease_id is not None
        mine.release(first.lease_id)
        again = await mine.acquire(A, caps)
        assert again.lease_id == first.lease_id  # the spare, without asking Redis
        mine.release(again.lease_id)
        assert await mine.counts(A) == (1, 1)  # a spare still counts: the cap holds whatever the others do
        freed = asyncio.Event()
        other.on_freed = lambda group: freed.set()
        other.start()
        for _ in range(200):  # both listen on both channels
            found = dict(await mine.client.pubsub_numsub("test:want", "test:freed"))
            if found.get(b"test:want", 0) >= 2 and found.get(b"test:freed", 0) >= 2:
                break
            await asyncio.sleep(0.01)
        refused = await other.acquire(A, caps)
        assert refused.lease_id is None
        started = time.monotonic()
        await asyncio.wait_for(freed.wait(), 2.0)  # mine heard the want, gave its spare back, and that was published
        assert time.monotonic() - started < 0.1
        got = await other.acquire(A, caps)
        assert got.lease_id is not None and got.lease_id.startswith("other:")
        other.release(got.lease_id, refund=True)  # refused by Kimi: no spare is kept for it
        for _ in range(100):
            if (await other.counts(A))[0] == 0:
                break
            await asyncio.sleep(0.01)
        assert (await other.counts(A))[0] == 0
        spare = await mine.acquire(A, (5, None))
        assert spare.lease_id is not None
        mine.release(spare.lease_id)
        await asyncio.sleep(shared_counts.SPARE_IDLE * 1.8)  # idle: back to Redis
        assert (await mine.counts(A))[0] == 0
    finally:
        await mine.aclose()
        await other.aclose()


# -- the scheduler on shared counts ----------------------------------------------------------------------------------

def secret(tag: str) -> str:
    return f"sk-{tag}" + "x" * (40 - len(tag))


def two_pools(home: Path, **caps: int) -> list[LivePool]:
    store = SqliteStore(home)
    now = time.time()
    for name, account in (("a1", "uid:a"), ("a2", "uid:a"), ("b1", "uid:b")):
        store.add_key(NewKey(secret=secret(name), name=name, surface=Surface.MOONSHOT_AI, account=account), now)
    for group in (A, B):
        store.update_account(group, lambda r, g=group: AccountRecord(  # type: ignore[misc]
            surface=g[0], account=g[1], stated={Limit(k): v for k, v in caps.items()}))
    return [LivePool(store), LivePool(SqliteStore(home))]


def chat() -> Job:
    return Job(Surface.MOONSHOT_AI, "api.moonshot.ai", "POST", "/v1/chat/completions", (), b"{}", inference=True)


async def test_two_schedulers_on_one_redis_hold_each_account_to_its_whole_cap(
        server: RedisServer, tmp_path: Path) -> None:
    cap = 3
    pools = two_pools(tmp_path / "home", concurrency=cap)
    for i, pool in enumerate(pools):
        pool.share = (2, i)  # as their heartbeats would say: what each holds to if Redis stops answering
        pool._caps_moved()
    shared = [SharedCounts.from_url(server.url, "test:", pool.proxy_id) for pool in pools]
    schedulers = [Scheduler(pool, time.time, max_wait=10.0, shared=s) for pool, s in zip(pools, shared, strict=True)]
    flying: dict[Group, int] = {A: 0, B: 0}
    most: dict[Group, int] = {A: 0, B: 0}
    try:
        # Alone, one proxy uses each account's whole cap, not its half.
        first = [chat() for _ in range(2 * cap)]
        keys = [await schedulers[0].next_key(job) for job in first]
        assert sorted(k.limit_group[1] for k in keys) == ["uid:a"] * cap + ["uid:b"] * cap  # type: ignore[union-attr]
        # The other proxy finds both accounts full across the proxies: it waits, then a release there frees one.
        late = chat()
        waiting = asyncio.create_task(schedulers[1].next_key(late))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        released = time.perf_counter()
        first[0].lease.release()  # type: ignore[union-attr]
        key = await asyncio.wait_for(waiting, 2.0)
        assert time.perf_counter() - released < 0.1  # woken by the release, not by the recheck a second later
        assert not isinstance(key, Capped) and key.limit_group == keys[0].limit_group  # type: ignore[union-attr]
        assert pools[1].usage_counts is not None and pools[1].usage_counts(time.time()) == {key.limit_group: (1, 1)}
        for job in [*first[1:], late]:
            job.lease.release()  # type: ignore[union-attr]
        await asyncio.sleep(0.1)

        async def client(scheduler: Scheduler) -> None:
            for _ in range(10):
                job = chat()
                got = await scheduler.next_key(job)
                assert not isinstance(got, Capped) and job.lease is not None
                group = job.lease.group
                flying[group] += 1
                most[group] = max(most[group], flying[group])
                await asyncio.sleep(0.005)
                flying[group] -= 1
                job.lease.release()

        await asyncio.wait_for(asyncio.gather(*(client(schedulers[i % 2]) for i in range(16))), 60)
        assert most == {A: cap, B: cap}
    finally:
        for s in shared:
            await s.aclose()


async def test_a_scheduler_cut_off_from_redis_holds_its_share_and_counts_there_again(
        server: RedisServer, tmp_path: Path) -> None:
    pool = two_pools(tmp_path / "home", concurrency=3)[0]
    pool.share = (2, 0)  # two proxies alive at the last heartbeat: this one's share of 3 is 2
    pool._caps_moved()
    shared = SharedCounts.from_url(server.url, "test:", pool.proxy_id)
    scheduler = Scheduler(pool, time.time, max_wait=0.2, shared=shared)
    try:
        assert not isinstance(await scheduler.next_key(chat()), Capped)
        server.stop()
        jobs = [chat() for _ in range(3)]
        keys = [await scheduler.next_key(job) for job in jobs]
        assert not any(isinstance(k, Capped) for k in keys)  # no client error from the outage
        # 1 before the outage + 3 during it: 2 on each account, its share; the next one waits, then is capped.
        assert pool.usage_counts is not None and set(pool.usage_counts(time.time()).values()) == {(2, 2)}
        assert isinstance(await scheduler.next_key(chat()), Capped)
        server.start()
        for _ in range(300):
            if shared.healthy:
                break
            await asyncio.sleep(0.01)
        assert shared.healthy
        assert [await shared.counts(g) for g in (A, B)] == [(2, 2), (2, 2)]  # re-registered: the global count is true
        more = await scheduler.next_key(chat())  # the whole cap again: one more on an account
        assert not isinstance(more, Capped)
    finally:
        await shared.aclose()
