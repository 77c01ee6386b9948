"""Cross-device batching: body requests of different devices that arrive together run as one call.

A device sends a few samples per step, so one device alone gives the body small matrices; the
requests of many devices in flight at once, stacked along the batch, keep the GPU (or the CPU's
matrix units) busy for fewer, larger calls. Forward and backward requests batch separately
(`body_vjp` recomputes the forward from h, so a backward needs no state of its forward and
backwards of different devices stack as freely as forwards).

One worker thread runs every body call. When it is free it gives the devices it has just
answered up to `max_wait_s` to send their next request (a device answered a forward sends its
backward at once), until one kind has `max_batch` samples queued; then it runs the kind with
more samples queued, oldest requests first, backward on a tie. Preferring the fuller kind, and
backward on a tie, is what lets groups of devices that fell out of step (one group's forward
running while the other's waits) merge again into one batch: forwards queue up while a
backward runs. A backward also finishes a device's step, so the server holds its h no longer.
Each request is checked on its own when it is queued, so a malformed one gets its error and
the others still run; the body calls then trust the stack (`body_forward_checked`).

Bounded against floods: a request may hold at most `max_request` samples (refused `too_large`:
one request of thousands of samples would hold the body for a minute), and the queue holds at
most `max_queued_requests` requests and `max_queued_bytes` of tensors, of which one device may
hold `max_queued_per_device` requests; beyond that `BatcherBusy` is raised at once, and the
service answers ERROR `busy`, which the device sends again later.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from sfprompt.protocol.errors import TOO_LARGE, ProtocolError

from .body_model import ServerModel

log = logging.getLogger(__name__)

# done(result, None) with the request's own slice of the output, or done(None, error).
Done = Callable[[np.ndarray | None, Exception | None], None]
FORWARD, BACKWARD = "forward", "backward"


class BatcherBusy(RuntimeError):
    """The queue is full (in all, or this device's share of it): send the request later."""


@dataclass(frozen=True)
class BatchStats:
    """Counters since start; `samples / calls` is the mean batch a body call saw."""

    calls: int = 0  # body calls made
    samples: int = 0  # samples those calls processed
    requests: int = 0  # requests answered with a result
    failed: int = 0  # requests answered with an exception
    forward_calls: int = 0
    backward_calls: int = 0
    largest_batch: int = 0  # samples in the largest call
    busy_s: float = 0.0  # time spent inside body calls


@dataclass(eq=False)  # compared by identity: the queue removes requests by `is`
class _Request:
    kind: str
    h: np.ndarray
    grad_z: np.ndarray | None
    done: Done
    arrived: float  # time.monotonic()
    device_id: str = ""  # whose request: a device's share of the queue is bounded
    error: Exception | None = None  # set when the request does not fit the model

    @property
    def samples(self) -> int:
        return len(self.h) if self.error is None else 0

    @property
    def nbytes(self) -> int:
        """The memory the queued request holds (what a malformed one holds is its problem)."""
        return _nbytes(self.h) + _nbytes(self.grad_z)


class BodyBatcher:
    """Queue body requests from any thread; one worker thread answers them in batches.

    `max_batch` counts samples, not requests. With `max_batch` of one device's batch, or
    `max_wait_s=0`, every request runs on its own. `max_request` (default `max_batch`) is the
    most samples one request may hold.
    """

    def __init__(
        self,
        model: ServerModel,
        max_batch: int = 64,
        max_wait_s: float = 0.005,
        *,
        max_request: int | None = None,
        max_queued_requests: int = 1024,
        max_queued_bytes: int = 1 << 30,
        max_queued_per_device: int = 4,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 sample, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        for name, value in [
            ("max_request", max_request or max_batch),
            ("max_queued_requests", max_queued_requests),
            ("max_queued_bytes", max_queued_bytes),
            ("max_queued_per_device", max_queued_per_device),
        ]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.model = model
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_request = max_request or max_batch
        self.max_queued_requests = max_queued_requests
        self.max_queued_bytes = max_queued_bytes
        self.max_queued_per_device = max_queued_per_device
        self._queue: deque[_Request] = deque()
        self._queued_bytes = 0
        self._per_device: dict[str, int] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._free_since = 0.0  # when the worker last finished answering a batch
        self._stats = BatchStats()

    def start(self) -> BodyBatcher:
        """Start the worker thread (requests queued before now are then answered)."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("this BodyBatcher was stopped; create a new one")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="sfprompt-body-batcher", daemon=True
                )
                self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the body call in progress, stop the worker, and answer every request not yet
        started with a RuntimeError (on this thread), so that no caller waits forever."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._cond:
            left = list(self._queue)
            for request in left:
                self._dequeue(request)
        for request in left:
            self._answer(request, None, RuntimeError("the body batcher stopped first"))

    def __enter__(self) -> BodyBatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def forward(self, h: np.ndarray, done: Done, device_id: str = "") -> None:
        """Queue z_sel = body_forward(h); `done` gets the (B, R', D) result or the error.

        Raises ProtocolError (too_large) for more than `max_request` samples and BatcherBusy
        while the queue is full; `done` is then never called."""
        self._put(_Request(FORWARD, h, None, done, time.monotonic(), device_id))

    def backward(self, h: np.ndarray, grad_z: np.ndarray, done: Done, device_id: str = "") -> None:
        """Queue dL/dh = body_vjp(h, grad_z); `done` gets the (B, T, D) result or the error.
        Raises as `forward` does."""
        self._put(_Request(BACKWARD, h, grad_z, done, time.monotonic(), device_id))

    @property
    def stats(self) -> BatchStats:
        with self._cond:
            return self._stats

    @property
    def pending(self) -> int:
        """Requests queued and not yet taken by the worker."""
        with self._cond:
            return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        """Tensor bytes the queued requests hold."""
        with self._cond:
            return self._queued_bytes

    def _put(self, request: _Request) -> None:
        request.error = self._check(request)
        if request.samples > self.max_request:
            raise ProtocolError(
                TOO_LARGE,
                "h",
                f"at most {self.max_request} samples per request (the server's --max-batch)",
                f"{request.samples} samples",
            )
        with self._cond:
            if self._stopping:
                raise RuntimeError("the body batcher is stopped and takes no more requests")
            self._admit(request)
            self._queue.append(request)
            self._queued_bytes += request.nbytes
            owner = request.device_id
            self._per_device[owner] = self._per_device.get(owner, 0) + 1
            self._cond.notify_all()

    def _admit(self, request: _Request) -> None:
        """Raise BatcherBusy unless the queue has room for `request` (caller holds the lock)."""
        owner = request.device_id
        held = self._per_device.get(owner, 0)
        if owner and held >= self.max_queued_per_device:
            raise BatcherBusy(
                f"body busy: {owner} has {held} requests queued, the most one device may; "
                "send again later"
            )
        if len(self._queue) >= self.max_queued_requests:
            raise BatcherBusy(
                f"body busy: {len(self._queue)} requests queued, the most allowed; send again later"
            )
        if self._queued_bytes + request.nbytes > self.max_queued_bytes:
            raise BatcherBusy(
                f"body busy: {self._queued_bytes} bytes queued, {request.nbytes} more would pass "
                f"the {self.max_queued_bytes} bytes allowed; send again later"
            )

    def _dequeue(self, request: _Request) -> None:
        """Take `request` off the queue and its counts (caller holds the lock)."""
        self._queue.remove(request)
        self._queued_bytes -= request.nbytes
        owner = request.device_id
        self._per_device[owner] -= 1
        if not self._per_device[owner]:
            del self._per_device[owner]

    # ------------------------------------------------------------------- the worker thread

    def _run(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            if batch[0].error is not None:
                self._count(failed=len(batch))
                for request in batch:
                    self._answer(request, None, request.error)
            else:
                self._execute(batch)
            with self._cond:
                self._free_since = time.monotonic()

    def _check(self, request: _Request) -> Exception | None:
        try:
            if request.kind == FORWARD:
                self.model.check_h(request.h)
            else:
                self.model.check_grad_z(request.h, request.grad_z)
        except Exception as exc:  # ValueError from the checks; whatever else odd input raises
            return exc
        return None

    def _collect(self) -> list[_Request] | None:
        """The next requests to answer: malformed ones, or one batch of one kind; None once
        stopping."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                bad = [r for r in self._queue if r.error is not None]
                if bad:
                    for request in bad:
                        self._dequeue(request)
                    return bad
                if not self._queue:
                    self._cond.wait()
                    continue
                if self.max_wait_s == 0:
                    first = self._queue[0]
                    self._dequeue(first)
                    return [first]
                queued = {FORWARD: 0, BACKWARD: 0}
                for request in self._queue:
                    queued[request.kind] += request.samples
                fill = {k: min(n, self.max_batch) for k, n in queued.items()}
                start = max(self._queue[0].arrived, self._free_since)
                remaining = start + self.max_wait_s - time.monotonic()
                if max(fill.values()) >= self.max_batch or remaining <= 0:
                    break
                self._cond.wait(remaining)
            kind = max((BACKWARD, FORWARD), key=lambda k: fill[k])  # backward wins a tie
            batch: list[_Request] = []
            samples = 0
            for request in [r for r in self._queue if r.kind == kind]:
                if batch and samples + request.samples > self.max_batch:
                    break
                batch.append(request)
                samples += request.samples
            for request in batch:
                self._dequeue(request)
            return batch

    def _execute(self, batch: list[_Request]) -> None:
        kind = batch[0].kind
        h = batch[0].h if len(batch) == 1 else np.concatenate([r.h for r in batch])
        started = time.perf_counter()
        try:
            if kind == FORWARD:  # every request was checked as it was queued (`_check`)
                out = self.model.body_forward_checked(h)
            else:
                grads = [r.grad_z for r in batch if r.grad_z is not None]
                grad_z = grads[0] if len(grads) == 1 else np.concatenate(grads)
                out = self.model.body_vjp_checked(h, grad_z)
        except Exception as exc:  # e.g. out of GPU memory: every request of the call learns it
            log.warning("body %s of %d samples failed: %s", kind, len(h), exc)
            self._count(failed=len(batch))
            for request in batch:
                self._answer(request, None, exc)
            return
        busy = time.perf_counter() - started
        self._count(kind=kind, samples=len(h), requests=len(batch), busy_s=busy)
        offsets = np.cumsum([len(r.h) for r in batch])[:-1]
        for request, part in zip(batch, np.split(out, offsets)):
            self._answer(request, part, None)

    def _count(
        self,
        kind: str | None = None,
        samples: int = 0,
        requests: int = 0,
        failed: int = 0,
        busy_s: float = 0.0,
    ) -> None:
        with self._cond:
            s = self._stats
            calls = 1 if kind is not None else 0
            self._stats = replace(
                s,
                calls=s.calls + calls,
                samples=s.samples + samples,
                requests=s.requests + requests,
                failed=s.failed + failed,
                forward_calls=s.forward_calls + (kind == FORWARD),
                backward_calls=s.backward_calls + (kind == BACKWARD),
                largest_batch=max(s.largest_batch, samples),
                busy_s=s.busy_s + busy_s,
            )

    @staticmethod
    def _answer(request: _Request, result: np.ndarray | None, error: Exception | None) -> None:
        try:
            request.done(result, error)
        except Exception:  # a caller's bug must not stop the body for every other device
            log.exception("the callback of a body %s request raised", request.kind)


def _nbytes(array: object) -> int:
    return int(getattr(array, "nbytes", 0) or 0)
