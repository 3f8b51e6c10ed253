"""The setup commands: `proxy`, `ca` and `doctor` (registered in cli.py).

Each command imports what it uses (mitmproxy, ssl, certifi) when it runs: every other command
loads this module too, only to list these in `--help`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .errors import UserError
from .symbols import symbols

ConfdirOption = Annotated[
    Path | None, typer.Option("--confdir", metavar="DIR", help="mitmproxy's folder for the CA (default: ~/.mitmproxy).")
]


class SetupError(UserError):
    """Raised for problems the user can fix; cli.py prints them as `error: ...` with exit code 1."""


def proxy(
    host: Annotated[str, typer.Option(metavar="HOST", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT", help="Port to listen on.")] = 8080,
    web: Annotated[bool, typer.Option("--web", help="Open mitmweb's interface too (slower; for debugging).")] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="NAME=VALUE",
            help="A mitmproxy or kimi_* option as name=value (repeatable), as with mitmdump.",
        ),
    ] = None,
    allow_remote: Annotated[
        bool, typer.Option("--allow-remote", help="Listen beyond this machine without a token or proxy auth.")
    ] = False,
    metrics: Annotated[
        str, typer.Option("--metrics", metavar="HOST:PORT", help="Serve Prometheus metrics there, e.g. 127.0.0.1:9464.")
    ] = "",
    confdir: ConfdirOption = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No line per request; only warnings (a key disabled) and errors.")
    ] = False,
) -> None:
    """Start the rotating proxy and print the lines to paste into your agent's shell, then a line per request."""
    if not 1 <= port <= 65535:
        raise SetupError(f"--port {port} is not a port number; pick one from 1 to 65535, e.g. --port 8080")
    from .cli import STORE_CHOICE
    from .proxy import ProxyConfig, ProxyError, run  # mitmproxy loads only for this command

    sets = [f"confdir={confdir}"] if confdir else []
    if STORE_CHOICE[0]:  # `kimi-rotate --store URL proxy`
        sets.append(f"kimi_store={STORE_CHOICE[0]}")
    sets += set_ or []
    try:
        run(ProxyConfig(host=host, port=port, web=web, sets=sets, allow_remote=allow_remote, quiet=quiet,
                        metrics=metrics))
    except ProxyError as e:
        raise SetupError(str(e)) from None


def ca(confdir: ConfdirOption = None) -> None:
    """Create mitmproxy's CA if missing (no proxy needed) and show how to trust it."""
    from .ca import default_confdir, ensure_ca, env_lines, trust_commands

    info = ensure_ca(confdir or default_confdir())
    typer.echo(f"{'Created' if info.created else 'Found'} the CA certificate: {info.cert}")
    typer.echo(f"Bundle for SSL_CERT_FILE (public CAs + this one): {info.bundle}")
    typer.echo("Trust it system-wide (see certs-howto.md for other systems, runtimes and browsers):")
    for line in trust_commands(info):
        typer.echo(f"  {line}")
    typer.echo("Or only for the agent's shell:")
    for line in env_lines("http://127.0.0.1:8080", info):
        typer.echo(f"  {line}")
    typer.echo(f"Keep {info.confdir} private: its key can read any TLS traffic sent through the proxy.")


def doctor(
    host: Annotated[str, typer.Option(metavar="HOST", help="Where the proxy should listen.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT", help="The proxy's port.")] = 8080,
    confdir: ConfdirOption = None,
) -> None:
    """Check the store, the keys, the CA, the running proxy and TLS through it."""
    from . import doctor as checks
    from .ca import default_confdir
    from .cli import STORE_CHOICE
    from .store import store_home

    results = checks.run_checks(store_home(), confdir or default_confdir(), host, port, store_spec=STORE_CHOICE[0])
    for c in results:
        mark = symbols().ok if c.ok else symbols().failed
        typer.echo(f"{mark} {c.name}: {c.detail}")
        if not c.ok and c.fix:
            typer.echo(f"    fix: {c.fix}")
    failed = [c.name for c in results if not c.ok]
    if failed:
        typer.echo(f"{len(failed)} check(s) failed: {', '.join(failed)}", err=True)
        raise typer.Exit(1)
    typer.echo("All checks passed.")
