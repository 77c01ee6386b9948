"""The images a simulation federates, as uint8 arrays at the model's input size.

Four sources behind one function, `load_sim_data`:
- "digits" (the offline default): sklearn's 8x8 digits, upscaled to RGB. Only the digits 0-4 are
  federated; 5-9 are kept for pre-training (`pretraining_set`), so the pre-trained ViT has
  features to transfer but has never seen a label the federation learns.
- "fashion-mnist": the IDX files of Debian's `dataset-fashion-mnist` (offline once installed),
  split the same way: T-shirt/top, Trouser, Pullover, Dress and Coat are federated with the
  official test split; Sandal, Shirt, Sneaker, Bag and Ankle boot are kept for pre-training. A
  harder task than digits, with 30,000 training images, so accuracies say more.
- torchvision's data sets (the paper's CIFAR-10/100, SVHN, Flowers-102, Caltech101, Food101, and
  MNIST, KMNIST, Fashion-MNIST with all ten classes), read from a local root; only
  `download=True` reaches the network.
- any directory `load_image_set` reads (an ImageFolder, .npz arrays, CIFAR binaries, IDX files).

Everything is decoded up front: a simulation holds a few thousand small images, and uint8 arrays
can be sliced into device shards without touching the files again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sfprompt.data.datasets import load_image_set
from sfprompt.data.errors import DataError
from sfprompt.data.idx import FASHION_MNIST_CLASSES, idx_path, load_idx_pair
from sfprompt.data.image_set import ImageSet
from sfprompt.data.sampling import stratified_split, stratified_subset

DIGITS_FEDERATED = (0, 1, 2, 3, 4)  # the federation's classes
DIGITS_PRETRAINING = (5, 6, 7, 8, 9)  # reserved for pre-training; never in `load_sim_data`
FASHION_FEDERATED = (0, 1, 2, 3, 4)  # T-shirt/top, Trouser, Pullover, Dress, Coat
FASHION_PRETRAINING = (5, 6, 7, 8, 9)  # Sandal, Shirt, Sneaker, Bag, Ankle boot
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")  # where Debian's package puts it
FASHION_FIX = "install it (sudo apt-get install dataset-fashion-mnist) or pass --root DIR"
TEST_FRACTION = 0.2  # where a source has no official test split
TORCHVISION_SETS = (
    "cifar10",
    "cifar100",
    "svhn",
    "flowers102",
    "caltech101",
    "food101",
    "mnist",
    "kmnist",
    "fashionmnist",
)
DEFAULT_ROOT = Path("~/.cache/sfprompt/datasets")  # torchvision sets when no root is given


class SimDataError(ValueError):
    """A data set that cannot be had as asked (unknown name, files missing, no network)."""


@dataclass
class SimData:
    """Train and test images of one data set, (N, H, W, 3) uint8 at the model's input size."""

    name: str
    train_images: np.ndarray  # (N, H, W, 3) uint8
    train_labels: np.ndarray  # (N,) int64 in [0, num_classes)
    test_images: np.ndarray  # (M, H, W, 3) uint8
    test_labels: np.ndarray  # (M,) int64
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_sim_data(
    name: str = "digits",
    root: Path | None = None,
    image_size: int = 32,
    download: bool = False,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> SimData:
    """Load `name` ("digits", "fashion-mnist", a torchvision set in `TORCHVISION_SETS`, or a
    directory). `root` is where torchvision sets live, or the folder of Fashion-MNIST's IDX files.

    `max_train` / `max_test` keep a seeded, stratified subset. Raises `SimDataError` for an
    unknown name, Fashion-MNIST or a torchvision set missing under `root` (or one that cannot be
    downloaded), or a directory `load_image_set` cannot read.
    """
    if image_size < 1:
        raise SimDataError(f"image_size must be a positive number of pixels, got {image_size}")
    for what, limit in (("max_train", max_train), ("max_test", max_test)):
        if limit is not None and limit < 1:
            raise SimDataError(f"{what} must be at least 1 (or None for all), got {limit}")
    rng = np.random.default_rng(seed)
    key = name.lower()
    if key == "digits":
        images, labels = _digits(DIGITS_FEDERATED, image_size)
        train, test = stratified_split(labels, TEST_FRACTION, rng)
        data = SimData(
            "digits",
            images[train],
            labels[train],
            images[test],
            labels[test],
            [str(d) for d in DIGITS_FEDERATED],
        )
        return _limit(data, max_train, max_test, rng)
    if key == "fashion-mnist":
        return _load_fashion(root, image_size, max_train, max_test, rng)
    if key in TORCHVISION_SETS:
        folder = Path(root).expanduser() if root is not None else DEFAULT_ROOT.expanduser()
        return _load_torchvision(key, folder, image_size, download, max_train, max_test, rng)
    path = Path(name).expanduser()
    if path.exists():
        return _load_folder(path, image_size, max_train, max_test, rng)
    raise SimDataError(
        f"unknown data set {name!r}: give 'digits', 'fashion-mnist', one of "
        f"{', '.join(TORCHVISION_SETS)}, or a directory of images (ImageFolder, .npz, IDX)"
    )


def pretraining_set(
    name: str, image_size: int = 32, split: str = "train", root: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The classes 5-9 that `load_sim_data(name)` leaves out, relabelled 0-4: (N, S, S, 3) uint8
    images and (N,) int64 labels.

    "digits" has one split, all its 5-9 ("train"; the pre-training holds out its own share);
    "fashion-mnist" has the official train and test splits, read from `root` (Debian's folder
    by default). Raises `SimDataError` for another name or split, or missing files.
    """
    key = name.lower()
    if key == "digits":
        if split != "train":
            raise SimDataError(f"digits has only a 'train' pre-training split, not {split!r}")
        return _digits(DIGITS_PRETRAINING, image_size)
    if key == "fashion-mnist":
        grey, labels = _fashion(FASHION_PRETRAINING, split, root)
        return _grey_to_rgb(grey, image_size), labels
    raise SimDataError(f"no pre-training classes for {name!r}: give 'digits' or 'fashion-mnist'")


def digits_pretraining_set(image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """`pretraining_set("digits", image_size)`, the set `sim/pretrain.py` trains on."""
    return pretraining_set("digits", image_size)


def fit_image(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8: RGB, shorter side resized to `size` (bicubic), centre crop."""
    image = image.convert("RGB")
    width, height = image.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        new = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new, Image.Resampling.BICUBIC)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


def decode_all(
    count: int, get: Callable[[int], Image.Image], size: int, rows: Sequence[int] | np.ndarray
) -> np.ndarray:
    """(len(rows), size, size, 3) uint8 from `get(row)` Pillow images."""
    out = np.empty((len(rows), size, size, 3), np.uint8)
    for i, row in enumerate(rows):
        if not 0 <= row < count:
            raise SimDataError(f"row {row} out of range for {count} images")
        out[i] = fit_image(get(int(row)), size)
    return out


def _digits(keep: Sequence[int], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits with labels in `keep`, relabelled by position in `keep`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    mask = np.isin(digits.target, keep)
    grey = np.rint(digits.images[mask] * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8) in [0, 16]
    big = grey.repeat(4, axis=1).repeat(4, axis=2)  # (N, 32, 32) nearest-neighbour x4
    return _grey_to_rgb(big, image_size), _relabel(digits.target[mask], keep)


def _fashion(keep: Sequence[int], split: str, root: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's `split` with labels in `keep`, relabelled: (N, 28, 28) uint8, (N,)."""
    folder = Path(root).expanduser() if root is not None else FASHION_ROOT
    if split not in ("train", "test"):
        raise SimDataError(f"fashion-mnist has the splits 'train' and 'test', not {split!r}")
    try:
        grey, labels = load_idx_pair(folder, split)
    except DataError as err:
        raise SimDataError(
            f"fashion-mnist not readable in {folder} ({err}): {FASHION_FIX}"
        ) from err
    mask = np.isin(labels, keep)
    return grey[mask], _relabel(labels[mask], keep)


def _load_fashion(
    root: Path | None,
    image_size: int,
    max_train: int | None,
    max_test: int | None,
    rng: np.random.Generator,
) -> SimData:
    """Fashion-MNIST's classes 0-4, official splits; subsets are cut before resizing."""
    split = {}
    for part, limit in (("train", max_train), ("test", max_test)):
        grey, labels = _fashion(FASHION_FEDERATED, part, root)
        if limit is not None:
            keep = stratified_subset(labels, limit, rng)
            grey, labels = grey[keep], labels[keep]
        split[part] = (_grey_to_rgb(grey, image_size), labels)
    return SimData(
        "fashion-mnist",
        *split["train"],
        *split["test"],
        [FASHION_MNIST_CLASSES[c] for c in FASHION_FEDERATED],
    )


def _grey_to_rgb(grey: np.ndarray, image_size: int) -> np.ndarray:
    """(N, S, S, 3) uint8 from (N, H, W) grey: bicubic (Pillow) when the size differs."""
    if grey.shape[1:] != (image_size, image_size):
        size = (image_size, image_size)
        resized = np.empty((len(grey), *size), np.uint8)
        for i, g in enumerate(grey):
            resized[i] = np.asarray(Image.fromarray(g).resize(size, Image.Resampling.BICUBIC))
        grey = resized
    return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=3))  # grey as RGB


def _relabel(labels: np.ndarray, keep: Sequence[int]) -> np.ndarray:
    """Labels in `keep` renumbered by their position in `keep` (int64)."""
    table = np.full(int(max(keep)) + 1, -1, np.int64)
    table[list(keep)] = np.arange(len(keep))
    return table[labels]


def _limit(
    data: SimData, max_train: int | None, max_test: int | None, rng: np.random.Generator
) -> SimData:
    """`data` cut to stratified subsets of at most `max_train` / `max_test` samples."""
    if max_train is not None:
        keep = stratified_subset(data.train_labels, max_train, rng)
        data.train_images, data.train_labels = data.train_images[keep], data.train_labels[keep]
    if max_test is not None:
        keep = stratified_subset(data.test_labels, max_test, rng)
        data.test_images, data.test_labels = data.test_images[keep], data.test_labels[keep]
    return data


def _load_folder(
    path: Path,
    image_size: int,
    max_train: int | None,
    max_test: int | None,
    rng: np.random.Generator,
) -> SimData:
    """A `load_image_set` data set: its own train/test splits when it has both, else 80/20."""
    idx_test = [idx_path(f, "t10k-images-idx3-ubyte") for f in (path, path / "raw")]
    has_test = (path / "test").is_dir() or (path / "test.npz").is_file() or any(idx_test)
    try:
        train_set = load_image_set(path, split="train")
        test_set = load_image_set(path, split="test") if has_test else None
    except DataError as err:
        raise SimDataError(f"cannot read data set {path}: {err}") from err
    if test_set is None:
        train_rows, test_rows = stratified_split(train_set.labels, TEST_FRACTION, rng)
        test_set, train_set = train_set.subset(test_rows), train_set.subset(train_rows)
    elif test_set.classes != train_set.classes:
        raise SimDataError(
            f"{path}: train classes {train_set.classes} differ from test classes {test_set.classes}"
        )
    train = _cut(train_set, max_train, rng)
    test = _cut(test_set, max_test, rng)
    return SimData(
        str(path),
        _pixels(train, image_size),
        train.labels.astype(np.int64),
        _pixels(test, image_size),
        test.labels.astype(np.int64),
        list(train_set.classes),
    )


def _cut(images: ImageSet, limit: int | None, rng: np.random.Generator) -> ImageSet:
    return images if limit is None else images.subset(stratified_subset(images.labels, limit, rng))


def _pixels(images: ImageSet, size: int) -> np.ndarray:
    return decode_all(len(images), images.image, size, range(len(images)))


# name -> (torchvision class, label attribute, train splits, test splits); splits are the keyword
# arguments of each constructor. Caltech101 has no official split (None: seeded 80/20).
_TORCHVISION: dict[str, tuple[str, str, list[dict], list[dict] | None]] = {
    "cifar10": ("CIFAR10", "targets", [{"train": True}], [{"train": False}]),
    "cifar100": ("CIFAR100", "targets", [{"train": True}], [{"train": False}]),
    "svhn": ("SVHN", "labels", [{"split": "train"}], [{"split": "test"}]),
    "flowers102": (
        "Flowers102",
        "_labels",
        [{"split": "train"}, {"split": "val"}],
        [{"split": "test"}],
    ),
    "food101": ("Food101", "_labels", [{"split": "train"}], [{"split": "test"}]),
    "caltech101": ("Caltech101", "y", [{}], None),
    "mnist": ("MNIST", "targets", [{"train": True}], [{"train": False}]),
    "kmnist": ("KMNIST", "targets", [{"train": True}], [{"train": False}]),
    "fashionmnist": ("FashionMNIST", "targets", [{"train": True}], [{"train": False}]),
}


class _Joined:
    """Several torchvision data sets (e.g. Flowers-102's train and val) read as one."""

    def __init__(self, sets: list, label_attr: str) -> None:
        self.sets = sets
        self.labels = np.concatenate(
            [np.asarray(getattr(s, label_attr), np.int64).reshape(-1) for s in sets]
        )
        self.starts = np.cumsum([0] + [len(s) for s in sets])

    def image(self, row: int) -> Image.Image:
        k = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.sets[k][row - int(self.starts[k])][0]  # (PIL image, target)

    def pixels(self, rows: np.ndarray, size: int) -> np.ndarray:
        return decode_all(len(self.labels), self.image, size, rows)


def _load_torchvision(
    name: str,
    root: Path,
    image_size: int,
    download: bool,
    max_train: int | None,
    max_test: int | None,
    rng: np.random.Generator,
) -> SimData:
    """A torchvision data set from `root`; only the selected images are decoded."""
    try:
        import torchvision.datasets as tvd
    except ImportError as err:
        raise SimDataError(
            f"{name} is read with torchvision, which is not installed (pip install torchvision)"
        ) from err
    cls_name, label_attr, train_kw, test_kw = _TORCHVISION[name]
    cls = getattr(tvd, cls_name)

    def open_all(splits: list[dict]) -> _Joined:
        return _Joined([cls(str(root), download=download, **kw) for kw in splits], label_attr)

    try:
        train = open_all(train_kw)
        test = open_all(test_kw) if test_kw is not None else train
    except (RuntimeError, OSError) as err:  # "Dataset not found or corrupted"; no network
        if download:
            raise SimDataError(
                f"could not download {name} into {root}: {err} (downloading needs the network; "
                "or put the files there yourself)"
            ) from err
        raise SimDataError(
            f"{name} not found in {root} (torchvision looked for its files there): pass "
            "--download to fetch it (needs the network), or give the folder that holds it"
        ) from err
    if test_kw is None:
        train_rows, test_rows = stratified_split(train.labels, TEST_FRACTION, rng)
    else:
        train_rows, test_rows = np.arange(len(train.labels)), np.arange(len(test.labels))
    if max_train is not None:
        train_rows = train_rows[stratified_subset(train.labels[train_rows], max_train, rng)]
    if max_test is not None:
        test_rows = test_rows[stratified_subset(test.labels[test_rows], max_test, rng)]
    first = train.sets[0]
    classes = getattr(first, "classes", None) or getattr(first, "categories", None)
    if classes is None:  # SVHN names none: its labels are the digits
        classes = [str(i) for i in range(int(train.labels.max()) + 1)]
    return SimData(
        name,
        train.pixels(train_rows, image_size),
        train.labels[train_rows],
        test.pixels(test_rows, image_size),
        test.labels[test_rows],
        [str(c) for c in classes],
    )
