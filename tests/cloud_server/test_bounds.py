"""The server's memories are bounded against floods: a request's batch, the batcher's queue (in
all and per device), a device's open split steps, and the registry of devices, which forgets
devices that stay offline and never selects one it has not seen online. A refusal for now is an
ERROR `busy`, which a device's split link retries with backoff."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sfprompt.cloud_server.batcher import BatcherBusy, BodyBatcher
from sfprompt.cloud_server.body_model import ServerModel
from sfprompt.cloud_server.body_service import BodyService
from sfprompt.cloud_server.registry import Registry, RegistryFull
from sfprompt.cloud_server.step_state import StepStore
from sfprompt.edge_client.split_link import SplitLink
from sfprompt.protocol.broker import EmbeddedBroker
from sfprompt.protocol.client_config import connection_config
from sfprompt.protocol.codec import expectations_for
from sfprompt.protocol.errors import TOO_LARGE, ProtocolError, RemoteError
from sfprompt.protocol.messages import Join
from sfprompt.protocol.mqtt_client import MqttClient


def h_of(model: ServerModel, samples: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(model.h_shape(samples)).astype(np.float32)


def ignore(result: np.ndarray | None, error: Exception | None) -> None:
    pass


# ---- the batcher ----------------------------------------------------------------------------


def test_a_request_over_the_max_batch_is_refused(model: ServerModel) -> None:
    batcher = BodyBatcher(model, max_batch=8)
    batcher.forward(h_of(model, 8), ignore)  # at the limit: fine
    with pytest.raises(ProtocolError) as refused:
        batcher.forward(h_of(model, 9), ignore)
    assert refused.value.code == TOO_LARGE and "9" in str(refused.value)
    assert "at most 8 samples" in str(refused.value)
    assert batcher.pending == 1


def test_the_batcher_queue_is_bounded(model: ServerModel) -> None:
    """2,000 requests while the body is busy: the queue stops at its bound and says busy."""
    batcher = BodyBatcher(model)  # not started: nothing leaves the queue
    h = h_of(model, 1)
    refused = 0
    for _ in range(2_000):
        try:
            batcher.forward(h, ignore)
        except BatcherBusy as exc:
            assert "busy" in str(exc)
            refused += 1
    assert batcher.pending < 2_000 and refused == 2_000 - batcher.pending


def test_one_device_cannot_fill_the_queue(model: ServerModel) -> None:
    h = h_of(model, 2)
    batcher = BodyBatcher(model, max_queued_per_device=3, max_queued_bytes=10 * h.nbytes)
    for _ in range(3):
        batcher.forward(h, ignore, device_id="mallory")
    with pytest.raises(BatcherBusy, match="mallory"):
        batcher.forward(h, ignore, device_id="mallory")
    for i in range(7):
        batcher.forward(h, ignore, device_id=f"dev-{i}")
    with pytest.raises(BatcherBusy, match="bytes"):  # the bound in bytes, for everyone
        batcher.forward(h, ignore, device_id="dev-8")
    answered = threading.Semaphore(0)
    with batcher.start():  # the queue drains; then there is room again
        deadline = time.monotonic() + 30
        while batcher.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        assert batcher.pending == 0 and batcher.queued_bytes == 0
        batcher.forward(h, lambda result, error: answered.release(), device_id="mallory")
        assert answered.acquire(timeout=30)


# ---- split state ----------------------------------------------------------------------------


def test_open_steps_per_device_are_bounded() -> None:
    """300 SMASHED never followed by GRAD_Z keep only the device's newest few steps."""
    store = StepStore(max_steps_per_device=4)
    h = np.zeros((4, 50, 96), np.float32)
    store.put(("cam-01", 1, 1), h)
    for step in range(300):
        store.put(("mallory", 1, step), h)
    assert len(store) == 5 and store.nbytes == 5 * h.nbytes
    assert store.take(("mallory", 1, 299)) is not None  # the newest are kept
    assert store.take(("mallory", 1, 0)) is None
    assert store.take(("cam-01", 1, 1)) is not None


def test_the_default_store_bounds_open_steps_per_device() -> None:
    store = StepStore()
    for step in range(300):
        store.put(("mallory", 1, step), np.zeros(16, np.float32))
    assert len(store) <= 8


def test_steps_expire_in_order() -> None:
    now = [0.0]
    store = StepStore(ttl_s=10, clock=lambda: now[0])
    store.put(("a", 1, 1), np.zeros(4, np.float32))
    now[0] = 5
    store.put(("b", 1, 1), np.zeros(4, np.float32))
    now[0] = 10.5
    assert store.expire() == 1 and store.take(("b", 1, 1)) is not None


# ---- the registry ---------------------------------------------------------------------------


def join(device_id: str) -> Join:
    return Join(device_id=device_id, bundle_hash="x", runtime={}, hardware={})


def test_a_device_never_seen_online_is_not_selectable() -> None:
    registry = Registry()
    for i in range(2_000):
        registry.join(join(f"fake-{i}"))
    registry.set_online("cam-02", True)  # presence first (retained), then its JOIN
    registry.join(join("cam-02"))
    registry.join(join("cam-01"))
    registry.set_online("cam-01", True)  # or the JOIN first
    assert registry.online() == ["cam-01", "cam-02"]


