"""The account store: what every proxy and CLI run on one pool shares, behind one interface.

`Store` holds what a change does (add a key, apply a proxy's outcomes, rotate...) once, written against `Rows`: the
rows one transaction reads and writes. Each backend supplies the transactions and the reads of its own:
- `store_sqlite.SqliteStore`: one SQLite file (WAL) in the store folder, the default;
- `store_redis.RedisStore`: a Redis server that several proxies on several machines share (`kimi_store`).
A transaction reads the rows, runs the engine and writes the result atomically, so concurrent writers serialise
instead of overwriting each other. `open_store` picks the backend from what the user named.
"""

from __future__ import annotations

import contextlib
import functools
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import platformdirs

from . import caps, engine
from .errors import UserError
from .keys import mask
from .models import (
    AccountRecord,
    Group,
    KeyRecord,
    LearnedCap,
    Outcome,
    OutcomeKind,
    PoolSettings,
    Quota,
    Strategy,
    Surface,
)
from .roster import Roster

if TYPE_CHECKING:
    from .accounts_db import ProxyRow
    from .probe import ProbeResult
    from .shared_counts import SharedCounts

HOME_ENV = "KIMI_ROTATE_HOME"
STORE_ENV = "KIMI_ROTATE_STORE"  # a Redis URL: the pool lives there instead of in the store folder's file
SECRET_ENV = "KIMI_ROTATE_STORE_SECRET"  # the path of the file sealing a Redis store's keys (a path, not the secret)
BUSY_TIMEOUT = 10.0  # seconds a transaction waits for other writers before giving up
HOURLY_KEPT_HOURS = 14 * 24  # older hourly rows are deleted when newer ones are written


class StoreError(UserError):
    """A problem with the store that the user can act on; the message says what to do."""


class StoreBusy(StoreError):
    """Other writers held the store longer than the caller was willing to wait; nothing was changed."""


class KeyNotFound(StoreError):
    pass


class StoreUnreachable(StoreError):
    """The store's server does not answer (for now): a proxy serves from its last view meanwhile and writes what it
    counted when the server is back."""


class StoreLost(StoreError):
    """The store's server lost it (a Redis restarted without persistence, or flushed): a proxy writes it back."""


@dataclass(frozen=True)
class Conflict:
    """Why one key of a batch can't be added (or a key can't take a name): its secret or its name is taken."""

    position: int  # in the batch given to add_keys
    problem: str  # e.g. "this key is already in the pool as [0] main"
    advice: str  # what to do about it


# Names an entry of a batch (by its position) in a clash's message, after "is also": `in entry 2 of this batch`.
Where = Callable[[int], str]


def in_batch(position: int) -> str:
    return f"in entry {position} of this batch"


class DuplicateKey(StoreError):
    """A secret or a name is already in the pool, or twice in one batch; nothing was changed.
    `conflicts` holds every clash of the batch, not only the first."""

    def __init__(self, conflicts: Sequence[Conflict]) -> None:
        self.conflicts = list(conflicts)
        first = self.conflicts[0]
        more = f" (and {len(self.conflicts) - 1} more)" if len(self.conflicts) > 1 else ""
        super().__init__(f"{first.problem}{more}; {first.advice}")


@dataclass(frozen=True, kw_only=True)
class NewKey:
    """A key to add, with optional history (imports carry health, counters and cooldowns)."""

    secret: str
    name: str | None = None
    surface: Surface
    account: str | None = None
    health: float = engine.START_HEALTH
    total_requests: int = 0
    successful_requests: int = 0
    rate_limited_requests: int = 0
    cooldown_until: float | None = None
    cooldown_reason: str | None = None
    disabled_reason: str | None = None
    added_at: float | None = None
    last_used: float | None = None


class Counts(NamedTuple):
    """What a key did in one hour or day."""

    requests: int
    successes: int
    rate_limited: int  # 429s that said to slow down (not an exhausted quota)


@dataclass(frozen=True)
class Attempt:
    key_id: int
    outcome: Outcome
    at: float


