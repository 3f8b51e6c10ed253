"""Turn one upstream answer (or the lack of one) into an Outcome the engine can act on.

Pure: no I/O, no clock, no mitmproxy. RULES is Kimi's error taxonomy: for each documented status, `error.type`
and message, who is at fault (the key, its account, the request, the client or the platform) and what to do.
Message text is matched before `error.type` and status because Kimi reuses both across unrelated failures: one
`access_terminated_error` is an account ban, another is a client-identity gate that every key would hit.
Each answer's account caps (a 429's "max RPM: 200", X-RateLimit-Limit, the tier in Msh-Gid) go into `Outcome.caps`
for the pool to keep through `caps.merge_caps`.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Final, Literal

import brotli  # type: ignore[import-untyped]  # ships with mitmproxy, no stubs
import zstandard

from kimi_rotator.caps import MAX_CAP, tier_caps
from kimi_rotator.models import CapSource, LearnedCap, Limit, Outcome, OutcomeKind, Scope

MIN_COOLDOWN: Final = 1.0
MAX_COOLDOWN: Final = 8 * 86400.0
RATE_LIMIT_DEFAULT: Final = 60.0
BILLING_DEFAULT: Final = 5 * 3600.0  # Kimi Code's rolling window; /usages gives the real reset
QUOTA_DEFAULT: Final = 6 * 3600.0
MEMBERSHIP_COOLDOWN: Final = 24 * 3600.0
# Moonshot says a TPD limit resets "the next day" and names no time zone; UTC is our best guess.
NEXT_UTC_DAY: Final = "next-utc-day"

_CLIENT_GATE = (
    "Kimi Code rejected the calling client's identity (User-Agent / X-Msh-Platform allowlist), not the key: "
    "every key would get the same answer, so none was penalised or rotated. kimi-rotate forwards the "
    "User-Agent unchanged; use a supported coding agent (Kimi CLI, Claude Code, Roo Code, Kilo Code)."
)
_OVERLOADED = (
    "Kimi reports the engine overloaded; passed through without trying other keys. On Kimi Code this has "
    "also meant a plan limit or a User-Agent block: if it persists, check /usages and the client's User-Agent."
)
_REQUEST = "Kimi rejected the request itself; it was passed through unchanged and no key was penalised."


@dataclass(frozen=True)
class Rule:
    """One row of the taxonomy. `status` None means any error status (>= 400)."""

    status: int | range | None
    types: tuple[str, ...]
    texts: tuple[str, ...]  # normalised substrings (see _normalise)
    kind: OutcomeKind
    scope: Scope
    cooldown: float | Literal["next-utc-day"] | None  # None: no deadline (disabled, or nothing to cool)
    signalled: bool  # a Retry-After / message / reset-header signal replaces the default cooldown
    failover: bool
    diagnostic: str | None = None


K, S = OutcomeKind, Scope
# Order is precedence within each pass (texts, then types, then bare status).
RULES: Final[tuple[Rule, ...]] = (
    Rule(None, ("access_terminated_error",), ("only available for coding agents",),
         K.CLIENT_REJECTED, S.CLIENT, None, False, False, _CLIENT_GATE),
    Rule(None, (), ("access terminated",), K.ACCESS_DENIED, S.ACCOUNT, None, False, True),
    Rule(None, (), ("unable to verify your membership benefits", "ensure your membership is active"),
         K.MEMBERSHIP, S.ACCOUNT, MEMBERSHIP_COOLDOWN, False, True),
    Rule(None, (), ("reached your usage limit for this billing cycle", "quota will be refreshed in the next cycle",
                    "reached your usage limit for this period", "monthly usage limit"),
         K.BILLING_LIMITED, S.ACCOUNT, BILLING_DEFAULT, True, True),
    Rule(None, ("exceeded_current_quota_error",),
         ("is not active, current state", "check your account balance", "exceeded your current token quota",
          "suspended due to insufficient balance"),
         K.QUOTA_EXHAUSTED, S.ACCOUNT, QUOTA_DEFAULT, False, True),
    Rule(None, ("permission_denied_error",),
         ("ip is not allowed to access this organization", "the api you are accessing is not open",
          "not allowed to get other user info"),
         K.ACCESS_DENIED, S.ACCOUNT, None, False, True),
    Rule(None, ("invalid_authentication_error", "incorrect_api_key_error", "authentication_error"),
         ("invalid authentication", "api key appears to be invalid", "incorrect api key provided"),
         K.INVALID_KEY, S.KEY, None, False, True),
    Rule(None, ("engine_overloaded_error",), ("engine is currently overloaded",),
         K.SERVER_ERROR, S.SERVER, None, False, False, _OVERLOADED),
    Rule(None, (), ("tpd rate limit",), K.RATE_LIMITED, S.ACCOUNT, NEXT_UTC_DAY, True, True),
    Rule(None, ("rate_limit_reached_error", "rate_limit_error"),
         ("max rpm", "max concurrency", "max organization concurrency", "reached max request:", "tpm rate limit",
          "organization rate limit"),
         K.RATE_LIMITED, S.ACCOUNT, RATE_LIMIT_DEFAULT, True, True),
    Rule(429, (), ("too many requests",), K.RATE_LIMITED, S.ACCOUNT, RATE_LIMIT_DEFAULT, True, True),
    Rule(401, (), (), K.INVALID_KEY, S.KEY, None, False, True),
    Rule(402, (), (), K.MEMBERSHIP, S.ACCOUNT, MEMBERSHIP_COOLDOWN, False, True),
    # Every 429 cools something: one that no rule above names cools its key (opencode-kimi-rotator sent some,
    # such as "Quota exceeded", back to the client with no cooldown, so the next request hit the same key).
    Rule(429, (), (), K.RATE_LIMITED, S.KEY, RATE_LIMIT_DEFAULT, True, True),
    Rule(range(500, 600), (), (), K.SERVER_ERROR, S.SERVER, None, False, True),
    Rule(range(400, 500), (), (), K.REQUEST_ERROR, S.REQUEST, None, False, False, _REQUEST),
)
del K, S


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    failover: bool
    diagnostic: str | None


def classify(
    status: int, headers: Iterable[tuple[str, str]], body: bytes, now: float, latency_ms: float | None = None
) -> Verdict:
    pairs = list(headers)  # read several times below; callers may pass a generator
    caps = header_caps(pairs)
    if 200 <= status < 300:
        # A 2xx body is model output: never mine it for account ids, error text or caps.
        hint = account_hint(pairs, "")
        return Verdict(Outcome(kind=OutcomeKind.SUCCESS, reason=str(status), latency_ms=latency_ms,
                               account_hint=hint, caps=caps), False, None)
    etype, message = error_message(body)
    reason = _reason(status, etype)
    hint = account_hint(pairs, message)
    text = _normalise(message)
    if 400 <= status < 500:
        caps = message_caps(text, status) + caps
    rule = _match(status, etype, text) if 400 <= status < 600 else None
    if rule is None:  # 1xx/3xx or non-HTTP: nothing a key did; hand it back untouched
        return Verdict(Outcome(kind=OutcomeKind.REQUEST_ERROR, scope=Scope.REQUEST, reason=reason,
                               account_hint=hint, caps=caps), False, None)
    outcome = Outcome(kind=rule.kind, scope=rule.scope, until=_until(rule, pairs, message, now),
                      reason=reason, account_hint=hint, caps=caps)
    return Verdict(outcome, rule.failover, rule.diagnostic)


def classify_connection_error(reason: str) -> Verdict:
    detail = " ".join(str(reason).split())[:120]
    outcome = Outcome(kind=OutcomeKind.SERVER_ERROR, scope=Scope.SERVER,
                      reason=f"connection error: {detail}" if detail else "connection error")
    return Verdict(outcome, True, None)


def _match(status: int, etype: str | None, text: str) -> Rule | None:
    def allows(rule: Rule) -> bool:
        return rule.status is None or status == rule.status or (
            isinstance(rule.status, range) and status in rule.status)

    for rule in RULES:
        if rule.texts and allows(rule) and any(t in text for t in rule.texts):
            return rule
    if etype:
        for rule in RULES:
            if etype in rule.types and allows(rule):
                return rule
    for rule in RULES:
        if rule.status is not None and not rule.texts and not rule.types and allows(rule):
            return rule
    return None


def _until(rule: Rule, headers: list[tuple[str, str]], message: str, now: float) -> float | None:
    if rule.cooldown is None:
        return None
    default = 86400.0 - now % 86400.0 if rule.cooldown == NEXT_UTC_DAY else float(rule.cooldown)
    delay = retry_delay(headers, message, now, default) if rule.signalled else _clamp(default)
    return now + delay


_TYPE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")


def _reason(status: int, etype: str | None) -> str:
    # Only the status and a well-formed type: messages carry uid/org/ak ids and must not reach logs.
    return f"{status} {etype}" if etype and _TYPE_RE.fullmatch(etype) else str(status)


def _normalise(text: str) -> str:
    return " ".join(text.replace("\u2019", "'").replace("\u2018", "'").lower().split())


def _clamp(seconds: float) -> float:
    return min(MAX_COOLDOWN, max(MIN_COOLDOWN, seconds))


_NUMBER = re.compile(r"-?[0-9]{1,20}(?:\.[0-9]{1,20})?")
_TRY_AGAIN = re.compile(
    r"try again (?:after|in) ([0-9]{1,12}(?:\.[0-9]{1,6})?) ?(seconds?|secs?|s|minutes?|mins?|hours?|h)\b")
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_retry_after(value: str, now: float) -> float | None:
    text = value.strip()
    if _NUMBER.fullmatch(text):
        seconds = float(text)
        return None if seconds < 0 else _clamp(seconds)
    try:
        when = parsedate_to_datetime(text)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        # A date already past means "retry now": the floor applies rather than ignoring it.
        return _clamp(when.timestamp() - now)
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None


def _reset_delay(value: str, now: float) -> float | None:
    text = value.strip()
    if not _NUMBER.fullmatch(text):
        return parse_retry_after(text, now)
    number = float(text)
    # The format is undocumented: large values can only be epoch seconds or milliseconds.
    if number >= 1e12:
        number = number / 1000.0 - now
    elif number >= 1e9:
        number -= now
    return _clamp(number) if number > 0 else None  # a stale reset says nothing about when to retry


def retry_delay(headers: Iterable[tuple[str, str]], message: str, now: float, default: float) -> float:
    pairs = [(name.strip().lower(), value) for name, value in headers]
    for name, value in pairs:
        if name == "retry-after" and (seconds := parse_retry_after(value, now)) is not None:
            return seconds
    if found := _TRY_AGAIN.search(_normalise(message)):
        return _clamp(float(found.group(1)) * _UNIT.get(found.group(2)[0], 1.0))
    for name, value in pairs:
        if name == "x-ratelimit-reset" and (seconds := _reset_delay(value, now)) is not None:
            return seconds
    return _clamp(default)


# A cap is a whole number standing alone: not the "1" of "1,500,000" or "3.5", nor a prefix of a longer number.
_CAP_NUMBER = r"([0-9]{1,13})(?![0-9]|[.,][0-9])"
# On normalised text. Kimi's wordings, old and new: "request reached organization max RPM: 200", "request reached
# max request: 3" (RPM), "organization max concurrency: 50", "max organization concurrency: 1", "request reached
# organization TPM rate limit, current: 3025143, limit: 3000000", "TPD rate limit,current:1501880, limit:1500000".
_MESSAGE_CAPS: Final = (  # (limit, a word its wording must contain: a cheap test before the search, pattern)
    (Limit.RPM, "max", re.compile(r"\bmax (?:organization )?(?:rpm|requests?)(?: ?[:=] ?| )" + _CAP_NUMBER)),
    (Limit.CONCURRENCY, "concurren",
     re.compile(r"\bmax (?:organization )?(?:concurrency|concurrent requests)(?: ?[:=] ?| )" + _CAP_NUMBER)),
    (Limit.TPM, "tpm", re.compile(r"\b(?:max (?:organization )?tpm|tpm rate limit\b(?:.{0,60}?\blimit)?)(?: ?[:=] ?| )"
                                  + _CAP_NUMBER)),
    (Limit.TPD, "tpd", re.compile(r"\b(?:max (?:organization )?tpd|tpd rate limit\b(?:.{0,60}?\blimit)?)(?: ?[:=] ?| )"
                                  + _CAP_NUMBER)),
)


def message_caps(text: str, status: int) -> tuple[LearnedCap, ...]:
    """The caps an error message states, from its normalised text (see _normalise). The detail names only the
    status ("a 429"): the message itself carries account ids."""
    found = []
    for limit, word, pattern in _MESSAGE_CAPS:
        if word in text and (match := pattern.search(text)) and 0 < (value := int(match.group(1))) <= MAX_CAP:
            found.append(LearnedCap(limit=limit, value=value, source=CapSource.MESSAGE, detail=f"a {status}"))
    return tuple(found)


_PLAIN_INT = re.compile(r"[0-9]{1,13}")


def header_caps(headers: Iterable[tuple[str, str]]) -> tuple[LearnedCap, ...]:
    """Caps in an answer's headers: X-RateLimit-Limit (taken as the RPM cap, the one Kimi's help centre pairs it
    with) and the tier Msh-Gid names. Runs on every success, so one plain pass; a name needs no strip() here
    (HTTP forbids whitespace in one, and what parsed the answer has refused any that had it), and both caps
    are built once per distinct value."""
    caps: tuple[LearnedCap, ...] = ()
    for name, value in headers:
        key = name.lower()
        if key == "x-ratelimit-limit":
            caps += _rate_limit_cap(value)
        elif key == "msh-gid":
            caps += tier_caps(value)
    return caps


@lru_cache(maxsize=64)  # an account's answers repeat one limit: build its cap once, not on every success
def _rate_limit_cap(value: str) -> tuple[LearnedCap, ...]:
    text = value.strip()
    if not _PLAIN_INT.fullmatch(text) or not 0 < (limit := int(text)) <= MAX_CAP:
        return ()
    return (LearnedCap(limit=Limit.RPM, value=limit, source=CapSource.HEADER, detail="X-RateLimit-Limit"),)


_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MSG_ACCOUNT = re.compile(r"\{?([A-Za-z0-9][A-Za-z0-9_.-]{0,63})\}?\s?<\s?\{?ak-", re.IGNORECASE)


def account_hint(headers: Iterable[tuple[str, str]], message: str) -> str | None:
    found: dict[str, str] = {}
    for name, value in headers:
        key, ident = name.strip().lower(), value.strip()
        if key in ("msh-uid", "msh-org-id") and key not in found and _ID.fullmatch(ident) \
                and not ident.lower().startswith("ak-"):
            found[key] = ident
    if "msh-uid" in found:
        return _label("uid", found["msh-uid"])
    if "msh-org-id" in found:
        return _label("org", found["msh-org-id"])
    if match := _MSG_ACCOUNT.search(message):
        ident = match.group(1)
        return _label("org" if ident.lower().startswith("org-") else "uid", ident)
    return None


def _label(kind: str, ident: str) -> str | None:
    # Header and message spell an org as "org-x"; dropping the prefix keeps one label per org.
    if kind == "org" and ident.lower().startswith("org-"):
        ident = ident[4:]
    if not ident or ident.lower().startswith("ak-"):
        return None
    return f"{kind}:{ident}"


_PARSE_LIMIT: Final = 65536


def error_message(body: bytes) -> tuple[str | None, str]:
    raw = bytes(body[:_PARSE_LIMIT])
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return None, text
    if not isinstance(doc, dict):
        return None, text
    error = doc.get("error")
    if isinstance(error, dict):  # OpenAI {"error":{...}} and Anthropic {"type":"error","error":{...}}
        etype, message = error.get("type"), error.get("message")
        return (etype.strip().lower() if isinstance(etype, str) else None,
                message if isinstance(message, str) else text)
    for key in ("errorMessage", "message", "error"):
        flat = doc.get(key)
        if isinstance(flat, str):
            return None, flat
    return None, text  # unknown envelope: the raw text still lets the phrase rules match


_BR_STEP: Final = 1  # Brotli 1.1 has no output cap; one input byte inflates to at most one window (16 MiB)
_ZSTD_WINDOW: Final = 1 << 23  # RFC 9659 caps HTTP zstd windows at 8 MiB


class _Unsupported(ValueError):
    pass


def decode_body(raw: bytes, content_encoding: str | None, limit: int = 65536) -> bytes:
    limit = max(0, limit)
    codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
    data = bytes(raw)
    try:
        for coding in reversed(codings):  # the last coding listed was applied last
            data = _decode_one(coding, data, limit)
    except (zlib.error, brotli.error, zstandard.ZstdError, ValueError):
        return bytes(raw[:limit]) if _looks_textual(raw) else b""
    return data[:limit]


def _decode_one(coding: str, data: bytes, limit: int) -> bytes:
    if coding in ("identity", "none"):
        return data
    if coding in ("gzip", "x-gzip"):
        return _inflate(data, 16 + zlib.MAX_WBITS, limit)
    if coding == "deflate":
        try:
            return _inflate(data, zlib.MAX_WBITS, limit)
        except zlib.error:  # many servers send raw deflate despite RFC 9110
            return _inflate(data, -zlib.MAX_WBITS, limit)
    if coding == "br":
        decoder, out = brotli.Decompressor(), bytearray()
        for start in range(0, len(data), _BR_STEP):
            out += decoder.process(data[start : start + _BR_STEP])[: limit + 1 - len(out)]
            if len(out) > limit:
                break
        return bytes(out)
    if coding == "zstd":
        dctx = zstandard.ZstdDecompressor(max_window_size=_ZSTD_WINDOW)
        out = bytearray()
        with dctx.stream_reader(data, read_across_frames=True) as reader:
            while len(out) <= limit and (chunk := reader.read(limit + 1 - len(out))):
                out += chunk
        return bytes(out)
    raise _Unsupported(coding)


def _inflate(data: bytes, wbits: int, limit: int) -> bytes:
    out = bytearray()
    while len(out) <= limit:
        decoder = zlib.decompressobj(wbits)
        out += decoder.decompress(data, limit + 1 - len(out))  # max_length > 0 always: 0 means unbounded
        data = decoder.unused_data
        if not (decoder.eof and wbits > 15 and data.startswith(b"\x1f\x8b")):  # concatenated gzip members
            break
    return bytes(out)


def _looks_textual(raw: bytes) -> bool:
    sample = bytes(raw[:512])
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(sample) - 3:  # only a character cut at the sample's edge is forgivable
            return False
        text = sample[: exc.start].decode("utf-8")
    return bool(text) and all(ch.isprintable() or ch in "\t\r\n" for ch in text)
