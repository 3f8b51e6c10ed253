"""`kimi-rotate check` run as users run it (the console script, a subprocess) against the fake upstream.

The fake is reached as the proxy reaches it: `--set kimi_resolve=…` and `--set ssl_verify_upstream_trusted_ca=…`, the
same production options. What check records is read back through `list-keys --json` and the store.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from certs import TestPKI
from fakekimi import FakeKimi
from harness import KeySpec, cli_keys, kimi_key, platform_key, reset_store, run_cli, upstream_options

from kimi_rotator.models import Surface
from kimi_rotator.probe import USER_AGENT
from kimi_rotator.store_sqlite import SqliteStore
from kimi_rotator.symbols import symbols

pytestmark = pytest.mark.e2e

KC1, KC2, KC3 = kimi_key("0k01"), kimi_key("0k02"), kimi_key("0k03")
OP1 = platform_key("0p01")
STRANGER = kimi_key("0x99")  # never given to the fake: it answers 401
RESET = dt.datetime(2027, 1, 15, 8, tzinfo=dt.UTC)


def set_args(fake: FakeKimi, pki: TestPKI, **extra: object) -> list[str]:
    args: list[str] = []
    for name, value in {**upstream_options(fake.port, pki.ca_cert), **extra}.items():
        for v in value if isinstance(value, list) else [value]:
            args += ["--set", f"{name}={v}"]
    return args


def check(home: Path, fake: FakeKimi, pki: TestPKI, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(home, "check", *args, *set_args(fake, pki))


def check_json(home: Path, fake: FakeKimi, pki: TestPKI, *args: str) -> tuple[int, dict[str, dict[str, Any]]]:
    result = check(home, fake, pki, "--json", *args)
    assert result.stdout, result.stderr
    return result.returncode, {row["name"]: row for row in json.loads(result.stdout)}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def test_valid_keys_of_both_surfaces_show_their_quota_and_exit_0(
    home: Path, fake_kimi: FakeKimi, pki: TestPKI
) -> None:
    fake_kimi.add_key(KC1, account="acct-kc", name="kc1")
    fake_kimi.add_key(OP1, account="acct-op", name="op1")
    fake_kimi.set_balance("acct-op", 12.5)
    reset_store(home, [KeySpec(KC1, "kc"), KeySpec(OP1, "op", surface=Surface.MOONSHOT_CN)])
    code, rows = check_json(home, fake_kimi, pki)
    assert code == 0
    kc, op = rows["kc"], rows["op"]
    assert (kc["valid"], kc["status"], kc["probe"], kc["level"]) == (True, "200", "/coding/v1/usages",
                                                                    "LEVEL_INTERMEDIATE")
    assert [(w["name"], w["limit"], w["remaining"]) for w in kc["windows"]] == [("weekly", 100, 75), ("5h", 100, 85)]
    assert all(isinstance(w["reset_at"], float) for w in kc["windows"])
    assert (op["valid"], op["probe"], op["balance"], op["windows"]) == (True, "/v1/users/me/balance", 12.5, [])
    assert kc["state"] == op["state"] == "active"
    assert set(kc) == {"index", "name", "masked_key", "fingerprint", "surface", "valid", "status", "probe",
                       "account_hint", "checked_at", "balance", "level", "windows", "account", "state", "reason",
                       "cooldown_until"}
    assert {s.headers["user-agent"] for s in fake_kimi.requests} == {USER_AGENT}
    assert {s.path for s in fake_kimi.requests} == {"/coding/v1/usages", "/v1/users/me/balance"}


def test_table_shows_masked_keys_only(home: Path, fake_kimi: FakeKimi, pki: TestPKI) -> None:
    fake_kimi.add_key(KC1, account="acct-kc", name="kc1")
    reset_store(home, [KeySpec(KC1, "kc")])
    result = check(home, fake_kimi, pki)
    assert result.returncode == 0, result.stderr
    assert KC1 not in result.stdout + result.stderr
    header, line = result.stdout.splitlines()
    assert header.split() == ["#", "NAME", "KEY", "SURFACE", "ACCOUNT", "CHECK", "QUOTA", "STATE"]
    assert "kc" in line and "valid" in line and "5h 85/100 until" in line and "weekly 75/100" in line
    assert "0k01" in line  # the masked key's tail tells keys apart


def test_a_refused_key_is_disabled_and_the_exit_code_says_so(home: Path, fake_kimi: FakeKimi, pki: TestPKI) -> None:
    fake_kimi.add_key(KC1, account="acct-kc", name="kc1")
    reset_store(home, [KeySpec(KC1, "good"), KeySpec(STRANGER, "bad")])
    code, rows = check_json(home, fake_kimi, pki)
    assert code == 1
    assert (rows["bad"]["valid"], rows["bad"]["state"]) == (False, "disabled")
    assert rows["bad"]["status"].startswith("401")
    keys = cli_keys(home)
    assert keys["bad"]["state"] == "disabled" and keys["bad"]["reason"].endswith("(probe)")
    assert keys["good"]["state"] == "active"
    assert keys["bad"]["total_requests"] == 0  # a probe is no request


def test_a_used_up_window_cools_the_whole_account_until_kimis_reset(
    home: Path, fake_kimi: FakeKimi, pki: TestPKI
) -> None:
    fake_kimi.add_key(KC1, account="acct-kc", name="kc1")
    fake_kimi.add_key(KC2, account="acct-kc", name="kc2")
    fake_kimi.add_key(KC3, account="acct-other", name="kc3")
    fake_kimi.set_usage("acct-kc", window_remaining=0, window_reset=RESET)
    reset_store(home, [KeySpec(KC1, "one", account="team"), KeySpec(KC2, "two", account="team"),
                       KeySpec(KC3, "three", account="other")])
    code, rows = check_json(home, fake_kimi, pki, "one", "three")  # only these two are probed
    assert code == 0  # used up is still valid
    assert set(rows) == {"one", "three"}
    assert (rows["one"]["state"], rows["one"]["cooldown_until"]) == ("cooling", RESET.timestamp())
    keys = cli_keys(home)
    assert keys["two"]["cooldown_until"] == RESET.timestamp()  # the same account: its keys share the quota
    assert keys["one"]["reason"] == "quota: 5h used up"
    assert keys["three"]["state"] == "active"
    assert len(fake_kimi.requests) == 2
    store = SqliteStore(home)
    try:
        quota = store.accounts()[(Surface.KIMI_CODE, "team")].quota
    finally:
        store.close()
    assert quota is not None and quota.exhausted_until() == RESET.timestamp()


def test_a_balance_at_zero_cools_until_a_top_up_is_seen(home: Path, fake_kimi: FakeKimi, pki: TestPKI) -> None:
    fake_kimi.add_key(OP1, account="acct-op", name="op1")
    fake_kimi.set_balance("acct-op", 0.0)
    reset_store(home, [KeySpec(OP1, "op", surface=Surface.MOONSHOT_CN, account="shop")])
    code, rows = check_json(home, fake_kimi, pki)
    assert code == 0
    assert (rows["op"]["balance"], rows["op"]["state"], rows["op"]["reason"]) == (0.0, "cooling", "quota: balance 0")
    fake_kimi.set_balance("acct-op", 20.0)  # topped up
    code, rows = check_json(home, fake_kimi, pki)
    assert (code, rows["op"]["balance"], rows["op"]["state"]) == (0, 20.0, "active")


def test_the_account_kimi_names_fills_an_empty_label(
    home: Path, fake_kimi: FakeKimi, pki: TestPKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fake_kimi, "msh_headers", "always")  # Msh-Uid on every answer, as on real 429s
    fake_kimi.add_key(KC1, account="acct-named", name="kc1")
    reset_store(home, [KeySpec(KC1, "kc")])
    code, rows = check_json(home, fake_kimi, pki)
    assert code == 0
    assert rows["kc"]["account_hint"] == rows["kc"]["account"] == "uid:acct-named"
    assert cli_keys(home)["kc"]["account"] == "uid:acct-named"


def test_unreachable_kimi_is_unknown_and_exits_1(home: Path, fake_kimi: FakeKimi, pki: TestPKI) -> None:
    reset_store(home, [KeySpec(KC1, "kc")])
    result = run_cli(home, "check", "--json", "--set", "kimi_resolve=api.kimi.com=127.0.0.1:9",
                     "--set", f"ssl_verify_upstream_trusted_ca={pki.ca_cert}", "--set", "kimi_upstream_timeout=5")
    assert result.returncode == 1
    [row] = json.loads(result.stdout)
    assert row["valid"] is None and "cannot connect to api.kimi.com" in row["status"]
    assert cli_keys(home)["kc"]["state"] == "active"  # nobody could tell: nothing recorded


@pytest.mark.parametrize(("option", "words"), [
    ("listen_port=1", "is not an option `kimi-rotate check` reads"),
    ("kimi_upstream_timeout=soon", "bad --set kimi_upstream_timeout"),
    ("kimi_resolve=api.kimi.com", "is not host=address:port"),
    ("mode=bogus://x", "bad --set mode=bogus://x"),
    ("ssl_verify_upstream_trusted_ca=/nonexistent/ca.pem", "cannot load the trusted CA"),
])
def test_a_bad_set_option_is_one_line(home: Path, option: str, words: str) -> None:
    reset_store(home, [KeySpec(KC1, "kc")])
    result = run_cli(home, "check", "--set", option)
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and words in line, line


def test_no_keys_and_unknown_refs(home: Path, fake_kimi: FakeKimi, pki: TestPKI) -> None:
    reset_store(home, [])
    assert check(home, fake_kimi, pki).stdout.startswith("No keys configured.")
    assert check(home, fake_kimi, pki, "--json").stdout.strip() == "[]"
    reset_store(home, [KeySpec(KC1, "kc")])
    result = check(home, fake_kimi, pki, "nosuch")
    assert result.returncode == 1 and "no key named 'nosuch'" in result.stderr
    assert fake_kimi.requests == []


class Terminal(io.StringIO):
    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


@pytest.fixture
def fresh_symbols() -> Iterator[None]:
    """symbols() decides once per process, from the streams: what a test's stand-in streams made it decide is
    forgotten afterwards."""
    symbols.cache_clear()
    yield
    symbols.cache_clear()


@pytest.mark.usefixtures("fresh_symbols")
def test_progress_is_drawn_only_on_a_terminal_and_only_above_four_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    from kimi_rotator import cli_check

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert cli_check._progress(50) is None  # a pipe or a file: never
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli_check._progress(4) is None
    bar = cli_check._progress(5)
    assert bar is not None
    for _ in range(5):
        bar.step(None)  # type: ignore[arg-type]  # the result is not looked at
    bar.close()
    drawn = terminal.getvalue().split("\r")
    assert drawn[1].startswith("Checking keys ") and drawn[1].endswith(" 0/5")
    assert drawn[-2].endswith(" 5/5") and drawn[-1] == "\033[K"  # erased at the end
