"""Presentation helpers for large pools: the one-line-per-key table, clock times, and `stats --json`.

Nothing here reads the clock or the store: the CLI passes `now` and the records in.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

from .keys import mask
from .models import KeyRecord
from .symbols import symbols

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


def stats_json(
    keys: Sequence[KeyRecord], daily: dict[int, dict[str, tuple[int, int]]], today: str, week_start: str
) -> dict[str, Any]:
    """The document `stats --json` prints. Scripts rely on these names and types: only ever add fields.

    keys: one object per key (index, name, masked_key, fingerprint, surface, account, the four request
    counters, success_rate, avg/min/max_response_ms, requests_today, requests_last_7_days); total: the
    same counts over the pool plus `keys`; today / week_start: the UTC days the daily counts cover.
    """
    rows = []
    for i, k in enumerate(keys):
        days = daily.get(k.id, {})
        row: dict[str, Any] = {
            "index": i,
            "name": k.name,
            "masked_key": mask(k.secret.get_secret_value()),
            "fingerprint": k.fingerprint,
            "surface": k.surface.value,
            "account": k.account,
        }
        row.update(
            _counts(
                k.total_requests, k.successful_requests, k.rate_limited_requests, k.failed_requests,
                k.latency_count, k.latency_sum_ms, k.latency_min_ms, k.latency_max_ms,
                days.get(today, (0, 0))[0], sum(req for req, _ in days.values()),
            )
        )
        rows.append(row)
    mins = [k.latency_min_ms for k in keys if k.latency_min_ms is not None]
    maxes = [k.latency_max_ms for k in keys if k.latency_max_ms is not None]
    total: dict[str, Any] = {"keys": len(keys)}
    total.update(
        _counts(
            sum(k.total_requests for k in keys), sum(k.successful_requests for k in keys),
            sum(k.rate_limited_requests for k in keys), sum(k.failed_requests for k in keys),
            sum(k.latency_count for k in keys), sum(k.latency_sum_ms for k in keys),
            min(mins, default=None), max(maxes, default=None),
            sum(r["requests_today"] for r in rows), sum(r["requests_last_7_days"] for r in rows),
        )
    )
    return {"today": today, "week_start": week_start, "keys": rows, "total": total}


def _counts(
    total: int, ok: int, limited: int, failed: int,
    samples: int, latency_sum: float, lo: float | None, hi: float | None,
    today: int, week: int,
) -> dict[str, Any]:
    return {
        "total_requests": total,
        "successful_requests": ok,
        "rate_limited_requests": limited,
        "failed_requests": failed,
        "success_rate": round(ok / total * 100, 1) if total else None,
        "avg_response_ms": round(latency_sum / samples) if samples else None,
        "min_response_ms": round(lo) if lo is not None else None,
        "max_response_ms": round(hi) if hi is not None else None,
        "requests_today": today,
        "requests_last_7_days": week,
    }
