"""The event log: one JSON line per change of the pool's state, in `<store home>/events.jsonl`.

Every line is an object with `at` (epoch seconds), `event` (its kind) and what the kind needs: `key`
({"name", "fingerprint"}), `surface`, `account`, `reason`, `until`, ... A line never holds a key, a body
or an account id Kimi sent: labels the proxy learned from Msh-Uid / Msh-Org-Id headers or from message text
(`uid:…`, `org:…`) appear hashed, as `learned:<10 hex digits>`, so lines about one account still match.

The file is created 0600. Writers append with O_APPEND, one write() per batch of whole lines: on a local
filesystem concurrent writers (proxies, the CLI) never interleave inside a line. When the file passes
MAX_BYTES it is renamed to `events.jsonl.1` (the previous `.1` goes); two processes rotating at the same
moment may lose that older file, never the current one. Readers skip lines that are not whole JSON objects.
The proxy hands its events to the pool's store thread (`EventLog.put` only appends to a deque), so the
event loop never waits on the disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .models import KeyRecord

if TYPE_CHECKING:  # the failover imports activity, which imports this module
    from .failover import Job

log = logging.getLogger(__name__)

EVENTS_FILE = "events.jsonl"
MAX_BYTES = 5 * 1024 * 1024
MAX_QUEUED = 10_000  # events kept while the disk cannot be written (then the oldest go)
LEARNED_PREFIXES = ("uid:", "org:")

Event = dict[str, Any]


def key_ref(key: KeyRecord) -> dict[str, str]:
    return {"name": key.name, "fingerprint": key.fingerprint}


def account_ref(label: str | None) -> str | None:
    """An account label as events show it: the user's own label as given, a learned Kimi id hashed."""
    if label is None or not label.lower().startswith(LEARNED_PREFIXES):
        return label
    return "learned:" + hashlib.sha256(label.encode()).hexdigest()[:10]


def make(kind: str, at: float, key: KeyRecord | None = None, **fields: Any) -> Event:
    """An event; with `key`, its name, fingerprint, surface and (redacted) account come along."""
    event: Event = {"at": round(at, 3), "event": kind}
    if key is not None:
        event["key"] = key_ref(key)
        event["surface"] = key.surface.value
        if key.account is not None:
            event["account"] = account_ref(key.account)
    event.update((k, v) for k, v in fields.items() if v is not None)
    return event


def failover(job: Job, keys: Sequence[KeyRecord], now: float) -> Event:
    """The trail of a request that failed over: each key that failed and why, and the key that answered last."""
    tried = []
    for entry in job.trail[:-1]:
        key = max((k for k in keys if entry.startswith(k.name + " ")), key=lambda k: len(k.name), default=None)
        if key is None:
            continue  # removed meanwhile
        # An entry is "<name> <masked key>: <reason>": the masked key stays out of the event.
        tried.append({**key_ref(key), "why": entry[len(key.name) + 1:].partition(": ")[2]})
    return make("failover", now, surface=job.surface.value, path=job.path.split("?", 1)[0],
                tried=tried, to=key_ref(job.key) if job.key is not None else None)


def path_in(home: Path) -> Path:
    return home / EVENTS_FILE


def append(home: Path, events: Iterable[Event]) -> None:
    """Append `events` as one write. Raises OSError when the file cannot be written."""
    data = "".join(json.dumps(e, separators=(",", ":"), ensure_ascii=False) + "\n" for e in events).encode()
    if not data:
        return
    path = path_in(home)
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size + len(data) > MAX_BYTES:
            os.replace(path, path.with_name(EVENTS_FILE + ".1"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read(home: Path, since: float | None = None) -> tuple[list[Event], int]:
    """Every event in the log and its rotated file, oldest first (with `since`, those at or after it), and how many
    bytes of the log's whole lines were read: following it from there misses no line and shows none twice."""
    out: list[Event] = []
    for path in (path_in(home).with_name(EVENTS_FILE + ".1"), path_in(home)):
        end = 0
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            continue
        end = data.rfind(b"\n") + 1  # a line being written is left for the follower
        text = data[:end].decode("utf-8", "replace")
        out += [e for e in parse(text.splitlines()) if since is None or e["at"] >= since]
    return out, end


def parse(lines: Iterable[str]) -> Iterator[Event]:
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash, or a writer's partial line being read
        if isinstance(event, dict) and isinstance(event.get("at"), int | float) and isinstance(event.get("event"), str):
            yield event


class EventLog:
    """The proxy's queue of events: `put` costs a deque append; the pool's store thread calls `flush`
    on each of its passes (every POLL_SECONDS) and when it stops."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.failed: str | None = None  # why the last write failed, until one works
        self._queue: deque[Event] = deque(maxlen=MAX_QUEUED)

    def put(self, event: Event) -> None:
        self._queue.append(event)

    def flush(self) -> None:
        batch = []
        while self._queue:
            batch.append(self._queue.popleft())
        if not batch:
            return
        try:
            append(self.home, batch)
            self.failed = None
        except OSError as e:
            if self.failed is None:  # once per episode, not on every pass
                log.warning("kimi-rotate: cannot write the event log %s (%s); events are kept and written once it "
                            "can be", path_in(self.home), e.strerror)
            self.failed = e.strerror or str(e)
            self._queue.extendleft(reversed(batch))  # tried again next pass
