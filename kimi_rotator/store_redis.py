"""The Redis store: one pool shared by proxies on several machines (`kimi_store=redis://...`).

Layout, under a prefix (default `kimi-rotate:`, `?prefix=` in the URL for another pool on the same server):
- `meta` (hash): the store's id, schema, next key id, rev, edits, version and the settings (JSON);
- `keys` (hash): key id -> the key's record as JSON, its secret sealed with AES-GCM (secret_box.py);
- `accounts`, `files`, `proxies`, `applied` (hashes); `hourly:<hour>` and `daily:<day>` (hashes of counters).
Writers serialise on a lock (redis-py's Lock, with a timeout), read what they change while WATCHing it, and commit
in one MULTI/EXEC that a lost lock makes fail: the same read-compute-write transactions the SQLite store runs.
Every commit bumps `version` and is published on the `changed` channel, so other proxies read it within
milliseconds; their store threads still read `version` every poll, in case a message was missed.
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import LockError, RedisError, WatchError
from redis.retry import Retry

from . import accounts_db
from .keys import fingerprint
from .models import AccountRecord, Group, KeyRecord, PoolSettings, Secret, Surface
from .secret_box import SecretBox, SecretError
from .store import (
    BUSY_TIMEOUT,
    HOURLY_KEPT_HOURS,
    Counters,
    Counts,
    FileRecord,
    NewKey,
    Rows,
    Snapshot,
    Store,
    StoreBusy,
    StoreError,
    StoreLost,
    StoreUnreachable,
    Tally,
    daily_tally,
    day_start,
    new_key_counters,
    settings_fields,
    settings_from,
    utc_day,
)

if TYPE_CHECKING:
    from .accounts_db import ProxyRow
    from .shared_counts import SharedCounts

SCHEMA = "1"
DEFAULT_PREFIX = "kimi-rotate:"
SECRET_FILE = "store-secret"  # in the store folder, unless kimi_store_secret names another
LOCK_SECONDS = 5.0  # a writer killed mid-transaction holds the lock this long at most
SOCKET_TIMEOUT = 2.0  # a Redis that stops answering fails a call after this long: the proxy serves from memory
CONNECT_TIMEOUT = 0.5
_KEY_FIELDS = tuple(f.name for f in fields(KeyRecord) if f.name not in ("id", "secret"))
_GROUP_SEP = "\x1f"  # between surface and account in a hash field (neither can contain it)


def is_redis_url(spec: str) -> bool:
    return urlsplit(spec.strip()).scheme in ("redis", "rediss", "unix")


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _split_prefix(url: str) -> tuple[str, str]:
    """(the URL redis-py is given, the key prefix): `prefix` is ours, not a connection option."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((v for k, v in query if k == "prefix"), DEFAULT_PREFIX)
    rest = [(k, v) for k, v in query if k != "prefix"]
    return urlunsplit(parts._replace(query=urlencode(rest))), prefix


def connection_url(url: str) -> str:
    """The URL as redis-py takes it (without our `prefix`)."""
    return _split_prefix(url)[0]


def connect(url: str, timeout: float = SOCKET_TIMEOUT) -> Any:
    """A client that fails fast: one try, short timeouts (the proxy keeps serving from memory meanwhile). Typed Any:
    redis-py's hints do not follow decode_responses, so every answer would need a cast."""
    plain, _ = _split_prefix(url)
    try:
        return redis.Redis.from_url(plain, socket_timeout=timeout, socket_connect_timeout=CONNECT_TIMEOUT,
                                    retry=Retry(NoBackoff(), 0), health_check_interval=30, decode_responses=True)
    except ValueError as e:
        raise StoreError(f"cannot use the store URL {redacted(url)} ({e}); write it as "
                         "redis://[user:password@]host:port/db") from None


