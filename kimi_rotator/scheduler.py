"""Which key a request's next attempt goes to, and when: files, conversations, caps, the queue.

The failover loop asks `next_key` before every attempt. In order:
1. A request about an uploaded file goes to the key that uploaded it (any key of its account if that one is
   disabled): other accounts cannot see the file.
2. Under health-based, a conversation goes back to the account that served it last (Kimi's context cache is per
   account), as long as that account can serve and is under its caps; a new conversation is placed on the account
   with the fewest live conversations. Other strategies keep choosing per request, as their users asked.
3. Accounts at their caps (admission.py) are passed over. When every account that could serve is full, the request
   waits in its surface's first-come queue until a slot frees or its `kimi_max_wait` is up, then gets a local 429.
4. With counts shared by several proxies (shared_counts.py), the chosen account is then asked of Redis against its
   whole caps: refused, it is full (held so until a proxy publishes a release) and the choice is made again. While
   Redis does not answer, this proxy holds each account to its share of the caps, as proxies on one SQLite store do.
It imports no mitmproxy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import engine
from .admission import Admission, Caps, Gate, Lease
from .affinity import Pins
from .models import Group, KeyRecord, Strategy, Surface
from .pool import LivePool

if TYPE_CHECKING:
    from .failover import Job
    from .shared_counts import SharedCounts

CAPPED_RETRY_AFTER = 1.0  # seconds to suggest when only a request ending can free an account
# An account another proxy holds at its concurrency cap is tried again after this long even if no release is heard:
# pub/sub may drop a message (a subscriber reconnecting), and a killed proxy's leases expire without one.
REMOTE_RECHECK = 1.0


@dataclass(frozen=True, slots=True)
class Capped:
    """Every account that could serve is at its caps, and none freed within the request's wait."""

    retry_after: float


@dataclass(frozen=True, slots=True)
class SchedulerOptions:
    admission: bool = True  # kimi_admission
    affinity: bool = True  # kimi_affinity
    quota_aware: bool = True  # kimi_quota_aware
    affinity_idle: float = 1800.0  # kimi_affinity_idle


