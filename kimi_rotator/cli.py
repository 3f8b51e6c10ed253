"""The `kimi-rotate` command line: a thin face over the store, the backups and the importer.

Each command parses its arguments, calls the store (whose methods are transactions, so a failed
command changes nothing) and prints. Problems the user can fix are raised as exceptions and turned
into one `error: <what happened>; <what to do>` line and exit code 1 in a single place
(`_Group`); usage errors become one such line too, with exit code 2. No command prints a key: only masked
forms (`keys.mask`) and fingerprints.

Every command loads this module, so it imports only what most commands need: the backups
(cryptography), the importer and the setup commands' libraries load inside the commands that use
them (benchmarks/bench_cli.py measures the start-up).
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import getpass
import json
import math
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup

from . import (
    account_views,
    caps,
    cli_accounts,
    cli_check,
    cli_events,
    cli_plot,
    cli_setup,
    cli_status,
    cli_store,
    engine,
    views,
)
from .cli_help import HelpLayout, NoArgsIsHelp, UsageError, usage_message
from .errors import UserError
from .keys import (
    KeyFormatError,
    PastedHeader,
    SurfaceMismatch,
    default_surface,
    mask,
    validate_account,
    validate_key,
    validate_name,
    validate_reason,
)
from .models import AccountRecord, KeyRecord, KeyState, Strategy, Surface
from .roster import Roster
from .store import STORE_ENV, DuplicateKey, KeyNotFound, NewKey, Store, StoreError, open_store, utc_day
from .symbols import PLAIN, symbols

if TYPE_CHECKING:
    from . import opencode


class CliError(UserError):
    """A mistake the user can fix; the message reads `<what happened>; <what to do>`."""

KIMI_CODE_WARNING = (
    "warning: Kimi Code membership is for personal use only. Rotating several membership accounts "
    "behind one proxy is the pattern Kimi's risk control looks for and can get every account involved "
    "terminated (access_terminated_error). Pay-as-you-go Open Platform keys are the safe choice for pooling."
)


# Click's base exception (usage errors): typer >= 0.2x vendors click, older typer uses the package.
_CLICK_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _Command(HelpLayout, TyperCommand):
    pass


class _Group(HelpLayout, TyperGroup):
    """Turns the user errors of any command (including ones added later) into `error: ...`, exit 1, and usage
    errors into `error: ...`, exit 2."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        try:  # the group's own options (`kimi-rotate --bogus`)
            return super().make_context(info_name, args, parent, **extra)
        except UsageError as e:
            _usage_fail(e)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None and not ctx.resilient_parsing:
            close = difflib.get_close_matches(name, self.list_commands(ctx), n=1)
            hint = f"did you mean `{ctx.command_path} {close[0]}`?" if close else f"see `{ctx.command_path} --help`"
            _fail(f"no command {name!r}; {hint}", code=2)
        return super().resolve_command(ctx, args)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as e:  # a command's arguments and options
            _usage_fail(e)
        except _CLICK_ERROR as e:
            # Usage errors quote what was typed; a key pasted into the wrong place must not be echoed.
            message = getattr(e, "message", None)
            if isinstance(message, str):
                e.message = scrub(message)  # type: ignore[attr-defined]
            raise
        except UserError as e:  # everything foreseeable: one line on stderr, exit code 1
            _fail(str(e))
        except OSError as e:
            if e.errno == errno.EPIPE:  # typer quiets a closed pipe (`kimi-rotate list-keys | head`)
                raise
            where = f" {e.filename}" if e.filename else ""
            _fail(f"cannot access{where}: {e.strerror or e}; check the path and its permissions")


_KEY_LIKE = re.compile(r"sk-[A-Za-z0-9_-]{6,}")


def scrub(text: str) -> str:
    """Masks anything in `text` that looks like a key."""
    return _KEY_LIKE.sub(lambda m: _masked(m.group()), text)


def _masked(secret: str) -> str:
    """A key as the CLI shows it: `keys.mask`, in characters the output can encode."""
    return mask(secret, symbols().ellipsis)


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {scrub(' '.join(message.split()))}", err=True)
    raise typer.Exit(code)


def _usage_fail(error: Exception) -> NoReturn:
    if NoArgsIsHelp is not None and isinstance(error, NoArgsIsHelp):
        raise error  # `kimi-rotate` alone prints the help
    _fail(usage_message(error), code=2)


_F = TypeVar("_F", bound=Callable[..., Any])


class _App(typer.Typer):
    """Every command gets the help layout, including commands added later."""

    def command(
        self, name: str | None = None, *, cls: type[TyperCommand] | None = None, **kwargs: Any
    ) -> Callable[[_F], _F]:
        return super().command(name, cls=cls or _Command, **kwargs)


