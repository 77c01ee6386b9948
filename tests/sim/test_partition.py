"""Device partitions: disjoint and complete, IID balance, Dirichlet skew, seeds, shard files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sfprompt.data.datasets import load_image_set
from sfprompt.sim.datasets import SimData
from sfprompt.sim.partition import (
    label_histogram,
    partition_dirichlet,
    partition_iid,
    write_shards,
)

LABELS = np.repeat(np.arange(10), 100)  # 10 classes, 100 samples each


def _assert_disjoint_complete(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))
    assert all(p.dtype == np.int64 for p in parts)


def _max_class_share(parts: list[np.ndarray]) -> float:
    hist = label_histogram(LABELS, parts, 10)
    return float((hist.max(axis=1) / hist.sum(axis=1)).mean())


def test_iid_is_disjoint_complete_and_balanced() -> None:
    parts = partition_iid(LABELS[:997], 10, np.random.default_rng(0))
    _assert_disjoint_complete(parts, 997)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dirichlet_is_disjoint_complete_with_min_size(seed: int) -> None:
    parts = partition_dirichlet(LABELS, 10, 0.1, np.random.default_rng(seed), min_size=5)
    _assert_disjoint_complete(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 5


def test_small_alpha_skews_labels_and_iid_does_not() -> None:
    """Mean share of a device's largest class, over 5 seeds (10 classes, 10 devices).

    With Dir(0.1) per class each device gets a Beta(0.1, 0.9) share of every class, so its
    largest class is about 60% of its data; IID gives about 14%; Dir(100) is close to IID.
    """
    skewed = np.mean(
        [
            _max_class_share(partition_dirichlet(LABELS, 10, 0.1, np.random.default_rng(s)))
            for s in range(5)
        ]
    )
    iid = np.mean(
        [_max_class_share(partition_iid(LABELS, 10, np.random.default_rng(s))) for s in range(5)]
    )
    flat = np.mean(
        [
            _max_class_share(partition_dirichlet(LABELS, 10, 100.0, np.random.default_rng(s)))
            for s in range(5)
        ]
    )
    assert skewed > 0.5 and iid < 0.2 and flat < 0.25


def test_same_seed_same_partition() -> None:
    a = partition_dirichlet(LABELS, 7, 0.3, np.random.default_rng(11))
    b = partition_dirichlet(LABELS, 7, 0.3, np.random.default_rng(11))
    c = partition_dirichlet(LABELS, 7, 0.3, np.random.default_rng(12))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert all(
        np.array_equal(x, y)
        for x, y in zip(
            partition_iid(LABELS, 4, np.random.default_rng(5)),
            partition_iid(LABELS, 4, np.random.default_rng(5)),
        )
    )


def test_too_extreme_alpha_is_topped_up_to_the_minimum_and_stays_skewed() -> None:
    """20 samples, 10 devices needing 2 each at alpha 0.01: no draw succeeds, so the best one
    is topped up from the largest devices; impossible minimums are still refused."""
    labels = np.repeat(np.arange(2), 10)
    parts = partition_dirichlet(labels, 10, 0.01, np.random.default_rng(0))
    assert sorted(np.concatenate(parts).tolist()) == list(range(20))
    assert min(len(p) for p in parts) == 2
    with pytest.raises(ValueError, match="impossible"):
        partition_dirichlet(labels, 10, 0.1, np.random.default_rng(0), min_size=3)
    with pytest.raises(ValueError, match="alpha must be positive"):
        partition_dirichlet(LABELS, 10, 0.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="devices"):
        partition_iid(LABELS[:3], 4, np.random.default_rng(0))


def test_label_histogram_counts_by_hand() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    hist = label_histogram(labels, [np.array([0, 3]), np.array([1, 2, 4, 5])], 4)
    assert hist.tolist() == [[1, 0, 1, 0], [0, 2, 2, 0]]


def test_shards_load_back_with_load_image_set(tmp_path: Path) -> None:
    """device{i}.npz and test.npz hold exactly the assigned images, labels and class names."""
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    data = SimData("toy", train, np.arange(30) % 3, test, np.arange(6) % 3, ["a", "b", "c"])
    parts = partition_iid(data.train_labels, 4, rng)
    devices, test_path = write_shards(data, parts, tmp_path / "shards")
    assert [p.name for p in devices] == ["device0.npz", "device1.npz", "device2.npz", "device3.npz"]
    for path, part in zip(devices, parts):
        loaded = load_image_set(path)
        assert loaded.classes == ["a", "b", "c"]
        assert np.array_equal(loaded.labels, data.train_labels[part])
        for j, row in enumerate(part):
            assert np.array_equal(np.asarray(loaded.image(j)), train[row])
    loaded_test = load_image_set(test_path)
    assert np.array_equal(loaded_test.labels, data.test_labels) and len(loaded_test) == 6
    assert not list((tmp_path / "shards").glob("*.tmp"))
    with pytest.raises(ValueError, match="outside"):
        write_shards(data, [np.array([0, 30])], tmp_path / "bad")
