"""The account store: one SQLite file (WAL) that any number of proxies and CLI runs share.

Every change is one `BEGIN IMMEDIATE` transaction that reads the rows, runs the engine and writes
the result, so concurrent writers serialise instead of overwriting each other. SQLite's journal
makes a kill -9 at any moment harmless. A file that is not a healthy store is never written to.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import random
import sqlite3
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import platformdirs

from . import accounts_db, caps, engine
from .errors import UserError
from .keys import fingerprint, mask
from .models import (
    AccountRecord,
    Group,
    KeyRecord,
    LearnedCap,
    Outcome,
    OutcomeKind,
    PoolSettings,
    Quota,
    Secret,
    Strategy,
    Surface,
)
from .roster import Roster

if TYPE_CHECKING:
    from .probe import ProbeResult

HOME_ENV = "KIMI_ROTATE_HOME"
STORE_FILE = "store.db"
SCHEMA_VERSION = 4
BUSY_TIMEOUT = 10.0  # seconds a transaction waits for other writers before giving up
_SQLITE_MAGIC = b"SQLite format 3\x00"

# MIGRATIONS[i] takes a store from schema version i to i + 1.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE keys (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        secret TEXT NOT NULL UNIQUE,
        fingerprint TEXT NOT NULL,
        name TEXT NOT NULL UNIQUE,
        surface TEXT NOT NULL,
        account TEXT,
        added_at REAL NOT NULL,
        last_used REAL,
        health REAL NOT NULL DEFAULT 100,
        health_at REAL NOT NULL DEFAULT 0,
        cooldown_until REAL,
        cooldown_reason TEXT,
        disabled_reason TEXT,
        total_requests INTEGER NOT NULL DEFAULT 0,
        successful_requests INTEGER NOT NULL DEFAULT 0,
        rate_limited_requests INTEGER NOT NULL DEFAULT 0,
        failed_requests INTEGER NOT NULL DEFAULT 0,
        latency_count INTEGER NOT NULL DEFAULT 0,
        latency_sum_ms REAL NOT NULL DEFAULT 0,
        latency_min_ms REAL,
        latency_max_ms REAL
    );
    CREATE TABLE daily (
        key_id INTEGER NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
        day TEXT NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        successes INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (key_id, day)
    );
    CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    accounts_db.SCHEMA,  # 2: what is known of each account (caps, quota), file owners, running proxies
    accounts_db.USAGE_SCHEMA,  # 3: each running proxy's counts per account
    # 4: 429s per day, and per hour for the last HOURLY_KEPT_HOURS (`stats --plot`)
    """
    ALTER TABLE daily ADD COLUMN rate_limited INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE hourly (
        key_id INTEGER NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
        hour INTEGER NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        successes INTEGER NOT NULL DEFAULT 0,
        rate_limited INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (key_id, hour)
    );
    CREATE INDEX hourly_by_hour ON hourly (hour);
    """,
)
HOURLY_KEPT_HOURS = 14 * 24  # older hourly rows are deleted when newer ones are written
_KEY_COLUMNS = tuple(f.name for f in fields(KeyRecord))


class StoreError(UserError):
    """A problem with the store that the user can act on; the message says what to do."""


class StoreBusy(StoreError):
    """Other writers held the store longer than the caller was willing to wait; nothing was changed."""


class KeyNotFound(StoreError):
    pass


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


# The store files this process has open, with how many Stores. SQLite's locks on a file are POSIX locks, which
# belong to the process: closing any descriptor of the file drops them all, and a Store's connections then miss other
# processes' commits. A second Store in one process (the proxy's quota watch, the kimi.rotate command) must
# therefore not open the file itself to check its header.
_OPEN_HERE: Counter[Path] = Counter()
_OPEN_HERE_LOCK = threading.Lock()


def _opened_here(path: Path) -> Path:
    where = path.resolve()
    with _OPEN_HERE_LOCK:
        _OPEN_HERE[where] += 1
    return where


def _closed_here(where: Path) -> None:
    with _OPEN_HERE_LOCK:
        _OPEN_HERE[where] -= 1
        if _OPEN_HERE[where] <= 0:
            del _OPEN_HERE[where]


def _is_open_here(path: Path) -> bool:
    with _OPEN_HERE_LOCK:
        return _OPEN_HERE[path.resolve()] > 0


def store_home() -> Path:
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir("kimi-rotate", appauthor=False))


def utc_day(ts: float) -> str:
    return _day_name(int(ts // 86400))


@functools.lru_cache(maxsize=16)
def _day_name(day: int) -> str:  # formatting a date costs more than the rest of recording an outcome
    return datetime.fromtimestamp(day * 86400, UTC).strftime("%Y-%m-%d")


class Store:
    def __init__(self, home: Path | None = None, *, readonly: bool = False) -> None:
        """`readonly` is for commands that only read: such a store opens where nothing can be written (a read-only
        folder, file or mount), creates nothing, and refuses to write."""
        self.home = home if home is not None else store_home()
        self.path = self.home / STORE_FILE
        self.readonly = readonly
        self._lock = threading.Lock()
        self._db = self._open_readonly() if readonly else self._open()
        self._here: Path | None = _opened_here(self.path)
        # Held around each commit of _db and each snapshot's first read: so a snapshot's `recorded` and `taken` say
        # exactly which of this Store's own commits it holds, on whichever connection it was read.
        self._commit_lock = threading.Lock()
        self._recorded = 0
        self._taken = 0
        # A second connection for the proxy's event loop, opened on first use: its reads must never wait behind
        # _lock, which the store thread holds while it waits for other processes' write locks.
        self._probe_lock = threading.Lock()
        self._probe: sqlite3.Connection | None = None
        self._probe_version = -1
        self._probe_edits = 0

    # -- opening -------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        _private_dir(self.home, self._read_only)
        fresh = _create_private_file(self.path, self._read_only)
        if not fresh:
            self._check_header()
        try:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise self._unreadable(e) from None
        try:
            version = self._check(db)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            if version < SCHEMA_VERSION:
                self._migrate(db)
        except sqlite3.OperationalError as e:
            db.close()
            if "readonly" in str(e) or "unable to open" in str(e):
                raise self._read_only(str(e)) from None
            raise self._unreadable(e) from None
        except sqlite3.DatabaseError as e:
            db.close()
            raise self._unreadable(e) from None
        except StoreError:
            db.close()
            raise
        return db

    def _open_readonly(self) -> sqlite3.Connection:
        """SQLite opens a WAL database read-only only if it can open or create the -shm file beside it. Where it
        cannot (a read-only folder or mount with no writer running, since a writer keeps that file), the file is
        read as immutable, which is safe for the same reason. A store that does not exist yet reads as empty."""
        _check_home_path(self.home)
        if not self.path.exists() or self.path.stat().st_size == 0:
            return self._empty()
        self._check_header()
        uri = self.path.absolute().as_uri()
        for query in ("mode=ro", "mode=ro&immutable=1"):
            try:
                db = sqlite3.connect(f"{uri}?{query}", uri=True, timeout=BUSY_TIMEOUT, isolation_level=None,
                                     check_same_thread=False)
            except sqlite3.Error as e:
                raise self._unreadable(e) from None
            try:
                version = self._check(db)
                if version == 0:
                    db.close()
                    return self._empty()  # created but never initialised (a crash right after creating it)
                if version < SCHEMA_VERSION:  # an older store that cannot be upgraded here: read an upgraded copy
                    copy = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
                    db.backup(copy)
                    db.close()
                    self._migrate(copy)
                    return copy
                return db
            except sqlite3.OperationalError as e:
                db.close()
                if e.sqlite_errorcode != sqlite3.SQLITE_CANTOPEN or "immutable" in query:
                    raise self._unreadable(e) from None
            except sqlite3.DatabaseError as e:
                db.close()
                raise self._unreadable(e) from None
            except StoreError:
                db.close()
                raise
        raise AssertionError("unreachable")

    def _empty(self) -> sqlite3.Connection:
        db = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        self._migrate(db)
        return db

    def _check(self, db: sqlite3.Connection) -> int:
        """The store's schema version, once the file is known to be a healthy store this kimi-rotate can read."""
        db.execute("PRAGMA foreign_keys = ON")
        version: int = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer kimi-rotate (schema {version}, this one knows "
                f"{SCHEMA_VERSION}); upgrade kimi-rotate. The file was left untouched."
            )
        if version > 0 and db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise self._unreadable("the integrity check failed")
        return version

    def _read_only(self, why: str) -> StoreError:
        return StoreError(
            f"cannot write the store {self.path}: it is read-only ({why}); make it and {self.home} writable, "
            f"or point {HOME_ENV} at a writable folder. Reading commands (list-keys, stats) still work."
        )

    def _check_header(self) -> None:
        if _is_open_here(self.path):
            return  # checked when it was first opened here; reading it now would cost the open Stores their locks
        try:
            with open(self.path, "rb") as f:
                head = f.read(len(_SQLITE_MAGIC))
        except IsADirectoryError:
            raise StoreError(
                f"{self.path} is a folder, not a store file; move it aside (a new store is then created), "
                f"or point {HOME_ENV} at another folder"
            ) from None
        except OSError as e:
            raise StoreError(f"cannot read the store {self.path}: {e.strerror}; check its permissions") from None
        # An empty file is what a crash between creating and initialising leaves: start it afresh.
        if head and head != _SQLITE_MAGIC:
            raise self._unreadable("it is not an SQLite database")

    def _unreadable(self, why: object) -> StoreError:
        return StoreError(
            f"the store {self.path} is damaged or not a kimi-rotate store ({why}). It was left untouched: "
            f"move it aside and re-add your keys (or `kimi-rotate import-keys` a backup), or point "
            f"{HOME_ENV} at another folder."
        )

    def _migrate(self, db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for script in MIGRATIONS[version:]:
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()
            here, self._here = self._here, None
        if here is not None:
            _closed_here(here)
        with self._probe_lock:
            if self._probe is not None:
                self._probe.close()

    # -- transactions --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _write(self, wait: float = BUSY_TIMEOUT, mark: int | None = None) -> Iterator[sqlite3.Connection]:
        """A write transaction. A command's (mark None) bumps the store's edit count, which a running proxy checks
        before each request; a proxy's outcomes (record(), with its mark) do not."""
        if self.readonly:
            raise RuntimeError("this Store was opened with readonly=True")
        with self._lock:
            self._begin_immediate(wait)
            changes = self._db.total_changes
            try:
                yield self._db
                if mark is None and self._db.total_changes != changes:
                    self._db.execute(
                        "INSERT INTO meta (name, value) VALUES ('edits', '1') "
                        "ON CONFLICT (name) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
                    )
            except sqlite3.Error as e:  # e.g. a full disk while writing pages: callers handle StoreError only
                self._rollback()
                raise StoreError(f"could not save to {self.path} ({e}); nothing was changed") from None
            except BaseException:
                self._rollback()
                raise
            try:
                with self._commit_lock:
                    self._db.execute("COMMIT")
                    if mark is not None:
                        self._recorded = max(self._recorded, mark)
            except sqlite3.Error as e:
                self._rollback()
                raise StoreError(f"could not save to {self.path} ({e}); nothing was changed") from None

    def _rollback(self) -> None:
        """Roll back, unless SQLite already has: it does so by itself on a full disk or an I/O error, and a
        second ROLLBACK would raise instead of reporting the real problem."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _begin_immediate(self, wait: float) -> None:
        """Take the write lock, retrying about every millisecond for up to `wait` seconds. SQLite's own busy
        handler sleeps up to 100 ms between tries, so a waiting writer (often the CLI) could starve for seconds
        behind busy proxies."""
        deadline = time.monotonic() + wait
        self._db.execute("PRAGMA busy_timeout = 0")
        try:
            while True:
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as e:
                    if e.sqlite_errorcode == sqlite3.SQLITE_READONLY:
                        raise self._read_only(str(e)) from None
                    if e.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                        raise StoreError(f"cannot write the store {self.path} ({e}); check the file") from None
                    if time.monotonic() >= deadline:
                        raise StoreBusy(f"the store {self.path} is busy (other kimi-rotate processes are writing); "
                                        "try again") from None
                time.sleep(random.uniform(0.0002, 0.001))
        finally:
            self._db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")

    # -- reading -------------------------------------------------------------------------------

    def data_version(self) -> int:
        """Changes whenever another connection commits: a cheap 'has anything changed?'."""
        with self._lock:
            return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def snapshot(self) -> Snapshot:
        with self._read() as db:
            return self._snapshot(db)

    def edits(self) -> int:
        """The store's edit count (see _write), cheap enough to ask before every request: one PRAGMA, plus one
        row read after any commit. On the event loop's own connection, so it never waits for the store thread."""
        with self._probe_lock:
            try:
                db = self._probe_db()
                version = db.execute("PRAGMA data_version").fetchone()[0]
                if version != self._probe_version:  # something committed: the count may have moved
                    self._probe_edits = _load_edits(db)
                    self._probe_version = version
            except sqlite3.Error as e:
                raise StoreError(f"cannot read the store {self.path} ({e})") from None
            return self._probe_edits

    def fresh_snapshot(self) -> Snapshot:
        """As snapshot(), on the event loop's connection (see edits)."""
        with self._probe_lock:
            try:
                db = self._probe_db()
                db.execute("BEGIN")
                try:
                    return self._snapshot(db)
                finally:
                    db.execute("COMMIT")
            except sqlite3.Error as e:
                raise StoreError(f"cannot read the store {self.path} ({e})") from None

    def _snapshot(self, db: sqlite3.Connection) -> Snapshot:
        with self._commit_lock:  # the first read fixes what the transaction sees: no commit of ours in between
            rev = _load_rev(db)
            self._taken += 1
            taken, recorded = self._taken, self._recorded
        edits = _load_edits(db)
        return Snapshot(_load_keys(db), _load_settings(db), rev, edits, recorded, taken,
                        accounts_db.load_accounts(db))

    def _probe_db(self) -> sqlite3.Connection:
        if self._probe is None:
            self._probe = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                          check_same_thread=False)
        return self._probe

    def keys(self) -> list[KeyRecord]:
        with self._read() as db:
            return _load_keys(db)

    def settings(self) -> PoolSettings:
        with self._read() as db:
            return _load_settings(db)

    def accounts(self) -> dict[Group, AccountRecord]:
        with self._read() as db:
            return accounts_db.load_accounts(db)

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

    def counts(self, since: float, per_hour: bool) -> dict[int, dict[int, Counts]]:
        """Per key: {start of the hour or UTC day (epoch seconds): Counts} for the buckets from the one holding
        `since` on. Hours are kept for HOURLY_KEPT_HOURS; days for as long as the key is."""
        out: dict[int, dict[int, Counts]] = {}
        with self._read() as db:
            if per_hour:
                rows = db.execute(
                    "SELECT key_id, hour, requests, successes, rate_limited FROM hourly WHERE hour >= ?",
                    (int(since // 3600),),
                )
                for key_id, hour, req, ok, limited in rows:
                    out.setdefault(key_id, {})[hour * 3600] = Counts(req, ok, limited)
            else:
                rows = db.execute(
                    "SELECT key_id, day, requests, successes, rate_limited FROM daily WHERE day >= ?",
                    (utc_day(since),),
                )
                for key_id, day, req, ok, limited in rows:
                    start = int(datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC).timestamp())
                    out.setdefault(key_id, {})[start] = Counts(req, ok, limited)
        return out

    def daily(self, since_day: str) -> dict[int, dict[str, tuple[int, int]]]:
        """Per key: {day: (requests, successes)} from `since_day` (UTC, YYYY-MM-DD) on."""
        out: dict[int, dict[str, tuple[int, int]]] = {}
        with self._read() as db:
            rows = db.execute(
                "SELECT key_id, day, requests, successes FROM daily WHERE day >= ?", (since_day,)
            )
            for key_id, day, req, ok in rows:
                out.setdefault(key_id, {})[day] = (req, ok)
        return out

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
        with self._write() as db:
            if refuse_duplicates:
                conflicts = _conflicts(db, new, where)
                if conflicts:
                    raise DuplicateKey(conflicts)
            present = {row[0] for row in db.execute("SELECT secret FROM keys")}
            names = {row[0] for row in db.execute("SELECT name FROM keys")}
            for nk in new:
                if nk.secret in present:
                    skipped.append(nk)
                    continue
                name = _unique_name(nk.name, names)
                cur = db.execute(
                    "INSERT INTO keys (secret, fingerprint, name, surface, account, added_at, last_used, "
                    "health, health_at, total_requests, successful_requests, rate_limited_requests, "
                    "failed_requests, cooldown_until, cooldown_reason, disabled_reason) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        nk.secret, fingerprint(nk.secret), name, nk.surface.value, nk.account,
                        nk.added_at or now, nk.last_used, max(0.0, min(100.0, nk.health)), now,
                        *_counters(nk), nk.cooldown_until, nk.cooldown_reason, nk.disabled_reason,
                    ),
                )
                present.add(nk.secret)
                names.add(name)
                added.append(_row_to_key(db.execute(_SELECT_KEYS + " WHERE id = ?", (cur.lastrowid,)).fetchone()))
        return added, skipped

    def add_key(self, new: NewKey, now: float) -> KeyRecord:
        """Adds one key; DuplicateKey if its secret or its name is taken."""
        added, _ = self.add_keys([new], now, refuse_duplicates=True)
        return added[0]

    def conflicts(self, new: Sequence[NewKey], where: Where = in_batch) -> list[Conflict]:
        """What `add_keys(new, refuse_duplicates=True, where=where)` would refuse, without writing (to report
        every problem of a batch that has other problems too)."""
        with self._read() as db:
            return _conflicts(db, new, where)

    def rename_key(self, key_id: int, name: str) -> tuple[KeyRecord, KeyRecord]:
        """Gives a key another name (its counters and state stay). Returns (before, after)."""
        with self._write() as db:
            key = _one_key(db, key_id)
            row = db.execute("SELECT id FROM keys WHERE name = ? AND id != ?", (name, key_id)).fetchone()
            if row is not None:
                problem = f"a key named {name!r} already exists ([{_position(db, row[0])}])"
                raise DuplicateKey([Conflict(0, problem, "choose another name")])
            changed = replace(key, name=name)
            _save_keys(db, [changed])
        return key, changed

    def set_account(self, key_id: int, account: str | None) -> tuple[KeyRecord, KeyRecord]:
        """Puts a key in an account (None: in none). Returns (before, after)."""
        with self._write() as db:
            key = _one_key(db, key_id)
            changed = replace(key, account=account)
            _save_keys(db, [changed])
        return key, changed

    def remove_key(self, key_id: int) -> KeyRecord:
        with self._write() as db:
            key = _one_key(db, key_id)
            db.execute("DELETE FROM keys WHERE id = ?", (key_id,))
            settings = _load_settings(db)
            by_surface = {s: k for s, k in settings.current_by_surface.items() if k != key_id}
            if settings.active_key_id == key_id or by_surface != settings.current_by_surface:
                active = None if settings.active_key_id == key_id else settings.active_key_id
                _save_settings(db, replace(settings, active_key_id=active, current_by_surface=by_surface), bump=True)
        return key

    def set_disabled(self, key_id: int, reason: str | None) -> KeyRecord:
        """Disable with a reason, or enable again with None (which also ends any cooldown)."""
        with self._write() as db:
            key = _one_key(db, key_id)
            if reason is None:
                changed = replace(engine.clear_limits(key), disabled_reason=None)
            else:
                changed = replace(key, disabled_reason=reason)
            _save_keys(db, [changed])
        return changed

    def clear_limits(self, key_ids: Sequence[int] | None) -> list[KeyRecord]:
        """End the cooldowns of these keys (None: of every key), and forget the caps learned for their accounts
        (None: for every account): a cap Kimi raised (a higher tier) is then learned afresh. Stated caps stay."""
        with self._write() as db:
            keys = _load_keys(db)
            chosen = keys if key_ids is None else [k for k in keys if k.id in set(key_ids)]
            cleared = [engine.clear_limits(k) for k in chosen]
            _save_keys(db, cleared)
            groups = None if key_ids is None else {k.limit_group for k in chosen}
            accounts = accounts_db.load_accounts(db)
            accounts_db.save_accounts(db, [replace(r, learned={}) for g, r in accounts.items()
                                           if r.learned and (groups is None or g in groups)])
        return cleared

    def refresh_health(self, now: float) -> list[tuple[KeyRecord, KeyRecord]]:
        with self._write() as db:
            settings = _load_settings(db)
            if not settings.auto_refresh_health:
                return []
            pairs = engine.refresh_health(
                _load_keys(db), now, settings.health_refresh_cooldown_minutes, settings.auto_refresh_health
            )
            _save_keys(db, [after for _, after in pairs])
        return pairs

    # -- accounts ------------------------------------------------------------------------------

    def update_account(
        self, group: Group, change: Callable[[AccountRecord | None], AccountRecord | None]
    ) -> AccountRecord | None:
        """A command's change to one account (stating caps...): `change` gets the stored record (None: none yet)
        and returns the new one (None: leave it). Returns what is stored afterwards."""
        with self._write() as db:
            before = accounts_db.load_account(db, group)
            after = change(before)
            if after is None or after == before:
                return before
            accounts_db.save_accounts(db, [after])
        return after

    def record_quota(self, group: Group, quota: Quota) -> None:
        """Save what a probe said about an account's quota (a proxy's or `check`'s: other proxies see it within
        their poll, as they see outcomes)."""
        with self._write(mark=0) as db:
            _save_quota(db, group, quota)

    # -- files ---------------------------------------------------------------------------------

    def remember_file(self, file_id: str, key_id: int, group: Group, now: float) -> None:
        with self._write(mark=0) as db:
            accounts_db.remember_file(db, file_id, key_id, group, now)

    def file_owner(self, file_id: str) -> tuple[int, Group] | None:
        """The key that uploaded a file and its account (None: unknown), on the event loop's connection."""
        with self._probe_lock:
            try:
                return accounts_db.file_owner(self._probe_db(), file_id)
            except sqlite3.Error as e:
                raise StoreError(f"cannot read the store {self.path} ({e})") from None

    # -- running proxies -----------------------------------------------------------------------

    def heartbeat(
        self, proxy_id: str, pid: int, started: float, now: float, ttl: float,
        usage: Mapping[Group, tuple[int, int]] | None = None,
    ) -> list[tuple[str, int, float]]:
        """Say this proxy is alive, with its counts per account (in flight, sent in the last minute); returns the
        live proxies, oldest first (this one included)."""
        with self._write(wait=0.05, mark=0) as db:
            accounts_db.heartbeat(db, proxy_id, pid, started, now, usage)
            return accounts_db.live_proxies(db, now, ttl)

    def proxy_rows(self, now: float, ttl: float) -> list[accounts_db.ProxyRow]:
        """The running proxies with their last counts (`status`)."""
        with self._read() as db:
            return accounts_db.proxy_rows(db, now, ttl)

    def live_proxies(self, now: float, ttl: float) -> list[tuple[str, int, float]]:
        with self._read() as db:
            return accounts_db.live_proxies(db, now, ttl)

    def leave(self, proxy_id: str, now: float, ttl: float) -> None:
        with self._write(mark=0) as db:
            accounts_db.leave(db, proxy_id, now, ttl)

    # -- settings ------------------------------------------------------------------------------

    def use_key(self, key_id: int) -> KeyRecord:
        """Make this key the current one; it serves the next request under every strategy."""
        with self._write() as db:
            key = _one_key(db, key_id)
            _save_settings(db, _load_settings(db).with_current(key, serve_next=True), bump=True)
        return key

    def update_settings(self, **changes: object) -> PoolSettings:
        """Change pool settings (strategy, auto_refresh_health, health_refresh_cooldown_minutes)."""
        with self._write() as db:
            settings = _load_settings(db)
            updated = _settings_from(dict(_settings_fields(settings), **changes))
            _save_settings(db, updated, bump=True)
        return updated

    def rotate(self, now: float) -> engine.Selection | engine.NoEligibleKey:
        """Move to another eligible key under any strategy; it serves the next request."""
        with self._write() as db:
            settings = _load_settings(db)
            roster = Roster(_load_keys(db))
            # Rotation stays on the platform of the key in use: keys never serve another surface.
            active = roster.get(settings.active_key_id)
            surface = active.surface if active is not None else None
            result = engine.select(roster, settings, now, surface=surface, forced=True)
            if isinstance(result, engine.Selection):
                _save_settings(db, settings.with_current(result.key, serve_next=True), bump=True)
        return result

    def apply_probe(self, result: ProbeResult, now: float, replaces: str | None = None) -> list[KeyRecord]:
        """Record what a zero-token probe found (see probe.updates), in one transaction: a refused key disabled, an
        account cooled until the reset Kimi reported or freed when its quota is back, the account label filled, and
        the quota saved on the key's account (its limit group). `replaces` is the reason of the answer that asked
        for the probe. Returns the keys changed (none for a key removed meanwhile). A probe is no request: no
        counter moves. A command's write: a running proxy sees it before its next request."""
        from .probe import updates  # it loads the classifier, which most commands never need

        hint = result.outcome.account_hint
        with self._write() as db:
            involved = _load_involved(db, {result.key_id}, {hint} if hint else set())
            changed = updates(involved, result, now, replaces)
            _save_keys(db, changed)
            probed = next((k for k in [*changed, *involved] if k.id == result.key_id), None)
            if probed is not None and result.quota is not None:
                _save_quota(db, probed.limit_group, result.quota)
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
        with self._write(wait, mark) as db:
            settings = _load_settings(db)
            ids = {a.key_id for a in attempts} | ({active_key_id} if active_key_id is not None else set())
            hints = {a.outcome.account_hint for a in attempts if a.outcome.account_hint}
            roster = Roster(_load_involved(db, ids, hints))
            changed: dict[int, KeyRecord] = {}
            # One upsert per key and hour (and day), not per attempt: [requests, successes, rate_limited].
            hourly: dict[tuple[int, int], list[int]] = {}
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
            _count(db, hourly)
            _save_keys(db, changed.values())
            _learn(db, learned)
            stale = rev is not None and rev != _load_rev(db)
            chosen = roster.get(active_key_id)
            if chosen is not None and not stale:
                updated = engine.after_selection(settings, engine.Selection(chosen, "proxy"))
                if updated != settings:
                    _save_settings(db, updated, bump=False)


