"""Sealing API keys at rest in a shared store (the Redis backend): AES-256-GCM under a secret kept in a file.

The secret never goes to Redis, nor to an environment variable: a Redis dump, a replica or a `MONITOR` session shows
only sealed values, and every instance of the pool reads the same secret file (copied from the machine that created
the store). The file holds one secret a line, base64 of 32 random bytes, newest first; lines starting with `#` are
comments. New values are sealed with the first secret, and every secret in the file opens values: rotation is
`add_secret` (a new first line), re-sealing every value with it, then `drop_old_secrets`.

A sealed value is text: `v1.<key id>.<urlsafe base64 of nonce (12 bytes) ‖ ciphertext ‖ GCM tag>`. The key id is the
first 8 hex digits of the secret's SHA-256, which names the secret without giving it away. The caller's `context`
(the store passes the API key's fingerprint) is GCM's associated data, so a sealed value copied into another key's
record does not open.

Apart from reading and writing that file, this module is pure: no logging, no clock, no secret in any message.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import UserError

FORMAT = "v1"
SECRET_LEN = 32  # AES-256
NONCE_LEN = 12  # GCM's standard nonce: random, so 2^32 seals per secret stay far below the collision bound
KEY_ID_LEN = 8
_TAG_LEN = 16
# A secret file is a few lines; this stops a wrong path (a log, a dump) from being read whole.
_MAX_FILE_BYTES = 64 * 1024
_HEADER = (
    "# kimi-rotate: the secrets that seal the API keys in the shared store, newest first (one a line).\n"
    "# Copy this file to every instance (mode 600); never put it in the store itself.\n"
)


class SecretError(UserError):
    """The secret file is missing, too open or damaged, or a sealed value does not open; the message says what to do."""


def key_id(secret: bytes) -> str:
    """The short public name of a secret: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(secret).hexdigest()[:KEY_ID_LEN]


class SecretBox:
    """Seals and opens text with the secrets of one secret file (the first seals, all open)."""

    def __init__(self, secrets_newest_first: Sequence[bytes], source: Path | None = None) -> None:
        if not secrets_newest_first:
            raise ValueError("a SecretBox needs at least one secret")
        # Only the ciphers are kept (each holds its key), so no attribute of the box is the secret itself.
        self._ciphers: dict[str, AESGCM] = {}
        for secret in secrets_newest_first:
            if len(secret) != SECRET_LEN:
                raise ValueError(f"a secret is {SECRET_LEN} bytes, not {len(secret)}")
            self._ciphers.setdefault(key_id(secret), AESGCM(secret))
        self.key_ids: tuple[str, ...] = tuple(self._ciphers)
        self.source = source

    @classmethod
    def load(cls, path: Path, create: bool = False) -> SecretBox:
        """The box of the secret file at `path`. A missing file is created (0600, in a 0700 folder) with a new
        secret when `create`, else SecretError says where it looked and what to do."""
        if create and not path.exists():
            _create_secret_file(path)
        return cls(_read_secrets(path), path)

    @property
    def key_id(self) -> str:
        """The id of the secret new values are sealed with."""
        return self.key_ids[0]

    def seal(self, plaintext: str, context: str) -> str:
        nonce = secrets.token_bytes(NONCE_LEN)
        sealed = self._ciphers[self.key_id].encrypt(nonce, plaintext.encode("utf-8"), context.encode("utf-8"))
        return f"{FORMAT}.{self.key_id}.{base64.urlsafe_b64encode(nonce + sealed).decode('ascii')}"

    def open(self, token: str, context: str) -> str:
        """The plaintext `seal` was given with this `context`; SecretError if the secret is not in the file, or the
        value was altered or belongs to another context."""
        version, kid, blob = _split(token)
        if version != FORMAT:
            raise SecretError(f"a sealed value has format {version!r}, which this kimi-rotate cannot read; "
                              "upgrade kimi-rotate on this instance")
        cipher = self._ciphers.get(kid)
        if cipher is None:
            where = str(self.source) if self.source is not None else "the secret file"
            raise SecretError(f"a value was sealed with secret {kid}, which {where} lacks (it has "
                              f"{', '.join(self.key_ids)}); copy the current secret file from the instance that "
                              "sealed it")
        try:
            plaintext = cipher.decrypt(blob[:NONCE_LEN], blob[NONCE_LEN:], context.encode("utf-8"))
        except InvalidTag:
            raise SecretError(f"a sealed value does not verify with secret {kid}: it was altered, or moved from "
                              "another key's record; add that key again") from None
        try:
            return plaintext.decode("utf-8")
        except UnicodeDecodeError:  # only a forged value with a valid tag could get here
            raise SecretError("a sealed value opened but is not text; add that key again") from None

    def sealed_with_current(self, token: str) -> bool:
        """True if `token` is sealed with the current (first) secret; False means re-seal it before
        drop_old_secrets (a damaged token is False too: opening it says what is wrong)."""
        return token.startswith(f"{FORMAT}.{self.key_id}.")

    def __repr__(self) -> str:
        return f"SecretBox(key_ids={list(self.key_ids)}, source={self.source})"


