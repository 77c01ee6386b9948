"""Sample this process's memory with psutil while the device works, phase by phase.

A background thread reads RSS every few milliseconds (USS, which costs more to read, at each
phase boundary), so short peaks inside onnxruntime calls are seen, not just the state
between calls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import psutil

from sfprompt.units import MIB


@dataclass
class PhaseStats:
    name: str
    peak_rss_mb: float = 0.0
    uss_mb: float = 0.0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    calls: int = 0


@dataclass
class MemoryProfile:
    """Peak memory and time per phase, and the whole timeline (seconds, RSS MB, phase)."""

    phases: dict[str, PhaseStats] = field(default_factory=dict)
    timeline: list[tuple[float, float, str]] = field(default_factory=list)

    @property
    def peak_rss_mb(self) -> float:
        return max((p.peak_rss_mb for p in self.phases.values()), default=0.0)

    def to_dict(self) -> dict:
        return {
            "peak_rss_mb": self.peak_rss_mb,
            "phases": {k: asdict(v) for k, v in self.phases.items()},
            "timeline": self.timeline,
        }


class MemoryProfiler:
    """Use `with profiler.phase("name"):` around work; read `profiler.profile` after."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.profile = MemoryProfile()
        self._process = psutil.Process()
        self._interval = interval_s
        self._phase = "idle"
        self._start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="memory-sampler", daemon=True)

    def __enter__(self) -> MemoryProfiler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _record(self) -> None:
        rss = self._process.memory_info().rss / MIB
        stats = self.profile.phases.get(self._phase)
        if stats is not None:
            stats.peak_rss_mb = max(stats.peak_rss_mb, rss)
        self.profile.timeline.append((time.perf_counter() - self._start, rss, self._phase))

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self._record()

    @contextmanager
    def phase(self, name: str) -> Iterator[PhaseStats]:
        stats = self.profile.phases.setdefault(name, PhaseStats(name))
        previous, self._phase = self._phase, name
        cpu0, t0 = self._process.cpu_times(), time.perf_counter()
        try:
            yield stats
        finally:
            self._record()
            cpu1 = self._process.cpu_times()
            stats.seconds += time.perf_counter() - t0
            stats.cpu_seconds += (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
            stats.calls += 1
            stats.uss_mb = max(stats.uss_mb, self._process.memory_full_info().uss / MIB)
            self._phase = previous
