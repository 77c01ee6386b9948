"""Robust aggregation: bounds on what one device can do to the global model, and robust rules.

Plain FedAvg trusts every device twice: its parameters (one update of 1e30 moves the mean to
~1e30) and its sample count (a device claiming 10^9 samples gets all the weight). Each function
here is pure numpy, like `fedavg` (Flower's layout: the round loop only coordinates):

- `delta_norm`: the L2 norm of an update's change, over all parameters (refused beyond a bound,
  in `check_update`);
- `capped_samples`: the weight a device may claim, capped by the server;
- `clip_update`: scale a change down to a norm (a large honest update still counts, scaled);
- `coordinate_median`, `trimmed_mean`: unweighted rules that a minority of extreme updates
  cannot drag (Flower's FedMedian and FedTrimmedAvg);
- `aggregate`: the whole pipeline for one round; `check_global`: is the new model sane?

Arithmetic runs in float64 and coordinate-wise rules in bounded chunks, so memory stays within
`CHUNK_BYTES` whatever the number of devices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .fedavg import PARAM_DTYPE, Params, delta_norm, weighted_step

FEDAVG = "fedavg"
MEDIAN = "median"
TRIMMED_MEAN = "trimmed-mean"
RULES = (FEDAVG, MEDIAN, TRIMMED_MEAN)

CHUNK_BYTES = 64 << 20  # float64 stack of one chunk of coordinates over all updates


@dataclass(frozen=True)
class AggregationConfig:
    """The bounds and the rule; the defaults and why are in docs/cloud_server.md."""

    rule: str = FEDAVG
    trim_fraction: float = 0.2  # trimmed-mean: drop ceil(f * n) updates at each end
    clip_norm: float | None = None  # scale each change down to this L2 norm; None: no clipping
    max_update_norm: float = 1000.0  # refuse an update whose change is larger (check_update)
    max_samples: int = 10_000  # the most weight one device can claim in FedAvg
    max_global_growth: float = 10.0  # refuse a new model with |new| > this * max(|old|, 1)
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"aggregation must be one of {list(RULES)}, got {self.rule!r}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction!r}")
        if self.clip_norm is not None and not _positive(self.clip_norm):
            raise ValueError(f"clip_norm must be finite and > 0, got {self.clip_norm!r}")
        if not (self.max_update_norm > 0):  # inf is allowed: no bound
            raise ValueError(f"max_update_norm must be > 0, got {self.max_update_norm!r}")
        if isinstance(self.max_samples, bool) or not isinstance(self.max_samples, int):
            raise ValueError(f"max_samples must be an integer, got {self.max_samples!r}")
        if self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples!r}")
        if not (_positive(self.max_global_growth) and self.max_global_growth > 1):
            raise ValueError(
                f"max_global_growth must be finite and > 1, got {self.max_global_growth!r}"
            )
        if not _positive(self.server_lr):
            raise ValueError(f"server_lr must be finite and > 0, got {self.server_lr!r}")


@dataclass
class Aggregated:
    """One round's result and what the bounds did, for the metrics."""

    params: Params  # the new global model, or the old one if `refused`
    refused: str = ""  # why the new global model was refused (check_global); "" if taken
    norms: dict[str, float] = field(default_factory=dict)  # device -> |client - old| (unclipped)
    weights: dict[str, int] = field(default_factory=dict)  # device -> samples after the cap
    clipped: list[str] = field(default_factory=list)  # devices whose change was scaled down

    def figures(self) -> dict[str, dict[str, float]]:
        """Per device: update_norm, weight and clipped (0 or 1), for the round's metrics."""
        return {
            d: {
                "update_norm": self.norms[d],
                "weight": float(self.weights[d]),
                "clipped": float(d in self.clipped),
            }
            for d in self.norms
        }


def params_norm(params: Mapping[str, np.ndarray]) -> float:
    """L2 norm over all parameters, in float64 (1e30 squared does not overflow)."""
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in params.values()))


def capped_samples(samples: int, max_samples: int, reported_local: float | None = None) -> int:
    """The weight a device gets: its claim, at most `max_samples` and at most the local data it
    reported (a device cannot keep more than it holds). The cap is the server's: a liar can
    lie in both fields, so `max_samples` is what bounds it."""
    cap = max_samples
    if reported_local is not None and math.isfinite(reported_local) and reported_local >= 1:
        cap = min(cap, int(reported_local))
    return max(1, min(int(samples), cap))


def clip_update(
    old: Params, params: Params, clip_norm: float, norm: float | None = None
) -> tuple[Params, float]:
    """(old + delta * min(1, clip_norm / |delta|), |delta|): the change scaled down, not refused.
    `norm`: |delta| where it is known already (measured as the update arrived)."""
    norm = delta_norm(old, params) if norm is None else norm
    if norm <= clip_norm:
        return params, norm
    scale = clip_norm / norm
    clipped = {}
    for key, reference in old.items():
        base = reference.astype(np.float64)
        clipped[key] = (base + scale * (params[key].astype(np.float64) - base)).astype(PARAM_DTYPE)
    return clipped, norm


