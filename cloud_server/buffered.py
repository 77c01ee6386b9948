"""The arithmetic of buffered (asynchronous) rounds, FedBuff-style (Nguyen et al. 2022).

In buffered mode devices train from whatever global model was current when their TASK left, and
the server aggregates every K updates. An update that trained from a model `s` aggregations old
(its staleness) moved away from that older model; what it contributes is its change from that
model, discounted by a polynomial of its staleness, as FedBuff does:

    new = old + eta_g * sum_i (n_i / n) * w(s_i) * (client_i - base_i),  w(s) = (1 + s)^-a

where base_i is the global model device i started from. The weights n_i / n are FedAvg's (sample
counts after the server's cap), so with every s_i = 0 this is exactly a synchronous round, and a
stale update shrinks the step instead of being renormalised back to full weight.

Rather than a second FedAvg, each update is re-expressed as the current model plus its
discounted change (`rebase`) and the whole robust pipeline of `aggregation.aggregate` runs on
those: the sample cap, clipping, the rule (FedAvg, median, trimmed mean) and the check of the new
model. Pure numpy, like `fedavg` and `aggregation`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .aggregation import Aggregated, AggregationConfig, aggregate
from .fedavg import PARAM_DTYPE, Params


@dataclass(frozen=True)
class StaleUpdate:
    """One device's update and the global model it trained from."""

    params: Params  # what the device sent
    samples: int  # what it claimed (capped by `aggregate`)
    base: Params  # the global model its TASK carried
    staleness: int  # aggregations done since that TASK left


def staleness_weight(staleness: int, exponent: float) -> float:
    """(1 + s)^-a: 1 for a fresh update, 1/sqrt(3) at s = 2 with FedBuff's a = 0.5; a = 0 counts
    every update fully. Raises ValueError for a negative s or a negative or infinite a."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness!r}")
    if not (math.isfinite(exponent) and exponent >= 0):
        raise ValueError(f"the staleness exponent must be finite and >= 0, got {exponent!r}")
    return float((1.0 + staleness) ** -exponent)


def rebase(current: Params, base: Params, params: Params, weight: float) -> Params:
    """current + weight * (params - base), in float64: the update's change from the model it
    trained from, discounted and carried onto the current model. New arrays, float32."""
    out: Params = {}
    for key, now in current.items():
        change = params[key].astype(np.float64) - base[key].astype(np.float64)
        out[key] = (now.astype(np.float64) + weight * change).astype(PARAM_DTYPE)
    return out


def aggregate_stale(
    current: Params,
    updates: Mapping[str, StaleUpdate],
    cfg: AggregationConfig,
    exponent: float,
    reported_local: Mapping[str, float] | None = None,
) -> tuple[Aggregated, dict[str, float]]:
    """Aggregate buffered updates onto `current`: each one's change from its own base, weighted
    by `staleness_weight`, through `aggregate`'s pipeline (which keeps `current` if the result is
    not sane). Returns the result and each update's staleness weight. Norms, clipping and the
    norm figures are of the discounted change. Raises ValueError if there are no updates."""
    weights = {key: staleness_weight(u.staleness, exponent) for key, u in updates.items()}
    rebased = {
        key: (rebase(current, u.base, u.params, weights[key]), u.samples)
        for key, u in updates.items()
    }
    return aggregate(current, rebased, cfg, reported_local), weights
