"""The addon's own HTTP/1.1 client for Kimi.

Every Kimi request goes out through this client, not on mitmproxy's own server connection: a failure
there reaches an addon only in the `error` hook, where no answer can be set, so the client would get
mitmproxy's HTML 502 with no retry on another key, and a silent Kimi would hold it with no time limit.
It is small on purpose: it speaks only what Kimi's API needs (HTTP/1.1 over TLS, keep-alive, chunked
or sized bodies), which costs less per request than mitmproxy's own upstream path and far less than
httpx, so sending every request ourselves makes the proxy faster, not slower.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from . import http1
from .http1 import HEAD_END, LINE_END, MAX_HEAD, FramingError, Headers
from .routing import KIMI_PORT

READ_SIZE = 64 * 1024
IDLE_SECONDS = 50.0  # idle connections older than this are closed, not reused (servers drop them at ~60 s)
MAX_IDLE_PER_HOST = 64
CONNECT_TIMEOUT_CAP = 15.0
# No happy eyeballs (happy_eyeballs_delay): under mitmproxy 12's eager task factory, Python 3.12.1's
# staggered_race fails an internal assertion on every connection. Addresses are tried in turn, as mitmproxy does.


class UpstreamError(Exception):
    """Kimi could not be reached, or broke the exchange off. The message never holds request data."""


class ConnectFailed(UpstreamError):
    """No connection: DNS, refused, TLS handshake or certificate, or the upstream proxy refused the tunnel."""


class UpstreamTimeout(UpstreamError):
    """Connecting, or waiting for the next bytes of the answer, took longer than the timeout."""


class BrokenResponse(UpstreamError):
    """The connection closed or reset mid-answer, or the answer is not valid HTTP/1.1."""


class _Stale(Exception):
    """A kept-alive connection closed before a byte of the answer came: the request is sent again on a new one.

    Nearly always the server closed the idle connection as the request went out, and never read it. A server that
    read the request and then closed without a word would get it twice; browsers make the same trade.
    """


@dataclass(frozen=True)
class UpstreamSettings:
    """How to reach Kimi, mirroring mitmproxy's upstream options."""

    verify: ssl.SSLContext | bool = True  # False: ssl_insecure. A context given here gets ALPN http/1.1 set on it.
    proxy: str | None = None  # mitmproxy's upstream mode: "http://host:port" or "https://host:port"
    proxy_auth: str | None = None  # mitmproxy's upstream_auth: "user:password"
    resolve: Mapping[str, tuple[str, int]] = field(default_factory=dict)  # kimi_resolve
    timeout: float = 600.0  # for connecting (capped at 15 s) and for each wait for more of the answer


# The options that decide how Kimi is reached: mitmproxy's own upstream options and kimi-rotate's. The proxy reads
# them from mitmproxy's options, `kimi-rotate check` from its `--set` options; both through settings_from_options.
UPSTREAM_OPTIONS: tuple[str, ...] = (
    "kimi_resolve", "kimi_upstream_timeout", "ssl_insecure", "ssl_verify_upstream_trusted_ca",
    "ssl_verify_upstream_trusted_confdir", "mode", "upstream_auth",
)


def settings_from_options(get: Callable[[str], object]) -> UpstreamSettings:
    """UpstreamSettings from option values by name (UPSTREAM_OPTIONS; an option not set reads as None).

    Raises ValueError for a kimi_resolve entry that is not host=address:port."""
    from .routing import parse_resolve  # it loads mitmproxy's authority parser

    modes = get("mode")
    timeout = get("kimi_upstream_timeout")
    return UpstreamSettings(
        verify=upstream_tls(get),
        proxy=upstream_proxy(modes if isinstance(modes, Sequence) and not isinstance(modes, str) else ()),
        proxy_auth=str(get("upstream_auth") or "") or None,
        resolve=parse_resolve(_strings(get("kimi_resolve"))),
        timeout=float(timeout) if isinstance(timeout, int | float) else UpstreamSettings.timeout,
    )


def add_options(add: Callable[..., object]) -> None:
    """Declare kimi-rotate's own upstream options with `add(name, type, default, help)`: the addon's `load`, and
    settings_from_sets."""
    add("kimi_resolve", Sequence[str], [], "host=address:port: connect there for that host (like curl --resolve).")
    add("kimi_upstream_timeout", int, 600, "Seconds to wait for Kimi to connect (at most 15) or send more.")


