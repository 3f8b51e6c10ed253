"""Re-sending a request on other keys until one answers, before the client sees a byte.

One loop serves both deliveries: the relay streams the winning response on as it arrives, the
addon buffers it for non-streaming requests. Every attempt is classified, recorded in the pool and
written into the flow's trail.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from mitmproxy import http

from . import engine
from .classify import Verdict, classify, classify_connection_error, decode_body
from .keys import mask
from .models import KeyRecord, OutcomeKind, Scope, Surface
from .pool import LivePool
from .routing import HOP_BY_HOP, swap_credential

ERROR_BODY_LIMIT = 1 << 20  # error bodies are small; never buffer more than this to classify one
SERVER_RETRIES = 1  # server-scope failures (5xx, no connection) are retried once, on another key


@dataclass
class Job:
    """One client request and what has happened to it so far."""

    surface: Surface
    host: str
    method: str
    path: str
    headers: http.Headers  # as the client sent them (its own credential included)
    body: bytes
    tried: set[int] = field(default_factory=set)
    trail: list[str] = field(default_factory=list)
    server_failures: int = 0

    @property
    def failed_over(self) -> bool:
        return len(self.tried) > 1


@dataclass
class Final:
    """How a job ended: an upstream response still open for reading, or a local error."""

    response: httpx.Response | None = None
    body: bytes | None = None  # set when the response was already read (and closed) to classify it
    status: int = 502
    message: str = ""
    retry_after: float | None = None

    async def aclose(self) -> None:
        if self.response is not None and self.body is None:
            await self.response.aclose()

    def headers_to_pass_on(self, body_length: int | None) -> list[tuple[bytes, bytes]]:
        """The upstream answer's headers as the client gets them: no hop-by-hop headers, the pool's
        Retry-After when it has one, and the length of a body that was read whole.

        Raw bytes: httpx decodes odd header values as latin-1; re-encoding them would garble them.
        """
        assert self.response is not None
        drop = set(HOP_BY_HOP)
        if self.retry_after is not None:
            drop.add("retry-after")
        if body_length is not None:
            drop.add("content-length")
        headers = [(k, v) for k, v in self.response.headers.raw if k.decode("latin-1").lower() not in drop]
        if self.retry_after is not None:
            headers.append((b"retry-after", str(max(1, round(self.retry_after))).encode()))
        if body_length is not None:
            headers.append((b"content-length", str(body_length).encode()))
        return headers


@dataclass(frozen=True)
class UpstreamSettings:
    verify: ssl.SSLContext | bool
    proxy: str | None
    resolve: dict[str, tuple[str, int]]
    timeout: float


def describe(key: KeyRecord) -> str:
    return f"{key.name} {mask(key.secret.get_secret_value())}"


def trail_entry(key: KeyRecord, status: int | str, verdict: Verdict, now: float) -> str:
    o = verdict.outcome
    # The classifier's reason starts with the status ("429 rate_limit_reached_error").
    text = f"{describe(key)}: {o.reason or status}"
    if o.until is not None and o.kind not in (OutcomeKind.SUCCESS, OutcomeKind.SERVER_ERROR):
        scope = " account" if o.scope is Scope.ACCOUNT else ""
        text += f",{scope} cooling {max(0, round(o.until - now))} s"
    elif o.kind in (OutcomeKind.INVALID_KEY, OutcomeKind.ACCESS_DENIED):
        text += ", disabled"
    return text


class Upstream:
    """The addon's own HTTP client, configured like mitmproxy's upstream side."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        # httpx pools connections by address, not by server name. With kimi_resolve several hosts may share one
        # address, so each resolved host gets its own client: a connection opened (and its certificate verified)
        # for one server name never carries another host's requests. "" is the client for unresolved hosts.
        self._clients: dict[str, httpx.AsyncClient] = {}

    def _get(self, host: str = "") -> httpx.AsyncClient:
        client = self._clients.get(host)
        if client is None:  # created lazily, inside the running loop
            t = self.settings.timeout
            client = self._clients[host] = httpx.AsyncClient(
                verify=self.settings.verify,
                proxy=self.settings.proxy,
                # An HTTPS_PROXY inherited by the proxy may point at the proxy itself.
                trust_env=False,
                timeout=httpx.Timeout(t, connect=min(15.0, t)),
                limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
                follow_redirects=False,
            )
        return client

    async def send(self, job: Job, key: KeyRecord) -> httpx.Response:
        headers = job.headers.copy()
        swap_credential(headers, key.secret.get_secret_value(), job.path)
        # Bytes as the client sent them: a header value may be non-ASCII (a User-Agent, an X-Title), and httpx
        # refuses such values as str, which broke the request.
        drop = HOP_BY_HOP | {"host", "content-length"}
        pairs = [(k, v) for k, v in headers.fields if k.decode("latin-1").lower() not in drop]
        pairs.append((b"host", job.host.encode()))
        address = self.settings.resolve.get(job.host)
        extensions: dict[str, object] = {}
        if address is not None and self.settings.proxy is None:
            url = f"https://{address[0]}:{address[1]}{job.path}"
            extensions["sni_hostname"] = job.host
        else:
            url = f"https://{job.host}{job.path}"
        client = self._get(job.host if extensions else "")
        request = client.build_request(job.method, url, headers=pairs, content=job.body, extensions=extensions)
        return await client.send(request, stream=True)

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


