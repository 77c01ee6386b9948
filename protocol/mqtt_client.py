"""The one wrapper around paho-mqtt (only it and `paho_fixes` import paho), used by both sides.

Always paho's VERSION2 callbacks and MQTT v5: persistent sessions (clean_start=False plus a
session expiry), QoS 1, automatic reconnect with backoff, a retained Last Will, TLS and user
name/password. Failures raise (`TransportError`, `RequestTimeout`, `RemoteError`) instead of
returning codes. paho's network thread only files deliveries into queues; decoding and handlers
run on one dispatcher thread and request replies are decoded by the waiting caller, so heavy work
never stalls keep-alives or acknowledgements. A subscription made with `inline=True` skips that
hop: for handlers that only hand the work on (the server's body service queues each request for
its batcher), where the hop would cost about a sixth of round-trip throughput at 1 MB.

Delivery is at least once (QoS 1); the client makes it once for the application: each message key
(device_id, msg_id) is handed over once, and a repeated request is answered from a reply cache.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from .chunking import CHUNK_OVERHEAD, Reassembler, split
from .client_config import ClientConfig, Handler, Inbound
from .codec import CONTENT_TYPE, Peek, decode, encode, error_for, peek
from .dedup import CachedReply, ReplyCache, SeenIds
from .errors import ProtocolError, RemoteError, RequestTimeout, TransportError
from .messages import BROADCAST, Chunk, Error, Message
from .paho_fixes import install as install_paho_fixes

log = logging.getLogger(__name__)
install_paho_fixes()  # paho copies each payload twice per MQTT v5 property otherwise
_PACKET_OVERHEAD = 4096  # fixed header, topic, properties: reserved below Maximum Packet Size


class Traffic:
    """Payload bytes sent and received, by message kind (from the topic), for the metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent: dict[str, int] = {}
        self.received: dict[str, int] = {}

    def add(self, direction: dict[str, int], kind: str, size: int) -> None:
        with self._lock:
            direction[kind] = direction.get(kind, 0) + size

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        with self._lock:
            return dict(self.sent), dict(self.received)


@dataclass(frozen=True)
class _Subscription:
    filter: str
    handler: Handler
    inline: bool  # handled on paho's network thread, not the dispatcher's


@dataclass
class _Raw:
    topic: str
    payload: bytes | bytearray
    response_topic: str | None
    correlation: bytes | None
    subscription: _Subscription | None = None  # whose handler takes it, as found on arrival