class RedisStore(Store):
    def __init__(self, url: str, home: Path, secret_file: Path | None = None, *, readonly: bool = False) -> None:
        self.url = url
        self.where = redacted(url)
        self.home = home
        self.readonly = readonly
        self.secret_file = secret_file if secret_file is not None else home / SECRET_FILE
        _, self.prefix = _split_prefix(url)
        self.client: Any = connect(url)
        self.instance = uuid.uuid4().hex[:12]  # this Store's name in `applied`
        self._commit_lock = threading.Lock()  # as in the SQLite store: `recorded` and `taken` are exact
        self._recorded = 0
        self._taken = 0
        self._unsure = False  # a commit failed in a way that leaves open whether it went through
        self._opened: dict[str, Secret] = {}  # sealed token -> key, so a snapshot opens each key once
        self._edits_seen = 0
        self._restored = 0
        self._lost_pending = False  # a restore by another proxy was seen and this Store's owner has not acted on it
        self._watcher: threading.Thread | None = None
        self._closing = threading.Event()
        self._store_id = self._open()
        self.box = self._load_box()

    # -- opening -------------------------------------------------------------------------------

    def _k(self, name: str) -> str:
        return self.prefix + name

    def _fail(self, e: Exception) -> StoreError:
        if isinstance(e, StoreError):
            return e
        kind = StoreUnreachable if isinstance(e, redis.ConnectionError | redis.TimeoutError) else StoreError
        return kind(f"cannot reach the store {self.where} ({type(e).__name__}: {e}); check that Redis runs "
                    "and the URL, user and password are right")

    def _open(self) -> str:
        try:
            meta = self.client.hgetall(self._k("meta"))
            if not meta and not self.readonly:
                fresh = uuid.uuid4().hex
                self.client.hsetnx(self._k("meta"), "id", fresh)
                self.client.hsetnx(self._k("meta"), "schema", SCHEMA)
                meta = self.client.hgetall(self._k("meta"))
        except RedisError as e:
            raise self._fail(e) from None
        schema = meta.get("schema", SCHEMA)
        if schema != SCHEMA:
            raise StoreError(f"the store {self.where} was written by another kimi-rotate (schema {schema}, this one "
                             f"knows {SCHEMA}); use the same version on every machine. Nothing was changed.")
        self._edits_seen = int(meta.get("edits", 0))
        self._restored = int(meta.get("restored", 0))  # how many times a proxy wrote the store back after a loss
        return str(meta.get("id", ""))

    def _load_box(self) -> SecretBox | None:
        """The sealing secret: made here for a store with no keys yet, else it must be the one the keys were sealed
        with (copied from the machine that made the store)."""
        try:
            has_keys = bool(self.client.hlen(self._k("keys")))
        except RedisError as e:
            raise self._fail(e) from None
        if self.readonly and not has_keys and not self.secret_file.exists():
            return None
        try:
            return SecretBox.load(self.secret_file, create=not has_keys and not self.readonly)
        except SecretError as e:
            raise StoreError(str(e)) from None

    def reopen(self) -> RedisStore:
        return RedisStore(self.url, self.home, self.secret_file)

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(RedisError):
            self.client.close()

    # -- sealing -------------------------------------------------------------------------------

    def _seal(self, secret: str) -> str:
        if self.box is None:
            raise StoreError(f"no sealing secret at {self.secret_file}; run a command that writes first")
        return self.box.seal(secret, fingerprint(secret))

    def _open_secret(self, token: str, fp: str) -> Secret:
        found = self._opened.get(token)
        if found is None:
            if self.box is None:
                raise StoreError(f"the keys in {self.where} are sealed, and there is no secret file at "
                                 f"{self.secret_file}: copy it from the machine that made the store")
            if _sealed_with(token) not in self.box.key_ids:
                self._reload_box()
            try:
                found = Secret(self.box.open(token, fp))
            except SecretError as e:
                raise StoreError(str(e)) from None
            self._opened[token] = found
        return found

    def _reload_box(self) -> None:
        """Read the secret file again: `store rotate-secret --finish` re-sealed the keys with a secret that was
        added to the file (and copied here) after this store read it."""
        with contextlib.suppress(SecretError):  # the value then does not open, and says why
            self.box = SecretBox.load(self.secret_file)

    def reseal(self) -> int:
        """Seal every key again with the current (first) secret of the file, in one transaction; how many keys were
        re-sealed. Afterwards no value in the store needs an older secret, so they can be dropped from the file."""
        self._reload_box()
        with self._write() as rows:
            assert isinstance(rows, RedisRows)
            return rows.reseal()

    def sealed_by(self) -> dict[str, int]:
        """How many keys are sealed with each secret (by its id)."""
        found = self._quick(lambda c: c.hgetall(self._k("keys")))
        out: dict[str, int] = {}
        for text in found.values():
            kid = _sealed_with(json.loads(text)["sealed"])
            out[kid] = out.get(kid, 0) + 1
        return out

    def _key_from(self, key_id: int, data: Mapping[str, Any]) -> KeyRecord:
        """The record from its stored fields (as _key_text wrote them)."""
        fields = {n: data[n] for n in _KEY_FIELDS if n in data}
        fields["surface"] = Surface(data["surface"])
        return KeyRecord(id=key_id, secret=self._open_secret(data["sealed"], data["fingerprint"]), **fields)

    def _key_text(self, key: KeyRecord, sealed: str) -> str:
        data: dict[str, Any] = {n: getattr(key, n) for n in _KEY_FIELDS}
        data["surface"] = key.surface.value
        data["sealed"] = sealed
        return json.dumps(data, separators=(",", ":"))

    # -- watching for other writers ------------------------------------------------------------

    def shared_counts(self, proxy_id: str) -> SharedCounts:
        from .shared_counts import SharedCounts  # its asyncio client is the proxy's only

        return SharedCounts.from_url(self.url, self.prefix, proxy_id)

    def watch(self, changed: Callable[[], None]) -> None:
        """Call `changed` (from a thread of this store) within milliseconds of any commit by another writer, and
        keep edits() current without asking Redis on every request."""
        if self._watcher is not None:
            return
        self._watcher = threading.Thread(target=self._listen, args=(changed,), name="kimi-rotate-redis-watch",
                                         daemon=True)
        self._watcher.start()

    def _listen(self, changed: Callable[[], None]) -> None:
        channel = self._k("changed")
        while not self._closing.is_set():
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(channel)
                changed()  # (re)subscribed: whatever was missed meanwhile is read now
                while not self._closing.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    edits, _, writer = str(message["data"]).partition(" ")
                    if edits.isdigit():
                        self._edits_seen = int(edits)
                    if writer != self.instance:
                        changed()
            except Exception:  # Redis is away (the store thread's polls report it), or this store was closed
                if self._closing.wait(0.5):
                    return

    # -- reading -------------------------------------------------------------------------------

    def data_version(self) -> int:
        if self._lost_pending:
            raise self._lost("and another proxy wrote its view back")
        try:
            store_id, version, restored = self.client.hmget(self._k("meta"), ["id", "version", "restored"])
            self._check_id(store_id, restored, lambda: bool(self.client.hlen(self._k("keys"))))
        except RedisError as e:
            raise self._fail(e) from None
        return int(version or 0)

    def snapshot(self) -> Snapshot:
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.hgetall(self._k("meta"))
            pipe.hgetall(self._k("keys"))
            pipe.hgetall(self._k("accounts"))
            pipe.hgetall(self._k("applied"))
            with self._commit_lock:  # the transaction fixes what is read: none of our commits in between
                meta, keys, accounts, applied = pipe.execute()
                self._taken += 1
                taken, recorded = self._taken, self._recorded
        except RedisError as e:
            raise self._fail(e) from None
        self._check_id(meta.get("id"), meta.get("restored"), lambda: bool(keys))
        edits = int(meta.get("edits", 0))
        self._edits_seen = edits
        return Snapshot(_sorted_keys(self, _parsed(keys)), _settings(meta), int(meta.get("rev", 0)), edits, recorded,
                        taken, _accounts(accounts), {w: int(m) for w, m in applied.items()})

    def _check_id(self, found: str | None, restored: str | None, has_keys: Callable[[], bool]) -> None:
        """The store is still the one this Store opened, as this Store last knew it. One that is gone, or was made anew
        with no keys (a command run against the empty server), is lost: a proxy restores it. One that another proxy
        restored since is lost too, for this Store's owner (the outcomes it wrote before the loss must be sent again:
        restore() says which); a store made anew with keys is taken as it is."""
        if not self._store_id:
            return
        if found != self._store_id:
            if found is None or not has_keys():
                raise self._lost("")
            self._store_id, self._restored = found, int(restored or 0)
            return
        if int(restored or 0) != self._restored:
            self._restored = int(restored or 0)
            if self._watcher is not None:  # a proxy's pool: it has outcomes to send again (a command has none)
                self._lost_pending = True
                raise self._lost("and another proxy wrote its view back")

    def _lost(self, more: str) -> StoreLost:
        return StoreLost(f"the store {self.where} was lost by Redis (restarted without persistence?)"
                         + (f" {more}" if more else ""))

    def edits(self) -> int:
        """The last count a change notice or a read said (not the highest: after a restore it starts from a view's,
        and a proxy only asks whether it moved)."""
        return self._edits_seen

    def fresh_snapshot(self) -> Snapshot:
        return self.snapshot()

    # -- files and proxies ---------------------------------------------------------------------

    def remember_file(self, file_id: str, key_id: int, group: Group, now: float) -> None:
        self._quick(lambda c: c.hset(self._k("files"), file_id, _file_text(FileRecord(key_id, group, now))))

    def file_owner(self, file_id: str) -> tuple[int, Group] | None:
        text = self._quick(lambda c: c.hget(self._k("files"), file_id))
        found = _file_from(text) if text is not None else None
        return (found.key_id, found.group) if found is not None else None

    def heartbeat(
        self, proxy_id: str, pid: int, started: float, now: float, ttl: float,
        usage: Mapping[Group, tuple[int, int]] | None = None,
    ) -> list[tuple[str, int, float]]:
        row = json.dumps({"pid": pid, "started": started, "seen": now, "usage": accounts_db.encode_usage(usage)})
        self._quick(lambda c: c.hset(self._k("proxies"), proxy_id, row))
        return self.live_proxies(now, ttl)

    def proxy_rows(self, now: float, ttl: float) -> list[ProxyRow]:
        found = self._quick(lambda c: c.hgetall(self._k("proxies")))
        rows = []
        for proxy_id, text in found.items():
            data = json.loads(text)
            if data["seen"] >= now - ttl:
                rows.append(accounts_db.ProxyRow(proxy_id, int(data["pid"]), float(data["started"]),
                                                 float(data["seen"]), accounts_db.decode_usage(data["usage"])))
        return sorted(rows, key=lambda r: (r.started, r.id))

    def leave(self, proxy_id: str, now: float, ttl: float) -> None:
        found = self._quick(lambda c: c.hgetall(self._k("proxies")))
        gone = [p for p, text in found.items() if p == proxy_id or json.loads(text)["seen"] < now - 10 * ttl]
        if gone:
            self._quick(lambda c: c.hdel(self._k("proxies"), *gone))

    def _quick(self, call: Callable[[Any], Any]) -> Any:
        """One command that needs no transaction."""
        try:
            return call(self.client)
        except RedisError as e:
            raise self._fail(e) from None

    # -- transactions --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _read(self) -> Iterator[Rows]:
        try:
            yield RedisRows(self, self.client)
        except RedisError as e:
            raise self._fail(e) from None

    @contextlib.contextmanager
    def _write(self, wait: float = BUSY_TIMEOUT, mark: int | None = None) -> Iterator[Rows]:
        with self._transaction(wait, mark, restoring=False) as rows:
            yield rows

    @contextlib.contextmanager
    def _transaction(self, wait: float, mark: int | None, restoring: bool) -> Iterator[RedisRows]:
        if self.readonly:
            raise RuntimeError("this Store was opened with readonly=True")
        lock = self.client.lock(self._k("lock"), timeout=LOCK_SECONDS, sleep=0.002, blocking_timeout=wait,
                                thread_local=False)
        try:
            if not lock.acquire():
                raise StoreBusy(f"the store {self.where} is busy (other kimi-rotate processes are writing); "
                                "try again")
        except RedisError as e:
            raise self._fail(e) from None
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.watch(self._k("lock"))  # a lock that timed out and was taken by another fails the commit
                rows = RedisRows(self, pipe)
                if not restoring:  # never half a store written into an empty server: a proxy restores it whole
                    found, restored = pipe.hmget(self._k("meta"), ["id", "restored"])
                    self._check_id(found, restored, lambda: bool(pipe.hlen(self._k("keys"))))
                yield rows
                self._commit(pipe, rows, mark)
        except WatchError:
            raise StoreBusy(f"a write to {self.where} took longer than {LOCK_SECONDS:.0f} s and was dropped; "
                            "try again") from None
        except RedisError as e:
            raise self._fail(e) from None
        finally:
            with contextlib.suppress(LockError, RedisError):
                lock.release()

    def _commit(self, pipe: Any, rows: RedisRows, mark: int | None) -> None:
        pipe.multi()
        for method, args, kwargs in rows.ops:
            getattr(pipe, method)(*args, **kwargs)
        meta = self._k("meta")
        if mark is None and rows.ops:
            pipe.hincrby(meta, "edits", 1)
        if mark:
            pipe.hset(self._k("applied"), self.instance, mark)
        pipe.hincrby(meta, "version", 1)
        pipe.hget(meta, "edits")
        with self._commit_lock:
            try:
                results = pipe.execute()
            except (redis.ConnectionError, redis.TimeoutError):
                self._unsure = True  # sent, perhaps applied: record() asks before sending these outcomes again
                raise
            if mark:
                self._recorded = max(self._recorded, mark)
        edits = int(results[-1] or 0)
        self._edits_seen = edits
        with contextlib.suppress(RedisError):  # committed already: the others' polls see it if this is lost
            self.client.publish(self._k("changed"), f"{edits} {self.instance}")

    def restore(self, view: Snapshot, mark: int) -> bool:
        try:
            with self._transaction(BUSY_TIMEOUT, None, restoring=True) as rows:
                if rows.keys():
                    raise _Restored
                rows.clear()
                # rev and edits go on from the view's (both move with this commit), so that every proxy sees a change
                top = max((k.id for k in view.keys), default=0)
                rows.set_meta(id=self._store_id, schema=SCHEMA, next_key_id=top + 1, rev=view.rev, edits=view.edits,
                              restored=self._restored + 1)
                for key in view.keys:
                    rows.put_key(key)
                rows.save_settings(view.settings, bump=True)
                rows.save_accounts(view.accounts.values())
                rows.set_applied({**view.writers, self.instance: mark})
        except _Restored:  # by another proxy: from now on this Store knows that restore
            restored = self._quick(lambda c: c.hget(self._k("meta"), "restored"))
            self._restored, self._lost_pending = int(restored or 0), False
            return False
        self._restored, self._lost_pending = self._restored + 1, False
        with self._commit_lock:
            self._recorded = mark
        return True

    def applied_mark(self) -> int:
        done = int(self._quick(lambda c: c.hget(self._k("applied"), self.instance)) or 0)
        with self._commit_lock:
            self._recorded = done
        return done

    def record(self, attempts: Any, active_key_id: int | None = None, rev: int | None = None,
               wait: float = BUSY_TIMEOUT, mark: int = 0) -> None:
        """As Store.record; after a commit whose answer was lost, the attempts Redis already holds (by this Store's
        mark in `applied`) are not applied twice. The attempts are numbered up to `mark`, one apart."""
        if mark and self._unsure:
            done = int(self._quick(lambda c: c.hget(self._k("applied"), self.instance)) or 0)
            self._unsure = False
            skip = done - (mark - len(attempts))
            if skip > 0:
                attempts = list(attempts)[skip:]
                with self._commit_lock:
                    self._recorded = max(self._recorded, done)
                if not attempts and active_key_id is None:
                    return
        super().record(attempts, active_key_id, rev, wait, mark)