class Failover:
    def __init__(
        self,
        pool: LivePool,
        upstream: Upstream,
        max_attempts: int,
        max_wait: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pool = pool
        self.upstream = upstream
        self.max_attempts = max_attempts
        self.max_wait = max_wait
        self.clock = clock

    def settle(self, job: Job, key: KeyRecord, status: int | str, verdict: Verdict) -> None:
        """Record one attempt's verdict and add it to the job's trail."""
        now = self.clock()
        self.pool.record(key.id, verdict.outcome, now)
        job.trail.append(trail_entry(key, status, verdict, now))
        if verdict.outcome.scope is Scope.SERVER:
            job.server_failures += 1

    def may_retry(self, job: Job, verdict: Verdict) -> bool:
        if not verdict.failover or len(job.tried) >= self.max_attempts:
            return False
        return verdict.outcome.scope is not Scope.SERVER or job.server_failures <= SERVER_RETRIES

    async def next_key(self, job: Job) -> KeyRecord | engine.NoEligibleKey:
        """The next key for this job, waiting up to max_wait for a cooling one to free up."""
        deadline = self.clock() + self.max_wait
        while True:
            now = self.clock()
            result = self.pool.select(job.surface, now, exclude=job.tried)
            if isinstance(result, engine.Selection):
                return result.key
            free = result.next_free_at
            if free is None or free > deadline:
                return result
            await asyncio.sleep(max(0.01, free - now))

    async def run(self, job: Job) -> Final:
        """Try keys until one answers with something to pass on. The caller closes the result."""
        final: Final | None = None
        while len(job.tried) < self.max_attempts:
            key = await self.next_key(job)
            if isinstance(key, engine.NoEligibleKey):
                break
            job.tried.add(key.id)
            if final is not None:
                await final.aclose()
            final, verdict, status = await self._attempt(job, key)
            self.settle(job, key, status, verdict)
            if not self.may_retry(job, verdict):
                return final
        if final is None:
            return self.exhausted(job.surface)
        if final.response is not None:
            final.retry_after = self.retry_after(job.surface)
        return final

    async def _attempt(self, job: Job, key: KeyRecord) -> tuple[Final, Verdict, int | str]:
        started = self.clock()
        try:
            response = await self.upstream.send(job, key)
        except httpx.TimeoutException:
            message = "Kimi did not answer in time; kimi-rotate gave up waiting (kimi_upstream_timeout)"
            return Final(status=504, message=message), classify_connection_error("timeout"), "timeout"
        except (httpx.HTTPError, OSError, ssl.SSLError) as e:
            message = f"kimi-rotate could not reach Kimi ({_why(e)}); check the network or try again"
            return Final(status=502, message=message), classify_connection_error(type(e).__name__), "no response"
        now = self.clock()
        latency = (now - started) * 1000
        headers = list(response.headers.multi_items())
        if 200 <= response.status_code < 300:
            return Final(response=response), classify(response.status_code, headers, b"", now, latency), 200
        raw = bytearray()
        try:
            async for chunk in response.aiter_raw():
                raw += chunk
                if len(raw) > ERROR_BODY_LIMIT:
                    break
        except httpx.HTTPError:
            pass  # a cut-off error body is still classified on what arrived
        finally:
            await response.aclose()
        body = decode_body(bytes(raw), response.headers.get("content-encoding"))
        verdict = classify(response.status_code, headers, body, now, latency)
        return Final(response=response, body=bytes(raw)), verdict, response.status_code

    def retry_after(self, surface: Surface) -> float | None:
        now = self.clock()
        result = self.pool.select(surface, now)
        if isinstance(result, engine.NoEligibleKey) and result.next_free_at is not None:
            return result.next_free_at - now
        return None

    def exhausted(self, surface: Surface) -> Final:
        """The local answer when no key can take the request."""
        now = self.clock()
        result = self.pool.select(surface, now)
        if isinstance(result, engine.Selection):  # keys remain, but this request used its attempts
            return Final(status=429, message="kimi-rotate: every attempt for this request was refused", retry_after=1)
        return no_key_answer(surface, result, now)


def _why(error: BaseException) -> str:
    """What went wrong, for the client: a refused connection and an untrusted certificate need different fixes.
    Only the OS or TLS error at the bottom of httpx's chain is quoted; other errors could quote request data."""
    root = error
    for _ in range(8):
        cause = root.__cause__ or root.__context__
        if cause is None:
            break
        root = cause
    text = " ".join(str(root).split())[:200]
    if isinstance(root, OSError) and text:  # ssl.SSLError is an OSError
        return f"{type(root).__name__}: {text}"
    return type(error).__name__


def no_key_answer(surface: Surface, result: engine.NoEligibleKey, now: float) -> Final:
    if result.next_free_at is not None:
        wait = result.next_free_at - now
        return Final(
            status=429,
            message=(
                f"kimi-rotate: all {result.cooling} {surface.value} key(s) that can serve are cooling down; "
                f"the first frees in {max(1, round(wait))} s ({result.disabled} disabled). "
                "Add keys with `kimi-rotate add-key` or wait."
            ),
            retry_after=wait,
        )
    return Final(
        status=503,
        message=(
            f"kimi-rotate: every {surface.value} key is disabled ({result.disabled} of {result.total}); "
            "see `kimi-rotate list-keys` and `kimi-rotate enable`."
        ),
    )
