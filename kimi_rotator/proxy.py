"""`kimi-rotate proxy`: mitmproxy with the kimi-rotate addon and only the addons this use needs.

Stock mitmdump walks every event through 35 addons; dispatch, not TLS, is where its time goes.
The slim master keeps what a rotating proxy needs (proxy server, layer selection, TLS, proxy
authentication, upstream proxy credentials, the global-client block) and drops the rest. `--web`
runs mitmweb's full master instead, for debugging.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mitmproxy import addonmanager, exceptions, hooks, master, options
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


class ProxyError(Exception):
    """A problem with how the proxy was asked to start; the message says what to do."""


@dataclass(frozen=True)
class ProxyConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    web: bool = False
    sets: Sequence[str] = ()
    allow_remote: bool = False


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
            lines.append(f"Keys: {counts}   (store: {self.rotate.store.path if self.rotate.store else '?'})")
            if not pool.roster.keys:
                lines.append("No keys yet: add one with `kimi-rotate add-key` (it is picked up without a restart).")
        lines.append(f"CA certificate: {self.ca.cert}   (trust it once: `kimi-rotate ca`, see certs-howto.md)")
        lines.append("Paste into the shell that runs your agent:")
        lines += [f"  {line}" for line in env_lines(url, self.ca)]
        print("\n".join(lines), flush=True)


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
    from mitmproxy import ctx

    found = ctx.master.addons.get("proxyserver")
    return found if isinstance(found, proxyserver.Proxyserver) else None


def build_master(config: ProxyConfig, loop: asyncio.AbstractEventLoop) -> master.Master:
    opts = options.Options(listen_host=config.host, listen_port=config.port)
    rotate = KimiRotate()
    m: master.Master
    if config.web:
        from mitmproxy.tools.web.master import WebMaster

        m = WebMaster(opts, with_termlog=True)
        m.addons.add(rotate)
        m.options.update(web_open_browser=False)
    else:
        m = master.Master(opts, event_loop=loop)
        m.addons = CachedAddonManager(m)
        m._termlog_addon = termlog.TermLog()  # where with_termlog=True would put it: `done` uninstalls it
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
            rotate,
            errorcheck.ErrorCheck(),
        )
    try:
        m.options.set(*config.sets)
    except exceptions.OptionsError as e:
        raise ProxyError(f"bad --set option: {e}; see `mitmdump --options` for names") from None
    if config.allow_remote:
        m.options.update(kimi_allow_remote=True)
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
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, m.shutdown)
            except (NotImplementedError, RuntimeError):  # Windows' event loop
                signal.signal(sig, lambda *_: loop.call_soon_threadsafe(m.shutdown))
        await m.run()

    try:
        asyncio.run(main())
    except ProxyError:
        raise
    except OSError as e:
        raise ProxyError(f"could not listen on {config.host}:{config.port} ({e.strerror}); "
                         "pick another --port or stop what uses it") from None
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(ProxyConfig()))
