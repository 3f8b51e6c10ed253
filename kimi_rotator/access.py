"""Who may have a pooled key put on their request.

mitmproxy listens on every interface unless told otherwise, and whoever can reach a proxy that hands out keys can
spend them. So unless something vouches for a client (the client token, proxy authentication, or the user saying
every client is welcome), a key goes only to clients on this machine.
"""

from __future__ import annotations

import enum
import ipaddress

from mitmproxy import connection
from mitmproxy.proxy import mode_specs

ALLOW_HINT = ("to serve other machines, set kimi_client_token (clients then send it as their API key), "
              "proxyauth=user:pass, or kimi_allow_remote=true")


class KeyAccess(enum.Enum):
    """Which clients get a key, as the log says it once at start."""

    LOOPBACK = f"keys go only to clients on this machine; {ALLOW_HINT}"
    TOKEN = "keys go to clients that send kimi_client_token as their API key, from any address"
    PROXY_AUTH = "keys go to clients that pass proxy authentication (proxyauth), from any address"
    ANYONE = "keys go to every client that can reach the proxy (kimi_allow_remote): anyone there can spend them"


def key_access(client_token: str, proxyauth: str | None, allow_remote: bool) -> KeyAccess:
    """What the options allow. `proxyauth=any` accepts every user and password, so it vouches for no one."""
    if client_token:
        return KeyAccess.TOKEN
    if proxyauth and proxyauth != "any":
        return KeyAccess.PROXY_AUTH
    return KeyAccess.ANYONE if allow_remote else KeyAccess.LOOPBACK


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, `localhost`, and 127.x written as IPv6 (::ffff:127.0.0.1): a dual-stack listener reports
    its IPv4 clients that way."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 scope (%lo) is no part of the address
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def from_this_machine(client: connection.Client) -> bool:
    """A loopback peer, or a program on this machine that mitmproxy's local mode redirected (those connect with the
    machine's own address)."""
    if isinstance(client.proxy_mode, mode_specs.LocalMode):
        return True
    peer = client.peername
    return bool(peer) and is_loopback(str(peer[0]))


def refusal(client: connection.Client) -> str:
    """The local 403's message for a client that key_access does not let in."""
    peer = client.peername[0] if client.peername else "an unknown address"
    return (f"kimi-rotate gives its keys only to clients on its own machine, and this request came from {peer}; "
            f"the proxy's owner can allow it: {ALLOW_HINT}")
