"""Account caps: Kimi's tier table, and the rules for keeping what was learned or stated about an account.

Pure: no I/O, no clock (the pool passes `now`). A cap the user states wins over any learned one
(`AccountRecord.cap`); among learned caps a source at least as strong as the one kept replaces it
(`CapSource.strength`), so the number in a new 429 corrects an older one, and a tier or header never
overrides what a 429 said.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from functools import lru_cache
from typing import Final

from kimi_rotator.models import AccountRecord, CapSource, Group, LearnedCap, Limit, Surface

# Above this no number is believed to be a cap (Kimi's largest, Tier5's TPM, is 5,000,000).
MAX_CAP: Final = 10**12

# Open Platform tiers by cumulative top-up (kimi-api.md §2); the same for every model. No TPD entry: unlimited.
TIERS: Final[Mapping[int, Mapping[Limit, int]]] = {
    0: {Limit.CONCURRENCY: 1, Limit.RPM: 3, Limit.TPM: 500_000, Limit.TPD: 1_500_000},
    1: {Limit.CONCURRENCY: 50, Limit.RPM: 200, Limit.TPM: 2_000_000},
    2: {Limit.CONCURRENCY: 100, Limit.RPM: 500, Limit.TPM: 3_000_000},
    3: {Limit.CONCURRENCY: 200, Limit.RPM: 5_000, Limit.TPM: 3_000_000},
    4: {Limit.CONCURRENCY: 400, Limit.RPM: 5_000, Limit.TPM: 4_000_000},
    5: {Limit.CONCURRENCY: 1_000, Limit.RPM: 10_000, Limit.TPM: 5_000_000},
}

# "enterprise-tier-3", "tier3", "Tier-0", "tier_2": at most two words of letters before it, so nothing with an
# account id's digits (or of an id's length) is ever taken for a tier and shown.
_TIER = re.compile(r"(?:[a-z]{1,16}[-_]){0,2}tier[-_]?([0-9]{1,2})", re.IGNORECASE)


def parse_tier(gid: str) -> int | None:
    """The tier an Msh-Gid value names, or None when it names none of the published tiers."""
    found = _TIER.fullmatch(gid.strip())
    if found is None:
        return None
    tier = int(found.group(1))
    return tier if tier in TIERS else None


@lru_cache(maxsize=64)  # every answer of an account carries the same Msh-Gid: parse it once, not per request
def tier_caps(gid: str) -> tuple[LearnedCap, ...]:
    """The caps an Msh-Gid value implies through the tier table (none for a value that is no known tier)."""
    tier = parse_tier(gid)
    if tier is None:
        return ()
    detail = f"tier {gid.strip().lower()}"
    return tuple(LearnedCap(limit=limit, value=value, source=CapSource.TIER, detail=detail)
                 for limit, value in TIERS[tier].items())


def merge_caps(record: AccountRecord | None, group: Group, caps: Iterable[LearnedCap],
               now: float) -> AccountRecord | None:
    """`record` with `caps` learned (a new record when it is None), or None when nothing it keeps changes,
    so that the pool writes nothing for the many answers that only repeat what is known."""
    _check_group(record, group)
    learned = dict(record.learned) if record is not None else {}
    changed = False
    for cap in caps:
        if not 0 < cap.value <= MAX_CAP:
            continue
        kept = learned.get(cap.limit)
        if kept is not None:
            if cap.source.strength < kept.source.strength:
                continue
            if (cap.value, cap.source, cap.detail) == (kept.value, kept.source, kept.detail):
                continue
        learned[cap.limit] = replace(cap, at=now)
        changed = True
    if not changed:
        return None
    if record is None:
        return AccountRecord(surface=group[0], account=group[1], learned=learned)
    return replace(record, learned=learned)


def state_caps(record: AccountRecord | None, group: Group, changes: Mapping[Limit, int | None]) -> AccountRecord:
    """`record` (a new one when None) with the user's caps set, or cleared where `changes` gives None."""
    _check_group(record, group)
    stated = dict(record.stated) if record is not None else {}
    for limit, value in changes.items():
        if value is None:
            stated.pop(limit, None)
        elif not 0 < value <= MAX_CAP:
            raise ValueError(f"a {limit.value} cap must be a whole number from 1 to {MAX_CAP:,}; got {value}")
        else:
            stated[limit] = value
    if record is None:
        return AccountRecord(surface=group[0], account=group[1], stated=stated)
    return replace(record, stated=stated)


def caps_in_force(record: AccountRecord | None, now: float | None = None) -> dict[Limit, tuple[int, str]]:
    """Each limit's cap in force with a few words on where it comes from: "stated", "learned from a 429 at
    14:02", "tier enterprise-tier-3". `now` lets the time show its date when it is not today's."""
    if record is None:
        return {}
    out: dict[Limit, tuple[int, str]] = {}
    for limit in Limit:
        if limit in record.stated:
            out[limit] = (record.stated[limit], "stated")
        elif (cap := record.learned.get(limit)) is not None:
            out[limit] = (cap.value, _how(cap, now))
    return out


def _how(cap: LearnedCap, now: float | None) -> str:
    what = cap.detail or cap.source.value
    if cap.source in (CapSource.MESSAGE, CapSource.HEADER):
        from kimi_rotator.views import clock  # here, not at the top: the views import this module

        return f"learned from {what} at {clock(cap.at, cap.at if now is None else now)}"
    return what


def _check_group(record: AccountRecord | None, group: Group) -> None:
    if record is not None and record.group != group:
        raise ValueError("the account record given belongs to another account")  # no labels: they may be Kimi ids


# Kimi Code documents a concurrency cap of 30 per account: in force until Kimi or the user says otherwise.
KIMI_CODE_CONCURRENCY = 30
_KIMI_CODE_DEFAULT = LearnedCap(limit=Limit.CONCURRENCY, value=KIMI_CODE_CONCURRENCY, source=CapSource.DEFAULT,
                                detail="Kimi Code's documented cap")


def with_defaults(record: AccountRecord | None, group: Group) -> AccountRecord | None:
    """The record as the caps in force see it: a Kimi Code account with no concurrency cap stated or learned gets
    the documented one (as a learned cap of the weakest source). The one place the pool and the views read it."""
    if group[0] is not Surface.KIMI_CODE:
        return record
    if record is not None and (Limit.CONCURRENCY in record.stated or Limit.CONCURRENCY in record.learned):
        return record
    base = record or AccountRecord(surface=group[0], account=group[1])
    return replace(base, learned={**base.learned, Limit.CONCURRENCY: _KIMI_CODE_DEFAULT})
