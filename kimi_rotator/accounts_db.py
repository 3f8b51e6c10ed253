"""The store's account, file and proxy rows: how they are kept in SQLite (run inside the store's transactions).

Accounts hold what the caps and quota code knows about each account, as JSON columns: the set of limits may grow,
and a store written by a newer kimi-rotate then still reads (unknown limits are skipped, never an error).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .models import AccountRecord, CapSource, Group, LearnedCap, Limit, Quota, QuotaWindow, Surface
from .store import FileRecord

SCHEMA = """
    CREATE TABLE accounts (
        surface TEXT NOT NULL,
        account TEXT NOT NULL,
        stated TEXT NOT NULL DEFAULT '{}',
        learned TEXT NOT NULL DEFAULT '{}',
        quota TEXT,
        PRIMARY KEY (surface, account)
    );
    CREATE TABLE files (
        file_id TEXT PRIMARY KEY,
        key_id INTEGER NOT NULL,
        surface TEXT NOT NULL,
        account TEXT NOT NULL,
        uploaded_at REAL NOT NULL
    );
    CREATE TABLE proxies (
        id TEXT PRIMARY KEY,
        pid INTEGER NOT NULL,
        started REAL NOT NULL,
        seen REAL NOT NULL
    )
"""
# Schema 3: what each proxy counts per account (in flight, sent in the last minute), written with its heartbeat, so
# that `status` shows live counts without asking the proxy.
USAGE_SCHEMA = "ALTER TABLE proxies ADD COLUMN usage TEXT NOT NULL DEFAULT '[]'"


def load_accounts(db: sqlite3.Connection) -> dict[Group, AccountRecord]:
    out: dict[Group, AccountRecord] = {}
    for surface, account, stated, learned, quota in db.execute(
        "SELECT surface, account, stated, learned, quota FROM accounts"
    ):
        try:
            record = decode_account(Surface(surface), account, stated, learned, quota)
        except ValueError:  # a surface this version does not know
            continue
        out[record.group] = record
    return out


def load_account(db: sqlite3.Connection, group: Group) -> AccountRecord | None:
    row = db.execute("SELECT stated, learned, quota FROM accounts WHERE surface = ? AND account = ?",
                     (group[0].value, group[1])).fetchone()
    if row is None:
        return None
    return decode_account(group[0], group[1], row[0], row[1], row[2])


def save_accounts(db: sqlite3.Connection, records: Iterable[AccountRecord]) -> None:
    db.executemany(
        "INSERT INTO accounts (surface, account, stated, learned, quota) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (surface, account) DO UPDATE SET stated = excluded.stated, learned = excluded.learned, "
        "quota = excluded.quota",
        [(r.surface.value, r.account, *encode_account(r)) for r in records],
    )


def encode_account(record: AccountRecord) -> tuple[str, str, str | None]:
    """An account's (stated, learned, quota) as the JSON texts every backend stores."""
    return (_dump({k.value: v for k, v in record.stated.items()}),
            _dump({k.value: _cap_fields(c) for k, c in record.learned.items()}), _quota_json(record.quota))


def decode_account(surface: Surface, account: str, stated: str, learned: str, quota: str | None) -> AccountRecord:
    """The record from encode_account's texts (whatever this version cannot read is left out)."""
    return AccountRecord(surface=surface, account=account, stated=_stated(stated), learned=_learned(learned),
                         quota=_quota(quota))


