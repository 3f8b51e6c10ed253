"""The zero-token probes (kimi_rotator/probe.py): the parsers of Kimi's balance and /usages answers, what a
result does to the keys (pure), and probe_key / probe_keys against the fake upstream with the proxy's own client.
tests/test_check.py runs `kimi-rotate check` on top of them."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import pytest
from certs import TestPKI
from fakekimi import FakeKimi, Reply

from kimi_rotator.classify import BILLING_DEFAULT, QUOTA_DEFAULT
from kimi_rotator.keys import fingerprint
from kimi_rotator.models import KeyRecord, Outcome, OutcomeKind, Quota, QuotaWindow, Scope, Secret, Surface
from kimi_rotator.probe import (
    USER_AGENT,
    ProbeResult,
    is_quota_cooldown,
    parse_balance,
    parse_usages,
    probe_key,
    probe_keys,
    quota_outcome,
    updates,
    window_name,
)
from kimi_rotator.upstream import UpstreamClient, UpstreamSettings

NOW = 1_800_000_000.0
RESET = "2027-01-15T08:00:00Z"
RESET_AT = dt.datetime(2027, 1, 15, 8, tzinfo=dt.UTC).timestamp()
HOSTS = ("api.kimi.com", "api.moonshot.cn", "api.moonshot.ai")


def usages(window_remaining: str = "85", weekly_remaining: str = "75", **extra: object) -> bytes:
    doc = {
        "user": {"membership": {"level": "LEVEL_INTERMEDIATE"}},
        "usage": {"limit": "100", "used": "25", "remaining": weekly_remaining, "resetTime": "2027-01-20T00:00:00Z"},
        "limits": [{"window": {"duration": 300, "timeUnit": "TIME_UNIT_MINUTE"},
                    "detail": {"limit": "100", "remaining": window_remaining, "resetTime": RESET}}],
        "boosterWallet": {"balance": "3"},
        **extra,
    }
    return json.dumps(doc).encode()


# -- parsers ----------------------------------------------------------------------------------------------------------


def test_balance_answer_gives_the_available_balance() -> None:
    body = b'{"code":0,"data":{"available_balance":49.58894,"voucher_balance":46.58893,"cash_balance":3.00001},' \
           b'"scode":"0x0","status":true}'
    assert parse_balance(body, NOW) == Quota(checked_at=NOW, balance=49.58894)


@pytest.mark.parametrize("body", [b"", b"[]", b"not json", b'{"data":{}}', b'{"data":{"available_balance":true}}',
                                  b'{"data":{"available_balance":"NaN"}}', b'{"data":[1]}'])
def test_balance_answer_without_a_balance_is_none(body: bytes) -> None:
    assert parse_balance(body, NOW) is None


def test_balance_as_a_decimal_string_and_below_zero() -> None:
    quota = parse_balance(b'{"data":{"available_balance":"-0.5"}}', NOW)
    assert quota is not None and quota.balance == -0.5


def test_usages_answer_gives_every_window_with_numbers_from_strings() -> None:
    quota = parse_usages(usages(), NOW)
    assert quota == Quota(
        checked_at=NOW,
        windows=(QuotaWindow("weekly", 100.0, 75.0, dt.datetime(2027, 1, 20, tzinfo=dt.UTC).timestamp()),
                 QuotaWindow("5h", 100.0, 85.0, RESET_AT)),
        level="LEVEL_INTERMEDIATE",
    )
    assert quota.exhausted_until() is None


def test_usages_with_a_used_up_window_is_exhausted_until_its_reset() -> None:
    quota = parse_usages(usages(window_remaining="0"), NOW)
    assert quota is not None and quota.exhausted_until() == RESET_AT


def test_usages_remaining_from_limit_and_used_and_odd_times() -> None:
    doc = {"usage": {"limit": "10", "used": "10", "resetTime": "2027-01-15T10:00:00.123+02:00"},
           "limits": [{"window": {"duration": "60", "timeUnit": "TIME_UNIT_MINUTE"},
                       "detail": {"remaining": 4, "resetTime": "2027-01-15T08:00:00"}},  # no zone: UTC
                      {"window": {}, "detail": {"remaining": "1", "resetTime": "soon"}},
                      {"detail": {"limit": "5"}},  # nothing left to say: skipped
                      "junk"]}
    quota = parse_usages(json.dumps(doc).encode(), NOW)
    assert quota is not None
    assert quota.windows == (QuotaWindow("weekly", 10.0, 0.0, RESET_AT + 0.123),
                             QuotaWindow("1h", None, 4.0, RESET_AT),
                             QuotaWindow("window", None, 1.0, None))
    assert quota.level is None


@pytest.mark.parametrize("body", [b"", b"{}", b'{"usage":"x","limits":"y"}', b'{"limits":[{"detail":{}}]}'])
def test_usages_answer_without_windows_is_none(body: bytes) -> None:
    assert parse_usages(body, NOW) is None


@pytest.mark.parametrize(("duration", "unit", "name"), [
    (300, "TIME_UNIT_MINUTE", "5h"), (10080, "TIME_UNIT_MINUTE", "7d"), (90, "TIME_UNIT_MINUTE", "90m"),
    (5, "TIME_UNIT_HOUR", "5h"), (7, "TIME_UNIT_DAY", "7d"), (45, "TIME_UNIT_SECOND", "45s"),
    ("300", None, "5h"), (0, "TIME_UNIT_MINUTE", "window"), (None, None, "window"), (-5, "TIME_UNIT_HOUR", "window"),
])
def test_window_names(duration: object, unit: object, name: str) -> None:
    assert window_name(duration, unit) == name


# -- what a quota means -------------------------------------------------------------------------------------------


def test_quota_outcomes() -> None:
    used_up = Quota(checked_at=NOW, windows=(QuotaWindow("weekly", 100, 5, NOW + 9000),
                                             QuotaWindow("5h", 100, 0, NOW + 600)))
    out = quota_outcome(used_up, "uid:a1")
    assert (out.kind, out.scope, out.until, out.account_hint) == (
        OutcomeKind.BILLING_LIMITED, Scope.ACCOUNT, NOW + 600, "uid:a1")
    assert out.reason == "quota: 5h used up"
    broke = quota_outcome(Quota(checked_at=NOW, balance=0.0), None)
    assert (broke.kind, broke.scope, broke.until, broke.reason) == (
        OutcomeKind.QUOTA_EXHAUSTED, Scope.ACCOUNT, None, "quota: balance 0")
    assert quota_outcome(Quota(checked_at=NOW, balance=0.01), None).kind is OutcomeKind.SUCCESS


# -- what a result does to the keys -----------------------------------------------------------------------------------


def key(n: int, account: str | None = "a1", surface: Surface = Surface.KIMI_CODE, **kw: object) -> KeyRecord:
    secret = f"sk-kimi-{'x' * 60}{n:04d}"
    return KeyRecord(id=n, secret=Secret(secret), fingerprint=fingerprint(secret), name=f"k{n}", surface=surface,
                     account=account, **kw)  # type: ignore[arg-type]


def result(key_id: int, outcome: Outcome, quota: Quota | None = None, valid: bool | None = True) -> ProbeResult:
    return ProbeResult(key_id=key_id, valid=valid, status=outcome.reason, outcome=outcome, quota=quota)


EXHAUSTED = Quota(checked_at=NOW, windows=(QuotaWindow("5h", 100, 0, NOW + 600),))
PLENTY = Quota(checked_at=NOW, windows=(QuotaWindow("5h", 100, 50, NOW + 600),))


def test_a_refused_key_is_disabled_and_only_it() -> None:
    keys = [key(1), key(2)]
    out = updates(keys, result(1, Outcome(kind=OutcomeKind.INVALID_KEY, reason="401 invalid_authentication_error"),
                               valid=False), NOW)
    assert [(k.id, k.disabled_reason) for k in out] == [(1, "401 invalid_authentication_error (probe)")]
    assert out[0].total_requests == 0  # a probe is no request


def test_a_used_up_window_moves_the_guess_to_the_real_reset_for_the_whole_account() -> None:
    guess = NOW + BILLING_DEFAULT
    keys = [key(1, cooldown_until=guess, cooldown_reason="403 permission_error"),
            key(2, cooldown_until=guess, cooldown_reason="403 permission_error"),
            key(3),  # same account, not cooling yet
            key(4, cooldown_until=NOW + 30, cooldown_reason="429 rate_limit_reached_error"),
            key(5, account="other")]
    out = {k.id: k for k in updates(keys, result(1, quota_outcome(EXHAUSTED, None), EXHAUSTED), NOW)}
    assert sorted(out) == [1, 2, 3, 4]
    assert {k.cooldown_until for k in out.values()} == {NOW + 600}  # shorter than the guess: Kimi said so
    assert out[3].cooldown_reason == "quota: 5h used up"


def test_a_later_reset_lengthens_any_cooldown_and_a_foreign_one_is_never_shortened() -> None:
    keys = [key(1, cooldown_until=NOW + 60, cooldown_reason="429 rate_limit_reached_error"),
            key(2, cooldown_until=NOW + 86400, cooldown_reason="429 rate_limit_reached_error")]
    out = {k.id: k for k in updates(keys, result(1, quota_outcome(EXHAUSTED, None), EXHAUSTED), NOW)}
    assert out[1].cooldown_until == NOW + 600
    assert 2 not in out  # not a quota cooldown: a probe does not end it early


def test_the_reason_that_asked_for_the_probe_is_replaced_whatever_its_words() -> None:
    keys = [key(1, cooldown_until=NOW + BILLING_DEFAULT, cooldown_reason="429 rate_limit_error")]
    out = updates(keys, result(1, quota_outcome(EXHAUSTED, None), EXHAUSTED), NOW, replaces="429 rate_limit_error")
    assert out[0].cooldown_until == NOW + 600


def test_a_balance_at_zero_cools_the_account_and_a_top_up_ends_it() -> None:
    keys = [key(1, surface=Surface.MOONSHOT_CN), key(2, surface=Surface.MOONSHOT_CN)]
    broke = Quota(checked_at=NOW, balance=0.0)
    cooled = updates(keys, result(1, quota_outcome(broke, None), broke), NOW)
    assert {(k.id, k.cooldown_until) for k in cooled} == {(1, NOW + QUOTA_DEFAULT), (2, NOW + QUOTA_DEFAULT)}
    rich = Quota(checked_at=NOW + 60, balance=5.0)
    freed = updates(cooled, result(2, quota_outcome(rich, None), rich), NOW + 60)
    assert {(k.id, k.cooldown_until) for k in freed} == {(1, None), (2, None)}


def test_quota_back_ends_only_quota_cooldowns() -> None:
    keys = [key(1, cooldown_until=NOW + 900, cooldown_reason="quota: 5h used up"),
            key(2, cooldown_until=NOW + 900, cooldown_reason="402"),  # membership: /usages answering ends it
            key(3, cooldown_until=NOW + 30, cooldown_reason="429 rate_limit_reached_error"),
            key(4, cooldown_until=NOW + 900, cooldown_reason="403 permission_error", disabled_reason="by hand")]
    out = {k.id: k for k in updates(keys, result(1, quota_outcome(PLENTY, None), PLENTY), NOW)}
    assert sorted(out) == [1, 2, 4]
    assert all(k.cooldown_until is None for k in out.values())
    assert out[4].disabled_reason == "by hand"


def test_a_models_answer_says_nothing_about_quota() -> None:
    keys = [key(1, cooldown_until=NOW + 900, cooldown_reason="quota: 5h used up")]
    assert updates(keys, result(1, Outcome(kind=OutcomeKind.SUCCESS, reason="200")), NOW) == []


def test_the_account_kimi_names_labels_an_unlabelled_key_and_joins_its_account() -> None:
    keys = [key(1, account=None), key(2, account="uid:a1")]
    out = {k.id: k for k in updates(keys, result(1, quota_outcome(EXHAUSTED, "uid:a1"), EXHAUSTED), NOW)}
    assert out[1].account == "uid:a1"
    assert out[1].cooldown_until == out[2].cooldown_until == NOW + 600
    assert updates([key(3, account="mine")], result(3, Outcome(kind=OutcomeKind.SUCCESS, account_hint="uid:x")),
                   NOW) == []  # a label given by the user stays


def test_other_answers_cool_as_a_request_would_and_unknowns_change_nothing() -> None:
    keys = [key(1), key(2)]
    limited = Outcome(kind=OutcomeKind.RATE_LIMITED, scope=Scope.ACCOUNT, until=NOW + 60, reason="429")
    assert {k.cooldown_until for k in updates(keys, result(1, limited), NOW)} == {NOW + 60}
    server = Outcome(kind=OutcomeKind.SERVER_ERROR, scope=Scope.SERVER, reason="503")
    assert updates(keys, result(1, server, valid=None), NOW) == []
    assert updates(keys, result(9, limited), NOW) == []  # removed meanwhile


def test_quota_cooldown_reasons() -> None:
    assert is_quota_cooldown("403 exceeded_current_quota_error", Surface.MOONSHOT_CN)
    assert is_quota_cooldown("quota: balance 0", Surface.MOONSHOT_AI)
    assert not is_quota_cooldown("402", Surface.MOONSHOT_CN)
    assert not is_quota_cooldown(None, Surface.KIMI_CODE)
    assert not is_quota_cooldown("cooling for a test", Surface.KIMI_CODE)


# -- probing the fake upstream with the proxy's client ------------------------------------------------------------


@pytest.fixture
async def client(fake_kimi: FakeKimi, pki: TestPKI) -> AsyncIterator[UpstreamClient]:
    settings = UpstreamSettings(verify=ssl.create_default_context(cafile=str(pki.ca_cert)),
                                resolve={h: ("127.0.0.1", fake_kimi.port) for h in HOSTS}, timeout=10)
    upstream = UpstreamClient(settings)
    yield upstream
    await upstream.aclose()


def stored(secret: str, n: int, surface: Surface = Surface.KIMI_CODE, account: str | None = None) -> KeyRecord:
    return KeyRecord(id=n, secret=Secret(secret), fingerprint=fingerprint(secret), name=f"k{n}", surface=surface,
                     account=account)


KC = "sk-kimi-" + "p" * 60 + "0001"
OP = "sk-" + "q" * 44 + "0002"
clock: Callable[[], float] = time.time


async def test_kimi_code_key_reports_its_windows_with_an_honest_user_agent(
    fake_kimi: FakeKimi, client: UpstreamClient
) -> None:
    fake_kimi.add_key(KC, account="acct1")
    fake_kimi.set_usage("acct1", window_remaining=0, window_reset=dt.datetime(2027, 1, 15, 8, tzinfo=dt.UTC))
    found = await probe_key(client, stored(KC, 1), clock)
    assert (found.valid, found.status, found.path) == (True, "200", "/coding/v1/usages")
    assert found.quota is not None and found.quota.exhausted_until() == RESET_AT
    assert found.outcome.kind is OutcomeKind.BILLING_LIMITED and found.outcome.until == RESET_AT
    [seen] = fake_kimi.requests_for(KC)
    assert seen.headers["user-agent"] == USER_AGENT and seen.headers["authorization"] == f"Bearer {KC}"


async def test_open_platform_key_reports_its_balance_and_account(
    fake_kimi: FakeKimi, client: UpstreamClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_kimi.add_key(OP, account="acct2")
    fake_kimi.set_balance("acct2", 12.5)
    monkeypatch.setattr(fake_kimi, "msh_headers", "always")
    found = await probe_key(client, stored(OP, 2, Surface.MOONSHOT_CN), clock)
    assert (found.valid, found.path, found.account_hint) == (True, "/v1/users/me/balance", "uid:acct2")
    assert found.quota is not None and found.quota.balance == 12.5
    assert found.outcome.kind is OutcomeKind.SUCCESS


async def test_missing_quota_endpoint_falls_back_to_the_models_list(
    fake_kimi: FakeKimi, client: UpstreamClient
) -> None:
    fake_kimi.add_key(KC, account="acct1")
    fake_kimi.script(KC, [Reply.not_found("method not found")], on="probe")
    found = await probe_key(client, stored(KC, 1), clock)
    assert (found.valid, found.status, found.path, found.quota) == (True, "200", "/coding/v1/models", None)
    assert [s.path for s in fake_kimi.requests_for(KC)] == ["/coding/v1/usages", "/coding/v1/models"]


async def test_unknown_key_is_invalid_without_a_second_probe(fake_kimi: FakeKimi, client: UpstreamClient) -> None:
    stranger = "sk-kimi-" + "z" * 60 + "0009"
    found = await probe_key(client, stored(stranger, 9), clock)
    assert (found.valid, found.outcome.kind) == (False, OutcomeKind.INVALID_KEY)
    assert found.status.startswith("401")
    assert len(fake_kimi.requests_for(stranger)) == 1


async def test_server_trouble_and_no_connection_leave_validity_unknown(
    fake_kimi: FakeKimi, client: UpstreamClient, pki: TestPKI
) -> None:
    fake_kimi.add_key(KC, account="acct1")
    fake_kimi.script(KC, [Reply.unavailable()], on="probe")
    found = await probe_key(client, stored(KC, 1), clock)
    assert (found.valid, found.outcome.scope) == (None, Scope.SERVER)
    closed = UpstreamClient(UpstreamSettings(verify=ssl.create_default_context(cafile=str(pki.ca_cert)),
                                             resolve={"api.kimi.com": ("127.0.0.1", 9)}, timeout=5))
    try:
        lost = await probe_key(closed, stored(KC, 1), clock)
    finally:
        await closed.aclose()
    assert lost.valid is None and "cannot connect to api.kimi.com" in lost.status
    assert KC not in lost.status


async def test_probe_keys_keeps_order_and_probes_the_keys_of_one_account_in_turn(
    fake_kimi: FakeKimi, client: UpstreamClient
) -> None:
    secrets = [f"sk-kimi-{'r' * 60}{n:04d}" for n in range(6)]
    for n, s in enumerate(secrets):
        fake_kimi.add_key(s, account=f"acct{n % 2}")
        fake_kimi.script(s, [Reply(200, delay=0.3)], on="probe")
    keys = [stored(s, n, account=f"acct{n % 2}") for n, s in enumerate(secrets)]
    heard: list[int] = []
    results = await probe_keys(client, keys, clock, concurrency=4, on_result=lambda r: heard.append(r.key_id))
    assert [r.key_id for r in results] == list(range(6))
    assert sorted(heard) == list(range(6)) and all(r.valid for r in results)
    started = {secrets.index(seen.credential or ""): seen.at for seen in fake_kimi.requests}
    for account in (0, 1):
        times = [started[n] for n in range(account, 6, 2)]
        assert all(b - a >= 0.25 for a, b in itertools.pairwise(times)), times  # one after another
    assert abs(started[0] - started[1]) < 0.2  # two accounts at once


def test_a_result_names_its_hint() -> None:
    r = result(1, replace(quota_outcome(PLENTY, "uid:z"), reason="200"), PLENTY)
    assert r.account_hint == "uid:z"
