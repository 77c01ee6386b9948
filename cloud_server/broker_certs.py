"""The certificates of a broker set-up: a CA, the broker's server certificate, one client
certificate per user; EC P-256 keys, written PEM (private keys mode 0600)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def make_ca(days: int) -> tuple[Any, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sfprompt CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
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
    return key, cert


def make_leaf(
    common_name: str, ca_key: Any, ca_cert: Any, days: int, server: bool, names: Sequence[str]
) -> tuple[Any, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def _general_name(name: str) -> Any:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def key_pem(key: Any) -> bytes:
    pem: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem


def cert_pem(cert: Any) -> bytes:
    pem: bytes = cert.public_bytes(serialization.Encoding.PEM)
    return pem


def write_pem(path: Path, data: bytes, private: bool = False) -> None:
    """Mode 0600 (private) or 0644, whatever the umask: the broker, once it has dropped root,
    must read the certificates, and under root's umask 077 they would be 0600 root."""
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), mode)
        handle.write(data)


def load_ca(certs: Path) -> tuple[Any, Any]:
    """The CA key and certificate a previous run wrote under `certs/`, to sign more clients."""
    key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    return key, cert


def write_certificates(
    out: Path, users: Sequence[str], days: int, hostnames: Sequence[str]
) -> dict[str, str]:
    """CA (out/certs/ca.*), broker (out/certs/server.*, for `hostnames`) and client
    certificates (`write_client`), and a fresh password per user (returned)."""
    ca_key, ca_cert = make_ca(days)
    write_pem(out / "certs" / "ca.key", key_pem(ca_key), private=True)
    write_pem(out / "certs" / "ca.crt", cert_pem(ca_cert))
    server_key, server_cert = make_leaf(
        "sfprompt-broker", ca_key, ca_cert, days, server=True, names=hostnames
    )
    write_pem(out / "certs" / "server.key", key_pem(server_key), private=True)
    write_pem(out / "certs" / "server.crt", cert_pem(server_cert))
    return {user: write_client(out, user, ca_key, ca_cert, days) for user in users}


def write_client(out: Path, user: str, ca_key: Any, ca_cert: Any, days: int) -> str:
    """clients/<user>/ (0700, the writer's: it is for another machine, not the broker):
    certificate, key, the CA certificate and a fresh password (returned)."""
    folder = out / "clients" / user
    folder.mkdir(mode=0o700)
    folder.chmod(0o700)
    key, cert = make_leaf(user, ca_key, ca_cert, days, server=False, names=())
    write_pem(folder / "client.key", key_pem(key), private=True)
    write_pem(folder / "client.crt", cert_pem(cert))
    shutil.copyfile(out / "certs" / "ca.crt", folder / "ca.crt")
    password = secrets.token_urlsafe(24)
    write_pem(folder / "password", password.encode() + b"\n", private=True)
    return password
