"""The rotation engine: which key serves the next request, and what an outcome does to a key.

Pure by design: no I/O, no mitmproxy, no clock. Every function takes `now` (epoch seconds) and
returns new records instead of changing the ones it was given, so the store can run it inside a
transaction and the addon can run it in memory with the same result.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from .models import Group, KeyRecord, Outcome, OutcomeKind, PoolSettings, Scope, Strategy, Surface
from .roster import Ranking, Roster

START_HEALTH = 100.0
MAX_HEALTH = 100.0
MIN_HEALTH = 30.0  # one threshold: below it a key is only used when no healthier key is eligible
FRESHNESS_CAP = 20.0  # points, one per idle hour
CURRENT_KEY_BONUS = 50.0
# Health lost in an hour of trouble comes back in an hour or two of rest, so no key is benched
# for good (the reference tool only recovered on a manual command).
HEALTH_RECOVERY_PER_HOUR = 10.0
MANUAL_REFRESH_STEP = 10.0

HEALTH_DELTA: dict[OutcomeKind, float] = {
    OutcomeKind.SUCCESS: +2.0,
    OutcomeKind.RATE_LIMITED: -15.0,
    OutcomeKind.QUOTA_EXHAUSTED: -30.0,
    OutcomeKind.BILLING_LIMITED: -30.0,
    OutcomeKind.MEMBERSHIP: -25.0,
    OutcomeKind.INVALID_KEY: -20.0,
    OutcomeKind.ACCESS_DENIED: -20.0,
}

# Used only when the classifier found no deadline in the response.
DEFAULT_COOLDOWN: dict[OutcomeKind, float] = {
    OutcomeKind.RATE_LIMITED: 60.0,
    OutcomeKind.QUOTA_EXHAUSTED: 6 * 3600.0,
    OutcomeKind.BILLING_LIMITED: 5 * 3600.0,
    OutcomeKind.MEMBERSHIP: 24 * 3600.0,
}
DISABLING = frozenset({OutcomeKind.INVALID_KEY, OutcomeKind.ACCESS_DENIED})

# The best score any key but the current one can reach; a current key above it wins outright,
# which keeps the common health-based pick O(1) however large the pool.
_BEST_OTHER_SCORE = MAX_HEALTH + FRESHNESS_CAP


@dataclass(frozen=True, slots=True)
class Selection:
    key: KeyRecord
    reason: str


@dataclass(frozen=True, slots=True)
class NoEligibleKey:
    """Nothing can serve now. `next_free_at` is when the first cooling key frees (None: never by itself)."""

    total: int
    cooling: int
    disabled: int
    next_free_at: float | None


def health_at(key: KeyRecord, now: float, recover: bool = True) -> float:
    """Health including the time-based recovery since it was last changed."""
    if not recover or key.health >= MAX_HEALTH:
        return min(key.health, MAX_HEALTH)
    idle_h = max(0.0, now - key.health_at) / 3600.0
    return min(MAX_HEALTH, key.health + idle_h * HEALTH_RECOVERY_PER_HOUR)


def _freshness(key: KeyRecord, now: float) -> float:
    last = key.last_used if key.last_used is not None else key.added_at
    return min(FRESHNESS_CAP, max(0.0, now - last) / 3600.0)


def _usable(
    key: KeyRecord, now: float, surface: Surface | None, exclude: Collection[int], full: Collection[Group] = ()
) -> bool:
    """Can serve now: not disabled, not cooling, of the surface, not tried yet, and its account under its caps."""
    return (
        key.disabled_reason is None
        and (key.cooldown_until is None or key.cooldown_until <= now)
        and (surface is None or key.surface == surface)
        and key.id not in exclude
        and (not full or key.limit_group not in full)
    )


def select(
    roster: Roster,
    settings: PoolSettings,
    now: float,
    *,
    surface: Surface | None = None,
    exclude: Collection[int] = (),
    forced: bool = False,
    full: Collection[Group] = (),
    prefer: Sequence[Group] = (),
) -> Selection | NoEligibleKey:
    """Pick the key for the next attempt.

    `exclude` holds keys this request already tried (a request never goes twice to one key);
    `forced` is `rotate`: the current key is left out under every strategy. `full` holds the accounts at
    their caps (admission): their keys are passed over as if cooling. `prefer` lists accounts whose quota
    runs out by itself soon, soonest first: under health-based their healthy keys serve first.
    """
    current = roster.get(settings.current_id(surface))
    if current is not None and surface is not None and current.surface is not surface:
        current = None
    skip: Collection[int] = exclude
    if forced and current is not None:
        skip = {*exclude, current.id}
    if full:  # the ranking's scans know only `skip`: keys of full accounts join it
        skip = {*skip, *(roster.keys[pos].id for group in full for pos in roster.in_group(group))}
    current_ok = current is not None and _usable(current, now, surface, skip)
    recover = settings.auto_refresh_health

    if settings.strategy is Strategy.STICKY:
        if current_ok and current is not None:
            return Selection(current, "sticky")
        ranking = _surface_ranking(roster, surface, recover, now)
        fallback: KeyRecord | None = None  # the first usable key, when none is healthy
        for pos in ranking.in_order(now):
            k = roster.keys[pos]
            if k is current or not _usable(k, now, surface, skip):
                continue
            if health_at(k, now, recover) >= MIN_HEALTH:
                return Selection(k, "sticky-rotation")
            fallback = fallback or k
        return Selection(fallback, "sticky-rotation") if fallback else _nothing(roster, ranking, now, surface, exclude)

    if settings.strategy is Strategy.ROUND_ROBIN:
        if current_ok and current is not None and settings.serve_active_next and current.id == settings.active_key_id:
            return Selection(current, "round-robin")
        start = 0 if current is None else (roster.position_of(current.id) or 0) + 1
        n = len(roster)
        for step in range(min(n, 8)):  # the next key or one soon after usually serves: no ranking needed
            k = roster.keys[(start + step) % n]
            if _usable(k, now, surface, skip):
                return Selection(k, "round-robin")
        ranking = _surface_ranking(roster, surface, recover, now)
        for pos in ranking.in_order(now, start):
            k = roster.keys[pos]
            if _usable(k, now, surface, skip):
                return Selection(k, "round-robin")
        return _nothing(roster, ranking, now, surface, exclude)

    # health-based
    named = current_ok and settings.serve_active_next and current is not None and current.id == settings.active_key_id
    for group in () if named else prefer:  # a key named by use-key or rotate serves first all the same
        expiring = best_in_group(roster, group, now, surface, skip, recover, healthy_only=True)
        if expiring is not None:
            return Selection(expiring, "quota-expiring")
    if current_ok and current is not None and _score(current, now, recover) + CURRENT_KEY_BONUS > _BEST_OTHER_SCORE:
        return Selection(current, "health-sticky")
    ranking = _surface_ranking(roster, surface, recover, now)
    best = _best_scored(roster, ranking, current if current_ok else None, now, surface, skip, recover)
    if best is None:
        return _nothing(roster, ranking, now, surface, exclude)
    return Selection(best, "health-sticky" if best is current else "health-based")


def best_in_group(
    roster: Roster,
    group: Group,
    now: float,
    surface: Surface | None,
    exclude: Collection[int],
    recover: bool,
    healthy_only: bool = False,
    full: Collection[Group] = (),
) -> KeyRecord | None:
    """The best usable key of one account: healthy first, then the higher score, then the lower position."""
    if group in full:
        return None
    best: KeyRecord | None = None
    best_rank = (False, -1.0)
    for pos in roster.in_group(group):
        k = roster.keys[pos]
        if not _usable(k, now, surface, exclude):
            continue
        health = health_at(k, now, recover)
        if healthy_only and health < MIN_HEALTH:
            continue
        rank = (health >= MIN_HEALTH, health + _freshness(k, now))
        if rank > best_rank:
            best, best_rank = k, rank
    return best


def place(
    roster: Roster,
    settings: PoolSettings,
    now: float,
    *,
    surface: Surface,
    loads: Mapping[Group, int],
    exclude: Collection[int] = (),
    full: Collection[Group] = (),
    prefer: Sequence[Group] = (),
) -> Selection | NoEligibleKey:
    """Pick the key for a conversation's first request, under health-based (other strategies use `select`).

    Accounts whose quota runs out soon come first, as in `select`; then the account with the fewest live
    conversations (`loads`), so parallel conversations spread over accounts and each keeps its own; among
    equally loaded accounts, a healthy key before an unhealthy one, then the current key (health-based's
    stickiness), then the better score, then the lower position.
    One pass over the surface's keys: it runs once per conversation, not per request."""
    recover = settings.auto_refresh_health
    for group in prefer:
        expiring = best_in_group(roster, group, now, surface, exclude, recover, healthy_only=True, full=full)
        if expiring is not None:
            return Selection(expiring, "quota-expiring")
    current = settings.current_id(surface)
    best: KeyRecord | None = None
    best_rank: tuple[bool, int, bool, float, int] | None = None
    for pos, k in enumerate(roster.keys):
        if not _usable(k, now, surface, exclude, full):
            continue
        health = health_at(k, now, recover)
        rank = (health >= MIN_HEALTH, -loads.get(k.limit_group, 0), k.id == current, health + _freshness(k, now),
                -pos)
        if best_rank is None or rank > best_rank:
            best, best_rank = k, rank
    if best is None:
        return select(roster, settings, now, surface=surface, exclude=exclude, full=full)
    return Selection(best, "spread")


