"""The device loop in-process: `EdgeDevice.run` over a fake transport in place of MQTT.

The fake plays broker and server: it answers JOINs, and serves split steps as a body of no
blocks would (z is the tail's input taken from h; dL/dh is dL/dz scattered back), so a real
round trains on the real bundle without a broker or a server process. What the loop promises:
join, train the newest task, send one UPDATE, report a failed round and carry on, join again
when the server restarts, and leave on the round limit, the server's end or a stop.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from sfprompt.edge_client import device as device_module
from sfprompt.edge_client.config import EdgeConfig
from sfprompt.edge_client.device import DeviceFailure, EdgeDevice
from sfprompt.edge_client.tail_input import scatter_grad, select
from sfprompt.export.bundle_writer import WEIGHTS_FILE, ExportResult
from sfprompt.protocol.bundle import Manifest
from sfprompt.protocol.client_config import ClientConfig, Handler, Inbound
from sfprompt.protocol.codec import decode, encode
from sfprompt.protocol.errors import BUNDLE_MISMATCH, BUSY, RemoteError
from sfprompt.protocol.messages import (
    BodyOut,
    Error,
    GradH,
    GradZ,
    Join,
    Message,
    PhaseSettings,
    Presence,
    ServerStatus,
    Smashed,
    Task,
    Update,
)
from sfprompt.protocol.topics import Topics
from sfprompt.protocol.traffic import Traffic
from tests.federation.harness import write_shards
from tests.helpers import wait_for

ID = "dev-0"
T = Topics()


class FakeClient:
    """What EdgeDevice uses of MqttClient, answered in-process; records what it publishes."""

    def __init__(self, config: ClientConfig, manifest: Manifest) -> None:
        self.config = config
        self.manifest = manifest
        self.connects = 0
        self.traffic = Traffic()
        self.handlers: dict[str, Handler] = {}
        self.hooks: list[Callable[[], None]] = []
        self.published: list[tuple[str, Message]] = []
        self.joins: list[Join] = []
        self.join_error: Error | None = None  # answer JOINs with this ERROR instead
        self.tasks_at_join: list[Task] = []  # TASKs the server sends as it accepts the JOIN
        self.split_error: Error | None = None  # answer split steps with this ERROR instead
        self.closed = False

    # ---- connection
    def subscribe(self, topic: str, handler: Handler) -> None:
        self.handlers[topic] = handler

    def on_every_connect(self, hook: Callable[[], None]) -> None:
        self.hooks.append(hook)

    def connect(self, timeout: float = 30.0) -> FakeClient:
        self.connects += 1
        for hook in self.hooks:
            hook()
        return self

    def close(self, send_will: bool = True) -> None:
        self.closed = True

    # ---- publishing
    def publish(self, topic: str, message: Message, **_: Any) -> None:
        self.published.append((topic, message))

    def packets(self, message: Message) -> list[bytes]:
        return [encode(message)]  # one packet: no broker limit to chunk for

    def publish_packets(self, topic: str, packets: list[bytes], **_: Any) -> None:
        self.published.extend((topic, decode(packet)) for packet in packets)

    def sent(self, kind: type[Message]) -> list[Message]:
        return [message for _, message in self.published if isinstance(message, kind)]

    # ---- requests: the server's side
    def request(
        self, topic: str, message: Message, reply_topic: str, *_: Any, **__: Any
    ) -> Message:
        if isinstance(message, Join):
            self.joins.append(message)
            if self.join_error is not None:
                raise RemoteError(self.join_error)
            for task in self.tasks_at_join:
                self.task(task)
            return ServerStatus(device_id=ID, state="waiting", devices_online=1)
        if self.split_error is not None:
            raise RemoteError(self.split_error)
        where = {"device_id": ID, "round": message.round, "step": message.step}
        if isinstance(message, Smashed):
            self.traffic.add(self.traffic.sent, "smashed", message.h.nbytes)
            return BodyOut(z=np.ascontiguousarray(select(message.h, self.manifest)), **where)
        assert isinstance(message, GradZ), message
        return GradH(grad_h=scatter_grad(message.grad_z, self.manifest), **where)

    # ---- delivering: what the broker would hand the device's handlers
    def deliver(self, topic_filter: str, topic: str, message: Message) -> None:
        self.handlers[topic_filter](Inbound(topic, message))

    def task(self, task: Task) -> None:
        self.deliver(T.device_inbox(ID), T.down(ID, "task"), task)

    def status(self, state: str, round: int = 0) -> None:
        status = ServerStatus(device_id="*", round=round, state=state)
        self.deliver(T.server_status(), T.server_status(), status)


@dataclass
class Running:
    """A device whose loop runs on its own thread, and the fake it talks through."""

    device: EdgeDevice
    client: FakeClient
    stop: threading.Event
    thread: threading.Thread
    result: dict[str, Any]

    def finish(self, timeout: float = 60.0) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the device loop did not end"
        if "error" in self.result:
            raise self.result["error"]
        return int(self.result["rounds"])


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    (path,) = write_shards(tmp_path_factory.mktemp("loop"), devices=1, per_device=16, test=10)
    return path


@pytest.fixture
def start(
    small_export: ExportResult, shard: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Running]]:
    """Start `EdgeDevice.run` on a thread with the fake transport in place of MqttClient."""
    started: list[Running] = []

    def run(prepare: Callable[[FakeClient], None] = lambda c: None, **options: Any) -> Running:
        cfg = EdgeConfig(small_export.device_dir, shard, ID, threads=1, **options)
        device = EdgeDevice(cfg)
        clients: list[FakeClient] = []

        def new_client(config: ClientConfig) -> FakeClient:
            client = FakeClient(config, device.manifest)
            prepare(client)
            clients.append(client)
            return client

        monkeypatch.setattr(device_module, "MqttClient", new_client)
        result: dict[str, Any] = {}

        def loop() -> None:
            try:
                result["rounds"] = device.run()
            except Exception as exc:  # raised again on the test's thread by finish()
                result["error"] = exc

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()

        def joined() -> bool:
            return bool(clients) and bool(clients[0].joins)

        wait_for(lambda: joined() or "error" in result, 30, "the device's JOIN")
        if not joined():
            raise result["error"]
        running = Running(device, clients[0], device.stop, thread, result)
        started.append(running)
        return running

    yield run
    for running in started:
        running.stop.set()
        running.thread.join(30)


def make_task(bundle: ExportResult, round: int = 1, deadline_s: float = 120.0) -> Task:
    """A TASK with the bundle's initial parameters: keep the hardest 8 of 16, one batch each."""
    params = load_file(str(bundle.device_dir / WEIGHTS_FILE))
    settings = PhaseSettings(
        keep_ratio=0.5,
        local_epochs=1,
        local_lr=0.01,
        split_lr=0.05,
        deadline=time.time() + deadline_s,
        split_epochs=1,
        batch_size=8,
        encoding="fp32",
        prune="global",
    )
    return Task(device_id=ID, round=round, params=params, settings=settings)


