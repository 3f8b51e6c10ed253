"""End-to-end: a real `mitmdump -s kimi_rotate.py`, the fake Kimi upstream, real clients (curl, httpx).

Rotation order per strategy, transparent failover for every key- and account-scope error (streaming and not), streams
that stay incremental after a failover, no penalty for request-, client- and server-scope answers, the local 429 when
every key cools, both credential header styles, and 32 concurrent streams. One proxy serves the whole module; each
test starts from a freshly written store (new key ids, full health) and a reset fake.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fakekimi import FakeKimi, Reply, expected_stream_text
from harness import (
    CHAT_BODY,
    KC_CHAT,
    KC_MESSAGES,
    KIMI_SCRIPT,
    MESSAGES_BODY,
    PLACEHOLDER,
    KeySpec,
    ProxyProcess,
    cli_keys,
    content_times,
    curl,
    key_rows,
    kimi_key,
    prepare_pool,
    proxy_client,
    read_keys,
    reset_store,
    sse_texts,
    stream_request,
    upstream_options,
    wait_keys,
)

from kimi_rotator.models import Strategy

pytestmark = pytest.mark.e2e

ONE, TWO, THREE, FOUR = kimi_key("0001"), kimi_key("0002"), kimi_key("0003"), kimi_key("0004")
ONE_B = kimi_key("001b")  # a second key of ONE's account
KEYS = [
    KeySpec(ONE, "one", account="acct-1"),
    KeySpec(TWO, "two", account="acct-2"),
    KeySpec(THREE, "three", account="acct-3"),
]
ALL = [*KEYS, KeySpec(FOUR, "four", account="acct-4"), KeySpec(ONE_B, "one-b", account="acct-1")]
SECRETS = {s.name: s.secret for s in ALL}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("failover") / "home"


@pytest.fixture(scope="module")
def proxy(module_proxy_factory: Any, fake_kimi_server: FakeKimi, pki: Any, home: Path) -> ProxyProcess:
    options = prepare_pool(fake_kimi_server, pki.ca_cert, home, KEYS, fake_specs=ALL)
    return module_proxy_factory(home, {**options, "kimi_max_wait": 0})


@pytest.fixture
def fake(proxy: ProxyProcess, fake_kimi: FakeKimi, home: Path) -> FakeKimi:
    """The fake, reset, with the store back at KEYS (health-based) and the proxy caught up with it."""
    reset_store(home, KEYS, settle=True)
    return fake_kimi


def seen(fake: FakeKimi) -> list[tuple[str | None, int | None]]:
    """(key name, status) of every client request the fake saw, in order (not the proxy's own quota probes)."""
    return [(r.key_name, r.status) for r in fake.requests if r.method == "POST"]


def ask(proxy: ProxyProcess, *, stream: bool, headers: dict[str, str] | None = None) -> tuple[int, str, Any]:
    """One request through the proxy: buffered as curl (HTTP/2) on chat/completions, streamed as httpx (HTTP/1.1)
    on /coding/v1/messages. Returns (status, generated text, parsed body or the stream result)."""
    if not stream:
        r = curl(proxy, KC_CHAT, headers=headers or {"authorization": f"Bearer {PLACEHOLDER}"}, body=CHAT_BODY)
        assert r.status, r.stderr
        doc = r.json()
        text = doc["choices"][0]["message"]["content"] if r.status == 200 else ""
        return r.status, text, doc
    with proxy_client(proxy) as client:
        result = stream_request(client, KC_MESSAGES, body={**MESSAGES_BODY, "stream": True},
                                headers=headers or {"x-api-key": PLACEHOLDER})
    text = "".join(sse_texts(result)) if result.status == 200 else ""
    return result.status, text, result


# -- rotation order per strategy -------------------------------------------------------------------------------------


def test_mitmproxy_opens_no_connection_of_its_own_to_kimi(proxy: ProxyProcess, fake: FakeKimi) -> None:
    """Kimi requests go out through the addon's pooled client. Under the default eager strategy, mitmproxy's tlsconfig
    addon (after scripts in mitmdump's chain) would also open a connection when each client's TLS starts: idle, and
    a TLS handshake per client connection."""
    assert ask(proxy, stream=False)[0] == 200  # the addon's pool now holds a connection
    fake.reset()
    for _ in range(3):  # each curl is a new client connection to the proxy
        assert ask(proxy, stream=False)[0] == 200
    assert fake.handshakes <= 1, fake.handshakes  # the pooled connection was reused (or reopened once)


class ScriptCopyProxy(ProxyProcess):
    """A proxy loading its own copy of kimi_rotate.py, so a test can touch it without touching the repository's."""

    def __init__(self, script: Path, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.script = script

    def command(self) -> list[str]:
        return [str(self.script) if part == str(KIMI_SCRIPT) else part for part in super().command()]


def test_the_script_reloads_in_place(tmp_path: Path, fake: FakeKimi, mitm_confdir: Path, pki: Any, home: Path
                                     ) -> None:
    """mitmdump reloads a changed script: the old addon is torn down (its helper addon removed from the chain) and
    the new one serves at once, streaming and not."""
    script = tmp_path / "kimi_rotate.py"
    script.write_text(KIMI_SCRIPT.read_text())
    options = {**upstream_options(fake.port, pki.ca_cert), "kimi_max_wait": 0}
    proxy = ScriptCopyProxy(script, tmp_path / "proxy", home, options, confdir=mitm_confdir).start()
    try:
        assert ask(proxy, stream=False)[0] == 200
        loads = proxy.log_text().count("Loading script")
        later = time.time() + 5
        os.utime(script, (later, later))
        deadline = time.monotonic() + 10
        while proxy.log_text().count("Loading script") == loads:
            assert time.monotonic() < deadline, proxy.log_text()[-2000:]
            time.sleep(0.05)
        time.sleep(0.3)  # the new addon's running hook, and its relay listening
        before = sum(k.total_requests for k in read_keys(home))
        assert [ask(proxy, stream=stream)[0] for stream in (False, True)] == [200, 200]
        wait_keys(home, lambda ks: sum(k.total_requests for k in ks) >= before + 2)  # its store writer runs
        log = proxy.log_text()
        assert "Addon error" not in log and "already exists" not in log and "Traceback" not in log, log[-3000:]
    finally:
        proxy.stop()


def test_round_robin_cycles_over_the_keys(proxy: ProxyProcess, fake: FakeKimi, home: Path) -> None:
    reset_store(home, KEYS, Strategy.ROUND_ROBIN, settle=True)
    for i in range(6):  # buffered and streamed requests share one rotation
        status, _, _ = ask(proxy, stream=bool(i % 2))
        assert status == 200
    assert [name for name, _ in seen(fake)] == ["one", "two", "three", "one", "two", "three"]


def test_health_based_sticks_to_the_current_key(proxy: ProxyProcess, fake: FakeKimi) -> None:
    """One conversation stays on the current key. A second one, going on at the same time, is placed on the account
    with fewer live conversations, and stays there too (each keeps its account's context cache)."""
    for _ in range(3):
        assert ask(proxy, stream=False)[0] == 200
    assert [name for name, _ in seen(fake)] == ["one"] * 3
    fake.clear_requests()
    for i in range(6):  # the streamed requests are another conversation (another prompt)
        assert ask(proxy, stream=bool(i % 2))[0] == 200
    assert [name for name, _ in seen(fake)] == ["one", "two"] * 3


def test_sticky_stays_until_the_key_is_limited(proxy: ProxyProcess, fake: FakeKimi, home: Path) -> None:
    reset_store(home, KEYS, Strategy.STICKY, settle=True)
    for _ in range(3):
        assert ask(proxy, stream=False)[0] == 200
    fake.script(ONE, [Reply.rate_limit(retry_after=60)])
    for _ in range(3):
        assert ask(proxy, stream=False)[0] == 200
    assert seen(fake) == [("one", 200)] * 3 + [("one", 429)] + [("two", 200)] * 3


# -- failover for key- and account-scope errors ----------------------------------------------------------------------

KEY_SCOPE_ERRORS = [
    pytest.param(Reply.rate_limit(retry_after=30), "cooling", 30, "rate_limited_requests", id="429-rate-limit"),
    pytest.param(Reply.quota(), "cooling", 6 * 3600, "failed_requests", id="429-quota"),
    pytest.param(Reply.billing(), "cooling", 5 * 3600, "failed_requests", id="403-billing"),
    pytest.param(Reply.membership(), "cooling", 24 * 3600, "failed_requests", id="402-membership"),
    pytest.param(Reply.invalid(), "disabled", None, "failed_requests", id="401-invalid"),
    pytest.param(Reply.access_terminated(), "disabled", None, "failed_requests", id="403-terminated"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
@pytest.mark.parametrize(("reply", "state", "cooling_s", "counter"), KEY_SCOPE_ERRORS)
def test_key_scope_error_fails_over_transparently(
    proxy: ProxyProcess, fake: FakeKimi, home: Path,
    reply: Reply, state: str, cooling_s: float | None, counter: str, stream: bool,
) -> None:
    fake.script(ONE, [reply])
    # A used-up quota gets the account probed: here the probe learns nothing, so the classifier's guess stays
    # (tests/test_e2e_quota_watch.py has the probe that moves it).
    fake.script(ONE, [Reply.unavailable()], on="probe")
    started = time.time()
    status, text, _ = ask(proxy, stream=stream)

    # The client sees only the success of the second key.
    assert status == 200
    assert text == (expected_stream_text("two", 5) if stream else "ok two")
    assert seen(fake) == [("one", reply.status), ("two", 200)]

    wait_keys(home, lambda ks: sum(k.total_requests for k in ks) >= 2)
    keys = cli_keys(home)
    one, two, three = keys["one"], keys["two"], keys["three"]
    assert one["state"] == state, one
    assert one["reason"] and one["reason"].startswith(str(reply.status)), one
    assert one["health"] < 100 and one["total_requests"] == 1 and one[counter] == 1
    if cooling_s is not None:
        assert one["cooldown_until"] == pytest.approx(started + cooling_s, abs=5), one
    else:
        assert one["cooldown_until"] is None
    assert (two["state"], two["successful_requests"], two["health"]) == ("active", 1, 100)
    assert three["total_requests"] == 0
    assert two["current"] and not one["current"]


def test_account_scope_cools_every_key_of_the_account(proxy: ProxyProcess, fake: FakeKimi, home: Path) -> None:
    reset_store(home, [KEYS[0], KeySpec(ONE_B, "one-b", account="acct-1"), KEYS[1]], settle=True)
    fake.script(ONE, [Reply.rate_limit(retry_after=120)])
    assert ask(proxy, stream=False)[:2] == (200, "ok two")
    assert seen(fake) == [("one", 429), ("two", 200)]  # one-b shares the account's limit: never tried
    wait_keys(home, lambda ks: sum(k.total_requests for k in ks) >= 2)
    keys = cli_keys(home)
    assert keys["one"]["state"] == keys["one-b"]["state"] == "cooling"
    assert keys["one-b"]["total_requests"] == 0 and keys["one-b"]["health"] == 100


def test_stream_stays_incremental_after_failover(proxy: ProxyProcess, fake: FakeKimi) -> None:
    pace = {"x-fake-events": "5", "x-fake-interval": "0.2"}
    with proxy_client(proxy) as client:
        body = {**CHAT_BODY, "stream": True}
        baseline = stream_request(client, KC_CHAT, body=body, headers={"authorization": "Bearer x", **pace})
        fake.script(ONE, [Reply.rate_limit(retry_after=60)])
        failed_over = stream_request(client, KC_CHAT, body=body, headers={"authorization": "Bearer x", **pace})
    assert baseline.status == failed_over.status == 200
    assert seen(fake) == [("one", 200), ("one", 429), ("two", 200)]
    assert "".join(sse_texts(failed_over)) == expected_stream_text("two", 5)

    times = content_times(failed_over)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) == 5
    # Events arrive as the upstream sends them (0.2 s apart), not in one lump at the end.
    assert all(g > 0.1 for g in gaps), gaps
    assert times[-1] - times[0] > 0.6, times
    # The retry costs about one upstream round trip before the first event, not the whole stream.
    first_base = content_times(baseline)[0]
    assert times[0] - first_base < 0.5, (first_base, times[0])
    assert failed_over.t_headers < 0.5, failed_over.t_headers


@pytest.fixture(scope="module")
def h2_proxy(module_proxy_factory: Any, proxy: ProxyProcess, fake_kimi_server: FakeKimi, pki: Any, home: Path
             ) -> ProxyProcess:
    """A second proxy on the same store that lets clients speak HTTP/2 to it although the fake speaks only
    HTTP/1.1 (lazy connections and no upstream certificate sniffing: the client's ALPN decides)."""
    options = {**upstream_options(fake_kimi_server.port, pki.ca_cert), "kimi_max_wait": 0,
               "connection_strategy": "lazy", "upstream_cert": False}
    return module_proxy_factory(home, options)


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
def test_failover_for_an_http2_client(h2_proxy: ProxyProcess, fake: FakeKimi, stream: bool) -> None:
    fake.script(ONE, [Reply.rate_limit(retry_after=60)])
    r = curl(h2_proxy, KC_MESSAGES, headers={"x-api-key": PLACEHOLDER}, body={**MESSAGES_BODY, "stream": stream})
    assert (r.status, r.http_version) == (200, "HTTP/2"), r.stderr
    if stream:
        events = [json.loads(line[5:]) for line in r.body.decode().splitlines() if line.startswith("data:")]
        text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
        assert text == expected_stream_text("two", 5)
        assert events[-1]["type"] == "message_stop"
    else:
        assert r.json()["content"][0]["text"] == "ok two"
    assert seen(fake) == [("one", 429), ("two", 200)]


# -- no penalty, no rotation -----------------------------------------------------------------------------------------

PASS_THROUGH = [
    pytest.param(Reply.content_filter(), "content_filter", id="400-content-filter"),
    pytest.param(Reply.not_found(), "resource_not_found_error", id="404-model"),
    pytest.param(Reply.coding_agents_only(), "access_terminated_error", id="403-coding-agents-only"),
    pytest.param(Reply.overloaded(), "engine_overloaded_error", id="429-engine-overloaded"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
@pytest.mark.parametrize(("reply", "etype"), PASS_THROUGH)
def test_request_client_and_server_scope_pass_through_without_penalty(
    proxy: ProxyProcess, fake: FakeKimi, home: Path, reply: Reply, etype: str, stream: bool
) -> None:
    fake.script(ONE, [reply])
    status, _, answer = ask(proxy, stream=stream)
    assert status == reply.status
    doc = answer.json() if stream else answer
    expected_type = (reply.anthropic_error_type or etype) if stream else etype
    assert doc["error"]["type"] == expected_type  # the upstream's own answer, untouched
    assert seen(fake) == [("one", reply.status)]  # no rotation
    wait_keys(home, lambda ks: ks[0].total_requests >= 1)
    for row in key_rows(home).values():
        assert (row["state"], row["health"], row["cooldown_until"]) == ("active", 100, None), row


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
def test_5xx_is_retried_once_on_another_key_without_penalty(
    proxy: ProxyProcess, fake: FakeKimi, home: Path, stream: bool
) -> None:
    fake.script(ONE, [Reply.server_error()])
    status, text, _ = ask(proxy, stream=stream)
    assert status == 200 and text.startswith("ok two")
    assert seen(fake) == [("one", 500), ("two", 200)]
    wait_keys(home, lambda ks: sum(k.total_requests for k in ks) >= 2)
    keys = key_rows(home)
    assert (keys["one"]["state"], keys["one"]["health"]) == ("active", 100)


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
def test_5xx_is_retried_only_once(proxy: ProxyProcess, fake: FakeKimi, home: Path, stream: bool) -> None:
    fake.script(ONE, [Reply.server_error()])
    fake.script(TWO, [Reply.unavailable()])
    status, _, _ = ask(proxy, stream=stream)
    assert status == 503  # the second answer is passed on; the third key is never tried
    assert seen(fake) == [("one", 500), ("two", 503)]
    wait_keys(home, lambda ks: sum(k.total_requests for k in ks) >= 2)
    assert all(row["health"] == 100 and row["state"] == "active" for row in key_rows(home).values())


def test_connection_failure_is_retried_on_another_key_when_streaming(
    proxy: ProxyProcess, fake: FakeKimi, home: Path
) -> None:
    # Every connection with key one is dropped: a single drop would be absorbed by the client re-sending on a fresh
    # connection (a pooled connection the server closed is not yet a failure), and never reach the failover.
    fake.fault(ONE, "close_before_headers")
    status, text, _ = ask(proxy, stream=True)
    assert (status, text) == (200, expected_stream_text("two", 5))
    wait_keys(home, lambda ks: sum(k.total_requests for k in ks) >= 2)
    assert key_rows(home)["one"]["health"] == 100


def test_connection_failure_penalises_no_key(proxy: ProxyProcess, fake: FakeKimi, home: Path) -> None:
    fake.fault(ONE, "close_before_headers", times=1)
    r = curl(proxy, KC_CHAT, headers={"authorization": f"Bearer {PLACEHOLDER}"}, body=CHAT_BODY)
    assert r.status in (200, 502)
    wait_keys(home, lambda ks: ks[0].total_requests >= 1)
    one = key_rows(home)["one"]
    assert (one["state"], one["health"]) == ("active", 100)


def test_connection_failure_is_retried_on_another_key_when_buffered(proxy: ProxyProcess, fake: FakeKimi) -> None:
    fake.fault(ONE, "close_before_headers")
    r = curl(proxy, KC_CHAT, headers={"authorization": f"Bearer {PLACEHOLDER}"}, body=CHAT_BODY)
    assert r.status == 200, r.body[:200]
    assert r.json()["choices"][0]["message"]["content"] == "ok two"


# -- every key cooling -----------------------------------------------------------------------------------------------

COOLING_ROUTES = [
    pytest.param(KC_CHAT, CHAT_BODY, "openai", id="openai-chat"),
    pytest.param(KC_MESSAGES, MESSAGES_BODY, "anthropic", id="anthropic-messages"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
@pytest.mark.parametrize(("url", "body", "envelope"), COOLING_ROUTES)
def test_all_keys_cooling_answers_locally(
    proxy: ProxyProcess, fake: FakeKimi, home: Path, url: str, body: dict[str, Any], envelope: str, stream: bool
) -> None:
    now = time.time()
    reset_store(home, [
        KeySpec(ONE, "one", account="acct-1", cooldown_until=now + 90),
        KeySpec(TWO, "two", account="acct-2", cooldown_until=now + 40),
        KeySpec(THREE, "three", account="acct-3", cooldown_until=now + 300),
    ], settle=True)
    with proxy_client(proxy) as client:
        r = client.post(url, json={**body, "stream": stream}, headers={"authorization": f"Bearer {PLACEHOLDER}"})
    waited = time.time() - now
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) == pytest.approx(40 - waited, abs=2)
    doc = r.json()
    if envelope == "openai":
        assert doc["error"]["type"] == "rate_limit_reached_error"
    else:
        assert doc["type"] == "error" and doc["error"]["type"] == "rate_limit_error"
    message = doc["error"]["message"]
    assert "3" in message and "cooling" in message, message  # how many keys cool, and when the first frees
    assert fake.requests == []  # answered locally: no upstream request


def test_all_keys_disabled_answers_locally(proxy: ProxyProcess, fake: FakeKimi, home: Path) -> None:
    from kimi_rotator.store_sqlite import SqliteStore

    store = SqliteStore(home)
    try:
        for k in list(store.keys()):
            store.set_disabled(k.id, "test")
    finally:
        store.close()
    time.sleep(0.6)
    with proxy_client(proxy) as client:
        r = client.post(KC_MESSAGES, json=MESSAGES_BODY, headers={"x-api-key": PLACEHOLDER})
    assert r.status_code == 503
    assert r.json()["type"] == "error" and "disabled" in r.json()["error"]["message"]
    assert fake.requests == []


# -- credential headers ----------------------------------------------------------------------------------------------

STYLES = {
    "bearer": {"authorization": f"Bearer {PLACEHOLDER}"},
    "x-api-key": {"x-api-key": PLACEHOLDER},
    "both": {"authorization": f"Bearer {PLACEHOLDER}", "x-api-key": PLACEHOLDER},
}
IDENTITY = {"user-agent": "claude-cli/2.1.0 (external, cli)", "x-msh-platform": "kimi_cli",
            "anthropic-version": "2023-06-01", "x-custom": "kept"}


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream"])
@pytest.mark.parametrize("style", list(STYLES))
def test_credential_is_swapped_in_the_same_header_style(
    proxy: ProxyProcess, fake: FakeKimi, style: str, stream: bool
) -> None:
    body = json.dumps({**MESSAGES_BODY, "stream": stream}, separators=(", ", ":")).encode()  # odd spacing on purpose
    with proxy_client(proxy) as client:
        r = client.post(KC_MESSAGES, content=body,
                        headers={**STYLES[style], **IDENTITY, "content-type": "application/json"})
        r.read()
    assert r.status_code == 200
    [req] = fake.requests
    assert req.key_name == "one"
    h = req.headers
    assert ("authorization" in h) == (style in ("bearer", "both"))
    assert ("x-api-key" in h) == (style in ("x-api-key", "both"))
    if "authorization" in h:
        assert h["authorization"] == f"Bearer {ONE}"
    if "x-api-key" in h:
        assert h["x-api-key"] == ONE
    for name, value in IDENTITY.items():
        assert h[name] == value  # client identity passes unchanged
    assert req.body == body


# -- load ------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_32_concurrent_streams_over_4_keys(proxy: ProxyProcess, fake: FakeKimi, home: Path) -> None:
    names = ["one", "two", "three", "four"]
    reset_store(home, [s for s in ALL if s.name in names], Strategy.ROUND_ROBIN, settle=True)

    def one_stream(i: int) -> tuple[int, list[str], list[float]]:
        with proxy_client(proxy) as client:
            r = stream_request(client, KC_CHAT, body={**CHAT_BODY, "stream": True},
                               headers={"authorization": f"Bearer {PLACEHOLDER}", "x-fake-interval": "0.1"})
        return r.status, sse_texts(r), content_times(r)

    t0 = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one_stream, range(32)))
    elapsed = time.monotonic() - t0

    per_key: dict[str, int] = {}
    for status, texts, times in results:
        assert status == 200
        name = texts[0].split()[1]
        assert "".join(texts) == expected_stream_text(name, 5)  # complete and in order
        assert times == sorted(times)
        per_key[name] = per_key.get(name, 0) + 1
    assert per_key == dict.fromkeys(names, 8)
    assert elapsed < 20, elapsed
    wait_keys(home, lambda ks: sum(k.successful_requests for k in ks) == 32)
