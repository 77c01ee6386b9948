"""A split step whose state the server lost (its body worker died, or the device moved to
another worker) is redone by the device's split link: the same h again as a new step, then the
same dL/dz, so dL/dh is the one the lost step would have given. Over a real Mosquitto."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sfprompt.cloud_server.batcher import BodyBatcher
from sfprompt.cloud_server.body_model import ServerModel
from sfprompt.cloud_server.body_service import BodyService
from sfprompt.cloud_server.step_state import StepStore
from sfprompt.edge_client.split_link import MAX_REDOS, SplitLink
from sfprompt.protocol.broker import EmbeddedBroker
from sfprompt.protocol.client_config import connection_config
from sfprompt.protocol.codec import expectations_for
from sfprompt.protocol.errors import RemoteError
from sfprompt.protocol.mqtt_client import MqttClient

DEVICE = "cam-01"


class LosingStore(StepStore):
    """A step store that loses the next `lose` steps right after their SMASHED is filed."""

    def __init__(self, lose: int) -> None:
        super().__init__()
        self.lose = lose
        self.taken: list[tuple[str, int, int]] = []

    def take(self, key):  # type: ignore[no-untyped-def]
        h = super().take(key)
        if h is not None and self.lose > 0:
            self.lose -= 1
            return None  # as a worker that died, or one the device was moved away from
        if h is not None:
            self.taken.append(key)
        return h


@pytest.fixture
def broker_url(tmp_path: Path) -> Iterator[str]:
    with EmbeddedBroker(tmp_path / "broker") as broker:
        yield broker.url


def run_step(model: ServerModel, url: str, lose: int) -> tuple[np.ndarray, SplitLink, LosingStore]:
    expect = expectations_for(model.manifest)
    server = MqttClient(connection_config(url, "server", expect=expect))
    batcher = BodyBatcher(model, max_batch=8, max_wait_s=0.0).start()
    store = LosingStore(lose)
    BodyService(server, batcher, store).attach()
    server.connect()
    device = MqttClient(connection_config(url, DEVICE, expect=expect))
    device.subscribe(device.config.topics.device_inbox(DEVICE), lambda _: None)
    device.connect()
    try:
        link = SplitLink(device, DEVICE, round=1, timeout_s=20, attempts=1)
        rng = np.random.default_rng(0)
        h = rng.standard_normal(model.h_shape(2)).astype(np.float32)
        z = link.forward(h)
        grad_z = rng.standard_normal(z.shape).astype(np.float32)
        try:
            return link.backward(grad_z), link, store
        finally:
            assert np.allclose(model.body_forward(h), z, atol=1e-5)
    finally:
        device.close()
        batcher.stop()
        server.close()


def test_a_lost_step_is_redone_with_the_same_gradient(model: ServerModel, broker_url: str) -> None:
    expected, plain, _ = run_step(model, broker_url, lose=0)
    got, redone, store = run_step(model, broker_url, lose=1)
    assert plain.step == 1 and redone.step == 2  # one more step on the wire, one batch trained
    assert store.taken == [(DEVICE, 1, 2)]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_step_lost_again_and_again_fails_the_round(model: ServerModel, broker_url: str) -> None:
    with pytest.raises(RemoteError, match="unknown_step"):
        run_step(model, broker_url, lose=MAX_REDOS + 1)
