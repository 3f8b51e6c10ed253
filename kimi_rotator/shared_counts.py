"""Per-account counts shared by every proxy on one Redis: requests in flight and requests sent in the last minute.

Proxies on one Redis act as one pool, so each account's caps hold across all of them, whole (not split). Per account
two sorted sets under the key prefix: `flying:` holds one member per request in flight (its lease id
"<proxy id>:<n>", scored by when the lease expires) and `starts:` one per request sent in the last RPM_WINDOW (the
same id, scored by when it started). Every script reads Redis's own clock (`TIME`), never a proxy's, so proxies on
machines with skewed clocks agree; scores are integer milliseconds.

A lease lives LEASE_TTL unless renewed: one task renews all of this proxy's live leases every RENEW_SECONDS in one
script call, so a proxy killed with kill -9 leaves its requests counted for at most LEASE_TTL. The same call re-adds
a lease Redis lost, with its start (Redis restarted without persistence, or an outage outlived the lease): renewing
is re-registering. The starts of requests that ended before such a restart are lost with it (their minute is short).

Releases are fire-and-forget for the request, and go out through the same task as the renewals, in order: a lease is
never renewed after its release reached Redis, so a released lease cannot come back. A release that frees an account
which was at its concurrency cap (or refunds a start of one at its rpm) is PUBLISHed, and every proxy's subscriber
wakes its own queue (`on_freed`).

Round trips are saved where exactness allows: on an account with a concurrency cap and no rpm cap (Kimi Code's
default), a request that ends keeps its lease as this proxy's spare, still counted in Redis, and this proxy's next
request on the account takes it without asking Redis. Spares go back to Redis once idle for SPARE_IDLE, at once when
another proxy is refused on the account (the refusal is PUBLISHed as a want), and not kept while the account is
wanted elsewhere (CONTENDED seconds), so a busy proxy cannot starve the others. The count in Redis (busy + spare) is
never above the cap, so the cap still holds exactly across the proxies.

When Redis does not answer within REDIS_TIMEOUT the request is not held up: `acquire` says so (`shared=False`) and
the caller counts it locally with its share of the caps. One warning per outage. Once Redis answers again, this
proxy's requests still in flight, and the starts of those sent during the outage, are written there again, so the
global counts are true again; releases made meanwhile are sent then (a release of a lease Redis no longer has is a
no-op), and a lease whose release was lost expires by itself within LEASE_TTL anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .admission import RPM_WINDOW, Caps
from .models import Group, Surface

log = logging.getLogger(__name__)

# A live lease survives two missed renewals (an event loop stalled for a few seconds), and a dead proxy's requests
# stop counting within ten seconds: short next to a stream's minutes, long next to a renewal's round trip.
LEASE_TTL = 10.0
RENEW_SECONDS = 3.0
# A request waits at most this long on Redis (a loopback round trip is ~0.1 ms; a remote one a few ms).
REDIS_TIMEOUT = 0.25
PROBE_SECONDS = 0.5  # how often a proxy cut off from Redis tries it again
RELEASES_KEPT = 10_000  # releases kept for Redis while it does not answer (the leases expire by themselves anyway)
SPARE_IDLE = 1.0  # a spare lease unused this long goes back to Redis
CONTENDED = 1.0  # after another proxy was refused on an account, ended leases go back to Redis for this long

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: flying, starts. ARGV: lease id, ttl ms, window ms, concurrency cap or '', rpm cap or '', want channel, message
# naming the account (published there when refused by the concurrency cap, so proxies holding spares give them back).
# Returns {admitted 0/1, in flight, recent, ms until the oldest start leaves the window or -1}.
_ACQUIRE = _NOW + """
local ttl, window = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
local flying = redis.call('ZCARD', KEYS[1])
local recent = redis.call('ZCARD', KEYS[2])
local concurrency, rpm = tonumber(ARGV[4]), tonumber(ARGV[5])
local admitted = 0
if not ((concurrency and flying >= concurrency) or (rpm and recent >= rpm)) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('ZADD', KEYS[2], now, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], window)
  flying, recent, admitted = flying + 1, recent + 1, 1
