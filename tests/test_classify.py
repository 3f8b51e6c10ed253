"""Pins Kimi's error taxonomy (which failure is whose, and what to do), the retry-timing signals (Retry-After,
"try again after N seconds") and body decoding."""

from __future__ import annotations

import gzip
import json
import re
import tracemalloc
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import formatdate

import brotli  # type: ignore[import-untyped]
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from kimi_rotator import classify as mod
from kimi_rotator.caps import MAX_CAP, tier_caps
from kimi_rotator.classify import (
    MAX_COOLDOWN,
    RULES,
    Verdict,
    account_hint,
    classify,
    classify_connection_error,
    decode_body,
    error_message,
    parse_retry_after,
    retry_delay,
)
from kimi_rotator.models import CapSource, LearnedCap, Limit, OutcomeKind, Scope

NOW = 1_750_000_123.0  # 2025-06-15T15:08:43Z: deliberately not at a UTC midnight
HOUR, DAY = 3600.0, 86400.0
MIDNIGHT = "midnight"
K, S = OutcomeKind, Scope
COOLING = {K.RATE_LIMITED, K.BILLING_LIMITED, K.QUOTA_EXHAUSTED, K.MEMBERSHIP}


def seconds_to_next_utc_midnight(now: float) -> float:
    today = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return (today + timedelta(days=1)).timestamp() - now


# --- envelopes (OpenAI's, Anthropic's and a gateway's flat errorMessage, plus plain text) --------------------


def openai(status: int, etype: str | None, msg: str) -> bytes:
    err = {"message": msg, **({"type": etype} if etype else {})}
    return json.dumps({"error": err}).encode()


def anthropic(status: int, etype: str | None, msg: str) -> bytes:
    err = {"message": msg, **({"type": etype} if etype else {})}
    return json.dumps({"type": "error", "error": err}).encode()


def flat(status: int, etype: str | None, msg: str) -> bytes:
    return json.dumps({"errorMessage": f"{status} {msg}"}, ensure_ascii=False).encode()


def plain(status: int, etype: str | None, msg: str) -> bytes:
    return msg.encode()


Envelope = Callable[[int, str | None, str], bytes]
TYPED_ENVELOPES: tuple[Envelope, ...] = (openai, anthropic)
ALL_ENVELOPES: tuple[Envelope, ...] = (openai, anthropic, flat, plain)


@dataclass(frozen=True)
class Case:
    status: int
    etype: str | None
    msg: str
    kind: OutcomeKind
    scope: Scope
    failover: bool
    cooldown: float | str | None  # seconds after NOW, MIDNIGHT, or None for no deadline
    row: int  # index into RULES that must decide this case
    by_type: bool = False  # the decision rests on error.type, so text-only envelopes cannot carry it


def T(status: int, etype: str, msg: str, kind: OutcomeKind, scope: Scope, failover: bool,
      cooldown: float | str | None, row: int) -> Case:
    return Case(status, etype, msg, kind, scope, failover, cooldown, row, by_type=True)


CODING_AGENTS = (
    "Kimi For Coding is currently only available for Coding Agents such as Kimi CLI, Claude Code, Roo Code, "
    "Kilo Code, etc."
)

