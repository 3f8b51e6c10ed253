"""The rotation engine: opencode-kimi-rotator's behaviour where we keep it (its selections for each strategy,
measured on v1.2.10), the deliberate improvements on it, and hypothesis properties.

Vectors use the reference's default set-up: keys k0..k2 at index 0..2, health 100, last used "now", current key k0,
health-based. Key ids are 101, 102, ... on purpose, so that nothing works by confusing an id with an index.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimi_rotator import engine
from kimi_rotator.engine import NoEligibleKey, Selection
from kimi_rotator.models import (
    KeyRecord,
    KeyState,
    Outcome,
    OutcomeKind,
    PoolSettings,
    Scope,
    Secret,
    Strategy,
    Surface,
)
from kimi_rotator.roster import Roster

NOW = 1_750_000_000.0
HOUR = 3600.0
HB, RR, STICKY = Strategy.HEALTH_BASED, Strategy.ROUND_ROBIN, Strategy.STICKY
SUCCESS = Outcome(kind=OutcomeKind.SUCCESS)


# -- helpers -------------------------------------------------------------------------------------------------------


def kid(i: int) -> int:
    """The id of the key at index i in `pool()`."""
    return 101 + i


def make_key(i: int, **changes: Any) -> KeyRecord:
    fields: dict[str, Any] = {
        "id": kid(i),
        "secret": Secret(f"sk-kimi-test{kid(i):020d}"),
        "fingerprint": f"fp{kid(i)}",
        "name": f"k{i}",
        "surface": Surface.KIMI_CODE,
        "added_at": NOW,
        "last_used": NOW,
        "health": 100.0,
        "health_at": NOW,
    }
    fields.update(changes)
    return KeyRecord(**fields)


def pool(n: int = 3, **changes: dict[str, Any]) -> Roster:
    """n keys; `k1={"health": 0}` changes key 1."""
    return Roster(make_key(i, **changes.get(f"k{i}", {})) for i in range(n))


def conf(strategy: Strategy = HB, active: int | None = 0, **changes: Any) -> PoolSettings:
    return PoolSettings(strategy=strategy, active_key_id=None if active is None else kid(active), **changes)


def index(roster: Roster, result: Selection | NoEligibleKey) -> int:
    assert isinstance(result, Selection), result
    i = roster.position_of(result.key.id)
    assert i is not None
    return i


def serve(
    roster: Roster, settings: PoolSettings, n: int, now: float = NOW
) -> tuple[list[int], list[str], Roster, PoolSettings]:
    """n requests as the addon serves them: select, make the pick current, record a success."""
    picks: list[int] = []
    reasons: list[str] = []
    for _ in range(n):
        result = engine.select(roster, settings, now)
        picks.append(index(roster, result))
        assert isinstance(result, Selection)
        reasons.append(result.reason)
        settings = engine.after_selection(settings, result)
        roster = roster.with_updates(
            engine.apply_outcome(roster, result.key.id, SUCCESS, now, settings.auto_refresh_health)
        )
    return picks, reasons, roster, settings


def apply(roster: Roster, i: int, outcome: Outcome, now: float = NOW) -> Roster:
    return roster.with_updates(engine.apply_outcome(roster, kid(i), outcome, now))


def rate_limited(until: float | None = None, scope: Scope = Scope.KEY, reason: str = "") -> Outcome:
    return Outcome(kind=OutcomeKind.RATE_LIMITED, until=until, scope=scope, reason=reason)


# -- "keep" vectors ------------------------------------------------------------------------------------------------


def test_v1_round_robin_cycles() -> None:
    picks, reasons, _, _ = serve(pool(), conf(RR), 5)
    assert picks == [1, 2, 0, 1, 2]
    assert set(reasons) == {"round-robin"}


def test_v3_round_robin_skips_a_rate_limited_key() -> None:
    picks, _, _, _ = serve(pool(k1={"cooldown_until": NOW + 60}), conf(RR), 4)
    assert picks == [2, 0, 2, 0]


def test_v5_round_robin_ignores_health_but_skips_disabled_keys() -> None:
    picks, _, _, _ = serve(pool(k1={"health": 0.0}), conf(RR), 3)
    assert picks == [1, 2, 0]
    picks, _, _, _ = serve(pool(k1={"disabled_reason": "invalid key (401)"}), conf(RR), 3)
    assert picks == [2, 0, 2]


def test_v6_health_based_stays_on_the_current_key() -> None:
    picks, reasons, _, _ = serve(pool(), conf(HB), 3)
    assert picks == [0, 0, 0]
    assert reasons == ["health-sticky"] * 3


def test_v8_health_based_moves_off_a_limited_key_then_sticks() -> None:
    picks, reasons, _, settings = serve(pool(k0={"cooldown_until": NOW + 60}), conf(HB), 3)
    assert picks == [1, 1, 1]
    assert reasons == ["health-based", "health-sticky", "health-sticky"]
    assert settings.active_key_id == kid(1)


@pytest.mark.parametrize("health", [30.0, 29.0])
def test_v9_health_based_threshold(health: float) -> None:
    # 30 is a candidate but 30 + 50 = 80 < 100; 29 is not a candidate at all.
    roster = pool(k0={"health": health})
    result = engine.select(roster, conf(HB), NOW)
    assert index(roster, result) == 1
    assert isinstance(result, Selection) and result.reason == "health-based"


def test_reference_constants() -> None:
    assert (engine.START_HEALTH, engine.MIN_HEALTH, engine.FRESHNESS_CAP, engine.CURRENT_KEY_BONUS) == (100, 30, 20, 50)
    assert engine.HEALTH_DELTA[OutcomeKind.SUCCESS] == 2
    assert engine.HEALTH_DELTA[OutcomeKind.RATE_LIMITED] == -15
    assert engine.DEFAULT_COOLDOWN[OutcomeKind.RATE_LIMITED] == 60
    assert engine.DEFAULT_COOLDOWN[OutcomeKind.MEMBERSHIP] == 24 * HOUR


def test_current_key_bonus_is_fifty() -> None:
    roster = pool(k0={"health": 55.0})  # 55 + 50 = 105 > 100
    assert index(roster, engine.select(roster, conf(HB), NOW)) == 0
    roster = pool(k0={"health": 49.0})  # 99 < 100
    assert index(roster, engine.select(roster, conf(HB), NOW)) == 1


def test_one_threshold_of_thirty_beats_any_score() -> None:
    roster = pool(
        k0={"cooldown_until": NOW + 60},
        k1={"health": 29.0, "last_used": NOW - 20 * HOUR},  # 49, but below 30
        k2={"health": 30.0},  # 30
    )
    assert index(roster, engine.select(roster, conf(HB), NOW)) == 2


def test_current_key_tie_at_the_top_score_goes_to_the_lowest_index() -> None:
    # k1 (current) 70 + 0 + 50 = 120 ties k0 100 + 20 = 120: the quick path for the current key must not win it.
    roster = pool(k0={"last_used": NOW - 30 * HOUR}, k1={"health": 70.0})
    assert index(roster, engine.select(roster, conf(HB, active=1), NOW)) == 0
    roster = pool(k0={"last_used": NOW - 30 * HOUR}, k1={"health": 70.5})
    assert index(roster, engine.select(roster, conf(HB, active=1), NOW)) == 1


def test_v10_health_based_freshness_bonus() -> None:
    roster = pool(
        k0={"health": 20.0},
        k1={"health": 95.0, "last_used": NOW - 2 * HOUR},  # 97
        k2={"health": 90.0, "last_used": NOW - 10 * HOUR},  # 100
    )
    assert index(roster, engine.select(roster, conf(HB), NOW)) == 2


@pytest.mark.parametrize(
    ("k1_idle_h", "k1_health", "k2_health", "expected"),
    [
        (5, 80.0, 90.0, 2),  # 85 < 90
        (15, 80.0, 90.0, 1),  # 95 > 90
        (100, 60.0, 85.0, 2),  # freshness capped at 20: 80 < 85
        (0, 90.0, 90.0, 1),  # tie -> lowest index
    ],
)
def test_reference_health_based_scoring_examples(
    k1_idle_h: float, k1_health: float, k2_health: float, expected: int
) -> None:
    # The reference's own health-based scoring examples (k0 limited).
    roster = pool(
        k0={"cooldown_until": NOW + 60},
        k1={"health": k1_health, "last_used": NOW - k1_idle_h * HOUR},
        k2={"health": k2_health},
    )
    assert index(roster, engine.select(roster, conf(HB), NOW)) == expected


def test_v12_sticky_keeps_the_current_key_then_takes_the_lowest_index() -> None:
    picks, reasons, roster, settings = serve(pool(), conf(STICKY, active=1), 2)
    assert picks == [1, 1]
    assert reasons == ["sticky", "sticky"]
    roster = apply(roster, 1, rate_limited(NOW + 60))
    picks, reasons, _, _ = serve(roster, settings, 2)
    assert picks == [0, 0]
    assert reasons == ["sticky-rotation", "sticky"]


def test_v13_sticky_forced_rotation_takes_the_lowest_index() -> None:
    roster = pool()
    result = engine.select(roster, conf(STICKY, active=2), NOW, forced=True)
    assert index(roster, result) == 0
    assert isinstance(result, Selection) and result.reason == "sticky-rotation"


def test_v14_sticky_keeps_an_unhealthy_current_key() -> None:
    picks, reasons, _, _ = serve(pool(k0={"health": 0.0}), conf(STICKY), 2)
    assert picks == [0, 0]
    assert reasons == ["sticky", "sticky"]


def test_sticky_rotation_prefers_healthy_keys_but_takes_any_when_none_is() -> None:
    roster = pool(k0={"health": 10.0}, k1={"cooldown_until": NOW + 60})
    assert index(roster, engine.select(roster, conf(STICKY, active=1), NOW)) == 2
    roster = pool(k0={"health": 10.0}, k1={"cooldown_until": NOW + 60}, k2={"health": 5.0})
    assert index(roster, engine.select(roster, conf(STICKY, active=1), NOW)) == 0


def test_v17_manual_refresh_health() -> None:
    keys = [
        make_key(0, health=50.0),  # never limited
        make_key(1, health=50.0, cooldown_until=NOW - 10 * 60),  # limit ended 10 min ago
        make_key(2, health=50.0, cooldown_until=NOW - 31 * 60),  # 31 min ago
        make_key(3, health=95.0),
        make_key(4, health=100.0),
        make_key(5, health=50.0, disabled_reason="revoked"),
        make_key(6, health=50.0, cooldown_until=NOW + 60),  # still cooling
    ]
    pairs = engine.refresh_health(keys, NOW, cooldown_minutes=30)
    assert [(before.name, before.health, after.health) for before, after in pairs] == [
        ("k0", 50.0, 60.0),
        ("k2", 50.0, 60.0),
        ("k3", 95.0, 100.0),
    ]
    assert all(after.health_at == NOW for _, after in pairs)


def test_v18_rate_limit_then_success_accounting() -> None:
    roster, settings = pool(), conf(HB)
    first = engine.select(roster, settings, NOW)
    assert index(roster, first) == 0
    assert isinstance(first, Selection)
    settings = engine.after_selection(settings, first)
    roster = apply(roster, 0, rate_limited(NOW + 30, reason="retry-after 30"))
    second = engine.select(roster, settings, NOW, exclude={kid(0)})
    assert index(roster, second) == 1
    assert isinstance(second, Selection)
    settings = engine.after_selection(settings, second)
    roster = apply(roster, 1, Outcome(kind=OutcomeKind.SUCCESS, latency_ms=120.0))

    k0, k1 = roster.keys[0], roster.keys[1]
    assert (k0.health, k0.cooldown_until, k0.cooldown_reason) == (85.0, NOW + 30, "retry-after 30")
    assert (k0.total_requests, k0.successful_requests, k0.rate_limited_requests, k0.failed_requests) == (1, 0, 1, 0)
    assert k0.state_at(NOW) is KeyState.COOLING
    assert (k1.health, k1.total_requests, k1.successful_requests, k1.latency_count) == (100.0, 1, 1, 1)
    assert settings.active_key_id == kid(1)


# -- "improve" vectors ---------------------------------------------------------------------------------------------


def test_v2_round_robin_use_key_serves_that_key_next() -> None:
    picks, _, _, settings = serve(pool(), conf(RR, active=1, serve_active_next=True), 3)
    assert picks == [1, 2, 0]
    assert settings.serve_active_next is False


def test_v4_all_limited_reports_the_first_free_time_and_changes_nothing() -> None:
    roster = pool(k0={"cooldown_until": NOW + 90}, k1={"cooldown_until": NOW + 30}, k2={"cooldown_until": NOW + 60})
    before = list(roster.keys)
    for _ in range(2):
        result = engine.select(roster, conf(RR), NOW)
        assert result == NoEligibleKey(total=3, cooling=3, disabled=0, next_free_at=NOW + 30)
    assert roster.keys == before  # nothing was sent, nothing counted


def test_v7_forced_rotate_excludes_the_current_key_without_bonus() -> None:
    roster = pool()
    result = engine.select(roster, conf(HB), NOW, forced=True)
    assert index(roster, result) == 1
    assert isinstance(result, Selection) and result.reason == "health-based"
    # The store makes the pick current and serves it next; a second rotate moves on again.
    settings = conf(HB, active=1, serve_active_next=True)
    assert index(roster, engine.select(roster, settings, NOW)) == 1
    assert index(roster, engine.select(roster, settings, NOW, forced=True)) != 1


@pytest.mark.parametrize("strategy", list(Strategy))
@pytest.mark.parametrize("active", [0, 1, 2])
def test_rotate_moves_to_another_key_under_every_strategy(strategy: Strategy, active: int) -> None:
    roster = pool()
    for serve_next in (False, True):
        result = engine.select(roster, conf(strategy, active=active, serve_active_next=serve_next), NOW, forced=True)
        assert index(roster, result) != active


def test_rotate_with_no_other_eligible_key_says_so() -> None:
    roster = pool(2, k1={"cooldown_until": NOW + 60})
    for strategy in Strategy:
        result = engine.select(roster, conf(strategy), NOW, forced=True)
        assert isinstance(result, NoEligibleKey)
        assert result.next_free_at == NOW + 60


def test_v11_no_healthy_key_still_picks_the_best_and_counts_it() -> None:
    roster = pool(k0={"health": 10.0}, k1={"health": 10.0}, k2={"health": 10.0})
    picks, _, after, _ = serve(roster, conf(HB), 1)
    assert picks == [0]  # current-key bonus
    assert after.keys[0].total_requests == 1
    roster = pool(k0={"health": 10.0}, k1={"health": 25.0}, k2={"health": 5.0})
    assert index(roster, engine.select(roster, conf(HB, active=None), NOW)) == 1
    # ... and health comes back with time: two hours later every key is a candidate again.
    assert all(engine.health_at(k, NOW + 2 * HOUR) >= engine.MIN_HEALTH for k in roster.keys[:2])


@pytest.mark.parametrize("strategy", list(Strategy))
def test_v15_single_rate_limited_key_is_not_used(strategy: Strategy) -> None:
    roster = pool(1, k0={"cooldown_until": NOW + 45})
    assert engine.select(roster, conf(strategy), NOW) == NoEligibleKey(
        total=1, cooling=1, disabled=0, next_free_at=NOW + 45
    )


def test_v20_account_cooldown_skips_the_accounts_other_keys() -> None:
    roster = pool(k0={"account": "acct-a"}, k1={"account": "acct-a"}, k2={"account": "acct-b"})
    roster = apply(roster, 0, rate_limited(NOW + 300, scope=Scope.ACCOUNT, reason="account limit"))
    assert [k.cooldown_until for k in roster.keys] == [NOW + 300, NOW + 300, None]
    assert roster.keys[1].cooldown_reason == "account limit"
    result = engine.select(roster, conf(HB), NOW, exclude={kid(0)})
    assert index(roster, result) == 2
    # k2 fails too: nothing left, and the answer names the earliest end.
    roster = apply(roster, 2, rate_limited(NOW + 600))
    result = engine.select(roster, conf(HB), NOW, exclude={kid(0), kid(2)})
    assert result == NoEligibleKey(total=3, cooling=3, disabled=0, next_free_at=NOW + 300)


def test_v32_a_request_never_goes_twice_to_one_key() -> None:
    roster = apply(pool(), 0, rate_limited(until=NOW))  # "retry-after: 0": free again at once
    assert index(roster, engine.select(roster, conf(HB), NOW)) == 0
    for strategy in Strategy:
        assert index(roster, engine.select(roster, conf(strategy), NOW, exclude={kid(0)})) != 0
    assert engine.select(roster, conf(HB), NOW, exclude={kid(0), kid(1), kid(2)}) == NoEligibleKey(
        total=3, cooling=0, disabled=0, next_free_at=None
    )


def test_no_eligible_key_next_free_ignores_keys_already_tried() -> None:
    roster = pool(k0={"cooldown_until": NOW + 10}, k1={"cooldown_until": NOW + 50}, k2={"disabled_reason": "x"})
    result = engine.select(roster, conf(HB), NOW, exclude={kid(0)})
    assert result == NoEligibleKey(total=3, cooling=2, disabled=1, next_free_at=NOW + 50)


@pytest.mark.parametrize("strategy", list(Strategy))
def test_v35_keys_are_named_by_id_and_a_stale_active_id_is_harmless(strategy: Strategy) -> None:
    roster = pool(2)
    result = engine.select(roster, PoolSettings(strategy=strategy, active_key_id=5), NOW)
    assert index(roster, result) == 0
    # Removing k0 does not change which key is current (the reference's activeIndex silently moved).
    shrunk = Roster(pool(3).keys[1:])
    result = engine.select(shrunk, conf(strategy, active=2), NOW)
    assert isinstance(result, Selection)
    if strategy is not RR:
        assert result.key.id == kid(2)
    else:
        assert result.key.id == kid(1)  # the one after k2, wrapping


# -- cooldowns, accounts, disabled keys, surfaces -------------------------------------------------------------------


def test_cooldowns_have_max_semantics_and_a_reason() -> None:
    roster = apply(pool(), 0, rate_limited(NOW + 600, reason="long"))
    roster = apply(roster, 0, rate_limited(NOW + 60, reason="short"))
    assert (roster.keys[0].cooldown_until, roster.keys[0].cooldown_reason) == (NOW + 600, "long")
    roster = apply(roster, 0, Outcome(kind=OutcomeKind.QUOTA_EXHAUSTED, until=NOW + 7200, reason="weekly quota"))
    assert (roster.keys[0].cooldown_until, roster.keys[0].cooldown_reason) == (NOW + 7200, "weekly quota")
    assert engine.cooldown_update(roster.keys[0], NOW + 7200, "same") == {}


def test_default_cooldowns_when_no_deadline_was_given() -> None:
    for kind, seconds in engine.DEFAULT_COOLDOWN.items():
        roster = apply(pool(), 0, Outcome(kind=kind))
        assert roster.keys[0].cooldown_until == NOW + seconds
        assert roster.keys[0].cooldown_reason == kind.value


def test_account_scope_covers_exactly_the_surface_and_account_group() -> None:
    roster = pool(
        6,
        k0={"account": "A"},
        k1={"account": "A"},
        k2={"account": "A", "surface": Surface.MOONSHOT_CN},  # same label, other platform
        k3={"account": "B"},
        k4={"account": None},
        k5={"account": "A", "cooldown_until": NOW + 9999, "cooldown_reason": "earlier"},
    )
    changed = engine.apply_outcome(roster, kid(0), rate_limited(NOW + 300, scope=Scope.ACCOUNT), NOW)
    assert sorted(k.id for k in changed) == [kid(0), kid(1), kid(5)]
    after = roster.with_updates(changed)
    assert [k.state_at(NOW) for k in after.keys] == [
        KeyState.COOLING,
        KeyState.COOLING,
        KeyState.ACTIVE,
        KeyState.ACTIVE,
        KeyState.ACTIVE,
        KeyState.COOLING,
    ]
    assert after.keys[5].cooldown_until == NOW + 9999  # never shortened
    # Only the key that served the attempt is counted and penalised.
    assert (after.keys[1].total_requests, after.keys[1].health) == (0, 100.0)
    assert (after.keys[0].total_requests, after.keys[0].health) == (1, 85.0)


def test_account_scope_without_an_account_cools_only_the_key() -> None:
    changed = engine.apply_outcome(pool(), kid(0), rate_limited(NOW + 300, scope=Scope.ACCOUNT), NOW)
    assert [k.id for k in changed] == [kid(0)]


def test_account_hint_groups_a_key_and_its_account() -> None:
    roster = pool(k1={"account": "A"})
    outcome = Outcome(kind=OutcomeKind.RATE_LIMITED, scope=Scope.ACCOUNT, until=NOW + 60, account_hint="A")
    after = roster.with_updates(engine.apply_outcome(roster, kid(0), outcome, NOW))
    assert after.keys[0].account == "A"
    assert [k.cooldown_until for k in after.keys] == [NOW + 60, NOW + 60, None]


def test_account_scope_ban_disables_every_key_of_the_account() -> None:
    roster = pool(k0={"account": "A"}, k1={"account": "A"}, k2={"account": "B"})
    roster = Roster([*roster.keys, make_key(3, account="A", disabled_reason="disabled by hand")])
    outcome = Outcome(kind=OutcomeKind.ACCESS_DENIED, scope=Scope.ACCOUNT, reason="access terminated")
    after = roster.with_updates(engine.apply_outcome(roster, kid(0), outcome, NOW))
    assert [k.disabled_reason for k in after.keys] == [
        "access terminated",
        "access terminated",
        None,
        "disabled by hand",  # the first reason stays
    ]


@pytest.mark.parametrize("strategy", list(Strategy))
def test_disabled_keys_are_never_picked(strategy: Strategy) -> None:
    gone = {"disabled_reason": "disabled by hand", "cooldown_until": NOW - 60}
    roster = pool(k0=gone, k2={"disabled_reason": "invalid key"})
    settings = conf(strategy, active=0, serve_active_next=True)
    picks, _, _, _ = serve(roster, settings, 4)
    assert picks == [1, 1, 1, 1]
    all_gone = pool(k0=gone, k1=gone, k2=gone)
    assert engine.select(all_gone, settings, NOW) == NoEligibleKey(total=3, cooling=0, disabled=3, next_free_at=None)
    enabled = all_gone.with_updates([replace(all_gone.keys[2], disabled_reason=None)])
    assert index(enabled, engine.select(enabled, settings, NOW)) == 2


@pytest.mark.parametrize("kind", sorted(engine.DISABLING))
def test_invalid_or_forbidden_key_is_disabled_with_a_reason(kind: OutcomeKind) -> None:
    roster = apply(pool(), 0, Outcome(kind=kind, reason="401 invalid"))
    assert roster.keys[0].disabled_reason == "401 invalid"
    assert roster.keys[0].state_at(NOW + 365 * 24 * HOUR) is KeyState.DISABLED
    assert index(roster, engine.select(roster, conf(HB), NOW)) == 1


@pytest.mark.parametrize("strategy", list(Strategy))
def test_selection_filters_by_surface(strategy: Strategy) -> None:
    roster = pool(
        4,
        k0={"surface": Surface.KIMI_CODE},
        k1={"surface": Surface.MOONSHOT_CN},
        k2={"surface": Surface.MOONSHOT_AI, "cooldown_until": NOW + 60},
        k3={"surface": Surface.MOONSHOT_AI},
    )
    settings = conf(strategy, active=0)
    for _ in range(3):
        result = engine.select(roster, settings, NOW, surface=Surface.MOONSHOT_AI)
        assert index(roster, result) == 3
        assert isinstance(result, Selection)
        settings = engine.after_selection(settings, result)
    assert index(roster, engine.select(roster, conf(strategy, active=3), NOW, surface=Surface.MOONSHOT_CN)) == 1
    assert engine.select(roster, settings, NOW, surface=Surface.MOONSHOT_AI, exclude={kid(3)}) == NoEligibleKey(
        total=2, cooling=1, disabled=0, next_free_at=NOW + 60
    )


# -- outcomes and health ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "health", "counter", "state"),
    [
        (OutcomeKind.SUCCESS, 62.0, "successful_requests", KeyState.ACTIVE),
        (OutcomeKind.RATE_LIMITED, 45.0, "rate_limited_requests", KeyState.COOLING),
        (OutcomeKind.QUOTA_EXHAUSTED, 30.0, "failed_requests", KeyState.COOLING),
        (OutcomeKind.BILLING_LIMITED, 30.0, "failed_requests", KeyState.COOLING),
        (OutcomeKind.MEMBERSHIP, 35.0, "failed_requests", KeyState.COOLING),
        (OutcomeKind.INVALID_KEY, 40.0, "failed_requests", KeyState.DISABLED),
        (OutcomeKind.ACCESS_DENIED, 40.0, "failed_requests", KeyState.DISABLED),
        (OutcomeKind.REQUEST_ERROR, 60.0, "failed_requests", KeyState.ACTIVE),
        (OutcomeKind.CLIENT_REJECTED, 60.0, "failed_requests", KeyState.ACTIVE),
        (OutcomeKind.SERVER_ERROR, 60.0, "failed_requests", KeyState.ACTIVE),
    ],
)
def test_outcome_health_counters_and_state(kind: OutcomeKind, health: float, counter: str, state: KeyState) -> None:
    roster = pool(k0={"health": 60.0, "last_used": NOW - HOUR, "health_at": NOW})
    (changed,) = engine.apply_outcome(roster, kid(0), Outcome(kind=kind), NOW)
    assert changed.health == health
    assert changed.total_requests == 1
    assert getattr(changed, counter) == 1
    assert changed.successful_requests + changed.rate_limited_requests + changed.failed_requests == 1
    assert changed.state_at(NOW) is state
    assert (changed.last_used, changed.health_at) == (NOW, NOW)


def test_health_is_clamped_and_success_latency_is_tracked() -> None:
    roster = pool(k1={"health": 10.0})
    roster = apply(roster, 1, Outcome(kind=OutcomeKind.BILLING_LIMITED))
    assert roster.keys[1].health == 0.0
    for ms in (250.0, 100.0, 400.0):
        roster = apply(roster, 0, Outcome(kind=OutcomeKind.SUCCESS, latency_ms=ms))
    roster = apply(roster, 0, SUCCESS)  # no latency: not part of the figures
    k0 = roster.keys[0]
    assert k0.health == 100.0
    assert (k0.latency_count, k0.latency_sum_ms, k0.latency_min_ms, k0.latency_max_ms) == (3, 750.0, 100.0, 400.0)
    assert (k0.total_requests, k0.successful_requests) == (4, 4)


def test_unknown_key_outcome_changes_nothing() -> None:
    assert engine.apply_outcome(pool(), 999, SUCCESS, NOW) == []


def test_health_recovers_over_time() -> None:
    k = make_key(0, health=50.0, health_at=NOW)
    assert engine.health_at(k, NOW) == 50.0
    assert engine.health_at(k, NOW + HOUR) == 50.0 + engine.HEALTH_RECOVERY_PER_HOUR
    assert engine.health_at(k, NOW + 2.5 * HOUR) == 75.0
    assert engine.health_at(k, NOW + 100 * HOUR) == 100.0
    assert engine.health_at(k, NOW - HOUR) == 50.0  # an out-of-order clock never subtracts
    assert engine.health_at(k, NOW + 100 * HOUR, recover=False) == 50.0
    # Outcomes start from the recovered health.
    (after,) = engine.apply_outcome(Roster([k]), kid(0), SUCCESS, NOW + 2 * HOUR)
    assert after.health == 72.0
    (after,) = engine.apply_outcome(Roster([k]), kid(0), SUCCESS, NOW + 2 * HOUR, recover=False)
    assert after.health == 52.0


def test_recovery_follows_the_auto_refresh_setting_in_selection() -> None:
    roster = pool(2, k0={"health": 0.0, "health_at": NOW - 8 * HOUR})  # recovered to 80; 80 + 50 > 100 + 0
    assert index(roster, engine.select(roster, conf(HB), NOW)) == 0
    assert index(roster, engine.select(roster, conf(HB, auto_refresh_health=False), NOW)) == 1


def test_no_key_is_excluded_forever() -> None:
    # The reference benched a key below 30 for good while another key qualified. Here k0 at 0 comes back:
    # ten hours later it is at 100 with 10 h of freshness, against a busy k1.
    roster = pool(2, k0={"health": 0.0, "last_used": NOW}, k1={"health": 100.0})
    settings = conf(HB, active=None)
    assert index(roster, engine.select(roster, settings, NOW)) == 1
    later = NOW + 10 * HOUR
    roster = roster.with_updates([replace(roster.keys[1], last_used=later)])
    assert index(roster, engine.select(roster, settings, later)) == 0
    # Without recovery k0 still serves when it is the only eligible key (the reference sent such a request to
    # index 0 without counting it, as if every key were limited).
    only = pool(2, k0={"health": 0.0}, k1={"cooldown_until": NOW + 60})
    assert index(only, engine.select(only, conf(HB, auto_refresh_health=False), NOW)) == 0


def test_clear_limits_ends_the_cooldown_only() -> None:
    k = make_key(0, health=40.0, cooldown_until=NOW + 600, cooldown_reason="x", disabled_reason="by hand")
    cleared = engine.clear_limits(k)
    assert (cleared.cooldown_until, cleared.cooldown_reason) == (None, None)
    assert (cleared.health, cleared.disabled_reason) == (40.0, "by hand")


def test_after_selection_makes_the_pick_current() -> None:
    settings = conf(RR, active=0, serve_active_next=True)
    roster = pool()
    same = engine.after_selection(conf(RR, active=1), Selection(roster.keys[1], "x"))
    assert same == conf(RR, active=1)
    moved = engine.after_selection(settings, Selection(roster.keys[0], "x"))
    assert (moved.active_key_id, moved.serve_active_next) == (kid(0), False)


# -- the index behind selection (kimi_rotator/roster.py) ----------------------------------------------------------
# Each test selects once to make the roster build its index at T, then changes the clock or the keys so that the
# index's view is out of date, and checks that the pick is still the right one.

T = NOW


def first_pick(roster: Roster, settings_: PoolSettings, now: float = T) -> int:
    return index(roster, engine.select(roster, settings_, now))


def test_a_healthy_key_beats_an_unhealthy_one_ranked_above_it() -> None:
    roster = pool(2, k0={"health": 29.0, "last_used": T - 30 * HOUR}, k1={"health": 30.0})  # scores 49 and 30
    assert first_pick(roster, conf(HB, active=None, auto_refresh_health=False)) == 1


def test_a_recovering_key_that_overtakes_after_the_ranking_is_picked() -> None:
    # k0: full health, 10 h idle (110, gains 1 point an hour). k1: 89.6 and recovering, a day idle (109.6, gains 10).
    roster = pool(2, k0={"last_used": T - 10 * HOUR}, k1={"health": 89.6, "last_used": T - 30 * HOUR})
    settings_ = conf(HB, active=None)
    assert first_pick(roster, settings_) == 0
    assert first_pick(roster, settings_, T + 200) == 1  # 110.06 against 110.16


def test_an_idle_key_that_overtakes_a_capped_one_after_the_ranking_is_picked() -> None:
    # Without recovery every score is steady. k0: 90, a day idle (capped at 110). k1: 100, 9.95 h idle (109.95, rising).
    roster = pool(2, k0={"health": 90.0, "last_used": T - 30 * HOUR}, k1={"last_used": T - 9.95 * HOUR})
    settings_ = conf(HB, active=None, auto_refresh_health=False)
    assert first_pick(roster, settings_) == 0
    assert first_pick(roster, settings_, T + 200) == 1  # 110 against 110.006


def test_keys_at_the_top_score_when_ranked_are_compared_again_after_the_clock_steps_back() -> None:
    # All score the top mark at T; 200 s earlier k0 and k1 were 100 s and 50 s short of a full day's idle bonus.
    roster = pool(3, k0={"last_used": T - 20 * HOUR - 100}, k1={"last_used": T - 20 * HOUR - 150},
                  k2={"last_used": T - 30 * HOUR})
    settings_ = conf(HB, active=None)
    assert first_pick(roster, settings_) == 0
    assert first_pick(roster, settings_, T - 200) == 2


def test_keys_used_after_the_ranking_are_ranked_by_their_last_use() -> None:
    roster = pool(2, k0={"last_used": T - HOUR}, k1={"last_used": T})
    settings_ = conf(HB, active=None)
    assert first_pick(roster, settings_) == 0
    roster = roster.with_updates([replace(roster.keys[0], last_used=T + 50)])
    assert first_pick(roster, settings_, T + 100) == 1  # idle 100 s against 50 s


def test_keys_that_reach_the_top_score_after_the_ranking_tie_and_the_lower_index_wins() -> None:
    # k0 is 100 s short of a day's idle bonus at T; k1 has had it for hours. 200 s later both score the top mark.
    roster = pool(2, k0={"last_used": T - 20 * HOUR + 100}, k1={"last_used": T - 30 * HOUR})
    settings_ = conf(HB, active=None)
    assert first_pick(roster, settings_) == 1
    assert first_pick(roster, settings_, T + 200) == 0


def test_keys_last_used_after_now_tie_at_no_idle_bonus_and_the_lower_index_wins() -> None:
    """Outcomes may be recorded slightly out of order: a key used "later" than `now` has no idle bonus yet."""
    roster = pool(2, k0={"last_used": T - HOUR}, k1={"last_used": T - 2 * HOUR})
    settings_ = conf(HB, active=None)
    assert first_pick(roster, settings_) == 1
    used_later = [replace(k, last_used=T + 200 - 100 * i) for i, k in enumerate(roster.keys)]
    roster = roster.with_updates(used_later)  # k0 at T + 200, k1 at T + 100
    assert first_pick(roster, settings_, T + 50) == 0


def test_no_eligible_key_after_the_clock_steps_back_reports_the_cooling_key() -> None:
    roster = pool(2, k0={"cooldown_until": T - 100}, k1={"disabled_reason": "disabled by hand"})
    settings_ = conf(HB, active=None)
    assert first_pick(roster, settings_) == 0
    assert engine.select(roster, settings_, T - 200) == NoEligibleKey(
        total=2, cooling=1, disabled=1, next_free_at=T - 100
    )


@pytest.mark.parametrize("strategy", [HB, STICKY, RR])
def test_a_key_whose_cooldown_ended_after_the_index_was_built_is_picked(strategy: Strategy) -> None:
    """Ten keys, so that round-robin's first few steps find nothing and it turns to the index."""
    long_cool = {"cooldown_until": T + 1000, "health": 50.0}
    roster = pool(10, k0={"cooldown_until": T + 100, "last_used": T - 30 * HOUR},
                  k1={"health": 50.0}, **{f"k{i}": long_cool for i in range(2, 10)})
    settings_ = conf(strategy, active=1)
    forced = strategy is not RR  # rotate: the current key k1 is left out, so health-based and sticky scan
    result = engine.select(roster, settings_, T, forced=forced)
    assert isinstance(result, NoEligibleKey) if forced else index(roster, result) == 1
    assert index(roster, engine.select(roster, settings_, T + 200, forced=forced)) == 0


