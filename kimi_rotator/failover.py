"""Re-sending a request on other keys until one answers, before the client sees a byte.

The addon's `request` hook runs this loop for every Kimi request; its Reply is the answer whose head has
arrived, or a local error. Every attempt is classified, recorded in the pool and written into the job's trail.
It imports no mitmproxy: the loop is tested, and can run, without a proxy.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from . import engine, http1
from .activity import describe, trail_entry
from .admission import Lease
from .affinity import Conversation
from .classify import Verdict, classify, classify_connection_error, decode_body
from .models import Group, KeyRecord, Outcome, OutcomeKind, Scope, Surface
from .pool import LivePool
from .routing import with_credential
from .scheduler import Capped, Scheduler
from .upstream import Response, UpstreamClient, UpstreamError, UpstreamTimeout

ERROR_BODY_LIMIT = 1 << 20  # error bodies are small; never buffer more than this to classify one
SERVER_RETRIES = 1  # server-scope failures (5xx, no connection) are retried once, on another key
ATTEMPT_BODY_LIMIT = 64 << 10  # what a failed attempt keeps of its body, for flow views
ATTEMPTS_KEPT = 10  # failed attempts kept per request (kimi_max_attempts may be higher)


@dataclass(frozen=True)
class Attempt:
    """An attempt whose answer the client never got (another key answered instead), kept for flow views."""

    fingerprint: str  # of the key tried: views name it by its placeholder, never by the key
    sent: float
    answered: float
    status: int | None = None  # None: no answer came (`error` says why)
    reason: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()  # as received, raw
    body: bytes = b""  # raw (content encoding kept), or with `body_cut` its first ATTEMPT_BODY_LIMIT bytes decoded
    body_cut: bool = False
    error: str = ""  # why the answer is missing or incomplete
    summary: str = ""  # its trail entry


@dataclass
class Job:
    """One client request and what has happened to it so far."""

    surface: Surface
    host: str
    method: str
    path: str
    headers: tuple[tuple[bytes, bytes], ...]  # as the client sent them, raw (its own credential included)
    body: bytes
    tried: set[int] = field(default_factory=set)
    barred: set[int] = field(default_factory=set)  # keys not to try again: all tried ones but those refused for a cap
    key: KeyRecord | None = None  # the key of the latest attempt
    wait_deadline: float | None = None  # kimi_max_wait is for the whole request, however many attempts wait
    trail: list[str] = field(default_factory=list)
    server_failures: int = 0
    attempts: list[Attempt] = field(default_factory=list)  # failed attempts the client did not get, oldest first
    inference: bool = False  # a model call: counted against its account's caps (admission)
    conversation: Conversation | None = None
    placement: str = ""  # what became of the conversation's pin: "pin held", "pin moved", "new conversation"
    file_id: str | None = None  # the uploaded file the request is about
    file_owner: Group | None = None  # the account that uploaded it, once looked up
    lease: Lease | None = None  # the latest attempt's place in its account's counts
    queued: float = 0.0  # seconds spent waiting for an account under its caps

    @property
    def failed_over(self) -> bool:
        return len(self.tried) > 1


@dataclass
class Reply:
    """What the client is to get for a job: an upstream answer whose head has arrived and whose body may still be
    coming (`response`), or, when `response` is None, a local error."""

    response: Response | None = None
    body_start: bytes = b""  # read to classify a failure answer; the rest of a long one is still unread
    status: int = 502
    message: str = ""
    retry_after: float | None = None
    attempt: Attempt | None = None  # what a failed attempt received, kept in case another key answers instead
    lease: Lease | None = None  # given back when the answer has ended: until then it counts as in flight

    async def aclose(self) -> None:
        if self.lease is not None:
            self.lease.release()
        if self.response is not None:
            await self.response.aclose()

    def body_length(self) -> int | None:
        """The body's length when it has been read whole."""
        return len(self.body_start) if self.response is not None and self.response.complete else None

    @property
    def streams(self) -> bool:
        """An event stream whose body is still coming: the client gets it as it arrives, not once it has ended.

        Decided by the answer, not the request: a body the failover loop read whole (a failure answer), or one that
        its framing says is empty, is complete; an answer of any other type is read whole before it is passed on."""
        response = self.response
        if response is None or response.complete:
            return False
        content_type = response.header("content-type") or ""
        return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"

    async def aiter_body(self) -> AsyncIterator[bytes]:
        """The whole body as it arrives (raw: content encoding kept), starting with what was read already."""
        assert self.response is not None
        if self.body_start:
            yield self.body_start
        async for chunk in self.response.aiter_raw():
            yield chunk

    def headers_to_pass_on(self, body_length: int | None) -> list[tuple[bytes, bytes]]:
        """The upstream answer's headers as the client gets them: no hop-by-hop headers, the pool's
        Retry-After when it has one, and the length of a body that was read whole.

        Raw bytes, as they came: a header value may be any bytes, and decoding it would garble it.
        """
        assert self.response is not None
        drop = []
        if self.retry_after is not None:
            drop.append(b"retry-after")
        if body_length is not None:
            drop.append(b"content-length")
        headers = http1.passed_on(self.response.headers, drop)
        if self.retry_after is not None:
            headers.append((b"retry-after", str(max(1, round(self.retry_after))).encode()))
        if body_length is not None:
            headers.append((b"content-length", str(body_length).encode()))
        return headers


