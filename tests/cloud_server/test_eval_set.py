"""The server's test set: a class-sorted file cut to `limit` keeps every class's share, picks
the same images every time (seed 0), in file order; the count evaluated reaches the metrics."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from sfprompt.cloud_server.evaluation import EVAL_SEED, load_test_set
from sfprompt.cloud_server.metrics import RoundMetrics
from sfprompt.data.sampling import stratified_subset

# mean 0, std 1 at the images' own size: the model input is pixel / 255, so rows can be read back
IDENTITY = SimpleNamespace(
    manifest=SimpleNamespace(
        preprocess={
            "input_size": [3, 8, 8],
            "interpolation": "bicubic",
            "mean": [0.0, 0.0, 0.0],
            "std": [1.0, 1.0, 1.0],
            "crop_pct": 1.0,
        },
        classes=["0", "1", "2"],
    )
)


@pytest.fixture
def sorted_set(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """test.npz with 600 images sorted by class (300, 200, 100 of classes 0, 1, 2); each image
    stores its own row number in two pixels."""
    labels = np.repeat([0, 1, 2], [300, 200, 100])
    images = np.zeros((600, 8, 8), np.uint8)
    rows = np.arange(600)
    images[:, 0, 0], images[:, 0, 1] = rows // 256, rows % 256
    np.savez(tmp_path / "test.npz", images=images, labels=labels)
    return tmp_path / "test.npz", labels


def _rows(x: np.ndarray) -> np.ndarray:
    pixels = np.rint(x[:, 0, 0, :2] * 255).astype(np.int64)  # (N, 2) from (N, 3, H, W)
    return pixels[:, 0] * 256 + pixels[:, 1]


def test_limit_is_a_seeded_stratified_subset_in_file_order(sorted_set) -> None:
    path, labels = sorted_set
    x, y = load_test_set(path, IDENTITY, 60)  # type: ignore[arg-type]
    assert x.shape == (60, 3, 8, 8) and y.shape == (60,)
    assert np.bincount(y).tolist() == [30, 20, 10]  # the first 60 would be all class 0
    rows = _rows(x)
    assert (np.diff(rows) > 0).all()  # sorted, no repeats
    assert np.array_equal(labels[rows], y)  # each label stayed with its image
    expected = stratified_subset(labels, 60, np.random.default_rng(EVAL_SEED))
    assert EVAL_SEED == 0 and np.array_equal(rows, expected)
    x_again, y_again = load_test_set(path, IDENTITY, 60)  # type: ignore[arg-type]
    assert np.array_equal(x, x_again) and np.array_equal(y, y_again)


def test_no_limit_or_a_large_one_evaluates_everything(sorted_set) -> None:
    path, labels = sorted_set
    for limit in (None, 600, 5000):
        x, y = load_test_set(path, IDENTITY, limit)  # type: ignore[arg-type]
        assert np.array_equal(_rows(x), np.arange(600)) and np.array_equal(y, labels)


def test_eval_samples_round_trips_through_the_metrics_record() -> None:
    """The count is a field of the metrics.jsonl line; lines written before it read as None."""
    m = RoundMetrics(round=1, accuracy=0.5, loss=1.0, seconds=2.0, eval_samples=60)
    record = m.to_dict()
    assert record["eval_samples"] == 60 and RoundMetrics.from_dict(record) == m
    del record["eval_samples"]
    assert RoundMetrics.from_dict(record).eval_samples is None
