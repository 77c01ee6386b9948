"""`StepStore` in-process, on a fake clock: it holds each open step's h until its GRAD_Z takes
it, and keeps what a device can make it hold within its bounds: bytes, steps per device, time.
(test_bounds.py floods it; these pin down each promise of its docstring one by one.)"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from sfprompt.cloud_server.step_state import StateFull, StepStore


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def h_of(values: int, fill: float = 0.0) -> np.ndarray:
    return np.full(values, fill, np.float32)  # values * 4 bytes


def test_take_returns_what_was_put_once() -> None:
    """A GRAD_Z takes its step's h; the same step taken again (a resend) finds nothing."""
    store = StepStore()
    h = h_of(8, 1.5)
    store.put(("cam-01", 1, 7), h)
    assert len(store) == 1 and store.nbytes == h.nbytes
    assert store.take(("cam-01", 1, 7)) is h
    assert store.take(("cam-01", 1, 7)) is None
    assert store.take(("cam-01", 2, 7)) is None  # another round's step 7 was never put
    assert len(store) == 0 and store.nbytes == 0


def test_putting_a_step_again_replaces_it() -> None:
    """A SMASHED sent again replaces the held h; its bytes count once."""
    store = StepStore()
    store.put(("cam-01", 1, 1), h_of(8))
    newer = h_of(4, 2.0)
    store.put(("cam-01", 1, 1), newer)
    assert len(store) == 1 and store.nbytes == newer.nbytes
    assert store.take(("cam-01", 1, 1)) is newer


def test_the_byte_bound_refuses_and_keeps_nothing_of_the_refused_step() -> None:
    store = StepStore(max_bytes=100)
    store.put(("cam-01", 1, 1), h_of(20))  # 80 bytes
    with pytest.raises(StateFull, match="split state holds"):
        store.put(("cam-02", 1, 1), h_of(8))  # 32 more would pass 100
    assert len(store) == 1 and store.nbytes == 80
    assert store.take(("cam-02", 1, 1)) is None
    store.put(("cam-02", 1, 1), h_of(5))  # 20 more fit exactly
    assert store.nbytes == 100


def test_a_device_beyond_its_steps_loses_its_oldest_and_no_other_device_loses_any() -> None:
    store = StepStore(max_steps_per_device=2)
    store.put(("cam-01", 1, 1), h_of(1))
    for step in (1, 2, 3):
        store.put(("mallory", 1, step), h_of(1))
    assert len(store) == 3 and store.nbytes == 3 * 4
    assert store.take(("mallory", 1, 1)) is None  # the oldest went
    assert store.take(("mallory", 1, 2)) is not None
    assert store.take(("mallory", 1, 3)) is not None
    assert store.take(("cam-01", 1, 1)) is not None


def test_steps_expire_after_their_time_to_live() -> None:
    clock = Clock()
    store = StepStore(ttl_s=10.0, clock=clock)
    store.put(("cam-01", 1, 1), h_of(4))
    clock.now = 9.9
    assert store.expire() == 0 and len(store) == 1
    clock.now = 10.0  # a deadline reached is passed
    assert store.take(("cam-01", 1, 1)) is None  # take expires first: a stale step is gone
    assert len(store) == 0 and store.nbytes == 0


def test_expiry_frees_the_bytes_for_new_steps() -> None:
    clock = Clock()
    store = StepStore(ttl_s=5.0, max_bytes=16, clock=clock)
    store.put(("cam-01", 1, 1), h_of(4))
    with pytest.raises(StateFull):
        store.put(("cam-02", 1, 1), h_of(4))
    clock.now = 6.0
    store.put(("cam-02", 1, 1), h_of(4))  # put expires first: the old step made room
    assert len(store) == 1 and store.take(("cam-02", 1, 1)) is not None


def test_drop_device_frees_every_step_of_that_device_only() -> None:
    store = StepStore()
    for step in (1, 2, 3):
        store.put(("gone", 1, step), h_of(2))
    store.put(("stays", 1, 1), h_of(2))
    assert store.drop_device("gone") == 3
    assert store.drop_device("gone") == 0
    assert store.drop_device("never-seen") == 0
    assert len(store) == 1 and store.nbytes == 8
    assert store.take(("stays", 1, 1)) is not None


def test_a_dropped_device_may_open_steps_again() -> None:
    store = StepStore(max_steps_per_device=1)
    store.put(("cam-01", 1, 1), h_of(2))
    store.drop_device("cam-01")
    store.put(("cam-01", 1, 2), h_of(2))
    assert store.take(("cam-01", 1, 2)) is not None


def test_at_least_one_step_per_device() -> None:
    with pytest.raises(ValueError, match="max_steps_per_device must be >= 1"):
        StepStore(max_steps_per_device=0)


def test_concurrent_puts_and_takes_keep_the_byte_count_exact() -> None:
    """Handlers of many devices use the store at once: the count of bytes held stays exact."""

    def device(store: StepStore, name: str, barrier: threading.Barrier | None = None) -> None:
        if barrier is not None:
            barrier.wait()
        for step in range(200):
            store.put((name, 1, step), h_of(3))
            if step % 2:
                assert store.take((name, 1, step)) is not None

    alone = StepStore(max_steps_per_device=64)
    device(alone, "dev-0")  # what one device leaves behind, with no one else around
    store = StepStore(max_steps_per_device=64)
    barrier = threading.Barrier(8)
    threads = [threading.Thread(target=device, args=(store, f"dev-{i}", barrier)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store) == 8 * len(alone) and 0 < len(alone) <= 64
    assert store.nbytes == len(store) * 12
