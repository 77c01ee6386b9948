"""What the tail reads of a token sequence, and the way its gradient flows back, in numpy.

The device needs both in its local-loss phase, where the tail reads the head output h
directly (skipping the body): select t from h, and scatter dL/dt back into a dL/dh.
"""

from __future__ import annotations

import numpy as np

from sfprompt.protocol.bundle import (
    ALL_PATCH_TOKENS,
    ALL_TOKENS,
    MEAN_PATCH_TOKENS,
    PREFIX_TOKENS,
    Manifest,
)


def select(h: np.ndarray, manifest: Manifest) -> np.ndarray:
    """(B, T, D) -> the tail input of the manifest's kind."""
    spec = manifest.tail_input
    assert spec is not None, "a device manifest always says what the tail reads"
    skip = manifest.num_prefix_tokens + manifest.prompts
    if spec.kind == PREFIX_TOKENS:
        return h[:, : spec.count]
    if spec.kind == MEAN_PATCH_TOKENS:
        return h[:, skip:].mean(axis=1, keepdims=True)
    if spec.kind == ALL_PATCH_TOKENS:
        return h[:, skip:]
    return h


def scatter_grad(grad_t: np.ndarray, manifest: Manifest) -> np.ndarray:
    """dL/dt -> dL/dh (B, T, D): the transpose of `select`."""
    spec = manifest.tail_input
    assert spec is not None
    if spec.kind == ALL_TOKENS:
        return grad_t
    skip = manifest.num_prefix_tokens + manifest.prompts
    batch, dim = grad_t.shape[0], grad_t.shape[-1]
    grad_h = np.zeros((batch, manifest.tokens, dim), dtype=grad_t.dtype)
    if spec.kind == PREFIX_TOKENS:
        grad_h[:, : spec.count] = grad_t
    elif spec.kind == MEAN_PATCH_TOKENS:
        grad_h[:, skip:] = grad_t / manifest.num_patches
    else:
        grad_h[:, skip:] = grad_t
    return grad_h
