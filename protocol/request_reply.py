"""Request / reply over MQTT v5: correlation data and response topics.

Our requests wait for the reply correlated to them; a repeat is the same bytes sent again, which
the responder answers from its reply cache, so a lost reply costs no rework. Our replies to
others go only to the requester's own topics and are cached by request key for those repeats.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from .chunking import Reassembler
from .client_config import Inbound
from .dedup import CachedReply, ReplyCache
from .errors import ProtocolError, RemoteError, RequestTimeout
from .inbound import Intake, Publish, reply_topic
from .messages import Error, Message
from .topics import Topics
from .transport import Delivery

Packets = Callable[[Message], list[bytes]]
"""The payloads a message travels as (`MqttClient.packets`)."""


class Requests:
    """Our requests that wait for their replies, by correlation data."""

    def __init__(self, intake: Intake, publish: Publish, packets: Packets) -> None:
        self._intake = intake
        self._publish = publish
        self._packets = packets
        self._pending: dict[bytes, queue.Queue[Delivery]] = {}
        self._lock = threading.Lock()

    def claim(self, delivery: Delivery) -> bool:
        """Hand a reply to the request waiting for it (its caller decodes it); False if
        `delivery` is not a reply to one of ours."""
        if delivery.correlation is None or delivery.response_topic is not None:
            return False
        with self._lock:
            waiter = self._pending.get(delivery.correlation)
        if waiter is None:
            return False
        waiter.put(delivery)
        return True

    def request(
        self, topic: str, message: Message, reply_topic: str, timeout: float, attempts: int
    ) -> Message:
        """See `MqttClient.request`."""
        correlation = message.msg_id.encode()
        inbox: queue.Queue[Delivery] = queue.Queue()
        with self._lock:
            self._pending[correlation] = inbox
        packets = self._packets(message)
        reassembler = Reassembler(self._intake.config.limits)
        deadline = time.monotonic() + timeout
        try:
            for attempt in range(attempts):
                self._publish(topic, packets, False, reply_topic, correlation, None)
                until = time.monotonic() + (deadline - time.monotonic()) / (attempts - attempt)
                while (left := until - time.monotonic()) > 0:
                    try:
                        delivery = inbox.get(timeout=left)
                    except queue.Empty:
                        break
                    reply = self._take_reply(delivery, reassembler)
                    if reply is None:
                        continue
                    if isinstance(reply, Error):
                        raise RemoteError(reply)
                    return reply
        finally:
            with self._lock:
                self._pending.pop(correlation, None)
        raise RequestTimeout(f"no reply to {message.kind} on {topic} within {timeout}s")

    def _take_reply(self, delivery: Delivery, reassembler: Reassembler) -> Message | None:
        """The reply `delivery` carries or completes; None for a missing chunk or a repeat."""
        intake = self._intake
        head = None
        try:
            head = intake.head_of(delivery)
            opened = intake.open(delivery, head, reassembler)
            if opened is None or not intake.first_time(opened):
                return None
            reply = intake.decode(opened)
            intake.check_sender(delivery.topic, opened.head.device_id)
            return reply
        except ProtocolError as exc:
            intake.refuse(delivery, exc, head)
            raise


class Replies:
    """Our replies to requests, cached by request key so that a repeat is answered again."""

    def __init__(self, topics: Topics, publish: Publish, packets: Packets) -> None:
        self._topics = topics
        self._publish = publish
        self._packets = packets
        self._cache = ReplyCache()

    def answer(
        self,
        key: tuple[str, str],
        request_topic: str,
        response_topic: str | None,
        correlation: bytes | None,
        reply: Message,
    ) -> None:
        """Send `reply` to the request `key` and keep it for repeats; nothing if the requester
        gave no response topic, or one not its own."""
        topic = reply_topic(self._topics, request_topic, response_topic)
        if topic is None:
            return
        packets = self._packets(reply)
        self._cache.put(key, CachedReply(topic, packets, correlation))
        self._publish(topic, packets, False, None, correlation, None)

    def respond(self, inbound: Inbound, reply: Message) -> None:
        """See `MqttClient.respond`."""
        key = (inbound.message.device_id, inbound.message.msg_id)
        self.answer(key, inbound.topic, inbound.response_topic, inbound.correlation, reply)

    def answer_again(self, key: tuple[str, str]) -> None:
        """Send the cached reply to a repeated request, if it has one yet."""
        cached = self._cache.get(key)
        if cached is not None:
            self._publish(cached.topic, cached.packets, False, None, cached.correlation, None)
