"""`stats --plot`'s drawing: exact lines for a given data set, width and symbol set."""

from __future__ import annotations

from kimi_rotator import plot
from kimi_rotator.models import KeyRecord, Secret, Surface
from kimi_rotator.store import Counts
from kimi_rotator.symbols import FANCY, PLAIN

NOW = 1_750_000_000.0  # 2025-06-15 15:06:40 UTC
HOUR_START = 1_749_999_600  # 15:00 UTC
DAY_START = 1_749_945_600  # 2025-06-15 00:00 UTC


def test_bucket_starts_end_with_the_current_hour_or_day() -> None:
    assert plot.bucket_starts(NOW, 3, True) == [HOUR_START - 7200, HOUR_START - 3600, HOUR_START]
    assert plot.bucket_starts(NOW, 2, False) == [DAY_START - 86_400, DAY_START]


def six_hours() -> list[plot.Row]:
    main = tuple(Counts(r, r - x, x) for r, x in [(0, 0), (2, 0), (4, 0), (8, 0), (16, 1), (16, 4)])
    spare = tuple(Counts(r, r, 0) for r in [1, 0, 0, 0, 0, 1])
    return [plot.Row("[0] main", main), plot.Row("[1] spare", spare)]


def test_one_column_per_hour_on_one_scale_with_429s_marked() -> None:
    lines = plot.draw("key", six_hours(), plot.bucket_starts(NOW, 6, True), True, 80, FANCY)
    assert lines == [
        "Requests per key, last 6 hours (UTC, oldest left, one hour a column); a full bar",
        "is 16 requests. Below a bar: · some were 429s, ! 10% or more were.",
        "",
        "           15:00  requests   429s",
        "[0] main   ▁▂▄██        46      5",
        "              ·!",  # 1 of 16 is under 10%; 4 of 16 is not
        "[1] spare ▁    ▁         2      0",  # no 429s: no line of marks
    ]


def test_a_narrow_ascii_terminal_cuts_labels_not_bars() -> None:
    lines = plot.draw("key", six_hours(), plot.bucket_starts(NOW, 6, True), True, 30, PLAIN)
    assert lines == [
        "Requests per key, last 6 hours",
        "(UTC, oldest left, one hour a",
        "column); a full bar is 16",
        "requests. Below a bar: . some",
        "were 429s, ! 10% or more were.",
        "",
        "        15:00  requests   429s",
        "[0]...  .:=@@        46      5",
        "           .!",
        "[1]... .    .         2      0",
    ]
    assert all(len(line) <= 30 and line.isascii() for line in lines)


def test_more_hours_than_columns_adds_them_up_ending_now() -> None:
    daily_cycle = tuple(Counts(i % 24, i % 24, 1 if i % 24 == 23 else 0) for i in range(72))
    lines = plot.draw("key", [plot.Row("[0] main", daily_cycle)], plot.bucket_starts(NOW, 72, True), True, 50, FANCY)
    assert lines == [
        "Requests per key, last 72 hours (UTC, oldest left,",
        "3 hours a column); a full bar is 66 requests.",
        "Below a bar: · some were 429s, ! 10% or more were.",
        "",
        "         06-12 16:00  06-15 15:00  requests   429s",
        "[0] main ▁▂▃▄▅▆▇█▁▂▃▄▅▆▇█▁▂▃▄▅▆▇█       828      3",
        "                ·       ·       ·",
    ]
    assert all(len(line) <= 50 for line in lines)


def test_days_per_account() -> None:
    rows = [
        plot.Row("acme", tuple(Counts(100 * i, 90 * i, 10 * i) for i in range(14))),
        plot.Row("[2] solo", (plot.NONE,) * 13 + (Counts(3, 0, 3),)),
    ]
    assert plot.draw("account", rows, plot.bucket_starts(NOW, 14, False), False, 60, FANCY) == [
        "Requests per account, last 14 days (UTC, oldest left, one",
        "day a column); a full bar is 1,300 requests. Below a bar: ·",
        "some were 429s, ! 10% or more were.",
        "",
        "         06-02    06-15  requests   429s",
        "acme      ▁▂▂▃▄▄▅▅▆▇▇██     9,100    910",
        "          !!!!!!!!!!!!!",
        "[2] solo              ▁         3      3",
        "                      !",
    ]


def test_nothing_recorded() -> None:
    starts = plot.bucket_starts(NOW, 3, False)
    assert plot.draw("key", [plot.Row("[0] a", (plot.NONE,) * 3)], starts, False, 60, FANCY) == [
        "No requests recorded in the last 3 days (UTC)."
    ]


def key(i: int, account: str | None) -> KeyRecord:
    return KeyRecord(id=100 + i, secret=Secret(f"sk-kimi-plot{i:016d}"), fingerprint=f"fp{i}", name=f"k{i}",
                     surface=Surface.KIMI_CODE, account=account, added_at=0.0)


def test_rows_per_key_or_per_account_when_many() -> None:
    starts = plot.bucket_starts(NOW, 2, True)
    counts = {
        100: {HOUR_START: Counts(2, 1, 1)},
        101: {HOUR_START - 3600: Counts(1, 1, 0), HOUR_START: Counts(3, 3, 0)},
    }
    few = [key(0, "acme"), key(1, "acme")]
    assert plot.rows(few, counts, starts) == ("key", [
        plot.Row("[0] k0", (plot.NONE, Counts(2, 1, 1))),
        plot.Row("[1] k1", (Counts(1, 1, 0), Counts(3, 3, 0))),
    ])
    many = few + [key(i, None) for i in range(2, plot.MANY_KEYS + 1)]
    of, rows = plot.rows(many, counts, starts)
    assert of == "account" and len(rows) == plot.MANY_KEYS
    assert rows[0] == plot.Row("acme", (Counts(1, 1, 0), Counts(5, 4, 1)))
    assert rows[1] == plot.Row("[2] k2", (plot.NONE, plot.NONE))