# -- row helpers (run inside a transaction) ----------------------------------------------------

def _count(db: sqlite3.Connection, hourly: dict[tuple[int, int], list[int]]) -> None:
    """Add attempts' counts, per key and hour, to the hourly and daily tables, and drop hourly rows that are
    older than HOURLY_KEPT_HOURS (through the index on hour, so a write with nothing to drop costs one lookup)."""
    if not hourly:
        return
    daily: dict[tuple[int, str], list[int]] = {}
    for (key_id, hour), (req, ok, limited) in hourly.items():
        tally = daily.setdefault((key_id, utc_day(hour * 3600)), [0, 0, 0])
        tally[0] += req
        tally[1] += ok
        tally[2] += limited
    for table, bucket, rows in (("hourly", "hour", hourly), ("daily", "day", daily)):
        db.executemany(
            f"INSERT INTO {table} (key_id, {bucket}, requests, successes, rate_limited) VALUES (?, ?, ?, ?, ?) "
            f"ON CONFLICT (key_id, {bucket}) DO UPDATE SET requests = requests + excluded.requests, "
            "successes = successes + excluded.successes, rate_limited = rate_limited + excluded.rate_limited",
            [(key_id, b, *tally) for (key_id, b), tally in rows.items()],
        )
    db.execute("DELETE FROM hourly WHERE hour < ?", (max(hour for _, hour in hourly) - HOURLY_KEPT_HOURS,))