app = _App(
    cls=_Group,
    name="kimi-rotate",
    help="Pool Kimi / Moonshot API keys behind one local HTTPS proxy. Keys live in a local store "
    "(folder: $KIMI_ROTATE_HOME, else your user data folder).",
    no_args_is_help=True,
    # Plain help and errors: rich's panels cost 150 ms to import and break lines mid-word in narrow terminals.
    rich_markup_mode=None,
    # A traceback with locals could print a key; genuine bugs still get a plain traceback.
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(wanted: bool) -> None:
    if not wanted:
        return
    from . import __version__  # also the package's version (pyproject.toml reads it)

    typer.echo(f"kimi-rotate {__version__}")
    raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    store: Annotated[
        str | None,
        typer.Option("--store", metavar="URL", show_default=False,
                     help=f"The pool's store: a redis:// (rediss://) URL shared by several proxies (default: "
                          f"${STORE_ENV}, else the local file)."),
    ] = None,
) -> None:
    STORE_CHOICE[0] = store  # set on every run: in-process runs (tests) must not inherit an earlier run's --store


STORE_CHOICE: list[str | None] = [None]  # --store, for every command of this run


# -- helpers ------------------------------------------------------------------------------------


def _now() -> float:
    return time.time()


@contextlib.contextmanager
def _store(readonly: bool = False) -> Iterator[Store]:
    """The store; commands that only read ask for it `readonly`, so they work on a store that cannot be written."""
    store = open_store(STORE_CHOICE[0], readonly=readonly)
    try:
        yield store
    finally:
        store.close()


def _index(keys: list[KeyRecord], key_id: int) -> int:
    for i, k in enumerate(keys):
        if k.id == key_id:
            return i
    raise CliError("another kimi-rotate removed that key meanwhile; see `kimi-rotate list-keys`")


def _resolve(store: Store, ref: str) -> tuple[int, KeyRecord]:
    """A key by list index or name, with its index. Never echoes a key typed by mistake."""
    try:
        key = store.resolve(ref)
    except KeyNotFound:
        if _KEY_LIKE.search(ref):
            raise CliError(
                "refer to a key by its index or name, not by the key itself; see `kimi-rotate list-keys`"
            ) from None
        raise
    return _index(store.keys(), key.id), key


def _stdin_is_tty() -> bool:
    stdin = sys.stdin
    return stdin is not None and not stdin.closed and stdin.isatty()


def _read_stdin_line(what: str) -> str:
    line = sys.stdin.readline() if sys.stdin is not None and not sys.stdin.closed else ""
    if not line:
        raise CliError(f"no {what} on stdin; pipe it as one line, or run in a terminal to be prompted")
    return line.rstrip("\r\n")


def _read_passphrase(prompt: str) -> str:
    """Hidden when typed; one line of stdin when piped (scripts, tests)."""
    if _stdin_is_tty():
        return getpass.getpass(prompt)
    return _read_stdin_line("passphrase")


def _new_passphrase() -> str:
    from . import backup

    first = _read_passphrase("Backup passphrase: ")
    backup.check_passphrase(first)
    if _read_passphrase("Repeat the passphrase: ") != first:
        raise CliError("the passphrases do not match; run the command again")
    return first


