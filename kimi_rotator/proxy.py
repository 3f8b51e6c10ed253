"""`kimi-rotate proxy`: mitmproxy with the kimi-rotate addon and only the addons this use needs.

Stock mitmdump walks every event through 35 addons; dispatch, not TLS, is where its time goes.
The slim master keeps what a rotating proxy needs (proxy server, layer selection, TLS, proxy
authentication, upstream proxy credentials, the global-client block) and drops the rest. `--web`
runs mitmweb's full master instead, for debugging. Options of the addons left out either load their
addon when set (`--set flow_detail=1` loads mitmdump's flow printer) or are refused with what to use
instead. Failing to listen ends in one line of ours, never in mitmproxy's advice about its own flags.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import inspect
import io
import logging
import signal
import sys
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mitmproxy import addonmanager, ctx, exceptions, hooks, master, options
from mitmproxy.addons import (
    block,
    core,
    disable_h2c,
    errorcheck,
    next_layer,
    proxyauth,
    proxyserver,
    termlog,
    tlsconfig,
    upstream_auth,
)

from .access import KeyAccess, is_loopback
from .addon import KimiRotate
from .ca import CAInfo, ensure_ca, env_lines
from .models import Surface

FLUSH_SECONDS = 0.1  # how long a logged line may wait in stdout's buffer


class ProxyError(Exception):
    """A problem with how the proxy was asked to start; the message says what to do."""


@dataclass(frozen=True)
class ProxyConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    web: bool = False
    sets: Sequence[str] = ()
    allow_remote: bool = False
    quiet: bool = False  # termlog_verbosity=warn: no request lines, only what needs the user
    metrics: str = ""  # kimi_metrics: HOST:PORT for Prometheus


# Options of mitmproxy addons the slim master leaves out. Setting one loads its addon (once): before ours when
# mitmdump's chain has it before scripts, else after. The rest are refused: each says what to use instead.
ON_DEMAND: dict[str, tuple[str, str, bool]] = {
    "block_list": ("blocklist", "BlockList", True),
    "anticache": ("anticache", "AntiCache", True),
    "anticomp": ("anticomp", "AntiComp", True),
    "map_remote": ("mapremote", "MapRemote", False),
    "map_local": ("maplocal", "MapLocal", False),
    "modify_body": ("modifybody", "ModifyBody", False),
    "modify_headers": ("modifyheaders", "ModifyHeaders", False),
    "stickyauth": ("stickyauth", "StickyAuth", False),
    "stickycookie": ("stickycookie", "StickyCookie", False),
    "save_stream_file": ("save", "Save", False),
    "save_stream_filter": ("save", "Save", False),
    "hardump": ("savehar", "SaveHar", False),
    "keep_alt_svc_header": ("update_alt_svc", "UpdateAltSvc", False),
    "flow_detail": ("dumper", "Dumper", False),
    "dumper_filter": ("dumper", "Dumper", False),
    "dumper_default_contentview": ("dumper", "Dumper", False),
}
_REPLAY = "replaying flows is not part of the rotating proxy: use `mitmdump -s kimi_rotate.py` (-C or -S FILE)"
_DNS = "kimi-rotate proxy has no DNS mode: use `mitmdump -s kimi_rotate.py --mode dns`"
_ONBOARDING = "kimi-rotate proxy has no onboarding app (mitm.it): `kimi-rotate ca` shows the CA and how to trust it"
REFUSED: dict[str, str] = {
    "scripts": "kimi-rotate proxy loads no other scripts: use `mitmdump -s kimi_rotate.py -s YOUR_SCRIPT.py`",
    "rfile": "kimi-rotate proxy does not read saved flows: to look at them, use `mitmweb -s kimi_rotate.py -r FILE`",
    "readfile_filter": "kimi-rotate proxy does not read saved flows: use `mitmdump -s kimi_rotate.py -r FILE`",
    "command_history": "it belongs to mitmproxy's console: use `mitmproxy -s kimi_rotate.py`",
    "export_preserve_original_ip": "flows are exported from mitmproxy's interfaces: use `kimi-rotate proxy --web`",
    "keepserving": _REPLAY,
    "client_replay": _REPLAY,
    "client_replay_concurrency": _REPLAY,
    "server_replay": _REPLAY,
    **{f"server_replay_{name}": _REPLAY for name in (
        "extra", "ignore_content", "ignore_host", "ignore_params", "ignore_payload_params", "ignore_port",
        "kill_extra", "nopop", "refresh", "reuse", "use_headers")},
    "dns_name_servers": _DNS,
    "dns_use_hosts_file": _DNS,
    "strip_ech": _DNS,
    "onboarding": _ONBOARDING,
    "onboarding_host": _ONBOARDING,
}


def option_addons(sets: Sequence[str], known: Collection[str] = ()) -> tuple[list[Any], list[Any]]:
    """The addons the `--set` options ask for, (before ours, after ours), but for options `known` already;
    ProxyError for a refused option."""
    before: list[Any] = []
    after: list[Any] = []
    loaded: set[tuple[str, str]] = set()
    for spec in sets:
        name = spec.partition("=")[0].strip()
        if name in known:
            continue
        if name in REFUSED:
            raise ProxyError(f"--set {name} does not work with kimi-rotate proxy: {REFUSED[name]}")
        found = ON_DEMAND.get(name)
        if found is None or found[:2] in loaded:
            continue
        module, cls, first = found
        loaded.add((module, cls))
        (before if first else after).append(getattr(importlib.import_module(f"mitmproxy.addons.{module}"), cls)())
    return before, after


def listen_error(host: str, port: int, error: BaseException, web: bool = False) -> str:
    """One line for a server that could not listen: what happened, and the flag that fixes it."""
    address = f"{'0.0.0.0' if not host else f'[{host}]' if ':' in host else host}:{port}"
    head = f"could not listen on {address}" + (" for the web interface" if web else "")
    port_flag = "--set web_port=" if web else "--port "
    other = port + 1 if port < 65535 else port - 1
    code = error.errno if isinstance(error, OSError) else None
    if not 0 < port <= 65535:
        return f"{head}: {port} is not a port number; pick one from 1 to 65535, e.g. {port_flag}{8081 if web else 8080}"
    if code == errno.EADDRINUSE:
        return (f"{head}: the port is in use (another {'mitmweb' if web else 'kimi-rotate proxy'}?); "
                f"stop that, or pick another port with {port_flag}{other}")
    if code in (errno.EACCES, errno.EPERM):
        return (f"{head}: permission denied (ports below 1024 need administrator rights); "
                f"pick another port with {port_flag}{8081 if web else 8080}")
    if code == errno.EADDRNOTAVAIL:
        host_flag = "--set web_host=" if web else "--host "
        return f"{head}: that address is not one of this machine's; pick one that is with {host_flag}127.0.0.1"
    detail = (error.strerror if isinstance(error, OSError) else None) or str(error).splitlines()[0]
    return f"{head} ({detail}); pick another port with {port_flag}{other}"


def check_exposure(host: str, access: KeyAccess) -> None:
    """Listening beyond this machine with nothing that vouches for clients is most likely a mistake: refuse it
    (the addon would answer other machines with a 403 anyway)."""
    if is_loopback(host) or access is not KeyAccess.LOOPBACK:
        return
    raise ProxyError(
        f"refusing to listen on {host} without protection: anyone on the network could use your keys. "
        "Set a client token (--set kimi_client_token=SECRET) or proxy authentication "
        "(--set proxyauth=user:pass), or pass --allow-remote if you really mean it."
    )


class Banner:
    """Prints where the proxy listens and what to paste, once it is listening."""

    def __init__(self, rotate: KimiRotate, ca: CAInfo) -> None:
        self.rotate = rotate
        self.ca = ca

    def running(self) -> None:
        server = _proxyserver()
        addrs = server.listen_addrs() if server else []
        if not addrs:
            return
        host, port = addrs[0][0], addrs[0][1]
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        lines = [f"kimi-rotate proxy listening on {url}"]
        pool = self.rotate.pool
        if pool is None:
            lines.append(f"Key store problem: {self.rotate.store_error}")
        else:
            counts = ", ".join(f"{s.value} {pool.count(s)}" for s in Surface)
            lines.append(f"Keys: {counts}   (store: {self.rotate.store.where if self.rotate.store else '?'})")
            if not pool.roster.keys:
                lines.append("No keys yet: add one with `kimi-rotate add-key` (it is picked up without a restart).")
        lines.append(f"CA certificate: {self.ca.cert}   (trust it once: `kimi-rotate ca`, see certs-howto.md)")
        web = web_address(ctx.master)
        if web is not None:
            lines.append(f"Web interface: {web}")
        lines.append("Paste into the shell that runs your agent:")
        lines += [f"  {line}" for line in env_lines(url, self.ca)]
        print("\n".join(lines), flush=True)


def web_address(m: master.Master) -> str | None:
    """Where mitmweb's interface answers (None: no web interface). mitmproxy 12 asks for a token, made up at
    start unless web_password is set: its URL carries the token; with a password of one's own, that is to use."""
    opts = m.options
    if "web_port" not in opts:
        return None
    url = getattr(m, "web_url", None)  # mitmproxy 12
    if not isinstance(url, str):
        host = opts.web_host
        url = f"http://{f'[{host}]' if ':' in host else host}:{opts.web_port}/"
    if getattr(opts, "web_password", ""):
        url += "   (log in with your web_password)"
    return url


