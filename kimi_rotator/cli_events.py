"""`kimi-rotate events`: the event log's last entries, or its new ones as they come; and `note`, which the
commands that change the pool (rotate, use-key, enable, disable, account) call to log what they did."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from . import events
from .errors import UserError
from .events import Event
from .models import KeyRecord
from .store import store_home

DEFAULT_COUNT = 20
FOLLOW_POLL = 0.25  # seconds between looks at the file while following
_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def note(home: Path, kind: str, key: KeyRecord | None = None, **fields: Any) -> None:
    """Log one change a command made. A log that cannot be written does not fail the command that changed the pool."""
    with contextlib.suppress(OSError):
        events.append(home, [events.make(kind, time.time(), key, **fields)])


def parse_since(text: str) -> float:
    """`10m`, `2h`, `1d`, `30s` as seconds."""
    match = _SPAN.fullmatch(text.strip().lower())
    if match is None:
        raise UserError(f"--since {text!r} is no span of time; give one such as 30s, 10m, 2h or 1d")
    return float(match.group(1)) * _UNIT[match.group(2)]


def events_command(
    count: Annotated[int | None, typer.Option("--last", "-n", min=1, show_default=False,
                                              help="How many of the latest events to show (default: 20, "
                                              "or all of --since's span).")] = None,
    since: Annotated[str | None, typer.Option("--since", metavar="SPAN",
                                              help="Only events of the last SPAN (30s, 10m, 2h, 1d).",
                                              show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines, as the log holds them.")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events until Ctrl-C.")] = False,
) -> None:
    """Show what the pool did: keys cooling and back, disabled and enabled, caps and accounts learned, failovers,
    rotations, store errors. The log is events.jsonl in the store's folder."""
    home = store_home()
    start = time.time() - parse_since(since) if since is not None else None
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends it, at any moment, without a traceback
        shown, end = events.read(home, start)
        if count is not None or since is None:
            shown = shown[-(count or DEFAULT_COUNT):]
        for event in shown:
            _echo(event, as_json)
        if not shown and not as_json:  # on stderr: a pipe reading the events gets none, not a sentence
            where = "in that span" if since is not None else "yet"
            typer.echo(f"No events {where} in {events.path_in(home)}; a running proxy and the CLI add one for each "
                       "change of a key's state.", err=True)
        if follow:
            _follow(home, as_json, end)


def _follow(home: Path, as_json: bool, offset: int) -> None:
    """Print lines appended to the log after its first `offset` bytes, like `tail -f`, across rotations."""
    path = events.path_in(home)
    partial = b""
    while True:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < offset:  # rotated (or replaced): the new file is read from its start
            offset, partial = 0, b""
        if size > offset:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size - offset)
            offset += len(data)
            whole, _, partial = (partial + data).rpartition(b"\n")
            for event in events.parse(whole.decode("utf-8", "replace").splitlines()):
                _echo(event, as_json)
            sys.stdout.flush()
        time.sleep(FOLLOW_POLL)


def _echo(event: Event, as_json: bool) -> None:
    typer.echo(json.dumps(event, ensure_ascii=False) if as_json else line(event))


def line(event: Event) -> str:
    """One event as a table row: `2026-12-03 12:20:05  cooldown_started  Account 2 (a1b2c3d4e5)  reason …`."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["at"]))
    parts = [when, f"{event['event']:<17}"]
    if isinstance(key := event.get("key"), dict):
        parts.append(_key(key))
    for name, value in event.items():
        if name in ("at", "event", "key"):
            continue
        parts.append(f"{name}={_value(name, value)}")
    return "  ".join(parts)


def _key(key: dict[str, Any]) -> str:
    return f"{key.get('name')} ({key.get('fingerprint')})"


def _value(name: str, value: Any) -> str:
    if name == "until" and isinstance(value, int | float):
        return time.strftime("%H:%M:%S", time.localtime(value))
    if isinstance(value, dict):
        return _key(value) if "fingerprint" in value else json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return " → ".join(_tried(v) for v in value)
    return str(value)


def _tried(entry: Any) -> str:
    if not isinstance(entry, dict):
        return str(entry)
    why = entry.get("why")
    return _key(entry) + (f": {why}" if why else "")
