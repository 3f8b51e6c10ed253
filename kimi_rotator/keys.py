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
_KEY_CHARS = re.compile(r"^sk-[A-Za-z0-9_-]+$")
_NAME_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f]")


class KeyFormatError(UserError, ValueError):
    """A key or a name that can't be stored; the message says why and never repeats the key."""


def default_surface(secret: str) -> Surface:
    return Surface.KIMI_CODE if secret.startswith(KIMI_CODE_PREFIX) else Surface.MOONSHOT_CN


def validate_key(secret: str, surface: Surface) -> str:
    """The key with surrounding white space removed, or KeyFormatError."""
    key = secret.strip()
    if not key:
        raise KeyFormatError("the key is empty")
    if not key.startswith("sk-"):
        raise KeyFormatError('a Kimi or Moonshot key starts with "sk-"')
    if surface is Surface.KIMI_CODE and not key.startswith(KIMI_CODE_PREFIX):
        raise KeyFormatError(f'a Kimi Code key starts with "{KIMI_CODE_PREFIX}"')
    if surface is not Surface.KIMI_CODE and key.startswith(KIMI_CODE_PREFIX):
        raise KeyFormatError(
            f'a key starting "{KIMI_CODE_PREFIX}" is a Kimi Code key; use --surface kimi-code'
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
    if cleaned.isdigit():
        raise KeyFormatError("the name is a number, which would be read as an index; add a letter")
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