CASES: tuple[Case, ...] = (
    # 0: the client-identity gate: client scope, no rotation, at any status (it has come back as 429 too)
    Case(403, "access_terminated_error", CODING_AGENTS, K.CLIENT_REJECTED, S.CLIENT, False, None, 0),
    Case(429, None, CODING_AGENTS, K.CLIENT_REJECTED, S.CLIENT, False, None, 0),
    T(403, "access_terminated_error", "something new", K.CLIENT_REJECTED, S.CLIENT, False, None, 0),
    # 1: account ban
    Case(403, "access_terminated_error", "Access terminated. Review our Community Guidelines.",
         K.ACCESS_DENIED, S.ACCOUNT, True, None, 1),
    # 2: membership, at any status (Kimi documents 402; opencode-kimi-rotator saw 403 with a curly apostrophe)
    Case(402, None, "We're unable to verify your membership benefits at this time.",
         K.MEMBERSHIP, S.ACCOUNT, True, DAY, 2),
    Case(403, None, "We’re unable to verify your membership benefits at this time.",
         K.MEMBERSHIP, S.ACCOUNT, True, DAY, 2),
    Case(429, "permission_error", "Please   ensure your membership is active",
         K.MEMBERSHIP, S.ACCOUNT, True, DAY, 2),
    # 3: Kimi Code billing windows; each phrase on its own (opencode-kimi-rotator wanted a generic one too)
    Case(403, "permission_error", "You’ve reached your usage limit for this billing cycle.",
         K.BILLING_LIMITED, S.ACCOUNT, True, 5 * HOUR, 3),
    Case(403, None, "Your quota will be refreshed in the next cycle.", K.BILLING_LIMITED, S.ACCOUNT, True, 5 * HOUR, 3),
    Case(429, None, "You've reached your usage limit for this period", K.BILLING_LIMITED, S.ACCOUNT, True, 5 * HOUR, 3),
    Case(429, None, "Monthly usage limit reached", K.BILLING_LIMITED, S.ACCOUNT, True, 5 * HOUR, 3),
    # 4: balance / quota exhausted
    Case(403, "exceeded_current_quota_error", "Your account org-a1<ak-b2> is not active, current state: suspended",
         K.QUOTA_EXHAUSTED, S.ACCOUNT, True, 6 * HOUR, 4),
    Case(403, None, "Please check your account balance", K.QUOTA_EXHAUSTED, S.ACCOUNT, True, 6 * HOUR, 4),
    Case(429, "exceeded_current_quota_error", "You exceeded your current token quota: <org-a1> 0.0",
         K.QUOTA_EXHAUSTED, S.ACCOUNT, True, 6 * HOUR, 4),
    Case(429, None, "Your account is suspended due to insufficient balance",
         K.QUOTA_EXHAUSTED, S.ACCOUNT, True, 6 * HOUR, 4),
    T(429, "exceeded_current_quota_error", "opaque", K.QUOTA_EXHAUSTED, S.ACCOUNT, True, 6 * HOUR, 4),
    # 5: permission denied (configuration): disable, try another account
    Case(403, "permission_denied_error", "Your IP is not allowed to access this organization",
         K.ACCESS_DENIED, S.ACCOUNT, True, None, 5),
    Case(403, "permission_denied_error", "The API you are accessing is not open",
         K.ACCESS_DENIED, S.ACCOUNT, True, None, 5),
    Case(403, None, "You are not allowed to get other user info", K.ACCESS_DENIED, S.ACCOUNT, True, None, 5),
    T(403, "permission_denied_error", "opaque", K.ACCESS_DENIED, S.ACCOUNT, True, None, 5),
    # 6: bad key (also a key sent to the wrong surface)
    Case(401, "invalid_authentication_error", "Invalid Authentication", K.INVALID_KEY, S.KEY, True, None, 6),
    Case(401, "invalid_authentication_error", "The API Key appears to be invalid or may have expired.",
         K.INVALID_KEY, S.KEY, True, None, 6),
    Case(401, "incorrect_api_key_error", "Incorrect API key provided", K.INVALID_KEY, S.KEY, True, None, 6),
    T(403, "invalid_authentication_error", "opaque", K.INVALID_KEY, S.KEY, True, None, 6),
    T(403, "incorrect_api_key_error", "opaque", K.INVALID_KEY, S.KEY, True, None, 6),
    T(403, "authentication_error", "opaque", K.INVALID_KEY, S.KEY, True, None, 6),  # Anthropic's word
    # 7: overload: platform-wide, so pass through without cycling keys; text beats KC's rate_limit_error type
    Case(429, "engine_overloaded_error", "The engine is currently overloaded, please try again later",
         K.SERVER_ERROR, S.SERVER, False, None, 7),
    Case(429, "rate_limit_error", "The engine is currently overloaded", K.SERVER_ERROR, S.SERVER, False, None, 7),
    T(429, "engine_overloaded_error", "busy", K.SERVER_ERROR, S.SERVER, False, None, 7),
    # 8: TPD resets the next (UTC) day, not after the 60 s RPM/TPM default
    Case(429, "rate_limit_reached_error",
         "Your account org-a1<ak-b2> request reached organization TPD rate limit, current:1500001, limit:1500000",
         K.RATE_LIMITED, S.ACCOUNT, True, MIDNIGHT, 8),
    # 9: OP rate limits are per account
    Case(429, "rate_limit_reached_error", "Your account cn0a<ak-b2> request reached organization max RPM: 3",
         K.RATE_LIMITED, S.ACCOUNT, True, 60.0, 9),
    Case(429, "rate_limit_reached_error",
         "Your account cn0a<ak-b2> request reached organization max RPM: 3, please try again after 1 seconds",
         K.RATE_LIMITED, S.ACCOUNT, True, 1.0, 9),
    Case(429, "rate_limit_reached_error", "request reached max concurrency: 1",
         K.RATE_LIMITED, S.ACCOUNT, True, 60.0, 9),
    Case(429, None, "Your account cn0a<ak-b2> request reached max request: 3, please try again after 1 seconds",
         K.RATE_LIMITED, S.ACCOUNT, True, 1.0, 9),  # the older wording of the RPM cap
    Case(429, None, "request reached max organization concurrency: 3, please try again after 2 seconds",
         K.RATE_LIMITED, S.ACCOUNT, True, 2.0, 9),
    Case(429, None, "request reached organization TPM rate limit", K.RATE_LIMITED, S.ACCOUNT, True, 60.0, 9),
    Case(429, None, "Organization Rate limit exceeded", K.RATE_LIMITED, S.ACCOUNT, True, 60.0, 9),
    T(429, "rate_limit_reached_error", "opaque", K.RATE_LIMITED, S.ACCOUNT, True, 60.0, 9),
    T(429, "rate_limit_error", "opaque", K.RATE_LIMITED, S.ACCOUNT, True, 60.0, 9),
    # 10: KC "too many requests": account scope, but only on a 429
    Case(429, "rate_limit_reached_error", "We're receiving too many requests at the moment",
         K.RATE_LIMITED, S.ACCOUNT, True, 60.0, 10),
    # 11-13: bare statuses
    Case(401, None, "Unauthorized", K.INVALID_KEY, S.KEY, True, None, 11),
    Case(402, None, "Payment Required", K.MEMBERSHIP, S.ACCOUNT, True, DAY, 12),
    Case(429, None, "Quota exceeded", K.RATE_LIMITED, S.KEY, True, 60.0, 13),  # every 429 cools something
    Case(429, "client_closed_request", "opaque", K.RATE_LIMITED, S.KEY, True, 60.0, 13),
    # 14: 5xx: server scope, no penalty, re-send on another key
    Case(500, "server_error", "Failed to extract file", K.SERVER_ERROR, S.SERVER, True, None, 14),
    Case(500, "unexpected_output", "opaque", K.SERVER_ERROR, S.SERVER, True, None, 14),
    Case(502, None, "Bad Gateway", K.SERVER_ERROR, S.SERVER, True, None, 14),
    Case(503, "server_unavailable", "scaling", K.SERVER_ERROR, S.SERVER, True, None, 14),
    Case(503, None, "Too many requests", K.SERVER_ERROR, S.SERVER, True, None, 14),
    Case(504, None, "", K.SERVER_ERROR, S.SERVER, True, None, 14),
    Case(529, "overloaded_error", "Overloaded", K.SERVER_ERROR, S.SERVER, True, None, 14),
    # 15: everything else 4xx is the request's own fault
    Case(400, "content_filter", "The request was rejected because it was considered high risk",
         K.REQUEST_ERROR, S.REQUEST, False, None, 15),
    Case(400, "invalid_request_error", "Invalid request: token length too long",
         K.REQUEST_ERROR, S.REQUEST, False, None, 15),
    Case(400, "invalid_request_error", "The image url appears to be invalid",
         K.REQUEST_ERROR, S.REQUEST, False, None, 15),
    Case(400, None, "We're receiving too many requests", K.REQUEST_ERROR, S.REQUEST, False, None, 15),
    Case(403, None, "Quota exceeded", K.REQUEST_ERROR, S.REQUEST, False, None, 15),  # unknown 403 text: no penalty
    Case(403, "permission_error", "opaque", K.REQUEST_ERROR, S.REQUEST, False, None, 15),
    Case(404, "resource_not_found_error", "Not found the model kimi-k3 or Permission denied",
         K.REQUEST_ERROR, S.REQUEST, False, None, 15),
    Case(408, None, "Request Timeout", K.REQUEST_ERROR, S.REQUEST, False, None, 15),
    Case(413, None, "Request Entity Too Large", K.REQUEST_ERROR, S.REQUEST, False, None, 15),
    Case(422, None, "Unprocessable", K.REQUEST_ERROR, S.REQUEST, False, None, 15),
    Case(499, "client_closed_request", "client went away", K.REQUEST_ERROR, S.REQUEST, False, None, 15),
)

