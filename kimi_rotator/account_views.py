"""Presentation of accounts: which keys share one, the caps in force there and the quota last seen (`account`,
`list-keys`, `stats`, and their `--json`).

Pure, as views.py: the CLI passes `now`, the keys and the account records in. An account is a key's `limit_group`:
its label on its surface, or, for a key with no label, that key alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .caps import caps_in_force, with_defaults
from .models import UNLABELLED_PREFIX, AccountRecord, CapSource, Group, KeyRecord, Limit, Quota, Surface
from .views import clock

# How each limit reads: in the long form ("200 a minute") and in the short one ("200/min").
LIMIT_NAMES: Mapping[Limit, str] = {
    Limit.RPM: "RPM", Limit.CONCURRENCY: "Concurrency", Limit.TPM: "TPM", Limit.TPD: "TPD",
}
_LONG_UNITS: Mapping[Limit, str] = {
    Limit.RPM: "a minute", Limit.CONCURRENCY: "in flight", Limit.TPM: "tokens a minute", Limit.TPD: "tokens a day",
}
_SHORT_UNITS: Mapping[Limit, str] = {
    Limit.RPM: "/min", Limit.CONCURRENCY: " in flight", Limit.TPM: " tokens/min", Limit.TPD: " tokens/day",
}
# The proxy holds requests back for these; TPM and TPD it only shows (Kimi counts tokens at admission).
ENFORCED = (Limit.RPM, Limit.CONCURRENCY)


@dataclass(frozen=True)
class AccountView:
    """One account of the pool: its keys (with their list-keys indexes) and what is known about its limits."""

    surface: Surface
    account: str  # the label, or "key:<fingerprint>" for a key with no label
    keys: tuple[tuple[int, KeyRecord], ...]
    record: AccountRecord | None

    @property
    def group(self) -> Group:
        return (self.surface, self.account)

    @property
    def labelled(self) -> bool:
        return self.keys[0][1].account is not None

    def title(self) -> str:
        """`Account acme (moonshot-cn)`, or `Key [2] spare (moonshot-cn, no account label)`."""
        if self.labelled:
            return f"Account {self.account} ({self.surface.value})"
        index, key = self.keys[0]
        return f"Key [{index}] {key.name} ({self.surface.value}, no account label)"

    def known(self) -> bool:
        return is_known(self.record)


def is_known(record: AccountRecord | None) -> bool:
    """Whether any cap or quota is known for the account."""
    return record is not None and bool(record.stated or record.learned or record.quota)


def accounts_of(keys: Sequence[KeyRecord], records: Mapping[Group, AccountRecord]) -> list[AccountView]:
    """The accounts of the pool's keys, in the order of their first key. Records of accounts that have no key left
    are not shown: nothing would count against their caps."""
    members: dict[Group, list[tuple[int, KeyRecord]]] = {}
    for i, k in enumerate(keys):
        members.setdefault(k.limit_group, []).append((i, k))
    return [AccountView(g[0], g[1], tuple(ks), with_defaults(records.get(g), g)) for g, ks in members.items()]


def named(accounts: Sequence[AccountView], label: str) -> list[AccountView]:
    """The accounts a label names, one per surface it is on (`key:<fingerprint>` names a key's own account)."""
    return [a for a in accounts if a.account == label and (a.labelled or label.startswith(UNLABELLED_PREFIX))]


# -- caps ---------------------------------------------------------------------------------------


def _kind(record: AccountRecord, limit: Limit) -> str:
    """One word for where a cap in force comes from: stated, learned (from Kimi's answers), tier or default."""
    if limit in record.stated:
        return "stated"
    source = record.learned[limit].source
    return "learned" if source in (CapSource.MESSAGE, CapSource.HEADER) else source.value


def _short_count(n: int) -> str:
    """`200`, `1.5M`, `2M`: three digits at most, for the one-line forms."""
    if n < 1000:
        return str(n)
    for size, suffix in ((10**12, "T"), (10**9, "G"), (10**6, "M"), (10**3, "k")):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return str(n)  # not reached


def caps_short(record: AccountRecord | None) -> str | None:
    """The caps in force on one line, `200/min, 50 in flight (stated)`, or `200/min (stated), 50 in flight
    (learned)` when they come from different places; None when none is known."""
    if record is None:
        return None
    in_force = caps_in_force(record)
    if not in_force:
        return None
    kinds = [_kind(record, limit) for limit in in_force]
    parts = [f"{_short_count(value)}{_SHORT_UNITS[limit]}" for limit, (value, _) in in_force.items()]
    if len(set(kinds)) == 1:
        return f"{', '.join(parts)} ({kinds[0]})"
    return ", ".join(f"{part} ({kind})" for part, kind in zip(parts, kinds, strict=True))


def caps_lines(record: AccountRecord | None, now: float) -> list[str]:
    """A line per cap in force, with where it comes from; a stated cap also says what Kimi's was, if one was
    learned: `RPM: 100 a minute (stated; learned 200, from a 429 at 14:02)`."""
    in_force = caps_in_force(record, now)
    if record is None or not in_force:
        return ["Caps: none known yet"]
    learned = caps_in_force(replace(record, stated={}), now)
    lines = []
    for limit, (value, how) in in_force.items():
        notes = [how]
        if limit in record.stated and limit in learned:
            kimis, how_learned = learned[limit]
            notes.append(f"learned {kimis:,}, {how_learned.removeprefix('learned ')}")
        if limit not in ENFORCED:
            notes.append("shown, not enforced")
        lines.append(f"{LIMIT_NAMES[limit]}: {value:,} {_LONG_UNITS[limit]} ({'; '.join(notes)})")
    return lines


def caps_json(record: AccountRecord | None, now: float) -> dict[str, dict[str, Any]]:
    """{limit: {value, how, source, at}} for each cap in force. source: stated, default, tier, header or message;
    at: when it was learned (epoch s; null for a stated cap)."""
    if record is None:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for limit, (value, how) in caps_in_force(record, now).items():
        cap = None if limit in record.stated else record.learned[limit]
        out[limit.value] = {"value": value, "how": how, "source": cap.source.value if cap else "stated",
                            "at": (cap.at or None) if cap else None}
    return out


def learned_json(record: AccountRecord | None) -> dict[str, dict[str, Any]]:
    """Every cap learned from Kimi, also where a stated one overrides it: {limit: {value, source, at, detail}}."""
    if record is None:
        return {}
    return {limit.value: {"value": cap.value, "source": cap.source.value, "at": cap.at or None,
                          "detail": cap.detail or None}
            for limit, cap in sorted(record.learned.items(), key=lambda item: list(Limit).index(item[0]))}


# -- quota --------------------------------------------------------------------------------------


def _amount(x: float) -> str:
    return f"{int(x):,}" if x == int(x) else f"{x:,.2f}"


def _balance(balance: float) -> str:
    return f"balance {balance:,.2f}" + (" (used up: Kimi refuses requests until a top-up)" if balance <= 0 else "")


def _left(remaining: float, limit: float | None) -> str:
    return f"{_amount(remaining)} of {_amount(limit)} left" if limit is not None else f"{_amount(remaining)} left"


def quota_short(quota: Quota | None, now: float) -> str | None:
    """The quota on one line: `balance 49.59 (checked 13:58)`, `5h 85 of 100 left, weekly used up until 18:00
    (checked 13:58)`; None when no probe has said anything."""
    if quota is None:
        return None
    parts = [_balance(quota.balance)] if quota.balance is not None else []
    for w in quota.windows:
        if w.remaining <= 0:
            parts.append(f"{w.name} used up" + (f" until {clock(w.reset_at, now)}" if w.reset_at else ""))
        else:
            parts.append(f"{w.name} {_left(w.remaining, w.limit)}")
    return f"{', '.join(parts) or 'nothing reported'} (checked {clock(quota.checked_at, now)})"


def quota_lines(quota: Quota | None, now: float) -> list[str]:
    """`Quota (checked 13:58): balance 49.59`, or a heading and a line per window with its reset time."""
    if quota is None:
        return ["Quota: not known yet"]
    checked = f"checked {clock(quota.checked_at, now)}" + (f", level {quota.level}" if quota.level else "")
    if not quota.windows:
        return [f"Quota ({checked}): {_balance(quota.balance) if quota.balance is not None else 'nothing reported'}"]
    lines = [f"Quota ({checked}):" + (f" {_balance(quota.balance)}" if quota.balance is not None else "")]
    for w in quota.windows:
        line = f"   {w.name}: {_left(w.remaining, w.limit)}"
        if w.reset_at is not None:
            when = clock(w.reset_at, now)
            if w.remaining <= 0:
                line += f", used up until {when}" if w.reset_at > now else f", used up; reset at {when}"
            else:
                line += f", resets {when}" if w.reset_at > now else f", reset at {when}"
        lines.append(line)
    return lines


def quota_json(quota: Quota | None) -> dict[str, Any] | None:
    """null, or {checked_at, balance, level, windows: [{name, limit, remaining, reset_at}], exhausted_until}."""
    if quota is None:
        return None
    return {
        "checked_at": quota.checked_at,
        "balance": quota.balance,
        "level": quota.level,
        "windows": [{"name": w.name, "limit": w.limit, "remaining": w.remaining, "reset_at": w.reset_at}
                    for w in quota.windows],
        "exhausted_until": quota.exhausted_until(),
    }


# -- whole accounts -----------------------------------------------------------------------------


def account_lines(view: AccountView, now: float) -> list[str]:
    """What `kimi-rotate account` prints for one account: its title, its keys, a line per cap, the quota."""
    lines = [view.title()]
    if view.labelled:
        lines.append("   Keys: " + ", ".join(f"[{i}] {k.name}" for i, k in view.keys))
    record = view.record
    lines += ["   " + line for line in [*caps_lines(record, now), *quota_lines(record.quota if record else None, now)]]
    return lines


def account_summary(view: AccountView, now: float) -> list[str]:
    """The short form, for `stats`: the title, then the caps and the quota on a line each (where known)."""
    record = view.record
    lines = [view.title()]
    if (caps := caps_short(record)) is not None:
        lines.append(f"   Caps: {caps}")
    if record is not None and (quota := quota_short(record.quota, now)) is not None:
        lines.append(f"   Quota: {quota}")
    return lines


def account_json(view: AccountView, now: float) -> dict[str, Any]:
    """One account of `account --json` and `stats --json`. Scripts rely on these names and types: only ever add
    fields. surface; account (the label, or "key:<fingerprint>"); labelled (bool); keys: [{index, name,
    fingerprint}]; caps (see caps_json); learned (see learned_json); quota (see quota_json)."""
    record = view.record
    return {
        "surface": view.surface.value,
        "account": view.account,
        "labelled": view.labelled,
        "keys": [{"index": i, "name": k.name, "fingerprint": k.fingerprint} for i, k in view.keys],
        "caps": caps_json(record, now),
        "learned": learned_json(record),
        "quota": quota_json(record.quota if record else None),
    }
