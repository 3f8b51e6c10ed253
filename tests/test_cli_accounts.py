"""`kimi-rotate account`: stating and clearing an account's caps, showing learned caps (with how and when) and the
quota, naming an account by label or by key, the errors for names that are ambiguous or wrong and for numbers that
are no caps, the JSON; and the caps and quota in `list-keys` and `stats`. In narrow terminals and ASCII output too.

Same helpers as tests/test_cli.py (in-process runs with the clock pinned; every run checks that no key leaks); the
terminal cases run the installed console script.
"""

from __future__ import annotations

import json
from dataclasses import astuple
from pathlib import Path
from typing import Any

import pytest
from test_cli import (  # the fixtures are imported so that they apply here too
    KEY_A,
    KEY_B,
    MOON,
    MOON_E,
    NOW,
    fails,
    home,
    nk,
    ok,
    pinned_clock,
    run,
    seed,
    store,
)
from test_cli_terminal import console

from kimi_rotator.caps import MAX_CAP, merge_caps
from kimi_rotator.keys import fingerprint
from kimi_rotator.models import CapSource, LearnedCap, Limit, Quota, QuotaWindow, Surface
from kimi_rotator.store import Store
from kimi_rotator.store_sqlite import SqliteStore
from kimi_rotator.symbols import FANCY

__all__ = ["home", "pinned_clock", "store"]  # fixtures, used by name

ACME_CN = (Surface.MOONSHOT_CN, "acme")
HOUR = 3600.0

# The caps in force of a Kimi Code account nothing is known of: its plan's documented concurrency.
KIMI_CODE_DEFAULT_CAPS = {
    "concurrency": {"value": 30, "how": "Kimi Code's documented cap", "source": "default", "at": None},
}


def acme(store: Store) -> list[int]:
    """Two Open Platform keys of account acme, and a Kimi Code key with no label."""
    return seed(store, nk(MOON, "main", account="acme"), nk(MOON_E, "spare", account="acme"), nk(KEY_A, "code"))


def learn(store: Store, group: tuple[Surface, str], *caps: LearnedCap) -> None:
    """What a proxy stores when an answer states caps (each stamped with its own time)."""
    for cap in caps:
        store.update_account(group, lambda r, cap=cap: merge_caps(r, group, [cap], cap.at))  # type: ignore[misc]


