"""Issue 5 item 6: hostile input, table-driven.

Three tables:
- ROUTING (through a real `mitmdump -s kimi_rotate.py`, raw sockets so every part of a request can be chosen apart:
  the CONNECT authority, the TLS server name, the Host header, duplicated or odd headers): look-alike hosts, Kimi names
  in URLs, upper case, a trailing dot, IP literals, Host / SNI / CONNECT disagreeing, plain http, websocket upgrades,
  other ports, both and duplicated credential headers, non-ASCII and oversized headers and bodies. Every non-loopback
  connection the proxy opens lands on a recording sink (HTTPS echo on 443/8443, plain echo elsewhere).
- RESPONSES (through a second real proxy): Retry-After as seconds, HTTP-date, negative, zero, huge, garbage or
  repeated; bodies non-JSON, truncated, gzip / br / zstd compressed, huge, empty, undecodable. The outcome each one
  leaves on the key in the store is checked (cooldown length, disabled or not, which counter).
- PARSING (classify / decode_body directly): the same inputs and more, where no proxy is needed.

After every case: no crash (the proxy still serves a normal request and logged no traceback), no stored key reached
any place it must not (the sinks are searched for every key, raw and base64), the right outcome recorded.
"""

from __future__ import annotations

import gzip
import json
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

import brotli  # type: ignore[import-untyped]
import httpx
import pytest
import zstandard
from fakekimi import FakeKimi, Reply
from harness import (
    CHAT_BODY,
    KC_CHAT,
    KeySpec,
    PlainEcho,
    ProxyProcess,
    kimi_key,
    platform_key,
    read_keys,
    reset_store,
    upstream_options,
    wait_keys,
)
from test_reliability_support import find_secrets

from kimi_rotator.classify import MAX_COOLDOWN, classify, decode_body, parse_retry_after, retry_delay
from kimi_rotator.models import OutcomeKind, Scope, Strategy, Surface

pytestmark = [pytest.mark.e2e]

ONE = kimi_key("h001")
CHINA, CHINA_2 = platform_key("h002"), platform_key("h003")
ROUTE_KEYS = [KeySpec(ONE, "one", account="acct-1"),
              KeySpec(CHINA, "china", Surface.MOONSHOT_CN, account="acct-cn"),
              KeySpec(CHINA_2, "china-2", Surface.MOONSHOT_CN, account="acct-cn2")]
RESPONSE_KEYS = [KeySpec(platform_key(f"r{i:03d}"), f"r{i}", Surface.MOONSHOT_CN, account=f"acct-r{i}")
                 for i in range(24)]
ALL_SECRETS = [s.secret for s in ROUTE_KEYS + RESPONSE_KEYS]
PLACEHOLDER = "sk-placeholder-hostile"
CHAT = json.dumps(CHAT_BODY).encode()


# -- raw requests ------------------------------------------------------------------------------------------------------


@dataclass
class Raw:
    status: int  # 0: no HTTP answer (connection refused, closed or reset)
    head: str
    body: bytes
    issuer: str = ""  # of the certificate the client saw in the tunnel: mitmproxy's CA means decrypted
    error: str = ""


