"""The account store: one SQLite file (WAL) that any number of proxies and CLI runs share.

Every change is one `BEGIN IMMEDIATE` transaction that reads the rows, runs the engine and writes
the result, so concurrent writers serialise instead of overwriting each other. SQLite's journal
makes a kill -9 at any moment harmless. A file that is not a healthy store is never written to.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import sqlite3
import stat
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import platformdirs
from pydantic import BaseModel, ValidationError

from . import engine
from .keys import fingerprint
from .models import KeyRecord, Outcome, OutcomeKind, PoolSettings, Surface
from .roster import Roster

HOME_ENV = "KIMI_ROTATE_HOME"
STORE_FILE = "store.db"
SCHEMA_VERSION = 1
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
)
_KEY_COLUMNS = tuple(KeyRecord.model_fields)


class StoreError(Exception):
    """A problem with the store that the user can act on; the message says what to do."""


class StoreBusy(StoreError):
    """Other writers held the store longer than the caller was willing to wait; nothing was changed."""


class KeyNotFound(StoreError):
    pass


class DuplicateKey(StoreError):
    pass


class NewKey(BaseModel):
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


def store_home() -> Path:
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir("kimi-rotate", appauthor=False))


def utc_day(ts: float) -> str:
    return _day_name(int(ts // 86400))


@functools.lru_cache(maxsize=16)
def _day_name(day: int) -> str:  # formatting a date costs more than the rest of recording an outcome
    return datetime.fromtimestamp(day * 86400, UTC).strftime("%Y-%m-%d")


class Store:
    def __init__(self, home: Path | None = None) -> None:
        self.home = home if home is not None else store_home()
        self.path = self.home / STORE_FILE
        self._lock = threading.Lock()
        self._db = self._open()
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
        _private_dir(self.home)
        fresh = _create_private_file(self.path)
        if not fresh:
            self._check_header()
        try:
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise self._unreadable(e) from None
        try:
            db.execute("PRAGMA foreign_keys = ON")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} was written by a newer kimi-rotate (schema {version}, this one knows "
                    f"{SCHEMA_VERSION}); upgrade kimi-rotate. The file was left untouched."
                )
            if version > 0 and db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise self._unreadable("the integrity check failed")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            if version < SCHEMA_VERSION:
                self._migrate(db)
        except sqlite3.OperationalError as e:
            db.close()
            if "readonly" in str(e) or "unable to open" in str(e):
                raise StoreError(
                    f"cannot write the store {self.path} ({e}); make {self.home} writable, "
                    f"or point {HOME_ENV} at a writable folder"
                ) from None
            raise self._unreadable(e) from None
        except sqlite3.DatabaseError as e:
            db.close()
            raise self._unreadable(e) from None
        except StoreError:
            db.close()
            raise
        return db

    def _check_header(self) -> None:
        try:
            with open(self.path, "rb") as f:
                head = f.read(len(_SQLITE_MAGIC))
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
                    if e.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                        raise StoreError(f"cannot write the store {self.path} ({e}); is it read-only?") from None
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
        return Snapshot(_load_keys(db), _load_settings(db), rev, edits, recorded, taken)

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
        out: dict[int, dict[str, tuple[int, int]]] = {}
        with self._read() as db:
            rows = db.execute(
                "SELECT key_id, day, requests, successes FROM daily WHERE day >= ?", (since_day,)
            )
            for key_id, day, req, ok in rows:
                out.setdefault(key_id, {})[day] = (req, ok)
        return out

    # -- changing keys -------------------------------------------------------------------------

    def add_keys(self, new: Sequence[NewKey], now: float) -> tuple[list[KeyRecord], list[NewKey]]:
        """Adds every key not present yet, in one transaction. Returns (added, skipped duplicates)."""
        added: list[KeyRecord] = []
        skipped: list[NewKey] = []
        with self._write() as db:
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
        added, skipped = self.add_keys([new], now)
        if skipped:
            raise DuplicateKey("this key is already in the store (see `kimi-rotate list-keys`)")
        return added[0]

    def remove_key(self, key_id: int) -> KeyRecord:
        with self._write() as db:
            key = _one_key(db, key_id)
            db.execute("DELETE FROM keys WHERE id = ?", (key_id,))
            settings = _load_settings(db)
            by_surface = {s: k for s, k in settings.current_by_surface.items() if k != key_id}
            if settings.active_key_id == key_id or by_surface != settings.current_by_surface:
                active = None if settings.active_key_id == key_id else settings.active_key_id
                update = {"active_key_id": active, "current_by_surface": by_surface}
                _save_settings(db, settings.model_copy(update=update), bump=True)
        return key

    def set_disabled(self, key_id: int, reason: str | None) -> KeyRecord:
        """Disable with a reason, or enable again with None (which also ends any cooldown)."""
        with self._write() as db:
            key = _one_key(db, key_id)
            if reason is None:
                changed = engine.clear_limits(key).model_copy(update={"disabled_reason": None})
            else:
                changed = key.model_copy(update={"disabled_reason": reason})
            _save_keys(db, [changed])
        return changed

    def clear_limits(self, key_ids: Sequence[int] | None) -> list[KeyRecord]:
        with self._write() as db:
            keys = _load_keys(db)
            chosen = keys if key_ids is None else [k for k in keys if k.id in set(key_ids)]
            cleared = [engine.clear_limits(k) for k in chosen]
            _save_keys(db, cleared)
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
            try:
                updated = PoolSettings.model_validate({**settings.model_dump(), **changes})
            except ValidationError as e:
                raise StoreError(f"invalid setting: {e.errors()[0]['msg']}") from None
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
        caller's number for this batch) shows as Snapshot.recorded in the snapshots read after the commit."""
        if not attempts and active_key_id is None:
            return
        with self._write(wait, mark) as db:
            settings = _load_settings(db)
            ids = {a.key_id for a in attempts} | ({active_key_id} if active_key_id is not None else set())
            hints = {a.outcome.account_hint for a in attempts if a.outcome.account_hint}
            roster = Roster(_load_involved(db, ids, hints))
            changed: dict[int, KeyRecord] = {}
            daily: Counter[tuple[int, str, bool]] = Counter()  # one upsert per key and day, not per attempt
            for a in attempts:
                updates = engine.apply_outcome(roster, a.key_id, a.outcome, a.at, settings.auto_refresh_health)
                roster = roster.with_updates(updates)
                changed.update((k.id, k) for k in updates)
                if updates:
                    daily[(a.key_id, utc_day(a.at), a.outcome.kind is OutcomeKind.SUCCESS)] += 1
            db.executemany(
                "INSERT INTO daily (key_id, day, requests, successes) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (key_id, day) DO UPDATE SET requests = requests + excluded.requests, "
                "successes = successes + excluded.successes",
                [(key_id, day, n, n if ok else 0) for (key_id, day, ok), n in daily.items()],
            )
            _save_keys(db, changed.values())
            stale = rev is not None and rev != _load_rev(db)
            chosen = roster.get(active_key_id)
            if chosen is not None and not stale:
                updated = engine.after_selection(settings, engine.Selection(chosen, "proxy"))
                if updated != settings:
                    _save_settings(db, updated, bump=False)


