"""The account store: its API, many processes at once, kill -9, damaged files, permissions."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import sqlite3
import stat
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import platformdirs
import pytest

from kimi_rotator import engine
from kimi_rotator.models import KeyState, Outcome, OutcomeKind, PoolSettings, Strategy, Surface
from kimi_rotator.roster import Roster
from kimi_rotator.store import (
    HOME_ENV,
    Attempt,
    Conflict,
    DuplicateKey,
    KeyNotFound,
    NewKey,
    Store,
    StoreError,
    store_home,
    utc_day,
)
from kimi_rotator.store_sqlite import SCHEMA_VERSION, STORE_FILE, SqliteStore

NOW = 1_750_000_000.0  # 2025-06-15 15:06:40 UTC
DAY = 86_400.0


def secret(i: int, tag: str = "") -> str:
    return f"sk-kimi-{tag}test{i:016d}"


def new_key(i: int, **changes: object) -> NewKey:
    fields: dict[str, object] = {"secret": secret(i), "name": f"key {i}", "surface": Surface.KIMI_CODE}
    fields.update(changes)
    return NewKey(**fields)  # type: ignore[arg-type]


def fill(store: Store, n: int) -> list[int]:
    added, skipped = store.add_keys([new_key(i) for i in range(n)], NOW)
    assert not skipped
    return [k.id for k in added]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextmanager
def opened(home: Path) -> Iterator[Store]:
    s = SqliteStore(home)
    try:
        yield s
    finally:
        s.close()


# -- the API -------------------------------------------------------------------------------------------------------


def test_add_list_resolve_remove(store: Store) -> None:
    ids = fill(store, 3)
    keys = store.keys()
    assert [k.id for k in keys] == ids
    assert [k.name for k in keys] == ["key 0", "key 1", "key 2"]
    assert keys[0].secret.get_secret_value() == secret(0)
    assert keys[0].fingerprint != keys[1].fingerprint
    assert secret(0) not in repr(keys[0])
    assert all(
        (k.health, k.total_requests, k.added_at, k.state_at(NOW)) == (100.0, 0, NOW, KeyState.ACTIVE) for k in keys
    )

    assert store.resolve("1").id == ids[1]
    assert store.resolve(" key 2 ").id == ids[2]
    with pytest.raises(KeyNotFound, match="valid indexes are 0-2"):
        store.resolve("3")
    with pytest.raises(KeyNotFound, match="no key named 'nope'"):
        store.resolve("nope")

    with pytest.raises(DuplicateKey, match=r"already in the pool as \[0\] key 0; nothing was added"):
        store.add_key(new_key(0, name="another name"), NOW)
    with pytest.raises(DuplicateKey, match=r"a key named 'key 1' already exists \(\[1\]\); choose another name"):
        store.add_key(new_key(9, name="key 1"), NOW)
    assert len(store.keys()) == 3
    # Imports keep both keys: a taken name gets a number.
    (dup_name,), _ = store.add_keys([new_key(9, name="key 1")], NOW)
    assert dup_name.name == "key 1 2"
    unnamed = store.add_key(new_key(10, name=None), NOW)
    assert unnamed.name not in {k.name for k in keys}

    assert store.remove_key(ids[0]).id == ids[0]
    remaining = store.keys()
    assert [k.id for k in remaining] == [ids[1], ids[2], dup_name.id, unnamed.id]
    assert store.resolve("0").id == ids[1]  # indexes are list positions, ids stay
    with pytest.raises(KeyNotFound):
        store.remove_key(ids[0])
    for k in remaining:
        store.remove_key(k.id)
    with pytest.raises(KeyNotFound, match="the store has no keys"):
        store.resolve("0")


def test_add_keys_skips_duplicates_and_keeps_imported_history(store: Store) -> None:
    added, skipped = store.add_keys(
        [
            new_key(0, health=140.0, total_requests=10, successful_requests=7, last_used=NOW - 60),
            new_key(0, name="same secret"),
            new_key(1, health=-3.0, cooldown_until=NOW + 600, cooldown_reason="imported limit"),
        ],
        NOW,
    )
    assert [k.name for k in added] == ["key 0", "key 1"]
    assert [s.name for s in skipped] == ["same secret"]
    k0, k1 = store.keys()
    assert (k0.health, k0.total_requests, k0.successful_requests, k0.failed_requests) == (100.0, 10, 7, 3)
    assert k0.last_used == NOW - 60
    assert (k1.health, k1.cooldown_until, k1.cooldown_reason) == (0.0, NOW + 600, "imported limit")
    assert k1.state_at(NOW) is KeyState.COOLING


def test_refusing_duplicates_lists_every_clash_and_adds_nothing(store: Store) -> None:
    fill(store, 2)
    before = store.snapshot()
    batch = [
        new_key(5, name="new"),
        new_key(0, name="fresh"),  # secret in the pool
        new_key(6, name="key 1"),  # name in the pool
        new_key(5, name="other"),  # secret earlier in the batch
        new_key(7, name="new"),  # name earlier in the batch
    ]
    assert store.conflicts(batch) == [
        Conflict(1, "this key is already in the pool as [0] key 0", "nothing was added"),
        Conflict(2, "a key named 'key 1' already exists ([1])", "choose another name"),
        Conflict(3, "sk-kimi-…0005 is also in entry 0 of this batch", "give each key once"),
        Conflict(4, "the name 'new' is also in entry 0 of this batch", "give each key its own name"),
    ]
    with pytest.raises(DuplicateKey, match=r"as \[0\] key 0 \(and 3 more\); nothing was added") as info:
        store.add_keys(batch, NOW, refuse_duplicates=True)
    assert info.value.conflicts == store.conflicts(batch)
    assert store.snapshot() == before
    added, _ = store.add_keys([batch[0], new_key(8, name=None)], NOW, refuse_duplicates=True)
    assert [k.name for k in added] == ["new", "Account 4"]


def test_rename_and_set_account_keep_history(store: Store) -> None:
    (k0,), _ = store.add_keys(
        [new_key(0, total_requests=5, successful_requests=4, health=70.0, cooldown_until=NOW + 60,
                 cooldown_reason="rate limited")],
        NOW,
    )
    other = store.add_key(new_key(1, name="other"), NOW)
    before, after = store.rename_key(k0.id, "renamed")
    assert (before.name, after.name) == ("key 0", "renamed")
    _, after = store.set_account(k0.id, "acme")
    (stored, _) = store.keys()
    assert stored == after and stored.account == "acme" and stored.name == "renamed"
    assert dataclasses.replace(stored, name=k0.name, account=k0.account) == k0
    with pytest.raises(DuplicateKey, match=r"a key named 'other' already exists \(\[1\]\); choose another name"):
        store.rename_key(k0.id, "other")
    store.rename_key(other.id, "other")  # its own name: no clash
    store.set_account(k0.id, None)
    assert store.keys()[0].account is None
    with pytest.raises(KeyNotFound):
        store.rename_key(9999, "x")


def test_settings_persist_and_bad_values_change_nothing(kimi_home: Path) -> None:
    with opened(kimi_home) as s:
        assert s.settings() == PoolSettings()
        rev = s.snapshot().rev
        updated = s.update_settings(strategy="round-robin", health_refresh_cooldown_minutes=45)
        assert updated.strategy is Strategy.ROUND_ROBIN
        assert s.snapshot().rev == rev + 1
        with pytest.raises(StoreError, match="invalid setting"):
            s.update_settings(strategy="fastest")
    with opened(kimi_home) as s:
        assert s.settings() == PoolSettings(strategy=Strategy.ROUND_ROBIN, health_refresh_cooldown_minutes=45)
        assert s.snapshot().rev == rev + 1


def test_use_key_and_remove_active_key(store: Store) -> None:
    ids = fill(store, 3)
    store.use_key(ids[2])
    snap = store.snapshot()
    assert (snap.settings.active_key_id, snap.settings.serve_active_next) == (ids[2], True)
    store.remove_key(ids[2])
    snap2 = store.snapshot()
    assert snap2.settings.active_key_id is None
    assert snap2.rev > snap.rev
    with pytest.raises(KeyNotFound):
        store.use_key(ids[2])


def test_rotate_persists_and_reports_when_nothing_else_is_eligible(kimi_home: Path) -> None:
    with opened(kimi_home) as s:
        ids = fill(s, 3)
        s.use_key(ids[0])
        first = s.rotate(NOW)
        assert isinstance(first, engine.Selection) and first.key.id == ids[1]
    with opened(kimi_home) as s:
        settings = s.settings()
        assert (settings.active_key_id, settings.serve_active_next) == (ids[1], True)
        # The rotated-to key serves the next request.
        pick = engine.select(Roster(s.keys()), settings, NOW)
        assert isinstance(pick, engine.Selection) and pick.key.id == ids[1]
        s.remove_key(ids[0])
        s.set_disabled(ids[2], "disabled by hand")
        before = s.snapshot()
        result = s.rotate(NOW)
        assert isinstance(result, engine.NoEligibleKey) and result.disabled == 1
        assert s.snapshot() == before


def test_record_counts_exactly(store: Store) -> None:
    ids = fill(store, 3)
    store.update_settings(auto_refresh_health=False)
    kinds = [
        OutcomeKind.SUCCESS,
        OutcomeKind.SUCCESS,
        OutcomeKind.RATE_LIMITED,
        OutcomeKind.SERVER_ERROR,
        OutcomeKind.REQUEST_ERROR,
        OutcomeKind.SUCCESS,
    ]
    store.record(
        [Attempt(ids[0], Outcome(kind=k, latency_ms=100.0 + i, until=NOW + 120), NOW + i) for i, k in enumerate(kinds)]
        + [Attempt(ids[1], Outcome(kind=OutcomeKind.INVALID_KEY, reason="401"), NOW)],
        active_key_id=ids[0],
    )
    k0, k1, k2 = store.keys()
    assert (k0.total_requests, k0.successful_requests, k0.rate_limited_requests, k0.failed_requests) == (6, 3, 1, 2)
    assert k0.health == 87.0  # 100 (+2 capped) twice, -15, no penalty twice, +2
    assert (k0.cooldown_until, k0.latency_count, k0.latency_sum_ms) == (NOW + 120, 3, 100.0 + 101.0 + 105.0)
    assert k0.last_used == NOW + 5
    assert (k1.total_requests, k1.failed_requests, k1.disabled_reason, k1.health) == (1, 1, "401", 80.0)
    assert k2.total_requests == 0
    assert store.settings().active_key_id == ids[0]
    # An outcome for a key removed meanwhile is dropped, not an error; an unknown current key is ignored.
    store.remove_key(ids[2])
    store.record([Attempt(ids[2], Outcome(kind=OutcomeKind.SUCCESS), NOW)], active_key_id=ids[2])
    assert store.settings().active_key_id == ids[0]
    assert ids[2] not in store.daily("2000-01-01")


def test_record_moves_the_current_key_and_ends_serve_next(store: Store) -> None:
    ids = fill(store, 2)
    store.use_key(ids[0])
    rev = store.snapshot().rev
    store.record([], active_key_id=ids[1])
    snap = store.snapshot()
    assert (snap.settings.active_key_id, snap.settings.serve_active_next, snap.rev) == (ids[1], False, rev)
    # The proxy served the use-key target itself: that also ends "serve it next".
    store.use_key(ids[0])
    store.record([], active_key_id=ids[0])
    assert (store.settings().active_key_id, store.settings().serve_active_next) == (ids[0], False)


def test_record_does_not_undo_a_newer_use_key(store: Store) -> None:
    # The proxy chose ids[1] under rev r; meanwhile `use-key` moved the current key. Its batch still counts,
    # but its stale current key must not overwrite the command's.
    ids = fill(store, 3)
    rev = store.snapshot().rev
    store.use_key(ids[2])
    store.record([Attempt(ids[1], Outcome(kind=OutcomeKind.SUCCESS), NOW)], active_key_id=ids[1], rev=rev)
    snap = store.snapshot()
    assert (snap.settings.active_key_id, snap.settings.serve_active_next) == (ids[2], True)
    assert snap.keys[1].total_requests == 1
    # Once the proxy has seen the new rev, its choice is saved again.
    store.record([], active_key_id=ids[0], rev=snap.rev)
    assert (store.settings().active_key_id, store.settings().serve_active_next) == (ids[0], False)


def test_daily_counts_by_utc_day(store: Store) -> None:
    ids = fill(store, 2)
    day1, day2 = NOW, NOW + DAY
    attempts = [
        Attempt(ids[0], Outcome(kind=OutcomeKind.SUCCESS), day1),
        Attempt(ids[0], Outcome(kind=OutcomeKind.RATE_LIMITED, until=day1 + 1), day1),
        Attempt(ids[0], Outcome(kind=OutcomeKind.SUCCESS), day2),
        Attempt(ids[1], Outcome(kind=OutcomeKind.SERVER_ERROR), day2),
    ]
    store.record(attempts[:2])
    store.record(attempts[2:])
    d1, d2 = utc_day(day1), utc_day(day2)
    assert (d1, d2) == ("2025-06-15", "2025-06-16")
    assert store.daily(d1) == {ids[0]: {d1: (2, 1), d2: (1, 1)}, ids[1]: {d2: (1, 0)}}
    assert store.daily(d2) == {ids[0]: {d2: (1, 1)}, ids[1]: {d2: (1, 0)}}
    store.remove_key(ids[1])
    assert ids[1] not in store.daily(d1)


def test_disable_enable_clear_limits_and_refresh(store: Store) -> None:
    ids = fill(store, 3)
    store.record([Attempt(i, Outcome(kind=OutcomeKind.RATE_LIMITED, until=NOW + 600), NOW) for i in ids])
    store.set_disabled(ids[0], "disabled by hand")
    assert store.keys()[0].state_at(NOW) is KeyState.DISABLED
    enabled = store.set_disabled(ids[0], None)
    assert enabled.state_at(NOW) is KeyState.ACTIVE  # enabling also ends the cooldown
    assert [k.id for k in store.clear_limits([ids[1]])] == [ids[1]]
    states = [k.state_at(NOW) for k in list(store.keys())]
    assert states == [KeyState.ACTIVE, KeyState.ACTIVE, KeyState.COOLING]
    cleared = store.clear_limits(None)
    assert cleared == store.keys()
    assert all(k.cooldown_until is None and k.health == 85.0 for k in cleared)  # health is not restored

    refreshed = store.refresh_health(NOW)
    assert [(b.health, a.health) for b, a in refreshed] == [(85.0, 95.0)] * 3
    store.update_settings(auto_refresh_health=False)
    assert store.refresh_health(NOW) == []
    assert [k.health for k in list(store.keys())] == [95.0] * 3


def test_data_version_sees_other_connections(kimi_home: Path) -> None:
    with opened(kimi_home) as a, opened(kimi_home) as b:
        v = a.data_version()
        assert a.data_version() == v
        b.add_key(new_key(0), NOW)
        assert a.data_version() != v
        assert [k.name for k in list(a.keys())] == ["key 0"]


def test_store_home_honours_kimi_rotate_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "pool-a"))
    assert store_home() == tmp_path / "pool-a"
    with opened(store_home()) as s:
        s.add_key(new_key(0), NOW)
    s2 = SqliteStore()
    try:
        assert s2.path == tmp_path / "pool-a" / STORE_FILE
        assert [k.name for k in list(s2.keys())] == ["key 0"]
    finally:
        s2.close()
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(HOME_ENV, "~/pools/b")
    assert store_home() == tmp_path / "pools" / "b"
    monkeypatch.delenv(HOME_ENV)
    assert store_home() == Path(platformdirs.user_data_dir("kimi-rotate", appauthor=False))


# -- several processes ---------------------------------------------------------------------------------------------

# A proxy's writer: outcomes batched through Store.record, timing each transaction.
WRITER = r"""
import json, sys, time
from pathlib import Path
from kimi_rotator.models import Outcome, OutcomeKind
from kimi_rotator.store import Attempt
from kimi_rotator.store_sqlite import SqliteStore