elseif concurrency and flying >= concurrency then
  redis.call('PUBLISH', ARGV[6], ARGV[7])
end
local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local frees_in = -1
if oldest[2] then frees_in = tonumber(oldest[2]) + window - now end
return {admitted, flying, recent, frees_in}
"""

# KEYS: flying, starts of each release in turn. ARGV: window ms, channel, then per release: lease id, refund 0/1,
# concurrency cap or '', rpm cap or '', message naming the account. Returns how many leases were still there.
_RELEASE = _NOW + """
local window, ended = tonumber(ARGV[1]), 0
for i = 1, #KEYS / 2 do
  local flying_key, starts_key, a = KEYS[2 * i - 1], KEYS[2 * i], 2 + 5 * (i - 1)
  redis.call('ZREMRANGEBYSCORE', flying_key, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', starts_key, '-inf', now - window)
  local flying = redis.call('ZCARD', flying_key)
  local recent = redis.call('ZCARD', starts_key)
  local removed = redis.call('ZREM', flying_key, ARGV[a + 1])
  local refunded = 0
  if ARGV[a + 2] == '1' then refunded = redis.call('ZREM', starts_key, ARGV[a + 1]) end
  local concurrency, rpm = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  if (removed == 1 and concurrency and flying >= concurrency) or (refunded == 1 and rpm and recent >= rpm) then
    redis.call('PUBLISH', ARGV[2], ARGV[a + 5])
  end
  ended = ended + removed
end
return ended
"""

# KEYS: the flying set of each live lease, then the starts set of each start to re-register. ARGV: ttl ms, window ms,
# number of leases n, the n lease ids, then per start: lease id, age ms. Returns n.
_SYNC = _NOW + """
local ttl, window, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, n do
  redis.call('ZADD', KEYS[i], now + ttl, ARGV[3 + i])
  redis.call('PEXPIRE', KEYS[i], ttl)
end
for k = 1, #KEYS - n do
  local age = tonumber(ARGV[3 + n + 2 * k])
  if age < window then
    redis.call('ZADD', KEYS[n + k], 'NX', now - age, ARGV[2 + n + 2 * k])
    redis.call('PEXPIRE', KEYS[n + k], window)
  end
end
return n
"""

# KEYS: flying, starts. ARGV: window ms. Returns {in flight, recent}.
_COUNT = _NOW + """
return {redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf'),
        redis.call('ZCOUNT', KEYS[2], '(' .. (now - tonumber(ARGV[1])), '+inf')}
"""

_FAULTS = (RedisError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class Acquired:
    """What Redis said to one request."""

    lease_id: str | None  # None: refused, the account is at a cap across the proxies
    shared: bool = True  # False: Redis did not answer; the request is counted by this proxy alone (and later there)
    in_flight: int = 0  # the account's counts across the proxies, this request included if admitted
    recent: int = 0
    frees_in: float | None = None  # seconds until the oldest start of the account's window leaves it

    @property
    def admitted(self) -> bool:
        return self.lease_id is not None


@dataclass(slots=True)
class _Held:
    group: Group
    caps: Caps
    started: float  # time.monotonic()


@dataclass(frozen=True, slots=True)
class _Release:
    lease_id: str
    group: Group
    refund: bool
    caps: Caps


class SharedCounts:
    """This proxy's side of the shared counts: acquire on the event loop, release from anywhere on it."""

    def __init__(self, client: aioredis.Redis, prefix: str, proxy_id: str, *, lease_ttl: float = LEASE_TTL,
                 renew_every: float = RENEW_SECONDS, timeout: float = REDIS_TIMEOUT) -> None:
        self.client = client
        self.prefix = prefix
        self.proxy_id = proxy_id
        self.lease_ttl, self.renew_every, self.timeout = lease_ttl, renew_every, timeout
        self.on_freed: Callable[[Group], None] | None = None  # an account at a cap freed a slot (any proxy's release)
        self.on_health: Callable[[bool], None] | None = None  # Redis stopped (False) or started again (True) answering
        self.healthy = True
        self._channel = f"{prefix}freed"
        self._want_channel = f"{prefix}want"
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._sync = client.register_script(_SYNC)
        self._count = client.register_script(_COUNT)
        self._n = 0
        self._held: dict[str, _Held] = {}  # this proxy's leases in Redis: its requests in flight and its spares
        self._spares: dict[Group, dict[str, float]] = {}  # spare lease ids per account, with when each fell idle
        self._contended: dict[Group, float] = {}  # accounts another proxy was refused on, until (monotonic)
        # Sent while Redis did not answer, kept until written there (also if ended meanwhile): id -> group, monotonic
        self._outage_starts: dict[str, tuple[Group, float]] = {}
        self._outbox: list[_Release] = []
        self._kick = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    @classmethod
    def from_url(cls, url: str, prefix: str, proxy_id: str, **options: Any) -> SharedCounts:
        """`url`: redis://, rediss:// or unix:// with user and password as Redis takes them. No retries inside the
        client: a command that fails is the outage's business, not a request's."""
        from .store_redis import connection_url  # ours: `prefix` is no connection option

        client = aioredis.from_url(connection_url(url), socket_timeout=REDIS_TIMEOUT,
                                   socket_connect_timeout=REDIS_TIMEOUT, retry=Retry(NoBackoff(), 0),
                                   health_check_interval=30)
        return cls(client, prefix, proxy_id, **options)

    # -- per request -------------------------------------------------------------------------------------------------

    async def acquire(self, group: Group, caps: Caps) -> Acquired:
        """Count a request on `group` if the account is under `caps` (its whole caps) across the proxies."""
        self.start()
        spares = self._spares.get(group)
        if spares:
            if _spares_kept(caps):  # a slot this proxy holds already: no round trip
                lease_id, _ = spares.popitem()
                self._held[lease_id].started = time.monotonic()
                return Acquired(lease_id, True)
            self._give_back(group)  # an rpm cap now: every request must be counted in Redis
        self._n += 1
        lease_id = f"{self.proxy_id}:{self._n}"
        if not self.healthy:
            return self._local(lease_id, group, caps)
        try:
            async with asyncio.timeout(self.timeout):
                admitted, flying, recent, frees_in = await self._acquire(
                    keys=self._keys(group),
                    args=[lease_id, _ms(self.lease_ttl), _ms(RPM_WINDOW), _cap(caps[0]), _cap(caps[1]),
                          self._want_channel, _message(group)])
        except _FAULTS as e:
            self._went_down(e)
            return self._local(lease_id, group, caps)  # the script may have run: the same id makes that harmless
        except asyncio.CancelledError:  # the client left: if the script ran, undo it
            self._send(_Release(lease_id, group, True, caps))
            raise
        if not admitted:
            return Acquired(None, True, flying, recent, frees_in / 1000 if frees_in >= 0 else None)
        self._held[lease_id] = _Held(group, caps, time.monotonic())
        return Acquired(lease_id, True, flying, recent, frees_in / 1000 if frees_in >= 0 else None)

    def release(self, lease_id: str, refund: bool = False) -> None:
        """The request ended; `refund`: Kimi refused it, its start leaves the minute. Once per lease; never waits."""
        held = self._held.get(lease_id)
        if held is None or lease_id in self._spares.get(held.group, ()):
            return
        now = time.monotonic()
        if not refund and not self._closing and _spares_kept(held.caps) and self._contended.get(held.group, 0.0) <= now:
            if not self._spares:
                self._kick.set()  # the writer now wakes every SPARE_IDLE / 2 to give back idle spares
            self._spares.setdefault(held.group, {})[lease_id] = now  # kept, still counted: see the module's doc
            return
        del self._held[lease_id]
        if refund:
            self._outage_starts.pop(lease_id, None)
        self._send(_Release(lease_id, held.group, refund, held.caps))

    async def counts(self, group: Group) -> tuple[int, int]:
        """(in flight, sent in the last RPM_WINDOW) on `group` across the proxies."""
        flying, recent = await self._count(keys=self._keys(group), args=[_ms(RPM_WINDOW)])
        return int(flying), int(recent)

    # -- lifecycle ---------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the renewing and the listening tasks, on the running loop (acquire does it on first use)."""
        if not self._tasks and not self._closing:
            self._tasks = [asyncio.create_task(self._write()), asyncio.create_task(self._listen())]

    async def aclose(self) -> None:
        """Stop the tasks, and give back every lease still held (the proxy is going away: they would expire)."""
        self._closing = True  # the loops end by this too: a cancellation can be lost to a wait ending at once
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        for group in list(self._spares):
            self._give_back(group)
        for lease_id in list(self._held):
            self.release(lease_id)
        if self.healthy and self._outbox:
            with contextlib.suppress(*_FAULTS):
                async with asyncio.timeout(self.timeout * 4):
                    await self._send_releases()
        await self.client.aclose()

    # -- the tasks ---------------------------------------------------------------------------------------------------

    async def _write(self) -> None:
        """Send releases as they come and renew the live leases, one call at a time, in order; while Redis does not
        answer, try it every PROBE_SECONDS and re-register this proxy's requests once it does."""
        loop = asyncio.get_running_loop()
        renew_at = loop.time() + self.renew_every
        while not self._closing:
            if self.healthy:
                wake_at = renew_at if not self._spares else min(renew_at, loop.time() + SPARE_IDLE / 2)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, wake_at - loop.time())):
                        await self._kick.wait()
            else:  # releases pile up meanwhile: no point knocking sooner
                await asyncio.sleep(PROBE_SECONDS)
            self._kick.clear()
            self._give_back_idle()
            try:
                async with asyncio.timeout(self.timeout):
                    if self._outbox:
                        await self._send_releases()
                    if not self.healthy or loop.time() >= renew_at:
                        renew_at = loop.time() + self.renew_every
                        await self._send_sync()
            except _FAULTS as e:
                self._went_down(e)
                continue
            if not self.healthy:
                self.healthy = True
                log.warning("kimi-rotate: Redis at %s answers again; %d requests in flight counted there again",
                            self._where(), len(self._held))
                if self.on_health is not None:
                    self.on_health(True)

    async def _send_releases(self) -> None:
        batch, self._outbox = self._outbox, []
        keys: list[str] = []
        args: list[str | int] = [_ms(RPM_WINDOW), self._channel]
        for r in batch:
            keys += self._keys(r.group)
            args += [r.lease_id, int(r.refund), _cap(r.caps[0]), _cap(r.caps[1]), _message(r.group)]
        try:
            await self._release(keys=keys, args=args)
        except BaseException:
            self._outbox[:0] = batch  # sent again next time (a release is idempotent)
            del self._outbox[:-RELEASES_KEPT]
            raise

    async def _send_sync(self) -> None:
        """Renew (or write again) every live lease with its start, and the starts sent while Redis did not answer:
        after a restart of Redis without persistence, what this proxy has in flight counts there again."""
        now = time.monotonic()
        self._outage_starts = {i: v for i, v in self._outage_starts.items() if now - v[1] < RPM_WINDOW}
        outage = list(self._outage_starts)
        leases = list(self._held.items())
        sent = {i: (h.group, h.started) for i, h in leases} | self._outage_starts
        starts = [(i, g, at) for i, (g, at) in sent.items() if now - at < RPM_WINDOW]
        keys = [self._keys(h.group)[0] for _, h in leases] + [self._keys(g)[1] for _, g, _ in starts]
        args: list[str | int] = [_ms(self.lease_ttl), _ms(RPM_WINDOW), len(leases), *(i for i, _ in leases)]
        for lease_id, _, at in starts:
            args += [lease_id, _ms(now - at)]
        if keys:
            await self._sync(keys=keys, args=args)
        for lease_id in outage:  # written (those of requests counted locally since are kept for the next call)
            self._outage_starts.pop(lease_id, None)

    async def _listen(self) -> None:
        """Hear every proxy's releases of accounts at a cap; reconnect after an error (the recheck covers the gap)."""
        while not self._closing:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(self._channel, self._want_channel)
                while not self._closing:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    group = _group(message["data"]) if message is not None else None
                    if message is None or group is None:
                        continue
                    if _text(message["channel"]) == self._want_channel:
                        self._contended[group] = time.monotonic() + CONTENDED
                        self._give_back(group)
                    elif self.on_freed is not None:
                        self.on_freed(group)
            except _FAULTS:
                await asyncio.sleep(PROBE_SECONDS)
            finally:
                with contextlib.suppress(*_FAULTS):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    # -- helpers -----------------------------------------------------------------------------------------------------

    def _give_back(self, group: Group) -> None:
        """Release this proxy's spare leases of `group` to Redis."""
        for lease_id in self._spares.pop(group, {}):
            held = self._held.pop(lease_id)
            self._send(_Release(lease_id, group, False, held.caps))

    def _give_back_idle(self) -> None:
        now = time.monotonic()
        for group, spares in list(self._spares.items()):
            idle = [i for i, since in spares.items() if now - since >= SPARE_IDLE]
            for lease_id in idle:
                del spares[lease_id]
                held = self._held.pop(lease_id)
                self._send(_Release(lease_id, group, False, held.caps))
            if not spares:
                del self._spares[group]
        self._contended = {g: t for g, t in self._contended.items() if t > now}

    def _local(self, lease_id: str, group: Group, caps: Caps) -> Acquired:
        now = time.monotonic()
        self._held[lease_id] = _Held(group, caps, now)
        self._outage_starts[lease_id] = (group, now)
        return Acquired(lease_id, shared=False)

    def _send(self, release: _Release) -> None:
        self._outbox.append(release)
        self._kick.set()

    def _went_down(self, error: BaseException) -> None:
        if self.healthy:
            self.healthy = False
            log.warning("kimi-rotate: Redis at %s does not answer (%s); each proxy holds requests to its share of "
                        "every account's caps until it does", self._where(), type(error).__name__)
            if self.on_health is not None:
                self.on_health(False)

    def _where(self) -> str:
        """Host and port (or socket path) of the Redis server: never its user or password."""
        kwargs = self.client.connection_pool.connection_kwargs
        if "path" in kwargs:
            return str(kwargs["path"])
        return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"

    def _keys(self, group: Group) -> list[str]:
        account = f"{group[0].value}:{group[1]}"
        return [f"{self.prefix}flying:{account}", f"{self.prefix}starts:{account}"]


def _spares_kept(caps: Caps) -> bool:
    """An account whose leases may stay a proxy's spares: a concurrency cap and no rpm cap (every request of an
    account with an rpm cap must be counted in Redis as it starts)."""
    return caps[1] is None and caps[0] is not None


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _cap(cap: int | None) -> str:
    return "" if cap is None else str(cap)


def _message(group: Group) -> str:
    return f"{group[0].value}\n{group[1]}"


def _text(data: bytes | str) -> str:
    return data.decode() if isinstance(data, bytes) else data


def _group(data: bytes | str) -> Group | None:
    surface, _, account = _text(data).partition("\n")
    try:
        return Surface(surface), account
    except ValueError:
        return None
