"""The `account` command: an account's keys, caps and quota, and the caps a user states (registered in cli.py).

The command takes the CLI's helpers (`_store`, `_now`, `_resolve`) from cli.py when it runs, not at import time:
cli.py imports this module to register the command.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Annotated, Any

import typer

from . import account_views, cli_events, events
from .account_views import AccountView
from .caps import MAX_CAP, state_caps
from .cli_help import _wrap
from .errors import UserError
from .models import Limit, Surface
from .store import KeyNotFound, Store
from .symbols import PLAIN, symbols


class AccountError(UserError):
    """A mistake the user can fix; cli.py prints it as `error: ...` with exit code 1."""


def echo_fitted(lines: Sequence[str]) -> None:
    """Prints `lines`, each broken between words to the terminal's width (not when the output is no terminal), a
    broken line's rest indented under its start."""
    width = shutil.get_terminal_size((0, 0)).columns or None
    for line in lines:
        if width is None or len(line) <= width:
            typer.echo(line)
            continue
        indent = " " * (len(line) - len(line.lstrip()))
        for part in _wrap(line.strip(), width, indent, indent + "   "):
            typer.echo(part)


def _cap_option(flag: str, what: str) -> Any:
    # No max= here: click would print the 13-digit bound in every option's help. _changes checks it.
    return typer.Option(flag, metavar="N", min=1, help=what, show_default=False)


def account(
    name: Annotated[
        str | None,
        typer.Argument(
            metavar="NAME",
            help="An account label as list-keys shows it, or a key's index or name (for that key's account: a key "
            "with no label is an account of its own). Leave it out to show every account.",
            show_default=False,
        ),
    ] = None,
    rpm: Annotated[int | None, _cap_option("--rpm", "State the requests a minute it allows (enforced).")] = None,
    concurrency: Annotated[
        int | None, _cap_option("--concurrency", "State the requests it allows in flight at once (enforced).")
    ] = None,
    tpm: Annotated[int | None, _cap_option("--tpm", "State the tokens a minute it allows (shown only).")] = None,
    tpd: Annotated[int | None, _cap_option("--tpd", "State the tokens a day it allows (shown only).")] = None,
    clear: Annotated[
        list[Limit] | None,
        typer.Option(
            "--clear", metavar="LIMIT",
            help="Drop a stated cap (rpm, concurrency, tpm or tpd; repeatable): the learned one applies again.",
            show_default=False,
        ),
    ] = None,
    clear_all: Annotated[bool, typer.Option("--clear-all", help="Drop every stated cap of the account.")] = False,
    surface: Annotated[
        Surface | None,
        typer.Option("--surface", metavar="SURFACE", help="The account's surface, for a label on several surfaces; "
                     "without NAME, show only that surface's accounts.", show_default=False),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array (stable field names).")] = False,
) -> None:
    """Show accounts' caps and quota, or state an account's caps. Keys of one account share Kimi's limits. A stated
    cap wins over one learned from Kimi's answers; a running proxy uses it from its next request. RPM and
    concurrency are enforced before sending; TPM and TPD are shown, not enforced."""
    from . import cli  # its helpers, now that it is loaded (it imports this module)

    changes = _changes({Limit.RPM: rpm, Limit.CONCURRENCY: concurrency, Limit.TPM: tpm, Limit.TPD: tpd},
                       clear or [], clear_all)
    if changes and name is None:
        raise typer.BadParameter("give the NAME of the account whose caps to state or clear")
    now = cli._now()
    with cli._store(readonly=not changes) as store:
        snap = store.snapshot()
        accounts = account_views.accounts_of(snap.keys, snap.accounts)
        if name is None:
            shown = [a for a in accounts if surface is None or a.surface is surface]
        else:
            shown = [_find(store, accounts, name, surface)]
        if changes:
            target = shown[0]
            stated_before = dict(target.record.stated) if target.record else {}
            after = store.update_account(target.group, lambda record: state_caps(record, target.group, changes))
            cli_events.note(store.home, "caps_stated", surface=target.surface.value,
                            account=events.account_ref(target.group[1]),
                            caps={limit.value: value for limit, value in changes.items()})
            shown = [replace(target, record=after)]
    if as_json:
        rows = [account_views.account_json(a, now) for a in shown]
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=symbols() is PLAIN))
        return
    if not snap.keys:
        typer.echo("No keys configured.\nAdd one with: kimi-rotate add-key")
        return
    if not shown:
        typer.echo(f"No {surface.value if surface else ''} accounts (of {len(accounts)}).")
        return
    if changes:
        _report_changes(shown[0], changes, stated_before)
    for i, a in enumerate(shown):
        if i:
            typer.echo("")
        echo_fitted(account_views.account_lines(a, now))


