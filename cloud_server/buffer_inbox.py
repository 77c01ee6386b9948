"""The buffered mode's inbox: the TASKs in flight, the global models they carried, and the
updates waiting to be aggregated.

A synchronous round has an inbox of its own (`fedavg.RoundInbox`); buffered rounds share one for
the whole run. Each device has at most one TASK in flight, at the global version current when it
left. Its UPDATE is checked once, against that version's model (`check_update`, as in a round),
and if accepted waits in the buffer until the loop (`buffered_loop.py`) takes it. Handlers
on the client's dispatcher thread offer updates and end the tasks of devices gone offline; the
loop starts tasks, expires them at their deadline, takes the buffer and publishes each new
global version (`advance`). Versions count aggregations, like rounds.

Bounds: the loop takes the whole buffer once it holds K updates, and a device has one task at a
time, so the buffer holds fewer than K updates plus the few each device in flight sends while a
round is aggregated and evaluated. Global models are
kept only for the versions a task or a buffered update still needs, and only `max_staleness` + 1
of them (anything older is refused as late). What one round's metrics record of refusals and
misses, and the ended tasks remembered to answer resends, are capped (`MAX_RECORDED`,
`MAX_ENDED`).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import NoReturn

from .buffered import StaleUpdate
from .fedavg import (
    CONTENT_REASONS,
    DUPLICATE,
    LATE,
    NOT_SELECTED,
    WRONG_ROUND,
    Params,
    UpdateRejected,
    check_update,
)

MAX_RECORDED = 1_000  # refusals and misses kept per round for its metrics
MAX_ENDED = 10_000  # ended tasks remembered, to answer a resend or a late update by name

ACCEPTED = "accepted"
REFUSED = "refused"  # for its content (CONTENT_REASONS): counts towards exclusion


@dataclass
class TaskInFlight:
    version: int  # the global version its TASK carried
    deadline: float  # time.monotonic()
    task_bytes: int
    checking: bool = False  # its update is being checked right now


@dataclass
class BufferedUpdate:
    device_id: str
    version: int  # the global version it trained from
    params: Params
    samples: int
    figures: dict[str, float]  # what the UPDATE reported, and its TASK's bytes


@dataclass
class Window:
    """What happened since the last aggregation, for the next round's metrics."""

    rejected: deque[tuple[str, str]] = field(default_factory=lambda: deque(maxlen=MAX_RECORDED))
    missing: deque[tuple[str, str]] = field(default_factory=lambda: deque(maxlen=MAX_RECORDED))


@dataclass
class Batch:
    """The updates of one aggregation, keyed `dev` (`dev#2`, ... for a device's later updates in
    the same batch), with their figures, and the window they close."""

    version: int  # the global version they are applied to
    updates: dict[str, StaleUpdate]
    figures: dict[str, dict[str, float]]
    window: Window


