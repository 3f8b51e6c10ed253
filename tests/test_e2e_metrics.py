"""End-to-end: a real mitmdump with kimi_metrics, real traffic to the fake Kimi (a success, a failover, a local 429),
then a scrape parsed with prometheus_client's parser (and checked by `promtool check metrics` where installed)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakekimi import FakeKimi, Reply
from harness import KC_CHAT, PLACEHOLDER, KeySpec, curl, kimi_key, prepare_pool, reset_store, run_cli, wait_keys
from prometheus_client.parser import text_string_to_metric_families

from kimi_rotator.metrics import account_label
from kimi_rotator.models import OutcomeKind, Surface

pytestmark = pytest.mark.e2e

ONE, TWO = kimi_key("0001"), kimi_key("0002")
KEYS = [KeySpec(ONE, "one", account="acct-1"), KeySpec(TWO, "two", account="acct-2")]
CHAT = {"model": "kimi-for-coding", "messages": [{"role": "user", "content": "hi"}]}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str:
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


def parsed(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: Samples, metric: str, /, **labels: str) -> float:
    return found.get((metric, frozenset(labels.items())), 0.0)


def ask(proxy: Any) -> int:
    r = curl(proxy, KC_CHAT, headers={"authorization": f"Bearer {PLACEHOLDER}"}, body=CHAT)
    assert r.status, r.stderr
    return r.status


def test_a_scrape_counts_the_traffic_and_reads_the_pool(
    proxy_factory: Any, fake_kimi: FakeKimi, pki: Any, tmp_path: Path
) -> None:
    home, port = tmp_path / "home", free_port()
    options = prepare_pool(fake_kimi, pki.ca_cert, home, KEYS)
    proxy = proxy_factory(home, {**options, "kimi_max_wait": 0, "kimi_metrics": f"127.0.0.1:{port}"})
    assert f"Prometheus metrics on http://127.0.0.1:{port}/metrics" in proxy.log_text()

    fake_kimi.script(ONE, [Reply.invalid()])
    assert ask(proxy) == 200  # one answered 401, two served: a failover
    assert ask(proxy) == 200  # two again
    wait_keys(home, lambda ks: sum(k.total_requests for k in ks) >= 3)
    now = time.time()
    reset_store(home, [KeySpec(ONE, "one", account="acct-1", cooldown_until=now + 90),
                       KeySpec(TWO, "two", account="acct-2", cooldown_until=now + 40)], settle=True)
    assert ask(proxy) == 429  # every key cools: a local 429, no attempt
    assert fake_kimi.requests and len([r for r in fake_kimi.requests if r.method == "POST"]) == 3

    text = scrape(port)
    found = parsed(text)
    keys = {k.name: k for k in wait_keys(home, lambda ks: len(ks) == 2)}
    fp1, fp2 = keys["one"].fingerprint, keys["two"].fingerprint
    surface = Surface.KIMI_CODE.value
    assert value(found, "kimi_rotate_attempts_total", surface=surface, key=fp1, name="one",
                 outcome=OutcomeKind.INVALID_KEY.value,
                 error_type="401 invalid_authentication_error") == 1, sorted(k for k in found if "attempts" in k[0])
    successes = [v for (n, labels), v in found.items() if n == "kimi_rotate_attempts_total"
                 and ("outcome", OutcomeKind.SUCCESS.value) in labels and ("key", fp2) in labels]
    assert successes == [2]
    assert value(found, "kimi_rotate_requests_total", surface=surface, key=fp2, name="two", status="200") == 2
    assert value(found, "kimi_rotate_requests_total", surface=surface, key="", name="", status="429") == 1
    assert value(found, "kimi_rotate_failovers_total", surface=surface) == 1
    assert value(found, "kimi_rotate_local_replies_total", surface=surface, status="429") == 1
    assert value(found, "kimi_rotate_request_duration_seconds_count", surface=surface) == 3
    assert value(found, "kimi_rotate_time_to_first_byte_seconds_count", surface=surface) == 3
    assert value(found, "kimi_rotate_queue_wait_seconds_count", surface=surface) == 3
    # Gauges come from the pool as it is now: the new keys, both cooling; nothing in flight.
    cooling = {name: value(found, "kimi_rotate_key_cooling_seconds", surface=surface, key=k.fingerprint, name=name)
               for name, k in keys.items()}
    assert cooling["one"] == pytest.approx(90 - (time.time() - now), abs=5)
    assert cooling["two"] == pytest.approx(40 - (time.time() - now), abs=5)
    assert value(found, "kimi_rotate_key_health", surface=surface, key=fp1, name="one") == 100
    assert value(found, "kimi_rotate_account_in_flight", surface=surface,
                 account=account_label((Surface.KIMI_CODE, "acct-1"))) == 0
    assert ONE not in text and TWO not in text and "acct-1" not in text

    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus); the parser's check passed")
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def refused_start(tmp_path: Path, metrics: str) -> str:
    """`kimi-rotate proxy --metrics ADDRESS` that must not start: its one error line."""
    run = run_cli(tmp_path / "home", "proxy", "--port", str(free_port()), "--confdir", str(tmp_path / "mitm"),
                  "--metrics", metrics, timeout=60)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    return run.stderr


def test_a_busy_metrics_port_stops_the_proxy_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert f"cannot serve metrics on 127.0.0.1:{port}" in refused_start(tmp_path, f"127.0.0.1:{port}")


def test_metrics_beyond_loopback_need_a_token(tmp_path: Path) -> None:
    error = refused_start(tmp_path, f"0.0.0.0:{free_port()}")
    assert "kimi_client_token" in error and "kimi_allow_remote" in error