def _score(key: KeyRecord, now: float, recover: bool) -> float:
    return health_at(key, now, recover) + _freshness(key, now)


def _key_rank(key: KeyRecord, now: float, recover: bool) -> tuple[float, bool]:
    """What a ranking orders a key by, and whether it is at full health.

    At full health the idle bonus is counted from the last use even when that lies after `now` (the key was
    used after the ranking was built): then every full key's score later on is the same rising function of
    this number, so their ranking holds for good, up to the cap on the bonus."""
    health = health_at(key, now, recover)
    if health < MAX_HEALTH:
        return health + _freshness(key, now), False
    last = key.last_used if key.last_used is not None else key.added_at
    return MAX_HEALTH + min(FRESHNESS_CAP, (now - last) / 3600.0), True


_RANKERS = {recover: partial(_key_rank, recover=recover) for recover in (True, False)}


def _surface_ranking(roster: Roster, surface: Surface | None, recover: bool, now: float) -> Ranking:
    return roster.ranking(surface, _RANKERS[recover], now)


def prepare(roster: Roster, settings: PoolSettings, now: float) -> None:
    """Build the roster's rankings for every surface it holds now, so that no request pays for it
    (the pool calls this off the event loop when it loads a new snapshot)."""
    for surface in {k.surface for k in roster.keys}:
        _surface_ranking(roster, surface, settings.auto_refresh_health, now)


