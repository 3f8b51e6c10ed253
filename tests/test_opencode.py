"""Reading opencode-kimi-rotator's store file (kimi_rotator.opencode): defaults, conversion, clear errors."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from kimi_rotator import opencode
from kimi_rotator.models import Strategy, Surface
from kimi_rotator.opencode import OpencodeError

KEY_A = "sk-kimi-testAlphaAlphaAlpha01"
KEY_B = "sk-kimi-testBravoBravoBravo02"
NOW = 1_800_000_000.0  # fixed clock, epoch seconds
NOW_MS = int(NOW * 1000)


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data, indent=2))
    return path


def full_account(key: str, name: str, **over: object) -> dict[str, object]:
    """An account as v1.2.10 writes it, every field present, in its file order."""
    acc: dict[str, object] = {
        "key": key,
        "name": name,
        "addedAt": NOW_MS - 86_400_000,
        "lastUsed": NOW_MS - 3_600_000,
        "rateLimitResetTime": 0,
        "billingLimitResetTime": 0,
        "healthScore": 100,
        "consecutiveFailures": 0,
        "consecutiveBillingLimitHits": 0,
        "totalRequests": 0,
        "successfulRequests": 0,
        "responseTimes": [],
        "dailyRequests": {},
    }
    acc.update(over)
    return acc


def store_file(accounts: list[dict[str, object]], **over: object) -> dict[str, object]:
    data: dict[str, object] = {
        "version": 1,
        "accounts": accounts,
        "activeIndex": 7,  # out of range on purpose: it is ignored
        "rotationStrategy": "round-robin",
        "autoRefreshHealth": True,
        "healthRefreshCooldownMinutes": 30,
    }
    data.update(over)
    return data


def test_full_file_converts_names_health_counters_cooldowns_and_strategy(tmp_path: Path) -> None:
    path = write(
        tmp_path / "kimi-accounts.json",
        store_file(
            [
                full_account(
                    KEY_A, "Main", healthScore=85, totalRequests=50, successfulRequests=45,
                    rateLimitResetTime=NOW_MS + 125_000, responseTimes=[245, 198, 210],
                    dailyRequests={"2027-01-15": 3},
                ),
                # A past reset is history; a future billing reset is a cooldown.
                full_account(
                    KEY_B, "Spare", healthScore=55, rateLimitResetTime=NOW_MS - 5_000,
                    billingLimitResetTime=NOW_MS + 3_600_000,
                ),
            ]
        ),
    )
    imported = opencode.load(path, NOW)
    assert imported.strategy is Strategy.ROUND_ROBIN
    assert imported.notes == []
    a, b = imported.keys
    assert (a.secret, a.name, a.surface, a.account) == (KEY_A, "Main", Surface.KIMI_CODE, None)
    assert a.health == 85
    assert (a.total_requests, a.successful_requests) == (50, 45)
    assert a.cooldown_until == pytest.approx(NOW + 125)
    assert a.cooldown_reason == "rate limited (imported)"
    assert a.added_at == pytest.approx(NOW - 86_400)
    assert a.last_used == pytest.approx(NOW - 3_600)
    assert b.cooldown_until == pytest.approx(NOW + 3_600)
    assert b.cooldown_reason == "billing limit (imported)"
    assert b.health == 55


def test_v1_0_file_with_only_key_added_and_last_used(tmp_path: Path) -> None:
    path = write(
        tmp_path / "kimi-accounts.json",
        {
            "accounts": [
                {"key": KEY_A, "addedAt": NOW_MS, "lastUsed": NOW_MS},
                {"key": KEY_B, "addedAt": 1, "lastUsed": 2},
            ]
        },
    )
    imported = opencode.load(path, NOW)
    assert imported.strategy is Strategy.HEALTH_BASED
    first = imported.keys[0]
    assert first.name is None  # the store names it "Account N"
    assert first.health == 100
    assert (first.total_requests, first.successful_requests) == (0, 0)
    assert first.cooldown_until is None


def test_only_keys_is_enough(tmp_path: Path) -> None:
    path = write(tmp_path / "k.json", {"accounts": [{"key": f"  {KEY_A}\n"}]})
    (key,) = opencode.load(path, NOW).keys
    assert key.secret == KEY_A  # surrounding white space removed by validate_key
    assert key.added_at is None and key.last_used is None


def test_counters_are_made_consistent_and_health_clamped(tmp_path: Path) -> None:
    # The reference's fallback could count more successes than requests (its fallback pick did not count the use).
    path = write(
        tmp_path / "k.json",
        store_file([full_account(KEY_A, "A", totalRequests=3, successfulRequests=5, healthScore=140)]),
    )
    (key,) = opencode.load(path, NOW).keys
    assert (key.total_requests, key.successful_requests) == (5, 5)
    assert key.health == 100


@pytest.mark.parametrize("label", ["a\x1b[2Jb", "x" * 65])
def test_an_unusable_account_label_is_left_out_with_a_note(tmp_path: Path, label: str) -> None:
    extras = {"surface": "kimi-code", "account": label}
    path = write(tmp_path / "k.json", store_file([full_account(KEY_A, "A", kimiRotate=extras)]))
    imported = opencode.load(path, NOW)
    assert imported.keys[0].account is None
    (note,) = imported.notes
    assert note.startswith("account 0: account label not kept (the account label must be 1-64 printable")


def test_a_disabled_key_stays_disabled_and_reasons_that_cannot_be_shown_become_plain(tmp_path: Path) -> None:
    long_reason = "r" * 150  # `disable --reason` takes up to 200 characters
    cooling = {"rateLimitResetTime": NOW_MS + 60_000}
    accounts = [
        full_account(KEY_A, "A", kimiRotate={"disabledReason": long_reason, "account": "  acme  "}),
        full_account(KEY_B, "B", kimiRotate={"disabledReason": "bad\x1b[31m", "cooldownReason": "x\x07"}, **cooling),
    ]
    a, b = opencode.load(write(tmp_path / "k.json", store_file(accounts)), NOW).keys
    assert (a.disabled_reason, a.account) == (long_reason, "acme")
    assert (b.disabled_reason, b.cooldown_reason) == ("disabled (imported)", "rate limited (imported)")


@pytest.mark.parametrize("name", ["", "   ", "12", "a\x07b", "x" * 65])
def test_unusable_names_fall_back_to_a_default(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / "k.json", store_file([full_account(KEY_A, name)]))
    imported = opencode.load(path, NOW)
    assert imported.keys[0].name is None
    if name.strip():
        assert len(imported.notes) == 1 and "account 0" in imported.notes[0]


def test_unknown_strategy_acts_as_health_based(tmp_path: Path) -> None:
    path = write(tmp_path / "k.json", store_file([full_account(KEY_A, "A")], rotationStrategy="fastest"))
    imported = opencode.load(path, NOW)
    assert imported.strategy is Strategy.HEALTH_BASED
    assert any("fastest" in n for n in imported.notes)


def test_reading_never_writes(tmp_path: Path) -> None:
    path = write(tmp_path / "kimi-accounts.json", store_file([full_account(KEY_A, "A")]))
    os.chmod(path, 0o644)
    before = (path.read_bytes(), path.stat().st_mtime_ns, path.stat().st_mode)
    time.sleep(0.01)
    opencode.load(path, NOW)
    assert (path.read_bytes(), path.stat().st_mtime_ns, path.stat().st_mode) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kimi-accounts.json"]


# -- errors ---------------------------------------------------------------------------------------


def error_for(path: Path) -> str:
    with pytest.raises(OpencodeError) as info:
        opencode.load(path, NOW)
    message = str(info.value)
    assert "\n" not in message and ";" in message  # one line: what happened; what to do
    return message


def test_missing_file(tmp_path: Path) -> None:
    message = error_for(tmp_path / "nope.json")
    assert "does not exist" in message and "kimi-accounts.json" in message


def test_folder_instead_of_file(tmp_path: Path) -> None:
    assert "is a folder" in error_for(tmp_path)


def test_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    path.write_text('{"accounts": [{"key": "sk-kimi-')  # truncated, as the reference's writes can leave it
    assert "not valid JSON" in error_for(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    assert "UTF-8" in error_for(path)


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ([1, 2, 3], "top level"),
        ({"version": 1}, "accounts"),
        ({"accounts": {"key": KEY_A}}, "accounts"),
        ({"accounts": [{"name": "no key"}]}, "accounts[0].key"),
        ({"accounts": [{"key": KEY_A}, {"key": KEY_B, "healthScore": "high"}]}, "accounts[1].healthScore"),
        ({"accounts": [{"key": KEY_A, "totalRequests": -1}]}, "accounts[0].totalRequests"),
    ],
)
def test_bad_schema_names_the_field_but_not_the_value(tmp_path: Path, data: object, where: str) -> None:
    message = error_for(write(tmp_path / "k.json", data))
    assert "does not look like an opencode-kimi-rotator store" in message
    assert where in message
    assert KEY_A not in message and KEY_B not in message


@pytest.mark.parametrize(
    "bad_key",
    ["sk-kimi-short", "not-a-key-at-all-1234567", "sk-kimi-test with spaces inside", "sk-kimi-" + "a" * 200],
)
def test_invalid_key_is_skipped_with_a_note_that_does_not_echo_it(tmp_path: Path, bad_key: str) -> None:
    accounts = [full_account(KEY_A, "A"), full_account(bad_key, "B"), full_account(KEY_B, "C")]
    imported = opencode.load(write(tmp_path / "k.json", store_file(accounts)), NOW)
    assert [(k.secret, k.name) for k in imported.keys] == [(KEY_A, "A"), (KEY_B, "C")]  # the others still come
    assert imported.invalid == 1
    (note,) = imported.notes
    assert note.startswith("account 1 ('B', ") and "invalid key" in note and "skipped it" in note
    assert bad_key not in note
