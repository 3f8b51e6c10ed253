"""Presentation: the key-status table (`list-keys`, `kimi.status`), clock times, and the figures `stats` shows.

Nothing here reads the clock or the store, or imports mitmproxy: the CLI and the addon pass `now` and the records in.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from . import engine
from .keys import mask
from .models import KeyRecord, KeyState, PoolSettings, Quota
from .roster import Roster
from .symbols import FANCY, Symbols, symbols

if TYPE_CHECKING:
    from .probe import ProbeResult

MIN_SHRUNK_WIDTH = 8
LAST_ROOM = 24


def clock(ts: float, now: float) -> str:
    """A moment as local wall-clock time, `14:05`, with the date when it is not today: `2027-01-16 03:00`.
    Rounded up to the minute, so a cooldown shown as ending at 14:05 is over by then."""
    minute = math.ceil(ts / 60) * 60
    at = datetime.fromtimestamp(minute)
    if at.date() == datetime.fromtimestamp(now).date():
        return at.strftime("%H:%M")
    return at.strftime("%Y-%m-%d %H:%M")


def pct(value: float) -> int:
    # Round half up, as the reference (JS Math.round) does: 85 → 9 blocks, 25 → 3.
    return math.floor(value + 0.5)


def time_left(seconds: float) -> str:
    minutes = max(1, math.ceil(seconds / 60))
    if minutes < 60:
        return f"~{minutes}m"
    hours, rest = divmod(minutes, 60)
    if hours < 48:
        return f"~{hours}h{rest:02d}m" if rest else f"~{hours}h"
    return f"~{math.ceil(seconds / 86400)}d"


def cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - len(symbols().ellipsis))].rstrip() + symbols().ellipsis


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    width: int | None,
    *,
    right: Collection[int] = (),
    caps: Mapping[int, int] | None = None,
    shrink: int | None = None,
    optional: Sequence[int] = (),
) -> list[str]:
    """Lines of a plain text table, fitted to `width` (None: no limit) where it can be.

    Cells longer than their column's cap are cut with `…`. While the last column (the one that
    says most) would get fewer than LAST_ROOM characters, column `shrink` narrows to twice
    MIN_SHRUNK_WIDTH, the `optional` columns are left out in turn, and `shrink` narrows on down to
    MIN_SHRUNK_WIDTH; each line is cut at `width` last. Columns in `right` are right-aligned; the
    last one is not padded.
    """
    n = len(header)
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(n)]
    for c, cap in (caps or {}).items():
        widths[c] = min(widths[c], max(cap, len(header[c])))
    shown = list(range(n))
    if width is not None:

        def over() -> int:
            return sum(widths[c] for c in shown[:-1]) + 2 * (len(shown) - 1) + min(widths[-1], LAST_ROOM) - width

        def narrow(floor: int) -> None:
            if shrink is not None and over() > 0:
                widths[shrink] = max(floor, len(header[shrink]), min(widths[shrink], widths[shrink] - over()))

        narrow(2 * MIN_SHRUNK_WIDTH)
        for c in optional:
            if over() <= 0:
                break
            shown.remove(c)
        narrow(MIN_SHRUNK_WIDTH)
    lines = []
    for row in [header, *rows]:
        cells = []
        for c in shown:
            text = cut(row[c], widths[c])
            if c == n - 1:
                cells.append(text)
            else:
                cells.append(text.rjust(widths[c]) if c in right else text.ljust(widths[c]))
        line = "  ".join(cells).rstrip()
        lines.append(cut(line, width) if width is not None else line)
    return lines


# -- the key-status table ---------------------------------------------------------------------


@dataclass(frozen=True)
class KeyStatus:
    """One key as `list-keys` and `kimi.status` show it at one moment."""

    index: int  # in the pool's order, as the commands take it
    key: KeyRecord
    current: bool  # the key its surface is on (list-keys' ●)
    health: float  # with the time-based recovery when the pool has it on
    state: KeyState
    reason: str | None  # why it is cooling or disabled

    def state_text(self, now: float) -> str:
        """`active`, `cooling until 14:05 (~5m): <why>` or `disabled: <why>`."""
        if self.state is KeyState.COOLING and self.key.cooldown_until is not None:
            until = self.key.cooldown_until
            return f"cooling until {clock(until, now)} ({time_left(until - now)}): {self.reason or 'cooldown'}"
        if self.state is KeyState.DISABLED:
            return f"disabled: {self.reason}"
        return "active"


def key_identity(index: int, key: KeyRecord) -> dict[str, Any]:
    """The fields that name a key in every --json output: index, name, masked_key, fingerprint, surface."""
    return {
        "index": index,
        "name": key.name,
        "masked_key": mask(key.secret.get_secret_value()),
        "fingerprint": key.fingerprint,
        "surface": key.surface.value,
    }


def key_status(index: int, key: KeyRecord, settings: PoolSettings, now: float, current: bool) -> KeyStatus:
    state = key.state_at(now)
    reason = {KeyState.DISABLED: key.disabled_reason, KeyState.COOLING: key.cooldown_reason}.get(state)
    return KeyStatus(index, key, current, engine.health_at(key, now, settings.auto_refresh_health), state, reason)


def key_statuses(roster: Roster, settings: PoolSettings, now: float) -> list[KeyStatus]:
    """Every key of the pool, in order; `current` marks each surface's current key, or the one its next request
    goes to (a fresh pool is on that key, not on none)."""
    current = current_ids(roster, settings, now)
    return [key_status(i, k, settings, now, k.id in current) for i, k in enumerate(roster.keys)]


def current_ids(roster: Roster, settings: PoolSettings, now: float) -> set[int]:
    return {k.id for k in engine.current_keys(roster, settings, now).values()}


def status_table(statuses: Sequence[KeyStatus], width: int | None, now: float, sym: Symbols) -> list[str]:
    """The key-status table, one line per key (list-keys --compact), fitted to `width` where it can be."""
    digits = len(str(statuses[-1].index))
    header = (" " * (digits + 1) + "#", "NAME", "KEY", "SURFACE", "ACCOUNT", "HEALTH", "OK/ALL", "STATE")
    rows = [
        (f"{sym.current if s.current else ' '} {s.index:>{digits}}", s.key.name,
         mask(s.key.secret.get_secret_value(), sym.ellipsis), s.key.surface.value, s.key.account or "-",
         f"{pct(s.health)}%", f"{s.key.successful_requests}/{s.key.total_requests}", s.state_text(now))
        for s in statuses
    ]
    return table(header, rows, width, right={5, 6}, caps={1: 24, 4: 16}, shrink=1, optional=(2, 4))


def status_text(roster: Roster, settings: PoolSettings, now: float) -> str:
    """What `kimi.status` answers at the mitmproxy prompt (always UTF-8): the strategy, then a line per key."""
    lines = [f"strategy: {settings.strategy.value}"]
    for s in key_statuses(roster, settings, now):
        marker, k = FANCY.current if s.current else FANCY.other, s.key
        lines.append(f"{marker} [{s.index}] {k.name} {mask(k.secret.get_secret_value())} {k.surface.value} "
                     f"health {pct(s.health)} {s.state_text(now)}")
    return "\n".join(lines)


# -- `check`: what the probes found ------------------------------------------------------------


@dataclass(frozen=True)
class Checked:
    """One key `check` probed: its index, its record once the result was recorded, and the result."""

    index: int
    key: KeyRecord
    result: ProbeResult


def quota_text(quota: Quota | None, now: float) -> str:
    """`balance 49.59`, or each window as `5h 85/100 until 14:05`; `-` when the probe gave none."""
    if quota is None:
        return "-"
    parts = [f"balance {quota.balance:.2f}"] if quota.balance is not None else []
    for w in quota.windows:
        left = f"{w.remaining:g}/{w.limit:g}" if w.limit is not None else f"{w.remaining:g} left"
        parts.append(f"{w.name} {left}" + (f" until {clock(w.reset_at, now)}" if w.reset_at is not None else ""))
    return ", ".join(parts) or "-"


def check_text(result: ProbeResult) -> str:
    verdict = {True: "valid", False: "invalid", None: "unknown"}[result.valid]
    return verdict if result.valid and result.status.startswith("2") else f"{verdict}: {result.status}"


def check_table(rows: Sequence[Checked], width: int | None, now: float, sym: Symbols) -> list[str]:
    """`check`'s table, one line per key, fitted to `width` where it can be."""
    header = ("#", "NAME", "KEY", "SURFACE", "ACCOUNT", "CHECK", "QUOTA", "STATE")
    lines = [
        (str(c.index), c.key.name, mask(c.key.secret.get_secret_value(), sym.ellipsis), c.key.surface.value,
         c.key.account or "-", check_text(c.result), quota_text(c.result.quota, now),
         key_status(c.index, c.key, PoolSettings(), now, False).state_text(now))
        for c in rows
    ]
    return table(header, lines, width, right={0}, caps={1: 24, 4: 16, 5: 40}, shrink=1, optional=(2, 3, 4))


