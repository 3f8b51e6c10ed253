"""The loopback relay, spoken to as mitmproxy does (raw HTTP/1.1 on 127.0.0.1), with answers the failover loop
won from a scripted upstream handed over to it as the addon does."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_failover import RATE_LIMITED, Answer, ScriptedUpstream, key

from kimi_rotator.failover import Failover, Job, Reply
from kimi_rotator.models import Surface
from kimi_rotator.pool import LivePool
from kimi_rotator.relay import TOKEN_HEADER, Handover, Relay
from kimi_rotator.store import NewKey
from kimi_rotator.store_sqlite import SqliteStore

PATH = "/coding/v1/chat/completions"
SSE = b"data: one\n\ndata: two\n\n"
WAIT = 5.0


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    relay = Relay()
    await relay.start()
    yield relay
    await relay.stop()


@pytest.fixture
def failover(tmp_path: Path) -> tuple[Failover, ScriptedUpstream]:
    store = SqliteStore(tmp_path / "home")
    now = time.time()
    for name in ("one", "two"):
        store.add_key(NewKey(secret=key(name), name=name, surface=Surface.KIMI_CODE, account=name), now)
    upstream = ScriptedUpstream({
        key("one").encode(): Answer(429, RATE_LIMITED, complete=False),
        key("two").encode(): Answer(200, SSE, headers=[(b"content-type", b"text/event-stream")]),
    })
    return Failover(LivePool(store), upstream, max_attempts=5, max_wait=0), upstream  # type: ignore[arg-type]


def job() -> Job:
    return Job(Surface.KIMI_CODE, "api.kimi.com", "POST", PATH, ((b"authorization", b"Bearer placeholder"),),
               b'{"stream": true}')


class Body:
    """An open body as the relay sees one, recording whether it was closed."""

    def __init__(self, data: bytes = SSE) -> None:
        self.data = data
        self.closed = asyncio.Event()

    async def aiter_body(self) -> AsyncIterator[bytes]:
        yield self.data

    async def aclose(self) -> None:
        self.closed.set()


def stream(body: Body | Reply, headers: list[tuple[bytes, bytes]] | None = None) -> Handover:
    return Handover(200, b"OK", headers or [(b"content-type", b"text/event-stream")], body)


async def handed_over(failover: Failover) -> Handover:
    """Run the failover loop and hand its reply over, as the addon's `request` hook does."""
    reply = await failover.run(job())
    assert reply.response is not None and reply.streams
    return Handover(reply.response.status, reply.response.reason, reply.headers_to_pass_on(None), reply)


def head(token: str | None, extra: bytes = b"") -> bytes:
    lines = [f"POST {PATH} HTTP/1.1", "host: api.kimi.com"] + ([f"{TOKEN_HEADER}: {token}"] if token else [])
    return ("\r\n".join(lines) + "\r\n").encode() + extra + b"\r\n"


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    """Status, headers and body of one answer, decoding chunked framing."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    lines = raw[:-4].split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    if headers.get(b"transfer-encoding") == b"chunked":
        body = b""
        while size := int((await asyncio.wait_for(reader.readuntil(b"\r\n"), WAIT)).strip(), 16):
            body += (await asyncio.wait_for(reader.readexactly(size + 2), WAIT))[:-2]
        await asyncio.wait_for(reader.readuntil(b"\r\n"), WAIT)
    else:
        body = await asyncio.wait_for(reader.readexactly(int(headers.get(b"content-length", b"0"))), WAIT)
    return int(lines[0].split()[1]), headers, body


async def test_a_request_without_a_registered_token_is_refused(relay: Relay) -> None:
    waiting = Body()
    relay.register(stream(waiting))
    for token in (None, "made-up"):
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(head(token))
        status, _, body = await read_answer(reader)
        assert status == 403 and json.loads(body)["error"]["message"] == "not a kimi-rotate relay request"
        assert await asyncio.wait_for(reader.read(), WAIT) == b""  # and the connection is closed
        writer.close()
    assert not waiting.closed.is_set()  # the answer handed over still waits for its own token


async def test_the_answer_is_streamed_after_failover_and_the_token_is_single_use(
    relay: Relay, failover: tuple[Failover, ScriptedUpstream]
) -> None:
    loop, upstream = failover
    token = relay.register(await handed_over(loop))
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(head(token))
    status, headers, body = await read_answer(reader)
    assert (status, headers[b"content-type"], headers[b"transfer-encoding"], body) == (
        200, b"text/event-stream", b"chunked", SSE)
    assert upstream.sent == [key("one").encode(), key("two").encode()]
    writer.write(head(token))  # the same token again, on the same keep-alive connection
    assert (await read_answer(reader))[0] == 403
    writer.close()


async def test_a_body_mitmproxy_sends_is_read_past(relay: Relay) -> None:
    first, second = relay.register(stream(Body())), relay.register(stream(Body()))
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(head(first, b"transfer-encoding: chunked\r\n") + b"5\r\nhello\r\n0\r\n\r\n")
    assert (await read_answer(reader))[0] == 200
    writer.write(head(second, b"content-length: 5\r\n") + b"hello")
    assert (await read_answer(reader))[2] == SSE  # the framing held: the second request was read right
    writer.close()


async def test_a_sized_answer_keeps_its_length(relay: Relay) -> None:
    sized = stream(Body(), [(b"content-type", b"text/event-stream"), (b"content-length", str(len(SSE)).encode())])
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(head(relay.register(sized)))
    status, headers, body = await read_answer(reader)
    assert (status, body) == (200, SSE)
    assert headers[b"content-length"] == str(len(SSE)).encode() and b"transfer-encoding" not in headers
    writer.close()


async def test_an_answer_is_closed_once_piped(relay: Relay) -> None:
    body = Body()
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(head(relay.register(stream(body))))
    assert (await read_answer(reader))[2] == SSE
    await asyncio.wait_for(body.closed.wait(), WAIT)
    writer.close()


async def test_an_answer_never_collected_is_closed_after_the_handover_time() -> None:
    relay = Relay(handover_seconds=0.05)
    await relay.start()
    try:
        body = Body()
        token = relay.register(stream(body))
        await asyncio.wait_for(body.closed.wait(), WAIT)
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(head(token))  # too late: the token is gone with its answer
        assert (await read_answer(reader))[0] == 403
        writer.close()
    finally:
        await relay.stop()


async def test_forget_closes_an_answer_not_collected_and_stop_closes_the_rest(relay: Relay) -> None:
    forgotten, left = Body(), Body()
    relay.forget(relay.register(stream(forgotten)))
    await asyncio.wait_for(forgotten.closed.wait(), WAIT)
    relay.register(stream(left))
    assert not left.closed.is_set()
    await relay.stop()
    await asyncio.wait_for(left.closed.wait(), WAIT)