def settings_from_sets(sets: Sequence[str]) -> UpstreamSettings:
    """UpstreamSettings from `--set NAME=VALUE` options (UPSTREAM_OPTIONS only), parsed by mitmproxy's option
    parser as the proxy's are (a repeated list option keeps every value), with the addon's checks. Raises
    ValueError, one line that names the bad option."""
    from mitmproxy import exceptions, options  # mitmproxy's options alone: its addons cost seconds to import
    from mitmproxy.proxy import mode_specs

    opts = options.Options()
    add_options(opts.add_option)
    opts.add_option("upstream_auth", str | None, None, "user:password for the upstream proxy")  # as mitmproxy's addon
    by_name: dict[str, list[str]] = {}
    for spec in sets:
        name = spec.partition("=")[0].strip()
        if name not in UPSTREAM_OPTIONS:
            raise ValueError(f"--set {name or spec!r} is not an option `kimi-rotate check` reads; it reads "
                             f"{', '.join(UPSTREAM_OPTIONS)}")
        by_name.setdefault(name, []).append(spec)
    for name, specs in by_name.items():
        try:
            opts.set(*specs)
        except exceptions.OptionsError as e:
            raise ValueError(f"bad --set {name}: {e}") from None
    for mode in opts.mode:
        try:
            mode_specs.ProxyMode.parse(mode)
        except ValueError as e:
            raise ValueError(f"bad --set mode={mode}: {e}") from None
    if opts.kimi_upstream_timeout < 1:
        raise ValueError("bad --set kimi_upstream_timeout: it must be at least 1 (seconds)")
    try:
        return settings_from_options(lambda name: getattr(opts, name, None))
    except ValueError as e:  # kimi_resolve
        raise ValueError(f"bad --set {e}") from None
    except OSError as e:  # the CA file or folder (ssl.SSLError is an OSError too)
        where = opts.ssl_verify_upstream_trusted_ca or opts.ssl_verify_upstream_trusted_confdir
        raise ValueError(f"cannot load the trusted CA {where} ({e.strerror or e}); check the path") from None


def _strings(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, Sequence) and not isinstance(value, str) else []


def upstream_tls(get: Callable[[str], object]) -> ssl.SSLContext | bool:
    """Verify upstream certificates exactly as mitmproxy is told to."""
    if get("ssl_insecure"):
        return False
    cafile = get("ssl_verify_upstream_trusted_ca") or None
    capath = get("ssl_verify_upstream_trusted_confdir") or None
    if cafile or capath:
        return ssl.create_default_context(cafile=str(cafile) if cafile else None,
                                          capath=str(capath) if capath else None)
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def upstream_proxy(modes: Sequence[str]) -> str | None:
    """The upstream proxy of the first upstream mode, as `scheme://host:port`, read with mitmproxy's own parser:
    a mode may end in `@port` or `@host:port` (where mitmproxy listens for it), which is no part of the proxy."""
    if not modes:
        return None
    from mitmproxy.proxy import mode_specs

    for spec in modes:
        try:
            mode = mode_specs.ProxyMode.parse(spec)
        except ValueError:  # mitmproxy's proxyserver rejects the option itself, saying why
            continue
        if isinstance(mode, mode_specs.UpstreamMode):
            host, port = mode.address
            return f"{mode.scheme}://{f'[{host}]' if ':' in host else host}:{port}"
    return None


def _tls_context(verify: ssl.SSLContext | bool) -> ssl.SSLContext:
    if isinstance(verify, ssl.SSLContext):
        context = verify
    else:
        context = ssl.create_default_context()
        if not verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