PARAMS = [
    pytest.param(case, env, id=f"{case.status}-{env.__name__}-{case.msg[:40]}")
    for case in CASES
    for env in (TYPED_ENVELOPES if case.by_type else ALL_ENVELOPES)
]


@pytest.mark.parametrize(("case", "envelope"), PARAMS)
def test_rule_table(case: Case, envelope: Envelope) -> None:
    verdict = classify(case.status, [], envelope(case.status, case.etype, case.msg), NOW)
    out = verdict.outcome
    assert (out.kind, out.scope, verdict.failover) == (case.kind, case.scope, case.failover)
    if case.cooldown is None:
        assert out.until is None
    else:
        expected = seconds_to_next_utc_midnight(NOW) if case.cooldown == MIDNIGHT else case.cooldown
        assert out.until is not None
        assert out.until - NOW == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.status}-{c.msg[:40]}")
def test_each_case_is_decided_by_the_expected_row(case: Case) -> None:
    etype, msg = error_message(openai(case.status, case.etype, case.msg))
    assert mod._match(case.status, etype, mod._normalise(msg)) is RULES[case.row]


def test_every_row_phrase_and_type_is_pinned_by_a_case() -> None:
    """Adding or changing a row without a real-message case here fails."""
    pinned: set[tuple[int, str]] = set()
    for case in CASES:
        rule, text = RULES[case.row], mod._normalise(case.msg)
        pinned |= {(case.row, t) for t in rule.texts if t in text}
        if case.by_type:
            pinned.add((case.row, str(case.etype)))
    wanted = {(i, p) for i, rule in enumerate(RULES) for p in (*rule.texts, *rule.types)}
    assert wanted - pinned == set()
    assert {c.row for c in CASES} == set(range(len(RULES)))


def test_normalise_folds_case_quotes_and_whitespace() -> None:
    assert mod._normalise("  We\u2019re\n RECEIVING\t\ttoo  \u2018many\u2019 ") == "we're receiving too 'many'"


def test_table_shape() -> None:
    for rule in RULES:
        if rule.kind in COOLING:
            assert rule.cooldown is not None
        else:
            assert rule.cooldown is None
        if rule.scope in (S.REQUEST, S.CLIENT):
            assert not rule.failover
        assert rule.texts == tuple(mod._normalise(t) for t in rule.texts)  # unnormalised text could never match


def test_success_carries_latency_and_ignores_the_body() -> None:
    body = b'{"error":{"type":"rate_limit_reached_error","message":"Your account cn0x<ak-y> tpd rate limit"}}'
    verdict = classify(200, [("Msh-Uid", "u42")], body, NOW, latency_ms=123.5)
    assert verdict == Verdict(verdict.outcome, False, None)
    out = verdict.outcome
    assert (out.kind, out.until, out.latency_ms, out.reason) == (K.SUCCESS, None, 123.5, "200")
    assert out.account_hint == "uid:u42"
    assert classify(204, [], body, NOW).outcome.account_hint is None  # a model's output is not an account id


@pytest.mark.parametrize("status", [101, 301, 304, 600])
def test_non_error_non_success_statuses_are_neutral(status: int) -> None:
    verdict = classify(status, [], b"tpd rate limit", NOW)
    assert (verdict.outcome.kind, verdict.outcome.scope, verdict.outcome.until, verdict.failover) == (
        K.REQUEST_ERROR, S.REQUEST, None, False)


def test_diagnostics_explain_the_client_gate_and_request_errors() -> None:
    gate = classify(403, [], openai(403, "access_terminated_error", CODING_AGENTS), NOW).diagnostic
    assert gate is not None and "User-Agent" in gate and "not the key" in gate
    assert classify(400, [], openai(400, "invalid_request_error", "bad"), NOW).diagnostic is not None
    assert classify(429, [], openai(429, "rate_limit_reached_error", "max rpm"), NOW).diagnostic is None
    assert classify(500, [], b"", NOW).diagnostic is None


def test_connection_error_is_server_scope_with_failover_and_no_penalty() -> None:
    verdict = classify_connection_error("ConnectionRefusedError:\n  [Errno 111]  refused" + "x" * 500)
    out = verdict.outcome
    assert (out.kind, out.scope, out.until, verdict.failover) == (K.SERVER_ERROR, S.SERVER, None, True)
    assert "\n" not in out.reason and out.reason.startswith("connection error: ConnectionRefusedError: [Errno 111]")
    assert len(out.reason) < 160
    assert classify_connection_error("").outcome.reason == "connection error"


# --- caps an answer states (Outcome.caps) ---------------------------------------------------------------

RPM, CONC, TPM, TPD = Limit.RPM, Limit.CONCURRENCY, Limit.TPM, Limit.TPD
ACCOUNT_TEXT = ("cn0a", "org-a1", "ak-", "<", "your account")  # what a message says that must never reach detail

