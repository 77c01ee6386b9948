"""One process of simulated devices for bench/bench_fleet.py: many devices, no model.

A simulated device is what `sfprompt-edge start` is on the wire for split training, with every
computation skipped: its own MQTT connection (client id = broker user = device id, its own
password, a retained presence with its Last Will), a JOIN the server answers, then split steps
at a fixed period through the device's own `SplitLink` (SMASHED -> BODY_OUT, GRAD_Z -> GRAD_H,
with its retries of `busy`), carrying random h and dL/dz of the bundle's shapes and encoding.
It awaits no TASK: the server's body service answers any device the broker lets publish on its
own topics, so the bench drives the split exchange alone (the server runs no round).

Each device steps on its own thread, as a device's training loop does, in slots `period_s` apart
from a random phase; the slots a step overruns are missed (counted, never made up in a burst),
and the device starts again at its next slot: it never has two steps open.
The parent speaks JSON lines on stdin/stdout: it sends the spec, this prints `ready` once every
device has joined (or failed to), it sends `go` (the schedule), this prints `result`.

    python bench/fleet_devices.py    (started by bench/bench_fleet.py)
"""

from __future__ import annotations

import json
import math
import platform
import resource
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfprompt.edge_client.split_link import SplitLink
from sfprompt.protocol.bundle import BATCH, load_manifest
from sfprompt.protocol.client_config import (
    Inbound,
    connection_config,
    presence_will,
    read_password,
)
from sfprompt.protocol.codec import Expectations, expectations_for
from sfprompt.protocol.errors import BUSY, ProtocolError, RemoteError, TransportError
from sfprompt.protocol.messages import Join, Message, Presence, Task
from sfprompt.protocol.mqtt_client import MqttClient

ROUND = 1  # the round every split step names (the body service keys steps by it, nothing more)


@dataclass(frozen=True)
class DeviceSpec:
    """What one device process runs: its devices, where they connect, and their steps."""

    url: str  # the broker
    clients: str  # folder of <device id>/password, as the embedded broker keeps them
    device_ids: list[str]
    bundle: str  # a device bundle: the shapes of h and z, and the contract hash for JOIN
    batch: int  # samples per split step
    encoding: str  # how h and dL/dz travel
    period_s: float  # one step per device per period
    timeout_s: float  # per split exchange, as EdgeConfig.request_timeout_s
    attempts: int  # sends per exchange, as EdgeConfig.attempts
    connect_threads: int = 16  # devices connecting and joining at once
    seed: int = 0


@dataclass(frozen=True)
class Schedule:
    """When to step, in wall-clock seconds: from `start` (each device at its own phase within
    the first period) until `end` (no step begins at or after it)."""

    start: float
    end: float


@dataclass
class StepRecord:
    """One split step as the device saw it (times relative to the schedule's start)."""

    due: float
    started: float
    forward_s: float  # SMASHED -> BODY_OUT (nan if it failed)
    total_s: float  # SMASHED ... GRAD_H, retries included
    busy: int  # `busy` refusals retried within the step
    error: str | None = None  # what ended a failed step: an ERROR code or an exception name
    missed: int = 0  # the device's slots this step overran (before the schedule's end)

    def as_row(self) -> list[Any]:
        """[due, started, forward_s or None, total_s, busy, error, missed]: compact JSON."""
        forward = None if math.isnan(self.forward_s) else round(self.forward_s, 6)
        times = [round(self.due, 6), round(self.started, 6), forward, round(self.total_s, 6)]
        return [*times, self.busy, self.error, self.missed]


@dataclass
class JoinFigures:
    """How the devices' connections and JOINs went."""

    joined: int = 0
    seconds: list[float] = field(default_factory=list)  # connect + presence + JOIN, per device
    failures: Counter[str] = field(default_factory=Counter)


class CountingClient:
    """What `SplitLink` uses of an `MqttClient` (`config`, `request`), counting the `busy`
    refusals its link retries, which it would otherwise swallow."""

    def __init__(self, client: MqttClient) -> None:
        self.client = client
        self.config = client.config
        self.busy = 0

    def request(
        self, topic: str, message: Message, reply_topic: str, timeout: float, attempts: int
    ) -> Message:
        try:
            return self.client.request(topic, message, reply_topic, timeout, attempts)
        except RemoteError as exc:
            if getattr(exc.error, "code", None) == BUSY:
                self.busy += 1
            raise


