"""`kimi-rotate stats --plot` (cli.py's `stats` hands over here): requests and 429s per key over the last hours or
days, from the store's hourly and daily counts, drawn by plot.py to the terminal's width."""

from __future__ import annotations

import shutil

import typer

from . import plot
from .store import HOURLY_KEPT_HOURS, Store
from .symbols import symbols

DEFAULT_HOURS = 24
MAX_HOURS = HOURLY_KEPT_HOURS
MAX_DAYS = 366
PIPE_WIDTH = 80  # output that is not a terminal


def check_range(hours: int | None, days: int | None) -> None:
    """A usage error (exit 2) unless at most one of --hours and --days is given."""
    if hours is not None and days is not None:
        raise typer.BadParameter("give --hours or --days, not both", param_hint="'--hours' / '--days'")


def print_plot(store: Store, now: float, hours: int | None, days: int | None) -> None:
    per_hour = days is None
    n = days if days is not None else hours or DEFAULT_HOURS
    starts = plot.bucket_starts(now, n, per_hour)
    keys = store.keys()
    if not keys:
        typer.echo("No keys configured.\nAdd one with: kimi-rotate add-key")
        return
    of, rows = plot.rows(keys, store.counts(starts[0], per_hour), starts)
    width = shutil.get_terminal_size((PIPE_WIDTH, 24)).columns
    for line in plot.draw(of, rows, starts, per_hour, width, symbols()):
        typer.echo(line)


HOURS_HELP = f"With --plot: the last N hours, one bar an hour (default {DEFAULT_HOURS}; 1-{MAX_HOURS})."
DAYS_HELP = f"With --plot: the last N days (UTC), one bar a day (1-{MAX_DAYS})."