def request_bytes(method: str, target: str, headers: list[tuple[str, str | bytes]], body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode()]
    for k, v in headers:
        lines.append(k.encode() + b": " + (v if isinstance(v, bytes) else v.encode()))
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}".encode())
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def exchange(proxy: ProxyProcess, data: bytes, *, connect: str | None = None, sni: str | None = None,
             tls: bool = True, ca: Path | None = None, timeout: float = 10.0) -> Raw:
    """Send `data` through the proxy: as a plain proxy request, or inside a CONNECT tunnel to `connect` (host:port),
    over TLS with server name `sni` (None: no SNI) unless `tls` is False. Reads until the server closes."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout)
    sock.settimeout(timeout)
    conn: socket.socket = sock
    issuer = ""
    try:
        if connect is not None:
            sock.sendall(f"CONNECT {connect} HTTP/1.1\r\nHost: {connect}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    return Raw(0, "", b"", error=f"CONNECT closed: {head!r}")
                head += chunk
            if head.split(b" ")[1] != b"200":
                return Raw(int(head.split(b" ")[1]), head.decode("latin-1"), b"", error="CONNECT refused")
            if tls:
                ctx = ssl.create_default_context(cafile=str(ca or proxy.ca))
                ctx.check_hostname = False  # names here are wrong on purpose; trust is what is checked
                ctx.set_alpn_protocols(["http/1.1"])
                try:
                    conn = ctx.wrap_socket(sock, server_hostname=sni)
                except (ssl.SSLError, OSError) as e:
                    return Raw(0, "", b"", error=f"TLS: {e}")
                from cryptography import x509

                cert = x509.load_der_x509_certificate(conn.getpeercert(binary_form=True) or b"")
                issuer = ", ".join(str(a.value) for a in cert.issuer)
        conn.sendall(data)
        raw = b""
        try:
            while len(raw) < 50_000_000:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                raw += chunk
        except (ssl.SSLError, ConnectionResetError, TimeoutError) as e:
            if not raw:
                return Raw(0, "", b"", issuer, error=f"read: {e}")
    finally:
        sock.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ")[1])
    except (IndexError, ValueError):
        return Raw(0, head.decode("latin-1"), body, issuer, error="not HTTP")
    return Raw(status, head.decode("latin-1"), body, issuer)


def ca_of(pki: Any) -> Path:
    return Path(pki.ca_cert)


# -- the routing table ---------------------------------------------------------------------------------------------


@dataclass
class Route:
    """One hostile request. `key` says whether a key must reach the fake Kimi (True), or must not be used (False)."""

    connect: str | None  # CONNECT authority; None: a plain proxy request (absolute-form target)
    target: str  # the request target: a path inside a tunnel, an absolute URL otherwise
    headers: list[tuple[str, str | bytes]]
    key: bool
    sni: str | None = "-"  # "-": the CONNECT host
    tls: bool = True
    body: bytes = CHAT
    method: str = "POST"
    status: int | tuple[int, ...] | None = None  # expected client status (None: any, even no answer)
    decrypted: bool | None = None  # whether mitmproxy terminated the client's TLS
    check: Callable[[Raw, FakeKimi], None] | None = None
    sink: str | None = None  # "tls" / "plain": the request must have reached that sink (passed through, untouched)
    script: Reply | None = None  # what the fake Kimi answers the key


def bearer(value: str = PLACEHOLDER) -> list[tuple[str, str | bytes]]:
    return [("Host", "api.kimi.com"), ("Authorization", f"Bearer {value}"), ("Content-Type", "application/json")]


def with_host(host: str, extra: list[tuple[str, str | bytes]] | None = None) -> list[tuple[str, str | bytes]]:
    return [("Host", host), ("Authorization", f"Bearer {PLACEHOLDER}"), ("Content-Type", "application/json"),
            *(extra or [])]


def fake_saw(**want: str) -> Callable[[Raw, FakeKimi], None]:
    def check(raw: Raw, fake: FakeKimi) -> None:
        [seen] = fake.requests
        for name, value in want.items():
            assert seen.headers.get(name) == value, (name, seen.headers.get(name))
    return check


def one_credential_header(raw: Raw, fake: FakeKimi) -> None:
    [seen] = fake.requests
    assert seen.headers["authorization"] == f"Bearer {ONE}"  # one value: no leftover placeholder, no joined list
    assert "x-api-key" not in seen.headers


def both_swapped(raw: Raw, fake: FakeKimi) -> None:
    [seen] = fake.requests
    assert seen.headers["authorization"] == f"Bearer {ONE}" and seen.headers["x-api-key"] == ONE


def both_api_keys_swapped(raw: Raw, fake: FakeKimi) -> None:
    [seen] = fake.requests
    assert seen.headers["x-api-key"] == ONE and "authorization" not in seen.headers


def not_upgraded(raw: Raw, fake: FakeKimi) -> None:
    assert raw.status != 101
    for seen in fake.requests:
        assert seen.credential == PLACEHOLDER  # passed through untouched: a websocket never gets a key


KC_PATH = "/coding/v1/chat/completions"
BIG = "x" * 60_000
ROUTING = {
    # look-alike hosts and Kimi names where they do not decide anything
    "suffix-lookalike": Route("api.kimi.com.evil.test:443", KC_PATH, with_host("api.kimi.com.evil.test"), False,
                              status=200, decrypted=False, sink="tls"),
    "prefix-lookalike": Route("evilapi.kimi.com:443", KC_PATH, with_host("evilapi.kimi.com"), False,
                              status=200, decrypted=False, sink="tls"),
    "kimi-in-query": Route("evil.test:443", "/?api.kimi.com", with_host("evil.test"), False,
                           status=200, decrypted=False, sink="tls"),
    "kimi-in-path": Route("evil.test:443", "/api.kimi.com/coding/v1/chat/completions", with_host("evil.test"), False,
                          status=200, decrypted=False, sink="tls"),
    "kimi-in-userinfo": Route("api.kimi.com@evil.test:443", KC_PATH, with_host("evil.test"), False),
    "plain-url-with-kimi-query": Route(None, "http://evil.test/?api.kimi.com", with_host("evil.test"), False,
                                       status=200, sink="plain"),
    "plain-url-with-kimi-path": Route(None, "http://evil.test/api.kimi.com/v1/chat/completions",
                                      with_host("api.kimi.com"), False, status=200, sink="plain"),
    # the real host, spelt differently: still Kimi, still served
    "upper-case": Route("API.KIMI.COM:443", KC_PATH, with_host("API.KIMI.COM"), True, sni="API.KIMI.COM",
                        status=200, decrypted=True),
    "mixed-case-sni-only": Route("api.kimi.com:443", KC_PATH, with_host("api.kimi.com"), True, sni="Api.Kimi.Com",
                                 status=200, decrypted=True),
    "trailing-dot": Route("api.kimi.com.:443", KC_PATH, with_host("api.kimi.com."), True, sni="api.kimi.com",
                          status=200, decrypted=True),
    # addresses and names that disagree
    "ip-literal-kimi-host-header": Route("203.0.113.7:443", KC_PATH, with_host("api.kimi.com"), False, sni=None,
                                         status=200, decrypted=False, sink="tls"),
    "ip-literal-kimi-sni": Route("203.0.113.7:443", KC_PATH, with_host("api.kimi.com"), False, sni="api.kimi.com",
                                 status=200, decrypted=False, sink="tls"),
    "host-header-disagrees": Route("api.kimi.com:443", KC_PATH, with_host("evil.test"), True, status=200,
                                   decrypted=True),
    "sni-disagrees-with-connect": Route("api.kimi.com:443", KC_PATH, with_host("api.kimi.com"), False,
                                        sni="evil.test", decrypted=False),
    "connect-disagrees-with-sni": Route("evil.test:443", KC_PATH, with_host("api.kimi.com"), False,
                                        sni="api.kimi.com", status=200, decrypted=False, sink="tls"),
    "no-sni": Route("api.kimi.com:443", KC_PATH, with_host("api.kimi.com"), False, sni=None, decrypted=False),
    # not HTTPS on 443
    "plain-http-absolute-form": Route(None, "http://api.kimi.com/coding/v1/chat/completions",
                                      with_host("api.kimi.com"), False, status=200, sink="plain"),
    "plain-http-in-tunnel": Route("api.kimi.com:443", KC_PATH, with_host("api.kimi.com"), False, tls=False),
    "connect-port-8443": Route("api.kimi.com:8443", KC_PATH, with_host("api.kimi.com"), False,
                               status=200, decrypted=False, sink="tls"),
    "connect-port-80-plain": Route("api.kimi.com:80", KC_PATH, with_host("api.kimi.com"), False, tls=False,
                                   status=200, sink="plain"),
    "websocket-upgrade": Route("api.kimi.com:443", KC_PATH, with_host("api.kimi.com", [
        ("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")]), False, method="GET", body=b"", check=not_upgraded),
    # credential headers
    "both-auth-headers": Route("api.kimi.com:443", KC_PATH, with_host("api.kimi.com", [("x-api-key", PLACEHOLDER)]),
                               True, status=200, check=both_swapped),
    "duplicated-authorization": Route("api.kimi.com:443", KC_PATH, with_host(
        "api.kimi.com", [("Authorization", "Bearer second-placeholder")]), True, status=200,
        check=one_credential_header),
    "duplicated-x-api-key": Route("api.kimi.com:443", "/coding/v1/messages", [
        ("Host", "api.kimi.com"), ("x-api-key", PLACEHOLDER), ("x-api-key", "second"),
        ("Content-Type", "application/json")], True, status=200, check=both_api_keys_swapped),
    "basic-auth-scheme": Route("api.kimi.com:443", KC_PATH, [("Host", "api.kimi.com"), ("Authorization", "Basic Zm9v"),
                                                             ("Content-Type", "application/json")], True, status=200,
                               check=one_credential_header),
    "empty-authorization": Route("api.kimi.com:443", KC_PATH, [("Host", "api.kimi.com"), ("Authorization", ""),
                                                               ("Content-Type", "application/json")], True,
                                 status=200, check=one_credential_header),
    "duplicated-host-headers": Route("api.kimi.com:443", KC_PATH, with_host("api.kimi.com", [("Host", "evil.test")]),
                                     True),
    "non-ascii-user-agent": Route("api.kimi.com:443", KC_PATH, with_host("api.kimi.com", [
        ("User-Agent", "агент/1.0 ✨".encode())]), True, status=200,
        check=fake_saw(**{"user-agent": "агент/1.0 ✨".encode().decode("latin-1")})),
    "non-utf8-header": Route("api.kimi.com:443", KC_PATH, with_host("api.kimi.com", [("X-Odd", b"\xff\xfe\x80")]),
                             True, status=200),
    "non-ascii-stream": Route("api.kimi.com:443", KC_PATH, with_host("api.kimi.com", [
        ("X-Title", "Проект ✨".encode())]), True, status=200,
        body=json.dumps({**CHAT_BODY, "stream": True}).encode()),
    "oversized-header": Route("api.kimi.com:443", KC_PATH, with_host("api.kimi.com", [("X-Big", BIG)]), True),
    "many-headers": Route("api.kimi.com:443", KC_PATH, with_host("api.kimi.com", [
        (f"X-H{i}", "v") for i in range(80)]), True, status=200),
    "oversized-body": Route("api.kimi.com:443", KC_PATH, with_host("api.kimi.com"), True, status=200,
                            body=json.dumps({**CHAT_BODY, "pad": "y" * 8_000_000}).encode()),
    "non-json-body": Route("api.kimi.com:443", KC_PATH, with_host("api.kimi.com"), True, status=400,
                           body=b"\x00\xffnot json{{{"),
    "non-ascii-response-header-stream": Route("api.kimi.com:443", KC_PATH, with_host("api.kimi.com"), True,
                                              status=400, body=json.dumps({**CHAT_BODY, "stream": True}).encode(),
                                              script=Reply.error(400, "invalid_request_error", "bad",
                                                                 headers={"X-Odd": "café"})),
    "non-ascii-response-header": Route("api.kimi.com:443", KC_PATH, with_host("api.kimi.com"), True, status=400,
                                       script=Reply.error(400, "invalid_request_error", "bad",
                                                          headers={"X-Odd": "café"})),
    "stream-flag-in-a-string": Route("api.kimi.com:443", KC_PATH, with_host("api.kimi.com"), True, status=200,
                                     body=json.dumps({**CHAT_BODY, "note": '"stream": true'}).encode()),
}


@pytest.fixture(scope="module")
def plain() -> Iterator[PlainEcho]:
    with PlainEcho() as echo:
        yield echo


@pytest.fixture(scope="module")
def route_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile-routes") / "home"


@pytest.fixture(scope="module")
def route_proxy(module_proxy_factory: Any, fake_kimi_server: FakeKimi, echo_server: FakeKimi, plain: PlainEcho,
                pki: Any, route_home: Path) -> ProxyProcess:
    for spec in ROUTE_KEYS:
        fake_kimi_server.add_key(spec.secret, account=spec.account or "none", name=spec.name)
    reset_store(route_home, ROUTE_KEYS)
    sinks = {"443": f"127.0.0.1:{echo_server.port}", "8443": f"127.0.0.1:{echo_server.port}",
             "*": f"127.0.0.1:{plain.port}"}
    return module_proxy_factory(route_home, {**upstream_options(fake_kimi_server.port, pki.ca_cert),
                                             "kimi_max_wait": 0}, sinks=sinks)


@dataclass
class Sinks:
    tls: FakeKimi
    plain: PlainEcho
    seen_plain: int = field(default=0)

    def leaks(self) -> list[str]:
        hits: list[str] = []
        for s in self.tls.requests:
            blob = json.dumps(s.headers).encode() + s.body + s.path.encode()
            hits += find_secrets(blob, ALL_SECRETS, f"https sink {s.path}")
        for s in self.plain.seen:
            hits += find_secrets(json.dumps(s).encode(), ALL_SECRETS, f"plain sink {s['path']}")
        return hits


def assert_still_serves(proxy: ProxyProcess, log_from: int = 0) -> None:
    """A normal request still succeeds and, since byte `log_from` of the log, nothing escaped as an error."""
    verify = ssl.create_default_context(cafile=str(proxy.ca))
    with httpx.Client(proxy=proxy.url, verify=verify, trust_env=False, timeout=10) as c:
        r = c.post(KC_CHAT, json=CHAT_BODY, headers={"authorization": f"Bearer {PLACEHOLDER}"})
    assert r.status_code == 200, r.text
    assert proxy.proc is not None and proxy.proc.poll() is None
    log = proxy.log_bytes()[log_from:].decode("utf-8", "replace")
    assert "Traceback" not in log and "Addon error" not in log, log[-3000:]


@pytest.mark.parametrize("case", list(ROUTING.values()), ids=list(ROUTING))
def test_hostile_routing(route_proxy: ProxyProcess, fake_kimi: FakeKimi, echo_server: FakeKimi, plain: PlainEcho,
                         pki: Any, route_home: Path, case: Route) -> None:
    echo_server.reset()
    plain_before = len(plain.seen)
    sinks = Sinks(echo_server, plain)
    host = case.target if case.connect is None else case.connect.rsplit(":", 1)[0]
    sni = (host if case.sni == "-" else case.sni) if case.connect is not None else None
    # What the client trusts: mitmproxy's CA when the proxy may decrypt, the test CA when it must pass through.
    ca = route_proxy.ca if case.decrypted is not False else ca_of(pki)
    data = request_bytes(case.method, case.target, case.headers, case.body)
    if case.script is not None:
        fake_kimi.script(ONE, [case.script])
    before = sum(k.total_requests for k in read_keys(route_home))
    log_from = len(route_proxy.log_bytes())

    raw = exchange(route_proxy, data, connect=case.connect, sni=sni, tls=case.tls, ca=ca)

    if case.status is not None:
        expected = case.status if isinstance(case.status, tuple) else (case.status,)
        assert raw.status in expected, (raw.status, raw.error, raw.head[:300], raw.body[:300])
    if case.decrypted is True:
        assert "mitmproxy" in raw.issuer, raw.issuer
    elif case.decrypted is False and raw.issuer:
        assert "mitmproxy" not in raw.issuer, raw.issuer
    keyed = [s for s in fake_kimi.requests if s.key_name is not None]
    if case.key:
        assert raw.status in (0, 200, 400, 413, 431) and len(keyed) <= 1, (raw.status, raw.error)
        if raw.status == 200:
            assert [s.key_name for s in keyed] == ["one"], raw.body[:300]
    else:
        assert keyed == [], [(s.key_name, s.path) for s in keyed]  # no key used
    if case.sink == "tls":
        assert [s.credential for s in echo_server.requests] == [PLACEHOLDER]  # passed through untouched
    elif case.sink == "plain":
        assert [s["headers"].get("authorization") for s in plain.seen[plain_before:]] == [f"Bearer {PLACEHOLDER}"]
    if case.check is not None:
        case.check(raw, fake_kimi)
    assert sinks.leaks() == []
    assert find_secrets(raw.head.encode() + raw.body, ALL_SECRETS, "client") == []  # never echoed to the client

    assert_still_serves(route_proxy, log_from)
    # The right outcome recorded: one attempt per keyed request, plus the check request above.
    wait_keys(route_home, lambda ks: sum(k.total_requests for k in ks) == before + len(keyed) + 1)


def test_failover_keeps_odd_response_headers(route_proxy: ProxyProcess, fake_kimi: FakeKimi,
                                            route_home: Path) -> None:
    """After a failover the addon builds the client's response itself: header bytes must pass unchanged."""
    fake_kimi.script(CHINA, [Reply.rate_limit(30)])
    fake_kimi.script(CHINA_2, [Reply.error(400, "invalid_request_error", "bad", headers={"X-Odd": "café"})])
    data = request_bytes("POST", "/v1/chat/completions", with_host("api.moonshot.cn"), CHAT)
    raw = exchange(route_proxy, data, connect="api.moonshot.cn:443", sni="api.moonshot.cn")
    assert [(s.key_name, s.status) for s in fake_kimi.requests] == [("china", 429), ("china-2", 400)], raw
    assert raw.status == 400
    assert "x-odd: café" in raw.head.lower(), raw.head  # latin-1 bytes as sent, not re-encoded
    assert_still_serves(route_proxy)


