"""The pool sees a command committed by another connection (the CLI) before it picks a key, without its store thread,
and every outcome it holds counts exactly once across the swap. tests/test_e2e_cli_next_request.py does the same
with a real proxy and the real CLI."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kimi_rotator import engine
from kimi_rotator.models import Outcome, OutcomeKind, Surface
from kimi_rotator.pool import LivePool
from kimi_rotator.store import NewKey, Store
from kimi_rotator.store_sqlite import SqliteStore

OK = Outcome(kind=OutcomeKind.SUCCESS, latency_ms=10)
KC = Surface.KIMI_CODE


@pytest.fixture
def stores(kimi_home: Path) -> Iterator[tuple[Store, Store, list[int]]]:
    """The pool's store and another connection standing for the CLI, with three keys."""
    mine, cli = SqliteStore(kimi_home), SqliteStore(kimi_home)
    added, _ = cli.add_keys([NewKey(secret=f"sk-kimi-{'x' * 36}{i:04d}", name=f"k{i}", surface=KC)
                             for i in range(3)], time.time())
    yield mine, cli, [k.id for k in added]
    mine.close()
    cli.close()


def picked(pool: LivePool) -> int:
    result = pool.select(KC, time.time())
    assert isinstance(result, engine.Selection)
    return result.key.id


def test_a_command_is_seen_by_the_next_selection(stores: tuple[Store, Store, list[int]]) -> None:
    mine, cli, ids = stores
    pool = LivePool(mine)  # never started: no store thread, only the check on selection
    assert picked(pool) == ids[0]
    for i in [1, 2, 0, 2, 1]:
        cli.use_key(ids[i])
        assert picked(pool) == ids[i]
    cli.set_disabled(ids[1], "by hand")
    cli.use_key(ids[1])
    assert picked(pool) != ids[1]
    cli.remove_key(ids[2])
    cli.add_keys([NewKey(secret="sk-kimi-" + "y" * 40, name="new", surface=KC)], time.time())
    pool.catch_up()
    assert sorted(k.name for k in pool.roster.keys) == ["k0", "k1", "new"] and pool.count(KC) == 3


def test_outcomes_count_once_whether_or_not_written_when_a_command_comes(
    stores: tuple[Store, Store, list[int]]
) -> None:
    mine, cli, ids = stores
    pool = LivePool(mine)
    now = time.time()
    for _ in range(3):
        pool.record(ids[0], OK, now)
    pool._flush()  # these three are in the store
    for _ in range(2):
        pool.record(ids[0], OK, now)  # these two only in memory
    cli.use_key(ids[1])
    assert picked(pool) == ids[1]
    assert pool.roster.get(ids[0]).total_requests == 5  # type: ignore[union-attr]


def test_a_snapshot_read_before_the_installed_one_is_not_installed(stores: tuple[Store, Store, list[int]]) -> None:
    mine, cli, ids = stores
    pool = LivePool(mine)
    older = mine.snapshot()  # as the store thread may have read it just before the command
    cli.use_key(ids[2])
    assert picked(pool) == ids[2]
    pool._install(older)  # the store thread's install arriving late
    assert pool.settings.active_key_id == ids[2]


def test_outcomes_count_once_while_the_writer_flushes_during_commands(stores: tuple[Store, Store, list[int]]) -> None:
    mine, cli, ids = stores
    pool = LivePool(mine)
    stop = threading.Event()

    def writer() -> None:  # the store thread's writes, racing each catch-up's snapshot read
        while not stop.is_set():
            pool._flush(wait=1.0)

    thread = threading.Thread(target=writer)
    thread.start()
    recorded = 0
    try:
        for i in range(150):
            for _ in range(3):
                pool.record(ids[0], OK, time.time())
                recorded += 1
            cli.use_key(ids[i % 3])
            pool.catch_up()
            assert pool.roster.get(ids[0]).total_requests == recorded, f"round {i}"  # type: ignore[union-attr]
    finally:
        stop.set()
        thread.join()
    pool._flush()
    stored = {k.id: k for k in list(cli.keys())}
    assert stored[ids[0]].total_requests == recorded