def _why(error: BaseException) -> str:
    """An OS or TLS error in one line: it names a cause (refused, unknown host, untrusted certificate) and no data."""
    text = " ".join(str(error).split())[:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _Connection:
    __slots__ = ("idle_since", "reader", "reused", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = False
        self.idle_since = 0.0

    def usable(self, now: float) -> bool:
        return (
            not self.reader.at_eof()
            # Bytes that arrived while idle (a 408 sent before closing) would be read as the next answer.
            # StreamReader has no public way to ask; _buffer has been its buffer since asyncio began.
            and not getattr(self.reader, "_buffer", b"")
            and not self.writer.transport.is_closing()
            and now - self.idle_since < IDLE_SECONDS
        )

    def abort(self) -> None:
        self.writer.transport.abort()


class Response:
    """An answer whose head has arrived; the body is read with `aiter_raw` or `read`, then `aclose`."""

    def __init__(
        self,
        client: UpstreamClient,
        host: str,
        connection: _Connection,
        status: int,
        reason: bytes,
        headers: Headers,
        framing: http1.Framing,
        length: int,
        keep_alive: bool,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers  # as received: raw bytes, order and repeats kept
        self._client = client
        self._host = host
        self._connection: _Connection | None = connection
        self._framing = framing
        self._remaining = length
        self._keep_alive = keep_alive
        self._consumed = False

    @property
    def complete(self) -> bool:
        """The whole body has been read."""
        return self._consumed

    def header(self, name: str) -> str | None:
        """The first value of a header (case-insensitive), decoded as latin-1."""
        wanted = name.lower().encode()
        for k, v in self.headers:
            if k.lower() == wanted:
                return v.decode("latin-1")
        return None

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives: transfer framing removed, content encoding (gzip, …) kept."""
        connection = self._connection
        if connection is None:
            return
        if self._consumed:  # an answer without a body
            self._release()
            return
        reader, timeout = connection.reader, self._client.settings.timeout
        try:
            if self._framing == "length":
                while self._remaining > 0:
                    async with asyncio.timeout(timeout):
                        data = await reader.read(min(self._remaining, READ_SIZE))
                    if not data:
                        raise BrokenResponse("Kimi closed the connection before the whole answer arrived")
                    self._remaining -= len(data)
                    yield data
            elif self._framing == "chunked":
                async for chunk in read_chunks(reader, timeout):
                    yield chunk
            elif self._framing == "close":
                while True:
                    async with asyncio.timeout(timeout):
                        data = await reader.read(READ_SIZE)
                    if not data:
                        break
                    yield data
        except TimeoutError:
            self._drop()
            raise UpstreamTimeout(f"Kimi sent nothing for {timeout:g} s in the middle of an answer") from None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            self._drop()
            raise BrokenResponse(f"the connection to Kimi broke off mid-answer ({_why(e)})") from None
        except BrokenResponse:
            self._drop()
            raise
        self._consumed = True
        self._release()

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; with `limit`, stop once more than `limit` bytes arrived (the connection is then closed)."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self.aiter_raw():
            parts.append(chunk)
            size += len(chunk)
            if limit is not None and size > limit:
                break
        return b"".join(parts)

    async def aclose(self) -> None:
        """Give the connection back when the body was read whole; otherwise close it."""
        if self._consumed:
            self._release()
        else:
            self._drop()

    def _release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            if self._keep_alive:
                self._client._put_back(self._host, connection)
            else:
                connection.abort()

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.abort()


async def read_chunks(reader: asyncio.StreamReader, timeout: float) -> AsyncIterator[bytes]:
    """A chunked body's data as it arrives; a large chunk comes in pieces, never buffered whole.

    Raises BrokenResponse on bad framing, and leaves timeouts and connection errors to the caller."""
    try:
        while True:
            async with asyncio.timeout(timeout):
                remaining = http1.chunk_size(await reader.readuntil(LINE_END))
            if remaining == 0:
                async with asyncio.timeout(timeout):  # trailers, up to the blank line
                    while await reader.readuntil(LINE_END) != LINE_END:
                        pass
                return
            while remaining:
                async with asyncio.timeout(timeout):
                    data = await reader.read(min(remaining, READ_SIZE))
                if not data:
                    raise BrokenResponse("Kimi closed the connection in the middle of a chunk")
                remaining -= len(data)
                yield data
            async with asyncio.timeout(timeout):
                http1.check_chunk_end(await reader.readexactly(2))
    except FramingError as e:
        raise BrokenResponse(f"Kimi's answer {e}") from None


class UpstreamClient:
    """Sends requests to Kimi hosts on keep-alive connections, keeping idle ones per host for the next request."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self._tls = _tls_context(settings.verify)
        self._proxy = urlsplit(settings.proxy) if settings.proxy else None
        self._idle: dict[str, list[_Connection]] = {}
        self._closed = False

    async def send(
        self, method: str, host: str, path: str, headers: Iterable[tuple[bytes, bytes]], body: bytes
    ) -> Response:
        """Send one request to https://host/path and return once the answer's head has arrived.

        `headers` go out as given except Host, Content-Length and hop-by-hop headers, which the client sets.
        Raises ConnectFailed, UpstreamTimeout or BrokenResponse.
        """
        request = http1.request_head(method, host, path, headers, len(body)) + body
        connection = self._checkout(host)
        if connection is not None:
            try:
                return await self._exchange(connection, host, method, request)
            except _Stale:
                pass  # closed before a byte came back: nearly always closed while idle, unread (see _Stale)
        return await self._exchange(await self._connect(host), host, method, request)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.abort()

    # -- connections (kept alive per host) -------------------------------------------------------

    def _checkout(self, host: str) -> _Connection | None:
        connections = self._idle.get(host)
        now = time.monotonic()
        while connections:
            connection = connections.pop()
            if connection.usable(now):
                return connection
            connection.abort()
        return None

    def _put_back(self, host: str, connection: _Connection) -> None:
        connections = self._idle.setdefault(host, [])
        if self._closed or len(connections) >= MAX_IDLE_PER_HOST or connection.reader.at_eof():
            connection.abort()
            return
        connection.reused = True
        connection.idle_since = time.monotonic()
        connections.append(connection)

    async def _connect(self, host: str) -> _Connection:
        timeout = min(CONNECT_TIMEOUT_CAP, self.settings.timeout)
        try:
            async with asyncio.timeout(timeout):
                if self._proxy is not None:
                    reader, writer = await self._tunnel(host)
                else:
                    address = self.settings.resolve.get(host, (host, KIMI_PORT))
                    reader, writer = await asyncio.open_connection(
                        address[0], address[1], ssl=self._tls, server_hostname=host, limit=MAX_HEAD
                    )
        except TimeoutError:
            raise UpstreamTimeout(f"connecting to {host} took longer than {timeout:g} s") from None
        except ssl.SSLCertVerificationError as e:
            raise ConnectFailed(f"the certificate of {host} is not trusted ({_why(e)})") from None
        except (OSError, ssl.SSLError) as e:  # refused, unreachable, unknown host, TLS handshake
            raise ConnectFailed(f"cannot connect to {host} ({_why(e)})") from None
        return _Connection(reader, writer)

    async def _tunnel(self, host: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TLS connection to `host` through the upstream proxy's CONNECT tunnel."""
        proxy = self._proxy
        assert proxy is not None and proxy.hostname is not None
        secure = proxy.scheme == "https"
        port = proxy.port or (443 if secure else 80)
        try:
            reader, writer = await asyncio.open_connection(
                proxy.hostname, port, ssl=self._tls if secure else None,
                server_hostname=proxy.hostname if secure else None, limit=MAX_HEAD,
            )
        except (OSError, ssl.SSLError) as e:
            raise ConnectFailed(f"cannot connect to the upstream proxy {proxy.hostname}:{port} ({_why(e)})") from None
        try:
            authority = f"{host}:{KIMI_PORT}".encode()
            head = b"CONNECT " + authority + b" HTTP/1.1\r\nhost: " + authority + b"\r\n"
            if self.settings.proxy_auth:
                head += b"proxy-authorization: Basic " + base64.b64encode(self.settings.proxy_auth.encode()) + b"\r\n"
            writer.write(head + b"\r\n")
            try:
                status, reason, _, _ = http1.parse_response_head(await reader.readuntil(HEAD_END))
            except (FramingError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                raise ConnectFailed(f"the upstream proxy did not answer the tunnel request to {host}") from None
            if not 200 <= status < 300:
                text = reason.decode("latin-1")
                raise ConnectFailed(f"the upstream proxy refused the tunnel to {host}: {status} {text}".rstrip())
            await writer.start_tls(self._tls, server_hostname=host)
        except BaseException:
            writer.transport.abort()
            raise
        return reader, writer

    # -- one exchange --------------------------------------------------------------------------

    async def _exchange(self, connection: _Connection, host: str, method: str, request: bytes) -> Response:
        reader, writer = connection.reader, connection.writer
        timeout = self.settings.timeout
        try:
            writer.write(request)
            async with asyncio.timeout(timeout):
                await writer.drain()
                while True:
                    head = await reader.readuntil(HEAD_END)
                    status, reason, headers, version = http1.parse_response_head(head)
                    if status >= 200 or status == 101:
                        break
                    connection.reused = False  # an interim answer (100 Continue) arrived: the server has it
            if status == 101:
                raise BrokenResponse("Kimi switched protocols, which kimi-rotate does not relay")
            framing, length = http1.response_framing(method, status, headers)
        except FramingError as e:
            connection.abort()
            raise BrokenResponse(f"Kimi's answer {e}") from None
        except TimeoutError:
            connection.abort()
            raise UpstreamTimeout(f"Kimi did not answer within {timeout:g} s") from None
        except asyncio.LimitOverrunError:
            connection.abort()
            raise BrokenResponse(f"Kimi's answer head is larger than {MAX_HEAD // 1024} KiB") from None
        except (OSError, asyncio.IncompleteReadError) as e:
            connection.abort()
            if getattr(e, "partial", b""):
                raise BrokenResponse(f"the connection to Kimi broke off mid-answer ({_why(e)})") from None
            if connection.reused:
                raise _Stale from None
            raise BrokenResponse(f"Kimi closed the connection without answering ({_why(e)})") from None
        except (BrokenResponse, asyncio.CancelledError):
            connection.abort()
            raise
        keep_alive = framing != "close" and http1.keeps_alive(version, headers)
        response = Response(self, host, connection, status, reason, headers, framing, length, keep_alive)
        if framing == "none":
            response._consumed = True
        return response
