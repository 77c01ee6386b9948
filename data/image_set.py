"""`ImageSet`: labelled images behind one interface, whatever holds them (image files, a
memory-mapped CIFAR file, an in-memory uint8 array). data/datasets.py reads the formats into it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError
from .transforms import EvalTransform, to_pil


class ImageSet:
    """Labelled images behind one interface, whatever the files.

    Images stay where they are (image files, a memory-mapped CIFAR file, an in-memory uint8
    array); `preprocessed` turns only the requested ones into model input.
    """

    def __init__(
        self,
        source: FileSource | ArraySource,
        rows: np.ndarray,
        labels: np.ndarray,
        classes: Sequence[str],
        description: str,
    ) -> None:
        self._source = source
        self._rows = rows  # (N,) rows of `source` in this set
        self.labels = labels  # (N,) int64
        self.classes = list(classes)
        self.description = description

    @classmethod
    def from_arrays(
        cls,
        images: np.ndarray,
        labels: np.ndarray,
        classes: Sequence[str] | None = None,
        description: str = "arrays",
    ) -> ImageSet:
        """A set over (N, H, W[, C]) uint8 or [0, 1] float images and (N,) int labels.

        Floats are stored as uint8 (rounded), a quarter of the memory; raises `DataError` for
        shapes, dtypes or labels that do not fit.
        """
        pixels = as_uint8(np.asarray(images), description)
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"{description}: labels must be (N,) integers, got {labels.dtype} {labels.shape}"
            )
        if len(labels) != len(pixels):
            raise DataError(f"{description}: {len(pixels)} images but {len(labels)} labels")
        if len(labels) and labels.min() < 0:
            raise DataError(f"{description}: labels must be >= 0, got {labels.min()}")
        n_classes = int(labels.max()) + 1 if len(labels) else 0
        if classes is None:
            classes = [str(i) for i in range(n_classes)]
        elif n_classes > len(classes):
            raise DataError(
                f"{description}: label {n_classes - 1} but only {len(classes)} class names"
            )
        rows = np.arange(len(labels), dtype=np.int64)
        return cls(ArraySource([pixels]), rows, labels.astype(np.int64), classes, description)

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"ImageSet({self.description}: {len(self)} images, {len(self.classes)} classes)"

    def image(self, i: int) -> Image.Image:
        """Image `i` as an RGB Pillow image."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"image {i} out of range for {len(self)} images")
        return self._source.image(int(self._rows[i]))

    def preprocessed(self, indices: np.ndarray, transform: EvalTransform) -> np.ndarray:
        """(len(indices), 3, H, W) float32 model input for the given images.

        Whatever holds them, the same pictures give the same input: image files go through the
        eval transform one by one, arrays through `transform.from_uint8`, which is that
        transform on the same pixels (only faster where it leaves them as they are).
        """
        rows = self._rows[self._check_indices(indices)]
        if isinstance(self._source, ArraySource):
            return transform.from_uint8(self._source.pixels(rows))
        return transform.batch([self._source.image(int(r)) for r in rows])

    def subset(self, indices: np.ndarray) -> ImageSet:
        """The images at `indices` (in that order), sharing this set's files and class names."""
        picked = self._check_indices(indices)
        return ImageSet(
            self._source,
            self._rows[picked],
            self.labels[picked],
            self.classes,
            self.description,
        )

    def relabelled(self, labels: np.ndarray, classes: Sequence[str]) -> ImageSet:
        """The same images under other label numbers and class names (a bundle's, say)."""
        labels = np.asarray(labels, np.int64)
        if labels.shape != self.labels.shape:
            raise DataError(f"{len(labels)} labels for {len(self)} images")
        return ImageSet(self._source, self._rows, labels, classes, self.description)

    def _check_indices(self, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise IndexError(f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(
                f"indices span [{idx.min()}, {idx.max()}], out of range for {len(self)} images"
            )
        return idx.astype(np.int64)


class FileSource:
    """One image file per row, decoded when asked for."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def image(self, row: int) -> Image.Image:
        path = self.paths[row]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except Exception as err:  # checked at load time: the file changed since
            raise DataError(f"cannot read image {path}: {err}") from err


class ArraySource:
    """(n_k, H, W[, C]) uint8 chunks (arrays or memory maps), addressed as one array."""

    def __init__(self, chunks: list[np.ndarray]) -> None:
        self.chunks = chunks
        self.starts = np.cumsum([0] + [len(c) for c in chunks])  # (K + 1,)

    def pixels(self, rows: np.ndarray) -> np.ndarray:
        """The uint8 images at `rows`, read from their chunks (only those rows are touched)."""
        first = self.chunks[0]
        out = np.empty((len(rows), *first.shape[1:]), np.uint8)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for k, chunk in enumerate(self.chunks):
            mask = which == k
            if mask.any():
                out[mask] = chunk[rows[mask] - self.starts[k]]
        return out

    def image(self, row: int) -> Image.Image:
        return to_pil(self.pixels(np.array([row]))[0])


def as_uint8(images: np.ndarray, where: str) -> np.ndarray:
    """Check (N, H, W[, C]) images and store [0, 1] floats as uint8."""
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3, 4)):
        raise DataError(
            f"{where}: images must be (N, H, W) or (N, H, W, C), C = 1, 3 or 4; got {images.shape}"
        )
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise DataError(f"{where}: images must be uint8 or float in [0, 1], got {images.dtype}")
    if images.size and not (np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1):
        raise DataError(
            f"{where}: float images must lie in [0, 1] (no NaN), got {images.min()}..{images.max()}"
        )
    return np.rint(images * 255).astype(np.uint8)
