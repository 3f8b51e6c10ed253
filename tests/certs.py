"""Throwaway PKI for the end-to-end tests.

One test CA and one server certificate whose SANs cover every upstream host kimi-rotate talks to, so the fake
upstream (tests/fakekimi.py) can stand in for all of them on 127.0.0.1, and the proxy can verify it by trusting
``ca.pem`` alone. EC P-256 keeps generation in the low milliseconds.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Every name the fake answers for. echo.test stands for "other traffic" through the proxy; localhost and the IP let
# a client that connects by address still verify the certificate.
SERVER_DNS_NAMES: tuple[str, ...] = (
    "api.kimi.com",
    "api.moonshot.cn",
    "api.moonshot.ai",
    "echo.test",
    "localhost",
)
SERVER_IPS: tuple[str, ...] = ("127.0.0.1",)


@dataclass(frozen=True)
class TestPKI:
    """Paths of the PEM files written by :func:`make_test_pki`."""

    # Not a test class, despite the name: keep pytest from trying to collect it.
    __test__ = False

    dir: Path
    ca_cert: Path  # ca.pem: what clients (and the proxy's upstream verification) must trust
    ca_key: Path
    server_cert: Path  # leaf only
    server_key: Path
    server_chain: Path  # leaf + CA, for servers that want a full chain in one file

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts only the test CA (and verifies hostnames)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_cert))
        # Match the fake's ALPN so a client never tries h2 against an HTTP/1.1-only server.
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        # Test keys are worthless, but some tools refuse world-readable keys.
        path.chmod(0o600)


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """Signatures only (ECDHE does the key exchange); the CA also signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def make_test_pki(dir: Path) -> TestPKI:
    """Create a CA and a server certificate signed by it under ``dir`` (created if missing)."""
    dir.mkdir(parents=True, exist_ok=True)
    # Back-date a little so clock skew between the test process and anything verifying it cannot bite.
    now = dt.datetime.now(dt.UTC)
    not_before = now - dt.timedelta(days=1)
    not_after = now + dt.timedelta(days=30)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kimi-rotate tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, "kimi-rotate test CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    # Strict verifiers (OpenSSL with X509_V_FLAG_X509_STRICT, Python >= 3.13 defaults) want a proper CA profile:
    # critical basicConstraints, keyUsage, SKI, and AKI on the leaf.
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVER_DNS_NAMES]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_IPS]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_DNS_NAMES[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    pki = TestPKI(
        dir=dir,
        ca_cert=dir / "ca.pem",
        ca_key=dir / "ca-key.pem",
        server_cert=dir / "server.pem",
        server_key=dir / "server-key.pem",
        server_chain=dir / "server-chain.pem",
    )
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    server_pem = server_cert.public_bytes(serialization.Encoding.PEM)
    _write(pki.ca_cert, ca_pem)
    _write(pki.ca_key, _key_pem(ca_key), private=True)
    _write(pki.server_cert, server_pem)
    _write(pki.server_key, _key_pem(server_key), private=True)
    _write(pki.server_chain, server_pem + ca_pem)
    return pki