class MqttClient:
    """Connect, publish, subscribe with handlers, and request/reply over one MQTT v5 session."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.max_packet_bytes: int | None = None  # the broker's Maximum Packet Size (CONNACK)
        self.connects = 0  # successful connections so far: > 1 means it reconnected
        self.traffic = Traffic()
        self._connect_hooks: list[Callable[[], None]] = []
        self._subscriptions: list[_Subscription] = []
        self._inbox: queue.Queue[_Raw | None] = queue.Queue()
        self._pending: dict[bytes, queue.Queue[_Raw]] = {}
        self._pending_lock = threading.Lock()
        self._seen = SeenIds()
        self._seen_lock = threading.Lock()
        self._replies = ReplyCache()
        self._reassembler = Reassembler(config.limits)
        self._reassembly_lock = threading.Lock()  # inline handlers reassemble on paho's thread
        self._network_thread: int | None = None
        self._connected = threading.Event()
        self._connect_answered = threading.Event()  # connected, or refused for good
        self._connect_refused: TransportError | None = None
        self._last_error = ""  # paho's last logged error, e.g. a TLS alert
        self._closing = False
        self._acks_lock = threading.Lock()
        self._suback: dict[int, list[Any] | None] = {}
        self._suback_cv = threading.Condition(self._acks_lock)
        self._refused: dict[int, Any] = {}
        self._resubscribe_mid: int | None = None
        self._dispatcher = threading.Thread(target=self._dispatch_loop, daemon=True)
        self._client = self._build()

    # ---- connection --------------------------------------------------------------------------
    def _build(self) -> paho.Client:
        cfg = self.config
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=cfg.client_id, protocol=paho.MQTTv5
        )
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls is not None:
            client.tls_set(cfg.tls.ca_file, cfg.tls.cert_file, cfg.tls.key_file)
        if cfg.will is not None:
            client.will_set(cfg.will[0], cfg.will[1], qos=1, retain=True)
        client.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)  # type: ignore[arg-type]
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_log = self._on_log
        return client

    def connect(self, timeout: float = 30.0) -> MqttClient:
        """Connect; raises TransportError, with `permanent` set for what retrying cannot heal
        (unknown host, TLS refused, not authorised). A transient failure (nothing listening yet,
        a timeout) is retried with backoff until `timeout`, then raised naming its cause."""
        cfg = self.config
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = cfg.session_expiry_s
        self._closing = False
        try:  # the first attempt in this thread: its exception names the cause
            self._client.connect(
                cfg.host, cfg.port, cfg.keepalive_s, clean_start=False, properties=props
            )
        except OSError as exc:
            failure = connect_failure(exc, cfg.host, cfg.port)
            if failure.permanent:
                raise failure from None
            self._last_error = str(failure)
            self._client.connect_async(
                cfg.host, cfg.port, cfg.keepalive_s, clean_start=False, properties=props
            )
        self._client.loop_start()
        if not self._dispatcher.is_alive():
            self._dispatcher.start()
        deadline = time.monotonic() + timeout
        if not self._connect_answered.wait(timeout) or self._connect_refused is not None:
            refused = self._connect_refused
            self.close(send_will=False)
            last = f" (last error: {self._last_error})" if self._last_error else ""
            raise refused or TransportError(
                f"no MQTT connection to {cfg.host}:{cfg.port} within {timeout}s{last}",
                permanent=_is_tls_failure(self._last_error),
            )
        with self._acks_lock:  # handlers registered before connect: wait for their SUBACK
            mid = self._resubscribe_mid
            if mid is not None:
                left = max(0.0, deadline - time.monotonic())
                if not self._suback_cv.wait_for(lambda: self._suback.get(mid) is not None, left):
                    self.close(send_will=False)
                    raise TransportError(f"no SUBACK within {timeout}s")
                codes = self._suback.pop(mid) or []
                refused = [
                    sub.filter
                    for sub, code in zip(self._subscriptions, codes, strict=False)
                    if code.is_failure
                ]
                if refused or any(code.is_failure for code in codes):
                    self.close(send_will=False)
                    raise TransportError(
                        f"the broker at {cfg.host}:{cfg.port} refused user "
                        f"{cfg.username!r} (client id {cfg.client_id!r}) the topics "
                        f"{', '.join(refused) or codes}: with broker-config the device id "
                        "must be the device's broker user",
                        0x87,
                        permanent=True,
                    )
        return self

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def close(self, send_will: bool = True) -> None:
        """Disconnect; with a Will configured and `send_will`, the broker publishes it (v5 0x04)."""
        self._closing = True
        if send_will and self.config.will is not None:
            reason = paho.ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
            self._client.disconnect(reasoncode=reason)
        else:
            self._client.disconnect()
        self._client.loop_stop()
        self._inbox.put(None)
        self._connected.clear()

    def _on_connect(self, client: Any, _u: Any, flags: Any, reason: Any, props: Any) -> None:
        cfg = self.config
        if reason.is_failure:
            code = int(reason.value)
            refused = TransportError(
                f"the broker at {cfg.host}:{cfg.port} refused {cfg.client_id!r}"
                f"{'' if cfg.username is None else f' (user {cfg.username!r})'}: {reason}"
                f"{_REFUSAL_HINTS.get(code, '')}",
                code,
                permanent=code in _PERMANENT_REFUSALS,
            )
            if self.connects == 0:
                self._connect_refused = refused
                self._connect_answered.set()  # wakes connect(), which raises
            else:  # paho keeps retrying; say why each time
                log.error("%s; retrying", refused)
            return
        self.max_packet_bytes = getattr(props, "MaximumPacketSize", None)
        self._network_thread = threading.get_ident()
        self.connects += 1
        if self.connects > 1:
            log.warning("broker at %s:%d is back", cfg.host, cfg.port)
        if self._subscriptions:
            # Even a resumed session may lack filters registered since; retained messages sent
            # again by the broker are dropped as duplicates.
            with self._acks_lock:
                filters = [(sub.filter, SubscribeOptions(qos=1)) for sub in self._subscriptions]
                _, mid = client.subscribe(filters)
                if self.connects == 1 and mid is not None:  # connect() waits for this SUBACK
                    self._resubscribe_mid = mid
                    self._suback[mid] = None
        self._connected.set()
        self._connect_answered.set()
        for hook in self._connect_hooks:
            try:
                hook()
            except Exception:
                log.exception("a connect hook failed")

    def on_every_connect(self, hook: Callable[[], None]) -> None:
        """Run `hook` after each (re)connection, e.g. to publish presence again after a broker
        restart lost retained messages. It runs on paho's network thread, so it must not block:
        publish with `timeout=None`."""
        self._connect_hooks.append(hook)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if self._closing:
            log.debug("disconnected from the broker")
        elif was_connected:
            cfg = self.config
            log.warning(
                "lost the broker at %s:%d (%s); reconnecting with backoff up to %.0fs",
                cfg.host,
                cfg.port,
                reason,
                cfg.reconnect_max_s,
            )

    def _on_log(self, _c: Any, _u: Any, level: int, text: str) -> None:
        """Keep paho's last error, the cause a connection timeout reports; a TLS alert before
        the first connection (e.g. the broker requires a client certificate) ends connect()."""
        if level != paho.MQTT_LOG_ERR or text.startswith("Client is not connected"):
            return  # (that one follows every failed attempt and names no cause)
        self._last_error = text
        if self.connects == 0 and _is_tls_failure(text) and self._connect_refused is None:
            cfg = self.config
            self._connect_refused = TransportError(
                f"TLS: the broker at {cfg.host}:{cfg.port} refused this client ({text}); "
                "does it need a client certificate (--tls-cert, --tls-key)?",
                permanent=True,
            )
            self._connect_answered.set()  # wakes connect(), which raises

    # ---- publishing --------------------------------------------------------------------------
    def packets(self, message: Message) -> list[bytes]:
        """The payloads `message` travels as: one, or chunks under the negotiated packet size."""
        payload = encode(message)
        limit = self.config.max_chunk_bytes
        if self.max_packet_bytes:
            limit = min(limit, self.max_packet_bytes - _PACKET_OVERHEAD)
        if len(payload) <= limit:
            return [payload]
        return split(payload, message, max(limit, CHUNK_OVERHEAD + 1))

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
        if timeout is not None and threading.get_ident() == self._network_thread:
            raise RuntimeError(
                "publish from paho's network thread (an inline handler or connect hook) must not "
                "wait for its PUBACK, which that thread itself would have to read: timeout=None"
            )
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = CONTENT_TYPE
        if response_topic is not None:
            props.ResponseTopic = response_topic
        if correlation is not None:
            props.CorrelationData = correlation
        infos = [self._client.publish(topic, p, 1, retain, props) for p in packets]
        self.traffic.add(self.traffic.sent, self._kind_of(topic), sum(len(p) for p in packets))
        if timeout is None:
            return
        deadline = time.monotonic() + timeout
        for info in infos:
            while not _acknowledged(info):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransportError(f"no PUBACK for {topic} within {timeout}s")
                if info.rc == paho.MQTT_ERR_SUCCESS:
                    info.wait_for_publish(min(remaining, 1.0))
                else:  # queued while disconnected: paho sends it on reconnect
                    time.sleep(min(remaining, 0.05))
            with self._acks_lock:
                refused = self._refused.pop(info.mid, None)
            if refused is not None:
                raise TransportError(
                    f"broker refused publish on {topic}: {refused}",
                    int(refused.value),
                    permanent=int(refused.value) in _PERMANENT_REFUSALS,
                )

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with self._acks_lock:
            if reason.is_failure:
                self._refused[mid] = reason
            else:
                self._refused.pop(mid, None)

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
        subscription = _Subscription(topic_filter, handler, inline)
        self._subscriptions.append(subscription)
        if not self.connected:
            return
        with self._acks_lock:
            result, mid = self._client.subscribe(topic_filter, options=SubscribeOptions(qos=1))
            if result != paho.MQTT_ERR_SUCCESS or mid is None:
                raise TransportError(f"subscribe to {topic_filter} failed: {result}")
            self._suback[mid] = None
            if not self._suback_cv.wait_for(lambda: self._suback[mid] is not None, timeout):
                self._suback.pop(mid)
                raise TransportError(f"no SUBACK for {topic_filter} within {timeout}s")
            codes = self._suback.pop(mid) or []
        if any(code.is_failure for code in codes):
            self._subscriptions.remove(subscription)
            raise TransportError(
                f"broker refused subscription to {topic_filter}: {codes[0]}", int(codes[0].value)
            )

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: list[Any], _p: Any) -> None:
        with self._acks_lock:
            if mid in self._suback:
                self._suback[mid] = list(codes)
                self._suback_cv.notify_all()
            elif any(code.is_failure for code in codes):
                log.error("broker refused a subscription on reconnect: %s", codes)

    # ---- receiving ---------------------------------------------------------------------------
    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        props = msg.properties
        correlation = getattr(props, "CorrelationData", None)
        raw = _Raw(msg.topic, msg.payload, getattr(props, "ResponseTopic", None), correlation)
        self.traffic.add(self.traffic.received, self._kind_of(msg.topic), len(msg.payload))
        with self._pending_lock:
            waiter = self._pending.get(correlation) if correlation is not None else None
        if waiter is not None and raw.response_topic is None:
            waiter.put(raw)  # a reply to one of our requests: its caller decodes it
            return
        raw.subscription = self._subscription_for(msg.topic)
        if raw.subscription is not None and raw.subscription.inline:
            self._dispatch_safely(raw)
        else:
            self._inbox.put(raw)

    def _subscription_for(self, topic: str) -> _Subscription | None:
        """The first registered subscription whose filter matches `topic`."""
        return next(
            (sub for sub in self._subscriptions if paho.topic_matches_sub(sub.filter, topic)), None
        )

    def _dispatch_loop(self) -> None:
        while (raw := self._inbox.get()) is not None:
            self._dispatch_safely(raw)

    def _dispatch_safely(self, raw: _Raw) -> None:
        try:
            self._dispatch(raw)
        except Exception:  # the receiver keeps running whatever one message does
            log.exception("dispatching a message on %s failed", raw.topic)

    def _dispatch(self, raw: _Raw) -> None:
        try:
            with self._reassembly_lock:
                payload = self._reassemble(raw, self._reassembler)
            if payload is None:
                return
            head = peek(payload, self.config.limits)
            key = (head.device_id, head.msg_id)
            self._check_sender(raw.topic, head)  # before it is marked seen: no forged ids
            with self._seen_lock:
                fresh = self._seen.add(key)
            if not fresh:
                cached = self._replies.get(key)
                if cached is not None:
                    self.publish_packets(
                        cached.topic, cached.packets, False, None, cached.correlation, None
                    )
                return
            message = decode(payload, self.config.limits, self.config.expect)  # sender checked
        except ProtocolError as exc:
            self._refuse(raw, exc)
            return
        # A handler registered while the message waited in the queue still takes it.
        subscription = raw.subscription or self._subscription_for(raw.topic)
        if subscription is None:
            log.warning("no handler for %s", raw.topic)
            return
        try:
            reply = subscription.handler(
                Inbound(raw.topic, message, raw.response_topic, raw.correlation)
            )
        except Exception as exc:
            log.exception("handler for %s failed", raw.topic)
            reply = error_for(exc, _device_of(message), message.msg_id, message.round, message.step)
        topic = self._reply_topic(raw.topic, raw.response_topic) if reply is not None else None
        if reply is not None and topic is not None:
            packets = self.packets(reply)
            self._replies.put(key, CachedReply(topic, packets, raw.correlation))
            self.publish_packets(topic, packets, False, None, raw.correlation, None)

    def _reassemble(self, raw: _Raw, reassembler: Reassembler) -> bytes | bytearray | None:
        """The whole payload of `raw`, or None while chunks of it are still missing."""
        if peek(raw.payload, self.config.limits).kind != Chunk.kind:
            return raw.payload
        chunk = decode(raw.payload, self.config.limits)
        assert isinstance(chunk, Chunk)
        self._check_sender(raw.topic, chunk)  # sets are budgeted per device: it must be its own
        return reassembler.add(chunk)

    def respond(self, inbound: Inbound, reply: Message) -> None:
        """Answer a request later, from any thread: for handlers that return None and reply
        once the work is done (the server batches body calls across devices). A repeat of the
        request is then answered from the reply cache, as for a handler's own return value.
        Only on the requester's own reply topic (see `_reply_topic`)."""
        topic = self._reply_topic(inbound.topic, inbound.response_topic)
        if topic is None:
            return
        correlation = inbound.correlation
        packets = self.packets(reply)
        key = (inbound.message.device_id, inbound.message.msg_id)
        self._replies.put(key, CachedReply(topic, packets, correlation))
        self.publish_packets(topic, packets, False, None, correlation, None)

    def _reply_topic(self, request_topic: str, response_topic: str | None) -> str | None:
        """`response_topic` if a reply may go there, else None (logged): the requester chooses
        it, so honouring any topic would make us publish where it may not (another device's
        inbox, a broadcast). Only the requester's own mirror passes (`Topics.reply_allowed`)."""
        if response_topic is None:
            return None
        if self.config.topics.reply_allowed(request_topic, response_topic):
            return response_topic
        log.warning(
            "not answering a request on %s on %s: replies go only to the requester's own topics",
            request_topic,
            response_topic,
        )
        return None

    def _kind_of(self, topic: str) -> str:
        try:
            route = self.config.topics.parse(topic)
        except ValueError:
            return "other"
        return route.kind or route.area

    def _key(self, payload: bytes | bytearray) -> tuple[str, str]:
        head = peek(payload, self.config.limits)
        return head.device_id, head.msg_id

    def _check_sender(self, topic: str, message: Message | Peek) -> None:
        """On a device's own topics the broker vouches for the sender: the envelope must agree."""
        try:
            route = self.config.topics.parse(topic)
        except ValueError:
            return
        if route.area in ("dev", "presence") and message.device_id != route.device_id:
            raise ProtocolError(
                "bad_field", "device_id", f"{route.device_id} (from the topic)", message.device_id
            )

    def _refuse(self, raw: _Raw, exc: ProtocolError) -> None:
        """Answer bad input with an ERROR naming the problem; never answer an ERROR."""
        log.warning("refused a message on %s: %s", raw.topic, exc)
        try:
            head = peek(raw.payload, self.config.limits)
        except ProtocolError:
            head = None
        if head is not None and head.kind == Error.kind:
            return
        topic = self._reply_topic(raw.topic, raw.response_topic) or self._error_topic(raw.topic)
        if topic is None:
            return
        try:  # about whom: the device the topic names, else whoever the envelope claims
            device = self.config.topics.parse(raw.topic).device_id or BROADCAST
        except ValueError:
            device = head.device_id if head is not None else BROADCAST
        answers = head.msg_id if head is not None and _valid_id(head.msg_id) else ""
        try:
            error = error_for(exc, device, answers)
        except ProtocolError:
            error = error_for(exc, BROADCAST)
        self.publish_packets(topic, [encode(error)], False, None, raw.correlation, None)

    def _error_topic(self, topic: str) -> str | None:
        topics = self.config.topics
        try:
            route = topics.parse(topic)
        except ValueError:
            return None
        if route.area != "dev" or route.kind == Error.kind or route.device_id is None:
            return None
        if route.direction == "up":
            return topics.down(route.device_id, "error")
        return topics.up(route.device_id, "error")

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
        correlation = message.msg_id.encode()
        inbox: queue.Queue[_Raw] = queue.Queue()
        with self._pending_lock:
            self._pending[correlation] = inbox
        packets = self.packets(message)
        reassembler = Reassembler(self.config.limits)
        deadline = time.monotonic() + timeout
        try:
            for attempt in range(attempts):
                self.publish_packets(topic, packets, False, reply_topic, correlation, None)
                until = time.monotonic() + (deadline - time.monotonic()) / (attempts - attempt)
                while (left := until - time.monotonic()) > 0:
                    try:
                        raw = inbox.get(timeout=left)
                    except queue.Empty:
                        break
                    reply = self._take_reply(raw, reassembler)
                    if reply is None:
                        continue
                    if isinstance(reply, Error):
                        raise RemoteError(reply)
                    return reply
        finally:
            with self._pending_lock:
                self._pending.pop(correlation, None)
        raise RequestTimeout(f"no reply to {message.kind} on {topic} within {timeout}s")

    def _take_reply(self, raw: _Raw, reassembler: Reassembler) -> Message | None:
        try:
            payload = self._reassemble(raw, reassembler)
            if payload is None:
                return None
            with self._seen_lock:
                fresh = self._seen.add(self._key(payload))
            if not fresh:
                return None
            reply = decode(payload, self.config.limits, self.config.expect)
            self._check_sender(raw.topic, reply)
            return reply
        except ProtocolError as exc:
            self._refuse(raw, exc)
            raise