def _split(token: str) -> tuple[str, str, bytes]:
    """(format, key id, nonce ‖ ciphertext ‖ tag); SecretError if `token` cannot be a sealed value."""
    parts = token.split(".")
    if len(parts) == 3 and parts[0].startswith("v") and len(parts[1]) == KEY_ID_LEN:
        try:
            blob = base64.b64decode(parts[2].encode("ascii"), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            blob = b""
        if parts[0] != FORMAT or len(blob) >= NONCE_LEN + _TAG_LEN:
            return parts[0], parts[1], blob
    raise SecretError("a stored value is not a sealed key (v1.<id>.<data>): it is damaged, or another program "
                      "wrote it; add that key again")


# -- rotation ------------------------------------------------------------------------------------------------------


def add_secret(path: Path) -> str:
    """Puts a new secret first in the file at `path`, keeping the older ones (which still open values); its id."""
    old = _read_secrets(path)
    old_ids = {key_id(s) for s in old}
    new = secrets.token_bytes(SECRET_LEN)
    while key_id(new) in old_ids:  # two secrets with one id could not be told apart
        new = secrets.token_bytes(SECRET_LEN)
    _write_secret_file(path, [new, *old], replace=True)
    return key_id(new)


def drop_old_secrets(path: Path) -> int:
    """Keeps only the first (current) secret in the file; how many were dropped. Values still sealed with a
    dropped secret no longer open: re-seal them first."""
    kept, *dropped = _read_secrets(path)
    if dropped:
        _write_secret_file(path, [kept], replace=True)
    return len(dropped)


# -- the file ------------------------------------------------------------------------------------------------------


def _read_secrets(path: Path) -> list[bytes]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise SecretError(
            f"no secret file at {path}: the API keys in the shared store are sealed with it; copy the secret file "
            f"from the machine that created the store to {path} (mode 600)"
        ) from None
    except IsADirectoryError:
        raise SecretError(f"{path} is a folder, not the secret file; point to the file") from None
    except OSError as e:
        raise SecretError(
            f"cannot read the secret file {path}: {e.strerror}; check its owner and permissions"
        ) from None
    info = os.fstat(fd)  # of the file opened, not of whatever the path names a moment later
    if stat.S_ISDIR(info.st_mode):
        os.close(fd)
        raise SecretError(f"{path} is a folder, not the secret file; point to the file")
    with os.fdopen(fd, "rb") as f:
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise SecretError(f"the secret file {path} can be read by other users (mode {mode:o}); "
                              f"run `chmod 600 {path}`")
        raw = f.read(_MAX_FILE_BYTES + 1)
    if len(raw) > _MAX_FILE_BYTES:
        raise SecretError(f"{path} is far too large to be the secret file; is it the right file?")
    found: list[bytes] = []
    for number, line in enumerate(raw.splitlines(), 1):
        text = line.strip()
        if not text or text.startswith(b"#"):
            continue
        try:
            secret = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            secret = b""
        if len(secret) != SECRET_LEN:  # the line is never shown: it may be a secret with a typo
            raise SecretError(f"line {number} of the secret file {path} is not a secret (base64 of {SECRET_LEN} "
                              "bytes); copy the file again from the machine that created the store")
        found.append(secret)
    if not found:
        raise SecretError(f"the secret file {path} holds no secret; copy the file again from the machine that "
                          "created the store")
    return found


def _create_secret_file(path: Path) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise SecretError(f"cannot create the folder {path.parent} for the secret file: {e.strerror}; "
                          "choose a writable place") from None
    with contextlib.suppress(FileExistsError):  # another instance created it first: use theirs
        _write_secret_file(path, [secrets.token_bytes(SECRET_LEN)], replace=False)


def _write_secret_file(path: Path, secrets_newest_first: Sequence[bytes], replace: bool) -> None:
    """Writes the file whole and 0600 from the first byte: a temp file in the same folder, fsynced, then renamed
    over `path` (`replace`) or linked to it only if nothing is there (FileExistsError otherwise). A crash leaves the
    old file or the new one, never half of one; two instances creating the file at once keep one secret, not two."""
    text = _HEADER + "".join(base64.b64encode(s).decode("ascii") + "\n" for s in secrets_newest_first)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            if replace:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    except FileExistsError:
        raise
    except OSError as e:
        raise SecretError(f"cannot write the secret file {path}: {e.strerror}; nothing was changed, "
                          "check the folder's permissions") from None
