"""What every inbound payload goes through before a handler or a requester sees it.

The header of each packet is read once (`codec.peek`) and handed along: chunks are put back
together (each chunk's sender checked first, since reassembly is budgeted per device), the sender
is checked against the topic (on a device's own topics the broker vouches for it), repeats are
dropped (QoS 1 delivers at least once) and only then is the whole payload decoded, against the
bundle manifest's shapes. Bad input is answered with an ERROR that names the problem.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .chunking import Reassembler
from .client_config import ClientConfig
from .codec import Peek, decode, encode, error_for, peek
from .dedup import SeenIds
from .errors import BAD_FIELD, ProtocolError
from .messages import BROADCAST, Chunk, Error, Message
from .topics import Topics
from .transport import Delivery

log = logging.getLogger(__name__)

Publish = Callable[[str, list[bytes], bool, str | None, bytes | None, float | None], None]
"""`Transport.publish`: (topic, packets, retain, response topic, correlation, timeout)."""


@dataclass(frozen=True)
class Opened:
    """A whole payload (chunks put back together) and its header."""

    payload: bytes | bytearray
    head: Peek

    @property
    def key(self) -> tuple[str, str]:
        """(device_id, msg_id): what makes a message a repeat of another."""
        return self.head.device_id, self.head.msg_id


class Intake:
    """Opens, checks, de-duplicates and decodes inbound payloads; refuses bad ones."""

    def __init__(self, config: ClientConfig, publish: Publish) -> None:
        self.config = config
        self._publish = publish
        self._seen = SeenIds()
        self._seen_lock = threading.Lock()

    def head_of(self, delivery: Delivery) -> Peek:
        """The delivered packet's header, read once; raises ProtocolError."""
        return peek(delivery.payload, self.config.limits)

    def open(self, delivery: Delivery, head: Peek, reassembler: Reassembler) -> Opened | None:
        """The whole payload `delivery` carries or completes, or None while chunks of it are
        still missing. `head` is the delivery's own (`head_of`). Raises ProtocolError."""
        if head.kind != Chunk.kind:
            return Opened(delivery.payload, head)
        chunk = decode(delivery.payload, self.config.limits, head=head)
        assert isinstance(chunk, Chunk)
        self.check_sender(delivery.topic, chunk.device_id)  # sets are budgeted per device
        payload = reassembler.add(chunk)
        if payload is None:
            return None
        return Opened(payload, peek(payload, self.config.limits))

    def check_sender(self, topic: str, device_id: str) -> None:
        """On a device's own topics, and a worker's presence and assignment, the broker vouches
        for the sender (its ACL): the envelope's id must agree with the topic's. Raises
        ProtocolError."""
        try:
            route = self.config.topics.parse(topic)
        except ValueError:
            return
        if route.area in ("dev", "presence", "worker") and device_id != route.device_id:
            raise ProtocolError(
                BAD_FIELD, "device_id", f"{route.device_id} (from the topic)", device_id
            )

    def first_time(self, opened: Opened) -> bool:
        """Remember the payload's key; False for a repeat."""
        with self._seen_lock:
            return self._seen.add(opened.key)

    def decode(self, opened: Opened) -> Message:
        """The message, checked against the manifest's shapes; raises ProtocolError."""
        config = self.config
        return decode(opened.payload, config.limits, config.expect, head=opened.head)

    def refuse(self, delivery: Delivery, exc: ProtocolError, head: Peek | None) -> None:
        """Answer bad input with an ERROR naming the problem; never answer an ERROR. `head` is
        the delivery's own header, None if even that could not be read."""
        log.warning("refused a message on %s: %s", delivery.topic, exc)
        if head is not None and head.kind == Error.kind:
            return
        topics = self.config.topics
        topic = reply_topic(topics, delivery.topic, delivery.response_topic)
        topic = topic or _error_topic(topics, delivery.topic)
        if topic is None:
            return
        try:  # about whom: the device the topic names, else whoever the envelope claims
            device = topics.parse(delivery.topic).device_id or BROADCAST
        except ValueError:
            device = head.device_id if head is not None else BROADCAST
        answers = head.msg_id if head is not None and _valid_id(head.msg_id) else ""
        try:
            error = error_for(exc, device, answers)
        except ProtocolError:
            error = error_for(exc, BROADCAST)
        self._publish(topic, [encode(error)], False, None, delivery.correlation, None)


def reply_topic(topics: Topics, request_topic: str, response_topic: str | None) -> str | None:
    """`response_topic` if a reply may go there, else None (logged): the requester chooses it,
    so honouring any topic would make us publish where it may not (another device's inbox).
    Only the requester's own mirror passes (`Topics.reply_allowed`)."""
    if response_topic is None:
        return None
    if topics.reply_allowed(request_topic, response_topic):
        return response_topic
    log.warning(
        "not answering a request on %s on %s: replies go only to the requester's own topics",
        request_topic,
        response_topic,
    )
    return None


def _error_topic(topics: Topics, topic: str) -> str | None:
    """Where an ERROR about a message on a device's `topic` goes: the other direction."""
    try:
        route = topics.parse(topic)
    except ValueError:
        return None
    if route.area != "dev" or route.kind == Error.kind or route.device_id is None:
        return None
    if route.direction == "up":
        return topics.down(route.device_id, "error")
    return topics.up(route.device_id, "error")


def _valid_id(msg_id: str) -> bool:
    return 0 < len(msg_id) <= 64 and all(c.isalnum() or c in "_-" for c in msg_id)
