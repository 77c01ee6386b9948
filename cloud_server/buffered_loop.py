"""Buffered (asynchronous) rounds, FedBuff-style: no device waits for another.

Every eligible device (up to `--clients-per-round` / `--fraction` at once) always has a TASK in
flight, carrying the global model current when it left. Its UPDATE is checked as in a
synchronous round and buffered (`BufferInbox`); once `--buffer-size` (K) updates wait, the loop
aggregates them (and any that came in while the last round was aggregated and evaluated, so
no backlog builds up), each discounted by its staleness (`buffered.aggregate_stale`), and counts
a round: evaluated, checkpointed and logged like a synchronous one. The device that answered
gets a new TASK at once; one past its deadline is not waited for (its update is refused as
late); one gone offline neither. A round also closes after `--round-timeout` with the updates
it has, so that a fleet slower than its deadline still moves on, as synchronous rounds do.

Runs on the thread that calls `Coordinator.run`, over the coordinator's transport, model,
registry and checkpoint (`RoundHost`: what it uses of it, so neither module imports the other
both ways); the coordinator's handlers file updates into the inbox from the client's dispatcher
thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from sfprompt.protocol.messages import PhaseSettings

from .aggregation import RefusalTracker
from .buffer_inbox import ACCEPTED, REFUSED, Batch, BufferInbox
from .buffered import aggregate_stale
from .fedavg import Params
from .metrics import RoundMetrics
from .round_state import log_aggregated, log_round
from .rounds import RoundConfig, devices_per_round, params_digest, select_devices

log = logging.getLogger(__name__)
WAKE_S = 0.5  # the loop checks deadlines, presence and stop at least this often


class RoundHost(Protocol):
    """What the loop uses of the `Coordinator` that runs it."""

    cfg: RoundConfig
    params: Params
    round: int
    rng: np.random.Generator
    refusals: RefusalTracker
    eval_samples: int | None
    evaluate: Callable[[Params], tuple[float, float] | None]

    def eligible(self) -> list[str]: ...
    def await_devices(self, stop: threading.Event) -> list[str] | None: ...
    def open_buffer(self, inbox: BufferInbox | None) -> None: ...
    def task_packets(
        self, device_id: str, number: int, params: Params, settings: PhaseSettings
    ) -> list[bytes]: ...
    def publish_task(self, device_id: str, packets: list[bytes]) -> None: ...
    def status(self, state: str, text: str = "") -> None: ...
    def record_refusals(
        self, selected: list[str], accepted: set[str], refused: set[str]
    ) -> None: ...
    def finish_round(self, number: int, metrics: RoundMetrics) -> None: ...


class BufferedLoop:
    """Buffered rounds over a `Coordinator`'s transport, model, registry and checkpoint."""

    def __init__(self, coordinator: RoundHost) -> None:
        self.c = coordinator
        self.cfg = coordinator.cfg
        self.inbox = BufferInbox(
            coordinator.round, coordinator.params, self.cfg.max_staleness, self.cfg.max_update_norm
        )
        self.opened = time.time()  # when the round being gathered started

    def run(self, stop: threading.Event) -> None:
        """Rounds until `cfg.rounds` are done or `stop` is set; raises TimeoutError when no
        device is left to train and too few come back in `wait_for_devices_s`."""
        if self.c.round >= self.cfg.rounds or self.c.await_devices(stop) is None:
            return
        self.c.open_buffer(self.inbox)
        try:
            self._loop(stop)
        finally:
            self.c.open_buffer(None)

    def _loop(self, stop: threading.Event) -> None:
        k = self.cfg.buffer_size
        closes = self._open_round()
        while self.c.round < self.cfg.rounds and not stop.is_set():
            self._count_refusals()
            self._dispatch()
            if not self.inbox.in_flight() and not self.inbox.buffered():
                # no device to wait for: wait for devices, as between synchronous rounds
                if self.c.await_devices(stop) is None:
                    return
                closes = self._open_round()
                continue
            self.inbox.wait(k, WAKE_S)
            for device_id in self.inbox.expire():
                log.info("%s is past its task's deadline; not waiting for it", device_id)
            buffered = self.inbox.buffered()
            nobody_else = not self.inbox.in_flight() and not self._idle_devices()
            if buffered >= k or (buffered and nobody_else) or time.monotonic() >= closes:
                self._count_refusals()
                self._aggregate(self.c.round + 1)
                closes = self._open_round()

    def _open_round(self) -> float:
        """Start timing the next round; returns when it closes at the latest (monotonic)."""
        self.opened = time.time()
        return time.monotonic() + self.cfg.round_timeout_s

    def _idle_devices(self) -> list[str]:
        """Eligible devices online without a task in flight."""
        busy = self.inbox.in_flight()
        return [d for d in self.c.eligible() if d not in busy]

    def _dispatch(self) -> None:
        """Send a TASK at the current version to idle devices, up to the devices per round
        (`devices_per_round`) in flight at once, chosen at random among the idle ones."""
        eligible = self.c.eligible()
        busy = self.inbox.in_flight()
        idle = [d for d in eligible if d not in busy]
        if not idle:
            return
        free = devices_per_round(self.cfg, len(eligible)) - len(busy.intersection(eligible))
        if free <= 0:
            return
        version, params = self.inbox.model()
        deadline = time.time() + self.cfg.round_timeout_s  # wall clock: devices compare
        settings = self.cfg.settings(deadline)
        for device_id in select_devices(idle, self.cfg, self.c.rng, count=free):
            packets = self.c.task_packets(device_id, version, params, settings)
            expires = time.monotonic() + self.cfg.round_timeout_s
            self.inbox.start(device_id, version, expires, sum(len(p) for p in packets))
            self.c.publish_task(device_id, packets)  # a fake transport may answer right here
        self.c.status("training", f"round {version + 1}: {len(self.inbox.in_flight())} devices")

    def _count_refusals(self) -> None:
        """Strikes per update, in the order they were checked: `max_refusals` in a row exclude
        a device, which then gets no more tasks."""
        for device_id, outcome in self.inbox.outcomes():
            accepted = {device_id} if outcome == ACCEPTED else set()
            refused = {device_id} if outcome == REFUSED else set()
            self.c.record_refusals([device_id], accepted, refused)

    def _aggregate(self, number: int) -> None:
        """Apply the buffered updates, publish version `number`, evaluate and checkpoint it."""
        batch = self.inbox.take()
        self.c.status("aggregating", f"round {number}")
        before = self.c.params
        figures: dict[str, dict[str, float]] = {}
        weights: dict[str, float] = {}
        refused = ""
        if batch.updates:
            reported = {
                key: f["local_samples"] for key, f in batch.figures.items() if "local_samples" in f
            }
            cfg = self.cfg.aggregation_config()
            result, weights = aggregate_stale(
                before, batch.updates, cfg, self.cfg.staleness_exponent, reported
            )
            log_aggregated(number, result, cfg)
            self.c.params, figures, refused = result.params, result.figures(), result.refused
        self.inbox.advance(number, self.c.params)
        if number < self.cfg.rounds:  # the devices that answered train on during evaluation
            self._dispatch()
        self.c.status("evaluating", f"round {number}")
        evaluated = self.c.evaluate(self.c.params)
        metrics = self._metrics(number, batch, evaluated, figures, weights, refused)
        metrics.params_before = params_digest(before)
        log_round(metrics)
        self.c.finish_round(number, metrics)

    def _metrics(
        self,
        number: int,
        batch: Batch,
        result: tuple[float, float] | None,
        figures: dict[str, dict[str, float]],
        weights: dict[str, float],
        model_refused: str,
    ) -> RoundMetrics:
        """The round's record (`result`: accuracy and loss). `selected` holds one entry per
        task that ended in it: the update keys (`dev`, `dev#2`, ...) and the devices that
        brought none (in `missing`)."""
        devices = {
            key: {
                **batch.figures[key],
                **figures.get(key, {}),
                "staleness": float(update.staleness),
                "staleness_weight": weights.get(key, 1.0),
            }
            for key, update in batch.updates.items()
        }
        missing = list(batch.window.missing)
        return RoundMetrics(
            round=number,
            accuracy=None if result is None else result[0],
            loss=None if result is None else result[1],
            eval_samples=None if result is None else self.c.eval_samples,
            seconds=time.time() - self.opened,  # since the last round, or devices came
            devices=devices,
            selected=sorted({*batch.updates, *(device for device, _ in missing)}),
            accepted=sorted(batch.updates),
            rejected=list(batch.window.rejected),
            params_after=params_digest(self.c.params),
            missing=missing,
            aggregation=self.cfg.aggregation,
            model_refused=model_refused,
            excluded=sorted(self.c.refusals.excluded),
        )
