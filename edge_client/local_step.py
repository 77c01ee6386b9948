"""One local-loss training step of prompt + tail on the device, in numpy.

head -> (what the tail reads) -> tail step -> scatter dL/dt into dL/dh -> head VJP -> SGD.
`phase` lets a caller (the profiler) time and measure each part without a copy of the step.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np

from sfprompt.protocol.bundle import PROMPT_KEY

from .onnx_runtime import OnnxDeviceRuntime, Params, TailStepResult
from .tail_input import scatter_grad, select


def _no_phase(name: str) -> AbstractContextManager[object]:
    return nullcontext()


def local_step(
    runtime: OnnxDeviceRuntime,
    params: Params,
    images: np.ndarray,
    labels: np.ndarray,
    weight: np.ndarray,
    lr: float,
    phase: Callable[[str], AbstractContextManager[object]] = _no_phase,
) -> TailStepResult:
    """Update `params` in place by one SGD step on the local loss; returns the tail step."""
    with phase("head_forward"):
        h = runtime.head_forward(images, params[PROMPT_KEY])
    with phase("tail_step"):
        step = runtime.tail_step(params, select(h, runtime.manifest), labels, weight)
    with phase("head_vjp"):
        grad_h = scatter_grad(step.grad_input, runtime.manifest)
        grad_prompt = runtime.head_vjp(images, params[PROMPT_KEY], grad_h)
    with phase("update"):
        params[PROMPT_KEY] -= lr * grad_prompt
        for key, grad in step.grads.items():
            params[key] -= lr * grad
    return step
