"""End-to-end with the official SDKs: the openai SDK on chat/completions and the anthropic SDK on Kimi Code's
/coding/v1/messages, streaming and not, through a real proxy that fails over from a rate-limited key.

The SDKs run in their own interpreter (fixture `clients_python`, made by `scripts/test.sh` as .venv-clients): their
current releases need h11 >= 0.16, which mitmproxy 11.0.2 forbids. tests/clients/sdk_client.py finds the proxy the way
any program behind a system-wide proxy does, through HTTPS_PROXY and SSL_CERT_FILE.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from fakekimi import FakeKimi, Reply, expected_stream_text
from harness import (
    CLIENTS_DIR,
    PLACEHOLDER,
    PROXY_ENV,
    KeySpec,
    ProxyProcess,
    cli_keys,
    kimi_key,
    prepare_pool,
    reset_store,
    wait_keys,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ONE, TWO, THREE = kimi_key("0k01"), kimi_key("0k02"), kimi_key("0k03")
KEYS = [KeySpec(ONE, "one", account="acct-1"), KeySpec(TWO, "two", account="acct-2"),
        KeySpec(THREE, "three", account="acct-3")]
SDKS = {
    "openai": ("https://api.kimi.com/coding/v1", "kimi-for-coding"),
    "anthropic": ("https://api.kimi.com/coding", "kimi-for-coding"),
}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sdk") / "home"


@pytest.fixture(scope="module")
def proxy(module_proxy_factory: Any, fake_kimi_server: FakeKimi, pki: Any, home: Path) -> ProxyProcess:
    options = prepare_pool(fake_kimi_server, pki.ca_cert, home, KEYS)
    return module_proxy_factory(home, {**options, "kimi_max_wait": 0})


@pytest.fixture
def fake(proxy: ProxyProcess, fake_kimi: FakeKimi, home: Path) -> FakeKimi:
    reset_store(home, KEYS, settle=True)
    return fake_kimi


def run_sdk(python: Path, proxy: ProxyProcess, sdk: str, plan: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run the plan's requests in one process of the clients interpreter; one result per request."""
    base_url, model = SDKS[sdk]
    cmd = [str(python), str(CLIENTS_DIR / "sdk_client.py"), sdk, "--base-url", base_url, "--model", model,
           "--api-key", PLACEHOLDER, "--plan", json.dumps(plan), "--proxy", proxy.url, "--ca", str(proxy.ca)]
    env = {k: v for k, v in os.environ.items()
           if k not in PROXY_ENV and not k.startswith(("PYTHON", "OPENAI_", "ANTHROPIC_"))}
    env.update(HTTPS_PROXY=proxy.url, SSL_CERT_FILE=str(proxy.ca))
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("sdk", list(SDKS))
def test_sdk_sees_only_the_success_after_failover(
    clients_python: Path, proxy: ProxyProcess, fake: FakeKimi, home: Path, sdk: str
) -> None:
    fake.script(ONE, [Reply.rate_limit(retry_after=60)])  # the buffered request fails over from one to two,
    fake.script(TWO, [Reply.ok(), Reply.rate_limit(retry_after=60)])  # the streamed one from two to three
    pace = {"x-fake-interval": "0.2"}
    buffered, streamed, explicit = run_sdk(clients_python, proxy, sdk, [
        {"stream": False, "headers": pace},
        {"stream": True, "headers": pace},
        {"stream": True, "explicit": True},
    ])
    assert buffered["ok"] and buffered["text"] == "ok two", buffered
    assert streamed["ok"] and streamed["text"] == expected_stream_text("three", 5), streamed
    assert explicit["ok"] and explicit["text"] == expected_stream_text("three", 5), explicit
    assert [(r.key_name, r.status) for r in fake.requests] == [
        ("one", 429), ("two", 200), ("two", 429), ("three", 200), ("three", 200)]

    first = fake.requests[0]
    # Whichever header the SDK carries its credential in (openai: Bearer; anthropic: x-api-key, or Bearer in recent
    # releases) now carries the key, and nothing else was added or left behind.
    credentials = {k: v for k, v in first.headers.items() if k in ("authorization", "x-api-key")}
    assert credentials and all(v in (ONE, f"Bearer {ONE}") for v in credentials.values()), credentials
    assert PLACEHOLDER not in json.dumps(first.headers)
    if sdk == "anthropic":
        assert first.headers["anthropic-version"]  # the SDK's own headers pass through
    assert first.headers["user-agent"].lower().startswith(sdk)

    times = [e["t"] for e in streamed["events"] if e["text"]]
    assert len(times) == 5
    assert times[-1] - times[0] > 0.6, times  # incremental after the failover, not one lump at the end
    wait_keys(home, lambda ks: sum(k.total_requests for k in ks) >= 5)
    keys = cli_keys(home)
    assert keys["one"]["state"] == keys["two"]["state"] == "cooling"
    assert keys["three"]["successful_requests"] == 2


@pytest.mark.parametrize(("sdk", "error_type"), [("openai", "rate_limit_reached_error"),
                                                 ("anthropic", "rate_limit_error")])
def test_sdk_reads_the_all_cooling_answer(
    clients_python: Path, proxy: ProxyProcess, fake: FakeKimi, home: Path, sdk: str, error_type: str
) -> None:
    now = time.time()
    reset_store(home, [KeySpec(ONE, "one", account="acct-1", cooldown_until=now + 30),
                       KeySpec(TWO, "two", account="acct-2", cooldown_until=now + 45)], settle=True)
    [buffered, streamed] = run_sdk(clients_python, proxy, sdk, [{"stream": False}, {"stream": True}])
    for out in (buffered, streamed):
        assert (out["ok"], out["error"], out["status"]) == (False, "RateLimitError", 429), out
        # The SDK parsed the envelope it expects (openai hands over the inner "error" object).
        error = out["body"] if sdk == "openai" else out["body"]["error"]
        assert error["type"] == error_type, out["body"]
        assert "cooling" in error["message"]
        assert 25 <= int(out["headers"]["retry-after"]) <= 31
    assert fake.requests == []
