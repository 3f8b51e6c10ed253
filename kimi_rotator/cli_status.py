"""`kimi-rotate status` (registered in cli.py): the whole pool on one screen, once or live (`--watch`).

It only reads the store (keys, accounts, and the running proxies' heartbeat rows with their counts): it never asks
Kimi, and a refresh costs one snapshot. The screen is status_view's; rich (typer brings it) draws `--watch`, and
honours NO_COLOR and the terminal's width; without a terminal the screen is printed once.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from typing import TYPE_CHECKING, Annotated

import typer

from .errors import UserError
from .symbols import PLAIN, symbols

if TYPE_CHECKING:
    from rich.text import Text

    from .status_view import PoolStatus
    from .store import Store

class StatusError(UserError):
    """A mistake the user can fix; cli.py prints it as `error: ...` with exit code 1."""


# Words of the screen that get a colour in `--watch` (none with NO_COLOR: rich leaves them out).
_STYLES = {r"\bactive\b": "green", r"\bcooling\b": "yellow", r"\bdisabled\b": "red",
           r"none is serving this store now": "red", r"serving this store": "green"}


def status(
    watch: Annotated[bool, typer.Option("--watch", help="Refresh the screen in place until Ctrl-C.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the same data once as JSON.")] = False,
    interval: Annotated[
        float | None,
        typer.Option("--interval", metavar="SECONDS", help="Seconds between refreshes (--watch); default 1.",
                     show_default=False),
    ] = None,  # None, not 1.0: typer (0.29) loads pydantic to check any value given, and a default counts
) -> None:
    """The pool at a glance, by account, once or live (--watch).

    Each key's state, time left, health and last error; each account's requests in flight and in the last minute
    against its caps, and its quota; whether a proxy is serving the store, and since when. It reads the store
    only (the counts are the running proxies', at most 2 s old) and never asks Kimi."""
    from .cli import STORE_CHOICE
    from .store import open_store

    if interval is not None and not 0.1 <= interval <= 3600:
        raise StatusError("--interval takes seconds from 0.1 to 3600")
    store = open_store(STORE_CHOICE[0], readonly=True)
    try:
        if as_json:
            typer.echo(json.dumps(_status_json(store), indent=2, ensure_ascii=symbols() is PLAIN))
        elif watch and sys.stdout.isatty():
            _watch(store, 1.0 if interval is None else interval)
        else:
            _print_once(store)
    finally:
        store.close()


def _read(store: Store) -> PoolStatus:
    from .accounts_db import PROXY_TTL
    from .status_view import pool_status

    now = time.time()
    return pool_status(store.snapshot(), store.proxy_rows(now, PROXY_TTL), now)


def _status_json(store: Store) -> dict[str, object]:
    from .status_view import status_json

    return status_json(_read(store))


def _print_once(store: Store) -> None:
    from .status_view import status_lines

    width = shutil.get_terminal_size((0, 0)).columns or None
    for line in status_lines(_read(store), width, symbols()):
        typer.echo(line)


def _screen(store: Store, width: int) -> Text:
    from rich.text import Text

    from .status_view import status_lines

    text = Text("\n".join(status_lines(_read(store), width, symbols())), no_wrap=True, overflow="crop")
    for pattern, style in _STYLES.items():
        text.highlight_regex(pattern, style)
    return text


def _watch(store: Store, interval: float) -> None:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    try:
        with Live(_screen(store, console.width), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(_screen(store, console.width), refresh=True)
    except KeyboardInterrupt:
        return
