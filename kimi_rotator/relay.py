"""A loopback relay that lets streamed responses survive a failover.

mitmproxy streams only bytes that arrive on a server connection; a response an addon makes is
sent in one piece (upstream issue #8103). So streaming Kimi requests are pointed at this relay:
it runs the failover loop with the addon's own client and pipes the winning response to
mitmproxy as it arrives, which streams it on to the client. Only 127.0.0.1 listens, and a request
is served only with the one-time token the addon registered for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

import h11

from .envelopes import INTERNAL_ERROR, error_body, local_headers
from .failover import Failover, Final, Job
from .upstream import UpstreamError

log = logging.getLogger(__name__)

TOKEN_HEADER = "x-kimi-rotate-relay"
_READ_SIZE = 65536


class Relay:
    def __init__(self, failover: Failover) -> None:
        self.failover = failover
        self._jobs: dict[str, Job] = {}
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def register(self, job: Job) -> str:
        token = secrets.token_urlsafe(18)
        self._jobs[token] = job
        return token

    def forget(self, token: str) -> None:
        self._jobs.pop(token, None)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await _next_request(conn, reader)
                if request is None:
                    return
                job = self._jobs.pop(_header(request, TOKEN_HEADER) or "", None)
                if job is None:
                    await _send_local(conn, writer, 403, "not a kimi-rotate relay request", "/")
                else:
                    await self._answer(conn, writer, job)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError):
            pass  # mitmproxy went away (the client hung up); nothing to answer
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

    async def _answer(self, conn: h11.Connection, writer: asyncio.StreamWriter, job: Job) -> None:
        try:
            final: Final = await self.failover.run(job)
        except Exception:  # a bug of ours: the client still gets an answer it can read
            log.exception("kimi-rotate: internal error while sending %s %s", job.method, job.path.split("?")[0])
            await _send_local(conn, writer, 502, INTERNAL_ERROR, job.path)
            return
        try:
            if final.response is None:
                await _send_local(conn, writer, final.status, final.message, job.path, final.retry_after)
                return
            resp = final.response
            headers = final.headers_to_pass_on(final.body_length())
            _write(conn, writer, h11.Response(status_code=resp.status, reason=resp.reason, headers=headers))
            async for chunk in final.aiter_body():
                _write(conn, writer, h11.Data(data=chunk))
                await writer.drain()
            _write(conn, writer, h11.EndOfMessage())
            await writer.drain()
        finally:
            await final.aclose()


async def _next_request(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
    """The next request, with its body drained (the job already holds the body)."""
    request: h11.Request | None = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(_READ_SIZE)
            conn.receive_data(data)
            if not data and request is None:
                return None
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage):
            return request
        elif isinstance(event, h11.ConnectionClosed):
            return None


def _header(request: h11.Request, name: str) -> str | None:
    wanted = name.encode()
    for k, v in request.headers:
        if k == wanted:
            return bytes(v).decode("latin-1")
    return None


def _write(conn: h11.Connection, writer: asyncio.StreamWriter, event: h11._events.Event) -> None:
    data = conn.send(event)
    if data:
        writer.write(data)


async def _send_local(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    status: int,
    message: str,
    path: str,
    retry_after: float | None = None,
) -> None:
    body = error_body(status, message, path)
    headers = [*local_headers(retry_after).items(), ("content-length", str(len(body)))]
    _write(conn, writer, h11.Response(status_code=status, headers=headers))
    _write(conn, writer, h11.Data(data=body))
    _write(conn, writer, h11.EndOfMessage())
    await writer.drain()
