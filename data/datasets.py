"""A device's (or the server's) labelled images, read lazily from the formats users have.

`load_image_set` recognises an ImageFolder tree, CIFAR-10 / CIFAR-100 binary batches, .npz
arrays and IDX files (MNIST, Fashion-MNIST). Nothing is preprocessed up front: a Raspberry Pi
holding 50,000 CIFAR images keeps them as uint8 (memory-mapped, for CIFAR files) and normalises
one batch at a time.

Bad files never stop a run: an image Pillow cannot decode, or a CIFAR file cut short, is named
through `on_skip` and left out when the set is loaded, so training never meets it. A data set
that cannot be used at all (an .npz without its arrays, nothing left) raises `DataError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError
from .idx import FASHION_MNIST_CLASSES, is_idx_folder, load_idx_pair
from .image_set import ArraySource, FileSource, ImageSet

_log = logging.getLogger(__name__)

# torchvision's IMG_EXTENSIONS, so that an ImageFolder holds the same files as torchvision's.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")
CIFAR_PIXELS = 3 * 32 * 32  # one record's image: R, G, B planes of 32 x 32, row-major


def load_image_set(
    path: Path | str,
    *,
    split: str = "train",
    on_skip: Callable[[str], None] | None = None,
) -> ImageSet:
    """Load the data set at `path`, whose format is recognised from its files.

    - an `.npz` file with `images`, `labels` and optional `classes`, or a directory holding
      `<split>.npz`;
    - CIFAR-10 binary (`data_batch_*.bin`, `test_batch.bin`) or CIFAR-100 binary (`train.bin`,
      `test.bin`), in `path` or in its `cifar-10-batches-bin` / `cifar-100-binary` folder;
    - IDX files (`train-images-idx3-ubyte[.gz]`, `t10k-*` for the test split), in `path` or in
      its `raw` folder (torchvision's layout); grey images stay (N, H, W), made RGB when read;
    - an ImageFolder: one folder per class (sorted by name, as torchvision does), or such a tree
      under `path/<split>` when `path` holds only split folders. A plain ImageFolder has no
      splits, and `split` is not used.

    Skipped files are named through `on_skip` (default: a logged warning). Raises `DataError`
    for an unknown layout, an unusable .npz, or when no image is left.
    """
    path = Path(path)
    report = on_skip if on_skip is not None else _log.warning
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise DataError(f"{path} is a file but not an .npz; give an .npz or a directory")
        found = _load_npz(path)
    elif not path.is_dir():
        raise DataError(f"no data set at {path}: no such file or directory")
    elif npz := [p for p in path.iterdir() if p.suffix == ".npz"]:
        wanted = path / f"{split}.npz"
        if not wanted.is_file():
            raise DataError(f"{path} holds {sorted(p.name for p in npz)} but no {wanted.name}")
        found = _load_npz(wanted)
    elif (cifar := _cifar_dir(path)) is not None:
        found = _load_cifar(cifar, split, report)
    elif (idx := _idx_dir(path)) is not None:
        found = _load_idx(idx, split)
    else:
        found = _load_image_folder(_split_dir(path, split), report)
    if len(found) == 0:
        raise DataError(f"no usable images in {path} (split {split!r})")
    return found


def class_names(path: Path | str, split: str = "train") -> list[str]:
    """The class names of the data set at `path`, in label order, as `load_image_set` gives
    them; an ImageFolder's are its folder names, read without decoding a single image."""
    path = Path(path)
    if path.is_dir() and not _holds_arrays(path):
        if split not in SPLITS:
            raise DataError(f"split must be one of {SPLITS}, got {split!r}")
        root = _split_dir(path, split)
        classes = _folder_classes(root)
        if not classes:
            raise DataError(f"no data set found in {root}: no class folders, .npz, CIFAR or IDX")
        return classes
    return load_image_set(path, split=split).classes


def _holds_arrays(path: Path) -> bool:
    """Whether the folder `path` holds .npz, CIFAR or IDX files rather than class folders."""
    has_npz = any(p.suffix == ".npz" for p in path.iterdir())
    return has_npz or _cifar_dir(path) is not None or _idx_dir(path) is not None


def _load_npz(path: Path) -> ImageSet:
    """Arrays from an .npz, never unpickled (`classes` must be a string array)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("images", "labels") if k not in npz.files]
            if missing:
                raise DataError(f"{path} lacks array(s) {missing}; it holds {npz.files}")
            images, labels = npz["images"], npz["labels"]
            classes = [str(c) for c in npz["classes"]] if "classes" in npz.files else None
    except DataError:
        raise
    except Exception as err:  # a zip or array numpy cannot read, an object array
        raise DataError(f"cannot read {path}: {err}") from err
    return ImageSet.from_arrays(images, labels, classes, description=str(path))


def _cifar_dir(path: Path) -> Path | None:
    """The folder holding CIFAR binary batches: `path` itself or its extracted-archive folder."""
    markers = ("test_batch.bin", "train.bin", "test.bin")
    for folder in (path, path / "cifar-10-batches-bin", path / "cifar-100-binary"):
        if any((folder / name).is_file() for name in markers) or any(
            folder.glob("data_batch_*.bin")
        ):
            return folder
    return None


def _load_cifar(folder: Path, split: str, report: Callable[[str], None]) -> ImageSet:
    """CIFAR-10 (label byte + 3072) or CIFAR-100 (coarse, fine label bytes + 3072) records."""
    cifar10 = (folder / "test_batch.bin").is_file() or any(folder.glob("data_batch_*.bin"))
    if split == "val":
        raise DataError(f"CIFAR in {folder} has only train and test splits, not 'val'")
    if cifar10:
        names_file, n_classes, label_col = "batches.meta.txt", 10, 0
        files = sorted(folder.glob("data_batch_*.bin"), key=_batch_number)
        files = files if split == "train" else [folder / "test_batch.bin"]
    else:
        names_file, n_classes, label_col = "fine_label_names.txt", 100, 1
        files = [folder / f"{split}.bin"]
    header = label_col + 1
    record = header + CIFAR_PIXELS
    chunks, labels = [], []
    for file in files:
        if not file.is_file():
            raise DataError(f"CIFAR folder {folder} has no {file.name} for split {split!r}")
        size = file.stat().st_size
        if size == 0 or size % record:
            report(f"skipped {file}: {size} bytes is not a whole number of {record}-byte records")
            continue
        raw = np.memmap(file, np.uint8, mode="r", shape=(size // record, record))
        file_labels = np.array(raw[:, label_col], np.int64)
        if file_labels.max() >= n_classes:
            report(f"skipped {file}: label {file_labels.max()} >= {n_classes}, not a CIFAR file")
            continue
        # (n, 3, 32, 32) planes -> (n, 32, 32, 3), still a view of the file
        chunks.append(raw[:, header:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(file_labels)
    if not chunks:
        raise DataError(f"no usable CIFAR file in {folder} for split {split!r}")
    all_labels = np.concatenate(labels)
    rows = np.arange(len(all_labels), dtype=np.int64)
    classes = _class_names(folder / names_file, n_classes, report)
    return ImageSet(ArraySource(chunks), rows, all_labels, classes, str(folder))


def _idx_dir(path: Path) -> Path | None:
    """The folder holding IDX files: `path` itself or its `raw` folder (torchvision's)."""
    return next((f for f in (path, path / "raw") if is_idx_folder(f)), None)


def _load_idx(folder: Path, split: str) -> ImageSet:
    """An IDX image/label pair. The files name no classes: a folder whose path says "fashion"
    gets Fashion-MNIST's names, any other (MNIST, KMNIST) the label numbers."""
    if split == "val":
        raise DataError(f"IDX files in {folder} have only train and test splits, not 'val'")
    images, labels = load_idx_pair(folder, split)
    fashion = "fashion" in str(folder.resolve()).lower() and labels.max(initial=0) < 10
    classes = list(FASHION_MNIST_CLASSES) if fashion else None
    return ImageSet.from_arrays(images, labels, classes, description=str(folder))


def _batch_number(path: Path) -> int:
    suffix = path.stem.rsplit("_", 1)[-1]
    return int(suffix) if suffix.isdigit() else 0


def _class_names(file: Path, n_classes: int, report: Callable[[str], None]) -> list[str]:
    """Names from CIFAR's label-names file, or the label numbers when it is missing or odd."""
    if file.is_file():
        names = [line.strip() for line in file.read_text().splitlines() if line.strip()]
        if len(names) == n_classes:
            return names
        report(f"ignored {file}: {len(names)} names for {n_classes} classes")
    return [str(i) for i in range(n_classes)]


def _split_dir(path: Path, split: str) -> Path:
    """`path/<split>` when `path` holds only split folders (train/val/test), else `path`."""
    folders = {p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if folders and folders <= set(SPLITS):
        if split not in folders:
            raise DataError(f"{path} has split folders {sorted(folders)} but no {split!r}")
        return path / split
    return path


def _load_image_folder(root: Path, report: Callable[[str], None]) -> ImageSet:
    """torchvision's ImageFolder walk (classes and files sorted), each file checked by decoding."""
    classes = _folder_classes(root)
    if not classes:
        raise DataError(
            f"no data set found in {root}: no .npz, CIFAR .bin or IDX files, or class folders"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = 0
        for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
            for file in sorted(files):
                if file.startswith(".") or not file.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                path = Path(folder) / file
                problem = _image_problem(path)
                if problem:
                    report(f"skipped {path}: {problem}")
                    continue
                paths.append(path)
                labels.append(label)
                found += 1
        if not found:
            report(f"class folder {root / name} holds no readable image")
    return ImageSet(
        FileSource(paths),
        np.arange(len(paths), dtype=np.int64),
        np.array(labels, np.int64),
        classes,
        str(root),
    )


def _folder_classes(root: Path) -> list[str]:
    """torchvision's ImageFolder classes: the sub-folders, sorted, hidden ones left out."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _image_problem(path: Path) -> str | None:
    """Why Pillow cannot decode `path`, or None.

    `verify` alone misses a truncated JPEG or BMP, so the image is also decoded (JPEG at 1/8
    scale: a truncated stream still fails, at a fraction of the cost).
    """
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.draft(im.mode, (1, 1))
            im.load()
    except Exception as err:  # Pillow raises many types for bad data; any of them means skip
        return f"{type(err).__name__}: {err}"
    return None
