"""Floods against the real server process: JOINs with made-up ids (never online) are not
selected, so a round runs with the real device instead of waiting out its timeout for them."""

from __future__ import annotations

import queue
from pathlib import Path

import pytest

from sfprompt.protocol.broker import EmbeddedBroker
from sfprompt.protocol.client_config import Inbound, connection_config
from sfprompt.protocol.errors import RequestTimeout
from sfprompt.protocol.messages import Join, ServerStatus
from sfprompt.protocol.mqtt_client import MqttClient
from tests.federation.harness import (
    finish,
    metrics_lines,
    start_fleet_device,
    start_server,
    stop_all,
    write_shards,
)

FAKES = 300
ROUND_TIMEOUT_S = 45


@pytest.mark.slow
def test_fake_joins_do_not_stall_rounds(small_export, tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "data", devices=1, per_device=32)
    out = tmp_path / "server"
    with EmbeddedBroker(tmp_path / "broker") as broker:
        server = start_server(
            "--bundle", str(small_export.server_dir), "--broker", broker.url, "--out", str(out),
            "--rounds", "1", "--min-devices", "1", "--round-timeout", str(ROUND_TIMEOUT_S),
            "--batch-size", "8", log=tmp_path / "server.log",
        )  # fmt: skip
        device = None
        try:
            flood_joins(broker.url, small_export.server.contract_hash())
            device = start_fleet_device(
                small_export, broker.url, shards[0], "dev-0", tmp_path / "dev-0.log",
                "--leave-when-server-stops",
            )  # fmt: skip
            assert finish(server, 3 * ROUND_TIMEOUT_S, tmp_path / "server.log") == 0
        finally:
            stop_all(server, *([device] if device else []))
    (record,) = metrics_lines(out / "metrics.jsonl")
    assert record["selected"] == ["dev-0"] and record["accepted"] == ["dev-0"]
    assert record["seconds"] < ROUND_TIMEOUT_S / 2  # it did not wait for anyone else


def flood_joins(url: str, contract: str) -> None:
    """FAKES JOINs with made-up ids and the right bundle hash, none of them ever online; the
    last as a request, so that all of them have been handled when this returns."""
    client = MqttClient(connection_config(url, "mallory"))
    topics = client.config.topics
    status: queue.Queue[str] = queue.Queue()

    def on_status(inbound: Inbound) -> None:
        if isinstance(inbound.message, ServerStatus):
            status.put(inbound.message.state)

    client.subscribe(topics.server_status(), on_status)
    client.subscribe(topics.device_inbox("fake-last"), lambda inbound: None)
    client.connect()
    try:
        while status.get(timeout=120) != "waiting":
            pass
        for i in range(FAKES):
            device_id = f"fake-{i}"
            join = Join(device_id=device_id, bundle_hash=contract, runtime={}, hardware={})
            reply_to = topics.down(device_id, "status")
            client.publish(topics.up(device_id, "join"), join, response_topic=reply_to)
        last = Join(device_id="fake-last", bundle_hash=contract, runtime={}, hardware={})
        for _ in range(3):
            try:
                client.request(
                    topics.up("fake-last", "join"), last, topics.down("fake-last", "status"), 20
                )
                break
            except RequestTimeout:
                continue
    finally:
        client.close()
