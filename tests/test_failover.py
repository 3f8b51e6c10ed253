"""The failover loop and the live pool, with a scripted upstream in place of the network (no proxy, no sockets)."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import json
import os
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kimi_rotator import failover as failover_module
from kimi_rotator import pool as pool_module
from kimi_rotator.failover import ATTEMPT_BODY_LIMIT, Failover, Job
from kimi_rotator.keys import fingerprint
from kimi_rotator.models import Outcome, OutcomeKind, Surface
from kimi_rotator.pool import LivePool
from kimi_rotator.store import NewKey
from kimi_rotator.store_sqlite import SqliteStore
from kimi_rotator.upstream import BrokenResponse

PATH = "/coding/v1/chat/completions"
RATE_LIMITED = json.dumps({"error": {"type": "rate_limit_reached_error",
                                     "message": "max RPM reached, please try again after 30 seconds"}}).encode()


@dataclass
class Answer:
    """What the scripted upstream answers: enough of upstream.Response for the failover loop."""

    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=lambda: [(b"content-type", b"application/json")])
    reason: bytes = b""
    complete: bool = False
    broken: bool = False  # the connection breaks off before the body has come (then nothing more comes)

    def header(self, name: str) -> str | None:
        return next((v.decode() for k, v in self.headers if k.decode().lower() == name), None)

    async def read(self, limit: int | None = None) -> bytes:
        if self.broken:
            raise BrokenResponse("the connection to Kimi broke off mid-answer (ConnectionResetError)")
        self.complete = True
        return self.body

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        if not self.complete and not self.broken:
            self.complete = True
            yield self.body

    async def aclose(self) -> None:
        pass


@dataclass
class ScriptedUpstream:
    answers: dict[bytes, Answer]  # by the credential that reached it
    sent: list[bytes] = field(default_factory=list)

    async def send(self, method: str, host: str, path: str, headers: Iterable[tuple[bytes, bytes]], body: bytes
                   ) -> Answer:
        credential = dict(headers)[b"authorization"].removeprefix(b"Bearer ")
        self.sent.append(credential)
        return dataclasses.replace(self.answers[credential])  # a fresh answer each time: reading one uses it up

    async def aclose(self) -> None:
        pass


def key(tag: str) -> str:
    return f"sk-kimi-{tag}" + "x" * (40 - len(tag))


@pytest.fixture
def live(tmp_path: Path) -> LivePool:
    store = SqliteStore(tmp_path / "home")
    now = time.time()
    store.add_key(NewKey(secret=key("one"), name="one", surface=Surface.KIMI_CODE, account="a1",
                         cooldown_until=now + 0.3, cooldown_reason="test"), now)
    store.add_key(NewKey(secret=key("two"), name="two", surface=Surface.KIMI_CODE, account="a2",
                         cooldown_until=now + 0.6, cooldown_reason="test"), now)
    return LivePool(store)


def job() -> Job:
    return Job(Surface.KIMI_CODE, "api.kimi.com", "POST", PATH, ((b"authorization", b"Bearer placeholder"),), b"{}")


async def test_max_wait_is_for_the_whole_request_not_for_each_attempt(live: LivePool) -> None:
    # Key one frees after 0.3 s and answers 429; key two frees only at 0.6 s, past the request's 0.5 s budget.
    # Waiting for it anew after the first attempt would hold the client for 0.6 s instead of answering at 0.3 s.
    upstream = ScriptedUpstream({key("one").encode(): Answer(429, RATE_LIMITED),
                                 key("two").encode(): Answer(200, b'{"ok": true}')})
    failover = Failover(live, upstream, max_attempts=5, max_wait=0.5)  # type: ignore[arg-type]
    started = time.monotonic()
    reply = await failover.run(job())
    took = time.monotonic() - started
    assert upstream.sent == [key("one").encode()]
    assert reply.response is not None and reply.response.status == 429  # Kimi's own answer is passed on
    assert 0.25 < took < 0.58, took  # answered before key two would have freed


async def test_a_cooling_key_is_waited_for_within_max_wait(live: LivePool) -> None:
    upstream = ScriptedUpstream({key("one").encode(): Answer(200, b'{"ok": true}')})
    failover = Failover(live, upstream, max_attempts=5, max_wait=1)  # type: ignore[arg-type]
    reply = await failover.run(job())
    assert upstream.sent == [key("one").encode()]
    assert reply.response is not None and reply.response.status == 200


async def test_an_error_answer_cut_off_mid_body_is_classified_and_answered_with_a_502(live: LivePool) -> None:
    # The 429 still fails over to the next key; a 400 (passed on) becomes a clear 502, not its head with no body.
    long_400 = Answer(400, b"", headers=[(b"content-type", b"application/json"), (b"content-length", b"500")],
                      broken=True)
    upstream = ScriptedUpstream({key("one").encode(): Answer(429, RATE_LIMITED, broken=True),
                                 key("two").encode(): long_400})
    failover = Failover(live, upstream, max_attempts=5, max_wait=1)  # type: ignore[arg-type]
    reply = await failover.run(job())
    assert upstream.sent == [key("one").encode(), key("two").encode()]
    assert (reply.response, reply.status) == (None, 502)
    assert "Kimi's answer broke off" in reply.message and "ConnectionResetError" in reply.message


async def test_unflushed_outcomes_are_bounded_while_the_store_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_module, "MAX_PENDING", 10)
    store = SqliteStore(tmp_path / "home")
    store.add_key(NewKey(secret=key("one"), name="one", surface=Surface.KIMI_CODE), time.time())
    live = LivePool(store)  # not started: nothing is written, as during an outage
    key_id = live.roster.keys[0].id
    for _ in range(25):
        live.record(key_id, Outcome(kind=OutcomeKind.SUCCESS, reason="200"), time.time())
    assert len(live._unflushed) == 10
    assert [p.seq for p in live._unflushed] == list(range(16, 26))  # the newest are kept
    assert live.roster.keys[0].total_requests == 25  # the in-memory view has them all


@pytest.fixture
def ready(tmp_path: Path) -> LivePool:
    """Three free keys on three accounts."""
    store = SqliteStore(tmp_path / "home")
    for name in ("one", "two", "three"):
        store.add_key(NewKey(secret=key(name), name=name, surface=Surface.KIMI_CODE, account=name), time.time())
    return LivePool(store)


async def test_failed_attempts_are_kept_for_flow_views_with_their_bodies_bounded(ready: LivePool) -> None:
    noise = base64.b64encode(os.urandom(ATTEMPT_BODY_LIMIT))  # compressed, still longer than an attempt keeps
    long_text = b'{"error": {"type": "server_error", "message": "' + noise + b'"}}'
    gzipped = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip"), (b"msh-uid", b"acct")]
    upstream = ScriptedUpstream({key("one").encode(): Answer(429, RATE_LIMITED, reason=b"Too Many Requests"),
                                 key("two").encode(): Answer(500, gzip.compress(long_text), headers=gzipped),
                                 key("three").encode(): Answer(200, b'{"ok": true}')})
    failover = Failover(ready, upstream, max_attempts=5, max_wait=0)  # type: ignore[arg-type]
    j = job()
    reply = await failover.run(j)
    assert reply.response is not None and reply.response.status == 200
    assert len(upstream.sent) == 3
    first, second = j.attempts  # the answer the client got is not among them
    assert (first.status, first.reason, first.body, first.body_cut) == (429, b"Too Many Requests", RATE_LIMITED, False)
    assert first.fingerprint == fingerprint(upstream.sent[0].decode())
    assert (first.summary, second.summary) == tuple(j.trail[:2])
    assert first.sent <= first.answered and first.error == ""
    assert second.status == 500 and second.body_cut and second.headers == tuple(gzipped)
    assert second.body == long_text[:ATTEMPT_BODY_LIMIT]  # the start, decoded: a cut gzip stream would not decode


async def test_the_attempts_kept_are_bounded(ready: LivePool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(failover_module, "ATTEMPTS_KEPT", 1)
    upstream = ScriptedUpstream({key(n).encode(): Answer(429, RATE_LIMITED) for n in ("one", "two", "three")})
    failover = Failover(ready, upstream, max_attempts=5, max_wait=0)  # type: ignore[arg-type]
    j = job()
    reply = await failover.run(j)
    assert reply.response is not None and reply.response.status == 429 and len(upstream.sent) == 3
    assert [a.summary for a in j.attempts] == j.trail[:1]  # two were superseded; one is kept


SSE_HEAD = [(b"content-type", b"text/event-stream; charset=utf-8")]


@pytest.mark.parametrize(("answer", "streams"), [
    (Answer(200, b"data: one\n\n", headers=SSE_HEAD), True),
    (Answer(200, b"data: one\n\n", headers=[(b"Content-Type", b"Text/Event-Stream")]), True),
    (Answer(200, b'{"ok": true}'), False),  # JSON is read whole, whatever the request asked
    (Answer(200, b"", headers=SSE_HEAD, complete=True), False),  # nothing more to come (a HEAD, a 204)
    (Answer(400, b'data: {"error": {}}\n\n', headers=SSE_HEAD), False),  # a failure answer the loop read whole
], ids=["event-stream", "case-insensitive", "json", "complete", "failure-read-whole"])
async def test_the_answer_says_whether_it_streams(ready: LivePool, answer: Answer, streams: bool) -> None:
    upstream = ScriptedUpstream({key(n).encode(): answer for n in ("one", "two", "three")})
    failover = Failover(ready, upstream, max_attempts=1, max_wait=0)  # type: ignore[arg-type]
    asked_to_stream = dataclasses.replace(job(), body=b'{"stream": true}')
    reply = await failover.run(asked_to_stream)
    assert reply.response is not None and reply.streams is streams


async def test_a_local_answer_does_not_stream(ready: LivePool) -> None:
    failover = Failover(ready, ScriptedUpstream({}), max_attempts=1, max_wait=0)  # type: ignore[arg-type]
    assert not failover.exhausted(Surface.KIMI_CODE).streams
