"""The mitmproxy addon: thin glue between flows and the pool.

Path of a request to a Kimi host:
- not streaming: the key goes straight into the flow and mitmproxy sends it (the fast path);
  a failure answer is classified in `response` and the request re-sent on other keys there;
- streaming: the flow is pointed at the loopback relay, which picks keys, fails over and streams.
TLS to every other host is left undecrypted unless kimi_intercept_all is set.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import certifi
from mitmproxy import command, ctx, exceptions, http, tls
from mitmproxy.proxy import server_hooks

from . import engine
from .classify import classify, classify_connection_error, decode_body
from .envelopes import error_response
from .failover import Failover, Final, Job, Upstream, UpstreamSettings, describe, no_key_answer
from .models import KeyRecord, Surface
from .pool import LivePool
from .relay import TOKEN_HEADER, Relay
from .routing import (
    KIMI_PORT,
    credential_matches,
    flow_surface,
    hide_credential,
    is_placeholder,
    normalize_host,
    parse_host_map,
    parse_resolve,
    real_target,
    reverse_resolve,
    swap_credential,
)
from .store import Store, StoreError, store_home

log = logging.getLogger("kimi_rotate")

_STREAM_FLAG = re.compile(rb'"stream"\s*:\s*true')
MARK_FAILOVER = ":arrows_counterclockwise:"


@dataclass
class InFlight:
    """What the addon remembers about a Kimi flow between its hooks (never stored in the flow)."""

    flow: http.HTTPFlow
    job: Job
    key: KeyRecord | None  # the key of the direct attempt; None when the relay handles the flow
    relay_token: str | None = None
    original: tuple[str, str, int, str] | None = None  # scheme, host, port, Host header before the relay


class KimiRotate:
    def __init__(self) -> None:
        # Option defaults, for masters that configure only the options set on the command line.
        self.hosts: dict[str, Surface] = parse_host_map([])
        self.resolve: dict[str, tuple[str, int]] = {}
        self.resolved_back: dict[tuple[str, int], tuple[str, ...]] = {}
        self.store: Store | None = None
        self.store_error: str | None = None
        self.pool: LivePool | None = None
        self.failover: Failover | None = None
        self.relay: Relay | None = None
        self.inflight: dict[str, InFlight] = {}
        self._warned: set[Surface] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # set once running: pools opened later start at once

    # -- options -------------------------------------------------------------------------------

    def load(self, loader: object) -> None:
        # mitmdump logs at debug level; the failover client's per-request lines would cost more than the request.
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)
        add = loader.add_option  # type: ignore[attr-defined]
        add("kimi_home", str, "", "Folder of the key store (default: $KIMI_ROTATE_HOME or the user data folder).")
        add("kimi_hosts", Sequence[str], [], "Extra host=surface pairs to serve (repeat the option).")
        add("kimi_resolve", Sequence[str], [], "host=address:port: connect there for that host (like curl --resolve).")
        add("kimi_client_token", str, "", "If set, only requests whose credential equals this token get a key.")
        add("kimi_max_attempts", int, 5, "Most keys one request is tried on (never more than the eligible keys).")
        add("kimi_max_wait", int, 3, "Seconds a request may wait for a cooling key before a local 429.")
        add("kimi_upstream_timeout", int, 600, "Seconds to wait for Kimi on re-sent requests.")
        add("kimi_intercept_all", bool, False, "Decrypt every TLS connection, not only the Kimi hosts.")

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        try:
            if "kimi_hosts" in updated:
                self.hosts = parse_host_map(opts.kimi_hosts)
            if "kimi_resolve" in updated:
                self.resolve = parse_resolve(opts.kimi_resolve)
                self.resolved_back = reverse_resolve(self.resolve)
        except ValueError as e:
            raise exceptions.OptionsError(str(e)) from None
        if opts.kimi_max_attempts < 1:
            raise exceptions.OptionsError("kimi_max_attempts must be at least 1")
        if opts.kimi_max_wait < 0 or opts.kimi_upstream_timeout < 1:
            raise exceptions.OptionsError("kimi_max_wait must be >= 0 and kimi_upstream_timeout >= 1")
        if "kimi_home" in updated or (self.store is None and self.store_error is None):
            self._open_store(Path(opts.kimi_home).expanduser() if opts.kimi_home else store_home())
        upstream_opts = {"ssl_insecure", "ssl_verify_upstream_trusted_ca", "ssl_verify_upstream_trusted_confdir",
                         "mode", "kimi_resolve", "kimi_upstream_timeout"}
        if self.pool is not None and (self.failover is None or updated & upstream_opts or
                                      updated & {"kimi_max_attempts", "kimi_max_wait", "kimi_home"}):
            self._build_failover()

    def _open_store(self, home: Path) -> None:
        self._close_pool()
        try:
            self.store = Store(home)
            self.pool = LivePool(self.store, on_error=self._store_failed, on_recover=self._store_recovered)
            if self._loop is not None:  # kimi_home changed while running: `running` will not come again
                self.pool.start(self._loop)
            self.store_error = None
            log.info("kimi-rotate: %d key(s) in %s", len(self.pool.roster), self.store.path)
        except StoreError as e:
            self.store, self.pool = None, None
            self.store_error = str(e)
            # A warning, not an error: mitmproxy's errorcheck exits on any error logged at startup, and the proxy
            # must keep running, answering Kimi requests with a 503 that says this and passing other traffic.
            log.warning("kimi-rotate: %s", e)

    def _store_failed(self, error: StoreError) -> None:
        self.store_error = str(error)

    def _store_recovered(self) -> None:
        if self.pool is not None:  # writes work again (space was freed): serve again
            self.store_error = None

    def _build_failover(self) -> None:
        assert self.pool is not None
        opts = ctx.options
        settings = UpstreamSettings(
            verify=_upstream_tls(opts),
            proxy=_upstream_proxy(opts.mode),
            resolve=self.resolve,
            timeout=float(opts.kimi_upstream_timeout),
        )
        old = self.failover
        self.failover = Failover(self.pool, Upstream(settings), opts.kimi_max_attempts, opts.kimi_max_wait)
        if self.relay is not None:
            self.relay.failover = self.failover
        if old is not None:
            _spawn(old.upstream.aclose())

    def running(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        if self.pool is not None:
            self.pool.start(loop)
        if self.failover is not None and self.relay is None:
            self.relay = Relay(self.failover)
            _spawn(self.relay.start())

    def done(self) -> None:
        # Flows still waiting for Kimi hold a real key; `save` writes them out after us.
        for state in self.inflight.values():
            if state.key is not None:
                hide_credential(state.flow.request.headers, state.key.fingerprint)
        self._close_pool()
        if self.relay is not None:
            _spawn(self.relay.stop())
        if self.failover is not None:
            _spawn(self.failover.upstream.aclose())

    def _close_pool(self) -> None:
        if self.pool is not None:
            self.pool.stop()
        if self.store is not None:
            self.store.close()

    # -- connections ---------------------------------------------------------------------------

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        """Decrypt only connections whose target and server name are a Kimi host on 443."""
        if ctx.options.kimi_intercept_all:
            return
        address = data.context.server.address
        sni = data.client_hello.sni
        if address is None or sni is None:
            data.ignore_connection = True
            return
        host, port = real_target(address, self.resolved_back, sni)
        if port != KIMI_PORT or host not in self.hosts or normalize_host(sni) != host:
            data.ignore_connection = True

    def http_connect(self, flow: http.HTTPFlow) -> None:
        """Accept a tunnel to a Kimi host at once instead of connecting first (eager strategy).

        If Kimi is unreachable, a failed CONNECT gives the client a bare proxy error; accepted
        here, the request comes in and gets a 502 in its own envelope from the failover path.
        """
        req = flow.request
        host, port = real_target((req.host, req.port), self.resolved_back)
        if flow.response is None and port == KIMI_PORT and host in self.hosts:
            now = time.time()
            flow.response = http.Response(
                req.data.http_version, 200, b"Connection established", http.Headers(), b"", None, now, now
            )

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        address = data.server.address
        if address is None or address[1] != KIMI_PORT:
            return
        target = self.resolve.get(normalize_host(address[0]))
        if target is not None:
            data.server.address = target

    # -- requests ------------------------------------------------------------------------------

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return
        surface = flow_surface(flow, self.hosts, self.resolved_back)
        if surface is None or "upgrade" in flow.request.headers:
            return
        headers = flow.request.headers
        token = ctx.options.kimi_client_token
        if token and not credential_matches(headers, token) and not (flow.is_replay and is_placeholder(headers)):
            return
        if self.store_error is not None or self.pool is None or self.failover is None:
            flow.response = error_response(503, f"kimi-rotate cannot use its key store: {self.store_error}",
                                           flow.request.path)
            return
        if self.pool.count(surface) == 0:
            self._warn_no_keys(surface)
            return
        host, _ = real_target((flow.request.host, flow.request.port), self.resolved_back, flow.client_conn.sni)
        job = Job(surface=surface, host=host, method=flow.request.method,
                  path=flow.request.path, headers=headers.copy(), body=flow.request.raw_content or b"")
        if is_placeholder(headers):  # a replayed flow: the client's credential is gone, ask for the usual style
            for name in ("authorization", "x-api-key"):
                if name in job.headers:
                    del job.headers[name]
        if self.relay is not None and self.relay.port and _STREAM_FLAG.search(job.body):
            self._via_relay(flow, job)
            return
        if not flow.server_conn.connected or getattr(ctx.options, "proxy_debug", False):
            # No live connection to Kimi (lazy strategy, or connecting failed): send it ourselves,
            # so that a failure to connect still reaches the client in the envelope it parses.
            # With proxy_debug mitmproxy logs every byte it sends, so it must never send the key itself.
            await self._send_ourselves(flow, job)
            return
        key = await self.failover.next_key(job)
        if isinstance(key, engine.NoEligibleKey):
            answer = no_key_answer(surface, key, time.time())
            flow.response = error_response(answer.status, answer.message, job.path, answer.retry_after)
            flow.comment = answer.message
            return
        job.tried.add(key.id)
        swap_credential(headers, key.secret.get_secret_value(), job.path)
        self.inflight[flow.id] = InFlight(flow=flow, job=job, key=key)

    async def _send_ourselves(self, flow: http.HTTPFlow, job: Job) -> None:
        assert self.failover is not None
        final = await self.failover.run(job)
        try:
            flow.response = await _to_mitmproxy(final, job.path)
        finally:
            await final.aclose()
        self._annotate(flow, job)

    def _via_relay(self, flow: http.HTTPFlow, job: Job) -> None:
        assert self.relay is not None
        req = flow.request
        original = (req.scheme, req.host, req.port, req.host_header or "")
        state = InFlight(flow=flow, job=job, key=None, original=original)
        state.relay_token = self.relay.register(job)
        self.inflight[flow.id] = state
        hide_credential(req.headers, "relay")
        req.scheme, req.host, req.port = "http", "127.0.0.1", self.relay.port
        req.host_header = original[3]
        req.headers[TOKEN_HEADER] = state.relay_token

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = self.inflight.get(flow.id)
        if state is None or flow.response is None:
            return
        if state.original is not None:  # relay flow: show the real target again, stream what arrives
            self._restore_target(flow, state)
            flow.response.stream = True
            return
        assert state.key is not None and self.failover is not None
        hide_credential(flow.request.headers, state.key.fingerprint)
        if 200 <= flow.response.status_code < 300:
            latency = _latency_ms(flow)
            verdict = classify(flow.response.status_code, flow.response.headers.items(multi=True), b"",
                               time.time(), latency)
            self.failover.settle(state.job, state.key, flow.response.status_code, verdict)
            state.key = None  # settled: `response` only writes the comment
            if "text/event-stream" in flow.response.headers.get("content-type", ""):
                flow.response.stream = True

    async def response(self, flow: http.HTTPFlow) -> None:
        state = self.inflight.pop(flow.id, None)
        if state is None or flow.response is None:
            return
        if state.key is not None and self.failover is not None:
            await self._judge_direct(flow, state)
        self._annotate(flow, state.job)

    async def _judge_direct(self, flow: http.HTTPFlow, state: InFlight) -> None:
        assert state.key is not None and self.failover is not None and flow.response is not None
        resp = flow.response
        body = decode_body(resp.raw_content or b"", resp.headers.get("content-encoding"))
        verdict = classify(resp.status_code, resp.headers.items(multi=True), body, time.time(), _latency_ms(flow))
        self.failover.settle(state.job, state.key, resp.status_code, verdict)
        if not self.failover.may_retry(state.job, verdict):
            return
        final = await self.failover.run(state.job)
        try:
            flow.response = await _to_mitmproxy(final, state.job.path)
        finally:
            await final.aclose()

    def error(self, flow: http.HTTPFlow) -> None:
        state = self.inflight.pop(flow.id, None)
        if state is None:
            return
        if state.original is not None:
            self._restore_target(flow, state)
            if self.relay is not None and state.relay_token:
                self.relay.forget(state.relay_token)
        elif state.key is not None and self.failover is not None:
            hide_credential(flow.request.headers, state.key.fingerprint)
            self.failover.settle(state.job, state.key, "no response", classify_connection_error("connection"))
        self._annotate(flow, state.job)

    # -- helpers -------------------------------------------------------------------------------

    def _restore_target(self, flow: http.HTTPFlow, state: InFlight) -> None:
        assert state.original is not None
        req = flow.request
        scheme, host, port, host_header = state.original
        req.scheme, req.host, req.port = scheme, host, port
        req.host_header = host_header
        req.headers.pop(TOKEN_HEADER, None)
        state.original = None

    def _annotate(self, flow: http.HTTPFlow, job: Job) -> None:
        if job.trail:
            flow.comment = " → ".join(job.trail)
        if job.failed_over:
            flow.marked = MARK_FAILOVER

    def _warn_no_keys(self, surface: Surface) -> None:
        if surface not in self._warned:
            self._warned.add(surface)
            log.warning("kimi-rotate: no %s key in the store; requests pass through unchanged. "
                        "Add one with `kimi-rotate add-key --surface %s`.", surface.value, surface.value)

    # -- commands ------------------------------------------------------------------------------

    @command.command("kimi.status")
    def status(self) -> str:
        """The pooled keys and their state."""
        if self.pool is None:
            return f"kimi-rotate: no store ({self.store_error})"
        now = time.time()
        lines = [f"strategy: {self.pool.settings.strategy.value}"]
        for i, k in enumerate(self.pool.roster.keys):
            current = "●" if self.pool.settings.is_current(k) else "○"
            state = k.state_at(now).value
            why = k.disabled_reason or (k.cooldown_reason if state == "cooling" else "") or ""
            lines.append(f"{current} [{i}] {describe(k)} {k.surface.value} health "
                         f"{engine.health_at(k, now):.0f} {state} {why}".rstrip())
        return "\n".join(lines)

    @command.command("kimi.rotate")
    def rotate(self) -> str:
        """Move to another eligible key; it serves the next request."""
        if self.store is None:
            return f"kimi-rotate: no store ({self.store_error})"
        # Through a connection of its own, as the CLI does: SQLite reports to the pool only commits made by other
        # connections, so a rotation written through the pool's connection would never reach this proxy.
        try:
            store = Store(self.store.home)
            try:
                result = store.rotate(time.time())
            finally:
                store.close()
        except StoreError as e:
            return f"kimi-rotate: {e}"
        if isinstance(result, engine.NoEligibleKey):
            return "kimi-rotate: no other key is eligible"
        return f"kimi-rotate: now using {describe(result.key)}"


def _latency_ms(flow: http.HTTPFlow) -> float | None:
    if flow.response is None or flow.request.timestamp_end is None or flow.response.timestamp_start is None:
        return None
    return max(0.0, (flow.response.timestamp_start - flow.request.timestamp_end) * 1000)


async def _to_mitmproxy(final: Final, path: str) -> http.Response:
    """The failover's result as the flow's response (bodies here are whole, not streamed)."""
    if final.response is None:
        return error_response(final.status, final.message, path, final.retry_after)
    resp = final.response
    raw = final.body if final.body is not None else b"".join([c async for c in resp.aiter_raw()])
    headers = http.Headers(final.headers_to_pass_on(len(raw)))
    now = time.time()
    return http.Response(b"HTTP/1.1", resp.status_code, resp.reason_phrase.encode(), headers, raw, None, now, now)


def _upstream_tls(opts: object) -> ssl.SSLContext | bool:
    """Verify upstream certificates exactly as mitmproxy is told to."""
    if getattr(opts, "ssl_insecure", False):
        return False
    cafile = getattr(opts, "ssl_verify_upstream_trusted_ca", None)
    capath = getattr(opts, "ssl_verify_upstream_trusted_confdir", None)
    if cafile or capath:
        return ssl.create_default_context(cafile=cafile, capath=capath)
    return ssl.create_default_context(cafile=certifi.where())


def _upstream_proxy(modes: Sequence[str]) -> str | None:
    for mode in modes:
        if mode.startswith("upstream:"):
            return mode.removeprefix("upstream:")
    return None


_background: set[asyncio.Task[None]] = set()


def _spawn(coro: object) -> None:
    """Run a coroutine from a sync hook, keeping a reference so it is not collected mid-way."""
    try:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
    except RuntimeError:
        coro.close()  # type: ignore[attr-defined]
        return
    _background.add(task)
    task.add_done_callback(_background.discard)
