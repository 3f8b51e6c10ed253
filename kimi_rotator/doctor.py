"""`kimi-rotate doctor`: check a setup end to end, each check with a fix."""

from __future__ import annotations

import socket
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from . import http1
from .ca import CA_CERT
from .models import Surface
from .store import Store, StoreError, open_store
from .store_sqlite import SqliteStore

TIMEOUT = 5.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def check_store(home: Path, spec: str | None = None) -> tuple[Check, Store | None]:
    try:
        store = open_store(spec, home)
    except StoreError as e:
        return Check("store", False, str(e), "see the message above"), None
    if not isinstance(store, SqliteStore):
        return Check("store", True, f"{store.where} answers"), store
    loose = [
        f"{p} is {stat.S_IMODE(p.stat().st_mode):o}"
        for p, want in ((store.home, 0o700), (store.path, 0o600))
        if stat.S_IMODE(p.stat().st_mode) & ~want
    ]
    if loose:
        fix = f"chmod 700 {store.home} && chmod 600 {store.path}"
        return Check("store", False, "permissions too open: " + "; ".join(loose), fix), store
    return Check("store", True, f"{store.path} opens; folder 0700, file 0600"), store


def check_keys(store: Store) -> Check:
    keys = store.keys()
    counts = {s: sum(1 for k in keys if k.surface is s) for s in Surface}
    text = ", ".join(f"{s.value} {n}" for s, n in counts.items())
    usable = sum(1 for k in keys if k.disabled_reason is None)
    if not keys:
        return Check("keys", False, "no keys in the store", "kimi-rotate add-key")
    if not usable:
        return Check("keys", False, f"every key is disabled ({text})", "kimi-rotate list-keys, then kimi-rotate enable")
    return Check("keys", True, f"{text} ({usable} usable)")


def check_ca(confdir: Path) -> Check:
    cert = confdir / CA_CERT
    if cert.is_file():
        return Check("CA", True, f"{cert}")
    return Check("CA", False, f"no CA certificate at {cert}", "kimi-rotate ca (then trust it: certs-howto.md)")


def _connect_tunnel(host: str, port: int, target: str) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=TIMEOUT)
    try:
        sock.sendall(f"CONNECT {target}:443 HTTP/1.1\r\nHost: {target}:443\r\n\r\n".encode())
        received = b""
        while http1.HEAD_END not in received and len(received) < 8192:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
        head, end, _ = received.partition(http1.HEAD_END)
        try:
            status = http1.parse_response_head(head + end)[0] if end else None
        except http1.FramingError:
            status = None
        if status != 200:
            line = head.split(b"\r\n", 1)[0].decode(errors="replace") or "no answer"
            raise OSError(f"the proxy refused CONNECT ({line})")
        return sock
    except BaseException:
        sock.close()
        raise


def check_proxy(host: str, port: int, target: str) -> Check:
    try:
        _connect_tunnel(host, port, target).close()
    except OSError as e:
        return Check("proxy", False, f"nothing usable on {host}:{port}: {e}", "start it: kimi-rotate proxy")
    return Check("proxy", True, f"answers on {host}:{port}")


def check_tls(host: str, port: int, target: str, confdir: Path) -> Check:
    """A TLS handshake to a Kimi host through the proxy, verified with our CA. Sends no request."""
    cert = confdir / CA_CERT
    if not cert.is_file():
        return Check("TLS", False, "skipped: no CA certificate", "kimi-rotate ca")
    context = ssl.create_default_context(cafile=str(cert))
    try:
        with _connect_tunnel(host, port, target) as raw, context.wrap_socket(raw, server_hostname=target):
            pass
    except ssl.SSLCertVerificationError as e:
        return Check("TLS", False, f"{target} through the proxy is not signed by {cert}: {e.verify_message}",
                     "is the proxy started with the same confdir? (kimi-rotate proxy --set confdir=...)")
    except (OSError, ssl.SSLError) as e:
        return Check("TLS", False, f"handshake with {target} through the proxy failed: {e}", "kimi-rotate proxy")
    return Check("TLS", True, f"{target} through the proxy validates with the CA")


def run_checks(home: Path, confdir: Path, host: str, port: int, target: str = "api.kimi.com",
               store_spec: str | None = None) -> list[Check]:
    store_check, store = check_store(home, store_spec)
    checks = [store_check]
    if store is not None:
        checks.append(check_keys(store))
        store.close()
    checks += [check_ca(confdir), check_proxy(host, port, target), check_tls(host, port, target, confdir)]
    return checks
