"""Key format rules, masking and fingerprints: the only places a secret's text is looked at."""

from __future__ import annotations

import hashlib
import re

from .errors import UserError
from .models import Surface

KIMI_CODE_PREFIX = "sk-kimi-"
MIN_LEN = 20
MAX_LEN = 128
MAX_NAME_LEN = 64
MAX_ACCOUNT_LEN = 64
MAX_REASON_LEN = 200
_KEY_CHARS = re.compile(r"^sk-[A-Za-z0-9_-]+$")
_NAME_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f]")
# What comes before the key when a whole header line or its value was copied.
_HEADER = re.compile(r"^(?:(?:authorization|x-api-key)\s*:\s*(?:bearer(?:\s+|$))?|bearer(?:\s+|$))", re.IGNORECASE)
_KEY_IN_NAME = re.compile(r"sk-[A-Za-z0-9_-]{12,}")


class KeyFormatError(UserError, ValueError):
    """A key or a name that can't be stored; the message says why and never repeats the key."""


class SurfaceMismatch(KeyFormatError):
    """A well-formed key given the wrong surface; the message says which surface it belongs to."""


class PastedHeader(KeyFormatError):
    """The key came with its HTTP header around it (`Bearer sk-…`); the message says to give the key alone."""


def default_surface(secret: str) -> Surface:
    return Surface.KIMI_CODE if secret.startswith(KIMI_CODE_PREFIX) else Surface.MOONSHOT_CN


def validate_key(secret: str, surface: Surface) -> str:
    """The key with surrounding white space removed, or KeyFormatError."""
    key = secret.strip()
    if not key:
        raise KeyFormatError("the key is empty")
    header = _HEADER.match(key)
    if header:
        raise PastedHeader(
            f'it starts with "{header.group(0).strip()}", which belongs to the HTTP header, not to the key; '
            'give only the key, from "sk-" on'
        )
    if not key.startswith("sk-"):
        raise KeyFormatError('a Kimi or Moonshot key starts with "sk-"')
    if surface is Surface.KIMI_CODE and not key.startswith(KIMI_CODE_PREFIX):
        raise SurfaceMismatch(
            f'a Kimi Code key starts with "{KIMI_CODE_PREFIX}" and this one does not, so it is an Open Platform '
            "key; use --surface moonshot-cn or moonshot-ai"
        )
    if surface is not Surface.KIMI_CODE and key.startswith(KIMI_CODE_PREFIX):
        raise SurfaceMismatch(
            f'a key starting "{KIMI_CODE_PREFIX}" is a Kimi Code key, not a {surface.value} one; '
            "use --surface kimi-code, or leave --surface out"
        )
    if len(key) < MIN_LEN:
        raise KeyFormatError(f"the key is shorter than {MIN_LEN} characters (is it cut off?)")
    if len(key) > MAX_LEN:
        raise KeyFormatError(f"the key is longer than {MAX_LEN} characters")
    if not _KEY_CHARS.match(key):
        raise KeyFormatError("the key contains characters other than letters, digits, '-' and '_'")
    return key


def validate_name(name: str) -> str:
    cleaned = name.strip()
    if not cleaned:
        raise KeyFormatError("the name is empty")
    if len(cleaned) > MAX_NAME_LEN:
        raise KeyFormatError(f"the name is longer than {MAX_NAME_LEN} characters")
    if _NAME_FORBIDDEN.search(cleaned):
        raise KeyFormatError("the name contains control characters")
    if _KEY_IN_NAME.search(cleaned):  # `add-key KEY1 KEY2`: the second key would be shown as a name
        raise KeyFormatError("the name looks like an API key; give one key per command, and a name of your own")
    if cleaned.isdigit():
        raise KeyFormatError("the name is a number, which would be read as an index; add a letter")
    return cleaned


def validate_account(label: str) -> str:
    """An account label (keys of one account share rate limits) without surrounding white space, or KeyFormatError."""
    return _printable(label, "the account label", MAX_ACCOUNT_LEN)


def validate_reason(reason: str) -> str:
    """Why a key is disabled, as `list-keys` shows it, without surrounding white space; or KeyFormatError."""
    return _printable(reason, "the reason", MAX_REASON_LEN)


def _printable(text: str, what: str, max_len: int) -> str:
    cleaned = text.strip()
    if not cleaned or len(cleaned) > max_len or not cleaned.isprintable():
        raise KeyFormatError(f"{what} must be 1-{max_len} printable characters")
    return cleaned


def mask(secret: str, ellipsis: str = "…") -> str:
    """Prefix and the last 4 characters, never more: `sk-kimi-…a1b2`."""
    prefix = KIMI_CODE_PREFIX if secret.startswith(KIMI_CODE_PREFIX) else secret[:3]
    if len(secret) < len(prefix) + 12:
        return prefix + ellipsis
    return f"{prefix}{ellipsis}{secret[-4:]}"


def fingerprint(secret: str) -> str:
    """A short stable name for a key in logs and flows; reveals nothing of the key."""
    return hashlib.sha256(secret.encode()).hexdigest()[:10]
