"""The messages of the elastic body-worker pool (docs/cloud_server.md, "Scale-out"): a worker's
retained presence and the coordinator's retained list of the devices it serves. They travel
only between server-side processes, under the server's part of the topic tree."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from .envelope import MSG_ID, Envelope, check_device_id, check_float
from .errors import BAD_FIELD, ProtocolError

_ACCELERATOR = re.compile(r"[a-z0-9]{1,16}\Z")

MAX_WORKER_DEVICES = 4096
"""Devices one body worker may be assigned at once (an assignment's payload stays < 300 KB)."""


@dataclass(frozen=True, kw_only=True)
class WorkerPresence(Envelope):
    """Body worker -> coordinator, retained under the worker's id (`device_id`); its Last Will
    says `online=False`. The envelope's `version` is the worker's protocol version."""

    kind: ClassVar[str] = "worker_presence"
    online: bool
    capacity: float = 1.0  # relative share of devices it takes (e.g. samples/s, or GPU count)
    accelerator: str = "cpu"  # where its body runs: "cpu", "cuda", ...
    applied: str = ""  # msg_id of the last WorkerAssignment whose subscriptions are in place

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.online, bool):
            raise ProtocolError(BAD_FIELD, "online", "a bool", self.online)
        check_float(self.capacity, "capacity", 0.0, 1e9, low_open=True)
        if not isinstance(self.accelerator, str) or not _ACCELERATOR.match(self.accelerator):
            raise ProtocolError(
                BAD_FIELD, "accelerator", "1-16 chars of [a-z0-9]", self.accelerator
            )
        if self.applied and not MSG_ID.match(self.applied):
            raise ProtocolError(BAD_FIELD, "applied", "a msg_id or empty", self.applied)


@dataclass(frozen=True, kw_only=True)
class WorkerAssignment(Envelope):
    """Coordinator -> body worker (`device_id` = the worker's id), retained: the devices whose
    split traffic it serves from now on, as of round `round`."""

    kind: ClassVar[str] = "worker_assignment"
    devices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.devices, tuple) or len(self.devices) > MAX_WORKER_DEVICES:
            got = len(self.devices) if isinstance(self.devices, tuple) else type(self.devices)
            expected = f"a tuple of at most {MAX_WORKER_DEVICES} device ids"
            raise ProtocolError(BAD_FIELD, "devices", expected, got)
        for device_id in self.devices:
            check_device_id(device_id, "devices[]")
        if len(set(self.devices)) != len(self.devices):
            raise ProtocolError(BAD_FIELD, "devices", "no device twice", self.devices)
