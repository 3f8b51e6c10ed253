"""`stats --plot`: requests and 429s per key (or per account) over the last hours or days, drawn as text bars.

Pure, as views.py: the CLI passes the store's counts, the clock, the width and the symbols in, and prints the
lines. No colour: the marks under the bars carry the 429s, so the chart reads the same in a pipe, with NO_COLOR,
and in ASCII (symbols.PLAIN).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from .account_views import accounts_of
from .models import KeyRecord
from .store import Counts
from .symbols import Symbols

HOUR = 3600
DAY = 86400
MANY_KEYS = 12  # more keys than this: one row per account, so the chart stays a screenful
MAX_LABEL = 20
MIN_CHART = 8  # columns the bars keep when the terminal is narrow; the labels give way first
_TOTALS = "{:>9} {:>6}"  # requests, 429s
_TOTALS_WIDTH = len(_TOTALS.format("", ""))
NONE = Counts(0, 0, 0)


@dataclass(frozen=True)
class Row:
    """One line of the chart: a key or an account, and its counts per bucket (oldest first)."""

    label: str
    counts: tuple[Counts, ...]


def bucket_starts(now: float, n: int, per_hour: bool) -> list[int]:
    """The starts (epoch seconds) of the last `n` UTC hours or days, the current one last."""
    size = HOUR if per_hour else DAY
    last = int(now // size) * size
    return [last - (n - 1 - i) * size for i in range(n)]


def _add(counts: Sequence[Counts]) -> Counts:
    return Counts(*(sum(c[i] for c in counts) for i in range(3)))


def rows(
    keys: Sequence[KeyRecord], counts: Mapping[int, Mapping[int, Counts]], starts: Sequence[int]
) -> tuple[str, list[Row]]:
    """("key", one row per key), or ("account", one row per account) when the pool has more than MANY_KEYS keys.
    `counts` is Store.counts' answer: {key id: {bucket start: Counts}}."""

    def of(members: Sequence[KeyRecord]) -> tuple[Counts, ...]:
        return tuple(_add([counts.get(k.id, {}).get(s, NONE) for k in members]) for s in starts)

    if len(keys) <= MANY_KEYS:
        return "key", [Row(f"[{i}] {k.name}", of([k])) for i, k in enumerate(keys)]
    accounts = accounts_of(keys, {})
    return "account", [
        Row(a.account if a.labelled else f"[{a.keys[0][0]}] {a.keys[0][1].name}", of([k for _, k in a.keys]))
        for a in accounts
    ]


def _columns(n: int, room: int) -> list[range]:
    """The buckets each column of the chart adds up: one each while they fit in `room`, else runs of equal length
    counted back from the newest (so the last column ends now; the first may be short)."""
    run = math.ceil(n / max(room, 1))
    count = math.ceil(n / run)
    return [range(max(0, n - (count - c) * run), n - (count - 1 - c) * run) for c in range(count)]


def _when(start: int, per_hour: bool, with_day: bool) -> str:
    at = datetime.fromtimestamp(start, UTC)
    if not per_hour:
        return at.strftime("%m-%d")
    return at.strftime("%m-%d %H:00" if with_day else "%H:00")


def _fit(label: str, width: int, ellipsis: str) -> str:
    if len(label) <= width:
        return label.ljust(width)
    return label[: max(width - len(ellipsis), 0)] + ellipsis


def draw(of: str, chart_rows: Sequence[Row], starts: Sequence[int], per_hour: bool, width: int,
         sym: Symbols) -> list[str]:
    """The chart's lines, none wider than `width` (unless the terminal is narrower than the totals and MIN_CHART
    bars). Bars share one scale across rows, so rows compare; under a row with 429s, a line marks its columns."""
    n = len(starts)
    unit = "hour" if per_hour else "day"
    if not chart_rows or not any(c.requests for r in chart_rows for c in r.counts):
        return textwrap.wrap(f"No requests recorded in the last {n} {unit}s (UTC).", width) or [""]
    label_width = min(MAX_LABEL, max(len(r.label) for r in chart_rows))
    label_width = max(min(label_width, width - _TOTALS_WIDTH - 2 - min(n, MIN_CHART)), 4)
    room = max(width - label_width - _TOTALS_WIDTH - 2, MIN_CHART)
    columns = _columns(n, room)
    per_column = [[_add([r.counts[i] for i in col]) for col in columns] for r in chart_rows]
    top = max(c.requests for row in per_column for c in row)
    steps = len(sym.bars) - 1
    span = f"{len(columns[-1])} {unit}s" if len(columns[-1]) > 1 else f"one {unit}"
    lines = [
        *textwrap.wrap(
            f"Requests per {of}, last {n} {unit}s (UTC, oldest left, {span} a column); a full bar is {top:,} "
            f"requests. Below a bar: {sym.marks[1]} some were 429s, {sym.marks[2]} 10% or more were.", width
        ),
        "",
    ]
    first, last = _when(starts[columns[0][0]], per_hour, n > 24), _when(starts[-1], per_hour, n > 24)
    chart_width = len(columns)
    if len(first) + 1 + len(last) <= chart_width:
        axis = " " * (label_width + 1) + first.ljust(chart_width - len(last)) + last
    else:  # the newest bucket's time only, reaching left over the labels if the bars are fewer than its letters
        axis = last.rjust(label_width + 1 + chart_width)
    lines.append(axis + " " + _TOTALS.format("requests", "429s"))
    for row, cells in zip(chart_rows, per_column, strict=True):
        bars = "".join(sym.bars[max(1, math.ceil(c.requests * steps / top))] if c.requests else sym.bars[0]
                       for c in cells)
        total = _add(row.counts)
        label = _fit(row.label, label_width, sym.ellipsis)
        lines.append(f"{label} {bars} " + _TOTALS.format(f"{total.requests:,}", f"{total.rate_limited:,}"))
        if total.rate_limited:
            marks = "".join(
                sym.marks[0] if not c.rate_limited else sym.marks[2 if c.rate_limited * 10 >= c.requests else 1]
                for c in cells
            )
            lines.append((" " * (label_width + 1) + marks).rstrip())
    return lines