# How fast a score can rise, in points a second: the idle bonus's point an hour, plus the health
# recovery (when it is on) below full health. A key's rank when the ranking was built, plus this rate
# times the time since, bounds its score now. The margin absorbs rounding.
_IDLE_SLOPE = 1.0 / 3600.0
_RECOVERY_SLOPE = HEALTH_RECOVERY_PER_HOUR / 3600.0
_BOUND_MARGIN = 1e-6


def _best_scored(
    roster: Roster,
    ranking: Ranking,
    current: KeyRecord | None,
    now: float,
    surface: Surface | None,
    skip: Collection[int],
    recover: bool,
) -> KeyRecord | None:
    """The best usable key: a healthy key beats any unhealthy one, then the higher score, then the
    lower position. Read in this order: the current key (with its bonus), the keys whose cooldown
    ended since the ranking was built, the keys at full health, then the others, each ranking best
    first until no key left in it can win."""
    keys = roster.keys
    best: KeyRecord | None = None
    best_rank = (False, -1.0, 0)  # (healthy, score, -position)

    def rank_of(k: KeyRecord, pos: int, bonus: float = 0.0) -> tuple[bool, float, int]:
        h = health_at(k, now, recover)
        return h >= MIN_HEALTH, h + _freshness(k, now) + bonus, -pos

    def consider(pos: int) -> bool:
        nonlocal best, best_rank
        k = keys[pos]
        if k is current or not _usable(k, now, surface, skip):
            return False
        rank = rank_of(k, pos)
        if rank > best_rank:
            best, best_rank = k, rank
        return True

    def scan(ranked: list[tuple[float, int]], start: int, lift: float, floor: float) -> None:
        i = start
        while i < len(ranked):
            neg_rank, pos = ranked[i]
            bound = max(floor, min(_BEST_OTHER_SCORE, -neg_rank + lift))
            if best is not None and bound < best_rank[1] and (best_rank[0] or bound < MIN_HEALTH):
                return  # nothing from here on can beat the best
            i += 1
            if consider(pos) and -neg_rank >= _BEST_OTHER_SCORE and age >= 0:
                # Keys at the top score when ranked still have it, and this one has the lowest
                # position among them: skip the rest of them.
                i = bisect_right(ranked, (neg_rank, len(keys)), i)

    if current is not None:
        best, best_rank = current, rank_of(current, roster.position_of(current.id) or 0, CURRENT_KEY_BONUS)
    for pos in ranking.expired(now):
        consider(pos)
    age = now - ranking.built_at
    lift = max(0.0, age) * _IDLE_SLOPE + _BOUND_MARGIN

    # Full health: the first usable key is the best of them, unless its bonus is capped (keys ranked
    # lower may have reached the cap too, with a lower position) or nil (keys used after `now` tie it).
    full = ranking.full
    first = next((i for i, (_, pos) in enumerate(full) if consider(pos)), len(full))
    if first < len(full):
        top = keys[full[first][1]]
        if age < 0 or not 0.0 < _freshness(top, now) < FRESHNESS_CAP:
            scan(full, first + 1, lift, MAX_HEALTH)

    if recover:
        lift += max(0.0, age) * _RECOVERY_SLOPE
    scan(ranking.partial, 0, lift, 0.0)
    return best


