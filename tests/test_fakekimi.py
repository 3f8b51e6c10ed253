"""Direct tests of the fake Kimi upstream (no proxy): if these fail, end-to-end failures mean nothing."""

from __future__ import annotations

import itertools
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from certs import SERVER_DNS_NAMES, TestPKI, make_test_pki
from cryptography import x509
from fakekimi import (
    FakeClock,
    FakeKimi,
    Reply,
    event_text,
    expected_stream_text,
    parse_sse,
    sse_text,
)

# Shaped like real keys so nothing downstream trips on the format; obviously not real.
K1 = "sk-kimi-" + "A" * 60 + "0001"
K2 = "sk-kimi-" + "B" * 60 + "0002"
K3 = "sk-" + "C" * 44 + "0003"

OA = "https://api.moonshot.cn/v1/chat/completions"
KC_OA = "https://api.kimi.com/coding/v1/chat/completions"
KC_AN = "https://api.kimi.com/coding/v1/messages"
OP_AN = "https://api.moonshot.ai/anthropic/v1/messages"
CHAT = {"model": "kimi-k2.6", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def fake_server(pki: TestPKI) -> Iterator[FakeKimi]:
    with FakeKimi(pki, events=5, interval=0.1) as fake:
        fake.add_key(K1, account="a1", name="k1")
        fake.add_key(K2, account="a1", name="k2")
        fake.add_key(K3, account="a2", name="k3")
        yield fake


@pytest.fixture
def fake(fake_server: FakeKimi) -> FakeKimi:
    fake_server.reset()  # the server is shared by the module; scripts, faults and records are not
    return fake_server


@pytest.fixture
def client(fake: FakeKimi) -> Iterator[httpx.Client]:
    with fake.client(timeout=5.0) as c:
        yield c


def timed_lines(resp: httpx.Response, t0: float) -> list[tuple[float, str]]:
    return [(time.monotonic() - t0, line) for line in resp.iter_lines() if line]


# ---------------------------------------------------------------------------------------------------------------------
# PKI and TLS
# ---------------------------------------------------------------------------------------------------------------------


def test_pki_files_and_sans(pki: TestPKI) -> None:
    for p in (pki.ca_cert, pki.ca_key, pki.server_cert, pki.server_key, pki.server_chain):
        assert p.is_file()
    assert pki.ca_cert.name == "ca.pem"
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == set(SERVER_DNS_NAMES)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_make_test_pki_is_fast(tmp_path: Path) -> None:
    t0 = time.monotonic()
    make_test_pki(tmp_path)
    assert time.monotonic() - t0 < 0.5


def test_alpn_is_http11_only_and_hostnames_verify(fake: FakeKimi, pki: TestPKI) -> None:
    for name in (*SERVER_DNS_NAMES, None):
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        with (
            socket.create_connection(("127.0.0.1", fake.port), timeout=5) as raw,
            # None: connect by IP (no SNI); the IP SAN must still verify.
            ctx.wrap_socket(raw, server_hostname=name or "127.0.0.1") as tls,
        ):
            assert tls.selected_alpn_protocol() == "http/1.1"


def test_sni_and_host_recorded_via_sni_extension(fake: FakeKimi, pki: TestPKI) -> None:
    # The plain-httpx way, without LoopbackTransport: IP in the URL, name in Host and SNI.
    with httpx.Client(verify=pki.client_ssl_context(), timeout=5) as c:
        r = c.post(
            f"{fake.url}/v1/chat/completions",
            headers={**bearer(K3), "Host": "api.moonshot.ai"},
            json=CHAT,
            extensions={"sni_hostname": "api.moonshot.ai"},
        )
        assert r.status_code == 200
        r = c.get(f"{fake.url}/v1/models", headers=bearer(K3))  # no SNI: connected by IP
        assert r.status_code == 200
    first, second = fake.requests
    assert (first.sni, first.host_header, first.key_name) == ("api.moonshot.ai", "api.moonshot.ai", "k3")
    # Pooled by origin (127.0.0.1:port), so httpx reuses the first connection and its SNI: the reason
    # LoopbackTransport keeps one pool per host name.
    assert second.conn_id == first.conn_id
    assert second.sni == "api.moonshot.ai"


def test_loopback_transport_sni_per_host_and_keepalive(fake: FakeKimi, client: httpx.Client) -> None:
    for url in (OA, OA, KC_AN, KC_AN):
        assert client.post(url, headers=bearer(K1), json=CHAT).status_code == 200
    a, b, c, d = fake.requests
    assert [s.sni for s in (a, b, c, d)] == ["api.moonshot.cn", "api.moonshot.cn", "api.kimi.com", "api.kimi.com"]
    assert a.conn_id == b.conn_id != c.conn_id == d.conn_id  # keep-alive, one pool per SNI


# ---------------------------------------------------------------------------------------------------------------------
# Authentication and envelopes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [OA, KC_OA])
def test_unknown_key_openai_envelope(client: httpx.Client, url: str) -> None:
    r = client.post(url, headers=bearer("sk-nope"), json=CHAT)
    assert r.status_code == 401
    assert r.json() == {"error": {"type": "invalid_authentication_error", "message": "Invalid Authentication"}}
    assert "msh-uid" not in r.headers  # no account to report for an unknown key


@pytest.mark.parametrize("url", [KC_AN, OP_AN])
@pytest.mark.parametrize("header", ["x-api-key", "authorization"])
def test_unknown_key_anthropic_envelope(client: httpx.Client, url: str, header: str) -> None:
    value = "sk-nope" if header == "x-api-key" else "Bearer sk-nope"
    r = client.post(url, headers={header: value}, json=CHAT)
    assert r.status_code == 401
    assert r.json() == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "The API Key appears to be invalid or may have expired"},
    }


