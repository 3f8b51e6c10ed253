"""`kimi-rotate status`: the view model (status_view), the proxies' counts in the store, and the command's output."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import sqlite3
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kimi_rotator import cli
from kimi_rotator.accounts_db import ProxyRow
from kimi_rotator.admission import Admission
from kimi_rotator.models import AccountRecord, Group, Limit, Quota, QuotaWindow, Surface
from kimi_rotator.status_view import pool_status, status_json, status_lines
from kimi_rotator.store import HOME_ENV, NewKey, Snapshot, Store
from kimi_rotator.store_sqlite import MIGRATIONS, STORE_FILE, SqliteStore
from kimi_rotator.symbols import FANCY, PLAIN

NOW = time.time()
ACME: Group = (Surface.MOONSHOT_CN, "acme")
KEYS = [
    NewKey(secret="sk-statusAcmeOne000000000001", name="one", surface=Surface.MOONSHOT_CN, account="acme"),
    NewKey(secret="sk-statusAcmeTwo000000000002", name="two", surface=Surface.MOONSHOT_CN, account="acme",
           health=40, cooldown_until=NOW + 600, cooldown_reason="429 rate_limit_reached_error"),
    NewKey(secret="sk-kimi-statusCodeThree00000003", name="three", surface=Surface.KIMI_CODE,
           disabled_reason="401 invalid_authentication_error"),
]
_SCRIPT = Path(sys.executable).with_name("kimi-rotate")
_MODULE = [sys.executable, "-c", "from kimi_rotator.cli import main; main()"]
KIMI_ROTATE = [str(_SCRIPT)] if _SCRIPT.exists() else _MODULE
QUOTA = Quota(checked_at=NOW - 60, windows=(QuotaWindow("5h", 100, 85, NOW + 3600),))


def seeded(store: Store) -> Snapshot:
    store.add_keys(KEYS, NOW)
    store.update_account(ACME, lambda r: AccountRecord(surface=ACME[0], account=ACME[1],
                                                       stated={Limit.RPM: 200, Limit.CONCURRENCY: 8}, quota=QUOTA))
    return store.snapshot()


def proxy(pid: int, started: float, usage: dict[Group, tuple[int, int]]) -> ProxyRow:
    return ProxyRow(f"p{pid}", pid, started, NOW, usage)


# -- the view --------------------------------------------------------------------------------------------------------


def test_accounts_sum_the_proxies_counts_against_the_caps_in_force(store: Store) -> None:
    snap = seeded(store)
    status = pool_status(snap, [proxy(11, NOW - 300, {ACME: (2, 10)}), proxy(12, NOW - 60, {ACME: (1, 5)})], NOW)
    acme, code = status.accounts
    assert (acme.in_flight, acme.concurrency, acme.last_minute, acme.rpm) == (3, 8, 15, 200)
    assert code.concurrency == 30 and code.rpm is None and (code.in_flight, code.last_minute) == (0, 0)
    assert [k.status.state.value for k in acme.keys] == ["active", "cooling"]
    assert acme.keys[1].last_error == "429 rate_limit_reached_error" and acme.keys[1].until == NOW + 600
    assert code.keys[0].last_error == "401 invalid_authentication_error"

    data = status_json(status)
    assert data["serving"] is True and [p["pid"] for p in data["proxies"]] == [11, 12]
    first = data["accounts"][0]
    assert first["caps"] == {"concurrency": 8, "rpm": 200} and first["in_flight"] == 3
    assert first["quota"]["windows"][0]["remaining"] == 85
    cooling = first["keys"][1]
    assert cooling["state"] == "cooling" and 595 <= cooling["seconds_left"] <= 600 and cooling["health"] == 40
    assert data["accounts"][1]["account"] is None  # a key with no label is an account of its own
    assert "statusAcme" not in json.dumps(data)  # masked keys only


def test_the_screen_shows_every_account_its_counts_quota_and_keys(store: Store) -> None:
    status = pool_status(seeded(store), [proxy(4242, NOW - 300, {ACME: (3, 15)})], NOW)
    text = "\n".join(status_lines(status, None, FANCY))
    assert "Proxy: serving this store, pid 4242 since" in text
    assert "Account acme (moonshot-cn)" in text and "In flight 3 of 8; last minute 15 of 200" in text
    assert "Quota (checked " in text and "5h: 85 of 100 left, resets " in text
    assert "cooling ~10m (until" in text and "429 rate_limit_reached_error" in text
    assert "In flight 0 of 30; last minute 0 (no cap known)" in text  # the Kimi Code key's documented cap
    assert "statusAcme" not in text


def test_no_proxy_and_no_keys_say_so(store: Store) -> None:
    lines = status_lines(pool_status(store.snapshot(), [], NOW), None, PLAIN)
    assert "Proxy: none is serving this store now" in lines
    assert lines[-1] == "No keys configured. Add one with: kimi-rotate add-key"


@pytest.mark.parametrize("width", [40, 60, 80])
def test_the_screen_fits_narrow_terminals(store: Store, width: int) -> None:
    lines = status_lines(pool_status(seeded(store), [], NOW), width, PLAIN)
    assert all(len(line) <= width for line in lines), [line for line in lines if len(line) > width]
    assert any("cooling" in line for line in lines)


# -- the counts in the store ------------------------------------------------------------------------------------------


def test_a_heartbeat_stores_the_proxys_counts(store: Store) -> None:
    store.heartbeat("a", 1, NOW - 5, NOW, 10.0, {ACME: (2, 7)})
    store.heartbeat("b", 2, NOW - 1, NOW, 10.0)
    rows = store.proxy_rows(NOW, 10.0)
    assert [(r.pid, r.usage) for r in rows] == [(1, {ACME: (2, 7)}), (2, {})]
    store.heartbeat("a", 1, NOW - 5, NOW + 2, 10.0, {})  # the counts are each beat's, not added up
    assert store.proxy_rows(NOW + 2, 10.0)[0].usage == {}
    assert store.proxy_rows(NOW + 20, 10.0) == []  # gone quiet: not serving


def test_a_schema_2_store_is_upgraded_and_its_proxies_read(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    db = sqlite3.connect(home / STORE_FILE, isolation_level=None)
    for script in MIGRATIONS[:2]:
        db.executescript(script)
    db.execute("PRAGMA user_version = 2")
    db.execute("INSERT INTO proxies (id, pid, started, seen) VALUES ('old', 7, ?, ?)", (NOW - 9, NOW))
    db.close()
    os.chmod(home / STORE_FILE, 0o600)
    reader = SqliteStore(home, readonly=True)  # reads an upgraded copy, writes nothing
    assert [(r.pid, r.usage) for r in reader.proxy_rows(NOW, 10.0)] == [(7, {})]
    reader.close()
    assert sqlite3.connect(home / STORE_FILE).execute("PRAGMA user_version").fetchone()[0] == 2
    writer = SqliteStore(home)
    writer.heartbeat("old", 7, NOW - 9, NOW + 1, 10.0, {ACME: (1, 1)})
    assert writer.proxy_rows(NOW + 1, 10.0)[0].usage == {ACME: (1, 1)}
    writer.close()


def test_unreadable_counts_are_skipped(store: Store) -> None:
    store.heartbeat("a", 1, NOW, NOW, 10.0, {ACME: (1, 2)})
    raw = sqlite3.connect(store.path, isolation_level=None)
    raw.execute("""UPDATE proxies SET usage = '[{"surface": "elsewhere", "account": "x", "in_flight": 1,
                   "last_minute": 1}, {"surface": "moonshot-cn", "account": "acme", "in_flight": 4,
                   "last_minute": 5}, {"surface": "moonshot-cn"}]'""")
    raw.close()
    assert store.proxy_rows(NOW, 10.0)[0].usage == {ACME: (4, 5)}


