"""Sample-weighted FedAvg of prompt + tail, the checks an UPDATE must pass, and one round's inbox.

The arithmetic is a pure numpy function (Flower's layout): the round loop only coordinates. An
update is checked completely before it may join the average, because one NaN or one transposed
tensor from one device would otherwise poison the global model of every device. It is checked
once, as it enters the round's inbox (which keeps its norm for the aggregation); the round's
aggregation then runs `weighted_step`, and `fedavg` checks its own input for other callers.
"""

from __future__ import annotations

import math
import numbers
import threading
import time
from collections.abc import Mapping, Sequence
from typing import NoReturn

import numpy as np

Params = dict[str, np.ndarray]  # "prompt.tokens" and "tail...." -> float32 arrays

PARAM_DTYPE = np.dtype(np.float32)

# Reason codes of UpdateRejected; stable strings for logs and metrics.
WRONG_ROUND = "wrong_round"  # the update names another round (usually a stale one)
LATE = "late"  # it arrived after the round's deadline, or after the inbox was closed
DUPLICATE = "duplicate"  # the device already reported this round
NOT_SELECTED = "not_selected"  # the device was not asked to train this round
WRONG_KEYS = "wrong_keys"  # missing or extra parameter names
WRONG_SHAPE = "wrong_shape"
WRONG_DTYPE = "wrong_dtype"  # not a float32 numpy array
NON_FINITE = "non_finite"  # NaN or Inf anywhere
NO_SAMPLES = "no_samples"  # sample count <= 0 (or not an integer): it would get no weight
TOO_LARGE = "too_large"  # the change from the global model is beyond the server's norm bound

REASONS = frozenset(
    {
        WRONG_ROUND,
        LATE,
        DUPLICATE,
        NOT_SELECTED,
        WRONG_KEYS,
        WRONG_SHAPE,
        WRONG_DTYPE,
        NON_FINITE,
        NO_SAMPLES,
        TOO_LARGE,
    }
)
# Refusals for what the update holds, not when or whence it came: repeated, they exclude a device.
CONTENT_REASONS = frozenset(
    {WRONG_KEYS, WRONG_SHAPE, WRONG_DTYPE, NON_FINITE, NO_SAMPLES, TOO_LARGE}
)


