"""`serve --capture DIR`: the writer's files round-trip, its bound holds, and the body service
captures what it accepted (as decoded) and nothing it refused."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sfprompt.cloud_server.batcher import BodyBatcher
from sfprompt.cloud_server.body_model import ServerModel
from sfprompt.cloud_server.body_service import BodyService
from sfprompt.cloud_server.rounds import RoundConfig
from sfprompt.cloud_server.step_state import StepStore
from sfprompt.cloud_server.traffic_capture import (
    CaptureError,
    TrafficCapture,
    count_files,
    read_round,
    read_step,
    round_path,
    step_path,
)
from sfprompt.protocol.broker import EmbeddedBroker
from sfprompt.protocol.client_config import connection_config
from sfprompt.protocol.codec import expectations_for
from sfprompt.protocol.errors import RemoteError
from sfprompt.protocol.messages import BodyOut, GradH, GradZ, Smashed
from sfprompt.protocol.mqtt_client import MqttClient

DEVICE = "cam-01"
RNG = np.random.default_rng(0)


def smashed(step: int, rows: int = 2, round: int = 1) -> Smashed:
    h = RNG.standard_normal((rows, 5, 4)).astype(np.float32)
    return Smashed(device_id=DEVICE, round=round, step=step, h=h, encoding="fp16")


def grad_z(step: int, rows: int = 2, round: int = 1) -> GradZ:
    g = RNG.standard_normal((rows, 1, 4)).astype(np.float32)
    return GradZ(device_id=DEVICE, round=round, step=step, grad_z=g, encoding="int8")


def test_files_round_trip_h_grad_z_and_params(tmp_path: Path) -> None:
    """A step file holds h, then h and grad_z with both encodings; a round's file holds the
    params, the settings as sent and the bundle's contract hash."""
    capture = TrafficCapture(tmp_path, limit=10, contract_hash="abc123").start()
    up, down = smashed(3), grad_z(3)
    settings = RoundConfig(defense_clip=7.5).settings(deadline=1.0)
    params = {"prompt": RNG.standard_normal((4, 4)).astype(np.float32)}
    capture.round_params(1, params, settings)
    capture.smashed(up)
    capture.grad_z(down, up.h)
    capture.close()

    step = read_step(step_path(tmp_path, DEVICE, 1, 3))
    assert (step.device_id, step.round, step.step) == (DEVICE, 1, 3)
    np.testing.assert_array_equal(step.h, up.h)
    assert step.grad_z is not None
    np.testing.assert_array_equal(step.grad_z, down.grad_z)
    assert (step.encoding, step.grad_encoding) == ("fp16", "int8")
    captured = read_round(round_path(tmp_path, 1))
    np.testing.assert_array_equal(captured.params["prompt"], params["prompt"])
    assert captured.settings["defense_clip"] == 7.5 and captured.contract_hash == "abc123"
    assert count_files(tmp_path) == 2 and not list(tmp_path.glob(".*.tmp"))


