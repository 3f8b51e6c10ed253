"""Pins how account caps are kept: Kimi's tier table and its Msh-Gid spellings, which learned cap replaces which,
that a stated cap wins, that nothing changes when an answer only repeats what is known, and the words views show."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kimi_rotator.caps import MAX_CAP, TIERS, caps_in_force, merge_caps, parse_tier, state_caps, tier_caps
from kimi_rotator.models import AccountRecord, CapSource, Group, LearnedCap, Limit, Quota, Surface

NOW = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC
GROUP: Group = (Surface.MOONSHOT_AI, "team-a")
C, R, TPM, TPD = Limit.CONCURRENCY, Limit.RPM, Limit.TPM, Limit.TPD
TIER, HEADER, MESSAGE, DEFAULT = CapSource.TIER, CapSource.HEADER, CapSource.MESSAGE, CapSource.DEFAULT


def cap(limit: Limit, value: int, source: CapSource, detail: str = "", at: float = 0.0) -> LearnedCap:
    return LearnedCap(limit=limit, value=value, source=source, detail=detail, at=at)


# --- the tier table and Msh-Gid -------------------------------------------------------------------------------


def test_tier_table_is_kimis() -> None:
    """kimi-api.md §2, row by row; TPD is unlimited (no cap) from Tier1 on."""
    rows = {tier: tuple(caps.get(limit) for limit in (C, R, TPM, TPD)) for tier, caps in TIERS.items()}
    assert rows == {
        0: (1, 3, 500_000, 1_500_000),
        1: (50, 200, 2_000_000, None),
        2: (100, 500, 3_000_000, None),
        3: (200, 5_000, 3_000_000, None),
        4: (400, 5_000, 4_000_000, None),
        5: (1_000, 10_000, 5_000_000, None),
    }


@pytest.mark.parametrize(("gid", "tier"), [
    ("enterprise-tier-3", 3), ("tier3", 3), ("tier-0", 0), ("Tier-5", 5), ("TIER_2", 2), ("ENTERPRISE-TIER-1", 1),
    ("  enterprise-tier-4 ", 4), ("personal_tier4", 4), ("org-enterprise-tier-1", 1), ("tier-03", 3),
])
def test_parse_tier_accepts_its_spellings(gid: str, tier: int) -> None:
    assert parse_tier(gid) == tier


@pytest.mark.parametrize("gid", [
    "", "tier", "tier-", "tier-6", "tier-99", "tier-3a", "tier--3", "tier 3", "-tier-3", "enterprise-tier-3-x",
    "cn0abc1-tier-3",  # digits before it: could be an account id, never shown
    "a-b-c-tier-3", "abcdefghijklmnopq-tier-3", "enterprise-tier-\uff13", "tier-\u0663", "tier-3\n1",
    "enterprise", "3", "gid-1234567",
])
def test_parse_tier_refuses_anything_else(gid: str) -> None:
    assert parse_tier(gid) is None
    assert tier_caps(gid) == ()


def test_tier_caps_come_from_the_table_as_tier_caps() -> None:
    caps = tier_caps("Enterprise-Tier-3")
    assert {c.limit: c.value for c in caps} == {C: 200, R: 5_000, TPM: 3_000_000}
    assert {(c.source, c.at, c.detail) for c in caps} == {(TIER, 0.0, "tier enterprise-tier-3")}
    assert {c.limit: c.value for c in tier_caps("tier-0")}[TPD] == 1_500_000


# --- merge_caps -----------------------------------------------------------------------------------------------


def test_merge_creates_a_record_and_stamps_the_time() -> None:
    record = merge_caps(None, GROUP, [cap(R, 200, MESSAGE, "a 429")], NOW)
    assert record == AccountRecord(surface=GROUP[0], account=GROUP[1],
                                   learned={R: cap(R, 200, MESSAGE, "a 429", at=NOW)})


def test_merge_without_caps_changes_nothing() -> None:
    assert merge_caps(None, GROUP, [], NOW) is None
    record = merge_caps(None, GROUP, tier_caps("tier-1"), NOW)
    assert record is not None
    assert merge_caps(record, GROUP, (), NOW + 1) is None


def test_merge_of_what_is_known_changes_nothing() -> None:
    """Every success repeats the tier and the header: the pool must have nothing to write for them."""
    seen = (*tier_caps("enterprise-tier-3"), cap(R, 200, HEADER, "X-RateLimit-Limit"))
    record = merge_caps(None, GROUP, seen, NOW)
    assert record is not None
    assert merge_caps(record, GROUP, seen, NOW + 60) is None
    assert merge_caps(record, GROUP, tier_caps("enterprise-tier-3"), NOW + 60) is None  # the weaker part alone


def test_a_new_number_of_the_same_source_corrects_the_old_one() -> None:
    record = merge_caps(None, GROUP, [cap(R, 500, MESSAGE, "a 429")], NOW)
    corrected = merge_caps(record, GROUP, [cap(R, 200, MESSAGE, "a 429")], NOW + 5)
    assert corrected is not None
    assert corrected.learned[R] == cap(R, 200, MESSAGE, "a 429", at=NOW + 5)
    assert corrected.cap(R) == 200


def test_a_stronger_source_replaces_a_weaker_one() -> None:
    record = merge_caps(None, GROUP, tier_caps("tier-3"), NOW)
    record = merge_caps(record, GROUP, [cap(R, 250, HEADER, "X-RateLimit-Limit")], NOW + 1)
    assert record is not None and record.learned[R].source is HEADER and record.cap(R) == 250
    record = merge_caps(record, GROUP, [cap(R, 200, MESSAGE, "a 429")], NOW + 2)
    assert record is not None and record.learned[R] == cap(R, 200, MESSAGE, "a 429", at=NOW + 2)
    assert record.learned[C] == replace(next(c for c in tier_caps("tier-3") if c.limit is C), at=NOW)


@pytest.mark.parametrize(("strong", "weak"), [(MESSAGE, HEADER), (MESSAGE, TIER), (HEADER, TIER), (TIER, DEFAULT)])
def test_a_weaker_source_never_replaces_a_stronger_one(strong: CapSource, weak: CapSource) -> None:
    record = merge_caps(None, GROUP, [cap(C, 3, strong)], NOW)
    assert merge_caps(record, GROUP, [cap(C, 50, weak)], NOW + 1) is None
    # ...nor within one answer, whichever comes first
    for order in ([cap(C, 3, strong), cap(C, 50, weak)], [cap(C, 50, weak), cap(C, 3, strong)]):
        merged = merge_caps(None, GROUP, order, NOW)
        assert merged is not None and merged.learned[C] == cap(C, 3, strong, at=NOW)


def test_the_source_order_is_default_tier_header_message() -> None:
    assert sorted(CapSource, key=lambda s: s.strength) == [DEFAULT, TIER, HEADER, MESSAGE]


def test_a_changed_tier_replaces_the_old_tier() -> None:
    record = merge_caps(None, GROUP, tier_caps("enterprise-tier-1"), NOW)
    upgraded = merge_caps(record, GROUP, tier_caps("enterprise-tier-2"), NOW + 1)
    assert upgraded is not None
    assert {limit: c.value for limit, c in upgraded.learned.items()} == {C: 100, R: 500, TPM: 3_000_000}
    assert {c.detail for c in upgraded.learned.values()} == {"tier enterprise-tier-2"}
    # Tier3 and Tier4 share an RPM: the new detail still replaces the old one's
    record = merge_caps(None, GROUP, tier_caps("tier-3"), NOW)
    moved = merge_caps(record, GROUP, tier_caps("tier-4"), NOW + 1)
    assert moved is not None and moved.learned[R].detail == "tier tier-4"


def test_merge_ignores_values_that_are_no_cap() -> None:
    assert merge_caps(None, GROUP, [cap(R, 0, MESSAGE), cap(R, -3, MESSAGE), cap(R, MAX_CAP + 1, MESSAGE)], NOW) is None


def test_merge_keeps_what_it_does_not_touch() -> None:
    quota = Quota(checked_at=NOW - 10, balance=4.5)
    record = AccountRecord(surface=GROUP[0], account=GROUP[1], stated={C: 2}, quota=quota,
                           learned={TPM: cap(TPM, 9, MESSAGE, at=NOW - 100)})
    merged = merge_caps(record, GROUP, [cap(R, 3, MESSAGE, "a 429")], NOW)
    assert merged == replace(record, learned={**record.learned, R: cap(R, 3, MESSAGE, "a 429", at=NOW)})
    assert record.learned == {TPM: cap(TPM, 9, MESSAGE, at=NOW - 100)}  # the record given is not changed


def test_merge_and_state_refuse_another_accounts_record() -> None:
    record = AccountRecord(surface=Surface.MOONSHOT_CN, account="team-a")
    with pytest.raises(ValueError, match="another account"):
        merge_caps(record, GROUP, [cap(R, 3, MESSAGE)], NOW)
    with pytest.raises(ValueError, match="another account"):
        state_caps(record, GROUP, {R: 3})


@given(st.lists(st.tuples(st.sampled_from(list(Limit)), st.integers(-5, 10**13), st.sampled_from(list(CapSource)),
                          st.sampled_from(["", "a 429", "tier tier-3"])), max_size=12))
def test_merge_keeps_the_strongest_source_and_the_last_of_its_values(
    steps: list[tuple[Limit, int, CapSource, str]]
) -> None:
    record: AccountRecord | None = None
    for i, (limit, value, source, detail) in enumerate(steps):
        merged = merge_caps(record, GROUP, [cap(limit, value, source, detail)], NOW + i)
        record = merged if merged is not None else record
    for limit in Limit:
        valid = [(v, s, d) for lim, v, s, d in steps if lim is limit and 0 < v <= MAX_CAP]
        kept = record.learned.get(limit) if record is not None else None
        if not valid:
            assert kept is None
            continue
        strongest = max(s.strength for _, s, _ in valid)
        assert kept is not None
        assert (kept.value, kept.source, kept.detail) == [x for x in valid if x[1].strength == strongest][-1]


# --- stated caps ----------------------------------------------------------------------------------------------


def test_state_caps_sets_and_clears() -> None:
    record = state_caps(None, GROUP, {R: 100, C: 4})
    assert record == AccountRecord(surface=GROUP[0], account=GROUP[1], stated={R: 100, C: 4})
    record = state_caps(record, GROUP, {R: None, TPD: None, TPM: 10})
    assert record.stated == {C: 4, TPM: 10}


@pytest.mark.parametrize("value", [0, -1, MAX_CAP + 1])
def test_state_caps_refuses_a_value_that_is_no_cap(value: int) -> None:
    with pytest.raises(ValueError, match="whole number"):
        state_caps(None, GROUP, {R: value})


def test_a_stated_cap_wins_over_a_learned_one() -> None:
    learned = merge_caps(None, GROUP, [cap(R, 200, MESSAGE, "a 429"), cap(C, 50, MESSAGE, "a 429")], NOW)
    assert learned is not None
    record = state_caps(learned, GROUP, {R: 20})
    assert record.learned == learned.learned  # stating leaves what was learned alone
    assert (record.cap(R), record.cap(C)) == (20, 50)
    relearned = merge_caps(record, GROUP, [cap(R, 300, MESSAGE, "a 429")], NOW + 1)
    assert relearned is not None and relearned.cap(R) == 20 and relearned.learned[R].value == 300
    assert caps_in_force(relearned)[R] == (20, "stated")
    assert state_caps(relearned, GROUP, {R: None}).cap(R) == 300  # cleared: the learned one is in force again


# --- the words views show -------------------------------------------------------------------------------------


def test_caps_in_force_says_where_each_cap_comes_from(utc: None) -> None:
    at = NOW + 2 * 3600 + 120  # 10:02 UTC
    record = AccountRecord(surface=GROUP[0], account=GROUP[1], stated={TPD: 1_000_000}, learned={
        R: cap(R, 200, MESSAGE, "a 429", at=at),
        C: cap(C, 200, TIER, "tier enterprise-tier-3", at=at),
        TPM: cap(TPM, 3_000_000, HEADER, "X-RateLimit-Limit", at=at),
        TPD: cap(TPD, 5, MESSAGE, "a 429", at=at),
    })
    assert caps_in_force(record) == {
        R: (200, "learned from a 429 at 10:02"),
        C: (200, "tier enterprise-tier-3"),
        TPM: (3_000_000, "learned from X-RateLimit-Limit at 10:02"),
        TPD: (1_000_000, "stated"),
    }
    assert caps_in_force(record, NOW + 86400)[R] == (200, "learned from a 429 at 2027-01-15 10:02")
    assert list(caps_in_force(record)) == list(Limit)


def test_caps_in_force_of_nothing_is_empty() -> None:
    assert caps_in_force(None) == {}
    assert caps_in_force(AccountRecord(surface=GROUP[0], account=GROUP[1])) == {}
    bare = AccountRecord(surface=GROUP[0], account=GROUP[1], learned={C: cap(C, 30, DEFAULT)})
    assert caps_in_force(bare) == {C: (30, "default")}