# -- the response table ----------------------------------------------------------------------------------------------


@dataclass
class Answer:
    """A hostile upstream answer and the outcome it must leave on the key that got it."""

    reply: Reply
    kind: OutcomeKind | None  # None: no penalty (health 100, active)
    cooling: float | None = None  # seconds of cooldown expected (None: no cooldown)
    tolerance: float = 5.0


RPM = "Your account {account}<{ak}> request reached organization max RPM: 3"
QUOTA_DOC = {"error": {"type": "exceeded_current_quota_error",
                       "message": "Your account is suspended due to insufficient balance"}}
BILLING_DOC = {"error": {"type": "permission_error",
                         "message": "You've reached your usage limit for this billing cycle."}}
INVALID_DOC = {"error": {"type": "invalid_authentication_error", "message": "Invalid Authentication"}}


def encoded(doc: Any, coding: str) -> bytes:
    data = json.dumps(doc).encode()
    return {"gzip": gzip.compress, "br": brotli.compress,
            "zstd": zstandard.ZstdCompressor().compress}[coding](data)


def limited(retry_after: str) -> Reply:
    return Reply.rate_limit(retry_after, after_seconds=None, message=RPM)


DAY = 86400.0
RESPONSES = {
    "retry-after-seconds": Answer(limited("7"), OutcomeKind.RATE_LIMITED, 7, 2),
    "retry-after-http-date": Answer(Reply.rate_limit(None, after_seconds=None, message=RPM), OutcomeKind.RATE_LIMITED,
                                    120, 3),  # the date is filled in at send time (see test)
    "retry-after-negative": Answer(limited("-5"), OutcomeKind.RATE_LIMITED, 60, 3),
    "retry-after-zero": Answer(limited("0"), OutcomeKind.RATE_LIMITED, 1, 1),
    "retry-after-huge": Answer(limited("99999999999"), OutcomeKind.RATE_LIMITED, MAX_COOLDOWN, 10),
    "retry-after-garbage": Answer(limited("soon, I promise"), OutcomeKind.RATE_LIMITED, 60, 3),
    "retry-after-repeated": Answer(limited("5, 10"), OutcomeKind.RATE_LIMITED, 60, 3),
    "retry-after-fraction": Answer(limited("2.5"), OutcomeKind.RATE_LIMITED, 2.5, 1.5),
    "retry-after-nan": Answer(limited("nan"), OutcomeKind.RATE_LIMITED, 60, 3),
    "body-not-json": Answer(Reply(429, b"<html><body>429 Too Many Requests</body></html>",
                                  {"content-type": "text/html"}), OutcomeKind.RATE_LIMITED, 60, 3),
    "body-truncated-json": Answer(Reply(401, b'{"error": {"type": "invalid_authentication_error", "mess'),
                                  OutcomeKind.INVALID_KEY),
    "body-gzip": Answer(Reply(429, encoded(QUOTA_DOC, "gzip"), {"content-encoding": "gzip"}),
                        OutcomeKind.QUOTA_EXHAUSTED, 6 * 3600, 10),
    "body-br": Answer(Reply(403, encoded(BILLING_DOC, "br"), {"content-encoding": "br"}),
                      OutcomeKind.BILLING_LIMITED, 5 * 3600, 10),
    "body-zstd": Answer(Reply(401, encoded(INVALID_DOC, "zstd"), {"content-encoding": "zstd"}),
                        OutcomeKind.INVALID_KEY),
    "body-gzip-mislabelled": Answer(Reply(500, b"\x1f\x8b not really gzip", {"content-encoding": "gzip"}), None),
    "body-huge": Answer(Reply(429, json.dumps({"error": {"type": "rate_limit_reached_error", "message": RPM},
                                               "pad": "z" * 3_000_000}).encode()), OutcomeKind.RATE_LIMITED, 60, 3),
    "body-empty-429": Answer(Reply(429, b""), OutcomeKind.RATE_LIMITED, 60, 3),
    "body-empty-401": Answer(Reply(401, b""), OutcomeKind.INVALID_KEY),
    "body-json-array-500": Answer(Reply(500, b"[1, 2, 3]"), None),
    "body-json-null-400": Answer(Reply(400, b"null"), None),
    "body-invalid-utf8-429": Answer(Reply(429, b"\xff\xfe\xfd too many requests \x80"), OutcomeKind.RATE_LIMITED, 60,
                                    3),
    "body-deep-json-400": Answer(Reply(400, b"[" * 100_000 + b"]" * 100_000), None),
}


