"""The elastic body-worker pool, the coordinator's side: which workers are live, and which of a
round's devices each one serves.

Workers announce themselves with a retained `WorkerPresence` (their Last Will says offline).
Before a round's TASKs go out the coordinator assigns the round's devices (`assign_devices`,
pure: balanced by capacity, sticky), publishes each changed list as a retained
`WorkerAssignment`, and waits (bounded) until each such worker says its per-device
subscriptions are in place. A worker that goes offline mid-round has its devices moved to the
live ones at once; their open steps are lost with it, which the devices' split links survive
by redoing that exchange (edge_client/split_link.py).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sfprompt.protocol.client_config import Inbound
from sfprompt.protocol.errors import TransportError
from sfprompt.protocol.messages import Message
from sfprompt.protocol.mqtt_client import MqttClient
from sfprompt.protocol.pool_messages import MAX_WORKER_DEVICES, WorkerAssignment, WorkerPresence

log = logging.getLogger(__name__)

MAX_WORKERS = 256
"""Live workers the coordinator keeps; the presence of one more is ignored (and logged)."""
MAX_REMEMBERED = 100_000
"""Devices whose last worker is remembered (for stickiness across rounds), oldest forgotten."""


def assign_devices(
    devices: Sequence[str],
    capacities: Mapping[str, float],
    previous: Mapping[str, str],
    rebalance: float = 0.25,
) -> dict[str, str]:
    """Device -> worker for `devices`, over workers of the given (positive) capacities.

    Sticky: a device keeps its `previous` worker while that worker is live, unless the worker
    holds more than `(1 + rebalance)` times its share; then it keeps its share (rounded up) and
    the rest move. Devices new, moved or of a gone worker each go to the worker with the least
    load per capacity after taking it (ties by worker id), so the result is deterministic.
    Raises ValueError without workers, or with more devices than they may hold."""
    if not capacities:
        raise ValueError("no live body worker to assign the devices to")
    workers = sorted(capacities)
    unique = sorted(set(devices))
    if len(unique) > MAX_WORKER_DEVICES * len(workers):
        raise ValueError(
            f"{len(unique)} devices are more than {len(workers)} workers may serve "
            f"({MAX_WORKER_DEVICES} each): start more workers"
        )
    total = sum(capacities.values())
    share = {w: len(unique) * capacities[w] / total for w in workers}
    load: dict[str, list[str]] = {w: [] for w in workers}
    to_place: list[str] = []
    for device in unique:
        worker = previous.get(device)
        if worker in load:
            load[worker].append(device)
        else:
            to_place.append(device)
    for worker in workers:
        if len(load[worker]) > share[worker] * (1 + rebalance):
            keep = math.ceil(share[worker])
            to_place.extend(load[worker][keep:])
            del load[worker][keep:]
    for device in sorted(to_place):
        open_workers = [w for w in workers if len(load[w]) < MAX_WORKER_DEVICES]
        best = min(open_workers, key=lambda w: ((len(load[w]) + 1) / capacities[w], w))
        load[best].append(device)
    return {device: worker for worker in workers for device in load[worker]}


@dataclass(frozen=True)
class WorkerInfo:
    """A live worker, as its latest presence says."""

    worker_id: str
    capacity: float
    accelerator: str
    applied: str  # msg_id of the last assignment it applied


class WorkerPool:
    """The live workers and the current assignment; thread-safe (presence arrives on the MQTT
    client's dispatcher thread, `route` runs on the round loop's)."""

    def __init__(
        self, client: MqttClient, rebalance: float = 0.25, ack_timeout_s: float = 10.0
    ) -> None:
        self.client = client
        self.rebalance = rebalance
        self.ack_timeout_s = ack_timeout_s
        self._workers: dict[str, WorkerInfo] = {}
        self._assigned: dict[str, str] = {}  # device -> worker, the open round's devices only
        self._home: dict[str, str] = {}  # device -> its last worker, newest last (bounded)
        self._lists: dict[str, tuple[str, ...]] = {}  # worker -> its list as last published
        self._sent: dict[str, str] = {}  # worker -> msg_id of that list
        self._round = 0
        self._cond = threading.Condition()

    def attach(self) -> WorkerPool:
        topics = self.client.config.topics
        self.client.subscribe(topics.all_worker_presence(), self._on_presence)
        return self

    def live(self) -> dict[str, WorkerInfo]:
        with self._cond:
            return dict(self._workers)

    def await_live(self, timeout_s: float, stop: threading.Event) -> bool:
        """Block until a worker is live (True) or `stop` is set (False); raises TimeoutError if
        none comes in `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            if not self._workers:
                log.info("waiting up to %.0fs for a body worker", timeout_s)
            while not self._workers and not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"no body worker joined the elastic pool within {timeout_s:.0f}s"
                    )
                self._cond.wait(min(left, 0.5))
            return bool(self._workers)

    def route(self, round: int, devices: Sequence[str]) -> dict[str, str]:
        """Assign round `round`'s `devices` (device -> worker), publish the lists that changed and
        wait up to `ack_timeout_s` until their workers have subscribed. Raises ValueError if no
        worker is live."""
        with self._cond:
            self._round = round
            self._assign(devices, self._home)
            changed = self._publish_lists()
            acked = self._cond.wait_for(
                lambda: all(self._acked(w) for w in changed), self.ack_timeout_s
            )
            if not acked:
                late = sorted(w for w in changed if not self._acked(w))
                log.warning("workers %s did not confirm their devices in time", ", ".join(late))
            return dict(self._assigned)

    # ---- the caller holds the lock ------------------------------------------------------------
    def _capacities(self) -> dict[str, float]:
        return {w: info.capacity for w, info in self._workers.items()}

    def _assign(self, devices: Sequence[str], previous: Mapping[str, str]) -> None:
        self._assigned = assign_devices(devices, self._capacities(), previous, self.rebalance)
        for device, worker in self._assigned.items():
            self._home.pop(device, None)
            self._home[device] = worker
        while len(self._home) > MAX_REMEMBERED:
            del self._home[next(iter(self._home))]

    def _acked(self, worker_id: str) -> bool:
        info = self._workers.get(worker_id)
        return info is None or info.applied == self._sent.get(worker_id)

    def _publish_lists(self) -> list[str]:
        """Publish every worker's list that differs from the last one sent (empty for a worker
        no longer live, so that it finds nothing stale should it come back); returns the live
        workers whose list changed."""
        lists: dict[str, list[str]] = {w: [] for w in self._workers}
        for device, worker in sorted(self._assigned.items()):
            lists[worker].append(device)
        changed = []
        for worker in sorted(set(lists) | set(self._lists)):
            devices = tuple(lists.get(worker, ()))
            if self._lists.get(worker, ()) == devices and worker in self._sent:
                continue
            message = WorkerAssignment(device_id=worker, round=self._round, devices=devices)
            try:
                self.client.publish(
                    self.client.config.topics.worker_assignment(worker),
                    message,
                    retain=True,
                    timeout=None,
                )
            except TransportError as exc:
                log.error("could not publish the devices of worker %s: %s", worker, exc)
                continue
            self._sent[worker] = message.msg_id
            if devices:
                self._lists[worker] = devices
            else:
                self._lists.pop(worker, None)
            if worker in self._workers:
                changed.append(worker)
            log.info("worker %s serves %s", worker, ", ".join(devices) or "no device")
        return changed

    # ---- handlers (dispatcher thread) --------------------------------------------------------
    def _on_presence(self, inbound: Inbound) -> Message | None:
        msg = inbound.message
        if not isinstance(msg, WorkerPresence):
            return None
        with self._cond:
            known = msg.device_id in self._workers
            if msg.online and not known and len(self._workers) >= MAX_WORKERS:
                log.warning(
                    "ignored worker %s: %d workers live already", msg.device_id, MAX_WORKERS
                )
                return None
            if msg.online:
                self._workers[msg.device_id] = WorkerInfo(
                    msg.device_id, msg.capacity, msg.accelerator, msg.applied
                )
                if not known:
                    log.info(
                        "worker %s is live (%s, capacity %g)",
                        msg.device_id,
                        msg.accelerator,
                        msg.capacity,
                    )
            elif known:
                del self._workers[msg.device_id]
                log.warning("worker %s went offline", msg.device_id)
                self._move_devices_of(msg.device_id)
            self._cond.notify_all()
        return None

    def _move_devices_of(self, worker_id: str) -> None:
        """A worker went offline: its devices go to the live workers now (no waiting for them:
        this runs on the dispatcher thread, which brings their confirmations)."""
        if worker_id not in self._lists:
            return
        if not self._workers:
            log.error("no body worker is live: the devices of %s wait for one", worker_id)
            self._assigned = {d: w for d, w in self._assigned.items() if w != worker_id}
        else:
            self._assign(list(self._assigned), self._assigned)
        self._publish_lists()