class StartupCheck(errorcheck.ErrorCheck):
    """mitmproxy's start-up check, with our line for a server that could not listen.

    mitmproxy logs such a failure with advice about its own flags (`--mode regular@8082`), then
    "Error logged during startup, exiting...". Here its log line is held back while starting, and a
    failed server ends the start with a ProxyError naming the address and kimi-rotate's flag.
    """

    name = "errorcheck"  # the name the master looks for

    def __init__(self) -> None:
        super().__init__()
        self._hold = _HoldErrors()
        logging.getLogger(proxyserver.__name__).addFilter(self._hold)

    def finish(self) -> None:  # started: from here on, mitmproxy's lines are shown as they come
        logging.getLogger(proxyserver.__name__).removeFilter(self._hold)
        super().finish()

    async def shutdown_if_errored(self) -> None:
        server = _proxyserver()
        for instance in server.servers if server is not None else ():
            error = instance.last_exception
            if error is not None:
                port = instance.mode.listen_port(ctx.options.listen_port) or 0
                raise ProxyError(listen_error(instance.mode.listen_host(ctx.options.listen_host), port, error))
        await super().shutdown_if_errored()


class _HoldErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # The proxy server logs errors only when a server fails to start or stop; StartupCheck reports those.
        return record.levelno < logging.ERROR


