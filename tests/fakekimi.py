"""A fake Kimi / Moonshot upstream for the end-to-end tests.

``FakeKimi`` serves HTTPS (HTTP/1.1 only, keep-alive) on 127.0.0.1 from a background thread of the test process and
stands in for api.kimi.com, api.moonshot.cn and api.moonshot.ai at once: it answers whatever Host/SNI it is given,
with the certificate from tests/certs.py. Its behaviour per key and per account is scriptable (canned errors in the
real envelopes, rate limits, faults), and it records every request it sees.

Thread model: one accept thread plus one daemon thread per connection, capped at ``max_connections``. Blocking sockets
and the standard library only, so a stuck handler can never wedge the accept loop. Shutdown sets a stop event (every
wait inside a handler is on that event) and shuts down every live socket, so ``close()`` returns well under a second
even with hanging or streaming connections.

What it imitates: the three surfaces' paths and auth headers, the error envelopes (OpenAI's, Anthropic's), the retry
signals (Retry-After, "try again after N seconds", Msh-Uid), the zero-token probes and both SSE stream formats.

Opt-in account state (all off by default, all cleared by :meth:`FakeKimi.reset`), for tests of account-aware
behaviour: per-account RPM / concurrency caps with Kimi's 429 texts (:meth:`FakeKimi.set_limit`), a Kimi Code plan
whose 5-hour window and weekly quota are spent by requests and reset on the fake's clock (:meth:`FakeKimi.set_plan`),
an Open Platform balance that requests draw down (:meth:`FakeKimi.set_balance` with ``charge``), a per-account
context cache reporting cached tokens (:meth:`FakeKimi.enable_context_cache`), account-owned ``/v1/files``
(:meth:`FakeKimi.enable_files`) and Msh-Org-Id / Msh-Gid headers (:meth:`FakeKimi.set_account`). Time for all of it
comes from ``FakeKimi.clock`` (wall-clock seconds; pass a :class:`FakeClock` to move it without sleeping). Every
request is kept as a :class:`Seen` (the key and account that served it, the status, which check refused it), and
:meth:`FakeKimi.account_counts` counts them per account, e.g. the 429s each account sent.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.parser
import email.policy
import hashlib
import ipaddress
import itertools
import json
import math
import random
import socket
import socketserver
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import httpx

__all__ = [
    "FakeClock",
    "FakeKimi",
    "FaultKind",
    "LoopbackTransport",
    "Refusal",
    "Reply",
    "SSEEvent",
    "Seen",
    "event_text",
    "expected_stream_text",
    "parse_sse",
    "sse_text",
]

FaultKind = Literal["reset_midstream", "trickle", "hang", "close_before_headers", "error_midstream"]
ScriptOn = Literal["inference", "probe"]
# Which of the fake's own admission checks refused an inference call (scripted replies are not refusals).
Refusal = Literal["rpm", "concurrency", "plan", "balance", "fraction"]
LimitStyle = Literal["open_platform", "kimi_code"]
PlanWindow = Literal["window", "weekly", "both"]
MshHeaders = Literal["never", "errors", "always"]

_FAULT_KINDS: frozenset[str] = frozenset(
    {"reset_midstream", "trickle", "hang", "close_before_headers", "error_midstream"}
)
# Faults that act before anything is answered, whatever the route or credential outcome.
_EARLY_FAULTS: tuple[FaultKind, ...] = ("hang", "close_before_headers")
# Faults that only make sense on a successful reply (they damage the body, not the status).
_BODY_FAULTS: tuple[FaultKind, ...] = ("reset_midstream", "trickle", "error_midstream")
_TRICKLE_INTERVAL = 1.0
_RESET_AFTER_EVENTS = 2

# Inference routes: the wire format decides the success body and the error envelope.
_INFERENCE_ROUTES: dict[tuple[str, str], Literal["openai", "anthropic"]] = {
    ("POST", "/v1/chat/completions"): "openai",
    ("POST", "/coding/v1/chat/completions"): "openai",
    ("POST", "/coding/v1/messages"): "anthropic",
    ("POST", "/anthropic/v1/messages"): "anthropic",
}
# Zero-token probes: requests that confirm a key (and its region or plan windows) without spending model tokens.
_PROBE_ROUTES: dict[tuple[str, str], Literal["models", "coding_models", "usages", "balance"]] = {
    ("GET", "/v1/models"): "models",
    ("GET", "/coding/v1/models"): "coding_models",
    ("GET", "/coding/v1/usages"): "usages",
    ("GET", "/v1/users/me/balance"): "balance",
}

_MAX_BODY = 32 * 1024 * 1024  # bounded memory per request; real prompts in tests are tiny
_MAX_EVENTS = 10_000
_MAX_INTERVAL = 60.0

# Open Platform file routes (answered only after enable_files()): /v1/files and /v1/files/{id}[/content].
_FILES_PREFIX = "/v1/files"

_OPENAI_MODELS = ("kimi-k3", "kimi-k2.6", "moonshot-v1-8k")
_CODING_MODELS = ("kimi-for-coding", "kimi-for-coding-highspeed")


class _PKI(Protocol):
    """What FakeKimi needs from tests/certs.py's TestPKI (kept structural so this module imports nothing local)."""

    @property
    def ca_cert(self) -> Path: ...
    @property
    def server_cert(self) -> Path: ...
    @property
    def server_key(self) -> Path: ...


# --------------------------------------------------------------------------------------------------------------------
# Canned replies
# --------------------------------------------------------------------------------------------------------------------


