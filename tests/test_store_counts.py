"""The store's per-hour and per-day counts of requests, successes and 429s (what `stats --plot` draws)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from kimi_rotator import store_sqlite as store_module
from kimi_rotator.models import Outcome, OutcomeKind, Surface
from kimi_rotator.store import HOURLY_KEPT_HOURS, Attempt, Counts, NewKey, Store
from kimi_rotator.store_sqlite import MIGRATIONS, STORE_FILE, SqliteStore

NOW = 1_750_000_000.0  # 2025-06-15 15:06:40 UTC
HOUR = 3600
DAY_START = 1_749_945_600  # 2025-06-15 00:00 UTC
HOUR_START = 1_749_999_600  # 15:00 UTC that day


def add(store: Store, n: int) -> list[int]:
    added, _ = store.add_keys(
        [NewKey(secret=f"sk-kimi-count{i:016d}", name=f"k{i}", surface=Surface.KIMI_CODE) for i in range(n)], NOW
    )
    return [k.id for k in added]


def attempt(key_id: int, kind: OutcomeKind, at: float) -> Attempt:
    until = at + 1 if kind is OutcomeKind.RATE_LIMITED else None
    return Attempt(key_id, Outcome(kind=kind, until=until), at)


def test_record_counts_per_hour_and_day(store: Store) -> None:
    a, b = add(store, 2)
    store.record([
        attempt(a, OutcomeKind.SUCCESS, NOW),
        attempt(a, OutcomeKind.RATE_LIMITED, NOW + 1),
        attempt(a, OutcomeKind.SUCCESS, NOW + HOUR),
        attempt(b, OutcomeKind.SERVER_ERROR, NOW),
    ])
    store.record([attempt(a, OutcomeKind.RATE_LIMITED, NOW + 2), attempt(b, OutcomeKind.QUOTA_EXHAUSTED, NOW)])
    assert store.counts(NOW - HOUR, per_hour=True) == {
        a: {HOUR_START: Counts(3, 1, 2), HOUR_START + HOUR: Counts(1, 1, 0)},
        b: {HOUR_START: Counts(2, 0, 0)},  # an exhausted quota is not a rate limit
    }
    assert store.counts(NOW + HOUR, per_hour=True) == {a: {HOUR_START + HOUR: Counts(1, 1, 0)}}
    assert store.counts(NOW, per_hour=False) == {a: {DAY_START: Counts(4, 2, 2)}, b: {DAY_START: Counts(2, 0, 0)}}
    assert store.daily("2025-06-15") == {a: {"2025-06-15": (4, 2)}, b: {"2025-06-15": (2, 0)}}
    store.remove_key(b)
    assert b not in store.counts(0, per_hour=True) and b not in store.counts(0, per_hour=False)


def test_old_hours_are_dropped_but_days_stay(store: Store) -> None:
    (a,) = add(store, 1)
    old = NOW - (HOURLY_KEPT_HOURS + 2) * HOUR
    store.record([attempt(a, OutcomeKind.SUCCESS, old)])
    assert store.counts(0, per_hour=True) == {a: {int(old // HOUR) * HOUR: Counts(1, 1, 0)}}
    store.record([attempt(a, OutcomeKind.SUCCESS, NOW)])
    assert store.counts(0, per_hour=True) == {a: {HOUR_START: Counts(1, 1, 0)}}
    assert sum(c.requests for c in store.counts(0, per_hour=False)[a].values()) == 2


def test_a_schema_2_store_keeps_its_daily_counts(kimi_home: Path) -> None:
    path = kimi_home / STORE_FILE
    kimi_home.mkdir(parents=True, exist_ok=True)
    kimi_home.chmod(0o700)
    db = sqlite3.connect(path)
    for script in MIGRATIONS[:2]:
        db.executescript(script)
    db.execute(
        "INSERT INTO keys (secret, fingerprint, name, surface, added_at) VALUES ('sk-kimi-old', 'f', 'old', ?, 0)",
        (Surface.KIMI_CODE.value,),
    )
    db.execute("INSERT INTO daily (key_id, day, requests, successes) VALUES (1, '2025-06-15', 7, 5)")
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()
    path.chmod(0o600)
    # Read-only, an old store is read through an upgraded copy and the file is left at schema 2.
    with contextlib.closing(SqliteStore(kimi_home, readonly=True)) as old:
        assert old.counts(NOW, per_hour=False) == {1: {DAY_START: Counts(7, 5, 0)}}
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 2
    with contextlib.closing(SqliteStore(kimi_home)) as s:
        assert s.daily("2025-06-15") == {1: {"2025-06-15": (7, 5)}}
        s.record([attempt(1, OutcomeKind.RATE_LIMITED, NOW)])
        assert s.counts(NOW, per_hour=False) == {1: {DAY_START: Counts(8, 5, 1)}}
        assert s.counts(NOW, per_hour=True) == {1: {HOUR_START: Counts(1, 0, 1)}}
    version = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0]
    assert version == store_module.SCHEMA_VERSION == len(MIGRATIONS)
