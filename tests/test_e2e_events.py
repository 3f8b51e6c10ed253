"""End-to-end: a real proxy on the fake Kimi writes the event log; `kimi-rotate events --json` shows it."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from fakekimi import FakeKimi, Reply
from harness import CHAT_BODY, KC_CHAT, PLACEHOLDER, KeySpec, curl, kimi_key, prepare_pool, run_cli

from kimi_rotator import events
from kimi_rotator.keys import fingerprint

pytestmark = pytest.mark.e2e

ONE, TWO, THREE = kimi_key("e001"), kimi_key("e002"), kimi_key("e003")
KIMI_ACCOUNT = "kimi-uid-777"  # the id the fake sends as Msh-Uid for ONE, whose store entry has no label


def logged(home: Path) -> list[dict[str, Any]]:
    result = run_cli(home, "events", "--json", "--since", "1h")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def wait_events(home: Path, kinds: list[str], timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        got = logged(home)
        if all(k in [e["event"] for e in got] for k in kinds):
            return got
        assert time.monotonic() < deadline, f"{kinds} not all logged: {got}"
        time.sleep(0.2)


def test_a_429_failover_and_a_disabled_key_are_logged_without_keys_or_kimi_ids(
    proxy_factory: Any, fake_kimi: FakeKimi, pki: Any
) -> None:
    home = proxy_factory.home()
    specs = [KeySpec(ONE, "one"), KeySpec(TWO, "two", account="team-2"), KeySpec(THREE, "three", account="team-3")]
    options = prepare_pool(fake_kimi, pki.ca_cert, home, specs,
                           fake_specs=[KeySpec(ONE, "one", account=KIMI_ACCOUNT), *specs[1:]])
    proxy = proxy_factory(home, {**options, "kimi_max_wait": 0})
    fake_kimi.script(ONE, [Reply.rate_limit(retry_after=60)])
    fake_kimi.script(TWO, [Reply.ok(), Reply.invalid()])
    for _ in range(2):  # one 429 → two; then two 401 → three
        r = curl(proxy, KC_CHAT, headers={"authorization": f"Bearer {PLACEHOLDER}"}, body=CHAT_BODY)
        assert r.status == 200, r.stderr

    got = wait_events(home, ["cooldown_started", "key_disabled", "failover", "account_learned"])
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for e in got:
        by_kind.setdefault(e["event"], []).append(e)
    cooling = by_kind["cooldown_started"][0]
    assert cooling["key"] == {"name": "one", "fingerprint": fingerprint(ONE)}
    assert cooling["reason"].startswith("429") and cooling["until"] > time.time() + 30
    assert cooling["account"].startswith("learned:")
    disabled = by_kind["key_disabled"][0]
    assert disabled["key"]["name"] == "two" and disabled["reason"].startswith("401")
    assert disabled["account"] == "team-2"  # the user's own label is shown as given
    trails = [([t["name"] for t in f["tried"]], f["to"]["name"]) for f in by_kind["failover"]]
    assert trails == [(["one"], "two"), (["two"], "three")]
    assert by_kind["failover"][0]["tried"][0]["why"].startswith("429")

    path = events.path_in(home)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    for secret in (ONE, TWO, THREE):
        assert secret not in text and secret[-4:] not in text
    assert KIMI_ACCOUNT not in text and "…" not in text
    # The table names the same events, one a line.
    table = run_cli(home, "events").stdout
    assert "failover" in table and "key_disabled" in table and ONE not in table