class CachedAddonManager(addonmanager.AddonManager):
    """mitmproxy's addon manager, looking up each event's handlers once instead of on every event.

    The stock manager walks the whole chain for every event, and again for the `update` event that
    follows each flow event, through a generator and a context manager per addon: on a request that
    walk cost more than all of kimi-rotate's own work. Here the handlers of an event name are found
    once and kept until an addon is registered or removed. An error in a handler is logged and the event
    goes on (as `safecall` does); AddonHalt stops the event.
    """

    def __init__(self, m: master.Master) -> None:
        super().__init__(m)
        self._handlers: dict[str, list[Callable[..., Any]]] = {}

    def register(self, addon: Any) -> Any:  # what `add` and addons that manage children both go through
        self._handlers.clear()
        return super().register(addon)

    def remove(self, addon: Any) -> None:
        super().remove(addon)
        self._handlers.clear()

    def handlers(self, event: hooks.Hook) -> list[Callable[..., Any]]:
        found = self._handlers.get(event.name)
        if found is None:
            found = [func for addon in self.chain for _, func in self._iter_hooks(addon, event)]
            self._handlers[event.name] = found
        return found

    async def trigger_event(self, event: hooks.Hook) -> None:
        handlers = self.handlers(event)
        if not handlers:
            return
        args = event.args()
        for func in handlers:
            try:
                with addonmanager.safecall():
                    result = func(*args)
                    if result is not None and inspect.isawaitable(result):
                        await result
            except exceptions.AddonHalt:
                return


def _proxyserver() -> proxyserver.Proxyserver | None:
    found = ctx.master.addons.get("proxyserver")
    return found if isinstance(found, proxyserver.Proxyserver) else None


