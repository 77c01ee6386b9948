"""Why a connection failed, as a `TransportError` that says what to check.

`permanent` separates what retrying with the same settings cannot heal (unknown host, TLS
refused, not authorised) from what it may (nothing listening yet, a timeout), so that a device
stops and says so rather than retrying forever.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from typing import Any

from .client_config import ClientConfig
from .errors import TransportError

NOT_AUTHORIZED = 0x87
"""The MQTT v5 reason code a broker gives for a topic or client it does not allow."""

PERMANENT_REFUSALS = frozenset({0x80, 0x82, 0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C, 0x90, 0x99})
"""CONNACK (and PUBACK) reason codes that another attempt with the same settings cannot change."""

_REFUSAL_HINTS = {
    0x85: " (the client id is not allowed: with broker-config it must be the device's user)",
    0x86: " (check the user name and password: --username, --password-file)",
    0x87: " (this user may not connect, or the client id is not its own: the device id "
    "must be the device's broker user)",
    0x8A: " (the broker has banned this client)",
}


def connect_failure(exc: OSError, host: str, port: int) -> TransportError:
    """A connection attempt's OSError as a TransportError that says what to check."""
    where = f"{host}:{port}"
    if isinstance(exc, socket.gaierror):
        return TransportError(f"unknown broker host {host!r}: {exc.strerror}", permanent=True)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TransportError(
            f"TLS: the broker at {where} has a certificate that --tls-ca does not verify "
            f"({exc.verify_message}); check the CA file and that the host name is in the "
            "broker's certificate (broker-config --hostname)",
            permanent=True,
        )
    if isinstance(exc, ssl.SSLError):
        return TransportError(f"TLS with the broker at {where} failed: {exc}", permanent=True)
    if isinstance(exc, ConnectionRefusedError):
        return TransportError(f"nothing listens at {where} (connection refused)")
    if isinstance(exc, TimeoutError | socket.timeout):
        return TransportError(f"no answer from {where} (timed out; a firewall?)")
    return TransportError(f"cannot reach the broker at {where}: {exc}")


def is_tls_failure(text: str) -> bool:
    """paho's log of a TLS alert the broker sent after the handshake (e.g. certificate required
    under TLS 1.3), which no retry heals."""
    return "SSL" in text or "certificate" in text.lower()


def connection_refused(config: ClientConfig, reason: Any) -> TransportError:
    """A CONNACK that refused us (`reason`: paho's reason code), with a hint for the usual
    causes."""
    code = int(reason.value)
    user = "" if config.username is None else f" (user {config.username!r})"
    return TransportError(
        f"the broker at {config.host}:{config.port} refused {config.client_id!r}{user}: "
        f"{reason}{_REFUSAL_HINTS.get(code, '')}",
        code,
        permanent=code in PERMANENT_REFUSALS,
    )


def tls_refused(config: ClientConfig, text: str) -> TransportError:
    """A TLS alert before the first connection, from paho's log line `text`."""
    return TransportError(
        f"TLS: the broker at {config.host}:{config.port} refused this client ({text}); "
        "does it need a client certificate (--tls-cert, --tls-key)?",
        permanent=True,
    )


def topics_refused(
    config: ClientConfig, filters: Sequence[str], codes: Sequence[Any]
) -> TransportError:
    """A SUBACK that refused some of the filters subscribed at connect time (`codes`: paho's
    reason codes): the usual cause is a device id that is not the device's broker user."""
    refused = [f for f, code in zip(filters, codes, strict=False) if code.is_failure]
    return TransportError(
        f"the broker at {config.host}:{config.port} refused user {config.username!r} "
        f"(client id {config.client_id!r}) the topics {', '.join(refused) or codes}: with "
        "broker-config the device id must be the device's broker user",
        NOT_AUTHORIZED,
        permanent=True,
    )