def _clean_account(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        return validate_account(text)
    except KeyFormatError as e:
        raise CliError(f"{e}; choose another one") from None


def health_bar(health: float) -> str:
    filled = max(0, min(10, math.floor(health / 10 + 0.5)))
    return symbols().full * filled + symbols().empty * (10 - filled)


def _warn_kimi_code(surfaces: list[Surface]) -> None:
    if Surface.KIMI_CODE in surfaces:
        typer.echo(KIMI_CODE_WARNING, err=True)


def _complete_key_name(incomplete: str) -> list[str]:
    """Tab completion of key names. Never creates a store, and stays silent on any problem."""
    import os

    from .store import store_home
    from .store_sqlite import STORE_FILE

    if not (STORE_CHOICE[0] or os.environ.get(STORE_ENV)) and not (store_home() / STORE_FILE).is_file():
        return []
    try:
        with _store() as store:
            keys = store.keys()
    except (StoreError, OSError):
        return []
    return [k.name for k in keys if k.name.startswith(incomplete)]


# A key on the command line: its index in `list-keys` or its name.
KeyRef = Annotated[
    str, typer.Argument(metavar="INDEX|NAME", help="Index or name (see list-keys).", autocompletion=_complete_key_name)
]


# -- keys ---------------------------------------------------------------------------------------


@app.command("add-key")
def add_key(
    key: Annotated[
        str | None,
        typer.Argument(
            metavar="KEY",
            help="The API key. Leave it out (or write -) to be prompted without echo, or pipe it on stdin, "
            "so it stays out of your shell history.",
            show_default=False,
        ),
    ] = None,
    name: Annotated[str | None, typer.Argument(metavar="NAME", help="A name for the key (default: Account N).")] = None,
    surface: Annotated[
        Surface | None,
        typer.Option(
            metavar="SURFACE",
            help="Where the key works: moonshot-cn, moonshot-ai or kimi-code. Default: kimi-code for sk-kimi- "
            "keys, else moonshot-cn.",
        ),
    ] = None,
    account: Annotated[
        str | None, typer.Option(metavar="ACCOUNT", help="Account label: keys of one account share rate limits.")
    ] = None,
) -> None:
    """Add an API key to the pool."""
    from_argument = key not in (None, "-")
    if key is None or key == "-":
        if _stdin_is_tty():
            key = getpass.getpass("API key (input hidden): ")
        else:
            key = sys.stdin.read() if sys.stdin is not None and not sys.stdin.closed else ""
            if not key.strip():
                raise CliError("no key on stdin; pipe the key, pass it as an argument, or run in a terminal")
    chosen = surface or default_surface(key.strip())
    try:
        secret = validate_key(key, chosen)
    except (SurfaceMismatch, PastedHeader) as e:  # the message says what to do
        raise CliError(f"invalid key: {e}") from None
    except KeyFormatError as e:
        hint = "check that you copied the whole key"
        if from_argument and not key.strip().startswith("sk-") and name is None:
            hint = "to pipe the key and name it, run `kimi-rotate add-key - NAME`"
        raise CliError(f"invalid key: {e}; {hint}") from None
    try:
        clean_name = validate_name(name) if name is not None else None
    except KeyFormatError as e:
        raise CliError(f"invalid name: {e}; choose another name") from None
    label = _clean_account(account)

    with _store() as store:  # refuses a key or a name already in the pool (DuplicateKey)
        record = store.add_key(NewKey(secret=secret, name=clean_name, surface=chosen, account=label), _now())
        index = _index(store.keys(), record.id)
    typer.echo(f"{symbols().ok} Added key: {record.name} ({_masked(secret)}, {chosen.value})")
    typer.echo(f"  Index: {index}")
    _warn_kimi_code([chosen])


@app.command("add-keys")
def add_keys(
    source: Annotated[
        str,
        typer.Argument(
            metavar="[FILE|-]",
            help="A file with one `KEY [NAME]` a line (blank lines and # comments are skipped). "
            "Leave it out (or write -) to read the lines from stdin.",
            show_default=False,
        ),
    ] = "-",
    surface: Annotated[
        Surface | None,
        typer.Option(
            metavar="SURFACE",
            help="Where the keys work. Default, per key: kimi-code for sk-kimi- keys, else moonshot-cn.",
        ),
    ] = None,
    account: Annotated[
        str | None, typer.Option(metavar="ACCOUNT", help="Account label for every key of the file.")
    ] = None,
) -> None:
    """Add several keys at once. Every line is checked first: if any is bad, nothing is added."""
    from . import bulk

    label = _clean_account(account)
    if source == "-" and _stdin_is_tty():
        raise CliError("add-keys reads a file or a pipe, not the terminal (the keys would show on screen); "
                       "pass FILE, or pipe the lines: kimi-rotate add-keys - < keys.txt")
    try:
        text = bulk.read_stdin(sys.stdin) if source == "-" else bulk.read_file(Path(source).expanduser())
    except bulk.BulkError as e:
        raise CliError(str(e)) from None
    lines, errors = bulk.parse(text, surface, label)
    if not lines and not errors:
        where = "stdin" if source == "-" else source
        raise CliError(f"no keys in {where}; write one `KEY [NAME]` a line")
    new = [line.key for line in lines]
    added: list[KeyRecord] = []
    index: dict[int, int] = {}
    on_line = bulk.on_lines(lines)
    with _store() as store:  # the store refuses a key or a name that is in the pool or twice in the file
        if errors:  # report those clashes too, so one run shows every problem
            errors += bulk.line_errors(lines, store.conflicts(new, on_line))
        else:
            try:
                added, _ = store.add_keys(new, _now(), refuse_duplicates=True, where=on_line)
                index = {k.id: i for i, k in enumerate(store.keys())}
            except DuplicateKey as e:
                errors = bulk.line_errors(lines, e.conflicts)
    if errors:
        for err in sorted(errors, key=lambda e: e.number):
            typer.echo(scrub(f"line {err.number}: {err.problem}"), err=True)
        bad = {err.number for err in errors}
        total = len(bad | {line.number for line in lines})
        raise CliError(f"{len(bad)} of {total} key line(s) have problems (listed above), so nothing was added; "
                       "fix those lines and run the command again")
    typer.echo(f"{symbols().ok} Added {len(added)} key(s):")
    for k in added:
        typer.echo(f"  [{index[k.id]}] {k.name} ({_masked(k.secret.get_secret_value())}, {k.surface.value})")
    if source != "-":
        typer.echo(f"\nThe file {source} holds these keys in plain text; delete it once you no longer need it.")
    _warn_kimi_code([k.surface for k in added])


def key_json(s: views.KeyStatus, now: float, account: AccountRecord | None = None) -> dict[str, Any]:
    """One element of `list-keys --json`. Scripts rely on these names and types: only ever add fields.

    index (int, as the other commands take it), name, masked_key (prefix + last 4), fingerprint
    (10 hex chars), surface, account (str|null), current (bool: the key list-keys marks), health
    (int 0-100, time recovery included), state ("active"|"cooling"|"disabled"), reason (str|null:
    why cooling or disabled), cooldown_until (epoch s|null, set while cooling), total_requests =
    successful_requests + rate_limited_requests + failed_requests (ints), last_used and added_at
    (epoch s|null); caps and quota of the key's account (`account`, the record of its limit_group), as
    account_views.caps_json and quota_json give them.
    """
    k = s.key
    cooling = k.cooldown_until is not None and k.cooldown_until > now
    return {
        **views.key_identity(s.index, k),
        "account": k.account,
        "current": s.current,
        "health": views.pct(s.health),
        "state": s.state.value,
        "reason": s.reason,
        "cooldown_until": k.cooldown_until if cooling else None,
        "total_requests": k.total_requests,
        "successful_requests": k.successful_requests,
        "rate_limited_requests": k.rate_limited_requests,
        "failed_requests": k.failed_requests,
        "last_used": k.last_used,
        "added_at": k.added_at,
        "caps": account_views.caps_json(account, now),
        "quota": account_views.quota_json(account.quota if account else None),
    }


# Above this many keys list-keys prints one line per key instead of a block (--compact / --long choose).
COMPACT_ABOVE = 10


@app.command("list-keys")
def list_keys(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array (stable field names).")] = False,
    compact: Annotated[
        bool | None,
        typer.Option(
            "--compact/--long",
            help=f"One line per key, or a block per key. Default: one line per key above {COMPACT_ABOVE} keys.",
            show_default=False,
        ),
    ] = None,
    only_state: Annotated[
        KeyState | None,
        typer.Option("--state", metavar="STATE", help="Only keys in this state: active, cooling or disabled."),
    ] = None,
    only_surface: Annotated[
        Surface | None,
        typer.Option(
            "--surface", metavar="SURFACE", help="Only keys of this surface: moonshot-cn, moonshot-ai or kimi-code."
        ),
    ] = None,
) -> None:
    """List the keys: index, name, masked key, health, requests and state; ● marks the key in use."""
    now = _now()
    with _store(readonly=True) as store:
        snap = store.snapshot()
    statuses = views.key_statuses(Roster(snap.keys), snap.settings, now)
    shown = [
        s for s in statuses
        if (only_state is None or s.state is only_state) and (only_surface is None or s.key.surface is only_surface)
    ]
    if as_json:
        rows = [key_json(s, now, caps.with_defaults(snap.accounts.get(s.key.limit_group), s.key.limit_group))
                for s in shown]
        # \u escapes where the output cannot encode a character: the same JSON to any parser.
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=symbols() is PLAIN))
        return
    if not snap.keys:
        typer.echo("No keys configured.\nAdd one with: kimi-rotate add-key")
        return
    strategy = snap.settings.strategy.value
    if only_state is None and only_surface is None:
        typer.echo(f"\nKimi API Keys ({len(snap.keys)} total, strategy: {strategy}):\n")
    else:
        which = " ".join(f.value for f in (only_state, only_surface) if f is not None)
        if not shown:
            typer.echo(f"No {which} keys (of {len(snap.keys)}).")
            return
        typer.echo(f"\nKimi API Keys ({len(shown)} {which} of {len(snap.keys)}, strategy: {strategy}):\n")
    sym = symbols()
    if compact or (compact is None and len(shown) > COMPACT_ABOVE):
        width = shutil.get_terminal_size((0, 0)).columns or None  # not a terminal: lines are not cut
        for line in views.status_table(shown, width, now, sym):
            typer.echo(line)
        if any(account_views.is_known(snap.accounts.get(s.key.limit_group)) for s in shown):  # too long for a column
            typer.echo("\nCaps and quota: kimi-rotate account")
        return
    for s in shown:
        k = s.key
        if s.state is KeyState.DISABLED:
            status = f"{sym.failed} Disabled ({s.reason})"
        elif s.state is KeyState.COOLING and k.cooldown_until is not None:
            status = (f"{sym.cooling} Cooling ({s.reason or 'cooldown'}, {views.time_left(k.cooldown_until - now)} "
                      f"left) until {views.clock(k.cooldown_until, now)}")
        else:
            status = f"{sym.ok} Active"
        where = k.surface.value + (f", account: {k.account}" if k.account else "")
        typer.echo(f"{sym.current if s.current else sym.other} [{s.index}] {k.name}")
        typer.echo(f"   Key: {_masked(k.secret.get_secret_value())}  (fingerprint {k.fingerprint})")
        typer.echo(f"   Surface: {where}")
        typer.echo(f"   Health: {health_bar(s.health)} {views.pct(s.health)}%")
        typer.echo(f"   Requests: {k.successful_requests}/{k.total_requests} successful")
        record = caps.with_defaults(snap.accounts.get(k.limit_group), k.limit_group)
        if (in_force := account_views.caps_short(record)) is not None:
            cli_accounts.echo_fitted([f"   Caps: {in_force}"])
        if record is not None and (quota := account_views.quota_short(record.quota, now)) is not None:
            cli_accounts.echo_fitted([f"   Quota: {quota}"])
        typer.echo(f"   Status: {status}\n")