def _fmt_seconds(value: float | int | str) -> str:
    if isinstance(value, str):
        return value  # an HTTP-date, or a deliberately malformed value
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass
class Reply:
    """One canned answer.

    ``body=None`` with an error status builds the envelope matching the route (OpenAI
    ``{"error":{...}}`` or Anthropic ``{"type":"error","error":{...}}``) from ``error_type``/``message``; the
    ``anthropic_*`` fields override those on Anthropic routes, as Kimi uses different words there. A ``body`` given
    explicitly (dict → JSON, str/bytes → verbatim) is sent as is, e.g. the flattened ``{"errorMessage": ...}`` some
    gateways produce. A status below 400 without a body means "serve normally" (see :meth:`ok`).

    Messages may contain ``{account}`` and ``{ak}``; they are filled in at send time with the key's account and a
    fake access-key id, like the ``Your account {uid}<{ak-id}>`` text of real errors. No key material is ever echoed.
    """

    status: int = 200
    body: dict[str, Any] | list[Any] | bytes | str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    error_type: str | None = None
    message: str | None = None
    anthropic_error_type: str | None = None
    anthropic_message: str | None = None
    delay: float = 0.0  # seconds to wait before answering (stop-aware)

    @property
    def is_normal(self) -> bool:
        return self.status < 400 and self.body is None

    # -- constructors for Kimi's documented errors -------------------------------------------------------------

    @classmethod
    def ok(cls) -> Reply:
        """Normal service, for interleaving in a script: ``[Reply.rate_limit(), Reply.ok(), Reply.quota()]``."""
        return cls(200)

    @classmethod
    def error(
        cls,
        status: int,
        error_type: str,
        message: str,
        *,
        anthropic_error_type: str | None = None,
        anthropic_message: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        return cls(
            status=status,
            error_type=error_type,
            message=message,
            anthropic_error_type=anthropic_error_type,
            anthropic_message=anthropic_message,
            headers=dict(headers or {}),
        )

    @classmethod
    def rate_limit(
        cls,
        retry_after: float | str | None = None,
        *,
        after_seconds: int | None = 1,
        message: str | None = None,
        error_type: str = "rate_limit_reached_error",
    ) -> Reply:
        """429 ``rate_limit_reached_error`` (Open Platform RPM/TPM). ``retry_after`` sets the ``Retry-After``
        header (seconds or an HTTP-date string); ``after_seconds`` puts "please try again after N seconds" in the
        text (``None`` leaves it out), the most dependable signal on the Open Platform."""
        if message is None:
            message = "Your account {account}<{ak}> request reached organization max RPM: 3"
            if after_seconds is not None:
                message += f", please try again after {after_seconds} seconds"
        headers = {} if retry_after is None else {"Retry-After": _fmt_seconds(retry_after)}
        return cls.error(429, error_type, message, headers=headers)

    @classmethod
    def too_many_requests(cls, retry_after: float | str | None = None) -> Reply:
        """429 as Kimi Code words its concurrency / short-window limit (account scope, short cooldown)."""
        headers = {} if retry_after is None else {"Retry-After": _fmt_seconds(retry_after)}
        return cls.error(
            429,
            "rate_limit_reached_error",
            "We're receiving too many requests at the moment. Please wait a moment and try again.",
            headers=headers,
        )

    @classmethod
    def quota(cls, message: str | None = None) -> Reply:
        """429 ``exceeded_current_quota_error`` (Open Platform balance exhausted)."""
        return cls.error(
            429,
            "exceeded_current_quota_error",
            message
            or "Your account {account}<{ak}> is suspended due to insufficient balance, please recharge your account "
            "or check your plan and billing details",
        )

    @classmethod
    def billing(cls, message: str | None = None) -> Reply:
        """403 "reached your usage limit for this billing cycle" (Kimi Code 5-hour or weekly window)."""
        return cls.error(
            403,
            "permission_error",
            message
            or "You've reached your usage limit for this billing cycle. Your quota will be refreshed in the next "
            "cycle.",
        )

    @classmethod
    def membership(cls, message: str | None = None, error_type: str = "permission_error") -> Reply:
        """402 membership not verifiable (Kimi Code). Kimi documents no ``error.type`` for it; classify by text."""
        return cls.error(
            402,
            error_type,
            message
            or "We are unable to verify your membership benefits at this time. Please ensure your membership is "
            "active and try again.",
        )

    @classmethod
    def invalid(cls) -> Reply:
        """401 bad key, worded per envelope exactly as the fake answers an unknown credential."""
        return cls.error(
            401,
            "invalid_authentication_error",
            "Invalid Authentication",
            anthropic_error_type="authentication_error",
            anthropic_message="The API Key appears to be invalid or may have expired",
        )

    @classmethod
    def access_terminated(cls) -> Reply:
        """403 account banned by risk control (permanent, account scope)."""
        return cls.error(
            403,
            "access_terminated_error",
            "Access terminated. Your account has been found in violation of our terms. Review our Community "
            "Guidelines for details.",
        )

    @classmethod
    def coding_agents_only(cls) -> Reply:
        """403 client-identity gate (a User-Agent allowlist): client scope, every key gets the same answer."""
        return cls.error(
            403,
            "access_terminated_error",
            "Kimi For Coding is currently only available for Coding Agents such as Kimi CLI, Claude Code, "
            "Roo Code, Kilo Code, etc.",
        )

    @classmethod
    def overloaded(cls, retry_after: float | str | None = None) -> Reply:
        """429 "engine is currently overloaded". Kimi Code's Anthropic route words the type ``rate_limit_error``
        too, so only the message tells it apart from a real rate limit there."""
        headers = {} if retry_after is None else {"Retry-After": _fmt_seconds(retry_after)}
        return cls.error(
            429,
            "engine_overloaded_error",
            "The engine is currently overloaded, please try again later",
            anthropic_error_type="rate_limit_error",
            headers=headers,
        )

    @classmethod
    def server_error(cls, message: str | None = None) -> Reply:
        return cls.error(500, "server_error", message or "Internal server error, please try again later")

    @classmethod
    def unavailable(cls) -> Reply:
        return cls.error(503, "server_unavailable", "The server is temporarily unavailable, please try again later")

    @classmethod
    def content_filter(cls) -> Reply:
        """400 request-scope rejection: no penalty, no rotation."""
        return cls.error(400, "content_filter", "The request was rejected because it was considered high risk")

    @classmethod
    def not_found(cls, message: str = "Not found the model or Permission denied") -> Reply:
        return cls.error(404, "resource_not_found_error", message)

    # -- rendering -------------------------------------------------------------------------------------------------

    def render(self, anthropic: bool, account: str | None, key_name: str | None) -> tuple[bytes, dict[str, str]]:
        """Body bytes and headers for this reply on a route of the given format."""
        headers = {k.lower(): v for k, v in self.headers.items()}
        if self.body is not None:
            if isinstance(self.body, bytes):
                data = self.body
            elif isinstance(self.body, str):
                data = self.body.encode()
            else:
                data = json.dumps(self.body).encode()
            # Real error bodies are JSON even when a gateway mangles them; a test wanting otherwise sets the header.
            headers.setdefault("content-type", "application/json")
            return data, headers

        etype = (self.anthropic_error_type if anthropic else None) or self.error_type or "unknown_error"
        msg = (self.anthropic_message if anthropic else None) or self.message or "error"
        msg = msg.replace("{account}", account or "unknown").replace("{ak}", f"ak-{key_name or 'unknown'}")
        inner = {"type": etype, "message": msg}
        envelope: dict[str, Any] = {"type": "error", "error": inner} if anthropic else {"error": inner}
        headers.setdefault("content-type", "application/json")
        return json.dumps(envelope).encode(), headers


# --------------------------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Seen:
    """One request as the fake saw it. ``status`` is what the fake answered (``None``: no answer, e.g. a fault)."""

    method: str
    path: str  # as sent, including any query string
    host_header: str | None
    sni: str | None  # from the TLS handshake; None when the client sent none (e.g. it connected by IP)
    credential: str | None  # Bearer token if present, else x-api-key
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: bytes
    key_name: str | None  # registered name of the credential's key, None if unknown
    account: str | None = None
    conn_id: int = 0  # same number = same TCP/TLS connection (keep-alive reuse)
    at: float = 0.0  # time.monotonic() when the request head was read
    status: int | None = None
    fault: str | None = None  # fault kind applied to this request, if any
    refusal: Refusal | None = None  # the account-state check that refused it (a cap, the plan, the balance, …)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class SSEEvent:
    event: str | None
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


def parse_sse(raw: bytes | str) -> list[SSEEvent]:
    """Split an SSE body into events (enough of the spec for OpenAI and Anthropic streams; ignores comments)."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    out: list[SSEEvent] = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        event: str | None = None
        data: list[str] = []
        for line in block.split("\n"):
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        if event is not None or data:
            out.append(SSEEvent(event, "\n".join(data)))
    return out


def sse_text(events: Iterable[SSEEvent]) -> str:
    """The generated text of a stream in either format (OpenAI ``delta.content`` or Anthropic ``text_delta``)."""
    parts: list[str] = []
    for ev in events:
        if ev.data == "[DONE]" or not ev.data:
            continue
        obj = ev.json()
        if obj.get("type") == "content_block_delta":
            parts.append(obj["delta"].get("text", ""))
        else:
            for choice in obj.get("choices", []):
                parts.append(choice.get("delta", {}).get("content") or "")
    return "".join(parts)


def event_text(name: str, seq: int) -> str:
    """Text of streamed content event ``seq`` (1-based) for the key named ``name``."""
    return f"ok {name} #{seq}\n"


def expected_stream_text(name: str, events: int) -> str:
    return "".join(event_text(name, i) for i in range(1, events + 1))


# --------------------------------------------------------------------------------------------------------------------
# Internal state
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Key:
    key: str
    name: str
    account: str
    hosts: frozenset[str] | None  # None: valid on every host; else the Host names it is valid on (region tests)


@dataclass
class _Limit:
    rpm: int | None
    concurrency: int | None
    window: float
    retry_after_header: bool
    style: LimitStyle = "open_platform"
    ratelimit_headers: bool = False
    stamps: deque[float] = field(default_factory=deque)


@dataclass
class _PlanWindow:
    """One Kimi Code quota window: ``used`` of ``limit`` until ``reset_at`` (clock seconds), then a fresh period."""

    limit: int
    used: int
    period: float
    reset_at: float

    def roll(self, now: float) -> None:
        if now >= self.reset_at:
            self.used = 0
            self.reset_at += self.period * (math.floor((now - self.reset_at) / self.period) + 1)

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)

    def detail(self) -> dict[str, str]:
        # Numbers as decimal strings, as the real endpoint sends them.
        return {
            "limit": str(self.limit),
            "used": str(self.used),
            "remaining": str(self.remaining),
            "resetTime": _iso(dt.datetime.fromtimestamp(self.reset_at, dt.UTC)),
        }


@dataclass
class _Plan:
    window: _PlanWindow  # the rolling 5-hour window (``limits[0]`` of /usages)
    weekly: _PlanWindow  # the weekly quota (top-level ``usage`` of /usages)
    cost: int  # units one admitted inference call spends from both
    level: str


@dataclass
class _Wallet:
    available: float
    charge: float | None  # None: the balance is only reported; a number: enforced, and spent per admitted call


@dataclass
class _AccountMeta:
    org_id: str | None
    gid: str | None


@dataclass
class _File:
    id: str
    account: str
    filename: str
    purpose: str
    content: bytes
    content_type: str
    created_at: int


@dataclass
class _Fault:
    key: str | None
    kind: FaultKind
    remaining: int | None  # None: until clear_faults()


@dataclass
class _Usage:
    limit: int = 100
    weekly_remaining: int = 75
    window_remaining: int = 85
    weekly_reset: dt.datetime | None = None
    window_reset: dt.datetime | None = None


class _Stopped(Exception):
    """Raised inside a handler when the fake is shutting down mid-answer."""


class _Abort(Exception):
    """Raised inside a handler after it cut the connection on purpose (a fault)."""


def _hostname(host_header: str | None) -> str:
    if not host_header:
        return ""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _credential(headers: Mapping[str, str]) -> str | None:
    # Bearer wins over x-api-key, as Claude Code's token (sent as Bearer) wins over its key (sent as x-api-key).
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return auth[7:].strip()
    return headers.get("x-api-key") or None


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _openai_usage(prompt: int, completion: int, cached: int | None) -> dict[str, int]:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cached is not None:
        usage["cached_tokens"] = cached  # Kimi puts it at the top of usage (kimi-api.md §6); included in prompt
    return usage


def _anthropic_usage(prompt: int, output: int, cached: int | None) -> dict[str, int]:
    if cached is None:
        return {"input_tokens": prompt, "output_tokens": output}
    # Anthropic's counting: input_tokens is the uncached part only.
    return {"input_tokens": prompt - cached, "output_tokens": output, "cache_read_input_tokens": cached}


def _file_object(f: _File) -> dict[str, Any]:
    return {
        "id": f.id,
        "object": "file",
        "bytes": len(f.content),
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "ok",
        "status_details": "",
    }


# --------------------------------------------------------------------------------------------------------------------
# Server plumbing
# --------------------------------------------------------------------------------------------------------------------


class _Server(socketserver.TCPServer):
    # TCPServer, not HTTPServer: HTTPServer.server_bind does a reverse-DNS getfqdn(), which can stall in sandboxes.
    allow_reuse_address = True
    request_queue_size = 512  # listen backlog: 64 clients connecting at once must not hit SYN retransmits

    def __init__(self, fake: FakeKimi) -> None:
        self.fake = fake
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # The accept thread only hands the raw socket over; TLS handshakes run in the per-connection thread so a
        # client that never finishes one cannot block accept().
        self.fake._spawn(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # connection errors are expected (faults, client aborts); never spam test output


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive by default
    disable_nagle_algorithm = True  # each SSE event must leave at once, not wait for the previous one's ACK
    server_version = "fakekimi"
    sys_version = ""
    server: _Server
    request: ssl.SSLSocket

    def setup(self) -> None:
        fake = self.server.fake
        super().setup()
        # Bounds an idle keep-alive connection and a client that stops reading a stream.
        self.connection.settimeout(fake.idle_timeout)
        self.conn_id, self.sni = fake._conn_info(self.request)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._guarded()

    def do_POST(self) -> None:
        self._guarded()

    def do_PUT(self) -> None:
        self._guarded()

    def do_PATCH(self) -> None:
        self._guarded()

    def do_DELETE(self) -> None:
        self._guarded()

    def do_OPTIONS(self) -> None:
        self._guarded()

    # -- low-level I/O -------------------------------------------------------------------------------------------

    def _guarded(self) -> None:
        try:
            self._dispatch()
        except (_Abort, _Stopped):
            self.close_connection = True

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            parts: list[bytes] = []
            total = 0
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                total += size
                if total > _MAX_BODY:
                    raise _Abort
                parts.append(self.rfile.read(size))
                self.rfile.readline(8)
        length = int(self.headers.get("content-length") or 0)
        if length > _MAX_BODY:
            raise _Abort
        return self.rfile.read(length) if length else b""

    def _cut(self) -> None:
        """Drop the connection on purpose: FIN without TLS close_notify or a chunked terminator, so the client
        sees a truncated message rather than a clean end."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.request, socket.SHUT_RDWR)
        raise _Abort

    def _wait(self, seconds: float) -> None:
        if seconds > 0 and self.server.fake._stop.wait(seconds):
            raise _Stopped

    def _head(self, status: int, headers: Mapping[str, str], seen: Seen) -> None:
        seen.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _send(self, status: int, body: bytes, headers: Mapping[str, str], seen: Seen) -> None:
        h = dict(headers)
        h["content-length"] = str(len(body))
        self._head(status, h, seen)
        self.wfile.write(body)

    def _send_json(self, status: int, obj: Any, seen: Seen, extra: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"content-type": "application/json", **(extra or {})}, seen)

    def _chunk(self, data: bytes) -> None:
        # One event per chunk, written straight to the socket (wbufsize=0), so each event is flushed on its own.
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    # -- request handling ----------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        fake = self.server.fake
        self._extra_headers: dict[str, str] = {}  # per request: X-RateLimit-* from admission
        at = time.monotonic()
        body = self._read_body()
        headers: dict[str, str] = {}
        for k, v in self.headers.items():
            lk = k.lower()
            headers[lk] = f"{headers[lk]}, {v}" if lk in headers else v
        host_header = self.headers.get("host")
        hostname = _hostname(host_header)
        cred = _credential(headers)
        key = fake._lookup(cred)
        seen = Seen(
            method=self.command,
            path=self.path,
            host_header=host_header,
            sni=self.sni,
            credential=cred,
            headers=headers,
            body=body,
            key_name=key.name if key else None,
            account=key.account if key else None,
            conn_id=self.conn_id,
            at=at,
        )
        fake._record(seen)

        if fake.echo or hostname == "echo.test":
            self._echo(seen)
            return

        early = fake._take_fault(cred, _EARLY_FAULTS)
        if early is not None:
            seen.fault = early
            if early == "hang":
                self._wait(fake.hang_cap)
            self._cut()

        path = urlsplit(self.path).path or "/"
        anthropic = "/messages" in path
        fmt = _INFERENCE_ROUTES.get((self.command, path))
        probe = _PROBE_ROUTES.get((self.command, path))
        files = fake._files_on and (path == _FILES_PREFIX or path.startswith(_FILES_PREFIX + "/"))
        if fmt is None and probe is None and not files:
            # Unknown path (e.g. count_tokens) → 404 without looking at the credential; the real service's order
            # is unknown and a 404 here must never be mistaken for a key problem.
            self._reply(Reply.error(404, "resource_not_found_error", "method not found"), anthropic, key, seen)
            return

        if key is None or (key.hosts is not None and hostname not in key.hosts):
            self._reply(Reply.invalid(), anthropic, key, seen)
            return
        if files:
            self._files(path, key, seen)  # not scripted, not rate limited
            return

        scripted = fake._next_script(key, "inference" if fmt else "probe")
        if scripted is not None and not scripted.is_normal:
            self._wait(scripted.delay)
            self._reply(scripted, anthropic, key, seen)
            return
        if scripted is not None:
            self._wait(scripted.delay)

        if probe is not None:
            self._probe(probe, key, seen)
            return
        assert fmt is not None

        refusal, self._extra_headers = fake._admit(key)
        if refusal is not None:
            seen.refusal, reply = refusal
            self._reply(reply, anthropic, key, seen)
            return
        try:
            self._inference(fmt, key, seen)
        finally:
            fake._release(key)

    def _reply(self, reply: Reply, anthropic: bool, key: _Key | None, seen: Seen) -> None:
        fake = self.server.fake
        data, headers = reply.render(anthropic, key.account if key else None, key.name if key else None)
        for k, v in self._extra_headers.items():
            headers.setdefault(k, v)
        if fake.msh_headers != "never":
            # Real errors carry Msh-Uid (which groups keys by account); an unknown key has no account to report.
            if key is not None:
                for k, v in fake._msh_headers(key).items():
                    headers.setdefault(k, v)
            headers.setdefault("msh-request-id", uuid.uuid4().hex)
        self._send(reply.status, data, headers, seen)

    def _success_headers(self, key: _Key) -> dict[str, str]:
        fake = self.server.fake
        if fake.msh_headers != "always":
            return dict(self._extra_headers)
        return {**self._extra_headers, **fake._msh_headers(key), "msh-request-id": uuid.uuid4().hex}

    def _files(self, path: str, key: _Key, seen: Seen) -> None:
        fake = self.server.fake
        parts = path[len(_FILES_PREFIX) :].strip("/").split("/")
        extra = self._success_headers(key)
        if parts == [""]:
            if self.command == "POST":
                self._upload(key, seen, extra)
            elif self.command == "GET":
                listing = [_file_object(f) for f in fake._files_of(key.account)]
                self._send_json(200, {"object": "list", "data": listing}, seen, extra)
            else:
                self._reply(Reply.not_found("method not found"), False, key, seen)
            return
        f = fake._file_for(parts[0], key.account)
        if f is None or len(parts) > 2 or (len(parts) == 2 and parts[1] != "content"):
            # Another account's file is indistinguishable from a missing one (see enable_files).
            self._reply(Reply.not_found(f"file {parts[0]} not found"), False, key, seen)
        elif len(parts) == 2 and self.command == "GET":
            body = {
                "content": f.content.decode("utf-8", "replace"),
                "file_type": f.content_type,
                "filename": f.filename,
                "title": "",
                "type": "file",
            }
            self._send_json(200, body, seen, extra)
        elif len(parts) == 1 and self.command == "GET":
            self._send_json(200, _file_object(f), seen, extra)
        elif len(parts) == 1 and self.command == "DELETE":
            fake._drop_file(f.id)
            self._send_json(200, {"deleted": True, "id": f.id, "object": "file"}, seen, extra)
        else:
            self._reply(Reply.not_found("method not found"), False, key, seen)

    def _upload(self, key: _Key, seen: Seen, extra: Mapping[str, str]) -> None:
        ctype = seen.headers.get("content-type", "")
        form: dict[str, tuple[str | None, str, bytes]] = {}  # field -> (filename, content type, bytes)
        if ctype.lower().startswith("multipart/form-data"):
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + ctype.encode("latin-1") + b"\r\n\r\n" + seen.body
            )
            for part in msg.iter_parts() if msg.is_multipart() else ():
                name = part.get_param("name", header="content-disposition")
                payload = part.get_payload(decode=True)
                if isinstance(name, str) and isinstance(payload, bytes):
                    form[name] = (part.get_filename(), part.get_content_type(), payload)
        upload = form.get("file")
        if upload is None:
            message = "Invalid request: upload a file as multipart/form-data field 'file'"
            self._reply(Reply.error(400, "invalid_request_error", message), False, key, seen)
            return
        filename, content_type, content = upload
        purpose = form.get("purpose", (None, "", b"file-extract"))[2].decode("utf-8", "replace")
        f = self.server.fake._add_file(key.account, filename or "upload", purpose, content, content_type)
        self._send_json(200, _file_object(f), seen, extra)

    def _echo(self, seen: Seen) -> None:
        self._send_json(
            200,
            {
                "echo": True,
                "method": seen.method,
                "path": seen.path,
                "host": seen.host_header,
                "sni": seen.sni,
                "headers": seen.headers,
                "body": seen.body.decode("utf-8", "replace"),
            },
            seen,
        )

    def _probe(self, probe: str, key: _Key, seen: Seen) -> None:
        fake = self.server.fake
        extra = self._success_headers(key)
        if probe in ("models", "coding_models"):
            ids = _CODING_MODELS if probe == "coding_models" else _OPENAI_MODELS
            data = [
                {
                    "id": mid,
                    "object": "model",
                    "created": 1767225600,
                    "owned_by": "moonshot",
                    "context_length": 262144,
                    "display_name": mid,
                    "supports_reasoning": True,
                    "supports_image_in": True,
                    "supports_video_in": False,
                }
                for mid in ids
            ]
            self._send_json(200, {"object": "list", "data": data}, seen, extra)
        elif probe == "usages":
            self._send_json(200, fake._usage_body(key.account), seen, extra)
        else:
            bal = fake.balance(key.account)
            body = {
                "code": 0,
                "data": {"available_balance": bal, "voucher_balance": 0.0, "cash_balance": bal},
                "scode": "0x0",
                "status": True,
            }
            self._send_json(200, body, seen, extra)

    def _inference(self, fmt: Literal["openai", "anthropic"], key: _Key, seen: Seen) -> None:
        fake = self.server.fake
        anthropic = fmt == "anthropic"
        try:
            req = json.loads(seen.body or b"null")
        except ValueError:
            req = None
        if not isinstance(req, dict):
            self._reply(
                Reply.error(400, "invalid_request_error", "Invalid request: the body is not a JSON object"),
                anthropic,
                key,
                seen,
            )
            return
        model = str(req.get("model") or ("kimi-for-coding" if anthropic else "kimi-k2.6"))
        try:
            events = max(0, min(_MAX_EVENTS, int(seen.headers.get("x-fake-events", fake.events))))
            interval = max(0.0, min(_MAX_INTERVAL, float(seen.headers.get("x-fake-interval", fake.interval))))
            delay = max(0.0, min(_MAX_INTERVAL, float(seen.headers.get("x-fake-delay", 0))))
        except ValueError:
            self._reply(Reply.error(400, "invalid_request_error", "bad x-fake-* header"), anthropic, key, seen)
            return
        self._wait(delay)
        fault = fake._take_fault(key.key, _BODY_FAULTS)
        seen.fault = fault
        prompt_tokens = max(1, len(seen.body) // 4)
        cached = fake._cached_tokens(key, req, prompt_tokens)
        if req.get("stream") is True:
            if fault == "trickle":
                interval = _TRICKLE_INTERVAL
            include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
            self._stream(fmt, key, seen, model, events, interval, fault, prompt_tokens, include_usage, cached)
        else:
            self._complete(fmt, key, seen, model, fault, prompt_tokens, cached)

    def _complete(
        self,
        fmt: Literal["openai", "anthropic"],
        key: _Key,
        seen: Seen,
        model: str,
        fault: FaultKind | None,
        prompt_tokens: int,
        cached: int | None,
    ) -> None:
        text = f"ok {key.name}"
        if fault == "error_midstream":
            # No body to interrupt: the nearest equivalent is a server error before the first byte.
            self._reply(Reply.server_error(), fmt == "anthropic", key, seen)
            return
        if fmt == "openai":
            obj: dict[str, Any] = {
                "id": f"chatcmpl-fake-{uuid.uuid4().hex[:12]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": _openai_usage(prompt_tokens, 2, cached),
            }
        else:
            obj = {
                "id": f"msg_fake_{uuid.uuid4().hex[:12]}",
                "type": "message",
                "role": "assistant",
                "content": [{"type": "text", "text": text}],
                "model": model,
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": _anthropic_usage(prompt_tokens, 2, cached),
            }
        data = json.dumps(obj).encode()
        headers = {"content-type": "application/json", **self._success_headers(key)}
        if fault in ("reset_midstream", "trickle"):
            # Promise the full length, deliver half: a truncated body (reset) or a slow one (trickle).
            headers["content-length"] = str(len(data))
            self._head(200, headers, seen)
            half = len(data) // 2
            self.wfile.write(data[:half])
            if fault == "reset_midstream":
                self._cut()
            self._wait(_TRICKLE_INTERVAL)
            self.wfile.write(data[half:])
            return
        self._send(200, data, headers, seen)

    def _stream(
        self,
        fmt: Literal["openai", "anthropic"],
        key: _Key,
        seen: Seen,
        model: str,
        events: int,
        interval: float,
        fault: FaultKind | None,
        prompt_tokens: int,
        include_usage: bool,
        cached: int | None,
    ) -> None:
        headers = {
            "content-type": "text/event-stream",
            "cache-control": "no-cache",
            "transfer-encoding": "chunked",
            **self._success_headers(key),
        }
        self._head(200, headers, seen)
        created = int(time.time())
        cid = f"chatcmpl-fake-{uuid.uuid4().hex[:12]}"
        mid = f"msg_fake_{uuid.uuid4().hex[:12]}"

        def oa(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            choice.update(extra.pop("choice_extra", {}))
            obj = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [choice],
                **extra,
            }
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        def an(name: str, obj: dict[str, Any]) -> bytes:
            return b"event: " + name.encode() + b"\ndata: " + json.dumps(obj).encode() + b"\n\n"

        # Preamble goes out with the headers, like the real role chunk / message_start.
        if fmt == "openai":
            self._chunk(oa({"role": "assistant", "content": ""}))
        else:
            start_msg: dict[str, Any] = {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": model,
                "stop_reason": None,
                "stop_sequence": None,
                "usage": _anthropic_usage(prompt_tokens, 1, cached),
            }
            self._chunk(an("message_start", {"type": "message_start", "message": start_msg}))
            self._chunk(
                an(
                    "content_block_start",
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                )
            )

        for seq in range(1, events + 1):
            self._wait(interval)
            text = event_text(key.name, seq)
            if fmt == "openai":
                self._chunk(oa({"content": text}))
            else:
                delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
                self._chunk(an("content_block_delta", delta))
            if seq in (_RESET_AFTER_EVENTS, events):
                if fault == "reset_midstream":
                    self._cut()
                if fault == "error_midstream":
                    err = {"type": "server_error", "message": "The stream was interrupted by the server"}
                    if fmt == "openai":
                        self._chunk(b"data: " + json.dumps({"error": err}).encode() + b"\n\n")
                    else:
                        self._chunk(an("error", {"type": "error", "error": err}))
                    self._chunk(b"")  # a clean end of the HTTP message, but no [DONE] / message_stop
                    return
        if events == 0 and fault == "reset_midstream":
            self._cut()

        usage = _openai_usage(prompt_tokens, events, cached)
        if fmt == "openai":
            if include_usage:
                self._chunk(oa({}, "stop", usage=usage))
            else:
                self._chunk(oa({}, "stop", choice_extra={"usage": usage}))  # legacy: in the finish_reason chunk
            self._chunk(b"data: [DONE]\n\n")
        else:
            self._chunk(an("content_block_stop", {"type": "content_block_stop", "index": 0}))
            self._chunk(
                an(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                        "usage": {"output_tokens": events},
                    },
                )
            )
            self._chunk(an("message_stop", {"type": "message_stop"}))
        self._chunk(b"")  # zero-length chunk: end of the chunked body


