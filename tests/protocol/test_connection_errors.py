"""What a failed connection says: permanent causes (unknown host, refused credentials) apart from
transient ones (nothing listening yet), each naming what to check; the embedded broker's address
parsing and its refusal of a taken port; passwords read from a file."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from sfprompt.cloud_server.fedavg import RoundInbox
from sfprompt.protocol.broker import BrokerError, EmbeddedBroker, free_port, parse_listen
from sfprompt.protocol.client_config import connection_config, read_password
from sfprompt.protocol.errors import TransportError
from sfprompt.protocol.mqtt_client import MqttClient


def _connect(url: str, timeout: float = 2.0) -> TransportError:
    with pytest.raises(TransportError) as info:
        MqttClient(connection_config(url, "probe", reconnect_max_s=0.5)).connect(timeout)
    return info.value


def test_unknown_host_is_permanent_and_named() -> None:
    started = time.monotonic()
    error = _connect("mqtt://no-such-broker.invalid:1883", timeout=10)
    assert error.permanent
    assert "unknown broker host 'no-such-broker.invalid'" in str(error)
    assert time.monotonic() - started < 5  # not the whole timeout


def test_closed_port_is_transient_and_says_nothing_listens() -> None:
    port = free_port()
    error = _connect(f"mqtt://127.0.0.1:{port}")
    assert not error.permanent
    assert f"nothing listens at 127.0.0.1:{port}" in str(error)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:1883", ("0.0.0.0", 1883)),
        (":1883", ("0.0.0.0", 1883)),
        ("1883", ("127.0.0.1", 1883)),
        ("10.0.0.5", ("10.0.0.5", None)),
        ("[::1]:1884", ("::1", 1884)),
    ],
)
def test_listen_addresses(text: str, expected: tuple[str, int | None]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["host:port", "0.0.0.0:70000", "0.0.0.0:0"])
def test_bad_listen_address_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="port"):
        parse_listen(text)


def test_embedded_broker_refuses_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(BrokerError, match=f"127.0.0.1:{port}.*taken"):
            EmbeddedBroker(tmp_path / "b", port).start()


def test_password_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "password").write_text("s3cret\n")
    assert read_password(None, tmp_path / "password") == "s3cret"
    assert read_password("flag", None) == "flag"
    with pytest.raises(ValueError, match="not both"):
        read_password("flag", tmp_path / "password")
    with pytest.raises(ValueError, match="cannot read the password file"):
        read_password(None, tmp_path / "missing")


def test_a_round_without_updates_says_why_for_each_device() -> None:
    params = {"w": __import__("numpy").zeros(2, "float32")}
    inbox = RoundInbox(3, {"a", "b", "c"}, params, time.monotonic() + 60)
    inbox.drop("b")
    inbox.close()
    assert inbox.missing() == [
        ("a", "no update before the round's deadline"),
        ("b", "went offline"),
        ("c", "no update before the round's deadline"),
    ]
