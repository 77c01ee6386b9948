"""The round loop in-process: a `Coordinator` over a fake transport, with scripted devices.

The coordinator takes its transport as an argument, so these tests pass an object that
delivers JOINs, presence and UPDATEs straight to the handlers it subscribed, and answers each
TASK it publishes with a scripted device's UPDATE. What the loop promises: rounds start once
enough eligible devices are online, close as soon as every selected device has answered (or
at the round timeout), average what was accepted, checkpoint every round, refuse foreign
bundles and late updates, exclude devices refused too often, and give up when too few come.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sfprompt.cloud_server.checkpoint import load_checkpoint
from sfprompt.cloud_server.coordinator import Coordinator
from sfprompt.cloud_server.metrics import MetricsLog
from sfprompt.cloud_server.rounds import RoundConfig
from sfprompt.protocol.client_config import ClientConfig, Handler, Inbound
from sfprompt.protocol.codec import decode, encode
from sfprompt.protocol.errors import BUNDLE_MISMATCH, REJECTED
from sfprompt.protocol.messages import (
    Error,
    Join,
    Message,
    Presence,
    ServerStatus,
    Task,
    Update,
)

HASH = "ab" * 32
Params = dict[str, np.ndarray]
Device = Callable[[Task], "Update | None"]  # a scripted device: its answer to a TASK


def initial_params() -> Params:
    return {
        "prompt.tokens": np.zeros((1, 2, 4), np.float32),
        "tail.head.weight": np.zeros((3, 4), np.float32),
    }


def shifted_by(delta: float, samples: int) -> Device:
    """A device that adds `delta` to every weight it was sent and claims `samples` samples."""

    def answer(task: Task) -> Update:
        params = {k: (v + np.float32(delta)).astype(np.float32) for k, v in task.params.items()}
        return Update(device_id=task.device_id, round=task.round, params=params, samples=samples)

    return answer


def silent(task: Task) -> None:
    return None


class FakeTransport:
    """What the Coordinator uses of MqttClient, in-process; records what it publishes."""

    def __init__(self) -> None:
        self.config = ClientConfig("server")
        self.connected = True
        self.handlers: dict[str, Handler] = {}
        self.devices: dict[str, Device] = {}
        self.published: list[tuple[str, Message]] = []

    def subscribe(self, topic: str, handler: Handler) -> None:
        self.handlers[topic] = handler

    def publish(self, topic: str, message: Message, **_: Any) -> None:
        self.published.append((topic, message))

    def packets(self, message: Message) -> list[bytes]:
        return [encode(message)]  # one packet: no broker limit to chunk for

    def publish_packets(self, topic: str, packets: list[bytes], **_: Any) -> None:
        (message,) = (decode(packet) for packet in packets)
        self.published.append((topic, message))
        if isinstance(message, Task):  # the device answers at once, on this thread
            update = self.devices[message.device_id](message)
            if update is not None:
                self.send_up(update)

    # ---- what devices send
    def send_up(self, message: Message) -> Message | None:
        topics = self.config.topics
        handler = self.handlers[topics.all_up_of(message.kind)]
        return handler(Inbound(topics.up(message.device_id, message.kind), message))

    def join(self, device_id: str, answer: Device, bundle_hash: str = HASH) -> Message | None:
        self.devices[device_id] = answer
        reply = self.send_up(
            Join(device_id=device_id, bundle_hash=bundle_hash, runtime={}, hardware={})
        )
        self.presence(device_id, online=True)
        return reply

    def presence(self, device_id: str, online: bool) -> None:
        topics = self.config.topics
        message = Presence(device_id=device_id, online=online)
        self.handlers[topics.all_presence()](Inbound(topics.presence(device_id), message))

    # ---- what the coordinator sent
    def sent(self, kind: type[Message]) -> list[tuple[str, Message]]:
        return [(topic, m) for topic, m in self.published if isinstance(m, kind)]

    def tasks_by_round(self) -> dict[int, list[str]]:
        rounds: dict[int, list[str]] = {}
        for _, task in self.sent(Task):
            rounds.setdefault(task.round, []).append(task.device_id)
        return rounds

    def states(self) -> list[str]:
        return [status.state for _, status in self.sent(ServerStatus) if status.device_id == "*"]


class Federation:
    """A coordinator on a fake transport, with its checkpoint and metrics under `root`."""

    def __init__(self, root: Path, **config: Any) -> None:
        self.root = root
        self.transport = FakeTransport()
        self.metrics = MetricsLog(root / "metrics.jsonl")
        defaults = {"rounds": 1, "round_timeout_s": 10.0, "wait_for_devices_s": 5.0}
        self.cfg = RoundConfig(**{**defaults, **config})
        self.coordinator = Coordinator(
            self.transport,  # type: ignore[arg-type]
            self.cfg,
            initial_params(),
            HASH,
            root / "checkpoint.safetensors",
            self.metrics,
        ).attach()

    def run(self, stop: threading.Event | None = None) -> float:
        """Run to the end; returns the seconds it took."""
        started = time.monotonic()
        self.coordinator.run(stop or threading.Event())
        return time.monotonic() - started

    def rounds(self) -> list[dict[str, Any]]:
        return MetricsLog.read(self.metrics.path)


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Callable[..., Federation]]:
    made: list[Federation] = []

    def make(**config: Any) -> Federation:
        made.append(Federation(tmp_path, **config))
        return made[-1]

    yield make
    for fed in made:
        fed.metrics.close()


def test_rounds_average_the_updates_weighted_by_samples(federation) -> None:
    """FedAvg: +0.1 from 10 samples and +0.3 from 30 move every weight by 0.25 a round; each
    round closes as soon as both answered, long before its timeout."""
    fed = federation(rounds=2, round_timeout_s=30.0)
    fed.transport.join("dev-a", shifted_by(0.1, samples=10))
    fed.transport.join("dev-b", shifted_by(0.3, samples=30))
    assert fed.run() < 10.0
    for value in fed.coordinator.params.values():
        np.testing.assert_allclose(value, 0.5, rtol=1e-5)
    rounds = fed.rounds()
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["accepted"] == ["dev-a", "dev-b"] and not r["missing"] for r in rounds)
    assert rounds[0]["params_after"] == rounds[1]["params_before"]
    assert fed.transport.tasks_by_round() == {1: ["dev-a", "dev-b"], 2: ["dev-a", "dev-b"]}


def test_the_status_tells_devices_where_the_federation_is(federation) -> None:
    fed = federation()
    fed.transport.join("dev-a", shifted_by(1.0, samples=1))
    fed.run()
    assert fed.transport.states() == [
        "starting", "waiting", "training", "aggregating", "evaluating", "finished",
    ]  # fmt: skip


def test_each_round_is_checkpointed_and_a_new_coordinator_resumes_from_it(
    federation, tmp_path: Path
) -> None:
    fed = federation(rounds=2)
    fed.transport.join("dev-a", shifted_by(0.5, samples=4))
    fed.run()
    ckpt = load_checkpoint(tmp_path / "checkpoint.safetensors", HASH)
    assert ckpt is not None and ckpt.round == 2 and len(ckpt.history) == 2
    again = federation(rounds=3)
    assert again.coordinator.resume() is True
    assert again.coordinator.round == 2
    for key, value in fed.coordinator.params.items():
        np.testing.assert_array_equal(again.coordinator.params[key], value)


def test_only_online_devices_are_selected(federation) -> None:
    fed = federation(offline_grace_s=60.0)
    fed.transport.join("dev-a", shifted_by(1.0, samples=1))
    fed.transport.join("dev-b", shifted_by(1.0, samples=1))
    fed.transport.join("dev-c", shifted_by(1.0, samples=1))
    fed.transport.presence("dev-b", online=False)
    fed.run()
    assert fed.transport.tasks_by_round() == {1: ["dev-a", "dev-c"]}
    assert fed.rounds()[0]["selected"] == ["dev-a", "dev-c"]


def test_clients_per_round_selects_that_many(federation) -> None:
    fed = federation(rounds=3, clients_per_round=2)
    for name in ("dev-a", "dev-b", "dev-c", "dev-d"):
        fed.transport.join(name, shifted_by(1.0, samples=1))
    fed.run()
    assert [len(devices) for devices in fed.transport.tasks_by_round().values()] == [2, 2, 2]


def test_a_device_refused_too_often_is_no_longer_selected(federation) -> None:
    """An update far beyond the norm bound is refused for its content; with max_refusals=1
    one refusal excludes the device from the next round, which runs with the others."""
    fed = federation(rounds=2, max_refusals=1, max_update_norm=10.0)
    fed.transport.join("honest", shifted_by(1.0, samples=5))
    fed.transport.join("loud", shifted_by(1e6, samples=5))
    fed.run()
    first, second = fed.rounds()
    assert first["accepted"] == ["honest"] and "loud" in dict(first["rejected"])
    assert second["selected"] == ["honest"] and second["excluded"] == ["loud"]
    errors = [m for topic, m in fed.transport.sent(Error) if m.device_id == "loud"]
    assert errors and errors[0].code == REJECTED
    for value in fed.coordinator.params.values():
        np.testing.assert_allclose(value, 2.0, rtol=1e-6)  # only the honest +1, twice


def test_a_silent_device_ends_its_round_at_the_timeout_and_changes_nothing(federation) -> None:
    fed = federation(round_timeout_s=0.5)
    fed.transport.join("dev-a", silent)
    assert fed.run() >= 0.5
    (record,) = fed.rounds()
    assert record["accepted"] == [] and record["params_after"] == record["params_before"]
    assert record["missing"] == [["dev-a", "no update before the round's deadline"]]
    for value in fed.coordinator.params.values():
        assert not value.any()


def test_a_join_for_another_bundle_is_refused_and_does_not_count(federation) -> None:
    fed = federation(wait_for_devices_s=0.3)
    reply = fed.transport.join("dev-x", shifted_by(1.0, samples=1), bundle_hash="cd" * 32)
    assert isinstance(reply, Error) and reply.code == BUNDLE_MISMATCH
    with pytest.raises(TimeoutError, match="only 0 of the 1 devices needed"):
        fed.run()


def test_a_join_is_answered_with_the_servers_state(federation) -> None:
    fed = federation()
    reply = fed.transport.join("dev-a", shifted_by(1.0, samples=1))
    assert isinstance(reply, ServerStatus) and reply.device_id == "dev-a"
    assert reply.state == "starting" and reply.round == 0


def test_too_few_devices_give_up_naming_the_shortfall(federation) -> None:
    fed = federation(min_devices=2, wait_for_devices_s=0.3)
    fed.transport.join("dev-a", shifted_by(1.0, samples=1))
    with pytest.raises(TimeoutError, match="only 1 of the 2 devices needed came online"):
        fed.run()
    assert fed.transport.sent(Task) == []


def test_an_update_while_no_round_is_open_is_rejected(federation) -> None:
    fed = federation()
    fed.transport.join("dev-a", shifted_by(1.0, samples=1))
    late = Update(device_id="dev-a", round=1, params=initial_params(), samples=1)
    assert fed.transport.send_up(late) is None
    ((topic, error),) = fed.transport.sent(Error)
    assert topic == fed.transport.config.topics.down("dev-a", "error")
    assert error.code == REJECTED and "no round is open" in error.text


def test_a_stop_ends_the_run_as_stopped(federation) -> None:
    fed = federation(rounds=5)
    fed.transport.join("dev-a", shifted_by(1.0, samples=1))
    stop = threading.Event()
    stop.set()
    fed.run(stop)
    assert fed.transport.states()[-1] == "stopped" and fed.coordinator.round == 0
