"""Prometheus metrics for the proxy (option kimi_metrics), served by prometheus_client's own HTTP server.

The request path only bumps counters and observes histograms (prometheus_client's values: a float under an
uncontended lock). Everything about the pool's state (health, cooldowns, requests in flight, caps, quota left) is
read from the pool when Prometheus scrapes, by `PoolCollector`: nothing per request keeps gauges up to date.

Labels name a key by its fingerprint and the name the user gave it, never by the key. An account is named by a
short digest of its label, never by the label itself: the label may be an account id Kimi wrote in a message.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .access import is_loopback

if TYPE_CHECKING:
    from .failover import Job
    from .models import Group, KeyRecord, Outcome
    from .pool import LivePool
    from .scheduler import Scheduler

PREFIX = "kimi_rotate"
# Seconds: from a cached answer on loopback to a long model call.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0)


def account_label(group: Group) -> str:
    """A stable, short name for an account that reveals nothing of its label."""
    return hashlib.sha256(f"{group[0].value}:{group[1]}".encode()).hexdigest()[:10]


class Metrics:
    """What the addon feeds: one call per attempt, per finished request, per local 429 or 503."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Client requests finished, by the status the client got.",
                                ("surface", "key", "name", "status"), registry=reg)
        self.attempts = Counter(f"{PREFIX}_attempts", "Attempts sent to Kimi, by key and classified outcome.",
                                ("surface", "key", "name", "outcome", "error_type"), registry=reg)
        self.failovers = Counter(f"{PREFIX}_failovers", "Requests served after more than one key was tried.",
                                 ("surface",), registry=reg)
        self.local = Counter(f"{PREFIX}_local_replies", "Answers kimi-rotate gave itself (429: no key or account "
                             "free in time; 503: no usable key store).", ("surface", "status"), registry=reg)
        self.first_byte = Histogram(f"{PREFIX}_time_to_first_byte_seconds", "From the request's arrival to the "
                                    "head of the answer the client gets.", ("surface",), registry=reg,
                                    buckets=LATENCY_BUCKETS)
        self.total = Histogram(f"{PREFIX}_request_duration_seconds", "From the request's arrival to the end of its "
                               "answer (a streamed one when its stream has ended).", ("surface",), registry=reg,
                               buckets=LATENCY_BUCKETS)
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds", "Time requests waited for an account under its "
                                    "caps (requests that did not wait count as 0).", ("surface",), registry=reg,
                                    buckets=WAIT_BUCKETS)
        # Each metric's child per label values, found without prometheus_client's lookup (a lock and a check of
        # the values every time): half the cost per request.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        found = self._children.get((id(metric), labels))
        if found is None:
            found = self._children[(id(metric), labels)] = metric.labels(*labels)
        return found

    def watch(self, pool: Callable[[], LivePool | None], scheduler: Callable[[], Scheduler | None],
              clock: Callable[[], float] = time.time,
              loop: Callable[[], asyncio.AbstractEventLoop | None] = lambda: None) -> None:
        """Read the pool's state at each scrape (the getters follow the addon's current pool, scheduler and event
        loop; the state is read on that loop when it runs, as everything else that reads the pool)."""
        self.registry.register(PoolCollector(pool, scheduler, clock, loop))

    # -- fed by the addon and the failover loop ------------------------------------------------------

    def attempt(self, key: KeyRecord, outcome: Outcome) -> None:
        self._child(self.attempts, key.surface.value, key.fingerprint, key.name, outcome.kind.value,
                    outcome.reason or "").inc()

    def answered(self, job: Job, status: int, local: bool, first_byte: float) -> None:
        """The head of the client's answer is known (after the failover loop); `local`: kimi-rotate wrote it."""
        self._child(self.first_byte, job.surface.value).observe(first_byte)
        if local and status in (429, 503):
            self._child(self.local, job.surface.value, str(status)).inc()

    def refused(self, surface: str, status: int) -> None:
        """A local answer given before any job began (the store is unusable)."""
        self._child(self.local, surface, str(status)).inc()

    def finished(self, job: Job, status: int | str, seconds: float) -> None:
        surface = job.surface.value
        key = job.key
        self._child(self.requests, surface, key.fingerprint if key else "", key.name if key else "", str(status)).inc()
        if job.failed_over:
            self._child(self.failovers, surface).inc()
        self._child(self.total, surface).observe(seconds)
        self._child(self.queue_wait, surface).observe(job.queued)