def _save_quota(db: sqlite3.Connection, group: Group, quota: Quota) -> None:
    before = accounts_db.load_account(db, group) or AccountRecord(surface=group[0], account=group[1])
    accounts_db.save_accounts(db, [replace(before, quota=quota)])


def _learn(db: sqlite3.Connection, learned: Sequence[tuple[Group, LearnedCap]]) -> None:
    """Merge caps a proxy learned into the stored accounts: merged here, not overwritten, so caps that other
    proxies learned meanwhile, and caps a user stated, stay."""
    by_group: dict[Group, list[LearnedCap]] = {}
    for group, cap in learned:
        by_group.setdefault(group, []).append(cap)
    changed = []
    for group, found in by_group.items():
        merged = caps.merge_caps(accounts_db.load_account(db, group), group, found, max(c.at for c in found))
        if merged is not None:
            changed.append(merged)
    accounts_db.save_accounts(db, changed)


_SELECT_KEYS = f"SELECT {', '.join(_KEY_COLUMNS)} FROM keys"


def _row_to_key(row: Sequence[Any]) -> KeyRecord:
    values = dict(zip(_KEY_COLUMNS, row, strict=True))
    values["secret"] = Secret(values["secret"])
    values["surface"] = Surface(values["surface"])
    return KeyRecord(**values)


