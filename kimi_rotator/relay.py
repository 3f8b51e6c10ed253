"""A loopback relay that lets an answer the addon already holds stream on to the client.

mitmproxy streams only bytes that arrive on a server connection; a response an addon makes is
sent in one piece (upstream issue #8103). So when the failover loop's winning answer is an open
event stream, the addon hands it over here under a one-time token and points the flow at this
relay; mitmproxy connects, and the relay writes the answer's head and pipes its body as it arrives.
It knows nothing of keys or failover. Only 127.0.0.1 listens, and a request is served only with a
token the addon registered; an answer mitmproxy never comes for is closed after HANDOVER_SECONDS
(or at once by `forget`, from the addon's `error` hook).

Its only peer is mitmproxy, which sends it a bare request head (the addon keeps the body), so it
speaks just enough HTTP/1.1 for that, through the framing in http1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from . import http1
from .envelopes import error_body, local_headers
from .http1 import HEAD_END, MAX_HEAD, FramingError
from .upstream import UpstreamError, read_chunks

log = logging.getLogger(__name__)

TOKEN_HEADER = "x-kimi-rotate-relay"
_TOKEN = TOKEN_HEADER.encode()
# mitmproxy connects as soon as the request hooks are done: a handover not collected by then never will be
# (another addon killed or answered the flow), and its upstream connection must not stay open.
HANDOVER_SECONDS = 30.0
_DRAIN_SECONDS = 30.0


class OpenBody(Protocol):
    """The body of an answer still coming (failover.Reply): read once, then closed."""

    def aiter_body(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


@dataclass
class Handover:
    """An answer the relay is to pass on: its head as the client gets it, and its open body."""

    status: int
    reason: bytes
    headers: http1.Headers  # no hop-by-hop headers; a Content-Length only if the body has exactly that length
    body: OpenBody


class Relay:
    def __init__(self, handover_seconds: float = HANDOVER_SECONDS) -> None:
        self.handover_seconds = handover_seconds
        self._waiting: dict[str, tuple[Handover, asyncio.TimerHandle]] = {}
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=MAX_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for token in list(self._waiting):
            self.forget(token)

    def register(self, handover: Handover) -> str:
        """Keep an answer for the one request that brings the returned token."""
        token = secrets.token_urlsafe(18)
        timer = asyncio.get_running_loop().call_later(self.handover_seconds, self.forget, token)
        self._waiting[token] = (handover, timer)
        return token

    def forget(self, token: str) -> None:
        """Close an answer that was handed over and not collected (nothing happens once it was)."""
        waiting = self._waiting.pop(token, None)
        if waiting is not None:
            handover, timer = waiting
            timer.cancel()
            _close_soon(handover.body)

    def _collect(self, token: str) -> Handover | None:
        waiting = self._waiting.pop(token, None)
        if waiting is None:
            return None
        waiting[1].cancel()
        return waiting[0]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(HEAD_END)
                except asyncio.IncompleteReadError:
                    return  # mitmproxy closed the idle connection
                _, _, headers = http1.parse_request_head(head)
                await _drain_body(reader, headers)
                handover = self._collect((http1.header(headers, _TOKEN) or b"").decode("latin-1"))
                if handover is None:
                    await _send_refusal(writer)
                    return
                await _pipe(writer, handover)
                if not http1.keeps_alive(b"HTTP/1.1", headers):
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, FramingError):
            pass  # mitmproxy went away (the client hung up), or sent what it never sends; nothing to answer
        except asyncio.CancelledError:
            pass  # the proxy is shutting down with this connection open
        except UpstreamError as e:
            # Kimi cut the stream after it began: closing our side passes the cut on, so the client's stream ends.
            log.info("kimi-rotate: the upstream stream broke off (%s)", e)
        except Exception:
            log.exception("kimi-rotate: internal error in the relay")  # closing ends the client's stream
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _pipe(writer: asyncio.StreamWriter, handover: Handover) -> None:
    """Write the head, then the body as it arrives: as is when it has a length, else in chunks."""
    try:
        sized = http1.header(handover.headers, b"content-length") is not None
        headers = handover.headers if sized else [*handover.headers, http1.CHUNKED]
        writer.write(http1.response_head(handover.status, handover.reason, headers))
        async for data in handover.body.aiter_body():
            if data:
                writer.write(data if sized else http1.chunk(data))
                await writer.drain()
        if not sized:
            writer.write(http1.LAST_CHUNK)
        await writer.drain()
    finally:
        await handover.body.aclose()


async def _drain_body(reader: asyncio.StreamReader, headers: http1.Headers) -> None:
    """Read past the request's body, if mitmproxy sent one (the addon holds the body; the answer is known)."""
    framing, length = http1.body_framing(headers, default="none")
    if framing == "chunked":
        async for _ in read_chunks(reader, timeout=_DRAIN_SECONDS):
            pass
    elif framing == "length" and length:
        await reader.readexactly(length)


async def _send_refusal(writer: asyncio.StreamWriter) -> None:
    body = error_body(403, "not a kimi-rotate relay request", "/")
    headers = [(k.encode(), v.encode()) for k, v in local_headers().items()]
    writer.write(http1.response_head(403, b"", [*headers, (b"content-length", b"%d" % len(body))]) + body)
    await writer.drain()


_closing: set[asyncio.Task[None]] = set()


def _close_soon(body: OpenBody) -> None:
    task = asyncio.get_running_loop().create_task(body.aclose())  # type: ignore[arg-type]
    _closing.add(task)
    task.add_done_callback(_closing.discard)