# -- hypothesis properties ------------------------------------------------------------------------------------------

ACCOUNTS = [None, "a", "b"]


@st.composite
def key_lists(draw: st.DrawFn, min_size: int = 0, max_size: int = 8) -> list[KeyRecord]:
    n = draw(st.integers(min_size, max_size))
    ids = draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n, unique=True))
    keys = []
    for i, key_id in enumerate(ids):
        keys.append(
            KeyRecord(
                id=key_id,
                secret=Secret("sk-test"),
                fingerprint=f"fp{key_id}",
                name=f"k{i}",
                surface=draw(st.sampled_from(list(Surface))),
                account=draw(st.sampled_from(ACCOUNTS)),
                added_at=NOW - 72 * HOUR,
                last_used=draw(st.none() | st.floats(NOW - 48 * HOUR, NOW)),
                health=draw(st.floats(0, 100)),
                health_at=NOW - draw(st.floats(0, 48 * HOUR)),
                cooldown_until=draw(st.none() | st.just(NOW) | st.floats(NOW - HOUR, NOW + HOUR)),
                disabled_reason=draw(st.sampled_from([None, None, None, "disabled"])),
            )
        )
    return keys


def usable(k: KeyRecord, surface: Surface | None, skip: set[int], now: float = NOW) -> bool:
    return (
        k.disabled_reason is None
        and (k.cooldown_until is None or k.cooldown_until <= now)
        and (surface is None or k.surface is surface)
        and k.id not in skip
    )


PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEQUENCES = settings(PROPS, max_examples=120)  # each example runs up to 40 outcomes


@st.composite
def requests(draw: st.DrawFn, ids: list[int]) -> tuple[PoolSettings, Surface | None, set[int], bool]:
    """What one select call is asked: settings, surface, keys already tried, and whether it is `rotate`."""
    active = draw(st.sampled_from([None, 99_999, *ids]))
    settings_ = PoolSettings(
        strategy=draw(st.sampled_from(list(Strategy))),
        active_key_id=active,
        serve_active_next=draw(st.booleans()),
        auto_refresh_health=draw(st.booleans()),
    )
    surface = draw(st.none() | st.sampled_from(list(Surface)))
    exclude = set(draw(st.lists(st.sampled_from(ids), unique=True, max_size=4))) if ids else set()
    return settings_, surface, exclude, draw(st.booleans())


def assert_model_pick(
    result: Selection | NoEligibleKey,
    keys: list[KeyRecord],
    settings_: PoolSettings,
    now: float,
    surface: Surface | None,
    exclude: set[int],
    forced: bool,
) -> None:
    """The engine's choice against a model that reads every key, in list order, with no index."""
    ids = [k.id for k in keys]
    active = settings_.active_key_id
    skip = exclude | ({active} if forced and active in ids else set())
    eligible = [k for k in keys if usable(k, surface, skip, now)]
    if not eligible:
        assert isinstance(result, NoEligibleKey), result
        on_surface = [k for k in keys if surface is None or k.surface is surface]
        assert result.total == len(on_surface)
        assert result.disabled == sum(k.disabled_reason is not None for k in on_surface)
        cooling = [k for k in on_surface if k.disabled_reason is None and k.state_at(now) is KeyState.COOLING]
        assert result.cooling == len(cooling)
        frees = [k.cooldown_until for k in cooling if k.id not in exclude and k.cooldown_until is not None]
        assert result.next_free_at == (min(frees) if frees else None)
        return
    assert isinstance(result, Selection), result
    assert result.key in eligible

    strategy = settings_.strategy
    recover = settings_.auto_refresh_health
    healthy = [k for k in eligible if engine.health_at(k, now, recover) >= engine.MIN_HEALTH]
    current = next((k for k in eligible if k.id == active), None)
    if strategy is Strategy.HEALTH_BASED:
        # The model: best score among healthy keys (any eligible key if none is healthy), ties to the lowest index.
        def score(k: KeyRecord) -> float:
            last = k.last_used if k.last_used is not None else k.added_at
            fresh = min(engine.FRESHNESS_CAP, max(0.0, now - last) / 3600.0)
            bonus = engine.CURRENT_KEY_BONUS if k is current else 0.0
            return engine.health_at(k, now, recover) + fresh + bonus

        candidates = healthy or eligible
        best = max(score(k) for k in candidates)
        assert result.key is next(k for k in candidates if score(k) == best)
    elif strategy is Strategy.STICKY:
        expected = current if current is not None else (healthy or eligible)[0]
        assert result.key is expected
    elif current is not None and settings_.serve_active_next:
        assert result.key is current
    else:
        # The first eligible key after the current one, wrapping; a current key on another surface is no
        # place in this surface's order, so the walk starts at the top.
        pos = -1
        if active in ids and (surface is None or keys[ids.index(active)].surface is surface):
            pos = ids.index(active)
        order = keys[pos + 1 :] + keys[: pos + 1]
        assert result.key is next(k for k in order if k in eligible)


