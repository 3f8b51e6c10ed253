"""Which flows are Kimi flows, and how their credential is swapped.

It imports no mitmproxy at load time (flows and headers are only read here), so the upstream client and the
failover loop, which need KIMI_PORT and `with_credential`, load without it.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import TYPE_CHECKING

from .models import Surface

if TYPE_CHECKING:
    from mitmproxy import http

DEFAULT_HOSTS: dict[str, Surface] = {
    "api.moonshot.cn": Surface.MOONSHOT_CN,
    "api.moonshot.ai": Surface.MOONSHOT_AI,
    "api.kimi.com": Surface.KIMI_CODE,
}
KIMI_PORT = 443  # Kimi's API is HTTPS on the default port
PLACEHOLDER_PREFIX = "kimi-rotate:"


def normalize_host(host: str) -> str:
    """DNS names are case-insensitive and may end in a root dot; both forms are one host."""
    return host.lower().removesuffix(".")


def parse_host_map(entries: Iterable[str]) -> dict[str, Surface]:
    """`host=surface` pairs from the kimi_hosts option, added to the built-in table."""
    table = dict(DEFAULT_HOSTS)
    for entry in entries:
        host, sep, surface = entry.partition("=")
        if not sep or not host.strip():
            raise ValueError(f"kimi_hosts entry {entry!r} is not host=surface")
        try:
            table[normalize_host(host.strip())] = Surface(surface.strip())
        except ValueError:
            choices = ", ".join(s.value for s in Surface)
            raise ValueError(f"kimi_hosts entry {entry!r}: surface must be one of {choices}") from None
    return table


def parse_resolve(entries: Iterable[str]) -> dict[str, tuple[str, int]]:
    """`host=address:port` pairs: connect there instead of resolving the host (like curl --resolve)."""
    from mitmproxy.net.http.url import parse_authority  # read once, in `configure`

    out: dict[str, tuple[str, int]] = {}
    for entry in entries:
        host, sep, target = entry.partition("=")
        try:
            if not sep:
                raise ValueError
            address, port = parse_authority(target.strip(), check=True)
            if port is None:
                raise ValueError
        except ValueError:
            raise ValueError(f"kimi_resolve entry {entry!r} is not host=address:port") from None
        out[normalize_host(host.strip())] = (address, port)
    return out


def reverse_resolve(resolve: dict[str, tuple[str, int]]) -> dict[tuple[str, int], tuple[str, ...]]:
    """address -> every host kimi_resolve sends there (several hosts may share one address)."""
    out: dict[tuple[str, int], tuple[str, ...]] = {}
    for host, address in resolve.items():
        out[address] = (*out.get(address, ()), host)
    return out


def real_target(
    address: tuple[str, int], resolved_back: dict[tuple[str, int], tuple[str, ...]], sni: str | None = None
) -> tuple[str, int]:
    """The host and port the client asked for, seeing through a kimi_resolve redirection.

    When several hosts resolve to one address, the TLS server name tells which one the client meant.
    """
    hosts = resolved_back.get(address)
    if not hosts:
        return normalize_host(address[0]), address[1]
    wanted = normalize_host(sni) if sni else None
    return (wanted if wanted in hosts else hosts[0]), KIMI_PORT


def flow_surface(
    flow: http.HTTPFlow, hosts: dict[str, Surface], resolved_back: dict[tuple[str, int], tuple[str, ...]]
) -> Surface | None:
    """The surface of a flow whose real target is a Kimi host over HTTPS on 443, else None.

    The target is where mitmproxy connects (inside a CONNECT tunnel: the tunnel's authority, not
    the Host header) and it must agree with the TLS server name the client asked for, so neither a
    Host header nor a URL that merely mentions a Kimi host can attract a key.
    """
    req = flow.request
    host, port = real_target((req.host, req.port), resolved_back, flow.client_conn.sni)
    if req.scheme != "https" or port != KIMI_PORT:
        return None
    surface = hosts.get(host)
    if surface is None:
        return None
    sni = flow.client_conn.sni
    if sni is None or normalize_host(sni) != host:
        return None
    return surface


def client_credential(headers: http.Headers) -> str | None:
    auth: str | None = headers.get("authorization")
    if auth is not None:
        scheme, _, value = auth.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else auth
    api_key: str | None = headers.get("x-api-key")
    return api_key


def credential_matches(headers: http.Headers, token: str) -> bool:
    """Constant-time comparison with the client token, over every credential the client sent."""
    sent = [v for v in (client_credential(headers), headers.get("x-api-key")) if v is not None]
    # mitmproxy hands bytes that are not UTF-8 over as surrogates: encode them back rather than raise.
    return any(hmac.compare_digest(v.encode("utf-8", "surrogateescape"), token.encode()) for v in sent)


_CREDENTIAL_HEADERS = (b"authorization", b"x-api-key")


def with_credential(fields: Iterable[tuple[bytes, bytes]], secret: str, path: str) -> list[tuple[bytes, bytes]]:
    """The request's headers with `secret` as the credential, in the style the client used (both if it sent both).

    Every other header keeps its bytes and place. A repeated credential header goes out once, so no
    second value the client sent reaches Kimi. A client that sent none gets the style its route
    expects: x-api-key on Anthropic Messages routes, Bearer elsewhere.
    """
    key = secret.encode()
    out: list[tuple[bytes, bytes]] = []
    seen: set[bytes] = set()
    for name, value in fields:
        lower = name.lower()
        if lower in _CREDENTIAL_HEADERS:
            if lower in seen:
                continue
            seen.add(lower)
            value = b"Bearer " + key if lower == b"authorization" else key
        out.append((name, value))
    if not seen:
        if path.split("?", 1)[0].endswith("/messages"):
            out.append((b"x-api-key", key))
        else:
            out.append((b"authorization", b"Bearer " + key))
    return out


def placeholder(fingerprint: str) -> str:
    return f"{PLACEHOLDER_PREFIX}{fingerprint}"


def is_placeholder(headers: http.Headers) -> bool:
    value = client_credential(headers)
    return value is not None and value.startswith(PLACEHOLDER_PREFIX)


def hide_credential(headers: http.Headers, fingerprint: str) -> None:
    """Replace the real key in a flow with a placeholder naming the key, for views and saved flows."""
    value = placeholder(fingerprint)
    if "authorization" in headers:
        headers["authorization"] = f"Bearer {value}"
    if "x-api-key" in headers:
        headers["x-api-key"] = value