MESSAGE_CAPS: tuple[tuple[str, dict[Limit, int]], ...] = (
    # Kimi's current wordings (platform error table), and what the fake sends
    ("Your account cn0a<ak-b2> request reached organization max RPM: 200, please try again after 1 seconds",
     {RPM: 200}),
    ("Your account cn0a<ak-b2> request reached organization max concurrency: 50, please try again after 1 seconds",
     {CONC: 50}),
    ("Your account org-a1<ak-b2> request reached organization TPM rate limit, current: 3025143, limit: 3000000",
     {TPM: 3_000_000}),
    ("Your account org-a1<ak-b2> request reached organization TPD rate limit,current:1501880, limit:1500000",
     {TPD: 1_500_000}),
    # older wordings (uid instead of organization), still in Kimi's docs and in users' logs
    ("Your account cn0a<ak-b2> request reached max request: 3, please try again after 1 seconds", {RPM: 3}),
    ("Your account cn0a<ak-b2> request reached max concurrency: 1, please try again after 1 seconds", {CONC: 1}),
    ("Your account cn0a<ak-b2> request reached TPM rate limit, current:563653, limit:500000", {TPM: 500_000}),
    ("Your account cn0a<ak-b2> request reached TPD rate limit,current:1500001, limit:1500000", {TPD: 1_500_000}),
    ("request reached max organization concurrency: 3, please try again after 1 seconds", {CONC: 3}),
    ("Your account organization concurrency: 1, request reached max organization concurrency: 1, please try again "
     "after 0 seconds", {CONC: 1}),
    # the issue's own shorthand
    ("request reached organization max TPM: 2000000", {TPM: 2_000_000}),
    ("request reached organization max TPD: 1500000", {TPD: 1_500_000}),
    # liberal in case and spacing
    ("REQUEST REACHED ORGANIZATION   MAX\n RPM:200", {RPM: 200}),
    ("max rpm = 20", {RPM: 20}),
    ("max RPM 3, max concurrency 2", {RPM: 3, CONC: 2}),
    ("TPM rate limit: 3000000", {TPM: 3_000_000}),
    ("tpm  rate limit , current : 12 , limit : 34", {TPM: 34}),
)

NO_CAPS: tuple[str, ...] = (
    "Organization-level RPM limit reached", "Organization-level concurrency limit reached",
    "We're receiving too many requests at the moment. Please wait a moment and try again.",
    "The engine is currently overloaded, please try again later",
    "Your account cn0a<ak-b2> request reached organization TPM rate limit, current: 3025143",  # only the current
    "max RPM: 0", "max RPM: -3", "max RPM: 3.5", "max RPM: 1,500", "max RPM: 99999999999999", "max RPM: abc",
    "max RPM: \uff13", "max RPM: \u0663", "max RPM:", "maximum rpm: 5", "minmax rpm: 5", "max request size: 1000",
    "max requests per minute", "Invalid request: exceeded model token limit: 262144",
    "tpm rate limit, current: 5, limit: -1", "tpm rate limit, current: 5, limit: 0x10",
    "Your account cn0a<ak-b2> request reached TPD rate limit, current: 1500001" + ", x" * 40 + ", limit: 7",
)


def caps_of(status: int, headers: list[tuple[str, str]], body: bytes) -> dict[tuple[Limit, CapSource], int]:
    caps = classify(status, headers, body, NOW).outcome.caps
    for found in caps:
        assert found.at == 0.0  # the pool stamps the time
        assert not any(t in found.detail.lower() for t in ACCOUNT_TEXT)
    out = {(c.limit, c.source): c.value for c in caps}
    assert len(out) == len(caps)
    return out


@pytest.mark.parametrize("envelope", ALL_ENVELOPES)
@pytest.mark.parametrize(("message", "expected"), MESSAGE_CAPS, ids=[m[:50] for m, _ in MESSAGE_CAPS])
def test_message_caps(message: str, expected: dict[Limit, int], envelope: Envelope) -> None:
    body = envelope(429, "rate_limit_reached_error", message)
    assert caps_of(429, [], body) == {(limit, CapSource.MESSAGE): v for limit, v in expected.items()}
    assert {c.detail for c in classify(429, [], body, NOW).outcome.caps} == {"a 429"}


@pytest.mark.parametrize("envelope", ALL_ENVELOPES)
@pytest.mark.parametrize("message", NO_CAPS, ids=[m[:50] for m in NO_CAPS])
def test_nothing_is_learned_from_messages_without_a_cap(message: str, envelope: Envelope) -> None:
    assert caps_of(429, [], envelope(429, "rate_limit_reached_error", message)) == {}


def test_message_caps_come_from_4xx_errors_only() -> None:
    body = openai(429, "rate_limit_reached_error", "request reached organization max RPM: 200")
    assert caps_of(403, [], body) == {(RPM, CapSource.MESSAGE): 200}
    assert [c.detail for c in classify(403, [], body, NOW).outcome.caps] == ["a 403"]
    for status in (200, 204, 302, 500, 503):  # a success's body is model output; a 5xx says nothing of the account
        assert caps_of(status, [], body) == {}


@pytest.mark.parametrize("status", [200, 429, 500, 302])
def test_x_ratelimit_limit_is_the_rpm_cap_on_any_answer(status: int) -> None:
    headers = [("X-RateLimit-Limit", " 200 "), ("X-RateLimit-Remaining", "12"), ("X-RateLimit-Reset", "30")]
    assert caps_of(status, headers, b"") == {(RPM, CapSource.HEADER): 200}
    cap = classify(status, headers, b"", NOW).outcome.caps[0]
    assert cap == LearnedCap(limit=RPM, value=200, source=CapSource.HEADER, detail="X-RateLimit-Limit")
    assert caps_of(status, [("x-ratelimit-limit", "7")], b"") == {(RPM, CapSource.HEADER): 7}
    assert caps_of(status, [("X-RATELIMIT-LIMIT", "7")], b"") == {(RPM, CapSource.HEADER): 7}


@pytest.mark.parametrize("value", ["", "0", "-1", "200.5", "1e3", "abc", "200, 200;w=60", "\uff12\uff10",
                                   "99999999999999", "+5", "0x10", str(MAX_CAP + 1)])