class SimDevice:
    """One device: its own MQTT session, presence and JOIN, then split steps on a schedule."""

    def __init__(self, device_id: str, spec: DeviceSpec, expect: Expectations) -> None:
        self.device_id = device_id
        self.spec = spec
        password = read_password(None, Path(spec.clients) / device_id / "password")
        config = connection_config(
            spec.url,
            device_id,
            username=device_id,
            password=password,
            expect=expect,
            will=presence_will(device_id),
        )
        self.client = MqttClient(config)
        self.counting = CountingClient(self.client)
        self.joined = False
        self.tasks = 0
        topics = config.topics
        self.client.subscribe(topics.device_inbox(device_id), self._on_inbox)
        self.client.subscribe(topics.server_status(), lambda inbound: None)
        self.records: list[StepRecord] = []

    def _on_inbox(self, inbound: Inbound) -> Message | None:
        if isinstance(inbound.message, Task):
            self.tasks += 1  # no round is run: a TASK would mean the server started one
        return None

    def join(self, contract_hash: str) -> None:
        """Connect, announce presence (retained), JOIN; raises TransportError or RemoteError."""
        client = self.client
        topics = client.config.topics
        client.connect(timeout=60.0)
        presence = Presence(device_id=self.device_id, online=True, since=time.time())
        client.publish(topics.presence(self.device_id), presence, retain=True, timeout=60.0)
        join = Join(
            device_id=self.device_id,
            bundle_hash=contract_hash,
            runtime={"python": platform.python_version(), "bench": "fleet"},
            hardware={},
        )
        client.request(
            topics.up(self.device_id, "join"), join, topics.down(self.device_id, "status"), 60.0, 3
        )
        self.joined = True

    def run(self, schedule: Schedule, h: np.ndarray, grad_z: np.ndarray, phase: float) -> None:
        """Step from `schedule.start + phase` every period until `schedule.end`."""
        spec = self.spec
        link = SplitLink(
            self.counting,  # type: ignore[arg-type]  # duck-typed: config + request
            self.device_id,
            ROUND,
            spec.encoding,
            spec.timeout_s,
            spec.attempts,
        )
        due = schedule.start + phase
        while due < schedule.end:
            time.sleep(max(0.0, due - time.time()))
            record = self._step(link, h, grad_z, due, schedule.start)
            self.records.append(record)
            due += spec.period_s
            while due < min(time.time(), schedule.end):  # overrun: the slot is missed
                record.missed += 1
                due += spec.period_s

    def _step(
        self, link: SplitLink, h: np.ndarray, grad_z: np.ndarray, due: float, origin: float
    ) -> StepRecord:
        busy_before = self.counting.busy
        started = time.time()
        forward_s, error = math.nan, None
        try:
            link.forward(h)
            forward_s = time.time() - started
            link.backward(grad_z)
        except RemoteError as exc:
            error = str(getattr(exc.error, "code", "remote"))
        except (TransportError, ProtocolError) as exc:
            error = getattr(exc, "code", None) or type(exc).__name__
        return StepRecord(
            due=due - origin,
            started=started - origin,
            forward_s=forward_s,
            total_s=time.time() - started,
            busy=self.counting.busy - busy_before,
            error=error,
        )

    def close(self) -> None:
        self.client.close(send_will=True)


def tensors(spec: DeviceSpec, expect: Expectations) -> tuple[np.ndarray, np.ndarray]:
    """Random h (B, T, D) and dL/dz of the shapes the bundle implies: float32, as a device's
    runtime gives them (the link encodes them as `spec.encoding` on every send)."""
    rng = np.random.default_rng(spec.seed)

    def shape_of(kind: str) -> tuple[int, ...]:
        (tensor,) = expect.by_kind[kind]
        return tuple(spec.batch if n == BATCH else int(n) for n in tensor.shape)

    h = rng.standard_normal(shape_of("smashed"), dtype=np.float32)
    # Any finite values do (the server checks shapes and finiteness); a loss's gradient is small.
    grad_z = rng.standard_normal(shape_of("grad_z"), dtype=np.float32) * np.float32(1e-3)
    return h, grad_z


def raise_open_files_limit() -> int:
    """The soft limit on open files raised to the hard one; returns it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def join_all(devices: list[SimDevice], contract_hash: str, threads: int) -> JoinFigures:
    figures = JoinFigures()
    lock = threading.Lock()

    def join_one(device: SimDevice) -> None:
        started = time.monotonic()
        try:
            device.join(contract_hash)
        except (TransportError, RemoteError, ProtocolError) as exc:
            code = getattr(getattr(exc, "error", None), "code", None) or type(exc).__name__
            with lock:
                figures.failures[f"join: {code}"] += 1
            return
        with lock:
            figures.joined += 1
            figures.seconds.append(time.monotonic() - started)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(join_one, devices))
    return figures


def run_schedule(
    devices: list[SimDevice], spec: DeviceSpec, schedule: Schedule, expect: Expectations
) -> None:
    """Every device on its own thread until its last step is done (all send the same h)."""
    h, grad_z = tensors(spec, expect)
    rng = np.random.default_rng(spec.seed + 1)
    threads = [
        threading.Thread(
            target=device.run,
            args=(schedule, h, grad_z, float(rng.uniform(0, spec.period_s))),
            daemon=True,
        )
        for device in devices
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def traffic_of(devices: list[SimDevice]) -> dict[str, dict[str, int]]:
    """Payload bytes the devices sent and received, by message kind."""
    sent: Counter[str] = Counter()
    received: Counter[str] = Counter()
    for device in devices:
        out, into = device.client.traffic.snapshot()
        sent.update(out)
        received.update(into)
    return {"sent": dict(sent), "received": dict(received)}


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def main() -> None:
    spec = DeviceSpec(**json.loads(sys.stdin.readline()))
    open_files = raise_open_files_limit()
    manifest = load_manifest(spec.bundle, verify=False)
    expect = expectations_for(manifest)
    devices = [SimDevice(device_id, spec, expect) for device_id in spec.device_ids]
    joins = join_all(devices, manifest.contract_hash(), spec.connect_threads)
    emit("ready", open_files=open_files, **asdict(joins))
    line = sys.stdin.readline()
    if not line:  # the parent gave up before the start
        return
    schedule = Schedule(**json.loads(line))
    joined = [d for d in devices if d.joined]
    run_schedule(joined, spec, schedule, expect)
    records = [r.as_row() for d in joined for r in d.records]
    tasks = sum(d.tasks for d in devices)
    emit("result", records=records, traffic=traffic_of(devices), tasks=tasks)
    with ThreadPoolExecutor(max(1, spec.connect_threads)) as pool:  # each sends its Will
        list(pool.map(SimDevice.close, devices))


if __name__ == "__main__":
    main()