def test_admission_counts_what_is_in_flight_and_in_the_minute() -> None:
    admission = Admission(lambda g: (None, None), lambda: NOW)
    first = admission.admit(ACME, NOW - 70)
    first.release()
    admission.admit(ACME, NOW - 10)
    admission.admit(ACME, NOW - 5).release()
    assert admission.counts(NOW) == {ACME: (1, 2)}
    assert admission.counts(NOW + 120) == {ACME: (1, 0)}


# -- the command -------------------------------------------------------------------------------------------------------


def test_status_json_and_plain_output(kimi_home: Path) -> None:
    store = SqliteStore(kimi_home)
    seeded(store)
    store.heartbeat("a", 99, NOW - 30, time.time(), 10.0, {ACME: (1, 3)})
    store.close()
    runner = CliRunner()
    result = runner.invoke(cli.app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["proxies"][0]["pid"] == 99 and data["accounts"][0]["last_minute"] == 3
    plain = runner.invoke(cli.app, ["status", "--watch"], env={"COLUMNS": "60"})  # no terminal: once, and exits
    assert plain.exit_code == 0 and "In flight 1 of 8; last minute 3 of 200" in plain.output
    assert all(len(line) <= 60 for line in plain.output.splitlines())
    assert "\x1b[" not in plain.output


def test_status_with_ascii_output_uses_plain_symbols(kimi_home: Path) -> None:
    store = SqliteStore(kimi_home)
    seeded(store)
    store.close()
    result = console(kimi_home, "status", PYTHONIOENCODING="ascii")
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode("ascii")
    assert "* 0  one" in text and "sk-...0001" in text


# -- `--watch` in a real pseudo-terminal ----------------------------------------------------------------------------


def console(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONIOENCODING", "LC_", "LANG"))}
    environment.update({HOME_ENV: str(home), **env})
    return subprocess.run([*KIMI_ROTATE, *args], capture_output=True, env=environment, timeout=60, check=False)


def _own_terminal() -> None:
    """Make the terminal the child's controlling one, so that Ctrl-C typed there interrupts it (as in a shell)."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A command running in a pseudo-terminal `columns` wide; `read_until` collects what it draws."""

    def __init__(self, args: list[str], columns: int, **env: str) -> None:
        self.leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        environment = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
        environment.update({"TERM": "xterm-256color", **env})
        self.proc = subprocess.Popen(args, stdin=follower, stdout=follower, stderr=follower, env=environment,
                                     preexec_fn=_own_terminal)
        os.close(follower)
        self.seen = b""

    def read_until(self, wanted: bytes, timeout: float = 15.0) -> bytes:
        """Everything drawn from now until `wanted` appears."""
        start, deadline = len(self.seen), time.monotonic() + timeout
        while wanted not in self.seen[start:]:
            left = deadline - time.monotonic()
            assert left > 0, f"{wanted!r} not drawn; the screen so far: {self.seen[start:][-2000:]!r}"
            ready, _, _ = select.select([self.leader], [], [], left)
            if ready:
                try:
                    self.seen += os.read(self.leader, 65536)
                except OSError:  # EIO: the command ended
                    break
        assert wanted in self.seen[start:], self.seen[start:][-2000:]
        return self.seen[start:]

    def interrupt(self) -> int:
        os.write(self.leader, b"\x03")
        try:
            return self.proc.wait(timeout=15)
        finally:
            with contextlib.suppress(OSError):
                self.seen += os.read(self.leader, 65536)
            os.close(self.leader)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=15)


@pytest.mark.parametrize("no_color", [False, True])
def test_watch_redraws_in_place_as_the_store_changes_and_ctrl_c_ends_it(kimi_home: Path, no_color: bool) -> None:
    store = SqliteStore(kimi_home)
    seeded(store)
    store.close()
    env = {HOME_ENV: str(kimi_home), **({"NO_COLOR": "1"} if no_color else {})}
    term = Terminal([*KIMI_ROTATE, "status", "--watch", "--interval", "0.2"], 100, **env)
    try:
        first = term.read_until(b"Account acme (moonshot-cn)")
        term.read_until(b"401 invalid_authentication_error")
        changed = console(kimi_home, "disable", "one", "--reason", "checked by the watch test")
        assert changed.returncode == 0, changed.stderr
        later = term.read_until(b"checked by the watch test")
        assert b"\x1b[" in later  # redrawn in place: the cursor moves back up over the last screen
        colours = re.findall(rb"\x1b\[[0-9;]*3[0-7]m", first + later)
        assert (not colours) if no_color else colours
        assert term.interrupt() == 0
        assert b"Traceback" not in term.seen
    finally:
        term.kill()


def test_an_interval_out_of_range_is_one_line(kimi_home: Path) -> None:
    result = console(kimi_home, "status", "--watch", "--interval", "0")
    assert result.returncode == 1
    assert result.stderr.decode().strip() == "error: --interval takes seconds from 0.1 to 3600"
