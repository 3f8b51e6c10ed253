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
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import overload

from . import activity, caps, engine, events
from .accounts_db import PROXY_TTL
from .admission import Caps
from .models import (
    AccountRecord,
    Group,
    KeyRecord,
    KeyState,
    LearnedCap,
    Limit,
    Outcome,
    PoolSettings,
    Quota,
    Surface,
)
from .roster import Roster
from .store import BUSY_TIMEOUT, Attempt, Snapshot, Store, StoreBusy, StoreError, StoreLost

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2  # how soon other proxies' outcomes are seen
FLUSH_WAIT = 0.05  # seconds the writer waits for the store's write lock before trying again next pass
FLUSH_BATCH = 256  # outcomes that make the writer go before its next poll
MAX_PENDING = 100_000  # outcomes kept while the store cannot be written (then the oldest are dropped)
HEARTBEAT_SECONDS = 2.0  # how often a proxy tells the store it is alive
# Outcomes kept after they were written, to send again if the store loses them (a Redis restarted without
# persistence, after another proxy wrote its own view back): about a minute of a busy proxy's traffic.
WRITTEN_KEPT = 50_000
QUOTA_HORIZON = 3600.0  # quota that runs out by itself within this many seconds is spent first


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
    _written: deque[_Pending] = field(default_factory=lambda: deque(maxlen=WRITTEN_KEPT), init=False)  # store thread
    _writers: dict[str, int] = field(default_factory=dict, init=False)  # Snapshot.writers of the installed one
    _write_asked: bool = field(default=False, init=False)  # a wake that wants the queue written (see _ask_write)
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
    # What is known of each account (caps, quota): the snapshot's, plus caps learned since.
    accounts: dict[Group, AccountRecord] = field(default_factory=dict, init=False)
    on_caps_changed: Callable[[], None] | None = None  # caps were learned, stated, or shared anew
    # This proxy's counts per account, (in flight, sent in the last minute), called on the event loop: the scheduler's.
    usage_counts: Callable[[float], dict[Group, tuple[int, int]]] | None = None
    _usage_seen: dict[Group, tuple[int, int]] | None = field(default=None, init=False)  # last handed to the beat
    _caps: dict[Group, Caps] = field(default_factory=dict, init=False)  # caps() answers, until something changes
    _account_caps: dict[Group, Caps] = field(default_factory=dict, init=False)  # account_caps() answers, likewise
    _with_quota: list[tuple[Group, Quota]] = field(default_factory=list, init=False)  # accounts whose quota is known
    # Proxies on this store share each account's caps: (how many are alive, this one's place among them).
    share: tuple[int, int] = field(default=(1, 0), init=False)
    proxy_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12], init=False)
    started_at: float = field(default_factory=time.time, init=False)
    _files: dict[str, tuple[int, Group]] = field(default_factory=dict, init=False)  # file id -> uploader
    _files_to_save: list[tuple[str, int, Group, float]] = field(default_factory=list, init=False)
    generation: int = field(default=0, init=False)  # moves whenever keys are added or removed
    event_log: events.EventLog = field(init=False)  # this proxy's state changes, written by the store thread

    def __post_init__(self) -> None:
        self.event_log = events.EventLog(self.store.home)
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
        self,
        surface: Surface,
        now: float,
        exclude: Collection[int] = (),
        full: Collection[Group] = (),
        prefer: Sequence[Group] = (),
    ) -> engine.Selection | engine.NoEligibleKey:
        self.catch_up()
        result = engine.select(self.roster, self.settings, now, surface=surface, exclude=exclude, full=full,
                               prefer=prefer)
        return self._chosen(result)

    def place(
        self,
        surface: Surface,
        now: float,
        loads: Mapping[Group, int],
        exclude: Collection[int] = (),
        full: Collection[Group] = (),
        prefer: Sequence[Group] = (),
    ) -> engine.Selection | engine.NoEligibleKey:
        """As select, for a new conversation (engine.place)."""
        return self._chosen(engine.place(self.roster, self.settings, now, surface=surface, loads=loads,
                                         exclude=exclude, full=full, prefer=prefer))

    def pick_in_group(
        self,
        group: Group,
        key_id: int,
        surface: Surface,
        now: float,
        exclude: Collection[int],
        full: Collection[Group],
        ignore_cooldown: bool = False,
    ) -> engine.Selection | None:
        """Key `key_id` if it can serve, else the best key of its account that can; None if none can (the account
        is full, or has no usable key). `ignore_cooldown`: a cooling key serves too (a file only its account has).
        Like `place`, it reads the roster as it is: the addon has caught up with the store for this request."""
        if group[0] is not surface:
            return None
        roster = self.roster
        key = roster.get(key_id)
        if key is not None and key.limit_group == group and key.id not in exclude and group not in full and (
                key.disabled_reason is None and (ignore_cooldown or key.state_at(now) is not KeyState.COOLING)):
            return self._chosen(engine.Selection(key, "pinned"))
        if ignore_cooldown:
            others = [roster.keys[p] for p in roster.in_group(group)]
            spare = next((k for k in others if k.disabled_reason is None and k.id not in exclude), None)
            return self._chosen(engine.Selection(spare, "same account")) if spare is not None else None
        best = engine.best_in_group(roster, group, now, surface, exclude, self.settings.auto_refresh_health,
                                    full=full)
        return self._chosen(engine.Selection(best, "same account")) if best is not None else None

    def peek(
        self, surface: Surface, now: float, exclude: Collection[int] = ()
    ) -> engine.Selection | engine.NoEligibleKey:
        """What select would give with no account full, changing nothing."""
        return engine.select(self.roster, self.settings, now, surface=surface, exclude=exclude)

    @overload
    def _chosen(self, result: engine.Selection) -> engine.Selection: ...
    @overload
    def _chosen(self, result: engine.Selection | engine.NoEligibleKey) -> engine.Selection | engine.NoEligibleKey: ...

    def _chosen(self, result: engine.Selection | engine.NoEligibleKey) -> engine.Selection | engine.NoEligibleKey:
        """Make a pick the current key of its surface."""
        if isinstance(result, engine.Selection):
            settings = engine.after_selection(self.settings, result)
            if settings is not self.settings:
                self.settings = settings
                with self._queue_lock:
                    self._active_to_save = (result.key.id, self._rev)
        return result

    # -- accounts ------------------------------------------------------------------------------

    def caps(self, group: Group) -> Caps:
        """(concurrency, rpm) this proxy holds `group` to when it counts alone: the account's caps, split with the
        other proxies on this store."""
        found = self._caps.get(group)
        if found is None:
            concurrency, rpm = self.account_caps(group)
            found = self._caps[group] = (_share_of(concurrency, self.share), _share_of(rpm, self.share))
        return found

    def account_caps(self, group: Group) -> Caps:
        """(concurrency, rpm) in force for `group` as a whole (stated, else learned, else Kimi Code's documented
        concurrency): what counts shared by all the proxies hold it to."""
        found = self._account_caps.get(group)
        if found is None:
            record = caps.with_defaults(self.accounts.get(group), group)
            found = self._account_caps[group] = (record.cap(Limit.CONCURRENCY), record.cap(Limit.RPM)) \
                if record is not None else (None, None)
        return found

    def expiring_first(self, surface: Surface, now: float) -> list[Group]:
        """Accounts of `surface` whose quota left runs out by itself within QUOTA_HORIZON, soonest first."""
        if not self._with_quota:
            return []
        ends = []
        for group, quota in self._with_quota:
            if group[0] is surface:
                end = quota.expiring(now)
                if end is not None and end - now <= QUOTA_HORIZON:
                    ends.append((end, group))
        return [group for _, group in sorted(ends)]

    def _learn(self, group: Group, found: Iterable[LearnedCap], now: float) -> bool:
        merged = caps.merge_caps(self.accounts.get(group), group, found, now)
        if merged is None:
            return False
        self.accounts[group] = merged
        self._caps_moved()
        return True

    def _caps_moved(self) -> None:
        self._caps.clear()
        self._account_caps.clear()
        self._with_quota = [(g, r.quota) for g, r in self.accounts.items() if r.quota is not None]
        if self.on_caps_changed is not None:
            self.on_caps_changed()

    # -- files ---------------------------------------------------------------------------------

    def remember_file(self, file_id: str, key: KeyRecord, now: float) -> None:
        self._files[file_id] = (key.id, key.limit_group)
        with self._queue_lock:
            self._files_to_save.append((file_id, key.id, key.limit_group, now))
        self._ask_write()

    def file_owner(self, file_id: str) -> tuple[int, Group] | None:
        """The key that uploaded `file_id` and its account: this proxy's uploads, else the store's (another proxy's,
        or an earlier run's)."""
        owner = self._files.get(file_id)
        if owner is None:
            try:
                owner = self.store.file_owner(file_id)
            except StoreError:
                return None
            if owner is not None:
                self._files[file_id] = owner
        return owner

    def record(self, key_id: int, outcome: Outcome, now: float) -> list[KeyRecord]:
        """Apply an attempt's outcome now; it reaches the store within POLL_SECONDS."""
        before = self.roster
        updates = engine.apply_outcome(before, key_id, outcome, now, self.settings.auto_refresh_health)
        self.roster = before.with_updates(updates)
        changed_state = False
        if outcome.caps:
            key = self.roster.get(key_id)
            if key is not None and self._learn(key.limit_group, outcome.caps, now):
                changed_state = True  # other proxies and views should know at once
                for cap in outcome.caps:
                    activity.log.info(activity.cap_line(key, cap))
                    self.event_log.put(events.make("cap_learned", now, key, limit=cap.limit.value, value=cap.value,
                                                source=cap.source.value))
            else:  # nothing new: the store has nothing to merge
                outcome = replace(outcome, caps=())
        if outcome.kind in engine.DISABLING or outcome.kind in engine.DEFAULT_COOLDOWN:  # never a success
            found: list[events.Event] = []
            changes = activity.changes([before.get(u.id) for u in updates], updates, now, found)
            for event in found:
                self.event_log.put(event)
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
            self._ask_write()
        return updates

    def count(self, surface: Surface) -> int:
        return self._counts.get(surface, 0)

    async def written(self, timeout: float = 5.0) -> bool:
        """Wait until every outcome recorded so far is in the store (False: not within `timeout`, or no store
        thread). A write through another connection that must land after them waits for this: the quota watch's
        exact cooldown would otherwise be lengthened again by the guess it replaces, written after it."""
        target = self._seq
        deadline = time.monotonic() + timeout
        self._ask_write()
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
        self.store.watch(self._changed_elsewhere)

    def _ask_write(self) -> None:
        """Have the store thread write the queue now (set before the wake: the thread clears the wake, then reads)."""
        self._write_asked = True
        self._wake.set()

    def _changed_elsewhere(self) -> None:
        """Another writer committed (a Redis store says so at once): read it now, but write our batch on its own time.
        Writing on every such wake would turn each proxy's commit into a commit by every other, and so on."""
        self._wake.set()

    def stop(self) -> None:
        """Write everything still pending, then stop the thread."""
        self._stop_watching()
        self._stop.set()
        self._ask_write()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        else:
            self._flush()
            self.event_log.flush()

    # -- the background thread -----------------------------------------------------------------

    def _run(self) -> None:
        last_version = self._version  # not now: a commit since the snapshot would never be installed
        beat_at = 0.0
        flush_at = 0.0  # monotonic: when the batch goes out at the latest
        while True:
            self._wake.wait(max(0.0, min(POLL_SECONDS, flush_at - time.monotonic())))
            # Every pass reads; it writes when asked (a backlog, a key that started cooling, a file, shutdown) or
            # once POLL_SECONDS are up, not on a wake that only says another writer committed.
            self._wake.clear()
            asked, self._write_asked = self._write_asked, False
            read_only = not asked and time.monotonic() < flush_at
            stopping = self._stop.is_set()
            self._pass_failed = False
            now = time.time()
            if not stopping and now >= beat_at:
                beat_at = now + HEARTBEAT_SECONDS
                self._heartbeat(now)
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
            except StoreLost as e:
                self._restore(e)
                last_version = -1  # the restored store counts versions afresh: read it whatever it says next
            except StoreError as e:
                self._report(e)
            except Exception:  # a broken loop or store must not kill the thread silently
                log.exception("kimi-rotate: reading the store failed")
            if read_only and not stopping:
                continue
            flush_at = time.monotonic() + POLL_SECONDS
            # A busy store is no failure: the batch waits for the next pass (but not at shutdown).
            self._flush(wait=BUSY_TIMEOUT if stopping else FLUSH_WAIT)
            self.event_log.flush()
            if stopping:
                with contextlib.suppress(StoreError):  # else the row ages out by itself
                    self.store.leave(self.proxy_id, time.time(), PROXY_TTL)
                return
            if self._failing and not self._pass_failed:  # a full disk was freed, a lock released...
                self._failing = False
                log.warning("kimi-rotate: the store %s works again", self.store.where)
                if self.on_recover is not None and self._loop is not None:
                    self._loop.call_soon_threadsafe(self.on_recover)

    def _flush(self, wait: float = BUSY_TIMEOUT) -> int:
        """Write queued outcomes; returns the last sequence number known to be in the store."""
        with self._queue_lock:
            batch, self._queue = self._queue, []
            active, self._active_to_save = self._active_to_save, None
            files, self._files_to_save = self._files_to_save, []
        for i, (file_id, owner_id, group, at) in enumerate(files):
            try:
                self.store.remember_file(file_id, owner_id, group, at)
            except StoreError as e:  # this proxy knows already; the others learn it when it is written
                with self._queue_lock:
                    self._files_to_save[:0] = files[i:]
                if not isinstance(e, StoreBusy):
                    self._report(e)
                break
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
            self._written.extend(batch)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._forget, self._seq_written)
        return self._seq_written

    def _heartbeat(self, now: float) -> None:
        """Tell the store this proxy is alive, and work out its share of every account's caps."""
        if self.usage_counts is not None and self._loop is not None:
            # The counts live on the event loop: it hands a copy over for the next beat (status reads them).
            self._loop.call_soon_threadsafe(self._take_usage)
        try:
            live = self.store.heartbeat(self.proxy_id, os.getpid(), self.started_at, now, PROXY_TTL, self._usage_seen)
        except StoreError:
            return  # busy or failing: the next beat tries again (a store that fails is reported by the flush)
        ids = [proxy_id for proxy_id, _, _ in live]
        share = (len(ids), ids.index(self.proxy_id)) if self.proxy_id in ids else (1, 0)
        if share != self.share and self._loop is not None:
            self._loop.call_soon_threadsafe(self._set_share, share)

    def _restore(self, lost: StoreLost) -> None:
        """The store lost everything (Redis restarted without persistence): write this proxy's view back, unless
        another proxy did first; then the outcomes the store lacks are sent again (from the queue and the written
        ones kept), so none is lost and none is counted twice."""
        view = self._view_from_loop()
        if view is None:
            self._report(lost)
            return
        snapshot, seq = view
        try:
            restored = self.store.restore(snapshot, seq)
            done = seq if restored else self.store.applied_mark()
        except StoreError as e:
            self._report(e)
            return
        with self._queue_lock:
            if restored:  # the view holds every outcome up to seq, queued or not
                self._queue = [p for p in self._queue if p.seq > seq]
            else:
                self._queue[:0] = [p for p in self._written if p.seq > done]
        self._written.clear()
        self._seq_written = seq if restored else min(self._seq_written, done)
        if restored and self._loop is not None:
            self._loop.call_soon_threadsafe(self._forget, seq)
        log.warning("kimi-rotate: %s; %s", lost, "this proxy wrote its view of the pool back" if restored
                    else "this proxy sends again the outcomes that view lacks")

    def _view(self) -> tuple[Snapshot, int]:
        """The pool as this proxy sees it now, and the last outcome that view holds (on the event loop)."""
        view = Snapshot(list(self.roster.keys), self.settings, self._rev, self._edits,
                        accounts=dict(self.accounts), writers=dict(self._writers))
        return view, self._seq

    def _view_from_loop(self) -> tuple[Snapshot, int] | None:
        """_view(), taken on the event loop for the store thread (None if the loop does not run it within 5 s)."""
        if self._loop is None:
            return self._view()

        async def view() -> tuple[Snapshot, int]:
            return self._view()

        try:
            return asyncio.run_coroutine_threadsafe(view(), self._loop).result(timeout=5.0)
        except (concurrent.futures.TimeoutError, RuntimeError):
            return None

    def _take_usage(self) -> None:
        if self.usage_counts is not None:
            self._usage_seen = self.usage_counts(time.time())

    def _set_share(self, share: tuple[int, int]) -> None:
        self.share = share
        self._caps_moved()

    def _report(self, error: StoreError) -> None:
        if not self._failing:  # once per episode, not on every retry
            log.warning("kimi-rotate: %s", error)
            self.event_log.put(events.make("store_error", time.time(), error=str(error)))
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
        self._taken, self._edits, self._writers = snapshot.taken, snapshot.edits, snapshot.writers
        if roster is None:
            roster = _prepared(snapshot)
        settings_changed = snapshot.rev != self._rev
        recover = snapshot.settings.auto_refresh_health
        accounts = dict(snapshot.accounts)
        for p in self._unflushed:
            if p.seq > snapshot.recorded:  # the snapshot says exactly which of our outcomes it holds
                a = p.attempt
                roster = roster.with_updates(engine.apply_outcome(roster, a.key_id, a.outcome, a.at, recover))
                key = roster.get(a.key_id)
                if a.outcome.caps and key is not None:
                    merged = caps.merge_caps(accounts.get(key.limit_group), key.limit_group, a.outcome.caps, a.at)
                    if merged is not None:
                        accounts[key.limit_group] = merged
        if accounts != self.accounts:
            self.accounts = accounts
            self._caps_moved()
        old_keys = self.roster.keys if hasattr(self, "roster") else []
        if self._loop is None:  # the first snapshot, or one before the proxy runs
            self.roster = roster
        else:  # say what other processes changed (a key disabled with the CLI, ...)
            now = time.time()
            old, self.roster = self.roster, roster
            activity.emit(activity.changes([old.get(k.id) for k in roster.keys], roster.keys, now))
            self._rewatch(now)  # deadlines may have moved either way
        # Keys change surface only through a new snapshot, so the per-request count is kept here.
        counts = Counter(k.surface for k in roster.keys)
        if counts != self._counts or len(roster) != len(old_keys) or any(
                roster.get(k.id) is None for k in old_keys):
            self.generation += 1
        self._counts = counts
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
        for key in back:
            self.event_log.put(events.make("cooldown_ended", now, key))
        self._back_timer = self._back_at = None
        self._rewatch(now)


def _share_of(cap: int | None, share: tuple[int, int]) -> int | None:
    """This proxy's part of a cap split between `share[0]` proxies, as the `share[1]`-th of them: the parts add up
    to the cap exactly, the older proxies taking the remainder (a proxy may get 0: the account is then full here)."""
    if cap is None:
        return None
    count, rank = share
    return cap // count + (1 if rank < cap % count else 0)


def _earliest_cooldown(keys: Iterable[KeyRecord], now: float) -> float | None:
    """The first deadline among the cooldowns running at `now` on keys that are not disabled."""
    return min((k.cooldown_until for k in keys
                if k.disabled_reason is None and k.cooldown_until is not None and k.cooldown_until > now), default=None)


def _prepared(snapshot: Snapshot) -> Roster:
    """The snapshot's roster with its selection indexes built: on the store thread, off the event loop."""
    roster = Roster(snapshot.keys)
    engine.prepare(roster, snapshot.settings, time.time())
    return roster
