"""The elastic worker pool's messages and topics: they round-trip, bad values are refused by
name, and the TASK's new `worker` field leaves a TASK without it byte-for-byte as before."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from protocol_fixtures import sample_messages

from sfprompt.protocol.codec import decode, encode
from sfprompt.protocol.errors import ProtocolError
from sfprompt.protocol.messages import Task
from sfprompt.protocol.pool_messages import MAX_WORKER_DEVICES, WorkerAssignment, WorkerPresence
from sfprompt.protocol.topics import Route, Topics

GOLDEN_TASK = Path(__file__).parent / "golden" / "task.safetensors"


def _task() -> Task:
    return next(m for m in sample_messages() if isinstance(m, Task))


def test_a_task_names_its_worker_and_one_without_reads_as_before() -> None:
    named = decode(encode(dataclasses.replace(_task(), worker="gpu-1")))
    assert isinstance(named, Task) and named.worker == "gpu-1"
    assert encode(_task()) == GOLDEN_TASK.read_bytes()  # no worker: the old payload
    old = decode(GOLDEN_TASK.read_bytes())
    assert isinstance(old, Task) and old.worker == ""
    with pytest.raises(ProtocolError, match="worker"):
        dataclasses.replace(_task(), worker="a/b")


def test_an_empty_assignment_round_trips() -> None:
    back = decode(encode(WorkerAssignment(device_id="gpu-1", round=2)))
    assert isinstance(back, WorkerAssignment) and back.devices == ()


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: WorkerPresence(device_id="w", online=True, capacity=0.0), "capacity"),
        (lambda: WorkerPresence(device_id="w", online=True, capacity=float("inf")), "capacity"),
        (lambda: WorkerPresence(device_id="w", online=True, accelerator="CUDA!"), "accelerator"),
        (lambda: WorkerPresence(device_id="w", online=True, applied="x/y"), "applied"),
        (lambda: WorkerPresence(device_id="w/1", online=True), "device_id"),
        (lambda: WorkerAssignment(device_id="w", devices=("a", "a")), "devices"),
        (lambda: WorkerAssignment(device_id="w", devices=("a,b",)), "devices"),
        (lambda: WorkerAssignment(device_id="w", devices=["a"]), "devices"),  # type: ignore[arg-type]
        (
            lambda: WorkerAssignment(
                device_id="w", devices=tuple(f"d{i}" for i in range(MAX_WORKER_DEVICES + 1))
            ),
            "devices",
        ),
    ],
)
def test_bad_pool_messages_are_refused_by_name(build, field: str) -> None:
    with pytest.raises(ProtocolError, match=field):
        build()


def test_a_full_assignment_fits_in_one_payload() -> None:
    devices = tuple(f"device-{i:057d}" for i in range(MAX_WORKER_DEVICES))  # 64 chars each
    payload = encode(WorkerAssignment(device_id="w", devices=devices))
    assert len(payload) < 300_000
    back = decode(payload)
    assert isinstance(back, WorkerAssignment) and back.devices == devices


def test_the_worker_topics_parse_back() -> None:
    topics = Topics()
    assert topics.parse(topics.worker_presence("gpu-1")) == Route(
        "worker", "gpu-1", kind="worker_presence"
    )
    assert topics.parse(topics.worker_assignment("gpu-1")) == Route(
        "worker", "gpu-1", kind="worker_assignment"
    )
    assert topics.all_worker_presence() == "sfp/v1/server/workers/+"
    with pytest.raises(ProtocolError):
        topics.worker_presence("+")


@pytest.mark.parametrize(
    ("topic", "sender", "refused"),
    [
        ("sfp/v1/server/workers/gpu-1", "gpu-1", False),
        ("sfp/v1/server/workers/gpu-1", "gpu-2", True),  # presence in another worker's name
        ("sfp/v1/server/assign/gpu-1", "gpu-2", True),
        ("sfp/v1/dev/dev-a/up/smashed", "dev-b", True),
    ],
)
def test_a_worker_topic_must_carry_its_own_workers_messages(
    topic: str, sender: str, refused: bool
) -> None:
    from sfprompt.protocol.client_config import ClientConfig
    from sfprompt.protocol.inbound import Intake

    intake = Intake(ClientConfig("server"), publish=lambda *a, **k: None)
    if refused:
        with pytest.raises(ProtocolError, match="from the topic"):
            intake.check_sender(topic, sender)
    else:
        intake.check_sender(topic, sender)