def build_master(config: ProxyConfig, loop: asyncio.AbstractEventLoop) -> master.Master:
    opts = options.Options(listen_host=config.host, listen_port=config.port)
    rotate = KimiRotate()
    sets = ["termlog_verbosity=warn", *config.sets] if config.quiet else list(config.sets)
    m: master.Master
    if config.web:
        from mitmproxy.tools.web.master import WebMaster

        m = WebMaster(opts, with_termlog=True)
        stock = m.addons.get("errorcheck")
        stock.finish()
        m.addons.remove(stock)
        before, after = option_addons(sets, known=set(m.options.keys()))  # mitmweb has all but the flow printer
        m.addons.add(*before, rotate, *after, StartupCheck())
        m.options.update(web_open_browser=False)
    else:
        before, after = option_addons(sets)
        m = master.Master(opts, event_loop=loop)
        m.addons = CachedAddonManager(m)
        m._termlog_addon = termlog.TermLog()  # where with_termlog=True would put it: `done` uninstalls it
        # Each log line would also become an `add_log` event walked through every addon; none here wants it.
        m._legacy_log_events.uninstall()
        m.addons.add(
            m._termlog_addon,
            core.Core(),
            block.Block(),
            proxyauth.ProxyAuth(),
            proxyserver.Proxyserver(),
            disable_h2c.DisableH2C(),
            next_layer.NextLayer(),
            tlsconfig.TlsConfig(),
            upstream_auth.UpstreamAuth(),
            *before,
            rotate,
            *after,
            StartupCheck(),
        )
    if config.allow_remote:  # first: a --set kimi_metrics beyond loopback is checked against it
        m.options.update(kimi_allow_remote=True)
    try:
        m.options.set(*sets)
    except exceptions.OptionsError as e:
        raise ProxyError(f"bad --set option: {e}; see `mitmdump --options` for names") from None
    if config.metrics:
        try:
            m.options.update(kimi_metrics=config.metrics)
        except exceptions.OptionsError as e:
            raise ProxyError(str(e)) from None
    # As mitmdump's script loader does for a `-s` addon: ours sees every option once, not only those set here.
    # (Only ours: on mitmproxy 12 with pyOpenSSL 26, tlsconfig fails when told every option changed.)
    m.addons.invoke_addon_sync(rotate, hooks.ConfigureHook(set(m.options.keys())))
    check_exposure(config.host, rotate.access)
    ca = ensure_ca(_confdir(m.options))
    m.addons.add(Banner(rotate, ca))
    return m


def _confdir(opts: options.Options) -> Path:
    return Path(opts.confdir).expanduser()


def run(config: ProxyConfig) -> int:
    """Run until Ctrl-C or SIGTERM; every outcome is in the store when this returns."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        m = build_master(config, loop)
        show_logs(m.options.termlog_verbosity)
        flusher = FlushSoon(loop, sys.stdout)
        logging.getLogger().addHandler(flusher)
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, m.shutdown)
            except (NotImplementedError, RuntimeError):  # Windows' event loop
                signal.signal(sig, lambda *_: loop.call_soon_threadsafe(m.shutdown))
        try:
            await m.run()
        except OSError as e:
            if not config.web:
                raise
            # The proxy server logs its failures (StartupCheck words them); mitmweb's own server raises.
            raise ProxyError(listen_error(m.options.web_host, m.options.web_port, e, web=True)) from None
        finally:
            logging.getLogger().removeHandler(flusher)
            flusher.flush()

    if isinstance(sys.stdout, io.TextIOWrapper):  # lines in one write per burst; FlushSoon writes them out
        sys.stdout.reconfigure(line_buffering=False, write_through=False)  # also under PYTHONUNBUFFERED / -u
    try:
        asyncio.run(main())
    except ProxyError:
        raise
    except OSError as e:  # a confdir that cannot be written, ...
        where = f" ({e.filename})" if e.filename else ""
        raise ProxyError(f"could not start the proxy: {e.strerror or e}{where}; check that path and its "
                         "permissions") from None
    return 0


class FlushSoon(logging.Handler):
    """Writes a stream's buffer out FLUSH_SECONDS after a record is logged, so a line shows within a fraction of a
    second on a terminal, in a pipe or in a service's journal, while a busy proxy pays one write for a burst of
    lines instead of a write (two, under PYTHONUNBUFFERED) per request line. Records may come from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: IO[str]) -> None:
        super().__init__()
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._stream = stream
        self._armed = False

    def emit(self, record: logging.LogRecord) -> None:
        if self._armed:
            return
        self._armed = True
        try:
            if threading.get_ident() == self._loop_thread:
                self._loop.call_later(FLUSH_SECONDS, self.flush)
            else:
                self._loop.call_soon_threadsafe(self._loop.call_later, FLUSH_SECONDS, self.flush)
        except RuntimeError:  # the loop has closed: write it out now
            self.flush()

    def flush(self) -> None:
        self._armed = False
        with contextlib.suppress(OSError, ValueError):  # stdout closed, or gone (the terminal was closed)
            self._stream.flush()


def show_logs(verbosity: str) -> None:
    """Show kimi-rotate's lines at termlog's verbosity, as mitmdump does. mitmproxy's own INFO lines (a line per
    client connection) stay hidden unless `termlog_verbosity=debug` asks for everything: a line per request
    says what matters, and records nobody shows are never made."""
    level = logging.getLevelName(verbosity.upper())
    for name in ("kimi_rotate", "kimi_rotator"):
        logging.getLogger(name).setLevel(level)
    if level <= logging.DEBUG:
        logging.getLogger().setLevel(logging.DEBUG)
        for name in ("tornado", "asyncio", "hpack", "quic"):  # as mitmproxy's own tools quiet them
            logging.getLogger(name).setLevel(logging.WARNING)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(ProxyConfig()))
