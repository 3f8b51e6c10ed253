"""Typed records shared by the engine, the store, the addon and the CLI.

Times are epoch seconds (float) everywhere; nothing here reads the clock. Frozen dataclasses, not
pydantic models: every CLI command loads them, and building pydantic validators cost more than a
command's whole work (the store converts its rows itself; `dataclasses.replace` makes changed copies).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum


class Surface(StrEnum):
    """Which Kimi platform a key belongs to. Keys never work across surfaces."""

    MOONSHOT_CN = "moonshot-cn"
    MOONSHOT_AI = "moonshot-ai"
    KIMI_CODE = "kimi-code"


class Strategy(StrEnum):
    HEALTH_BASED = "health-based"
    ROUND_ROBIN = "round-robin"
    STICKY = "sticky"


class KeyState(StrEnum):
    ACTIVE = "active"
    COOLING = "cooling"
    DISABLED = "disabled"


class Scope(StrEnum):
    """Who a failure belongs to (see the error taxonomy in the README)."""

    KEY = "key"
    ACCOUNT = "account"
    REQUEST = "request"
    CLIENT = "client"
    SERVER = "server"


class OutcomeKind(StrEnum):
    SUCCESS = "success"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXHAUSTED = "quota_exhausted"
    BILLING_LIMITED = "billing_limited"
    MEMBERSHIP = "membership"
    INVALID_KEY = "invalid_key"
    ACCESS_DENIED = "access_denied"
    REQUEST_ERROR = "request_error"
    CLIENT_REJECTED = "client_rejected"
    SERVER_ERROR = "server_error"


@dataclass(frozen=True, slots=True)
class Secret:
    """A key that no repr, str or log line shows; `get_secret_value()` is the one way to read it."""

    _value: str

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What one upstream attempt with one key came to.

    `until` is the cooldown deadline for the cooling kinds; `scope` says whether the
    cooldown or the disabling covers only this key or every key of its account.
    """

    kind: OutcomeKind
    scope: Scope = Scope.KEY
    until: float | None = None
    reason: str = ""
    latency_ms: float | None = None
    account_hint: str | None = None
    caps: tuple[LearnedCap, ...] = ()  # account limits the answer stated (a 429's "max RPM: 200", a tier header)


class Limit(StrEnum):
    """The per-account caps Kimi enforces (every key of an account shares them)."""

    RPM = "rpm"  # requests admitted in any 60 s
    CONCURRENCY = "concurrency"  # requests in flight at once (an open stream counts until its end)
    TPM = "tpm"  # tokens a minute: learned and shown, not enforced (Kimi counts them at admission)
    TPD = "tpd"  # tokens a day: likewise


class CapSource(StrEnum):
    """How a cap was learned, weakest first: a stronger source replaces a weaker one, never the other way."""

    DEFAULT = "default"  # a documented default for the surface (Kimi Code's concurrency of 30)
    TIER = "tier"  # the tier in Msh-Gid, through Kimi's published tier table
    HEADER = "header"  # X-RateLimit-Limit
    MESSAGE = "message"  # the number in a 429's text ("max RPM: 200")

    @property
    def strength(self) -> int:
        return _CAP_SOURCE_ORDER.index(self)


_CAP_SOURCE_ORDER = (CapSource.DEFAULT, CapSource.TIER, CapSource.HEADER, CapSource.MESSAGE)


@dataclass(frozen=True, slots=True, kw_only=True)
class LearnedCap:
    limit: Limit
    value: int
    source: CapSource
    at: float = 0.0  # when it was learned (the classifier leaves 0: the pool stamps it)
    detail: str = ""  # words for views, e.g. "tier enterprise-tier-3"; never an account id


# An account as the caps see it: (surface, account label), or (surface, "key:<fingerprint>") for an unlabelled key.
Group = tuple[Surface, str]
UNLABELLED_PREFIX = "key:"


@dataclass(frozen=True, slots=True)
class QuotaWindow:
    """One quota window Kimi reported (a Kimi Code plan's 5-hour window or its weekly quota)."""

    name: str  # "5h", "weekly"...
    limit: float | None
    remaining: float
    reset_at: float | None  # epoch seconds