@PROPS
@given(data=st.data(), keys=key_lists())
def test_property_select_picks_only_eligible_keys(data: st.DataObject, keys: list[KeyRecord]) -> None:
    settings_, surface, exclude, forced = data.draw(requests([k.id for k in keys]))
    result = engine.select(Roster(keys), settings_, NOW, surface=surface, exclude=exclude, forced=forced)
    assert_model_pick(result, keys, settings_, NOW, surface, exclude, forced)


@st.composite
def outcomes(draw: st.DrawFn) -> Outcome:
    kind = draw(st.sampled_from(list(OutcomeKind)))
    return Outcome(
        kind=kind,
        scope=draw(st.sampled_from(list(Scope))),
        until=draw(st.none() | st.floats(NOW - HOUR, NOW + 48 * HOUR)),
        latency_ms=draw(st.none() | st.floats(0, 60_000)),
        account_hint=draw(st.sampled_from([None, None, "a", "c"])),
    )


steps = st.lists(
    st.tuples(
        st.integers(0, 1000),  # which key (modulo)
        outcomes(),
        st.floats(-60, 6 * HOUR),  # clock step (outcomes may be recorded slightly out of order)
        st.booleans(),  # run a manual refresh-health too
    ),
    max_size=40,
)


@SEQUENCES
@given(keys=key_lists(min_size=1), steps=steps, recover=st.booleans())
def test_property_health_stays_within_bounds(
    keys: list[KeyRecord], steps: list[tuple[int, Outcome, float, bool]], recover: bool
) -> None:
    roster, now = Roster(keys), NOW
    for which, outcome, dt, refresh in steps:
        now += dt
        roster = roster.with_updates(engine.apply_outcome(roster, keys[which % len(keys)].id, outcome, now, recover))
        if refresh:
            roster = roster.with_updates(after for _, after in engine.refresh_health(roster.keys, now, 30, recover))
        for k in roster.keys:
            assert 0.0 <= k.health <= 100.0
            assert 0.0 <= engine.health_at(k, now, recover) <= 100.0
            assert k.total_requests == k.successful_requests + k.rate_limited_requests + k.failed_requests


