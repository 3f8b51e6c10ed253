"""The engine's rules for issue 9: accounts at their caps are passed over, quota that expires soon is spent first,
and new conversations are spread over the accounts (pure: records in, a pick out)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kimi_rotator import engine
from kimi_rotator.models import Group, KeyRecord, PoolSettings, Quota, QuotaWindow, Secret, Strategy, Surface
from kimi_rotator.roster import Roster

NOW = 1_800_000_000.0
KC = Surface.KIMI_CODE


def key(i: int, account: str | None, **changes: object) -> KeyRecord:
    base = KeyRecord(id=i, secret=Secret(f"sk-kimi-{i}"), fingerprint=f"fp{i}", name=f"k{i}", surface=KC,
                     account=account, added_at=NOW - 3600, health_at=NOW)
    return replace(base, **changes)  # type: ignore[arg-type]


def group(account: str) -> Group:
    return (KC, account)


ROSTER = [key(1, "a"), key(2, "a"), key(3, "b"), key(4, None)]


DEFAULTS = PoolSettings()


def pick(keys: list[KeyRecord], settings: PoolSettings = DEFAULTS, **kw: object) -> KeyRecord | None:
    result = engine.select(Roster(keys), settings, NOW, surface=KC, **kw)  # type: ignore[arg-type]
    return result.key if isinstance(result, engine.Selection) else None


def test_keys_of_a_full_account_are_passed_over_under_every_strategy() -> None:
    for strategy in Strategy:
        settings = PoolSettings(strategy=strategy, active_key_id=1, current_by_surface={KC: 1})
        chosen = pick(ROSTER, settings, full={group("a")})
        assert chosen is not None and chosen.account != "a", strategy


def test_an_unlabelled_key_is_an_account_of_its_own() -> None:
    full = {group("a"), group("b")}
    assert pick(ROSTER, full=full) == ROSTER[3]
    assert pick(ROSTER, full={*full, ROSTER[3].limit_group}) is None


def test_nothing_eligible_when_every_account_is_full_but_the_keys_are_fine() -> None:
    full = {group("a"), group("b"), ROSTER[3].limit_group}
    result = engine.select(Roster(ROSTER), PoolSettings(), NOW, surface=KC, full=full)
    assert isinstance(result, engine.NoEligibleKey) and result.cooling == 0 and result.next_free_at is None
    # Without the caps the same pool serves: that is how the scheduler tells "full" from "cooling".
    assert isinstance(engine.select(Roster(ROSTER), PoolSettings(), NOW, surface=KC), engine.Selection)


def test_quota_that_expires_soon_serves_first_under_health_based() -> None:
    settings = PoolSettings(active_key_id=1, current_by_surface={KC: 1})  # health-based would stay on k1 (account a)
    assert pick(ROSTER, settings) == ROSTER[0]
    assert pick(ROSTER, settings, prefer=[group("b")]) == ROSTER[2]
    # The preferred account's only key is unhealthy: it does not jump ahead of the healthy current key.
    sick = [*ROSTER[:2], replace(ROSTER[2], health=10.0), ROSTER[3]]
    assert pick(sick, settings, prefer=[group("b")]) == ROSTER[0]
    # Full or cooling, it is skipped for the next one in the list.
    assert pick(ROSTER, settings, prefer=[group("b"), ROSTER[3].limit_group], full={group("b")}) == ROSTER[3]
    for strategy in (Strategy.ROUND_ROBIN, Strategy.STICKY):  # their users chose them for their order
        assert pick(ROSTER, replace(settings, strategy=strategy), prefer=[group("b")]) != ROSTER[2]
    # A key named by use-key serves the next request all the same.
    assert pick(ROSTER, replace(settings, serve_active_next=True), prefer=[group("b")]) == ROSTER[0]


@pytest.mark.parametrize(("loads", "expected"), [
    ({}, 1),  # nothing placed yet: the current key, as health-based would pick
    ({group("a"): 1}, 3),  # a carries a conversation: the next one goes to b
    ({group("a"): 1, group("b"): 1}, 4),  # then the unlabelled key, an account of its own
    ({group("a"): 2, group("b"): 1, (KC, "key:fp4"): 1}, 3),  # the fewest
])
def test_new_conversations_go_to_the_account_with_fewest(loads: dict[Group, int], expected: int) -> None:
    settings = PoolSettings(active_key_id=1, current_by_surface={KC: 1})
    result = engine.place(Roster(ROSTER), settings, NOW, surface=KC, loads=loads)
    assert isinstance(result, engine.Selection) and result.key.id == expected and result.reason == "spread"


def test_placement_puts_health_before_spreading_and_quota_before_both() -> None:
    sick = [replace(ROSTER[0], health=10.0), replace(ROSTER[1], health=10.0), ROSTER[2]]
    result = engine.place(Roster(sick), PoolSettings(), NOW, surface=KC, loads={group("b"): 5})
    assert isinstance(result, engine.Selection) and result.key.id == 3  # loaded, but healthy
    result = engine.place(Roster(ROSTER), PoolSettings(), NOW, surface=KC, loads={group("b"): 5},
                          prefer=[group("b")])
    assert isinstance(result, engine.Selection) and result.key.id == 3 and result.reason == "quota-expiring"


def test_best_in_group_prefers_the_healthy_key() -> None:
    keys = [replace(ROSTER[0], health=20.0), ROSTER[1], ROSTER[2]]
    assert engine.best_in_group(Roster(keys), group("a"), NOW, KC, (), True) == ROSTER[1]
    assert engine.best_in_group(Roster(keys), group("a"), NOW, KC, {2}, True) == keys[0]
    assert engine.best_in_group(Roster(keys), group("a"), NOW, KC, {2}, True, healthy_only=True) is None


def test_quota_expiry_is_read_from_its_windows() -> None:
    window = QuotaWindow(name="5h", limit=100, remaining=40, reset_at=NOW + 1200)
    weekly = QuotaWindow(name="weekly", limit=1000, remaining=900, reset_at=NOW + 5 * 86400)
    assert Quota(checked_at=NOW, windows=(window, weekly)).expiring(NOW) == NOW + 1200
    spent = replace(window, remaining=0)
    assert Quota(checked_at=NOW, windows=(spent, weekly)).expiring(NOW) is None  # used up: nothing to spend
    assert Quota(checked_at=NOW, windows=(spent, weekly)).exhausted_until() == NOW + 1200
    assert Quota(checked_at=NOW, windows=(window,)).expiring(NOW + 1300) is None  # that reset has passed
    assert Quota(checked_at=NOW, balance=5.0).expiring(NOW) is None  # a balance does not expire