def test_x_ratelimit_limit_must_be_a_plain_positive_integer(value: str) -> None:
    assert caps_of(200, [("X-RateLimit-Limit", value)], b"") == {}


def test_msh_gid_names_the_tier_on_any_answer() -> None:
    tier3 = {(CONC, CapSource.TIER): 200, (RPM, CapSource.TIER): 5_000, (TPM, CapSource.TIER): 3_000_000}
    assert caps_of(200, [("Msh-Gid", "enterprise-tier-3")], b"") == tier3
    assert caps_of(429, [("msh-gid", "Tier3")], openai(429, "rate_limit_reached_error", "opaque")) == tier3
    assert {c.detail for c in classify(200, [("Msh-Gid", "enterprise-tier-3")], b"", NOW).outcome.caps} == {
        "tier enterprise-tier-3"}
    assert caps_of(200, [("Msh-Gid", "tier-0")], b"")[(TPD, CapSource.TIER)] == 1_500_000
    assert tuple(classify(200, [("Msh-Gid", "tier-1")], b"", NOW).outcome.caps) == tier_caps("tier-1")


@pytest.mark.parametrize("gid", ["", "cn0abc123", "org-a1", "tier-9", "enterprise-tier-3; uid=cn0a", "ak-b2"])
def test_msh_gid_that_is_no_tier_yields_nothing(gid: str) -> None:
    assert caps_of(200, [("Msh-Gid", gid)], b"") == {}


def test_a_429_carries_every_cap_it_states() -> None:
    headers = [("Msh-Uid", "cn0a"), ("Msh-Gid", "enterprise-tier-1"), ("X-RateLimit-Limit", "200")]
    message = "Your account cn0a<ak-b2> request reached organization max RPM: 190, please try again after 1 seconds"
    body = openai(429, "rate_limit_reached_error", message)
    assert caps_of(429, headers, body) == {
        (RPM, CapSource.MESSAGE): 190, (RPM, CapSource.HEADER): 200,
        (RPM, CapSource.TIER): 200, (CONC, CapSource.TIER): 50, (TPM, CapSource.TIER): 2_000_000,
    }
    out = classify(429, headers, body, NOW).outcome
    assert (out.kind, out.scope, out.account_hint) == (K.RATE_LIMITED, S.ACCOUNT, "uid:cn0a")  # as before


def test_success_learns_from_headers_only() -> None:
    body = b'{"error":{"type":"rate_limit_reached_error","message":"request reached organization max RPM: 3"}}'
    assert caps_of(200, [("Content-Type", "application/json")], body) == {}
    assert caps_of(200, [("X-RateLimit-Limit", "60"), ("Msh-Gid", "nonsense")], body) == {
        (RPM, CapSource.HEADER): 60}


# --- reason and account hints -----------------------------------------------------------------------------


REASON_RE = re.compile(r"\d{3}( [a-z][a-z0-9_]{0,63})?")


@pytest.mark.parametrize("envelope", ALL_ENVELOPES)
def test_reason_never_carries_message_text_or_ids(envelope: Envelope) -> None:
    msg = "Your account cn0secret9<ak-deadbeef> request reached organization max RPM: 3 (org-hidden7)"
    verdict = classify(429, [], envelope(429, "rate_limit_reached_error", msg), NOW)
    reason = verdict.outcome.reason
    assert REASON_RE.fullmatch(reason)
    for leak in ("cn0secret9", "deadbeef", "ak-", "hidden7", "account", "rpm"):
        assert leak not in reason.lower()
    assert reason == ("429 rate_limit_reached_error" if envelope in TYPED_ENVELOPES else "429")
    assert verdict.outcome.account_hint == "uid:cn0secret9"


def test_reason_drops_malformed_types() -> None:
    body = openai(429, "org-abc<ak-x> leaked", "opaque")
    assert classify(429, [], body, NOW).outcome.reason == "429"


@pytest.mark.parametrize(
    ("headers", "message", "expected"),
    [
        ([("Msh-Uid", "abc123")], "", "uid:abc123"),
        ([("msh-uid", " abc123 ")], "", "uid:abc123"),
        ([("MSH-ORG-ID", "org-xyz")], "", "org:xyz"),
        ([("Msh-Org-Id", "xyz")], "", "org:xyz"),
        ([("Msh-Org-Id", "org-xyz"), ("Msh-Uid", "u1")], "", "uid:u1"),
        ([("Msh-Uid", "ak-123"), ("Msh-Org-Id", "org-o")], "", "org:o"),
        ([("Msh-Uid", "has space")], "", None),
        ([("Msh-Uid", "")], "", None),
        ([], "Your account cn0abc123<ak-f00ba4> request reached organization max RPM", "uid:cn0abc123"),
        ([], "Your account {cn0abc}<{ak-1}> request reached", "uid:cn0abc"),
        ([], "Your account org-abc<ak-x> is not active", "org:abc"),
        ([], "Your account ak-1<ak-2>", None),
        ([], "no identifiers here <b>", None),
        ([("Msh-Uid", "fromheader")], "Your account cn0abc<ak-1>", "uid:fromheader"),
    ],
)
def test_account_hint(headers: list[tuple[str, str]], message: str, expected: str | None) -> None:
    hint = account_hint(headers, message)
    assert hint == expected
    if hint is not None:
        assert "ak-" not in hint