@pytest.fixture(scope="module")
def response_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile-responses") / "home"


@pytest.fixture(scope="module")
def response_proxy(module_proxy_factory: Any, fake_kimi_server: FakeKimi, pki: Any,
                   response_home: Path) -> ProxyProcess:
    """One attempt per request (the client sees the hostile answer itself) and round-robin over 24 fresh keys, so
    each case meets a key no earlier case has touched."""
    for spec in RESPONSE_KEYS:
        fake_kimi_server.add_key(spec.secret, account=spec.account or "none", name=spec.name)
    reset_store(response_home, RESPONSE_KEYS, Strategy.ROUND_ROBIN)
    return module_proxy_factory(response_home, {**upstream_options(fake_kimi_server.port, pki.ca_cert),
                                                "kimi_max_wait": 0, "kimi_max_attempts": 1})


@pytest.mark.parametrize("case", list(RESPONSES.values()), ids=list(RESPONSES))
def test_hostile_response(response_proxy: ProxyProcess, fake_kimi: FakeKimi, response_home: Path,
                          case: Answer) -> None:
    reply = case.reply
    if case is RESPONSES["retry-after-http-date"]:
        reply.headers = {"Retry-After": formatdate(time.time() + 120, usegmt=True)}
    for spec in RESPONSE_KEYS:  # whichever key the proxy picks gets this answer
        fake_kimi.script(spec.secret, [reply])
        # A used-up quota gets its account probed; here the probe learns nothing, so the classifier's guess stays
        # (tests/test_e2e_quota_watch.py has the probe that moves it).
        fake_kimi.script(spec.secret, [Reply.unavailable()], on="probe")
    verify = ssl.create_default_context(cafile=str(response_proxy.ca))
    sent = time.time()
    with httpx.Client(proxy=response_proxy.url, verify=verify, trust_env=False, timeout=20) as c, c.stream(
        "POST", "https://api.moonshot.cn/v1/chat/completions", json=CHAT_BODY,
        headers={"authorization": f"Bearer {PLACEHOLDER}"},
    ) as r:
        raw = b"".join(r.iter_raw())  # as the proxy sent it: the client's own decoding is not under test
    [seen] = [s for s in fake_kimi.requests if s.method == "POST"]  # the quota watch may probe too (a GET)
    # The client gets the upstream's answer, body bytes and content-encoding as sent.
    assert r.status_code == reply.status
    if isinstance(reply.body, bytes):
        assert raw == reply.body
        assert r.headers.get("content-encoding") == reply.headers.get("content-encoding")

    keys = wait_keys(response_home, lambda ks: any(k.name == seen.key_name and k.total_requests == 1 for k in ks))
    key = next(k for k in keys if k.name == seen.key_name)
    assert find_secrets(raw + str(r.headers).encode(), ALL_SECRETS, "client") == []
    if case.kind is None:
        assert (key.health, key.cooldown_until, key.disabled_reason) == (100, None, None), key
        assert key.failed_requests == 1
        return
    if case.kind is OutcomeKind.INVALID_KEY:
        assert key.disabled_reason is not None and key.cooldown_until is None, key
        return
    assert key.disabled_reason is None and key.cooldown_until is not None, key
    assert key.cooldown_until == pytest.approx(sent + (case.cooling or 0), abs=case.tolerance), (
        key.cooldown_until - sent, key.cooldown_reason)
    counter = key.rate_limited_requests if case.kind is OutcomeKind.RATE_LIMITED else key.failed_requests
    assert counter == 1
    assert response_proxy.proc is not None and response_proxy.proc.poll() is None


