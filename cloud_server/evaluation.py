"""The whole model [head, body, tail] with given prompt and tail parameters, on a test set.

The server evaluates the global prompt + tail after every round on a fixed subset of a test
set, preprocessed once with the device's own transform (`load_test_set`); `logits` and
`features` serve the simulator's reports. Images go through the model in chunks of
`batch_size`, so a large set never needs one large batch on the device.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .body_model import Params, ServerModel

log = logging.getLogger(__name__)

# Seeds the choice of the evaluated test images: the same ones every round and after a restart,
# so accuracies of one run (and of runs with the same --eval-samples) compare like with like.
EVAL_SEED = 0


@dataclass(frozen=True)
class EvalResult:
    """The whole model [head, body, tail] on a labelled set."""

    accuracy: float  # fraction correct, in [0, 1]
    loss: float  # mean cross-entropy
    samples: int


def evaluate(
    model: ServerModel,
    params: Params,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int = 256,
) -> EvalResult:
    """Accuracy and mean cross-entropy of [head, body, tail] with `params` on a set.

    Raises ValueError for params, images or labels that do not fit the model.
    """
    images = _check_images(model, images)
    labels = _check_labels(labels, len(images), model.manifest.num_classes)
    prompt, tail = model.params_on_device(params)
    loss, correct = 0.0, 0
    for start, chunk in _chunks(model, images, batch_size):
        logits = _logits(model, prompt, tail, chunk)
        y = torch.from_numpy(labels[start : start + len(chunk)].astype(np.int64))
        y = y.to(model.device)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
    return EvalResult(correct / len(images), loss / len(images), len(images))


def logits(
    model: ServerModel, params: Params, images: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """(N, C) float32 logits of the whole model with the given prompt and tail."""
    images = _check_images(model, images)
    prompt, tail = model.params_on_device(params)
    chunks = _chunks(model, images, batch_size)
    return np.concatenate([_logits(model, prompt, tail, c).cpu().numpy() for _, c in chunks])


def features(
    model: ServerModel, params: Params, images: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """(N, R', D) float32: what the tail reads for each image (e.g. for a t-SNE plot).
    Only the prompt of `params` is used."""
    images = _check_images(model, images)
    prompt = model.prompt_on_device(params)
    with torch.no_grad():
        chunks = _chunks(model, images, batch_size)
        return np.concatenate([_tail_input(model, prompt, c).cpu().numpy() for _, c in chunks])


def load_test_set(
    path: Path, model: ServerModel, limit: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """The server-side test set, preprocessed once with the device's own transform.

    A set larger than `limit` is cut to a stratified subset seeded with `EVAL_SEED` (indices in
    file order), never to its first images: test sets are often sorted by class. Labels are
    the bundle's, matched by class name (`align_classes`): a class folder the model does not
    know is refused before the first round.
    """
    from sfprompt.data.classes import align_classes
    from sfprompt.data.datasets import load_image_set
    from sfprompt.data.sampling import stratified_subset
    from sfprompt.data.transforms import EvalTransform

    images = load_image_set(path, split="test")
    images = align_classes(images, model.manifest.classes, log.info)
    indices = np.arange(len(images), dtype=np.int64)
    if limit is not None:
        indices = stratified_subset(images.labels, limit, np.random.default_rng(EVAL_SEED))
    transform = EvalTransform.from_config(model.manifest.preprocess)
    return images.preprocessed(indices, transform), images.labels[indices]


def _tail_input(model: ServerModel, prompt: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return model.run_body(model.split.head(images, prompt))


def _logits(
    model: ServerModel,
    prompt: torch.Tensor,
    tail: dict[str, torch.Tensor],
    images: torch.Tensor,
) -> torch.Tensor:
    with torch.no_grad():
        return model.run_tail(tail, _tail_input(model, prompt, images))


def _check_images(model: ServerModel, images: Any) -> np.ndarray:
    embed = model.split.vit.patch_embed
    want = (embed.proj.in_channels, *embed.img_size)
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[1:] != want or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(
            f"images: expected a float array of shape (N, {', '.join(map(str, want))}), "
            f"got {array.dtype} {array.shape}"
        )
    if len(array) == 0:
        raise ValueError("images: the set is empty")
    return array.astype(np.float32, copy=False)


def _check_labels(labels: Any, count: int, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels: expected integers of shape ({count},), got {labels.dtype} {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )
    return labels


def _chunks(
    model: ServerModel, images: np.ndarray, batch_size: int
) -> Iterator[tuple[int, torch.Tensor]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(images), batch_size):
        yield start, model.tensor(images[start : start + batch_size])