def test_a_device_announces_itself_then_joins_with_its_bundle(start) -> None:
    running = start()
    client = running.client
    presence = client.sent(Presence)
    assert presence and presence[0].online  # before the JOIN: online, retained
    (join,) = client.joins
    assert join.bundle_hash == running.device.manifest.contract_hash()
    running.stop.set()
    assert running.finish() == 0
    assert client.closed


def test_a_task_is_trained_and_answered_with_one_update(start, small_export) -> None:
    running = start(max_rounds=1)
    client = running.client
    task = make_task(small_export)
    client.task(task)
    assert running.finish() == 1
    (update,) = client.sent(Update)
    assert (update.device_id, update.round) == (ID, 1)
    assert update.samples == 8  # keep ratio 0.5 of 16 samples
    assert set(update.params) == set(task.params)
    assert any(not np.array_equal(update.params[k], task.params[k]) for k in task.params)
    assert update.metrics["split_steps"] == 1 and update.metrics["local_samples"] == 16
    assert update.metrics["bytes_up_split"] > 0  # counted from the client's traffic
    assert update.memory["peak_rss_mb"] > 0
    assert [t for t, m in client.published if isinstance(m, Update)] == [T.up(ID, "update")]


def test_a_failed_round_is_reported_and_the_next_task_still_runs(start, small_export) -> None:
    running = start(max_rounds=1)
    client = running.client
    client.split_error = Error(device_id=ID, code="unknown_step", text="server restarted")
    client.task(make_task(small_export, round=1))
    wait_for(lambda: client.sent(Error), 60, "the device's ERROR for round 1")
    (error,) = client.sent(Error)
    assert (error.round, error.code) == (1, "unknown_step")
    assert "round failed on the device" in error.text
    client.split_error = None
    client.task(make_task(small_export, round=2))
    assert running.finish() == 1
    assert [u.round for u in client.sent(Update)] == [2]