class Failover:
    def __init__(
        self,
        pool: LivePool,
        upstream: UpstreamClient,
        max_attempts: int,
        max_wait: float = 0.0,
        clock: Callable[[], float] = time.time,
        scheduler: Scheduler | None = None,
        on_outcome: Callable[[KeyRecord, Outcome], None] | None = None,  # hears every recorded outcome (quota watch)
    ) -> None:
        """`scheduler`: the addon's, which outlives a failover rebuilt for new options (it holds the counts and the
        pins); without one, a scheduler of its own with `max_wait`."""
        self.pool = pool
        self.upstream = upstream
        self.max_attempts = max_attempts
        self.clock = clock
        self.scheduler = scheduler if scheduler is not None else Scheduler(pool, clock, max_wait)
        self.on_outcome = on_outcome

    def settle(self, job: Job, key: KeyRecord, status: int | str, verdict: Verdict) -> None:
        """Record one attempt's verdict and add it to the job's trail."""
        now = self.clock()
        self.pool.record(key.id, verdict.outcome, now)
        if self.on_outcome is not None:
            self.on_outcome(key, verdict.outcome)
        job.trail.append(trail_entry(key, status, verdict, now))
        if verdict.outcome.scope is Scope.SERVER:
            job.server_failures += 1

    def may_retry(self, job: Job, verdict: Verdict) -> bool:
        if not verdict.failover or len(job.trail) >= self.max_attempts:
            return False
        return verdict.outcome.scope is not Scope.SERVER or job.server_failures <= SERVER_RETRIES

    async def run(self, job: Job) -> Reply:
        """Try keys until one answers with something to pass on. The caller closes the result."""
        reply: Reply | None = None
        capped: Capped | None = None
        while len(job.trail) < self.max_attempts:
            key = await self.scheduler.next_key(job)
            if isinstance(key, Capped):
                capped = key
                break
            if isinstance(key, engine.NoEligibleKey):
                break
            job.tried.add(key.id)
            job.key = key
            if reply is not None:
                if reply.attempt is not None and len(job.attempts) < ATTEMPTS_KEPT:
                    job.attempts.append(reply.attempt)
                await reply.aclose()
            reply, verdict, status = await self._attempt(job, key)
            if verdict.outcome.kind is not OutcomeKind.RATE_LIMITED:
                # A key refused for its account's cap may serve this request once the account has room again (the
                # queue waits for that); a key that failed for any other reason is not asked again.
                job.barred.add(key.id)
            reply.lease, job.lease = job.lease, None
            if reply.lease is not None and (reply.response is None or verdict.outcome.kind is OutcomeKind.RATE_LIMITED):
                reply.lease.release(refused=reply.response is not None)  # over already; a refusal used no quota
            self.settle(job, key, status, verdict)
            if reply.attempt is not None:
                reply.attempt = dataclasses.replace(reply.attempt, summary=job.trail[-1])
            if verdict.outcome.kind is OutcomeKind.SUCCESS:
                self.scheduler.served(job, key)
            if not self.may_retry(job, verdict):
                return await self._about_file(job, reply)
        if reply is None:
            return at_caps(job.surface, capped) if capped is not None else self.exhausted(job.surface)
        if reply.response is not None:
            reply.retry_after = capped.retry_after if capped is not None else self.retry_after(job.surface)
        return await self._about_file(job, reply)

    async def _about_file(self, job: Job, reply: Reply) -> Reply:
        """A file request that another account answered "not found" learns whose file it is."""
        owner = job.file_owner
        if owner is None or job.key is None or job.key.limit_group == owner or reply.response is None \
                or reply.response.status != 404:
            return reply
        keys = [k for k in self.pool.roster.keys if k.limit_group == owner]
        who = ", ".join(describe(k) for k in keys) or "a key no longer in the pool"
        message = (f"kimi-rotate: file {job.file_id} belongs to another account (uploaded with {who}), which has no "
                   "key that can serve; enable or re-add that key (`kimi-rotate list-keys`), or upload the file again")
        await reply.aclose()  # Kimi's "not found" is replaced by the reason
        return Reply(status=404, message=message, attempt=reply.attempt)

    async def _attempt(self, job: Job, key: KeyRecord) -> tuple[Reply, Verdict, int | str]:
        started = self.clock()
        headers = with_credential(job.headers, key.secret.get_secret_value(), job.path)
        seen = Attempt(fingerprint=key.fingerprint, sent=started, answered=started)
        try:
            response = await self.upstream.send(job.method, job.host, job.path, headers, job.body)
        except UpstreamTimeout:
            message = "Kimi did not answer in time; kimi-rotate gave up waiting (kimi_upstream_timeout)"
            reply = Reply(status=504, message=message, attempt=_failed(seen, self.clock(), message))
            return reply, classify_connection_error("timeout"), "timeout"
        except UpstreamError as e:
            message = f"kimi-rotate could not reach Kimi: {e}. Check the network or try again"
            reply = Reply(status=502, message=message, attempt=_failed(seen, self.clock(), message))
            return reply, classify_connection_error(type(e).__name__), "no response"
        now = self.clock()
        latency = (now - started) * 1000
        if 200 <= response.status < 300:
            return Reply(response=response), classify(response.status, _text(response.headers), b"", now, latency), 200
        seen = dataclasses.replace(seen, answered=now, status=response.status, reason=response.reason,
                                   headers=tuple(response.headers))
        try:
            raw = await response.read(limit=ERROR_BODY_LIMIT)
        except UpstreamError as e:
            # Classified on its status and headers; the client gets a clear 502, not a head whose body never comes.
            await response.aclose()
            verdict = classify(response.status, _text(response.headers), b"", now, latency)
            return Reply(status=502, message=broke_off(e), attempt=_failed(seen, now, broke_off(e))), verdict, \
                response.status
        body = decode_body(raw, response.header("content-encoding"))
        verdict = classify(response.status, _text(response.headers), body, now, latency)
        if len(raw) <= ATTEMPT_BODY_LIMIT:
            kept = dataclasses.replace(seen, body=raw)
        else:  # the start of an encoded body would not decode: keep its start decoded
            kept = dataclasses.replace(seen, body=body[:ATTEMPT_BODY_LIMIT], body_cut=True)
        return Reply(response=response, body_start=raw, attempt=kept), verdict, response.status

    def retry_after(self, surface: Surface) -> float | None:
        now = self.clock()
        result = self.pool.peek(surface, now)
        if isinstance(result, engine.NoEligibleKey) and result.next_free_at is not None:
            return result.next_free_at - now
        return None

    def exhausted(self, surface: Surface) -> Reply:
        """The local answer when no key can take the request."""
        now = self.clock()
        result = self.pool.peek(surface, now)
        if isinstance(result, engine.Selection):  # keys remain, but this request used its attempts
            return Reply(status=429, message="kimi-rotate: every attempt for this request was refused", retry_after=1)
        return no_key_answer(surface, result, now)


