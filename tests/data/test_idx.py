"""IDX files: hand-written files read back exactly (plain and gzip), every header/payload
disagreement refused with the file named, and the real Fashion-MNIST files Debian installs."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from sfprompt.data.datasets import load_image_set
from sfprompt.data.errors import DataError
from sfprompt.data.idx import FASHION_MNIST_CLASSES, load_idx_pair, read_idx
from sfprompt.data.transforms import EvalTransform

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_debian = pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed (make datasets)",
)


def _idx_bytes(array: np.ndarray, code: int, big_endian: str) -> bytes:
    """The IDX encoding written out by hand from the format's description (not by read_idx's
    own tables): magic 00 00 <code> <ndim>, big-endian uint32 dims, big-endian values."""
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(big_endian).tobytes()


def _write(path: Path, data: bytes) -> Path:
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", ["plain-idx3-ubyte", "packed-idx3-ubyte.gz"])
def test_uint8_round_trip_plain_and_gzip(tmp_path: Path, name: str) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 7
    path = _write(tmp_path / name, _idx_bytes(images, 0x08, "u1"))
    back = read_idx(path)
    assert back.dtype == np.uint8 and back.shape == (2, 3, 4)
    assert np.array_equal(back, images)


def test_multi_byte_values_are_big_endian_and_come_back_native(tmp_path: Path) -> None:
    """int32 and float32 payloads: a little-endian reader would get 256^3 times the values."""
    ints = np.array([[1, -2, 70000]], np.int32)
    floats = np.array([0.5, -3.25], np.float32)
    got_ints = read_idx(_write(tmp_path / "i.idx", _idx_bytes(ints, 0x0C, ">i4")))
    got_floats = read_idx(_write(tmp_path / "f.idx.gz", _idx_bytes(floats, 0x0D, ">f4")))
    assert got_ints.tolist() == [[1, -2, 70000]] and got_ints.dtype.isnative
    assert got_floats.tolist() == [0.5, -3.25] and got_floats.dtype.isnative


def test_truncated_payload_header_and_gzip_stream_are_refused(tmp_path: Path) -> None:
    good = _idx_bytes(np.ones((3, 2, 2), np.uint8), 0x08, "u1")
    cut_payload = _write(tmp_path / "cut-idx3-ubyte", good[:-1])
    with pytest.raises(DataError, match="truncated") as err:
        read_idx(cut_payload)
    assert str(cut_payload) in str(err.value) and "needs 12 bytes" in str(err.value)
    with pytest.raises(DataError, match="truncated"):
        read_idx(_write(tmp_path / "head-idx3-ubyte", good[:10]))  # 3 dims need 16 bytes
    with pytest.raises(DataError, match="truncated"):
        read_idx(_write(tmp_path / "tiny", b"\x00\x00"))
    gz = tmp_path / "cut-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(good)[:-6])  # a download cut short
    with pytest.raises(DataError, match=str(gz)):
        read_idx(gz)


def test_bad_magic_and_wrong_size_are_refused(tmp_path: Path) -> None:
    good = _idx_bytes(np.ones((2, 2), np.uint8), 0x08, "u1")
    for bad in (b"\x01" + good[1:], good[:2] + b"\x07" + good[3:]):  # non-zero lead, no dtype
        path = _write(tmp_path / "bad", bad)
        with pytest.raises(DataError, match="bad magic") as err:
            read_idx(path)
        assert str(path) in str(err.value)
    with pytest.raises(DataError, match="wrong size"):
        read_idx(_write(tmp_path / "long", good + b"\x00"))
    not_gzip = tmp_path / "not-gzip.gz"
    not_gzip.write_bytes(good)  # named .gz, stored plain
    with pytest.raises(DataError, match="not-gzip"):
        read_idx(not_gzip)


def _write_pair(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    prefix = {"train": "train", "test": "t10k"}[split]
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / f"{prefix}-images-idx3-ubyte.gz", _idx_bytes(images, 0x08, "u1"))
    _write(folder / f"{prefix}-labels-idx1-ubyte", _idx_bytes(labels, 0x08, "u1"))


def test_pair_checks_counts_and_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 5, 5), dtype=np.uint8)
    _write_pair(tmp_path, "test", images, np.array([3, 1, 4, 1], np.uint8))
    got_images, got_labels = load_idx_pair(tmp_path, "test")
    assert np.array_equal(got_images, images)
    assert got_labels.dtype == np.int64 and got_labels.tolist() == [3, 1, 4, 1]
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_idx_pair(tmp_path, "train")  # only t10k-* here
    _write_pair(tmp_path / "odd", "train", images, np.array([0, 1, 2], np.uint8))
    with pytest.raises(DataError, match="4 images but .* 3 labels"):
        load_idx_pair(tmp_path / "odd", "train")


def test_load_image_set_reads_an_idx_folder_as_grey_arrays(tmp_path: Path) -> None:
    """An IDX folder is a data set: labels as stored, grey made RGB like an (N, H, W) .npz, and
    Fashion-MNIST's names when the folder says fashion (torchvision's raw/ layout too)."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 8, 8), dtype=np.uint8)
    labels = np.array([9, 0, 0, 3, 0, 2], np.uint8)
    _write_pair(tmp_path / "mnist", "train", images, labels)
    _write_pair(tmp_path / "FashionMNIST" / "raw", "test", images[:2], labels[:2])
    train = load_image_set(tmp_path / "mnist", split="train")
    assert len(train) == 6 and train.labels.tolist() == labels.tolist()
    assert train.classes == [str(i) for i in range(10)]
    assert np.array_equal(np.asarray(train.image(3)), np.repeat(images[3][..., None], 3, axis=2))
    same_as_npz = EvalTransform((8, 8), "bicubic", (0.5,) * 3, (0.5,) * 3, 0.9)
    x = train.preprocessed(np.array([1]), same_as_npz)
    assert x.shape == (1, 3, 8, 8) and np.allclose(x[0, 0], x[0, 2])
    assert np.allclose(x[0, 0], images[1] / 255 * 2 - 1, atol=1e-6)
    test = load_image_set(tmp_path / "FashionMNIST", split="test")
    assert test.classes == list(FASHION_MNIST_CLASSES) and test.labels.tolist() == [9, 0]
    with pytest.raises(DataError, match="only train and test"):
        load_image_set(tmp_path / "mnist", split="val")


@needs_debian
def test_debian_fashion_mnist_files() -> None:
    """The published files: 60,000 / 10,000 images of 28 x 28, six / one thousand per class,
    known first labels and a fixed first image."""
    train_x, train_y = load_idx_pair(DEBIAN, "train")
    test_x, test_y = load_idx_pair(DEBIAN, "test")
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    assert train_y[:5].tolist() == [9, 0, 0, 3, 0]  # Ankle boot, T-shirt, T-shirt, Dress, ...
    assert test_y[:5].tolist() == [9, 2, 1, 1, 6]
    assert np.bincount(train_y).tolist() == [6000] * 10
    assert np.bincount(test_y).tolist() == [1000] * 10
    assert int(train_x[0].sum(dtype=np.int64)) == 76247
    digest = hashlib.sha256(train_x[0].tobytes()).hexdigest()
    assert digest == "5bd44e331a6d6998daf675700cd0c13dcd7af8ab954b7585124124da61459e7b"
    assert load_image_set(DEBIAN, split="test").classes[9] == "Ankle boot"
