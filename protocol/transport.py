"""One MQTT v5 session: the only module that uses paho-mqtt (with its fix, `paho_fixes`).

Always paho's VERSION2 callbacks and MQTT v5: persistent sessions (clean_start=False plus a
session expiry), QoS 1, automatic reconnect with backoff, a retained Last Will, TLS and user
name/password. Failures raise `TransportError` instead of returning codes. paho's network
thread only files: each PUBLISH goes to the `deliver` callback, acknowledgements to `acks`.
Which subscription takes a topic is paho's own matcher's answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.matcher import MQTTMatcher
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from .acks import PubAcks, SubAcks
from .client_config import ClientConfig
from .codec import CONTENT_TYPE
from .connect_errors import (
    PERMANENT_REFUSALS,
    connect_failure,
    connection_refused,
    is_tls_failure,
    tls_refused,
    topics_refused,
)
from .errors import TransportError
from .paho_fixes import install as install_paho_fixes
from .subscriptions import Subscription, Subscriptions
from .traffic import Traffic, kind_of

log = logging.getLogger(__name__)
install_paho_fixes()  # paho copies each payload twice per MQTT v5 property otherwise
# What paho accepted: sent now, or queued while disconnected and sent on reconnect. Either way
# its packet id waits for a PUBACK; other codes (a full queue) mean nothing was queued.
_QUEUED = (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN)


@dataclass(frozen=True)
class Delivery:
    """One PUBLISH as it arrived, with the MQTT v5 properties needed to answer it."""

    topic: str
    payload: bytes | bytearray
    response_topic: str | None
    correlation: bytes | None


class Transport:
    """Connect, publish with PUBACK, subscribe with SUBACK, and hand over what arrives.

    `deliver` runs on paho's network thread for every PUBLISH received; `closed` runs once the
    session is closed (by `close`, or by a `connect` that failed after starting the loop).
    """

    def __init__(
        self, config: ClientConfig, deliver: Callable[[Delivery], None], closed: Callable[[], None]
    ) -> None:
        self.config = config
        self.max_packet_bytes: int | None = None  # the broker's Maximum Packet Size (CONNACK)
        self.connects = 0  # successful connections so far: > 1 means it reconnected
        self.traffic = Traffic()
        self.subscriptions = Subscriptions(MQTTMatcher())
        self.network_thread: int | None = None
        self._deliver = deliver
        self._closed = closed
        self._connect_hooks: list[Callable[[], None]] = []
        self._connected = threading.Event()
        self._connect_answered = threading.Event()  # connected, or refused for good
        self._connect_refused: TransportError | None = None
        self._last_error = ""  # paho's last logged error, e.g. a TLS alert
        self._closing = False
        self._pubacks = PubAcks()
        self._subacks = SubAcks()
        self._resubscription: tuple[int, list[str]] | None = None  # (packet id, filters)
        self._client = self._build()

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
        client.on_subscribe = lambda _c, _u, mid, codes, _p: self._on_subscribe(mid, codes)
        client.on_publish = lambda _c, _u, mid, reason, _p: self._pubacks.on_puback(mid, reason)
        client.on_log = self._on_log
        return client

    # ---- connection --------------------------------------------------------------------------
    def connect(self, timeout: float, started: Callable[[], None]) -> None:
        """Connect; raises TransportError, with `permanent` set for what retrying cannot heal
        (unknown host, TLS refused, not authorised). A transient failure (nothing listening yet,
        a timeout) is retried with backoff until `timeout`, then raised naming its cause.
        `started` runs once paho's network loop does."""
        self._closing = False
        self._start_loop()
        started()
        deadline = time.monotonic() + timeout
        if not self._connect_answered.wait(timeout) or self._connect_refused is not None:
            refused = self._connect_refused
            self.close(send_will=False)
            last = f" (last error: {self._last_error})" if self._last_error else ""
            raise refused or TransportError(
                f"no MQTT connection to {self.config.host}:{self.config.port} within "
                f"{timeout}s{last}",
                permanent=is_tls_failure(self._last_error),
            )
        failure = self._await_resubscription(deadline, timeout)
        if failure is not None:
            self.close(send_will=False)
            raise failure

    def _start_loop(self) -> None:
        cfg = self.config
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = cfg.session_expiry_s
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

    def _await_resubscription(self, deadline: float, timeout: float) -> TransportError | None:
        """Wait for the SUBACK of the handlers registered before connect; the failure, if any."""
        with self._subacks.lock:
            if self._resubscription is None:
                return None
            mid, filters = self._resubscription
            codes = self._subacks.wait(mid, max(0.0, deadline - time.monotonic()))
        if codes is None:
            return TransportError(f"no SUBACK within {timeout}s")
        if any(code.is_failure for code in codes):
            return topics_refused(self.config, filters, codes)
        return None

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
        self._closed()
        self._connected.clear()

    def on_every_connect(self, hook: Callable[[], None]) -> None:
        """Run `hook` after each (re)connection, e.g. to publish presence again after a broker
        restart lost retained messages. It runs on paho's network thread, so it must not block:
        publish with `timeout=None`."""
        self._connect_hooks.append(hook)

    def _on_connect(self, client: Any, _u: Any, _flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            refused = connection_refused(self.config, reason)
            if self.connects == 0:
                self._connect_refused = refused
                self._connect_answered.set()  # wakes connect(), which raises
            else:  # paho keeps retrying; say why each time
                log.error("%s; retrying", refused)
            return
        self.max_packet_bytes = getattr(props, "MaximumPacketSize", None)
        self.network_thread = threading.get_ident()
        self.connects += 1
        if self.connects > 1:
            log.warning("broker at %s:%d is back", self.config.host, self.config.port)
        self._resubscribe(client)
        self._connected.set()
        self._connect_answered.set()
        for hook in self._connect_hooks:
            try:
                hook()
            except Exception:
                log.exception("a connect hook failed")

    def _resubscribe(self, client: Any) -> None:
        """Even a resumed session may lack filters registered since; retained messages sent
        again by the broker are dropped as duplicates."""
        filters = self.subscriptions.filters()
        if not filters:
            return
        with self._subacks.lock:
            _, mid = client.subscribe([(f, SubscribeOptions(qos=1)) for f in filters])
            if self.connects == 1 and mid is not None:  # connect() waits for this SUBACK
                self._resubscription = (mid, filters)
                self._subacks.expect(mid)

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
        if self.connects == 0 and is_tls_failure(text) and self._connect_refused is None:
            self._connect_refused = tls_refused(self.config, text)
            self._connect_answered.set()  # wakes connect(), which raises

    # ---- publishing --------------------------------------------------------------------------
    def publish(
        self,
        topic: str,
        packets: list[bytes],
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        timeout: float | None = 60.0,
    ) -> None:
        """Send each packet at QoS 1 and wait for the broker's PUBACKs (None: do not wait).

        Raises TransportError if the broker refuses (e.g. 0x87 Not authorized) or times out.
        While disconnected the packets are queued and sent on reconnect.
        """
        if timeout is not None and threading.get_ident() == self.network_thread:
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
        size = sum(len(p) for p in packets)
        self.traffic.add(self.traffic.sent, kind_of(self.config.topics, topic), size)
        queued = [info.mid for info in infos if info.rc in _QUEUED]
        if timeout is None:
            self._pubacks.ignore(queued)
            return
        deadline = time.monotonic() + timeout
        for info in infos:
            remaining = max(0.0, deadline - time.monotonic())
            if info.rc in _QUEUED:
                reason = self._pubacks.wait(info.mid, remaining)
            else:  # paho queued nothing, so no PUBACK will come: as if it were lost
                time.sleep(remaining)
                reason = None
            if reason is None:
                raise TransportError(f"no PUBACK for {topic} within {timeout}s")
            if reason.is_failure:
                raise TransportError(
                    f"broker refused publish on {topic}: {reason}",
                    int(reason.value),
                    permanent=int(reason.value) in PERMANENT_REFUSALS,
                )

    # ---- subscribing -------------------------------------------------------------------------
    def subscribe(self, subscription: Subscription, timeout: float) -> None:
        """Register `subscription`; once connected, also SUBSCRIBE and wait for the SUBACK.

        Raises TransportError if the broker refuses (e.g. 0x87 Not authorized; the subscription
        is then dropped) or does not answer within `timeout`."""
        self.subscriptions.add(subscription)
        if not self.connected:
            return
        topic_filter = subscription.filter
        with self._subacks.lock:
            result, mid = self._client.subscribe(topic_filter, options=SubscribeOptions(qos=1))
            if result != paho.MQTT_ERR_SUCCESS or mid is None:
                raise TransportError(f"subscribe to {topic_filter} failed: {result}")
            self._subacks.expect(mid)
            codes = self._subacks.wait(mid, timeout)
        if codes is None:
            raise TransportError(f"no SUBACK for {topic_filter} within {timeout}s")
        if any(code.is_failure for code in codes):
            self.subscriptions.remove(subscription)
            raise TransportError(
                f"broker refused subscription to {topic_filter}: {codes[0]}", int(codes[0].value)
            )

    def unsubscribe(self, topic_filter: str) -> None:
        """Forget `topic_filter`'s handlers and, once connected, UNSUBSCRIBE (not waiting for the
        UNSUBACK: a message already on its way finds no handler and is dropped)."""
        if self.subscriptions.remove_filter(topic_filter) and self.connected:
            self._client.unsubscribe(topic_filter)

    def _on_subscribe(self, mid: int, codes: list[Any]) -> None:
        if not self._subacks.on_suback(mid, codes) and any(code.is_failure for code in codes):
            log.error("broker refused a subscription on reconnect: %s", codes)

    # ---- receiving ---------------------------------------------------------------------------
    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        props = msg.properties
        delivery = Delivery(
            msg.topic,
            msg.payload,
            getattr(props, "ResponseTopic", None),
            getattr(props, "CorrelationData", None),
        )
        kind = kind_of(self.config.topics, msg.topic)
        self.traffic.add(self.traffic.received, kind, len(msg.payload))
        self._deliver(delivery)
