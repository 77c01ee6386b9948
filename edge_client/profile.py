"""`sfprompt-edge profile`: run the device's steps on synthetic input and measure them.

One training step of each phase, repeated: head forward, tail step (with the local loss's
select and scatter), head VJP, and an SGD update of prompt + tail. The figures tell a user
whether a device can hold a bundle at a batch size before it joins a federation. Either
runtime can be profiled; with a memory budget the head's micro-batch is chosen first (see
`memory_budget`), so the profile shows the setting the device would train with.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sfprompt.options import internal, opt

from .config import (
    lean_field,
    memory_budget_field,
    micro_batch_field,
    runtime_field,
    threads_field,
)
from .local_step import local_step
from .memory import MemoryProfile, MemoryProfiler
from .memory_budget import MicroBatchChoice, choose_micro_batch
from .runtime import RUNTIMES, open_runtime, synthetic_batch


@dataclass(frozen=True)
class ProfileConfig:
    """Everything `sfprompt-edge profile` takes."""

    bundle: Path = field(
        metadata=opt(
            "The device bundle folder written by `sfprompt-export bundle`.",
            exists=True,
            file_okay=False,
        )
    )
    batch: int = field(default=8, metadata=opt("Batch size to profile."))
    steps: int = field(default=5, metadata=opt("Training steps to run."))
    threads: int | None = threads_field()
    micro_batch: int | None = micro_batch_field()  # ignored when a memory budget chooses it
    lean: bool = lean_field()
    lr: float = field(default=1e-4, metadata=internal())
    out: Path | None = field(
        default=None,
        metadata=opt("Write profile.json and memory_timeline.png here.", file_okay=False),
    )
    runtime: str = runtime_field()
    memory_budget_mb: float | None = memory_budget_field()  # None: use `micro_batch`


@dataclass
class ProfileResult(MemoryProfile):
    """The memory profile, and the runtime and micro-batch it was taken with."""

    runtime: str = "onnx"
    micro_batch: int | None = None
    budget: MicroBatchChoice | None = None  # how the micro-batch was chosen, if it was
    files: list[Path] = field(default_factory=list)  # what `out` received (not in profile.json)

    def to_dict(self) -> dict[str, Any]:
        budget = None if self.budget is None else asdict(self.budget)
        if budget is not None:  # a candidate the OOM killer ended has no peak: null, not inf
            budget["measured"] = {
                k: v if math.isfinite(v) else None for k, v in budget["measured"].items()
            }
        return {
            "runtime": self.runtime,
            "micro_batch": self.micro_batch,
            "budget": budget,
            **super().to_dict(),
        }


def run_profile(cfg: ProfileConfig) -> ProfileResult:
    """Run `cfg.steps` device steps under the memory profiler; write JSON and PNG to `out`.

    Raises ValueError for an unknown runtime, `MemoryBudgetError` when no micro-batch fits
    the budget, `BundleError` for a bad bundle.
    """
    if cfg.runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {cfg.runtime!r}: choose one of {', '.join(RUNTIMES)}")
    micro_batch, choice = cfg.micro_batch, None
    if cfg.memory_budget_mb is not None:
        choice = choose_micro_batch(
            cfg.bundle, cfg.runtime, cfg.batch, cfg.memory_budget_mb, cfg.threads, cfg.lean
        )
        micro_batch = choice.micro_batch
    with MemoryProfiler() as profiler:
        with profiler.phase("load"):
            runtime = open_runtime(cfg.bundle, cfg.runtime, cfg.threads, micro_batch, cfg.lean)
            params = runtime.initial_parameters()
            images, labels = synthetic_batch(runtime, cfg.batch)
            weight = np.ones(cfg.batch, dtype=np.float32)
        for _ in range(cfg.steps):
            local_step(runtime, params, images, labels, weight, cfg.lr, profiler.phase)
    result = ProfileResult(
        phases=profiler.profile.phases,
        timeline=profiler.profile.timeline,
        runtime=cfg.runtime,
        micro_batch=micro_batch,
        budget=choice,
    )
    if cfg.out is not None:
        result.files = write_report(result, Path(cfg.out))
    return result


def write_report(profile: ProfileResult, out: Path) -> list[Path]:
    """profile.json, and a PNG timeline of RSS coloured by phase where matplotlib is installed
    (`sfprompt[plots]`: a headless device need not carry its 35 MB and fonts). Returns the
    files written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(profile.to_dict(), indent=2))
    written = [out / "profile.json"]
    try:
        import matplotlib
    except ImportError:
        return written

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for name in profile.phases:
        points = [(t, rss) for t, rss, phase in profile.timeline if phase == name]
        if points:
            ts, rss = zip(*points)
            ax.scatter(ts, rss, s=4, label=name)
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (MB)")
    if profile.budget is not None:
        ax.axhline(profile.budget.budget_mb, color="red", linestyle="--", label="budget")
    ax.set_title(
        f"device memory by phase, {profile.runtime}, micro-batch {profile.micro_batch or 'all'} "
        f"(peak {profile.peak_rss_mb:.0f} MB)"
    )
    ax.legend(markerscale=3)
    fig.tight_layout()
    fig.savefig(out / "memory_timeline.png", dpi=110)
    plt.close(fig)
    return [*written, out / "memory_timeline.png"]
