"""`sfprompt-edge profile`: run the device's steps on synthetic input and measure them.

One training step of each phase, repeated: head forward, tail step (with the local loss's
select and scatter), head VJP, and an SGD update of prompt + tail. The figures tell a user
whether a device can hold a bundle at a batch size before it joins a federation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .local_step import local_step
from .memory import MemoryProfile, MemoryProfiler
from .onnx_runtime import OnnxDeviceRuntime


@dataclass(frozen=True)
class ProfileConfig:
    bundle: Path
    batch: int = 8
    steps: int = 5
    threads: int | None = None
    micro_batch: int | None = 4
    lr: float = 1e-4
    out: Path | None = None


def synthetic_batch(runtime: OnnxDeviceRuntime, batch: int, seed: int = 0):
    """Random images and labels of the bundle's input size."""
    rng = np.random.default_rng(seed)
    channels, height, width = runtime.manifest.preprocess["input_size"]
    images = rng.standard_normal((batch, channels, height, width), dtype=np.float32)
    labels = rng.integers(0, runtime.manifest.num_classes, batch).astype(np.int64)
    return images, labels


def run_profile(cfg: ProfileConfig) -> MemoryProfile:
    """Run `cfg.steps` device steps under the memory profiler; write JSON and PNG to `out`."""
    with MemoryProfiler() as profiler:
        with profiler.phase("load"):
            runtime = OnnxDeviceRuntime(cfg.bundle, cfg.threads, cfg.micro_batch)
            params = runtime.initial_parameters()
            images, labels = synthetic_batch(runtime, cfg.batch)
            weight = np.ones(cfg.batch, dtype=np.float32)
        for _ in range(cfg.steps):
            local_step(runtime, params, images, labels, weight, cfg.lr, profiler.phase)
    if cfg.out is not None:
        write_report(profiler.profile, Path(cfg.out))
    return profiler.profile


def write_report(profile: MemoryProfile, out: Path) -> None:
    """profile.json and a PNG timeline of RSS coloured by phase."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(profile.to_dict(), indent=2))
    import matplotlib

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
    ax.set_title(f"device memory by phase (peak {profile.peak_rss_mb:.0f} MB)")
    ax.legend(markerscale=3)
    fig.tight_layout()
    fig.savefig(out / "memory_timeline.png", dpi=110)
    plt.close(fig)
