"""Cross-device batching: batched results equal one-at-a-time calls, slice by slice.

Requests queued before `start()` are all waiting when the worker first looks, so how they are
batched is deterministic; the threaded test checks the same under real concurrency.
"""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest

from sfprompt.cloud_server.batcher import BodyBatcher
from sfprompt.cloud_server.body_model import ServerModel


class Results:
    """Collects callbacks by request name, and which thread made each."""

    def __init__(self) -> None:
        self.got: dict[str, tuple[np.ndarray | None, Exception | None]] = {}
        self.threads: set[str] = set()
        self.lock = threading.Lock()
        self.all_in = threading.Event()
        self.expected = 0

    def done(self, name: str):
        def callback(result: np.ndarray | None, error: Exception | None) -> None:
            with self.lock:
                self.got[name] = (result, error)
                self.threads.add(threading.current_thread().name)
                if len(self.got) == self.expected:
                    self.all_in.set()

        return callback

    def wait(self, expected: int, timeout: float = 30.0) -> None:
        with self.lock:
            self.expected = expected
            if len(self.got) == expected:
                self.all_in.set()
        assert self.all_in.wait(timeout), f"only {len(self.got)} of {expected} answered"


def requests(model: ServerModel, sizes: list[int], seed: int = 0):
    rng = np.random.default_rng(seed)
    for size in sizes:
        h = rng.standard_normal(model.h_shape(size)).astype(np.float32)
        grad_z = rng.standard_normal(model.z_shape(size)).astype(np.float32)
        yield h, grad_z


