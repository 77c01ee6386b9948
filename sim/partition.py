"""Split a training set across simulated devices: IID, or non-IID by a Dirichlet over labels.

The non-IID split is the one the paper uses (Dirichlet(alpha = 0.1) over labels, after Hsu et
al. 2019): every class is shared out among the devices in proportions drawn from
Dir(alpha * 1), so a small alpha leaves most devices with one or two classes. Every function
takes the random generator, so the same seed gives every method the same partition.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .datasets import SimData

DIRICHLET_ATTEMPTS = 200  # redraws before a too-extreme alpha is reported


def partition_iid(labels: np.ndarray, clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`clients` disjoint, sorted index arrays covering every sample; sizes differ by at most 1."""
    n = _check(labels, clients)
    return [np.sort(part) for part in np.array_split(rng.permutation(n), clients)]


def partition_dirichlet(
    labels: np.ndarray,
    clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Disjoint, sorted index arrays covering every sample, each class split by Dir(alpha).

    Redraws the whole partition until every device holds at least `min_size` samples; when
    `DIRICHLET_ATTEMPTS` draws all fall short (alpha too small for this many devices and
    samples), the best draw is topped up from the largest device. Raises `ValueError` only when
    `min_size` per device is impossible.
    """
    n = _check(labels, clients)
    if not alpha > 0:
        raise ValueError(f"Dirichlet alpha must be positive, got {alpha}")
    if min_size < 0 or min_size * clients > n:
        raise ValueError(
            f"min_size {min_size} per device is impossible: {clients} devices, {n} samples"
        )
    labels = np.asarray(labels)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    best: list[np.ndarray] = []
    for _ in range(DIRICHLET_ATTEMPTS):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for members in by_class:
            shares = rng.dirichlet(np.full(clients, alpha))  # (clients,) sums to 1
            cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for device, piece in enumerate(np.split(rng.permutation(members), cuts)):
                parts[device].append(piece)
        joined = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(p) for p in joined) >= min_size:
            return joined
        if not best or min(map(len, joined)) > min(map(len, best)):
            best = joined
    return _top_up(best, min_size, rng)


def _top_up(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Give each device short of `min_size` samples drawn from the largest device.

    Many devices over few samples at a small alpha (the clients sweep on a small data set)
    leave some devices nearly empty in every draw; moving a few samples keeps the skew of the
    draw while letting every device train. (The caller checked min_size * clients <= n.)
    """
    parts = [p.copy() for p in parts]
    for device in range(len(parts)):
        while len(parts[device]) < min_size:
            donor = int(np.argmax([len(p) for p in parts]))
            take = rng.integers(len(parts[donor]))
            parts[device] = np.sort(np.append(parts[device], parts[donor][take]))
            parts[donor] = np.delete(parts[donor], take)
    return parts


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(clients, classes) counts of each label on each device."""
    labels = np.asarray(labels)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels span {labels.min()}..{labels.max()}, not 0..{num_classes - 1}")
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts]).astype(np.int64)


def write_shards(
    data: SimData, parts: list[np.ndarray], directory: Path
) -> tuple[list[Path], Path]:
    """Write `device{i}.npz` (that device's training images) and `test.npz` into `directory`.

    Each file holds `images` (N, H, W, 3) uint8, `labels` (N,) int64 and `classes` (strings),
    which `sfprompt.data.datasets.load_image_set` reads without unpickling. Returns the device
    paths (in order) and the test path; raises `ValueError` for indices outside the train set.
    """
    n = len(data.train_labels)
    for i, part in enumerate(parts):
        if len(part) and (np.min(part) < 0 or np.max(part) >= n):
            raise ValueError(f"part {i} holds indices outside the {n} training samples")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    classes = np.array(data.classes, dtype=str)
    devices = []
    for i, part in enumerate(parts):
        idx = np.asarray(part, np.int64)
        path = directory / f"device{i}.npz"
        _save(path, data.train_images[idx], data.train_labels[idx], classes)
        devices.append(path)
    test = directory / "test.npz"
    _save(test, data.test_images, data.test_labels, classes)
    return devices, test


def _save(path: Path, images: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> None:
    """Write through a temporary name, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        np.savez(f, images=images.astype(np.uint8), labels=labels.astype(np.int64), classes=classes)
    tmp.replace(path)


def _check(labels: np.ndarray, clients: int) -> int:
    n = len(labels)
    if clients < 1:
        raise ValueError(f"need at least one device, got clients={clients}")
    if clients > n:
        raise ValueError(f"cannot give {clients} devices a sample each from {n} samples")
    return n


def partition_for(
    spec: str, labels: np.ndarray, clients: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Device shards' indices for "iid", "dirichlet" (at `alpha`) or "dirichlet:ALPHA"."""
    rng = np.random.default_rng(seed)
    kind, _, value = spec.partition(":")
    if kind == "iid" and not value:
        return partition_iid(labels, clients, rng)
    if kind == "dirichlet":
        return partition_dirichlet(labels, clients, float(value or alpha), rng)
    raise ValueError(f"unknown partition {spec!r}: iid, dirichlet or dirichlet:ALPHA")
