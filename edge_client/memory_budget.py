"""Choose the largest head micro-batch whose training step fits a device's memory budget.

Each candidate is measured in a fresh child process that opens the bundle and runs training
steps of both phases on synthetic input (a local step, and the device's share of a split step,
whose dense dL/dh trains every row of h: where the bundle has the local phase's graphs the split
step is the larger): the parent's own memory (and a torch it may have imported) must not count,
and a peak cannot be undone within one process. The peak is the kernel's high-water mark of
the child's resident set (VmHWM), which, unlike a sampler, misses no short spike and, unlike
`ru_maxrss`, does not inherit the parent's peak across fork + exec.

Peak memory grows with the micro-batch, so the smallest candidate is measured first (if it
does not fit, nothing does) and then the others from the largest down, stopping at the first
that fits: one child for an impossible budget, two for a generous one.

    python -m sfprompt.edge_client.memory_budget BUNDLE RUNTIME BATCH MICRO_BATCH THREADS STEPS

is the child's entry point (THREADS 0: the runtime's default); it prints one JSON line.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sfprompt.processes import child_cwd
from sfprompt.protocol.bundle import Manifest, load_manifest
from sfprompt.units import MIB

from .runtime import RUNTIMES

if TYPE_CHECKING:  # numpy and the runtimes: in the child only (`--help` stays quick)
    import numpy as np

    from .bundle_runtime import Params
    from .optimizer import Sgd
    from .runtime import DeviceRuntime

CANDIDATES = (16, 8, 4, 2, 1)  # tried besides the batch itself, where they are smaller
CHILD_MODULE = "sfprompt.edge_client.memory_budget"


class MemoryBudgetError(ValueError):
    """Not even the smallest micro-batch fits the memory budget."""


@dataclass(frozen=True)
class StepMeasurement:
    """What one child process saw: its peak RSS and the median times of a step of each phase."""

    runtime: str
    batch: int
    micro_batch: int
    peak_rss_mb: float
    opened_rss_mb: float  # right after opening the runtime: libraries imported, no graph yet
    step_s: float  # local step: median over the steps after the first (which opens the graphs)
    first_step_s: float
    split_step_s: float  # the device's share of a split step (no network), median likewise
    torch_loaded: bool


@dataclass(frozen=True)
class MicroBatchChoice:
    micro_batch: int
    peak_rss_mb: float
    budget_mb: float
    measured: dict[int, float]  # micro-batch -> peak RSS MB, for every candidate measured


def candidate_micro_batches(batch: int) -> list[int]:
    """The batch itself, then 16, 8, 4, 2, 1 where smaller: largest first."""
    return sorted({batch, *(c for c in CANDIDATES if c < batch)}, reverse=True)


def measure_step(
    bundle: Path | str,
    runtime_kind: str,
    batch: int,
    micro_batch: int,
    threads: int | None = None,
    steps: int = 2,
    timeout_s: float = 600,
    lean: bool = False,
) -> StepMeasurement:
    """Run `steps` local steps in a fresh process and return its peak RSS and step time.

    Raises `ChildProcessError` when the child fails (its `errno` field holds the exit code,
    negative for a signal, e.g. -9 when the kernel's OOM killer ended it), and
    `subprocess.TimeoutExpired` after `timeout_s`.
    """
    command = [
        sys.executable,
        "-m",
        CHILD_MODULE,
        str(Path(bundle).resolve()),
        runtime_kind,
        str(batch),
        str(micro_batch),
        str(threads or 0),
        str(steps),
        str(int(lean)),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout_s, cwd=child_cwd()
    )
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise ChildProcessError(
            done.returncode,
            f"measuring {runtime_kind} at batch {batch}, micro-batch {micro_batch} failed "
            f"(exit code {done.returncode}): {tail}",
        )
    return StepMeasurement(**json.loads(done.stdout.strip().splitlines()[-1]))


def _killed(exc: ChildProcessError) -> bool:
    return exc.errno == -signal.SIGKILL


def _nothing_fits(
    kind: str, batch: int, budget_mb: float, smallest: int, measured: dict[int, float]
) -> str:
    peak = measured[smallest]
    head = f"no micro-batch fits a {budget_mb:g} MB budget with the {kind} runtime at batch {batch}"
    if not math.isfinite(peak):
        return f"{head}: even micro-batch {smallest} was killed for want of memory"
    return (
        f"{head}: the smallest peak measured was {peak:.0f} MB (micro-batch {smallest}); "
        f"a budget of at least {math.ceil(peak)} MB would fit"
    )


def choose_micro_batch(
    bundle: Path | str,
    runtime_kind: str,
    batch: int,
    budget_mb: float,
    threads: int | None = None,
    lean: bool = False,
) -> MicroBatchChoice:
    """The largest candidate micro-batch whose local step peaks within `budget_mb` of RSS.

    Raises `MemoryBudgetError` naming the smallest peak measured (and so the budget that
    would fit) when none fits, ValueError for a bad argument and `BundleError` for a bad
    bundle, both before any child runs. A child killed by SIGKILL (the OOM killer) counts
    as not fitting.
    """
    if runtime_kind not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime_kind!r}: choose one of {', '.join(RUNTIMES)}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    if not budget_mb > 0:
        raise ValueError(f"the memory budget must be a positive number of MB, got {budget_mb}")
    load_manifest(bundle, role="device")
    candidates = candidate_micro_batches(batch)
    measured: dict[int, float] = {}

    def fits(micro_batch: int) -> bool:
        try:
            peak = measure_step(
                bundle, runtime_kind, batch, micro_batch, threads, lean=lean
            ).peak_rss_mb
        except ChildProcessError as exc:
            if not _killed(exc):
                raise
            peak = math.inf
        measured[micro_batch] = peak
        return peak <= budget_mb

    smallest = candidates[-1]
    if not fits(smallest):
        raise MemoryBudgetError(_nothing_fits(runtime_kind, batch, budget_mb, smallest, measured))
    chosen = next((c for c in candidates[:-1] if fits(c)), smallest)
    return MicroBatchChoice(chosen, measured[chosen], budget_mb, measured)


# --- the child process -------------------------------------------------------------------


def peak_rss_mb() -> float | None:
    """This process's peak resident set (VmHWM) in MB, or None where /proc has none."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / MIB
    except OSError:
        pass
    return None


def _child(
    bundle: str, kind: str, batch: int, micro_batch: int, threads: int, steps: int, lean: int
) -> dict:
    import numpy as np
    import psutil

    from .local_step import local_step
    from .memory import MemoryProfiler
    from .optimizer import Sgd
    from .runtime import open_runtime, synthetic_batch

    # A sampler only where the kernel keeps no high-water mark (not Linux): it costs time.
    sampler = MemoryProfiler(interval_s=0.002) if peak_rss_mb() is None else None
    times, split_times = [], []
    with sampler or contextlib.nullcontext():
        runtime = open_runtime(bundle, kind, threads or None, micro_batch, bool(lean))
        opened_mb = psutil.Process().memory_info().rss / MIB
        params = runtime.initial_parameters()
        images, labels = synthetic_batch(runtime, batch)
        weight = np.ones(batch, dtype=np.float32)
        sgd = Sgd(1e-4)
        for _ in range(steps):
            start = time.perf_counter()
            local_step(runtime, params, images, labels, weight, sgd)
            times.append(time.perf_counter() - start)
            start = time.perf_counter()
            split_share_step(runtime, params, images, labels, sgd)
            split_times.append(time.perf_counter() - start)
    if sampler is None:
        peak = peak_rss_mb()
    else:
        peak = max((rss for _, rss, _ in sampler.profile.timeline), default=0.0)
    return {
        "runtime": kind,
        "batch": batch,
        "micro_batch": micro_batch,
        "peak_rss_mb": peak,
        "opened_rss_mb": opened_mb,
        "step_s": statistics.median(times[1:] or times),
        "first_step_s": times[0],
        "split_step_s": statistics.median(split_times[1:] or split_times),
        "torch_loaded": "torch" in sys.modules,
    }


def split_share_step(
    runtime: DeviceRuntime,
    params: Params,
    images: np.ndarray,
    labels: np.ndarray,
    sgd: Sgd,
) -> None:
    """What a device computes of one split step (`phases.split_gradients` without the
    network): the body's reply stood in by h itself and its dL/dh by a fixed dense array."""
    from .phases import split_gradients

    _, grads = split_gradients(runtime, params, images, labels, StandInBody(runtime.manifest))
    sgd.step(params, grads)


class StandInBody:
    """The server's part of a split step without a server: z is what the tail reads of h (a
    body of no blocks), dL/dh a fixed dense array."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self._shape: tuple[int, ...] = ()

    def forward(self, h: np.ndarray) -> np.ndarray:
        from .tail_input import select

        self._shape = h.shape
        return select(h, self.manifest)

    def backward(self, grad_z: np.ndarray) -> np.ndarray:
        return dense_grad_h(self._shape)


@functools.lru_cache(maxsize=4)
def dense_grad_h(shape: tuple[int, ...]) -> np.ndarray:
    """The stand-in for the server's dL/dh: fixed, dense, small; drawn once per shape (read
    only), as the eager baseline draws it once: drawing it is the server's time, not the
    device's (~9 ms per ViT-Base micro-batch of 2, a tenth of the device's step)."""
    import numpy as np

    grad = np.random.default_rng(7).standard_normal(shape).astype(np.float32) * 1e-3
    grad.flags.writeable = False
    return grad


if __name__ == "__main__":
    bundle_arg, kind_arg, *numbers = sys.argv[1:]
    print(json.dumps(_child(bundle_arg, kind_arg, *map(int, numbers))))
