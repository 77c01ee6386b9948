"""One round in progress: the updates devices report, and how they become the next model.

The coordinator opens an `OpenRound` per round. Handlers on the client's dispatcher thread
file each UPDATE into it (`file_update`: the round's inbox checks it, once); the round loop
then aggregates what was accepted (`aggregate_round`) and records the round (`metrics`,
`log_round`). Nothing here touches the transport.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from sfprompt.protocol.messages import Update

from .aggregation import Aggregated, AggregationConfig, aggregate
from .fedavg import RoundInbox
from .metrics import RoundMetrics

log = logging.getLogger(__name__)
Params = dict[str, np.ndarray]
Figures = dict[str, dict[str, float]]  # device -> figure name -> value, for the metrics


@dataclass
class OpenRound:
    """A round between its TASKs and its aggregation."""

    number: int
    selected: list[str]
    inbox: RoundInbox
    started: float  # time.time() when it opened
    params_before: str  # digest of the global model it started from
    task_bytes: dict[str, int] = field(default_factory=dict)  # TASK bytes sent, per device
    device_metrics: Figures = field(default_factory=dict)  # what each accepted UPDATE said

    def file_update(self, msg: Update, payload_bytes: int) -> None:
        """Offer `msg` (`payload_bytes` long on the wire) to the inbox and keep what it
        reports; raises UpdateRejected."""
        self.inbox.offer(msg.device_id, msg.round, dict(msg.params), msg.samples)
        self.device_metrics[msg.device_id] = update_figures(msg, payload_bytes)

    def reported_local_samples(self, devices: list[str]) -> dict[str, float]:
        """The local sample count each of `devices` reported, where it did."""
        return {
            d: self.device_metrics[d]["local_samples"]
            for d in devices
            if "local_samples" in self.device_metrics.get(d, {})
        }

    def metrics(
        self,
        result: tuple[float, float] | None,
        eval_samples: int | None,
        figures: Figures,
        params_after: str,
        aggregation: str,
        model_refused: str,
        excluded: list[str],
    ) -> RoundMetrics:
        """The round's record, once aggregated and evaluated (`result`: accuracy and loss)."""
        return RoundMetrics(
            round=self.number,
            accuracy=None if result is None else result[0],
            loss=None if result is None else result[1],
            eval_samples=None if result is None else eval_samples,
            seconds=time.time() - self.started,
            devices={
                d: {
                    **self.device_metrics.get(d, {}),
                    **figures.get(d, {}),
                    "bytes_down_task": float(self.task_bytes[d]),
                }
                for d in self.selected
            },
            selected=self.selected,
            accepted=sorted(self.inbox.accepted),
            rejected=list(self.inbox.rejected),
            params_before=self.params_before,
            params_after=params_after,
            missing=self.inbox.missing(),
            aggregation=aggregation,
            model_refused=model_refused,
            excluded=excluded,
        )


def update_figures(msg: Update, payload_bytes: int) -> dict[str, float]:
    """What an accepted UPDATE reports, for the metrics: samples, its size on the wire
    (`payload_bytes`, unchunked), and the device's own figures and memory."""
    return {
        "samples": float(msg.samples),
        "bytes_up_update": float(payload_bytes),
        **{k: float(v) for k, v in msg.metrics.items()},
        **{k: float(v) for k, v in msg.memory.items()},
    }


def aggregate_round(
    params: Params, state: OpenRound, cfg: AggregationConfig
) -> tuple[Params, Figures, str]:
    """Apply the round's accepted updates (bounded, clipped, by the chosen rule) to `params`
    unless the result is not sane. Returns the new global model, per-device figures for the
    metrics and why the new model was refused ("" if it was taken)."""
    accepted = state.inbox.accepted
    if not accepted:
        return params, {}, ""
    reported = state.reported_local_samples(list(accepted))
    result = aggregate(params, accepted, cfg, reported, norms=state.inbox.norms)
    log_aggregated(state.number, result, cfg)
    return result.params, result.figures(), result.refused


def log_aggregated(number: int, result: Aggregated, cfg: AggregationConfig) -> None:
    """Say when the new model was refused (a WARNING) and whose changes were clipped."""
    if result.refused:
        log.warning(
            "round %d: new global model refused, keeping the last good one: %s",
            number,
            result.refused,
        )
    if result.clipped:
        log.info(
            "round %d: clipped to norm %g: %s", number, cfg.clip_norm, ", ".join(result.clipped)
        )


def log_round(m: RoundMetrics) -> None:
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