def _changes(
    values: Mapping[Limit, int | None], clear: Sequence[Limit], clear_all: bool
) -> dict[Limit, int | None]:
    """What to state (a number) and to clear (None). A number too large to be a cap, and stating and clearing one
    limit at once, are usage errors."""
    both = [limit.value for limit in clear if values.get(limit) is not None]
    if both:
        raise typer.BadParameter(f"--{both[0]} states a cap that --clear {both[0]} drops; give one of the two")
    for limit, value in values.items():
        if value is not None and value > MAX_CAP:
            raise typer.BadParameter(f"--{limit.value} must be a whole number from 1 to {MAX_CAP:,}, not '{value}'")
    changes: dict[Limit, int | None] = {limit: None for limit in (list(Limit) if clear_all else clear)}
    changes.update({limit: value for limit, value in values.items() if value is not None})
    return changes


def _find(store: Store, accounts: Sequence[AccountView], name: str, surface: Surface | None) -> AccountView:
    """The account NAME means: an account label (on `surface`, if given), else the account of the key with that
    index or name."""
    from .cli import _resolve

    found = account_views.named(accounts, name.strip())
    if found:
        matching = [a for a in found if surface is None or a.surface is surface]
        on = [a.surface.value for a in found]
        if not matching:
            raise AccountError(f"account {name.strip()!r} has no keys on {surface}, only on {_either(on, 'and')}; "
                               f"drop --surface or choose {_either(on, 'or')}")
        if len(matching) > 1:
            raise AccountError(f"account {name.strip()!r} has keys on {_either(on, 'and')}, which are separate "
                               f"accounts; add {_either([f'--surface {s}' for s in on], 'or')}")
        return matching[0]
    try:
        index, key = _resolve(store, name)
    except KeyNotFound:
        if name.strip().isdigit():
            raise
        raise AccountError(f"no account or key named {name.strip()!r}; `kimi-rotate account` lists the accounts, "
                           "`kimi-rotate list-keys` the keys") from None
    if surface is not None and key.surface is not surface:
        raise AccountError(f"key [{index}] {key.name} is a {key.surface} key, not a {surface} one; "
                           "drop --surface or name another key")
    return next(a for a in accounts if a.group == key.limit_group)


def _either(words: Sequence[str], joint: str) -> str:
    return ", ".join(words[:-1]) + f" {joint} {words[-1]}" if len(words) > 1 else words[0]


def _report_changes(view: AccountView, changes: Mapping[Limit, int | None], stated_before: Mapping[Limit, int]) -> None:
    stated = [f"{limit.value} {value:,}" for limit, value in changes.items() if value is not None]
    cleared = [limit.value for limit, value in changes.items() if value is None and limit in stated_before]
    done = ([f"stated {', '.join(stated)}"] if stated else []) + ([f"cleared {', '.join(cleared)}"] if cleared else [])
    report = [f"{symbols().ok} {view.title()}: {'; '.join(done) or 'no stated cap to clear'}"]
    if done:
        report.append("  A running proxy uses the caps from its next request.")
    echo_fitted([*report, ""])
    if stated and not view.labelled:
        index = view.keys[0][0]
        typer.echo(f"note: key [{index}] has no account label, so these caps count for it alone; if it shares an "
                   f"account with other keys, label them all (`kimi-rotate set-account {index} LABEL`)", err=True)