def test_the_limit_bounds_the_files_and_is_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Params count too; a GRAD_Z rewrites its step's file (no new file), and one for a step
    over the limit writes nothing. A second writer on the folder counts what is there."""
    capture = TrafficCapture(tmp_path, limit=3).start()
    capture.round_params(1, {"prompt": np.zeros((2, 4), np.float32)}, None)
    capture.round_params(1, {"prompt": np.ones((2, 4), np.float32)}, None)  # once per round
    sent = [smashed(step) for step in range(1, 6)]
    with caplog.at_level(logging.WARNING):
        for msg in sent:
            capture.smashed(msg)
        capture.grad_z(grad_z(2), sent[1].h)
        capture.grad_z(grad_z(4), sent[3].h)  # step 4 was not captured
        capture.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "round-1-params.safetensors",
        f"step-{DEVICE}-r1-s1.safetensors",
        f"step-{DEVICE}-r1-s2.safetensors",
    ]
    assert read_step(step_path(tmp_path, DEVICE, 1, 2)).grad_z is not None
    assert read_step(step_path(tmp_path, DEVICE, 1, 1)).grad_z is None
    np.testing.assert_array_equal(read_round(round_path(tmp_path, 1)).params["prompt"], 0)
    said = [r for r in caplog.records if "capture limit reached" in r.getMessage()]
    assert len(said) == 1

    again = TrafficCapture(tmp_path, limit=3).start()
    again.smashed(smashed(9))
    again.close()
    assert count_files(tmp_path) == 3


def test_a_disk_that_falls_behind_drops_files_rather_than_blocking(tmp_path: Path) -> None:
    """The handlers never wait: with the queue full (its writer not yet started) a file is
    dropped and counted, and the queued one is still written."""
    capture = TrafficCapture(tmp_path, limit=5, backlog=1)
    capture.smashed(smashed(1))
    capture.smashed(smashed(2))  # the queue holds one: dropped
    assert capture.dropped == 1
    capture.start().close()
    assert [p.name for p in tmp_path.iterdir()] == [f"step-{DEVICE}-r1-s1.safetensors"]


def test_a_damaged_or_foreign_file_is_named(tmp_path: Path) -> None:
    capture = TrafficCapture(tmp_path, limit=5).start()
    capture.round_params(2, {"prompt": np.zeros((2, 4), np.float32)}, None)
    capture.close()
    bad = tmp_path / "step-x-r1-s1.safetensors"
    bad.write_bytes(b"not safetensors at all")
    with pytest.raises(CaptureError, match="step-x-r1-s1.safetensors: not a readable"):
        read_step(bad)
    with pytest.raises(CaptureError, match="format 'sfprompt-capture-round/1', expected"):
        read_step(round_path(tmp_path, 2))  # a round's file is no step
    with pytest.raises(CaptureError, match="no such capture file"):
        read_round(round_path(tmp_path, 7))
    with pytest.raises(ValueError, match="at least 1 file"):
        TrafficCapture(tmp_path, limit=0)


# ------------------------------------------------------------ through a real body service


@pytest.fixture
def broker_url(tmp_path: Path) -> Iterator[str]:
    with EmbeddedBroker(tmp_path / "broker") as broker:
        yield broker.url


def test_the_body_service_captures_what_it_accepted(
    model: ServerModel, broker_url: str, tmp_path: Path
) -> None:
    """An int8 SMASHED is captured as the server decoded it (the h its body ran on), its GRAD_Z
    beside it; a request the service refused (too large) leaves no file."""
    expect = expectations_for(model.manifest)
    server = MqttClient(connection_config(broker_url, "server", expect=expect))
    batcher = BodyBatcher(model, max_batch=4, max_wait_s=0.0).start()
    capture = TrafficCapture(tmp_path / "capture", limit=10).start()
    # z comes down in fp32, so it shows which h the body ran on
    BodyService(server, batcher, StepStore(), encoding_down="fp32", capture=capture).attach()
    server.connect()
    device = MqttClient(connection_config(broker_url, DEVICE, expect=expect))
    device.subscribe(device.config.topics.device_inbox(DEVICE), lambda _: None)
    device.connect()
    topics = device.config.topics

    def request(msg: Smashed | GradZ, down: str):  # noqa: ANN202
        return device.request(topics.up(DEVICE, msg.kind), msg, topics.down(DEVICE, down), 20, 1)

    try:
        h = RNG.standard_normal(model.h_shape(3)).astype(np.float32)
        up = Smashed(device_id=DEVICE, round=1, step=1, h=h, encoding="int8")
        body_out = request(up, "body_out")
        g = RNG.standard_normal(model.z_shape(3)).astype(np.float32)
        back = request(GradZ(device_id=DEVICE, round=1, step=1, grad_z=g), "grad_h")
        big = RNG.standard_normal(model.h_shape(5)).astype(np.float32)  # over max_batch 4
        with pytest.raises(RemoteError, match="too_large"):
            request(Smashed(device_id=DEVICE, round=1, step=2, h=big), "body_out")
    finally:
        device.close()
        batcher.stop()
        server.close()
        capture.close()
    assert isinstance(body_out, BodyOut) and isinstance(back, GradH)
    assert [p.name for p in (tmp_path / "capture").iterdir()] == [
        f"step-{DEVICE}-r1-s1.safetensors"
    ]
    step = read_step(step_path(tmp_path / "capture", DEVICE, 1, 1))
    assert step.encoding == "int8" and step.grad_encoding == "fp32"
    assert not np.array_equal(step.h, h)  # int8 on the wire: the server got rounded values
    np.testing.assert_allclose(step.h, h, atol=0.05 * np.abs(h).max())
    np.testing.assert_allclose(model.body_forward(step.h), body_out.z, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(step.grad_z, g)
