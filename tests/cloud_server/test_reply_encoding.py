"""The body service replies in serve's `--encoding-down`, or by default in each request's own
encoding; the device's split link decodes whichever comes down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sfprompt.cloud_server.batcher import BodyBatcher
from sfprompt.cloud_server.body_model import ServerModel
from sfprompt.cloud_server.body_service import BodyService
from sfprompt.cloud_server.rounds import SAME_ENCODING, RoundConfig
from sfprompt.cloud_server.step_state import StepStore
from sfprompt.edge_client.split_link import SplitLink
from sfprompt.protocol.broker import EmbeddedBroker
from sfprompt.protocol.client_config import connection_config
from sfprompt.protocol.codec import expectations_for
from sfprompt.protocol.messages import BodyOut, GradH, GradZ, Message, Smashed
from sfprompt.protocol.mqtt_client import MqttClient

DEVICE = "cam-01"


class Fleet:
    """A body service on a private Mosquitto and one device's client."""

    def __init__(self, model: ServerModel, url: str, encoding_down: str) -> None:
        expect = expectations_for(model.manifest)
        self.server = MqttClient(connection_config(url, "server", expect=expect))
        self.batcher = BodyBatcher(model, max_batch=8, max_wait_s=0.0).start()
        BodyService(self.server, self.batcher, StepStore(), encoding_down=encoding_down).attach()
        self.server.connect()
        self.device = MqttClient(connection_config(url, DEVICE, expect=expect))
        self.device.subscribe(self.device.config.topics.device_inbox(DEVICE), lambda _: None)
        self.device.connect()

    def request(self, msg: Smashed | GradZ, down: str) -> Message:
        topics = self.device.config.topics
        up = topics.up(DEVICE, msg.kind)
        return self.device.request(up, msg, topics.down(DEVICE, down), 20, 1)

    def close(self) -> None:
        self.device.close()
        self.batcher.stop()
        self.server.close()


@pytest.fixture
def broker_url(tmp_path: Path) -> Iterator[str]:
    with EmbeddedBroker(tmp_path / "broker") as broker:
        yield broker.url


@pytest.mark.parametrize(
    ("up", "encoding_down", "down"),
    [
        ("int8", SAME_ENCODING, "int8"),  # the default mirrors the request, as before
        ("fp32", "fp16", "fp16"),
        ("int8", "fp32", "fp32"),
        ("fp16", "bf16", "bf16"),
    ],
)
def test_replies_travel_in_encoding_down(
    model: ServerModel, broker_url: str, up: str, encoding_down: str, down: str
) -> None:
    fleet = Fleet(model, broker_url, encoding_down)
    try:
        h = np.random.default_rng(0).standard_normal(model.h_shape(3)).astype(np.float32)
        smashed = Smashed(device_id=DEVICE, round=1, step=1, h=h, encoding=up)
        body_out = fleet.request(smashed, "body_out")
        assert isinstance(body_out, BodyOut) and body_out.encoding == down
        grad_z = np.ones(model.z_shape(3), np.float32)
        back = GradZ(device_id=DEVICE, round=1, step=1, grad_z=grad_z, encoding=up)
        grad_h = fleet.request(back, "grad_h")
        assert isinstance(grad_h, GradH) and grad_h.encoding == down
        if (up, down) == ("fp32", "fp16"):  # exact up, so only fp16's rounding comes down
            z = model.body_forward(h)
            np.testing.assert_allclose(body_out.z, z, rtol=2e-3, atol=2e-3 * np.abs(z).max())
    finally:
        fleet.close()


def test_the_device_decodes_replies_in_another_encoding(
    model: ServerModel, broker_url: str
) -> None:
    """What a device does in a round: int8 up, fp16 down, through its SplitLink."""
    fleet = Fleet(model, broker_url, "fp16")
    try:
        link = SplitLink(fleet.device, DEVICE, 1, encoding="int8", timeout_s=20, attempts=1)
        h = np.random.default_rng(1).standard_normal(model.h_shape(2)).astype(np.float32)
        z = link.forward(h)
        grad_h = link.backward(np.ones(z.shape, np.float32))
        assert z.shape == model.z_shape(2) and grad_h.shape == h.shape
        assert z.dtype == grad_h.dtype == np.float32
    finally:
        fleet.close()


def test_encoding_down_is_checked_and_defaults_to_same() -> None:
    assert RoundConfig().encoding_down == SAME_ENCODING
    assert RoundConfig(encoding="int8").down_encoding == "int8"
    assert RoundConfig(encoding="int8", encoding_down="fp16").down_encoding == "fp16"
    with pytest.raises(ValueError, match="encoding_down"):
        RoundConfig(encoding_down="fp8")
    with pytest.raises(ValueError, match="encoding_down"):
        BodyService(None, None, StepStore(), encoding_down="fp8")  # type: ignore[arg-type]
