"""One local-loss training step of prompt + tail on the device, in numpy.

head -> (what the tail reads) -> tail step -> scatter dL/dt into dL/dh -> head VJP -> SGD.
`phase` lets a caller (the profiler) time and measure each part without a copy of the step.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np

from sfprompt.protocol.bundle import PROMPT_KEY

from .bundle_runtime import Params, TailStepResult
from .optimizer import Sgd
from .runtime import DeviceRuntime
from .tail_input import scatter_grad, select

Phase = Callable[[str], AbstractContextManager[object]]


def _no_phase(name: str) -> AbstractContextManager[object]:
    return nullcontext()


def local_gradients(
    runtime: DeviceRuntime,
    params: Params,
    images: np.ndarray,
    labels: np.ndarray,
    weight: np.ndarray,
    phase: Phase = _no_phase,
) -> tuple[TailStepResult, Params]:
    """The tail step (loss, logits before the update) and the gradient of every parameter."""
    with phase("head_forward"):
        h, tape = runtime.head_forward_taped(images, params[PROMPT_KEY])
    with phase("tail_step"):
        step = runtime.tail_step(params, select(h, runtime.manifest), labels, weight)
    with phase("head_vjp"):
        grad_h = scatter_grad(step.grad_input, runtime.manifest)
        grad_prompt = runtime.head_vjp(tape, grad_h)
    return step, {PROMPT_KEY: grad_prompt, **step.grads}


def local_step(
    runtime: DeviceRuntime,
    params: Params,
    images: np.ndarray,
    labels: np.ndarray,
    weight: np.ndarray,
    lr: float | Sgd,
    phase: Phase = _no_phase,
) -> TailStepResult:
    """Update `params` in place by one step on the local loss (plain SGD for a float `lr`)."""
    step, grads = local_gradients(runtime, params, images, labels, weight, phase)
    optimizer = lr if isinstance(lr, Sgd) else Sgd(lr)
    with phase("update"):
        optimizer.step(params, grads)
    return step