class UpdateRejected(ValueError):
    """A device's update cannot join the average; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(
                f"unknown rejection reason {reason!r}; expected one of {sorted(REASONS)}"
            )
        self.reason = reason
        self.detail = message
        super().__init__(f"[{reason}] {message}")


def delta_norm(old: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray]) -> float:
    """L2 norm of new - old over all parameters (the keys of `old`), in float64: 1e30 squared
    does not overflow."""
    return math.sqrt(sum(_squared_change(reference, new[key]) for key, reference in old.items()))


def check_update(
    global_params: Mapping[str, np.ndarray],
    params: Mapping[str, np.ndarray],
    samples: int,
    max_norm: float = math.inf,
) -> float:
    """The update's change |params - global| (L2, all parameters); raise UpdateRejected unless
    `params` matches the global keys, shapes and dtype, is finite everywhere, changes the model
    by at most `max_norm`, and `samples` is a positive integer.

    One pass over the data: a NaN or Inf anywhere makes its key's squared change non-finite
    (float32 values cannot overflow it in float64), so finiteness comes with the norm."""
    if isinstance(samples, bool) or not isinstance(samples, numbers.Integral) or samples <= 0:
        raise UpdateRejected(NO_SAMPLES, f"sample count must be an integer > 0, got {samples!r}")
    missing = sorted(set(global_params) - set(params))
    extra = sorted(set(params) - set(global_params))
    if missing or extra:
        raise UpdateRejected(WRONG_KEYS, f"missing keys {missing}, unexpected keys {extra}")
    total = 0.0
    for key, reference in global_params.items():
        value = params[key]
        _check_array(key, value, reference.shape)
        squared = _squared_change(reference, value)
        if not math.isfinite(squared):
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            raise UpdateRejected(NON_FINITE, f"{key}: {bad} of {value.size} values are NaN or Inf")
        total += squared
    norm = math.sqrt(total)
    if norm > max_norm:
        raise UpdateRejected(
            TOO_LARGE, f"it changes the model by {norm:.4g} (L2), more than the bound {max_norm:g}"
        )
    return norm


def fedavg(
    global_params: Mapping[str, np.ndarray],
    updates: Sequence[tuple[Params, int]],
    server_lr: float = 1.0,
) -> Params:
    """new = old + server_lr * sum_i w_i (client_i - old), with w_i = n_i / sum_j n_j.

    Pure: inputs are never written; every returned array is new. The sum runs in float64 so that
    the result does not depend on the order of the updates beyond float64 rounding. server_lr = 1
    is plain FedAvg (the sample-weighted mean of the clients). Raises ValueError for an empty
    list, a non-float32 global parameter or a server_lr that is not finite and > 0, and
    UpdateRejected (a ValueError) for an update that fails check_update.
    """
    if not updates:
        raise ValueError("fedavg needs at least one update, got none")
    if not (math.isfinite(server_lr) and server_lr > 0):
        raise ValueError(f"server_lr must be finite and > 0, got {server_lr!r}")
    for key, value in global_params.items():
        if not isinstance(value, np.ndarray) or value.dtype != PARAM_DTYPE:
            got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
            raise ValueError(f"global parameter {key}: expected {PARAM_DTYPE}, got {got}")
    for index, (params, samples) in enumerate(updates):
        try:
            check_update(global_params, params, samples)
        except UpdateRejected as error:
            raise UpdateRejected(error.reason, f"update {index}: {error.detail}") from None
    return weighted_step(global_params, updates, server_lr)


def weighted_step(
    global_params: Mapping[str, np.ndarray],
    updates: Sequence[tuple[Params, int]],
    server_lr: float,
) -> Params:
    """`fedavg`'s arithmetic without its checks, for updates that passed `check_update` already
    (the round inbox checks each one as it arrives) and a server_lr that is finite and > 0."""
    assert updates and server_lr > 0
    total = sum(int(samples) for _, samples in updates)  # Python int: no overflow
    weights = [int(samples) / total for _, samples in updates]
    new: Params = {}
    for key, old in global_params.items():
        old64 = old.astype(np.float64)
        step = np.zeros_like(old64)
        for (params, _), weight in zip(updates, weights):
            step += weight * (params[key].astype(np.float64) - old64)
        new[key] = (old64 + server_lr * step).astype(PARAM_DTYPE)
    return new


def _check_array(key: str, value: object, shape: tuple[int, ...]) -> None:
    """A float32 numpy array of `shape`, or UpdateRejected naming what it is instead."""
    if not isinstance(value, np.ndarray):
        raise UpdateRejected(
            WRONG_DTYPE, f"{key}: expected a numpy array, got {type(value).__name__}"
        )
    if value.shape != shape:
        raise UpdateRejected(WRONG_SHAPE, f"{key}: expected shape {shape}, got {value.shape}")
    if value.dtype != PARAM_DTYPE:
        raise UpdateRejected(WRONG_DTYPE, f"{key}: expected {PARAM_DTYPE}, got {value.dtype}")


def _squared_change(reference: np.ndarray, value: np.ndarray) -> float:
    """sum((value - reference)^2) in float64."""
    change = value.astype(np.float64) - reference.astype(np.float64)
    return float(np.sum(np.square(change)))


class RoundInbox:
    """Collects the UPDATEs of one round: a handler thread offers, the round loop waits.

    A device reports once per round: its first offer that names this round and arrives in time
    is final, whether accepted or refused for its content (a device that sent NaNs is not awaited
    any more, and a resend is a duplicate). Offers naming another round, or from devices not
    selected, are refused without counting as a report. `deadline` is on the time.monotonic()
    clock. Accepted parameters are kept by reference; fedavg never writes them. An update whose
    change is larger than `max_update_norm` (L2) is refused as `too_large`.
    """

    def __init__(
        self,
        round: int,
        selected: set[str],
        global_params: Params,
        deadline: float,
        max_update_norm: float = math.inf,
    ) -> None:
        if not selected:
            raise ValueError(f"round {round}: no devices selected, nothing to wait for")
        if not math.isfinite(deadline):
            raise ValueError(f"round {round}: deadline must be finite, got {deadline!r}")
        self.round = round
        self.selected = frozenset(selected)
        self.global_params = global_params
        self.deadline = deadline
        self.max_update_norm = max_update_norm
        self._cond = threading.Condition()
        self._claimed: set[str] = set()  # reported, or being checked right now
        self._reported: set[str] = set()  # accepted or refused for content: final
        self._dropped: dict[str, str] = {}  # device -> why it is no longer waited for
        self._accepted: dict[str, tuple[Params, int]] = {}
        self._norms: dict[str, float] = {}  # of each accepted update's change, for aggregation
        self._rejected: list[tuple[str, str]] = []
        self._closed = False

    def offer(
        self, device_id: str, round: int, params: Params, samples: int, now: float | None = None
    ) -> None:
        """Accept one device's update or raise UpdateRejected (also recorded in `rejected`)."""
        arrived = time.monotonic() if now is None else now
        with self._cond:
            if round != self.round:
                self._refuse(
                    device_id, WRONG_ROUND, f"inbox is for round {self.round}, got {round}"
                )
            if device_id not in self.selected:
                self._refuse(
                    device_id, NOT_SELECTED, f"{device_id!r} was not selected in round {round}"
                )
            if device_id in self._claimed:
                self._refuse(
                    device_id, DUPLICATE, f"{device_id!r} already reported in round {round}"
                )
            if self._closed or arrived > self.deadline:
                late = "inbox closed" if self._closed else f"{arrived - self.deadline:.3f} s late"
                self._refuse(device_id, LATE, f"{device_id!r} in round {round}: {late}")
            self._claimed.add(device_id)  # a concurrent resend is a duplicate
        try:
            # outside the lock: can be slow
            norm = check_update(self.global_params, params, samples, self.max_update_norm)
        except UpdateRejected as error:
            with self._cond:
                self._rejected.append((device_id, error.reason))
                self._reported.add(device_id)
                self._cond.notify_all()
            raise UpdateRejected(error.reason, f"{device_id!r}: {error.detail}") from None
        with self._cond:
            if self._closed:  # the round was aggregated while this update was being checked
                self._reported.add(device_id)
                self._refuse(device_id, LATE, f"{device_id!r} in round {round}: inbox closed")
            self._accepted[device_id] = (params, int(samples))
            self._norms[device_id] = norm
            self._reported.add(device_id)
            self._cond.notify_all()

    def drop(self, device_id: str, why: str = "went offline") -> None:
        """Stop waiting for a device (it went offline, or said it cannot do this round); an
        update already accepted stays. `why` is what the round's metrics say of it."""
        with self._cond:
            self._dropped.setdefault(device_id, why)
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every device still expected has reported (True) or until the deadline or
        `timeout` passes (False)."""
        end = self.deadline if timeout is None else min(self.deadline, time.monotonic() + timeout)
        with self._cond:
            while not self._complete():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self) -> None:
        """Refuse every later offer as late: call before aggregating `accepted`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def pending(self) -> set[str]:
        """Selected devices still expected: not reported and not dropped."""
        with self._cond:
            return set(self.selected - self._reported - self._dropped.keys())

    @property
    def accepted(self) -> dict[str, tuple[Params, int]]:
        with self._cond:
            return dict(self._accepted)

    @property
    def norms(self) -> dict[str, float]:
        """|params - global| (L2) of each accepted update, as `check_update` measured it."""
        with self._cond:
            return dict(self._norms)

    @property
    def rejected(self) -> list[tuple[str, str]]:
        """(device, reason) for every refused offer, in arrival order."""
        with self._cond:
            return list(self._rejected)

    def refused_for_content(self) -> set[str]:
        """Selected devices whose one report this round was refused for what it held."""
        with self._cond:
            return {
                device
                for device, reason in self._rejected
                if reason in CONTENT_REASONS
                and device in self._reported
                and device not in self._accepted
            }

    def missing(self) -> list[tuple[str, str]]:
        """(device, why) for every selected device whose update was not accepted."""
        with self._cond:
            refused = dict(self._rejected)
            out = []
            for device_id in sorted(self.selected - set(self._accepted)):
                if device_id in refused and device_id in self._reported:
                    why = f"update rejected: {refused[device_id]}"
                elif device_id in self._dropped:
                    why = self._dropped[device_id]
                else:
                    why = "no update before the round's deadline"
                out.append((device_id, why))
            return out

    def _complete(self) -> bool:
        return self.selected - self._dropped.keys() <= self._reported

    def _refuse(self, device_id: str, reason: str, message: str) -> NoReturn:
        self._rejected.append((device_id, reason))
        raise UpdateRejected(reason, message)
