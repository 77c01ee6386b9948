"""Fixtures: connected clients on the test's private broker (`broker`, tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sfprompt.protocol.broker import EmbeddedBroker
from sfprompt.protocol.client_config import ClientConfig
from sfprompt.protocol.mqtt_client import MqttClient


@pytest.fixture
def make_client(broker: EmbeddedBroker) -> Iterator[Callable[..., MqttClient]]:
    """Connected clients on the private broker; all closed at teardown."""
    clients: list[MqttClient] = []

    def make(client_id: str, **options: Any) -> MqttClient:
        options.setdefault("reconnect_min_s", 0.1)
        options.setdefault("reconnect_max_s", 1.0)
        config = ClientConfig(client_id, "127.0.0.1", broker.port, **options)
        client = MqttClient(config).connect(timeout=30)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close(send_will=False)
