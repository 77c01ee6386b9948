"""The topic tree, built in one place (the broker ACL is generated from it too).

    sfp/v1/dev/{device_id}/up/{kind}     device -> server: join, smashed, grad_z, update, error
    sfp/v1/dev/{device_id}/down/{kind}   server -> one device: task, body_out, grad_h, status, error
    sfp/v1/presence/{device_id}          retained Presence; the device's Last Will
    sfp/v1/server/status                 retained ServerStatus
    sfp/v1/server/workers/{worker_id}    retained WorkerPresence of a body worker; its Last Will
    sfp/v1/server/assign/{worker_id}     retained WorkerAssignment: the devices it serves

Everything a device may touch sits under a level equal to its id, so that one Mosquitto
`pattern` line with `%u` per direction confines it; the version in the root keeps peers of
different protocol versions apart on a shared broker.
"""

from __future__ import annotations

from dataclasses import dataclass

from .messages import check_device_id
from .version import PROTOCOL_VERSION

UP_KINDS = ("join", "smashed", "grad_z", "update", "error")
DOWN_KINDS = ("task", "body_out", "grad_h", "status", "error")
_WORKER_KINDS = {"workers": "worker_presence", "assign": "worker_assignment"}


@dataclass(frozen=True)
class Route:
    """What a topic says: its area, device (if any), direction (if any) and message kind."""

    area: str  # "dev", "presence", "server" or "worker" (the body workers' topics)
    device_id: str | None = None
    direction: str | None = None  # "up" or "down" under "dev"
    kind: str | None = None


@dataclass(frozen=True)
class Topics:
    """Builds every topic; `root` lets tests or tenants share a broker without crosstalk."""

    root: str = f"sfp/v{PROTOCOL_VERSION}"

    def up(self, device_id: str, kind: str) -> str:
        _check_kind(kind, UP_KINDS)
        return f"{self.root}/dev/{check_device_id(device_id)}/up/{kind}"

    def down(self, device_id: str, kind: str) -> str:
        _check_kind(kind, DOWN_KINDS)
        return f"{self.root}/dev/{check_device_id(device_id)}/down/{kind}"

    def presence(self, device_id: str) -> str:
        return f"{self.root}/presence/{check_device_id(device_id)}"

    def server_status(self) -> str:
        return f"{self.root}/server/status"

    def worker_presence(self, worker_id: str) -> str:
        return f"{self.root}/server/workers/{check_device_id(worker_id, 'worker_id')}"

    def worker_assignment(self, worker_id: str) -> str:
        return f"{self.root}/server/assign/{check_device_id(worker_id, 'worker_id')}"

    # Subscriptions -----------------------------------------------------------------------
    def all_up(self) -> str:
        """What the server subscribes to for device traffic."""
        return f"{self.root}/dev/+/up/#"

    def all_up_of(self, kind: str) -> str:
        """One kind of device traffic from every device (a service handles only its own)."""
        _check_kind(kind, UP_KINDS)
        return f"{self.root}/dev/+/up/{kind}"

    def all_presence(self) -> str:
        return f"{self.root}/presence/+"

    def all_worker_presence(self) -> str:
        return f"{self.root}/server/workers/+"

    def device_inbox(self, device_id: str) -> str:
        """Everything sent to one device (its own down-tree)."""
        return f"{self.root}/dev/{check_device_id(device_id)}/down/#"

    # Broker access rules ----------------------------------------------------------------
    def device_access(self, device: str) -> list[tuple[str, str]]:
        """(access, topic filter) pairs one device needs: "read", "write" or "readwrite".

        `device` is a device id, or a broker's placeholder for the user name (Mosquitto: `%u`).
        Everything else is closed to it: other devices' topics, the whole tree.
        """
        return [
            ("write", f"{self.root}/dev/{device}/up/#"),
            ("read", f"{self.root}/dev/{device}/down/#"),
            ("readwrite", f"{self.root}/presence/{device}"),
            ("read", f"{self.root}/server/status"),
        ]

    def server_access(self) -> list[tuple[str, str]]:
        """The server (and its workers) read and write the whole tree."""
        return [("readwrite", f"{self.root}/#")]

    def reply_allowed(self, request_topic: str, response_topic: str) -> bool:
        """Whether a request that arrived on `request_topic` may be answered on `response_topic`.

        The requester picks the response topic (MQTT v5), and the answering side may publish
        where the requester may not; so only the requester's own mirror is allowed: a request on
        a device's up-tree is answered on that device's down-tree (and the other way round).
        """
        try:
            request, reply = self.parse(request_topic), self.parse(response_topic)
        except ValueError:
            return False
        if request.area != "dev" or reply.area != "dev" or reply.device_id != request.device_id:
            return False
        if request.direction == "up":
            return reply.direction == "down" and reply.kind in DOWN_KINDS
        return reply.direction == "up" and reply.kind in UP_KINDS

    def parse(self, topic: str) -> Route:
        """Inverse of the builders; raises ValueError for topics outside this tree."""
        prefix = self.root + "/"
        if not topic.startswith(prefix):
            raise ValueError(f"topic {topic!r} is not under {self.root!r}")
        parts = topic[len(prefix) :].split("/")
        if len(parts) == 4 and parts[0] == "dev" and parts[2] in ("up", "down"):
            return Route("dev", check_device_id(parts[1]), parts[2], parts[3])
        if len(parts) == 2 and parts[0] == "presence":
            return Route("presence", check_device_id(parts[1]), kind="presence")
        if parts == ["server", "status"]:
            return Route("server", kind="server_status")
        if len(parts) == 3 and parts[0] == "server" and parts[1] in _WORKER_KINDS:
            worker_id = check_device_id(parts[2], "worker_id")
            return Route("worker", worker_id, kind=_WORKER_KINDS[parts[1]])
        raise ValueError(f"topic {topic!r} is not one of sfprompt's")


def _check_kind(kind: str, allowed: tuple[str, ...]) -> None:
    if kind not in allowed:
        raise ValueError(f"kind {kind!r} does not travel this way; expected one of {allowed}")