def test_response_proxy_still_serves_and_logged_no_error(response_proxy: ProxyProcess, fake_kimi: FakeKimi) -> None:
    verify = ssl.create_default_context(cafile=str(response_proxy.ca))
    with httpx.Client(proxy=response_proxy.url, verify=verify, trust_env=False, timeout=10) as c:
        r = c.post("https://api.moonshot.cn/v1/chat/completions", json=CHAT_BODY,
                   headers={"authorization": f"Bearer {PLACEHOLDER}"})
    assert r.status_code == 200
    log = response_proxy.log_text()
    assert "Traceback" not in log and "Addon error" not in log, log[-3000:]


# -- the parsing table (no proxy) ----------------------------------------------------------------------------------

NOW = 1_800_000_000.0


@dataclass
class Parse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    kind: OutcomeKind
    scope: Scope
    cooling: float | None  # seconds from NOW, None for no deadline
    encoding: str | None = None


def gz(doc: Any) -> bytes:
    return gzip.compress(json.dumps(doc).encode())


PARSING = {
    "retry-after-twice-first-valid-wins": Parse(429, [("Retry-After", "5"), ("Retry-After", "10")], b"",
                                                OutcomeKind.RATE_LIMITED, Scope.KEY, 5),
    "retry-after-garbage-then-valid": Parse(429, [("Retry-After", "x"), ("retry-after", "9")], b"",
                                            OutcomeKind.RATE_LIMITED, Scope.KEY, 9),
    "retry-after-past-date-floors": Parse(429, [("Retry-After", formatdate(NOW - 3600, usegmt=True))], b"",
                                          OutcomeKind.RATE_LIMITED, Scope.KEY, 1),
    "retry-after-far-date-caps": Parse(429, [("Retry-After", "Fri, 31 Dec 9999 23:59:59 GMT")], b"",
                                       OutcomeKind.RATE_LIMITED, Scope.KEY, MAX_COOLDOWN),
    "retry-after-leading-spaces": Parse(429, [("  Retry-After ", " 30 ")], b"", OutcomeKind.RATE_LIMITED, Scope.KEY,
                                        30),
    "retry-after-exponent": Parse(429, [("Retry-After", "1e9")], b"", OutcomeKind.RATE_LIMITED, Scope.KEY, 60),
    "reset-epoch-millis": Parse(429, [("X-RateLimit-Reset", str(int((NOW + 45) * 1000)))], b"",
                                OutcomeKind.RATE_LIMITED, Scope.KEY, 45),
    "reset-stale-epoch": Parse(429, [("X-RateLimit-Reset", str(int(NOW - 100)))], b"", OutcomeKind.RATE_LIMITED,
                               Scope.KEY, 60),
    "message-try-again-minutes": Parse(429, [], json.dumps({"error": {
        "type": "rate_limit_reached_error", "message": "max RPM, please try again after 2 minutes"}}).encode(),
        OutcomeKind.RATE_LIMITED, Scope.ACCOUNT, 120),
    "gzip-quota": Parse(429, [], gz(QUOTA_DOC), OutcomeKind.QUOTA_EXHAUSTED, Scope.ACCOUNT, 6 * 3600, "gzip"),
    "double-encoded": Parse(429, [], brotli.compress(gz(QUOTA_DOC)), OutcomeKind.QUOTA_EXHAUSTED, Scope.ACCOUNT,
                            6 * 3600, "gzip, br"),
    "unknown-encoding": Parse(429, [], b"\x00\x01\x02", OutcomeKind.RATE_LIMITED, Scope.KEY, 60, "compress"),
    "zip-bomb-gzip": Parse(500, [], gzip.compress(b"a" * 50_000_000), OutcomeKind.SERVER_ERROR, Scope.SERVER, None,
                           "gzip"),
    "html-502": Parse(502, [], b"<html>Bad Gateway</html>", OutcomeKind.SERVER_ERROR, Scope.SERVER, None),
    "anthropic-envelope-in-openai-route": Parse(429, [], json.dumps({"type": "error", "error": {
        "type": "rate_limit_error", "message": "Too many requests"}}).encode(), OutcomeKind.RATE_LIMITED,
        Scope.ACCOUNT, 60),
    "error-is-a-string": Parse(401, [], b'{"error": "Invalid Authentication"}', OutcomeKind.INVALID_KEY, Scope.KEY,
                               None),
    "type-is-a-number": Parse(403, [], b'{"error": {"type": 42, "message": 7}}', OutcomeKind.REQUEST_ERROR,
                              Scope.REQUEST, None),
    "status-1xx": Parse(103, [("Retry-After", "5")], b"", OutcomeKind.REQUEST_ERROR, Scope.REQUEST, None),
    "msh-uid-ak-spoof": Parse(429, [("Msh-Uid", "ak-12345")], b"", OutcomeKind.RATE_LIMITED, Scope.KEY, 60),
}