class BufferInbox:
    """Tasks in flight and accepted updates of the buffered mode; thread-safe."""

    def __init__(
        self,
        version: int,
        params: Params,
        max_staleness: int,
        max_update_norm: float = math.inf,
    ) -> None:
        self.max_staleness = max_staleness
        self.max_update_norm = max_update_norm
        self._cond = threading.Condition()
        self._version = version
        self._versions: dict[int, Params] = {version: params}
        self._tasks: dict[str, TaskInFlight] = {}
        self._ended: OrderedDict[str, tuple[int, str]] = OrderedDict()  # -> (version, reason)
        self._buffer: list[BufferedUpdate] = []
        self._window = Window()
        self._outcomes: list[tuple[str, str]] = []  # (device, ACCEPTED or REFUSED) not yet read
        self._task_ended = False

    # ---- the loop's side ---------------------------------------------------------------------
    def model(self) -> tuple[int, Params]:
        """The current global version and its parameters."""
        with self._cond:
            return self._version, self._versions[self._version]

    def in_flight(self) -> set[str]:
        with self._cond:
            return set(self._tasks)

    def buffered(self) -> int:
        with self._cond:
            return len(self._buffer)

    def held_versions(self) -> list[int]:
        """The global versions whose models are kept (at most `max_staleness` + 1)."""
        with self._cond:
            return sorted(self._versions)

    def start(self, device_id: str, version: int, deadline: float, task_bytes: int) -> None:
        """Record a TASK at `version` (the current one) before it is sent."""
        with self._cond:
            assert device_id not in self._tasks and version == self._version
            self._tasks[device_id] = TaskInFlight(version, deadline, task_bytes)
            self._ended.pop(device_id, None)

    def expire(self, now: float | None = None) -> list[str]:
        """End the tasks past their deadline (`time.monotonic()`); returns their devices."""
        now = time.monotonic() if now is None else now
        with self._cond:
            late = [d for d, t in self._tasks.items() if now > t.deadline and not t.checking]
            for device_id in late:
                self._end(device_id, LATE, "no update before its task's deadline")
            return late

    def wait(self, k: int, timeout: float) -> bool:
        """Block until `k` updates are buffered or a task has ended since the last call (a
        device is free for another), or `timeout` passes (False)."""
        end = time.monotonic() + timeout
        with self._cond:
            while len(self._buffer) < k and not self._task_ended:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            self._task_ended = False
            return True

    def outcomes(self) -> list[tuple[str, str]]:
        """(device, ACCEPTED or REFUSED) of the updates checked since the last call, in order."""
        with self._cond:
            out, self._outcomes = self._outcomes, []
            return out

    def take(self) -> Batch:
        """Every buffered update, each with the model it trained from and its staleness, and
        the window since the last take, which starts anew."""
        with self._cond:
            taken, self._buffer = self._buffer, []
            window, self._window = self._window, Window()
            batch = Batch(self._version, {}, {}, window)
            seen: dict[str, int] = {}
            for entry in taken:
                seen[entry.device_id] = seen.get(entry.device_id, 0) + 1
                n = seen[entry.device_id]
                key = entry.device_id if n == 1 else f"{entry.device_id}#{n}"
                batch.updates[key] = StaleUpdate(
                    entry.params,
                    entry.samples,
                    self._versions[entry.version],
                    self._version - entry.version,
                )
                batch.figures[key] = entry.figures
            return batch

    def advance(self, version: int, params: Params) -> None:
        """Make `params` the current global model, at `version`; end the tasks and drop the
        buffered updates whose model is now more than `max_staleness` versions old, and forget
        the models nothing needs any more."""
        with self._cond:
            assert version > self._version
            self._version = version
            self._versions[version] = params
            oldest = version - self.max_staleness
            why = f"its model became more than {self.max_staleness} rounds old"
            for device_id in [d for d, t in self._tasks.items() if t.version < oldest]:
                self._end(device_id, LATE, why)
            for entry in [e for e in self._buffer if e.version < oldest]:
                self._record(entry.device_id, LATE, f"buffered update dropped: {why}")
            self._buffer = [e for e in self._buffer if e.version >= oldest]
            needed = {version} | {t.version for t in self._tasks.values()}
            needed |= {e.version for e in self._buffer}
            for old in [v for v in self._versions if v not in needed]:
                del self._versions[old]

    # ---- the handlers' side (dispatcher thread) ----------------------------------------------
    def offer(
        self,
        device_id: str,
        version: int,
        params: Params,
        samples: int,
        figures: dict[str, float],
        now: float | None = None,
    ) -> None:
        """Buffer one device's update of its task at `version`, or raise UpdateRejected (also
        recorded for the metrics). Once its update is checked, accepted or refused, or came
        late, a task has ended and its device is free; other refusals leave it in flight."""
        arrived = time.monotonic() if now is None else now
        with self._cond:
            task = self._tasks.get(device_id)
            if task is None:
                self._refuse_unasked(device_id, version)
            if version != task.version:
                self._refuse(
                    device_id,
                    WRONG_ROUND,
                    f"{device_id!r}'s task is of version {task.version}, got {version}",
                )
            if task.checking:
                self._refuse(device_id, DUPLICATE, f"{device_id!r} already sent its update")
            if arrived > task.deadline:
                self._end(device_id, LATE, "no update before its task's deadline")
                self._refuse(
                    device_id, LATE, f"{device_id!r}: {arrived - task.deadline:.3f} s late"
                )
            task.checking = True
            base = self._versions[task.version]
        try:  # outside the lock: can be slow
            check_update(base, params, samples, self.max_update_norm)
        except UpdateRejected as error:
            with self._cond:
                if error.reason in CONTENT_REASONS:  # all check_update raises, in fact
                    self._outcomes.append((device_id, REFUSED))
                if self._tasks.get(device_id) is task:
                    self._end(device_id, DUPLICATE, f"update rejected: {error.reason}")
                self._window.rejected.append((device_id, error.reason))
            raise UpdateRejected(error.reason, f"{device_id!r}: {error.detail}") from None
        with self._cond:
            if self._tasks.get(device_id) is not task:  # ended while it was checked
                self._refuse(device_id, LATE, f"{device_id!r}: its task ended while checked")
            self._end(device_id, DUPLICATE, "")
            self._buffer.append(
                BufferedUpdate(
                    device_id,
                    task.version,
                    params,
                    int(samples),
                    {**figures, "bytes_down_task": float(task.task_bytes)},
                )
            )
            self._outcomes.append((device_id, ACCEPTED))
            self._cond.notify_all()

    def end(self, device_id: str, why: str) -> bool:
        """Stop waiting for a device's task (it went offline); False if none was in flight."""
        with self._cond:
            task = self._tasks.get(device_id)
            if task is None or task.checking:
                return False
            self._end(device_id, LATE, why)
            return True

    # ---- under the lock ----------------------------------------------------------------------
    def _end(self, device_id: str, resend: str, why: str) -> None:
        """The task is over; a later update for it is refused as `resend`. `why` it brought no
        update, for the metrics ("" if it did)."""
        task = self._tasks.pop(device_id)
        self._ended[device_id] = (task.version, resend)
        self._ended.move_to_end(device_id)
        while len(self._ended) > MAX_ENDED:
            self._ended.popitem(last=False)
        if why:
            self._window.missing.append((device_id, why))
        self._task_ended = True
        self._cond.notify_all()

    def _record(self, device_id: str, reason: str, why: str) -> None:
        self._window.rejected.append((device_id, reason))
        self._window.missing.append((device_id, why))

    def _refuse_unasked(self, device_id: str, version: int) -> NoReturn:
        """Refuse an update without a task in flight: late or a resend if its task ended."""
        ended = self._ended.get(device_id)
        if ended is not None and ended[0] == version:
            what = "was sent already" if ended[1] == DUPLICATE else "is not awaited any more"
            self._refuse(
                device_id, ended[1], f"{device_id!r}: the update of version {version} {what}"
            )
        self._refuse(device_id, NOT_SELECTED, f"{device_id!r} has no task of version {version}")

    def _refuse(self, device_id: str, reason: str, message: str) -> NoReturn:
        self._window.rejected.append((device_id, reason))
        raise UpdateRejected(reason, message)
