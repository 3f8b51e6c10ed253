"""What the proxy says while it runs: one line per Kimi request, one per change of a key's state, and the
trail entry each attempt adds to its flow's comment.

Lines go to the `kimi_rotate` logger, so mitmproxy's termlog shows them under `kimi-rotate proxy`,
`mitmdump -s` and `mitmweb -s` alike, and `termlog_verbosity` (or `kimi-rotate proxy --quiet`) turns
them down. A key appears only as its name and masked form; a line holds no body and no message
text, only statuses and Kimi's error types (the trail of a job holds nothing else).

Request lines and routine changes (a key or an account starting to cool, a key back) are INFO; a key
disabled is a WARNING, because it stays out of the pool until someone acts.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from . import events
from .events import Event
from .keys import mask
from .models import KeyRecord, LearnedCap, OutcomeKind, Scope

if TYPE_CHECKING:  # the failover imports this module; the job and verdict are only read here
    from .classify import Verdict
    from .failover import Job

log = logging.getLogger("kimi_rotate")

MAX_NAMED_KEYS = 5  # keys named in one account line; the rest are counted


def describe(key: KeyRecord) -> str:
    """A key as every line and flow comment names it: its name and masked form, never more."""
    return f"{key.name} {mask(key.secret.get_secret_value())}"


def trail_entry(key: KeyRecord, status: int | str, verdict: Verdict, now: float) -> str:
    """One attempt as flow comments and request lines name it: `Account 2 sk-kimi-…c3d4: 429 …, cooling 30 s`."""
    o = verdict.outcome
    # The classifier's reason starts with the status ("429 rate_limit_reached_error").
    text = f"{describe(key)}: {o.reason or status}"
    if o.until is not None and o.kind not in (OutcomeKind.SUCCESS, OutcomeKind.SERVER_ERROR):
        scope = " account" if o.scope is Scope.ACCOUNT else ""
        text += f",{scope} cooling {wait(o.until - now)}"
    elif o.kind in (OutcomeKind.INVALID_KEY, OutcomeKind.ACCESS_DENIED):
        text += ", disabled"
    return text


def request_line(job: Job, status: int | str, seconds: float) -> str:
    """`kimi-code POST /coding/v1/messages Account 2 sk-kimi-…c3d4 200 412 ms`, with the attempts in brackets
    when the request failed over. The query is left out: it is the client's, and may carry anything."""
    path = job.path.split("?", 1)[0]
    if not path.isprintable():  # a terminal must not get control characters from a client
        path = path.encode("unicode_escape").decode("ascii")
    key = describe(job.key) if job.key is not None else "no key"
    line = f"{job.surface.value} {job.method} {path} {key} {status} {duration(seconds)}"
    if len(job.trail) > 1:
        line += f" ({' → '.join(job.trail)})"
    if job.queued:
        line += f" (queued {job.queued:.3f} s)"
    return line


def duration(seconds: float) -> str:
    return f"{max(0, round(seconds * 1000))} ms" if seconds < 10 else f"{seconds:.1f} s"


def changes(before: Sequence[KeyRecord | None], after: Sequence[KeyRecord], now: float,
            sink: list[Event] | None = None) -> list[tuple[int, str]]:
    """(level, line) for each change of state from `before[i]` to `after[i]` (one key's record then and now;
    None: the key is new, which is no change of state). Keys of one account that start cooling together,
    as an account-scope limit makes them, share one line. With `sink`, the same changes are added to it
    as event-log events, one per key."""
    cooling: dict[tuple[str | None, float, str], list[KeyRecord]] = {}
    back: list[KeyRecord] = []
    out: list[tuple[int, str]] = []
    for old, new in zip(before, after, strict=True):
        if old is None or (old.cooldown_until == new.cooldown_until and old.disabled_reason == new.disabled_reason
                           and old.account == new.account):
            continue  # the common case (a success) costs these two comparisons
        if old.account is None and new.account is not None:
            out.append((logging.INFO, f"key {describe(new)} is in account {new.account}, as Kimi named it"))
            if sink is not None:
                sink.append(events.make("account_learned", now, new))
        was_out, is_out = old.disabled_reason is not None, new.disabled_reason is not None
        if is_out and not was_out:
            out.append((logging.WARNING, disabled_line(new)))
            if sink is not None:
                sink.append(events.make("key_disabled", now, new, reason=new.disabled_reason))
        elif is_out:
            continue
        elif _cooling(new, now) and (was_out or not _cooling(old, now)):
            assert new.cooldown_until is not None
            cooling.setdefault((new.account, new.cooldown_until, new.cooldown_reason or ""), []).append(new)
            if sink is not None:
                sink.append(events.make("cooldown_started", now, new, reason=new.cooldown_reason,
                                        until=new.cooldown_until))
        elif not _cooling(new, now) and (was_out or _cooling(old, now)):
            back.append(new)
            if sink is not None:
                sink.append(events.make("key_enabled" if was_out else "cooldown_ended", now, new))
    for (account, until, reason), keys in cooling.items():
        out.append((logging.INFO, cooling_line(keys, account, until, reason, now)))
    out += [(logging.INFO, line) for line in back_lines(back)]
    return out


def cap_line(key: KeyRecord, cap: LearnedCap) -> str:
    """`account team-1 cap learned: rpm 200 (message)`, the account named as the cooling lines name it."""
    account = key.account or f"of key {describe(key)}"
    return f"account {account} cap learned: {cap.limit.value} {cap.value} ({cap.source.value})"


def _cooling(key: KeyRecord, now: float) -> bool:
    return key.cooldown_until is not None and key.cooldown_until > now


def cooling_line(keys: Sequence[KeyRecord], account: str | None, until: float, reason: str, now: float) -> str:
    when = f"cooling until {clock(until, now)} ({wait(until - now)})" + (f": {reason}" if reason else "")
    if len(keys) == 1 or account is None:
        return "; ".join(f"key {describe(k)} {when}" for k in keys)
    return f"account {account} {when}; keys {_names(keys)}"


def disabled_line(key: KeyRecord) -> str:
    return (f"key {describe(key)} disabled: {key.disabled_reason}; once it works again, "
            f"`kimi-rotate enable {shlex.quote(key.name)}` puts it back")


def back_lines(keys: Iterable[KeyRecord]) -> list[str]:
    """`key … back` for each key whose cooldown is over, one line per account when several of it are."""
    by_account: dict[str | None, list[KeyRecord]] = {}
    for k in keys:
        by_account.setdefault(k.account, []).append(k)
    lines = []
    for account, group in by_account.items():
        if account is None or len(group) == 1:
            lines += [f"key {describe(k)} back" for k in group]
        else:
            lines.append(f"account {account} back; keys {_names(group)}")
    return lines


def _names(keys: Sequence[KeyRecord]) -> str:
    named = ", ".join(describe(k) for k in keys[:MAX_NAMED_KEYS])
    more = len(keys) - MAX_NAMED_KEYS
    return named + (f" and {more} more" if more > 0 else "")


def clock(at: float, now: float) -> str:
    """Local wall-clock time; with the date when it is not within the next day."""
    fmt = "%H:%M:%S" if at - now < 20 * 3600 else "%Y-%m-%d %H:%M"
    return time.strftime(fmt, time.localtime(at))


def wait(seconds: float) -> str:
    if seconds < 120:
        return f"{max(0, round(seconds))} s"
    if seconds < 7200:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h".replace(".0 h", " h")


def emit(lines: Iterable[tuple[int, str]]) -> None:
    for level, line in lines:
        log.log(level, line)