@pytest.mark.parametrize("case", list(PARSING.values()), ids=list(PARSING))
def test_hostile_parsing(case: Parse) -> None:
    body = decode_body(case.body, case.encoding)
    assert len(body) <= 65536  # bounded whatever the input
    verdict = classify(case.status, case.headers, body, NOW)
    out = verdict.outcome
    assert (out.kind, out.scope) == (case.kind, case.scope), out
    if case.cooling is None:
        assert out.until is None
    else:
        assert out.until == pytest.approx(NOW + case.cooling, abs=1), out.until - NOW
    if case is PARSING["msh-uid-ak-spoof"]:
        assert out.account_hint is None  # an access-key id is never taken for an account


def test_retry_parsers_agree_on_the_response_table() -> None:
    """The values the proxy cases send, through the parsers directly: the expected cooldowns come from here."""
    assert parse_retry_after("7", NOW) == 7
    assert parse_retry_after("-5", NOW) is None and parse_retry_after("soon, I promise", NOW) is None
    assert parse_retry_after("0", NOW) == 1 and parse_retry_after("99999999999", NOW) == MAX_COOLDOWN
    assert parse_retry_after("nan", NOW) is None and parse_retry_after("5, 10", NOW) is None
    assert retry_delay([("Retry-After", "2.5")], "", NOW, 60) == 2.5