def at_caps(surface: Surface, capped: Capped) -> Reply:
    return Reply(
        status=429,
        message=(f"kimi-rotate: every {surface.value} account that can serve is at its caps (requests in flight or "
                 "per minute); retry after the time given, add keys of another account, or raise kimi_max_wait"),
        retry_after=capped.retry_after,
    )


def _failed(seen: Attempt, now: float, error: str) -> Attempt:
    return dataclasses.replace(seen, answered=now, error=error)


def broke_off(error: UpstreamError) -> str:
    return f"kimi-rotate: Kimi's answer broke off ({error}). Try again"


def _text(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]


def no_key_answer(surface: Surface, result: engine.NoEligibleKey, now: float) -> Reply:
    if result.next_free_at is not None:
        wait = result.next_free_at - now
        return Reply(
            status=429,
            message=(
                f"kimi-rotate: all {result.cooling} {surface.value} key(s) that can serve are cooling down; "
                f"the first frees in {max(1, round(wait))} s ({result.disabled} disabled). "
                "Add keys with `kimi-rotate add-key` or wait."
            ),
            retry_after=wait,
        )
    return Reply(
        status=503,
        message=(
            f"kimi-rotate: every {surface.value} key is disabled ({result.disabled} of {result.total}); "
            "see `kimi-rotate list-keys` and `kimi-rotate enable`."
        ),
    )