# --- retry timing (Retry-After as seconds or an HTTP-date, and the message's "try again after N seconds") ---


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("30", 30.0),
        (" 7 ", 7.0),
        ("1.5", 1.5),
        ("0", 1.0),  # never "retry this instant" (that sent the retry to the same key)
        ("0.2", 1.0),
        ("1152", 1152.0),
        ("99999999999", MAX_COOLDOWN),
        ("99999999999999999999.5", MAX_COOLDOWN),
        ("-5", None),
        ("-0.5", None),
        ("", None),
        ("soon", None),
        ("1e3", None),
        ("NaN", None),
        ("inf", None),
        ("+30", None),
        ("٣", None),  # a non-ASCII digit is not delta-seconds
        ("30 seconds", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 1.0),  # a past date parses and means "now"
        ("Fri, 31 Dec 9999 23:59:59 GMT", MAX_COOLDOWN),
        ("Mon, 99 Foo 2015 99:99:99 GMT", None),
    ],
)
def test_parse_retry_after(value: str, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_parse_retry_after_http_date_in_the_future() -> None:
    now = 1_750_000_000.0
    assert parse_retry_after(formatdate(now + 120, usegmt=True), now) == 120.0
    assert parse_retry_after(formatdate(now + 3 * HOUR, usegmt=True), now) == 3 * HOUR


@pytest.mark.parametrize(
    ("headers", "message", "default", "expected"),
    [
        ([], "", 60.0, 60.0),
        ([], "", 0.0, 1.0),
        ([], "", -10.0, 1.0),
        ([], "", 1e12, MAX_COOLDOWN),
        ([("Retry-After", "12")], "", 60.0, 12.0),
        ([("Retry-After", "garbage"), ("retry-after", "12"), ("RETRY-AFTER", "99")], "", 60.0, 12.0),
        ([("Retry-After", "-1")], "please try again after 7 seconds", 60.0, 7.0),
        ([("Retry-After", "5")], "please try again after 30 seconds", 60.0, 5.0),
        ([], "please try again after 7 seconds", 60.0, 7.0),
        ([], "Please Try  again  after 1 second.", 60.0, 1.0),
        ([], "try again in 2 minutes", 60.0, 120.0),
        ([], "try again after 1 hour", 60.0, HOUR),
        ([], "try again after 0 seconds", 60.0, 1.0),
        ([], "try again after 99999999 seconds", 60.0, MAX_COOLDOWN),
        ([], "try again in 500ms", 60.0, 60.0),
        ([("X-RateLimit-Reset", "9")], "try again after 3 seconds", 60.0, 3.0),
        ([("X-RateLimit-Reset", "42")], "", 60.0, 42.0),
        ([("x-ratelimit-reset", str(int(NOW) + 300))], "", 60.0, pytest.approx(300.0)),
        ([("X-RateLimit-Reset", str(int((NOW + 300) * 1000)))], "", 60.0, pytest.approx(300.0)),
        ([("X-RateLimit-Reset", str(int(NOW) - 300))], "", 60.0, 60.0),
        ([("X-RateLimit-Reset", "0")], "", 60.0, 60.0),
        ([("X-RateLimit-Reset", "junk")], "", 60.0, 60.0),
        ([("X-RateLimit-Reset", formatdate(NOW + 90, usegmt=True))], "", 60.0, pytest.approx(90.0, abs=1)),
    ],
)
def test_retry_delay(headers: list[tuple[str, str]], message: str, default: float, expected: object) -> None:
    assert retry_delay(headers, message, NOW, default) == expected


def _until(status: int, body: bytes, headers: list[tuple[str, str]]) -> float | None:
    until = classify(status, headers, body, NOW).outcome.until
    return None if until is None else until - NOW


def test_signalled_cooldowns_follow_the_response() -> None:
    rpm = openai(429, "rate_limit_reached_error", "max RPM")
    assert _until(429, rpm, [("Retry-After", "1152")]) == pytest.approx(1152.0)
    assert _until(429, rpm, [("Retry-After", "0")]) == pytest.approx(1.0)
    assert _until(429, rpm, [("Retry-After", "1" * 15)]) == pytest.approx(MAX_COOLDOWN)
    assert _until(429, rpm, [("Retry-After", "Wed, 21 Oct 2015 07:28:00 GMT")]) == pytest.approx(1.0)
    tpd = openai(429, "rate_limit_reached_error", "organization TPD rate limit")
    assert _until(429, tpd, [("retry-after", "1152")]) == pytest.approx(1152.0)
    billing = anthropic(403, "permission_error", "You've reached your usage limit for this billing cycle")
    assert _until(403, billing, [("Retry-After", "3600")]) == pytest.approx(3600.0)
    assert _until(429, openai(429, None, "whatever, try again after 9 seconds"), []) == pytest.approx(9.0)


def test_headers_may_be_a_one_shot_iterator() -> None:
    headers = ((n, v) for n, v in [("Msh-Uid", "u7"), ("Retry-After", "1152")])
    out = classify(429, headers, openai(429, "rate_limit_reached_error", "max RPM"), NOW).outcome
    assert out.account_hint == "uid:u7"
    assert out.until is not None and out.until - NOW == pytest.approx(1152.0)


def test_fixed_cooldowns_ignore_retry_signals() -> None:
    # A 1 s Retry-After on an unfunded or unverified account would just hammer it.
    quota = openai(429, "exceeded_current_quota_error", "try again after 1 seconds")
    assert _until(429, quota, [("Retry-After", "1")]) == pytest.approx(6 * HOUR)
    member = openai(402, None, "please ensure your membership is active")
    assert _until(402, member, [("Retry-After", "1")]) == pytest.approx(DAY)


def test_tpd_default_is_next_utc_midnight() -> None:
    body = openai(429, "rate_limit_reached_error", "TPD rate limit")
    just_before = datetime(2026, 3, 1, 23, 59, 30, tzinfo=UTC).timestamp()
    until = classify(429, [], body, just_before).outcome.until
    assert until == datetime(2026, 3, 2, tzinfo=UTC).timestamp()


# --- error_message ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"error":{"type":"invalid_request_error","message":"Bad"}}', ("invalid_request_error", "Bad")),
        (b'{"type":"error","error":{"type":"Permission_Error","message":"m"}}', ("permission_error", "m")),
        (b'{"errorMessage":"429 Your account"}', (None, "429 Your account")),
        (b'{"error":"Too Many Requests"}', (None, "Too Many Requests")),
        (b'{"message":"flat"}', (None, "flat")),
        (b'{"error":{"type":7,"message":"m"}}', (None, "m")),
        (b'{"error":{"type":"x"}}', ("x", '{"error":{"type":"x"}}')),
        (b'{"detail":"odd"}', (None, '{"detail":"odd"}')),
        (b"[1, 2]", (None, "[1, 2]")),
        (b"  upstream connect error  ", (None, "upstream connect error")),
        (b"", (None, "")),
        (b"\xff\xfe max rpm", (None, "\ufffd\ufffd max rpm")),
    ],
)
def test_error_message(body: bytes, expected: tuple[str | None, str]) -> None:
    assert error_message(body) == expected


