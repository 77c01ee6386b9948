"""A device's defense on the wire: through a real Mosquitto, what its SplitLink publishes is the
clipped and noised h and the noised dL/dz, the body service answers for those, and the dL/dh the
device gets back is with respect to its own h (through the clip's Jacobian)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sfprompt.cloud_server.body_model import ServerModel
from sfprompt.edge_client.defenses import Defense, clip_rows, row_norms
from sfprompt.edge_client.split_link import SplitLink
from sfprompt.protocol.broker import EmbeddedBroker
from sfprompt.protocol.client_config import Inbound, connection_config
from sfprompt.protocol.codec import expectations_for
from sfprompt.protocol.messages import GradZ, Message, Smashed
from sfprompt.protocol.mqtt_client import MqttClient
from tests.cloud_server import test_reply_encoding as reply

DEVICE = reply.DEVICE


class Spy:
    """A third client on the broker that records what the device publishes, as an observer of
    the server's inbox would see it."""

    def __init__(self, model: ServerModel, url: str) -> None:
        self.client = MqttClient(
            connection_config(url, "spy", expect=expectations_for(model.manifest))
        )
        self.seen: dict[str, np.ndarray] = {}
        self.arrived = threading.Condition()
        topics = self.client.config.topics
        for kind in ("smashed", "grad_z"):
            self.client.subscribe(topics.up(DEVICE, kind), self._record)
        self.client.connect()

    def _record(self, inbound: Inbound) -> Message | None:
        msg = inbound.message
        with self.arrived:
            if isinstance(msg, Smashed):
                self.seen["h"] = msg.h
            elif isinstance(msg, GradZ):
                self.seen["grad_z"] = msg.grad_z
            self.arrived.notify_all()
        return None

    def wait_for(self, name: str) -> np.ndarray:
        with self.arrived:
            assert self.arrived.wait_for(lambda: name in self.seen, timeout=20), name
            return self.seen[name]


@pytest.fixture
def broker_url(tmp_path: Path) -> Iterator[str]:
    with EmbeddedBroker(tmp_path / "broker") as broker:
        yield broker.url


def _link(fleet: reply.Fleet, defense: Defense, seed: int = 0) -> SplitLink:
    return SplitLink(
        fleet.device, DEVICE, 1, "fp32", 20, 1, defense=defense, noise=np.random.default_rng(seed)
    )


def test_the_server_gets_the_clipped_h_and_the_device_dl_dh_through_the_clip(
    model: ServerModel, broker_url: str
) -> None:
    fleet, spy = reply.Fleet(model, broker_url, "fp32"), Spy(model, broker_url)
    try:
        h = 3 * np.random.default_rng(2).standard_normal(model.h_shape(3)).astype(np.float32)
        bound = float(np.median(row_norms(h)))  # one row below C, one at it, one above
        link = _link(fleet, Defense(clip=bound))
        z = link.forward(h)
        clipped, tape = clip_rows(h, bound)
        np.testing.assert_array_equal(spy.wait_for("h"), clipped)
        assert row_norms(spy.seen["h"]).max() == pytest.approx(bound, rel=1e-6)
        np.testing.assert_allclose(z, model.body_forward(clipped), rtol=1e-4, atol=1e-5)

        grad_z = np.random.default_rng(3).standard_normal(z.shape).astype(np.float32)
        grad_h = link.backward(grad_z)
        np.testing.assert_array_equal(spy.wait_for("grad_z"), grad_z)  # no gradient defense
        expected = tape.vjp(model.body_vjp(clipped, grad_z))
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(grad_h, expected, rtol=1e-4, atol=1e-5 * scale)
        unclipped = int(np.argmin(row_norms(h)))
        assert not np.allclose(grad_h, model.body_vjp(clipped, grad_z), atol=1e-5 * scale)
        np.testing.assert_allclose(
            grad_h[unclipped], model.body_vjp(clipped, grad_z)[unclipped], rtol=1e-4, atol=1e-5
        )
    finally:
        spy.client.close()
        fleet.close()


def test_the_server_gets_noise_of_the_stated_size_on_h_and_dl_dz(
    model: ServerModel, broker_url: str
) -> None:
    fleet, spy = reply.Fleet(model, broker_url, "fp32"), Spy(model, broker_url)
    try:
        h = np.random.default_rng(4).standard_normal(model.h_shape(8)).astype(np.float32)
        bound, sigma, multiplier = 2.0, 0.05, 3.0
        link = _link(fleet, Defense(clip=bound, noise=sigma, grad_noise=multiplier))
        z = link.forward(h)
        noise = spy.wait_for("h") - clip_rows(h, bound)[0]
        assert noise.std() == pytest.approx(sigma * bound, rel=0.05)
        grad_z = np.random.default_rng(5).standard_normal(z.shape).astype(np.float32)
        grad_h = link.backward(grad_z)
        grad_noise = row_norms(spy.wait_for("grad_z") - grad_z)
        expected = multiplier * row_norms(grad_z).max()
        assert grad_noise.mean() == pytest.approx(expected, rel=0.1)
        assert grad_h.shape == h.shape and np.isfinite(grad_h).all()
    finally:
        spy.client.close()
        fleet.close()


def test_the_link_draws_its_noise_from_no_seed() -> None:
    """Noise a server could replay from a known seed would protect nothing."""
    links = [SplitLink(None, DEVICE, 1) for _ in range(2)]  # type: ignore[arg-type]
    draws = [link.noise.standard_normal(4) for link in links]
    assert not np.array_equal(*draws)