# --------------------------------------------------------------------------------------------------------------------
# The fake
# --------------------------------------------------------------------------------------------------------------------


class FakeClock:
    """A settable wall clock (epoch seconds) for ``FakeKimi(clock=...)`` or ``fake.clock = ...``: rate-limit windows,
    plan windows and reset times follow it, so a test moves time with :meth:`advance` instead of sleeping."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


class FakeKimi:
    """A scriptable Kimi / Moonshot upstream on ``https://127.0.0.1:<port>``.

    ``with FakeKimi(pki) as fake: fake.add_key("sk-…", account="a1", name="k1")``. With ``echo=True`` every
    request is echoed (a stand-in for unrelated HTTPS traffic); without it, only Host ``echo.test`` is.
    """

    def __init__(
        self,
        pki: _PKI,
        *,
        echo: bool = False,
        events: int = 5,
        interval: float = 0.2,
        msh_headers: MshHeaders = "errors",
        hang_cap: float = 30.0,
        max_connections: int = 512,
        idle_timeout: float = 60.0,
        handshake_timeout: float = 10.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.pki = pki
        # Wall-clock seconds for every window and reset time; reset() puts back the one given here.
        self._default_clock: Callable[[], float] = clock or time.time
        self.clock: Callable[[], float] = self._default_clock
        self.echo = echo
        self.events = events
        self.interval = interval
        self.msh_headers: MshHeaders = msh_headers
        self.hang_cap = hang_cap
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout

        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._conn_ids = itertools.count(1)
        self._handshakes = 0  # TLS handshakes completed since the last reset()
        self._sni: dict[int, str] = {}
        self._conn_meta: dict[int, tuple[int, str | None]] = {}
        self._socks: set[ssl.SSLSocket] = set()
        self._threads: set[threading.Thread] = set()
        self._server: _Server | None = None
        self._accept_thread: threading.Thread | None = None

        self._keys: dict[str, _Key] = {}
        self._names: dict[str, str] = {}  # name -> key, to keep names unique
        self._requests: list[Seen] = []
        self._scripts: dict[tuple[str, str, ScriptOn], deque[Reply]] = {}
        self._faults: list[_Fault] = []
        self._limits: dict[str, _Limit] = {}
        self._inflight: dict[str, int] = {}
        self._peak: dict[str, int] = {}
        self._fraction = 0.0
        self._fraction_accounts: frozenset[str] | None = None
        self._fraction_retry_after: float | None = 1
        self._rng = random.Random()
        self._usage: dict[str, _Usage] = {}
        self._balances: dict[str, _Wallet] = {}
        self._plans: dict[str, _Plan] = {}
        self._accounts: dict[str, _AccountMeta] = {}
        self._cache_accounts: frozenset[str] | None = None
        self._cache_on = False
        self._cache: dict[str, set[str]] = {}  # account -> hashes of every prefix it has served
        self._cache_hits: dict[str, int] = {}
        self._files_on = False
        self._files: dict[str, _File] = {}

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        ctx.set_alpn_protocols(["http/1.1"])  # never let a client negotiate h2: this server speaks HTTP/1.1 only
        ctx.sni_callback = self._on_sni
        self._ssl_ctx = ctx

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def start(self) -> FakeKimi:
        if self._server is not None:
            return self
        self._stop.clear()
        self._server = _Server(self)
        # A short poll interval is what makes shutdown() (and so close()) return quickly.
        self._accept_thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fakekimi-accept", daemon=True
        )
        self._accept_thread.start()
        return self

    def close(self) -> None:
        server = self._server
        if server is None:
            return
        self._stop.set()  # wakes every hang / inter-event wait
        server.shutdown()
        server.server_close()
        with self._lock:
            socks = list(self._socks)
            threads = list(self._threads)
        for s in socks:
            # Shut the fd down rather than close it: the owning thread closes it, so no fd can be reused under it.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(s, socket.SHUT_RDWR)
        deadline = time.monotonic() + 0.8
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if self._accept_thread is not None:
            self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        self._server = None

    def __enter__(self) -> FakeKimi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeKimi is not running")
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def handshakes(self) -> int:
        """TLS handshakes completed since the last reset(): how many connections clients opened."""
        with self._lock:
            return self._handshakes

    @property
    def live_connections(self) -> int:
        with self._lock:
            return len(self._socks)

    # -- connection threads ----------------------------------------------------------------------------------------

    def _on_sni(self, sock: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
        # Called during the handshake with the SSLSocket being handshaken; park the name for _conn_info.
        if server_name is not None:
            with self._lock:
                self._sni[id(sock)] = server_name

    def _spawn(self, raw: socket.socket) -> None:
        if self._stop.is_set() or not self._slots.acquire(blocking=False):
            # Over the connection cap: refuse rather than queue, so load can never grow threads without bound.
            raw.close()
            return
        server = self._server
        if server is None:
            raw.close()
            self._slots.release()
            return
        t = threading.Thread(target=self._serve_conn, args=(raw, server), name="fakekimi-conn", daemon=True)
        with self._lock:
            self._threads.add(t)
        t.start()

    def _serve_conn(self, raw: socket.socket, server: _Server) -> None:
        tls: ssl.SSLSocket | None = None
        try:
            raw.settimeout(self.handshake_timeout)
            tls = self._ssl_ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            with self._lock:
                self._socks.add(tls)
            if self._stop.is_set():  # close() may have taken its snapshot before we registered
                return
            tls.do_handshake()
            with self._lock:
                sni = self._sni.pop(id(tls), None)
                self._conn_meta[id(tls)] = (next(self._conn_ids), sni)
                self._handshakes += 1
            _Handler(tls, tls.getpeername(), server)
        except Exception:
            pass  # handshake failures, resets, faults and shutdown all end up here; the client sees the effect
        finally:
            with self._lock:
                if tls is not None:
                    self._socks.discard(tls)
                    self._sni.pop(id(tls), None)
                    self._conn_meta.pop(id(tls), None)
                self._threads.discard(threading.current_thread())
            with contextlib.suppress(OSError):
                (tls or raw).close()
            self._slots.release()

    def _conn_info(self, sock: ssl.SSLSocket) -> tuple[int, str | None]:
        with self._lock:
            return self._conn_meta.get(id(sock), (0, None))

    # -- keys and scripting ----------------------------------------------------------------------------------------

    def add_key(
        self, key: str, account: str = "a1", name: str | None = None, hosts: Iterable[str] | None = None
    ) -> str:
        """Register a key; returns its name (default ``k<n>``). ``hosts`` limits the Host names it is valid on
        (others get 401), to imitate China vs global keys; by default it works everywhere."""
        with self._lock:
            if name is None:
                name = f"k{len(self._keys) + 1}"
                while name in self._names:
                    name += "_"
            old = self._keys.get(key)
            if old is not None:
                self._names.pop(old.name, None)
            if name in self._names and self._names[name] != key:
                raise ValueError(f"key name {name!r} already used")
            self._keys[key] = _Key(key, name, account, frozenset(h.lower() for h in hosts) if hosts else None)
            self._names[name] = key
            return name

    def remove_key(self, key: str) -> None:
        with self._lock:
            old = self._keys.pop(key, None)
            if old is not None:
                self._names.pop(old.name, None)

    def key_name(self, key: str) -> str | None:
        with self._lock:
            k = self._keys.get(key)
            return k.name if k else None

    def _lookup(self, cred: str | None) -> _Key | None:
        if cred is None:
            return None
        with self._lock:
            return self._keys.get(cred)

    def script(self, key: str, replies: Iterable[Reply], on: ScriptOn = "inference") -> None:
        """Queue canned replies for the next requests made with ``key`` (appended to any still queued).
        ``on="inference"`` (default) applies them to chat/messages calls only, so a /models or /usages probe
        does not eat a reply meant for a completion; ``on="probe"`` applies them to the probe routes."""
        with self._lock:
            self._scripts.setdefault(("key", key, on), deque()).extend(replies)

    def script_account(self, account: str, replies: Iterable[Reply], on: ScriptOn = "inference") -> None:
        """Like :meth:`script` but for any key of ``account``; a key's own script is served first."""
        with self._lock:
            self._scripts.setdefault(("account", account, on), deque()).extend(replies)

    def pending_script(self, key: str, on: ScriptOn = "inference") -> int:
        with self._lock:
            return len(self._scripts.get(("key", key, on), ()))

    def _next_script(self, key: _Key, on: ScriptOn) -> Reply | None:
        with self._lock:
            for scope in (("key", key.key, on), ("account", key.account, on)):
                q = self._scripts.get(scope)
                if q:
                    return q.popleft()
        return None

    # -- rate limits -------------------------------------------------------------------------------------------------

    def set_limit(
        self,
        account: str,
        rpm: int | None = None,
        *,
        concurrency: int | None = None,
        window: float = 60.0,
        retry_after_header: bool = True,
        style: LimitStyle = "open_platform",
        ratelimit_headers: bool = False,
    ) -> None:
        """Enforce an account-wide limit on inference calls, as Kimi does (its limits are per account, not per key):
        at most ``rpm`` admitted requests per sliding ``window`` seconds of :attr:`clock`, and/or ``concurrency`` in
        flight (an open stream counts until its last byte). Excess → 429 rate_limit_reached_error with "please try
        again after N seconds" (N = when the window frees a slot) and, unless disabled, the same N in Retry-After.
        Refused requests do not count. Probes are not limited.

        ``style="kimi_code"`` words both refusals as Kimi Code does ("We're receiving too many requests…", no number,
        Retry-After 1). ``ratelimit_headers=True`` adds ``X-RateLimit-Limit/-Remaining/-Reset`` (Reset in seconds;
        Kimi's real format is unknown) for the RPM cap to answers and refusals."""
        with self._lock:
            self._limits[account] = _Limit(rpm, concurrency, window, retry_after_header, style, ratelimit_headers)

    def clear_limits(self) -> None:
        with self._lock:
            self._limits.clear()
            self._fraction = 0.0

    def rate_limit_fraction(
        self,
        fraction: float,
        seed: int | None = None,
        account: str | Iterable[str] | None = None,
        retry_after: float | None = 1,
    ) -> None:
        """Refuse about ``fraction`` of inference calls with 429 rate_limit_reached_error ("... organization rate
        limit, please try again after 1 seconds", naming no cap; Retry-After ``retry_after`` unless None), for the
        given account(s) or all. Seeded for reproducibility (the sequence is fixed; which concurrent request draws
        which number is not)."""
        with self._lock:
            self._fraction = fraction
            self._rng = random.Random(seed)
            if account is None:
                self._fraction_accounts = None
            elif isinstance(account, str):
                self._fraction_accounts = frozenset({account})
            else:
                self._fraction_accounts = frozenset(account)
            self._fraction_retry_after = retry_after

    def _admit(self, key: _Key) -> tuple[tuple[Refusal, Reply] | None, dict[str, str]]:
        """Admit an inference call (counting it) or refuse it (why, and the answer); also the X-RateLimit headers to
        send either way."""
        now = self.clock()
        with self._lock:
            plan = self._plans.get(key.account)
            if plan is not None:
                plan.window.roll(now)
                plan.weekly.roll(now)
                if plan.window.remaining <= 0 or plan.weekly.remaining <= 0:
                    return ("plan", Reply.billing()), {}
            wallet = self._balances.get(key.account)
            if wallet is not None and wallet.charge is not None and wallet.available <= 0:
                return ("balance", Reply.quota()), {}
            lim = self._limits.get(key.account)
            rate_headers: dict[str, str] = {}
            if lim is not None:
                if lim.rpm is not None:
                    while lim.stamps and lim.stamps[0] <= now - lim.window:
                        lim.stamps.popleft()
                if lim.concurrency is not None and self._inflight.get(key.account, 0) >= lim.concurrency:
                    message = (
                        "Your account {account}<{ak}> request reached organization max concurrency: "
                        f"{lim.concurrency}, please try again after 1 seconds"
                    )
                    return ("concurrency", self._limit_refusal(lim, 1, message)), self._rate_headers(lim, now)
                if lim.rpm is not None and len(lim.stamps) >= lim.rpm:
                    wait = max(1, math.ceil(lim.stamps[0] + lim.window - now))
                    message = (
                        "Your account {account}<{ak}> request reached organization max RPM: "
                        f"{lim.rpm}, please try again after {wait} seconds"
                    )
                    return ("rpm", self._limit_refusal(lim, wait, message)), self._rate_headers(lim, now)
            if (
                self._fraction > 0
                and (self._fraction_accounts is None or key.account in self._fraction_accounts)
                and self._rng.random() < self._fraction
            ):
                # Random refusals name no cap: a number would teach the proxy a cap the account does not have.
                message = "Your account {account}<{ak}> request reached organization rate limit, please try again " \
                          "after 1 seconds"
                return ("fraction", Reply.rate_limit(self._fraction_retry_after, message=message)), {}
            if lim is not None and lim.rpm is not None:
                lim.stamps.append(now)
                rate_headers = self._rate_headers(lim, now)
            if plan is not None:
                plan.window.used += plan.cost
                plan.weekly.used += plan.cost
            if wallet is not None and wallet.charge is not None:
                wallet.available = round(wallet.available - wallet.charge, 6)
            n = self._inflight.get(key.account, 0) + 1
            self._inflight[key.account] = n
            self._peak[key.account] = max(self._peak.get(key.account, 0), n)
        return None, rate_headers

    @staticmethod
    def _limit_refusal(lim: _Limit, wait: int, message: str) -> Reply:
        if lim.style == "kimi_code":
            return Reply.too_many_requests(1 if lim.retry_after_header else None)
        return Reply.rate_limit(wait if lim.retry_after_header else None, message=message)

    @staticmethod
    def _rate_headers(lim: _Limit, now: float) -> dict[str, str]:
        if not lim.ratelimit_headers or lim.rpm is None:
            return {}
        reset = math.ceil(lim.stamps[0] + lim.window - now) if lim.stamps else 0
        return {
            "x-ratelimit-limit": str(lim.rpm),
            "x-ratelimit-remaining": str(max(0, lim.rpm - len(lim.stamps))),
            "x-ratelimit-reset": str(max(0, reset)),
        }

    def _release(self, key: _Key) -> None:
        with self._lock:
            self._inflight[key.account] = max(0, self._inflight.get(key.account, 0) - 1)

    def inflight(self, account: str) -> int:
        """Inference calls of ``account`` currently being answered."""
        with self._lock:
            return self._inflight.get(account, 0)

    def peak_inflight(self, account: str) -> int:
        """Most inference calls of ``account`` ever answered at once (reset by :meth:`reset`): lets a load test
        check that the proxy caps per-account concurrency."""
        with self._lock:
            return self._peak.get(account, 0)

    # -- probe state ---------------------------------------------------------------------------------------------

    def set_usage(
        self,
        account: str,
        *,
        weekly_remaining: int = 75,
        window_remaining: int = 85,
        limit: int = 100,
        weekly_reset: dt.datetime | None = None,
        window_reset: dt.datetime | None = None,
    ) -> None:
        """What ``GET /coding/v1/usages`` reports for the account (defaults: quota left, resets in 3 d / 2 h)."""
        with self._lock:
            self._usage[account] = _Usage(limit, weekly_remaining, window_remaining, weekly_reset, window_reset)

    def set_plan(
        self,
        account: str,
        *,
        window_limit: int = 100,
        weekly_limit: int = 1000,
        window_used: int = 0,
        weekly_used: int = 0,
        window_reset_in: float | None = None,
        weekly_reset_in: float | None = None,
        window_seconds: float = 5 * 3600,
        week_seconds: float = 7 * 86400,
        cost: int = 1,
        level: str = "LEVEL_INTERMEDIATE",
    ) -> None:
        """Give ``account`` a live Kimi Code plan: each admitted inference call spends ``cost`` from a rolling
        5-hour window and a weekly quota; when either has nothing left, inference gets 403 "reached your usage
        limit for this billing cycle" until that window resets. A window resets ``*_reset_in`` seconds from now
        (default: a full period) on :attr:`clock`, then every period after, or at once by :meth:`refresh_plan`.
        ``GET /coding/v1/usages`` then reports both windows (limit/used/remaining/resetTime); this replaces
        :meth:`set_usage` for the account."""
        now = self.clock()
        with self._lock:
            self._plans[account] = _Plan(
                window=_PlanWindow(
                    window_limit,
                    window_used,
                    window_seconds,
                    now + (window_seconds if window_reset_in is None else window_reset_in),
                ),
                weekly=_PlanWindow(
                    weekly_limit,
                    weekly_used,
                    week_seconds,
                    now + (week_seconds if weekly_reset_in is None else weekly_reset_in),
                ),
                cost=cost,
                level=level,
            )

    def refresh_plan(self, account: str, which: PlanWindow = "both") -> None:
        """Reset the plan's window(s) now, as a new period would: nothing used, next reset one period away."""
        now = self.clock()
        with self._lock:
            plan = self._plans[account]
            windows = {"window": (plan.window,), "weekly": (plan.weekly,), "both": (plan.window, plan.weekly)}
            for w in windows[which]:
                w.used = 0
                w.reset_at = now + w.period

    def plan_remaining(self, account: str) -> tuple[int, int]:
        """(5-hour window, weekly) units left on the account's plan, as /usages would report them now."""
        now = self.clock()
        with self._lock:
            plan = self._plans[account]
            plan.window.roll(now)
            plan.weekly.roll(now)
            return plan.window.remaining, plan.weekly.remaining

    def _usage_body(self, account: str) -> dict[str, Any]:
        now_s = self.clock()
        with self._lock:
            plan = self._plans.get(account)
            if plan is not None:
                plan.window.roll(now_s)
                plan.weekly.roll(now_s)
                return {
                    "user": {"membership": {"level": plan.level}},
                    "usage": plan.weekly.detail(),
                    "limits": [
                        {
                            "window": {"duration": round(plan.window.period / 60), "timeUnit": "TIME_UNIT_MINUTE"},
                            "detail": plan.window.detail(),
                        }
                    ],
                }
            u = self._usage.get(account) or _Usage()
        now = dt.datetime.fromtimestamp(now_s, dt.UTC)
        weekly_reset = _iso(u.weekly_reset or now + dt.timedelta(days=3))
        window_reset = _iso(u.window_reset or now + dt.timedelta(hours=2))
        # Numbers as decimal strings, as the real endpoint sends them.
        return {
            "user": {"membership": {"level": "LEVEL_INTERMEDIATE"}},
            "usage": {
                "limit": str(u.limit),
                "used": str(u.limit - u.weekly_remaining),
                "remaining": str(u.weekly_remaining),
                "resetTime": weekly_reset,
            },
            "limits": [
                {
                    "window": {"duration": 300, "timeUnit": "TIME_UNIT_MINUTE"},
                    "detail": {"limit": str(u.limit), "remaining": str(u.window_remaining), "resetTime": window_reset},
                }
            ],
        }

    def set_balance(self, account: str, available: float, *, charge: float | None = None) -> None:
        """What ``GET /v1/users/me/balance`` reports for the account (default 49.58894). With ``charge`` (0 allowed)
        the balance is also enforced: each admitted inference call spends ``charge``, and at or below zero inference
        gets 429 exceeded_current_quota_error "suspended due to insufficient balance" until a new set_balance."""
        with self._lock:
            self._balances[account] = _Wallet(available, charge)

    def balance(self, account: str) -> float:
        """The account's available balance now."""
        with self._lock:
            wallet = self._balances.get(account)
            return 49.58894 if wallet is None else wallet.available

    # -- account metadata, context cache, files ------------------------------------------------------------------

    def set_account(self, account: str, *, org_id: str | None = None, gid: str | None = None) -> None:
        """Send ``Msh-Org-Id`` / ``Msh-Gid`` (tier, e.g. ``enterprise-tier-3``) wherever ``Msh-Uid`` is sent for this
        account (errors by default, every answer with ``msh_headers="always"``), as seen on a real 429."""
        with self._lock:
            self._accounts[account] = _AccountMeta(org_id, gid)

    def _msh_headers(self, key: _Key) -> dict[str, str]:
        out = {"msh-uid": key.account}
        with self._lock:
            meta = self._accounts.get(key.account)
        if meta is not None and meta.org_id is not None:
            out["msh-org-id"] = meta.org_id
        if meta is not None and meta.gid is not None:
            out["msh-gid"] = meta.gid
        return out

    def enable_context_cache(self, accounts: str | Iterable[str] | None = None) -> None:
        """Imitate Kimi's automatic, per-account context cache (for the given accounts, or all): a call whose leading
        messages (with model, system and tools) equal those of an earlier call *on the same account* reports the
        cached prefix's tokens, as ``usage.cached_tokens`` (OpenAI routes; ``prompt_tokens`` includes them) and
        ``usage.cache_read_input_tokens`` (Anthropic routes; ``input_tokens`` excludes them, as Anthropic counts),
        streamed or not. While enabled the field is always present, 0 on a miss."""
        with self._lock:
            self._cache_on = True
            if accounts is None:
                self._cache_accounts = None
            elif isinstance(accounts, str):
                self._cache_accounts = frozenset({accounts})
            else:
                self._cache_accounts = frozenset(accounts)

    def forget_context_cache(self, account: str | None = None) -> None:
        """Evict the account's cached prefixes (or every account's), as an expired cache would."""
        with self._lock:
            if account is None:
                self._cache.clear()
            else:
                self._cache.pop(account, None)

    def cache_hits(self, account: str) -> int:
        """Inference calls of ``account`` that were answered with cached tokens > 0."""
        with self._lock:
            return self._cache_hits.get(account, 0)

    def _cached_tokens(self, key: _Key, req: dict[str, Any], prompt_tokens: int) -> int | None:
        """Cached tokens for this call (None: the cache is off for the account), and remember its prefixes."""
        with self._lock:
            if not self._cache_on or (self._cache_accounts is not None and key.account not in self._cache_accounts):
                return None
        messages = req.get("messages")
        if not isinstance(messages, list) or not messages:
            return 0
        head = [req.get("model"), req.get("system"), req.get("tools")]
        prefixes: list[tuple[str, int]] = []
        for n in range(1, len(messages) + 1):
            text = json.dumps([head, messages[:n]], sort_keys=True, default=str)
            # Tokens from the messages alone (compact), so the cached part stays below the whole prompt's estimate.
            size = len(json.dumps(messages[:n], separators=(",", ":"), default=str))
            prefixes.append((hashlib.sha256(text.encode()).hexdigest(), max(1, size // 4)))
        with self._lock:
            seen = self._cache.setdefault(key.account, set())
            cached = next((tokens for digest, tokens in reversed(prefixes) if digest in seen), 0)
            seen.update(digest for digest, _ in prefixes)
            if cached:
                self._cache_hits[key.account] = self._cache_hits.get(key.account, 0) + 1
        return min(cached, prompt_tokens)

    def enable_files(self) -> None:
        """Serve ``/v1/files`` as the Open Platform does: ``POST`` (multipart ``file`` + ``purpose``) stores a file
        owned by the uploading key's *account*; ``GET /v1/files`` lists that account's files; ``GET`` / ``DELETE
        /v1/files/{id}`` and ``GET /v1/files/{id}/content`` succeed for any key of the owning account. A key of
        another account gets the same 404 resource_not_found_error as an unknown id (kimi-api.md names no error for
        this; 404 is what an OpenAI-style API answers for another organisation's file). Without this call those
        paths stay 404 "method not found", as before."""
        with self._lock:
            self._files_on = True

    def file_owner(self, file_id: str) -> str | None:
        """The account that uploaded ``file_id`` (None: no such file)."""
        with self._lock:
            f = self._files.get(file_id)
            return f.account if f else None

    def _add_file(self, account: str, filename: str, purpose: str, content: bytes, content_type: str) -> _File:
        f = _File(uuid.uuid4().hex[:20], account, filename, purpose, content, content_type, int(self.clock()))
        with self._lock:
            self._files[f.id] = f
        return f

    def _file_for(self, file_id: str, account: str) -> _File | None:
        with self._lock:
            f = self._files.get(file_id)
            return f if f is not None and f.account == account else None

    def _files_of(self, account: str) -> list[_File]:
        with self._lock:
            return [f for f in self._files.values() if f.account == account]

    def _drop_file(self, file_id: str) -> None:
        with self._lock:
            self._files.pop(file_id, None)

    # -- faults ------------------------------------------------------------------------------------------------------

    def fault(self, key: str | None, kind: FaultKind, times: int | None = None) -> None:
        """Inject a transport fault into requests with ``key`` (``None``: any credential, even none).

        - ``close_before_headers``: read the request, close without answering.
        - ``hang``: read the request, never answer (the connection is dropped after ``hang_cap`` s or on close()).
        - ``reset_midstream``: 200 then, on a stream, 2 content events and a dropped connection (no chunked end,
          no [DONE]); on a non-stream, half of the promised Content-Length.
        - ``trickle``: streams at 1 s per event; a non-stream sends half its body, waits 1 s, then the rest.
        - ``error_midstream``: after 2 events an in-band error frame (OpenAI ``data: {"error":…}``, Anthropic
          ``event: error``), then a clean end without [DONE]/message_stop; a non-stream gets a 500 instead.

        The first two act before routing and authentication; the others only on a reply that would have been a
        success (scripted errors and rate-limit refusals do not consume them). ``times=None`` keeps the fault
        until :meth:`clear_faults`. Faults are checked before scripts."""
        if kind not in _FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        with self._lock:
            self._faults.append(_Fault(key, kind, times))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, cred: str | None, kinds: tuple[FaultKind, ...]) -> FaultKind | None:
        with self._lock:
            for f in self._faults:
                if f.kind in kinds and (f.key is None or f.key == cred):
                    if f.remaining is not None:
                        f.remaining -= 1
                        if f.remaining <= 0:
                            self._faults.remove(f)
                    return f.kind
        return None

    # -- records -----------------------------------------------------------------------------------------------------

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self._requests.append(seen)

    @property
    def requests(self) -> list[Seen]:
        """A snapshot of every request seen so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def requests_for(self, key: str) -> list[Seen]:
        with self._lock:
            return [s for s in self._requests if s.credential == key]

    def count(self, key: str) -> int:
        """Requests made with ``key`` (any route, any outcome)."""
        with self._lock:
            return sum(1 for s in self._requests if s.credential == key)

    def counts(self) -> dict[str, int]:
        """Requests per registered key *name* (names, not keys, so assertion messages never print a key)."""
        with self._lock:
            out = {k.name: 0 for k in self._keys.values()}
            for s in self._requests:
                if s.key_name is not None:
                    out[s.key_name] = out.get(s.key_name, 0) + 1
            return out

    def account_counts(self, status: int | None = None) -> dict[str, int]:
        """Requests per account (any route), only those answered ``status`` if given: ``account_counts(429)`` is
        how many 429s each account sent, whatever their cause. Every account of a registered key is listed."""
        with self._lock:
            out = {k.account: 0 for k in self._keys.values()}
            for s in self._requests:
                if s.account is not None and (status is None or s.status == status):
                    out[s.account] = out.get(s.account, 0) + 1
            return out

    def wait_for(self, predicate: Callable[[list[Seen]], bool], timeout: float = 5.0) -> list[Seen]:
        """Poll until ``predicate(requests)`` holds; for requests that get no answer (hang, faults)."""
        deadline = time.monotonic() + timeout
        while True:
            reqs = self.requests
            if predicate(reqs):
                return reqs
            if time.monotonic() >= deadline:
                raise TimeoutError(f"condition not met; {len(reqs)} requests seen")
            time.sleep(0.01)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def reset(self) -> None:
        """Forget requests, scripts, faults, limits, probe and account state (plans, balances, cache, files) and put
        back the constructor's clock; keep the keys and the running server."""
        with self._lock:
            self._requests.clear()
            self._scripts.clear()
            self._faults.clear()
            self._limits.clear()
            self._fraction = 0.0
            self._peak.clear()
            self._usage.clear()
            self._balances.clear()
            self._plans.clear()
            self._accounts.clear()
            self._cache_on = False
            self._cache_accounts = None
            self._cache.clear()
            self._cache_hits.clear()
            self._files_on = False
            self._files.clear()
            self._handshakes = 0
        self.clock = self._default_clock

    # -- clients -----------------------------------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """A client context trusting only the test CA, offering HTTP/1.1 only."""
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def client(self, **kwargs: Any) -> httpx.Client:
        """An httpx client whose requests to ``https://api.kimi.com/...`` (any host) reach this fake, with the URL's
        host as Host header and SNI, and the test CA trusted. ``limits=`` goes to the transport; the rest to
        httpx.Client."""
        limits = kwargs.pop("limits", None)
        transport = LoopbackTransport(self.port, self.ssl_context(), limits=limits)
        return httpx.Client(transport=transport, **kwargs)


class LoopbackTransport(httpx.BaseTransport):
    """Routes every request to ``127.0.0.1:port`` while keeping the URL's host as Host header and TLS SNI.

    One pooled transport per host name, so a pooled connection opened with one SNI is never reused for another.
    """

    def __init__(self, port: int, verify: ssl.SSLContext, limits: httpx.Limits | None = None) -> None:
        self._port = port
        self._verify = verify
        self._limits = limits
        self._lock = threading.Lock()
        self._transports: dict[str, httpx.HTTPTransport] = {}

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        with self._lock:
            transport = self._transports.get(host)
            if transport is None:
                kw: dict[str, Any] = {"verify": self._verify}
                if self._limits is not None:
                    kw["limits"] = self._limits
                transport = self._transports[host] = httpx.HTTPTransport(**kw)
        request.url = request.url.copy_with(scheme="https", host="127.0.0.1", port=self._port)
        if not _is_ip(host):
            request.extensions["sni_hostname"] = host
        return transport.handle_request(request)

    def close(self) -> None:
        with self._lock:
            transports = list(self._transports.values())
            self._transports.clear()
        for t in transports:
            t.close()