home, wid, count, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ids, KINDS = json.loads(sys.argv[5]), [OutcomeKind(k) for k in json.loads(sys.argv[6])]
store = SqliteStore(home)
print("ready", flush=True)
sys.stdin.readline()
waits = []
start = time.perf_counter()
for first in range(0, count, batch):
    attempts = []
    for j in range(first, min(first + batch, count)):
        kind = KINDS[(wid + j) % len(KINDS)]
        latency = float(j % 7) if kind is OutcomeKind.SUCCESS else None
        attempts.append(Attempt(ids[j % len(ids)], Outcome(kind=kind, latency_ms=latency), time.time()))
    t = time.perf_counter()
    store.record(attempts)
    waits.append(time.perf_counter() - t)
print(json.dumps({"waits": waits, "elapsed": time.perf_counter() - start, "done": time.time()}), flush=True)
"""
WRITER_KINDS = [OutcomeKind.SUCCESS, OutcomeKind.RATE_LIMITED, OutcomeKind.SUCCESS, OutcomeKind.SERVER_ERROR]

# What the CLI does meanwhile: each run opens the store, adds or removes a key, and exits.
ADDER = r"""
import json, sys, time
from pathlib import Path
from kimi_rotator.models import Surface
from kimi_rotator.store import NewKey
from kimi_rotator.store_sqlite import SqliteStore