def _load_keys(db: sqlite3.Connection) -> list[KeyRecord]:
    return [_row_to_key(r) for r in db.execute(_SELECT_KEYS + " ORDER BY id")]


def _load_involved(db: sqlite3.Connection, ids: set[int], accounts: set[str]) -> list[KeyRecord]:
    """The keys an outcome batch can change: the keys themselves and every key of their accounts.
    Loading only these keeps a proxy's write short however large the pool."""
    marks = ",".join("?" * len(ids)) or "NULL"
    account_marks = ",".join("?" * len(accounts)) or "NULL"
    rows = db.execute(
        f"{_SELECT_KEYS} WHERE id IN ({marks}) OR account IN ({account_marks}) OR account IN "
        f"(SELECT account FROM keys WHERE id IN ({marks}) AND account IS NOT NULL) ORDER BY id",
        (*ids, *accounts, *ids),
    )
    return [_row_to_key(r) for r in rows]


def _one_key(db: sqlite3.Connection, key_id: int) -> KeyRecord:
    row = db.execute(_SELECT_KEYS + " WHERE id = ?", (key_id,)).fetchone()
    if row is None:
        raise KeyNotFound("that key was removed meanwhile; see `kimi-rotate list-keys`")
    return _row_to_key(row)


_MUTABLE_COLUMNS = tuple(c for c in _KEY_COLUMNS if c not in ("id", "secret", "fingerprint", "added_at"))
_UPDATE_KEY = f"UPDATE keys SET {', '.join(f'{c} = ?' for c in _MUTABLE_COLUMNS)} WHERE id = ?"