@dataclass(frozen=True, slots=True, kw_only=True)
class Quota:
    """What a zero-token probe last said about an account's money or plan."""

    checked_at: float
    balance: float | None = None  # Open Platform available balance (CNY on .cn, USD on .ai)
    windows: tuple[QuotaWindow, ...] = ()  # Kimi Code
    level: str | None = None  # Kimi Code membership level

    def exhausted_until(self) -> float | None:
        """When the earliest exhausted window resets (None: no window is exhausted, or its reset is unknown)."""
        ends = [w.reset_at for w in self.windows if w.remaining <= 0 and w.reset_at is not None]
        return min(ends, default=None)

    def expiring(self, now: float) -> float | None:
        """When the quota still left runs out by itself: the earliest reset among windows with quota left
        (None: unknown, or nothing expires)."""
        if any(w.remaining <= 0 for w in self.windows):
            return None
        ends = [w.reset_at for w in self.windows if w.reset_at is not None and w.reset_at > now]
        return min(ends, default=None)


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountRecord:
    """What the pool knows about one account: caps stated by the user, caps learned from Kimi, the last quota."""

    surface: Surface
    account: str
    stated: dict[Limit, int] = field(default_factory=dict)
    learned: dict[Limit, LearnedCap] = field(default_factory=dict)
    quota: Quota | None = None

    @property
    def group(self) -> Group:
        return (self.surface, self.account)

    def cap(self, limit: Limit) -> int | None:
        """The cap in force: a stated one wins over a learned one."""
        if limit in self.stated:
            return self.stated[limit]
        learned = self.learned.get(limit)
        return learned.value if learned is not None else None


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyRecord:
    """One pooled key and everything the engine and `stats` need about it."""

    id: int
    secret: Secret = field(repr=False)
    fingerprint: str
    name: str
    surface: Surface
    account: str | None = None
    added_at: float = 0.0
    last_used: float | None = None
    health: float = 100.0
    health_at: float = 0.0
    cooldown_until: float | None = None
    cooldown_reason: str | None = None
    disabled_reason: str | None = None
    total_requests: int = 0
    successful_requests: int = 0
    rate_limited_requests: int = 0
    failed_requests: int = 0
    latency_count: int = 0
    latency_sum_ms: float = 0.0
    latency_min_ms: float | None = None
    latency_max_ms: float | None = None

    def state_at(self, now: float) -> KeyState:
        if self.disabled_reason is not None:
            return KeyState.DISABLED
        if self.cooldown_until is not None and self.cooldown_until > now:
            return KeyState.COOLING
        return KeyState.ACTIVE

    @property
    def account_group(self) -> tuple[Surface, str] | None:
        """Keys sharing this group share rate limits (accounts never span surfaces)."""
        return (self.surface, self.account) if self.account else None

    @property
    def limit_group(self) -> Group:
        """The account whose caps this key counts against: a key with no account label is an account of its own."""
        return (self.surface, self.account) if self.account else (self.surface, UNLABELLED_PREFIX + self.fingerprint)


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolSettings:
    """Pool-wide settings.

    Each surface has its own current key (`current_by_surface`): a request for one platform must
    not move another platform's key. `active_key_id` is the key chosen last, or the one `use-key` /
    `rotate` picked; `serve_active_next` makes that key serve the next request of its surface.
    """

    strategy: Strategy = Strategy.HEALTH_BASED
    active_key_id: int | None = None
    serve_active_next: bool = False
    current_by_surface: dict[Surface, int] = field(default_factory=dict)
    # As in the reference tool: gates the manual `refresh-health`; here it also gates the
    # time-based recovery.
    auto_refresh_health: bool = True
    health_refresh_cooldown_minutes: int = 30

    def current_id(self, surface: Surface | None) -> int | None:
        if surface is None:
            return self.active_key_id
        return self.current_by_surface.get(surface, self.active_key_id)

    def is_current(self, key: KeyRecord) -> bool:
        return self.current_id(key.surface) == key.id

    def with_current(self, key: KeyRecord, serve_next: bool = False) -> PoolSettings:
        """These settings with `key` current for its surface (and, with serve_next, served next)."""
        by_surface = {**self.current_by_surface, key.surface: key.id}
        return replace(self, active_key_id=key.id, serve_active_next=serve_next, current_by_surface=by_surface)