@dataclass(frozen=True)
class Snapshot:
    keys: list[KeyRecord]
    settings: PoolSettings
    rev: int  # bumped by commands that move the current key (use-key, rotate, set-strategy)
    edits: int = 0  # bumped by every command that changes something (any change but a proxy's outcomes)
    # About the read, not the store's content (so not compared): the highest `mark` that record() on this Store had
    # committed when the snapshot was read, and the order of this Store's reads (a later one holds all an earlier did).
    recorded: int = field(default=0, compare=False)
    taken: int = field(default=0, compare=False)
    accounts: dict[Group, AccountRecord] = field(default_factory=dict)
    # Each writer's last batch mark that the snapshot holds, by writer (a backend that can lose its data keeps them,
    # so that after a loss every writer knows which of its outcomes to send again).
    writers: dict[str, int] = field(default_factory=dict, compare=False)


# Per key and hour: [requests, successes, rate_limited] to add (Rows.count).
Tally = dict[tuple[int, int], list[int]]
# Per key: {start of the hour or UTC day (epoch seconds): Counts}.
Counters = dict[int, dict[int, Counts]]


class FileRecord(NamedTuple):
    """Which key uploaded a file (files live on the key's account), and when."""

    key_id: int
    group: Group
    uploaded_at: float


@dataclass(frozen=True)
class StoreImage:
    """A whole store, as `store migrate` copies it: everything but what belongs to running processes (their
    heartbeats, a proxy's count of applied outcomes). Keys carry their ids, so counters and file owners follow."""

    keys: list[KeyRecord]
    settings: PoolSettings
    rev: int
    next_key_id: int  # ids are never reused, not even those of removed keys
    accounts: dict[Group, AccountRecord]
    hourly: Counters
    daily: Counters
    files: dict[str, FileRecord]

    def days(self) -> int:
        """How many UTC days have counters."""
        return len({start for days in self.daily.values() for start in days})

    def differences(self, other: StoreImage) -> list[str]:
        """What differs from `other`, in words that show no key (empty: the same store)."""
        out = []
        mine, theirs = {k.id: k for k in self.keys}, {k.id: k for k in other.keys}
        for key_id in sorted(mine.keys() | theirs.keys()):
            if mine.get(key_id) != theirs.get(key_id):
                known = mine.get(key_id) or theirs[key_id]
                out.append(f"key {known.name} ({known.fingerprint})")
        for what in ("settings", "rev", "next_key_id", "accounts", "hourly", "daily", "files"):
            if getattr(self, what) != getattr(other, what):
                out.append({"hourly": "hourly counters", "daily": "daily counters", "files": "file owners",
                            "next_key_id": "next key id"}.get(what, what))
        return out


def store_home() -> Path:
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir("kimi-rotate", appauthor=False))


