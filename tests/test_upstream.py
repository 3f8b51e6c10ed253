"""kimi_rotator.upstream: the addon's own HTTP/1.1-over-TLS client, against scripted servers on loopback.

Each test starts a `ScriptedServer` (asyncio, TLS with the test PKI's certificate, 127.0.0.1, port 0) and gives it a
handler coroutine that runs once per accepted connection and says exactly which bytes go back, so framing, reuse and
faults are tested byte for byte. The server records every request it reads and counts accepted connections. Upstream
proxy tests put a tiny CONNECT proxy (the same class, plain TCP) in front of it. Nothing leaves the machine.

Every wait is bounded: server steps by WAIT, clients by their own `timeout` (WAIT unless a test needs a short one).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import itertools
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from certs import TestPKI, make_test_pki
from hypothesis import given, settings
from hypothesis import strategies as st
from test_http1 import KEPT_HEADERS, MIXED_HEADERS, NOT_HTTP11_HEADS

from kimi_rotator import upstream
from kimi_rotator.upstream import (
    BrokenResponse,
    ConnectFailed,
    Response,
    UpstreamClient,
    UpstreamError,
    UpstreamSettings,
    UpstreamTimeout,
)

HOST = "api.kimi.com"
OTHER_HOST = "kimi.invalid"  # also resolved to the test server, but not a name its certificate covers
PATH = "/v1/chat/completions"
SECRET = "sk-kimi-TEST-SECRET-0123456789abcdef"
BODY_MARK = "BODY-SECRET-42"
BODY = b'{"model":"kimi-k2","messages":[{"role":"user","content":"' + BODY_MARK.encode() + b'"}]}'
HEADERS = [(b"authorization", b"Bearer " + SECRET.encode()), (b"content-type", b"application/json")]
WAIT = 5.0  # the longest a server step, or a client call in a test that is not about timeouts, may take
SHORT = 0.5  # the client timeout in the timeout tests

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


# -- a scripted server -----------------------------------------------------------------------------------------------


@dataclass
class Received:
    """One request as the server read it off the wire."""

    connection: int  # index of the accepted connection it came on
    line: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw: bytes  # head and body exactly as received

    def values(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name]


class Peer:
    """One accepted connection, as a test's handler drives it."""

    def __init__(self, server: ScriptedServer, index: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.index = index
        self.reader = reader
        self.writer = writer
        self.closed_by_client = asyncio.Event()  # the client closed or reset its side

    async def request(self) -> Received | None:
        """The next request (head, and a body of content-length bytes), or None once the client closed."""
        try:
            async with asyncio.timeout(WAIT):
                head = await self.reader.readuntil(b"\r\n\r\n")
                lines = head[:-4].split(b"\r\n")
                headers = [(k, v.strip()) for k, _, v in (line.partition(b":") for line in lines[1:])]
                length = int(next((v for k, v in headers if k.lower() == b"content-length"), b"0"))
                body = await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            self.closed_by_client.set()
            return None
        received = Received(self.index, lines[0], headers, body, head + body)
        self.server.requests.append(received)
        return received

    async def send(self, *parts: bytes) -> None:
        for part in parts:
            self.writer.write(part)
        async with asyncio.timeout(WAIT):
            await self.writer.drain()

    async def answer(self, response: bytes) -> Received | None:
        """Read one request and send `response`; None (nothing sent) if the client closed instead."""
        received = await self.request()
        if received is not None:
            await self.send(response)
        return received

    async def until_closed(self) -> None:
        """Stay silent, discarding anything the client sends, until it closes (after WAIT s, TimeoutError)."""
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            async with asyncio.timeout(WAIT):
                while await self.reader.read(65536):
                    pass
        self.closed_by_client.set()

    def reset(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0), not an orderly close."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[[Peer], Awaitable[None]]


class ScriptedServer:
    """A loopback server running `handler` once per accepted connection, closing the connection when it returns."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None) -> None:
        self.handler = handler
        self.tls = tls
        self.port = 0
        self.peers: list[Peer] = []
        self.requests: list[Received] = []
        self.sni: list[str | None] = []  # the server name each TLS client asked for
        self.errors: list[BaseException] = []  # what went wrong inside a handler (a test bug, or a hang)
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    @property
    def connections(self) -> int:
        return len(self.peers)

    def per_connection(self) -> list[int]:
        """How many requests arrived on each accepted connection, in order of acceptance."""
        return [sum(1 for r in self.requests if r.connection == peer.index) for peer in self.peers]

    async def start(self) -> ScriptedServer:
        if self.tls is not None:
            self.tls.sni_callback = self._note_sni
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def _note_sni(self, _conn: object, name: str | None, _context: ssl.SSLContext) -> None:
        self.sni.append(name)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(self, len(self.peers), reader, writer)
        self.peers.append(peer)
        try:
            await self.handler(peer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the client went away mid-script: several tests make it do exactly that
        except Exception as e:
            self.errors.append(e)
        finally:
            writer.close()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for peer in self.peers:
            peer.writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=WAIT)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WAIT):
                await self._server.wait_closed()


def replying(*answers: bytes) -> Handler:
    """Answer every request, on any connection, until the client closes: the n-th request the server reads gets
    answers[n], and the last answer repeats."""

    async def handler(peer: Peer) -> None:
        while await peer.request() is not None:
            await peer.send(answers[min(len(peer.server.requests), len(answers)) - 1])

    return handler


def server_context(pki: TestPKI) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    return context


def trusting(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Serve = Callable[..., Awaitable[ScriptedServer]]
MakeClient = Callable[..., UpstreamClient]


@pytest.fixture
async def serve(pki: TestPKI) -> AsyncIterator[Serve]:
    """`await serve(handler)` → a started TLS ScriptedServer (`tls=False`: plain TCP), closed after the test."""
    servers: list[ScriptedServer] = []

    async def start(handler: Handler, *, tls: bool = True) -> ScriptedServer:
        server = await ScriptedServer(handler, server_context(pki) if tls else None).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()
    for server in servers:
        assert not server.errors, f"a scripted server failed: {server.errors!r}"


@pytest.fixture
async def make_client(pki: TestPKI, serve: Serve) -> AsyncIterator[MakeClient]:
    """`make_client(port)` → an UpstreamClient that trusts the test CA and sends api.kimi.com (and kimi.invalid) to
    127.0.0.1:port; closed after the test (before the servers, which this fixture depends on)."""
    clients: list[UpstreamClient] = []

    def make(port: int | None, *, timeout: float = WAIT, verify: ssl.SSLContext | bool | None = None,
             proxy: str | None = None, proxy_auth: str | None = None) -> UpstreamClient:
        resolve = {HOST: ("127.0.0.1", port), OTHER_HOST: ("127.0.0.1", port)} if port else {}
        options = UpstreamSettings(verify=trusting(pki.ca_cert) if verify is None else verify, proxy=proxy,
                                   proxy_auth=proxy_auth, resolve=resolve, timeout=timeout)
        client = UpstreamClient(options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """A second, unrelated test CA: it did not sign the server's certificate."""
    return make_test_pki(tmp_path_factory.mktemp("other-pki"))


async def send(client: UpstreamClient, method: str = "POST", body: bytes = BODY, host: str = HOST) -> Response:
    return await client.send(method, host, PATH, HEADERS, body)


async def fetch(client: UpstreamClient, method: str = "POST", body: bytes = BODY) -> tuple[Response, bytes]:
    """Send, read the whole body, close the response."""
    response = await send(client, method, body)
    try:
        return response, await response.read()
    finally:
        await response.aclose()


async def settle(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), WAIT)


