"""Encrypted key backups (`export-keys` / `import-keys`) in opencode-kimi-rotator's format.

The file is base64 text of salt (32 bytes) ‖ IV (16) ‖ GCM tag (16) ‖ ciphertext: AES-256-GCM
without associated data, key = scrypt(UTF-8 passphrase, salt, N=16384, r=8, p=1, 32 bytes). The
plaintext is the reference's JSON (`version`, `exportedAt`, `accounts`, `rotationStrategy`, ...).
We write exactly that, so the reference tool can read our exports, and keep what it has no field
for (surface, account label, cooldown reason) under `kimiRotate` in each account, which its
schema strips. Reading accepts both tools' files.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import ValidationError

from . import engine, opencode
from .errors import UserError
from .models import KeyRecord, PoolSettings

SALT_LEN = 32
IV_LEN = 16
TAG_LEN = 16
SCRYPT_N, SCRYPT_R, SCRYPT_P = 16384, 8, 1
KEY_LEN = 32
MIN_PASSPHRASE = 8
FORMAT_VERSION = 1
DEFAULT_FILE = "kimi-keys-backup.json.enc"
# Far above any real backup (100 keys is about 40 kB); stops a wrong path from eating memory.
_MAX_FILE_BYTES = 16 * 1024 * 1024


class BackupError(UserError):
    """A backup can't be written or read; the message says why and what to do."""


class WrongPassphrase(BackupError):
    """The tag did not verify: a wrong passphrase, or a damaged file (GCM can't tell them apart)."""


class BadBackup(BackupError):
    """The file is not a backup, or its content is not what a backup holds."""


@dataclass(frozen=True)
class Envelope:
    salt: bytes
    iv: bytes
    tag: bytes
    ciphertext: bytes


def derive_key(passphrase: str, salt: bytes) -> bytes:
    # Node's scryptSync defaults, which the reference relies on.
    return hashlib.scrypt(
        passphrase.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=KEY_LEN,
        maxmem=64 * 1024 * 1024,
    )


def check_passphrase(passphrase: str) -> None:
    if len(passphrase) < MIN_PASSPHRASE:
        raise BackupError(f"the passphrase is shorter than {MIN_PASSPHRASE} characters; choose a longer one")


def encrypt(plaintext: bytes, passphrase: str) -> str:
    check_passphrase(passphrase)
    salt, iv = secrets.token_bytes(SALT_LEN), secrets.token_bytes(IV_LEN)
    sealed = AESGCM(derive_key(passphrase, salt)).encrypt(iv, plaintext, None)
    # AESGCM appends the tag; the file carries it before the ciphertext.
    ciphertext, tag = sealed[:-TAG_LEN], sealed[-TAG_LEN:]
    return base64.b64encode(salt + iv + tag + ciphertext).decode("ascii")


def unpack(text: bytes) -> Envelope:
    """Splits a backup file's content; BadBackup if it can't be one. Needs no passphrase, so a
    wrong file is reported before the user is asked for one."""
    try:
        blob = base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadBackup("the file is not an encrypted key backup (it is not base64 text)") from None
    head = SALT_LEN + IV_LEN + TAG_LEN
    if len(blob) <= head:
        raise BadBackup("the file is too short to be an encrypted key backup (is it cut off?)")
    return Envelope(blob[:SALT_LEN], blob[SALT_LEN : SALT_LEN + IV_LEN], blob[SALT_LEN + IV_LEN : head], blob[head:])


def decrypt(envelope: Envelope, passphrase: str) -> bytes:
    key = derive_key(passphrase, envelope.salt)
    try:
        return AESGCM(key).decrypt(envelope.iv, envelope.ciphertext + envelope.tag, None)
    except InvalidTag:
        raise WrongPassphrase(
            "could not decrypt the backup: wrong passphrase, or the file is damaged; "
            "try again with the passphrase used for the export"
        ) from None


