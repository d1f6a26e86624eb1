"""The local stack's PKI: one CA, a server certificate, a client certificate per component.

Why our own CA: ``ferry up`` must run over TLS (and mutual TLS) with nothing installed first.
Everything is made with the ``cryptography`` package's x509 API (ECDSA P-256: small, and fast
to handshake on the edge's slow cores), under ``<stack dir>/tls/``, private keys mode 0600. A
file is made again only when it is missing, unreadable, expired or about to expire, or no longer
signed by the current CA (a new CA re-issues everything below it), so a restart keeps the
certificates clients already trust.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Validity of what is issued; re-issued once less than ``RENEW_BEFORE`` is left.
CA_DAYS = 3650
LEAF_DAYS = 825
RENEW_BEFORE = datetime.timedelta(days=30)
ORGANIZATION = "Ferry local stack"


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key, both PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class LocalPKI:
    """What ``ensure`` made: the CA certificate, the server pair, and a client pair by name."""

    dir: Path
    ca: Path
    server: Pair
    clients: dict[str, Pair]


def ca_path(directory: Path) -> Path:
    return directory / "ca.pem"


def pair(directory: Path, name: str) -> Pair:
    """Where the pair of ``name`` lives (made there by ``ensure``)."""
    return Pair(directory / f"{name}.pem", directory / f"{name}.key")


def ensure(directory: Path, hosts: Iterable[str], clients: Iterable[str]) -> LocalPKI:
    """Make (or keep) the CA, a server certificate valid for ``hosts`` (plus 127.0.0.1 and
    localhost) and one client certificate per name in ``clients`` (its CN is the name)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca_pair = Pair(ca_path(directory), directory / "ca.key")
    ca_cert, ca_key = _ensure_ca(ca_pair)
    names = sorted({"127.0.0.1", "localhost", *hosts})
    server = pair(directory, "server")
    _ensure_leaf(server, "ferry-server", ca_cert, ca_key, server=True, hosts=names)
    issued: dict[str, Pair] = {}
    for name in clients:
        if name in ("ca", "server"):
            raise ValueError(f"{name!r} cannot name a client certificate")
        issued[name] = pair(directory, name)
        _ensure_leaf(issued[name], name, ca_cert, ca_key, server=False, hosts=[])
    return LocalPKI(directory, ca_pair.cert, server, issued)


def _ensure_ca(pair: Pair) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    loaded = _load(pair)
    if loaded is not None and _fresh(loaded[0]):
        return loaded
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, "Ferry local CA"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(pair, cert, key)
    return cert, key


def _ensure_leaf(
    pair: Pair,
    common_name: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    server: bool,
    hosts: list[str],
) -> None:
    loaded = _load(pair)
    if loaded is not None and _fresh(loaded[0]) and _issued_by(loaded[0], ca_cert, hosts):
        return
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=LEAF_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False
        )
    _write(pair, builder.sign(ca_key, hashes.SHA256()), key)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _load(pair: Pair) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    try:
        cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
        key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return None
    if public.public_numbers() != key.public_key().public_numbers():
        return None
    return cert, key


def _fresh(cert: x509.Certificate) -> bool:
    now = _now()
    return cert.not_valid_before_utc <= now and now + RENEW_BEFORE < cert.not_valid_after_utc


def _issued_by(cert: x509.Certificate, ca: x509.Certificate, hosts: list[str]) -> bool:
    """Signed by ``ca`` (not one it replaced) and, for a server, naming every host."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    if not hosts:
        return True
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return set(san) >= {_general_name(h) for h in hosts}


def _write(pair: Pair, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    """Key first, created 0600 (never world-readable, not even for an instant)."""
    pem_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = pair.key.with_suffix(".key.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem_key)
    os.replace(tmp, pair.key)
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def main(argv: list[str] | None = None) -> int:
    """``python tools/stack/pki.py DIR --host H ... --client NAME ...``: the same PKI for a
    deployment (``deploy/mosquitto/credentials.sh`` calls it); prints what it wrote."""
    import argparse

    parser = argparse.ArgumentParser(prog="pki.py", description=__doc__)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--host", action="append", default=[], help="a name of the server")
    parser.add_argument("--client", action="append", default=[], help="a client certificate")
    args = parser.parse_args(argv)
    try:
        made = ensure(args.dir, args.host, args.client)
    except (OSError, ValueError) as exc:
        print(f"pki: {exc}", file=sys.stderr)
        return 1
    print(f"pki: CA {made.ca}, server {made.server.cert}, {len(made.clients)} client certificates")
    return 0


if __name__ == "__main__":
    sys.exit(main())
