"""The round loop: select devices, send TASKs, gather UPDATEs, average, evaluate, checkpoint.

The coordinator receives its transport (an `MqttClient`) and its evaluation as arguments, and
keeps all arithmetic in pure functions (`fedavg.py`), so each part is testable on its own.
Updates arrive on the client's dispatcher thread and are filed into the round's `RoundInbox`;
everything else runs on the thread that calls `run`. A checkpoint is written after every round,
so a server killed at any moment restarts from the last completed round with the same weights.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sfprompt.protocol.client_config import Inbound
from sfprompt.protocol.codec import encode
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

from .aggregation import AggregationConfig, RefusalTracker, aggregate
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .fedavg import RoundInbox, UpdateRejected
from .metrics import MetricsLog, RoundMetrics
from .registry import Registry, RegistryFull

log = logging.getLogger(__name__)
Params = dict[str, np.ndarray]


@dataclass(frozen=True)
class RoundConfig:
    """How the federation trains; every field is a flag of `sfprompt-cloud serve`."""

    rounds: int = 10
    clients_per_round: int | None = None  # a count; None: `fraction` of the online devices
    fraction: float = 1.0
    min_devices: int = 1  # a round starts only with this many devices online
    wait_for_devices_s: float = 600.0  # give up (and stop) if too few join in this time
    round_timeout_s: float = 600.0  # the TASK's deadline: late updates are rejected
    offline_grace_s: float = 10.0  # a device offline this long is no longer waited for
    server_lr: float = 1.0  # eta_g: new = old + eta_g * weighted mean(client - old)
    keep_ratio: float = 0.5  # gamma: EL2N pruning keeps this fraction of each device's data
    local_epochs: int = 1  # self-update epochs (0: no local-loss phase)
    # One set of defaults for `serve` and `sfprompt-sim` (which reads these), chosen by the sweep
    # in docs/simulation.md ("Choosing the learning rates"), starting from the paper's local 1e-4.
    local_lr: float = 1e-3
    split_lr: float = 0.3
    split_epochs: int = 1
    batch_size: int = 32
    encoding: str = "fp32"  # activations and gradients on the wire
    prune: str = "class"  # EL2N's hardest fraction per class, or "global" (the paper's rule)
    seed: int = 0
    max_devices: int = 10_000  # devices the registry knows at most (docs/cloud_server.md, Bounds)
    # Robust aggregation (docs/cloud_server.md, "Robust aggregation"); none of it is in the TASK.
    aggregation: str = "fedavg"  # or "median", "trimmed-mean" (coordinate-wise, unweighted)
    trim_fraction: float = 0.2  # trimmed-mean: ceil(f * n) updates dropped at each end
    clip_norm: float | None = None  # scale each update's change down to this L2 norm
    max_update_norm: float = 1000.0  # refuse an update whose change is larger (L2)
    max_samples: int = 10_000  # the most FedAvg weight one device can claim
    max_global_growth: float = 10.0  # keep the last model if |new| > this * max(|old|, 1)
    max_refusals: int = 3  # refused this many rounds in a row: no longer selected

    def __post_init__(self) -> None:
        self.aggregation_config()  # raises ValueError naming a bad bound or rule
        if isinstance(self.max_refusals, bool) or not isinstance(self.max_refusals, int):
            raise ValueError(f"max_refusals must be an integer, got {self.max_refusals!r}")
        if self.max_refusals < 1:
            raise ValueError(f"max_refusals must be >= 1, got {self.max_refusals!r}")

    def aggregation_config(self) -> AggregationConfig:
        return AggregationConfig(
            rule=self.aggregation,
            trim_fraction=self.trim_fraction,
            clip_norm=self.clip_norm,
            max_update_norm=self.max_update_norm,
            max_samples=self.max_samples,
            max_global_growth=self.max_global_growth,
            server_lr=self.server_lr,
        )

    def settings(self, deadline: float) -> PhaseSettings:
        return PhaseSettings(
            keep_ratio=self.keep_ratio,
            local_epochs=self.local_epochs,
            local_lr=self.local_lr,
            split_lr=self.split_lr,
            deadline=deadline,
            split_epochs=self.split_epochs,
            batch_size=self.batch_size,
            encoding=self.encoding,
            prune=self.prune,
        )


def params_digest(params: Params) -> str:
    """A short fingerprint of weights, logged so that a resumed run can be checked."""
    digest = hashlib.sha256()
    for key in sorted(params):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(params[key]).tobytes())
    return digest.hexdigest()[:16]


def select_devices(online: list[str], cfg: RoundConfig, rng: np.random.Generator) -> list[str]:
    """A random subset of the online devices: a count, or a fraction (at least one)."""
    if cfg.clients_per_round is not None:
        count = cfg.clients_per_round
    else:
        count = math.ceil(cfg.fraction * len(online))
    count = max(1, min(count, len(online)))
    chosen = rng.choice(len(online), size=count, replace=False)
    return sorted(online[i] for i in chosen)


@dataclass
class _RoundState:
    inbox: RoundInbox
    device_metrics: dict[str, dict[str, float]] = field(default_factory=dict)


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
        self._current: _RoundState | None = None
        self._lock = threading.Lock()
        self.on_device_gone = on_device_gone
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
        self._status("starting")  # devices that knew an earlier server instance join again
        self._status("waiting")
        while self.round < self.cfg.rounds and not stop.is_set():
            if len(self._eligible()) < self.cfg.min_devices:
                log.info(
                    "waiting up to %.0fs for %d device(s) to join (%d online, %d excluded)",
                    self.cfg.wait_for_devices_s,
                    self.cfg.min_devices,
                    len(self.registry.online()),
                    len(self.refusals.excluded),
                )
            online = self._wait_for_eligible(stop)
            if stop.is_set():
                break
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
            self._run_round(self.round + 1, online, stop)
        self._status("finished" if self.round >= self.cfg.rounds else "stopped")

    def _eligible(self) -> list[str]:
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
            eligible = self._eligible()
            enough = len(eligible) >= self.cfg.min_devices
            if enough or stop.is_set() or time.monotonic() >= deadline:
                return eligible

    def _run_round(self, number: int, online: list[str], stop: threading.Event) -> None:
        started = time.time()
        selected = select_devices(online, self.cfg, self.rng)
        deadline = started + self.cfg.round_timeout_s  # wall clock: devices compare with theirs
        start_digest = params_digest(self.params)
        inbox_deadline = time.monotonic() + self.cfg.round_timeout_s
        inbox = RoundInbox(
            number, set(selected), self.params, inbox_deadline, self.cfg.max_update_norm
        )
        state = _RoundState(inbox)
        with self._lock:
            self._current = state
        self._status("training", f"round {number}: {len(selected)} devices")
        log.info("round %d: %s selected", number, ", ".join(selected))
        task_bytes = self._send_tasks(number, selected, deadline)
        while not state.inbox.wait(0.5) and time.monotonic() < inbox_deadline:
            if stop.is_set():
                return  # nothing of this round is kept; the checkpoint holds the last one
        state.inbox.close()  # an update still being checked now is refused as late
        with self._lock:
            self._current = None
        self._status("aggregating", f"round {number}")
        accepted = state.inbox.accepted
        figures, model_refused = self._aggregate(number, state)
        refused = state.inbox.refused_for_content()
        for device in self.refusals.record(selected, set(accepted), refused):
            log.warning(
                "%s excluded from selection: its update was refused %d rounds in a row",
                device,
                self.cfg.max_refusals,
            )
        self._status("evaluating", f"round {number}")
        result = self.evaluate(self.params)
        metrics = RoundMetrics(
            round=number,
            accuracy=None if result is None else result[0],
            loss=None if result is None else result[1],
            eval_samples=None if result is None else self.eval_samples,
            seconds=time.time() - started,
            devices={
                d: {
                    **state.device_metrics.get(d, {}),
                    **figures.get(d, {}),
                    "bytes_down_task": float(task_bytes[d]),
                }
                for d in selected
            },
            selected=selected,
            accepted=sorted(accepted),
            rejected=list(state.inbox.rejected),
            params_before=start_digest,
            params_after=params_digest(self.params),
            missing=state.inbox.missing(),
            aggregation=self.cfg.aggregation,
            model_refused=model_refused,
            excluded=sorted(self.refusals.excluded),
        )
        _log_round(metrics)
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

    def _aggregate(
        self, number: int, state: _RoundState
    ) -> tuple[dict[str, dict[str, float]], str]:
        """Apply the round's accepted updates (bounded, clipped, by the chosen rule) unless the
        result is not sane. Returns per-device figures for the metrics and why the new model
        was refused ("" if it was taken)."""
        accepted = state.inbox.accepted
        if not accepted:
            return {}, ""
        metrics = state.device_metrics
        reported = {
            d: metrics[d]["local_samples"]
            for d in accepted
            if "local_samples" in metrics.get(d, {})
        }
        result = aggregate(self.params, accepted, self.cfg.aggregation_config(), reported)
        if result.refused:
            log.warning(
                "round %d: new global model refused, keeping the last good one: %s",
                number,
                result.refused,
            )
        if result.clipped:
            log.info(
                "round %d: clipped to norm %g: %s",
                number,
                self.cfg.clip_norm,
                ", ".join(result.clipped),
            )
        self.params = result.params
        return result.figures(), result.refused

    def _send_tasks(self, number: int, selected: list[str], deadline: float) -> dict[str, int]:
        settings = self.cfg.settings(deadline)
        topics = self.client.config.topics
        sizes = {}
        for device_id in selected:
            task = Task(device_id=device_id, round=number, params=self.params, settings=settings)
            packets = self.client.packets(task)
            sizes[device_id] = sum(len(p) for p in packets)
            self.client.publish_packets(topics.down(device_id, "task"), packets, timeout=None)
        return sizes

    def _status(self, state: str, text: str = "") -> None:
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
            state = self._current
        try:
            if state is None:
                raise UpdateRejected("wrong_round", f"no round is open (update for {msg.round})")
            state.inbox.offer(msg.device_id, msg.round, dict(msg.params), msg.samples)
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
        state.device_metrics[msg.device_id] = {
            "samples": float(msg.samples),
            "bytes_up_update": float(len(encode(msg))),  # as it crossed the wire, unchunked
            **{k: float(v) for k, v in msg.metrics.items()},
            **{k: float(v) for k, v in msg.memory.items()},
        }
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
            state = self._current
        if state is not None and device_id in state.inbox.pending:
            state.inbox.drop(device_id)
            log.info("%s went offline during the round; not waiting for it", device_id)


def _log_round(m: RoundMetrics) -> None:
    """One line per round at INFO; a round without any update is a WARNING that says why."""
    why = "; ".join(f"{device}: {reason}" for device, reason in m.missing)
    acc = "" if m.accuracy is None else f", accuracy {m.accuracy:.4f}"
    if not m.accepted:
        log.warning("round %d: no update accepted, the model is unchanged (%s)", m.round, why)
        return
    log.info(
        "round %d done in %.1fs: %d/%d updates%s%s",
        m.round,
        m.seconds,
        len(m.accepted),
        len(m.selected),
        acc,
        f" (missing {why})" if why else "",
    )
