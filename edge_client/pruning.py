"""EL2N scores and pruning to the hardest samples (phase 1 of an SFPrompt round).

EL2N (Paul et al., 2021) = || softmax(logits) - onehot(y) ||_2: how far the prediction is from
the label. The device keeps the fraction gamma with the highest scores for split training, so
the samples that cross the network are the ones the model still gets wrong.
"""

from __future__ import annotations

import math

import numpy as np


def el2n_scores(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(B, C) logits, (B,) labels -> (B,) float64 scores."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    probs[np.arange(len(labels)), labels] -= 1.0
    return np.sqrt((probs**2).sum(axis=1))


def keep_hardest(scores: np.ndarray, keep_ratio: float) -> np.ndarray:
    """Indices of the ceil(keep_ratio * n) highest scores (at least one), in ascending order.

    Ties break toward the lower index, so the choice is reproducible.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    count = max(1, math.ceil(keep_ratio * len(scores)))
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:count])
