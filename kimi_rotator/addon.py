"""The mitmproxy addon: thin glue between flows and the pool.

The path of a request to a Kimi host (mitmproxy itself never connects to Kimi for it):
1. `request` checks that the flow is one to serve (a Kimi host, the client token, a client on this
   machine unless remote clients are allowed, a store, a key),
   then runs the failover loop (failover.py) with the addon's own client (upstream.py): keys are tried
   until one answers with something to pass on, so every failure, even a dropped connection, can
   still be retried on another key or answered in the client's envelope (envelopes.py).
2. The loop ends once the winning answer's head is known. A local answer, or an answer whose body is
   complete or not an open event stream, becomes `flow.response` (its body read whole), and `_finish`
   annotates the flow at once.
3. An open event stream (`Content-Type: text/event-stream`, body still coming) is handed to the
   loopback relay (relay.py) under a one-time token, and the flow is pointed at the relay: mitmproxy
   connects there, the relay writes the head and pipes the body as Kimi sends it. `responseheaders`
   points the flow back at Kimi and streams it on; `response` or `error` calls `_finish` when it ends.
4. An exception of ours before the head reaches the client is answered with a 502 in `request`, never
   left to mitmproxy (once a stream has begun, the relay can only close it).
`_finish` is the one place a flow is annotated: the key's placeholder instead of the credential, the
trail of attempts in the comment, the failover mark, the request's log line, attempt flows.
The real key never enters the flow. TLS to every other host is left undecrypted unless
kimi_intercept_all is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mitmproxy import command, connection, ctx, exceptions, http, tls
from mitmproxy.proxy import server_hooks

from . import activity, affinity, engine, events, views
from .access import KeyAccess, from_this_machine, key_access, refusal
from .activity import describe
from .envelopes import INTERNAL_ERROR, error_response
from .failover import Failover, Job, Reply, broke_off
from .flowview import StreamCopy, add_flows, attempt_flows, keeps_flows, link_note
from .metrics import Metrics, MetricsError, MetricsServer
from .models import KeyRecord, Outcome, Surface
from .pool import LivePool
from .quota_watch import QuotaWatch
from .relay import TOKEN_HEADER, Handover, Relay
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
)
from .scheduler import Scheduler, SchedulerOptions
from .store import Store, StoreError, StoreLost, StoreUnreachable, open_store, store_home
from .upstream import (
    UPSTREAM_OPTIONS,
    UpstreamClient,
    UpstreamError,
    UpstreamTimeout,
    settings_from_options,
)
from .upstream import add_options as add_upstream_options

if TYPE_CHECKING:
    from .shared_counts import SharedCounts

log = logging.getLogger("kimi_rotate")

MARK_FAILOVER = ":arrows_counterclockwise:"


@dataclass
class RelayedFlow:
    """What the addon remembers about a flow whose answer was handed to the relay (never stored in the flow)."""

    job: Job
    token: str
    original: tuple[str, str, int, str] | None  # scheme, host, port, Host header before the relay
    copy: StreamCopy | None = None  # what the flow keeps of the streamed answer


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
        self.scheduler: Scheduler | None = None  # lives as long as its pool: it holds the counts and the pins
        self.shared_counts: SharedCounts | None = None  # a Redis store's per-account counts, with the scheduler
        self.quota_watch: QuotaWatch | None = None  # probes an account whose quota Kimi says is used up
        self.relay: Relay | None = None
        self.relayed: dict[str, RelayedFlow] = {}
        self._warned: set[Surface] = set()
        self._after_tlsconfig: AfterTlsConfig | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set once running: pools opened later start at once
        self._master_keeps_flows: bool | None = None  # whether the master shows or saves flows (looked up once)
        self.access = KeyAccess.LOOPBACK
        self._access_logged: KeyAccess | None = None  # logged at the first `configure` and whenever it changes
        self.metrics: Metrics | None = None  # kimi_metrics: fed on the request path only when set
        self.metrics_server: MetricsServer | None = None
        self._metrics_served: tuple[str, str, bool] = ("", "", False)  # the options the server runs with

    # -- options -------------------------------------------------------------------------------

    def load(self, loader: object) -> None:
        add = loader.add_option  # type: ignore[attr-defined]
        add("kimi_home", str, "", "Folder of the key store (default: $KIMI_ROTATE_HOME or the user data folder).")
        add("kimi_store", str, "", "Where the pool lives: empty for the file in kimi_home, or a redis:// (rediss:// "
            "for TLS) URL that several proxies share (default: $KIMI_ROTATE_STORE).")
        add("kimi_store_secret", str, "", "The file with the secret that seals keys in a Redis store (default: "
            "store-secret in kimi_home; every proxy on the store needs a copy).")
        add("kimi_hosts", Sequence[str], [], "Extra host=surface pairs to serve (repeat the option).")
        add("kimi_client_token", str, "", "If set, only requests whose credential equals this token get a key.")
        add("kimi_allow_remote", bool, False, "Give keys to clients on other machines without kimi_client_token or "
                                              "proxyauth: anyone who can reach the proxy can then spend them.")
        add("kimi_max_attempts", int, 5, "Most keys one request is tried on (never more than the eligible keys).")
        add("kimi_max_wait", int, 3, "Seconds a request may wait for a cooling key or for an account under its "
                                     "caps before a local 429.")
        add("kimi_admission", bool, True, "Hold each account under its caps (requests in flight, per minute) before "
                                          "sending, queueing requests when every account is full.")
        add("kimi_affinity", bool, True, "Keep each conversation on the account that served it (health-based), and "
                                         "send file requests to the account that uploaded the file.")
        add("kimi_affinity_idle", int, 1800, "Seconds after its last request that a conversation's account is "
                                             "forgotten.")
        add("kimi_quota_aware", bool, True, "Under health-based, spend first the quota that Kimi says will reset "
                                            "within the hour.")
        add_upstream_options(add)
        add("kimi_intercept_all", bool, False, "Decrypt every TLS connection, not only the Kimi hosts.")
        add("kimi_quota_probes", bool, True, "Probe an account's quota (a zero-token request of kimi-rotate's own) "
                                             "when Kimi says it is used up, to end its cooldown at the real reset.")
        add("kimi_metrics", str, "", "HOST:PORT to serve Prometheus metrics on, such as 127.0.0.1:9464 (off when "
                                     "empty). Other than loopback needs kimi_client_token (a bearer token) or "
                                     "kimi_allow_remote.")
        add("kimi_probe_interval", int, 0, "Seconds between zero-token quota probes of every account (0: only when "
                                           "Kimi says a quota is used up; else at least 60).")

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
        if opts.kimi_max_wait < 0 or opts.kimi_probe_interval < 0:
            raise exceptions.OptionsError("kimi_max_wait and kimi_probe_interval must be >= 0")
        if opts.kimi_upstream_timeout < 1 or opts.kimi_affinity_idle < 1:
            raise exceptions.OptionsError("kimi_upstream_timeout and kimi_affinity_idle must be >= 1")
        self.access = key_access(opts.kimi_client_token, getattr(opts, "proxyauth", None), opts.kimi_allow_remote)
        if self.access is not self._access_logged:
            self._access_logged = self.access
            level = logging.WARNING if self.access is KeyAccess.ANYONE else logging.INFO
            log.log(level, "kimi-rotate: %s", self.access.value)
        if updated & {"kimi_metrics", "kimi_client_token", "kimi_allow_remote"}:
            self._serve_metrics(opts.kimi_metrics, opts.kimi_client_token, opts.kimi_allow_remote)
        if updated & {"kimi_home", "kimi_store", "kimi_store_secret"} or (self.store is None and
                                                                          self.store_error is None):
            home = Path(opts.kimi_home).expanduser() if opts.kimi_home else store_home()
            self._open_store(lambda: open_store(opts.kimi_store, home, secret=opts.kimi_store_secret or None))
        failover_opts = {"kimi_max_attempts", "kimi_max_wait", "kimi_home", "kimi_store", "kimi_admission",
                         "kimi_affinity", "kimi_affinity_idle", "kimi_quota_aware", "kimi_probe_interval",
                         "kimi_quota_probes", "kimi_metrics"}
        if self.pool is not None and (self.failover is None or updated.intersection(UPSTREAM_OPTIONS) or
                                      updated & failover_opts):
            self._build_failover()

    def _open_store(self, opener: Callable[[], Store]) -> None:
        self._close_pool()
        try:
            self.store = opener()
            self.pool = LivePool(self.store, on_error=self._store_failed, on_recover=self._store_recovered)
            if self._loop is not None:  # kimi_home changed while running: `running` will not come again
                self.pool.start(self._loop)
            self.store_error = None
            log.info("kimi-rotate: %d key(s) in %s", len(self.pool.roster), self.store.where)
        except StoreError as e:
            self.store, self.pool = None, None
            self.store_error = str(e)
            # A warning, not an error: mitmproxy's errorcheck exits on any error logged at startup, and the proxy
            # must keep running, answering Kimi requests with a 503 that says this and passing other traffic.
            log.warning("kimi-rotate: %s", e)

    def _serve_metrics(self, address: str, token: str, allow_remote: bool) -> None:
        if (address, token, allow_remote) == self._metrics_served:
            return  # told again (the slim master tells every option once more): keep the counts and the socket
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        self.metrics, self._metrics_served = None, ("", "", False)
        if not address:
            return
        metrics = Metrics()
        metrics.watch(lambda: self.pool, lambda: self.scheduler, loop=lambda: self._loop)
        try:
            self.metrics_server = MetricsServer(metrics, address, token, allow_remote)
        except MetricsError as e:
            raise exceptions.OptionsError(str(e)) from None
        self.metrics, self._metrics_served = metrics, (address, token, allow_remote)
        log.info("kimi-rotate: Prometheus metrics on http://%s:%d/metrics", address.rpartition(":")[0],
                 self.metrics_server.port)

    def _heard(self, key: KeyRecord, outcome: Outcome) -> None:
        """Every attempt's recorded outcome, for the quota watch and the metrics."""
        if self.quota_watch is not None:
            self.quota_watch.saw(key, outcome)
        if self.metrics is not None:
            self.metrics.attempt(key, outcome)

    def _store_failed(self, error: StoreError) -> None:
        if isinstance(error, StoreUnreachable | StoreLost):  # Redis away or emptied: serve from the view meanwhile
            return
        self.store_error = str(error)

    def _store_recovered(self) -> None:
        if self.pool is not None:  # writes work again (space was freed): serve again
            self.store_error = None

    def _build_failover(self) -> None:
        assert self.pool is not None
        opts = ctx.options
        settings = settings_from_options(lambda name: getattr(opts, name, None))
        options = SchedulerOptions(admission=opts.kimi_admission, affinity=opts.kimi_affinity,
                                   quota_aware=opts.kimi_quota_aware, affinity_idle=float(opts.kimi_affinity_idle))
        if self.scheduler is None or self.scheduler.pool is not self.pool:
            # On a Redis store each account's requests are counted in Redis, across every proxy on the store.
            self.shared_counts = self.pool.store.shared_counts(self.pool.proxy_id)
            self.scheduler = Scheduler(self.pool, time.time, opts.kimi_max_wait, options, shared=self.shared_counts)
        else:
            self.scheduler.configure(options, opts.kimi_max_wait)
        old, client = self.failover, UpstreamClient(settings)
        if self.quota_watch is not None:
            self.quota_watch.stop()
        self.quota_watch = QuotaWatch(self.pool, client, opts.kimi_probe_interval) if opts.kimi_quota_probes else None
        self.failover = Failover(self.pool, client, opts.kimi_max_attempts, scheduler=self.scheduler,
                                 on_outcome=self._heard if self.quota_watch or self.metrics else None)
        if self._loop is not None and self.quota_watch is not None:
            self.quota_watch.start()
        if old is not None:
            _spawn(old.upstream.aclose())

    def running(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        if self.pool is not None:
            self.pool.start(loop)
        if self.quota_watch is not None:
            self.quota_watch.start()
        if self.relay is None:
            self.relay = Relay()
            _spawn(self.relay.start())
        if self._after_tlsconfig is None:
            after = AfterTlsConfig(self)
            try:
                ctx.master.addons.add(after)
                self._after_tlsconfig = after
            except exceptions.AddonManagerError as e:  # never worth failing `running` over (a reload would stop)
                log.warning("kimi-rotate: %s; mitmproxy may open idle connections to Kimi", e)

    def done(self) -> None:
        if self._after_tlsconfig is not None:  # a reloaded script adds its own
            with contextlib.suppress(exceptions.AddonManagerError):
                ctx.master.addons.remove(self._after_tlsconfig)
            self._after_tlsconfig = None
        if self.quota_watch is not None:
            self.quota_watch.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        self._close_pool()
        if self.relay is not None:
            _spawn(self.relay.stop())
        if self.failover is not None:
            _spawn(self.failover.upstream.aclose())

    def _close_pool(self) -> None:
        if self.shared_counts is not None:
            _spawn(self.shared_counts.aclose())
            self.shared_counts = None
        if self.pool is not None:
            self.pool.stop()
        if self.store is not None:
            self.store.close()

    # -- connections ---------------------------------------------------------------------------

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        """Decrypt only connections whose target and server name are a Kimi host on 443."""
        if not self.is_kimi_tls(data) and not ctx.options.kimi_intercept_all:
            data.ignore_connection = True

    def is_kimi_tls(self, data: tls.ClientHelloData) -> bool:
        address = data.context.server.address
        sni = data.client_hello.sni
        if address is None or sni is None:
            return False
        host, port = real_target(address, self.resolved_back, sni)
        return port == KIMI_PORT and host in self.hosts and normalize_host(sni) == host

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
        # Replays are the proxy's own user's doing (mitmweb, `-C`), whoever sent the flow first.
        if self.access is KeyAccess.LOOPBACK and not flow.is_replay and not from_this_machine(flow.client_conn):
            flow.response = error_response(403, refusal(flow.client_conn), flow.request.path)
            return
        if self.store_error is not None or self.pool is None or self.failover is None:
            if self.metrics is not None:
                self.metrics.refused(surface.value, 503)
            flow.response = error_response(503, f"kimi-rotate cannot use its key store: {self.store_error}",
                                           flow.request.path)
            return
        self.pool.catch_up()  # a key the CLI added or removed a moment ago counts for this request
        if self.pool.count(surface) == 0:
            self._warn_no_keys(surface)
            flow.comment = (f"kimi-rotate: no {surface.value} key in the pool; passed through unchanged "
                            f"(kimi-rotate add-key --surface {surface.value})")
            return
        host, _ = real_target((flow.request.host, flow.request.port), self.resolved_back, flow.client_conn.sni)
        req = flow.request
        body = req.raw_content or b""
        file = affinity.file_route(req.method, req.path)
        job = Job(surface=surface, host=host, method=req.method, path=req.path, headers=tuple(headers.fields),
                  body=body, inference=affinity.is_inference(req.method, req.path),
                  conversation=affinity.conversation(req.method, req.path, body, headers.get("content-encoding"))
                  if ctx.options.kimi_affinity else None,
                  file_id=file.file_id if file is not None else None)
        try:
            reply = await self.failover.run(job)
            if self.metrics is not None:
                answer = reply.response
                self.metrics.answered(job, reply.status if answer is None else answer.status, answer is None,
                                      time.time() - flow.request.timestamp_start)
            try:
                if reply.streams and self.relay is not None and self.relay.port:
                    self._hand_over(flow, job, reply)
                    return  # finished in `response` or `error`, once the stream has ended
                flow.response = await _to_mitmproxy(reply, job.path)
                if file is not None and file.kind == "upload" and job.key is not None:
                    self._remember_upload(flow.response, job.key)
            finally:
                if flow.id not in self.relayed:  # once handed over, the relay closes it
                    await reply.aclose()
        except Exception:
            # A bug of ours. Left to mitmproxy, the flow would go to Kimi without a key and come back a
            # puzzling 401; the client gets a clear answer instead, and the log has the traceback.
            log.exception("kimi-rotate: internal error while sending %s %s", job.method, job.path.split("?")[0])
            self._take_back(flow)
            flow.response = error_response(502, INTERNAL_ERROR, job.path)
        self._finish(flow, job)

    def _remember_upload(self, response: http.Response, key: KeyRecord) -> None:
        """A file uploaded through the proxy belongs to the key's account: later requests about it go there."""
        file_id = affinity.uploaded_file_id(response.status_code, response.content or b"")
        if file_id is not None and self.pool is not None:
            self.pool.remember_file(file_id, key, time.time())

    def _hand_over(self, flow: http.HTTPFlow, job: Job, reply: Reply) -> None:
        """Give an open stream to the relay and point the flow at it; mitmproxy then streams what the relay sends."""
        assert self.relay is not None and reply.response is not None
        answer = reply.response
        handover = Handover(answer.status, answer.reason, reply.headers_to_pass_on(None), reply)
        req = flow.request
        original = (req.scheme, req.host, req.port, req.host_header or "")
        state = RelayedFlow(job=job, token=self.relay.register(handover), original=original)
        self.relayed[flow.id] = state
        hide_credential(req.headers, "relay")  # no credential goes to the relay
        _set_body(req, b"")  # nor the body: a large prompt is not copied over loopback (restored on the way back)
        req.scheme, req.host, req.port = "http", "127.0.0.1", self.relay.port
        req.host_header = original[3]
        req.headers[TOKEN_HEADER] = state.token
        if flow.server_conn.via is not None:
            # Upstream proxy mode: mitmproxy would send even this loopback request through the upstream proxy.
            # A connection spec of the flow's own, with no `via`, makes it connect to the relay directly.
            flow.server_conn = connection.Server(address=None)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = self.relayed.get(flow.id)
        if state is None or flow.response is None:
            return
        self._restore_target(flow, state)  # show the real target again, and stream what arrives
        if not self._keeps_flows() or getattr(ctx.options, "store_streamed_bodies", False):  # 12 keeps it all
            flow.response.stream = True
        else:
            state.copy = flow.response.stream = StreamCopy()

    def response(self, flow: http.HTTPFlow) -> None:
        state = self._take_back(flow)
        if state is not None:
            self._finish(flow, state.job, state.copy)

    def error(self, flow: http.HTTPFlow) -> None:
        state = self._take_back(flow)  # the relay closes the answer if mitmproxy never came for it
        if state is not None:
            self._finish(flow, state.job, state.copy)

    # -- helpers -------------------------------------------------------------------------------

    def _take_back(self, flow: http.HTTPFlow) -> RelayedFlow | None:
        """End a handover: the flow shows its real target again, and an answer not collected is closed."""
        state = self.relayed.pop(flow.id, None)
        if state is not None:
            self._restore_target(flow, state)
            if self.relay is not None:
                self.relay.forget(state.token)
        return state

    def _restore_target(self, flow: http.HTTPFlow, state: RelayedFlow) -> None:
        if state.original is None:
            return
        req = flow.request
        scheme, host, port, host_header = state.original
        req.scheme, req.host, req.port = scheme, host, port
        req.host_header = host_header
        req.headers.pop(TOKEN_HEADER, None)
        _set_body(req, state.job.body)
        state.original = None

    def _finish(self, flow: http.HTTPFlow, job: Job, copy: StreamCopy | None = None) -> None:
        """The one place a Kimi flow is annotated, once its answer has ended (a streamed one when its stream has)."""
        self._annotate(flow, job)
        if self.metrics is not None:
            self.metrics.finished(job, flow.response.status_code if flow.response is not None else "none",
                                  time.time() - flow.request.timestamp_start)
        if copy is not None:
            self._keep_stream_copy(flow, copy)
        self._show_attempts(flow, job)
        if job.failed_over and self.pool is not None:
            self.pool.event_log.put(events.failover(job, self.pool.roster.keys, time.time()))

    def _annotate(self, flow: http.HTTPFlow, job: Job) -> None:
        """Name the attempts in the flow's comment, and put the placeholder of the key that served where the
        client's credential was: views and saved flows then show which key answered, and never a credential.
        The request's line is logged here too."""
        if job.key is not None:
            hide_credential(flow.request.headers, job.key.fingerprint)
        if job.trail:
            flow.comment = " → ".join(job.trail)
        notes = [n for n in (job.placement, f"queued {job.queued:.3f} s" if job.queued else "") if n]
        if notes:
            flow.comment += f" ({'; '.join(notes)})"
        if job.failed_over:
            flow.marked = MARK_FAILOVER
        if activity.log.isEnabledFor(logging.INFO):
            status: int | str = flow.response.status_code if flow.response is not None else "no answer"
            if flow.error is not None:  # mitmproxy's words for a cut ("Client disconnected."), never Kimi's
                status = f"{status} ({flow.error.msg.rstrip('.')})"
            activity.log.info(activity.request_line(job, status, time.time() - flow.request.timestamp_start))

    def _keep_stream_copy(self, flow: http.HTTPFlow, copy: StreamCopy) -> None:
        """Give a streamed flow the copy of its body, so views show the answer instead of "content missing"."""
        if flow.response is None:
            return
        flow.response.raw_content = bytes(copy.data)  # the body only: the headers stay as the client got them
        flow.comment += copy.note()

    def _show_attempts(self, flow: http.HTTPFlow, job: Job) -> None:
        """List each failed attempt as a flow of its own next to the client's, where flows are shown or saved."""
        if not job.attempts or not self._keeps_flows():
            return
        flows = attempt_flows(flow, job.attempts, len(job.tried))
        flow.comment += link_note(flow, len(flows), len(job.tried) - 1)
        _spawn(add_flows(flows))

    def _keeps_flows(self) -> bool:
        if self._master_keeps_flows is None:
            self._master_keeps_flows = keeps_flows()
        return self._master_keeps_flows

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
        return views.status_text(self.pool.roster, self.pool.settings, time.time())

    @command.command("kimi.rotate")
    def rotate(self) -> str:
        """Move to another eligible key; it serves the next request."""
        if self.store is None:
            return f"kimi-rotate: no store ({self.store_error})"
        # Through a connection of its own, as the CLI does: SQLite reports to the pool only commits made by other
        # connections, so a rotation written through the pool's connection would never reach this proxy.
        try:
            store = self.store.reopen()
            try:
                result = store.rotate(time.time())
            finally:
                store.close()
        except StoreError as e:
            return f"kimi-rotate: {e}"
        if isinstance(result, engine.NoEligibleKey):
            return "kimi-rotate: no other key is eligible"
        return f"kimi-rotate: now using {describe(result.key)}"


class AfterTlsConfig:
    """Keeps mitmproxy from connecting to Kimi itself when a client's TLS handshake starts.

    Kimi requests go out through the addon's own client, so a connection of mitmproxy's would only
    sit idle (and cost a TLS handshake per client connection). mitmproxy's tlsconfig addon asks for
    one under the eager strategy in its tls_clienthello hook, and in mitmdump and mitmweb it comes
    after scripts in the addon chain: this hook, added at the end of the chain, has the last word.
    Without that connection the certificate shown to the client follows its server name.
    """

    name = "kimi_rotate_after_tlsconfig"

    def __init__(self, rotate: KimiRotate) -> None:
        self.rotate = rotate

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if self.rotate.is_kimi_tls(data):
            data.establish_server_tls_first = False


def _set_body(request: http.Request, body: bytes) -> None:
    """Swap a request's raw body, keeping a Content-Length header true (a chunked request has none)."""
    request.raw_content = body
    if "content-length" in request.headers:
        request.headers["content-length"] = str(len(body))


async def _to_mitmproxy(reply: Reply, path: str) -> http.Response:
    """The failover's reply as the flow's response, its body read whole."""
    if reply.response is None:
        return error_response(reply.status, reply.message, path, reply.retry_after)
    resp = reply.response
    try:
        raw = b"".join([chunk async for chunk in reply.aiter_body()])
    except UpstreamTimeout:
        return error_response(504, "Kimi stopped sending its answer; kimi-rotate gave up waiting "
                                   "(kimi_upstream_timeout). Try again", path)
    except UpstreamError as e:
        return error_response(502, broke_off(e), path)
    headers = http.Headers(reply.headers_to_pass_on(len(raw)))
    now = time.time()  # mitmproxy stamps the start itself when a request hook sets the response
    return http.Response(b"HTTP/1.1", resp.status, resp.reason, headers, raw, None, now, now)


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
