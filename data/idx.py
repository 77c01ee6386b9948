"""IDX files, the format of MNIST, Fashion-MNIST and KMNIST, read with numpy alone.

A device reads its data with numpy and Pillow only (no torch, hence not torchvision's reader),
and Debian's `dataset-fashion-mnist` package ships the IDX files as they were published. An IDX
file is a 4-byte magic (two zero bytes, a dtype code, the number of dimensions), one big-endian
uint32 per dimension, then the values, big-endian, row-major. Every way a file can disagree with
its own header raises `DataError` naming the file, so a cut-short download never becomes a
silently smaller data set.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

# dtype code (the magic's third byte) -> big-endian numpy dtype
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# split -> file name prefix, as MNIST and its successors name their files
IDX_PREFIXES = {"train": "train", "test": "t10k"}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def read_idx(path: Path | str) -> np.ndarray:
    """The array stored in the IDX file at `path` (gzip-compressed when it ends in `.gz`).

    The result has the header's shape and native byte order; uint8 data (all of MNIST's) is a
    read-only view of the file's bytes. Raises `DataError` naming the file for a missing or
    unreadable file, a bad magic, a truncated header or payload, or bytes left over.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as file:
                raw = file.read()
        else:
            raw = path.read_bytes()
    except (EOFError, zlib.error) as err:  # a gzip stream cut short or damaged
        raise DataError(f"IDX file {path} is truncated or corrupt: {err}") from err
    except OSError as err:  # missing, unreadable, not gzip at all (BadGzipFile)
        raise DataError(f"cannot read IDX file {path}: {err}") from err
    if len(raw) < 4:
        raise DataError(f"IDX file {path} is truncated: {len(raw)} bytes, no 4-byte magic")
    zero, code, ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or code not in IDX_DTYPES:
        raise DataError(
            f"IDX file {path} has a bad magic {raw[:4].hex()}: expected 0000, then a dtype code "
            f"in {[f'{c:02x}' for c in IDX_DTYPES]}, then the number of dimensions"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"IDX file {path} is truncated: {len(raw)} bytes, its {ndim}-D header needs {header}"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    payload = len(raw) - header
    if payload != expected:
        problem = "is truncated" if payload < expected else "has the wrong size"
        raise DataError(
            f"IDX file {path} {problem}: shape {dims} of {dtype.name} needs {expected} bytes "
            f"after the header, the file holds {payload}"
        )
    values = np.frombuffer(raw, dtype, offset=header).reshape(dims)
    return values.astype(dtype.newbyteorder("="), copy=False)


def idx_path(folder: Path | str, stem: str) -> Path | None:
    """`folder/stem`, else `folder/stem.gz`, else None."""
    folder = Path(folder)
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_idx_pair(folder: Path | str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) uint8 images and (N,) int64 labels of `split` ("train" or "test") in `folder`.

    Reads `train-images-idx3-ubyte` / `train-labels-idx1-ubyte` for "train" and `t10k-*` for
    "test", each plain or `.gz`. Raises `DataError` for another split, a missing or bad file, or
    images and labels that do not belong together.
    """
    if split not in IDX_PREFIXES:
        raise DataError(f"IDX data sets have the splits {sorted(IDX_PREFIXES)}, not {split!r}")
    prefix = IDX_PREFIXES[split]
    image_file = _existing(folder, f"{prefix}-images-idx3-ubyte")
    label_file = _existing(folder, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(
            f"{image_file}: expected (N, H, W) uint8 images, got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(
            f"{label_file}: expected (N,) uint8 labels, got {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{image_file} holds {len(images)} images but {label_file} {len(labels)} labels"
        )
    return images, labels.astype(np.int64)


def is_idx_folder(folder: Path | str) -> bool:
    """Whether `folder` holds the train or test images of an IDX data set."""
    return any(idx_path(folder, f"{p}-images-idx3-ubyte") for p in IDX_PREFIXES.values())


def _existing(folder: Path | str, stem: str) -> Path:
    """`idx_path`, raising `DataError` when the file is missing."""
    found = idx_path(folder, stem)
    if found is None:
        raise DataError(f"no {stem} or {stem}.gz in {folder}")
    return found