home, stop = Path(sys.argv[1]), Path(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
commits = []  # when each add and each remove was committed
while not commits or not stop.exists():
    s = SqliteStore(home)
    extra = NewKey(secret=f"sk-kimi-extra{len(commits):020d}", name=f"extra {len(commits)}", surface=Surface.KIMI_CODE)
    key = s.add_key(extra, time.time())
    commits.append(time.time())
    s.close()
    s = SqliteStore(home)
    s.remove_key(key.id)
    commits.append(time.time())
    s.close()
print(json.dumps(commits), flush=True)
"""


def spawn(script: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


@pytest.mark.slow
def test_four_writers_and_a_cli_lose_no_update(kimi_home: Path, tmp_path: Path) -> None:
    writers_n, per_writer, batch = 4, 2500, 25
    with opened(kimi_home) as s:
        ids = fill(s, 3)
    stop = tmp_path / "stop"
    kinds = json.dumps([k.value for k in WRITER_KINDS])
    writers = [spawn(WRITER, kimi_home, w, per_writer, batch, json.dumps(ids), kinds) for w in range(writers_n)]
    adder = spawn(ADDER, kimi_home, stop)
    procs = [*writers, adder]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        started = time.perf_counter()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [json.loads(p.communicate(timeout=120)[0]) for p in writers]
        wall = time.perf_counter() - started
        stop.touch()
        commits = json.loads(adder.communicate(timeout=60)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs)

    expected = {i: {"total": 0, "ok": 0, "rl": 0, "failed": 0} for i in ids}
    for w in range(writers_n):
        for j in range(per_writer):
            kind = WRITER_KINDS[(w + j) % len(WRITER_KINDS)]
            row = expected[ids[j % len(ids)]]
            row["total"] += 1
            row["ok" if kind is OutcomeKind.SUCCESS else "rl" if kind is OutcomeKind.RATE_LIMITED else "failed"] += 1
    with opened(kimi_home) as s:
        keys = s.keys()
        daily = s.daily("2000-01-01")
    assert [k.id for k in keys] == ids  # every extra key the CLI added was removed again
    got = {
        k.id: {
            "total": k.total_requests,
            "ok": k.successful_requests,
            "rl": k.rate_limited_requests,
            "failed": k.failed_requests,
        }
        for k in keys
    }
    assert got == expected
    assert sum(k.total_requests for k in keys) == writers_n * per_writer
    assert sum(k.latency_count for k in keys) == sum(row["ok"] for row in expected.values())
    assert sum(req for per_day in daily.values() for req, _ in per_day.values()) == writers_n * per_writer

    # The CLI's changes really interleaved with the writers' transactions.
    writers_done = min(r["done"] for r in results)
    during = sum(t < writers_done for t in commits)
    waits = [w for r in results for w in r["waits"]]
    p50, p99 = statistics.median(waits), percentile(waits, 99)
    rate = writers_n * per_writer / wall
    print(
        f"\n4 writers x {per_writer} outcomes (batches of {batch}) + {len(commits)} CLI add/remove commits "
        f"({during} while writing): {rate:,.0f} outcomes/s, {len(waits) / wall:,.0f} transactions/s, "
        f"record() wait p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {max(waits) * 1000:.1f} ms"
    )
    assert during >= 1
    assert p99 < 1.0, f"p99 transaction wait {p99:.3f} s"


# One outcome per transaction, reporting each commit.
KILL_WRITER = r"""
import sys, time
from pathlib import Path
from kimi_rotator.models import Outcome, OutcomeKind
from kimi_rotator.store import Attempt
from kimi_rotator.store_sqlite import SqliteStore

store = SqliteStore(Path(sys.argv[1]))
key_id = int(sys.argv[2])
n = 0
while True:
    store.record([Attempt(key_id, Outcome(kind=OutcomeKind.SUCCESS, latency_ms=1.0), time.time())])
    n += 1
    print(n, flush=True)
"""


def committed_total(home: Path) -> int:
    with opened(home) as s:  # must open after every kill
        return sum(k.total_requests for k in list(s.keys()))


@pytest.mark.slow
def test_kill_9_mid_stream_loses_no_committed_outcome(kimi_home: Path) -> None:
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    with opened(kimi_home) as s:
        (key_id,) = fill(s, 1)
    total = 0
    for run in range(20):
        before = committed_total(kimi_home)
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_WRITER, str(kimi_home), str(key_id)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        reported = 0
        if run % 2:
            # After a random number of reported commits, plus up to ~one transaction's time.
            target = rng.randint(1, 150)
            while reported < target and (line := proc.stdout.readline()):
                reported = int(line)
            time.sleep(rng.uniform(0, 0.002))
        else:
            # At a random moment from start-up on: importing, opening the store, or writing.
            time.sleep(rng.uniform(0.0, 0.8))
        proc.kill()
        proc.wait()
        out = proc.stdout.read()
        proc.stdout.close()
        lines = [line for line in out.splitlines(keepends=True) if line.endswith("\n")]
        if lines:
            reported = int(lines[-1])
        gained = committed_total(kimi_home) - before
        assert reported <= gained <= reported + 1, f"run {run} (seed {seed}): {reported} reported, {gained} stored"
        total += gained
    with opened(kimi_home) as s:
        (k,) = s.keys()
        assert (k.total_requests, k.successful_requests, k.latency_count) == (total, total, total)
        assert sum(req for req, _ in s.daily("2000-01-01")[key_id].values()) == total
    db = sqlite3.connect(kimi_home / STORE_FILE)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()


CREATOR = r"""
import sys, time
from pathlib import Path
from kimi_rotator.models import Surface
from kimi_rotator.store import NewKey
from kimi_rotator.store_sqlite import SqliteStore
print("imported", flush=True)
s = SqliteStore(Path(sys.argv[1]))
s.add_key(NewKey(secret="sk-kimi-created0000000000000", surface=Surface.KIMI_CODE), time.time())
print("added", flush=True)
"""


@pytest.mark.slow
def test_kill_9_while_creating_a_store_leaves_one_that_opens(tmp_path: Path) -> None:
    rng = random.Random()
    for run in range(5):
        home = tmp_path / f"home{run}"
        proc = subprocess.Popen([sys.executable, "-c", CREATOR, str(home)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline() == "imported\n"
        time.sleep(rng.uniform(0, 0.03))  # opening and the first write take ~25 ms
        proc.kill()
        proc.wait()
        proc.stdout.close()
        with opened(home) as s:  # whatever was left (nothing, an empty file, a half-made store) opens
            assert len(s.keys()) <= 1
            s.add_key(new_key(1), NOW)
        assert mode(home / STORE_FILE) == 0o600


# -- damaged stores ------------------------------------------------------------------------------------------------


def _real_store(home: Path) -> None:
    with opened(home) as s:
        ids = fill(s, 60)
        s.record([Attempt(i, Outcome(kind=OutcomeKind.SUCCESS), NOW) for i in ids])


def _garbage(home: Path) -> None:
    home.mkdir(mode=0o700)
    (home / STORE_FILE).write_bytes(b"this is not a database\n" + random.Random(1).randbytes(8192))


def _truncated(home: Path) -> None:
    real = home.parent / "real"
    _real_store(real)
    data = (real / STORE_FILE).read_bytes()
    assert len(data) > 16_384
    home.mkdir(mode=0o700)
    (home / STORE_FILE).write_bytes(data[: len(data) // 2])


def _newer(home: Path) -> None:
    _real_store(home)
    db = sqlite3.connect(home / STORE_FILE)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()


@pytest.mark.parametrize(
    ("make", "advice"),
    [(_garbage, "move it aside"), (_truncated, "move it aside"), (_newer, "upgrade kimi-rotate")],
    ids=["garbage", "truncated", "newer-schema"],
)
def test_damaged_store_gives_a_clear_error_and_is_left_untouched(
    tmp_path: Path, make: Callable[[Path], None], advice: str
) -> None:
    home = tmp_path / "home"
    make(home)
    path = home / STORE_FILE
    digest, size, listing = sha256(path), path.stat().st_size, sorted(os.listdir(home))
    for _ in range(2):  # a second try (the next CLI run) does not "repair" it either
        with pytest.raises(StoreError) as info:
            SqliteStore(home)
        message = str(info.value)
        assert str(path) in message
        assert advice in message
        assert sha256(path) == digest and path.stat().st_size == size
        assert sorted(os.listdir(home)) == listing


def test_empty_file_opens_as_a_fresh_store(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    path = home / STORE_FILE
    path.touch(mode=0o600)
    with opened(home) as s:
        assert s.keys() == []
        s.add_key(new_key(0), NOW)
    with opened(home) as s:
        assert [k.name for k in list(s.keys())] == ["key 0"]
    assert mode(path) == 0o600


# -- permissions ---------------------------------------------------------------------------------------------------


def test_new_store_is_private_even_with_an_open_umask(tmp_path: Path) -> None:
    home = tmp_path / "a" / "b" / "home"
    old = os.umask(0)
    try:
        s = SqliteStore(home)
        try:
            s.add_key(new_key(0), NOW)  # a write: the -wal and -shm files exist now
            files = {name: mode(home / name) for name in os.listdir(home)}
        finally:
            s.close()
    finally:
        os.umask(old)
    assert mode(home) == 0o700
    assert files == {STORE_FILE: 0o600, f"{STORE_FILE}-wal": 0o600, f"{STORE_FILE}-shm": 0o600}


def test_an_open_existing_folder_is_tightened(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o755)
    with opened(home):
        pass
    assert mode(home) == 0o700


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions, so a read-only folder is writable")
def test_read_only_folder_gives_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o500)
    with_store = tmp_path / "with-store"
    with opened(with_store) as s:
        s.add_key(new_key(0), NOW)
    with_store.chmod(0o500)
    try:
        for home in (empty, with_store):
            with pytest.raises(StoreError) as info, opened(home) as s:
                s.add_key(new_key(1), NOW)
            assert str(home) in str(info.value)
            assert HOME_ENV in str(info.value) or "writable" in str(info.value)
    finally:
        empty.chmod(0o700)
        with_store.chmod(0o700)


def test_unusable_folder_gives_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store folder should be")
    home = blocker / "home"
    with pytest.raises(StoreError) as info:
        SqliteStore(home)
    assert str(home) in str(info.value)
    assert HOME_ENV in str(info.value)
    assert blocker.read_text() == "a file where the store folder should be"


# Another process replaces the store's keys with one key of this name.
REPLACER = r"""
import sys, time
from pathlib import Path
from kimi_rotator.models import Surface
from kimi_rotator.store import NewKey
from kimi_rotator.store_sqlite import SqliteStore

s = SqliteStore(Path(sys.argv[1]))
for k in s.keys():
    s.remove_key(k.id)
s.add_key(NewKey(secret="sk-kimi-" + sys.argv[2] * 40, name=sys.argv[2], surface=Surface.KIMI_CODE), time.time())
s.close()
"""


def test_a_second_store_in_one_process_leaves_the_first_seeing_other_processes(tmp_path: Path) -> None:
    """SQLite's locks are the process's: a second Store that opened the file itself (to check its header) dropped the
    first one's, which then read an old state for good (the proxy's quota watch opens one beside the pool's)."""
    home = tmp_path / "home"

    def replace_keys(name: str) -> None:
        subprocess.run([sys.executable, "-c", REPLACER, str(home), name], check=True, timeout=60)

    with opened(home) as first:
        first.add_key(new_key(0), NOW)
        replace_keys("b")
        with opened(home) as second:
            second.clear_limits(None)
            replace_keys("c")
            assert [k.name for k in first.snapshot().keys] == [k.name for k in second.snapshot().keys] == ["c"]
        replace_keys("d")
        assert [k.name for k in first.snapshot().keys] == [k.name for k in first.fresh_snapshot().keys] == ["d"]