@SEQUENCES
@given(keys=key_lists(min_size=1), steps=steps)
def test_property_cooldown_never_decreases(
    keys: list[KeyRecord], steps: list[tuple[int, Outcome, float, bool]]
) -> None:
    roster, now = Roster(keys), NOW
    for which, outcome, dt, refresh in steps:
        now += dt
        before = {k.id: k for k in roster.keys}
        roster = roster.with_updates(engine.apply_outcome(roster, keys[which % len(keys)].id, outcome, now))
        if refresh:
            roster = roster.with_updates(after for _, after in engine.refresh_health(roster.keys, now, 30))
        for k in roster.keys:
            old = before[k.id]
            if old.cooldown_until is not None:
                assert k.cooldown_until is not None and k.cooldown_until >= old.cooldown_until
            if old.disabled_reason is not None:
                assert k.disabled_reason == old.disabled_reason  # only `enable` lifts it


@st.composite
def crowded_pools(draw: st.DrawFn) -> list[KeyRecord]:
    """Pools of up to 60 keys with many ties: full health, a day idle and no cooldown all score the top mark,
    and healths sit on both sides of the threshold. They make the engine's index (kimi_rotator/roster.py) work."""
    n = draw(st.integers(1, 60))
    times = st.sampled_from([NOW - 30 * HOUR, NOW - 20 * HOUR, NOW - HOUR, NOW]) | st.floats(NOW - 48 * HOUR, NOW)
    return [
        KeyRecord(
            id=1000 + i,
            secret=Secret("sk-test"),
            fingerprint=f"fp{i}",
            name=f"k{i}",
            surface=draw(st.sampled_from([Surface.KIMI_CODE, Surface.KIMI_CODE, Surface.MOONSHOT_CN])),
            account=draw(st.sampled_from(ACCOUNTS)),
            added_at=NOW - 72 * HOUR,
            last_used=draw(st.none() | times),
            health=draw(st.sampled_from([100.0, 100.0, 30.0, 29.0, 0.0]) | st.floats(0, 100)),
            health_at=draw(times),
            cooldown_until=draw(st.none() | st.none() | st.floats(NOW - HOUR, NOW + 2 * HOUR)),
            disabled_reason=draw(st.sampled_from([None] * 5 + ["disabled"])),
        )
        for i in range(n)
    ]


