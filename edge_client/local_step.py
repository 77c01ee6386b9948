"""One local-loss training step of prompt + tail on the device, in numpy.

head -> t (what the tail reads of h) -> tail step -> the head's VJP from dL/dt -> SGD. The
head computes only what t needs where the bundle has graphs for it (export/head_rows.py).
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
        t, tape = runtime.tail_input_taped(images, params[PROMPT_KEY])
    with phase("tail_step"):
        step = runtime.tail_step(params, t, labels, weight)
    with phase("head_vjp"):
        grad_prompt = runtime.tail_input_vjp(tape, step.grad_input)
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
