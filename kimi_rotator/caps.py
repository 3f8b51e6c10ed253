"""Provisional: merging learned caps (replaced by the caps helper's module)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from .models import AccountRecord, Group, LearnedCap


def merge_caps(record: AccountRecord | None, group: Group, caps: Iterable[LearnedCap], now: float
               ) -> AccountRecord | None:
    base = record or AccountRecord(surface=group[0], account=group[1])
    learned = dict(base.learned)
    for cap in caps:
        old = learned.get(cap.limit)
        if old is not None and (old.source.strength > cap.source.strength or
                                (old.value == cap.value and old.source is cap.source)):
            continue
        learned[cap.limit] = replace(cap, at=now)
    if learned == base.learned and record is not None:
        return None
    return replace(base, learned=learned)
