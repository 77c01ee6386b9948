"""Write a production Mosquitto configuration: TLS, passwords, and an ACL per device.

What it writes under the output folder:

    mosquitto.conf          one TLS listener, no anonymous access, persistence on
    acl                     each device reads/writes only its own topics; the server all of them
    passwd                  PBKDF2-SHA512 hashes (mosquitto 2 `$7$` format)
    certs/ca.crt, ca.key    the CA that signs everything (keep ca.key offline)
    certs/server.crt, .key  the broker's certificate, for the given host names and IPs
    clients/<id>/           per client (each device, and the server): ca.crt, client.crt,
                            client.key, password -- copy this folder to that machine

`cryptography` comes with the `cloud` extra; the CLI imports this module only when the command
runs. Devices need both their certificate and their password (defence in depth: a leaked password
alone, or a copied certificate alone, is not enough). Keys are written mode 0600.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sfprompt.protocol.messages import check_device_id
from sfprompt.protocol.topics import Topics

PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default for `$7$` hashes
SALT_BYTES = 12


@dataclass(frozen=True)
class BrokerConfigOptions:
    out: Path
    devices: tuple[str, ...]
    server_user: str = "server"  # the user name (and client id) of the cloud server
    port: int = 8883
    bind: str = "0.0.0.0"
    hostnames: tuple[str, ...] = ("localhost", "127.0.0.1")  # names/IPs in the broker cert
    install_dir: Path | None = None  # where the folder will live on the broker host
    run_as: str | None = None  # mosquitto's `user` option (the account it drops root to)
    max_packet_size: int = 16 << 20  # clients chunk payloads to fit under it
    days: int = 825
    topics: Topics = field(default_factory=Topics)


@dataclass(frozen=True)
class BrokerConfigFiles:
    config: Path
    acl: Path
    passwd: Path
    ca_cert: Path
    client_dirs: dict[
        str, Path
    ]  # user name -> folder with ca.crt, client.crt, client.key, password


def write_broker_config(
    options: BrokerConfigOptions, use_mosquitto_passwd: bool = True
) -> BrokerConfigFiles:
    """Generate every file; raises ValueError for bad device ids or an existing non-empty folder."""
    users = _check_users(options)
    out = options.out
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; choose a new folder (nothing is overwritten)")
    (out / "certs").mkdir(parents=True)
    (out / "data").mkdir()
    home = (options.install_dir or out).resolve()

    ca_key, ca_cert = _make_ca(options.days)
    _write_pem(out / "certs" / "ca.key", _key_pem(ca_key), private=True)
    _write_pem(out / "certs" / "ca.crt", _cert_pem(ca_cert))
    server_key, server_cert = _make_leaf(
        "sfprompt-broker", ca_key, ca_cert, options.days, server=True, names=options.hostnames
    )
    _write_pem(out / "certs" / "server.key", _key_pem(server_key), private=True)
    _write_pem(out / "certs" / "server.crt", _cert_pem(server_cert))

    passwords: dict[str, str] = {}
    client_dirs: dict[str, Path] = {}
    for user in users:
        folder = out / "clients" / user
        folder.mkdir(parents=True)
        key, cert = _make_leaf(user, ca_key, ca_cert, options.days, server=False, names=())
        _write_pem(folder / "client.key", _key_pem(key), private=True)
        _write_pem(folder / "client.crt", _cert_pem(cert))
        shutil.copyfile(out / "certs" / "ca.crt", folder / "ca.crt")
        passwords[user] = secrets.token_urlsafe(24)
        _write_pem(folder / "password", passwords[user].encode() + b"\n", private=True)
        client_dirs[user] = folder

    passwd = out / "passwd"
    _write_passwords(passwd, passwords, use_mosquitto_passwd)
    acl = out / "acl"
    acl.write_text(_acl_text(options))
    config = out / "mosquitto.conf"
    config.write_text(_config_text(options, home))
    return BrokerConfigFiles(config, acl, passwd, out / "certs" / "ca.crt", client_dirs)


def _check_users(options: BrokerConfigOptions) -> list[str]:
    if not options.devices:
        raise ValueError("give at least one device id (--devices ID...)")
    devices = [check_device_id(d, "device id") for d in options.devices]
    check_device_id(options.server_user, "server user")
    if options.server_user in devices:
        raise ValueError(f"device id {options.server_user!r} is the server's user name")
    if len(set(devices)) != len(devices):
        raise ValueError("device ids must be distinct")
    return [options.server_user, *devices]


def _acl_text(options: BrokerConfigOptions) -> str:
    topics = options.topics
    lines = [
        "# Generated by sfprompt-cloud broker-config.",
        "# Every user: only the topics under its own name (%u = authenticated user name),",
        "# plus the broadcast and server-status topics it must read.",
        *topics.device_acl_patterns(),
        "",
        "# The server reads and writes the whole tree.",
        f"user {options.server_user}",
        *topics.server_acl_topics(),
    ]
    return "\n".join(lines) + "\n"


def _config_text(options: BrokerConfigOptions, home: Path) -> str:
    lines = [
        "# Generated by sfprompt-cloud broker-config; run with: mosquitto -c mosquitto.conf",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {home / 'passwd'}",
        f"acl_file {home / 'acl'}",
        "persistence true",
        f"persistence_location {home / 'data'}/",
        "max_queued_messages 10000",
        f"max_packet_size {options.max_packet_size}",
        "",
        f"listener {options.port} {options.bind}",
        f"cafile {home / 'certs' / 'ca.crt'}",
        f"certfile {home / 'certs' / 'server.crt'}",
        f"keyfile {home / 'certs' / 'server.key'}",
        "require_certificate true",
        "use_identity_as_username false",
        "tls_version tlsv1.2",
    ]
    if options.run_as:
        lines.insert(1, f"user {options.run_as}")
    return "\n".join(lines) + "\n"


# ---- passwords -------------------------------------------------------------------------------
def mosquitto_password_hash(password: str, salt: bytes | None = None) -> str:
    """The `$7$` PBKDF2-SHA512 line format mosquitto 2 reads from its password_file."""
    salt = salt or os.urandom(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    encoded = [base64.b64encode(part).decode() for part in (salt, digest)]
    return f"$7${PBKDF2_ITERATIONS}${encoded[0]}${encoded[1]}"


def _write_passwords(path: Path, passwords: dict[str, str], use_tool: bool) -> None:
    tool = shutil.which("mosquitto_passwd") if use_tool else None
    if tool is None:
        lines = [f"{user}:{mosquitto_password_hash(pw)}" for user, pw in passwords.items()]
        _write_pem(path, ("\n".join(lines) + "\n").encode(), private=True)
        return
    path.touch(mode=0o600)
    for user, password in passwords.items():
        subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True)


# ---- certificates ----------------------------------------------------------------------------
def _make_ca(days: int) -> tuple[Any, Any]:
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


def _make_leaf(
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


def _key_pem(key: Any) -> bytes:
    pem: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem


def _cert_pem(cert: Any) -> bytes:
    pem: bytes = cert.public_bytes(serialization.Encoding.PEM)
    return pem


def _write_pem(path: Path, data: bytes, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