def trim_count(n: int, fraction: float) -> int:
    """Updates dropped at each end: ceil(fraction * n), so that any fraction > 0 trims one as
    soon as n >= 3 (Flower floors it, which trims nothing below 5 devices at 0.2); at most
    (n - 1) // 2, so that at least one update is left."""
    return min(math.ceil(fraction * n - 1e-9), (n - 1) // 2)


def coordinate_median(old: Params, updates: list[Params], server_lr: float = 1.0) -> Params:
    """old + server_lr * (coordinate-wise median of the clients - old); sample counts ignored."""
    return _coordinatewise(old, updates, server_lr, lambda stack: np.median(stack, axis=0))


def trimmed_mean(
    old: Params, updates: list[Params], fraction: float, server_lr: float = 1.0
) -> Params:
    """Per coordinate, drop the trim_count(n, fraction) lowest and highest client values and
    average the rest; sample counts ignored (a count is a claim the rule must not trust)."""
    k = trim_count(len(updates), fraction)

    def rule(stack: np.ndarray) -> np.ndarray:  # (n, chunk)
        ordered = np.sort(stack, axis=0)
        return ordered[k : len(updates) - k].mean(axis=0)

    return _coordinatewise(old, updates, server_lr, rule)


def aggregate(
    old: Params,
    updates: Mapping[str, tuple[Params, int]],
    cfg: AggregationConfig,
    reported_local: Mapping[str, float] | None = None,
    norms: Mapping[str, float] | None = None,
) -> Aggregated:
    """Cap the weights, clip the changes, apply `cfg.rule`, and keep `old` if the result fails
    `check_global`. The updates have passed `check_update` (so they are not checked again), whose
    `norms` are taken where given; raises ValueError if there are none."""
    if not updates:
        raise ValueError("aggregate needs at least one update, got none")
    reported = reported_local or {}
    known = norms or {}
    result = Aggregated(params={})
    kept: list[tuple[Params, int]] = []
    for device in sorted(updates):  # a fixed order: the result does not depend on arrival
        params, samples = updates[device]
        result.weights[device] = capped_samples(samples, cfg.max_samples, reported.get(device))
        norm = known.get(device)
        if cfg.clip_norm is None:
            result.norms[device] = delta_norm(old, params) if norm is None else norm
        else:
            params, result.norms[device] = clip_update(old, params, cfg.clip_norm, norm)
            if result.norms[device] > cfg.clip_norm:
                result.clipped.append(device)
        kept.append((params, result.weights[device]))
    if cfg.rule == FEDAVG:
        new = weighted_step(old, kept, cfg.server_lr)
    elif cfg.rule == MEDIAN:
        new = coordinate_median(old, [p for p, _ in kept], cfg.server_lr)
    else:
        new = trimmed_mean(old, [p for p, _ in kept], cfg.trim_fraction, cfg.server_lr)
    result.refused = check_global(old, new, cfg.max_global_growth)
    result.params = old if result.refused else new
    return result


def check_global(old: Params, new: Params, max_growth: float) -> str:
    """Why the new global model must not replace the old one, or "" if it may: not finite, or
    its norm exploded (more than `max_growth` times the old one's, or 1 if that is smaller)."""
    for key, value in new.items():
        if not np.isfinite(value).all():
            return f"{key} is not finite"
    before, after = params_norm(old), params_norm(new)
    if after > max_growth * max(before, 1.0):
        return f"its norm grew from {before:.4g} to {after:.4g} (limit {max_growth:g}x)"
    return ""


class RefusalTracker:
    """Which devices keep sending updates refused for their content (`CONTENT_REASONS`).

    A device refused `limit` rounds in a row is excluded from selection for good (it is in the
    checkpoint too); an accepted update wipes its strikes. A device that was late or offline is
    not struck: that is the network, not its update. At most `MAX_TRACKED` strike counts are
    kept (the oldest go first); the excluded set grows by at most the devices selected per round.
    """

    MAX_TRACKED = 100_000

    def __init__(
        self,
        limit: int,
        strikes: Mapping[str, int] | None = None,
        excluded: Iterable[str] = (),
    ) -> None:
        if limit < 1:
            raise ValueError(f"the refusal limit must be >= 1, got {limit!r}")
        self.limit = limit
        self.strikes: dict[str, int] = dict(strikes or {})
        self.excluded: set[str] = set(excluded)

    def record(self, selected: Iterable[str], accepted: set[str], refused: set[str]) -> list[str]:
        """Count one round; returns the devices excluded by it."""
        newly = []
        for device in selected:
            if device in accepted:
                self.strikes.pop(device, None)
            elif device in refused:
                self.strikes[device] = self.strikes.pop(device, 0) + 1  # re-inserted: newest
                if self.strikes[device] >= self.limit and device not in self.excluded:
                    self.excluded.add(device)
                    newly.append(device)
        while len(self.strikes) > self.MAX_TRACKED:
            del self.strikes[next(iter(self.strikes))]
        return newly


def _coordinatewise(
    old: Params,
    updates: list[Params],
    server_lr: float,
    rule: Callable[[np.ndarray], np.ndarray],
) -> Params:
    """old + server_lr * (rule over the clients' stacked values - old), chunk by chunk."""
    if not updates:
        raise ValueError("a coordinate-wise rule needs at least one update, got none")
    chunk = max(1, CHUNK_BYTES // (8 * len(updates)))
    new: Params = {}
    for key, reference in old.items():
        flat_old = reference.astype(np.float64).reshape(-1)
        flat_new = np.empty_like(flat_old)
        for start in range(0, flat_old.size, chunk):
            end = min(start + chunk, flat_old.size)
            stack = np.stack([u[key].reshape(-1)[start:end] for u in updates]).astype(np.float64)
            flat_new[start:end] = rule(stack)  # (n, chunk) -> (chunk,)
        step = server_lr * (flat_new - flat_old)
        new[key] = (flat_old + step).reshape(reference.shape).astype(PARAM_DTYPE)
    return new


def _positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0
