"""`kimi-rotate store ...` (registered in cli.py): moving the pool between stores, and the Redis store's secret.

- `store migrate --to TARGET`: copies the whole store (keys with their ids, settings, accounts, counters, file
  owners) into an empty one, reads the target back to check it, and leaves the source as it was;
- `store rotate-secret --add`, then `--finish`: a new sealing secret for a Redis store, in two steps so that the
  proxies on other machines keep opening the keys throughout (see rotate_secret).
Nothing here prints a key: counts, names and fingerprints only.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import UserError
from .store import SECRET_ENV, STORE_ENV, StoreImage, open_store, store_home
from .symbols import symbols


class StoreCommandError(UserError):
    """A mistake the user can fix; cli.py prints it as `error: ...` with exit code 1."""


HELP = "Move the pool to another store (Redis, or back to the local file); rotate a Redis store's secret."


def _target(to: str) -> tuple[str | None, Path | None]:
    """(the spec, the folder) open_store is given for `--to`: a Redis URL, `sqlite` (the store folder) or a folder."""
    text = to.strip()
    if not text:
        raise StoreCommandError("--to is empty; give a redis:// URL, `sqlite`, or a folder for a local store")
    if "://" in text:
        return text, None
    return "sqlite", store_home() if text == "sqlite" else Path(text).expanduser()


def _summary(image: StoreImage) -> str:
    hours = len({start for hours in image.hourly.values() for start in hours})
    return (f"{len(image.keys)} key(s), {len(image.accounts)} account(s), counters for {image.days()} day(s) "
            f"({hours} hour(s) in detail), {len(image.files)} file owner(s), the settings and the current key")


def _confirm(question: str, yes: bool) -> None:
    from .cli import _stdin_is_tty

    if yes:
        return
    if not _stdin_is_tty():
        raise StoreCommandError("nothing was copied; pass --yes to copy without being asked")
    typer.echo(question + " [y/N] ", nl=False, err=True)
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise StoreCommandError("nothing was copied; run it again to copy")


def migrate(
    to: Annotated[str, typer.Option("--to", metavar="TARGET", show_default=False,
                                    help="Where to copy the pool: a redis:// (rediss://) URL, `sqlite` for the "
                                         "local store folder, or a folder.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Copy without asking.")] = False,
) -> None:
    """Copy the whole pool into an empty store, and check the copy.

    Copies the current store (the local file, or --store) into TARGET: keys with their ids, health, cooldowns and
    counters, the accounts' caps and quota, the settings and the current key. The source is left as it was. Stop
    the proxies first (what they count during the copy stays in the source), then point them at TARGET."""
    from .cli import STORE_CHOICE

    spec, folder = _target(to)
    with contextlib.closing(open_store(STORE_CHOICE[0], readonly=True)) as source:
        image = source.image()
        if not image.keys:
            raise StoreCommandError(f"the store {source.where} holds no key; nothing to copy (is --store or "
                                    f"{STORE_ENV} right?)")
        with contextlib.closing(open_store(spec, folder)) as target:
            if target.where == source.where:
                raise StoreCommandError(f"{target.where} is the store being copied; give another --to")
            _confirm(f"Copy {_summary(image)} from {source.where} into {target.where}?", yes)
            target.load_image(image)
            copied = target.image()
            secret_file = getattr(target, "secret_file", None)
        where_from, where_to = source.where, target.where
    ok = symbols().ok
    typer.echo(f"{ok} Copied {_summary(image)} from {where_from} to {where_to}")
    differences = image.differences(copied)
    if differences:
        raise StoreCommandError(f"the copy in {where_to} differs from the source in: {', '.join(differences)}; "
                                "the source is unchanged, remove the copy's keys and migrate again")
    typer.echo(f"{ok} Verified: {where_to} holds the same {len(image.keys)} key(s) (by fingerprint) and counters")
    if secret_file is not None:
        typer.echo(f"  The keys there are sealed with the secret file {secret_file}: copy it (mode 600) to every "
                   f"machine that uses this store (to the same path, or where {SECRET_ENV} points there)")
        typer.echo(f"  Next: point the proxies at it (kimi_store={where_to}, or {STORE_ENV}, or --store)")
    else:
        typer.echo(f"  Next: use it with {STORE_ENV} unset (and kimi_store empty)"
                   + ("" if folder == store_home() else f", KIMI_ROTATE_HOME={folder}"))
    typer.echo(f"  The source {where_from} was left as it was")


def rotate_secret(
    add: Annotated[bool, typer.Option("--add", help="Step 1: put a new secret first in the secret file.")] = False,
    finish: Annotated[bool, typer.Option("--finish", help="Step 2: re-seal every key with it, drop the old ones.")
                      ] = False,
) -> None:
    """A new secret for the keys of a Redis store, in two steps.

    1. `--add` puts a new secret first in this machine's secret file, keeping the old one: nothing in Redis changes.
    Copy the file to every machine of the store. 2. `--finish` re-seals every key with the new secret in one
    transaction (running proxies read the copied file again when they meet it), then drops the old secret from this
    machine's file; copy the file everywhere once more. Without an option: where the rotation stands."""
    from . import secret_box  # cryptography: loaded by the commands that need it only
    from .cli import STORE_CHOICE
    from .store_redis import RedisStore

    if add and finish:
        raise StoreCommandError("--add and --finish are two steps: copy the secret file to every machine between "
                                "them")
    with contextlib.closing(open_store(STORE_CHOICE[0])) as store:
        if not isinstance(store, RedisStore):
            raise StoreCommandError(f"the store {store.where} is the local file, whose keys are not sealed; give "
                                    f"the Redis store with --store or {STORE_ENV}")
        path = store.secret_file
        store.keys()  # every key opens with the file as it is, before anything changes
        if add:
            new_id = secret_box.add_secret(path)
            typer.echo(f"{symbols().ok} Added secret {new_id} to {path}, first; the older ones stay and still open "
                       "the keys")
            typer.echo(f"  Now copy {path} to every machine of the store (mode 600), before adding keys here: new "
                       "keys are sealed with it")
            typer.echo("  Then run `kimi-rotate store rotate-secret --finish`")
            return
        if finish:
            box = secret_box.SecretBox.load(path)
            if len(box.key_ids) < 2:  # and every key opened with it, above
                raise StoreCommandError(f"{path} holds one secret and every key is sealed with it: nothing to "
                                        "finish; start with `kimi-rotate store rotate-secret --add`")
            resealed = store.reseal()
            dropped = secret_box.drop_old_secrets(path)
            typer.echo(f"{symbols().ok} Re-sealed {resealed} key(s) with secret {box.key_id}; dropped {dropped} old "
                       f"secret(s) from {path}")
            typer.echo(f"  Copy {path} to every machine of the store again: the old secret opens nothing now")
            return
        box = secret_box.SecretBox.load(path)
        counts = ", ".join(f"{n} with {kid}" for kid, n in sorted(store.sealed_by().items())) or "no key"
        typer.echo(f"Secret file {path}: {', '.join(box.key_ids)} (the first seals new keys)")
        typer.echo(f"Keys in {store.where}: {counts}")
        if len(box.key_ids) > 1:
            typer.echo("Next: once the file is on every machine, `kimi-rotate store rotate-secret --finish`")
        else:
            typer.echo("To rotate: `kimi-rotate store rotate-secret --add`")