class PoolCollector(Collector):
    """Gauges computed from the pool when scraped."""

    def __init__(self, pool: Callable[[], LivePool | None], scheduler: Callable[[], Scheduler | None],
                 clock: Callable[[], float], loop: Callable[[], asyncio.AbstractEventLoop | None]) -> None:
        self.pool, self.scheduler, self.clock, self.loop = pool, scheduler, clock, loop

    def describe(self) -> Iterable[Metric]:
        return []  # not known before a pool is there; the registry then asks collect() at each scrape

    def collect(self) -> Iterator[Metric]:
        """On the scrape's thread: the families, read on the event loop (the pool is not for other threads: reading
        caps fills a cache the loop clears)."""
        loop = self.loop()
        if loop is None or not loop.is_running():
            yield from self.read()
            return

        async def read() -> list[Metric]:
            return self.read()

        yield from asyncio.run_coroutine_threadsafe(read(), loop).result(timeout=10)

    def read(self) -> list[Metric]:
        pool, scheduler, now = self.pool(), self.scheduler(), self.clock()
        key_labels = ["surface", "key", "name"]
        health = GaugeMetricFamily(f"{PREFIX}_key_health", "Health score of each key (0-100).", labels=key_labels)
        cooling = GaugeMetricFamily(f"{PREFIX}_key_cooling_seconds", "Seconds left in each key's cooldown (0: none).",
                                    labels=key_labels)
        usable = GaugeMetricFamily(f"{PREFIX}_key_enabled", "1 if the key is enabled, 0 if disabled.",
                                   labels=key_labels)
        account = ["surface", "account"]
        in_flight = GaugeMetricFamily(f"{PREFIX}_account_in_flight", "Requests this proxy has in flight on each "
                                      "account.", labels=account)
        cap = GaugeMetricFamily(f"{PREFIX}_account_cap", "Cap this proxy holds each account to (its share), by "
                                "limit; absent: no cap known.", labels=[*account, "limit"])
        quota = GaugeMetricFamily(f"{PREFIX}_account_quota_remaining", "Quota left in each window Kimi last "
                                  "reported (balance: Open Platform money).", labels=[*account, "window"])
        if pool is not None:
            groups: dict[Group, None] = {}
            for key in pool.roster.keys:
                labels = [key.surface.value, key.fingerprint, key.name]
                health.add_metric(labels, key.health)
                left = key.cooldown_until - now if key.cooldown_until is not None else 0.0
                cooling.add_metric(labels, max(0.0, left))
                usable.add_metric(labels, 0.0 if key.disabled_reason is not None else 1.0)
                groups[key.limit_group] = None
            usage = scheduler.admission.usage if scheduler is not None else None
            for group in groups:
                names = [group[0].value, account_label(group)]
                if usage is not None:
                    in_flight.add_metric(names, usage.in_flight(group))
                # as the scheduler holds it: the whole cap while Redis counts for every proxy, else this one's share
                concurrency, rpm = scheduler.admission.caps(group) if scheduler is not None else pool.caps(group)
                for limit, value in (("concurrency", concurrency), ("rpm", rpm)):
                    if value is not None:
                        cap.add_metric([*names, limit], value)
                record = pool.accounts.get(group)
                if record is not None and record.quota is not None:
                    if record.quota.balance is not None:
                        quota.add_metric([*names, "balance"], record.quota.balance)
                    for window in record.quota.windows:
                        quota.add_metric([*names, window.name], window.remaining)
        return [health, cooling, usable, in_flight, cap, quota]


# -- serving -------------------------------------------------------------------------------------------


class MetricsError(Exception):
    """The metrics address cannot be served (one line for the user)."""


def parse_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise MetricsError(f"kimi_metrics must be HOST:PORT such as 127.0.0.1:9464, not {value!r}")
    return host, int(port)


def check_access(host: str, token: str, allow_remote: bool) -> None:
    """The proxy's rule: a listener other machines can reach needs the client token or kimi_allow_remote."""
    if not is_loopback(host) and not token and not allow_remote:
        raise MetricsError(f"kimi_metrics {host} can be reached from other machines: set kimi_client_token "
                           f"(scrapers then send it as a bearer token) or kimi_allow_remote=true, or use 127.0.0.1")


def _guarded(app: Any, token: str) -> Any:
    """The metrics app, answering 401 to a scrape without `Authorization: Bearer <token>` when a token is set."""
    if not token:
        return app
    expected = f"Bearer {token}".encode()

    def guarded(environ: dict[str, Any], start_response: Any) -> Any:
        given = str(environ.get("HTTP_AUTHORIZATION", "")).encode()
        if not hmac.compare_digest(given, expected):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
            return [b"kimi-rotate metrics: send kimi_client_token as a bearer token\n"]
        return app(environ, start_response)

    return guarded


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is no news for the proxy's log


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """prometheus_client's WSGI app on its own thread, off the event loop."""

    def __init__(self, metrics: Metrics, address: str, token: str, allow_remote: bool) -> None:
        self.host, self.port = parse_address(address)
        check_access(self.host, token, allow_remote)
        app = _guarded(make_wsgi_app(metrics.registry), token)
        try:
            server_class = _ThreadingServer6 if ":" in self.host else _ThreadingServer
            self.server = make_server(self.host, self.port, app, server_class, handler_class=_QuietHandler)
        except OSError as e:
            raise MetricsError(f"cannot serve metrics on {address}: {e.strerror or e}; "
                               f"choose another kimi_metrics address") from None
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, name="kimi-rotate-metrics", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