@app.command("remove-key")
def remove_key(
    ref: KeyRef,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask first (for the current key or a surface's last key).")
    ] = False,
) -> None:
    """Remove a key from the pool. Asks first if it is the key in use or the last key of its surface."""
    with _store() as store:
        index, key = _resolve(store, ref)
        if not yes and not _removal_confirmed(store, index, key):
            typer.echo("Nothing was removed.")
            return
        store.remove_key(key.id)
    typer.echo(f"{symbols().ok} Removed key [{index}] {key.name} ({_masked(key.secret.get_secret_value())})")


def _removal_confirmed(store: Store, index: int, key: KeyRecord) -> bool:
    """True when removing `key` needs no question or the user said yes; CliError when it can't be asked."""
    snap = store.snapshot()
    surface = key.surface.value
    shown = f"{key.name} ({_masked(key.secret.get_secret_value())})"
    if sum(k.surface is key.surface for k in snap.keys) == 1:
        what = f"the last {surface} key"
        question = (f"Remove {shown}, the last {surface} key? Requests for {surface} will then pass "
                    "through without a pooled key. [y/N] ")
    elif key.id in views.current_ids(Roster(snap.keys), snap.settings, _now()):
        what = f"the current {surface} key"
        question = f"Remove the current key {shown}? [y/N] "
    else:
        return True
    if not _stdin_is_tty():
        raise CliError(f"[{index}] {key.name} is {what}; pass --yes to remove it anyway")
    typer.echo(question, nl=False, err=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


@app.command("rename")
def rename(
    ref: KeyRef,
    new_name: Annotated[str, typer.Argument(metavar="NEW_NAME", help="The new name.", show_default=False)],
) -> None:
    """Give a key another name; its counters and state stay."""
    try:
        clean_name = validate_name(new_name)
    except KeyFormatError as e:
        raise CliError(f"invalid name: {e}; choose another name") from None
    with _store() as store:
        index, key = _resolve(store, ref)
        before, after = store.rename_key(key.id, clean_name)
    typer.echo(f"{symbols().ok} Renamed key [{index}]: {before.name} {symbols().arrow} {after.name}")


@app.command("set-account")
def set_account(
    ref: KeyRef,
    account: Annotated[
        str | None,
        typer.Argument(metavar="[ACCOUNT]", help="The account label: keys of one account share rate limits."),
    ] = None,
    none: Annotated[bool, typer.Option("--none", help="Take the key out of its account.")] = False,
) -> None:
    """Put a key in an account (or, with --none, in none); its counters and state stay."""
    if (account is None) != none:
        raise typer.BadParameter("give an ACCOUNT, or --none to take the key out of its account")
    label = _clean_account(account)
    with _store() as store:
        index, key = _resolve(store, ref)
        before, after = store.set_account(key.id, label)
    typer.echo(f"{symbols().ok} Key [{index}] {key.name}: account {after.account or 'none'} "
               f"(was: {before.account or 'none'})")


app.command("account")(cli_accounts.account)
app.command("events")(cli_events.events_command)


@app.command("enable")
def enable(ref: KeyRef) -> None:
    """Enable a disabled key again (this also ends its cooldown)."""
    with _store() as store:
        index, key = _resolve(store, ref)
        store.set_disabled(key.id, None)
        cli_events.note(store.home, "key_enabled", key, by="cli")
    note = "" if key.disabled_reason else " (it was not disabled)"
    typer.echo(f"{symbols().ok} Enabled key: {key.name} (index {index}){note}")


@app.command("disable")
def disable(
    ref: KeyRef,
    reason: Annotated[str, typer.Option(metavar="TEXT", help="Why, shown by list-keys.")] = "disabled by hand",
) -> None:
    """Take a key out of rotation until `enable`."""
    try:
        cleaned = validate_reason(reason)
    except KeyFormatError as e:
        raise CliError(f"{e}; shorten or fix it") from None
    with _store() as store:
        index, key = _resolve(store, ref)
        store.set_disabled(key.id, cleaned)
        cli_events.note(store.home, "key_disabled", key, reason=cleaned, by="cli")
    typer.echo(f"{symbols().ok} Disabled key: {key.name} (index {index}): {cleaned}")


# -- rotation -----------------------------------------------------------------------------------


@app.command("rotate")
def rotate() -> None:
    """Switch to another eligible key now (under every strategy)."""
    now = _now()
    with _store() as store:
        result = store.rotate(now)
        snap = store.snapshot()
        if not isinstance(result, engine.NoEligibleKey):
            cli_events.note(store.home, "rotate", result.key, reason=result.reason)
    keys = snap.keys
    if isinstance(result, engine.NoEligibleKey):
        if result.total == 0:
            raise CliError("no keys configured; add one with `kimi-rotate add-key`")
        # rotate stays on the platform of the key in use, so name it: a key of another platform is no way out.
        active = next((k for k in keys if k.id == snap.settings.active_key_id), None)
        platform = f"{active.surface.value} " if active is not None else ""
        detail = f"{result.total} {platform}key(s): {result.cooling} cooling, {result.disabled} disabled"
        todo = f"add or enable another {platform}key"
        if result.next_free_at is not None:
            detail += f"; the first frees up in {views.time_left(result.next_free_at - now)}"
            todo = f"wait for it, or {todo}"
        raise CliError(f"no other {platform}key can serve now ({detail}); {todo}")
    typer.echo(f"{symbols().ok} Rotated to the next key")
    typer.echo(f"  Now using: {result.key.name} (index {_index(keys, result.key.id)})")
    typer.echo(f"  Reason: {result.reason}")


@app.command("use-key")
def use_key(ref: KeyRef) -> None:
    """Make a key the current one: it serves the next request."""
    now = _now()
    with _store() as store:
        index, key = _resolve(store, ref)
        store.use_key(key.id)
        cli_events.note(store.home, "use_key", key)
    typer.echo(f"{symbols().ok} Now using: {key.name} (index {index})")
    state = key.state_at(now)
    if state is KeyState.DISABLED:
        typer.echo(f"note: this key is disabled ({key.disabled_reason}); requests go to other keys until "
                   f"`kimi-rotate enable {index}`", err=True)
    elif state is KeyState.COOLING and key.cooldown_until is not None:
        typer.echo(f"note: this key is cooling ({key.cooldown_reason}); requests go to other keys for "
                   f"{views.time_left(key.cooldown_until - now)}", err=True)


@app.command("set-strategy")
def set_strategy(
    strategy: Annotated[
        Strategy, typer.Argument(metavar="health-based|round-robin|sticky", help="How the next key is chosen.")
    ],
) -> None:
    """Choose the rotation strategy: health-based (default), round-robin or sticky."""
    with _store() as store:
        store.update_settings(strategy=strategy)
    typer.echo(f"{symbols().ok} Rotation strategy set to: {strategy.value}")


class _OnOff(StrEnum):
    TRUE = "true"
    FALSE = "false"


@app.command("set-auto-refresh")
def set_auto_refresh(setting: Annotated[_OnOff, typer.Argument(metavar="true|false", help="On or off.")]) -> None:
    """Turn time-based health recovery (and refresh-health) on or off."""
    with _store() as store:
        store.update_settings(auto_refresh_health=setting is _OnOff.TRUE)
    typer.echo(f"{symbols().ok} Auto-refresh health: {setting.value}")


@app.command("set-cooldown")
def set_cooldown(
    minutes: Annotated[int, typer.Argument(metavar="MINUTES", min=1, max=1440, help="1-1440 minutes.")],
) -> None:
    """Set how long after its cooldown a key must rest before refresh-health raises it."""
    with _store() as store:
        store.update_settings(health_refresh_cooldown_minutes=minutes)
    typer.echo(f"{symbols().ok} Health refresh cooldown: {minutes} minutes")


@app.command("clear-limits")
def clear_limits(
    ref: Annotated[str, typer.Argument(metavar="INDEX|NAME|all", help="A key, or all keys.")],
) -> None:
    """End the cooldown of one key or all keys, and forget the caps learned for their accounts (health and stated
    caps stay)."""
    with _store() as store:
        if ref.strip().lower() == "all":
            cleared = store.clear_limits(None)
            typer.echo(f"{symbols().ok} Cleared limits for all {len(cleared)} key(s)")
            return
        index, key = _resolve(store, ref)
        store.clear_limits([key.id])
    typer.echo(f"{symbols().ok} Cleared limits for key: {key.name} (index {index})")
    if key.disabled_reason:
        typer.echo(f"note: the key stays disabled; `kimi-rotate enable {index}` turns it back on", err=True)


@app.command("refresh-health")
def refresh_health() -> None:
    """Raise by 10 the health of keys that rested long enough after their last cooldown."""
    now = _now()
    with _store() as store:
        settings = store.settings()
        if not settings.auto_refresh_health:
            typer.echo("Auto-refresh health is off, so nothing was refreshed. "
                       "Turn it on with: kimi-rotate set-auto-refresh true")
            return
        pairs = store.refresh_health(now)
    if not pairs:
        typer.echo("No keys needed health refresh.")
        typer.echo(f"Keys must be enabled, below 100% health and {settings.health_refresh_cooldown_minutes} "
                   "minutes past their last cooldown.")
        return
    typer.echo(f"{symbols().ok} Refreshed health for {len(pairs)} key(s):")
    for before, after in pairs:
        old = views.pct(engine.health_at(before, now, True))
        typer.echo(f"  {before.name}: {old}% {symbols().arrow} {views.pct(after.health)}%")


# -- stats --------------------------------------------------------------------------------------


@app.command("stats")
def stats(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON document (stable field names).")] = False,
    plot: Annotated[bool, typer.Option("--plot", help="Draw requests and 429s per key over time.")] = False,
    hours: Annotated[int | None, typer.Option(min=1, max=cli_plot.MAX_HOURS, help=cli_plot.HOURS_HELP)] = None,
    days: Annotated[int | None, typer.Option(min=1, max=cli_plot.MAX_DAYS, help=cli_plot.DAYS_HELP)] = None,
) -> None:
    """Usage per key and in total: requests, success rate, response times, today and last 7 days; each account's
    caps and quota. With --plot, a chart of requests and 429s per key over the last hours or days."""
    now = _now()
    if plot or hours is not None or days is not None:
        cli_plot.check_range(hours, days)
        if as_json:
            raise typer.BadParameter("--plot draws for a terminal; leave out --json", param_hint="'--json'")
        with _store(readonly=True) as store:
            cli_plot.print_plot(store, now, hours, days)
        return
    today = utc_day(now)
    week_start = utc_day(now - timedelta(days=6).total_seconds())  # today and the 6 days before
    with _store(readonly=True) as store:
        keys = store.keys()
        daily = store.daily(week_start)
        accounts = account_views.accounts_of(keys, store.accounts())
    if as_json:
        document = {**views.stats_json(keys, daily, today, week_start),
                    "accounts": [account_views.account_json(a, now) for a in accounts]}
        typer.echo(json.dumps(document, indent=2, ensure_ascii=False))
        return
    if not keys:
        typer.echo("No keys configured.\nAdd one with: kimi-rotate add-key")
        return
    usage = views.usage_stats(keys, daily, today)
    typer.echo(f"\n{symbols().stats}Usage Statistics\n")
    for i, (k, u) in enumerate(zip(keys, usage.keys, strict=True)):
        typer.echo(f"[{i}] {k.name}  ({_masked(k.secret.get_secret_value())})")
        _print_usage(u)
        typer.echo("")
    typer.echo(symbols().rule * 50)
    typer.echo(f"{symbols().totals}Aggregate Statistics")
    typer.echo(f"   Keys: {len(keys)}")
    _print_usage(usage.total, overall=True)
    typer.echo("")
    typer.echo(symbols().rule * 50)
    known = [a for a in accounts if a.known()]
    typer.echo(f"Accounts ({len(accounts)}; caps or quota known for {len(known)})")
    if not known:
        typer.echo("   None known yet; `kimi-rotate account NAME --rpm N` states a cap")
    for a in known:
        cli_accounts.echo_fitted(["   " + line for line in account_views.account_summary(a, now)])
    typer.echo("")


def _print_usage(u: views.Usage, overall: bool = False) -> None:
    prefix = "Overall " if overall else ""
    typer.echo(f"   Total Requests: {u.total_requests}")
    typer.echo(f"   Successful: {u.successful_requests}")
    typer.echo(f"   Rate Limited: {u.rate_limited_requests}")
    typer.echo(f"   Failed: {u.failed_requests}")
    if u.success_rate is not None:
        typer.echo(f"   {prefix}Success Rate: {u.success_rate:.1f}%")
    if u.avg_response_ms is not None:
        typer.echo(f"   {prefix}Avg Response Time: {u.avg_response_ms}ms")
        typer.echo(f"   {prefix}Response Time Range: {u.min_response_ms or 0}ms - {u.max_response_ms or 0}ms")
    elif not overall:
        typer.echo("   Avg Response Time: N/A")
    typer.echo(f"   Requests Today: {u.requests_today}")
    typer.echo(f"   Requests Last 7 Days: {u.requests_last_7_days}")


# -- backups and imports ------------------------------------------------------------------------


@app.command("export-keys")
def export_keys(
    file: Annotated[
        Path | None,
        typer.Argument(
            metavar="FILE", help="Where to write the encrypted backup. Default: kimi-keys-backup.json.enc here."
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace FILE if it exists.")] = False,
) -> None:
    """Write every key to a passphrase-encrypted file (also readable by opencode-kimi-rotator)."""
    from . import backup  # cryptography: only for the commands that encrypt or decrypt

    file = file or Path(backup.DEFAULT_FILE)
    now = _now()
    with _store(readonly=True) as store:
        snap = store.snapshot()
    if not snap.keys:
        raise CliError("there are no keys to export; add keys first")
    backup.check_target(file, overwrite=force)  # before the passphrase is asked for, not after
    passphrase = _new_passphrase()
    backup.write_private(file, backup.export_text(snap.keys, snap.settings, passphrase, now), overwrite=force)
    typer.echo(f"{symbols().ok} Exported {len(snap.keys)} key(s) to: {file}")
    typer.echo("  Keep this file and your passphrase safe: together they are your keys.")


@app.command("import-keys")
def import_keys(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A backup from export-keys or opencode-kimi-rotator.")],
) -> None:
    """Add the keys of an encrypted backup (keys already present are skipped)."""
    from . import backup  # cryptography: only for the commands that encrypt or decrypt

    envelope = backup.read_envelope(file)  # a wrong file is reported before asking for a passphrase
    passphrase = _read_passphrase("Backup passphrase: ")
    imported = backup.parse_plaintext(backup.decrypt(envelope, passphrase), _now())
    _add_imported(imported)


@app.command("import-opencode")
def import_opencode(
    path: Annotated[
        Path | None,
        typer.Argument(
            metavar="PATH",
            help="opencode-kimi-rotator's store file. Default: kimi-accounts.json in ~/.config/opencode.",
        ),
    ] = None,
) -> None:
    """Import opencode-kimi-rotator's keys with names, health, counters and strategy (read only)."""
    from . import opencode

    path = (path or opencode.DEFAULT_PATH).expanduser()
    _add_imported(opencode.load(path, _now()))
    typer.echo(f"\nThe plaintext file {path} still holds your keys. Once opencode-kimi-rotator no longer "
               f"needs it, delete it: rm '{path}'")


def _add_imported(imported: opencode.Imported) -> None:
    for note in imported.notes:
        typer.echo(scrub(f"note: {note}"), err=True)
    with _store() as store:
        before = store.snapshot()
        added, skipped = store.add_keys(imported.keys, _now())
        # As the reference, the strategy comes along only when keys did; unlike it, only into an empty
        # pool: a pool in use keeps the strategy its owner chose.
        adopt = bool(added) and not before.keys and imported.strategy is not before.settings.strategy
        if adopt:
            store.update_settings(strategy=imported.strategy)
    wanted = {nk.secret: nk.name for nk in imported.keys}
    for k in added:
        name = wanted[k.secret.get_secret_value()]
        if name is not None and name != k.name:
            typer.echo(f"note: the name {name!r} is taken, so {_masked(k.secret.get_secret_value())} was added as "
                       f"{k.name!r}; `kimi-rotate rename` changes it", err=True)
    typer.echo(f"{symbols().ok} Import complete:")
    typer.echo(f"  Imported: {len(added)} key(s)")
    typer.echo(f"  Skipped (already present): {len(skipped)} key(s)")
    if imported.invalid:
        typer.echo(f"  Skipped (invalid key): {imported.invalid} key(s), named above")
    if added and not before.keys:
        typer.echo(f"  Rotation strategy: {imported.strategy.value}")
    elif added and imported.strategy is not before.settings.strategy:
        typer.echo(f"  Rotation strategy: kept {before.settings.strategy.value} (the import's is "
                   f"{imported.strategy.value}; `kimi-rotate set-strategy {imported.strategy.value}` switches)")
    _warn_kimi_code([k.surface for k in added])


# The setup commands live in their own module; SetupError is a UserError like the others.
app.command("proxy")(cli_setup.proxy)
app.command("ca")(cli_setup.ca)
app.command("doctor")(cli_setup.doctor)
app.command("check")(cli_check.check)
app.command("status")(cli_status.status)
store_app = _App(cls=_Group, name="store", help=cli_store.HELP, no_args_is_help=True, rich_markup_mode=None,
                 pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]})
store_app.command("migrate")(cli_store.migrate)
store_app.command("rotate-secret")(cli_store.rotate_secret)
app.add_typer(store_app)


def main() -> None:
    app()