async def until(condition: Callable[[], bool]) -> None:
    """Wait (at most WAIT s) for `condition` to hold."""
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.01)


def assert_no_request_data(error: BaseException) -> None:
    """Error messages end up in logs and in answers to clients: never the key, never the prompt."""
    text = f"{error} {error!r}"
    assert SECRET not in text
    assert BODY_MARK not in text
    assert isinstance(error, UpstreamError)


# -- 1. the request on the wire --------------------------------------------------------------------------------------


async def test_request_serialization(serve: Serve, make_client: MakeClient) -> None:
    server = await serve(replying(OK))
    client = make_client(server.port)
    # Framing must come from content-length alone: the body contains a blank line, an HTTP head and a NUL.
    body = b'{"content": "caf\xc3\xa9"}\r\n\r\nHTTP/1.1 200 OK\r\n\r\n\x00' + BODY_MARK.encode()
    kept, mixed = KEPT_HEADERS, MIXED_HEADERS
    response = await client.send("POST", HOST, PATH, mixed, body)
    assert await response.read() == b"ok"
    await response.aclose()
    await client.aclose()
    await settle(server.peers[0].closed_by_client)

    [request] = server.requests  # one request: no stray bytes after the body were read as a second one
    assert request.line == b"POST /v1/chat/completions HTTP/1.1"
    assert request.values(b"host") == [b"api.kimi.com"]
    assert request.values(b"content-length") == [str(len(body)).encode()]
    assert request.body == body
    assert [(k, v) for k, v in request.headers if k.lower() not in (b"host", b"content-length")] == kept
    assert b"\r\nX-Latin1: caf\xe9\r\n" in request.raw  # raw bytes, not re-encoded
    assert b"\r\nX-Utf8: Zo\xc3\xab \xe2\x98\x83\r\n" in request.raw


@pytest.mark.parametrize(("method", "length"), [("GET", None), ("DELETE", None), ("POST", b"0"), ("PUT", b"0")])
async def test_empty_body_content_length(serve: Serve, make_client: MakeClient, method: str,
                                         length: bytes | None) -> None:
    server = await serve(replying(OK))
    _, body = await fetch(make_client(server.port), method, b"")
    assert body == b"ok"
    [request] = server.requests
    assert request.line == method.encode() + b" /v1/chat/completions HTTP/1.1"
    assert request.values(b"content-length") == ([] if length is None else [length])
    assert request.body == b""


async def test_a_path_with_bytes_that_are_not_utf8_goes_out_as_sent(serve: Serve, make_client: MakeClient) -> None:
    # mitmproxy decodes a request path as UTF-8 with surrogateescape; the client must send the original bytes.
    server = await serve(replying(OK))
    client = make_client(server.port)
    response = await client.send("GET", HOST, b"/v1/caf\xe9?q=\xff".decode("utf-8", "surrogateescape"), [], b"")
    assert await response.read() == b"ok"
    [request] = server.requests
    assert request.line == b"GET /v1/caf\xe9?q=\xff HTTP/1.1"