def check_json(c: Checked, now: float) -> dict[str, Any]:
    """One element of `check --json`. Scripts rely on these names and types: only ever add fields.

    index, name, masked_key, fingerprint, surface: as in list-keys --json. valid (bool|null: null when it could
    not be told), status (str: "200", "401 invalid_authentication_error", or why no answer came), probe (the path
    that answered last), account_hint (str|null: the account Kimi named), checked_at (epoch s|null), balance
    (number|null, Open Platform), level (str|null, Kimi Code membership), windows (list of {name, limit
    (number|null), remaining, reset_at (epoch s|null)}, Kimi Code); then, once the result was recorded: account
    (str|null), state ("active"|"cooling"|"disabled"), reason (str|null), cooldown_until (epoch s|null).
    """
    k, r, q = c.key, c.result, c.result.quota
    status = key_status(c.index, k, PoolSettings(), now, False)
    return {
        **key_identity(c.index, k),
        "valid": r.valid,
        "status": r.status,
        "probe": r.path,
        "account_hint": r.account_hint,
        "checked_at": q.checked_at if q is not None else None,
        "balance": q.balance if q is not None else None,
        "level": q.level if q is not None else None,
        "windows": [asdict(w) for w in q.windows] if q is not None else [],
        "account": k.account,
        "state": status.state.value,
        "reason": status.reason,
        "cooldown_until": k.cooldown_until if status.state is KeyState.COOLING else None,
    }


