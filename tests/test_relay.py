"""The loopback relay, spoken to as mitmproxy does (raw HTTP/1.1 on 127.0.0.1), with a scripted upstream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_failover import RATE_LIMITED, Answer, ScriptedUpstream, key

from kimi_rotator.failover import Failover, Job
from kimi_rotator.models import Surface
from kimi_rotator.pool import LivePool
from kimi_rotator.relay import TOKEN_HEADER, Relay
from kimi_rotator.store import NewKey, Store

PATH = "/coding/v1/chat/completions"
SSE = b"data: one\n\ndata: two\n\n"
WAIT = 5.0


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[tuple[Relay, ScriptedUpstream]]:
    store = Store(tmp_path / "home")
    now = time.time()
    for name in ("one", "two"):
        store.add_key(NewKey(secret=key(name), name=name, surface=Surface.KIMI_CODE, account=name), now)
    upstream = ScriptedUpstream({
        key("one").encode(): Answer(429, RATE_LIMITED, complete=False),
        key("two").encode(): Answer(200, SSE, headers=[(b"content-type", b"text/event-stream")]),
    })
    relay = Relay(Failover(LivePool(store), upstream, max_attempts=5, max_wait=0))  # type: ignore[arg-type]
    await relay.start()
    yield relay, upstream
    await relay.stop()


def job() -> Job:
    return Job(Surface.KIMI_CODE, "api.kimi.com", "POST", PATH, ((b"authorization", b"Bearer placeholder"),),
               b'{"stream": true}')


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


async def test_a_request_without_a_registered_token_is_refused(relay: tuple[Relay, ScriptedUpstream]) -> None:
    server, upstream = relay
    for token in (None, "made-up"):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(head(token))
        status, _, body = await read_answer(reader)
        assert status == 403 and json.loads(body)["error"]["message"] == "not a kimi-rotate relay request"
        assert await asyncio.wait_for(reader.read(), WAIT) == b""  # and the connection is closed
        writer.close()
    assert upstream.sent == []


async def test_the_answer_is_streamed_after_failover_and_the_token_is_single_use(
    relay: tuple[Relay, ScriptedUpstream]
) -> None:
    server, upstream = relay
    token = server.register(job())
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(head(token))
    status, headers, body = await read_answer(reader)
    assert (status, headers[b"content-type"], headers[b"transfer-encoding"], body) == (
        200, b"text/event-stream", b"chunked", SSE)
    assert upstream.sent == [key("one").encode(), key("two").encode()]
    writer.write(head(token))  # the same token again, on the same keep-alive connection
    assert (await read_answer(reader))[0] == 403
    writer.close()


async def test_a_body_mitmproxy_sends_is_read_past(relay: tuple[Relay, ScriptedUpstream]) -> None:
    server, _ = relay
    first, second = server.register(job()), server.register(job())
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(head(first, b"transfer-encoding: chunked\r\n") + b"5\r\nhello\r\n0\r\n\r\n")
    assert (await read_answer(reader))[0] == 200
    writer.write(head(second, b"content-length: 5\r\n") + b"hello")
    assert (await read_answer(reader))[2] == SSE  # the framing held: the second request was read right
    writer.close()


async def test_a_sized_failure_answer_keeps_its_length(relay: tuple[Relay, ScriptedUpstream]) -> None:
    server, upstream = relay
    refused = Answer(429, RATE_LIMITED, headers=[(b"content-type", b"application/json"),
                                                 (b"content-length", str(len(RATE_LIMITED)).encode())])
    upstream.answers = {key("one").encode(): refused, key("two").encode(): refused}
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(head(server.register(job())))
    status, headers, body = await read_answer(reader)
    assert (status, body) == (429, RATE_LIMITED)
    assert headers[b"content-length"] == str(len(RATE_LIMITED)).encode() and b"transfer-encoding" not in headers
    writer.close()
