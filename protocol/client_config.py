"""How a client connects, and what its handlers receive (see `mqtt_client.py`, `transport.py`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from .codec import Expectations, encode
from .messages import Message, Presence
from .topics import Topics
from .wire import Limits


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA that signed the broker, and this client's certificate and key."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class ClientConfig:
    client_id: str
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: TlsFiles | None = None
    keepalive_s: int = 30
    session_expiry_s: int = 3600  # how long the broker keeps our session and QoS 1 queue offline
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    max_chunk_bytes: int = 8 << 20  # larger payloads (or above the broker's limit) are chunked
    limits: Limits = field(default_factory=Limits)
    expect: Expectations | None = None  # tensor shapes from the bundle manifest
    will: tuple[str, bytes] | None = None  # retained Last Will: (topic, encoded payload)
    topics: Topics = field(default_factory=Topics)

    @classmethod
    def from_url(cls, url: str, client_id: str, **options: Any) -> ClientConfig:
        """`mqtt://[user[:password]@]host[:port]` or `mqtts://...` (TLS needs `tls=TlsFiles`)."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"broker URL must be mqtt://host:port or mqtts://host:port: {url!r}")
        if parts.scheme == "mqtts" and "tls" not in options:
            raise ValueError("an mqtts:// URL needs tls=TlsFiles(ca_file=...)")
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        return cls(client_id, parts.hostname, port, user, password, **options)


@dataclass(frozen=True)
class Inbound:
    """A delivered message and the MQTT v5 properties a handler may need to answer it."""

    topic: str
    message: Message
    response_topic: str | None = None
    correlation: bytes | None = None
    payload_bytes: int = 0  # the whole message as it crossed the wire (chunks put together)


Handler = Callable[[Inbound], "Message | None"]  # a returned message is sent as the reply


def presence_will(device_id: str, topics: Topics | None = None) -> tuple[str, bytes]:
    """The Last Will of a device: its presence, offline, retained."""
    topic = (topics or Topics()).presence(device_id)
    return topic, encode(Presence(device_id=device_id, online=False))


def read_password(password: str | None, password_file: str | Path | None) -> str | None:
    """The password given, or the first line of `password_file` (as broker-config writes it
    in clients/ID/password): a file keeps it out of `ps` and shell history."""
    if password_file is None:
        return password
    if password is not None:
        raise ValueError("give either a password or a password file, not both")
    try:
        return Path(password_file).read_text().splitlines()[0].strip()
    except (OSError, IndexError) as exc:
        raise ValueError(f"cannot read the password file {password_file}: {exc}") from None


def connection_config(
    url: str,
    client_id: str,
    *,
    username: str | None = None,
    password: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    **options: Any,
) -> ClientConfig:
    """A ClientConfig from command-line style settings: flags override the URL's user and
    password, and a CA file switches TLS on (an mqtt:// URL becomes mqtts:// semantics)."""
    if tls_ca is not None:
        options["tls"] = TlsFiles(tls_ca, tls_cert, tls_key)
    elif tls_cert or tls_key:
        raise ValueError("--tls-cert and --tls-key need --tls-ca (the broker's CA certificate)")
    cfg = ClientConfig.from_url(url, client_id, **options)
    if username is not None:
        cfg = replace(cfg, username=username, password=password)
    return cfg
