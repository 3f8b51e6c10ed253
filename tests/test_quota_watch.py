"""The proxy's quota watch (kimi_rotator/quota_watch.py) in one process: a real pool on a real store, the proxy's own
client, the fake upstream. A used-up quota gets its account probed once a minute at most, in the background, and the
account's cooldown then ends at the reset the fake reports; kimi_probe_interval probes every account.
tests/test_e2e_quota_watch.py runs the same through a real proxy."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from certs import TestPKI
from fakekimi import FakeClock, FakeKimi, Reply

from kimi_rotator import quota_watch
from kimi_rotator.classify import BILLING_DEFAULT
from kimi_rotator.models import KeyRecord, Outcome, OutcomeKind, Scope, Surface
from kimi_rotator.pool import LivePool
from kimi_rotator.quota_watch import QuotaWatch
from kimi_rotator.store import NewKey, Store
from kimi_rotator.store_sqlite import SqliteStore
from kimi_rotator.upstream import UpstreamClient, UpstreamSettings

KC1, KC2 = "sk-kimi-" + "w" * 60 + "0001", "sk-kimi-" + "w" * 60 + "0002"
WAIT = 5.0


@dataclass
class World:
    fake: FakeKimi
    store: Store
    pool: LivePool
    client: UpstreamClient
    clock: FakeClock
    keys: list[KeyRecord]

    def watch(self, interval: float = 0.0) -> QuotaWatch:
        return QuotaWatch(self.pool, self.client, interval, clock=self.clock)

    def billing(self, key: KeyRecord) -> Outcome:
        """What the failover records for a 403 billing answer: the account cools for the 5-hour guess."""
        now = self.clock()
        outcome = Outcome(kind=OutcomeKind.BILLING_LIMITED, scope=Scope.ACCOUNT, until=now + BILLING_DEFAULT,
                          reason="403 permission_error")
        self.pool.record(key.id, outcome, now)
        return outcome

    def stored(self) -> dict[str, KeyRecord]:
        reader = SqliteStore(self.store.home)
        try:
            records = reader.keys()
        finally:
            reader.close()
        return {k.name: k for k in records}

    async def until(self, predicate: object, what: str) -> dict[str, KeyRecord]:
        deadline = time.monotonic() + WAIT
        while True:
            keys = self.stored()
            if predicate(keys):  # type: ignore[operator]
                return keys
            if time.monotonic() > deadline:
                states = [(k.name, k.cooldown_until) for k in keys.values()]
                raise AssertionError(f"{what} not within {WAIT} s: {states}")
            await asyncio.sleep(0.05)

    def usages_probes(self) -> int:
        return sum(1 for s in self.fake.requests if s.path == "/coding/v1/usages")


@pytest.fixture
async def world(fake_kimi: FakeKimi, pki: TestPKI, kimi_home: Path) -> AsyncIterator[World]:
    clock = FakeClock(time.time())
    fake_kimi.clock = clock  # the plan's windows reset on the same clock as the watch's
    for secret, name in ((KC1, "one"), (KC2, "two")):
        fake_kimi.add_key(secret, account="acct", name=name)
    store = SqliteStore(kimi_home)
    keys, _ = store.add_keys([NewKey(secret=KC1, name="one", surface=Surface.KIMI_CODE, account="team"),
                              NewKey(secret=KC2, name="two", surface=Surface.KIMI_CODE, account="team")], clock())
    pool = LivePool(store)
    pool.start(asyncio.get_running_loop())
    client = UpstreamClient(UpstreamSettings(verify=ssl.create_default_context(cafile=str(pki.ca_cert)),
                                             resolve={"api.kimi.com": ("127.0.0.1", fake_kimi.port)}, timeout=10))
    yield World(fake_kimi, store, pool, client, clock, keys)
    await client.aclose()
    pool.stop()
    store.close()


async def test_a_used_up_quota_gets_one_probe_and_the_cooldown_ends_at_kimis_reset(world: World) -> None:
    world.fake.set_plan("acct", window_limit=10, window_used=10, window_reset_in=900)
    reset = float(int(world.clock() + 900))  # /usages says it to the second
    watch = world.watch()
    one, two = world.keys
    outcome = world.billing(one)
    watch.saw(one, outcome)
    watch.saw(two, world.billing(two))  # the same account within the minute: no second probe
    keys = await world.until(lambda ks: all(k.cooldown_until == reset for k in ks.values()), "the real reset")
    assert keys["one"].cooldown_reason == keys["two"].cooldown_reason == "quota: 5h used up"
    assert world.usages_probes() == 1
    [probe] = [s for s in world.fake.requests if s.path == "/coding/v1/usages"]
    assert probe.headers["user-agent"].startswith("kimi-rotate/")
    quota = world.store.accounts()[(Surface.KIMI_CODE, "team")].quota
    assert quota is not None and quota.exhausted_until() == reset
    watch.stop()


async def test_a_guess_recorded_after_the_probe_is_moved_back_to_the_reset(world: World) -> None:
    world.fake.set_plan("acct", window_limit=10, window_used=10, window_reset_in=600)
    reset = float(int(world.clock() + 600))
    watch = world.watch()
    one, two = world.keys
    watch.saw(one, world.billing(one))
    await world.until(lambda ks: ks["one"].cooldown_until == reset, "the first probe")
    world.clock.advance(5)  # another request of the account's, in flight meanwhile, gets the same 403
    watch.saw(two, world.billing(two))
    await world.until(lambda ks: ks["two"].cooldown_until == reset and ks["one"].cooldown_until == reset, "again")
    await asyncio.sleep(0.5)  # and it stays so once everything is written
    assert {k.cooldown_until for k in world.stored().values()} == {reset}
    assert world.usages_probes() == 1
    watch.stop()


async def test_a_minute_later_the_account_is_probed_again(world: World) -> None:
    world.fake.set_plan("acct", window_limit=10, window_used=10, window_reset_in=3600)
    watch = world.watch()
    one, _ = world.keys
    watch.saw(one, world.billing(one))
    await world.until(lambda ks: ks["one"].cooldown_reason == "quota: 5h used up", "the first probe")
    world.clock.advance(61)
    world.fake.refresh_plan("acct")  # a new window: quota back
    watch.saw(one, world.billing(one))
    await world.until(lambda ks: all(k.cooldown_until is None for k in ks.values()), "the quota back")
    assert world.usages_probes() == 2
    watch.stop()


async def test_other_outcomes_never_probe(world: World) -> None:
    watch = world.watch()
    one, _ = world.keys
    for kind in (OutcomeKind.SUCCESS, OutcomeKind.RATE_LIMITED, OutcomeKind.SERVER_ERROR, OutcomeKind.INVALID_KEY):
        watch.saw(one, Outcome(kind=kind))
    await asyncio.sleep(0.3)
    assert world.fake.requests == []
    watch.stop()


async def test_a_failed_probe_leaves_the_guess(world: World) -> None:
    world.fake.script(KC1, [Reply.unavailable()], on="probe")
    watch = world.watch()
    one, _ = world.keys
    outcome = world.billing(one)
    watch.saw(one, outcome)
    await asyncio.sleep(0.5)
    assert world.usages_probes() == 1
    assert world.stored()["one"].cooldown_until == outcome.until
    watch.stop()


async def test_the_interval_probes_every_account_and_never_twice_a_minute(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quota_watch, "MIN_INTERVAL", 0.3)
    world.fake.set_usage("acct", window_remaining=0, window_reset=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    watch = world.watch(interval=0.01)  # held at MIN_INTERVAL
    assert watch.interval == 0.3
    watch.start()
    keys = await world.until(lambda ks: all(k.cooldown_reason == "quota: 5h used up" for k in ks.values()),
                             "a round")
    assert keys["one"].cooldown_until == keys["two"].cooldown_until
    assert world.usages_probes() == 1  # one key for the account: both share it
    await asyncio.sleep(0.7)  # rounds come, but on the watch's clock no MIN_INTERVAL has passed
    assert world.usages_probes() == 1
    world.clock.advance(0.5)
    deadline = time.monotonic() + WAIT
    while world.usages_probes() < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    watch.stop()
    assert world.usages_probes() == 2
    assert QuotaWatch(world.pool, world.client, 0).interval == 0


async def test_quota_left_then_used_up_again_within_the_minute_gets_one_later_probe(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quota_watch, "MIN_INTERVAL", 0.4)
    world.fake.set_plan("acct", window_limit=10, window_used=9, window_reset_in=1200)  # /usages: 1 left
    watch = world.watch()
    one, two = world.keys
    watch.saw(one, world.billing(one))
    # The probe, not the store as it was before the outcome reached it, must be what shows no cooldown.
    await world.until(lambda ks: world.usages_probes() == 1 and all(k.cooldown_until is None for k in ks.values()),
                      "the quota seen left")
    world.fake.set_plan("acct", window_limit=10, window_used=10, window_reset_in=1200)  # now it is used up
    reset = float(int(world.clock() + 1200))
    watch.saw(two, world.billing(two))  # too soon for a probe: one is due once MIN_INTERVAL has passed
    watch.saw(one, world.billing(one))  # and only one
    assert world.usages_probes() == 1
    await world.until(lambda ks: all(k.cooldown_until == reset for k in ks.values()), "the later probe")
    assert world.usages_probes() == 2
    watch.stop()
