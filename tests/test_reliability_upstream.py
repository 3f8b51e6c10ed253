"""Issue 5 item 5: upstream faults. Connection refused, TLS failure, timeout, reset in the middle of a stream, a
trickling upstream, a connection closed before any answer.

One real `mitmdump -s kimi_rotate.py` serves the module with one key per surface, so a failure cannot be hidden by a
retry on another key: api.kimi.com goes to the fake upstream, api.moonshot.ai to a closed port (refused),
api.moonshot.cn to a second fake whose certificate comes from a CA the proxy does not trust (TLS failure);
kimi_upstream_timeout is 2 s.

What must hold, for buffered and streamed requests on OpenAI- and Anthropic-style routes:
- the client gets a clear error (502 / 504 with a message saying what happened) in the envelope its SDK parses; for a
  reset in the middle of a stream the stream ends (no hang);
- no key is penalised: health stays 100, no cooldown, not disabled;
- the proxy stays healthy: the next normal request succeeds, and no fault escapes as an unhandled error in its log.
"""

from __future__ import annotations

import itertools
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from certs import make_test_pki
from fakekimi import FakeKimi, expected_stream_text
from harness import (
    CHAT_BODY,
    KC_CHAT,
    KC_MESSAGES,
    MESSAGES_BODY,
    KeySpec,
    ProxyProcess,
    content_times,
    kimi_key,
    platform_key,
    read_keys,
    reset_store,
    sse_texts,
    stream_request,
    wait_keys,
)

from kimi_rotator.models import Surface

pytestmark = [pytest.mark.e2e]

KC = KeySpec(kimi_key("u001"), "code", account="acct-kc")
AI = KeySpec(platform_key("u002"), "global", Surface.MOONSHOT_AI, account="acct-ai")
CN = KeySpec(platform_key("u003"), "china", Surface.MOONSHOT_CN, account="acct-cn")
KEYS = [KC, AI, CN]
TIMEOUT = 2
AI_CHAT = "https://api.moonshot.ai/v1/chat/completions"
AI_MESSAGES = "https://api.moonshot.ai/anthropic/v1/messages"
CN_CHAT = "https://api.moonshot.cn/v1/chat/completions"
CN_MESSAGES = "https://api.moonshot.cn/anthropic/v1/messages"


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()  # nothing listens there any more: connecting is refused
    return port


@pytest.fixture(scope="module")
def untrusted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeKimi]:
    """A fake upstream with a certificate from another CA: a TLS failure for the proxy."""
    with FakeKimi(make_test_pki(tmp_path_factory.mktemp("other-pki"))) as fake:
        fake.add_key(CN.secret, account="acct-cn", name=CN.name)
        yield fake


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("upstream") / "home"


@pytest.fixture(scope="module")
def proxy(
    module_proxy_factory: Any, fake_kimi_server: FakeKimi, untrusted: FakeKimi, pki: Any, home: Path
) -> ProxyProcess:
    fake_kimi_server.add_key(KC.secret, account="acct-kc", name=KC.name)
    reset_store(home, KEYS)
    options = {
        "kimi_resolve": [f"api.kimi.com=127.0.0.1:{fake_kimi_server.port}",
                         f"api.moonshot.ai=127.0.0.1:{closed_port()}",
                         f"api.moonshot.cn=127.0.0.1:{untrusted.port}"],
        "ssl_verify_upstream_trusted_ca": str(pki.ca_cert),
        "kimi_upstream_timeout": TIMEOUT,
        "kimi_max_wait": 0,
    }
    return module_proxy_factory(home, options)


