"""A loopback relay that lets streamed responses survive a failover.

mitmproxy streams only bytes that arrive on a server connection; a response an addon makes is
sent in one piece (upstream issue #8103). So streaming Kimi requests are pointed at this relay:
it runs the failover loop with the addon's own client and pipes the winning response to
mitmproxy as it arrives, which streams it on to the client. Only 127.0.0.1 listens, and a request
is served only with the one-time token the addon registered for it.

Its only peer is mitmproxy, which sends it a bare request head (the addon keeps the body in the
job), so it speaks just enough HTTP/1.1 for that: a head in, a head and a chunked or sized body out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

from .envelopes import INTERNAL_ERROR, error_body, local_headers
from .failover import Failover, Final, Job
from .upstream import MAX_HEAD, UpstreamError, read_chunks

log = logging.getLogger(__name__)

TOKEN_HEADER = "x-kimi-rotate-relay"
_TOKEN = TOKEN_HEADER.encode()
_READ_SIZE = 65536


class Relay:
    def __init__(self, failover: Failover) -> None:
        self.failover = failover
        self._jobs: dict[str, Job] = {}
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=MAX_HEAD)
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
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # mitmproxy closed the idle connection
                request = _RequestHead(head)
                await request.drain_body(reader)
                job = self._jobs.pop(request.token, None)
                if job is None:
                    await _send_local(writer, 403, "not a kimi-rotate relay request", "/")
                    return
                if not await self._answer(writer, job) or not request.keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
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

    async def _answer(self, writer: asyncio.StreamWriter, job: Job) -> bool:
        """Run the job and send its answer; False when the connection must close afterwards."""
        try:
            final: Final = await self.failover.run(job)
        except Exception:  # a bug of ours: the client still gets an answer it can read
            log.exception("kimi-rotate: internal error while sending %s %s", job.method, job.path.split("?")[0])
            await _send_local(writer, 502, INTERNAL_ERROR, job.path)
            return True
        try:
            resp = final.response
            if resp is None:
                await _send_local(writer, final.status, final.message, job.path, final.retry_after)
                return True
            headers = final.headers_to_pass_on(final.body_length())
            if job.method == "HEAD" or resp.status in (204, 304):  # no body, whatever the headers say
                writer.write(_head(resp.status, resp.reason, headers))
                await writer.drain()
                return True
            sized = any(name.lower() == b"content-length" for name, _ in headers)
            writer.write(_head(resp.status, resp.reason, headers if sized else [*headers, _CHUNKED]))
            async for chunk in final.aiter_body():
                writer.write(chunk if sized else b"%x\r\n%b\r\n" % (len(chunk), chunk))
                await writer.drain()
            if not sized:
                writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        finally:
            await final.aclose()


_CHUNKED = (b"transfer-encoding", b"chunked")


class _RequestHead:
    """The parts of mitmproxy's request head the relay needs."""

    def __init__(self, head: bytes) -> None:
        self.token = ""
        self.length = 0
        self.chunked = False
        self.keep_alive = True
        for line in head[:-4].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip()
            if name == _TOKEN:
                self.token = value.decode("latin-1")
            elif name == b"content-length":
                self.length = int(value)  # ValueError on garbage: the connection is dropped
            elif name == b"transfer-encoding":
                self.chunked = value.lower().endswith(b"chunked")
            elif name == b"connection":
                self.keep_alive = b"close" not in value.lower()

    async def drain_body(self, reader: asyncio.StreamReader) -> None:
        """Read past the body, if mitmproxy sent one (the job already holds it)."""
        if self.chunked:
            async for _ in read_chunks(reader, timeout=30):
                pass
        elif self.length:
            await reader.readexactly(self.length)


def _head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [b"HTTP/1.1 %d %b\r\n" % (status, reason)]
    lines += [b"%b: %b\r\n" % (name, value) for name, value in headers]
    return b"".join(lines) + b"\r\n"


async def _send_local(
    writer: asyncio.StreamWriter, status: int, message: str, path: str, retry_after: float | None = None
) -> None:
    body = error_body(status, message, path)
    headers = [(k.encode(), v.encode()) for k, v in local_headers(retry_after).items()]
    writer.write(_head(status, b"", [*headers, (b"content-length", b"%d" % len(body))]) + body)
    await writer.drain()