@pytest.mark.parametrize(
    "body", [b"[" * 100_000, b'{"error": ' + b"1" * 10_000 + b"}", b'{"error": {"message": "' + b"a" * 200_000]
)
def test_error_message_survives_hostile_json(body: bytes) -> None:
    etype, msg = error_message(body)
    assert etype is None and isinstance(msg, str) and len(msg) <= 65536


# --- decode_body -----------------------------------------------------------------------------------------

PAYLOAD = json.dumps({"error": {"type": "rate_limit_reached_error", "message": "max RPM ’ é"}}).encode() * 20


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize(
    ("encoded", "coding"),
    [
        (PAYLOAD, None),
        (PAYLOAD, ""),
        (PAYLOAD, "identity"),
        (gzip.compress(PAYLOAD), "gzip"),
        (gzip.compress(PAYLOAD), "X-GZIP"),
        (gzip.compress(PAYLOAD[:100]) + gzip.compress(PAYLOAD[100:]), "gzip"),
        (zlib.compress(PAYLOAD), "deflate"),
        (_raw_deflate(PAYLOAD), "deflate"),
        (brotli.compress(PAYLOAD), "br"),
        (zstandard.ZstdCompressor().compress(PAYLOAD), "zstd"),
        (brotli.compress(gzip.compress(PAYLOAD)), "gzip, br"),
        (gzip.compress(zstandard.ZstdCompressor().compress(PAYLOAD)), " zstd ,gzip,identity"),
    ],
)
def test_decode_body_roundtrip(encoded: bytes, coding: str | None) -> None:
    assert decode_body(encoded, coding) == PAYLOAD


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd", "compress", "gzip, br"])
def test_decode_body_garbage_is_empty(coding: str) -> None:
    assert decode_body(b"\x00\x8b\xff\xfe\x13\x37" * 50, coding) == b""


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd", "compress"])
def test_decode_body_mislabelled_plain_text_is_kept(coding: str) -> None:
    assert decode_body(b'{"error":{"message":"max RPM"}}', coding) == b'{"error":{"message":"max RPM"}}'


@pytest.mark.parametrize(
    ("encoded", "coding"),
    [
        (gzip.compress(PAYLOAD), "gzip"),
        (zlib.compress(PAYLOAD), "deflate"),
        (brotli.compress(PAYLOAD), "br"),
        (zstandard.ZstdCompressor().compress(PAYLOAD), "zstd"),
    ],
)
def test_decode_body_truncated_yields_a_prefix(encoded: bytes, coding: str) -> None:
    out = decode_body(encoded[: len(encoded) // 2], coding)
    assert PAYLOAD.startswith(out)


BOMB = b"\0" * (64 * 1024 * 1024)


@pytest.mark.parametrize(
    ("encoded", "coding"),
    [
        (gzip.compress(BOMB), "gzip"),
        (zlib.compress(BOMB, 9), "deflate"),
        (brotli.compress(BOMB, quality=5), "br"),
        (zstandard.ZstdCompressor(level=3).compress(BOMB), "zstd"),
        (gzip.compress(gzip.compress(BOMB)), "gzip, gzip"),
    ],
    ids=["gzip", "deflate", "br", "zstd", "gzip-gzip"],
)
@pytest.mark.parametrize("limit", [65536, 1000, 0])
def test_decode_body_stops_a_zip_bomb_at_the_limit(encoded: bytes, coding: str, limit: int) -> None:
    assert len(encoded) < 1024 * 1024
    assert decode_body(encoded, coding, limit=limit) == b"\0" * limit


BOMBS = {
    "gzip": gzip.compress(BOMB),
    "br": brotli.compress(BOMB, quality=5),
    "zstd": zstandard.ZstdCompressor().compress(BOMB),
}


@pytest.mark.parametrize("coding", ["br", "zstd"])
def test_decode_body_stops_reading_once_the_limit_is_reached(coding: str) -> None:
    # Junk after the stream would fail the decode if the decoder kept going (the CPU half of a bomb).
    assert decode_body(BOMBS[coding] + b"\xff" * 64, coding) == b"\0" * 65536
    small = brotli.compress(PAYLOAD) if coding == "br" else zstandard.ZstdCompressor().compress(PAYLOAD)
    assert decode_body(small + b"\xff" * 64, coding) == b""  # the control: junk that is reached does fail


@pytest.mark.parametrize(("coding", "encoded"), BOMBS.items(), ids=list(BOMBS))
def test_decode_body_memory_stays_bounded(encoded: bytes, coding: str) -> None:
    # The returned slice alone cannot show that the decoder stopped early; peak allocation can. Brotli 1.1 has no
    # output cap, so its bound is one window (about 16 MiB plus copies), still far below the 64 MiB it would inflate to.
    tracemalloc.start()
    try:
        decode_body(encoded, coding)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (32 if coding == "br" else 2) * 1024 * 1024


def test_decode_body_caps_identity_too() -> None:
    assert decode_body(b"a" * 100, None, limit=10) == b"a" * 10


def test_zstd_refuses_windows_beyond_http_limit() -> None:
    # A streamed frame keeps its declared 128 MiB window; decoding it would allocate that much.
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=27)
    writer = zstandard.ZstdCompressor(compression_params=params).compressobj()
    encoded = writer.compress(bytes(range(256)) * 64) + writer.flush()
    assert zstandard.get_frame_parameters(encoded).window_size == 1 << 27
    assert decode_body(encoded, "zstd") == b""
    small = zstandard.ZstdCompressionParameters.from_level(3, window_log=23)
    writer = zstandard.ZstdCompressor(compression_params=small).compressobj()
    assert decode_body(writer.compress(PAYLOAD) + writer.flush(), "zstd") == PAYLOAD


# --- properties ------------------------------------------------------------------------------------------

PHRASES = [*sorted({t for rule in RULES for t in rule.texts}), "try again after 5 seconds", "cn0a<ak-b>"]
TYPES = [*sorted({t for rule in RULES for t in rule.types}), "invalid_request_error", "server_error"]
HEADER_NAMES = ["Retry-After", "retry-after", "X-RateLimit-Reset", "Msh-Uid", "Msh-Org-Id", "Content-Type",
                "X-RateLimit-Limit", "Msh-Gid"]

header_values = st.one_of(
    st.text(max_size=40),
    st.integers(-(10**15), 10**15).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.strftime("%a, %d %b %Y %H:%M:%S GMT")),
    st.sampled_from(["enterprise-tier-3", "tier0", "Tier-5", "tier-7", " 200 ", "0"]),
)
header_names = st.one_of(st.sampled_from(HEADER_NAMES), st.text(max_size=20))
headers_st = st.lists(st.tuples(header_names, header_values), max_size=6)
envelope_body = st.builds(
    lambda env, status, etype, words: env(status, etype, " ".join(words)),
    st.sampled_from(ALL_ENVELOPES),
    st.integers(100, 599),
    st.one_of(st.none(), st.sampled_from(TYPES), st.text(max_size=20)),
    st.lists(st.one_of(st.sampled_from(PHRASES), st.text(max_size=20)), max_size=4),
)


