"""The client both sides use: one MQTT v5 session with handlers and request/reply.

It composes the parts: `transport` (the paho session: connect, publish, subscribe), `inbound`
(what each received payload goes through) and `request_reply`. paho's network thread only
files deliveries into a queue; decoding and handlers run on one dispatcher thread and request
replies are decoded by the waiting caller, so heavy work never stalls keep-alives or
acknowledgements. A subscription made with `inline=True` skips that hop: for handlers that only
hand the work on (the server's body service queues each request for its batcher), where the hop
would cost about a sixth of round-trip throughput at 1 MB.

Delivery is at least once (QoS 1); the client makes it once for the application: each message key
(device_id, msg_id) is handed over once, and a repeated request is answered from a reply cache.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from .chunking import Reassembler, packets_for, payload_limit
from .client_config import ClientConfig, Handler, Inbound
from .codec import Peek, error_for
from .errors import ProtocolError
from .inbound import Intake
from .messages import Message
from .request_reply import Replies, Requests
from .subscriptions import Subscription
from .traffic import Traffic
from .transport import Delivery, Transport

log = logging.getLogger(__name__)


class MqttClient:
    """Connect, publish, subscribe with handlers, and request/reply over one MQTT v5 session."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._inbox: queue.Queue[tuple[Delivery, Subscription | None] | None] = queue.Queue()
        self._transport = Transport(config, self._on_delivery, closed=lambda: self._inbox.put(None))
        publish = self._transport.publish
        self._intake = Intake(config, publish)
        self._requests = Requests(self._intake, publish, self.packets)
        self._replies = Replies(config.topics, publish, self.packets)
        self._reassembler = Reassembler(config.limits)  # for handlers; each request has its own
        self._reassembly_lock = threading.Lock()  # inline handlers reassemble on paho's thread
        self._dispatcher = threading.Thread(target=self._dispatch_loop, daemon=True)

    # ---- connection --------------------------------------------------------------------------
    def connect(self, timeout: float = 30.0) -> MqttClient:
        """Connect; raises TransportError, with `permanent` set for what retrying cannot heal
        (unknown host, TLS refused, not authorised). A transient failure (nothing listening yet,
        a timeout) is retried with backoff until `timeout`, then raised naming its cause."""
        self._transport.connect(timeout, started=self._start_dispatcher)
        return self

    def _start_dispatcher(self) -> None:
        if not self._dispatcher.is_alive():
            self._dispatcher.start()

    def close(self, send_will: bool = True) -> None:
        """Disconnect; with a Will configured and `send_will`, the broker publishes it (v5 0x04)."""
        self._transport.close(send_will)

    @property
    def connected(self) -> bool:
        return self._transport.connected

    @property
    def connects(self) -> int:
        """Successful connections so far: > 1 means it reconnected."""
        return self._transport.connects

    @property
    def max_packet_bytes(self) -> int | None:
        """The broker's Maximum Packet Size, from its CONNACK."""
        return self._transport.max_packet_bytes

    @property
    def traffic(self) -> Traffic:
        return self._transport.traffic

    def on_every_connect(self, hook: Callable[[], None]) -> None:
        """Run `hook` after each (re)connection, e.g. to publish presence again after a broker
        restart lost retained messages. It runs on paho's network thread, so it must not block:
        publish with `timeout=None`."""
        self._transport.on_every_connect(hook)

    # ---- publishing --------------------------------------------------------------------------
    def packets(self, message: Message) -> list[bytes]:
        """The payloads `message` travels as: one, or chunks under the negotiated packet size."""
        limit = payload_limit(self.config.max_chunk_bytes, self.max_packet_bytes)
        return packets_for(message, limit)

    def publish(
        self,
        topic: str,
        message: Message,
        *,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        timeout: float | None = 60.0,
    ) -> None:
        """Send at QoS 1 and wait for the broker's PUBACK (None: do not wait).

        Raises TransportError if the broker refuses (e.g. 0x87 Not authorized) or times out.
        While disconnected the message is queued and sent on reconnect.
        """
        self.publish_packets(
            topic, self.packets(message), retain, response_topic, correlation, timeout
        )

    def publish_packets(
        self,
        topic: str,
        packets: list[bytes],
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        timeout: float | None = 60.0,
    ) -> None:
        """`publish` for payloads already encoded (`packets`), e.g. one message to many topics."""
        self._transport.publish(topic, packets, retain, response_topic, correlation, timeout)

    # ---- subscribing -------------------------------------------------------------------------
    def subscribe(
        self, topic_filter: str, handler: Handler, timeout: float = 30.0, *, inline: bool = False
    ) -> None:
        """Call `handler` (on the dispatcher thread) for each message on `topic_filter`.

        Before `connect` this only registers the handler, so that messages queued in a persistent
        session find it on arrival; every (re)connect subscribes to all registered filters.
        Once connected, raises TransportError if the broker refuses (e.g. 0x87 Not authorized).
        `inline=True` decodes and calls `handler` on paho's network thread instead, saving a
        thread hop per message. Only for handlers that return at once and never wait on the
        broker: they may return a reply, or `respond` later from another thread.
        """
        self._transport.subscribe(Subscription(topic_filter, handler, inline), timeout)

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop receiving `topic_filter` (registered by `subscribe`); nothing if it was not."""
        self._transport.unsubscribe(topic_filter)

    # ---- request / reply ---------------------------------------------------------------------
    def request(
        self,
        topic: str,
        message: Message,
        reply_topic: str,
        timeout: float = 60.0,
        attempts: int = 1,
    ) -> Message:
        """Publish `message` and wait for the reply correlated to it (MQTT v5 correlation data).

        `reply_topic` must be covered by one of our subscriptions. With `attempts` > 1 the same
        bytes are sent again after each `timeout / attempts`; the responder de-duplicates and
        answers a repeat from its reply cache, so a lost reply costs no rework.
        Raises RequestTimeout, RemoteError (the peer answered with ERROR) or ProtocolError (the
        reply itself was malformed; an ERROR is sent back too).
        """
        return self._requests.request(topic, message, reply_topic, timeout, attempts)

    def respond(self, inbound: Inbound, reply: Message) -> None:
        """Answer a request later, from any thread: for handlers that return None and reply
        once the work is done (the server batches body calls across devices). A repeat of the
        request is then answered from the reply cache, as for a handler's own return value.
        Only on the requester's own reply topic (see `inbound.reply_topic`)."""
        self._replies.respond(inbound, reply)

    # ---- receiving ---------------------------------------------------------------------------
    def _on_delivery(self, delivery: Delivery) -> None:
        """On paho's network thread: file what arrived, or handle it here for inline handlers."""
        if self._requests.claim(delivery):
            return  # a reply to one of our requests: its caller decodes it
        subscription = self._transport.subscriptions.first_for(delivery.topic)
        if subscription is not None and subscription.inline:
            self._dispatch_safely(delivery, subscription)
        else:
            self._inbox.put((delivery, subscription))

    def _dispatch_loop(self) -> None:
        while (item := self._inbox.get()) is not None:
            self._dispatch_safely(*item)

    def _dispatch_safely(self, delivery: Delivery, subscription: Subscription | None) -> None:
        try:
            self._dispatch(delivery, subscription)
        except Exception:  # the receiver keeps running whatever one message does
            log.exception("dispatching a message on %s failed", delivery.topic)

    def _dispatch(self, delivery: Delivery, subscription: Subscription | None) -> None:
        intake = self._intake
        head: Peek | None = None
        try:
            head = intake.head_of(delivery)
            with self._reassembly_lock:
                opened = intake.open(delivery, head, self._reassembler)
            if opened is None:
                return
            intake.check_sender(delivery.topic, opened.head.device_id)  # before it is marked seen
            if not intake.first_time(opened):
                self._replies.answer_again(opened.key)
                return
            message = intake.decode(opened)
        except ProtocolError as exc:
            intake.refuse(delivery, exc, head)
            return
        # A handler registered while the message waited in the queue still takes it.
        subscription = subscription or self._transport.subscriptions.first_for(delivery.topic)
        if subscription is None:
            log.warning("no handler for %s", delivery.topic)
            return
        inbound = Inbound(
            delivery.topic,
            message,
            delivery.response_topic,
            delivery.correlation,
            len(opened.payload),
        )
        try:
            reply = subscription.handler(inbound)
        except Exception as exc:
            log.exception("handler for %s failed", delivery.topic)
            reply = error_for(exc, message.device_id, message.msg_id, message.round, message.step)
        if reply is not None:
            self._replies.answer(
                opened.key, delivery.topic, delivery.response_topic, delivery.correlation, reply
            )