# -- stats --------------------------------------------------------------------------------------

# The store's daily counts: {key id: {UTC day: (requests, successes)}}.
Daily = Mapping[int, Mapping[str, tuple[int, int]]]


@dataclass(frozen=True)
class Usage:
    """What `stats` shows of one key or of the pool; the field names are `stats --json`'s."""

    total_requests: int
    successful_requests: int
    rate_limited_requests: int
    failed_requests: int
    success_rate: float | None  # percent, one decimal; None before the first request
    avg_response_ms: int | None  # None while no response time was measured
    min_response_ms: int | None
    max_response_ms: int | None
    requests_today: int
    requests_last_7_days: int


@dataclass(frozen=True)
class UsageStats:
    keys: list[Usage]  # in the order of the keys given
    total: Usage


def usage_stats(keys: Sequence[KeyRecord], daily: Daily, today: str) -> UsageStats:
    """Per key and over the pool. `daily` holds the days that count as the last 7; `today` is the one of them
    that counts as today."""
    rows = [
        _usage(
            k.total_requests, k.successful_requests, k.rate_limited_requests, k.failed_requests,
            k.latency_count, k.latency_sum_ms, k.latency_min_ms, k.latency_max_ms,
            daily.get(k.id, {}).get(today, (0, 0))[0], sum(req for req, _ in daily.get(k.id, {}).values()),
        )
        for k in keys
    ]
    mins = [k.latency_min_ms for k in keys if k.latency_min_ms is not None]
    maxes = [k.latency_max_ms for k in keys if k.latency_max_ms is not None]
    total = _usage(
        sum(k.total_requests for k in keys), sum(k.successful_requests for k in keys),
        sum(k.rate_limited_requests for k in keys), sum(k.failed_requests for k in keys),
        sum(k.latency_count for k in keys), sum(k.latency_sum_ms for k in keys),
        min(mins, default=None), max(maxes, default=None),
        sum(r.requests_today for r in rows), sum(r.requests_last_7_days for r in rows),
    )
    return UsageStats(rows, total)


def _usage(
    total: int, ok: int, limited: int, failed: int,
    samples: int, latency_sum: float, lo: float | None, hi: float | None,
    today: int, week: int,
) -> Usage:
    return Usage(
        total_requests=total,
        successful_requests=ok,
        rate_limited_requests=limited,
        failed_requests=failed,
        success_rate=round(ok / total * 100, 1) if total else None,
        avg_response_ms=round(latency_sum / samples) if samples else None,
        min_response_ms=round(lo) if lo is not None else None,
        max_response_ms=round(hi) if hi is not None else None,
        requests_today=today,
        requests_last_7_days=week,
    )


def stats_json(
    keys: Sequence[KeyRecord], daily: Daily, today: str, week_start: str
) -> dict[str, Any]:
    """The document `stats --json` prints. Scripts rely on these names and types: only ever add fields.

    keys: one object per key (index, name, masked_key, fingerprint, surface, account, then Usage's fields);
    total: Usage's fields over the pool plus `keys`; today / week_start: the UTC days the daily counts cover.
    """
    usage = usage_stats(keys, daily, today)
    rows = [
        {**key_identity(i, k), "account": k.account, **asdict(u)}
        for i, (k, u) in enumerate(zip(keys, usage.keys, strict=True))
    ]
    return {"today": today, "week_start": week_start, "keys": rows, "total": {"keys": len(keys), **asdict(usage.total)}}
