"""Managing real pools from the CLI: bulk add, rename and accounts, list-keys at 200 keys, stats --json, asking
before a risky remove-key (in a real pseudo-terminal), --version and completion, import-opencode's skips and
notes, and the hints that used to point at the wrong problem.

Same helpers as tests/test_cli.py (in-process runs with the clock pinned; every run checks that no key leaks).
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from test_cli import (  # the fixtures are imported so that they apply here too
    BAD_KEYS,
    KEY_A,
    KEY_B,
    KEY_C,
    KEY_D,
    MOON,
    MOON_E,
    NOW,
    SECRETS,
    console_script,
    fails,
    home,
    listed,
    nk,
    ok,
    opencode_file,
    pinned_clock,
    run,
    seed,
    state,
    store,
)

from kimi_rotator import __version__, cli, views
from kimi_rotator.models import Outcome, OutcomeKind, Strategy, Surface
from kimi_rotator.store import HOME_ENV, Attempt, Store

__all__ = ["home", "pinned_clock", "store"]  # fixtures, used by name


def errors_of(result: Any) -> list[str]:
    return [str(line) for line in result.stderr.strip().splitlines()]


# -- add-keys -------------------------------------------------------------------------------------


def test_add_keys_from_a_file(home: Path, tmp_path: Path) -> None:
    file = tmp_path / "keys.txt"
    file.write_text(
        "\ufeff# my keys\r\n"
        f"{KEY_A} main account\r\n"
        "\n"
        f"   {KEY_B}\tspare\n"
        f"{MOON}\n",
        encoding="utf-8",
    )
    result = ok("add-keys", str(file), "--account", "acme")
    assert "✓ Added 3 key(s):" in result.stdout
    assert "  [0] main account (sk-kimi-…ha01, kimi-code)" in result.stdout
    assert "  [1] spare (sk-kimi-…vo02, kimi-code)" in result.stdout
    assert "  [2] Account 3 (sk-…ta04, moonshot-cn)" in result.stdout
    assert f"The file {file} holds these keys in plain text; delete it" in result.stdout
    assert result.stderr.count("personal use") == 1
    rows = listed(home)
    assert [(r["name"], r["surface"], r["account"]) for r in rows] == [
        ("main account", "kimi-code", "acme"), ("spare", "kimi-code", "acme"), ("Account 3", "moonshot-cn", "acme"),
    ]


def test_add_keys_from_stdin_with_a_surface_for_all(home: Path) -> None:
    lines = f"{MOON} cn one\n{MOON_E} cn two\n"
    ok("add-keys", "--surface", "moonshot-ai", input=lines)
    ok("add-keys", "-", input=f"{KEY_A}\n")
    assert [(r["name"], r["surface"]) for r in listed(home)] == [
        ("cn one", "moonshot-ai"), ("cn two", "moonshot-ai"), ("Account 3", "kimi-code"),
    ]


def test_add_keys_reports_every_bad_line_and_adds_nothing(home: Path, store: Store) -> None:
    seed(store, nk(KEY_A, "main"))
    before = state(home)
    text = "\n".join([
        "# a comment",                  # 1
        f"{KEY_B} fine",                 # 2
        f"{BAD_KEYS[0]} short",          # 3
        f"{KEY_A} again",                # 4: already in the pool
        f"{KEY_C} main",                 # 5: name taken in the pool
        f"{KEY_B} fine twice",           # 6: same key as line 2
        f"{KEY_D} fine",                 # 7: same name as line 2
        f"Bearer {MOON}",                # 8: copied with its header
        f"{MOON_E} 42",                  # 9: a number is not a name
        f"{BAD_KEYS[1]}",                # 10
    ])
    result = run("add-keys", input=text)
    assert result.exit_code == 1
    lines = errors_of(result)
    assert lines[:-1] == [
        "line 3: invalid key sk-kimi-…: the key is shorter than 20 characters (is it cut off?)",
        "line 4: this key is already in the pool as [0] main",
        "line 5: a key named 'main' already exists ([0])",
        "line 6: sk-kimi-…vo02 is also on line 2",
        "line 7: the name 'fine' is also on line 2",
        'line 8: invalid key: it starts with "Bearer", which belongs to the HTTP header, not to the key; '
        'give only the key, from "sk-" on',
        "line 9: invalid name for sk-…ho05: the name is a number, which would be read as an index; add a letter",
        'line 10: invalid key not…ghij: a Kimi or Moonshot key starts with "sk-"',
    ]
    assert lines[-1] == ("error: 8 of 9 key line(s) have problems (listed above), so nothing was added; "
                         "fix those lines and run the command again")
    assert state(home) == before


def test_add_keys_refuses_a_clash_that_only_the_pool_knows(home: Path, store: Store) -> None:
    seed(store, nk(KEY_A, "main"))
    before = state(home)
    result = run("add-keys", input=f"{KEY_B} new\n{KEY_C} main\n")
    assert result.exit_code == 1
    assert errors_of(result)[0] == "line 2: a key named 'main' already exists ([0])"
    assert "1 of 2 key line(s)" in errors_of(result)[-1]
    assert state(home) == before


def test_add_keys_refuses_a_key_or_a_name_given_twice_in_the_file(home: Path, store: Store) -> None:
    before = state(home)
    result = run("add-keys", input=f"{KEY_A} one\n\n{KEY_B} two\n{KEY_A} three\n{KEY_C} two\n")
    assert result.exit_code == 1
    assert errors_of(result)[:-1] == [
        "line 4: sk-kimi-…ha01 is also on line 1", "line 5: the name 'two' is also on line 3",
    ]
    assert "2 of 4 key line(s)" in errors_of(result)[-1]
    assert state(home) == before


def test_add_keys_input_errors(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fails("add-keys", input="# nothing but comments\n\n", home=home, contains="no keys in stdin")
    fails("add-keys", str(tmp_path / "missing.txt"), home=home, contains="does not exist")
    fails("add-keys", str(tmp_path), home=home, contains="is a folder")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(f"{KEY_A} caf\xe9\n".encode("latin-1"))
    fails("add-keys", str(latin), home=home, contains="not UTF-8")
    fails("add-keys", "--account", " ", input=f"{KEY_A}\n", home=home, contains="account label")
    monkeypatch.setattr(cli, "_stdin_is_tty", lambda: True)
    fails("add-keys", home=home, contains="not the terminal (the keys would show on screen)")


# -- add-key: one duplicate check, inside the store's transaction --------------------------------


def test_add_key_refuses_what_the_store_refuses(home: Path, store: Store) -> None:
    seed(store, nk(KEY_A, "main"))
    assert "as [0] main; nothing was added" in fails("add-key", KEY_A, "x", home=home)
    assert "a key named 'main' already exists ([0]); choose another name" in fails(
        "add-key", KEY_B, "main", home=home
    )
    assert "looks like an API key" in fails("add-key", KEY_B, KEY_C, home=home, contains="invalid name")


# -- rename and set-account -----------------------------------------------------------------------


def test_rename_keeps_counters_state_and_the_current_mark(home: Path, store: Store) -> None:
    a, _ = seed(
        store,
        nk(KEY_A, "main", total_requests=9, successful_requests=7, health=60),
        nk(KEY_B, "spare", cooldown_until=NOW + 600, cooldown_reason="rate limited"),
    )
    store.use_key(a)
    before = listed(home)
    assert "✓ Renamed key [0]: main → Work laptop" in ok("rename", "main", "Work laptop").stdout
    ok("rename", "1", " Spare key ")
    after = listed(home)
    assert [r["name"] for r in after] == ["Work laptop", "Spare key"]
    for old, new in zip(before, after, strict=True):
        assert {**old, "name": None} == {**new, "name": None}
    fails("rename", "0", "Spare key", home=home, contains="a key named 'Spare key' already exists ([1])")
    fails("rename", "0", "7", home=home, contains="invalid name")
    fails("rename", "0", "  ", home=home, contains="invalid name")
    fails("rename", "nobody", "x", home=home, contains="no key named")
    ok("rename", "0", "Work laptop")  # its own name again: fine
    assert run("rename", "0").exit_code == 2


def test_set_account_and_back_to_none(home: Path, store: Store) -> None:
    seed(store, nk(KEY_A, "main", total_requests=3, successful_requests=3), nk(KEY_B, "spare"))
    assert "✓ Key [0] main: account acme (was: none)" in ok("set-account", "main", "acme").stdout
    assert "✓ Key [0] main: account beta (was: acme)" in ok("set-account", "0", " beta ").stdout
    assert [(r["account"], r["total_requests"]) for r in listed(home)] == [("beta", 3), (None, 0)]
    assert "account none (was: beta)" in ok("set-account", "0", "--none").stdout
    assert listed(home)[0]["account"] is None
    fails("set-account", "0", "x" * 65, home=home, contains="account label")
    before = state(home)
    assert run("set-account", "0").exit_code == 2  # neither an account nor --none
    assert run("set-account", "0", "acme", "--none").exit_code == 2
    assert state(home) == before


# -- list-keys ------------------------------------------------------------------------------------


def test_a_fresh_pool_marks_the_key_its_first_request_goes_to(home: Path, store: Store) -> None:
    seed(
        store,
        nk(KEY_A, "a", health=60),
        nk(KEY_B, "b", cooldown_until=NOW + 60, cooldown_reason="rate limited"),
        nk(KEY_C, "c"),
        nk(MOON, "cn"),
    )
    # health-based: the healthiest eligible key; and each surface has its own current key.
    assert [r["current"] for r in listed(home)] == [False, False, True, True]
    out = ok("list-keys").stdout
    assert "○ [0] a" in out and "● [2] c" in out and "● [3] cn" in out
    ok("set-strategy", "round-robin")  # the first eligible key
    assert [r["current"] for r in listed(home)] == [True, False, False, True]
    ok("use-key", "c")
    assert [r["current"] for r in listed(home)] == [False, False, True, True]
    # A key in use stays marked while it cools, as in the reference tool.
    store.record([Attempt(store.keys()[2].id, Outcome(kind=OutcomeKind.RATE_LIMITED, until=NOW + 60), NOW)])
    assert [r["current"] for r in listed(home)] == [False, False, True, True]


def test_cooldowns_show_the_clock_time_they_end(home: Path, store: Store, utc: None) -> None:
    seed(
        store,
        nk(KEY_A, "soon", cooldown_until=NOW + 125, cooldown_reason="rate limited"),
        nk(KEY_B, "tomorrow", cooldown_until=NOW + 86_400 + 3600, cooldown_reason="weekly quota"),
    )
    out = ok("list-keys").stdout
    assert "Status: ⏱ Cooling (rate limited, ~3m left) until 08:03" in out  # 08:02:05, rounded up
    assert "Status: ⏱ Cooling (weekly quota, ~25h left) until 2027-01-16 09:00" in out
    out = ok("list-keys", "--compact").stdout
    assert "cooling until 08:03 (~3m): rate limited" in out
    assert "cooling until 2027-01-16 09:00 (~25h): weekly quota" in out


def seed_200(store: Store) -> None:
    keys = [
        nk(f"sk-kimi-test{i:020d}", f"a rather long name for key number {i}" if i % 50 == 0 else f"key {i}",
           account="team-alpha" if i % 2 else None)
        for i in range(200)
    ]
    keys[7] = nk(keys[7].secret, "key 7", cooldown_until=NOW + 125, cooldown_reason="429 rate_limit_reached_error")
    keys[9] = nk(keys[9].secret, "key 9", disabled_reason="invalid key (401)")
    keys[150] = nk("sk-test" + "m" * 20 + "150", "china", surface=Surface.MOONSHOT_CN)
    seed(store, *keys)


def test_list_keys_at_200_keys_is_one_line_per_key_within_the_terminal(
    home: Path, store: Store, monkeypatch: pytest.MonkeyPatch, utc: None
) -> None:
    seed_200(store)
    monkeypatch.setenv("COLUMNS", "80")
    lines = ok("list-keys").stdout.strip("\n").splitlines()  # compact by default above 10 keys
    assert lines[0] == "Kimi API Keys (200 total, strategy: health-based):"
    header, rows = lines[2], lines[3:]
    assert header.split() == ["#", "NAME", "SURFACE", "HEALTH", "OK/ALL", "STATE"]  # KEY, ACCOUNT give way
    assert len(rows) == 200 and all(len(line) <= 80 for line in lines)
    assert sum(line.startswith("●") for line in rows) == 2  # one per surface: kimi-code and moonshot-cn
    assert rows[0].startswith("●   0  a rather long n…  kimi-code      100%     0/0  active")
    assert rows[7] == "    7  key 7             kimi-code      100%     0/0  cooling until 08:03 (~3m)…"  # reason cut
    assert rows[9].endswith("  disabled: invalid key (40…")

    monkeypatch.setenv("COLUMNS", "160")
    wide = ok("list-keys").stdout.strip("\n").splitlines()
    assert wide[2].split() == ["#", "NAME", "KEY", "SURFACE", "ACCOUNT", "HEALTH", "OK/ALL", "STATE"]
    assert wide[3].startswith("●   0  a rather long name for…   sk-kimi-…0000  kimi-code    -   ")  # capped at 24
    assert "key 7" in wide[10] and wide[10].endswith("cooling until 08:03 (~3m): 429 rate_limit_reached_error")
    assert "team-alpha" in wide[4]

    assert ok("list-keys", "--long").stdout.count("   Status: ") == 200


def test_list_keys_filters_by_state_and_surface(home: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    seed_200(store)
    monkeypatch.setenv("COLUMNS", "200")
    out = ok("list-keys", "--state", "cooling").stdout
    assert "Kimi API Keys (1 cooling of 200, strategy: health-based):" in out
    assert "○ [7] key 7" in out and out.count("Status:") == 1  # few keys: blocks
    out = ok("list-keys", "--state", "active", "--compact", "--surface", "kimi-code").stdout
    assert "(197 active kimi-code of 200" in out and len(out.strip().splitlines()) == 3 + 197
    rows = json.loads(ok("list-keys", "--json", "--surface", "moonshot-cn").stdout)
    assert [(r["index"], r["name"], r["current"]) for r in rows] == [(150, "china", True)]  # pool indexes
    assert "No disabled moonshot-cn keys (of 200)." in ok(
        "list-keys", "--state", "disabled", "--surface", "moonshot-cn"
    ).stdout
    assert run("list-keys", "--state", "sleeping").exit_code == 2


def test_compact_on_a_small_pool(home: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    seed(store, nk(KEY_A, "main", total_requests=50, successful_requests=45, health=85), nk(KEY_B, "spare"))
    monkeypatch.setenv("COLUMNS", "200")
    lines = ok("list-keys", "--compact").stdout.strip("\n").splitlines()
    assert lines[2:] == [
        "  #  NAME   KEY            SURFACE    ACCOUNT  HEALTH  OK/ALL  STATE",
        "  0  main   sk-kimi-…ha01  kimi-code  -           85%   45/50  active",
        "● 1  spare  sk-kimi-…vo02  kimi-code  -          100%     0/0  active",  # the healthier key serves first
    ]


def test_table_layout() -> None:
    header = ("#", "NAME", "KEY", "STATE")
    rows = [("0", "a" * 30, "sk-kimi-…ab12", "cooling until 08:03 (~3m): " + "r" * 40)]
    full = views.table(header, rows, None, caps={1: 24}, shrink=1, optional=(2,))
    assert full[1] == "0  " + "a" * 23 + "…  sk-kimi-…ab12  cooling until 08:03 (~3m): " + "r" * 40  # no width: no cut
    narrow = views.table(header, rows, 50, caps={1: 24}, shrink=1, optional=(2,))
    assert [len(line) <= 50 for line in narrow] == [True, True]
    assert narrow[0].split() == ["#", "NAME", "STATE"] and narrow[1].endswith("…")


# -- stats --json ---------------------------------------------------------------------------------


def test_stats_json(home: Path, store: Store) -> None:
    empty = json.loads(ok("stats", "--json").stdout)
    assert empty["keys"] == [] and empty["total"]["keys"] == 0 and empty["total"]["success_rate"] is None
    a, b = seed(store, nk(KEY_A, "a", account="acme"), nk(KEY_B, "b"))
    day = 86_400.0
    store.record([
        Attempt(a, Outcome(kind=OutcomeKind.SUCCESS, latency_ms=245), NOW),
        Attempt(a, Outcome(kind=OutcomeKind.SUCCESS, latency_ms=198), NOW),
        Attempt(a, Outcome(kind=OutcomeKind.RATE_LIMITED, until=NOW - day), NOW - 2 * day),
        Attempt(a, Outcome(kind=OutcomeKind.SERVER_ERROR), NOW - 10 * day),
        Attempt(b, Outcome(kind=OutcomeKind.SUCCESS, latency_ms=100), NOW - 6 * day),
    ])
    doc = json.loads(ok("stats", "--json").stdout)
    assert (doc["today"], doc["week_start"]) == ("2027-01-15", "2027-01-09")
    assert doc["keys"][0] == {
        "index": 0, "name": "a", "masked_key": "sk-kimi-…ha01", "fingerprint": doc["keys"][0]["fingerprint"],
        "surface": "kimi-code", "account": "acme", "total_requests": 4, "successful_requests": 2,
        "rate_limited_requests": 1, "failed_requests": 1, "success_rate": 50.0, "avg_response_ms": 222,
        "min_response_ms": 198, "max_response_ms": 245, "requests_today": 2, "requests_last_7_days": 3,
    }
    assert doc["keys"][1]["requests_last_7_days"] == 1 and doc["keys"][1]["requests_today"] == 0
    assert doc["total"] == {
        "keys": 2, "total_requests": 5, "successful_requests": 3, "rate_limited_requests": 1, "failed_requests": 1,
        "success_rate": 60.0, "avg_response_ms": 181, "min_response_ms": 100, "max_response_ms": 245,
        "requests_today": 2, "requests_last_7_days": 4,
    }


# -- remove-key asks first ------------------------------------------------------------------------


def test_remove_key_without_a_terminal_needs_yes_for_the_current_or_last_key(home: Path, store: Store) -> None:
    a, _, _ = seed(store, nk(KEY_A, "a"), nk(KEY_B, "b"), nk(MOON, "cn"))
    store.use_key(a)
    fails("remove-key", "a", home=home, contains="[0] a is the current kimi-code key; pass --yes to remove it")
    fails("remove-key", "cn", home=home, contains="[2] cn is the last moonshot-cn key; pass --yes")
    assert "✓ Removed key [1] b" in ok("remove-key", "b").stdout  # neither: no question
    fails("remove-key", "0", home=home, contains="the last kimi-code key")
    ok("remove-key", "0", "--yes")
    ok("remove-key", "cn", "-y")
    assert listed(home) == []


def in_a_terminal(home: Path, args: list[str], answer: str) -> str:
    """Runs the console script with a pseudo-terminal as stdin, stdout and stderr; answers the first question."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [console_script(), *args], stdin=secondary, stdout=secondary, stderr=secondary,
        env={**os.environ, HOME_ENV: str(home), "COLUMNS": "200"}, close_fds=True,
    )
    os.close(secondary)
    seen = b""
    answered = False
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(primary, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            if not answered and b"[y/N]" in seen:
                os.write(primary, answer.encode() + b"\n")
                answered = True
            if proc.poll() is not None and not ready:
                break
        assert proc.wait(timeout=10) == 0, seen
    finally:
        os.close(primary)
        if proc.poll() is None:
            proc.kill()
    text = seen.decode()
    for secret in SECRETS:
        assert secret not in text
    return text


def test_remove_key_asks_in_a_terminal(home: Path, store: Store) -> None:
    a, _ = seed(store, nk(KEY_A, "Account 1"), nk(KEY_B, "spare"))
    store.use_key(a)
    out = in_a_terminal(home, ["remove-key", "0"], "n")
    assert "Remove the current key Account 1 (sk-kimi-…ha01)? [y/N]" in out and "Nothing was removed." in out
    assert len(listed(home)) == 2
    out = in_a_terminal(home, ["remove-key", "0"], "y")
    assert "✓ Removed key [0] Account 1" in out
    out = in_a_terminal(home, ["remove-key", "spare"], "yes")
    assert "Remove spare (sk-kimi-…vo02), the last kimi-code key? Requests for kimi-code will then pass" in out
    assert listed(home) == []


# -- --version and completion ---------------------------------------------------------------------


def complete(home: Path, words: str) -> list[str]:
    """What bash completion offers for the last of `words` (as typer's completion script asks for it)."""
    env = {**os.environ, HOME_ENV: str(home), "_KIMI_ROTATE_COMPLETE": "complete_bash", "COMP_WORDS": words,
           "COMP_CWORD": str(len(words.split(" ")) - 1)}
    proc = subprocess.run([console_script()], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return [line for line in proc.stdout.splitlines() if line]


def test_version_and_completion(home: Path, store: Store) -> None:
    assert ok("--version").stdout == f"kimi-rotate {version('kimi-rotator')}\n" == f"kimi-rotate {__version__}\n"
    help_text = ok("--help").stdout
    assert "--version" in help_text and "--install-completion" in help_text
    assert complete(home, "kimi-rotate add-k") == ["add-key", "add-keys"]
    assert complete(home, "kimi-rotate list-keys --state ") == ["active", "cooling", "disabled"]
    seed(store, nk(KEY_A, "work laptop"), nk(KEY_B, "spare"), nk(KEY_C, "work desktop"))
    assert complete(home, "kimi-rotate remove-key work") == ["work laptop", "work desktop"]  # key names
    assert complete(home, "kimi-rotate rename ") == ["work laptop", "spare", "work desktop"]


def test_completing_a_name_never_creates_a_store(tmp_path: Path) -> None:
    assert complete(tmp_path / "nowhere", "kimi-rotate use-key ") == []
    assert not (tmp_path / "nowhere").exists()


# -- import-opencode ------------------------------------------------------------------------------


def test_import_opencode_skips_an_invalid_key_and_names_it(home: Path, tmp_path: Path) -> None:
    path = opencode_file(
        tmp_path / "kimi-accounts.json",
        [{"key": KEY_A, "name": "Good"}, {"key": BAD_KEYS[0], "name": "Broken"}, {"key": KEY_B}],
    )
    result = ok("import-opencode", str(path))
    assert "note: account 1 ('Broken', sk-kimi-…): invalid key: the key is shorter than 20 characters" in result.stderr
    assert "skipped it" in result.stderr
    assert "Imported: 2 key(s)" in result.stdout and "Skipped (invalid key): 1 key(s), named above" in result.stdout
    assert [r["name"] for r in listed(home)] == ["Good", "Account 2"]


def test_import_opencode_keeps_a_pool_s_strategy_and_reports_renames(
    home: Path, store: Store, tmp_path: Path
) -> None:
    seed(store, nk(KEY_A, "Main"))
    path = opencode_file(tmp_path / "k.json", [{"key": KEY_B, "name": "Main"}], rotationStrategy="round-robin")
    result = ok("import-opencode", str(path))
    assert store.settings().strategy is Strategy.HEALTH_BASED
    assert ("Rotation strategy: kept health-based (the import's is round-robin; "
            "`kimi-rotate set-strategy round-robin` switches)") in result.stdout
    assert ("note: the name 'Main' is taken, so sk-kimi-…vo02 was added as 'Main 2'; `kimi-rotate rename` "
            "changes it") in result.stderr
    assert [r["name"] for r in listed(home)] == ["Main", "Main 2"]


# -- hints that say what is really wrong ----------------------------------------------------------


def test_a_kimi_code_key_on_another_surface_is_told_so(home: Path) -> None:
    message = fails("add-key", "--surface", "moonshot-cn", KEY_A, home=home)
    assert "is a Kimi Code key, not a moonshot-cn one; use --surface kimi-code" in message
    assert "copied the whole key" not in message
    message = fails("add-key", "--surface", "kimi-code", MOON, home=home)
    assert "so it is an Open Platform key; use --surface moonshot-cn or moonshot-ai" in message
    assert "copied the whole key" not in message


@pytest.mark.parametrize(
    ("args", "stdin"),
    [
        (["add-key", f"Bearer {KEY_A}"], None),
        (["add-key", "Bearer", KEY_A], None),  # unquoted: the key became the name
        (["add-key", "-", "work"], f"Authorization: Bearer {KEY_A}\n"),
        (["add-key"], f"bearer {KEY_A}\n"),
    ],
)
def test_a_pasted_bearer_header_is_told_so(home: Path, args: list[str], stdin: str | None) -> None:
    message = fails(*args, input=stdin, home=home, contains="which belongs to the HTTP header")
    assert 'give only the key, from "sk-" on' in message and "add-key - NAME" not in message


def test_a_store_path_that_is_a_file_or_a_folder_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "not-a-folder"
    file.write_text("x")
    monkeypatch.setenv(HOME_ENV, str(file))
    result = run("list-keys")
    assert result.exit_code == 1
    assert result.stderr == (f"error: {file} is a file, not a folder; the store is a folder holding store.db: "
                             f"point {HOME_ENV} at a folder (a new one is created), or move the file aside\n")
    monkeypatch.setenv(HOME_ENV, str(file / "below"))
    assert "part of that path is a file, not a folder" in run("list-keys").stderr
    folder = tmp_path / "home"
    (folder / "store.db").mkdir(parents=True)
    monkeypatch.setenv(HOME_ENV, str(folder))
    result = run("list-keys")
    assert result.exit_code == 1 and "store.db is a folder, not a store file; move it aside" in result.stderr