class _Restored(Exception):
    """Another proxy restored the lost store first."""


class RedisRows(Rows):
    """Reads go to Redis at once (inside _write, on the WATCHing pipeline); writes are queued for the commit."""

    def __init__(self, store: RedisStore, reader: Any) -> None:
        self.store = store
        self.reader = reader
        self.ops: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []  # pipeline calls for the commit
        self._keys: list[KeyRecord] | None = None
        self._sealed: dict[int, str] = {}  # each key's sealed secret as read or written: saved again as it is
        self._meta: dict[str, str] | None = None
        self._accounts: dict[Group, AccountRecord] | None = None

    def _k(self, name: str) -> str:
        return self.store.prefix + name

    def _op(self, method: str, *args: Any, **kwargs: Any) -> None:
        self.ops.append((method, args, kwargs))

    def _read_meta(self) -> dict[str, str]:
        if self._meta is None:
            self._meta = dict(self.reader.hgetall(self._k("meta")))
        return self._meta

    def keys(self) -> list[KeyRecord]:
        if self._keys is None:
            found = _parsed(self.reader.hgetall(self._k("keys")))
            self._sealed = {i: data["sealed"] for i, data in found.items()}
            self._keys = _sorted_keys(self.store, found)
        return list(self._keys)

    def save_keys(self, keys: Iterable[KeyRecord]) -> None:
        stored = {k.id: k for k in self.keys()}
        texts = {}
        for k in keys:
            before = stored.get(k.id)
            if before is None:
                continue  # removed meanwhile, as an UPDATE of a missing row does nothing
            texts[str(k.id)] = self.store._key_text(replace(k, secret=before.secret, fingerprint=before.fingerprint,
                                                             added_at=before.added_at), self._sealed[k.id])
            stored[k.id] = k
        if texts:
            self._op("hset", self._k("keys"), mapping=texts)
            self._keys = sorted(stored.values(), key=lambda k: k.id)

    def insert_key(self, new: NewKey, name: str, now: float) -> KeyRecord:
        next_id = int(self._read_meta().get("next_key_id", 1))
        self._meta = dict(self._read_meta(), next_key_id=str(next_id + 1))
        total, ok, limited, failed = new_key_counters(new)
        key = KeyRecord(
            id=next_id, secret=Secret(new.secret), fingerprint=fingerprint(new.secret), name=name,
            surface=new.surface, account=new.account, added_at=new.added_at or now, last_used=new.last_used,
            health=max(0.0, min(100.0, new.health)), health_at=now, cooldown_until=new.cooldown_until,
            cooldown_reason=new.cooldown_reason, disabled_reason=new.disabled_reason, total_requests=total,
            successful_requests=ok, rate_limited_requests=limited, failed_requests=failed,
        )
        self.put_key(key)
        self._op("hset", self._k("meta"), "next_key_id", next_id + 1)
        return key

    def put_key(self, key: KeyRecord) -> None:
        """Write a whole record with its id (a new key, a restored one)."""
        keys = [k for k in self.keys() if k.id != key.id]  # read first: it sets _sealed afresh
        self._sealed[key.id] = self.store._seal(key.secret.get_secret_value())
        self._op("hset", self._k("keys"), str(key.id), self.store._key_text(key, self._sealed[key.id]))
        self._keys = sorted([*keys, key], key=lambda k: k.id)

    def delete_key(self, key_id: int) -> None:
        self._op("hdel", self._k("keys"), str(key_id))
        self._keys = [k for k in self.keys() if k.id != key_id]
        # Its counters, in every hour and day that has some.
        hours = [f"hourly:{h}" for h in self.reader.zrange(self._k("hours"), 0, -1)]
        days = [f"daily:{d}" for d in self.reader.smembers(self._k("days"))]
        for name in (*hours, *days):
            self._op("hdel", self._k(name), str(key_id))

    def clear(self) -> None:
        """Drop what a command may have made in the empty server before the restore."""
        self._op("delete", *(self._k(n) for n in ("meta", "keys", "accounts", "applied")))
        self._keys, self._meta, self._accounts = [], {}, {}

    def set_meta(self, **values: object) -> None:
        self._op("hset", self._k("meta"), mapping={k: str(v) for k, v in values.items()})

    def set_applied(self, writers: Mapping[str, int]) -> None:
        if writers:
            self._op("hset", self._k("applied"), mapping=dict(writers))

    def settings(self) -> PoolSettings:
        return _settings(self._read_meta())

    def rev(self) -> int:
        return int(self._read_meta().get("rev", 0))

    def save_settings(self, settings: PoolSettings, bump: bool) -> None:
        text = json.dumps(settings_fields(settings), separators=(",", ":"))
        self._meta = dict(self._read_meta(), settings=text)
        self._op("hset", self._k("meta"), "settings", text)
        if bump:
            self._op("hincrby", self._k("meta"), "rev", 1)

    def accounts(self) -> dict[Group, AccountRecord]:
        if self._accounts is None:
            self._accounts = _accounts(self.reader.hgetall(self._k("accounts")))
        return dict(self._accounts)

    def account(self, group: Group) -> AccountRecord | None:
        return self.accounts().get(group)

    def save_accounts(self, records: Iterable[AccountRecord]) -> None:
        texts = {}
        current = self.accounts()
        for r in records:
            texts[r.surface.value + _GROUP_SEP + r.account] = json.dumps(accounts_db.encode_account(r))
            current[r.group] = r
        if texts:
            self._accounts = current
            self._op("hset", self._k("accounts"), mapping=texts)

    def count(self, hourly: Tally) -> None:
        """Counters as "requests,successes,rate_limited" per key in one hash per hour and one per day, with the
        hours and days that have one in `hours` (sorted) and `days`. Writers hold the lock, so reading and adding
        is exact."""
        hours: dict[str, dict[str, list[int]]] = {}
        for (key_id, hour), tally in hourly.items():
            hours.setdefault(f"hourly:{hour}", {})[str(key_id)] = tally
        days: dict[str, dict[str, list[int]]] = {}
        for (key_id, day), tally in daily_tally(hourly).items():
            days.setdefault(f"daily:{day}", {})[str(key_id)] = tally
        for name, adds in hours.items():
            self._add(name, adds)
            hour = int(name.split(":", 1)[1])
            self._op("zadd", self._k("hours"), {str(hour): hour})
        # As the SQLite store: hours older than HOURLY_KEPT_HOURS before the latest one written go.
        oldest = max(hour for _, hour in hourly) - HOURLY_KEPT_HOURS
        old = self.reader.zrangebyscore(self._k("hours"), "-inf", f"({oldest}")
        if old:
            self._op("delete", *(self._k(f"hourly:{h}") for h in old))
            self._op("zrem", self._k("hours"), *old)
        for name, adds in days.items():
            self._add(name, adds)
            self._op("sadd", self._k("days"), name.split(":", 1)[1])

    def counters(self, since: float, per_hour: bool) -> Counters:
        client = self.store.client  # a plain read: inside _write the lock keeps other writers out
        if per_hour:
            hours = client.zrangebyscore(self._k("hours"), int(since // 3600), "+inf")
            buckets = [(f"hourly:{h}", int(h) * 3600) for h in hours]
        else:
            since_day = utc_day(since)
            days = sorted(d for d in client.smembers(self._k("days")) if d >= since_day)
            buckets = [(f"daily:{d}", day_start(d)) for d in days]
        pipe = client.pipeline(transaction=False)
        for name, _ in buckets:
            pipe.hgetall(self._k(name))
        out: Counters = {}
        for (_, start), tallies in zip(buckets, pipe.execute(), strict=True):
            for key_id, text in tallies.items():
                req, ok, limited = (int(n) for n in text.split(","))
                out.setdefault(int(key_id), {})[start] = Counts(req, ok, limited)
        return out

    def files(self) -> dict[str, FileRecord]:
        found = {file_id: _file_from(text) for file_id, text in self.reader.hgetall(self._k("files")).items()}
        return {file_id: f for file_id, f in found.items() if f is not None}

    def next_key_id(self) -> int:
        return int(self._read_meta().get("next_key_id", 1))

    def put_counts(self, counters: Counters, per_hour: bool) -> None:
        buckets: dict[str, dict[str, str]] = {}
        for key_id, found in counters.items():
            for start, c in found.items():
                bucket = str(start // 3600) if per_hour else utc_day(start)
                buckets.setdefault(bucket, {})[str(key_id)] = ",".join(str(n) for n in c)
        for bucket, texts in buckets.items():
            if per_hour:
                self._op("hset", self._k(f"hourly:{bucket}"), mapping=texts)
                self._op("zadd", self._k("hours"), {bucket: int(bucket)})
            else:
                self._op("hset", self._k(f"daily:{bucket}"), mapping=texts)
                self._op("sadd", self._k("days"), bucket)

    def put_files(self, files: Mapping[str, FileRecord]) -> None:
        if files:
            self._op("hset", self._k("files"), mapping={file_id: _file_text(f) for file_id, f in files.items()})

    def put_settings(self, settings: PoolSettings, rev: int, next_key_id: int) -> None:
        self.save_settings(settings, bump=False)
        self._meta = dict(self._read_meta(), rev=str(rev), next_key_id=str(next_key_id))
        self._op("hset", self._k("meta"), mapping={"rev": rev, "next_key_id": next_key_id})

    def reseal(self) -> int:
        store = self.store
        assert store.box is not None  # a store with keys has its secret file
        texts = {}
        for key_id, text in self.reader.hgetall(self._k("keys")).items():
            data = json.loads(text)
            if not store.box.sealed_with_current(data["sealed"]):
                secret = store._open_secret(data["sealed"], data["fingerprint"])
                data["sealed"] = store._seal(secret.get_secret_value())
                texts[key_id] = json.dumps(data, separators=(",", ":"))
        if texts:
            self._op("hset", self._k("keys"), mapping=texts)
        return len(texts)

    def _add(self, name: str, adds: dict[str, list[int]]) -> None:
        before = dict(zip(adds, self.reader.hmget(self._k(name), list(adds)), strict=True))
        texts = {}
        for key_id, tally in adds.items():
            old = [int(n) for n in before[key_id].split(",")] if before[key_id] else [0, 0, 0]
            texts[key_id] = ",".join(str(a + b) for a, b in zip(old, tally, strict=True))
        self._op("hset", self._k(name), mapping=texts)


def _sealed_with(token: str) -> str:
    """The id of the secret a sealed value needs (see secret_box)."""
    parts = token.split(".")
    return parts[1] if len(parts) == 3 else ""


def _file_text(owner: FileRecord) -> str:
    return json.dumps([owner.key_id, owner.group[0].value, owner.group[1], owner.uploaded_at])


def _file_from(text: str) -> FileRecord | None:
    """None for an owner on a surface this version does not know."""
    key_id, surface, account, at = json.loads(text)
    try:
        return FileRecord(int(key_id), (Surface(surface), str(account)), float(at))
    except ValueError:
        return None


def _parsed(found: Mapping[str, str]) -> dict[int, dict[str, Any]]:
    """The `keys` hash: key id -> its stored fields."""
    return {int(i): json.loads(text) for i, text in found.items()}


def _sorted_keys(store: RedisStore, found: Mapping[int, Mapping[str, Any]]) -> list[KeyRecord]:
    return sorted((store._key_from(i, data) for i, data in found.items()), key=lambda k: k.id)


def _settings(meta: Mapping[str, str]) -> PoolSettings:
    text = meta.get("settings")
    return settings_from(json.loads(text)) if text else PoolSettings()


def _accounts(found: Mapping[str, str]) -> dict[Group, AccountRecord]:
    out: dict[Group, AccountRecord] = {}
    for name, text in found.items():
        surface, _, account = name.partition(_GROUP_SEP)
        try:
            stated, learned, quota = json.loads(text)
            record = accounts_db.decode_account(Surface(surface), account, stated, learned, quota)
        except ValueError:  # a surface this version does not know
            continue
        out[record.group] = record
    return out