def test_missing_credential_is_401(client: httpx.Client) -> None:
    assert client.post(OA, json=CHAT).status_code == 401
    assert client.get("https://api.kimi.com/coding/v1/usages").status_code == 401


def test_bearer_wins_over_x_api_key(fake: FakeKimi, client: httpx.Client) -> None:
    r = client.post(KC_AN, headers={**bearer(K1), "x-api-key": "sk-nope"}, json=CHAT)
    assert r.status_code == 200
    assert fake.requests[-1].credential == K1
    r = client.post(KC_AN, headers={"x-api-key": K2}, json=CHAT)
    assert r.status_code == 200
    assert fake.requests[-1].key_name == "k2"


def test_key_bound_to_hosts(fake: FakeKimi, client: httpx.Client) -> None:
    fake.add_key("sk-cn-only", account="cn", name="cn1", hosts=["api.moonshot.cn"])
    try:
        assert client.get("https://api.moonshot.cn/v1/models", headers=bearer("sk-cn-only")).status_code == 200
        assert client.get("https://api.moonshot.ai/v1/models", headers=bearer("sk-cn-only")).status_code == 401
    finally:
        fake.remove_key("sk-cn-only")


# ---------------------------------------------------------------------------------------------------------------------
# Normal service
# ---------------------------------------------------------------------------------------------------------------------


def test_openai_completion_body(client: httpx.Client) -> None:
    r = client.post(OA, headers=bearer(K1), json=CHAT)
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "ok k1"}
    assert body["model"] == "kimi-k2.6" and body["usage"]["total_tokens"] > 0
    assert "AAAA" not in r.text and "0001" not in r.text  # never echoes key material


def test_anthropic_message_body(client: httpx.Client) -> None:
    r = client.post(KC_AN, headers={"x-api-key": K2}, json={**CHAT, "model": "kimi-for-coding"})
    body = r.json()
    assert r.status_code == 200
    assert body["type"] == "message" and body["role"] == "assistant"
    assert body["content"] == [{"type": "text", "text": "ok k2"}]
    assert body["stop_reason"] == "end_turn" and set(body["usage"]) >= {"input_tokens", "output_tokens"}


def test_probes(client: httpx.Client) -> None:
    models = client.get("https://api.moonshot.cn/v1/models", headers=bearer(K3)).json()
    assert {m["id"] for m in models["data"]} >= {"kimi-k2.6"}
    coding = client.get("https://api.kimi.com/coding/v1/models", headers=bearer(K1)).json()
    assert {m["id"] for m in coding["data"]} >= {"kimi-for-coding"}
    usages = client.get("https://api.kimi.com/coding/v1/usages", headers=bearer(K1)).json()
    assert usages["usage"]["remaining"] == "75"  # decimal strings, like the real endpoint
    assert usages["limits"][0]["window"] == {"duration": 300, "timeUnit": "TIME_UNIT_MINUTE"}
    assert usages["limits"][0]["detail"]["resetTime"].endswith("Z")


def test_set_usage_and_balance(fake: FakeKimi, client: httpx.Client) -> None:
    fake.set_usage("a1", window_remaining=0)
    fake.set_balance("a2", 0.0)
    usages = client.get("https://api.kimi.com/coding/v1/usages", headers=bearer(K2)).json()
    assert usages["limits"][0]["detail"]["remaining"] == "0"
    bal = client.get("https://api.moonshot.cn/v1/users/me/balance", headers=bearer(K3)).json()
    assert bal["data"]["available_balance"] == 0.0


def test_count_tokens_is_404(client: httpx.Client) -> None:
    r = client.post(
        "https://api.kimi.com/coding/v1/messages/count_tokens?beta=true", headers={"x-api-key": K1}, json=CHAT
    )
    assert r.status_code == 404
    assert r.json()["type"] == "error"
    r = client.post("https://api.moonshot.cn/v1/messages/count_tokens", headers=bearer(K3), json=CHAT)
    assert r.status_code == 404


# ---------------------------------------------------------------------------------------------------------------------
# Scripts and error helpers
# ---------------------------------------------------------------------------------------------------------------------


