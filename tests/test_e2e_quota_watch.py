"""End-to-end: a real proxy (`mitmdump -s kimi_rotate.py`) meets a used-up Kimi Code plan on the fake upstream.

The 403 "usage limit for this billing cycle" cools the account for the 5-hour guess; the proxy then probes
`/coding/v1/usages` once, in the background, and the cooldown ends at the `resetTime` the fake reports. The other
account serves the request meanwhile, and no probe holds it up.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from certs import TestPKI
from fakekimi import FakeKimi
from harness import (
    CHAT_BODY,
    KC_CHAT,
    PLACEHOLDER,
    KeySpec,
    cli_keys,
    curl,
    kimi_key,
    prepare_pool,
    wait_keys,
)

pytestmark = pytest.mark.e2e

SPENT, SPENT_TOO, FRESH = kimi_key("0q01"), kimi_key("0q02"), kimi_key("0q03")
KC_PATH = "/coding/v1/chat/completions"


def test_a_billing_403_gets_the_account_probed_and_cooled_until_kimis_reset(
    proxy_factory, fake_kimi: FakeKimi, pki: TestPKI  # type: ignore[no-untyped-def]
) -> None:
    home: Path = proxy_factory.home()
    specs = [KeySpec(SPENT, "spent", account="plan"), KeySpec(SPENT_TOO, "spent-too", account="plan"),
             KeySpec(FRESH, "fresh", account="other")]
    options = prepare_pool(fake_kimi, pki.ca_cert, home, specs)
    fake_kimi.set_plan("plan", window_limit=10, window_used=10, window_reset_in=1800)  # used up for 30 min
    reset = float(int(time.time() + 1800))
    proxy = proxy_factory(home, {**options, "kimi_max_wait": 0})
    answer = curl(proxy, KC_CHAT, headers={"authorization": f"Bearer {PLACEHOLDER}"}, body=CHAT_BODY)
    assert answer.status == 200, answer.body  # the other account served it
    assert [(s.key_name, s.status) for s in fake_kimi.requests if s.path == KC_PATH] == [
        ("spent", 403), ("fresh", 200)]  # the account cooled at once: its other key was not tried
    wait_keys(home, lambda ks: {k.name: k.cooldown_until for k in ks if k.account == "plan"}
              == {"spent": reset, "spent-too": reset}, timeout=10)  # not the 5-hour guess
    rows = cli_keys(home)
    assert rows["spent"]["state"] == rows["spent-too"]["state"] == "cooling"
    assert rows["spent"]["reason"] == "quota: 5h used up"
    assert rows["fresh"]["state"] == "active"
    probes = [s for s in fake_kimi.requests if s.path == "/coding/v1/usages"]
    assert len(probes) == 1 and probes[0].headers["user-agent"].startswith("kimi-rotate/")
    assert "probed the account of" in proxy.log_text()


def test_with_quota_probes_off_the_guess_stands_and_nothing_is_probed(
    proxy_factory, fake_kimi: FakeKimi, pki: TestPKI  # type: ignore[no-untyped-def]
) -> None:
    home: Path = proxy_factory.home()
    specs = [KeySpec(SPENT, "spent", account="plan"), KeySpec(FRESH, "fresh", account="other")]
    options = prepare_pool(fake_kimi, pki.ca_cert, home, specs)
    fake_kimi.set_plan("plan", window_limit=10, window_used=10, window_reset_in=1800)
    proxy = proxy_factory(home, {**options, "kimi_max_wait": 0, "kimi_quota_probes": False})
    started = time.time()
    answer = curl(proxy, KC_CHAT, headers={"authorization": f"Bearer {PLACEHOLDER}"}, body=CHAT_BODY)
    assert answer.status == 200, answer.body
    wait_keys(home, lambda ks: any(k.name == "spent" and k.cooldown_until for k in ks))
    time.sleep(1.0)  # time enough for a probe, were one to come
    spent = next(k for k in wait_keys(home, lambda ks: True) if k.name == "spent")
    assert spent.cooldown_until == pytest.approx(started + 5 * 3600, abs=10)  # the classifier's 5-hour guess
    assert [s for s in fake_kimi.requests if s.path == "/coding/v1/usages"] == []
