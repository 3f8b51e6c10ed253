"""The presentation module (kimi_rotator.views): the key-status table `list-keys` and `kimi.status` share, and the
figures `stats` prints as text and as JSON."""

from __future__ import annotations

from kimi_rotator import views
from kimi_rotator.keys import fingerprint
from kimi_rotator.models import KeyRecord, PoolSettings, Secret, Strategy, Surface
from kimi_rotator.roster import Roster
from kimi_rotator.symbols import PLAIN

NOW = 1_800_000_000.0
HOUR = 3600.0


def key(i: int, **changes: object) -> KeyRecord:
    secret = f"sk-kimi-{i:0>40}"
    fields: dict[str, object] = {
        "id": 100 + i, "secret": Secret(secret), "fingerprint": fingerprint(secret), "name": f"k{i}",
        "surface": Surface.KIMI_CODE, "health_at": NOW,
    }
    fields.update(changes)
    return KeyRecord(**fields)  # type: ignore[arg-type]


def pool() -> Roster:
    return Roster([
        key(0),
        key(1, health=50.0, health_at=NOW - 2 * HOUR, cooldown_until=NOW + 300, cooldown_reason="429 rate_limit"),
        key(2, disabled_reason="401 invalid_authentication_error", account="acme"),
    ])


def test_kimi_status_and_list_keys_show_the_same_states() -> None:
    roster = pool()
    settings = PoolSettings(active_key_id=100, current_by_surface={Surface.KIMI_CODE: 100})
    until = views.clock(NOW + 300, NOW)
    lines = views.status_text(roster, settings, NOW).splitlines()
    assert lines == [
        "strategy: health-based",
        "● [0] k0 sk-kimi-…0000 kimi-code health 100 active",
        f"○ [1] k1 sk-kimi-…0001 kimi-code health 70 cooling until {until} (~5m): 429 rate_limit",
        "○ [2] k2 sk-kimi-…0002 kimi-code health 100 disabled: 401 invalid_authentication_error",
    ]
    table = views.status_table(views.key_statuses(roster, settings, NOW), None, NOW, PLAIN)
    assert [line.split("  ")[-1] for line in table[1:]] == [
        "active", f"cooling until {until} (~5m): 429 rate_limit", "disabled: 401 invalid_authentication_error",
    ]
    assert table[1].split() == ["*", "0", "k0", "sk-kimi-...0000", "kimi-code", "-", "100%", "0/0", "active"]
    assert "acme" in table[3]


def test_health_recovers_in_the_table_only_when_the_pool_recovers_it() -> None:
    roster = pool()
    off = PoolSettings(strategy=Strategy.ROUND_ROBIN, auto_refresh_health=False)
    lines = views.status_text(roster, off, NOW).splitlines()
    assert lines[0] == "strategy: round-robin"
    assert " health 50 cooling " in lines[2]
    (status,) = [s for s in views.key_statuses(roster, off, NOW) if s.index == 1]
    assert (status.health, status.current) == (50.0, False)


def test_usage_stats_per_key_and_over_the_pool() -> None:
    keys = [
        key(0, total_requests=5, successful_requests=3, rate_limited_requests=1, failed_requests=1,
            latency_count=3, latency_sum_ms=653.0, latency_min_ms=198.4, latency_max_ms=245.5),
        key(1, total_requests=1, successful_requests=1, latency_count=1, latency_sum_ms=100.0,
            latency_min_ms=100.0, latency_max_ms=100.0),
        key(2),
    ]
    daily = {100: {"2027-01-15": (2, 2), "2027-01-13": (2, 1)}, 101: {"2027-01-09": (1, 1)}}
    usage = views.usage_stats(keys, daily, "2027-01-15")
    first, second, unused = usage.keys
    assert first == views.Usage(5, 3, 1, 1, 60.0, 218, 198, 246, 2, 4)
    assert (second.requests_today, second.requests_last_7_days) == (0, 1)
    assert unused == views.Usage(0, 0, 0, 0, None, None, None, None, 0, 0)
    assert usage.total == views.Usage(6, 4, 1, 1, 66.7, 188, 100, 246, 2, 5)
    doc = views.stats_json(keys, daily, "2027-01-15", "2027-01-09")
    assert doc["total"] == {"keys": 3, **vars_of(usage.total)}
    assert [row["success_rate"] for row in doc["keys"]] == [60.0, 100.0, None]


def vars_of(u: views.Usage) -> dict[str, object]:
    return {name: getattr(u, name) for name in views.Usage.__dataclass_fields__}
