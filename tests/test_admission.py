"""Admission (caps held before sending), the fair queue, and the scheduler's choices, without a proxy or sockets."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from kimi_rotator import engine
from kimi_rotator.admission import RPM_WINDOW, Admission, Caps, Gate, LocalUsage
from kimi_rotator.affinity import Conversation
from kimi_rotator.caps import KIMI_CODE_CONCURRENCY
from kimi_rotator.failover import Job
from kimi_rotator.models import AccountRecord, Group, Limit, Quota, QuotaWindow, Surface
from kimi_rotator.pool import LivePool, _share_of
from kimi_rotator.scheduler import Capped, Scheduler, SchedulerOptions
from kimi_rotator.store import NewKey
from kimi_rotator.store_sqlite import SqliteStore

A: Group = (Surface.MOONSHOT_AI, "uid:a")
B: Group = (Surface.MOONSHOT_AI, "uid:b")
PATH = "/v1/chat/completions"


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def admission(caps: dict[Group, Caps], clock: Clock, freed: list[Group] | None = None) -> Admission:
    return Admission(lambda g: caps.get(g, (None, None)), clock,
                     on_free=(freed.append if freed is not None else None))


# -- counting --------------------------------------------------------------------------------------------------------

def test_usage_counts_in_flight_and_the_last_minute() -> None:
    usage = LocalUsage()
    usage.started(A, 0.0)
    usage.started(A, 10.0)
    assert usage.in_flight(A) == 2 and usage.recent(A, 10.0) == 2
    usage.ended(A)
    assert usage.in_flight(A) == 1 and usage.recent(A, 10.0) == 2  # the minute still holds it
    assert usage.frees_at(A, 10.0) == RPM_WINDOW
    assert usage.recent(A, RPM_WINDOW + 0.01) == 1
    usage.ended(A, refund=10.0)  # Kimi refused it: it used none of the minute
    assert usage.in_flight(A) == 0 and usage.recent(A, 11.0) == 0 and usage.frees_at(A, 11.0) is None


def test_an_account_at_its_concurrency_is_full_until_a_request_ends() -> None:
    clock, freed = Clock(), []
    adm = admission({A: (2, None)}, clock, freed)
    first = adm.admit(A, clock.now)
    assert adm.full(clock.now) == frozenset()
    second = adm.admit(A, clock.now)
    assert adm.full(clock.now) == {A} and adm.full_by_concurrency()
    assert adm.next_free_at(clock.now) is None  # only an ending frees it
    first.release()
    first.release()  # given back once only
    assert adm.full(clock.now) == frozenset() and freed == [A]
    assert adm.usage.in_flight(A) == 1
    second.release()
    assert adm.usage.in_flight(A) == 0


def test_an_account_at_its_rpm_frees_when_the_oldest_request_leaves_the_minute() -> None:
    clock = Clock()
    adm = admission({A: (None, 2)}, clock)
    for _ in range(2):
        adm.admit(A, clock.now).release()
    assert adm.full(clock.now) == {A} and not adm.full_by_concurrency()
    assert adm.next_free_at(clock.now) == pytest.approx(clock.now + RPM_WINDOW)
    clock.now += RPM_WINDOW - 0.1
    assert adm.full(clock.now) == {A}
    clock.now += 0.2
    assert adm.full(clock.now) == frozenset()


def test_a_refused_request_is_refunded_to_the_minute() -> None:
    clock = Clock()
    adm = admission({A: (None, 1)}, clock)
    adm.admit(A, clock.now).release(refused=True)
    assert adm.full(clock.now) == frozenset()


def test_admission_off_counts_but_never_fills() -> None:
    clock = Clock()
    adm = admission({A: (1, 1)}, clock)
    adm.enabled = False
    adm.admit(A, clock.now)
    adm.admit(A, clock.now)
    assert adm.full(clock.now) == frozenset() and adm.usage.in_flight(A) == 2


def test_lowered_caps_fill_an_account_at_once() -> None:
    clock, caps = Clock(), {A: (None, None)}
    adm = admission(caps, clock)
    adm.admit(A, clock.now)
    assert adm.full(clock.now) == frozenset()
    caps[A] = (1, None)
    adm.recheck(clock.now)
    assert adm.full(clock.now) == {A}


@pytest.mark.parametrize(("cap", "count"), [(7, 3), (2, 3), (30, 1), (5, 5)])
def test_shares_of_a_cap_add_up_to_it(cap: int, count: int) -> None:
    shares = [_share_of(cap, (count, rank)) for rank in range(count)]
    assert sum(s or 0 for s in shares) == cap
    assert max(shares) - min(shares) <= 1  # type: ignore[operator]
    assert _share_of(None, (count, 0)) is None


# -- the queue -------------------------------------------------------------------------------------------------------

async def test_the_gate_serves_first_come_first() -> None:
    gate, order = Gate(), []

    async def waiter(name: str, front: bool = False) -> None:
        assert await gate.wait(5.0, front=front)
        order.append(name)

    tasks = [asyncio.create_task(waiter(n)) for n in "abc"]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(waiter("retry", front=True)))  # a request failing over goes first
    await asyncio.sleep(0)
    for _ in range(4):
        gate.wake()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == ["retry", "a", "b", "c"]
    assert not gate


async def test_a_waiter_times_out_and_a_turn_it_got_goes_on() -> None:
    gate = Gate()
    assert not await gate.wait(0.01)
    second = asyncio.create_task(gate.wait(5.0))
    await asyncio.sleep(0)
    assert gate
    gate.wake()
    assert await second
    assert not gate


# -- the scheduler over a real pool ---------------------------------------------------------------------------------

def secret(tag: str) -> str:
    return f"sk-{tag}" + "x" * (40 - len(tag))


@pytest.fixture
def pool(tmp_path: Path) -> LivePool:
    store = SqliteStore(tmp_path / "home")
    now = time.time()
    for name, account in (("a1", "uid:a"), ("a2", "uid:a"), ("b1", "uid:b")):
        store.add_key(NewKey(secret=secret(name), name=name, surface=Surface.MOONSHOT_AI, account=account), now)
    return LivePool(store)


def state(pool: LivePool, group: Group, **caps: int) -> None:
    pool.store.update_account(group, lambda r: AccountRecord(surface=group[0], account=group[1],
                                                             stated={Limit(k): v for k, v in caps.items()}))
    pool.catch_up()


def chat(conversation: str | None = None) -> Job:
    conv = Conversation(conversation, "prompt_cache_key") if conversation else None
    return Job(Surface.MOONSHOT_AI, "api.moonshot.ai", "POST", PATH, (), b"{}", inference=True, conversation=conv)


async def test_full_accounts_are_passed_over_and_then_requests_queue(pool: LivePool) -> None:
    state(pool, A, concurrency=1)
    state(pool, B, concurrency=1)
    scheduler = Scheduler(pool, time.time, max_wait=5.0)
    first, second = chat(), chat()
    k1 = await scheduler.next_key(first)
    k2 = await scheduler.next_key(second)
    assert {k1.limit_group, k2.limit_group} == {A, B}  # type: ignore[union-attr]
    third = chat()
    waiting = asyncio.create_task(scheduler.next_key(third))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # both accounts are at their cap: it waits, costing no CPU
    assert first.lease is not None
    first.lease.release()  # a stream ends
    key = await asyncio.wait_for(waiting, 1.0)
    assert not isinstance(key, Capped | engine.NoEligibleKey)
    assert key.limit_group == k1.limit_group  # type: ignore[union-attr]
    assert third.queued > 0.04


async def test_a_request_that_waits_too_long_gets_capped_with_a_retry_time(pool: LivePool) -> None:
    state(pool, A, rpm=1)
    state(pool, B, rpm=1)
    scheduler = Scheduler(pool, time.time, max_wait=0.2)
    for _ in range(2):
        job = chat()
        await scheduler.next_key(job)
        assert job.lease is not None
        job.lease.release()
    started = time.monotonic()
    result = await scheduler.next_key(chat())
    # Only the minute frees these accounts, 60 s away: no point waiting 0.2 s for it.
    assert isinstance(result, Capped) and result.retry_after > 55
    assert time.monotonic() - started < 0.1


async def test_queued_requests_are_served_in_arrival_order(pool: LivePool) -> None:
    state(pool, A, concurrency=1)
    state(pool, B, concurrency=1)
    scheduler = Scheduler(pool, time.time, max_wait=5.0)
    holders = [chat(), chat()]
    for job in holders:
        await scheduler.next_key(job)
    served: list[int] = []

    async def one(i: int) -> None:
        job = chat()
        await scheduler.next_key(job)
        served.append(i)
        await asyncio.sleep(0.01)
        assert job.lease is not None
        job.lease.release()

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(one(i)))
        await asyncio.sleep(0.01)
    holders[0].lease.release()  # type: ignore[union-attr]
    await asyncio.wait_for(asyncio.gather(*tasks), 3.0)
    assert served == [0, 1, 2, 3, 4]


async def test_a_conversation_keeps_its_account_and_new_ones_spread(pool: LivePool) -> None:
    scheduler = Scheduler(pool, time.time, max_wait=0)
    picks = {}
    for conv in ("c1", "c2"):
        job = chat(conv)
        key = await scheduler.next_key(job)
        assert job.placement == "new conversation"
        scheduler.served(job, key)  # type: ignore[arg-type]
        picks[conv] = key.limit_group  # type: ignore[union-attr]
    assert picks["c1"] != picks["c2"]  # the second conversation went to the idle account
    for _ in range(3):
        for conv in ("c1", "c2"):
            job = chat(conv)
            key = await scheduler.next_key(job)
            assert key.limit_group == picks[conv] and job.placement == "pin held"  # type: ignore[union-attr]
            scheduler.served(job, key)  # type: ignore[arg-type]


async def test_a_pinned_account_at_its_cap_moves_the_conversation(pool: LivePool) -> None:
    scheduler = Scheduler(pool, time.time, max_wait=0)
    job = chat("c1")
    key = await scheduler.next_key(job)
    scheduler.served(job, key)  # type: ignore[arg-type]
    pinned = key.limit_group  # type: ignore[union-attr]
    state(pool, pinned, concurrency=1)  # and job's request is still in flight
    moved = chat("c1")
    other = await scheduler.next_key(moved)
    assert other.limit_group != pinned and moved.placement == "pin moved"  # type: ignore[union-attr]


async def test_round_robin_ignores_conversations(pool: LivePool) -> None:
    from kimi_rotator.models import Strategy
    pool.store.update_settings(strategy=Strategy.ROUND_ROBIN)
    pool.catch_up()  # as the addon does at the start of each request
    scheduler = Scheduler(pool, time.time, max_wait=0)
    names = []
    for _ in range(3):
        job = chat("same")
        key = await scheduler.next_key(job)
        scheduler.served(job, key)  # type: ignore[arg-type]
        names.append(key.name)  # type: ignore[union-attr]
    assert names == ["a1", "a2", "b1"] and job.placement == ""


async def test_quota_that_expires_soon_is_spent_first(pool: LivePool) -> None:
    now = time.time()
    soon = Quota(checked_at=now, windows=(QuotaWindow(name="5h", limit=100, remaining=40, reset_at=now + 1200),))
    later = Quota(checked_at=now, windows=(QuotaWindow(name="5h", limit=100, remaining=90, reset_at=now + 17000),))
    pool.store.record_quota(A, later)
    pool.store.record_quota(B, soon)
    pool._install(pool.store.snapshot())  # record_quota is no command: the pool's thread would install it
    off = Scheduler(pool, time.time, max_wait=0, options=SchedulerOptions(quota_aware=False))
    key = await off.next_key(chat())
    assert key.limit_group == A  # type: ignore[union-attr]  # quota-blind: the first key, and it stays current
    scheduler = Scheduler(pool, time.time, max_wait=0)
    for _ in range(3):
        key = await scheduler.next_key(chat())
        assert key.limit_group == B  # type: ignore[union-attr]


def test_kimi_code_accounts_get_the_documented_concurrency(pool: LivePool) -> None:
    assert pool.caps((Surface.KIMI_CODE, "uid:z")) == (KIMI_CODE_CONCURRENCY, None)
    assert pool.caps(A) == (None, None)
    state(pool, A, rpm=200, concurrency=50)
    assert pool.caps(A) == (50, 200)
