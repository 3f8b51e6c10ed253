"""End-to-end: two proxy processes and the CLI sharing one store.

What one proxy learns (a key cooling, a key disabled) reaches the other within about a second, as do keys added,
removed, disabled, enabled or chosen with the `kimi-rotate` CLI while both run; no restart is needed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fakekimi import FakeKimi, Reply
from harness import (
    CHAT_BODY,
    KC_CHAT,
    PLACEHOLDER,
    KeySpec,
    ProxyProcess,
    cli_keys,
    curl,
    kimi_key,
    platform_key,
    reset_store,
    run_cli,
    upstream_options,
)

from kimi_rotator.models import Surface

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # waits out the one-second propagation promise, runs the CLI

ONE, TWO, FRESH = kimi_key("0s01"), kimi_key("0s02"), kimi_key("0s03")
CN = platform_key("0s04")
KEYS = [KeySpec(ONE, "one", account="acct-1"), KeySpec(TWO, "two", account="acct-2")]
PROPAGATION = 1.0  # the promise: another process acts on a store change within about a second


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared") / "home"


@pytest.fixture(scope="module")
def proxies(module_proxy_factory: Any, fake_kimi_server: FakeKimi, pki: Any, home: Path
            ) -> tuple[ProxyProcess, ProxyProcess]:
    for secret, name, account in ((ONE, "one", "acct-1"), (TWO, "two", "acct-2"), (FRESH, "fresh", "acct-3")):
        fake_kimi_server.add_key(secret, account=account, name=name)
    reset_store(home, KEYS)
    options = {**upstream_options(fake_kimi_server.port, pki.ca_cert), "kimi_max_wait": 0}
    return module_proxy_factory(home, options), module_proxy_factory(home, options)


@pytest.fixture
def fake(proxies: Any, fake_kimi: FakeKimi, home: Path) -> FakeKimi:
    reset_store(home, KEYS, settle=True)
    return fake_kimi


def ask(proxy: ProxyProcess) -> int:
    return curl(proxy, KC_CHAT, headers={"authorization": f"Bearer {PLACEHOLDER}"}, body=CHAT_BODY).status


def names(fake: FakeKimi) -> list[str | None]:
    return [r.key_name for r in fake.requests]


def cli(home: Path, *args: str) -> str:
    result = run_cli(home, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(("reply", "state"), [(Reply.rate_limit(retry_after=120), "cooling"),
                                              (Reply.invalid(), "disabled")], ids=["cooled", "disabled"])
def test_what_one_proxy_learns_the_other_acts_on(
    proxies: tuple[ProxyProcess, ProxyProcess], fake: FakeKimi, home: Path, reply: Reply, state: str
) -> None:
    a, b = proxies
    fake.script(ONE, [reply])
    assert ask(a) == 200
    learned = time.monotonic()
    assert cli_keys(home)["one"]["state"] == state  # `list-keys` in another terminal already shows it
    time.sleep(max(0.0, PROPAGATION - (time.monotonic() - learned)))
    fake.clear_requests()
    assert ask(b) == 200
    assert names(fake) == ["two"]  # b never tries the key a found unusable


def test_cli_disable_and_enable_reach_both_proxies(
    proxies: tuple[ProxyProcess, ProxyProcess], fake: FakeKimi, home: Path
) -> None:
    a, b = proxies
    cli(home, "disable", "one", "--reason", "by hand in a test")
    time.sleep(PROPAGATION)
    assert ask(a) == ask(b) == 200
    assert names(fake) == ["two", "two"]

    cli(home, "enable", "one")
    cli(home, "disable", "two")
    time.sleep(PROPAGATION)
    fake.clear_requests()
    assert ask(a) == ask(b) == 200
    assert names(fake) == ["one", "one"]


def test_cli_use_key_reaches_a_running_proxy(proxies: tuple[ProxyProcess, ProxyProcess], fake: FakeKimi, home: Path
                                              ) -> None:
    a, _ = proxies
    assert ask(a) == 200
    cli(home, "use-key", "two")
    time.sleep(PROPAGATION)
    assert ask(a) == 200
    assert names(fake) == ["one", "two"]


def test_keys_added_and_removed_with_the_cli_take_effect(
    proxies: tuple[ProxyProcess, ProxyProcess], fake: FakeKimi, home: Path
) -> None:
    a, b = proxies
    reset_store(home, [KeySpec(CN, "china", Surface.MOONSHOT_CN)], settle=True)
    assert ask(a) == 401  # no Kimi Code key yet: the client's own credential went through
    assert fake.requests[-1].credential == PLACEHOLDER

    cli(home, "add-key", FRESH, "fresh", "--account", "acct-3")
    time.sleep(PROPAGATION)
    fake.clear_requests()
    assert ask(a) == ask(b) == 200
    assert names(fake) == ["fresh", "fresh"]

    cli(home, "remove-key", "fresh", "--yes")  # the last kimi-code key: a script confirms with --yes
    time.sleep(PROPAGATION)
    fake.clear_requests()
    assert ask(b) == 401
    assert [r.credential for r in fake.requests] == [PLACEHOLDER]
    assert "fresh" not in cli_keys(home)
