"""One behaviour, two backends: the SQLite file and a real Redis server answer every store call the same way.
Then what only the Redis store has: sealed keys, the write lock, change notices, a lost store, a lost answer."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_server import RedisServer

from kimi_rotator import engine
from kimi_rotator.caps import state_caps
from kimi_rotator.models import Limit, Outcome, OutcomeKind, Quota, Scope, Strategy, Surface
from kimi_rotator.store import (
    Attempt,
    Counts,
    DuplicateKey,
    KeyNotFound,
    NewKey,
    Store,
    StoreError,
    StoreLost,
    open_store,
)
from kimi_rotator.store_redis import RedisStore, redacted

NOW = 1_790_000_000.0
SECRETS = [f"sk-{c * 40}" for c in "abcdef"]


def new_key(i: int, **kw: object) -> NewKey:
    return NewKey(secret=SECRETS[i], name=kw.pop("name", f"key{i}"), surface=Surface.MOONSHOT_AI, **kw)  # type: ignore[arg-type]


def success(key_id: int, at: float = NOW) -> Attempt:
    return Attempt(key_id, Outcome(kind=OutcomeKind.SUCCESS, scope=Scope.KEY), at)


def limited(key_id: int, at: float = NOW) -> Attempt:
    return Attempt(key_id, Outcome(kind=OutcomeKind.RATE_LIMITED, scope=Scope.KEY, until=at + 30.0), at)


@pytest.fixture(params=["sqlite", "redis"])
def spec(request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("redis_url") if request.param == "redis" else None


@pytest.fixture
def store(spec: str | None, tmp_path: Path) -> Iterator[Store]:
    with contextlib.closing(open_store(spec, tmp_path / "home")) as s:
        yield s


def test_keys_are_added_listed_renamed_and_removed(store: Store) -> None:
    added, skipped = store.add_keys([new_key(0), new_key(1, account="acme"), new_key(0)], NOW)
    assert [k.name for k in added] == ["key0", "key1"] and len(skipped) == 1
    listed = store.keys()
    assert [k.secret.get_secret_value() for k in listed] == SECRETS[:2]
    with pytest.raises(DuplicateKey, match="already in the pool as \\[0\\] key0"):
        store.add_key(new_key(0, name="other"), NOW)
    with pytest.raises(DuplicateKey, match="already exists"):
        store.rename_key(added[1].id, "key0")
    before, after = store.rename_key(added[1].id, "work")
    assert (before.name, after.name) == ("key1", "work") and store.resolve("work").id == added[1].id
    store.use_key(added[1].id)
    assert store.settings().active_key_id == added[1].id
    store.remove_key(added[1].id)
    remaining = store.keys()
    assert [k.name for k in remaining] == ["key0"] and store.settings().active_key_id is None
    with pytest.raises(KeyNotFound):
        store.set_disabled(added[1].id, "gone")
    third = store.add_key(new_key(2), NOW)
    assert third.id > added[1].id  # ids are never reused


def test_outcomes_move_counters_health_and_cooldowns(store: Store) -> None:
    a, b = store.add_keys([new_key(0, account="acme"), new_key(1, account="acme")], NOW)[0]
    store.record([success(a.id), success(a.id), limited(a.id)], mark=3)
    snap = store.snapshot()
    key = next(k for k in snap.keys if k.id == a.id)
    assert (key.total_requests, key.successful_requests, key.rate_limited_requests) == (3, 2, 1)
    assert key.cooldown_until is not None and key.cooldown_until > NOW
    assert snap.recorded == 3
    assert store.counts(NOW - 3600, per_hour=True)[a.id][int(NOW // 3600) * 3600] == Counts(3, 2, 1)
    day = store.counts(NOW - 86400, per_hour=False)[a.id]
    assert list(day.values()) == [Counts(3, 2, 1)]
    assert store.daily("0000-00-00")[a.id] == {"2026-09-21": (3, 2)}
    cleared = store.clear_limits([a.id])
    assert cleared[0].cooldown_until is None
    assert b.id not in store.counts(0, per_hour=False)


def test_commands_bump_edits_and_rev_but_outcomes_do_not(store: Store) -> None:
    a = store.add_key(new_key(0), NOW)
    first = store.snapshot()
    store.record([success(a.id)], mark=1)
    assert store.snapshot().edits == first.edits
    store.set_disabled(a.id, "paused")
    second = store.snapshot()
    assert second.edits > first.edits and second.keys[0].disabled_reason == "paused"
    store.update_settings(strategy="round-robin")
    third = store.snapshot()
    assert third.rev > second.rev and third.settings.strategy is Strategy.ROUND_ROBIN


def test_a_stale_current_key_is_not_saved_over_a_command(store: Store) -> None:
    a, b = store.add_keys([new_key(0), new_key(1)], NOW)[0]
    rev = store.snapshot().rev
    store.use_key(b.id)
    store.record([], active_key_id=a.id, rev=rev)
    assert store.settings().active_key_id == b.id


def test_accounts_quota_files_and_proxies(store: Store) -> None:
    a = store.add_key(new_key(0, account="acme"), NOW)
    group = a.limit_group
    store.update_account(group, lambda r: None if r is None else r)
    store.record_quota(group, Quota(checked_at=NOW, balance=3.5))
    found = store.accounts()[group]
    assert found.quota is not None and found.quota.balance == 3.5
    stated = store.update_account(group, lambda r: state_caps(r, group, {Limit.RPM: 12}))
    assert stated is not None and store.accounts()[group].cap(Limit.RPM) == 12
    store.remember_file("file-1", a.id, group, NOW)
    assert store.file_owner("file-1") == (a.id, group) and store.file_owner("nope") is None
    live = store.heartbeat("p1", 11, NOW - 5, NOW, 10.0, {group: (2, 7)})
    assert live == [("p1", 11, NOW - 5)]
    assert store.proxy_rows(NOW, 10.0)[0].usage == {group: (2, 7)}
    assert store.live_proxies(NOW + 20, 10.0) == []
    store.leave("p1", NOW, 10.0)
    assert store.proxy_rows(NOW, 10.0) == []


def test_rotate_moves_to_another_key(store: Store) -> None:
    a, b = store.add_keys([new_key(0), new_key(1)], NOW)[0]
    store.use_key(a.id)
    result = store.rotate(NOW)
    assert isinstance(result, engine.Selection) and result.key.id == b.id
    assert store.settings().active_key_id == b.id


# -- Redis only -------------------------------------------------------------------------------

@pytest.fixture
def redis_store(redis_url: str, tmp_path: Path) -> Iterator[RedisStore]:
    with contextlib.closing(RedisStore(redis_url, tmp_path / "home")) as s:
        yield s


def test_no_key_is_stored_in_clear(redis_store: RedisStore, redis_server: RedisServer) -> None:
    redis_store.add_keys([new_key(0), new_key(1, account="acme")], NOW)
    redis_store.record([success(1), limited(2)], mark=2)
    client = redis_server.client()
    dump = []
    for name in client.scan_iter("*"):
        kind = client.type(name)
        if kind == b"hash":
            dump += [*client.hgetall(name).keys(), *client.hgetall(name).values()]
        elif kind == b"set":
            dump += list(client.smembers(name))
        elif kind == b"zset":
            dump += list(client.zrange(name, 0, -1))
        else:
            dump.append(client.get(name) or b"")
    text = b"\n".join(dump)
    for secret in SECRETS[:2]:
        assert secret.encode() not in text and secret[-20:].encode() not in text
    assert b"v1." in text  # the sealed form is there


def test_a_second_machine_needs_the_secret_file(redis_url: str, redis_store: RedisStore, tmp_path: Path) -> None:
    redis_store.add_key(new_key(0), NOW)
    with pytest.raises(StoreError, match="copy the secret file"):
        RedisStore(redis_url, tmp_path / "other-machine")
    copy = tmp_path / "copied-secret"
    copy.write_bytes(redis_store.secret_file.read_bytes())
    copy.chmod(0o600)
    with contextlib.closing(RedisStore(redis_url, tmp_path / "other-machine", copy)) as other:
        assert other.keys()[0].secret.get_secret_value() == SECRETS[0]


def test_four_writers_lose_no_outcome(redis_url: str, redis_store: RedisStore, tmp_path: Path) -> None:
    key = redis_store.add_key(new_key(0), NOW)
    per_writer, writers = 250, 4
    stores = [redis_store.reopen() for _ in range(writers)]

    def write(s: RedisStore) -> None:
        for i in range(per_writer // 5):
            s.record([success(key.id, NOW + i)] * 5, mark=(i + 1) * 5)

    threads = [threading.Thread(target=write, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert redis_store.keys()[0].total_requests == per_writer * writers
    for s in stores:
        s.close()


def test_other_writers_commits_are_announced_within_100_ms(redis_store: RedisStore) -> None:
    key = redis_store.add_key(new_key(0), NOW)
    woke = threading.Event()
    redis_store.watch(woke.set)
    assert woke.wait(2.0)  # the first call comes once subscribed
    woke.clear()
    edits = redis_store.edits()
    cli = redis_store.reopen()
    try:
        started = time.monotonic()
        cli.set_disabled(key.id, "by the CLI")
        assert woke.wait(1.0)
        took = time.monotonic() - started
        deadline = time.monotonic() + 1.0
        while redis_store.edits() == edits and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        cli.close()
    assert took < 0.1 and redis_store.edits() > edits


def test_a_store_lost_by_redis_is_reported_not_recreated(redis_store: RedisStore, redis_server: RedisServer) -> None:
    key = redis_store.add_key(new_key(0), NOW)
    redis_server.flushall()
    with pytest.raises(StoreLost, match="was lost by Redis"):
        redis_store.data_version()
    with pytest.raises(StoreLost):
        redis_store.record([success(key.id)], mark=1)
    assert redis_server.client().dbsize() == 0  # nothing half-written into the empty server


def test_a_commit_whose_answer_was_lost_is_not_applied_twice(redis_store: RedisStore) -> None:
    key = redis_store.add_key(new_key(0), NOW)
    redis_store.record([success(key.id)] * 3, mark=3)
    redis_store._unsure = True  # as after a connection dropped during EXEC: 1-3 are in, the proxy sends 1-5
    redis_store.record([success(key.id)] * 5, mark=5)
    assert redis_store.keys()[0].total_requests == 5


def test_redis_urls_are_checked_and_passwords_never_shown(tmp_path: Path) -> None:
    assert redacted("redis://kimi:hunter2@10.0.0.5:6379/0") == "redis://kimi:***@10.0.0.5:6379/0"
    with pytest.raises(StoreError, match="not one kimi-rotate knows"):
        open_store("mysql://x", tmp_path)
    with pytest.raises(StoreError) as failed:
        open_store("redis://kimi:hunter2@127.0.0.1:1/0", tmp_path)
    assert "hunter2" not in str(failed.value) and "check that Redis runs" in str(failed.value)


def test_a_tls_redis_store_works_through_rediss(tmp_path: Path) -> None:
    """rediss://: the store and the shared counts over TLS, verified against the server's CA (Debian's redis-server
    is built with TLS)."""
    import asyncio
    import socket

    from certs import make_test_pki

    from kimi_rotator.shared_counts import SharedCounts

    pki = make_test_pki(tmp_path / "pki")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        tls_port = s.getsockname()[1]
    tls = ["--tls-port", str(tls_port), "--tls-cert-file", str(pki.server_cert), "--tls-key-file",
           str(pki.server_key), "--tls-ca-cert-file", str(pki.ca_cert), "--tls-auth-clients", "no"]
    with RedisServer(tmp_path / "redis", username="kimi", extra=tls) as server:
        url = server.url.replace("redis://", "rediss://").replace(f":{server.port}/", f":{tls_port}/")
        url += f"?ssl_ca_certs={pki.ca_cert}"
        with contextlib.closing(open_store(url, tmp_path / "home")) as s:
            s.add_key(new_key(0), NOW)
            assert s.keys()[0].secret.get_secret_value() == SECRETS[0] and "***" in s.where

        async def count() -> str | None:
            shared = SharedCounts.from_url(url, "kimi-rotate:", "p1")
            try:
                return (await shared.acquire((Surface.MOONSHOT_AI, "acme"), (3, 10))).lease_id
            finally:
                await shared.aclose()

        assert asyncio.run(count()) == "p1:1"
        with pytest.raises(StoreError, match="cannot reach the store"):  # a client that does not trust the CA
            open_store(url.split("?")[0], tmp_path / "home")


def test_a_store_restored_by_one_writer_is_lost_for_the_others(redis_url: str, redis_server: RedisServer,
                                                                tmp_path: Path) -> None:
    """Redis came back empty and writer A wrote its view back before writer B looked: B must still learn the store was
    lost (the outcomes it wrote since A's view are gone) and which of its batches A's view holds."""
    with contextlib.closing(RedisStore(redis_url, tmp_path)) as a, contextlib.closing(a.reopen()) as b:
        b.watch(lambda: None)  # as a proxy's pool does: B has outcomes to send again after a loss
        key = a.add_key(new_key(0), NOW)
        b.record([success(key.id)] * 2, mark=2)
        view = a.snapshot()  # holds B's batch up to mark 2
        b.record([success(key.id)] * 3, mark=5)  # lost with the server's data
        redis_server.flushall()
        assert a.restore(view, mark=0)
        with pytest.raises(StoreLost, match="another proxy wrote its view back"):
            b.data_version()
        assert not b.restore(view, mark=5) and b.applied_mark() == 2
        b.data_version()  # known now: no more StoreLost
        b.record([success(key.id)] * 3, mark=5)  # what B sends again
        assert a.keys()[0].total_requests == 5
