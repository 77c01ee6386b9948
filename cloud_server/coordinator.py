"""The round loop: select devices, send TASKs, gather UPDATEs, average, evaluate, checkpoint.

The coordinator receives its transport (an `MqttClient`) and its evaluation as arguments, and
keeps all arithmetic in pure functions (`fedavg.py`, `aggregation.py`), so each part is testable
on its own. Updates arrive on the client's dispatcher thread and are filed into the open round
(`round_state.OpenRound`), or in buffered mode into the run's `BufferInbox`, whose loop is
`buffered_loop.py`; everything else runs on the thread that calls `run`. A checkpoint is
written after every round, so a server killed at any moment restarts from the last completed
round with the same weights.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sfprompt.protocol.client_config import Inbound
from sfprompt.protocol.errors import BUNDLE_MISMATCH, BUSY, REJECTED, TransportError
from sfprompt.protocol.messages import (
    BROADCAST,
    Error,
    Join,
    Message,
    PhaseSettings,
    Presence,
    ServerStatus,
    Task,
    Update,
)
from sfprompt.protocol.mqtt_client import MqttClient

from .aggregation import RefusalTracker
from .buffer_inbox import BufferInbox
from .buffered_loop import BufferedLoop
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .fedavg import RoundInbox, UpdateRejected
from .metrics import MetricsLog, RoundMetrics
from .registry import Registry, RegistryFull
from .round_state import OpenRound, aggregate_round, log_round, update_figures
from .rounds import BUFFERED, RoundConfig, params_digest, select_devices
from .worker_pool import WorkerPool

log = logging.getLogger(__name__)
Params = dict[str, np.ndarray]


class Coordinator:
    """Runs the federation's rounds over `client` until done or stopped."""

    def __init__(
        self,
        client: MqttClient,
        cfg: RoundConfig,
        initial_params: Params,
        contract_hash: str,
        checkpoint_path: Path,
        metrics_log: MetricsLog,
        evaluate: Callable[[Params], tuple[float, float] | None] = lambda params: None,
        eval_samples: int | None = None,  # test images `evaluate` uses, for the metrics
        on_round: Callable[[RoundMetrics], None] = lambda metrics: None,
        on_device_gone: Callable[[str], None] = lambda device_id: None,
        pool: WorkerPool | None = None,  # an elastic pool of body workers (None: static or here)
        # each TASK's round (or version), params and settings as it is built (serve --capture)
        on_task: Callable[[int, Params, PhaseSettings], None] = lambda n, params, settings: None,
    ) -> None:
        self.client = client
        self.cfg = cfg
        self.contract_hash = contract_hash
        self.checkpoint_path = checkpoint_path
        self.metrics_log = metrics_log
        self.evaluate = evaluate
        self.eval_samples = eval_samples
        self.on_round = on_round
        self.registry = Registry(cfg.max_devices)
        self.params = {k: np.array(v, dtype=np.float32) for k, v in initial_params.items()}
        self.round = 0
        self.history: list[dict] = []
        self.rng = np.random.default_rng(cfg.seed)
        self.refusals = RefusalTracker(cfg.max_refusals)
        self.state = "starting"
        self._current: OpenRound | None = None
        self._buffer: BufferInbox | None = None  # buffered mode, while it runs
        self._lock = threading.Lock()
        self.on_device_gone = on_device_gone
        self.pool = pool
        self.on_task = on_task
        self.registry.on_offline(self._device_offline)

    # ---- wiring ------------------------------------------------------------------------------
    def attach(self) -> Coordinator:
        topics = self.client.config.topics
        self.client.subscribe(topics.all_up_of("join"), self._on_join)
        self.client.subscribe(topics.all_up_of("update"), self._on_update)
        self.client.subscribe(topics.all_up_of("error"), self._on_device_error)
        self.client.subscribe(topics.all_presence(), self._on_presence)
        return self

    def resume(self) -> bool:
        """Continue from the checkpoint, if any; raises CheckpointError if it does not fit."""
        ckpt = load_checkpoint(self.checkpoint_path, self.contract_hash)
        if ckpt is None:
            return False
        self.params = ckpt.params
        self.round = ckpt.round
        self.history = list(ckpt.history)
        self.rng.bit_generator.state = ckpt.rng_state
        self.refusals = RefusalTracker(self.cfg.max_refusals, ckpt.strikes, ckpt.excluded)
        log.info("resumed after round %d (params %s)", self.round, params_digest(self.params))
        if self.refusals.excluded:
            log.info("still excluded: %s", ", ".join(sorted(self.refusals.excluded)))
        return True

    # ---- the loop ----------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Rounds until `cfg.rounds` are done or `stop` is set; raises TimeoutError if too few
        devices come online in `wait_for_devices_s`."""
        self.status("starting")  # devices that knew an earlier server instance join again
        self.status("waiting")
        if self.cfg.aggregation_mode == BUFFERED:
            BufferedLoop(self).run(stop)
        else:
            while self.round < self.cfg.rounds and not stop.is_set():
                online = self.await_devices(stop)
                if online is None:
                    break
                self._run_round(self.round + 1, online, stop)
        self.status("finished" if self.round >= self.cfg.rounds else "stopped")

    def await_devices(self, stop: threading.Event) -> list[str] | None:
        """The eligible devices once `min_devices` of them are online; None if `stop` is set
        first. Raises TimeoutError if too few come online in `wait_for_devices_s`."""
        if len(self.eligible()) < self.cfg.min_devices:
            log.info(
                "waiting up to %.0fs for %d device(s) to join (%d online, %d excluded)",
                self.cfg.wait_for_devices_s,
                self.cfg.min_devices,
                len(self.registry.online()),
                len(self.refusals.excluded),
            )
        online = self._wait_for_eligible(stop)
        if stop.is_set():
            return None
        if len(online) < self.cfg.min_devices:
            raise TimeoutError(
                f"only {len(online)} of the {self.cfg.min_devices} devices needed came "
                f"online within {self.cfg.wait_for_devices_s:.0f}s"
                + (
                    f" ({len(self.refusals.excluded)} more are excluded)"
                    if self.refusals.excluded
                    else ""
                )
            )
        return online

    def open_buffer(self, inbox: BufferInbox | None) -> None:
        """File the UPDATEs that arrive from now on into `inbox` (None: no more)."""
        with self._lock:
            self._buffer = inbox

    def eligible(self) -> list[str]:
        """Online devices that may be selected: not excluded."""
        return [d for d in self.registry.online() if d not in self.refusals.excluded]

    def _wait_for_eligible(self, stop: threading.Event) -> list[str]:
        """Block until `min_devices` eligible devices are online, `wait_for_devices_s` passes or
        `stop` is set; returns the eligible devices. Excluded devices online do not count."""
        deadline = time.monotonic() + self.cfg.wait_for_devices_s
        while True:
            slice_s = max(0.0, min(1.0, deadline - time.monotonic()))
            self.registry.wait_for(
                self.cfg.min_devices + len(self.refusals.excluded), slice_s, stop
            )
            eligible = self.eligible()
            enough = len(eligible) >= self.cfg.min_devices
            if enough or stop.is_set() or time.monotonic() >= deadline:
                return eligible

    def _run_round(self, number: int, online: list[str], stop: threading.Event) -> None:
        if self.pool is not None and not self.pool.await_live(self.cfg.wait_for_devices_s, stop):
            return
        state = self._open_round(number, online)
        deadline = state.started + self.cfg.round_timeout_s  # wall clock: devices compare
        workers = {} if self.pool is None else self.pool.route(number, state.selected)
        state.task_bytes = self._send_tasks(number, state.selected, deadline, workers)
        while not state.inbox.wait(0.5) and time.monotonic() < state.inbox.deadline:
            if stop.is_set():
                return  # nothing of this round is kept; the checkpoint holds the last one
        state.inbox.close()  # an update still being checked now is refused as late
        with self._lock:
            self._current = None
        self.status("aggregating", f"round {number}")
        self.params, figures, model_refused = aggregate_round(
            self.params, state, self.cfg.aggregation_config()
        )
        refused = state.inbox.refused_for_content()
        self.record_refusals(state.selected, set(state.inbox.accepted), refused)
        self.status("evaluating", f"round {number}")
        metrics = state.metrics(
            self.evaluate(self.params),
            self.eval_samples,
            figures,
            params_digest(self.params),
            self.cfg.aggregation,
            model_refused,
            sorted(self.refusals.excluded),
        )
        log_round(metrics)
        self.finish_round(number, metrics)

    def record_refusals(self, selected: list[str], accepted: set[str], refused: set[str]) -> None:
        """Count refusals towards exclusion (`RefusalTracker.record`), saying whom it excludes."""
        for device in self.refusals.record(selected, accepted, refused):
            log.warning(
                "%s excluded from selection: its update was refused %d times in a row",
                device,
                self.cfg.max_refusals,
            )

    def _open_round(self, number: int, online: list[str]) -> OpenRound:
        """Select the round's devices and open its inbox to their updates."""
        started = time.time()
        selected = select_devices(online, self.cfg, self.rng)
        inbox = RoundInbox(
            number,
            set(selected),
            self.params,
            time.monotonic() + self.cfg.round_timeout_s,
            self.cfg.max_update_norm,
        )
        state = OpenRound(number, selected, inbox, started, params_digest(self.params))
        with self._lock:
            self._current = state
        self.status("training", f"round {number}: {len(selected)} devices")
        log.info("round %d: %s selected", number, ", ".join(selected))
        return state

    def finish_round(self, number: int, metrics: RoundMetrics) -> None:
        """Checkpoint the round, then count it done and report it."""
        self.history.append(metrics.to_dict())
        save_checkpoint(
            self.checkpoint_path,
            Checkpoint(
                number,
                self.params,
                self.history,
                self.rng.bit_generator.state,
                self.contract_hash,
                strikes=dict(self.refusals.strikes),
                excluded=sorted(self.refusals.excluded),
            ),
        )
        self.round = number
        self.metrics_log.write(metrics)
        self.on_round(metrics)

    def _send_tasks(
        self, number: int, selected: list[str], deadline: float, workers: dict[str, str]
    ) -> dict[str, int]:
        settings = self.cfg.settings(deadline)
        sizes = {}
        for device_id in selected:
            worker = workers.get(device_id, "")
            packets = self.task_packets(device_id, number, self.params, settings, worker)
            sizes[device_id] = sum(len(p) for p in packets)
            self.publish_task(device_id, packets)
        return sizes

    def task_packets(
        self,
        device_id: str,
        number: int,
        params: Params,
        settings: PhaseSettings,
        worker: str = "",
    ) -> list[bytes]:
        """A TASK of round (or version) `number` for `device_id` (served by body `worker`, if
        named), as it will be sent."""
        self.on_task(number, params, settings)
        task = Task(
            device_id=device_id, round=number, params=params, settings=settings, worker=worker
        )
        return self.client.packets(task)

    def publish_task(self, device_id: str, packets: list[bytes]) -> None:
        topic = self.client.config.topics.down(device_id, "task")
        self.client.publish_packets(topic, packets, timeout=None)

    def status(self, state: str, text: str = "") -> None:
        self.state = state
        status = ServerStatus(
            device_id=BROADCAST,
            round=self.round,
            state=state,
            devices_online=len(self.registry.online()),
            text=text,
        )
        # The process may exit next: wait for the PUBACK, unless the broker is already gone.
        final = state in ("finished", "stopped") and self.client.connected
        try:
            self.client.publish(
                self.client.config.topics.server_status(),
                status,
                retain=True,
                timeout=10.0 if final else None,
            )
        except TransportError as exc:  # shutting down with the broker gone: nothing to tell
            log.warning("could not publish the server status %r: %s", state, exc)

    # ---- handlers (dispatcher thread) --------------------------------------------------------
    def _on_join(self, inbound: Inbound) -> Message | None:
        msg = inbound.message
        assert isinstance(msg, Join)
        if msg.bundle_hash != self.contract_hash:
            log.warning("refused %s: its bundle does not fit this server's model", msg.device_id)
            return Error(
                device_id=msg.device_id,
                code=BUNDLE_MISMATCH,
                text=(
                    "the device bundle was exported for another model or cut than the "
                    "server's; export both bundles together and copy the device part anew"
                ),
                answers=msg.msg_id,
            )
        known = self.registry.get(msg.device_id)
        try:
            self.registry.join(msg)
        except RegistryFull as exc:
            log.warning("refused the JOIN of %s: %s", msg.device_id, exc)
            return Error(device_id=msg.device_id, code=BUSY, text=str(exc), answers=msg.msg_id)
        if known is None:
            log.info("%s joined (%s)", msg.device_id, msg.hardware.get("machine", "?"))
        else:  # a JOIN resent (no reply seen) or after a reconnection: not news
            log.debug("%s joined again", msg.device_id)
        return ServerStatus(
            device_id=msg.device_id,
            round=self.round,
            state=self.state,
            devices_online=len(self.registry.online()),
        )

    def _on_update(self, inbound: Inbound) -> Message | None:
        msg = inbound.message
        assert isinstance(msg, Update)
        with self._lock:
            state, buffer = self._current, self._buffer
        try:
            if buffer is not None:
                figures = update_figures(msg, inbound.payload_bytes)
                buffer.offer(msg.device_id, msg.round, dict(msg.params), msg.samples, figures)
            elif state is None:
                raise UpdateRejected("wrong_round", f"no round is open (update for {msg.round})")
            else:
                state.file_update(msg, inbound.payload_bytes)
        except UpdateRejected as exc:
            log.warning("rejected the update of %s: %s", msg.device_id, exc)
            error = Error(
                device_id=msg.device_id,
                round=msg.round,
                code=REJECTED,
                text=str(exc),
                answers=msg.msg_id,
            )
            topic = self.client.config.topics.down(msg.device_id, "error")
            self.client.publish(topic, error, timeout=None)
        return None

    def _on_presence(self, inbound: Inbound) -> Message | None:
        msg = inbound.message
        if isinstance(msg, Presence):
            self.registry.set_online(msg.device_id, msg.online)
        return None

    def _on_device_error(self, inbound: Inbound) -> Message | None:
        msg = inbound.message
        if isinstance(msg, Error):
            log.warning("%s reported [%s] %s", msg.device_id, msg.code, msg.text)
            with self._lock:
                state = self._current
            if state is not None and msg.round == state.number:
                # The device gave this round up (a lost step, a defense below its floor): wait
                # no longer for it, and say why in the round's metrics.
                state.inbox.drop(msg.device_id, f"failed on the device: [{msg.code}] {msg.text}")
        return None

    def _device_offline(self, device_id: str) -> None:
        """Give a device that went offline a grace period: a broker restart takes every device
        offline for a moment, and they carry on where they were once reconnected."""
        timer = threading.Timer(self.cfg.offline_grace_s, self._forget_if_offline, (device_id,))
        timer.daemon = True
        timer.start()

    def _forget_if_offline(self, device_id: str) -> None:
        info = self.registry.get(device_id)
        if info is None or info.online:
            return
        self.on_device_gone(device_id)
        with self._lock:
            state, buffer = self._current, self._buffer
        if buffer is not None and buffer.end(device_id, "went offline"):
            log.info("%s went offline during its task; not waiting for it", device_id)
        if state is not None and device_id in state.inbox.pending:
            state.inbox.drop(device_id)
            log.info("%s went offline during the round; not waiting for it", device_id)
