"""What the server keeps between a device's SMASHED and its GRAD_Z: only the input h.

Keeping h and recomputing the body's forward in the backward pass costs one more forward but
holds a few MB per step instead of every block's activations (bench/bench_body.py prints both),
and lets backward passes of different devices run as one batch. The store is bounded in bytes
and in time: a step is freed when its GRAD_Z is served, when its deadline passes, or when its
device goes away; a GRAD_Z for a step no longer here is answered with an ERROR.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

StepKey = tuple[str, int, int]  # (device_id, round, step)


class StateFull(RuntimeError):
    """Holding another step would pass the memory bound; the device should retry later."""


@dataclass
class _Held:
    h: np.ndarray
    expires: float  # time.monotonic()


class StepStore:
    """Thread-safe map of open split steps to their inputs, with expiry and a byte bound."""

    def __init__(self, ttl_s: float = 600.0, max_bytes: int = 4 << 30) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._held: dict[StepKey, _Held] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.peak_bytes = 0

    def put(self, key: StepKey, h: np.ndarray, ttl_s: float | None = None) -> None:
        """Hold `h` for `key` (replacing an earlier one); raises StateFull over the bound."""
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            self._drop(key)
            if self._bytes + h.nbytes > self.max_bytes:
                raise StateFull(
                    f"split state holds {self._bytes >> 20} MB of {self.max_bytes >> 20} MB allowed"
                )
            self._held[key] = _Held(h, now + (self.ttl_s if ttl_s is None else ttl_s))
            self._bytes += h.nbytes
            self.peak_bytes = max(self.peak_bytes, self._bytes)

    def take(self, key: StepKey) -> np.ndarray | None:
        """The input of `key`, removed from the store; None if unknown or expired."""
        with self._lock:
            self._expire(time.monotonic())
            held = self._held.pop(key, None)
            if held is None:
                return None
            self._bytes -= held.h.nbytes
            return held.h

    def drop_device(self, device_id: str) -> int:
        """Free every step of a device that went away; returns how many."""
        with self._lock:
            keys = [k for k in self._held if k[0] == device_id]
            for key in keys:
                self._drop(key)
            return len(keys)

    def expire(self) -> int:
        with self._lock:
            return self._expire(time.monotonic())

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def _expire(self, now: float) -> int:
        old = [k for k, v in self._held.items() if v.expires <= now]
        for key in old:
            self._drop(key)
        return len(old)

    def _drop(self, key: StepKey) -> None:
        held = self._held.pop(key, None)
        if held is not None:
            self._bytes -= held.h.nbytes
