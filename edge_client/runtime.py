"""What the device's training code needs from a runtime, and how to open one by name.

Two runtimes run the same four computations of a device bundle: onnxruntime + numpy (the
default: no PyTorch on the device) and the TorchScript twins (for devices that have PyTorch,
e.g. a Jetson). Both take and return numpy arrays, so everything above them is shared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from sfprompt.protocol.bundle import Manifest

from .bundle_runtime import HeadTape, Params, TailStepResult
from .onnx_runtime import OnnxDeviceRuntime

RUNTIMES = ("onnx", "torchscript")


class DeviceRuntime(Protocol):
    manifest: Manifest
    micro_batch: int | None

    @property
    def tail_keys(self) -> list[str]: ...

    def initial_parameters(self) -> Params: ...

    def head_forward(self, image: np.ndarray, prompt: np.ndarray) -> np.ndarray: ...

    def head_forward_taped(
        self, image: np.ndarray, prompt: np.ndarray
    ) -> tuple[np.ndarray, HeadTape]: ...

    def head_vjp(self, tape: HeadTape, grad_h: np.ndarray) -> np.ndarray: ...

    def exchange_parts(self, batch: int) -> list[slice]: ...

    def tail_input_forward(self, image: np.ndarray, prompt: np.ndarray) -> np.ndarray: ...

    def tail_input_taped(
        self, image: np.ndarray, prompt: np.ndarray
    ) -> tuple[np.ndarray, HeadTape]: ...

    def tail_input_vjp(self, tape: HeadTape, grad_t: np.ndarray) -> np.ndarray: ...

    def tail_step(
        self, params: Params, tail_input: np.ndarray, labels: np.ndarray, weight: np.ndarray
    ) -> TailStepResult: ...

    def tail_forward(self, params: Params, tail_input: np.ndarray) -> np.ndarray: ...


def open_runtime(
    bundle: Path | str,
    kind: str = "onnx",
    threads: int | None = None,
    micro_batch: int | None = 4,
    lean: bool = False,
) -> DeviceRuntime:
    """Open a device bundle with the named runtime; raises ValueError for an unknown name.

    `lean` (onnx only): least memory rather than most speed (see `OnnxDeviceRuntime`).
    """
    if kind == "onnx":
        return OnnxDeviceRuntime(bundle, threads, micro_batch, lean)
    if kind == "torchscript":
        from .torchscript_runtime import TorchScriptDeviceRuntime  # imports torch

        return TorchScriptDeviceRuntime(bundle, threads, micro_batch)
    raise ValueError(f"unknown runtime {kind!r}: choose one of {', '.join(RUNTIMES)}")


def synthetic_batch(
    runtime: DeviceRuntime, batch: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Random images and labels of the bundle's input size: what profiling and sizing run on."""
    rng = np.random.default_rng(seed)
    channels, height, width = runtime.manifest.preprocess["input_size"]
    images = rng.standard_normal((batch, channels, height, width), dtype=np.float32)
    labels = rng.integers(0, runtime.manifest.num_classes, batch).astype(np.int64)
    return images, labels
