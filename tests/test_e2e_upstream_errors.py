"""End-to-end: Kimi unreachable, failing TLS, or not answering.

The client gets a 502 or 504 in the envelope it parses (OpenAI on chat/completions, Anthropic on /messages), and no
key is penalised: none of these is the key's fault.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest
from fakekimi import FakeKimi
from harness import (
    CHAT_BODY,
    KC_CHAT,
    KC_MESSAGES,
    MESSAGES_BODY,
    PLACEHOLDER,
    KeySpec,
    ProxyProcess,
    curl,
    key_rows,
    kimi_key,
    reset_store,
    upstream_options,
    wait_keys,
)

pytestmark = pytest.mark.e2e

ONE, TWO = kimi_key("0u01"), kimi_key("0u02")
KEYS = [KeySpec(ONE, "one", account="acct-1"), KeySpec(TWO, "two", account="acct-2")]
ROUTES = [pytest.param(KC_CHAT, CHAT_BODY, "openai", id="openai-chat"),
          pytest.param(KC_MESSAGES, MESSAGES_BODY, "anthropic", id="anthropic-messages")]


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, fake_kimi_server: FakeKimi) -> Path:
    fake_kimi_server.add_key(ONE, account="acct-1", name="one")
    fake_kimi_server.add_key(TWO, account="acct-2", name="two")
    return tmp_path_factory.mktemp("upstream-errors") / "home"


@pytest.fixture(scope="module")
def proxies(module_proxy_factory: Any, fake_kimi_server: FakeKimi, pki: Any, mitm_confdir: Path, home: Path
            ) -> dict[str, ProxyProcess]:
    reset_store(home, KEYS)
    wrong_ca = mitm_confdir / "mitmproxy-ca-cert.pem"  # a CA that did not sign the fake's certificate
    port = fake_kimi_server.port
    return {
        "unreachable": module_proxy_factory(home, {**upstream_options(closed_port(), pki.ca_cert), "kimi_max_wait": 0}),
        "bad-tls": module_proxy_factory(home, {**upstream_options(port, wrong_ca), "kimi_max_wait": 0}),
        "silent": module_proxy_factory(home, {**upstream_options(port, pki.ca_cert), "kimi_max_wait": 0,
                                              "kimi_upstream_timeout": 1}),
    }


@pytest.fixture
def fresh(proxies: dict[str, ProxyProcess], fake_kimi: FakeKimi, home: Path) -> FakeKimi:
    reset_store(home, KEYS, settle=True)
    return fake_kimi


def check_envelope(status: int, body: Any, envelope: str, expected: int, words: str) -> None:
    assert status == expected
    if envelope == "openai":
        assert body["error"]["type"] == "server_error" and words in body["error"]["message"], body
    else:
        assert body["type"] == "error" and body["error"]["type"] == "api_error", body
        assert words in body["error"]["message"]


def no_penalty(home: Path) -> None:
    time.sleep(0.3)
    for row in key_rows(home).values():
        assert (row["state"], row["health"], row["cooldown_until"]) == ("active", 100, None), row


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
@pytest.mark.parametrize(("url", "body", "envelope"), ROUTES)
@pytest.mark.parametrize("kind", ["unreachable", "bad-tls"])
def test_unreachable_or_untrusted_kimi_gives_a_502_in_the_clients_envelope(
    proxies: dict[str, ProxyProcess], fresh: FakeKimi, home: Path,
    kind: str, url: str, body: dict[str, Any], envelope: str, stream: bool,
) -> None:
    r = curl(proxies[kind], url, headers={"authorization": f"Bearer {PLACEHOLDER}"}, body={**body, "stream": stream})
    check_envelope(r.status, r.json(), envelope, 502, "could not reach Kimi")
    assert [q.key_name for q in fresh.requests if q.key_name] == []
    no_penalty(home)


@pytest.mark.slow
def test_silent_kimi_gives_a_504_when_streaming(proxies: dict[str, ProxyProcess], fresh: FakeKimi, home: Path
                                               ) -> None:
    fresh.fault(None, "hang")
    started = time.monotonic()
    r = curl(proxies["silent"], KC_MESSAGES, headers={"x-api-key": PLACEHOLDER},
             body={**MESSAGES_BODY, "stream": True}, timeout=15)
    assert time.monotonic() - started < 6  # kimi_upstream_timeout=1, tried on both keys
    check_envelope(r.status, r.json(), "anthropic", 504, "did not answer in time")
    fresh.clear_faults()
    wait_keys(home, lambda ks: sum(k.total_requests for k in ks) >= 1)
    no_penalty(home)


@pytest.mark.slow
def test_silent_kimi_gives_a_504_when_buffered(proxies: dict[str, ProxyProcess], fresh: FakeKimi) -> None:
    fresh.fault(None, "hang")
    try:
        r = curl(proxies["silent"], KC_CHAT, headers={"authorization": f"Bearer {PLACEHOLDER}"}, body=CHAT_BODY,
                 timeout=5)
    finally:
        fresh.clear_faults()
    check_envelope(r.status, r.json() if r.status else {}, "openai", 504, "did not answer in time")
