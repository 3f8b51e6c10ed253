"""mitmproxy's certificate authority: create it without a proxy, and say how to trust it."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import certifi

CA_CERT = "mitmproxy-ca-cert.pem"
BUNDLE = "kimi-rotate-ca-bundle.pem"


@dataclass(frozen=True)
class CAInfo:
    confdir: Path
    cert: Path  # what clients trust (public)
    bundle: Path  # the public CAs plus ours, for clients that take a single CA file (SSL_CERT_FILE)
    created: bool


def default_confdir() -> Path:
    return Path("~/.mitmproxy").expanduser()


def ensure_ca(confdir: Path | None = None) -> CAInfo:
    """Create mitmproxy's CA in `confdir` if missing (as mitmproxy would), and the bundle."""
    from mitmproxy.certs import CertStore  # a heavy import: only when needed

    folder = (confdir or default_confdir()).expanduser()
    cert = folder / CA_CERT
    created = not cert.exists()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    CertStore.from_store(str(folder), "mitmproxy", 2048)
    bundle = folder / BUNDLE
    # The bundle keeps every public CA so that SSL_CERT_FILE does not break other hosts, whose
    # TLS the proxy passes through untouched.
    content = Path(certifi.where()).read_bytes().rstrip(b"\n") + b"\n" + cert.read_bytes()
    if not bundle.exists() or bundle.read_bytes() != content:
        bundle.write_bytes(content)
    return CAInfo(confdir=folder, cert=cert, bundle=bundle, created=created)


def env_lines(proxy_url: str, ca: CAInfo, platform: str = sys.platform) -> list[str]:
    """The lines a user pastes into the shell that runs the agent."""
    values = {
        "HTTPS_PROXY": proxy_url,
        "NODE_EXTRA_CA_CERTS": str(ca.cert),
        "SSL_CERT_FILE": str(ca.bundle),
        "REQUESTS_CA_BUNDLE": str(ca.bundle),
        "CURL_CA_BUNDLE": str(ca.bundle),
    }
    if platform.startswith("win"):
        return [f'$env:{k} = "{v}"' for k, v in values.items()]
    return [f"export {k}={_quote(v)}" for k, v in values.items()]


def trust_commands(ca: CAInfo, platform: str = sys.platform) -> list[str]:
    """Commands that make the operating system trust the CA (see certs-howto.md for the rest)."""
    cert = str(ca.cert)
    if platform == "darwin":
        return [f"sudo security add-trusted-cert -d -p ssl -r trustRoot -k /Library/Keychains/System.keychain {cert}"]
    if platform.startswith("win"):
        cer = str(ca.confdir / "mitmproxy-ca-cert.cer")
        return [f'certutil -addstore -user Root "{cer}"']
    if os.path.isdir("/usr/local/share/ca-certificates"):  # Debian, Ubuntu
        return [f"sudo cp {cert} /usr/local/share/ca-certificates/kimi-rotate-mitmproxy.crt",
                "sudo update-ca-certificates"]
    return [f"sudo trust anchor --store {cert}   # Fedora, RHEL, Arch (p11-kit)"]


def _quote(value: str) -> str:
    return value if all(c.isalnum() or c in "/._-:~" for c in value) else "'" + value.replace("'", "'\\''") + "'"