# -- row helpers (run inside a transaction) ----------------------------------------------------

_SELECT_KEYS = f"SELECT {', '.join(_KEY_COLUMNS)} FROM keys"


def _row_to_key(row: Sequence[object]) -> KeyRecord:
    return KeyRecord.model_validate(dict(zip(_KEY_COLUMNS, row, strict=True)))


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
        data = k.model_dump(mode="json", include=set(_MUTABLE_COLUMNS))
        rows.append((*(data[c] for c in _MUTABLE_COLUMNS), k.id))
    db.executemany(_UPDATE_KEY, rows)


def _load_settings(db: sqlite3.Connection) -> PoolSettings:
    row = db.execute("SELECT value FROM meta WHERE name = 'settings'").fetchone()
    return PoolSettings.model_validate_json(row[0]) if row else PoolSettings()


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
        (settings.model_dump_json(),),
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


def _unique_name(wanted: str | None, taken: set[str]) -> str:
    if wanted and wanted not in taken:
        return wanted
    base = wanted or "Account"
    n = len(taken) + 1 if not wanted else 2
    while f"{base} {n}" in taken:
        n += 1
    return f"{base} {n}"


def _private_dir(home: Path) -> None:
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_IMODE(home.stat().st_mode) & 0o077:
            home.chmod(0o700)
    except OSError as e:
        raise StoreError(
            f"cannot create the store folder {home}: {e.strerror}; point {HOME_ENV} at a writable folder"
        ) from None


def _create_private_file(path: Path) -> bool:
    """Create the file 0600 from the first instant (no window where it is readable). True if new."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return path.stat().st_size == 0
    except OSError as e:
        raise StoreError(
            f"cannot create the store {path}: {e.strerror}; point {HOME_ENV} at a writable folder"
        ) from None
    os.close(fd)
    return True