# Mostly short steps, so an index outlives several changes; now and then one long enough to rebuild it.
clock_steps = st.sampled_from([0.0, 0.0, 1.0, -30.0, 301.0, 25 * HOUR]) | st.floats(-120, 250)
edits = st.sampled_from(["clear-limits", "disable", "enable"])


@settings(PROPS, max_examples=80)
@given(data=st.data(), keys=crowded_pools())
def test_property_select_matches_the_model_as_the_pool_changes(data: st.DataObject, keys: list[KeyRecord]) -> None:
    """The engine keeps an index of each roster and patches it as outcomes and edits replace keys. Whatever the
    order of selections, outcomes, edits and clock steps (backwards too), every pick equals the model's."""
    roster, now = Roster(keys), NOW
    ids = [k.id for k in keys]
    for _ in range(data.draw(st.integers(1, 40))):
        now += data.draw(clock_steps)
        action = data.draw(st.sampled_from(["select", "select", "outcome", "edit"]))
        key_id = data.draw(st.sampled_from(ids))
        if action == "outcome":
            roster = roster.with_updates(engine.apply_outcome(roster, key_id, data.draw(outcomes()), now))
        elif action == "edit":
            key = roster.get(key_id)
            assert key is not None
            change = {
                "clear-limits": {"cooldown_until": None, "cooldown_reason": None},
                "disable": {"disabled_reason": "disabled by hand"},
                "enable": {"disabled_reason": None},
            }[data.draw(edits)]
            roster = roster.with_updates([replace(key, **change)])
        else:
            settings_, surface, exclude, forced = data.draw(requests(ids))
            result = engine.select(roster, settings_, now, surface=surface, exclude=exclude, forced=forced)
            assert_model_pick(result, roster.keys, settings_, now, surface, exclude, forced)