def _save_keys(db: sqlite3.Connection, keys: Iterable[KeyRecord]) -> None:
    rows = []
    for k in keys:
        values = [getattr(k, c) for c in _MUTABLE_COLUMNS]
        rows.append((*(v.value if isinstance(v, Surface) else v for v in values), k.id))
    db.executemany(_UPDATE_KEY, rows)


def _load_settings(db: sqlite3.Connection) -> PoolSettings:
    row = db.execute("SELECT value FROM meta WHERE name = 'settings'").fetchone()
    return _settings_from(json.loads(row[0])) if row else PoolSettings()


def _settings_fields(settings: PoolSettings) -> dict[str, Any]:
    """The settings as the JSON the store keeps (enum values as strings)."""
    return {
        "strategy": settings.strategy.value,
        "active_key_id": settings.active_key_id,
        "serve_active_next": settings.serve_active_next,
        "current_by_surface": {s.value: i for s, i in settings.current_by_surface.items()},
        "auto_refresh_health": settings.auto_refresh_health,
        "health_refresh_cooldown_minutes": settings.health_refresh_cooldown_minutes,
    }


def _settings_from(data: dict[str, Any]) -> PoolSettings:
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


def _load_rev(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT value FROM meta WHERE name = 'rev'").fetchone()
    return int(row[0]) if row else 0


def _load_edits(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT value FROM meta WHERE name = 'edits'").fetchone()
    return int(row[0]) if row else 0


def _save_settings(db: sqlite3.Connection, settings: PoolSettings, bump: bool) -> None:
    db.execute(
        "INSERT INTO meta (name, value) VALUES ('settings', ?) "
        "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (json.dumps(_settings_fields(settings), separators=(",", ":")),),
    )
    if bump:
        db.execute(
            "INSERT INTO meta (name, value) VALUES ('rev', '1') "
            "ON CONFLICT (name) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
        )


def _counters(nk: NewKey) -> tuple[int, int, int, int]:
    """Imported counters made consistent: total = successful + rate limited + failed."""
    ok = max(0, nk.successful_requests)
    limited = max(0, nk.rate_limited_requests)
    total = max(nk.total_requests, ok + limited)
    return total, ok, limited, total - ok - limited


def _conflicts(db: sqlite3.Connection, new: Sequence[NewKey], where: Where) -> list[Conflict]:
    """Every key of `new` whose secret or name is taken, by the pool or by an earlier key of `new`."""
    pool = db.execute("SELECT secret, name FROM keys ORDER BY id").fetchall()
    by_secret = {secret: (i, name) for i, (secret, name) in enumerate(pool)}
    by_name = {name: i for i, (_, name) in enumerate(pool)}
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


def _position(db: sqlite3.Connection, key_id: int) -> int:
    """A key's index as `list-keys` shows it."""
    return int(db.execute("SELECT COUNT(*) FROM keys WHERE id < ?", (key_id,)).fetchone()[0])


def _unique_name(wanted: str | None, taken: set[str]) -> str:
    if wanted and wanted not in taken:
        return wanted
    base = wanted or "Account"
    n = len(taken) + 1 if not wanted else 2
    while f"{base} {n}" in taken:
        n += 1
    return f"{base} {n}"


def _check_home_path(home: Path) -> None:
    """The store folder's path must lead through folders: mkdir would only say "File exists"."""
    if home.exists() and not home.is_dir():
        raise StoreError(
            f"{home} is a file, not a folder; the store is a folder holding {STORE_FILE}: point {HOME_ENV} "
            "at a folder (a new one is created), or move the file aside"
        )
    if any(parent.exists() and not parent.is_dir() for parent in home.parents):
        raise StoreError(
            f"cannot create the store folder {home}: part of that path is a file, not a folder; point {HOME_ENV} "
            "at a folder"
        )


def _private_dir(home: Path, read_only: Callable[[str], StoreError]) -> None:
    _check_home_path(home)
    try:
        if not home.is_dir():
            home.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(
            f"cannot create the store folder {home}: {e.strerror}; point {HOME_ENV} at a writable folder"
        ) from None
    try:
        if stat.S_IMODE(home.stat().st_mode) & 0o077:
            home.chmod(0o700)
    except OSError as e:
        raise read_only(f"cannot tighten {home}'s permissions: {e.strerror}") from None


def _create_private_file(path: Path, read_only: Callable[[str], StoreError]) -> bool:
    """Create the file 0600 from the first instant (no window where it is readable). True if new."""
    if path.exists():
        return path.stat().st_size == 0
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return path.is_file() and path.stat().st_size == 0  # a folder goes on to _check_header's message
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and path.parent.is_dir():
            raise read_only(f"cannot create {path.name}: {e.strerror}") from None
        raise StoreError(
            f"cannot create the store {path}: {e.strerror}; point {HOME_ENV} at a writable folder"
        ) from None
    os.close(fd)
    return True