def shown(*args: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(ok("account", *args, "--json").stdout)
    return rows


def stated(store: Store, group: tuple[Surface, str]) -> dict[Limit, int]:
    record = store.accounts().get(group)
    return dict(record.stated) if record else {}


# -- stating and clearing ----------------------------------------------------------------------------------------


def test_state_caps_then_show_them_by_label_index_or_key_name(home: Path, store: Store) -> None:
    acme(store)
    result = ok("account", "acme", "--rpm", "200", "--concurrency", "50")
    assert result.stdout.startswith("✓ Account acme (moonshot-cn): stated rpm 200, concurrency 50\n")
    assert "A running proxy uses the caps from its next request." in result.stdout
    assert "RPM: 200 a minute (stated)" in result.stdout and "Concurrency: 50 in flight (stated)" in result.stdout
    assert stated(store, ACME_CN) == {Limit.RPM: 200, Limit.CONCURRENCY: 50}
    for name in ("acme", "0", "spare"):  # the label, or any key of the account
        out = ok("account", name).stdout
        assert out.splitlines()[:4] == ["Account acme (moonshot-cn)", "   Keys: [0] main, [1] spare",
                                        "   RPM: 200 a minute (stated)", "   Concurrency: 50 in flight (stated)"]
        assert "Quota: not known yet" in out


def test_a_running_proxy_sees_the_change_at_its_next_request(home: Path, store: Store) -> None:
    """The proxy checks the store's edit count before each request; stating a cap moves it."""
    acme(store)
    before = store.edits()
    ok("account", "acme", "--tpm", "2000000")
    assert store.edits() > before
    assert store.fresh_snapshot().accounts[ACME_CN].stated == {Limit.TPM: 2_000_000}


def test_clear_some_then_all(home: Path, store: Store) -> None:
    acme(store)
    ok("account", "acme", "--rpm", "200", "--concurrency", "50", "--tpm", "3000000", "--tpd", "9000000")
    result = ok("account", "acme", "--clear", "rpm", "--clear", "tpm")
    assert "✓ Account acme (moonshot-cn): cleared rpm, tpm" in result.stdout
    assert stated(store, ACME_CN) == {Limit.CONCURRENCY: 50, Limit.TPD: 9_000_000}
    assert "TPD: 9,000,000 tokens a day (stated; shown, not enforced)" in result.stdout
    ok("account", "acme", "--clear-all", "--rpm", "20")  # clear the rest, state one anew
    assert stated(store, ACME_CN) == {Limit.RPM: 20}
    # --clear-all reports what it cleared: only rpm was stated.
    assert "✓ Account acme (moonshot-cn): cleared rpm\n" in ok("account", "acme", "--clear-all").stdout
    assert stated(store, ACME_CN) == {}
    assert "Caps: none known yet" in ok("account", "acme").stdout
    assert "no stated cap to clear" in ok("account", "acme", "--clear", "rpm").stdout


def test_caps_of_a_key_with_no_label_are_its_own(home: Path, store: Store) -> None:
    acme(store)
    result = ok("account", "code", "--concurrency", "20")
    assert "✓ Key [2] code (kimi-code, no account label): stated concurrency 20" in result.stdout
    assert result.stderr.startswith("note: key [2] has no account label") and "set-account 2" in result.stderr
    own = (Surface.KIMI_CODE, "key:" + fingerprint(KEY_A))
    assert stated(store, own) == {Limit.CONCURRENCY: 20}
    (row,) = shown(own[1])  # the JSON's name for it names it too
    assert (row["account"], row["labelled"], row["caps"]["concurrency"]["value"]) == (own[1], False, 20)


# -- learned caps and the quota ------------------------------------------------------------------------------------


def test_learned_caps_say_how_and_when_and_a_stated_one_wins(home: Path, store: Store, utc: None) -> None:
    acme(store)
    learn(store, ACME_CN, LearnedCap(limit=Limit.RPM, value=200, source=CapSource.MESSAGE, at=NOW - HOUR,
                                     detail="a 429"))
    tier = [LearnedCap(limit=Limit.CONCURRENCY, value=100, source=CapSource.TIER, detail="tier enterprise-tier-2"),
            LearnedCap(limit=Limit.TPM, value=3_000_000, source=CapSource.TIER, detail="tier enterprise-tier-2")]
    store.update_account(ACME_CN, lambda record: merge_caps(record, ACME_CN, tier, NOW - 2 * HOUR))
    out = ok("account", "acme").stdout
    assert "RPM: 200 a minute (learned from a 429 at 07:00)" in out
    assert "Concurrency: 100 in flight (tier enterprise-tier-2)" in out
    assert "TPM: 3,000,000 tokens a minute (tier enterprise-tier-2; shown, not enforced)" in out
    assert "Caps: 200/min (learned), 100 in flight (tier), 3M tokens/min (tier)" in ok("list-keys").stdout

    out = ok("account", "acme", "--rpm", "100").stdout
    assert "RPM: 100 a minute (stated; learned 200, from a 429 at 07:00)" in out
    (row,) = shown("acme")
    assert row["caps"]["rpm"] == {"value": 100, "how": "stated", "source": "stated", "at": None}
    assert row["caps"]["concurrency"] == {"value": 100, "how": "tier enterprise-tier-2", "source": "tier",
                                          "at": NOW - 2 * HOUR}
    assert row["learned"]["rpm"] == {"value": 200, "source": "message", "at": NOW - HOUR, "detail": "a 429"}
    ok("account", "acme", "--clear", "rpm")  # the learned cap applies again
    assert "RPM: 200 a minute (learned from a 429 at 07:00)" in ok("account", "acme").stdout


def test_quota_of_an_open_platform_and_a_kimi_code_account(home: Path, store: Store, utc: None) -> None:
    acme(store)
    code = (Surface.KIMI_CODE, "key:" + fingerprint(KEY_A))
    store.record_quota(ACME_CN, Quota(checked_at=NOW - 120, balance=49.58894))
    store.record_quota(code, Quota(checked_at=NOW - 60, level="LEVEL_INTERMEDIATE", windows=(
        QuotaWindow("5h", 100, 85, NOW + 3 * HOUR), QuotaWindow("weekly", 100, 0, NOW + 48 * HOUR))))
    assert "   Quota (checked 07:58): balance 49.59" in ok("account", "acme").stdout
    out = ok("account", "2").stdout
    assert out.splitlines()[-3:] == ["   Quota (checked 07:59, level LEVEL_INTERMEDIATE):",
                                     "      5h: 85 of 100 left, resets 11:00",
                                     "      weekly: 0 of 100 left, used up until 2027-01-17 08:00"]
    listing = ok("list-keys").stdout
    assert "Quota: balance 49.59 (checked 07:58)" in listing
    assert "Quota: 5h 85 of 100 left, weekly used up until 2027-01-17 08:00 (checked 07:59)" in listing
    (row,) = shown("code")
    assert row["quota"] == {
        "checked_at": NOW - 60, "balance": None, "level": "LEVEL_INTERMEDIATE",
        "windows": [{"name": "5h", "limit": 100, "remaining": 85, "reset_at": NOW + 3 * HOUR},
                    {"name": "weekly", "limit": 100, "remaining": 0, "reset_at": NOW + 48 * HOUR}],
        "exhausted_until": NOW + 48 * HOUR,
    }
    store.record_quota(ACME_CN, Quota(checked_at=NOW, balance=0.0))
    assert "balance 0.00 (used up: Kimi refuses requests until a top-up)" in ok("account", "acme").stdout


# -- naming the account, and what is refused -------------------------------------------------------------------------


def test_a_label_on_two_surfaces_needs_surface(home: Path, store: Store) -> None:
    acme(store)
    seed(store, nk(KEY_B, "kc", account="acme"))
    error = fails("account", "acme", "--rpm", "5", home=home)
    assert error == ("error: account 'acme' has keys on moonshot-cn and kimi-code, which are separate accounts; "
                     "add --surface moonshot-cn or --surface kimi-code")
    fails("account", "acme", home=home, contains="add --surface moonshot-cn or --surface kimi-code")
    fails("account", "acme", "--surface", "moonshot-ai", home=home,
          contains="has no keys on moonshot-ai, only on moonshot-cn and kimi-code")
    ok("account", "acme", "--surface", "kimi-code", "--rpm", "5")
    assert stated(store, (Surface.KIMI_CODE, "acme")) == {Limit.RPM: 5} and stated(store, ACME_CN) == {}
    assert [r["surface"] for r in shown("--surface", "kimi-code")] == ["kimi-code", "kimi-code"]


def test_unknown_names_and_keys_of_another_surface(home: Path, store: Store) -> None:
    acme(store)
    fails("account", "nobody", home=home, contains="no account or key named 'nobody'")
    fails("account", "7", "--rpm", "5", home=home, contains="no key at index 7")
    fails("account", "main", "--surface", "kimi-code", home=home,
          contains="key [0] main is a moonshot-cn key, not a kimi-code one")
    fails("account", KEY_A, home=home, contains="not by the key itself")  # run() checks that it is not echoed


@pytest.mark.parametrize("bad", ["0", "-5", "abc", "2.5", "1e3", str(MAX_CAP + 1)])
def test_numbers_that_are_no_cap(home: Path, store: Store, bad: str) -> None:
    acme(store)
    before = store.fresh_snapshot()
    result = run("account", "acme", "--rpm", bad)
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: --rpm must be a whole number") and f"not '{bad}'" in line, line
    assert store.fresh_snapshot() == before


@pytest.mark.parametrize(("args", "says"), [
    (["--rpm", "5"], "give the NAME of the account"),
    (["acme", "--clear", "rpm", "--rpm", "5"], "--rpm states a cap that --clear rpm drops"),
    (["acme", "--clear", "rps"], "'rps' is not a valid limit; choose rpm, concurrency, tpm or tpd"),
    (["acme", "--surface", "mars"], "'mars' is not a valid surface"),
])
def test_usage_errors(home: Path, store: Store, args: list[str], says: str) -> None:
    acme(store)
    result = run("account", *args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and says in line, line
    assert stated(store, ACME_CN) == {}


# -- every account, and the JSON ---------------------------------------------------------------------------------


def test_every_account_and_the_json_shape(home: Path, store: Store) -> None:
    assert ok("account").stdout.startswith("No keys configured.") and shown() == []
    acme(store)
    out = ok("account").stdout
    assert out.split("\n\n")[0].splitlines()[0] == "Account acme (moonshot-cn)"
    assert "Key [2] code (kimi-code, no account label)" in out
    rows = shown()
    assert [(r["surface"], r["account"], r["labelled"]) for r in rows] == [
        ("moonshot-cn", "acme", True), ("kimi-code", "key:" + fingerprint(KEY_A), False)]
    assert rows[0] == {
        "surface": "moonshot-cn", "account": "acme", "labelled": True,
        "keys": [{"index": 0, "name": "main", "fingerprint": fingerprint(MOON)},
                 {"index": 1, "name": "spare", "fingerprint": fingerprint(MOON_E)}],
        "caps": {}, "learned": {}, "quota": None,
    }
    assert "No moonshot-ai accounts (of 2)." in ok("account", "--surface", "moonshot-ai").stdout


# -- list-keys and stats -----------------------------------------------------------------------------------------


def test_list_keys_shows_each_keys_account_caps(home: Path, store: Store) -> None:
    acme(store)
    blocks = ok("list-keys").stdout.split("\n\n")
    # Nothing known of acme: no line; the Kimi Code key shows its plan's documented cap, the one the proxy holds to.
    assert [("Caps:" in b) for b in blocks[1:4]] == [False, False, True]
    assert "Caps: 30 in flight (default)" in blocks[3]
    assert "kimi-rotate account" not in ok("list-keys", "--compact").stdout
    ok("account", "acme", "--rpm", "200", "--concurrency", "50")
    blocks = ok("list-keys").stdout.split("\n\n")
    assert [("Caps: 200/min, 50 in flight (stated)" in b) for b in blocks[1:4]] == [True, True, False]
    assert ok("list-keys", "--compact").stdout.endswith("\nCaps and quota: kimi-rotate account\n")
    rows = json.loads(ok("list-keys", "--json").stdout)
    assert rows[0]["caps"] == rows[1]["caps"] == {
        "rpm": {"value": 200, "how": "stated", "source": "stated", "at": None},
        "concurrency": {"value": 50, "how": "stated", "source": "stated", "at": None},
    }
    assert rows[2]["caps"] == KIMI_CODE_DEFAULT_CAPS and [r["quota"] for r in rows] == [None, None, None]


def test_stats_has_a_section_per_account(home: Path, store: Store, utc: None) -> None:
    acme(store)
    first = ok("stats").stdout.rsplit("Accounts", 1)[1]
    assert first.splitlines()[:3] == [" (2; caps or quota known for 1)",
                                      "   Key [2] code (kimi-code, no account label)",
                                      "      Caps: 30 in flight (default)"]
    ok("account", "acme", "--rpm", "200")
    store.record_quota(ACME_CN, Quota(checked_at=NOW - 120, balance=12.5))
    section = ok("stats").stdout.rsplit("Accounts", 1)[1]
    assert section.splitlines()[:4] == [" (2; caps or quota known for 2)", "   Account acme (moonshot-cn)",
                                        "      Caps: 200/min (stated)",
                                        "      Quota: balance 12.50 (checked 07:58)"]
    document = json.loads(ok("stats", "--json").stdout)
    assert [a["account"] for a in document["accounts"]] == ["acme", "key:" + fingerprint(KEY_A)]
    assert document["accounts"][0]["caps"]["rpm"]["value"] == 200
    assert document["accounts"][0]["quota"]["balance"] == 12.5
    assert document["total"]["keys"] == 3  # the fields that were there stay


# -- narrow terminals and ASCII output ---------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["ascii", "utf-8"])
def test_narrow_terminal_and_ascii_output(tmp_path: Path, encoding: str) -> None:
    home = tmp_path / "home"
    s = SqliteStore(home)
    try:
        acme(s)
        seed(s, nk(KEY_B, "Clé 東京", account="équipe"))
        learn(s, ACME_CN, LearnedCap(limit=Limit.RPM, value=200, source=CapSource.MESSAGE, at=NOW, detail="a 429"))
        s.update_account(ACME_CN, lambda r: merge_caps(r, ACME_CN, [LearnedCap(
            limit=Limit.TPM, value=3_000_000, source=CapSource.TIER, detail="tier enterprise-tier-2")], NOW))
        s.record_quota((Surface.KIMI_CODE, "équipe"), Quota(checked_at=NOW, windows=(
            QuotaWindow("5h", 100, 0, NOW + HOUR),)))
    finally:
        s.close()
    env = {"COLUMNS": "40", "PYTHONIOENCODING": encoding}
    stated_now = console(home, "account", "acme", "--concurrency", "50", **env)
    outputs = [stated_now, *(console(home, *args, **env) for args in (
        ["account"], ["account", "équipe"], ["list-keys"], ["list-keys", "--compact"], ["stats"],
        ["account", "--json"], ["list-keys", "--json"], ["account", "--help"]))]
    for done in outputs:
        assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
    if encoding == "ascii":  # plain symbols; the JSON escapes what is not ASCII (click writes names as UTF-8)
        assert stated_now.stdout.startswith(b"+ Account acme (moonshot-cn): stated\n   concurrency 50\n")
        for done in outputs:
            assert not set(done.stdout.decode("utf-8")) & set("".join(astuple(FANCY)).replace(" ", ""))
        assert json.loads(outputs[6].stdout.decode("ascii"))[2]["account"] == "équipe"
    accounts = outputs[1].stdout.decode("utf-8")
    assert "Concurrency: 50 in flight (stated)" in accounts
    # The account view and the compact table fit 40 columns; a long line breaks between words.
    for done in (stated_now, outputs[1], outputs[2], outputs[4]):
        lines = done.stdout.decode("utf-8").splitlines()
        assert [line for line in lines if len(line) > 40 and not line.startswith("Kimi API Keys (")] == []
    assert "   TPM: 3,000,000 tokens a minute (tier\n      enterprise-tier-2; shown, not\n" in accounts
    assert "Account équipe (kimi-code)\n   Keys: [3] Clé 東京\n" in accounts
    assert "      5h: 0 of 100 left, used up until" in accounts