# -- 2. response framing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 11, 300_000])
async def test_content_length_body(serve: Serve, make_client: MakeClient, size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    head = b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n" % size
    server = await serve(replying(head + payload, OK))
    client = make_client(server.port)
    response, body = await fetch(client)
    assert (response.status, response.reason, body) == (201, b"Created", payload)
    assert (await fetch(client))[1] == b"ok"  # the next answer starts exactly where the body ended
    assert server.per_connection() == [2]


async def test_chunked_body_with_extensions_and_trailers(serve: Serve, make_client: MakeClient) -> None:
    chunked = (
        b"4;name=value\r\nWiki\r\n"
        b"5 ; quoted=\"a;b\"\r\npedia\r\n"
        b"E\r\n in\r\n\r\nchunks.\r\n"
        b"0\r\nExpires: never\r\nX-Trailer: 1\r\n\r\n"
    )
    server = await serve(replying(CHUNKED_HEAD + chunked, OK))
    client = make_client(server.port)
    response = await send(client)
    assert [chunk async for chunk in response.aiter_raw()] == [b"Wiki", b"pedia", b" in\r\n\r\nchunks."]
    await response.aclose()
    assert (await fetch(client))[1] == b"ok"  # trailers consumed exactly: the connection is reused cleanly
    assert server.per_connection() == [2]


async def test_chunked_wins_over_content_length(serve: Serve, make_client: MakeClient) -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"
    server = await serve(replying(head + b"5\r\nhello\r\n0\r\n\r\n", OK))
    client = make_client(server.port)
    assert (await fetch(client))[1] == b"hello"
    assert (await fetch(client))[1] == b"ok"
    assert server.per_connection() == [2]


async def test_transfer_encoding_other_than_chunked_runs_to_the_close(serve: Serve, make_client: MakeClient) -> None:
    # A Transfer-Encoding that does not end in chunked overrides Content-Length: the body ends when the server closes.
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ncontent-length: 2\r\n\r\nall of this")

    server = await serve(handler)
    client = make_client(server.port)
    assert (await asyncio.wait_for(fetch(client), 2))[1] == b"all of this"


async def test_a_large_chunk_streams_in_pieces(serve: Serve, make_client: MakeClient) -> None:
    half = b"x" * 200_000
    rest_sent = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNKED_HEAD + b"%x\r\n" % (2 * len(half)) + half)
        await asyncio.sleep(0.3)
        rest_sent.set()
        await peer.send(half + b"\r\n0\r\n\r\n")
        await peer.until_closed()

    server = await serve(handler)
    response = await send(make_client(server.port))
    arrivals = [(len(chunk), rest_sent.is_set()) async for chunk in response.aiter_raw()]
    await response.aclose()
    assert sum(n for n, _ in arrivals) == 2 * len(half)
    assert sum(n for n, late in arrivals if not late) == len(half)  # the first half came before the rest was sent


async def test_close_delimited_body(serve: Serve, make_client: MakeClient) -> None:
    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.request()
            await peer.send(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil ")
            await asyncio.sleep(0.05)
            await peer.send(b"the end")
            return  # closing ends the body
        await replying(OK)(peer)

    server = await serve(handler)
    client = make_client(server.port)
    assert (await fetch(client))[1] == b"until the end"
    assert (await fetch(client))[1] == b"ok"
    assert server.per_connection() == [1, 1]


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("POST", 204), ("GET", 304)])
async def test_answers_without_body(serve: Serve, make_client: MakeClient, method: str, status: int) -> None:
    # The content-length describes what a GET would get; no body bytes follow. The next answer comes right after.
    head = b"HTTP/1.1 %d Whatever\r\ncontent-length: 5\r\ncontent-type: text/plain\r\n\r\n" % status
    server = await serve(replying(head, OK))
    client = make_client(server.port)
    response, body = await asyncio.wait_for(fetch(client, method, b""), 2)
    assert (response.status, body) == (status, b"")
    assert (await fetch(client))[1] == b"ok"
    assert server.per_connection() == [2]


async def test_reading_an_answer_without_body_gives_the_connection_back(serve: Serve, make_client: MakeClient) -> None:
    server = await serve(replying(b"HTTP/1.1 204 No Content\r\n\r\n", OK))
    client = make_client(server.port)
    response = await send(client)
    assert await response.read() == b""  # no aclose: reading it whole is enough
    assert (await fetch(client))[1] == b"ok"
    assert server.per_connection() == [2]


@pytest.mark.parametrize("interim", [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n",
], ids=["100", "103", "100+102"])
async def test_interim_answers_are_skipped(serve: Serve, make_client: MakeClient, interim: bytes) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(interim)
        await asyncio.sleep(0.02)
        await peer.send(b"HTTP/1.1 200 OK\r\nx-final: yes\r\ncontent-length: 5\r\n\r\nfinal")
        await peer.until_closed()

    server = await serve(handler)
    response, body = await fetch(make_client(server.port))
    assert (response.status, body) == (200, b"final")
    assert response.headers == [(b"x-final", b"yes"), (b"content-length", b"5")]


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
async def test_aiter_raw_is_incremental(serve: Serve, make_client: MakeClient, framing: str) -> None:
    first, second = b"data: first\n\n", b"data: second\n\n"
    head, wire_first, wire_second, tail = {
        "length": (b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (len(first) + len(second)), first, second, b""),
        "chunked": (CHUNKED_HEAD, b"d\r\n" + first + b"\r\n", b"e\r\n" + second + b"\r\n", b"0\r\n\r\n"),
        "close": (b"HTTP/1.1 200 OK\r\n\r\n", first, second, b""),
    }[framing]
    second_sent = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head + wire_first)
        await asyncio.sleep(0.3)
        second_sent.set()
        await peer.send(wire_second + tail)
        if framing != "close":
            await peer.until_closed()

    server = await serve(handler)
    response = await send(make_client(server.port))
    arrivals = [(chunk, second_sent.is_set()) async for chunk in response.aiter_raw()]
    await response.aclose()
    assert b"".join(chunk for chunk, late in arrivals if not late) == first  # before the server sent the rest
    assert b"".join(chunk for chunk, _ in arrivals) == first + second