@PROPS
@given(data=st.data(), keys=key_lists(min_size=1), k=st.integers(1, 5))
def test_property_round_robin_is_fair(data: st.DataObject, keys: list[KeyRecord], k: int) -> None:
    surface = data.draw(st.none() | st.sampled_from(list(Surface)))
    eligible = [key.id for key in keys if usable(key, surface, set())]
    n = len(eligible)
    settings_ = PoolSettings(
        strategy=Strategy.ROUND_ROBIN,
        active_key_id=data.draw(st.sampled_from([None, 99_999, *(key.id for key in keys)])),
        serve_active_next=data.draw(st.booleans()),
    )
    roster = Roster(keys)
    counts = dict.fromkeys(eligible, 0)
    for _ in range(k * max(n, 1)):
        result = engine.select(roster, settings_, NOW, surface=surface)
        if n == 0:
            assert isinstance(result, NoEligibleKey)
            return
        assert isinstance(result, Selection)
        counts[result.key.id] += 1
        settings_ = engine.after_selection(settings_, result)
    assert set(counts.values()) == {k}


# -- each surface keeps its own current key -------------------------------------------------------------------------


def _serve(roster: Roster, settings_: PoolSettings, surface: Surface) -> tuple[int, PoolSettings]:
    result = engine.select(roster, settings_, NOW, surface=surface)
    assert isinstance(result, Selection)
    return index(roster, result), engine.after_selection(settings_, result)


