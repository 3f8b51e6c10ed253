"""Sealing keys at rest (kimi_rotator.secret_box): round trips, context binding, tampering, rotation, the secret file's
permissions, and messages that never carry the secret."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from kimi_rotator.errors import UserError
from kimi_rotator.secret_box import SecretBox, SecretError, add_secret, drop_old_secrets, key_id

API_KEY = "sk-kimi-testAlphaAlphaAlpha01"
FINGERPRINT_A = "fp-aaaa1111"
FINGERPRINT_B = "fp-bbbb2222"


def file_secrets(path: Path) -> list[bytes]:
    return [base64.b64decode(line) for line in path.read_text().splitlines() if line and not line.startswith("#")]


def secret_texts(path: Path) -> list[str]:
    """Every form a secret of the file could take in a message: its base64 line, its hex, its raw bytes."""
    out = []
    for s in file_secrets(path):
        out += [base64.b64encode(s).decode(), base64.urlsafe_b64encode(s).decode(), s.hex(), repr(s)]
    return out


@pytest.fixture
def secret_path(tmp_path: Path) -> Path:
    return tmp_path / "conf" / "redis-secret"


@pytest.fixture
def box(secret_path: Path) -> SecretBox:
    return SecretBox.load(secret_path, create=True)


def test_a_sealed_key_opens_with_its_context(box: SecretBox) -> None:
    token = box.seal(API_KEY, FINGERPRINT_A)
    assert box.open(token, FINGERPRINT_A) == API_KEY
    version, kid, data = token.split(".")
    assert (version, kid) == ("v1", box.key_id)
    assert API_KEY not in token and "AlphaAlpha" not in base64.urlsafe_b64decode(data).decode("latin-1")
    assert box.seal(API_KEY, FINGERPRINT_A) != token  # a fresh nonce each time


@given(st.text(max_size=200), st.text(max_size=40))
def test_any_text_round_trips(plaintext: str, context: str) -> None:
    box = SecretBox([bytes(range(32))])
    assert box.open(box.seal(plaintext, context), context) == plaintext


def test_the_format_is_aes_256_gcm_with_the_context_as_associated_data(secret_path: Path, box: SecretBox) -> None:
    """Written independently of secret_box: what a reader in another language would do."""
    (secret,) = file_secrets(secret_path)
    assert len(secret) == 32 and box.key_id == hashlib.sha256(secret).hexdigest()[:8] == key_id(secret)
    blob = base64.urlsafe_b64decode(box.seal(API_KEY, FINGERPRINT_A).split(".")[2])
    assert AESGCM(secret).decrypt(blob[:12], blob[12:], FINGERPRINT_A.encode()) == API_KEY.encode()


def test_a_sealed_key_moved_to_another_record_does_not_open(box: SecretBox) -> None:
    token = box.seal(API_KEY, FINGERPRINT_A)
    with pytest.raises(SecretError, match=f"does not verify with secret {box.key_id}: it was altered, or moved"):
        box.open(token, FINGERPRINT_B)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_tampered_sealed_key_does_not_open(box: SecretBox, where: str) -> None:
    token = box.seal(API_KEY, FINGERPRINT_A)
    head, data = token.rsplit(".", 1)
    blob = bytearray(base64.urlsafe_b64decode(data))
    blob[{"first": 0, "middle": len(blob) // 2, "last": -1}[where]] ^= 0x01
    with pytest.raises(SecretError, match="does not verify"):
        box.open(f"{head}.{base64.urlsafe_b64encode(bytes(blob)).decode()}", FINGERPRINT_A)


@pytest.mark.parametrize("token", ["", "sk-kimi-plain", "v1.abcdefgh", "v1.abcdefgh.!!!!", "v1.abcdefgh.AAAA",
                                   "v1.short.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"])
def test_a_value_that_is_no_sealed_key_is_refused_clearly(box: SecretBox, token: str) -> None:
    with pytest.raises(SecretError, match=r"is not a sealed key \(v1.<id>.<data>\)"):
        box.open(token, FINGERPRINT_A)


def test_a_newer_format_asks_for_an_upgrade(box: SecretBox) -> None:
    token = "v2." + box.seal(API_KEY, FINGERPRINT_A).split(".", 1)[1]
    with pytest.raises(SecretError, match=r"format 'v2'.*upgrade kimi-rotate"):
        box.open(token, FINGERPRINT_A)


def test_rotation_keeps_old_values_open_until_the_old_secret_is_dropped(secret_path: Path, box: SecretBox) -> None:
    old_token = box.seal(API_KEY, FINGERPRINT_A)
    old_id = box.key_id

    new_id = add_secret(secret_path)
    assert new_id != old_id
    rotated = SecretBox.load(secret_path)
    assert rotated.key_ids == (new_id, old_id)
    assert rotated.open(old_token, FINGERPRINT_A) == API_KEY
    assert not rotated.sealed_with_current(old_token)
    new_token = rotated.seal(API_KEY, FINGERPRINT_A)
    assert new_token.startswith(f"v1.{new_id}.") and rotated.sealed_with_current(new_token)
    assert box.sealed_with_current(old_token) and not box.sealed_with_current(new_token)

    assert drop_old_secrets(secret_path) == 1
    assert drop_old_secrets(secret_path) == 0
    current = SecretBox.load(secret_path)
    assert current.key_ids == (new_id,)
    assert current.open(new_token, FINGERPRINT_A) == API_KEY
    with pytest.raises(SecretError) as caught:
        current.open(old_token, FINGERPRINT_A)
    assert str(caught.value) == (
        f"a value was sealed with secret {old_id}, which {secret_path} lacks (it has {new_id}); copy the current "
        "secret file from the instance that sealed it"
    )
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert sorted(p.name for p in secret_path.parent.iterdir()) == ["redis-secret"]  # no temp file left


def test_a_new_secret_file_is_0600_in_a_0700_folder(secret_path: Path, box: SecretBox) -> None:
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret_path.parent.stat().st_mode) == 0o700
    assert len(file_secrets(secret_path)) == 1
    assert SecretBox.load(secret_path, create=True).key_id == box.key_id  # create=True keeps an existing file


def test_instances_creating_the_file_at_once_share_one_secret(secret_path: Path) -> None:
    boxes: list[SecretBox] = []
    start = threading.Barrier(8)

    def create() -> None:
        start.wait(5)
        boxes.append(SecretBox.load(secret_path, create=True))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(boxes) == 8
    assert {b.key_id for b in boxes} == {SecretBox.load(secret_path).key_id}


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_secret_file_others_can_read_is_refused(secret_path: Path, box: SecretBox, mode: int) -> None:
    os.chmod(secret_path, mode)
    with pytest.raises(SecretError) as caught:
        SecretBox.load(secret_path)
    assert str(caught.value) == (
        f"the secret file {secret_path} can be read by other users (mode {mode:o}); run `chmod 600 {secret_path}`"
    )
    with pytest.raises(SecretError, match="chmod 600"):
        add_secret(secret_path)
    os.chmod(secret_path, 0o400)  # read-only for its owner is fine
    assert SecretBox.load(secret_path).key_id == box.key_id


def test_a_missing_secret_file_says_where_it_looked_and_what_to_do(secret_path: Path) -> None:
    for call in (lambda: SecretBox.load(secret_path), lambda: add_secret(secret_path),
                 lambda: drop_old_secrets(secret_path)):
        with pytest.raises(SecretError) as caught:
            call()
        assert str(caught.value) == (
            f"no secret file at {secret_path}: the API keys in the shared store are sealed with it; copy the secret "
            f"file from the machine that created the store to {secret_path} (mode 600)"
        )
    assert not secret_path.exists() and isinstance(caught.value, UserError)


@pytest.mark.parametrize(("content", "message"), [
    ("", "holds no secret"),
    ("# only a comment\n\n", "holds no secret"),
    ("bm90LTMyLWJ5dGVz\n", "line 1 of the secret file .* is not a secret"),
    ("# head\nnot base64 at all!\n", "line 2 of the secret file .* is not a secret"),
])
def test_a_damaged_secret_file_is_refused_clearly(secret_path: Path, content: str, message: str) -> None:
    secret_path.parent.mkdir(mode=0o700)
    secret_path.write_text(content)
    secret_path.chmod(0o600)
    with pytest.raises(SecretError, match=message) as caught:
        SecretBox.load(secret_path)
    assert "\n" not in str(caught.value) and "not base64 at all" not in str(caught.value)


def test_a_folder_in_place_of_the_file_is_refused(secret_path: Path) -> None:
    secret_path.mkdir(parents=True)
    with pytest.raises(SecretError, match="is a folder, not the secret file"):
        SecretBox.load(secret_path, create=True)


def test_the_secret_never_appears_in_a_token_an_error_or_the_box(secret_path: Path, box: SecretBox) -> None:
    add_secret(secret_path)
    rotated = SecretBox.load(secret_path)
    old = box.seal(API_KEY, FINGERPRINT_A)
    texts = [old, rotated.seal(API_KEY, FINGERPRINT_A), repr(rotated), str(vars(rotated))]
    for attempt in (lambda: rotated.open(old, FINGERPRINT_B), lambda: rotated.open(old[:-4], FINGERPRINT_A),
                    lambda: rotated.open("v1.0000aaaa." + old.split(".")[2], FINGERPRINT_A)):
        with pytest.raises(SecretError) as caught:
            attempt()
        texts.append(str(caught.value))
    os.chmod(secret_path, 0o644)
    with pytest.raises(SecretError) as caught:
        SecretBox.load(secret_path)
    texts.append(str(caught.value))
    assert len(texts) == 8
    for secret in secret_texts(secret_path):
        assert not any(secret in t for t in texts), secret
    assert not any(API_KEY in t for t in texts)
