"""Admission: keeping each account under its caps before a request is sent, and a fair queue when all are full.

Kimi's caps are per account: requests in flight at once (an open stream counts until its end) and requests
admitted in any minute. The proxy counts both per account (`Usage`), treats an account at a cap as full, and the
engine then picks a key of another account. Proxies sharing one Redis also count in Redis (shared_counts.py): an
account Redis refuses is held full here (`hold_full`) until another proxy's release is heard. When every account
that could serve is full, the request waits in a first-come queue of its surface (`Gate`), woken by an event (a
request ended, a minute's oldest request left the window), never by polling: a waiting request costs no CPU.

The minute is counted from when a request is sent, which is a little before Kimi counts it; RPM_WINDOW is a
little longer than Kimi's minute so that a request admitted as the oldest leaves our window has also left Kimi's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .models import Group

RPM_WINDOW = 60.5  # seconds: Kimi's one-minute window, plus a margin for the time a request takes to reach it
Caps = tuple[int | None, int | None]  # (concurrency, rpm) in force for one account; None: no cap known


class Usage(Protocol):
    """How many requests each account has in flight, and how many it was sent in the last RPM_WINDOW."""

    def started(self, group: Group, now: float) -> None: ...

    def ended(self, group: Group, refund: float | None = None) -> None:
        """A request ended; `refund` is its start time when Kimi refused it (a refused request uses no quota)."""

    def in_flight(self, group: Group) -> int: ...

    def recent(self, group: Group, now: float) -> int: ...

    def frees_at(self, group: Group, now: float) -> float | None:
        """When the oldest request in the window leaves it (None: the window is empty)."""


class LocalUsage:
    """Exact counts for one process."""

    def __init__(self) -> None:
        self._in_flight: dict[Group, int] = {}
        self._starts: dict[Group, deque[float]] = {}

    def started(self, group: Group, now: float) -> None:
        self._in_flight[group] = self._in_flight.get(group, 0) + 1
        self._starts.setdefault(group, deque()).append(now)

    def ended(self, group: Group, refund: float | None = None) -> None:
        n = self._in_flight.get(group, 0) - 1
        if n > 0:
            self._in_flight[group] = n
        else:
            self._in_flight.pop(group, None)
        if refund is not None:
            starts = self._starts.get(group)
            if starts is not None and refund in starts:
                starts.remove(refund)

    def in_flight(self, group: Group) -> int:
        return self._in_flight.get(group, 0)

    def recent(self, group: Group, now: float) -> int:
        starts = self._starts.get(group)
        if not starts:
            return 0
        while starts and starts[0] <= now - RPM_WINDOW:
            starts.popleft()
        return len(starts)

    def frees_at(self, group: Group, now: float) -> float | None:
        return self._starts[group][0] + RPM_WINDOW if self.recent(group, now) else None


@dataclass(eq=False)
class Lease:
    """One admitted request's place in its account's counts, given back exactly once."""

    admission: Admission
    group: Group
    started: float
    done: bool = False
    lease_id: str | None = None  # its lease in the counts shared by the proxies (shared_counts.py), if any

    def release(self, refused: bool = False) -> None:
        if not self.done:
            self.done = True
            self.admission.release(self, refused)


@dataclass
class Admission:
    """Which accounts are full now, by the caps `caps` gives for each (the pool's: stated, learned, shared)."""

    caps: Callable[[Group], Caps]
    clock: Callable[[], float]
    usage: Usage = field(default_factory=LocalUsage)
    enabled: bool = True
    on_free: Callable[[Group], None] | None = None  # an account stopped being full: its queue may move
    on_release: Callable[[Lease, bool], None] | None = None  # gives a shared lease back (Lease.lease_id set)
    _full: dict[Group, bool] = field(default_factory=dict)  # full account -> whether by RPM (else by concurrency)
    # Accounts full across the proxies though not by this one's counts: until when to treat them so, and whether by
    # RPM. Their queue is woken by a release another proxy publishes, else at that time.
    _held_full: dict[Group, tuple[float, bool]] = field(default_factory=dict)
    _counted: set[Group] = field(default_factory=set)  # every account a request was admitted on

    def full(self, now: float) -> frozenset[Group]:
        """The accounts at a cap now (always none when admission is off)."""
        if not self._full and not self._held_full:
            return frozenset()
        for group in list(self._full):
            self._update(group, now)
        if not self._held_full:
            return frozenset(self._full)
        for group, (until, _) in list(self._held_full.items()):
            if until <= now:
                del self._held_full[group]
        return frozenset(self._full).union(self._held_full)

    def hold_full(self, group: Group, until: float, by_rpm: bool) -> None:
        """The shared counts refused a request on `group`: treat it as full until `until` or `freed_elsewhere`."""
        self._held_full[group] = (until, by_rpm)

    def freed_elsewhere(self, group: Group) -> None:
        """A proxy gave back a request of `group` at its cap: try it again."""
        if self._held_full.pop(group, None) is not None and self.on_free is not None:
            self.on_free(group)

    def admit(self, group: Group, now: float) -> Lease:
        """Count a request sent on `group` now (also when admission is off: the counts stay true for views)."""
        self.usage.started(group, now)
        self._counted.add(group)
        if self.enabled:
            self._update(group, now)
        return Lease(self, group, now)

    def release(self, lease: Lease, refused: bool) -> None:
        self.usage.ended(lease.group, lease.started if refused else None)
        if lease.lease_id is not None and self.on_release is not None:
            self.on_release(lease, refused)
        if lease.group in self._full and not self._update(lease.group, self.clock()) and self.on_free is not None:
            self.on_free(lease.group)

    def next_free_at(self, now: float) -> float | None:
        """The first moment a full account frees by itself (the oldest request of its minute leaving the window);
        None when only a request ending can free one (every full account is full by concurrency). An account held
        full across the proxies counts at the time it is tried again."""
        times = [self.usage.frees_at(g, now) for g, by_rpm in self._full.items() if by_rpm]
        times += [until for until, _ in self._held_full.values()]
        return min((t for t in times if t is not None), default=None)

    def counts(self, now: float) -> dict[Group, tuple[int, int]]:
        """(in flight, sent in the last minute) of every account a request was admitted on and still counting."""
        found = {g: (self.usage.in_flight(g), self.usage.recent(g, now)) for g in self._counted}
        return {g: c for g, c in found.items() if c != (0, 0)}

    def full_by_concurrency(self) -> bool:
        """Whether some account is full because of its requests in flight (one ending frees it)."""
        return not all(self._full.values()) or not all(by_rpm for _, by_rpm in self._held_full.values())

    def recheck(self, now: float) -> None:
        """The caps changed (learned, stated, shared between proxies): judge every counted account afresh."""
        was_full = set(self._full)
        if not self.enabled:
            self._full.clear()
        else:
            for group in self._counted:
                self._update(group, now)
        if self.on_free is not None:
            for group in was_full - set(self._full):
                self.on_free(group)

    def _update(self, group: Group, now: float) -> bool:
        """Mark or unmark `group` as full; True if it is full."""
        concurrency, rpm = self.caps(group)
        if concurrency is not None and self.usage.in_flight(group) >= concurrency:
            self._full[group] = False
        elif rpm is not None and self.usage.recent(group, now) >= rpm:
            self._full[group] = True
        else:
            self._full.pop(group, None)
            return False
        return True


class Gate:
    """The first-come queue of one surface's requests waiting for an account under its caps."""

    def __init__(self) -> None:
        self._waiting: deque[asyncio.Future[None]] = deque()

    def __bool__(self) -> bool:
        return any(not f.done() for f in self._waiting)

    async def wait(self, timeout: float, front: bool = False) -> bool:
        """Wait until woken (True) or for `timeout` seconds (False). `front`: a request already under way (failing
        over) goes before those that have not started."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if front:
            self._waiting.appendleft(future)
        else:
            self._waiting.append(future)
        try:
            await asyncio.wait_for(asyncio.shield(future), max(0.0, timeout))
            return True
        except TimeoutError:
            self._give_up(future)
            return False
        except BaseException:  # the client went away
            self._give_up(future)
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiting.remove(future)

    def _give_up(self, future: asyncio.Future[None]) -> None:
        if future.done():  # its turn came as it gave up: the next waiter gets it
            self.wake()
        else:
            future.cancel()

    def wake(self) -> None:
        """Give the first waiter its turn to try again."""
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_result(None)
                return