def _dump(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def _parse(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _stated(text: str) -> dict[Limit, int]:
    data = _parse(text)
    out: dict[Limit, int] = {}
    if isinstance(data, dict):
        for name, value in data.items():
            if name in Limit._value2member_map_ and type(value) is int and value > 0:
                out[Limit(name)] = value
    return out


def _cap_fields(cap: LearnedCap) -> dict[str, Any]:
    return {"value": cap.value, "source": cap.source.value, "at": cap.at, "detail": cap.detail}


def _learned(text: str) -> dict[Limit, LearnedCap]:
    data = _parse(text)
    out: dict[Limit, LearnedCap] = {}
    if not isinstance(data, dict):
        return out
    for name, fields in data.items():
        if name not in Limit._value2member_map_ or not isinstance(fields, dict):
            continue
        value, source = fields.get("value"), fields.get("source")
        if type(value) is not int or value <= 0 or not isinstance(source, str) \
                or source not in CapSource._value2member_map_:
            continue
        at = fields.get("at")
        detail = fields.get("detail")
        out[Limit(name)] = LearnedCap(limit=Limit(name), value=value, source=CapSource(source),
                                      at=float(at) if isinstance(at, int | float) else 0.0,
                                      detail=detail if isinstance(detail, str) else "")
    return out


def _quota_json(quota: Quota | None) -> str | None:
    if quota is None:
        return None
    return _dump({
        "checked_at": quota.checked_at,
        "balance": quota.balance,
        "windows": [{"name": w.name, "limit": w.limit, "remaining": w.remaining, "reset_at": w.reset_at}
                    for w in quota.windows],
        "level": quota.level,
    })


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _quota(text: str | None) -> Quota | None:
    data = _parse(text)
    if not isinstance(data, dict) or _number(data.get("checked_at")) is None:
        return None
    windows = []
    for w in data.get("windows") or ():
        if isinstance(w, dict) and isinstance(w.get("name"), str) and _number(w.get("remaining")) is not None:
            windows.append(QuotaWindow(name=w["name"], limit=_number(w.get("limit")),
                                       remaining=float(w["remaining"]), reset_at=_number(w.get("reset_at"))))
    level = data.get("level")
    return Quota(checked_at=float(data["checked_at"]), balance=_number(data.get("balance")), windows=tuple(windows),
                 level=level if isinstance(level, str) else None)


# -- files ---------------------------------------------------------------------------------------

def remember_file(db: sqlite3.Connection, file_id: str, key_id: int, group: Group, now: float) -> None:
    db.execute(
        "INSERT INTO files (file_id, key_id, surface, account, uploaded_at) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (file_id) DO UPDATE SET key_id = excluded.key_id, surface = excluded.surface, "
        "account = excluded.account, uploaded_at = excluded.uploaded_at",
        (file_id, key_id, group[0].value, group[1], now),
    )


def load_files(db: sqlite3.Connection) -> dict[str, FileRecord]:
    out = {}
    for file_id, key_id, surface, account, uploaded_at in db.execute(
        "SELECT file_id, key_id, surface, account, uploaded_at FROM files"
    ):
        with contextlib.suppress(ValueError):  # a surface this version does not know
            out[file_id] = FileRecord(int(key_id), (Surface(surface), account), float(uploaded_at))
    return out


def file_owner(db: sqlite3.Connection, file_id: str) -> tuple[int, Group] | None:
    row = db.execute("SELECT key_id, surface, account FROM files WHERE file_id = ?", (file_id,)).fetchone()
    if row is None:
        return None
    try:
        return int(row[0]), (Surface(row[1]), row[2])
    except ValueError:
        return None


# -- proxies -------------------------------------------------------------------------------------

PROXY_TTL = 10.0  # a proxy not heard from for this long is gone: its share of the caps goes to the others

@dataclass(frozen=True)
class ProxyRow:
    """A running proxy as its heartbeat row says: `usage` maps each account to (in flight, sent in the last minute)
    as that proxy counted them at its last beat."""

    id: str
    pid: int
    started: float
    seen: float
    usage: dict[Group, tuple[int, int]]

    @property
    def who(self) -> tuple[str, int, float]:
        """(id, pid, started), as Store.heartbeat and live_proxies give it."""
        return self.id, self.pid, self.started


def heartbeat(db: sqlite3.Connection, proxy_id: str, pid: int, started: float, now: float,
              usage: Mapping[Group, tuple[int, int]] | None = None) -> None:
    counts = encode_usage(usage)
    db.execute(
        "INSERT INTO proxies (id, pid, started, seen, usage) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET seen = excluded.seen, usage = excluded.usage",
        (proxy_id, pid, started, now, counts),
    )


def proxy_rows(db: sqlite3.Connection, now: float, ttl: float) -> list[ProxyRow]:
    """The proxies seen within `ttl` seconds, oldest first (ties by id: every proxy reads the same order, which is what
    splitting an account's caps between them needs), with their counts (entries this version cannot read are
    skipped)."""
    rows = db.execute("SELECT id, pid, started, seen, usage FROM proxies WHERE seen >= ? ORDER BY started, id",
                      (now - ttl,))
    return [ProxyRow(str(i), int(p), float(s), float(seen), decode_usage(text)) for i, p, s, seen, text in rows]


def encode_usage(usage: Mapping[Group, tuple[int, int]] | None) -> str:
    """A proxy's counts per account as the JSON text its heartbeat carries."""
    return _dump([{"surface": g[0].value, "account": g[1], "in_flight": f, "last_minute": m}
                  for g, (f, m) in (usage or {}).items()])


def decode_usage(text: str | None) -> dict[Group, tuple[int, int]]:
    parsed = _parse(text)
    found: dict[Group, tuple[int, int]] = {}
    for entry in parsed if isinstance(parsed, list) else []:
        try:
            group = (Surface(entry["surface"]), str(entry["account"]))
            found[group] = (int(entry["in_flight"]), int(entry["last_minute"]))
        except (KeyError, TypeError, ValueError):
            continue
    return found



def leave(db: sqlite3.Connection, proxy_id: str, now: float, ttl: float) -> None:
    """A proxy that stops removes its row, and the rows of proxies long gone."""
    db.execute("DELETE FROM proxies WHERE id = ? OR seen < ?", (proxy_id, now - 10 * ttl))
