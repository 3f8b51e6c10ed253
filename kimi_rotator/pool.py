"""The proxy's live view of the store.

Requests never wait on the store's writes: selection runs the engine over an in-memory roster, outcomes
are applied in memory at once and written by a background thread in batches. The same thread notices
commits from other processes (the CLI, other proxies) through SQLite's data_version and installs a
fresh roster, replaying the outcomes the snapshot does not hold yet so none is lost in the swap.
A command (the CLI's use-key, disable...) must reach the very next request, so selection first asks the
store's edit count (a few microseconds) and, when a command has committed, reads the snapshot itself.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, replace

from . import activity, engine
from .models import KeyRecord, Outcome, PoolSettings, Surface
from .roster import Roster
from .store import BUSY_TIMEOUT, Attempt, Snapshot, Store, StoreBusy, StoreError

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2  # how soon other proxies' outcomes are seen
FLUSH_WAIT = 0.05  # seconds the writer waits for the store's write lock before trying again next pass
FLUSH_BATCH = 256  # outcomes that make the writer go before its next poll
MAX_PENDING = 100_000  # outcomes kept while the store cannot be written (then the oldest are dropped)


@dataclass
class _Pending:
    seq: int
    attempt: Attempt


@dataclass
class LivePool:
    store: Store
    roster: Roster = field(init=False)
    settings: PoolSettings = field(init=False)
    _rev: int = field(default=-1, init=False)
    _version: int = field(default=-1, init=False)  # data_version when the installed snapshot was read
    _edits: int = field(default=-1, init=False)  # the store's edit count in the installed snapshot
    _taken: int = field(default=-1, init=False)  # Snapshot.taken of the installed snapshot
    # Outcomes applied in memory but not yet in the store, replayed onto each new snapshot. Bounded like the write
    # queue: during a long store outage the oldest go first (the store never saw them either way).
    _unflushed: deque[_Pending] = field(default_factory=lambda: deque(maxlen=MAX_PENDING), init=False)
    _seq: int = field(default=0, init=False)
    _wake: threading.Event = field(default_factory=threading.Event, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False)
    _queue_lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _queue: list[_Pending] = field(default_factory=list, init=False)
    _active_to_save: tuple[int, int] | None = field(default=None, init=False)  # (key id, rev it was chosen under)
    _seq_written: int = field(default=0, init=False)
    _counts: Counter[Surface] = field(default_factory=Counter, init=False)
    on_error: Callable[[StoreError], None] | None = None
    on_recover: Callable[[], None] | None = None  # the store works again after on_error
    _failing: bool = field(default=False, init=False)  # the last pass of the thread met a StoreError
    _pass_failed: bool = field(default=False, init=False)
    # "Key back" needs no timer per key: one loop timer waits for the earliest cooldown deadline, and when it
    # fires, every key whose cooldown ended since the last check is reported, once.
    _back_timer: asyncio.TimerHandle | None = field(default=None, init=False)
    _back_at: float | None = field(default=None, init=False)
    _back_checked: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        # Read the version first: a commit between the two reads is then seen again, never missed.
        self._version = self.store.data_version()
        self._install(self.store.snapshot())

    # -- used on the event loop ----------------------------------------------------------------

    def catch_up(self) -> None:
        """Install the store's latest snapshot if a command has committed since the installed one was read."""
        try:
            if self.store.edits() == self._edits:
                return
            snapshot = self.store.fresh_snapshot()
        except StoreError:
            return  # the store thread reports it, and installs the change once the store can be read
        self._install(snapshot)

    def select(
        self, surface: Surface, now: float, exclude: Collection[int] = ()
    ) -> engine.Selection | engine.NoEligibleKey:
        self.catch_up()
        result = engine.select(self.roster, self.settings, now, surface=surface, exclude=exclude)
        if isinstance(result, engine.Selection):
            settings = engine.after_selection(self.settings, result)
            if settings is not self.settings:
                self.settings = settings
                with self._queue_lock:
                    self._active_to_save = (result.key.id, self._rev)
        return result

    def record(self, key_id: int, outcome: Outcome, now: float) -> list[KeyRecord]:
        """Apply an attempt's outcome now; it reaches the store within POLL_SECONDS."""
        before = self.roster
        updates = engine.apply_outcome(before, key_id, outcome, now, self.settings.auto_refresh_health)
        self.roster = before.with_updates(updates)
        changed_state = False
        if outcome.kind in engine.DISABLING or outcome.kind in engine.DEFAULT_COOLDOWN:  # never a success
            changes = activity.changes([before.get(u.id) for u in updates], updates, now)
            if changes:
                activity.emit(changes)
                self._watch_cooldowns(_earliest_cooldown(updates, now))
                changed_state = True
        self._seq += 1
        pending = _Pending(self._seq, Attempt(key_id, outcome, now))
        self._unflushed.append(pending)
        with self._queue_lock:
            self._queue.append(pending)
            backlog = len(self._queue)
            if backlog > MAX_PENDING:
                del self._queue[0]
        # Writes go out in batches every POLL_SECONDS: one transaction per request would cost the
        # proxy a core's worth of GIL time under load. A large backlog is written at once, and so is a key
        # that started cooling or was disabled: other proxies and `list-keys` should know that at once.
        if backlog >= FLUSH_BATCH or changed_state:
            self._wake.set()
        return updates

    def count(self, surface: Surface) -> int:
        return self._counts.get(surface, 0)

    async def written(self, timeout: float = 5.0) -> bool:
        """Wait until every outcome recorded so far is in the store (False: not within `timeout`, or no store
        thread). A write through another connection that must land after them waits for this: the quota watch's
        exact cooldown would otherwise be lengthened again by the guess it replaces, written after it."""
        target = self._seq
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self._seq_written < target:
            if self._thread is None or time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._back_checked = time.time()
        self._rewatch(self._back_checked)
        self._thread = threading.Thread(target=self._run, name="kimi-rotate-store", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write everything still pending, then stop the thread."""
        self._stop_watching()
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        else:
            self._flush()

    # -- the background thread -----------------------------------------------------------------

    def _run(self) -> None:
        last_version = self._version  # not now: a commit since the snapshot would never be installed
        while True:
            self._wake.wait(POLL_SECONDS)
            self._wake.clear()
            stopping = self._stop.is_set()
            self._pass_failed = False
            # Read first: SQLite readers never wait for writers, so other processes' changes (a key
            # disabled with the CLI) are seen on time even while the write lock is hard to get.
            try:
                version = self.store.data_version()
                if version != last_version:
                    last_version = version
                    snapshot = self.store.snapshot()
                    roster = _prepared(snapshot)
                    if self._loop is not None:
                        self._loop.call_soon_threadsafe(self._install, snapshot, roster)
            except StoreError as e:
                self._report(e)
            except Exception:  # a broken loop or store must not kill the thread silently
                log.exception("kimi-rotate: reading the store failed")
            # A busy store is no failure: the batch waits for the next pass (but not at shutdown).
            self._flush(wait=BUSY_TIMEOUT if stopping else FLUSH_WAIT)
            if stopping:
                return
            if self._failing and not self._pass_failed:  # a full disk was freed, a lock released...
                self._failing = False
                log.warning("kimi-rotate: the store %s works again", self.store.path)
                if self.on_recover is not None and self._loop is not None:
                    self._loop.call_soon_threadsafe(self.on_recover)

    def _flush(self, wait: float = BUSY_TIMEOUT) -> int:
        """Write queued outcomes; returns the last sequence number known to be in the store."""
        with self._queue_lock:
            batch, self._queue = self._queue, []
            active, self._active_to_save = self._active_to_save, None
        if not batch and active is None:
            return self._seq_written
        try:
            key_id, rev = active if active is not None else (None, None)
            mark = batch[-1].seq if batch else self._seq_written
            self.store.record([p.attempt for p in batch], key_id, rev, wait=wait, mark=mark)
        except StoreBusy:
            with self._queue_lock:
                self._queue[:0] = batch
                if self._active_to_save is None:
                    self._active_to_save = active
            return self._seq_written
        except StoreError as e:
            with self._queue_lock:  # keep them for the next try
                self._queue[:0] = batch
            self._report(e)
            return self._seq_written
        if batch:
            self._seq_written = batch[-1].seq
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._forget, self._seq_written)
        return self._seq_written

    def _report(self, error: StoreError) -> None:
        if not self._failing:  # once per episode, not on every retry
            log.warning("kimi-rotate: %s", error)
        self._failing = self._pass_failed = True
        if self.on_error is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self.on_error, error)

    # -- back on the event loop ----------------------------------------------------------------

    def _forget(self, seq: int) -> None:
        while self._unflushed and self._unflushed[0].seq <= seq:  # in sequence order: the written ones lead
            self._unflushed.popleft()

    def _install(self, snapshot: Snapshot, roster: Roster | None = None) -> None:
        if snapshot.taken < self._taken:
            return  # read before the installed one (catch_up came first): it would undo what that one holds
        self._taken, self._edits = snapshot.taken, snapshot.edits
        if roster is None:
            roster = _prepared(snapshot)
        settings_changed = snapshot.rev != self._rev
        recover = snapshot.settings.auto_refresh_health
        for p in self._unflushed:
            if p.seq > snapshot.recorded:  # the snapshot says exactly which of our outcomes it holds
                a = p.attempt
                roster = roster.with_updates(engine.apply_outcome(roster, a.key_id, a.outcome, a.at, recover))
        if self._loop is None:  # the first snapshot, or one before the proxy runs
            self.roster = roster
        else:  # say what other processes changed (a key disabled with the CLI, ...)
            now = time.time()
            old, self.roster = self.roster, roster
            activity.emit(activity.changes([old.get(k.id) for k in roster.keys], roster.keys, now))
            self._rewatch(now)  # deadlines may have moved either way
        # Keys change surface only through a new snapshot, so the per-request count is kept here.
        self._counts = Counter(k.surface for k in roster.keys)
        if settings_changed:
            self.settings = snapshot.settings
            self._rev = snapshot.rev
            with self._queue_lock:  # a command moved the current key: our older choice must not undo it
                self._active_to_save = None
        elif self.settings.active_key_id is not None and roster.get(self.settings.active_key_id) is None:
            self.settings = replace(self.settings, active_key_id=None)

    def _watch_cooldowns(self, deadline: float | None) -> None:
        """Have the timer fire at `deadline` if that is sooner than it would."""
        if deadline is None or self._loop is None or (self._back_at is not None and self._back_at <= deadline):
            return
        if self._back_timer is not None:
            self._back_timer.cancel()
        self._back_at = deadline
        self._back_timer = self._loop.call_later(max(0.0, deadline - time.time()), self._cooldowns_ended)

    def _rewatch(self, now: float) -> None:
        """Point the timer at the earliest cooldown running at `now` (one scan of the keys)."""
        self._stop_watching()
        self._watch_cooldowns(_earliest_cooldown(self.roster.keys, now))

    def _stop_watching(self) -> None:
        if self._back_timer is not None:
            self._back_timer.cancel()
        self._back_timer = self._back_at = None

    def _cooldowns_ended(self) -> None:
        now = time.time()
        since, self._back_checked = self._back_checked, now
        back = [k for k in self.roster.keys if k.disabled_reason is None and k.cooldown_until is not None
                and since < k.cooldown_until <= now]
        activity.emit((logging.INFO, line) for line in activity.back_lines(back))
        self._back_timer = self._back_at = None
        self._rewatch(now)


def _earliest_cooldown(keys: Iterable[KeyRecord], now: float) -> float | None:
    """The first deadline among the cooldowns running at `now` on keys that are not disabled."""
    return min((k.cooldown_until for k in keys
                if k.disabled_reason is None and k.cooldown_until is not None and k.cooldown_until > now), default=None)


def _prepared(snapshot: Snapshot) -> Roster:
    """The snapshot's roster with its selection indexes built: on the store thread, off the event loop."""
    roster = Roster(snapshot.keys)
    engine.prepare(roster, snapshot.settings, time.time())
    return roster
