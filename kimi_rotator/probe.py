"""Zero-token probes: what Kimi says about a key without spending a model token.

An Open Platform key is asked `GET /v1/users/me/balance`, a Kimi Code key `GET /coding/v1/usages` (its plan's
windows); where that endpoint is missing (404) or its answer cannot be read, `GET …/models` still tells whether the
key works. Probes go out through the proxy's own client (upstream.py) with kimi-rotate's own User-Agent: they are
kimi-rotate's requests, not a client's, and claim to be nothing else.

The parsers and `updates` (what a probe's result does to the keys) are pure: no I/O, no clock. `probe_key` and
`probe_keys` do the asking; the store and the proxy's quota watch record what they learn.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from . import __version__, engine
from .classify import BILLING_DEFAULT, QUOTA_DEFAULT, classify, classify_connection_error, decode_body
from .models import Group, KeyRecord, Outcome, OutcomeKind, Quota, QuotaWindow, Scope, Surface
from .routing import DEFAULT_HOSTS, with_credential

if TYPE_CHECKING:
    from .upstream import UpstreamClient

PROBE_HOSTS: dict[Surface, str] = {surface: host for host, surface in DEFAULT_HOSTS.items()}
QUOTA_PATHS: dict[Surface, str] = {
    Surface.MOONSHOT_CN: "/v1/users/me/balance",
    Surface.MOONSHOT_AI: "/v1/users/me/balance",
    Surface.KIMI_CODE: "/coding/v1/usages",
}
MODELS_PATHS: dict[Surface, str] = {
    Surface.MOONSHOT_CN: "/v1/models",
    Surface.MOONSHOT_AI: "/v1/models",
    Surface.KIMI_CODE: "/coding/v1/models",
}
USER_AGENT = f"kimi-rotate/{__version__} (key check)"
BODY_LIMIT = 64 << 10  # probe answers are small; a larger one is not what was asked for
CONCURRENCY = 4  # accounts probed at once (keys of one account are probed one after the other)
QUOTA_REASON = "quota:"  # the start of every reason a probe gives a cooldown
PROBE_MARK = " (probe)"  # the end of a reason a probe gives a disabled key


# -- parsers (pure) ---------------------------------------------------------------------------------------------------


def parse_balance(body: bytes, now: float) -> Quota | None:
    """`/v1/users/me/balance`'s answer as a Quota with the available balance (None: not such an answer)."""
    data = _object(_json(body).get("data"))
    balance = _number(data.get("available_balance"))
    return None if balance is None else Quota(checked_at=now, balance=balance)


def parse_usages(body: bytes, now: float) -> Quota | None:
    """`/coding/v1/usages`'s answer as a Quota: the top-level `usage` is the weekly quota, each `limits[]` entry a
    rolling window named from its length ("5h"). Numbers come as decimal strings, resets as ISO-8601 UTC.
    None: no window could be read."""
    doc = _json(body)
    windows: list[QuotaWindow] = []
    weekly = _window("weekly", _object(doc.get("usage")))
    if weekly is not None:
        windows.append(weekly)
    limits = doc.get("limits")
    for entry in limits if isinstance(limits, list) else ():
        entry = _object(entry)
        span = _object(entry.get("window"))
        found = _window(window_name(span.get("duration"), span.get("timeUnit")), _object(entry.get("detail")))
        if found is not None:
            windows.append(found)
    if not windows:
        return None
    level = _object(_object(doc.get("user")).get("membership")).get("level")
    return Quota(checked_at=now, windows=tuple(windows), level=level if isinstance(level, str) and level else None)


_UNIT_SECONDS = {"TIME_UNIT_SECOND": 1, "TIME_UNIT_MINUTE": 60, "TIME_UNIT_HOUR": 3600, "TIME_UNIT_DAY": 86400}


def window_name(duration: object, unit: object) -> str:
    """A rolling window's name from its length: 300 minutes is "5h", 7 days "7d"; "window" when unreadable."""
    amount = _number(duration)
    scale = _UNIT_SECONDS.get(unit if isinstance(unit, str) else "", 60)  # Kimi has only sent minutes
    if amount is None or amount <= 0:
        return "window"
    seconds = round(amount * scale)
    for size, suffix in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds % size == 0:
            return f"{seconds // size}{suffix}"
    return f"{seconds}s"


def _window(name: str, detail: dict[str, Any]) -> QuotaWindow | None:
    limit = _number(detail.get("limit"))
    remaining = _number(detail.get("remaining"))
    used = _number(detail.get("used"))
    if remaining is None and limit is not None and used is not None:
        remaining = max(0.0, limit - used)
    if remaining is None:
        return None
    return QuotaWindow(name=name, limit=limit, remaining=remaining, reset_at=_epoch(detail.get("resetTime")))