def test_the_registry_is_bounded_and_keeps_online_devices() -> None:
    registry = Registry(max_devices=3)
    for device in ("cam-01", "cam-02"):
        registry.join(join(device))
        registry.set_online(device, True)
    for i in range(100):  # joins never seen online push each other out, not the online ones
        registry.join(join(f"fake-{i}"))
    assert registry.online() == ["cam-01", "cam-02"] and len(registry) == 3
    registry.set_online("fake-99", True)
    with pytest.raises(RegistryFull, match="3 devices"):
        registry.join(join("cam-03"))


def test_devices_that_stay_offline_are_forgotten() -> None:
    now = [0.0]
    registry = Registry(forget_after_s=60, clock=lambda: now[0])
    registry.join(join("cam-01"))
    registry.set_online("cam-01", True)
    registry.join(join("fake"))
    now[0] = 30
    registry.set_online("cam-01", False)
    now[0] = 61
    registry.join(join("cam-02"))
    assert registry.get("fake") is None and registry.get("cam-01") is not None
    now[0] = 91
    assert registry.online() == [] and registry.get("cam-01") is None


# ---- the body service over a real broker ----------------------------------------------------


@pytest.fixture
def served(model: ServerModel, tmp_path: Path) -> Iterator[tuple[str, BodyService]]:
    """A body service on a private Mosquitto, its batcher not yet started."""
    with EmbeddedBroker(tmp_path / "broker") as broker:
        server = MqttClient(
            connection_config(broker.url, "server", expect=expectations_for(model.manifest))
        )
        batcher = BodyBatcher(model, max_batch=4, max_wait_s=0.0, max_queued_per_device=2)
        service = BodyService(server, batcher, StepStore(max_steps_per_device=2)).attach()
        server.connect()
        try:
            yield broker.url, service
        finally:
            batcher.stop()
            server.close()


@pytest.fixture
def device(model: ServerModel, served: tuple[str, BodyService]) -> Iterator[MqttClient]:
    client = MqttClient(
        connection_config(served[0], "cam-01", expect=expectations_for(model.manifest))
    )
    client.subscribe(client.config.topics.device_inbox("cam-01"), lambda inbound: None)
    client.connect()
    yield client
    client.close()


def test_a_smashed_over_the_max_batch_gets_too_large(
    model: ServerModel, served: tuple[str, BodyService], device: MqttClient
) -> None:
    served[1].batcher.start()
    link = SplitLink(device, "cam-01", 1, timeout_s=20, attempts=1)
    with pytest.raises(RemoteError, match=r"too_large.*at most 4 samples"):
        link.forward(h_of(model, 5))
    assert len(served[1].store) == 0  # nothing held for a refused step


def test_smashed_never_followed_by_grad_z_hold_a_bounded_number_of_steps(
    model: ServerModel, served: tuple[str, BodyService], device: MqttClient
) -> None:
    served[1].batcher.start()
    link = SplitLink(device, "cam-01", 1, timeout_s=20, attempts=1)
    h = h_of(model, 2)
    for _ in range(30):
        link.forward(h)
    assert len(served[1].store) == 2
    grad_h = link.backward(np.ones(model.z_shape(2), np.float32))  # the newest step still works
    assert grad_h.shape == h.shape


@pytest.mark.slow
def test_a_busy_server_is_retried_by_the_device(
    model: ServerModel, served: tuple[str, BodyService], device: MqttClient
) -> None:
    """The batcher's queue is full (the device's own share of it): SMASHED and GRAD_Z are
    answered busy, and the split link sends them again until the body has room."""
    service = served[1]
    h = h_of(model, 2)
    link = SplitLink(device, "cam-01", 1, timeout_s=20, attempts=1)
    for _ in range(2):  # the device's share of the queue is taken while the body is stopped
        service.batcher.forward(h, ignore, device_id="cam-01")
    threading.Timer(1.0, service.batcher.start).start()
    started = time.monotonic()
    z = link.forward(h)
    assert time.monotonic() - started > 0.9  # it waited for the body, retrying
    np.testing.assert_allclose(z, model.body_forward(h), rtol=1e-5, atol=1e-5)
    sent = device.traffic.sent["smashed"]
    assert sent > 1.5 * len(device.packets(link_message(link, h)))  # sent more than once

    service.batcher.stop()  # GRAD_Z while the queue is full again: its h is kept for the retry
    fresh = BodyBatcher(model, max_batch=4, max_wait_s=0.0, max_queued_per_device=2)
    for _ in range(2):
        fresh.forward(h, ignore, device_id="cam-01")
    service.batcher = fresh
    threading.Timer(1.0, fresh.start).start()
    grad_z = np.ones(model.z_shape(2), np.float32)
    grad_h = link.backward(grad_z)
    np.testing.assert_allclose(grad_h, model.body_vjp(h, grad_z), rtol=1e-4, atol=1e-5)
    fresh.stop()


def link_message(link: SplitLink, h: np.ndarray):  # noqa: ANN201
    from sfprompt.protocol.messages import Smashed

    return Smashed(device_id=link.device_id, round=link.round, step=link.step, h=h)