def test_scripted_replies_in_order_then_normal(fake: FakeKimi, client: httpx.Client) -> None:
    fake.script(K1, [Reply.rate_limit(retry_after=7), Reply.ok(), Reply.quota(), Reply.billing()])
    # A probe does not eat inference replies.
    assert client.get("https://api.kimi.com/coding/v1/models", headers=bearer(K1)).status_code == 200
    # Another key is unaffected.
    assert client.post(OA, headers=bearer(K2), json=CHAT).status_code == 200

    r = client.post(OA, headers=bearer(K1), json=CHAT)
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert r.headers["msh-uid"] == "a1"
    err = r.json()["error"]
    assert err["type"] == "rate_limit_reached_error"
    assert err["message"] == (
        "Your account a1<ak-k1> request reached organization max RPM: 3, please try again after 1 seconds"
    )
    assert client.post(OA, headers=bearer(K1), json=CHAT).status_code == 200
    r = client.post(OA, headers=bearer(K1), json=CHAT)
    assert (r.status_code, r.json()["error"]["type"]) == (429, "exceeded_current_quota_error")
    r = client.post(KC_AN, headers=bearer(K1), json=CHAT)  # the script is per key, whatever the route
    assert r.status_code == 403
    assert r.json()["type"] == "error"
    assert "reached your usage limit for this billing cycle" in r.json()["error"]["message"]
    assert client.post(OA, headers=bearer(K1), json=CHAT).status_code == 200
    assert [s.status for s in fake.requests_for(K1)] == [200, 429, 200, 429, 403, 200]
    assert fake.count(K1) == 6 and fake.counts()["k2"] == 1


def test_script_account_and_probe_scripts(fake: FakeKimi, client: httpx.Client) -> None:
    fake.script_account("a1", [Reply.membership()])
    fake.script(K1, [Reply.invalid()], on="probe")
    r = client.post(KC_OA, headers=bearer(K2), json=CHAT)  # any key of a1
    assert r.status_code == 402 and "membership" in r.json()["error"]["message"]
    assert client.post(KC_OA, headers=bearer(K1), json=CHAT).status_code == 200
    assert client.get("https://api.kimi.com/coding/v1/usages", headers=bearer(K1)).status_code == 401
    assert client.get("https://api.kimi.com/coding/v1/usages", headers=bearer(K1)).status_code == 200


def test_raw_body_and_delay(fake: FakeKimi, client: httpx.Client) -> None:
    fake.script(K3, [Reply(429, body={"errorMessage": "429 Your account is busy"}, delay=0.2)])
    t0 = time.monotonic()
    r = client.post(OA, headers=bearer(K3), json=CHAT)
    assert time.monotonic() - t0 >= 0.2
    assert (r.status_code, r.json()) == (429, {"errorMessage": "429 Your account is busy"})


HELPERS: list[tuple[str, Reply, int, str, str, str]] = [
    # name, reply, status, OpenAI type, Anthropic type, message fragment
    ("rate_limit", Reply.rate_limit(), 429, "rate_limit_reached_error", "rate_limit_reached_error", "try again after"),
    ("too_many", Reply.too_many_requests(), 429, "rate_limit_reached_error", "rate_limit_reached_error", "too many"),
    ("quota", Reply.quota(), 429, "exceeded_current_quota_error", "exceeded_current_quota_error", "balance"),
    ("billing", Reply.billing(), 403, "permission_error", "permission_error", "billing cycle"),
    ("membership", Reply.membership(), 402, "permission_error", "permission_error", "membership"),
    ("invalid", Reply.invalid(), 401, "invalid_authentication_error", "authentication_error", "nvalid"),
    ("terminated", Reply.access_terminated(), 403, "access_terminated_error", "access_terminated_error", "Access"),
    ("agents", Reply.coding_agents_only(), 403, "access_terminated_error", "access_terminated_error", "Coding Agents"),
    ("overloaded", Reply.overloaded(), 429, "engine_overloaded_error", "rate_limit_error", "overloaded"),
    ("server_error", Reply.server_error(), 500, "server_error", "server_error", "server"),
    ("unavailable", Reply.unavailable(), 503, "server_unavailable", "server_unavailable", "unavailable"),
    ("content_filter", Reply.content_filter(), 400, "content_filter", "content_filter", "high risk"),
]


@pytest.mark.parametrize(
    ("reply", "status", "oa_type", "an_type", "fragment"), [h[1:] for h in HELPERS], ids=[h[0] for h in HELPERS]
)
def test_error_helpers_in_both_envelopes(
    fake: FakeKimi, client: httpx.Client, reply: Reply, status: int, oa_type: str, an_type: str, fragment: str
) -> None:
    fake.script(K1, [reply, reply])
    r = client.post(KC_OA, headers=bearer(K1), json=CHAT)
    assert r.status_code == status
    body: dict[str, Any] = r.json()
    assert set(body) == {"error"} and body["error"]["type"] == oa_type and fragment in body["error"]["message"]
    r = client.post(KC_AN, headers={"x-api-key": K1}, json=CHAT)
    assert r.status_code == status
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == an_type and fragment in body["error"]["message"]
    assert r.headers["msh-uid"] == "a1"


# ---------------------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------------------


