"""The SQLite store: one file (WAL) in the store folder that any number of proxies and CLI runs on one machine share.

Every change is one `BEGIN IMMEDIATE` transaction that reads the rows, runs the engine and writes
the result, so concurrent writers serialise instead of overwriting each other. SQLite's journal
makes a kill -9 at any moment harmless. A file that is not a healthy store is never written to.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import sqlite3
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from . import accounts_db
from .keys import fingerprint
from .models import AccountRecord, Group, KeyRecord, PoolSettings, Secret, Surface
from .store import (
    BUSY_TIMEOUT,
    HOME_ENV,
    HOURLY_KEPT_HOURS,
    Counters,
    Counts,
    FileRecord,
    KeyNotFound,
    NewKey,
    Rows,
    Snapshot,
    Store,
    StoreBusy,
    StoreError,
    Tally,
    daily_tally,
    day_start,
    new_key_counters,
    settings_fields,
    settings_from,
    store_home,
    utc_day,
)

STORE_FILE = "store.db"
SCHEMA_VERSION = 4
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
_KEY_COLUMNS = tuple(f.name for f in fields(KeyRecord))


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


class SqliteStore(Store):
    def __init__(self, home: Path | None = None, *, readonly: bool = False) -> None:
        """`readonly` is for commands that only read: such a store opens where nothing can be written (a read-only
        folder, file or mount), creates nothing, and refuses to write."""
        self.home = home if home is not None else store_home()
        self.path = self.home / STORE_FILE
        self.where = str(self.path)
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

    def reopen(self) -> SqliteStore:
        return SqliteStore(self.home)

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
    def _read(self) -> Iterator[Rows]:
        with self._reading() as db:
            yield SqliteRows(db)

    @contextlib.contextmanager
    def _write(self, wait: float = BUSY_TIMEOUT, mark: int | None = None) -> Iterator[Rows]:
        with self._writing(wait, mark) as db:
            yield SqliteRows(db)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _writing(self, wait: float = BUSY_TIMEOUT, mark: int | None = None) -> Iterator[sqlite3.Connection]:
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
        with self._reading() as db:
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

    # -- files ---------------------------------------------------------------------------------

    def remember_file(self, file_id: str, key_id: int, group: Group, now: float) -> None:
        with self._writing(mark=0) as db:
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
        with self._writing(wait=0.05, mark=0) as db:
            accounts_db.heartbeat(db, proxy_id, pid, started, now, usage)
            return [row.who for row in accounts_db.proxy_rows(db, now, ttl)]

    def proxy_rows(self, now: float, ttl: float) -> list[accounts_db.ProxyRow]:
        """The running proxies with their last counts (`status`)."""
        with self._reading() as db:
            return accounts_db.proxy_rows(db, now, ttl)

    def leave(self, proxy_id: str, now: float, ttl: float) -> None:
        with self._writing(mark=0) as db:
            accounts_db.leave(db, proxy_id, now, ttl)

# -- one transaction's rows --------------------------------------------------------------------

class SqliteRows(Rows):
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def keys(self) -> list[KeyRecord]:
        return _load_keys(self.db)

    def involved(self, ids: set[int], accounts: set[str]) -> list[KeyRecord]:
        """Only these rows, however large the pool: a proxy's write stays short."""
        marks = ",".join("?" * len(ids)) or "NULL"
        account_marks = ",".join("?" * len(accounts)) or "NULL"
        rows = self.db.execute(
            f"{_SELECT_KEYS} WHERE id IN ({marks}) OR account IN ({account_marks}) OR account IN "
            f"(SELECT account FROM keys WHERE id IN ({marks}) AND account IS NOT NULL) ORDER BY id",
            (*ids, *accounts, *ids),
        )
        return [_row_to_key(r) for r in rows]

    def key(self, key_id: int) -> KeyRecord:
        row = self.db.execute(_SELECT_KEYS + " WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            raise KeyNotFound("that key was removed meanwhile; see `kimi-rotate list-keys`")
        return _row_to_key(row)

    def save_keys(self, keys: Iterable[KeyRecord]) -> None:
        rows = []
        for k in keys:
            values = [getattr(k, c) for c in _MUTABLE_COLUMNS]
            rows.append((*(v.value if isinstance(v, Surface) else v for v in values), k.id))
        self.db.executemany(_UPDATE_KEY, rows)

    def insert_key(self, new: NewKey, name: str, now: float) -> KeyRecord:
        cur = self.db.execute(
            "INSERT INTO keys (secret, fingerprint, name, surface, account, added_at, last_used, "
            "health, health_at, total_requests, successful_requests, rate_limited_requests, "
            "failed_requests, cooldown_until, cooldown_reason, disabled_reason) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                new.secret, fingerprint(new.secret), name, new.surface.value, new.account,
                new.added_at or now, new.last_used, max(0.0, min(100.0, new.health)), now,
                *new_key_counters(new), new.cooldown_until, new.cooldown_reason, new.disabled_reason,
            ),
        )
        assert cur.lastrowid is not None
        return self.key(cur.lastrowid)

    def delete_key(self, key_id: int) -> None:
        self.db.execute("DELETE FROM keys WHERE id = ?", (key_id,))  # its counters go with it (ON DELETE CASCADE)

    def settings(self) -> PoolSettings:
        return _load_settings(self.db)

    def rev(self) -> int:
        return _load_rev(self.db)

    def save_settings(self, settings: PoolSettings, bump: bool) -> None:
        self.db.execute(
            "INSERT INTO meta (name, value) VALUES ('settings', ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (json.dumps(settings_fields(settings), separators=(",", ":")),),
        )
        if bump:
            self.db.execute(
                "INSERT INTO meta (name, value) VALUES ('rev', '1') "
                "ON CONFLICT (name) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
            )

    def account(self, group: Group) -> AccountRecord | None:
        return accounts_db.load_account(self.db, group)

    def accounts(self) -> dict[Group, AccountRecord]:
        return accounts_db.load_accounts(self.db)

    def save_accounts(self, records: Iterable[AccountRecord]) -> None:
        accounts_db.save_accounts(self.db, records)

    def count(self, hourly: Tally) -> None:
        """Upserts per key and hour and per key and day; hourly rows older than HOURLY_KEPT_HOURS are dropped
        through the index on hour, so a write with nothing to drop costs one lookup."""
        for table, bucket, rows in (("hourly", "hour", hourly), ("daily", "day", daily_tally(hourly))):
            self.db.executemany(
                f"INSERT INTO {table} (key_id, {bucket}, requests, successes, rate_limited) VALUES (?, ?, ?, ?, ?) "
                f"ON CONFLICT (key_id, {bucket}) DO UPDATE SET requests = requests + excluded.requests, "
                "successes = successes + excluded.successes, rate_limited = rate_limited + excluded.rate_limited",
                [(key_id, b, *tally) for (key_id, b), tally in rows.items()],
            )
        self.db.execute("DELETE FROM hourly WHERE hour < ?", (max(hour for _, hour in hourly) - HOURLY_KEPT_HOURS,))

    def counters(self, since: float, per_hour: bool) -> Counters:
        out: Counters = {}
        if per_hour:
            rows = self.db.execute(
                "SELECT key_id, hour, requests, successes, rate_limited FROM hourly WHERE hour >= ?",
                (int(since // 3600),),
            )
            for key_id, hour, req, ok, limited in rows:
                out.setdefault(key_id, {})[hour * 3600] = Counts(req, ok, limited)
        else:
            rows = self.db.execute(
                "SELECT key_id, day, requests, successes, rate_limited FROM daily WHERE day >= ?",
                (utc_day(since),),
            )
            for key_id, day, req, ok, limited in rows:
                out.setdefault(key_id, {})[day_start(day)] = Counts(req, ok, limited)
        return out

    def files(self) -> dict[str, FileRecord]:
        return accounts_db.load_files(self.db)

    def next_key_id(self) -> int:
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'keys'").fetchone()
        return int(row[0]) + 1 if row else 1

    def put_key(self, key: KeyRecord) -> None:
        values = [getattr(key, c) for c in _KEY_COLUMNS]
        self.db.execute(
            f"INSERT INTO keys ({', '.join(_KEY_COLUMNS)}) VALUES ({', '.join('?' * len(_KEY_COLUMNS))})",
            [v.get_secret_value() if isinstance(v, Secret) else v.value if isinstance(v, Surface) else v
             for v in values],
        )

    def put_counts(self, counters: Counters, per_hour: bool) -> None:
        table, bucket = ("hourly", "hour") if per_hour else ("daily", "day")
        self.db.executemany(
            f"INSERT INTO {table} (key_id, {bucket}, requests, successes, rate_limited) VALUES (?, ?, ?, ?, ?) "
            f"ON CONFLICT (key_id, {bucket}) DO UPDATE SET requests = excluded.requests, "
            "successes = excluded.successes, rate_limited = excluded.rate_limited",
            [(key_id, start // 3600 if per_hour else utc_day(start), *c)
             for key_id, buckets in counters.items() for start, c in buckets.items()],
        )

    def put_files(self, files: Mapping[str, FileRecord]) -> None:
        for file_id, f in files.items():
            accounts_db.remember_file(self.db, file_id, f.key_id, f.group, f.uploaded_at)

    def put_settings(self, settings: PoolSettings, rev: int, next_key_id: int) -> None:
        self.save_settings(settings, bump=False)
        self.db.execute("INSERT INTO meta (name, value) VALUES ('rev', ?) "
                        "ON CONFLICT (name) DO UPDATE SET value = excluded.value", (str(rev),))
        # AUTOINCREMENT numbers from the highest id sqlite_sequence remembers (a row SQLite makes on first insert).
        self.db.execute("DELETE FROM sqlite_sequence WHERE name = 'keys'")
        self.db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('keys', ?)", (next_key_id - 1,))


_SELECT_KEYS = f"SELECT {', '.join(_KEY_COLUMNS)} FROM keys"


def _row_to_key(row: Sequence[Any]) -> KeyRecord:
    values = dict(zip(_KEY_COLUMNS, row, strict=True))
    values["secret"] = Secret(values["secret"])
    values["surface"] = Surface(values["surface"])
    return KeyRecord(**values)


def _load_keys(db: sqlite3.Connection) -> list[KeyRecord]:
    return [_row_to_key(r) for r in db.execute(_SELECT_KEYS + " ORDER BY id")]


_MUTABLE_COLUMNS = tuple(c for c in _KEY_COLUMNS if c not in ("id", "secret", "fingerprint", "added_at"))
_UPDATE_KEY = f"UPDATE keys SET {', '.join(f'{c} = ?' for c in _MUTABLE_COLUMNS)} WHERE id = ?"


def _load_settings(db: sqlite3.Connection) -> PoolSettings:
    row = db.execute("SELECT value FROM meta WHERE name = 'settings'").fetchone()
    return settings_from(json.loads(row[0])) if row else PoolSettings()


def _load_rev(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT value FROM meta WHERE name = 'rev'").fetchone()
    return int(row[0]) if row else 0


def _load_edits(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT value FROM meta WHERE name = 'edits'").fetchone()
    return int(row[0]) if row else 0


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