def test_only_the_newest_waiting_task_is_trained(start, small_export) -> None:
    """Tasks that queued up before the device looked are missed rounds, not a backlog."""

    def three_tasks(client: FakeClient) -> None:
        client.tasks_at_join = [make_task(small_export, round=r) for r in (1, 2, 3)]

    running = start(three_tasks, max_rounds=1)
    assert running.finish() == 1
    assert [u.round for u in running.client.sent(Update)] == [3]


def test_a_task_past_its_deadline_is_skipped(start, small_export, caplog) -> None:
    def late_task(client: FakeClient) -> None:
        client.tasks_at_join = [make_task(small_export, round=1, deadline_s=-1.0)]

    caplog.set_level(logging.INFO, logger=device_module.__name__)
    running = start(late_task, max_rounds=1)
    wait_for(lambda: "round 1 missed" in caplog.text, 30, "round 1 to be skipped")
    running.client.task(make_task(small_export, round=2))
    assert running.finish() == 1
    assert [u.round for u in running.client.sent(Update)] == [2]


def test_a_restarted_server_is_joined_again(start) -> None:
    running = start()
    client = running.client
    client.status("starting")
    wait_for(lambda: len(client.joins) == 2, 30, "a second JOIN")
    running.stop.set()
    assert running.finish() == 0


def test_the_device_leaves_when_the_server_finishes_if_asked(start) -> None:
    running = start(leave_when_server_stops=True)
    running.client.status("finished", round=3)
    assert running.finish() == 0


def test_a_bundle_the_server_refuses_stops_the_device(start) -> None:
    def mismatch(client: FakeClient) -> None:
        client.join_error = Error(device_id=ID, code=BUNDLE_MISMATCH, text="another model")

    running = start(mismatch)
    with pytest.raises(DeviceFailure, match="another model"):
        running.finish()
    assert running.client.closed


def test_a_busy_join_is_retried(start) -> None:
    def busy(client: FakeClient) -> None:
        client.join_error = Error(device_id=ID, code=BUSY, text="registry full")

    running = start(busy)
    client = running.client
    client.join_error = None
    wait_for(lambda: len(client.joins) == 2, 30, "the JOIN sent again")
    running.stop.set()
    assert running.finish() == 0


def test_a_task_weaker_than_the_devices_floor_is_sat_out_and_the_server_told(
    start, small_export
) -> None:
    """A server that asks for no defense gets nothing from a device that requires one: no h
    leaves it, the ERROR says what was missing, and a TASK that meets the floor is trained."""
    running = start(max_rounds=1, require_noise=0.05, require_grad_noise=8.0)
    client = running.client
    client.task(make_task(small_export, round=1))
    wait_for(lambda: client.sent(Error), 60, "the device's ERROR for round 1")
    (error,) = client.sent(Error)
    assert (error.round, error.code) == (1, "bad_field")
    assert "sigma >= 0.05" in error.text and "dL/dz noise >= 8" in error.text
    assert not client.sent(Smashed) and not client.sent(Update)
    task = make_task(small_export, round=2)
    defended = dataclasses.replace(
        task.settings, defense_clip=50.0, defense_noise=0.05, defense_grad_noise=8.0
    )
    client.task(dataclasses.replace(task, settings=defended))
    assert running.finish() == 1
    assert [u.round for u in client.sent(Update)] == [2]
