"""What the proxy prints: the request line, the state-change lines, and the pool noticing changes and keys back."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from pathlib import Path

import pytest

from kimi_rotator import activity
from kimi_rotator.failover import Job
from kimi_rotator.keys import fingerprint
from kimi_rotator.models import KeyRecord, Outcome, OutcomeKind, Scope, Secret, Surface
from kimi_rotator.pool import LivePool
from kimi_rotator.store import NewKey
from kimi_rotator.store_sqlite import SqliteStore

NOW = 1_800_000_000.0
ONE, TWO, THREE = ("sk-kimi-" + "a" * 28 + tag for tag in ("a1b2", "c3d4", "e5f6"))


def record(secret: str, name: str, **kw: object) -> KeyRecord:
    return KeyRecord(id=hash(name) % 1000, secret=Secret(secret), fingerprint=fingerprint(secret), name=name,
                     surface=Surface.KIMI_CODE, **kw)  # type: ignore[arg-type]


def job(path: str = "/coding/v1/chat/completions?beta=true", key: KeyRecord | None = None,
        trail: list[str] | None = None) -> Job:
    j = Job(Surface.KIMI_CODE, "api.kimi.com", "POST", path, ((b"authorization", b"Bearer " + ONE.encode()),),
            b'{"messages": [{"role": "user", "content": "a secret prompt"}]}')
    j.key, j.trail = key, trail or []
    return j


# -- the request line -------------------------------------------------------------------------------------------------


def test_a_request_line_names_the_surface_method_path_key_status_and_duration() -> None:
    two = record(TWO, "Account 2")
    line = activity.request_line(job(key=two, trail=["Account 2 sk-kimi-…c3d4: 200"]), 200, 0.4123)
    assert line == "kimi-code POST /coding/v1/chat/completions Account 2 sk-kimi-…c3d4 200 412 ms"


def test_a_failed_over_request_shows_its_chain_and_never_a_key_body_or_query() -> None:
    trail = ["Account 1 sk-kimi-…a1b2: 429 rate_limit_reached_error, account cooling 58 s",
             "Account 2 sk-kimi-…c3d4: 200"]
    line = activity.request_line(job(key=record(TWO, "Account 2"), trail=trail), 200, 12.345)
    assert line == ("kimi-code POST /coding/v1/chat/completions Account 2 sk-kimi-…c3d4 200 12.3 s "
                    "(Account 1 sk-kimi-…a1b2: 429 rate_limit_reached_error, account cooling 58 s → "
                    "Account 2 sk-kimi-…c3d4: 200)")
    assert ONE not in line and TWO not in line and "secret prompt" not in line and "beta" not in line


def test_a_request_no_key_could_take_says_so() -> None:
    assert activity.request_line(job(), 429, 0.002) == "kimi-code POST /coding/v1/chat/completions no key 429 2 ms"


def test_control_characters_in_a_path_are_escaped() -> None:
    line = activity.request_line(job(path="/v1/\x1b[2Jx"), 404, 0.01)
    assert "\x1b" not in line and "/v1/\\x1b[2Jx" in line


# -- state changes ----------------------------------------------------------------------------------------------------


def test_a_key_starting_to_cool_is_one_info_line_with_its_deadline() -> None:
    old = record(ONE, "Account 1")
    new = replace(old, cooldown_until=NOW + 58, cooldown_reason="429 rate_limit_reached_error")
    [(level, line)] = activity.changes([old], [new], NOW)
    assert level == logging.INFO
    assert line == (f"key Account 1 sk-kimi-…a1b2 cooling until {activity.clock(NOW + 58, NOW)} (58 s): "
                    "429 rate_limit_reached_error")


def test_keys_of_an_account_cooling_together_share_one_line() -> None:
    keys = [record(s, n, account="uid:7") for s, n in ((ONE, "one"), (TWO, "two"), (THREE, "three"))]
    cooled = [replace(k, cooldown_until=NOW + 3600, cooldown_reason="429 x") for k in keys]
    [(level, line)] = activity.changes(keys, cooled, NOW)
    assert level == logging.INFO
    assert line == (f"account uid:7 cooling until {activity.clock(NOW + 3600, NOW)} (60 min): 429 x; keys "
                    "one sk-kimi-…a1b2, two sk-kimi-…c3d4, three sk-kimi-…e5f6")


def test_a_disabled_key_is_a_warning_that_says_what_to_do() -> None:
    old = record(ONE, "Account 1")
    new = replace(old, disabled_reason="401 invalid_authentication_error")
    [(level, line)] = activity.changes([old], [new], NOW)
    assert level == logging.WARNING
    assert line == ("key Account 1 sk-kimi-…a1b2 disabled: 401 invalid_authentication_error; once it works "
                    "again, `kimi-rotate enable 'Account 1'` puts it back")


def test_no_line_for_a_success_a_longer_cooldown_a_new_key_or_a_key_still_disabled() -> None:
    plain = record(ONE, "one")
    used = replace(plain, total_requests=1, health=99.0)
    cooling = record(TWO, "two", cooldown_until=NOW + 10)
    longer = replace(cooling, cooldown_until=NOW + 100)
    off = record(THREE, "three", disabled_reason="401")
    still_off = replace(off, cooldown_until=NOW + 60)
    assert activity.changes([plain, cooling, None, off], [used, longer, plain, still_off], NOW) == []


def test_a_key_put_back_by_the_cli_is_back() -> None:
    off = record(ONE, "one", disabled_reason="by hand")
    cooling = record(TWO, "two", cooldown_until=NOW + 60)
    lines = activity.changes([off, cooling], [replace(off, disabled_reason=None),
                                              replace(cooling, cooldown_until=None)], NOW)
    assert lines == [(logging.INFO, "key one sk-kimi-…a1b2 back"), (logging.INFO, "key two sk-kimi-…c3d4 back")]


def test_back_lines_group_an_account_and_count_what_they_do_not_name() -> None:
    keys = [record("sk-kimi-" + "b" * 28 + f"{i:04d}", f"k{i}", account="org:x") for i in range(7)]
    [line] = activity.back_lines(keys)
    assert line.startswith("account org:x back; keys k0 sk-kimi-…0000, k1 ") and line.endswith(" and 2 more")


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0 s"), (58.4, "58 s"), (600, "10 min"), (6 * 3600, "6 h"),
                                               (5.5 * 3600, "5.5 h")])
def test_waits_read_naturally(seconds: float, text: str) -> None:
    assert activity.wait(seconds) == text


def test_formatting_a_line_is_cheap() -> None:
    """The line is made for every request: it must stay a few microseconds (the proxy serves ~500 requests/s)."""
    j = job(key=record(TWO, "Account 2"), trail=["Account 1 sk-kimi-…a1b2: 429 x, account cooling 58 s",
                                                 "Account 2 sk-kimi-…c3d4: 200"])
    runs = 2000
    started = time.perf_counter()
    for _ in range(runs):
        activity.request_line(j, 200, 0.4)
    assert (time.perf_counter() - started) / runs < 50e-6


# -- the live pool ----------------------------------------------------------------------------------------------------


def _pool(tmp_path: Path, *specs: tuple[str, str, str | None, float | None]) -> LivePool:
    store = SqliteStore(tmp_path / "home")
    now = time.time()
    for secret, name, account, until in specs:
        store.add_key(NewKey(secret=secret, name=name, surface=Surface.KIMI_CODE, account=account,
                             cooldown_until=until, cooldown_reason="test" if until else None), now)
    return LivePool(store)


async def test_the_pool_logs_an_account_cooling_then_its_keys_back_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    live = _pool(tmp_path, (ONE, "one", "uid:1", None), (TWO, "two", "uid:1", None), (THREE, "three", None, None))
    live.start(asyncio.get_running_loop())
    try:
        with caplog.at_level(logging.INFO, logger="kimi_rotate"):
            now = time.time()
            limited = Outcome(kind=OutcomeKind.RATE_LIMITED, scope=Scope.ACCOUNT, until=now + 0.3,
                              reason="429 rate_limit_reached_error")
            live.record(live.roster.keys[0].id, limited, now)
            live.record(live.roster.keys[2].id, Outcome(kind=OutcomeKind.SUCCESS, reason="200"), now)
            await asyncio.sleep(0.6)
        lines = [r.getMessage() for r in caplog.records if r.name == "kimi_rotate"]
    finally:
        live.stop()
    assert len(lines) == 2, lines
    assert lines[0].startswith("account uid:1 cooling until ")
    assert "(0 s): 429 rate_limit_reached_error; keys " in lines[0]
    assert lines[1] == "account uid:1 back; keys one sk-kimi-…a1b2, two sk-kimi-…c3d4"


async def test_the_pool_reports_a_cooldown_from_the_store_ending_and_a_key_disabled_by_the_cli(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    live = _pool(tmp_path, (ONE, "one", None, time.time() + 0.2), (TWO, "two", None, None))
    live.start(asyncio.get_running_loop())
    other = SqliteStore(tmp_path / "home")  # the CLI's own connection
    try:
        with caplog.at_level(logging.INFO, logger="kimi_rotate"):
            other.set_disabled(live.roster.keys[1].id, "taken out by hand")
            await asyncio.sleep(0.6)  # the pool polls every 0.2 s
        records = [r for r in caplog.records if r.name == "kimi_rotate"]
    finally:
        other.close()
        live.stop()
    assert {(r.levelno, r.getMessage()) for r in records} == {
        (logging.INFO, "key one sk-kimi-…a1b2 back"),
        (logging.WARNING, "key two sk-kimi-…c3d4 disabled: taken out by hand; once it works again, "
                          "`kimi-rotate enable two` puts it back"),
    }
