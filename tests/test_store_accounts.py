"""The store's accounts (caps, quota), file owners and running proxies, and the upgrade from schema 1."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from kimi_rotator import store_sqlite as store_module
from kimi_rotator.models import (
    AccountRecord,
    CapSource,
    LearnedCap,
    Limit,
    Outcome,
    OutcomeKind,
    Quota,
    QuotaWindow,
    Surface,
)
from kimi_rotator.store import Attempt, NewKey, Store
from kimi_rotator.store_sqlite import MIGRATIONS, SCHEMA_VERSION, STORE_FILE, SqliteStore

NOW = 1_750_000_000.0
GROUP = (Surface.MOONSHOT_AI, "uid:alice")


def rpm(value: int, source: CapSource = CapSource.MESSAGE, at: float = NOW) -> LearnedCap:
    return LearnedCap(limit=Limit.RPM, value=value, source=source, at=at)


def test_a_schema_1_store_is_upgraded_and_keeps_its_keys(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    db = sqlite3.connect(home / STORE_FILE, isolation_level=None)
    for statement in MIGRATIONS[0].split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO keys (secret, fingerprint, name, surface, added_at) "
               "VALUES ('sk-old-0000000000000000', 'abcd', 'old', 'moonshot-ai', 1.0)")
    db.close()
    os.chmod(home / STORE_FILE, 0o600)

    # A reader of a read-only old store sees the keys and no accounts, and changes nothing on disk.
    reader = SqliteStore(home, readonly=True)
    assert [key.name for key in Store.keys(reader)] == ["old"] and reader.accounts() == {}
    reader.close()
    assert sqlite3.connect(home / STORE_FILE).execute("PRAGMA user_version").fetchone()[0] == 1

    store = SqliteStore(home)
    assert [key.name for key in Store.keys(store)] == ["old"]
    assert store.accounts() == {}
    assert sqlite3.connect(home / STORE_FILE).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    store.close()


def test_stated_caps_survive_caps_a_proxy_learns(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "h")
    stated = store.update_account(GROUP, lambda r: AccountRecord(surface=GROUP[0], account=GROUP[1],
                                                                 stated={Limit.CONCURRENCY: 7}))
    assert stated is not None and stated.cap(Limit.CONCURRENCY) == 7
    (key,), _ = store.add_keys([NewKey(secret="sk-test-0000000000000001", surface=GROUP[0], account=GROUP[1])], NOW)

    def learn(*found: LearnedCap, at: float = NOW) -> None:
        store.record([Attempt(key.id, Outcome(kind=OutcomeKind.RATE_LIMITED, caps=found), at)])

    learn(rpm(200), LearnedCap(limit=Limit.CONCURRENCY, value=50, source=CapSource.MESSAGE))
    record = store.accounts()[GROUP]
    assert record.stated == {Limit.CONCURRENCY: 7}
    assert record.cap(Limit.CONCURRENCY) == 7  # stated wins
    assert record.cap(Limit.RPM) == 200 and record.learned[Limit.RPM].source is CapSource.MESSAGE
    assert record.learned[Limit.RPM].at == NOW
    # A weaker source does not replace a message's number; a newer message corrects it.
    learn(rpm(5000, CapSource.TIER), at=NOW + 1)
    assert store.accounts()[GROUP].cap(Limit.RPM) == 200
    learn(rpm(150), at=NOW + 2)
    assert store.accounts()[GROUP].learned[Limit.RPM] == rpm(150, at=NOW + 2)
    store.close()


def test_learned_caps_ride_along_with_outcomes_in_one_transaction(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "h")
    (key,), _ = store.add_keys([NewKey(secret="sk-test-0000000000000001", surface=Surface.MOONSHOT_AI,
                                       account="uid:alice")], NOW)
    ok = Outcome(kind=OutcomeKind.SUCCESS, caps=(rpm(200, CapSource.HEADER, at=0.0),))
    store.record([Attempt(key.id, ok, NOW)], mark=3)
    snap = store.snapshot()
    assert snap.keys[0].total_requests == 1 and snap.accounts[GROUP].learned[Limit.RPM] == rpm(200, CapSource.HEADER)
    assert snap.recorded == 3
    store.close()


def test_quota_is_saved_and_read_back(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "h")
    quota = Quota(checked_at=NOW, windows=(QuotaWindow(name="5h", limit=100.0, remaining=0.0, reset_at=NOW + 60),
                                           QuotaWindow(name="weekly", limit=None, remaining=5.0, reset_at=None)),
                  level="LEVEL_INTERMEDIATE")
    group = (Surface.KIMI_CODE, "uid:bob")
    store.record_quota(group, quota)
    assert store.accounts()[group].quota == quota
    assert quota.exhausted_until() == NOW + 60
    balance = Quota(checked_at=NOW + 5, balance=-0.5)
    store.record_quota(group, balance)
    assert store.accounts()[group].quota == balance
    store.close()


def test_damaged_account_rows_read_as_unknown_not_as_errors(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "h")
    db = sqlite3.connect(store.path, isolation_level=None)
    db.execute("INSERT INTO accounts VALUES ('moonshot-ai', 'a', '{\"rpm\": -1, \"xyz\": 3}', 'not json', '[]')")
    db.execute("INSERT INTO accounts VALUES ('mars', 'b', '{}', '{}', NULL)")
    db.execute("INSERT INTO accounts VALUES ('moonshot-cn', 'c', '{\"rpm\": 9}', "
               "'{\"concurrency\": {\"value\": 4, \"source\": \"message\"}, \"tpm\": {\"value\": \"x\"}}', NULL)")
    db.close()
    accounts = store.accounts()
    assert accounts[(Surface.MOONSHOT_AI, "a")].stated == {} and accounts[(Surface.MOONSHOT_AI, "a")].quota is None
    assert (Surface.MOONSHOT_AI, "b") not in accounts and len(accounts) == 2
    c = accounts[(Surface.MOONSHOT_CN, "c")]
    assert c.cap(Limit.RPM) == 9 and c.cap(Limit.CONCURRENCY) == 4 and Limit.TPM not in c.learned
    store.close()


def test_files_remember_their_uploader(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "h")
    assert store.file_owner("file-1") is None
    store.remember_file("file-1", 4, GROUP, NOW)
    assert store.file_owner("file-1") == (4, GROUP)
    store.remember_file("file-1", 5, GROUP, NOW + 1)  # the same id again: the latest upload owns it
    assert store.file_owner("file-1") == (5, GROUP)
    store.close()


def test_running_proxies_are_listed_oldest_first_and_leave(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "h")
    assert store.heartbeat("b", 2, NOW + 1, NOW + 1, ttl=10) == [("b", 2, NOW + 1)]
    assert [p[0] for p in store.heartbeat("a", 1, NOW, NOW + 2, ttl=10)] == ["a", "b"]
    assert [p[0] for p in store.live_proxies(NOW + 12, ttl=10)] == ["a"]  # b was last seen at NOW + 1
    store.leave("a", NOW + 12, ttl=10)
    assert store.live_proxies(NOW + 12, ttl=10) == []
    store.close()


def test_commands_on_accounts_reach_a_running_proxy(tmp_path: Path) -> None:
    """update_account is a command: it bumps the edit count that a proxy checks before each request."""
    store = SqliteStore(tmp_path / "h")
    before = store.edits()
    store.update_account(GROUP, lambda r: AccountRecord(surface=GROUP[0], account=GROUP[1], stated={Limit.RPM: 3}))
    assert store.edits() == before + 1
    store.update_account(GROUP, lambda r: r)  # no change: nothing written
    assert store.edits() == before + 1
    assert store.fresh_snapshot().accounts[GROUP].stated == {Limit.RPM: 3}
    store.close()


def test_schema_constant_matches_the_migrations() -> None:
    assert len(store_module.MIGRATIONS) == SCHEMA_VERSION