async def test_content_encoding_is_passed_through(serve: Serve, make_client: MakeClient) -> None:
    compressed = gzip.compress(b'{"error": {"message": "rate limited"}}' * 20)
    head = b"HTTP/1.1 429 Too Many Requests\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n" % len(compressed)
    server = await serve(replying(head + compressed))
    response, body = await fetch(make_client(server.port))
    assert body == compressed
    assert response.header("Content-Encoding") == "gzip"


async def test_response_headers(serve: Serve, make_client: MakeClient) -> None:
    head = (
        b"HTTP/1.1 429 Too Many Requests\r\n"
        b"Set-Cookie: a=1\r\n"
        b"X-Note:  caf\xe9 \t\r\n"
        b"Retry-After:7\r\n"
        b"set-cookie: b=2\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    server = await serve(replying(head))
    response, _ = await fetch(make_client(server.port))
    assert (response.status, response.reason) == (429, b"Too Many Requests")
    assert response.headers == [
        (b"Set-Cookie", b"a=1"), (b"X-Note", b"caf\xe9"), (b"Retry-After", b"7"), (b"set-cookie", b"b=2"),
        (b"Content-Length", b"0"),
    ]
    assert response.header("SET-COOKIE") == "a=1"  # the first of the repeats
    assert response.header("x-note") == "café"  # latin-1
    assert response.header("retry-after") == "7"
    assert response.header("x-missing") is None


async def test_status_line_without_reason(serve: Serve, make_client: MakeClient) -> None:
    server = await serve(replying(b"HTTP/1.1 200\r\ncontent-length: 2\r\n\r\nok"))
    response, body = await fetch(make_client(server.port))
    assert (response.status, response.reason, body) == (200, b"", b"ok")


@pytest.mark.parametrize("value", [[b"5, 5"], [b"5", b"5"]], ids=["list", "repeated"])
async def test_identical_content_lengths_are_accepted(serve: Serve, make_client: MakeClient,
                                                      value: list[bytes]) -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"content-length: " + v + b"\r\n" for v in value) + b"\r\n"
    server = await serve(replying(head + b"hello"))
    assert (await fetch(make_client(server.port)))[1] == b"hello"


@settings(max_examples=150, deadline=None)
@given(
    body=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 600), max_size=6),
    upper=st.booleans(),
    extension=st.sampled_from([b"", b";a=1", b" ; x", b";q=\"v\""]),
    trailers=st.lists(st.sampled_from([b"X-T: 1\r\n", b"Expires: 0\r\n"]), max_size=2),
)
def test_chunked_decoding_property(body: bytes, cuts: list[int], upper: bool, extension: bytes,
                                   trailers: list[bytes]) -> None:
    """Any split of any body into chunks decodes back to those chunks, and stops exactly after the trailers."""
    edges = sorted({0, len(body), *(c for c in cuts if c <= len(body))})
    pieces = [body[a:b] for a, b in itertools.pairwise(edges)]
    size = "{:X}" if upper else "{:x}"
    wire = b"".join(size.format(len(p)).encode() + extension + b"\r\n" + p + b"\r\n" for p in pieces)
    wire += b"0" + extension + b"\r\n" + b"".join(trailers) + b"\r\nHTTP/1.1 next"

    async def decode() -> tuple[list[bytes], bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(wire)
        reader.feed_eof()
        chunks = [chunk async for chunk in upstream.read_chunks(reader, 1.0)]
        return chunks, await reader.read()

    assert asyncio.run(decode()) == (pieces, b"HTTP/1.1 next")


# -- 3. keep-alive ---------------------------------------------------------------------------------------------------


async def test_sequential_requests_share_one_connection(serve: Serve, make_client: MakeClient) -> None:
    server = await serve(replying(OK))
    client = make_client(server.port)
    for _ in range(3):
        assert (await fetch(client))[1] == b"ok"
    assert server.per_connection() == [3]
    assert server.sni == [HOST]  # one TLS handshake


async def test_concurrent_requests_get_their_own_connections(serve: Serve, make_client: MakeClient) -> None:
    server = await serve(replying(OK))
    client = make_client(server.port)
    results = await asyncio.gather(fetch(client), fetch(client))
    assert [body for _, body in results] == [b"ok", b"ok"]
    for _ in range(4):  # both are kept alive and reused; no third connection
        assert (await fetch(client))[1] == b"ok"
    assert server.connections == 2
    assert sum(server.per_connection()) == 6


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nconnection: Keep-Alive, Close\r\ncontent-length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
], ids=["close", "close-in-list", "http/1.0"])
async def test_connection_not_reused_when_the_server_says_so(serve: Serve, make_client: MakeClient,
                                                           answer: bytes) -> None:
    server = await serve(replying(answer))  # the server itself keeps every connection open
    client = make_client(server.port)
    assert (await fetch(client))[1] == b"ok"
    await settle(server.peers[0].closed_by_client)  # the client closed it instead of keeping it
    assert (await fetch(client))[1] == b"ok"
    assert server.per_connection() == [1, 1]


