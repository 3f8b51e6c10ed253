"""Proxies' pools on one Redis store (real redis-server, in process): a command reaches every pool at once, and when
Redis comes back empty (restarted without persistence) one pool writes its view back and every outcome counts once.
tests/test_e2e_redis_store.py does the same with real proxy processes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis_server import RedisServer

from kimi_rotator import engine
from kimi_rotator.models import Outcome, OutcomeKind, Surface
from kimi_rotator.pool import LivePool
from kimi_rotator.store import NewKey
from kimi_rotator.store_redis import RedisStore

OK = Outcome(kind=OutcomeKind.SUCCESS, latency_ms=10)
KC = Surface.KIMI_CODE


@contextlib.asynccontextmanager
async def pools(url: str, home: Path, n: int) -> AsyncIterator[list[LivePool]]:
    loop = asyncio.get_running_loop()
    running = [LivePool(RedisStore(url, home)) for _ in range(n)]
    for pool in running:
        pool.start(loop)
    try:
        yield running
    finally:
        for pool in running:
            await asyncio.to_thread(pool.stop)
            pool.store.close()


async def until(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.01)


def total(store: RedisStore) -> int:
    listed = store.keys()
    return sum(k.total_requests for k in listed)


async def test_a_cli_command_reaches_every_pool_within_100_ms(redis_url: str, tmp_path: Path) -> None:
    cli = RedisStore(redis_url, tmp_path)
    key, other = cli.add_keys([NewKey(secret=f"sk-kimi-{c * 40}", name=c, surface=KC) for c in "ab"], time.time())[0]
    async with pools(redis_url, tmp_path, 3) as running:
        await until(lambda: all(len(p.roster) == 2 for p in running))
        took = []
        for target in (key, other, key):
            cli.use_key(target.id)
            started = time.monotonic()
            for pool in running:
                while True:
                    chosen = pool.select(KC, time.time())
                    if isinstance(chosen, engine.Selection) and chosen.key.id == target.id:
                        break
                    assert time.monotonic() - started < 1.0
                    await asyncio.sleep(0.001)
            took.append(time.monotonic() - started)
        assert max(took) < 0.1, took
    cli.close()


async def test_redis_restarted_empty_loses_no_outcome_and_counts_none_twice(
    private_redis_server: RedisServer, tmp_path: Path
) -> None:
    url = private_redis_server.url
    cli = RedisStore(url, tmp_path)
    key = cli.add_key(NewKey(secret="sk-kimi-" + "z" * 40, name="z", surface=KC), time.time())
    cli.close()
    async with pools(url, tmp_path, 3) as running:
        await until(lambda: all(len(p.roster) == 1 for p in running))
        for i, pool in enumerate(running):
            for _ in range(10 * (i + 1)):
                pool.record(key.id, OK, time.time())
        for pool in running:
            assert await pool.written()
        private_redis_server.stop()
        for pool in running:  # served from memory meanwhile
            for _ in range(5):
                pool.record(key.id, OK, time.time())
        await asyncio.sleep(1.0)
        private_redis_server.start()  # empty: no persistence
        store = RedisStore(url, tmp_path, readonly=True)
        try:
            await until(lambda: store.client.hlen(store._k("keys")) == 1 and total(store) == 75, timeout=15)
            await asyncio.sleep(1.0)  # nothing more arrives late
            assert total(store) == 75
            views = [p.roster.get(key.id).total_requests for p in running]  # type: ignore[union-attr]
            assert views == [75, 75, 75]
        finally:
            store.close()


@pytest.mark.parametrize("flushes", [1])
async def test_a_flushed_store_keeps_its_settings_and_account_caps(
    redis_url: str, redis_server: RedisServer, tmp_path: Path, flushes: int
) -> None:
    cli = RedisStore(redis_url, tmp_path)
    a, b = cli.add_keys([NewKey(secret=f"sk-kimi-{c * 40}", name=c, surface=KC) for c in "ab"], time.time())[0]
    cli.use_key(b.id)
    cli.set_disabled(a.id, "paused by hand")
    async with pools(redis_url, tmp_path, 2) as running:
        await until(lambda: all(p.settings.active_key_id == b.id for p in running))
        for _ in range(flushes):
            redis_server.flushall()
        await until(lambda: cli.client.hlen(cli._k("keys")) == 2)
        listed = cli.keys()
        keys = {k.name: k for k in listed}
        assert keys["a"].disabled_reason == "paused by hand" and cli.settings().active_key_id == b.id
        assert keys["a"].secret.get_secret_value() == "sk-kimi-" + "a" * 40
        cli.set_disabled(a.id, None)  # a command after the restore reaches the pools
        await until(lambda: all(p.roster.get(a.id).disabled_reason is None for p in running))  # type: ignore[union-attr]
    cli.close()
