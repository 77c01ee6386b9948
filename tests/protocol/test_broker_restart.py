"""Broker failures: clients reconnect by themselves, and QoS 1 messages of persistent sessions
reach the application exactly once, whether the broker is killed (SIGKILL) or stopped."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sfprompt.protocol.broker import EmbeddedBroker
from sfprompt.protocol.client_config import ClientConfig, Inbound
from sfprompt.protocol.messages import BodyOut, Message, PhaseSettings, Smashed, Task
from sfprompt.protocol.mqtt_client import MqttClient
from sfprompt.protocol.topics import Topics
from tests.helpers import wait_for

T = Topics()


def _client(broker: EmbeddedBroker, client_id: str) -> MqttClient:
    return MqttClient(
        ClientConfig(client_id, "127.0.0.1", broker.port, reconnect_min_s=0.1, reconnect_max_s=0.5)
    )


@pytest.mark.slow
def test_sigkill_mid_exchange_every_request_handled_once(tmp_path: Path) -> None:
    """The broker is killed and restarted while a device streams requests; both clients come
    back on their own, every request is answered, and the server handles each exactly once
    (lost replies are recovered by retry + the server's reply cache, not by rework)."""
    broker = EmbeddedBroker(tmp_path / "b", persistence=True).start()
    calls: Counter[str] = Counter()

    def body(inbound: Inbound) -> Message:
        calls[inbound.message.msg_id] += 1
        h = inbound.message.h  # type: ignore[union-attr]
        return BodyOut(device_id="cam-01", step=inbound.message.step, z=h[:, :1] + 1)

    server = _client(broker, "server")
    server.subscribe(T.all_up(), body)
    server.connect()
    device = _client(broker, "cam-01")
    device.subscribe(T.device_inbox("cam-01"), lambda inbound: None)
    device.connect()
    answered: list[int] = []

    def crash() -> None:
        wait_for(lambda: len(answered) >= 10, what="first answers")
        broker.kill()
        time.sleep(0.5)
        broker.start()

    crasher = threading.Thread(target=crash)
    crasher.start()
    try:
        for step in range(40):
            h = np.full((2, 5, 4), step, np.float32)
            reply = device.request(
                T.up("cam-01", "smashed"),
                Smashed(device_id="cam-01", step=step, h=h),
                T.down("cam-01", "body_out"),
                timeout=60,
                attempts=30,
            )
            assert isinstance(reply, BodyOut) and reply.step == step
            assert float(reply.z[0, 0, 0]) == step + 1
            answered.append(step)
        crasher.join(30)
        assert answered == list(range(40))
        assert len(calls) == 40 and set(calls.values()) == {1}, calls
        assert device.connected and server.connected
        assert device.connects >= 2 and server.connects >= 2  # they did reconnect
    finally:
        device.close()
        server.close()
        broker.close()


def test_offline_session_survives_broker_restart(tmp_path: Path) -> None:
    """Messages queued for an offline device's persistent session survive a broker restart
    (persistence), the sender reconnects by itself, and the device gets each message once."""
    broker = EmbeddedBroker(tmp_path / "b", persistence=True).start()
    received: list[Message] = []
    device = _client(broker, "cam-01")
    device.subscribe(T.device_inbox("cam-01"), lambda inbound: received.append(inbound.message))
    device.connect()
    device.close(send_will=False)  # offline; its session (and subscription) stays at the broker
    server = _client(broker, "server").connect()
    try:
        settings = PhaseSettings(
            keep_ratio=1.0, local_epochs=1, local_lr=1e-4, split_lr=0.1, deadline=2e9,
            split_epochs=1, batch_size=128, encoding="fp32", prune="class",
        )  # fmt: skip
        updates = [
            Task(device_id="cam-01", step=i, params={}, settings=settings) for i in range(40)
        ]
        topic = T.down("cam-01", "task")
        for update in updates[:20]:
            server.publish(topic, update)
        broker.stop()  # graceful: mosquitto writes its persistence file
        broker.start()
        wait_for(lambda: server.connected, what="server reconnect")
        for update in updates[20:]:
            server.publish(topic, update)
        back = _client(broker, "cam-01")  # a fresh process of the same device, same session
        back.subscribe(T.device_inbox("cam-01"), lambda inbound: received.append(inbound.message))
        back.connect()
        wait_for(lambda: len(received) >= 40, what="queued messages")
        time.sleep(0.5)  # let any duplicate arrive before counting
        assert sorted(m.step for m in received) == list(range(40))
        back.close()
    finally:
        server.close()
        broker.close()
