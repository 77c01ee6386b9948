"""The device's end of split training: h up, z down; dL/dz up, dL/dh down.

Each exchange is an MQTT v5 request whose reply the server correlates; a lost message is sent
again (the server answers a repeat from its reply cache, never computing twice), and an ERROR
from the server (e.g. it restarted and lost the step) raises `RemoteError`. An ERROR `busy`
(the server's queue or state is full for now) is retried as a new message, since the server
answers a repeat of the refused one from its cache, with backoff for up to `busy_wait_s`.
An ERROR `unknown_step` to a GRAD_Z (the body worker holding the step's h died, or the device
was moved to another worker) redoes the step's exchange: the same h again as a new step, then
the same dL/dz. The server's VJP depends only on h and dL/dz, so the gradient is the one the
lost step would have given, and nothing is applied twice (the device applies its optimizer step
only after `backward` returns).

The round's `Defense` (defenses.py) is applied here, to h and dL/dz just before they are sent,
with noise from OS entropy; dL/dh is returned through the clip, as for the h the head gave.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from sfprompt.protocol.errors import BUSY, UNKNOWN_STEP, ProtocolError, RemoteError
from sfprompt.protocol.messages import BodyOut, GradH, GradZ, Message, Smashed, new_msg_id
from sfprompt.protocol.mqtt_client import MqttClient

from .defenses import NO_DEFENSE, ClipTape, Defense

log = logging.getLogger(__name__)

MAX_REDOS = 3
"""Times one step's exchange is redone after its state was lost on the server."""


class SplitLink:
    """One round's split exchanges for one device; `step` numbers them within the round."""

    def __init__(
        self,
        client: MqttClient,
        device_id: str,
        round: int,
        encoding: str = "fp32",
        timeout_s: float = 60.0,
        attempts: int = 3,
        busy_wait_s: float = 60.0,
        defense: Defense = NO_DEFENSE,
        noise: np.random.Generator | None = None,
        tail_delay_s: float = 0.0,
    ) -> None:
        self.client = client
        self.device_id = device_id
        self.round = round
        self.encoding = encoding
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.busy_wait_s = busy_wait_s
        self.defense = defense
        # Unseeded: noise the server could replay from a known seed would protect nothing.
        self.noise = noise if noise is not None else np.random.default_rng()
        self.tail_delay_s = tail_delay_s  # --step-delay: a slow device's tail, for tests
        self.step = 0
        self._clip: ClipTape | None = None  # the last forward's, until its backward
        self._sent: Smashed | None = None  # the last forward's SMASHED, to redo a lost step

    def forward(self, h: np.ndarray) -> np.ndarray:
        """Send h (B, T, D), clipped and noised as the defense says; returns z, only the tokens
        the tail reads."""
        self.step += 1
        sent, self._clip = self.defense.protect_h(h, self.noise)
        msg = Smashed(
            device_id=self.device_id,
            round=self.round,
            step=self.step,
            h=np.ascontiguousarray(sent, dtype=np.float32),
            encoding=self.encoding,
        )
        reply = self._request(msg, "smashed", "body_out")
        assert isinstance(reply, BodyOut)
        self._sent = msg
        return reply.z

    def backward(self, grad_z: np.ndarray) -> np.ndarray:
        """Send dL/dz for the last forward (noised as the defense says); returns dL/dh
        (B, T, D) with respect to the h given to `forward`."""
        if self.tail_delay_s > 0:  # a slow device spends its step here, between z and dL/dz
            time.sleep(self.tail_delay_s)
        sent = self.defense.protect_grad(grad_z, self.noise)
        msg = GradZ(
            device_id=self.device_id,
            round=self.round,
            step=self.step,
            grad_z=np.ascontiguousarray(sent, dtype=np.float32),
            encoding=self.encoding,
        )
        for redo in range(MAX_REDOS + 1):
            try:
                reply = self._request(msg, "grad_z", "grad_h")
                break
            except RemoteError as exc:
                lost = getattr(exc.error, "code", None) == UNKNOWN_STEP
                if not lost or redo == MAX_REDOS or self._sent is None:
                    raise
                log.info("step %d was lost on the server (%s); redoing it", msg.step, exc)
                msg = self._redo_forward(msg)
        assert isinstance(reply, GradH)
        clip, self._clip, self._sent = self._clip, None, None
        return clip.vjp(reply.grad_h) if clip is not None else reply.grad_h

    def _redo_forward(self, grad: GradZ) -> GradZ:
        """Send the last forward's h again as a new step; returns the GRAD_Z for that step (its
        z is not needed: the VJP is taken at h)."""
        assert self._sent is not None
        self.step += 1
        again = dataclasses.replace(self._sent, step=self.step, msg_id=new_msg_id())
        self._request(again, "smashed", "body_out")
        self._sent = again
        return dataclasses.replace(grad, step=self.step, msg_id=new_msg_id())

    def _request(self, msg: Message, up: str, down: str) -> Message:
        topics = self.client.config.topics
        give_up = time.monotonic() + self.busy_wait_s
        delay = 0.1
        while True:
            try:
                reply = self.client.request(
                    topics.up(self.device_id, up),
                    msg,
                    topics.down(self.device_id, down),
                    self.timeout_s,
                    self.attempts,
                )
                break
            except RemoteError as exc:
                if getattr(exc.error, "code", None) != BUSY or time.monotonic() >= give_up:
                    raise
                log.debug("server busy with %s step %d; again in %.1fs", up, msg.step, delay)
            time.sleep(delay)
            delay = min(2 * delay, 2.0)
            msg = dataclasses.replace(msg, msg_id=new_msg_id())
        if reply.kind != down or reply.step != msg.step:
            raise ProtocolError(
                "bad_field", "reply", f"{down} for step {msg.step}", f"{reply.kind} {reply.step}"
            )
        return reply
