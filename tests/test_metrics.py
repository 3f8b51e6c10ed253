"""kimi_rotator/metrics.py without a proxy: what the counters and the scrape-time gauges say, the address rule."""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kimi_rotator.admission import LocalUsage
from kimi_rotator.failover import Job
from kimi_rotator.metrics import Metrics, MetricsError, MetricsServer, account_label, check_access, parse_address
from kimi_rotator.models import AccountRecord, KeyRecord, Outcome, OutcomeKind, Quota, QuotaWindow, Secret, Surface
from kimi_rotator.roster import Roster

NOW = 1_700_000_000.0
SECRET = "sk-kimi-" + "s3cr3t" * 8


def key(id: int, name: str, account: str, **kw: Any) -> KeyRecord:
    return KeyRecord(id=id, secret=Secret(SECRET + str(id)), fingerprint=f"fp{id:04d}", name=name,
                     surface=Surface.KIMI_CODE, account=account, **kw)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def one(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], metric: str, /, **labels: str) -> float:
    return found[(metric, tuple(sorted(labels.items())))]


def job(k: KeyRecord | None, *, trail: int = 1, tried: int = 1, queued: float = 0.0) -> Job:
    j = Job(surface=Surface.KIMI_CODE, host="api.kimi.com", method="POST", path="/coding/v1/messages", headers=(),
            body=b"", key=k, queued=queued)
    j.trail.extend(["x"] * trail)
    j.tried.update(range(tried))
    return j


@pytest.fixture
def metrics() -> Metrics:
    one_k = key(1, "one", "acct-1", health=80.0, cooldown_until=NOW + 30)
    two_k = key(2, "two", "acct-2", disabled_reason="401 invalid")
    pool = SimpleNamespace(
        roster=Roster([one_k, two_k]),
        caps=lambda group: (3, 60) if group[1] == "acct-1" else (None, None),
        accounts={(Surface.KIMI_CODE, "acct-1"): AccountRecord(
            surface=Surface.KIMI_CODE, account="acct-1",
            quota=Quota(checked_at=NOW, windows=(QuotaWindow(name="5h", limit=100, remaining=42, reset_at=None),)))},
    )
    usage = LocalUsage()
    usage.started((Surface.KIMI_CODE, "acct-1"), NOW)
    scheduler = SimpleNamespace(admission=SimpleNamespace(usage=usage, caps=pool.caps))
    m = Metrics()
    m.watch(lambda: pool, lambda: scheduler, lambda: NOW)  # type: ignore[arg-type, return-value]
    return m


def test_counters_and_histograms_follow_what_the_addon_feeds(metrics: Metrics) -> None:
    k1, k2 = key(1, "one", "acct-1"), key(2, "two", "acct-2")
    metrics.attempt(k1, Outcome(kind=OutcomeKind.INVALID_KEY, reason="401 invalid_authentication_error"))
    metrics.attempt(k2, Outcome(kind=OutcomeKind.SUCCESS, reason="200"))
    failed_over = job(k2, trail=2, tried=2, queued=0.4)
    metrics.answered(failed_over, 200, False, 0.05)
    metrics.finished(failed_over, 200, 0.3)
    local = job(None, trail=0, tried=0)
    metrics.answered(local, 429, True, 0.001)
    metrics.finished(local, 429, 0.001)
    metrics.refused("kimi-code", 503)

    found = samples(generate_latest(metrics.registry).decode())
    assert one(found, "kimi_rotate_attempts_total", surface="kimi-code", key="fp0001", name="one",
               outcome=OutcomeKind.INVALID_KEY.value, error_type="401 invalid_authentication_error") == 1
    assert one(found, "kimi_rotate_requests_total", surface="kimi-code", key="fp0002", name="two", status="200") == 1
    assert one(found, "kimi_rotate_requests_total", surface="kimi-code", key="", name="", status="429") == 1
    assert one(found, "kimi_rotate_failovers_total", surface="kimi-code") == 1
    assert one(found, "kimi_rotate_local_replies_total", surface="kimi-code", status="429") == 1
    assert one(found, "kimi_rotate_local_replies_total", surface="kimi-code", status="503") == 1
    assert one(found, "kimi_rotate_request_duration_seconds_count", surface="kimi-code") == 2
    assert one(found, "kimi_rotate_request_duration_seconds_sum", surface="kimi-code") == pytest.approx(0.301)
    assert one(found, "kimi_rotate_time_to_first_byte_seconds_bucket", surface="kimi-code", le="0.05") == 2
    assert one(found, "kimi_rotate_queue_wait_seconds_bucket", surface="kimi-code", le="0.25") == 1
    assert one(found, "kimi_rotate_queue_wait_seconds_bucket", surface="kimi-code", le="0.5") == 2