def build_payload(keys: list[KeyRecord], settings: PoolSettings, now: float) -> dict[str, Any]:
    """The plaintext document, in the reference's field order (times in ms, as it keeps them)."""
    recover = settings.auto_refresh_health
    accounts = []
    for k in keys:
        cooling = k.cooldown_until is not None and k.cooldown_until > now
        accounts.append(
            {
                "key": k.secret.get_secret_value(),
                "name": k.name,
                "addedAt": _ms(k.added_at),
                "lastUsed": _ms(k.last_used if k.last_used is not None else k.added_at),
                "rateLimitResetTime": _ms(k.cooldown_until) if cooling else 0,
                "billingLimitResetTime": 0,
                "healthScore": round(engine.health_at(k, now, recover)),
                "consecutiveFailures": 0,
                "consecutiveBillingLimitHits": 0,
                "totalRequests": k.total_requests,
                "successfulRequests": k.successful_requests,
                "responseTimes": [],
                "dailyRequests": {},
                "kimiRotate": {
                    "surface": k.surface.value,
                    "account": k.account,
                    "cooldownReason": k.cooldown_reason if cooling else None,
                    "disabledReason": k.disabled_reason,
                    "rateLimitedRequests": k.rate_limited_requests,
                },
            }
        )
    exported_at = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {
        "version": FORMAT_VERSION,
        "exportedAt": exported_at,
        "accounts": accounts,
        "rotationStrategy": settings.strategy.value,
        "autoRefreshHealth": settings.auto_refresh_health,
        "healthRefreshCooldownMinutes": settings.health_refresh_cooldown_minutes,
    }


def _ms(seconds: float | None) -> int:
    return round((seconds or 0.0) * 1000)


def export_text(keys: list[KeyRecord], settings: PoolSettings, passphrase: str, now: float) -> str:
    plaintext = json.dumps(build_payload(keys, settings, now), ensure_ascii=False).encode("utf-8")
    return encrypt(plaintext, passphrase)


def parse_plaintext(plaintext: bytes, now: float) -> opencode.Imported:
    try:
        data = json.loads(plaintext.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadBackup("the backup decrypted but does not hold JSON; it was not written by a key rotator") from None
    if isinstance(data, dict) and isinstance(data.get("version"), int) and data["version"] > FORMAT_VERSION:
        raise BadBackup(f"the backup has format version {data['version']}; upgrade kimi-rotate to read it")
    try:
        return opencode.parse(data, now)
    except ValidationError as e:
        raise BadBackup(
            f"the backup decrypted but does not hold a key list ({opencode.describe_validation_error(e)}); "
            "was it written by export-keys?"
        ) from None


# -- files ---------------------------------------------------------------------------------------


def read_envelope(path: Path) -> Envelope:
    try:
        if path.stat().st_size > _MAX_FILE_BYTES:
            raise BadBackup(f"{path} is far too large to be a key backup; is it the right file?")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BackupError(f"{path} does not exist; check the file name") from None
    except IsADirectoryError:
        raise BackupError(f"{path} is a folder; pass the backup file") from None
    except OSError as e:
        raise BackupError(f"cannot read {path}: {e.strerror}; check its permissions") from None
    try:
        return unpack(raw)
    except BadBackup as e:
        raise BadBackup(
            f"{path}: {e}; pass a file written by `kimi-rotate export-keys` or opencode-kimi-rotator's export-keys"
        ) from None


def check_target(path: Path, overwrite: bool = False) -> None:
    """Refuses a path write_private can't write, so the CLI can say so before asking for a passphrase."""
    if path.is_dir():
        raise BackupError(f"{path} is a folder; name a file to write the backup to")
    folder = path.parent
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise BackupError(f"the folder {folder} {what}; create it, or choose another place for the backup")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BackupError(f"cannot write to the folder {folder} (permission denied); choose a writable folder")
    if path.exists() and not overwrite:
        raise BackupError(f"{path} already exists; choose another name, or pass --force to replace it")


def write_private(path: Path, text: str, overwrite: bool = False) -> None:
    """Writes `text` to `path` as mode 0600 from the first byte: a temp file created 0600 in the
    same folder, fsynced, then renamed over the target (so a crash never leaves half a backup)."""
    check_target(path, overwrite)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise BackupError(f"cannot write to {path.parent}: {e.strerror}; choose a writable folder") from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise BackupError(f"cannot write {path}: {e.strerror}; nothing was written") from None
