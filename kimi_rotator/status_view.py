"""What `kimi-rotate status` shows: the whole pool at one moment, grouped by account (pure, as views.py).

The CLI passes in a store snapshot, the running proxies' heartbeat rows and `now`. The live counts (in flight,
sent in the last minute) are the proxies' own, as each wrote them with its last heartbeat: the sum over the proxies
serving the store, at most a heartbeat old. "Last error" is what the store keeps of a key's last failure: why it is
disabled, else why it last cooled down (kept until a success clears it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import account_views
from .accounts_db import ProxyRow
from .caps import caps_in_force
from .keys import mask
from .models import Group, KeyState, Limit, Quota, Surface
from .roster import Roster
from .store import Snapshot
from .symbols import Symbols
from .views import KeyStatus, clock, cut, key_statuses, pct, table, time_left


@dataclass(frozen=True)
class KeyLine:
    status: KeyStatus
    last_error: str | None

    @property
    def until(self) -> float | None:
        key = self.status.key
        return key.cooldown_until if self.status.state is KeyState.COOLING else None


@dataclass(frozen=True)
class AccountStatus:
    surface: Surface
    account: str
    title: str
    labelled: bool
    concurrency: int | None  # the account's caps in force (all proxies together)
    rpm: int | None
    in_flight: int
    last_minute: int
    quota: Quota | None
    keys: tuple[KeyLine, ...]


@dataclass(frozen=True)
class PoolStatus:
    now: float
    strategy: str
    proxies: tuple[ProxyRow, ...]
    accounts: tuple[AccountStatus, ...]


def pool_status(snap: Snapshot, proxies: Sequence[ProxyRow], now: float) -> PoolStatus:
    statuses = {s.key.id: s for s in key_statuses(Roster(snap.keys), snap.settings, now)}
    usage: dict[Group, tuple[int, int]] = {}
    for row in proxies:
        for group, (flying, minute) in row.usage.items():
            f, m = usage.get(group, (0, 0))
            usage[group] = (f + flying, m + minute)
    accounts = []
    for view in account_views.accounts_of(snap.keys, snap.accounts):
        in_force = caps_in_force(view.record)
        concurrency, rpm = (in_force.get(limit, (None, ""))[0] for limit in (Limit.CONCURRENCY, Limit.RPM))
        flying, minute = usage.get(view.group, (0, 0))
        lines = tuple(KeyLine(statuses[k.id], k.disabled_reason or k.cooldown_reason) for _, k in view.keys)
        accounts.append(AccountStatus(view.surface, view.account, view.title(), view.labelled, concurrency, rpm,
                                      flying, minute, view.record.quota if view.record else None, lines))
    return PoolStatus(now, snap.settings.strategy.value, tuple(proxies), tuple(accounts))


# -- text ----------------------------------------------------------------------------------------


def _of(count: int, cap: int | None) -> str:
    return f"{count} of {cap}" if cap is not None else f"{count} (no cap known)"


def proxy_line(status: PoolStatus) -> str:
    if not status.proxies:
        return "Proxy: none is serving this store now"
    first = status.proxies[0]
    others = f" (+{len(status.proxies) - 1} more)" if len(status.proxies) > 1 else ""
    return f"Proxy: serving this store, pid {first.pid} since {clock(first.started, status.now)}{others}"


def _state(line: KeyLine, now: float) -> str:
    if line.until is not None:
        return f"cooling {time_left(line.until - now)} (until {clock(line.until, now)})"
    return line.status.state.value


def status_lines(status: PoolStatus, width: int | None, sym: Symbols) -> list[str]:
    """The screen: a heading, the proxy line, then each account with its counts, quota and keys' table."""
    now = status.now
    fit = (lambda text: cut(text, width)) if width is not None else (lambda text: text)
    lines = [fit(f"kimi-rotate status at {clock(now, now)} (strategy: {status.strategy})"), fit(proxy_line(status))]
    if not status.accounts:
        return [*lines, "", "No keys configured. Add one with: kimi-rotate add-key"]
    for a in status.accounts:
        lines += ["", fit(a.title),
                  fit(f"   In flight {_of(a.in_flight, a.concurrency)}; last minute {_of(a.last_minute, a.rpm)}")]
        if a.quota is not None:  # with each window's reset time
            lines += [fit("   " + line) for line in account_views.quota_lines(a.quota, now)]
        rows = [(f"{sym.current if k.status.current else ' '} {k.status.index}", k.status.key.name,
                 mask(k.status.key.secret.get_secret_value(), sym.ellipsis), f"{pct(k.status.health)}%",
                 _state(k, now), k.last_error or "-") for k in a.keys]
        header = ("  #", "NAME", "KEY", "HEALTH", "STATE", "LAST ERROR")
        inner = width - 3 if width is not None else None
        lines += ["   " + line for line in table(header, rows, inner, right={3}, caps={1: 24}, shrink=1,
                                                    optional=(2, 3))]
    return lines


# -- JSON ----------------------------------------------------------------------------------------


def status_json(status: PoolStatus) -> dict[str, Any]:
    now = status.now
    return {
        "now": now,
        "strategy": status.strategy,
        "serving": bool(status.proxies),
        "proxies": [{"pid": p.pid, "since": p.started, "seen": p.seen} for p in status.proxies],
        "accounts": [
            {
                "surface": a.surface.value,
                "account": a.account if a.labelled else None,
                "caps": {"concurrency": a.concurrency, "rpm": a.rpm},
                "in_flight": a.in_flight,
                "last_minute": a.last_minute,
                "quota": account_views.quota_json(a.quota),
                "keys": [
                    {
                        "index": k.status.index,
                        "name": k.status.key.name,
                        "masked_key": mask(k.status.key.secret.get_secret_value()),
                        "fingerprint": k.status.key.fingerprint,
                        "current": k.status.current,
                        "state": k.status.state.value,
                        "until": k.until,
                        "seconds_left": max(0.0, k.until - now) if k.until is not None else None,
                        "health": pct(k.status.health),
                        "last_error": k.last_error,
                    }
                    for k in a.keys
                ],
            }
            for a in status.accounts
        ],
    }