async def test_unread_body_means_no_reuse(serve: Serve, make_client: MakeClient) -> None:
    server = await serve(replying(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n0123456789", OK))
    client = make_client(server.port)
    response = await send(client)
    await response.aclose()  # body never read
    await settle(server.peers[0].closed_by_client)
    assert (await fetch(client))[1] == b"ok"  # not "0123456789" left over from the first answer
    assert server.per_connection() == [1, 1]


async def test_read_limit_stops_early_and_drops_the_connection(serve: Serve, make_client: MakeClient) -> None:
    async def handler(peer: Peer) -> None:
        if peer.index == 0:  # 10 of 20 announced bytes, then nothing more
            await peer.request()
            await peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\n0123456789")
            await peer.until_closed()
        else:
            await replying(OK)(peer)

    server = await serve(handler)
    client = make_client(server.port)
    response = await send(client)
    data = await asyncio.wait_for(response.read(limit=5), 2)  # returns without waiting for the other 10 bytes
    assert len(data) > 5
    assert b"0123456789".startswith(data)
    await response.aclose()
    await settle(server.peers[0].closed_by_client)
    assert (await fetch(client))[1] == b"ok"
    assert server.per_connection() == [1, 1]


async def test_read_limit_not_reached_keeps_the_connection(serve: Serve, make_client: MakeClient) -> None:
    server = await serve(replying(OK))
    client = make_client(server.port)
    response = await send(client)
    assert await response.read(limit=100) == b"ok"
    await response.aclose()
    assert (await fetch(client))[1] == b"ok"
    assert server.per_connection() == [2]


async def test_idle_connection_expires(serve: Serve, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream, "IDLE_SECONDS", 0.0)
    server = await serve(replying(OK))
    client = make_client(server.port)
    assert (await fetch(client))[1] == b"ok"
    assert (await fetch(client))[1] == b"ok"
    await settle(server.peers[0].closed_by_client)
    assert server.per_connection() == [1, 1]


async def test_unsolicited_bytes_on_an_idle_connection_are_not_taken_for_the_next_answer(
        serve: Serve, make_client: MakeClient) -> None:
    # Some servers send "408 Request Timeout" on an idle keep-alive connection just before closing it (or a broken
    # one sends more than its content-length). Those bytes wait in the idle connection's buffer.
    stray = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n"
    server = await serve(replying(OK + stray, OK))
    client = make_client(server.port)
    assert (await fetch(client))[1] == b"ok"
    await asyncio.sleep(0.05)
    response, body = await fetch(client)
    assert (response.status, body) == (200, b"ok")


# -- 4. an idle connection the server closed -------------------------------------------------------------------------


@pytest.mark.parametrize("noticed", [True, False], ids=["eof-seen-while-idle", "eof-seen-on-send"])
async def test_stale_idle_connection_is_replaced(serve: Serve, make_client: MakeClient,
                                                   monkeypatch: pytest.MonkeyPatch, noticed: bool) -> None:
    first_closed = asyncio.Event()

    async def handler(peer: Peer) -> None:
        if peer.index == 0:  # one answer, then the server drops the idle connection
            await peer.answer(OK)
            peer.writer.close()
            first_closed.set()
        else:
            await replying(OK)(peer)

    if not noticed:  # the race: the close arrives only once the client has picked the connection and sent on it
        monkeypatch.setattr(upstream._Connection, "usable", lambda self, now: True)
    server = await serve(handler)
    client = make_client(server.port)
    assert (await fetch(client))[1] == b"ok"
    await settle(first_closed)
    await asyncio.sleep(0.05)
    response, body = await fetch(client)
    assert (response.status, body) == (200, b"ok")
    assert server.per_connection() == [1, 1]


@pytest.mark.parametrize("cut", ["close", "reset"])
async def test_fresh_connection_closed_without_answer_is_not_retried(serve: Serve, make_client: MakeClient,
                                                                     cut: str) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        if cut == "reset":
            peer.reset()

    server = await serve(handler)
    with pytest.raises(BrokenResponse) as caught:
        await send(make_client(server.port))
    assert_no_request_data(caught.value)
    assert server.per_connection() == [1]


async def test_idle_connection_cut_mid_head_is_not_retried(serve: Serve, make_client: MakeClient) -> None:
    async def handler(peer: Peer) -> None:
        await peer.answer(OK)
        await peer.answer(b"HTTP/1.1 200 OK\r\ncontent-le")  # then closed: part of an answer did arrive

    server = await serve(handler)
    client = make_client(server.port)
    assert (await fetch(client))[1] == b"ok"
    with pytest.raises(BrokenResponse) as caught:
        await send(client)
    assert_no_request_data(caught.value)
    assert server.per_connection() == [2]


# -- 5. faults -------------------------------------------------------------------------------------------------------


async def test_connection_refused(make_client: MakeClient) -> None:
    with pytest.raises(ConnectFailed) as caught:
        await send(make_client(unused_port()))
    assert HOST in str(caught.value)
    assert_no_request_data(caught.value)


@pytest.mark.parametrize("case", ["default-trust-store", "other-ca", "wrong-host-name"])
async def test_untrusted_certificate(serve: Serve, make_client: MakeClient, other_pki: TestPKI, case: str) -> None:
    server = await serve(replying(OK))
    verify = {"default-trust-store": True, "other-ca": trusting(other_pki.ca_cert), "wrong-host-name": None}[case]
    client = make_client(server.port, verify=verify)
    with pytest.raises(ConnectFailed) as caught:
        await send(client, host=OTHER_HOST if case == "wrong-host-name" else HOST)
    assert "certificate" in str(caught.value)
    assert_no_request_data(caught.value)
    assert server.requests == []


@pytest.mark.parametrize("host", [HOST, OTHER_HOST])
async def test_verify_false_accepts_any_certificate(serve: Serve, make_client: MakeClient, host: str) -> None:
    server = await serve(replying(OK))
    response = await send(make_client(server.port, verify=False), host=host)
    assert await response.read() == b"ok"
    await response.aclose()
    assert server.requests[0].values(b"host") == [host.encode()]


async def test_sni_is_the_host_name(serve: Serve, make_client: MakeClient) -> None:
    server = await serve(replying(OK))
    await fetch(make_client(server.port))  # connects to 127.0.0.1
    assert server.sni == [HOST]


async def test_silent_server_times_out(serve: Serve, make_client: MakeClient) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.until_closed()

    server = await serve(handler)
    client = make_client(server.port, timeout=SHORT)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await send(client)
    assert SHORT - 0.05 <= time.monotonic() - started < SHORT + 0.5
    assert_no_request_data(caught.value)
    assert len(server.requests) == 1
    await settle(server.peers[0].closed_by_client)


async def test_tls_handshake_that_never_completes_times_out(serve: Serve, make_client: MakeClient) -> None:
    async def handler(peer: Peer) -> None:
        await peer.until_closed()  # a plain TCP server that never answers the ClientHello

    server = await serve(handler, tls=False)
    client = make_client(server.port, timeout=SHORT)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await send(client)
    assert SHORT - 0.05 <= time.monotonic() - started < SHORT + 0.5
    assert HOST in str(caught.value)
    assert_no_request_data(caught.value)


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_silence_mid_body_times_out(serve: Serve, make_client: MakeClient, framing: str) -> None:
    head = {"length": b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n", "chunked": CHUNKED_HEAD}[framing]
    start = {"length": b"first", "chunked": b"5\r\nfirst\r\n"}[framing]

    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(head + start)
        await peer.until_closed()

    server = await serve(handler)
    response = await send(make_client(server.port, timeout=SHORT))
    chunks = response.aiter_raw()
    assert await anext(chunks) == b"first"
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await anext(chunks)
    assert SHORT - 0.05 <= time.monotonic() - started < SHORT + 0.5
    assert_no_request_data(caught.value)
    await settle(server.peers[0].closed_by_client)  # the broken connection is closed, not kept


CUT_BODIES = {
    "length": b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nfirst",
    "mid-chunk": CHUNKED_HEAD + b"5\r\nfirst\r\na\r\nsec",
    "between-chunks": CHUNKED_HEAD + b"5\r\nfirst\r\n",
    "in-trailers": CHUNKED_HEAD + b"5\r\nfirst\r\n0\r\nX-Trailer: 1\r\n",
}


@pytest.mark.parametrize("via", ["aiter_raw", "read"])
@pytest.mark.parametrize("cut", ["close", "reset"])
@pytest.mark.parametrize("shape", list(CUT_BODIES))
async def test_cut_mid_body_is_broken(serve: Serve, make_client: MakeClient, shape: str, cut: str, via: str) -> None:
    cut_now = asyncio.Event()

    async def handler(peer: Peer) -> None:
        if peer.index > 0:
            await replying(OK)(peer)
            return
        await peer.request()
        await peer.send(CUT_BODIES[shape])
        await settle(cut_now)
        if cut == "reset":
            peer.reset()

    server = await serve(handler)
    client = make_client(server.port)
    response = await send(client)
    if via == "aiter_raw":
        chunks = response.aiter_raw()
        assert await anext(chunks) == b"first"
        cut_now.set()
        with pytest.raises(BrokenResponse) as caught:
            async for _ in chunks:
                pass
    else:
        cut_now.set()
        with pytest.raises(BrokenResponse) as caught:
            await response.read()
    assert_no_request_data(caught.value)
    await response.aclose()
    assert (await fetch(client))[1] == b"ok"  # the client carries on, on a new connection
    assert server.per_connection() == [1, 1]


GARBAGE_ANSWERS = {
    **NOT_HTTP11_HEADS,
    "101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    "unterminated": b"an answer that never ends its head",
    "echo": b"echo",  # the request itself sent back: the error must not quote it
}


@pytest.mark.parametrize("answer", GARBAGE_ANSWERS.values(), ids=GARBAGE_ANSWERS.keys())
async def test_garbage_answer_is_broken(serve: Serve, make_client: MakeClient, answer: bytes) -> None:
    async def handler(peer: Peer) -> None:
        request = await peer.request()
        assert request is not None
        await peer.send(request.raw if answer == b"echo" else answer)  # then closed

    server = await serve(handler)
    with pytest.raises(BrokenResponse) as caught:
        await send(make_client(server.port))
    assert_no_request_data(caught.value)


@pytest.mark.parametrize(("size", "ok"), [(60_000, True), (70_000, False)])
async def test_head_size_limit(serve: Serve, make_client: MakeClient, size: int, ok: bool) -> None:
    answer = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * size + b"\r\ncontent-length: 2\r\n\r\nok"

    async def handler(peer: Peer) -> None:
        await peer.answer(answer)
        await peer.until_closed()

    server = await serve(handler)
    client = make_client(server.port)
    if ok:
        response, body = await fetch(client)
        assert (body, len(response.header("x-big") or "")) == (b"ok", size)
    else:
        with pytest.raises(BrokenResponse, match="64 KiB") as caught:
            await send(client)
        assert_no_request_data(caught.value)


@pytest.mark.parametrize("lengths", [
    [b"abc"], [b"-1"], [b"1.5"], [b""], [b"+5"], [b"0x5"], [b"5, 6"], [b"5", b"6"], [b"5,"],
], ids=["letters", "negative", "decimal-point", "empty", "plus-sign", "hex", "conflicting-list", "conflicting-repeat",
        "trailing-comma"])
async def test_invalid_content_length_is_broken(serve: Serve, make_client: MakeClient, lengths: list[bytes]) -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"content-length: " + v + b"\r\n" for v in lengths) + b"\r\n"
    server = await serve(replying(head + b"hello"))
    with pytest.raises(BrokenResponse, match="Content-Length") as caught:
        await send(make_client(server.port))
    assert_no_request_data(caught.value)


@pytest.mark.parametrize("chunked", [
    b"zz\r\nhello\r\n0\r\n\r\n",
    b"-5\r\nhello\r\n0\r\n\r\n",
    b"\r\nhello\r\n0\r\n\r\n",
    b";ext\r\nhello\r\n0\r\n\r\n",
    b"5\r\nhelloXX0\r\n\r\n",
    b"3\r\nhello\r\n0\r\n\r\n",
    b"f" * 70_000,
    b"5\r\nhello\r\n0\r\nX-Trailer: " + b"t" * 70_000,
    b"0x5\r\nhello\r\n0\r\n\r\n",
    b"+5\r\nhello\r\n0\r\n\r\n",
    b"1_0\r\n0123456789abcdef\r\n0\r\n\r\n",
    b"fffffffffffffffff\r\nhello\r\n0\r\n\r\n",
], ids=["not-hex", "negative", "empty", "only-extension", "no-crlf-after-data", "data-longer-than-size",
        "huge-size-line", "huge-trailer", "0x-prefix", "plus-sign", "underscore", "absurd-size"])
async def test_malformed_chunked_body_is_broken(serve: Serve, make_client: MakeClient, chunked: bytes) -> None:
    async def handler(peer: Peer) -> None:
        await peer.answer(CHUNKED_HEAD + chunked)
        await peer.until_closed()

    server = await serve(handler)
    response = await send(make_client(server.port))
    with pytest.raises(BrokenResponse) as caught:
        await response.read()
    assert_no_request_data(caught.value)
    await settle(server.peers[0].closed_by_client)


async def test_other_os_errors_are_upstream_errors(serve: Serve, make_client: MakeClient) -> None:
    """An OSError that is not a reset (no route to host, ...) cannot be provoked on loopback: it is put into the
    connection's reader, as asyncio does when a socket operation fails."""

    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.answer(OK)
            await peer.answer(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nfirst")
        await replying(OK)(peer)

    server = await serve(handler)
    client = make_client(server.port)
    assert (await fetch(client))[1] == b"ok"
    response = await send(client)
    chunks = response.aiter_raw()
    assert await anext(chunks) == b"first"
    assert response._connection is not None
    response._connection.reader.set_exception(OSError(errno.EHOSTUNREACH, "No route to host"))
    with pytest.raises(BrokenResponse):
        await anext(chunks)
    await response.aclose()

    assert (await fetch(client))[1] == b"ok"  # on a new connection, now kept idle
    [idle] = client._idle[HOST]
    idle.reader.set_exception(OSError(errno.EHOSTUNREACH, "No route to host"))
    assert (await fetch(client))[1] == b"ok"  # the failed idle connection is replaced
    assert server.connections == 3
    assert server.per_connection()[2] == 1


# -- 6. through an upstream proxy ------------------------------------------------------------------------------------


def connect_proxy(origin_port: int, refuse: bytes | None = None) -> Handler:
    """A CONNECT proxy that tunnels api.kimi.com:443 to the origin server on loopback, or answers `refuse`."""

    async def handler(peer: Peer) -> None:
        request = await peer.request()
        if request is None:
            return
        if refuse is not None:
            await peer.send(refuse)
            return
        if request.line != b"CONNECT api.kimi.com:443 HTTP/1.1":
            await peer.send(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            return
        async with asyncio.timeout(WAIT):
            origin_reader, origin_writer = await asyncio.open_connection("127.0.0.1", origin_port)
        await peer.send(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()

        pipes = [asyncio.ensure_future(pipe(peer.reader, origin_writer)),
                 asyncio.ensure_future(pipe(origin_reader, peer.writer))]
        try:
            await asyncio.wait(pipes, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pipes:
                task.cancel()
            origin_writer.transport.abort()
            await asyncio.gather(*pipes, return_exceptions=True)

    return handler


@pytest.mark.parametrize("auth", ["user:pass", None])
async def test_request_through_upstream_proxy(serve: Serve, make_client: MakeClient, auth: str | None) -> None:
    origin = await serve(replying(OK))
    proxy = await serve(connect_proxy(origin.port), tls=False)
    client = make_client(None, proxy=f"http://127.0.0.1:{proxy.port}", proxy_auth=auth)
    for _ in range(2):
        response, body = await fetch(client)
        assert (response.status, body) == (200, b"ok")
    [tunnel] = proxy.requests
    assert tunnel.line == b"CONNECT api.kimi.com:443 HTTP/1.1"
    assert tunnel.values(b"host") == [b"api.kimi.com:443"]
    assert tunnel.values(b"proxy-authorization") == ([b"Basic dXNlcjpwYXNz"] if auth else [])
    assert origin.sni == [HOST]  # TLS to Kimi inside the tunnel, verified against the test CA
    assert origin.per_connection() == [2]  # the tunnel is kept alive like any connection
    assert all(r.values(b"host") == [b"api.kimi.com"] for r in origin.requests)
    assert all(not r.values(b"proxy-authorization") for r in origin.requests)  # the proxy's credentials stay there


async def test_upstream_proxy_refuses_the_tunnel(serve: Serve, make_client: MakeClient) -> None:
    origin = await serve(replying(OK))
    refusal = b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\ncontent-length: 0\r\n\r\n"
    proxy = await serve(connect_proxy(origin.port, refuse=refusal), tls=False)
    client = make_client(None, proxy=f"http://127.0.0.1:{proxy.port}", proxy_auth="user:pass")
    with pytest.raises(ConnectFailed, match="upstream proxy") as caught:
        await send(client)
    assert "407" in str(caught.value)
    assert "pass" not in str(caught.value) and "dXNlcjpwYXNz" not in str(caught.value)
    assert_no_request_data(caught.value)
    assert origin.connections == 0


@pytest.mark.parametrize("answer", [b"", b"SSH-2.0-OpenSSH_9.6\r\n\r\n", b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000],
                         ids=["closes", "garbage", "huge-head"])
async def test_upstream_proxy_that_does_not_speak_http(serve: Serve, make_client: MakeClient, answer: bytes) -> None:
    async def handler(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer)

    proxy = await serve(handler, tls=False)
    client = make_client(None, proxy=f"http://127.0.0.1:{proxy.port}")
    with pytest.raises(ConnectFailed, match="upstream proxy") as caught:
        await send(client)
    assert_no_request_data(caught.value)


async def test_upstream_proxy_unreachable(make_client: MakeClient) -> None:
    port = unused_port()
    client = make_client(None, proxy=f"http://127.0.0.1:{port}")
    with pytest.raises(ConnectFailed, match=f"upstream proxy 127.0.0.1:{port}") as caught:
        await send(client)
    assert_no_request_data(caught.value)


@pytest.mark.parametrize(("proxy", "port", "tls"), [("http://proxy.test", 80, False),
                                                     ("https://proxy.test", 443, True),
                                                     ("http://proxy.test:3128", 3128, False)])
async def test_upstream_proxy_default_ports_match_mitmproxy(make_client: MakeClient, monkeypatch: pytest.MonkeyPatch,
                                                            proxy: str, port: int, tls: bool) -> None:
    dialed: list[tuple[str, int, bool]] = []

    async def refuse(host: str, port: int, **kwargs: object) -> None:
        dialed.append((host, port, kwargs.get("ssl") is not None))
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    monkeypatch.setattr(upstream.asyncio, "open_connection", refuse)
    with pytest.raises(ConnectFailed):
        await send(make_client(None, proxy=proxy))
    assert dialed == [("proxy.test", port, tls)]


# -- 7. the environment ----------------------------------------------------------------------------------------------


async def test_proxy_environment_variables_are_ignored(serve: Serve, make_client: MakeClient,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    nowhere = f"http://127.0.0.1:{unused_port()}"
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, nowhere)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    server = await serve(replying(OK))
    assert (await fetch(make_client(server.port)))[1] == b"ok"
    assert len(server.requests) == 1


# -- 8. closing the client -------------------------------------------------------------------------------------------


async def test_aclose_closes_idle_connections(serve: Serve, make_client: MakeClient) -> None:
    server = await serve(replying(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nbody"))
    client = make_client(server.port)
    idle, busy = await asyncio.gather(send(client), send(client))  # two connections
    assert await idle.read() == b"body"
    await idle.aclose()  # kept idle
    await asyncio.sleep(0.05)
    assert [p.closed_by_client.is_set() for p in server.peers] == [False, False]

    kept = list(client._idle[HOST])  # held here, so that only aclose (not garbage collection) can close it
    await client.aclose()
    await until(lambda: any(p.closed_by_client.is_set() for p in server.peers))
    await asyncio.sleep(0.05)
    assert sorted(p.closed_by_client.is_set() for p in server.peers) == [False, True]  # the idle one only

    assert await busy.read() == b"body"  # an answer in flight still completes
    await busy.aclose()  # but its connection is not kept any more
    for peer in server.peers:
        await settle(peer.closed_by_client)
    assert len(kept) == 1
