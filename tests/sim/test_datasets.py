"""load_sim_data: the offline digits and Fashion-MNIST splits, seeded subsets, image folders,
missing downloads and missing packages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from sfprompt.data.idx import load_idx_pair
from sfprompt.data.sampling import stratified_subset
from sfprompt.sim.datasets import (
    FASHION_ROOT,
    SimDataError,
    digits_pretraining_set,
    fit_image,
    load_sim_data,
    pretraining_set,
)

needs_fashion = pytest.mark.skipif(
    not (FASHION_ROOT / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed (make datasets)",
)


def test_digits_are_rgb_uint8_and_only_zero_to_four() -> None:
    """The federation sees 0-4 at 32x32 RGB; every sample of 0-4 is used, none of 5-9."""
    data = load_sim_data("digits")
    for images, labels in (
        (data.train_images, data.train_labels),
        (data.test_images, data.test_labels),
    ):
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
        assert labels.dtype == np.int64 and len(labels) == len(images)
        assert set(np.unique(labels)) == {0, 1, 2, 3, 4}
        assert (images[..., 0] == images[..., 2]).all()  # grey as RGB
    assert data.num_classes == 5 and data.classes == ["0", "1", "2", "3", "4"]
    target = load_digits().target
    assert len(data.train_labels) + len(data.test_labels) == int((target < 5).sum())
    assert abs(len(data.test_labels) / (target < 5).sum() - 0.2) < 0.01


def test_digits_images_match_sklearn_and_exclude_pretraining_digits() -> None:
    """Every federated image is an upscaled sklearn digit 0-4 with its own label; no 5-9."""
    digits = load_digits()
    small = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # (N, 8, 8)
    label_of = {}
    for img, t in zip(small, digits.target):
        label_of.setdefault(img.tobytes(), set()).add(int(t))
    data = load_sim_data("digits")
    for images, labels in (
        (data.train_images, data.train_labels),
        (data.test_images, data.test_labels),
    ):
        for img, y in zip(images, labels):
            key = img[::4, ::4, 0].tobytes()  # undo the x4 nearest-neighbour upscale
            assert int(y) in label_of[key]
    pre_images, pre_labels = digits_pretraining_set(32)
    assert set(np.unique(pre_labels)) == {0, 1, 2, 3, 4}  # 5-9 relabelled
    assert len(pre_labels) == int((digits.target >= 5).sum())
    for img, y in zip(pre_images, pre_labels):
        assert int(y) + 5 in label_of[img[::4, ::4, 0].tobytes()]


def test_split_and_subsets_are_deterministic_by_seed() -> None:
    """Same seed, same arrays; another seed, another split; max_* keeps class balance."""
    a = load_sim_data("digits", seed=3, max_train=50, max_test=20)
    b = load_sim_data("digits", seed=3, max_train=50, max_test=20)
    c = load_sim_data("digits", seed=4, max_train=50, max_test=20)
    assert np.array_equal(a.train_images, b.train_images)
    assert np.array_equal(a.test_labels, b.test_labels)
    assert not np.array_equal(a.train_images, c.train_images)
    assert len(a.train_labels) == 50 and len(a.test_labels) == 20
    assert np.bincount(a.train_labels).tolist() == [10] * 5


def test_other_image_size() -> None:
    data = load_sim_data("digits", image_size=48, max_train=10, max_test=5)
    assert data.train_images.shape == (10, 48, 48, 3)


def test_stratified_subset_exact_size_and_proportions() -> None:
    labels = np.array([0] * 70 + [1] * 20 + [2] * 10)
    picked = stratified_subset(labels, 33, np.random.default_rng(0))
    assert len(picked) == 33 and len(np.unique(picked)) == 33
    counts = np.bincount(labels[picked], minlength=3)
    assert counts.tolist() == [23, 7, 3]  # floors 23, 6, 3; the largest remainder (0.6) gets one


def test_fit_image_resizes_shorter_side_then_centre_crops() -> None:
    """A 40x20 image whose right half is white: the crop of the middle 20x20 after resize."""
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 20:] = 255
    out = fit_image(Image.fromarray(wide), 10)  # -> 20x10, crop columns 5..15
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert out[:, 0].max() < 30 and out[:, -1].min() > 225
    grey = fit_image(Image.fromarray(np.full((8, 8), 7, np.uint8)), 8)
    assert grey.shape == (8, 8, 3) and (grey == 7).all()


def _write_folder(root: Path, counts: dict[str, int], size: int = 12, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for k, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 50, (size, size + 4, 3), dtype=np.uint8) + 60 * k
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")


def test_image_folder_without_splits_is_split_80_20(tmp_path: Path) -> None:
    """An ImageFolder with no train/test folders: seeded stratified 80/20, resized to size."""
    _write_folder(tmp_path / "set", {"cat": 10, "dog": 5})
    data = load_sim_data(str(tmp_path / "set"), image_size=8)
    assert data.classes == ["cat", "dog"]
    assert data.train_images.shape == (12, 8, 8, 3) and data.test_images.shape == (3, 8, 8, 3)
    assert np.bincount(data.test_labels).tolist() == [2, 1]
    again = load_sim_data(str(tmp_path / "set"), image_size=8)
    assert np.array_equal(data.test_images, again.test_images)
    # class 1 images are brighter (60 added): the labels followed their images
    assert (
        data.train_images[data.train_labels == 1].mean()
        > data.train_images[data.train_labels == 0].mean() + 40
    )


def test_image_folder_with_own_splits(tmp_path: Path) -> None:
    _write_folder(tmp_path / "set" / "train", {"a": 4, "b": 4})
    _write_folder(tmp_path / "set" / "test", {"a": 2, "b": 1}, seed=1)
    data = load_sim_data(str(tmp_path / "set"), image_size=12)
    assert len(data.train_labels) == 8 and data.test_labels.tolist() == [0, 0, 1]
    assert data.test_images.shape == (3, 12, 12, 3)


def test_image_folder_with_mismatched_splits_is_refused(tmp_path: Path) -> None:
    _write_folder(tmp_path / "set" / "train", {"a": 2, "b": 2})
    _write_folder(tmp_path / "set" / "test", {"a": 2, "c": 2})
    with pytest.raises(SimDataError, match="classes"):
        load_sim_data(str(tmp_path / "set"))


def test_missing_torchvision_set_names_download(tmp_path: Path) -> None:
    """No files under the root and no download: a SimDataError saying where and --download."""
    with pytest.raises(SimDataError, match="--download") as err:
        load_sim_data("cifar10", root=tmp_path / "nothing")
    assert str(tmp_path / "nothing") in str(err.value)


def test_unknown_name_and_bad_arguments() -> None:
    with pytest.raises(SimDataError, match="unknown data set"):
        load_sim_data("no-such-set-here")
    with pytest.raises(SimDataError, match="max_train"):
        load_sim_data("digits", max_train=0)
    assert issubclass(SimDataError, ValueError)


def _write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """A hand-written IDX pair (magic 00 00 08 <ndim>, big-endian uint32 dims, bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        data = bytes([0, 0, 8, array.ndim]) + dims + array.astype(np.uint8).tobytes()
        (folder / f"{prefix}-{kind}-ubyte").write_bytes(data)


def test_fashion_mnist_root_keeps_classes_0_to_4_and_resizes(tmp_path: Path) -> None:
    """--root points at any folder of IDX files: classes 5-9 leave the federation for
    pre-training, the rest keep their images; 28 x 28 grey becomes S x S RGB."""
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 10  # four of each class
    images = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path, "train", images, labels)
    _write_idx(tmp_path, "t10k", images[:20], labels[:20])
    data = load_sim_data("fashion-mnist", root=tmp_path, image_size=28)
    assert data.classes == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]
    assert np.bincount(data.train_labels).tolist() == [4] * 5
    assert np.bincount(data.test_labels).tolist() == [2] * 5
    assert np.array_equal(data.train_images[..., 1], images[labels < 5])
    assert data.train_labels.tolist() == labels[labels < 5].tolist()
    big = load_sim_data("fashion-mnist", root=tmp_path, image_size=32, max_train=10, max_test=5)
    assert big.train_images.shape == (10, 32, 32, 3) and big.test_images.shape == (5, 32, 32, 3)
    assert np.bincount(big.train_labels).tolist() == [2] * 5
    assert (big.train_images[..., 0] == big.train_images[..., 2]).all()
    pre_images, pre_labels = pretraining_set("fashion-mnist", 28, "test", root=tmp_path)
    assert pre_labels.tolist() == (labels[:20][labels[:20] >= 5] - 5).tolist()
    assert np.array_equal(pre_images[..., 0], images[:20][labels[:20] >= 5])
    as_folder = load_sim_data(str(tmp_path), image_size=28)  # IDX files as a plain directory
    assert len(as_folder.train_labels) == 40 and len(as_folder.test_labels) == 20  # own t10k


