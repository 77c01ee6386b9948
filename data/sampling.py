"""Seeded, stratified choices of samples: one implementation for the simulator and the server.

Many test sets are stored sorted by class (scikit-learn's digits cut by class, an ImageFolder
walked folder by folder), so "the first N images" can miss whole classes. Both functions keep
every class's share and draw from a generator the caller seeds, so the same seed picks the same
samples on every machine and every run.
"""

from __future__ import annotations

import numpy as np


def stratified_split(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, picked): `fraction` of every class picked at random (at least one each
    when the class has two or more), both sorted."""
    labels = np.asarray(labels)
    picked: list[np.ndarray] = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n = int(round(fraction * len(members)))
        if len(members) >= 2:
            n = min(max(n, 1), len(members) - 1)
        picked.append(members[:n])
    chosen = np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
    rest = np.setdiff1d(np.arange(len(labels)), chosen)
    return rest.astype(np.int64), chosen.astype(np.int64)


def stratified_subset(labels: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `limit` samples with class proportions kept (all when fewer).

    Each class gets the floor of its share; the samples left over go to the classes that lost
    most to the floor, so the total is exactly `limit`.
    """
    labels = np.asarray(labels)
    if limit >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts * limit / len(labels)).astype(np.int64)
    remainder = counts * limit / len(labels) - quota
    quota[np.argsort(-remainder, kind="stable")[: limit - quota.sum()]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota) if q]
    if not picked:  # limit 0
        return np.zeros(0, np.int64)
    return np.sort(np.concatenate(picked)).astype(np.int64)