def _json(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body[:BODY_LIMIT].decode("utf-8", errors="replace"))
    except (ValueError, RecursionError):
        return {}
    return _object(doc)


def _object(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: object) -> float | None:
    """A finite number, given as a JSON number or a decimal string ("85", "49.58894")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str) and 0 < len(value.strip()) <= 40:
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _epoch(value: object) -> float | None:
    """An ISO-8601 time ("2026-01-16T03:00:00Z", offsets and fractions allowed; none means UTC) as epoch seconds."""
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


# -- what a probe found ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeResult:
    """What one probe of one key found.

    `valid`: True when Kimi knew the key (it answered, or said the account is out of quota or rate limited), False
    when it refused the key (401, 402, 403, 404...), None when nobody could tell (no connection, a 5xx, Kimi's
    client gate). `status` is one line for people: "200", "401 invalid_authentication_error", or why no answer came
    (never a key or a body). `outcome` is what to record; its account_hint is the account Kimi named (Msh-Uid,
    Msh-Org-Id), if any."""

    key_id: int
    valid: bool | None
    status: str
    outcome: Outcome
    quota: Quota | None = None
    path: str = ""  # the probe that answered last

    @property
    def account_hint(self) -> str | None:
        return self.outcome.account_hint


_UNKNOWN = frozenset({OutcomeKind.SERVER_ERROR, OutcomeKind.CLIENT_REJECTED})
_KNOWN_KEY = frozenset({OutcomeKind.SUCCESS, OutcomeKind.BILLING_LIMITED, OutcomeKind.QUOTA_EXHAUSTED,
                        OutcomeKind.RATE_LIMITED})


def _validity(kind: OutcomeKind) -> bool | None:
    return None if kind in _UNKNOWN else kind in _KNOWN_KEY


def quota_outcome(quota: Quota, hint: str | None) -> Outcome:
    """What a readable quota means: a window used up cools the account until that window's reset (the earliest, if
    several are), a balance at or below zero cools it until a top-up is seen; anything else is a success."""
    used_up = [w.name for w in quota.windows if w.remaining <= 0]
    if used_up:
        return Outcome(kind=OutcomeKind.BILLING_LIMITED, scope=Scope.ACCOUNT, until=quota.exhausted_until(),
                       reason=f"{QUOTA_REASON} {', '.join(used_up)} used up", account_hint=hint)
    if quota.balance is not None and quota.balance <= 0:
        return Outcome(kind=OutcomeKind.QUOTA_EXHAUSTED, scope=Scope.ACCOUNT,
                       reason=f"{QUOTA_REASON} balance {quota.balance:g}", account_hint=hint)
    return Outcome(kind=OutcomeKind.SUCCESS, reason="200", account_hint=hint)


def _parse(surface: Surface, body: bytes, now: float) -> Quota | None:
    return parse_usages(body, now) if surface is Surface.KIMI_CODE else parse_balance(body, now)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__


async def probe_key(client: UpstreamClient, key: KeyRecord, now: Callable[[], float]) -> ProbeResult:
    """Ask Kimi about one key: its quota endpoint, then (404, or an answer that is no quota) its models list."""
    from .upstream import UpstreamError

    host = PROBE_HOSTS[key.surface]
    paths = (QUOTA_PATHS[key.surface], MODELS_PATHS[key.surface])
    for path in paths:
        headers = with_credential([(b"user-agent", USER_AGENT.encode()), (b"accept", b"application/json")],
                                  key.secret.get_secret_value(), path)
        try:
            response = await client.send("GET", host, path, headers, b"")
            try:
                raw = await response.read(limit=BODY_LIMIT)
            finally:
                await response.aclose()
        except UpstreamError as e:
            outcome = classify_connection_error(type(e).__name__).outcome
            return ProbeResult(key_id=key.id, valid=None, status=_one_line(e), outcome=outcome, path=path)
        at = now()
        body = decode_body(raw, response.header("content-encoding"), BODY_LIMIT)
        pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers]
        verdict = classify(response.status, pairs, body, at)
        outcome = verdict.outcome
        if 200 <= response.status < 300:
            quota = _parse(key.surface, body, at) if path == paths[0] else None
            if quota is None and path == paths[0]:
                continue  # an answer, but not the one asked for: the models list still says if the key works
            if quota is not None:
                outcome = quota_outcome(quota, outcome.account_hint)
            return ProbeResult(key_id=key.id, valid=True, status=str(response.status), outcome=outcome,
                               quota=quota, path=path)
        if response.status == 404 and path == paths[0]:
            continue  # no such endpoint here (Moonshot calls /usages experimental)
        return ProbeResult(key_id=key.id, valid=_validity(outcome.kind), status=outcome.reason or str(response.status),
                           outcome=outcome, path=path)
    raise AssertionError("unreachable: the models probe always returns")


async def probe_keys(
    client: UpstreamClient,
    keys: Sequence[KeyRecord],
    now: Callable[[], float],
    concurrency: int = CONCURRENCY,
    on_result: Callable[[ProbeResult], None] | None = None,
) -> list[ProbeResult]:
    """Probe every key, `concurrency` accounts at a time; the keys of one account go one after another, since the
    account's rate limit (3 a minute on Tier 0) covers them all. Results come in the order of `keys`;
    `on_result` hears of each as it arrives (a progress bar)."""
    groups: dict[Group, list[KeyRecord]] = {}
    for k in keys:
        groups.setdefault(k.limit_group, []).append(k)
    gate = asyncio.Semaphore(max(1, concurrency))
    found: dict[int, ProbeResult] = {}

    async def probe_group(members: list[KeyRecord]) -> None:
        async with gate:
            for k in members:
                result = await probe_key(client, k, now)
                found[k.id] = result
                if on_result is not None:
                    on_result(result)

    await asyncio.gather(*(probe_group(members) for members in groups.values()))
    return [found[k.id] for k in keys]


# -- what a result does to the keys (pure) ----------------------------------------------------------------------------

# Error types in the reasons the classifier gives the cooldowns a used-up quota causes ("403 permission_error" is
# Kimi Code's billing-cycle answer: a permission_error without that text cools nothing).
_QUOTA_TYPES = ("permission_error", "exceeded_current_quota_error")


def is_quota_cooldown(reason: str | None, surface: Surface, replaces: str | None = None) -> bool:
    """Whether a cooldown with this reason is one a fresh quota decides: one a probe set, one the classifier set
    for a used-up quota (or `replaces`, the reason of the answer that asked for the probe), or, on Kimi Code, a 402
    membership cooldown (a /usages answer shows the membership works)."""
    if not reason:
        return False
    if reason.startswith(QUOTA_REASON) or reason == replaces:
        return True
    status, _, etype = reason.partition(" ")
    return etype in _QUOTA_TYPES or (surface is Surface.KIMI_CODE and status == "402")


def updates(keys: Sequence[KeyRecord], result: ProbeResult, now: float, replaces: str | None = None) -> list[KeyRecord]:
    """The records a probe's result changes, among `keys` (the probed key and the keys of its account).

    The probed key takes the account Kimi named if it has none. A refused key (401) is disabled, an account Kimi
    refuses (403 access) has every key disabled. A used-up quota cools the account until the reset Kimi reported:
    cooldowns a quota decides (`is_quota_cooldown`) end exactly then, even when that is sooner than the guess
    they had; others are only lengthened. A quota shown back (a top-up, a new window) ends the cooldowns a quota
    decides. Other answers (a 429, a 402) cool as a request's answer would; probes count as no request."""
    by_id = {k.id: k for k in keys}
    key = by_id.get(result.key_id)
    if key is None:
        return []
    outcome = result.outcome
    probed = key
    if outcome.account_hint and not key.account:
        probed = replace(key, account=outcome.account_hint)
    group = probed.account_group
    family = [probed, *(k for k in keys if k.id != key.id and group is not None and k.account_group == group)]
    targets = family if outcome.scope is Scope.ACCOUNT else [probed]
    kind = outcome.kind
    changed: list[KeyRecord] = []
    if kind in engine.DISABLING:
        reason = (outcome.reason or kind.value) + PROBE_MARK
        changed = [k if k.disabled_reason else replace(k, disabled_reason=reason) for k in targets]
    elif result.quota is not None and kind in (OutcomeKind.BILLING_LIMITED, OutcomeKind.QUOTA_EXHAUSTED):
        default = BILLING_DEFAULT if kind is OutcomeKind.BILLING_LIMITED else QUOTA_DEFAULT
        until = outcome.until if outcome.until is not None and outcome.until > now else now + default
        for k in targets:
            if is_quota_cooldown(k.cooldown_reason, k.surface, replaces):
                changed.append(replace(k, cooldown_until=until, cooldown_reason=outcome.reason))
            else:
                changed.append(replace(k, **engine.cooldown_update(k, until, outcome.reason)))
    elif result.quota is not None and kind is OutcomeKind.SUCCESS:
        changed = [engine.clear_limits(k) if k.cooldown_until is not None and k.cooldown_until > now
                   and is_quota_cooldown(k.cooldown_reason, k.surface, replaces) else k for k in family]
    elif kind in engine.DEFAULT_COOLDOWN:
        until = outcome.until if outcome.until is not None else now + engine.DEFAULT_COOLDOWN[kind]
        changed = [replace(k, **engine.cooldown_update(k, until, outcome.reason or kind.value)) for k in targets]
    out = {k.id: k for k in [probed, *changed] if k != by_id[k.id]}
    return list(out.values())
