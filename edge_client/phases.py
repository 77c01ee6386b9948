"""The two training phases of a device's round, on its local data.

1. self-update: head -> tail on the local loss (the body skipped), scoring every sample by
   EL2N in the same pass, then keeping the hardest fraction gamma;
2. split training on the kept samples: h up, z down, dL/dz up, dL/dh down per batch (per
   micro-batch where the head keeps a tape), one optimizer step per batch.

Both update prompt + tail in place and check `should_stop` between batches, so a newer task,
a passed deadline or SIGTERM ends a round within one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from sfprompt.data.image_set import ImageSet
from sfprompt.data.transforms import EvalTransform
from sfprompt.protocol.bundle import PROMPT_KEY
from sfprompt.protocol.messages import PhaseSettings

from .bundle_runtime import Params
from .local_step import local_gradients
from .optimizer import Sgd
from .pruning import el2n_scores, keep_hardest
from .runtime import DeviceRuntime
from .split_link import SplitLink


class RoundAborted(RuntimeError):
    """The round was given up between two batches (stop requested, deadline passed)."""


@dataclass(frozen=True)
class LocalData:
    images: ImageSet
    transform: EvalTransform

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, C, H, W) float32 images and (B,) int64 labels."""
        x = self.images.preprocessed(indices, self.transform)
        return x, self.images.labels[indices].astype(np.int64)

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class SelfUpdateResult:
    kept: np.ndarray  # indices of the samples split training will use
    scores: np.ndarray  # EL2N of every local sample (zeros if no scoring was needed)
    loss: float  # mean local loss of the last epoch (nan without a local epoch)


@dataclass(frozen=True)
class SplitResult:
    loss: float  # mean split-training loss
    steps: int
    samples: int  # samples trained (kept samples x split epochs)


def batches(indices: np.ndarray, size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """`indices` shuffled and cut into batches of `size` (the last one may be smaller)."""
    order = rng.permutation(indices)
    for start in range(0, len(order), size):
        yield order[start : start + size]


def self_update(
    runtime: DeviceRuntime,
    params: Params,
    data: LocalData,
    settings: PhaseSettings,
    optimizer: Sgd,
    rng: np.random.Generator,
    should_stop: Callable[[], bool] = lambda: False,
) -> SelfUpdateResult:
    """Phase 1: `local_epochs` of local-loss training, then EL2N pruning to `keep_ratio`.

    The scores come from the last epoch's forward passes (the logits before each batch's
    update), so pruning costs no extra pass; with no local epoch but pruning on, one
    forward-only pass scores the data.
    """
    everything = np.arange(len(data))
    scores = np.zeros(len(data))
    losses: list[float] = []
    for _ in range(settings.local_epochs):
        losses = []
        for idx in batches(everything, settings.batch_size, rng):
            _check(should_stop)
            x, y = data.batch(idx)
            step, grads = local_gradients(runtime, params, x, y, np.ones(len(idx), np.float32))
            optimizer.step(params, grads)
            scores[idx] = el2n_scores(step.logits, y)
            losses.append(step.loss)
    if settings.keep_ratio >= 1.0:
        kept = everything
    else:
        if settings.local_epochs == 0:
            scores = score_el2n(runtime, params, data, settings.batch_size, should_stop)
        by_class = data.images.labels if settings.prune == "class" else None
        kept = keep_hardest(scores, settings.keep_ratio, by_class)
    return SelfUpdateResult(kept, scores, float(np.mean(losses)) if losses else float("nan"))


def score_el2n(
    runtime: DeviceRuntime,
    params: Params,
    data: LocalData,
    batch_size: int,
    should_stop: Callable[[], bool] = lambda: False,
) -> np.ndarray:
    """EL2N of every local sample under `params`, by head -> tail forward passes."""
    scores = np.zeros(len(data))
    for start in range(0, len(data), batch_size):
        _check(should_stop)
        idx = np.arange(start, min(start + batch_size, len(data)))
        x, y = data.batch(idx)
        t = runtime.tail_input_forward(x, params[PROMPT_KEY])
        logits = runtime.tail_forward(params, t)
        scores[idx] = el2n_scores(logits, y)
    return scores


def split_train(
    runtime: DeviceRuntime,
    params: Params,
    data: LocalData,
    kept: np.ndarray,
    settings: PhaseSettings,
    link: SplitLink,
    optimizer: Sgd,
    rng: np.random.Generator,
    should_stop: Callable[[], bool] = lambda: False,
) -> SplitResult:
    """Phase 2: per batch, head forward -> server body -> tail step -> server VJP -> head VJP,
    then one optimiser step on prompt + tail (the same update as training the whole model)."""
    losses, steps, samples = [], 0, 0
    for _ in range(settings.split_epochs):
        for idx in batches(kept, settings.batch_size, rng):
            _check(should_stop)
            x, y = data.batch(idx)
            loss, grads = split_gradients(runtime, params, x, y, link)
            optimizer.step(params, grads)
            losses.append(loss)
            steps += 1
            samples += len(idx)
    return SplitResult(float(np.mean(losses)) if losses else float("nan"), steps, samples)


class Exchange(Protocol):
    """The server's part of a split step: `SplitLink`, or a stand-in where there is none."""

    def forward(self, h: np.ndarray) -> np.ndarray: ...

    def backward(self, grad_z: np.ndarray) -> np.ndarray: ...


def split_gradients(
    runtime: DeviceRuntime, params: Params, x: np.ndarray, y: np.ndarray, link: Exchange
) -> tuple[float, Params]:
    """The batch-mean loss of one split batch and its gradient for prompt + tail.

    The batch goes to the server in the runtime's `exchange_parts` (per micro-batch when the
    head keeps a tape, so only one part's tape is alive at a time). Every computation of the
    split model is per sample (no batch statistics), so each part's mean-loss gradient,
    weighted by its share of the batch, sums to the whole batch's: the same update."""
    prompt = params[PROMPT_KEY]
    loss, grads = 0.0, dict[str, np.ndarray]()
    for part in runtime.exchange_parts(len(x)):
        share = len(y[part]) / len(y)
        h, tape = runtime.head_forward_taped(x[part], prompt)
        z = link.forward(h)
        step = runtime.tail_step(params, z, y[part], np.ones(len(y[part]), np.float32))
        grad_h = link.backward(step.grad_input)
        grad_prompt = runtime.head_vjp(tape, grad_h)
        del h, tape, z, grad_h  # the next part's tape is not to sit beside this one
        loss += share * step.loss
        for key, grad in {PROMPT_KEY: grad_prompt, **step.grads}.items():
            grads[key] = grads[key] + share * grad if key in grads else share * grad
    return loss, grads


def _check(should_stop: Callable[[], bool]) -> None:
    if should_stop():
        raise RoundAborted("round given up: stop requested, deadline passed or a newer task came")
