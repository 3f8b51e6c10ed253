"""The proxy's quota watch: when Kimi says an account's quota is used up, ask when it comes back.

A 403 "usage limit for this billing cycle" or a quota 429 cools the account for a guess (5 h, 6 h). The failover
hands every outcome here (`saw`); for those, one zero-token probe of the account (probe.py) runs as a background
task, so the request never waits for it, and the store then moves the account's cooldown to the reset Kimi reports,
sooner or later than the guess (probe.updates). With `kimi_probe_interval`, every account is also probed that often.
Never more than one probe per account per MIN_INTERVAL: Tier-0 accounts allow 3 requests a minute, probes included.

Results are written through a store connection of the watch's own, like a CLI command, so the proxy's pool (and any
other proxy on the store) installs them as it installs commands' changes, and says what changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from .activity import describe
from .models import Group, KeyRecord, Outcome, OutcomeKind
from .pool import LivePool
from .probe import ProbeResult, probe_key, probe_keys
from .store import Store, StoreError
from .upstream import UpstreamClient

log = logging.getLogger("kimi_rotate")

MIN_INTERVAL = 60.0  # seconds between two probes of one account, whatever asks for them
TRIGGERS = frozenset({OutcomeKind.BILLING_LIMITED, OutcomeKind.QUOTA_EXHAUSTED})
BACKGROUND_CONCURRENCY = 2  # accounts probed at once by the periodic round


class QuotaWatch:
    def __init__(
        self,
        pool: LivePool,
        client: UpstreamClient,
        interval: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pool = pool
        self.client = client
        # 0 is off; anything else is at least MIN_INTERVAL.
        self.interval = max(MIN_INTERVAL, interval) if interval > 0 else 0.0
        self.clock = clock
        self._probed: dict[Group, float] = {}  # when each account was last probed
        self._found: dict[Group, ProbeResult] = {}  # what that probe found
        self._due: set[Group] = set()  # accounts with a probe waiting for MIN_INTERVAL to pass
        self._tasks: set[asyncio.Task[None]] = set()
        self._rounds: asyncio.Task[None] | None = None
        self._store: Store | None = None
        self._store_lock = threading.Lock()  # writes run in worker threads, perhaps two at once
        self._stopped = False

    # -- on the event loop -----------------------------------------------------------------------

    def saw(self, key: KeyRecord, outcome: Outcome) -> None:
        """An attempt's outcome (already recorded in the pool). A used-up quota gets its account probed once.
        Within MIN_INTERVAL of that probe, a used-up quota it found is applied again instead (another key of the
        account answered the same, and its guess must not outlast the reset Kimi reported); if it found quota
        left, which this answer contradicts, the account is probed again once MIN_INTERVAL has passed."""
        if outcome.kind not in TRIGGERS:
            return
        key = self.pool.roster.get(key.id) or key  # the outcome may have given it its account
        group = key.limit_group
        wait = self._probed.get(group, float("-inf")) + MIN_INTERVAL - self.clock()
        if wait <= 0:
            self._probed[group] = self.clock()
            self._spawn(self._probe(key, outcome.reason))
            return
        found = self._found.get(group)
        if found is not None and found.quota is not None and found.outcome.kind in TRIGGERS:
            self._spawn(self._apply([replace(found, key_id=key.id)], outcome.reason))  # that key may be gone
        elif group not in self._due:
            self._due.add(group)
            self._spawn(self._probe_later(key, outcome.reason, wait))

    def start(self) -> None:
        """Start the periodic round, if kimi_probe_interval asks for one (on the running loop)."""
        if self.interval and self._rounds is None:
            self._rounds = asyncio.get_running_loop().create_task(self._every())

    def stop(self) -> None:
        """Cancel what is under way and close the watch's store connection."""
        self._stopped = True
        if self._rounds is not None:
            self._rounds.cancel()
            self._rounds = None
        for task in list(self._tasks):
            task.cancel()
        with self._store_lock:  # a write under way ends first
            if self._store is not None:
                self._store.close()
                self._store = None

    # -- the probes ------------------------------------------------------------------------------

    async def _probe(self, key: KeyRecord, replaces: str | None) -> None:
        result = await probe_key(self.client, key, self.clock)
        self._found[key.limit_group] = result
        if result.quota is not None:
            from .views import quota_text

            log.info("kimi-rotate: probed the account of %s after its %s: %s", describe(key), replaces or "answer",
                     quota_text(result.quota, self.clock()))
        await self._apply([result], replaces)

    async def _probe_later(self, key: KeyRecord, replaces: str | None, wait: float) -> None:
        try:
            await asyncio.sleep(wait)
            self._probed[key.limit_group] = self.clock()
            await self._probe(key, replaces)
        finally:
            self._due.discard(key.limit_group)

    async def _every(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._round()
            except Exception:  # a bug of ours must not end the rounds for good
                log.exception("kimi-rotate: a round of quota probes failed")

    async def _round(self) -> None:
        now = self.clock()
        chosen: dict[Group, KeyRecord] = {}
        for k in self.pool.roster.keys:  # one key per account: an enabled one
            group = k.limit_group
            if k.disabled_reason is None and group not in chosen \
                    and now - self._probed.get(group, float("-inf")) >= MIN_INTERVAL:
                chosen[group] = k
        for group in chosen:
            self._probed[group] = now
        results = await probe_keys(self.client, list(chosen.values()), self.clock, BACKGROUND_CONCURRENCY)
        for group, result in zip(chosen, results, strict=True):
            self._found[group] = result
        await self._apply(results, None)

    async def _apply(self, results: list[ProbeResult], replaces: str | None) -> None:
        # The outcome that asked for the probe must be in the store first: written after the probe's result, its
        # guess would lengthen the cooldown again (a new cooldown never shortens a running one).
        await self.pool.written()
        await asyncio.to_thread(self._write, results, replaces)

    def _write(self, results: list[ProbeResult], replaces: str | None) -> None:
        with self._store_lock:
            if self._stopped:
                return
            try:
                if self._store is None:
                    self._store = self.pool.store.reopen()
                for result in results:
                    self._store.apply_probe(result, self.clock(), replaces)
            except StoreError as e:  # the pool reports store trouble; a lost probe result only leaves the guess
                log.warning("kimi-rotate: could not record a probe: %s", e)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        with contextlib.suppress(asyncio.CancelledError):
            error = task.exception()
            if error is not None:
                log.warning("kimi-rotate: a quota probe failed: %s", error, exc_info=error)
