"""End-to-end: a CLI command reaches the very next request of a running proxy (mitmdump -s kimi_rotate.py).

Each request is sent the moment the `kimi-rotate` process has exited, many times in a row: the proxy must not pick a
key from what it knew before the command (its store thread would notice only up to 0.2 s later).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fakekimi import FakeKimi
from harness import (
    CHAT_BODY,
    KC_CHAT,
    PLACEHOLDER,
    KeySpec,
    ProxyProcess,
    curl,
    kimi_key,
    reset_store,
    run_cli,
    upstream_options,
)

pytestmark = pytest.mark.e2e

ONE, TWO, THREE, FRESH = kimi_key("0n01"), kimi_key("0n02"), kimi_key("0n03"), kimi_key("0n04")
KEYS = [KeySpec(ONE, "one", account="acct-1"), KeySpec(TWO, "two", account="acct-2"),
        KeySpec(THREE, "three", account="acct-3")]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("next-request") / "home"


@pytest.fixture(scope="module")
def proxy(module_proxy_factory: Any, fake_kimi_server: FakeKimi, pki: Any, home: Path) -> ProxyProcess:
    for spec in [*KEYS, KeySpec(FRESH, "fresh", account="acct-4")]:
        fake_kimi_server.add_key(spec.secret, account=spec.account or "none", name=spec.name)
    reset_store(home, KEYS)
    return module_proxy_factory(home, {**upstream_options(fake_kimi_server.port, pki.ca_cert), "kimi_max_wait": 0})


@pytest.fixture
def fake(proxy: ProxyProcess, fake_kimi: FakeKimi, home: Path) -> FakeKimi:
    reset_store(home, KEYS)  # no settling wait: the next request sees it (that is what this module tests)
    return fake_kimi


def cli(home: Path, *args: str) -> None:
    result = run_cli(home, *args)
    assert result.returncode == 0, result.stderr


def served_by(proxy: ProxyProcess, fake: FakeKimi) -> str | None:
    before = len(fake.requests)
    r = curl(proxy, KC_CHAT, headers={"authorization": f"Bearer {PLACEHOLDER}"}, body=CHAT_BODY)
    assert r.status == 200, r.body[:300]
    assert len(fake.requests) == before + 1, fake.requests[before:]
    return fake.requests[-1].key_name


def test_use_key_serves_the_very_next_request(proxy: ProxyProcess, fake: FakeKimi, home: Path) -> None:
    names = ["one", "two", "three"]
    for i in range(15):
        cli(home, "use-key", names[i % 3])
        assert served_by(proxy, fake) == names[i % 3], f"round {i}"


def test_a_key_disabled_or_removed_serves_not_even_the_next_request(
    proxy: ProxyProcess, fake: FakeKimi, home: Path
) -> None:
    for i in range(2):
        name = ["one", "two"][i % 2]
        cli(home, "use-key", name)
        cli(home, "disable", name)
        assert served_by(proxy, fake) != name, f"round {i}"
        cli(home, "enable", name)
    for i in range(2):
        cli(home, "add-key", FRESH, "fresh", "--account", "acct-4")
        cli(home, "use-key", "fresh")
        assert served_by(proxy, fake) == "fresh", f"round {i}"  # added and chosen a moment ago
        cli(home, "remove-key", "fresh", "--yes")  # it is the current key: a script confirms
        assert served_by(proxy, fake) != "fresh", f"round {i}"
