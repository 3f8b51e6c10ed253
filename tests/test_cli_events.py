"""`kimi-rotate events`, and the events the CLI's commands write: in-process with CliRunner, and --follow in a
real pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from kimi_rotator import cli, events
from kimi_rotator.keys import fingerprint

ONE, TWO = ("sk-kimi-" + "b" * 44 + tag for tag in ("a1b2", "c3d4"))
runner = CliRunner()
KIMI_ROTATE = [sys.executable, "-c", "from kimi_rotator import cli; cli.main()"]


def ok(*args: str, input: str | None = None) -> Any:
    result = runner.invoke(cli.app, list(args), input=input)
    assert result.exit_code == 0, (result.stderr, result.exception)
    for secret in (ONE, TWO):
        assert secret not in result.stdout and secret not in result.stderr
    return result


def two_keys() -> None:
    ok("add-key", "-", "one", "--account", "work", input=ONE + "\n")
    ok("add-key", "-", "two", input=TWO + "\n")


def test_commands_that_change_the_pool_log_what_they_did(kimi_home: Path) -> None:
    two_keys()
    ok("disable", "one", "--reason", "lent out")
    ok("enable", "one")
    ok("rotate")
    ok("use-key", "two")
    ok("account", "work", "--rpm", "50")
    logged = [json.loads(line) for line in ok("events", "--json").stdout.splitlines()]
    assert [e["event"] for e in logged] == ["key_disabled", "key_enabled", "rotate", "use_key", "caps_stated"]
    assert logged[0]["key"] == {"name": "one", "fingerprint": fingerprint(ONE)}
    assert logged[0]["reason"] == "lent out" and logged[0]["account"] == "work"
    assert logged[4]["caps"] == {"rpm": 50}
    path = events.path_in(kimi_home)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert ONE not in text and TWO not in text and ONE[-4:] not in text


def test_the_table_shows_the_last_events_one_a_line(kimi_home: Path) -> None:
    two_keys()
    for _ in range(25):
        ok("use-key", "one")
    out = ok("events").stdout.splitlines()
    assert len(out) == 20
    assert all("use_key" in line and f"one ({fingerprint(ONE)})" in line for line in out)
    assert len(ok("events", "-n", "3").stdout.splitlines()) == 3


def test_since_keeps_the_span_and_a_bad_span_is_one_line(kimi_home: Path) -> None:
    kimi_home.mkdir()
    now = time.time()
    events.append(kimi_home, [events.make("rotate", now - 7200), events.make("use_key", now - 60),
                              events.make("store_error", now - 5, error="disk full")])
    shown = [json.loads(line)["event"] for line in ok("events", "--json", "--since", "10m").stdout.splitlines()]
    assert shown == ["use_key", "store_error"]
    assert len(ok("events", "--since", "1d").stdout.splitlines()) == 3
    bad = runner.invoke(cli.app, ["events", "--since", "soon"])
    assert bad.exit_code == 1 and isinstance(bad.exception, SystemExit)
    assert bad.stderr.count("\n") == 1 and "30s, 10m, 2h or 1d" in bad.stderr


def test_no_log_yet_shows_nothing(kimi_home: Path) -> None:
    assert ok("events").stdout == ""


def test_follow_in_a_terminal_picks_up_a_new_event_and_stops_on_ctrl_c(kimi_home: Path) -> None:
    kimi_home.mkdir()
    events.append(kimi_home, [events.make("rotate", time.time())])
    leader, follower = pty.openpty()
    proc = subprocess.Popen([*KIMI_ROTATE, "events", "--follow"], stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    try:
        seen = _read_until(leader, b"rotate")
        events.append(kimi_home, [events.make("use_key", time.time(), reason="picked by hand")])
        seen += _read_until(leader, b"picked by hand")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        seen += _read_rest(leader)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    assert b"Traceback" not in seen and b"KeyboardInterrupt" not in seen


def _read_until(fd: int, wanted: bytes, timeout: float = 15) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while wanted not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"{wanted!r} not shown; got {got!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            got += os.read(fd, 65536)
    return got


def _read_rest(fd: int) -> bytes:
    got = b""
    while select.select([fd], [], [], 0.5)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        got += chunk
    return got


def test_follow_without_a_terminal_prints_json_lines(kimi_home: Path) -> None:
    kimi_home.mkdir()
    proc = subprocess.Popen([*KIMI_ROTATE, "events", "--follow", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        for _ in range(60):  # events written before it has started are not new to it: write until one shows
            events.append(kimi_home, [events.make("use_key", time.time())])
            if select.select([proc.stdout], [], [], 0.5)[0]:
                break
        assert json.loads(proc.stdout.readline())["event"] == "use_key"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert proc.stderr is not None and b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_no_events_yet_says_so_on_stderr_only(kimi_home: Path) -> None:
    result = runner.invoke(cli.app, ["events"])
    assert result.exit_code == 0 and result.stdout == ""
    assert result.stderr.startswith("No events yet in ") and "events.jsonl" in result.stderr
    result = runner.invoke(cli.app, ["events", "--json"])
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""  # JSON lines: none is nothing
