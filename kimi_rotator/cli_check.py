"""`kimi-rotate check` (registered in cli.py): ask Kimi about each key without spending tokens, and record it.

Thin: the probes are probe.py's, sent with the proxy's own client (upstream.py) set up from the same options the
proxy reads (`--set`, parsed by proxy.upstream_settings); the recording is the store's; the table is views'. It
needs no running proxy. Everything heavy (mitmproxy's option parser, the client, the classifier) loads only here.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Annotated

import typer

from .errors import UserError
from .symbols import PLAIN, symbols

if TYPE_CHECKING:
    from .models import KeyRecord
    from .probe import ProbeResult
    from .store import Store
    from .upstream import UpstreamSettings

PROGRESS_ABOVE = 4  # keys: with fewer, the answer comes before a bar would be worth drawing


class CheckError(UserError):
    """A `--set` option `check` cannot use; cli.py prints it as `error: ...` with exit code 1."""


def check(
    refs: Annotated[
        list[str] | None,
        typer.Argument(metavar="INDEX|NAME", help="The keys to check (default: every key).", show_default=False),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array (stable field names).")] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="NAME=VALUE",
            help="How to reach Kimi, as with `proxy --set` (repeatable): kimi_resolve, kimi_upstream_timeout, the "
            "ssl_insecure and ssl_verify_upstream_* options, mode=upstream:URL, upstream_auth.",
        ),
    ] = None,
) -> None:
    """Ask Kimi about each key without spending tokens (balance, or Kimi Code's /usages) and record what it says.

    Shows per key whether it is valid, the balance or each plan window's remaining quota and reset, and the account
    Kimi names. A refused key (401) is disabled; an account whose quota is used up cools until Kimi's reset, and
    one whose quota is back stops cooling; an unlabelled key takes the account Kimi names. No proxy is needed.
    Exit code 0 when every key checked is valid, 1 when any is invalid or could not be checked.
    """
    from .cli import STORE_CHOICE
    from .store import open_store
    from .upstream import settings_from_sets  # mitmproxy's option parser loads only for this command

    try:
        settings = settings_from_sets(set_ or [])
    except ValueError as e:
        raise CheckError(str(e)) from None
    store = open_store(STORE_CHOICE[0])
    try:
        everything = store.keys()
        chosen = _chosen(store, everything, refs or [])
        if not chosen:
            typer.echo("[]" if as_json else "No keys configured.\nAdd one with: kimi-rotate add-key")
            return
        import asyncio  # it loads ssl, which the everyday commands never need

        results = asyncio.run(_probe(settings, chosen, _progress(len(chosen))))
        for result in results:
            store.apply_probe(result, time.time())
        recorded = store.keys()
        after = {k.id: k for k in recorded}
    finally:
        store.close()
    _show(everything, chosen, results, after, as_json)
    if any(r.valid is not True for r in results):
        raise typer.Exit(1)


def _chosen(store: Store, everything: list[KeyRecord], refs: Sequence[str]) -> list[KeyRecord]:
    """The keys named (each once, in the order given), or every key."""
    if not refs:
        return everything
    picked: dict[int, KeyRecord] = {}
    for ref in refs:
        key = store.resolve(ref)
        picked.setdefault(key.id, key)
    return list(picked.values())


async def _probe(settings: UpstreamSettings, keys: list[KeyRecord], progress: _Progress | None) -> list[ProbeResult]:
    from .probe import probe_keys
    from .upstream import UpstreamClient

    client = UpstreamClient(settings)
    try:
        return await probe_keys(client, keys, time.time, on_result=progress.step if progress else None)
    finally:
        await client.aclose()
        if progress is not None:
            progress.close()


def _show(
    everything: list[KeyRecord],
    chosen: list[KeyRecord],
    results: list[ProbeResult],
    after: dict[int, KeyRecord],
    as_json: bool,
) -> None:
    from . import views

    index = {k.id: i for i, k in enumerate(everything)}
    now = time.time()
    rows = [views.Checked(index[k.id], after.get(k.id, k), r) for k, r in zip(chosen, results, strict=True)]
    if as_json:
        typer.echo(json.dumps([views.check_json(c, now) for c in rows], indent=2, ensure_ascii=symbols() is PLAIN))
        return
    width = shutil.get_terminal_size((0, 0)).columns or None  # not a terminal: lines are not cut
    for line in views.check_table(rows, width, now, symbols()):
        typer.echo(line)
    bad = sum(r.valid is not True for r in results)
    if bad:
        typer.echo(f"{bad} of {len(results)} key(s) are invalid or could not be checked.", err=True)


class _Progress:
    """`Checking keys [####......] 4/10` on one stderr line, redrawn as results come, erased at the end."""

    WIDTH = 20

    def __init__(self, total: int, stream: IO[str]) -> None:
        self.total = total
        self.done = 0
        self.stream = stream
        self._draw()

    def step(self, _: ProbeResult) -> None:
        self.done += 1
        self._draw()

    def _draw(self) -> None:
        sym = symbols()
        filled = self.WIDTH * self.done // self.total
        bar = sym.full * filled + sym.empty * (self.WIDTH - filled)
        self.stream.write(f"\rChecking keys {bar} {self.done}/{self.total}")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\r\033[K")
        self.stream.flush()


def _progress(total: int) -> _Progress | None:
    """A progress line on a terminal, for more than PROGRESS_ABOVE keys; never in a pipe or a file."""
    stream = sys.stderr
    if total <= PROGRESS_ABOVE or stream is None or not stream.isatty():
        return None
    return _Progress(total, stream)