@settings(max_examples=400)
@given(
    status=st.integers(100, 599),
    headers=headers_st,
    body=st.one_of(st.binary(max_size=300), envelope_body),
    now=st.floats(0, 4e9),
    latency=st.one_of(st.none(), st.floats(0, 1e6)),
)
def test_classify_total_and_well_formed(
    status: int, headers: list[tuple[str, str]], body: bytes, now: float, latency: float | None
) -> None:
    verdict = classify(status, iter(headers), body, now, latency)
    out = verdict.outcome
    assert isinstance(verdict, Verdict)
    assert REASON_RE.fullmatch(out.reason)
    if out.until is not None:
        assert now + 1 <= out.until <= now + MAX_COOLDOWN
    assert (out.until is not None) == (out.kind in COOLING)
    if out.scope in (S.REQUEST, S.CLIENT):
        assert not verdict.failover
    if 200 <= status < 300:
        assert out.kind is K.SUCCESS and out.latency_ms == latency
    if status == 429:  # every 429 cools something, unless it is not the keys' doing at all
        assert out.kind not in (K.REQUEST_ERROR, K.SUCCESS)
    if status >= 500:
        assert out.kind is not K.SUCCESS and out.scope is not S.REQUEST
    if out.account_hint is not None:
        assert re.fullmatch(r"(uid|org):[A-Za-z0-9_.-]{1,64}", out.account_hint)


@given(value=st.one_of(st.text(), st.integers().map(str), st.floats().map(str)), now=st.floats(0, 4e9))
def test_parse_retry_after_total(value: str, now: float) -> None:
    seconds = parse_retry_after(value, now)
    assert seconds is None or 1.0 <= seconds <= MAX_COOLDOWN


@given(
    headers=headers_st,
    message=st.one_of(st.text(), st.sampled_from(PHRASES)),
    default=st.floats(-1e12, 1e12),
    now=st.floats(0, 4e9),
)
def test_retry_delay_total(headers: list[tuple[str, str]], message: str, default: float, now: float) -> None:
    assert 1.0 <= retry_delay(headers, message, now, default) <= MAX_COOLDOWN


@given(
    raw=st.one_of(
        st.binary(max_size=2000),
        st.binary(max_size=500).map(gzip.compress),
        st.binary(max_size=500).map(brotli.compress),
    ),
    coding=st.one_of(
        st.none(), st.sampled_from(["gzip", "deflate", "br", "zstd", "identity", "gzip, br", "x"]), st.text(max_size=12)
    ),
    limit=st.integers(0, 4096),
)
def test_decode_body_total(raw: bytes, coding: str | None, limit: int) -> None:
    assert len(decode_body(raw, coding, limit)) <= limit


@given(body=st.binary(max_size=2000))
def test_error_message_total(body: bytes) -> None:
    etype, msg = error_message(body)
    assert etype is None or isinstance(etype, str)
    assert isinstance(msg, str)


CAP_PHRASES = ["max rpm:", "max organization concurrency:", "max request:", "tpm rate limit, current: 5, limit:",
               "tpd rate limit", "max tpm", "limit:", ","]
CAP_DETAIL_RE = re.compile(r"a 4[0-9]{2}|X-RateLimit-Limit|tier (?:[a-z]{1,16}[-_]){0,2}tier[-_]?[0-9]{1,2}")
cap_text = st.lists(st.one_of(st.sampled_from(CAP_PHRASES), st.integers(-(10**15), 10**15).map(str),
                              st.text(max_size=12)), max_size=8).map(" ".join)


@settings(max_examples=400)
@given(
    status=st.integers(100, 599),
    headers=headers_st,
    message=cap_text,
    envelope=st.sampled_from(ALL_ENVELOPES),
)
def test_caps_are_always_positive_bounded_and_say_nothing_of_the_message(
    status: int, headers: list[tuple[str, str]], message: str, envelope: Envelope
) -> None:
    for cap in classify(status, headers, envelope(status, "rate_limit_reached_error", message), NOW).outcome.caps:
        assert isinstance(cap.value, int) and 0 < cap.value <= MAX_CAP
        assert cap.at == 0.0
        assert CAP_DETAIL_RE.fullmatch(cap.detail), cap.detail
        if cap.source is CapSource.MESSAGE:
            assert 400 <= status < 500 and cap.detail == f"a {status}"
        else:
            assert cap.source in (CapSource.HEADER, CapSource.TIER)