@pytest.fixture
def fake(proxy: ProxyProcess, fake_kimi: FakeKimi, home: Path) -> Iterator[FakeKimi]:
    before = sum(k.total_requests for k in read_keys(home))
    yield fake_kimi
    # After every fault: its attempt reached the store, no key is penalised, and the proxy serves a normal request.
    keys = wait_keys(home, lambda ks: sum(k.total_requests for k in ks) > before)
    for k in keys:
        assert (k.state_at(time.time()).value, k.health, k.cooldown_until) == ("active", 100, None), k.name
    fake_kimi.clear_faults()
    with client(proxy) as c:
        r = c.post(KC_CHAT, json=CHAT_BODY, headers={"authorization": "Bearer sk-placeholder"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok code"
    assert proxy.proc is not None and proxy.proc.poll() is None
    assert "Traceback" not in proxy.log_text()  # every fault is handled, none escapes as an unhandled error


def client(proxy: ProxyProcess, timeout: float = 15) -> httpx.Client:
    return httpx.Client(proxy=proxy.url, verify=ssl.create_default_context(cafile=str(proxy.ca)),
                        trust_env=False, timeout=timeout)


def post(proxy: ProxyProcess, url: str, *, stream: bool, timeout: float = 15) -> tuple[httpx.Response, float]:
    body = {**(MESSAGES_BODY if url.endswith("/messages") else CHAT_BODY), "stream": stream}
    headers = {"x-api-key": "sk-placeholder"} if url.endswith("/messages") else {"authorization": "Bearer sk-p"}
    t0 = time.monotonic()
    with client(proxy, timeout) as c:
        r = c.post(url, json=body, headers=headers)
    return r, time.monotonic() - t0


def error_of(r: httpx.Response, url: str) -> tuple[str, str]:
    """(type, message) from the envelope the route's SDK parses; fails if it is the other envelope."""
    doc = r.json()
    if url.endswith("/messages"):
        assert doc["type"] == "error", doc  # Anthropic: {"type":"error","error":{"type","message"}}
    else:
        assert "type" not in doc, doc  # OpenAI: {"error":{"type","message","code"}}
    return doc["error"]["type"], doc["error"]["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
@pytest.mark.parametrize("url", [AI_CHAT, AI_MESSAGES], ids=["openai", "anthropic"])
def test_connection_refused(proxy: ProxyProcess, fake: FakeKimi, url: str, stream: bool) -> None:
    r, took = post(proxy, url, stream=stream)
    assert r.status_code == 502, r.text
    etype, message = error_of(r, url)
    assert etype in ("server_error", "api_error")
    assert "could not reach Kimi" in message and "refused" in message.lower(), message
    assert took < 5


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
@pytest.mark.parametrize("url", [CN_CHAT, CN_MESSAGES], ids=["openai", "anthropic"])
def test_tls_failure(proxy: ProxyProcess, fake: FakeKimi, untrusted: FakeKimi, url: str, stream: bool) -> None:
    r, _ = post(proxy, url, stream=stream)
    assert r.status_code == 502, r.text
    _, message = error_of(r, url)
    assert "could not reach Kimi" in message and "certificate" in message.lower(), message
    assert untrusted.requests == []  # the handshake failed: no request (and no key) was sent


# With mitmproxy's defaults (eager connections, upstream_cert) the proxy already holds a verified connection to Kimi
# when a request arrives, and a buffered request goes out on it (the addon's fast path): then mitmproxy, not the
# addon's client, waits for the answer, has no read timeout, and answers a failure after the request was sent with its
# own HTML 502 from a hook where no response can be set. Streams go through the relay and are not affected. The
# addon's owner tracks the same limit in tests/test_e2e_failover.py
# (test_connection_failure_is_retried_on_another_key_when_buffered).
@pytest.mark.parametrize(("url", "stream"), [
    pytest.param(KC_CHAT, True, id="openai-stream"),
    pytest.param(KC_MESSAGES, True, id="anthropic-stream"),
    pytest.param(KC_MESSAGES, False, id="anthropic-buffered"),
])
def test_timeout(proxy: ProxyProcess, fake: FakeKimi, url: str, stream: bool) -> None:
    fake.fault(None, "hang")
    r, took = post(proxy, url, stream=stream, timeout=TIMEOUT + 2.5)
    assert r.status_code == 504, r.text
    _, message = error_of(r, url)
    assert "did not answer in time" in message, message
    assert TIMEOUT - 0.5 < took < TIMEOUT + 2, took


@pytest.mark.parametrize("stream", [pytest.param(False, id="buffered"), pytest.param(True, id="stream")])
def test_closed_before_headers(proxy: ProxyProcess, fake: FakeKimi, stream: bool) -> None:
    fake.fault(None, "close_before_headers")
    r, took = post(proxy, KC_MESSAGES, stream=stream)
    assert r.status_code == 502, r.text
    _, message = error_of(r, KC_MESSAGES)
    assert "could not reach Kimi" in message, message
    assert took < 5


def test_reset_midstream_ends_the_stream(proxy: ProxyProcess, fake: FakeKimi) -> None:
    fake.fault(KC.secret, "reset_midstream", times=1)
    t0 = time.monotonic()
    events: list[str] = []
    with client(proxy, timeout=10) as c, c.stream(
        "POST", KC_CHAT, json={**CHAT_BODY, "stream": True}, headers={"authorization": "Bearer sk-p"}
    ) as r:
        assert r.status_code == 200
        with pytest.raises(httpx.HTTPError):  # the stream is cut: the client sees an incomplete body, not [DONE]
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(line)
    took = time.monotonic() - t0
    assert took < 5, took  # ended, not hanging until a timeout
    texts = [json.loads(e[5:])["choices"][0]["delta"].get("content") for e in events]
    assert [t for t in texts if t] == ["ok code #1\n", "ok code #2\n"]
    assert "data: [DONE]" not in events


def test_reset_midbody_of_a_buffered_answer(proxy: ProxyProcess, fake: FakeKimi) -> None:
    fake.fault(KC.secret, "reset_midstream", times=1)
    r, took = post(proxy, KC_CHAT, stream=False)
    assert r.status_code == 502, r.text  # half a JSON body cannot be passed on as a 200
    _, message = error_of(r, KC_CHAT)
    assert "Kimi" in message, message
    assert took < 5
    assert [s.key_name for s in fake.requests] == ["code"]  # not re-sent as the client's own request


def test_trickling_stream_stays_incremental(proxy: ProxyProcess, fake: FakeKimi) -> None:
    fake.fault(KC.secret, "trickle", times=1)  # 1 s between events, below the 2 s read timeout
    with client(proxy) as c:
        result = stream_request(c, KC_MESSAGES, body={**MESSAGES_BODY, "stream": True},
                                headers={"x-api-key": "sk-p", "x-fake-events": "3"})
    assert result.status == 200
    assert "".join(sse_texts(result)) == expected_stream_text("code", 3)
    times = content_times(result)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 2 and all(0.6 < g < 1.8 for g in gaps), times  # as sent, 1 s apart, not lumped


def test_trickling_buffered_answer(proxy: ProxyProcess, fake: FakeKimi) -> None:
    fake.fault(KC.secret, "trickle", times=1)
    r, took = post(proxy, KC_CHAT, stream=False)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok code"
    assert 0.9 < took < TIMEOUT + 2
