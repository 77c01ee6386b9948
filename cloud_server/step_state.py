"""What the server keeps between a device's SMASHED and its GRAD_Z: only the input h.

Keeping h and recomputing the body's forward in the backward pass costs one more forward but
holds a few MB per step instead of every block's activations (bench/bench_body.py prints both),
and lets backward passes of different devices run as one batch. The store is bounded in bytes,
in time and per device: a step is freed when its GRAD_Z is served, when its deadline passes,
when its device goes away, or when the same device opens more than `max_steps_per_device`
steps (its oldest goes: a device runs one step at a time, so only a flood of SMASHED never
followed by GRAD_Z loses anything). A GRAD_Z for a step no longer here is answered with an ERROR.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)
StepKey = tuple[str, int, int]  # (device_id, round, step)


class StateFull(RuntimeError):
    """Holding another step would pass the memory bound; the device should retry later."""


@dataclass
class _Held:
    h: np.ndarray
    expires: float  # the store's clock


class StepStore:
    """Thread-safe map of open split steps to their inputs, with expiry and bounds.

    Steps are kept in the order they were put and all live `ttl_s`, so expiry looks only at the
    front; a device's own steps are indexed too, so no operation scans the whole store."""

    def __init__(
        self,
        ttl_s: float = 600.0,
        max_bytes: int = 4 << 30,
        max_steps_per_device: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_steps_per_device < 1:
            raise ValueError(f"max_steps_per_device must be >= 1, got {max_steps_per_device}")
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.max_steps_per_device = max_steps_per_device
        self._clock = clock
        self._held: OrderedDict[StepKey, _Held] = OrderedDict()  # oldest first = expires first
        self._by_device: dict[str, OrderedDict[StepKey, None]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, key: StepKey, h: np.ndarray) -> None:
        """Hold `h` for `key` (replacing an earlier one, and the device's oldest step beyond
        `max_steps_per_device`); raises StateFull over the byte bound."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            self._drop(key)
            if self._bytes + h.nbytes > self.max_bytes:
                raise StateFull(
                    f"split state holds {self._bytes >> 20} MB of {self.max_bytes >> 20} MB allowed"
                )
            steps = self._by_device.setdefault(key[0], OrderedDict())
            while len(steps) >= self.max_steps_per_device:
                oldest = next(iter(steps))
                log.debug("%s opened more than %d steps: dropped %s", key[0], len(steps), oldest)
                self._drop(oldest)
                steps = self._by_device.setdefault(key[0], OrderedDict())
            self._held[key] = _Held(h, now + self.ttl_s)
            steps[key] = None
            self._bytes += h.nbytes

    def take(self, key: StepKey) -> np.ndarray | None:
        """The input of `key`, removed from the store; None if unknown or expired."""
        with self._lock:
            self._expire(self._clock())
            held = self._drop(key)
            return None if held is None else held.h

    def drop_device(self, device_id: str) -> int:
        """Free every step of a device that went away; returns how many."""
        with self._lock:
            keys = list(self._by_device.get(device_id, ()))
            for key in keys:
                self._drop(key)
            return len(keys)

    def expire(self) -> int:
        with self._lock:
            return self._expire(self._clock())

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def _expire(self, now: float) -> int:
        count = 0
        while self._held:
            key, held = next(iter(self._held.items()))
            if held.expires > now:
                break
            self._drop(key)
            count += 1
        return count

    def _drop(self, key: StepKey) -> _Held | None:
        held = self._held.pop(key, None)
        if held is None:
            return None
        self._bytes -= held.h.nbytes
        steps = self._by_device[key[0]]
        del steps[key]
        if not steps:
            del self._by_device[key[0]]
        return held
