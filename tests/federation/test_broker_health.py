"""The server's embedded broker, as `sfprompt-cloud serve` runs it: it admits only the devices
it was told (each with its own password, no anonymous client), and when its Mosquitto is killed
mid-federation the server starts it again on the same address and the rounds complete."""

from __future__ import annotations

import signal
import socket

import pytest

from sfprompt.protocol.broker import BrokerWatchdog, EmbeddedBroker, WatchPolicy
from sfprompt.protocol.client_config import ClientConfig
from sfprompt.protocol.errors import TransportError
from sfprompt.protocol.mqtt_client import MqttClient
from tests.federation.harness import (
    ROUND_FLAGS,
    brokers_of,
    finish,
    log_text,
    metrics_lines,
    start_fleet_device,
    start_server,
    stop_all,
    write_shards,
)
from tests.helpers import wait_for


@pytest.mark.slow
def test_killed_broker_comes_back_and_the_federation_finishes(small_export, tmp_path):
    """kill -9 of the embedded Mosquitto after round 1: the server starts it again on the same
    port, server and device reconnect by themselves, and all three rounds complete. Before
    that: only the named device gets in, with the password the server wrote for it."""
    shard = write_shards(tmp_path / "data", devices=1, per_device=32)[0]
    out = tmp_path / "server"
    server = start_server(
        "--bundle", str(small_export.server_dir), "--out", str(out), "--rounds", "3",
        "--min-devices", "1", "--round-timeout", "90", "--devices", "pi-1", *ROUND_FLAGS,
        log=tmp_path / "server.log",
    )  # fmt: skip
    device = None
    try:
        wait_for(lambda: (out / "broker_url").exists(), 60, "the broker URL")
        url = (out / "broker_url").read_text().strip()
        password = out / "broker" / "clients" / "pi-1" / "password"
        assert password.stat().st_mode & 0o777 == 0o600
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(TransportError) as info:  # anonymous: refused for good
            MqttClient(ClientConfig("eve", "127.0.0.1", port)).connect(10)
        assert info.value.permanent
        device = start_fleet_device(
            small_export, url, shard, "pi-1", tmp_path / "pi-1.log",
            "--username", "pi-1", "--password-file", str(password), "--leave-when-server-stops",
        )  # fmt: skip
        wait_for(lambda: len(metrics_lines(out / "metrics.jsonl")) >= 1, 180, "round 1")
        (first,) = brokers_of(server)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        wait_for(lambda: len(brokers_of(server)) == 1, 30, "the broker started again")
        (second,) = brokers_of(server)
        assert second.pid != first.pid
        listening = lambda: any(c.laddr.port == port for c in second.net_connections("tcp"))  # noqa: E731
        wait_for(listening, 30, f"the new broker listening on port {port}")
        assert finish(server, 300, tmp_path / "server.log") == 0, log_text(tmp_path / "server.log")
        assert finish(device, 60, tmp_path / "pi-1.log") == 0, log_text(tmp_path / "pi-1.log")
    finally:
        stop_all(server, *([device] if device else []))
    assert [m["round"] for m in metrics_lines(out / "metrics.jsonl")] == [1, 2, 3]
    log = " ".join(log_text(tmp_path / "server.log").split())  # as wrapped by the console
    assert "starting it again on its address" in log and "the broker is back" in log, log


@pytest.mark.slow
def test_serve_without_devices_names_the_way_in(small_export, tmp_path):
    """The embedded broker admits only the devices it is told; without any, serve says how."""
    server = start_server(
        "--bundle", str(small_export.server_dir), "--out", str(tmp_path / "s"),
        log=tmp_path / "server.log",
    )  # fmt: skip
    assert finish(server, 120, tmp_path / "server.log") == 1
    assert "--devices" in log_text(tmp_path / "server.log")


def test_watchdog_gives_up_when_the_address_is_taken(tmp_path):
    """Killed, and its port taken by another process meanwhile: after the allowed failed
    starts the watchdog reports why (the address is taken), and stops."""
    broker = EmbeddedBroker(tmp_path / "b").start()
    broker._process.kill()  # type: ignore[union-attr]  # as kill -9 would
    broker._process.wait()  # type: ignore[union-attr]
    reasons: list[str] = []
    policy = WatchPolicy(interval_s=0.1, max_failed_starts=2, retry_delay_s=0.1)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", broker.port))
        squatter.listen()
        watchdog = BrokerWatchdog(broker, reasons.append, policy).start()
        try:
            wait_for(lambda: bool(reasons), 30, "the watchdog to give up")
        finally:
            watchdog.stop()
            broker.close()
    assert "2 attempts" in reasons[0] and "taken" in reasons[0], reasons
    assert watchdog.failure == reasons[0]


def test_watchdog_policy_is_checked() -> None:
    with pytest.raises(ValueError, match="at least one start"):
        WatchPolicy(max_failed_starts=0)
