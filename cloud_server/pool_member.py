"""The elastic body-worker pool, a worker's side: announce itself, follow its assignment.

The worker's presence is retained under its id, with a Last Will saying offline, so the
coordinator learns of a crash (even SIGKILL: the broker sees the connection drop) at once. The
coordinator's retained `WorkerAssignment` names the devices it serves: it subscribes to exactly
their split topics (`BodyService.serve_device`), unsubscribes from devices moved away, and then
says which assignment it applied, so that the coordinator sends TASKs only once their SMASHED
has somewhere to go.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

from sfprompt.protocol.client_config import ClientConfig, Inbound
from sfprompt.protocol.codec import encode
from sfprompt.protocol.errors import TransportError
from sfprompt.protocol.messages import Message
from sfprompt.protocol.mqtt_client import MqttClient
from sfprompt.protocol.pool_messages import WorkerAssignment, WorkerPresence
from sfprompt.protocol.topics import Topics

from .body_service import BodyService

log = logging.getLogger(__name__)


def offline_will(topics: Topics, worker_id: str) -> tuple[str, bytes]:
    """The Last Will that tells the coordinator this worker is gone."""
    gone = WorkerPresence(device_id=worker_id, online=False)
    return topics.worker_presence(worker_id), encode(gone)


def member_session(config: ClientConfig, worker_id: str) -> ClientConfig:
    """A pool member's MQTT session: its Last Will, and no session kept once it is gone. The
    coordinator hands a dead worker's devices to others and the step state died with it, so a
    broker that kept its subscriptions would only queue those devices' h for nobody (up to its
    per-client queue, ~300 KB a ViT-Base sample); a worker back after a network blip subscribes
    again on connecting, and the devices resend what was lost."""
    return replace(config, will=offline_will(config.topics, worker_id), session_expiry_s=0)


class PoolMember:
    """One worker's membership of the pool, over its MQTT client."""

    def __init__(
        self,
        client: MqttClient,
        service: BodyService,
        worker_id: str,
        capacity: float,
        accelerator: str,
    ) -> None:
        self.client = client
        self.service = service
        self.worker_id = worker_id
        self.capacity = capacity
        self.accelerator = accelerator
        self.devices: frozenset[str] = frozenset()
        self._applied = ""
        self._lock = threading.Lock()

    def owns(self, device_id: str) -> bool:
        """Whether `device_id` is assigned here (a message in flight after a move is not)."""
        return device_id in self.devices

    def attach(self) -> PoolMember:
        """Follow the assignment and announce presence on every (re)connect."""
        topics = self.client.config.topics
        self.client.subscribe(topics.worker_assignment(self.worker_id), self._on_assignment)
        self.client.on_every_connect(self._announce)
        return self

    def _announce(self) -> None:
        presence = WorkerPresence(
            device_id=self.worker_id,
            online=True,
            capacity=self.capacity,
            accelerator=self.accelerator,
            applied=self._applied,
        )
        topic = self.client.config.topics.worker_presence(self.worker_id)
        self.client.publish(topic, presence, retain=True, timeout=None)

    def _on_assignment(self, inbound: Inbound) -> Message | None:
        msg = inbound.message
        if not isinstance(msg, WorkerAssignment) or msg.device_id != self.worker_id:
            return None
        with self._lock:
            wanted = frozenset(msg.devices)
            for device_id in sorted(self.devices - wanted):
                self.service.stop_serving(device_id)
            self.devices = self.devices & wanted
            for device_id in sorted(wanted - self.devices):
                try:
                    self.service.serve_device(device_id)
                except TransportError as exc:
                    log.error("could not subscribe to %s's split traffic: %s", device_id, exc)
                    continue
                self.devices = self.devices | {device_id}
            self._applied = msg.msg_id
        log.info("round %d: serving %s", msg.round, ", ".join(sorted(self.devices)) or "no device")
        self._announce()
        return None
