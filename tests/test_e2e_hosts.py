"""End-to-end: which requests get a key, and which TLS the proxy decrypts.

Only HTTPS to exactly api.kimi.com / api.moonshot.cn / api.moonshot.ai on 443 gets a key, decided on the CONNECT
authority and the TLS server name; look-alike hosts, a Kimi name in the URL or the Host header, plain http and other
ports never do. Other hosts' TLS is passed through untouched unless kimi_intercept_all is set. kimi_client_token limits
keys to clients that present it.

Three proxies check the look-alikes: the default one (eager connections, only Kimi hosts decrypted), one with
kimi_intercept_all (so the addon's own host check is what stands between a look-alike and a key) and one with
kimi_intercept_all and lazy connections (the addon sees the CONNECT authority itself, not a redirected address).
Look-alike names resolve to a local HTTPS echo server through kimi_resolve, and the guard script sends port 80 to a
local plain-HTTP echo server and port 8443 to the HTTPS echo server.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakekimi import FakeKimi
from harness import (
    CHAT_BODY,
    KC_CHAT,
    KC_MESSAGES,
    MESSAGES_BODY,
    OP_AI_CHAT,
    OP_CHAT,
    PLACEHOLDER,
    KeySpec,
    PlainEcho,
    ProxyProcess,
    curl,
    key_rows,
    kimi_key,
    platform_key,
    proxy_client,
    read_keys,
    reset_store,
    sse_texts,
    stream_request,
    tunnel_request,
    upstream_options,
    wait_keys,
)

from kimi_rotator.models import Surface

pytestmark = pytest.mark.e2e

KC = kimi_key("0h01")
CN = platform_key("0h02")
KEYS = [KeySpec(KC, "code", account="acct-kc"), KeySpec(CN, "china", Surface.MOONSHOT_CN, account="acct-cn")]
TOKEN = "tok-e2e-client-0123456789"
BOTH_CREDENTIALS = {"authorization": f"Bearer {PLACEHOLDER}", "x-api-key": PLACEHOLDER}
LOOKALIKE_NAMES = ("api.kimi.com.evil.test", "evil.test", "echo.test")


@pytest.fixture(scope="module")
def plain_echo() -> Iterator[PlainEcho]:
    with PlainEcho() as echo:
        yield echo


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, fake_kimi_server: FakeKimi) -> Path:
    fake_kimi_server.add_key(KC, account="acct-kc", name="code")
    fake_kimi_server.add_key(CN, account="acct-cn", name="china")
    home = tmp_path_factory.mktemp("hosts") / "home"
    reset_store(home, KEYS)
    return home


@pytest.fixture(scope="module")
def base_options(fake_kimi_server: FakeKimi, echo_server: FakeKimi, pki: Any) -> dict[str, Any]:
    extra = [f"{name}=127.0.0.1:{echo_server.port}" for name in LOOKALIKE_NAMES]
    return {**upstream_options(fake_kimi_server.port, pki.ca_cert, extra), "kimi_max_wait": 0}


@pytest.fixture(scope="module")
def sinks(echo_server: FakeKimi, plain_echo: PlainEcho) -> dict[str, str]:
    return {"80": f"127.0.0.1:{plain_echo.port}", "8443": f"127.0.0.1:{echo_server.port}"}


PROXY_KINDS = {
    "default": {},
    "intercept-all": {"kimi_intercept_all": True, "ssl_insecure": True},
    "intercept-all-lazy": {"kimi_intercept_all": True, "ssl_insecure": True, "connection_strategy": "lazy"},
}


@pytest.fixture(scope="module")
def proxies(module_proxy_factory: Any, home: Path, base_options: dict[str, Any], sinks: dict[str, str]
            ) -> dict[str, ProxyProcess]:
    return {kind: module_proxy_factory(home, {**base_options, **extra}, sinks=sinks)
            for kind, extra in PROXY_KINDS.items()}


_totals: dict[str, int] = {}
_keyed = [0]  # keyed requests the fake has answered in this module so far: each is one attempt in the store


@pytest.fixture
def fake(fake_kimi: FakeKimi, echo_server: FakeKimi, home: Path) -> Iterator[FakeKimi]:
    echo_server.reset()
    # Start from a quiet store: every attempt of the earlier tests recorded (proxies write from a background thread).
    wait_keys(home, lambda ks: sum(k.total_requests for k in ks) >= _keyed[0])
    _totals.clear()
    _totals.update({k.name: k.total_requests for k in read_keys(home)})
    yield fake_kimi
    _keyed[0] += sum(1 for r in fake_kimi.requests if r.key_name)


def assert_no_key_used(home: Path, fake: FakeKimi) -> None:
    """No pooled key reached the fake, and the store recorded no attempt during the test."""
    assert not [r for r in fake.requests if r.key_name], "a pooled key reached the fake"
    time.sleep(0.3)  # an outcome, had there been one, is in the store by now
    assert {name: row["total_requests"] for name, row in key_rows(home).items()} == _totals


# -- Kimi hosts get a key, whatever the proxy's TLS settings ---------------------------------------------------------


@pytest.mark.parametrize("kind", list(PROXY_KINDS))
@pytest.mark.parametrize(("url", "name"), [(KC_CHAT, "code"), (OP_CHAT, "china")], ids=["kimi-code", "moonshot-cn"])
def test_kimi_hosts_get_a_key(proxies: dict[str, ProxyProcess], fake: FakeKimi, kind: str, url: str, name: str
                              ) -> None:
    r = curl(proxies[kind], url, headers={"authorization": f"Bearer {PLACEHOLDER}"}, body=CHAT_BODY)
    assert r.status == 200, (r.status, r.stderr, r.body[:300])
    assert r.json()["choices"][0]["message"]["content"] == f"ok {name}"
    [req] = fake.requests
    assert (req.key_name, req.sni, req.host_header) == (name, url.split("/")[2], url.split("/")[2])


def test_host_names_match_case_insensitively(proxies: dict[str, ProxyProcess], fake: FakeKimi) -> None:
    r = tunnel_request(proxies["default"], "API.Kimi.COM", sni="api.kimi.com", path="/coding/v1/messages",
                       headers={"x-api-key": PLACEHOLDER}, body=MESSAGES_BODY)
    assert r.status == 200 and "mitmproxy" in r.issuer
    assert [q.key_name for q in fake.requests] == ["code"]


# -- look-alikes never get a key -------------------------------------------------------------------------------------

LOOKALIKES = [
    pytest.param({"connect": "api.kimi.com.evil.test"}, id="kimi-name-as-prefix"),
    pytest.param({"connect": "evil.test", "path": "/v1/chat/completions?next=https://api.kimi.com/coding/v1"},
                 id="kimi-url-in-query"),
    pytest.param({"connect": "evil.test", "host_header": "api.kimi.com"}, id="kimi-host-header"),
    pytest.param({"connect": "evil.test", "sni": "api.kimi.com"}, id="kimi-server-name"),
    pytest.param({"connect": "api.kimi.com", "port": 8443}, id="kimi-host-port-8443"),
]


@pytest.mark.parametrize("kind", list(PROXY_KINDS))
@pytest.mark.parametrize("target", LOOKALIKES)
def test_lookalikes_never_get_a_key(
    proxies: dict[str, ProxyProcess], fake: FakeKimi, echo_server: FakeKimi, home: Path, pki: Any,
    kind: str, target: dict[str, Any],
) -> None:
    proxy = proxies[kind]
    decrypted = kind != "default"
    # Passed through, the client meets the echo server's own certificate (test CA, not valid for evil names).
    r = tunnel_request(proxy, **target, headers=BOTH_CREDENTIALS, body=CHAT_BODY,
                       ca=proxy.ca if decrypted else pki.ca_cert, check_hostname=decrypted)
    assert r.status == 200, r.body[:300]
    echoed = r.json()
    assert echoed["echo"] is True
    assert echoed["headers"]["authorization"] == f"Bearer {PLACEHOLDER}"
    assert echoed["headers"]["x-api-key"] == PLACEHOLDER
    assert ("mitmproxy" in r.issuer) == decrypted, r.issuer
    assert [q.credential for q in echo_server.requests] == [PLACEHOLDER]
    assert_no_key_used(home, fake)


@pytest.mark.parametrize("kind", list(PROXY_KINDS))
def test_plain_http_to_a_kimi_host_never_gets_a_key(
    proxies: dict[str, ProxyProcess], fake: FakeKimi, plain_echo: PlainEcho, home: Path, kind: str
) -> None:
    before = len(plain_echo.seen)
    r = curl(proxies[kind], "http://api.kimi.com/coding/v1/messages", headers=BOTH_CREDENTIALS, body=MESSAGES_BODY)
    assert r.status == 200, (r.stderr, r.body[:300])
    assert r.json()["plain"] is True  # the guard's plain-HTTP echo answered, on loopback
    [req] = plain_echo.seen[before:]
    assert req["headers"]["authorization"] == f"Bearer {PLACEHOLDER}"
    assert req["headers"]["x-api-key"] == PLACEHOLDER
    assert_no_key_used(home, fake)


# -- other hosts' TLS ------------------------------------------------------------------------------------------------


def test_other_hosts_tls_is_not_decrypted(proxies: dict[str, ProxyProcess], echo_server: FakeKimi, pki: Any) -> None:
    # A client that trusts only the TEST CA (not mitmproxy's) verifies echo.test's real certificate through the proxy.
    verify = ssl.create_default_context(cafile=str(pki.ca_cert))
    proxy = proxies["default"]
    with httpx.Client(proxy=proxy.url, verify=verify, trust_env=False, timeout=15) as client:
        r = client.post("https://echo.test/anything", json={"x": 1}, headers=BOTH_CREDENTIALS)
    assert r.status_code == 200 and r.json()["echo"] is True
    assert r.json()["headers"]["authorization"] == f"Bearer {PLACEHOLDER}"
    # And a client that trusts only mitmproxy's CA cannot: nobody re-signed the certificate.
    with proxy_client(proxy) as client, pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        client.get("https://echo.test/")


@pytest.mark.parametrize("kind", ["intercept-all", "intercept-all-lazy"])
def test_intercept_all_decrypts_other_hosts(
    proxies: dict[str, ProxyProcess], echo_server: FakeKimi, pki: Any, kind: str
) -> None:
    proxy = proxies[kind]
    verify = ssl.create_default_context(cafile=str(pki.ca_cert))
    with httpx.Client(proxy=proxy.url, verify=verify, trust_env=False, timeout=15) as client, \
            pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        client.get("https://echo.test/")
    with proxy_client(proxy) as client:
        r = client.post("https://echo.test/anything", json={"x": 1}, headers=BOTH_CREDENTIALS)
    assert r.status_code == 200 and r.json()["echo"] is True
    assert r.json()["headers"]["x-api-key"] == PLACEHOLDER  # decrypted, but still no key


# -- surfaces without keys -------------------------------------------------------------------------------------------


def test_surface_without_keys_passes_through_and_warns_once(
    proxies: dict[str, ProxyProcess], fake: FakeKimi, home: Path
) -> None:
    proxy = proxies["default"]
    for _ in range(2):
        r = curl(proxy, OP_AI_CHAT, headers={"authorization": f"Bearer {PLACEHOLDER}"}, body=CHAT_BODY)
        assert r.status == 401  # the fake's answer to the client's own credential
    assert [q.credential for q in fake.requests] == [PLACEHOLDER, PLACEHOLDER]
    log = proxy.log_text()
    assert log.count("kimi-rotate add-key --surface moonshot-ai") == 1, log[-2000:]
    assert_no_key_used(home, fake)


# -- kimi_client_token -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_proxy(module_proxy_factory: Any, home: Path, base_options: dict[str, Any], sinks: dict[str, str]
                ) -> ProxyProcess:
    return module_proxy_factory(home, {**base_options, "kimi_client_token": TOKEN}, sinks=sinks)


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
@pytest.mark.parametrize("header", [{"authorization": f"Bearer {TOKEN}"}, {"x-api-key": TOKEN}],
                         ids=["bearer", "x-api-key"])
def test_client_token_gets_a_key(token_proxy: ProxyProcess, fake: FakeKimi, header: dict[str, str], stream: bool
                                 ) -> None:
    with proxy_client(token_proxy) as client:
        r = stream_request(client, KC_MESSAGES, body={**MESSAGES_BODY, "stream": stream}, headers=header)
    assert r.status == 200
    if stream:
        assert "".join(sse_texts(r)).startswith("ok code #1")
    [req] = fake.requests
    assert req.key_name == "code"
    name = next(iter(header))
    assert req.headers[name] == (f"Bearer {KC}" if name == "authorization" else KC)


@pytest.mark.parametrize("header", [
    {"authorization": "Bearer sk-someone-elses-credential"},
    {"x-api-key": TOKEN + "x"},
    {"authorization": f"Bearer {TOKEN[:-1]}"},
    {},
], ids=["other-bearer", "longer-token", "prefix-of-token", "no-credential"])
def test_other_credentials_pass_untouched(
    token_proxy: ProxyProcess, fake: FakeKimi, home: Path, header: dict[str, str]
) -> None:
    r = curl(token_proxy, KC_CHAT, headers=header, body=CHAT_BODY)
    assert r.status == 401  # the fake rejects the client's own credential: the proxy added nothing
    [req] = fake.requests
    for name, value in header.items():
        assert req.headers[name] == value
    if not header:
        assert "authorization" not in req.headers and "x-api-key" not in req.headers
    assert_no_key_used(home, fake)
