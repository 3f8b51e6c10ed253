"""Encrypted backups (kimi_rotator.backup): the reference's exact format, both directions, and clear failures."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from kimi_rotator import backup
from kimi_rotator.backup import BackupError, BadBackup, WrongPassphrase
from kimi_rotator.models import PoolSettings, Strategy, Surface
from kimi_rotator.store import NewKey, Store
from kimi_rotator.store_sqlite import SqliteStore

KEY_A = "sk-kimi-testAlphaAlphaAlpha01"
KEY_B = "sk-kimi-testBravoBravoBravo02"
MOON = "sk-testMoonshotCharlieCharlie03"
PASS = "correct horse battery"
NOW = 1_800_000_000.0


def reference_encrypt(plaintext: str, password: str) -> str:
    """What opencode-kimi-rotator's exportKeys does (Node crypto), written independently of backup.py:
    scryptSync(password, salt, 32) with Node's defaults, createCipheriv('aes-256-gcm', key, iv16),
    getAuthTag(), then base64(salt ‖ iv ‖ tag ‖ ciphertext)."""
    salt, iv = os.urandom(32), os.urandom(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=16384, r=8, p=1, dklen=32)
    enc = Cipher(algorithms.AES(key), modes.GCM(iv)).encryptor()
    ciphertext = enc.update(plaintext.encode()) + enc.finalize()
    return base64.b64encode(salt + iv + enc.tag + ciphertext).decode()


def reference_decrypt(text: str, password: str) -> bytes:
    blob = base64.b64decode(text)
    salt, iv, tag, ciphertext = blob[:32], blob[32:48], blob[48:64], blob[64:]
    key = hashlib.scrypt(password.encode(), salt=salt, n=16384, r=8, p=1, dklen=32)
    dec = Cipher(algorithms.AES(key), modes.GCM(iv, tag)).decryptor()
    return dec.update(ciphertext) + dec.finalize()


def reference_export() -> dict[str, object]:
    """The plaintext of a v1.2.10 export: full account objects, stats included."""
    return {
        "version": 1,
        "exportedAt": "2027-01-15T08:00:00.000Z",
        "accounts": [
            {
                "key": KEY_A, "name": "Account 1", "addedAt": 1_700_000_000_000, "lastUsed": 1_700_000_500_000,
                "rateLimitResetTime": 0, "billingLimitResetTime": 0, "healthScore": 85, "consecutiveFailures": 1,
                "consecutiveBillingLimitHits": 0, "totalRequests": 50, "successfulRequests": 45,
                "responseTimes": [245, 198, 210], "dailyRequests": {"2027-01-15": 45},
            },
            {"key": KEY_B, "name": "Work", "addedAt": 1_700_000_000_000, "lastUsed": 1_700_000_000_000},
        ],
        "rotationStrategy": "sticky",
        "autoRefreshHealth": False,
        "healthRefreshCooldownMinutes": 60,
    }


def test_reads_a_file_the_reference_tool_wrote() -> None:
    text = reference_encrypt(json.dumps(reference_export()), PASS)
    imported = backup.parse_plaintext(backup.decrypt(backup.unpack(text.encode()), PASS), NOW)
    assert imported.strategy is Strategy.STICKY
    a, b = imported.keys
    assert (a.secret, a.name, a.surface, a.health) == (KEY_A, "Account 1", Surface.KIMI_CODE, 85)
    assert (a.total_requests, a.successful_requests) == (50, 45)
    assert (b.secret, b.name) == (KEY_B, "Work")


def test_the_reference_tool_can_read_our_export(store: Store) -> None:
    store.add_keys(
        [
            NewKey(secret=KEY_A, name="main", surface=Surface.KIMI_CODE, health=70, total_requests=4,
                   successful_requests=3, cooldown_until=NOW + 600, cooldown_reason="5-hour quota"),
            NewKey(secret=MOON, name="cn", surface=Surface.MOONSHOT_CN, account="acme"),
        ],
        NOW,
    )
    snap = store.snapshot()
    text = backup.export_text(snap.keys, snap.settings, PASS, NOW)
    doc = json.loads(reference_decrypt(text, PASS))
    assert list(doc) == [
        "version", "exportedAt", "accounts", "rotationStrategy", "autoRefreshHealth", "healthRefreshCooldownMinutes"
    ]
    assert doc["version"] == 1 and doc["exportedAt"].endswith("Z")
    first, second = doc["accounts"]
    # Every field the reference's zod schema knows, with its type; ours go under kimiRotate.
    assert list(first)[:13] == [
        "key", "name", "addedAt", "lastUsed", "rateLimitResetTime", "billingLimitResetTime", "healthScore",
        "consecutiveFailures", "consecutiveBillingLimitHits", "totalRequests", "successfulRequests",
        "responseTimes", "dailyRequests",
    ]
    assert first["key"] == KEY_A and first["healthScore"] == 70
    assert first["rateLimitResetTime"] == (NOW + 600) * 1000
    assert first["kimiRotate"] == {"surface": "kimi-code", "account": None, "cooldownReason": "5-hour quota",
                                   "disabledReason": None, "rateLimitedRequests": 0}
    assert second["kimiRotate"] == {"surface": "moonshot-cn", "account": "acme", "cooldownReason": None,
                                    "disabledReason": None, "rateLimitedRequests": 0}
    assert isinstance(second["addedAt"], int) and second["lastUsed"] == second["addedAt"]


def test_round_trip_keeps_name_surface_account_health_counters_cooldown(store: Store) -> None:
    store.add_keys(
        [
            NewKey(secret=KEY_A, name="main", surface=Surface.KIMI_CODE, health=70, total_requests=4,
                   successful_requests=3, cooldown_until=NOW + 600, cooldown_reason="5-hour quota"),
            NewKey(secret=MOON, name="cn", surface=Surface.MOONSHOT_AI, account="acme"),
        ],
        NOW,
    )
    snap = store.snapshot()
    settings = replace(snap.settings, strategy=Strategy.ROUND_ROBIN)
    text = backup.export_text(snap.keys, settings, PASS, NOW)
    imported = backup.parse_plaintext(backup.decrypt(backup.unpack(text.encode()), PASS), NOW)
    assert imported.strategy is Strategy.ROUND_ROBIN
    a, m = imported.keys
    assert (a.secret, a.name, a.surface, a.health, a.total_requests, a.successful_requests) == (
        KEY_A, "main", Surface.KIMI_CODE, 70, 4, 3
    )
    assert a.cooldown_until == pytest.approx(NOW + 600) and a.cooldown_reason == "5-hour quota"
    assert (m.secret, m.name, m.surface, m.account, m.cooldown_until) == (MOON, "cn", Surface.MOONSHOT_AI, "acme", None)


@settings(max_examples=8, deadline=None)
@given(passphrase=st.text(min_size=8, max_size=40), plaintext=st.binary(min_size=1, max_size=300))
def test_encrypt_decrypt_round_trip(passphrase: str, plaintext: bytes) -> None:
    text = backup.encrypt(plaintext, passphrase)
    blob = base64.b64decode(text)
    assert len(blob) == 32 + 16 + 16 + len(plaintext)
    assert backup.decrypt(backup.unpack(text.encode()), passphrase) == plaintext


def test_wrong_passphrase() -> None:
    env = backup.unpack(backup.encrypt(b'{"accounts": []}', PASS).encode())
    with pytest.raises(WrongPassphrase, match="wrong passphrase"):
        backup.decrypt(env, PASS + "!")


@pytest.mark.parametrize("where", [0, 40, 56, 70])  # salt, iv, tag, ciphertext
def test_a_damaged_byte_anywhere_is_detected(where: int) -> None:
    blob = bytearray(base64.b64decode(backup.encrypt(b'{"accounts": []}', PASS)))
    blob[where] ^= 0x01
    with pytest.raises(WrongPassphrase):
        backup.decrypt(backup.unpack(base64.b64encode(bytes(blob))), PASS)


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, this is not a backup!", b'{"accounts": []}', base64.b64encode(os.urandom(64)), b"\x00\xff" * 50],
)
def test_garbage_is_not_a_backup(content: bytes) -> None:
    with pytest.raises(BadBackup):
        backup.unpack(content)


def test_line_wrapped_base64_is_accepted() -> None:
    text = backup.encrypt(b'{"accounts": []}', PASS)
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76)) + "\n"
    assert backup.decrypt(backup.unpack(wrapped.encode()), PASS) == b'{"accounts": []}'


@pytest.mark.parametrize(
    ("plaintext", "match"),
    [
        ("not json at all", "does not hold JSON"),
        ('{"version": 1, "accounts": "nope"}', r"accounts"),
        ('{"version": 2, "accounts": []}', "upgrade kimi-rotate"),
    ],
)
def test_decrypted_content_is_checked(plaintext: str, match: str) -> None:
    env = backup.unpack(reference_encrypt(plaintext, PASS).encode())
    with pytest.raises(BadBackup, match=match):
        backup.parse_plaintext(backup.decrypt(env, PASS), NOW)


def test_an_invalid_key_in_a_backup_is_left_out_with_a_note() -> None:
    plaintext = json.dumps({"accounts": [{"key": KEY_A}, {"key": "sk-kimi-short", "name": "Broken"}]})
    env = backup.unpack(reference_encrypt(plaintext, PASS).encode())
    imported = backup.parse_plaintext(backup.decrypt(env, PASS), NOW)
    assert [k.secret for k in imported.keys] == [KEY_A]
    assert imported.invalid == 1
    (note,) = imported.notes
    assert "account 1 ('Broken', sk-kimi-…)" in note and "skipped" in note
    assert "sk-kimi-short" not in note


def test_short_passphrase_is_refused() -> None:
    with pytest.raises(BackupError, match="shorter than 8"):
        backup.encrypt(b"{}", "1234567")


def test_export_file_is_private_from_the_start(tmp_path: Path) -> None:
    old = os.umask(0)  # even a permissive umask must not open the file up
    try:
        backup.write_private(tmp_path / "keys.enc", "c2VjcmV0")
    finally:
        os.umask(old)
    path = tmp_path / "keys.enc"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "c2VjcmV0"
    assert [p.name for p in tmp_path.iterdir()] == ["keys.enc"]  # no temp file left behind


def test_existing_file_is_kept_unless_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "keys.enc"
    path.write_text("precious")
    with pytest.raises(BackupError, match="already exists"):
        backup.write_private(path, "new")
    assert path.read_text() == "precious"
    path.chmod(0o644)
    backup.write_private(path, "new", overwrite=True)
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_missing_folder_or_a_file_in_its_place(tmp_path: Path) -> None:
    with pytest.raises(BackupError, match=r"the folder .*missing-dir does not exist; create it"):
        backup.write_private(tmp_path / "missing-dir" / "keys.enc", "x")
    (tmp_path / "plain").write_text("")
    with pytest.raises(BackupError, match=r"the folder .*plain is a file, not a folder"):
        backup.check_target(tmp_path / "plain" / "keys.enc")
    assert [p.name for p in tmp_path.iterdir()] == ["plain"]


def test_read_envelope_errors(tmp_path: Path) -> None:
    with pytest.raises(BackupError, match="does not exist"):
        backup.read_envelope(tmp_path / "nope.enc")
    with pytest.raises(BackupError, match="is a folder"):
        backup.read_envelope(tmp_path)
    (tmp_path / "junk.enc").write_text("junk junk junk")
    with pytest.raises(BadBackup, match=r"junk\.enc"):
        backup.read_envelope(tmp_path / "junk.enc")


def test_payload_health_includes_time_recovery() -> None:
    from kimi_rotator.models import KeyRecord, Secret

    key = KeyRecord(
        id=1, secret=Secret(KEY_A), fingerprint="x", name="a", surface=Surface.KIMI_CODE, health=50.0,
        health_at=NOW - 3600,
    )
    doc = backup.build_payload([key], PoolSettings(), NOW)
    assert doc["accounts"][0]["healthScore"] == 60  # +10 per idle hour


def test_round_trip_keeps_disabled_state_and_rate_limited_counts(tmp_path, monkeypatch):
    """An export re-imported into an empty store restores who was disabled and the 429 counts."""
    import time

    from kimi_rotator import backup as bk
    from kimi_rotator.models import Outcome, OutcomeKind, Surface
    from kimi_rotator.store import Attempt, NewKey

    src = SqliteStore(tmp_path / "src")
    now = time.time()
    k = src.add_key(NewKey(secret="sk-kimi-test" + "q" * 40, surface=Surface.KIMI_CODE), now)
    src.record([Attempt(k.id, Outcome(kind=OutcomeKind.RATE_LIMITED, until=now + 1), now),
                Attempt(k.id, Outcome(kind=OutcomeKind.SUCCESS), now)])
    src.set_disabled(k.id, "disabled by hand")
    text = bk.export_text(src.keys(), src.settings(), "correct horse", now)
    imported = bk.parse_plaintext(bk.decrypt(bk.unpack(text.encode()), "correct horse"), now)
    dst = SqliteStore(tmp_path / "dst")
    dst.add_keys(imported.keys, now)
    back = dst.keys()[0]
    assert back.disabled_reason == "disabled by hand"
    assert (back.total_requests, back.successful_requests, back.rate_limited_requests, back.failed_requests) == (
        2, 1, 1, 0)
