"""End-to-end: `kimi-rotate status --json` beside a running proxy shows that proxy serving the store, and the
requests it has in flight and sent in the last minute, as its heartbeat wrote them (no question to the proxy)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fakekimi import FakeKimi
from harness import KeySpec, platform_key, prepare_pool, proxy_client, run_cli, stream_request

from kimi_rotator.models import Surface

pytestmark = pytest.mark.e2e

OP_CHAT = "https://api.moonshot.ai/v1/chat/completions"
BEARER = {"authorization": "Bearer placeholder"}
BODY = {"model": "kimi-k2.6", "messages": [{"role": "user", "content": "hi"}], "stream": True}
KEYS = [KeySpec(platform_key("stat"), "s1", Surface.MOONSHOT_AI, "acct-s")]


def status(home: Path) -> dict[str, Any]:
    result = run_cli(home, "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def wait_status(home: Path, wanted: Any, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        data = status(home)
        if wanted(data) or time.monotonic() > deadline:
            return data
        time.sleep(0.3)


def test_status_shows_the_proxy_and_its_live_counts(proxy_factory: Any, fake_kimi: FakeKimi, pki: Any) -> None:
    home = proxy_factory.home("status")
    proxy = proxy_factory(home, prepare_pool(fake_kimi, pki.ca_cert, home, KEYS))
    started = time.time()
    with proxy_client(proxy, timeout=30) as client:
        for _ in range(3):
            assert stream_request(client, OP_CHAT, body=BODY, headers=BEARER).status == 200
        slow = [threading.Thread(target=stream_request, args=(client, OP_CHAT),
                                 kwargs={"body": BODY, "headers": {**BEARER, "x-fake-delay": "6"}})
                for _ in range(2)]
        for t in slow:
            t.start()

        def counts(data: dict[str, Any]) -> tuple[int, int]:
            account = data["accounts"][0]
            return account["in_flight"], account["last_minute"]

        during = wait_status(home, lambda d: counts(d) == (2, 5))
        assert counts(during) == (2, 5), during
        assert during["serving"] and len(during["proxies"]) == 1
        assert during["proxies"][0]["since"] <= started + 1
        assert during["accounts"][0]["keys"][0]["state"] == "active"
        for t in slow:
            t.join(30)
    after = wait_status(home, lambda d: counts(d) == (0, 5))
    assert counts(after) == (0, 5), after
    proxy.stop()
    gone = wait_status(home, lambda d: not d["serving"])
    assert not gone["serving"] and gone["proxies"] == []