def test_gauges_are_read_from_the_pool_at_scrape_time(metrics: Metrics) -> None:
    text = generate_latest(metrics.registry).decode()
    found = samples(text)
    fp1 = dict(surface="kimi-code", key="fp0001", name="one")
    fp2 = dict(surface="kimi-code", key="fp0002", name="two")
    assert one(found, "kimi_rotate_key_health", **fp1) == 80
    assert one(found, "kimi_rotate_key_cooling_seconds", **fp1) == 30
    assert one(found, "kimi_rotate_key_cooling_seconds", **fp2) == 0
    assert (one(found, "kimi_rotate_key_enabled", **fp1), one(found, "kimi_rotate_key_enabled", **fp2)) == (1, 0)
    acct1 = dict(surface="kimi-code", account=account_label((Surface.KIMI_CODE, "acct-1")))
    acct2 = dict(surface="kimi-code", account=account_label((Surface.KIMI_CODE, "acct-2")))
    assert one(found, "kimi_rotate_account_in_flight", **acct1) == 1
    assert one(found, "kimi_rotate_account_in_flight", **acct2) == 0
    assert one(found, "kimi_rotate_account_cap", **acct1, limit="concurrency") == 3
    assert one(found, "kimi_rotate_account_cap", **acct1, limit="rpm") == 60
    assert ("kimi_rotate_account_cap", tuple(sorted({**acct2, "limit": "rpm"}.items()))) not in found
    assert one(found, "kimi_rotate_account_quota_remaining", **acct1, window="5h") == 42
    # Never a key, never the account's own label.
    assert SECRET not in text and "acct-1" not in text and "acct-2" not in text
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert check.returncode == 0, check.stderr + check.stdout


@pytest.mark.parametrize(("address", "host", "port"), [("127.0.0.1:9464", "127.0.0.1", 9464), ("[::1]:0", "::1", 0),
                                                       ("localhost:80", "localhost", 80)])
def test_address_is_host_and_port(address: str, host: str, port: int) -> None:
    assert parse_address(address) == (host, port)


@pytest.mark.parametrize("address", ["9464", ":9464", "127.0.0.1:", "127.0.0.1:x", "127.0.0.1:70000"])
def test_a_bad_address_says_the_form(address: str) -> None:
    with pytest.raises(MetricsError, match="HOST:PORT"):
        parse_address(address)


def test_beyond_loopback_needs_a_token_or_allow_remote() -> None:
    with pytest.raises(MetricsError, match="kimi_client_token"):
        check_access("0.0.0.0", "", False)
    check_access("0.0.0.0", "tok", False)
    check_access("0.0.0.0", "", True)
    check_access("127.0.0.1", "", False)


def test_server_asks_for_the_token_and_serves_with_it(metrics: Metrics) -> None:
    server = MetricsServer(metrics, "127.0.0.1:0", "tok", False)
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=5)
        assert refused.value.code == 401
        req = urllib.request.Request(url, headers={"Authorization": "Bearer tok"})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert "kimi_rotate_key_health" in r.read().decode()
    finally:
        server.stop()


def test_a_busy_port_is_one_clear_line(metrics: Metrics) -> None:
    server = MetricsServer(metrics, "127.0.0.1:0", "", False)
    try:
        with pytest.raises(MetricsError, match=f"cannot serve metrics on 127.0.0.1:{server.port}") as e:
            MetricsServer(metrics, f"127.0.0.1:{server.port}", "", False)
        assert "\n" not in str(e.value)
    finally:
        server.stop()


def test_a_scrape_reads_the_pool_on_its_event_loop() -> None:
    import asyncio
    import threading

    threads: list[str] = []

    class Pool:
        @property
        def roster(self) -> Roster:
            threads.append(threading.current_thread().name)
            return Roster([key(1, "one", "acct-1")])

        def __init__(self) -> None:
            self.accounts: dict[Any, Any] = {}

        def caps(self, group: Any) -> tuple[None, None]:
            return (None, None)

    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, name="the-loop", daemon=True)
    runner.start()
    try:
        m = Metrics()
        m.watch(lambda: Pool(), lambda: None, lambda: NOW, lambda: loop)  # type: ignore[arg-type, return-value]
        found = samples(generate_latest(m.registry).decode())
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(5)
        loop.close()
    assert threads == ["the-loop"]
    assert one(found, "kimi_rotate_key_health", surface="kimi-code", key="fp0001", name="one") == 100