def utc_day(ts: float) -> str:
    return _day_name(int(ts // 86400))


@functools.lru_cache(maxsize=16)
def _day_name(day: int) -> str:  # formatting a date costs more than the rest of recording an outcome
    return datetime.fromtimestamp(day * 86400, UTC).strftime("%Y-%m-%d")


def day_start(day: str) -> int:
    """The epoch second a UTC day (YYYY-MM-DD) starts."""
    return int(datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC).timestamp())


def daily_tally(hourly: Tally) -> dict[tuple[int, str], list[int]]:
    """Hourly counts summed per key and UTC day."""
    daily: dict[tuple[int, str], list[int]] = {}
    for (key_id, hour), (req, ok, limited) in hourly.items():
        tally = daily.setdefault((key_id, utc_day(hour * 3600)), [0, 0, 0])
        tally[0] += req
        tally[1] += ok
        tally[2] += limited
    return daily


class Rows(ABC):
    """What one transaction of a backend reads and writes. Reads see the store as of the transaction; writes are
    applied together when it ends, or not at all."""

    @abstractmethod
    def keys(self) -> list[KeyRecord]:
        """Every key, in list-keys order (the order they were added)."""

    def involved(self, ids: set[int], accounts: set[str]) -> list[KeyRecord]:
        """The keys an outcome batch can change: the keys themselves and every key of their accounts (and of
        `accounts`). A backend may read fewer rows than keys() does."""
        keys = self.keys()
        groups = {k.account for k in keys if k.id in ids and k.account is not None} | accounts
        return [k for k in keys if k.id in ids or (k.account is not None and k.account in groups)]

    def key(self, key_id: int) -> KeyRecord:
        for k in self.keys():
            if k.id == key_id:
                return k
        raise KeyNotFound("that key was removed meanwhile; see `kimi-rotate list-keys`")

    @abstractmethod
    def save_keys(self, keys: Iterable[KeyRecord]) -> None:
        """Write what can change in these keys (not their secret, fingerprint or id)."""

    @abstractmethod
    def insert_key(self, new: NewKey, name: str, now: float) -> KeyRecord: ...

    @abstractmethod
    def delete_key(self, key_id: int) -> None:
        """Remove a key with its counters."""

    @abstractmethod
    def settings(self) -> PoolSettings: ...

    @abstractmethod
    def rev(self) -> int: ...

    @abstractmethod
    def save_settings(self, settings: PoolSettings, bump: bool) -> None:
        """`bump`: the change moves the current key (use-key, rotate...): rev moves, and a proxy's stale choice of
        the current key is then not saved over it."""

    @abstractmethod
    def account(self, group: Group) -> AccountRecord | None: ...

    @abstractmethod
    def accounts(self) -> dict[Group, AccountRecord]: ...

    @abstractmethod
    def save_accounts(self, records: Iterable[AccountRecord]) -> None: ...

    @abstractmethod
    def count(self, hourly: Tally) -> None:
        """Add attempts' counts to the hourly and daily counters (hourly ones older than HOURLY_KEPT_HOURS go)."""

    @abstractmethod
    def counters(self, since: float, per_hour: bool) -> Counters:
        """Per key: {start of the hour or UTC day (epoch seconds): Counts} for the buckets from the one holding
        `since` on."""

    @abstractmethod
    def files(self) -> dict[str, FileRecord]: ...

    @abstractmethod
    def next_key_id(self) -> int:
        """The id the next key added gets."""

    # -- restoring a whole store (load_image) ----------------------------------------------------

    @abstractmethod
    def put_key(self, key: KeyRecord) -> None:
        """Write a whole record with its id."""

    @abstractmethod
    def put_counts(self, counters: Counters, per_hour: bool) -> None:
        """Set these hourly (or daily) counters, replacing any for the same key and bucket."""

    @abstractmethod
    def put_files(self, files: Mapping[str, FileRecord]) -> None: ...

    @abstractmethod
    def put_settings(self, settings: PoolSettings, rev: int, next_key_id: int) -> None:
        """Set the settings and rev as they are, and have new keys numbered from `next_key_id` on."""


class Store(ABC):
    """One pool's keys, settings, accounts and counters. Each backend opens, reads and transacts its own way; every
    change is written once, here."""

    home: Path  # the local folder for what is this machine's own (the event log, the proxy's CA)
    readonly: bool
    where: str  # the store as messages name it: a file path, or a Redis URL without its password

    # -- what each backend provides ------------------------------------------------------------

    @abstractmethod
    def _read(self) -> contextlib.AbstractContextManager[Rows]: ...

    @abstractmethod
    def _write(self, wait: float = BUSY_TIMEOUT, mark: int | None = None) -> contextlib.AbstractContextManager[Rows]:
        """A write transaction. A command's (mark None) bumps the store's edit count, which a running proxy checks
        before each request; a proxy's outcomes (record(), with its mark) do not. `mark` shows as Snapshot.recorded
        in the snapshots this Store reads after the commit."""

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def reopen(self) -> Store:
        """The same store through a connection of its own (a second writer in this process: the quota watch, the
        kimi.rotate command), so that its commits reach this Store as another writer's do."""

    @abstractmethod
    def data_version(self) -> int:
        """Changes whenever another writer commits: a cheap 'has anything changed?'."""

    @abstractmethod
    def snapshot(self) -> Snapshot: ...

    @abstractmethod
    def edits(self) -> int:
        """The store's edit count, cheap enough to ask before every request, and never waiting for the store thread
        (on the proxy's event loop)."""

    @abstractmethod
    def fresh_snapshot(self) -> Snapshot:
        """As snapshot(), for the event loop (see edits)."""

    @abstractmethod
    def remember_file(self, file_id: str, key_id: int, group: Group, now: float) -> None: ...

    @abstractmethod
    def file_owner(self, file_id: str) -> tuple[int, Group] | None:
        """The key that uploaded a file and its account (None: unknown), for the event loop."""

    @abstractmethod
    def heartbeat(
        self, proxy_id: str, pid: int, started: float, now: float, ttl: float,
        usage: Mapping[Group, tuple[int, int]] | None = None,
    ) -> list[tuple[str, int, float]]:
        """Say this proxy is alive, with its counts per account (in flight, sent in the last minute); returns the
        live proxies, oldest first (this one included)."""

    @abstractmethod
    def proxy_rows(self, now: float, ttl: float) -> list[ProxyRow]:
        """The running proxies with their last counts (`status`)."""

    @abstractmethod
    def leave(self, proxy_id: str, now: float, ttl: float) -> None: ...

    def restore(self, view: Snapshot, mark: int) -> bool:
        """Write a proxy's view of the pool (its keys, settings, accounts, and `view.writers`) back into a store that
        lost everything, with this Store's own batches up to `mark` in it; False (nothing written) if the store is
        not empty any more (another proxy restored it first). Only a backend that can lose its data needs it."""
        raise StoreError(f"the store {self.where} cannot be restored from a proxy's view")

    def applied_mark(self) -> int:
        """The last of this Store's batch marks that the store holds (after a loss: what to send again)."""
        raise StoreError(f"the store {self.where} keeps no batch marks")

    def shared_counts(self, proxy_id: str) -> SharedCounts | None:
        """Per-account counts of requests shared by every proxy on this store, for proxy `proxy_id` (None: this
        backend has none, and proxies on it split each account's caps between them)."""
        return None

    def watch(self, changed: Callable[[], None]) -> None:
        """Have `changed` called (from any thread) soon after another writer commits. A backend that cannot tell
        does nothing: the proxy's store thread polls data_version() anyway."""
        return None

    # -- reading -------------------------------------------------------------------------------

    def keys(self) -> list[KeyRecord]:
        with self._read() as rows:
            return rows.keys()

    def settings(self) -> PoolSettings:
        with self._read() as rows:
            return rows.settings()

    def accounts(self) -> dict[Group, AccountRecord]:
        with self._read() as rows:
            return rows.accounts()

    def counts(self, since: float, per_hour: bool) -> Counters:
        """Per key: {start of the hour or UTC day (epoch seconds): Counts} for the buckets from the one holding
        `since` on. Hours are kept for HOURLY_KEPT_HOURS; days for as long as the key is."""
        with self._read() as rows:
            return rows.counters(since, per_hour)

    def live_proxies(self, now: float, ttl: float) -> list[tuple[str, int, float]]:
        return [row.who for row in self.proxy_rows(now, ttl)]

    def resolve(self, ref: str) -> KeyRecord:
        """A key by its list index (as `list-keys` shows it) or its exact name."""
        keys = self.keys()
        text = ref.strip()
        if text.isdigit():
            i = int(text)
            if i < len(keys):
                return keys[i]
            hint = f"valid indexes are 0-{len(keys) - 1}" if keys else "the store has no keys"
            raise KeyNotFound(f"no key at index {i}: {hint} (see `kimi-rotate list-keys`)")
        for k in keys:
            if k.name == text:
                return k
        raise KeyNotFound(f"no key named {text!r}; see `kimi-rotate list-keys` for names and indexes")

    def daily(self, since_day: str) -> dict[int, dict[str, tuple[int, int]]]:
        """Per key: {day: (requests, successes)} from `since_day` (UTC, YYYY-MM-DD) on."""
        found = self.counts(day_start(since_day) if since_day >= "1970-01-01" else 0, per_hour=False)
        return {key_id: {utc_day(start): (c.requests, c.successes) for start, c in days.items()}
                for key_id, days in found.items()}

    # -- the whole store (store migrate) -------------------------------------------------------

    def image(self) -> StoreImage:
        """Everything the store holds for the pool, read in one transaction (see StoreImage)."""
        with self._read() as rows:
            return StoreImage(keys=rows.keys(), settings=rows.settings(), rev=rows.rev(),
                              next_key_id=rows.next_key_id(), accounts=rows.accounts(),
                              hourly=rows.counters(0, per_hour=True), daily=rows.counters(0, per_hour=False),
                              files=rows.files())

    def load_image(self, image: StoreImage) -> None:
        """Write a whole store into this one, which must hold no key, in one transaction: keys keep their ids."""
        with self._write() as rows:
            present = rows.keys()
            if present:
                raise StoreError(f"the store {self.where} already holds {len(present)} key(s); copy into an empty "
                                 "store (another Redis database or prefix, another folder), or remove its keys first")
            for key in image.keys:
                rows.put_key(key)
            rows.put_counts(image.hourly, per_hour=True)
            rows.put_counts(image.daily, per_hour=False)
            rows.save_accounts(image.accounts.values())
            rows.put_files(image.files)
            highest = max((k.id for k in image.keys), default=0)
            rows.put_settings(image.settings, image.rev, max(image.next_key_id, highest + 1))

    # -- changing keys -------------------------------------------------------------------------

    def add_keys(
        self, new: Sequence[NewKey], now: float, refuse_duplicates: bool = False, where: Where = in_batch
    ) -> tuple[list[KeyRecord], list[NewKey]]:
        """Adds the keys in one transaction. Returns (added, skipped duplicates).

        Imports (the default) skip a secret already present and give a taken name a number (`Main 2`).
        With `refuse_duplicates` (add-key, add-keys) a taken secret or name, in the pool or earlier in
        the batch, raises DuplicateKey listing every clash, and nothing is added; `where` names the
        earlier entry of the batch in those messages."""
        added: list[KeyRecord] = []
        skipped: list[NewKey] = []
        with self._write() as rows:
            pool = rows.keys()
            if refuse_duplicates:
                conflicts = _conflicts(pool, new, where)
                if conflicts:
                    raise DuplicateKey(conflicts)
            present = {k.secret.get_secret_value() for k in pool}
            names = {k.name for k in pool}
            for nk in new:
                if nk.secret in present:
                    skipped.append(nk)
                    continue
                name = _unique_name(nk.name, names)
                added.append(rows.insert_key(nk, name, now))
                present.add(nk.secret)
                names.add(name)
        return added, skipped

    def add_key(self, new: NewKey, now: float) -> KeyRecord:
        """Adds one key; DuplicateKey if its secret or its name is taken."""
        added, _ = self.add_keys([new], now, refuse_duplicates=True)
        return added[0]

    def conflicts(self, new: Sequence[NewKey], where: Where = in_batch) -> list[Conflict]:
        """What `add_keys(new, refuse_duplicates=True, where=where)` would refuse, without writing (to report
        every problem of a batch that has other problems too)."""
        with self._read() as rows:
            return _conflicts(rows.keys(), new, where)

    def rename_key(self, key_id: int, name: str) -> tuple[KeyRecord, KeyRecord]:
        """Gives a key another name (its counters and state stay). Returns (before, after)."""
        with self._write() as rows:
            keys = rows.keys()
            key = rows.key(key_id)
            clash = next((i for i, k in enumerate(keys) if k.name == name and k.id != key_id), None)
            if clash is not None:
                raise DuplicateKey([Conflict(0, f"a key named {name!r} already exists ([{clash}])",
                                             "choose another name")])
            changed = replace(key, name=name)
            rows.save_keys([changed])
        return key, changed

    def set_account(self, key_id: int, account: str | None) -> tuple[KeyRecord, KeyRecord]:
        """Puts a key in an account (None: in none). Returns (before, after)."""
        with self._write() as rows:
            key = rows.key(key_id)
            changed = replace(key, account=account)
            rows.save_keys([changed])
        return key, changed

    def remove_key(self, key_id: int) -> KeyRecord:
        with self._write() as rows:
            key = rows.key(key_id)
            rows.delete_key(key_id)
            settings = rows.settings()
            by_surface = {s: k for s, k in settings.current_by_surface.items() if k != key_id}
            if settings.active_key_id == key_id or by_surface != settings.current_by_surface:
                active = None if settings.active_key_id == key_id else settings.active_key_id
                rows.save_settings(replace(settings, active_key_id=active, current_by_surface=by_surface), bump=True)
        return key

    def set_disabled(self, key_id: int, reason: str | None) -> KeyRecord:
        """Disable with a reason, or enable again with None (which also ends any cooldown)."""
        with self._write() as rows:
            key = rows.key(key_id)
            if reason is None:
                changed = replace(engine.clear_limits(key), disabled_reason=None)
            else:
                changed = replace(key, disabled_reason=reason)
            rows.save_keys([changed])
        return changed

    def clear_limits(self, key_ids: Sequence[int] | None) -> list[KeyRecord]:
        """End the cooldowns of these keys (None: of every key), and forget the caps learned for their accounts
        (None: for every account): a cap Kimi raised (a higher tier) is then learned afresh. Stated caps stay."""
        with self._write() as rows:
            keys = rows.keys()
            chosen = keys if key_ids is None else [k for k in keys if k.id in set(key_ids)]
            cleared = [engine.clear_limits(k) for k in chosen]
            rows.save_keys(cleared)
            groups = None if key_ids is None else {k.limit_group for k in chosen}
            rows.save_accounts([replace(r, learned={}) for g, r in rows.accounts().items()
                                if r.learned and (groups is None or g in groups)])
        return cleared

    def refresh_health(self, now: float) -> list[tuple[KeyRecord, KeyRecord]]:
        with self._write() as rows:
            settings = rows.settings()
            if not settings.auto_refresh_health:
                return []
            pairs = engine.refresh_health(
                rows.keys(), now, settings.health_refresh_cooldown_minutes, settings.auto_refresh_health
            )
            rows.save_keys([after for _, after in pairs])
        return pairs

    # -- accounts ------------------------------------------------------------------------------

    def update_account(
        self, group: Group, change: Callable[[AccountRecord | None], AccountRecord | None]
    ) -> AccountRecord | None:
        """A command's change to one account (stating caps...): `change` gets the stored record (None: none yet)
        and returns the new one (None: leave it). Returns what is stored afterwards."""
        with self._write() as rows:
            before = rows.account(group)
            after = change(before)
            if after is None or after == before:
                return before
            rows.save_accounts([after])
        return after

    def record_quota(self, group: Group, quota: Quota) -> None:
        """Save what a probe said about an account's quota (a proxy's or `check`'s: other proxies see it within
        their poll, as they see outcomes)."""
        with self._write(mark=0) as rows:
            _save_quota(rows, group, quota)

    # -- settings ------------------------------------------------------------------------------

    def use_key(self, key_id: int) -> KeyRecord:
        """Make this key the current one; it serves the next request under every strategy."""
        with self._write() as rows:
            key = rows.key(key_id)
            rows.save_settings(rows.settings().with_current(key, serve_next=True), bump=True)
        return key

    def update_settings(self, **changes: object) -> PoolSettings:
        """Change pool settings (strategy, auto_refresh_health, health_refresh_cooldown_minutes)."""
        with self._write() as rows:
            updated = settings_from(dict(settings_fields(rows.settings()), **changes))
            rows.save_settings(updated, bump=True)
        return updated

    def rotate(self, now: float) -> engine.Selection | engine.NoEligibleKey:
        """Move to another eligible key under any strategy; it serves the next request."""
        with self._write() as rows:
            settings = rows.settings()
            roster = Roster(rows.keys())
            # Rotation stays on the platform of the key in use: keys never serve another surface.
            active = roster.get(settings.active_key_id)
            surface = active.surface if active is not None else None
            result = engine.select(roster, settings, now, surface=surface, forced=True)
            if isinstance(result, engine.Selection):
                rows.save_settings(settings.with_current(result.key, serve_next=True), bump=True)
        return result

    def apply_probe(self, result: ProbeResult, now: float, replaces: str | None = None) -> list[KeyRecord]:
        """Record what a zero-token probe found (see probe.updates), in one transaction: a refused key disabled, an
        account cooled until the reset Kimi reported or freed when its quota is back, the account label filled, and
        the quota saved on the key's account (its limit group). `replaces` is the reason of the answer that asked
        for the probe. Returns the keys changed (none for a key removed meanwhile). A probe is no request: no
        counter moves. A command's write: a running proxy sees it before its next request."""
        from .probe import updates  # it loads the classifier, which most commands never need

        hint = result.outcome.account_hint
        with self._write() as rows:
            involved = rows.involved({result.key_id}, {hint} if hint else set())
            changed = updates(involved, result, now, replaces)
            rows.save_keys(changed)
            probed = next((k for k in [*changed, *involved] if k.id == result.key_id), None)
            if probed is not None and result.quota is not None:
                _save_quota(rows, probed.limit_group, result.quota)
        return changed

    # -- what the proxy reports ----------------------------------------------------------------

    def record(
        self,
        attempts: Sequence[Attempt],
        active_key_id: int | None = None,
        rev: int | None = None,
        wait: float = BUSY_TIMEOUT,
        mark: int = 0,
    ) -> None:
        """Apply attempts' outcomes (and the proxy's current key) in one transaction.

        `rev` is the Snapshot.rev the caller chose its current key under: if a command (use-key, rotate,
        set-strategy) has moved the current key since, the caller's choice is stale and is not saved. `mark` (the
        caller's number for this batch) shows as Snapshot.recorded in the snapshots read after the commit.
        Caps an outcome learned are merged into its key's account."""
        if not attempts and active_key_id is None:
            return
        with self._write(wait, mark) as rows:
            settings = rows.settings()
            ids = {a.key_id for a in attempts} | ({active_key_id} if active_key_id is not None else set())
            hints = {a.outcome.account_hint for a in attempts if a.outcome.account_hint}
            roster = Roster(rows.involved(ids, hints))
            changed: dict[int, KeyRecord] = {}
            # One upsert per key and hour (and day), not per attempt.
            hourly: Tally = {}
            learned: list[tuple[Group, LearnedCap]] = []
            for a in attempts:
                updates = engine.apply_outcome(roster, a.key_id, a.outcome, a.at, settings.auto_refresh_health)
                roster = roster.with_updates(updates)
                changed.update((k.id, k) for k in updates)
                if updates:
                    tally = hourly.setdefault((a.key_id, int(a.at // 3600)), [0, 0, 0])
                    tally[0] += 1
                    tally[1] += a.outcome.kind is OutcomeKind.SUCCESS
                    tally[2] += a.outcome.kind is OutcomeKind.RATE_LIMITED
                    if a.outcome.caps:
                        group = updates[0].limit_group
                        learned += [(group, replace(cap, at=a.at)) for cap in a.outcome.caps]
            if hourly:
                rows.count(hourly)
            rows.save_keys(changed.values())
            _learn(rows, learned)
            stale = rev is not None and rev != rows.rev()
            chosen = roster.get(active_key_id)
            if chosen is not None and not stale:
                updated = engine.after_selection(settings, engine.Selection(chosen, "proxy"))
                if updated != settings:
                    rows.save_settings(updated, bump=False)


def open_store(spec: str | None = None, home: Path | None = None, *, secret: str | None = None,
               readonly: bool = False) -> Store:
    """The store the user named: `spec` (kimi_store, --store) else KIMI_ROTATE_STORE, a redis:// or rediss:// URL;
    else the SQLite file in `home` (else the store folder). `secret`: the file of a Redis store's sealing secret
    (else KIMI_ROTATE_STORE_SECRET, else store-secret in `home`)."""
    spec = spec or os.environ.get(STORE_ENV) or None
    home = home if home is not None else store_home()
    if spec is not None and spec.strip() and spec.strip() != "sqlite":
        from .store_redis import RedisStore, is_redis_url  # redis-py loads only for a Redis store

        if not is_redis_url(spec):
            raise StoreError(f"the store {spec!r} is not one kimi-rotate knows: give a redis://host:port/db "
                             f"(or rediss:// for TLS) URL, or leave kimi_store and {STORE_ENV} empty for the "
                             "local file")
        secret_file = secret or os.environ.get(SECRET_ENV)
        return RedisStore(spec.strip(), home, Path(secret_file).expanduser() if secret_file else None,
                          readonly=readonly)
    from .store_sqlite import SqliteStore

    return SqliteStore(home, readonly=readonly)


# -- helpers for the changes above -------------------------------------------------------------

def _save_quota(rows: Rows, group: Group, quota: Quota) -> None:
    before = rows.account(group) or AccountRecord(surface=group[0], account=group[1])
    rows.save_accounts([replace(before, quota=quota)])


def _learn(rows: Rows, learned: Sequence[tuple[Group, LearnedCap]]) -> None:
    """Merge caps a proxy learned into the stored accounts: merged here, not overwritten, so caps that other
    proxies learned meanwhile, and caps a user stated, stay."""
    by_group: dict[Group, list[LearnedCap]] = {}
    for group, cap in learned:
        by_group.setdefault(group, []).append(cap)
    changed = []
    for group, found in by_group.items():
        merged = caps.merge_caps(rows.account(group), group, found, max(c.at for c in found))
        if merged is not None:
            changed.append(merged)
    if changed:
        rows.save_accounts(changed)


def settings_fields(settings: PoolSettings) -> dict[str, Any]:
    """The settings as the JSON the store keeps (enum values as strings)."""
    return {
        "strategy": settings.strategy.value,
        "active_key_id": settings.active_key_id,
        "serve_active_next": settings.serve_active_next,
        "current_by_surface": {s.value: i for s, i in settings.current_by_surface.items()},
        "auto_refresh_health": settings.auto_refresh_health,
        "health_refresh_cooldown_minutes": settings.health_refresh_cooldown_minutes,
    }


def settings_from(data: dict[str, Any]) -> PoolSettings:
    """Settings from their stored JSON or from `update_settings`; unknown names are ignored, as before."""
    try:
        active = data.get("active_key_id")
        minutes = data.get("health_refresh_cooldown_minutes", 30)
        flags = (data.get("serve_active_next", False), data.get("auto_refresh_health", True))
        if (active is not None and type(active) is not int) or type(minutes) is not int:
            raise ValueError("key ids and minutes must be whole numbers")
        if not all(isinstance(f, bool) for f in flags):
            raise ValueError("serve_active_next and auto_refresh_health must be true or false")
        by_surface = {Surface(s): i for s, i in dict(data.get("current_by_surface") or {}).items()}
        if not all(type(i) is int for i in by_surface.values()):
            raise ValueError("current keys must be key ids")
        return PoolSettings(
            strategy=Strategy(data.get("strategy", Strategy.HEALTH_BASED)),
            active_key_id=active,
            serve_active_next=flags[0],
            current_by_surface=by_surface,
            auto_refresh_health=flags[1],
            health_refresh_cooldown_minutes=minutes,
        )
    except (TypeError, ValueError) as e:
        raise StoreError(f"invalid setting: {e}") from None


def new_key_counters(nk: NewKey) -> tuple[int, int, int, int]:
    """Imported counters made consistent: (total, successful, rate limited, failed), total = the three summed."""
    ok = max(0, nk.successful_requests)
    limited = max(0, nk.rate_limited_requests)
    total = max(nk.total_requests, ok + limited)
    return total, ok, limited, total - ok - limited


def _conflicts(pool: Sequence[KeyRecord], new: Sequence[NewKey], where: Where) -> list[Conflict]:
    """Every key of `new` whose secret or name is taken, by the pool or by an earlier key of `new`."""
    by_secret = {k.secret.get_secret_value(): (i, k.name) for i, k in enumerate(pool)}
    by_name = {k.name: i for i, k in enumerate(pool)}
    seen_secrets: dict[str, int] = {}
    seen_names: dict[str, int] = {}
    out: list[Conflict] = []
    for pos, nk in enumerate(new):
        if nk.secret in by_secret:
            index, name = by_secret[nk.secret]
            out.append(Conflict(pos, f"this key is already in the pool as [{index}] {name}", "nothing was added"))
        elif nk.secret in seen_secrets:
            out.append(Conflict(pos, f"{mask(nk.secret)} is also {where(seen_secrets[nk.secret])}",
                                "give each key once"))
        elif nk.name is not None and nk.name in by_name:
            out.append(Conflict(pos, f"a key named {nk.name!r} already exists ([{by_name[nk.name]}])",
                                "choose another name"))
        elif nk.name is not None and nk.name in seen_names:
            out.append(Conflict(pos, f"the name {nk.name!r} is also {where(seen_names[nk.name])}",
                                "give each key its own name"))
        seen_secrets.setdefault(nk.secret, pos)
        if nk.name is not None:
            seen_names.setdefault(nk.name, pos)
    return out


def _unique_name(wanted: str | None, taken: set[str]) -> str:
    if wanted and wanted not in taken:
        return wanted
    base = wanted or "Account"
    n = len(taken) + 1 if not wanted else 2
    while f"{base} {n}" in taken:
        n += 1
    return f"{base} {n}"

