"""The event log: its format, redaction, rotation, appends from several processes, and the pool's events."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kimi_rotator import activity, events
from kimi_rotator.failover import Job
from kimi_rotator.keys import fingerprint
from kimi_rotator.models import CapSource, KeyRecord, LearnedCap, Limit, Outcome, OutcomeKind, Scope, Secret, Surface
from kimi_rotator.pool import LivePool
from kimi_rotator.store import NewKey
from kimi_rotator.store_sqlite import SqliteStore

NOW = 1_800_000_000.0
ONE, TWO = ("sk-kimi-" + "a" * 28 + tag for tag in ("a1b2", "c3d4"))


def record(secret: str, name: str, **kw: object) -> KeyRecord:
    return KeyRecord(id=hash(name) % 1000, secret=Secret(secret), fingerprint=fingerprint(secret), name=name,
                     surface=Surface.KIMI_CODE, **kw)  # type: ignore[arg-type]


def test_an_event_names_a_key_by_name_and_fingerprint_and_never_holds_it() -> None:
    key = record(ONE, "one", account="work")
    event = events.make("cooldown_started", NOW, key, reason="429 rate_limit_reached_error", until=NOW + 30)
    assert event == {"at": NOW, "event": "cooldown_started", "key": {"name": "one", "fingerprint": fingerprint(ONE)},
                     "surface": "kimi-code", "account": "work", "reason": "429 rate_limit_reached_error",
                     "until": NOW + 30}
    assert ONE not in json.dumps(event) and ONE[-4:] not in json.dumps(event)


@pytest.mark.parametrize("label", ["uid:d1a2b3c4", "org:acme-7", "UID:X"])
def test_an_account_id_learned_from_kimi_is_hashed(label: str) -> None:
    shown = events.account_ref(label)
    assert shown is not None and shown.startswith("learned:") and label.split(":")[1] not in shown
    assert events.account_ref(label) == shown  # stable: events of one account still match


def test_a_label_the_user_gave_is_shown_as_given() -> None:
    assert events.account_ref("team-a") == "team-a"
    assert events.account_ref(None) is None


def test_the_log_is_created_private_and_read_back_in_order(tmp_path: Path) -> None:
    events.append(tmp_path, [events.make("rotate", NOW), events.make("use_key", NOW + 1)])
    events.append(tmp_path, [events.make("rotate", NOW + 2)])
    assert stat.S_IMODE(events.path_in(tmp_path).stat().st_mode) == 0o600
    assert [e["at"] for e in events.read(tmp_path)[0]] == [NOW, NOW + 1, NOW + 2]
    assert [e["at"] for e in events.read(tmp_path, since=NOW + 1)[0]] == [NOW + 1, NOW + 2]


def test_broken_lines_are_skipped(tmp_path: Path) -> None:
    events.append(tmp_path, [events.make("rotate", NOW)])
    with open(events.path_in(tmp_path), "a") as f:
        f.write('{"at": 1, "ev\n[1, 2]\n{"event": "no time"}\n')
    events.append(tmp_path, [events.make("use_key", NOW + 1)])
    assert [e["event"] for e in events.read(tmp_path)[0]] == ["rotate", "use_key"]


def test_the_log_rotates_by_size_keeping_one_older_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "MAX_BYTES", 2000)
    for i in range(200):
        events.append(tmp_path, [events.make("rotate", NOW + i, reason="x" * 20)])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["events.jsonl", "events.jsonl.1"]
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())
    assert stat.S_IMODE(events.path_in(tmp_path).stat().st_mode) == 0o600
    kept = [e["at"] for e in events.read(tmp_path)[0]]
    assert kept == sorted(kept) and kept[-1] == NOW + 199 and len(kept) > 20


def test_processes_appending_at_once_never_interleave_inside_a_line(tmp_path: Path) -> None:
    code = ("import sys; from pathlib import Path; from kimi_rotator import events\n"
            "for i in range(300):\n"
            "    events.append(Path(sys.argv[1]), [events.make('rotate', i, reason=sys.argv[2] * 200)])\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), tag]) for tag in "abcd"]
    for p in procs:
        assert p.wait(timeout=60) == 0
    lines = events.path_in(tmp_path).read_text().splitlines()
    assert len(lines) == 1200
    assert all(json.loads(line)["reason"] in {c * 200 for c in "abcd"} for line in lines)


def test_changes_give_one_event_per_key_next_to_the_log_lines() -> None:
    one, two = record(ONE, "one", account="uid:1"), record(TWO, "two")
    cooling = record(ONE, "one", account="uid:1", cooldown_until=NOW + 60, cooldown_reason="429 rate_limit")
    learned = record(TWO, "two", account="org:9", disabled_reason="401 invalid_authentication_error")
    sink: list[events.Event] = []
    lines = activity.changes([one, two], [cooling, learned], NOW, sink)
    assert lines[0][1] == "key two sk-kimi-…c3d4 is in account org:9, as Kimi named it"
    assert len(lines) == 3  # and the disabled and cooling lines
    assert [(e["event"], e["key"]["name"]) for e in sink] == [
        ("cooldown_started", "one"), ("account_learned", "two"), ("key_disabled", "two")]
    assert sink[0]["until"] == NOW + 60 and sink[0]["reason"] == "429 rate_limit"
    assert sink[2]["reason"] == "401 invalid_authentication_error"
    assert all(e["account"].startswith("learned:") for e in sink)
    back: list[events.Event] = []
    activity.changes([cooling], [one], NOW, back)
    assert [e["event"] for e in back] == ["cooldown_ended"]


def test_a_failover_event_names_each_key_tried_and_why_but_no_key_or_body() -> None:
    one, two = record(ONE, "Account 1"), record(TWO, "Account 2")
    job = Job(Surface.KIMI_CODE, "api.kimi.com", "POST", "/coding/v1/messages?q=secret", (), b'{"secret": 1}')
    job.key = two
    job.trail = [f"{activity.describe(one)}: 429 rate_limit_reached_error, cooling 30 s",
                 f"{activity.describe(two)}: 200"]
    event = events.failover(job, [one, two], NOW)
    assert event == {"at": NOW, "event": "failover", "surface": "kimi-code", "path": "/coding/v1/messages",
                     "tried": [{"name": "Account 1", "fingerprint": fingerprint(ONE),
                                "why": "429 rate_limit_reached_error, cooling 30 s"}],
                     "to": {"name": "Account 2", "fingerprint": fingerprint(TWO)}}
    assert "…" not in json.dumps(event) and "secret" not in json.dumps(event)


async def test_the_pool_writes_cooldowns_and_caps_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writers: set[str] = set()
    append = events.append

    def noted_append(home: Path, batch: list[events.Event]) -> None:
        writers.add(threading.current_thread().name)
        append(home, batch)

    monkeypatch.setattr(events, "append", noted_append)
    home = tmp_path / "home"
    store = SqliteStore(home)
    for secret, name in ((ONE, "one"), (TWO, "two")):
        store.add_key(NewKey(secret=secret, name=name, surface=Surface.KIMI_CODE, account="uid:1"), time.time())
    live = LivePool(store)
    live.start(asyncio.get_running_loop())
    try:
        now = time.time()
        limited = Outcome(kind=OutcomeKind.RATE_LIMITED, scope=Scope.ACCOUNT, until=now + 0.3,
                          reason="429 rate_limit_reached_error",
                          caps=(LearnedCap(limit=Limit.RPM, value=200, source=CapSource.MESSAGE),))
        live.record(live.roster.keys[0].id, limited, now)
        await asyncio.sleep(0.8)  # the cooldown ends, the store thread writes
    finally:
        live.stop()
        store.close()
    assert writers == {"kimi-rotate-store"}  # the event loop only queued them
    kinds = [(e["event"], e.get("key", {}).get("name")) for e in events.read(home)[0]]
    assert kinds[0] == ("cap_learned", "one")
    assert sorted(kinds[1:3]) == [("cooldown_started", "one"), ("cooldown_started", "two")]
    assert sorted(kinds[3:]) == [("cooldown_ended", "one"), ("cooldown_ended", "two")]
    text = events.path_in(home).read_text()
    assert "uid:1" not in text and ONE not in text and TWO not in text


def test_a_learned_cap_has_a_line_of_its_own() -> None:
    cap = LearnedCap(limit=Limit.RPM, value=200, source=CapSource.MESSAGE)
    assert activity.cap_line(record(ONE, "one", account="team"), cap) == "account team cap learned: rpm 200 (message)"
    assert activity.cap_line(record(ONE, "one"), cap) == \
        "account of key one sk-kimi-…a1b2 cap learned: rpm 200 (message)"


def test_a_log_that_cannot_be_written_keeps_its_events_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    home = tmp_path / "not-yet"
    log = events.EventLog(home)
    log.put(events.make("rotate", NOW))
    log.flush()
    log.put(events.make("use_key", NOW + 1))
    log.flush()
    assert log.failed and len([r for r in caplog.records if "cannot write the event log" in r.getMessage()]) == 1
    home.mkdir()
    log.flush()
    assert log.failed is None and [e["event"] for e in events.read(home)[0]] == ["rotate", "use_key"]