def test_batched_forward_and_backward_equal_single_calls(model: ServerModel) -> None:
    """Five devices' requests of 1..3 samples: one forward call and one backward call, and
    each callback gets exactly its own slice, equal to running its request alone."""
    sizes = [1, 3, 2, 1, 2]
    reqs = list(requests(model, sizes))
    results = Results()
    batcher = BodyBatcher(model, max_batch=64, max_wait_s=0.05)
    for i, (h, grad_z) in enumerate(reqs):
        batcher.forward(h, results.done(f"f{i}"))
        batcher.backward(h, grad_z, results.done(f"b{i}"))  # interleaved kinds
    with batcher.start():
        results.wait(2 * len(sizes))
    stats = batcher.stats
    assert (stats.forward_calls, stats.backward_calls) == (1, 1)
    assert stats.samples == 2 * sum(sizes) and stats.largest_batch == sum(sizes)
    assert stats.requests == 2 * len(sizes) and stats.failed == 0
    assert results.threads == {"sfprompt-body-batcher"}
    for i, (h, grad_z) in enumerate(reqs):
        z, z_err = results.got[f"f{i}"]
        grad_h, g_err = results.got[f"b{i}"]
        assert z_err is None and g_err is None and z is not None and grad_h is not None
        assert z.shape == model.z_shape(sizes[i]) and grad_h.shape == h.shape
        np.testing.assert_allclose(z, model.body_forward(h), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(grad_h, model.body_vjp(h, grad_z), rtol=1e-5, atol=1e-5)


def test_max_batch_limits_a_call_and_one_device_batch_means_one_at_a_time(
    model: ServerModel,
) -> None:
    for max_batch, max_wait_s, calls in [(4, 0.05, 2), (2, 0.05, 4), (64, 0.0, 4)]:
        results = Results()
        batcher = BodyBatcher(model, max_batch=max_batch, max_wait_s=max_wait_s)
        for i, (h, _) in enumerate(requests(model, [2, 2, 2, 2])):
            batcher.forward(h, results.done(str(i)))
        with batcher.start():
            results.wait(4)
        assert batcher.stats.calls == calls, (max_batch, max_wait_s)
        assert batcher.stats.largest_batch == min(max_batch, 8 if max_wait_s else 2)


def test_a_malformed_request_fails_alone(model: ServerModel) -> None:
    """Bad shape, dtype or grad among good requests: each bad one gets its ValueError, the
    good ones are batched and answered, and the worker keeps serving."""
    (h1, g1), (h2, g2) = requests(model, [2, 3])
    results = Results()
    batcher = BodyBatcher(model, max_batch=64, max_wait_s=0.05)
    batcher.forward(h1, results.done("good1"))
    batcher.forward(h1[:, :-1], results.done("short"))
    batcher.forward(h2.astype(np.float64), results.done("f64"))
    batcher.forward(h2, results.done("good2"))
    batcher.backward(h1, g2, results.done("grad_mismatch"))
    batcher.backward(h1, g1, results.done("good3"))
    with batcher.start():
        results.wait(6)
        for name, pattern in [
            ("short", r"h: expected float32"),
            ("f64", "got float64"),
            ("grad_mismatch", r"grad_z: expected float32 \(2, "),
        ]:
            result, error = results.got[name]
            assert result is None and isinstance(error, ValueError), name
            assert re.search(pattern, str(error)), (name, error)
        for name in ("good1", "good2", "good3"):
            assert results.got[name][1] is None and results.got[name][0] is not None
        assert batcher.stats.failed == 3 and batcher.stats.forward_calls == 1
        later = Results()
        batcher.forward(h2, later.done("after"))
        later.wait(1)
        assert later.got["after"][1] is None


def test_a_raising_callback_does_not_stop_the_worker(model: ServerModel) -> None:
    (h, _) = next(requests(model, [1]))

    def bad(result: np.ndarray | None, error: Exception | None) -> None:
        raise RuntimeError("a caller's bug")

    results = Results()
    with BodyBatcher(model, max_wait_s=0.0).start() as batcher:
        batcher.forward(h, bad)
        batcher.forward(h, results.done("next"))
        results.wait(1)
    assert results.got["next"][1] is None


def test_concurrent_devices_get_their_own_results(model: ServerModel) -> None:
    """Eight threads each sending forward then backward, as devices do: every answer equals
    the single call on that device's data, and some calls held several devices."""
    reqs = list(requests(model, [1, 2, 1, 3, 2, 1, 2, 1], seed=3))
    answers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    errors: list[BaseException] = []
    batcher = BodyBatcher(model, max_batch=64, max_wait_s=0.2).start()

    def device(i: int) -> None:
        h, grad_z = reqs[i]
        box: list[np.ndarray] = []
        event = threading.Event()

        def done(result: np.ndarray | None, error: Exception | None) -> None:
            if error is not None or result is None:
                errors.append(error or RuntimeError("no result"))
            else:
                box.append(result)
            event.set()

        for _ in range(2):  # forward, then backward, twice: as a device's steps go
            event.clear()
            batcher.forward(h, done)
            event.wait(30)
            event.clear()
            batcher.backward(h, grad_z, done)
            event.wait(30)
        answers[i] = (box[-2], box[-1])

    threads = [threading.Thread(target=device, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    batcher.stop()
    assert not errors and len(answers) == len(reqs)
    for i, (h, grad_z) in enumerate(reqs):
        z, grad_h = answers[i]
        np.testing.assert_allclose(z, model.body_forward(h), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(grad_h, model.body_vjp(h, grad_z), rtol=1e-5, atol=1e-5)
    assert batcher.stats.requests == 4 * len(reqs)
    assert batcher.stats.largest_batch > 3  # more than any one device's batch


def test_stop_returns_promptly_and_fails_what_is_left(model: ServerModel) -> None:
    """Stopping an idle worker, or one waiting to fill a batch with a long wait, takes well
    under the wait; requests not yet run get a RuntimeError; new ones are refused."""
    batcher = BodyBatcher(model).start()
    started = time.monotonic()
    batcher.stop()
    assert time.monotonic() - started < 1.0

    (h, _) = next(requests(model, [1]))
    results = Results()
    batcher = BodyBatcher(model, max_wait_s=30.0).start()
    batcher.forward(h, results.done("waiting"))
    time.sleep(0.2)  # the worker holds off, waiting for more
    started = time.monotonic()
    batcher.stop()
    assert time.monotonic() - started < 1.0
    results.wait(1)
    assert isinstance(results.got["waiting"][1], RuntimeError)
    with pytest.raises(RuntimeError, match="stopped"):
        batcher.forward(h, results.done("refused"))


def test_bad_settings_are_refused(model: ServerModel) -> None:
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        BodyBatcher(model, max_batch=0)
    with pytest.raises(ValueError, match="max_wait_s must be >= 0"):
        BodyBatcher(model, max_wait_s=-1)
