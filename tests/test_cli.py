"""The `kimi-rotate` CLI: every command, its output, and bad input (clear message, exit 1, store unchanged).

Runs in-process with typer's CliRunner (clock pinned through `cli._now`), plus a few real runs of the
installed console script. Every run goes through `run()`, which asserts that no key ever appears in
stdout or stderr.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from typer.testing import CliRunner

from kimi_rotator import cli
from kimi_rotator.backup import DEFAULT_FILE
from kimi_rotator.keys import fingerprint
from kimi_rotator.models import Outcome, OutcomeKind, Strategy, Surface
from kimi_rotator.store import HOME_ENV, Attempt, NewKey, Store
from kimi_rotator.store_sqlite import SqliteStore

KEY_A = "sk-kimi-testAlphaAlphaAlpha01"
KEY_B = "sk-kimi-testBravoBravoBravo02"
KEY_C = "sk-kimi-testCharlieCharlie03"
MOON = "sk-testMoonshotDeltaDeltaDelta04"
KEY_D = "sk-kimi-testDeltaDeltaDelta004"  # for tests/test_cli_pools.py
MOON_E = "sk-testMoonshotEchoEchoEcho05"
BAD_KEYS = ["sk-kimi-testshort", "not-a-key-testabcdefghij", "sk-kimi-test with spaces in", "sk-kimi-" + "t" * 130]
SECRETS = [KEY_A, KEY_B, KEY_C, MOON, KEY_D, MOON_E, *BAD_KEYS]
PASS = "test passphrase 1"
NOW = 1_800_000_000.0

runner = CliRunner()

# The caps in force of a Kimi Code account nothing is known of: its plan's documented concurrency.
KIMI_CODE_DEFAULT_CAPS = {
    "concurrency": {"value": 30, "how": "Kimi Code's documented cap", "source": "default", "at": None},
}


@pytest.fixture(autouse=True)
def pinned_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_now", lambda: NOW)


@pytest.fixture
def home(kimi_home: Path) -> Path:
    return kimi_home


def run(*args: str, input: str | None = None) -> Any:
    result = runner.invoke(cli.app, list(args), input=input)
    for secret in SECRETS:
        assert secret not in result.stdout, f"a key leaked to stdout of {args}"
        assert secret not in result.stderr, f"a key leaked to stderr of {args}"
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), result.exception
    return result


def ok(*args: str, input: str | None = None) -> Any:
    result = run(*args, input=input)
    assert result.exit_code == 0, result.stderr
    return result


def fails(*args: str, input: str | None = None, home: Path, contains: str = "") -> str:
    """Runs a command that must fail as a user error and leave the store exactly as it was."""
    before = state(home)
    result = run(*args, input=input)
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert ";" in lines[0] or "(see `kimi-rotate" in lines[0], "the message says what to do"
    assert "Traceback" not in result.output
    assert contains.lower() in lines[0].lower()
    assert state(home) == before
    return str(lines[0])


def state(home: Path) -> tuple[object, object]:
    s = SqliteStore(home)
    try:
        return s.snapshot(), s.daily("0000-00-00")
    finally:
        s.close()


@pytest.fixture
def store(home: Path) -> Iterator[Store]:
    s = SqliteStore(home)
    yield s
    s.close()


def seed(store: Store, *keys: NewKey) -> list[int]:
    added, _ = store.add_keys(list(keys), NOW)
    return [k.id for k in added]


def nk(secret: str, name: str, **kw: Any) -> NewKey:
    surface = kw.pop("surface", Surface.KIMI_CODE if secret.startswith("sk-kimi-") else Surface.MOONSHOT_CN)
    return NewKey(secret=secret, name=name, surface=surface, **kw)


def listed(home: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(ok("list-keys", "--json").stdout)
    return rows


# -- add-key --------------------------------------------------------------------------------------


def test_add_key_from_argument(home: Path) -> None:
    result = ok("add-key", KEY_A, "main")
    assert "✓ Added key: main (sk-kimi-…ha01, kimi-code)" in result.stdout
    assert "Index: 0" in result.stdout
    assert result.stderr.count("personal use") == 1  # the Kimi Code terms warning, once
    (row,) = listed(home)
    assert (row["name"], row["surface"], row["masked_key"]) == ("main", "kimi-code", "sk-kimi-…ha01")
    assert row["state"] == "active"


def test_add_moonshot_key_with_surface_and_account(home: Path) -> None:
    result = ok("add-key", MOON, "cn", "--account", "acme")
    assert "moonshot-cn" in result.stdout and result.stderr == ""  # no Kimi Code warning
    ok("add-key", "--surface", "moonshot-ai", KEY_B.replace("sk-kimi-", "sk-"), "intl")
    rows = listed(home)
    assert [(r["surface"], r["account"]) for r in rows] == [("moonshot-cn", "acme"), ("moonshot-ai", None)]


def test_add_key_default_name(home: Path) -> None:
    ok("add-key", KEY_A)
    ok("add-key", KEY_B)
    assert [r["name"] for r in listed(home)] == ["Account 1", "Account 2"]


def test_add_key_from_stdin(home: Path) -> None:
    ok("add-key", input=KEY_A + "\n")
    ok("add-key", "-", "piped", input=f"  {KEY_B}\n")
    rows = listed(home)
    assert [r["name"] for r in rows] == ["Account 1", "piped"]
    assert [r["fingerprint"] for r in rows] == [fingerprint(KEY_A), fingerprint(KEY_B)]


def test_add_key_from_hidden_prompt(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return KEY_A

    monkeypatch.setattr(cli, "_stdin_is_tty", lambda: True)
    monkeypatch.setattr(getpass, "getpass", fake_getpass)
    ok("add-key")
    assert prompts == ["API key (input hidden): "]
    assert len(listed(home)) == 1


def test_add_key_empty_stdin(home: Path) -> None:
    fails("add-key", input="", home=home, contains="no key on stdin")


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_add_key_bad_format(home: Path, store: Store, bad: str) -> None:
    seed(store, nk(KEY_A, "a"))
    fails("add-key", bad, "x", home=home, contains="invalid key")


def test_add_key_surface_mismatch(home: Path) -> None:
    fails("add-key", "--surface", "moonshot-cn", KEY_A, home=home, contains="kimi code key")
    fails("add-key", "--surface", "kimi-code", MOON, home=home, contains="invalid key")


def test_add_key_name_instead_of_key_hints_at_dash(home: Path) -> None:
    assert "add-key - NAME" in fails("add-key", "work", input=KEY_A, home=home)


def test_add_key_duplicate(home: Path, store: Store) -> None:
    seed(store, nk(KEY_A, "main"))
    assert "[0] main" in fails("add-key", KEY_A, "again", home=home, contains="already in the pool")


def test_add_key_duplicate_name_and_bad_names(home: Path, store: Store) -> None:
    seed(store, nk(KEY_A, "main"))
    fails("add-key", KEY_B, "main", home=home, contains="already exists")
    fails("add-key", KEY_B, "42", home=home, contains="invalid name")
    fails("add-key", KEY_B, "x" * 65, home=home, contains="invalid name")
    fails("add-key", KEY_B, "ok", "--account", " ", home=home, contains="account label")


def test_bad_surface_is_a_usage_error(home: Path) -> None:
    before = state(home)
    assert run("add-key", "--surface", "mars", KEY_A).exit_code == 2
    assert state(home) == before


# -- list-keys ------------------------------------------------------------------------------------


def test_list_keys_empty(home: Path) -> None:
    assert "No keys configured." in ok("list-keys").stdout
    assert json.loads(ok("list-keys", "--json").stdout) == []


def test_list_keys_blocks(home: Path, store: Store) -> None:
    a, _, c, _ = seed(
        store,
        nk(KEY_A, "main", health=85, total_requests=50, successful_requests=45),
        nk(KEY_B, "spare", health=25, cooldown_until=NOW + 125, cooldown_reason="rate limited"),
        nk(KEY_C, "old", health=95),
        nk(MOON, "cn", account="acme"),
    )
    store.set_disabled(c, "invalid key (401)")
    store.use_key(a)
    out = ok("list-keys").stdout
    assert "Kimi API Keys (4 total, strategy: health-based):" in out
    assert "● [0] main\n   Key: sk-kimi-…ha01" in out
    assert "○ [1] spare" in out
    assert "Health: █████████░ 85%" in out  # 85 → 9 blocks (round half up)
    assert "Health: ███░░░░░░░ 25%" in out  # 25 → 3
    assert "Health: ██████████ 95%" in out  # 95 → 10
    assert "Requests: 45/50 successful" in out
    assert "Status: ⏱ Cooling (rate limited, ~3m left)" in out  # 125 s → ~3m
    assert "Status: ✗ Disabled (invalid key (401))" in out
    assert "Surface: moonshot-cn, account: acme" in out
    assert out.count("Status: ✓ Active") == 2


def test_list_keys_health_includes_time_recovery(home: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    seed(store, nk(KEY_A, "main", health=50))
    monkeypatch.setattr(cli, "_now", lambda: NOW + 2 * 3600)  # +10 per idle hour
    assert "Health: ███████░░░ 70%" in ok("list-keys").stdout
    assert listed(home)[0]["health"] == 70


def test_list_keys_json_fields(home: Path, store: Store) -> None:
    a, _, c = seed(
        store,
        nk(KEY_A, "main", total_requests=5, successful_requests=4),
        nk(KEY_B, "spare", cooldown_until=NOW + 600, cooldown_reason="5-hour quota"),
        nk(MOON, "cn", account="acme"),
    )
    store.set_disabled(c, "disabled by hand")
    store.use_key(a)
    rows = listed(home)
    assert set(rows[0]) >= {
        "index", "name", "masked_key", "fingerprint", "surface", "account", "health", "state", "reason",
        "cooldown_until", "total_requests", "successful_requests", "rate_limited_requests", "failed_requests",
        "last_used",
    }
    assert rows[0] | {"added_at": None} == {
        "index": 0, "name": "main", "masked_key": "sk-kimi-…ha01", "fingerprint": rows[0]["fingerprint"],
        "surface": "kimi-code", "account": None, "current": True, "health": 100, "state": "active", "reason": None,
        "cooldown_until": None, "total_requests": 5, "successful_requests": 4, "rate_limited_requests": 0,
        "failed_requests": 1, "last_used": None, "added_at": None, "quota": None,
        "caps": KIMI_CODE_DEFAULT_CAPS,  # Kimi Code's documented concurrency
    }
    assert len(rows[0]["fingerprint"]) == 10
    assert (rows[1]["state"], rows[1]["reason"], rows[1]["cooldown_until"]) == ("cooling", "5-hour quota", NOW + 600)
    assert (rows[2]["state"], rows[2]["reason"], rows[2]["account"]) == ("disabled", "disabled by hand", "acme")
    assert isinstance(rows[0]["health"], int)


# -- keys by index or name ------------------------------------------------------------------------


def test_remove_key_by_index_and_name(home: Path, store: Store) -> None:
    seed(store, nk(KEY_A, "a"), nk(KEY_B, "b"), nk(KEY_C, "c"))
    assert "✓ Removed key [1] b (sk-kimi-…vo02)" in ok("remove-key", "1").stdout
    ok("remove-key", "c")
    assert [r["name"] for r in listed(home)] == ["a"]


@pytest.mark.parametrize("command", ["remove-key", "use-key", "enable", "disable", "clear-limits"])
def test_bad_reference(home: Path, store: Store, command: str) -> None:
    seed(store, nk(KEY_A, "a"), nk(KEY_B, "b"))
    assert "0-1" in fails(command, "2", home=home, contains="no key at index 2")
    fails(command, "nobody", home=home, contains="no key named")
    # A key pasted instead of an index is refused without being echoed.
    fails(command, KEY_A, home=home, contains="not by the key itself")


def test_bad_index_with_empty_store(home: Path) -> None:
    fails("remove-key", "0", home=home, contains="no keys")


def test_use_key(home: Path, store: Store) -> None:
    a, b = seed(store, nk(KEY_A, "a"), nk(KEY_B, "b", cooldown_until=NOW + 60, cooldown_reason="rate limited"))
    assert "✓ Now using: a (index 0)" in ok("use-key", "0").stdout
    assert store.settings().active_key_id == a
    result = ok("use-key", "b")
    assert "note: this key is cooling" in result.stderr
    assert store.settings().active_key_id == b
    assert [r["current"] for r in listed(home)] == [False, True]


def test_enable_disable(home: Path, store: Store) -> None:
    seed(store, nk(KEY_A, "a", cooldown_until=NOW + 60, cooldown_reason="rate limited"))
    assert "✓ Disabled key: a (index 0): revoked" in ok("disable", "0", "--reason", "revoked").stdout
    assert listed(home)[0]["state"] == "disabled" and listed(home)[0]["reason"] == "revoked"
    fails("disable", "0", "--reason", "  ", home=home, contains="reason")
    ok("enable", "a")
    row = listed(home)[0]
    assert (row["state"], row["reason"], row["cooldown_until"]) == ("active", None, None)  # enable ends the cooldown
    assert "was not disabled" in ok("enable", "0").stdout
    ok("disable", "a")
    assert listed(home)[0]["reason"] == "disabled by hand"


# -- rotation and settings ------------------------------------------------------------------------


def test_rotate_moves_under_every_strategy(home: Path, store: Store) -> None:
    seed(store, nk(KEY_A, "a"), nk(KEY_B, "b"))
    for strategy in ("health-based", "round-robin", "sticky"):
        ok("set-strategy", strategy)
        ok("use-key", "0")
        out = ok("rotate").stdout
        assert "✓ Rotated to the next key" in out and "Now using: b (index 1)" in out, strategy
        assert "Now using: a (index 0)" in ok("rotate").stdout


def test_rotate_with_nothing_to_rotate_to(home: Path, store: Store) -> None:
    fails("rotate", home=home, contains="no keys configured")
    a, _ = seed(store, nk(KEY_A, "a"), nk(KEY_B, "b", cooldown_until=NOW + 300, cooldown_reason="rate limited"))
    store.use_key(a)
    message = fails("rotate", home=home, contains="no other kimi-code key can serve now")
    assert "2 kimi-code key(s): 1 cooling" in message and "~5m" in message and "wait for it" in message


def test_rotate_names_the_platform_it_stays_on(home: Path, store: Store) -> None:
    """A key of another platform never stands in, so the message says which platform has no other key."""
    a, _ = seed(store, nk(KEY_A, "a"), nk(KEY_B, "b", surface=Surface.MOONSHOT_CN))
    store.use_key(a)
    message = fails("rotate", home=home, contains="no other kimi-code key can serve now (1 kimi-code key(s)")
    assert "add or enable another kimi-code key" in message and "wait" not in message


def test_set_strategy(home: Path, store: Store) -> None:
    assert "✓ Rotation strategy set to: round-robin" in ok("set-strategy", "round-robin").stdout
    assert store.settings().strategy is Strategy.ROUND_ROBIN
    before = state(home)
    assert run("set-strategy", "fastest").exit_code == 2
    assert state(home) == before


def test_set_auto_refresh_and_cooldown(home: Path, store: Store) -> None:
    assert "✓ Auto-refresh health: false" in ok("set-auto-refresh", "false").stdout
    assert store.settings().auto_refresh_health is False
    ok("set-auto-refresh", "true")
    assert store.settings().auto_refresh_health is True
    assert "✓ Health refresh cooldown: 45 minutes" in ok("set-cooldown", "45").stdout
    assert store.settings().health_refresh_cooldown_minutes == 45
    before = state(home)
    for args in (("set-auto-refresh", "yes"), ("set-cooldown", "0"), ("set-cooldown", "1441"), ("set-cooldown", "x")):
        assert run(*args).exit_code == 2, args
    assert state(home) == before


def test_clear_limits(home: Path, store: Store) -> None:
    seed(
        store,
        nk(KEY_A, "a", cooldown_until=NOW + 60, cooldown_reason="rate limited", health=40),
        nk(KEY_B, "b", cooldown_until=NOW + 60, cooldown_reason="rate limited"),
        nk(KEY_C, "c", cooldown_until=NOW + 60, cooldown_reason="rate limited"),
    )
    assert "✓ Cleared limits for key: a (index 0)" in ok("clear-limits", "0").stdout
    rows = listed(home)
    assert [r["state"] for r in rows] == ["active", "cooling", "cooling"]
    assert rows[0]["health"] == 40  # as the reference: health is left alone
    assert "✓ Cleared limits for all 3 key(s)" in ok("clear-limits", " ALL ").stdout
    assert [r["state"] for r in listed(home)] == ["active"] * 3


def test_refresh_health(home: Path, store: Store) -> None:
    assert "No keys needed health refresh." in ok("refresh-health").stdout
    seed(store, nk(KEY_A, "a", health=50), nk(KEY_B, "b"))
    out = ok("refresh-health").stdout
    assert "✓ Refreshed health for 1 key(s):" in out and "a: 50% → 60%" in out
    assert [r["health"] for r in listed(home)] == [60, 100]
    ok("set-auto-refresh", "false")
    before = state(home)
    assert "Auto-refresh health is off" in ok("refresh-health").stdout
    assert state(home) == before


# -- stats ----------------------------------------------------------------------------------------


def test_stats(home: Path, store: Store) -> None:
    assert "No keys configured." in ok("stats").stdout
    a, b = seed(store, nk(KEY_A, "a"), nk(KEY_B, "b"))
    day = 86_400.0
    store.record(
        [
            Attempt(a, Outcome(kind=OutcomeKind.SUCCESS, latency_ms=245), NOW),
            Attempt(a, Outcome(kind=OutcomeKind.SUCCESS, latency_ms=198), NOW),
            Attempt(a, Outcome(kind=OutcomeKind.SUCCESS, latency_ms=210), NOW - 3 * day),
            Attempt(a, Outcome(kind=OutcomeKind.RATE_LIMITED, until=NOW - day), NOW - 2 * day),
            Attempt(a, Outcome(kind=OutcomeKind.SERVER_ERROR), NOW - 10 * day),  # outside the 7-day window
            Attempt(b, Outcome(kind=OutcomeKind.SUCCESS, latency_ms=100), NOW - 6 * day),  # oldest day inside it
        ]
    )
    out = ok("stats").stdout
    block_a = out.split("[0] a")[1].split("[1] b")[0]
    for line in (
        "Total Requests: 5", "Successful: 3", "Rate Limited: 1", "Failed: 1", "Success Rate: 60.0%",
        "Avg Response Time: 218ms", "Response Time Range: 198ms - 245ms", "Requests Today: 2",
        "Requests Last 7 Days: 4",
    ):
        assert line in block_a, line
    aggregate = out.split("Aggregate Statistics")[1]
    for line in (
        "Keys: 2", "Total Requests: 6", "Successful: 4", "Rate Limited: 1", "Failed: 1",
        "Overall Success Rate: 66.7%", "Overall Avg Response Time: 188ms", "Requests Today: 2",
        "Requests Last 7 Days: 5",
    ):
        assert line in aggregate, line
    # Counters add up for every key.
    for row in listed(home):
        parts = row["successful_requests"] + row["rate_limited_requests"] + row["failed_requests"]
        assert row["total_requests"] == parts


# -- export / import ------------------------------------------------------------------------------


def test_export_import_round_trip(home: Path, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed(
        store,
        nk(KEY_A, "main", health=70, total_requests=4, successful_requests=3),
        nk(MOON, "cn", surface=Surface.MOONSHOT_AI, account="acme"),
    )
    store.update_settings(strategy=Strategy.STICKY)
    file = tmp_path / "backup.enc"
    out = ok("export-keys", str(file), input=f"{PASS}\n{PASS}\n").stdout
    assert f"✓ Exported 2 key(s) to: {file}" in out
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    for secret in SECRETS:
        assert secret not in file.read_text()
    exported = listed(home)

    monkeypatch.setenv(HOME_ENV, str(tmp_path / "other-home"))
    result = ok("import-keys", str(file), input=f"{PASS}\n")
    assert "Imported: 2 key(s)" in result.stdout and "Skipped (already present): 0 key(s)" in result.stdout
    assert result.stderr.count("personal use") == 1
    imported = listed(tmp_path / "other-home")
    keep = ("name", "masked_key", "fingerprint", "surface", "account", "health", "total_requests")
    assert [{k: r[k] for k in keep} for r in imported] == [{k: r[k] for k in keep} for r in exported]
    other = SqliteStore(tmp_path / "other-home")
    try:
        assert other.settings().strategy is Strategy.STICKY
    finally:
        other.close()
    # Importing again skips every key and changes nothing.
    before = state(tmp_path / "other-home")
    assert "Skipped (already present): 2 key(s)" in ok("import-keys", str(file), input=f"{PASS}\n").stdout
    assert state(tmp_path / "other-home") == before


def test_export_default_file_name(home: Path, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed(store, nk(KEY_A, "a"))
    monkeypatch.chdir(tmp_path)
    ok("export-keys", input=f"{PASS}\n{PASS}\n")
    assert (tmp_path / DEFAULT_FILE).exists()


def test_export_passphrase_from_hidden_prompt(
    home: Path, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(store, nk(KEY_A, "a"))
    answers = iter([PASS, PASS])
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(answers)

    monkeypatch.setattr(cli, "_stdin_is_tty", lambda: True)
    monkeypatch.setattr(getpass, "getpass", fake_getpass)
    ok("export-keys", str(tmp_path / "b.enc"))
    assert prompts == ["Backup passphrase: ", "Repeat the passphrase: "]


def test_export_errors(home: Path, store: Store, tmp_path: Path) -> None:
    file = tmp_path / "b.enc"
    fails("export-keys", str(file), input=f"{PASS}\n{PASS}\n", home=home, contains="no keys to export")
    seed(store, nk(KEY_A, "a"))
    fails("export-keys", str(file), input=f"{PASS}\nsomething else\n", home=home, contains="do not match")
    fails("export-keys", str(file), input="short\nshort\n", home=home, contains="shorter than 8")
    fails("export-keys", str(file), input=f"{PASS}\n", home=home, contains="no passphrase on stdin")
    assert not file.exists()
    # Said before the passphrase is asked for (no input is given), and what is really wrong.
    fails("export-keys", str(tmp_path / "no-such-dir" / "b.enc"), home=home,
          contains=f"the folder {tmp_path / 'no-such-dir'} does not exist")
    file.write_text("precious")
    fails("export-keys", str(file), input=f"{PASS}\n{PASS}\n", home=home, contains="--force")
    assert file.read_text() == "precious"
    ok("export-keys", "--force", str(file), input=f"{PASS}\n{PASS}\n")
    assert file.read_text() != "precious"


def test_import_keys_errors(home: Path, store: Store, tmp_path: Path) -> None:
    seed(store, nk(KEY_A, "a"))
    file = tmp_path / "b.enc"
    ok("export-keys", str(file), input=f"{PASS}\n{PASS}\n")
    store.remove_key(store.keys()[0].id)  # so a successful import would change the store
    fails("import-keys", str(file), input="wrong passphrase\n", home=home, contains="wrong passphrase")
    fails("import-keys", str(file), input="", home=home, contains="no passphrase on stdin")
    fails("import-keys", str(tmp_path / "missing.enc"), home=home, contains="does not exist")
    garbage = tmp_path / "garbage.enc"
    garbage.write_text("this is not a backup at all\n")
    # Reported before any passphrase is asked for: no input is given.
    fails("import-keys", str(garbage), home=home, contains="not an encrypted key backup")
    cut = tmp_path / "cut.enc"
    cut.write_text(file.read_text()[:60])
    fails("import-keys", str(cut), home=home, contains="too short")


def test_import_reference_export(home: Path, tmp_path: Path) -> None:
    # As opencode-kimi-rotator's exportKeys writes it (Node crypto): base64(salt ‖ iv ‖ tag ‖ ciphertext).
    doc = {
        "version": 1, "exportedAt": "2027-01-15T08:00:00.000Z", "rotationStrategy": "sticky",
        "accounts": [
            {"key": KEY_A, "name": "Account 1", "addedAt": 1, "lastUsed": 1, "healthScore": 85,
             "totalRequests": 50, "successfulRequests": 45, "responseTimes": [245], "dailyRequests": {}},
            {"key": KEY_B, "name": "Work", "addedAt": 1, "lastUsed": 1},
        ],
    }
    salt, iv = os.urandom(32), os.urandom(16)
    aes_key = hashlib.scrypt(PASS.encode(), salt=salt, n=16384, r=8, p=1, dklen=32)
    enc = Cipher(algorithms.AES(aes_key), modes.GCM(iv)).encryptor()
    ciphertext = enc.update(json.dumps(doc).encode()) + enc.finalize()
    file = tmp_path / "kimi-keys-backup.json.enc"
    file.write_text(base64.b64encode(salt + iv + enc.tag + ciphertext).decode())
    out = ok("import-keys", str(file), input=f"{PASS}\n").stdout
    assert "Imported: 2 key(s)" in out and "Rotation strategy: sticky" in out
    rows = listed(home)
    assert [(r["name"], r["health"], r["total_requests"], r["successful_requests"]) for r in rows] == [
        ("Account 1", 85, 50, 45),
        ("Work", 100, 0, 0),
    ]


# -- import-opencode ------------------------------------------------------------------------------


def opencode_file(path: Path, accounts: list[dict[str, Any]], **top: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "accounts": accounts, "activeIndex": 0, **top}, indent=2))
    return path


def test_import_opencode(home: Path, store: Store, tmp_path: Path) -> None:
    path = opencode_file(
        tmp_path / "kimi-accounts.json",
        [
            {"key": KEY_A, "name": "Main", "addedAt": 1, "lastUsed": 1, "healthScore": 85, "totalRequests": 50,
             "successfulRequests": 45, "rateLimitResetTime": (NOW + 125) * 1000},
            {"key": KEY_B, "addedAt": 1, "lastUsed": 1},  # a v1.0 account
        ],
        rotationStrategy="round-robin",
    )
    before = path.read_bytes()
    result = ok("import-opencode", str(path))
    assert "Imported: 2 key(s)" in result.stdout
    assert "delete it" in result.stdout and str(path) in result.stdout
    assert result.stderr.count("personal use") == 1
    assert path.read_bytes() == before  # read only
    rows = listed(home)
    assert [(r["name"], r["health"], r["state"], r["total_requests"]) for r in rows] == [
        ("Main", 85, "cooling", 50),
        ("Account 2", 100, "active", 0),
    ]
    assert rows[0]["cooldown_until"] == pytest.approx(NOW + 125)
    assert store.settings().strategy is Strategy.ROUND_ROBIN


def test_import_opencode_default_path(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    fails("import-opencode", home=home, contains=str(tmp_path / ".config/opencode/kimi-accounts.json"))
    opencode_file(tmp_path / ".config/opencode/kimi-accounts.json", [{"key": KEY_A}])
    ok("import-opencode")
    assert len(listed(home)) == 1


def test_import_opencode_errors(home: Path, store: Store, tmp_path: Path) -> None:
    seed(store, nk(KEY_C, "existing"))
    fails("import-opencode", str(tmp_path / "missing.json"), home=home, contains="does not exist")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"accounts": [')
    fails("import-opencode", str(bad_json), home=home, contains="not valid JSON")
    schema = opencode_file(tmp_path / "schema.json", [{"name": "no key"}])
    fails("import-opencode", str(schema), home=home, contains="accounts[0].key")


# -- help, usage and real processes ---------------------------------------------------------------


COMMANDS = [
    "add-key", "list-keys", "remove-key", "rotate", "use-key", "set-strategy", "stats", "clear-limits",
    "refresh-health", "enable", "disable", "set-auto-refresh", "set-cooldown", "export-keys", "import-keys",
    "import-opencode", "add-keys", "rename", "set-account",
]


def test_help_lists_every_command(home: Path) -> None:
    out = ok("--help").stdout
    for command in COMMANDS:
        assert command in out
        assert ok(command, "--help").stdout.strip()


def test_usage_errors_exit_2(home: Path) -> None:
    assert run("no-such-command").exit_code == 2
    assert run("remove-key").exit_code == 2
    assert run("list-keys", "--bogus").exit_code == 2


def test_key_typed_in_the_wrong_place_is_masked_in_usage_errors(home: Path) -> None:
    result = run(KEY_A)
    assert result.exit_code == 2 and "sk-kimi-…ha01" in result.stderr
    assert run("set-cooldown", KEY_B).exit_code == 2


def test_unreadable_store_is_a_clear_error(home: Path) -> None:
    home.mkdir(mode=0o700)
    (home / "store.db").write_bytes(b"this is not sqlite" * 10)
    result = run("list-keys")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and "store.db" in result.stderr and "Traceback" not in result.output
    assert (home / "store.db").read_bytes() == b"this is not sqlite" * 10


def console_script() -> str:
    found = shutil.which("kimi-rotate", path=str(Path(sys.executable).parent)) or shutil.which("kimi-rotate")
    if found is None:
        pytest.skip("the kimi-rotate console script is not installed")
    return found


def sh(home: Path, *args: str, input: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, HOME_ENV: str(home)}
    proc = subprocess.run(
        [console_script(), *args], input=input, capture_output=True, text=True, env=env, timeout=60, check=False
    )
    for secret in SECRETS:
        assert secret not in proc.stdout and secret not in proc.stderr
    return proc


def test_console_script_key_from_pipe_and_json(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = sh(home, "add-key", "-", "piped", input=KEY_A + "\n")
    assert proc.returncode == 0, proc.stderr
    assert "personal use" in proc.stderr
    proc = sh(home, "list-keys", "--json")
    assert proc.returncode == 0
    (row,) = json.loads(proc.stdout)
    assert (row["name"], row["masked_key"]) == ("piped", "sk-kimi-…ha01")
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "store.db").stat().st_mode) == 0o600


def test_console_script_errors(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = sh(home, "remove-key", "3")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: no key at index 3") and proc.stderr.count("\n") == 1
    assert sh(home, "set-strategy", "fastest").returncode == 2
    proc = sh(home, "add-key", BAD_KEYS[0], "x")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    tmp_backup = tmp_path / "b.enc"
    assert sh(home, "add-key", KEY_B, input="").returncode == 0
    assert sh(home, "export-keys", str(tmp_backup), input=f"{PASS}\n{PASS}\n").returncode == 0
    proc = sh(tmp_path / "home2", "import-keys", str(tmp_backup), input="not the passphrase\n")
    assert proc.returncode == 1 and "wrong passphrase" in proc.stderr