def _nothing(
    roster: Roster, ranking: Ranking, now: float, surface: Surface | None, exclude: Collection[int]
) -> NoEligibleKey:
    if now < ranking.built_at:  # a clock that stepped back: the ranking's cooling set may not match `now`
        return _nothing_by_scan(roster, now, surface, exclude)
    waiting = ranking.still_cooling(now)
    next_free = next((until for until, pos in waiting if roster.keys[pos].id not in exclude), None)
    return NoEligibleKey(total=ranking.total, cooling=len(waiting), disabled=ranking.disabled, next_free_at=next_free)


def _nothing_by_scan(roster: Roster, now: float, surface: Surface | None, exclude: Collection[int]) -> NoEligibleKey:
    total = cooling = disabled = 0
    next_free: float | None = None
    for k in roster.keys:
        if surface is not None and k.surface != surface:
            continue
        total += 1
        if k.disabled_reason is not None:
            disabled += 1
        elif k.cooldown_until is not None and k.cooldown_until > now:
            cooling += 1
            if k.id not in exclude and (next_free is None or k.cooldown_until < next_free):
                next_free = k.cooldown_until
    return NoEligibleKey(total=total, cooling=cooling, disabled=disabled, next_free_at=next_free)


def current_keys(roster: Roster, settings: PoolSettings, now: float) -> dict[Surface, KeyRecord]:
    """The key each surface is on, as `list-keys` marks it: the surface's current key, or, before its first
    request, the key that request would go to (a fresh pool is on that key, not on none)."""
    out: dict[Surface, KeyRecord] = {}
    for surface in dict.fromkeys(k.surface for k in roster.keys):
        current = roster.get(settings.current_id(surface))
        if current is not None and current.surface is surface:
            out[surface] = current
            continue
        pick = select(roster, settings, now, surface=surface)
        if isinstance(pick, Selection):
            out[surface] = pick.key
    return out


