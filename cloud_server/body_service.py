"""The split-training service: SMASHED -> body -> BODY_OUT, GRAD_Z -> body VJP -> GRAD_H.

Handlers only validate, file state and queue work on the batcher, so they run inline on the MQTT
client's network thread (no hop to its dispatcher); replies go out from the batcher's thread once
the (cross-device) body call is done, so MQTT traffic never waits on the body. The coordinator's
server and every `sfprompt-cloud worker` run this same service; with several workers each serves
the devices `owns` assigns it, or in an elastic pool only those it is subscribed to
(`serve_device`, see docs/cloud_server.md).

What a device cannot have now (the batcher's queue or the split state is full) is answered with
ERROR `busy` and nothing of the request is kept; the device sends it again later. A request over
the batcher's `max_request` samples is answered `too_large`.

Replies travel in `encoding_down` (serve's `--encoding-down`), or by default in the encoding each
request came in; every message names its own encoding, so a device decodes whichever it gets.

With a `TrafficCapture` (serve/worker `--capture DIR`) every SMASHED and GRAD_Z accepted here is
also written to disk for `sfprompt-audit`; the capture only queues the write.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from sfprompt.protocol.client_config import Inbound
from sfprompt.protocol.codec import error_for
from sfprompt.protocol.errors import BUSY, NOT_FINITE, UNKNOWN_STEP, ProtocolError
from sfprompt.protocol.messages import BodyOut, Error, GradH, GradZ, Message, Smashed
from sfprompt.protocol.mqtt_client import MqttClient

from .batcher import BatcherBusy, BodyBatcher
from .rounds import DOWN_ENCODINGS, SAME_ENCODING
from .step_state import StateFull, StepStore
from .traffic_capture import TrafficCapture

log = logging.getLogger(__name__)


def worker_of(device_id: str, workers: int) -> int:
    """A stable assignment of devices to `workers` body workers (the same on every host)."""
    digest = hashlib.sha256(device_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % workers


class BodyService:
    """Serves the body to every device this process owns, through one MQTT client."""

    def __init__(
        self,
        client: MqttClient,
        batcher: BodyBatcher,
        store: StepStore,
        owns: Callable[[str], bool] = lambda device_id: True,
        encoding_down: str = SAME_ENCODING,
        capture: TrafficCapture | None = None,
    ) -> None:
        if encoding_down not in DOWN_ENCODINGS:
            raise ValueError(f"encoding_down: one of {DOWN_ENCODINGS}, not {encoding_down!r}")
        self.client = client
        self.batcher = batcher
        self.store = store
        self.owns = owns
        self.encoding_down = encoding_down
        self.capture = capture
        self._served: OrderedDict[str, None] = OrderedDict()  # for the log, bounded
        # Split messages that reached this process, by device (bounded like `_served`): what
        # per-device subscriptions save shows here.
        self.received: OrderedDict[str, int] = OrderedDict()

    def attach(self) -> BodyService:
        """Subscribe the handlers to every device's split traffic (before or after connect)."""
        topics = self.client.config.topics
        # Inline: the handlers only queue work for the batcher, so they run on paho's network
        # thread and save a thread hop per request (the reply goes out from the batcher).
        self.client.subscribe(topics.all_up_of("smashed"), self._on_smashed, inline=True)
        self.client.subscribe(topics.all_up_of("grad_z"), self._on_grad_z, inline=True)
        return self

    def serve_device(self, device_id: str) -> None:
        """Subscribe to one device's split traffic (an elastic worker's assignment); raises
        TransportError if the broker refuses."""
        topics = self.client.config.topics
        self.client.subscribe(topics.up(device_id, "smashed"), self._on_smashed, inline=True)
        self.client.subscribe(topics.up(device_id, "grad_z"), self._on_grad_z, inline=True)

    def stop_serving(self, device_id: str) -> None:
        """Unsubscribe from a device moved elsewhere and free its open steps."""
        topics = self.client.config.topics
        self.client.unsubscribe(topics.up(device_id, "smashed"))
        self.client.unsubscribe(topics.up(device_id, "grad_z"))
        self.store.drop_device(device_id)

    def _on_smashed(self, inbound: Inbound) -> Message | None:
        msg = inbound.message
        assert isinstance(msg, Smashed)
        self._note_received(msg.device_id)
        if not self.owns(msg.device_id):
            return None
        self._note_served(msg.device_id)
        key = (msg.device_id, msg.round, msg.step)
        try:
            self.store.put(key, msg.h)
        except StateFull as exc:
            return _error(msg, BUSY, f"server busy, send again later: {exc}")
        try:
            self.batcher.forward(
                msg.h, lambda z, exc: self._reply(inbound, z, exc, BodyOut), msg.device_id
            )
        except (BatcherBusy, ProtocolError) as exc:
            self.store.take(key)  # nothing of a refused step is kept
            return _refusal(msg, exc)
        if self.capture is not None:
            self.capture.smashed(msg)
        return None

    def _on_grad_z(self, inbound: Inbound) -> Message | None:
        msg = inbound.message
        assert isinstance(msg, GradZ)
        self._note_received(msg.device_id)
        if not self.owns(msg.device_id):
            return None
        key = (msg.device_id, msg.round, msg.step)
        h = self.store.take(key)
        if h is None:
            text = (
                f"no open split step (round {msg.round}, step {msg.step}) for {msg.device_id}: "
                "never smashed, already answered, or expired"
            )
            return _error(msg, UNKNOWN_STEP, text)
        try:
            self.batcher.backward(
                h,
                msg.grad_z,
                lambda grad, exc: self._reply(inbound, grad, exc, GradH),
                msg.device_id,
            )
        except (BatcherBusy, ProtocolError) as exc:
            self.store.put(key, h)  # still open: the device sends its GRAD_Z again
            return _refusal(msg, exc)
        if self.capture is not None:
            self.capture.grad_z(msg, h)
        return None

    def _note_received(self, device_id: str) -> None:
        count = self.received.pop(device_id, 0)
        if count == 0:
            log.debug("split traffic from %s", device_id)
        self.received[device_id] = count + 1
        if len(self.received) > 100_000:
            self.received.popitem(last=False)

    def _note_served(self, device_id: str) -> None:
        if device_id in self._served:
            return
        self._served[device_id] = None
        if len(self._served) > 100_000:
            self._served.popitem(last=False)
        log.info("serving the body to %s", device_id)

    def _reply(
        self,
        inbound: Inbound,
        tensor: np.ndarray | None,
        exc: Exception | None,
        kind: type[BodyOut] | type[GradH],
    ) -> None:
        msg = inbound.message
        assert isinstance(msg, (Smashed, GradZ))
        reply: Message
        if exc is not None or tensor is None:
            log.warning("body call for %s step %d failed: %s", msg.device_id, msg.step, exc)
            reply = error_for(exc or RuntimeError("no result"), msg.device_id, msg.msg_id)
        elif not np.isfinite(tensor).all():  # extreme but finite input (>= ~1e19) overflows
            text = (
                f"the body's {kind.kind} for step {msg.step} is not finite: the "
                f"{'h' if kind is BodyOut else 'grad_z'} sent was too large"
            )
            log.warning("%s: %s", msg.device_id, text)
            reply = _error(msg, NOT_FINITE, text)
        else:
            field = kind.tensor_field
            reply = kind(  # type: ignore[call-arg]
                device_id=msg.device_id,
                round=msg.round,
                step=msg.step,
                encoding=self._reply_encoding(msg),
                **{field: np.ascontiguousarray(tensor, dtype=np.float32)},
            )
        try:
            self.client.respond(inbound, reply)
        except Exception:
            log.exception("could not answer %s of %s", msg.kind, msg.device_id)

    def _reply_encoding(self, msg: Smashed | GradZ) -> str:
        return msg.encoding if self.encoding_down == SAME_ENCODING else self.encoding_down


def _refusal(msg: Smashed | GradZ, exc: Exception) -> Error:
    """A request refused as it came: busy (send it later) or its own fault (e.g. too large)."""
    log.info("refused %s of %s step %d: %s", msg.kind, msg.device_id, msg.step, exc)
    if isinstance(exc, ProtocolError):
        return error_for(exc, msg.device_id, msg.msg_id, msg.round, msg.step)
    return _error(msg, BUSY, str(exc))


def _error(msg: Smashed | GradZ, code: str, text: str) -> Error:
    return Error(
        device_id=msg.device_id,
        round=msg.round,
        step=msg.step,
        code=code,
        text=text,
        answers=msg.msg_id,
    )