def test_openai_stream_is_incremental_and_ordered(fake: FakeKimi, client: httpx.Client) -> None:
    t0 = time.monotonic()
    with client.stream("POST", OA, headers=bearer(K1), json=STREAM) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["transfer-encoding"] == "chunked"
        lines = timed_lines(r, t0)
    events = parse_sse("\n\n".join(line for _, line in lines) + "\n\n")
    assert events[-1].data == "[DONE]"
    assert sse_text(events) == expected_stream_text("k1", 5)
    # Arrival times of the 5 content events: spread over ~4 intervals (0.1 s), not delivered in one burst.
    content = [t for t, line in lines if '"content": "ok' in line]
    assert len(content) == 5
    # Loose bounds on purpose: a busy CI box may bunch two reads, but a server that buffered the whole stream
    # would show a spread near zero and no gap near the interval.
    gaps = sorted(b - a for a, b in itertools.pairwise(content))
    assert gaps[len(gaps) // 2] >= 0.05, gaps
    assert content[-1] - content[0] >= 0.25, content
    finish = json.loads(lines[-2][1].removeprefix("data: "))
    assert finish["choices"][0]["finish_reason"] == "stop" and "usage" in finish["choices"][0]  # legacy placement


def test_openai_stream_include_usage_top_level(client: httpx.Client) -> None:
    body = {**STREAM, "stream_options": {"include_usage": True}}
    r = client.post(OA, headers={**bearer(K1), "x-fake-interval": "0"}, json=body)
    events = parse_sse(r.content)
    assert events[-2].json()["usage"]["completion_tokens"] == 5


def test_anthropic_stream_events(client: httpx.Client) -> None:
    t0 = time.monotonic()
    headers = {"x-api-key": K2, "x-fake-events": "3", "x-fake-interval": "0.15"}
    with client.stream("POST", KC_AN, headers=headers, json=STREAM) as r:
        lines = timed_lines(r, t0)
    events = parse_sse("\n".join(line if line.startswith("data") else "\n" + line for _, line in lines) + "\n\n")
    assert [e.event for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert [e.json()["type"] for e in events] == [e.event for e in events]
    assert sse_text(events) == event_text("k2", 1) + event_text("k2", 2) + event_text("k2", 3)
    deltas = [t for t, line in lines if "text_delta" in line]
    assert deltas[-1] - deltas[0] >= 0.25
    assert events[-2].json()["delta"]["stop_reason"] == "end_turn"


def test_64_concurrent_streams(fake: FakeKimi, client: httpx.Client) -> None:
    results: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        key = (K1, K2, K3)[i % 3]
        try:
            with fake.client(timeout=10, limits=httpx.Limits(max_connections=4)) as c:
                r = c.post(KC_OA, headers={**bearer(key), "x-fake-events": "4", "x-fake-interval": "0.1"}, json=STREAM)
                with lock:
                    results.append(sse_text(parse_sse(r.content)))
        except BaseException as e:  # reported below; a thread must not die silently
            with lock:
                errors.append(e)

    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    elapsed = time.monotonic() - t0
    assert not errors, errors[:3]
    assert len(results) == 64 and all(r.endswith("#4\n") for r in results)
    assert elapsed < 3.0, elapsed  # ~0.4 s if concurrent, 25 s if serialized
    assert fake.peak_inflight("a1") > 10


# ---------------------------------------------------------------------------------------------------------------------
# Echo
# ---------------------------------------------------------------------------------------------------------------------


def test_echo_host(fake: FakeKimi, client: httpx.Client) -> None:
    r = client.post("https://echo.test/anything?x=1", headers={"X-Thing": "v"}, content=b"payload")
    assert r.status_code == 200
    body = r.json()
    assert body["echo"] is True and body["method"] == "POST" and body["path"] == "/anything?x=1"
    assert body["headers"]["x-thing"] == "v" and body["body"] == "payload" and body["sni"] == "echo.test"
    assert fake.requests[-1].status == 200


def test_echo_instance(pki: TestPKI) -> None:
    with FakeKimi(pki, echo=True) as echo, echo.client(timeout=5) as c:
        r = c.get("https://api.kimi.com/coding/v1/models", headers=bearer("whatever"))
        assert r.status_code == 200 and r.json()["path"] == "/coding/v1/models"
        assert r.json()["headers"]["authorization"] == "Bearer whatever"


# ---------------------------------------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------------------------------------


def test_rpm_limit_is_per_account(fake: FakeKimi, client: httpx.Client) -> None:
    fake.set_limit("a1", rpm=2)
    assert client.post(OA, headers=bearer(K1), json=CHAT).status_code == 200
    assert client.post(OA, headers=bearer(K2), json=CHAT).status_code == 200
    r = client.post(OA, headers=bearer(K1), json=CHAT)  # the other key of the account shares the limit
    assert r.status_code == 429
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert f"try again after {r.headers['retry-after']} seconds" in r.json()["error"]["message"]
    assert client.post(OA, headers=bearer(K3), json=CHAT).status_code == 200  # account a2 is not limited
    # Probes are not limited.
    assert client.get("https://api.kimi.com/coding/v1/usages", headers=bearer(K1)).status_code == 200


def test_rpm_window_slides(fake: FakeKimi, client: httpx.Client) -> None:
    fake.set_limit("a2", rpm=1, window=0.3)
    assert client.post(OA, headers=bearer(K3), json=CHAT).status_code == 200
    assert client.post(OA, headers=bearer(K3), json=CHAT).status_code == 429
    time.sleep(0.35)
    assert client.post(OA, headers=bearer(K3), json=CHAT).status_code == 200


def test_concurrency_limit(fake: FakeKimi) -> None:
    fake.set_limit("a2", concurrency=1)
    with fake.client(timeout=5) as c1, fake.client(timeout=5) as c2:
        hdr = {**bearer(K3), "x-fake-events": "3", "x-fake-interval": "0.1"}
        with c1.stream("POST", OA, headers=hdr, json=STREAM) as r1:
            assert r1.status_code == 200
            r2 = c2.post(OA, headers=bearer(K3), json=CHAT)
            assert r2.status_code == 429 and "max concurrency: 1" in r2.json()["error"]["message"]
            r1.read()
        # The server counts the stream as done just after its last byte went out: give it a moment.
        deadline = time.monotonic() + 2
        while fake.inflight("a2") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fake.inflight("a2") == 0
        assert c2.post(OA, headers=bearer(K3), json=CHAT).status_code == 200


def test_rate_limit_fraction(fake: FakeKimi, client: httpx.Client) -> None:
    fake.rate_limit_fraction(0.5, seed=7, account="a1")
    statuses = [client.post(OA, headers=bearer(K1), json=CHAT).status_code for _ in range(40)]
    assert set(statuses) == {200, 429}
    assert 8 <= statuses.count(429) <= 32
    assert all(client.post(OA, headers=bearer(K3), json=CHAT).status_code == 200 for _ in range(5))
    # Same seed, same sequence (sequential requests).
    fake.rate_limit_fraction(0.5, seed=7, account="a1")
    again = [client.post(OA, headers=bearer(K1), json=CHAT).status_code for _ in range(40)]
    assert again == statuses


USAGES = "https://api.kimi.com/coding/v1/usages"
BALANCE = "https://api.moonshot.cn/v1/users/me/balance"
FILES = "https://api.moonshot.cn/v1/files"


def test_rpm_window_follows_injected_clock(fake: FakeKimi, client: httpx.Client) -> None:
    clock = FakeClock()
    fake.clock = clock
    fake.set_limit("a1", rpm=2, ratelimit_headers=True)
    r = client.post(OA, headers=bearer(K1), json=CHAT)
    assert (r.headers["x-ratelimit-limit"], r.headers["x-ratelimit-remaining"]) == ("2", "1")
    clock.advance(20)
    assert client.post(OA, headers=bearer(K2), json=CHAT).status_code == 200
    r = client.post(OA, headers=bearer(K1), json=CHAT)
    assert r.status_code == 429 and r.headers["retry-after"] == "40"  # the first call leaves the window at t=60
    assert r.json()["error"] == {
        "type": "rate_limit_reached_error",
        "message": "Your account a1<ak-k1> request reached organization max RPM: 2, please try again after 40 seconds",
    }
    assert (r.headers["msh-uid"], r.headers["x-ratelimit-remaining"], r.headers["x-ratelimit-reset"]) == (
        "a1",
        "0",
        "40",
    )
    clock.advance(40)  # one slot free again, no sleep
    assert client.post(OA, headers=bearer(K1), json=CHAT).status_code == 200
    assert client.post(OA, headers=bearer(K1), json=CHAT).status_code == 429
    fake.reset()
    assert fake.clock is not clock  # reset() puts back the real clock


def test_concurrency_cap_counts_open_streams_kimi_code_wording(fake: FakeKimi) -> None:
    fake.set_limit("a1", concurrency=1, style="kimi_code")
    fake.set_account("a1", org_id="org-a1", gid="enterprise-tier-1")
    with fake.client(timeout=5) as c1, fake.client(timeout=5) as c2:
        hdr = {"x-api-key": K1, "x-fake-events": "2", "x-fake-interval": "0.05"}
        with c1.stream("POST", KC_AN, headers=hdr, json=STREAM) as r1:
            assert r1.status_code == 200
            r2 = c2.post(KC_AN, headers={"x-api-key": K2}, json=CHAT)  # the other key of the account
            assert r2.status_code == 429 and r2.headers["retry-after"] == "1"
            assert r2.json()["error"]["message"].startswith("We're receiving too many requests")
            assert (r2.headers["msh-uid"], r2.headers["msh-org-id"], r2.headers["msh-gid"]) == (
                "a1",
                "org-a1",
                "enterprise-tier-1",
            )
            assert c2.post(KC_AN, headers={"x-api-key": K3}, json=CHAT).status_code == 200  # another account
            r1.read()
    assert fake.peak_inflight("a1") == 1


def test_plan_windows_spend_refuse_and_reset_on_the_clock(fake: FakeKimi, client: httpx.Client) -> None:
    clock = FakeClock(1_800_000_000.0)
    fake.clock = clock
    fake.set_plan("a1", window_limit=2, weekly_limit=3, window_reset_in=600)
    for key in (K1, K2):  # both keys draw on the account's one quota
        assert client.post(KC_OA, headers=bearer(key), json=CHAT).status_code == 200
    usages = client.get(USAGES, headers=bearer(K2)).json()
    assert usages["usage"] == {"limit": "3", "used": "2", "remaining": "1", "resetTime": "2027-01-22T08:00:00Z"}
    assert usages["limits"] == [
        {
            "window": {"duration": 300, "timeUnit": "TIME_UNIT_MINUTE"},
            "detail": {"limit": "2", "used": "2", "remaining": "0", "resetTime": "2027-01-15T08:10:00Z"},
        }
    ]
    r = client.post(KC_AN, headers={"x-api-key": K1}, json=CHAT)
    assert r.status_code == 403 and "usage limit for this billing cycle" in r.json()["error"]["message"]
    assert client.post(KC_OA, headers=bearer(K3), json=CHAT).status_code == 200  # account a2 has no plan
    clock.advance(600)  # the 5-hour window resets; the next period ends 5 h later
    assert fake.plan_remaining("a1") == (2, 1)
    detail = client.get(USAGES, headers=bearer(K1)).json()["limits"][0]["detail"]
    assert (detail["remaining"], detail["resetTime"]) == ("2", "2027-01-15T13:10:00Z")
    assert client.post(KC_OA, headers=bearer(K1), json=CHAT).status_code == 200
    assert client.post(KC_OA, headers=bearer(K1), json=CHAT).status_code == 403  # now the weekly quota is spent
    fake.refresh_plan("a1", "weekly")
    assert fake.plan_remaining("a1") == (1, 3)
    assert client.post(KC_OA, headers=bearer(K1), json=CHAT).status_code == 200


def test_enforced_balance_is_spent_then_refuses(fake: FakeKimi, client: httpx.Client) -> None:
    fake.set_balance("a2", 0.5, charge=0.25)
    assert [client.post(OA, headers=bearer(K3), json=CHAT).status_code for _ in range(3)] == [200, 200, 429]
    r = client.post(OP_AN, headers=bearer(K3), json=CHAT)
    assert r.status_code == 429 and r.json()["error"]["type"] == "exceeded_current_quota_error"
    assert "insufficient balance" in r.json()["error"]["message"]
    assert client.get(BALANCE, headers=bearer(K3)).json()["data"]["available_balance"] == 0.0
    fake.set_balance("a2", 10.0, charge=0.25)  # a top-up
    assert client.post(OA, headers=bearer(K3), json=CHAT).status_code == 200
    assert fake.balance("a2") == 9.75
    fake.set_balance("a1", 0.0)  # without charge: reported only, as before
    assert client.post(OA, headers=bearer(K1), json=CHAT).status_code == 200


def error_of(r: httpx.Response, anthropic: bool) -> dict[str, str]:
    """The ``error`` object of a refusal, checking it is JSON in the route's envelope (never an event stream)."""
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert (body.get("type") == "error") is anthropic
    return dict(body["error"])


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("url", [OA, OP_AN], ids=["openai", "anthropic"])
def test_caps_refuse_plain_and_streamed_calls_alike_and_the_records_tell(
    fake: FakeKimi, client: httpx.Client, url: str, stream: bool
) -> None:
    """A call that would break a cap gets Kimi's 429 before any event, streamed or not; each record names the key,
    the account and the cap that refused it, and account_counts(429) counts the 429s per account."""
    fake.set_limit("a1", rpm=2, concurrency=1)
    anthropic = url == OP_AN
    body = {**CHAT, "stream": stream}
    held: list[httpx.Response] = []

    def hold_a_slot() -> None:  # a plain call holds its slot through its delay, a stream until its last event
        with fake.client(timeout=5) as c:
            held.append(c.post(url, headers={**bearer(K1), "x-fake-delay": "0.4", "x-fake-interval": "0"}, json=body))

    holder = threading.Thread(target=hold_a_slot)
    holder.start()
    fake.wait_for(lambda reqs: fake.inflight("a1") == 1)
    r = client.post(url, headers=bearer(K2), json=body)  # the other key of the account shares the cap
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert error_of(r, anthropic) == {
        "type": "rate_limit_reached_error",
        "message": "Your account a1<ak-k2> request reached organization max concurrency: 1, please try again after 1 "
        "seconds",
    }
    holder.join(5)
    assert held[0].status_code == 200
    assert held[0].headers["content-type"] == ("text/event-stream" if stream else "application/json")
    fake.wait_for(lambda reqs: fake.inflight("a1") == 0)
    assert client.post(url, headers=bearer(K2), json=body).status_code == 200
    r = client.post(url, headers=bearer(K1), json=body)
    assert r.status_code == 429
    wait = r.headers["retry-after"]
    assert error_of(r, anthropic)["message"] == (
        f"Your account a1<ak-k1> request reached organization max RPM: 2, please try again after {wait} seconds"
    )
    assert client.post(url, headers=bearer(K3), json=body).status_code == 200  # account a2 has no cap
    fake.script(K3, [Reply.overloaded()])  # a 429 that is no cap of the fake's still counts as a 429 sent
    assert client.post(url, headers=bearer(K3), json=body).status_code == 429

    assert [(s.key_name, s.account, s.status, s.refusal) for s in fake.requests] == [
        ("k1", "a1", 200, None),
        ("k2", "a1", 429, "concurrency"),
        ("k2", "a1", 200, None),
        ("k1", "a1", 429, "rpm"),
        ("k3", "a2", 200, None),
        ("k3", "a2", 429, None),
    ]
    assert fake.account_counts(429) == {"a1": 2, "a2": 1}
    assert fake.account_counts(200) == {"a1": 2, "a2": 1}
    assert fake.account_counts() == {"a1": 4, "a2": 2}
    assert fake.peak_inflight("a1") == 1


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_plan_and_balance_are_spent_and_enforced_streamed_or_not(
    fake: FakeKimi, client: httpx.Client, stream: bool
) -> None:
    fake.set_plan("a1", window_limit=1, weekly_limit=10)
    fake.set_balance("a2", 0.3, charge=0.2)
    body = {**CHAT, "stream": stream}
    fast = {"x-fake-interval": "0"}
    assert client.post(KC_OA, headers={**bearer(K1), **fast}, json=body).status_code == 200
    r = client.post(KC_AN, headers={"x-api-key": K2, **fast}, json=body)  # the account's window is spent
    assert r.status_code == 403 and "usage limit for this billing cycle" in error_of(r, True)["message"]
    assert fake.plan_remaining("a1") == (0, 9)
    assert client.get(USAGES, headers=bearer(K2)).json()["limits"][0]["detail"]["used"] == "1"
    statuses = [client.post(OA, headers={**bearer(K3), **fast}, json=body).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]  # 0.3 → 0.1 → -0.1, then refused
    assert client.get(BALANCE, headers=bearer(K3)).json()["data"]["available_balance"] == -0.1
    assert [s.refusal for s in fake.requests if s.method == "POST"] == [None, "plan", None, None, "balance"]


def conversation(turns: int) -> list[dict[str, str]]:
    msgs = []
    for i in range(turns):
        msgs += [{"role": "user", "content": f"question {i} " * 20}, {"role": "assistant", "content": f"answer {i}"}]
    return msgs[:-1]


def test_context_cache_is_per_account_in_both_shapes(fake: FakeKimi, client: httpx.Client) -> None:
    plain = client.post(OA, headers=bearer(K1), json={**CHAT, "messages": conversation(2)}).json()
    assert "cached_tokens" not in plain["usage"]  # off by default
    fake.enable_context_cache()
    first = client.post(OA, headers=bearer(K1), json={**CHAT, "messages": conversation(2)}).json()["usage"]
    assert first["cached_tokens"] == 0
    # The next turn of the conversation on another key of the same account: its first three messages are cached.
    usage = client.post(OA, headers=bearer(K2), json={**CHAT, "messages": conversation(3)}).json()["usage"]
    assert 0 < usage["cached_tokens"] < usage["prompt_tokens"]
    assert fake.cache_hits("a1") == 1
    # Same conversation on another account: no cache there.
    assert (
        client.post(OA, headers=bearer(K3), json={**CHAT, "messages": conversation(3)}).json()["usage"]["cached_tokens"]
        == 0
    )
    # Anthropic shape, non-streamed and streamed; input_tokens counts only the uncached part.
    body = {"model": "kimi-for-coding", "system": "be brief", "messages": conversation(2)}
    assert client.post(KC_AN, headers={"x-api-key": K1}, json=body).json()["usage"]["cache_read_input_tokens"] == 0
    fast = {"x-fake-interval": "0"}
    r = client.post(
        KC_AN, headers={"x-api-key": K1, **fast}, json={**body, "messages": conversation(3), "stream": True}
    )
    start = parse_sse(r.content)[0].json()["message"]["usage"]
    assert start["cache_read_input_tokens"] > 0 and start["input_tokens"] > 0
    # OpenAI streamed, both usage placements. The whole conversation is cached on a1 by now, so more than before.
    streamed = []
    for extra in ({"stream_options": {"include_usage": True}}, {}):
        r = client.post(
            OA, headers={**bearer(K2), **fast}, json={**CHAT, "messages": conversation(3), "stream": True, **extra}
        )
        last = [e.json() for e in parse_sse(r.content) if e.data != "[DONE]"][-1]
        streamed.append((last["usage"] if extra else last["choices"][0]["usage"])["cached_tokens"])
    assert streamed[0] == streamed[1] > usage["cached_tokens"]
    fake.forget_context_cache("a1")
    again = client.post(OA, headers=bearer(K1), json={**CHAT, "messages": conversation(3)}).json()["usage"]
    assert again["cached_tokens"] == 0


def test_files_belong_to_the_uploading_account(fake: FakeKimi, client: httpx.Client) -> None:
    assert client.post(FILES, headers=bearer(K1), files={"file": ("a.txt", b"x")}).status_code == 404  # off
    fake.enable_files()
    r = client.post(
        FILES,
        headers=bearer(K1),
        files={"file": ("notes.txt", b"hello file", "text/plain")},
        data={"purpose": "file-extract"},
    )
    assert r.status_code == 200
    obj = r.json()
    assert (obj["object"], obj["bytes"], obj["filename"], obj["purpose"]) == ("file", 10, "notes.txt", "file-extract")
    fid = obj["id"]
    assert fake.file_owner(fid) == "a1"
    # Any key of the owning account may read it ...
    assert client.get(f"{FILES}/{fid}", headers=bearer(K2)).json()["id"] == fid
    content = client.get(f"{FILES}/{fid}/content", headers=bearer(K2)).json()
    assert (content["content"], content["filename"], content["file_type"]) == ("hello file", "notes.txt", "text/plain")
    assert [f["id"] for f in client.get(FILES, headers=bearer(K1)).json()["data"]] == [fid]
    # ... another account's key sees no such file, exactly like an unknown id.
    for url in (f"{FILES}/{fid}", f"{FILES}/{fid}/content"):
        r = client.get(url, headers=bearer(K3))
        assert r.status_code == 404 and r.json()["error"] == {
            "type": "resource_not_found_error",
            "message": f"file {fid} not found",
        }
    assert client.get(FILES, headers=bearer(K3)).json()["data"] == []
    assert client.get(f"{FILES}/{fid}", headers=bearer("sk-nope")).status_code == 401
    assert client.post(FILES, headers=bearer(K1), json={}).status_code == 400  # not multipart
    assert client.delete(f"{FILES}/{fid}", headers=bearer(K3)).status_code == 404
    assert client.delete(f"{FILES}/{fid}", headers=bearer(K1)).json()["deleted"] is True
    assert client.get(f"{FILES}/{fid}", headers=bearer(K1)).status_code == 404


# ---------------------------------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------------------------------


def test_fault_close_before_headers(fake: FakeKimi, client: httpx.Client) -> None:
    fake.fault(K1, "close_before_headers", times=1)
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(OA, headers=bearer(K1), json=CHAT)
    assert fake.requests[-1].status is None and fake.requests[-1].fault == "close_before_headers"
    assert client.post(OA, headers=bearer(K1), json=CHAT).status_code == 200  # times=1: used up


def test_fault_hang(fake: FakeKimi, client: httpx.Client) -> None:
    fake.fault(None, "hang", times=1)
    with pytest.raises(httpx.ReadTimeout):
        client.post(OA, headers=bearer(K2), json=CHAT, timeout=0.3)
    assert fake.requests[-1].fault == "hang"


def test_fault_reset_midstream(fake: FakeKimi, client: httpx.Client) -> None:
    fake.fault(K1, "reset_midstream")
    received: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("POST", KC_OA, headers={**bearer(K1), "x-fake-interval": "0.02"}, json=STREAM) as r,
    ):
        assert r.status_code == 200
        received.extend(line for line in r.iter_lines() if line)
    text = sse_text(parse_sse("\n\n".join(received) + "\n\n"))
    assert text == expected_stream_text("k1", 2)
    assert "[DONE]" not in received
    # Non-streaming: a truncated body.
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(KC_OA, headers=bearer(K1), json=CHAT)
    # A scripted error does not consume (or trip over) the fault.
    fake.script(K1, [Reply.server_error()])
    assert client.post(KC_OA, headers=bearer(K1), json=CHAT).status_code == 500
    fake.clear_faults()
    assert client.post(KC_OA, headers=bearer(K1), json=STREAM).status_code == 200


def test_fault_trickle(fake: FakeKimi, client: httpx.Client) -> None:
    fake.fault(K2, "trickle", times=1)
    t0 = time.monotonic()
    with client.stream("POST", KC_AN, headers={"x-api-key": K2, "x-fake-events": "1"}, json=STREAM) as r:
        lines = timed_lines(r, t0)
    start = next(t for t, line in lines if "message_start" in line)
    delta = next(t for t, line in lines if "text_delta" in line)
    assert delta - start >= 0.9  # 1 s per event, whatever the configured interval
    assert "message_stop" in lines[-1][1]


def test_fault_error_midstream(fake: FakeKimi, client: httpx.Client) -> None:
    fake.fault(K2, "error_midstream")
    r = client.post(KC_AN, headers={"x-api-key": K2, "x-fake-interval": "0"}, json=STREAM)
    events = parse_sse(r.content)
    assert events[-1].event == "error" and events[-1].json()["type"] == "error"
    assert sse_text(events) == expected_stream_text("k2", 2)
    r = client.post(OA, headers={**bearer(K2), "x-fake-interval": "0"}, json=STREAM)
    events = parse_sse(r.content)
    assert "error" in events[-1].json() and events[-1].data != "[DONE]"


def test_fault_kind_checked(fake: FakeKimi) -> None:
    with pytest.raises(ValueError):
        fake.fault(None, "explode")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------------
# Shutdown
# ---------------------------------------------------------------------------------------------------------------------


def test_close_is_fast_with_hanging_and_streaming_connections(pki: TestPKI) -> None:
    outcomes: list[str] = []

    def call(fake: FakeKimi, key: str, body: dict[str, Any]) -> None:
        try:
            with fake.client(timeout=10) as c:
                c.post(OA, headers={**bearer(key), "x-fake-interval": "5"}, json=body)
            outcomes.append("answered")
        except httpx.HTTPError:
            outcomes.append("cut")

    fake = FakeKimi(pki).start()
    fake.add_key(K1, name="k1")
    fake.add_key(K2, name="k2")
    fake.fault(K1, "hang")
    threads = [threading.Thread(target=call, args=(fake, K1, CHAT))]
    threads += [threading.Thread(target=call, args=(fake, K2, STREAM)) for _ in range(4)]
    for t in threads:
        t.start()
    fake.wait_for(lambda reqs: len(reqs) == 5)
    # An idle keep-alive connection and a connection that never completes its TLS handshake, too.
    idle = socket.create_connection(("127.0.0.1", fake.port))
    try:
        time.sleep(0.1)
        t0 = time.monotonic()
        fake.close()
        assert time.monotonic() - t0 < 1.0
    finally:
        idle.close()
    for t in threads:
        t.join(2)
    assert outcomes.count("cut") == 5
    assert fake.live_connections == 0