class Scheduler:
    def __init__(self, pool: LivePool, clock: Callable[[], float], max_wait: float,
                 options: SchedulerOptions = SchedulerOptions(), shared: SharedCounts | None = None) -> None:
        """`shared`: counts shared with the other proxies on one Redis (None: this proxy counts alone)."""
        self.pool = pool
        self.clock = clock
        self.max_wait = max_wait
        self.options = options
        self.shared = shared
        self.admission = Admission(pool.caps if shared is None else self._caps_in_force, clock,
                                   enabled=options.admission, on_free=self._freed,
                                   on_release=self._release_shared if shared is not None else None)
        if shared is not None:
            shared.on_freed = self.admission.freed_elsewhere
            shared.on_health = lambda _: self._caps_changed()
        pool.on_caps_changed = self._caps_changed
        pool.usage_counts = self.admission.counts
        self.pins = Pins(idle=options.affinity_idle)
        self._gates: dict[Surface, Gate] = {}
        self._generation = pool.generation  # of the pool's keys, when the pins were last checked against them
        self._timers: dict[Surface, tuple[float, asyncio.TimerHandle]] = {}

    def configure(self, options: SchedulerOptions, max_wait: float) -> None:
        """New option values: the counts and the pins stay."""
        self.options, self.max_wait = options, max_wait
        self.admission.enabled = options.admission
        self.pins.idle = options.affinity_idle
        self.admission.recheck(self.clock())

    # -- choosing ------------------------------------------------------------------------------

    async def next_key(self, job: Job) -> KeyRecord | engine.NoEligibleKey | Capped:
        """The key for the job's next attempt, counted against its account (`job.lease`), waiting for a cooling
        key or a full account while the request's wait lasts."""
        if job.wait_deadline is None:
            job.wait_deadline = self.clock() + self.max_wait
        deadline = job.wait_deadline
        gate = self._gates.setdefault(job.surface, Gate())
        queued = False
        while True:
            now = self.clock()
            if gate and not queued and not job.tried:  # others wait already: take a place behind them
                queued = True
                if not await self._wait(job, gate, deadline, front=False):
                    return Capped(self._retry_after(now))
                continue
            full = self.admission.full(now) if job.inference and self.options.admission else frozenset()
            result = self._choose(job, now, full)
            if isinstance(result, engine.Selection):
                key = result.key
                if job.inference:
                    lease = self.admission.admit(key.limit_group, now)  # counted here first: see _admit_shared
                    if self.shared is not None and not await self._admit_shared(lease):
                        continue
                    job.lease = lease
                if queued and gate:
                    gate.wake()  # there may be room for the next one too: it tries, and waits again if not
                return key
            if full and isinstance(self.pool.peek(job.surface, now, job.barred), engine.Selection):
                # Keys could serve but for their accounts' caps: wait in the queue for a slot.
                if now >= deadline or not self._may_free_before(deadline, result, now):
                    return Capped(self._retry_after(now))
                queued = True
                self._arm(job.surface, result, now)
                if not await self._wait(job, gate, deadline, front=True):
                    return Capped(self._retry_after(self.clock()))
                continue
            free = result.next_free_at
            if free is None or free > deadline:
                return result
            await asyncio.sleep(max(0.01, free - now))

    def _choose(self, job: Job, now: float, full: Collection[Group]) -> engine.Selection | engine.NoEligibleKey:
        pool, surface = self.pool, job.surface
        if job.file_id is not None:
            owned = self._file_key(job, now)
            if owned is not None:
                return owned
        health_based = pool.settings.strategy is Strategy.HEALTH_BASED
        prefer = pool.expiring_first(surface, now) if self.options.quota_aware and health_based else ()
        conversation = job.conversation
        if conversation is None or not self.options.affinity or not health_based or pool.settings.serve_active_next:
            # use-key and rotate name the key for the next request, conversation or not (its pin then moves)
            return pool.select(surface, now, job.barred, full=full, prefer=prefer)
        if pool.generation != self._generation:  # keys were removed: their pins go
            self._generation = pool.generation
            self.pins.retain_keys({k.id for k in pool.roster.keys})
        pin = self.pins.get(_pin_id(surface, conversation.id), now)
        if pin is not None:
            held = pool.pick_in_group(pin.group, pin.key_id, surface, now, job.barred, full)
            if held is not None:
                job.placement = "pin held"
                return held
            job.placement = "pin moved"
        else:
            job.placement = job.placement or "new conversation"
        placed = pool.place(surface, now, self.pins.loads(now), job.barred, full=full, prefer=prefer)
        if isinstance(placed, engine.Selection):
            # Pinned now, not once it succeeds: conversations that start together must see each other's places,
            # or they would all land on the same idle account.
            key = placed.key
            self.pins.pin(_pin_id(surface, conversation.id), key.limit_group, key.id, now)
        return placed

    async def _admit_shared(self, lease: Lease) -> bool:
        """Whether Redis admits the request `lease` counts here; refused, the account is held full and the lease given
        back. The local count comes first: requests choosing together while Redis is slow or down must see each
        other, or they would all pass a share of a cap that only one had room under."""
        assert self.shared is not None
        group = lease.group
        caps = self.pool.account_caps(group) if self.options.admission else (None, None)
        if caps == (None, None):  # nothing to hold it to: no round trip (status shows this proxy's own counts)
            return True
        try:
            got = await self.shared.acquire(group, caps)
        except BaseException:  # the client went away while Redis was asked
            lease.release(refused=True)
            raise
        if got.lease_id is not None:
            lease.lease_id = got.lease_id
            return True
        now = self.clock()
        by_concurrency = caps[0] is not None and got.in_flight >= caps[0]
        if by_concurrency or got.frees_in is None:
            self.admission.hold_full(group, now + REMOTE_RECHECK, by_rpm=False)
        else:
            self.admission.hold_full(group, now + got.frees_in, by_rpm=True)
        lease.release(refused=True)  # never sent: it used none of the minute
        return False

    def _release_shared(self, lease: Lease, refused: bool) -> None:
        assert self.shared is not None
        if lease.lease_id is not None:
            self.shared.release(lease.lease_id, refund=refused)

    def _caps_in_force(self, group: Group) -> Caps:
        """The account's whole caps while Redis counts for all the proxies; this proxy's share while it does not."""
        assert self.shared is not None
        return self.pool.account_caps(group) if self.shared.healthy else self.pool.caps(group)

    def _file_key(self, job: Job, now: float) -> engine.Selection | None:
        """The key that uploaded the job's file, else another key of its account; None (and `job.file_owner`
        set) when that account has no key left that could serve."""
        assert job.file_id is not None
        owner = self.pool.file_owner(job.file_id)
        if owner is None:
            return None
        key_id, group = owner
        job.file_owner = group
        return self.pool.pick_in_group(group, key_id, job.surface, now, job.barred, (), ignore_cooldown=True)

    def served(self, job: Job, key: KeyRecord) -> None:
        """A conversation's request succeeded on `key`: its next requests go to the same account."""
        if job.conversation is not None and self.options.affinity:
            self.pins.pin(_pin_id(job.surface, job.conversation.id), key.limit_group, key.id, self.clock())

    # -- waiting -------------------------------------------------------------------------------

    async def _wait(self, job: Job, gate: Gate, deadline: float, front: bool) -> bool:
        started = self.clock()
        try:
            return await gate.wait(deadline - started, front=front)
        finally:
            job.queued += self.clock() - started

    def _may_free_before(self, deadline: float, result: engine.NoEligibleKey, now: float) -> bool:
        """Whether an account could free before `deadline`: a request in flight may end at any moment; a minute's
        window and a cooldown end when they end."""
        if self.admission.full_by_concurrency():
            return True
        ends = [t for t in (self.admission.next_free_at(now), result.next_free_at) if t is not None]
        return bool(ends) and min(ends) <= deadline

    def _retry_after(self, now: float) -> float:
        free = self.admission.next_free_at(now)
        return max(CAPPED_RETRY_AFTER, free - now) if free is not None else CAPPED_RETRY_AFTER

    def _arm(self, surface: Surface, result: engine.NoEligibleKey, now: float) -> None:
        """Have the surface's queue woken when the first full account's minute frees a slot, or a cooling key
        comes back, whichever is first (one timer per surface)."""
        ends = [t for t in (self.admission.next_free_at(now), result.next_free_at) if t is not None]
        if not ends:
            return
        at = min(ends)
        timer = self._timers.get(surface)
        if timer is not None and timer[0] <= at and not timer[1].cancelled():
            return
        if timer is not None:
            timer[1].cancel()
        handle = asyncio.get_running_loop().call_later(max(0.0, at - now) + 0.001, self._wake, surface)
        self._timers[surface] = (at, handle)

    def _wake(self, surface: Surface) -> None:
        self._timers.pop(surface, None)
        gate = self._gates.get(surface)
        if gate:
            gate.wake()

    def _freed(self, group: Group) -> None:
        gate = self._gates.get(group[0])
        if gate:
            gate.wake()

    def _caps_changed(self) -> None:
        self.admission.recheck(self.clock())


def _pin_id(surface: Surface, conversation_id: str) -> str:
    """Pins are per surface: one prompt sent to two platforms is two conversations (keys never cross surfaces)."""
    return f"{surface.value}:{conversation_id}"
