"""HTTP/1.1 framing (kimi_rotator.http1), byte for byte, without a socket: heads written and read, bodies framed,
hop-by-hop headers left out. The upstream client's own tests (test_upstream.py) run the same cases over TLS."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimi_rotator import http1
from kimi_rotator.http1 import FramingError
from kimi_rotator.upstream import read_chunks

SECRET = b"sk-kimi-TEST-SECRET-0123456789abcdef"

# A request's headers as a client might send them: the hop-by-hop ones (and Host, Content-Length, which the client
# sets itself) must go, the rest keep their raw bytes, order and repeats. test_upstream.py sends the same on the wire.
KEPT_HEADERS = [
    (b"authorization", b"Bearer " + SECRET),
    (b"Content-Type", b"application/json"),
    (b"X-Utf8", "Zoë ☃".encode()),
    (b"X-Latin1", "café".encode("latin-1")),
    (b"x-dup", b"1"),
    (b"X-Dup", b"2"),
]
DROPPED_HEADERS = [
    (b"Host", b"attacker.example"),
    (b"Content-Length", b"3"),
    (b"Connection", b"keep-alive, Upgrade"),
    (b"Keep-Alive", b"timeout=5"),
    (b"Transfer-Encoding", b"chunked"),
    (b"TE", b"trailers"),
    (b"Upgrade", b"h2c"),
    (b"Proxy-Authorization", b"Basic cHJveHk6c2VjcmV0"),
    (b"Proxy-Connection", b"keep-alive"),
]
# Answers that are no HTTP/1.1 head; test_upstream.py sends them on the wire too.
NOT_HTTP11_HEADS = {
    "ssh": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "binary": b"\x00\x01\x02binary\xff\r\n\r\n",
    "letters-in-status": b"HTTP/1.1 2OO OK\r\n\r\n",
    "short-status": b"HTTP/1.1 20 OK\r\n\r\n",
    "http2": b"HTTP/2 200\r\n\r\n",
    "folded-header": b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n  continued\r\n\r\n",
    "no-colon": b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    "no-name": b"HTTP/1.1 200 OK\r\n: no name\r\n\r\n",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nX-Space : before the colon\r\n\r\n",
}
MIXED_HEADERS = [DROPPED_HEADERS[0], KEPT_HEADERS[0], *DROPPED_HEADERS[1:4], KEPT_HEADERS[1], KEPT_HEADERS[2],
                 *DROPPED_HEADERS[4:], *KEPT_HEADERS[3:]]


# -- request heads ---------------------------------------------------------------------------------------------------


def test_request_head_sets_host_and_length_and_leaves_out_hop_by_hop_headers() -> None:
    kept, mixed = KEPT_HEADERS, MIXED_HEADERS
    head = http1.request_head("POST", "api.kimi.com", "/v1/chat/completions", mixed, 41)
    lines = head.split(b"\r\n")
    assert lines[:2] == [b"POST /v1/chat/completions HTTP/1.1", b"host: api.kimi.com"]
    assert head.endswith(b"\r\ncontent-length: 41\r\n\r\n")
    assert [tuple(line.split(b": ", 1)) for line in lines[2:-3]] == kept  # raw bytes, order and repeats kept
    assert b"\r\nX-Latin1: caf\xe9\r\n" in head and b"\r\nX-Utf8: Zo\xc3\xab \xe2\x98\x83\r\n" in head


@pytest.mark.parametrize(("method", "length"), [("GET", None), ("DELETE", None), ("POST", b"0"), ("PUT", b"0")])
def test_an_empty_body_has_a_length_only_where_the_method_expects_a_body(method: str, length: bytes | None) -> None:
    _, _, headers = http1.parse_request_head(http1.request_head(method, "api.kimi.com", "/v1/x", [], 0))
    assert http1.header(headers, b"content-length") == length


def test_a_path_with_bytes_that_are_not_utf8_goes_out_as_sent() -> None:
    path = b"/v1/caf\xe9?q=\xff".decode("utf-8", "surrogateescape")  # as mitmproxy hands it over
    assert http1.request_head("GET", "api.kimi.com", path, [], 0).startswith(b"GET /v1/caf\xe9?q=\xff HTTP/1.1\r\n")


def test_a_request_head_reads_back() -> None:
    head = b"POST /a b HTTP/1.1\r\nhost: x\r\nX-Relay:  token \r\n\r\n"
    assert http1.parse_request_head(head) == (b"POST", b"/a b", [(b"host", b"x"), (b"X-Relay", b"token")])
    assert http1.header(http1.parse_request_head(head)[2], b"x-relay") == b"token"
    for bad in (b"POST /a\r\n\r\n", b"\r\n\r\n", b"POST /a HTTP/2\r\n\r\n", b"GET / HTTP/1.1\r\nno colon\r\n\r\n"):
        with pytest.raises(FramingError):
            http1.parse_request_head(bad)


# -- response heads --------------------------------------------------------------------------------------------------


def test_response_headers_are_kept_raw_in_order_with_repeats() -> None:
    head = (
        b"HTTP/1.1 429 Too Many Requests\r\n"
        b"Set-Cookie: a=1\r\n"
        b"X-Note:  caf\xe9 \t\r\n"
        b"Retry-After:7\r\n"
        b"set-cookie: b=2\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    status, reason, headers, version = http1.parse_response_head(head)
    assert (status, reason, version) == (429, b"Too Many Requests", b"HTTP/1.1")
    assert headers == [
        (b"Set-Cookie", b"a=1"), (b"X-Note", b"caf\xe9"), (b"Retry-After", b"7"), (b"set-cookie", b"b=2"),
        (b"Content-Length", b"0"),
    ]
    assert http1.header(headers, b"set-cookie") == b"a=1"  # the first of the repeats
    assert http1.header(headers, b"x-missing") is None


def test_a_status_line_without_reason() -> None:
    assert http1.parse_response_head(b"HTTP/1.1 200\r\ncontent-length: 2\r\n\r\n")[:2] == (200, b"")


@pytest.mark.parametrize("head", NOT_HTTP11_HEADS.values(), ids=NOT_HTTP11_HEADS.keys())
def test_a_head_that_is_not_http11_is_refused_without_quoting_it(head: bytes) -> None:
    with pytest.raises(FramingError) as caught:
        http1.parse_response_head(head)
    assert str(caught.value) in ("is not HTTP/1.1", "has a malformed header line")


def test_a_response_head_written_reads_back() -> None:
    headers = [(b"content-type", b"text/event-stream"), (b"X-Odd", "café".encode())]
    head = http1.response_head(200, b"OK", headers)
    assert head == b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nX-Odd: caf\xc3\xa9\r\n\r\n"
    assert http1.parse_response_head(head) == (200, b"OK", headers, b"HTTP/1.1")


# -- body framing ----------------------------------------------------------------------------------------------------


def head_of(*lines: bytes) -> list[tuple[bytes, bytes]]:
    return http1.parse_response_head(b"HTTP/1.1 200 OK\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n")[2]


@pytest.mark.parametrize(("headers", "framing"), [
    ([b"Content-Length: 11"], ("length", 11)),
    ([b"content-length: 0"], ("length", 0)),
    ([b"Transfer-Encoding: chunked"], ("chunked", 0)),
    ([b"transfer-encoding: gzip, Chunked "], ("chunked", 0)),
    ([b"content-length: 3", b"transfer-encoding: chunked"], ("chunked", 0)),  # chunked wins over a length
    ([b"transfer-encoding: gzip", b"content-length: 2"], ("close", 0)),  # not ending in chunked: runs to the close
    ([b"content-type: text/plain"], ("close", 0)),
    ([b"content-length: 5, 5"], ("length", 5)),  # identical lengths are one
    ([b"content-length: 5", b"content-length: 5"], ("length", 5)),
])
def test_response_framing(headers: list[bytes], framing: tuple[str, int]) -> None:
    assert http1.response_framing("POST", 200, head_of(*headers)) == framing


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("POST", 204), ("GET", 304), ("POST", 100)])
def test_answers_without_body(method: str, status: int) -> None:
    # The content-length describes what a GET would get; no body bytes follow.
    assert http1.response_framing(method, status, head_of(b"content-length: 5")) == ("none", 0)


def test_a_request_without_framing_headers_has_no_body() -> None:
    assert http1.body_framing(head_of(b"x-kimi-rotate-relay: t"), default="none") == ("none", 0)


@pytest.mark.parametrize("lengths", [
    [b"abc"], [b"-1"], [b"1.5"], [b""], [b"+5"], [b"0x5"], [b"5, 6"], [b"5", b"6"], [b"5,"],
], ids=["letters", "negative", "decimal-point", "empty", "plus-sign", "hex", "conflicting-list", "conflicting-repeat",
        "trailing-comma"])
def test_an_invalid_content_length_is_refused(lengths: list[bytes]) -> None:
    with pytest.raises(FramingError, match="Content-Length"):
        http1.response_framing("POST", 200, head_of(*(b"content-length: " + v for v in lengths)))


@pytest.mark.parametrize(("version", "connection", "alive"), [
    (b"HTTP/1.1", None, True), (b"HTTP/1.1", b"keep-alive", True), (b"HTTP/1.1", b"Close", False),
    (b"HTTP/1.0", None, False), (b"HTTP/1.0", b"close", False),
])
def test_keeps_alive(version: bytes, connection: bytes | None, alive: bool) -> None:
    headers = [] if connection is None else [(b"Connection", connection)]
    assert http1.keeps_alive(version, headers) is alive


def test_passed_on_leaves_out_hop_by_hop_headers_and_those_asked() -> None:
    headers = [(b"Content-Type", b"a"), (b"Connection", b"close"), (b"TRANSFER-ENCODING", b"chunked"),
               (b"Retry-After", b"3"), (b"x-keep", b"1"), (b"Keep-Alive", b"5"), (b"Proxy-Authenticate", b"B")]
    assert http1.passed_on(headers) == [(b"Content-Type", b"a"), (b"Retry-After", b"3"), (b"x-keep", b"1")]
    assert http1.passed_on(headers, [b"retry-after"]) == [(b"Content-Type", b"a"), (b"x-keep", b"1")]


# -- chunks ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "size"), [
    (b"4;name=value\r\n", 4), (b"5 ; quoted=\"a;b\"\r\n", 5), (b"E\r\n", 14), (b"0\r\n", 0),
    (b"fffffffffffffff\r\n", (1 << 60) - 1),
])
def test_chunk_size(line: bytes, size: int) -> None:
    assert http1.chunk_size(line) == size


@pytest.mark.parametrize("line", [
    b"zz\r\n", b"-5\r\n", b"\r\n", b";ext\r\n", b"0x5\r\n", b"+5\r\n", b"1_0\r\n", b"fffffffffffffffff\r\n",
], ids=["not-hex", "negative", "empty", "only-extension", "0x-prefix", "plus-sign", "underscore", "absurd-size"])
def test_a_malformed_chunk_size_is_refused(line: bytes) -> None:
    with pytest.raises(FramingError, match="chunked"):
        http1.chunk_size(line)


def test_a_chunk_must_end_where_its_size_says() -> None:
    http1.check_chunk_end(b"\r\n")
    for wrong in (b"XX", b"lo", b"\n\r"):
        with pytest.raises(FramingError, match="chunked"):
            http1.check_chunk_end(wrong)


@settings(max_examples=150, deadline=None)
@given(pieces=st.lists(st.binary(min_size=1, max_size=300), max_size=6))
def test_chunks_written_read_back_as_written(pieces: list[bytes]) -> None:
    """What the relay writes (http1.chunk, LAST_CHUNK) is what the client reads (chunk_size, check_chunk_end)."""
    wire = b"".join(http1.chunk(p) for p in pieces) + http1.LAST_CHUNK + b"HTTP/1.1 next"

    async def decode() -> tuple[list[bytes], bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(wire)
        reader.feed_eof()
        return [chunk async for chunk in read_chunks(reader, 1.0)], await reader.read()

    chunks, rest = asyncio.run(decode())
    assert (b"".join(chunks), rest) == (b"".join(pieces), b"HTTP/1.1 next")
    assert list(itertools.accumulate(len(c) for c in chunks)) == list(itertools.accumulate(len(p) for p in pieces))
