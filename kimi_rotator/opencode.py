"""Reading opencode-kimi-rotator's data: its store file and the account objects its backups hold.

Only ever reads. The plugin may still be running and owns `~/.config/opencode/kimi-accounts.json`,
so nothing here writes to it. Every field but `key` may be missing (a v1.0 file holds only `key`,
`addedAt` and `lastUsed`); the reference tool's defaults fill the gaps. Every key is validated,
which the reference tool never did. Error messages name fields and positions, never values: a
value could be a key.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UserError
from .keys import KeyFormatError, default_surface, mask, validate_account, validate_key, validate_name, validate_reason
from .models import Strategy, Surface
from .store import NewKey

DEFAULT_PATH = Path("~/.config/opencode/kimi-accounts.json")


class OpencodeError(UserError):
    """The reference tool's file can't be imported; the message says why and what to do."""


class RotateExtras(BaseModel):
    """What kimi-rotate adds to each account of its own exports, under a name the reference ignores."""

    model_config = ConfigDict(extra="ignore")

    surface: Surface | None = None
    account: str | None = None
    cooldownReason: str | None = None
    disabledReason: str | None = None
    rateLimitedRequests: int = Field(default=0, ge=0)


class RefAccount(BaseModel):
    """One account object as the reference tool stores and exports it (fields in its file order)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    key: str
    name: str | None = None
    addedAt: float = Field(default=0, ge=0)
    lastUsed: float = Field(default=0, ge=0)
    rateLimitResetTime: float = Field(default=0, ge=0)
    billingLimitResetTime: float = Field(default=0, ge=0)
    healthScore: float = 100
    totalRequests: int = Field(default=0, ge=0)
    successfulRequests: int = Field(default=0, ge=0)
    kimiRotate: RotateExtras | None = None


class RefStore(BaseModel):
    """The top level of the store file, and of the plaintext inside an encrypted export."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    version: int = 1
    accounts: list[RefAccount]
    # A plain string: the reference treats an unknown strategy as health-based, and so do we.
    rotationStrategy: str = Strategy.HEALTH_BASED.value


@dataclass(frozen=True)
class Imported:
    """Keys ready for `Store.add_keys`, the strategy to restore, and remarks for the user (one of them
    for each of the `invalid` accounts left out because their key is not a valid key)."""

    keys: list[NewKey]
    strategy: Strategy
    notes: list[str] = field(default_factory=list)
    invalid: int = 0


def describe_validation_error(e: ValidationError) -> str:
    """The first problem as `accounts[2].key: Field required`, without the offending value."""
    err = e.errors()[0]
    where = ""
    for part in err["loc"]:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    return f"{where or 'top level'}: {err['msg']}"


def parse(data: object, now: float) -> Imported:
    """Converts the decoded JSON of a store file or an export's plaintext. Raises ValidationError
    for a wrong shape; an account with an invalid key is left out with a note naming it, so one
    damaged account does not keep the others out."""
    ref = RefStore.model_validate(data)
    notes: list[str] = []
    keys: list[NewKey] = []
    invalid = 0
    for i, acc in enumerate(ref.accounts):
        try:
            keys.append(to_new_key(acc, i, now, notes))
        except KeyFormatError as e:
            invalid += 1
            notes.append(f"{e}; skipped it (fix that account where it came from and import again to add it)")
    try:
        strategy = Strategy(ref.rotationStrategy)
    except ValueError:
        notes.append(f"unknown rotation strategy {ref.rotationStrategy[:40]!r}; using health-based")
        strategy = Strategy.HEALTH_BASED
    return Imported(keys, strategy, notes, invalid)


def to_new_key(acc: RefAccount, position: int, now: float, notes: list[str]) -> NewKey:
    extras = acc.kimiRotate or RotateExtras()
    surface = extras.surface or default_surface(acc.key.strip())
    try:
        secret = validate_key(acc.key, surface)
    except KeyFormatError as e:
        raise KeyFormatError(f"account {position} ({_describe(acc)}): invalid key: {e}") from None

    name: str | None = None
    if acc.name and acc.name.strip():
        try:
            name = validate_name(acc.name)
        except KeyFormatError as e:
            notes.append(f"account {position}: name not kept ({e}); it gets a default name")

    account: str | None = None
    if extras.account and extras.account.strip():
        try:
            account = validate_account(extras.account)
        except KeyFormatError as e:
            notes.append(f"account {position}: account label not kept ({e}); `kimi-rotate set-account` sets one")

    # The reference keeps two reset times (ms); a future one becomes our single cooldown deadline.
    cooldown_until: float | None = None
    cooldown_reason: str | None = None
    for reset_ms, reason in (
        (acc.rateLimitResetTime, "rate limited (imported)"),
        (acc.billingLimitResetTime, "billing limit (imported)"),
    ):
        until = reset_ms / 1000.0
        if until > now and (cooldown_until is None or until > cooldown_until):
            cooldown_until, cooldown_reason = until, reason
    if cooldown_until is not None and extras.cooldownReason:
        with contextlib.suppress(KeyFormatError):  # one that can't be shown keeps the plain reason above
            cooldown_reason = validate_reason(extras.cooldownReason)

    return NewKey(
        secret=secret,
        name=name,
        surface=surface,
        account=account,
        health=max(0.0, min(100.0, acc.healthScore)),
        # The reference could count more successes than requests (its fallback skipped the count);
        # our counters must add up, so the total is at least the successes.
        total_requests=max(acc.totalRequests, acc.successfulRequests),
        successful_requests=acc.successfulRequests,
        rate_limited_requests=extras.rateLimitedRequests,
        cooldown_until=cooldown_until,
        cooldown_reason=cooldown_reason,
        disabled_reason=_disabled_reason(extras.disabledReason),
        added_at=acc.addedAt / 1000.0 or None,
        last_used=acc.lastUsed / 1000.0 or None,
    )


def _describe(acc: RefAccount) -> str:
    """Which account, for a message: its name (if it can be shown) and its masked key."""
    name = (acc.name or "").strip()
    shown = f"{name[:40]!r}, " if name and name.isprintable() else ""
    return shown + mask(acc.key.strip())


def _disabled_reason(text: str | None) -> str | None:
    """Why a key of our own export was disabled. A disabled key stays disabled: a hand-edited reason that
    can't be shown becomes a plain one."""
    if not text or not text.strip():
        return None
    try:
        return validate_reason(text)
    except KeyFormatError:
        return "disabled (imported)"


def load(path: Path, now: float) -> Imported:
    """Reads and converts the reference tool's store file; OpencodeError for anything wrong with it."""
    shown = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise OpencodeError(
            f"{shown} does not exist; pass the path of opencode-kimi-rotator's kimi-accounts.json "
            f"(default {DEFAULT_PATH})"
        ) from None
    except IsADirectoryError:
        raise OpencodeError(f"{shown} is a folder; pass the path of the kimi-accounts.json file") from None
    except OSError as e:
        raise OpencodeError(f"cannot read {shown}: {e.strerror}; check its permissions") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise OpencodeError(f"{shown} is not UTF-8 text; is it the right file?") from None
    except json.JSONDecodeError as e:
        raise OpencodeError(
            f"{shown} is not valid JSON (line {e.lineno}, column {e.colno}); "
            "repair it or restore it from a backup, then try again"
        ) from None
    try:
        return parse(data, now)
    except ValidationError as e:
        raise OpencodeError(
            f"{shown} does not look like an opencode-kimi-rotator store ({describe_validation_error(e)}); "
            "is it the right file?"
        ) from None