def test_fashion_mnist_missing_names_the_package_and_root(tmp_path: Path) -> None:
    with pytest.raises(SimDataError, match="apt-get install dataset-fashion-mnist") as err:
        load_sim_data("fashion-mnist", root=tmp_path / "nothing")
    assert "--root" in str(err.value) and str(tmp_path / "nothing") in str(err.value)


@needs_fashion
def test_debian_fashion_mnist_is_the_official_split_of_classes_0_to_4() -> None:
    """30,000 training and 5,000 test images (6,000 / 1,000 per class), in file order, the same
    pixels as the IDX files; the pre-training test split is the other 5,000."""
    data = load_sim_data("fashion-mnist", image_size=28)
    assert data.train_images.shape == (30000, 28, 28, 3) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (5000, 28, 28, 3)
    assert data.train_labels.dtype == np.int64
    assert np.bincount(data.train_labels).tolist() == [6000] * 5
    assert np.bincount(data.test_labels).tolist() == [1000] * 5
    raw_x, raw_y = load_idx_pair(FASHION_ROOT, "test")
    assert np.array_equal(data.test_images[..., 2], raw_x[raw_y < 5])
    assert data.test_labels[:4].tolist() == [2, 1, 1, 1]  # file labels 9, 2, 1, 1, 6, 1: 9, 6 out
    pre_images, pre_labels = pretraining_set("fashion-mnist", 28, "test")
    assert np.bincount(pre_labels).tolist() == [1000] * 5
    assert pre_labels[0] == 4 and np.array_equal(pre_images[0, ..., 0], raw_x[0])  # Ankle boot
    small = load_sim_data("fashion-mnist", image_size=32, max_train=100, max_test=50, seed=1)
    assert np.bincount(small.test_labels).tolist() == [10] * 5
    assert small.train_images.shape == (100, 32, 32, 3)


def test_pretraining_set_names_and_splits() -> None:
    """digits' pre-training set is all of 5-9 (the alias pretrain.py uses gives the same);
    it has no test split, and other names have no pre-training classes."""
    images, labels = pretraining_set("digits", 32)
    alias_images, alias_labels = digits_pretraining_set(32)
    assert np.array_equal(images, alias_images) and np.array_equal(labels, alias_labels)
    with pytest.raises(SimDataError, match="only a 'train'"):
        pretraining_set("digits", 32, "test")
    with pytest.raises(SimDataError, match="no pre-training classes"):
        pretraining_set("cifar10", 32)


@pytest.mark.parametrize("name", ["mnist", "kmnist", "fashionmnist"])
def test_torchvision_mnist_family_is_looked_up_under_root(tmp_path: Path, name: str) -> None:
    """The torchvision table builds MNIST, KMNIST, FashionMNIST: missing files are a clear
    SimDataError naming the root, not a TypeError from a wrong constructor argument."""
    with pytest.raises(SimDataError, match="--download") as err:
        load_sim_data(name, root=tmp_path / "none")
    assert str(tmp_path / "none") in str(err.value)