@pytest.mark.parametrize("strategy", [HB, Strategy.STICKY])
def test_a_request_for_one_surface_does_not_move_another_surfaces_key(strategy: Strategy) -> None:
    """Alternating Kimi Code and Open Platform requests keep each platform on its own key."""
    roster = Roster([make_key(0), make_key(1), make_key(2, surface=Surface.MOONSHOT_CN),
                     make_key(3, surface=Surface.MOONSHOT_CN)])
    settings_ = PoolSettings(strategy=strategy)
    served = []
    for surface in [Surface.KIMI_CODE, Surface.MOONSHOT_CN] * 3:
        i, settings_ = _serve(roster, settings_, surface)
        served.append(i)
    assert served == [0, 2, 0, 2, 0, 2]
    assert settings_.current_by_surface == {Surface.KIMI_CODE: kid(0), Surface.MOONSHOT_CN: kid(2)}


def test_use_key_on_one_surface_waits_for_a_request_of_that_surface() -> None:
    """use-key 1 (Kimi Code) under round-robin: an Open Platform request in between does not use up the turn."""
    roster = Roster([make_key(0), make_key(1), make_key(2, surface=Surface.MOONSHOT_CN)])
    settings_ = PoolSettings(strategy=Strategy.ROUND_ROBIN).with_current(roster.keys[1], serve_next=True)
    i, settings_ = _serve(roster, settings_, Surface.MOONSHOT_CN)
    assert i == 2 and settings_.serve_active_next
    i, settings_ = _serve(roster, settings_, Surface.KIMI_CODE)
    assert i == 1 and not settings_.serve_active_next
    i, settings_ = _serve(roster, settings_, Surface.KIMI_CODE)
    assert i == 0