# CONNACK reason codes that another attempt with the same settings cannot change.
_PERMANENT_REFUSALS = frozenset({0x80, 0x82, 0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C, 0x90, 0x99})
_REFUSAL_HINTS = {
    0x85: " (the client id is not allowed: with broker-config it must be the device's user)",
    0x86: " (check the user name and password: --username, --password-file)",
    0x87: " (this user may not connect, or the client id is not its own: the device id "
    "must be the device's broker user)",
    0x8A: " (the broker has banned this client)",
}


def connect_failure(exc: OSError, host: str, port: int) -> TransportError:
    """A connection attempt's OSError as a TransportError that says what to check."""
    where = f"{host}:{port}"
    if isinstance(exc, socket.gaierror):
        return TransportError(f"unknown broker host {host!r}: {exc.strerror}", permanent=True)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TransportError(
            f"TLS: the broker at {where} has a certificate that --tls-ca does not verify "
            f"({exc.verify_message}); check the CA file and that the host name is in the "
            "broker's certificate (broker-config --hostname)",
            permanent=True,
        )
    if isinstance(exc, ssl.SSLError):
        return TransportError(f"TLS with the broker at {where} failed: {exc}", permanent=True)
    if isinstance(exc, ConnectionRefusedError):
        return TransportError(f"nothing listens at {where} (connection refused)")
    if isinstance(exc, TimeoutError | socket.timeout):
        return TransportError(f"no answer from {where} (timed out; a firewall?)")
    return TransportError(f"cannot reach the broker at {where}: {exc}")


def _is_tls_failure(text: str) -> bool:
    """paho's log of a TLS alert the broker sent after the handshake (e.g. certificate required
    under TLS 1.3), which no retry heals."""
    return "SSL" in text or "certificate" in text.lower()


def _device_of(message: Message) -> str:
    return message.device_id


def _valid_id(msg_id: str) -> bool:
    return 0 < len(msg_id) <= 64 and all(c.isalnum() or c in "_-" for c in msg_id)


def _acknowledged(info: paho.MQTTMessageInfo) -> bool:
    """Whether the broker acknowledged the message (PUBACK).

    paho's `is_published()` raises for a message published while disconnected (rc NO_CONN)
    even after paho has sent it on reconnect and the broker has acknowledged it, so for those
    the flag paho sets on PUBACK is read directly (paho 2.x keeps it in `_published`).
    """
    if info.rc == paho.MQTT_ERR_SUCCESS:
        return info.is_published()
    return bool(getattr(info, "_published", False))