def after_selection(settings: PoolSettings, selection: Selection) -> PoolSettings:
    """The settings once `selection` has been served: it becomes the current key of its surface."""
    key = selection.key
    waiting_on = [s for s, i in settings.current_by_surface.items() if i == settings.active_key_id]
    if settings.serve_active_next and settings.active_key_id != key.id and key.surface not in waiting_on and waiting_on:
        # The key use-key/rotate picked waits for the next request of its own surface.
        if settings.current_by_surface.get(key.surface) == key.id:
            return settings
        by_surface = {**settings.current_by_surface, key.surface: key.id}
        return replace(settings, current_by_surface=by_surface)
    if settings.active_key_id == key.id and not settings.serve_active_next and settings.is_current(key):
        return settings
    return settings.with_current(key)


def apply_outcome(
    roster: Roster, key_id: int, outcome: Outcome, now: float, recover: bool = True
) -> list[KeyRecord]:
    """The records changed by one attempt's outcome: the key itself, plus its account's keys
    for an account-scope cooldown or ban. Unknown ids change nothing."""
    key = roster.get(key_id)
    if key is None:
        return []
    kind = outcome.kind
    update: dict[str, Any] = {
        "last_used": now,
        "total_requests": key.total_requests + 1,
        "health": max(0.0, min(MAX_HEALTH, health_at(key, now, recover) + HEALTH_DELTA.get(kind, 0.0))),
        "health_at": now,
    }
    if kind is OutcomeKind.SUCCESS:
        update["successful_requests"] = key.successful_requests + 1
        if outcome.latency_ms is not None:
            ms = outcome.latency_ms
            update["latency_count"] = key.latency_count + 1
            update["latency_sum_ms"] = key.latency_sum_ms + ms
            update["latency_min_ms"] = ms if key.latency_min_ms is None else min(key.latency_min_ms, ms)
            update["latency_max_ms"] = ms if key.latency_max_ms is None else max(key.latency_max_ms, ms)
    elif kind is OutcomeKind.RATE_LIMITED:
        update["rate_limited_requests"] = key.rate_limited_requests + 1
    else:
        update["failed_requests"] = key.failed_requests + 1
    if outcome.account_hint and not key.account:
        update["account"] = outcome.account_hint
    changed = replace(key, **update)

    penalty = _penalty(changed, outcome, now)
    if not penalty:
        return [changed]
    targets = [changed]
    if outcome.scope is Scope.ACCOUNT and changed.account_group is not None:
        group = changed.account_group
        targets += [k for k in roster.keys if k.id != key_id and k.account_group == group]
    return [replace(k, **penalty(k)) for k in targets]


_Penalty = Callable[[KeyRecord], dict[str, Any]]


def _penalty(key: KeyRecord, outcome: Outcome, now: float) -> _Penalty | None:
    kind = outcome.kind
    reason = outcome.reason or kind.value
    if kind in DISABLING:
        return lambda k: {} if k.disabled_reason else {"disabled_reason": reason}
    default = DEFAULT_COOLDOWN.get(kind)
    if default is None:
        return None
    until = outcome.until if outcome.until is not None else now + default
    return lambda k: cooldown_update(k, until, reason)


def cooldown_update(key: KeyRecord, until: float, reason: str) -> dict[str, Any]:
    """Max semantics: a new cooldown never shortens a longer one already running."""
    if key.cooldown_until is not None and key.cooldown_until >= until:
        return {}
    return {"cooldown_until": until, "cooldown_reason": reason}


def clear_limits(key: KeyRecord) -> KeyRecord:
    return replace(key, cooldown_until=None, cooldown_reason=None)


def refresh_health(
    keys: Sequence[KeyRecord], now: float, cooldown_minutes: int, recover: bool = True
) -> list[tuple[KeyRecord, KeyRecord]]:
    """The manual `refresh-health`: +10 for keys below 100 whose last cooldown ended at least
    `cooldown_minutes` ago (or that never cooled). Returns (before, after) pairs."""
    out = []
    for k in keys:
        h = health_at(k, now, recover)
        if h >= MAX_HEALTH or k.disabled_reason is not None:
            continue
        if k.cooldown_until is not None and now - k.cooldown_until < cooldown_minutes * 60:
            continue
        after = replace(k, health=min(MAX_HEALTH, h + MANUAL_REFRESH_STEP), health_at=now)
        out.append((k, after))
    return out
