"""load_image_set: each format, label order, skipped files, subsets and preprocessing."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision.datasets import ImageFolder

from sfprompt.data.datasets import load_image_set
from sfprompt.data.errors import DataError
from sfprompt.data.image_set import ImageSet
from sfprompt.data.transforms import EvalTransform

SMALL = EvalTransform(
    size=(32, 32),
    interpolation="bicubic",
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    crop_pct=0.9,
)


class Skips(list):
    """Collects `on_skip` messages."""

    def __call__(self, message: str) -> None:
        self.append(message)


def _photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """A crop of one of sklearn's real photos, so JPEG coding sees real image content."""
    photo = load_sample_images().images[seed % 2]
    rng = np.random.default_rng(seed)
    top, left = rng.integers(0, 300), rng.integers(0, 500)
    return Image.fromarray(photo[top : top + size[1], left : left + size[0]])


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Three classes (sorted as bytes: 'Dog' < 'bird' < 'cat'), JPEG/PNG/grey, a nested folder,
    one truncated JPEG, one file that is no image and one non-image file that is not looked at."""
    root = tmp_path / "folder"
    layout = {
        "cat": ["b.jpg", "a.png", "nested/c.JPEG"],
        "Dog": ["x.png", "y.bmp"],
        "bird": ["grey.png", "z.webp"],
    }
    seed = 0
    for cls, files in layout.items():
        for name in files:
            path = root / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            image = _photo(seed, (40 + seed, 30 + 2 * seed))
            (image.convert("L") if "grey" in name else image).save(path)
            seed += 1
    buf = io.BytesIO()
    _photo(9, (200, 150)).save(buf, "JPEG")  # cut in the scan data, which verify() never reads
    (root / "cat" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "Dog" / "fake.png").write_bytes(b"not an image at all")
    (root / "Dog" / "notes.txt").write_text("ignored: not an image extension")
    return root


def test_image_folder_matches_torchvision(image_folder: Path) -> None:
    """Same classes, files and labels as torchvision's ImageFolder, less the two bad files."""
    skips = Skips()
    data = load_image_set(image_folder, on_skip=skips)
    tv = ImageFolder(str(image_folder))
    good = [(p, y) for p, y in tv.samples if not p.endswith(("truncated.jpg", "fake.png"))]
    assert data.classes == tv.classes == ["Dog", "bird", "cat"]
    assert len(data) == len(good) == 7
    np.testing.assert_array_equal(data.labels, [y for _, y in good])
    assert data.labels.dtype == np.int64
    for i, (path, _) in enumerate(good):
        with Image.open(path) as im:
            np.testing.assert_array_equal(np.asarray(data.image(i)), np.asarray(im.convert("RGB")))
    assert data.image(i).mode == "RGB"


def test_bad_images_are_named_and_skipped(image_folder: Path) -> None:
    skips = Skips()
    load_image_set(image_folder, on_skip=skips)
    assert len(skips) == 2
    assert any("truncated.jpg" in m for m in skips)
    assert any("fake.png" in m for m in skips)


def test_skips_are_logged_by_default(image_folder: Path) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("sfprompt.data.datasets")
    logger.addHandler(handler)
    try:
        load_image_set(image_folder)
    finally:
        logger.removeHandler(handler)
    assert [r.levelno for r in records] == [logging.WARNING] * 2
    assert any("truncated.jpg" in r.getMessage() for r in records)


def test_image_folder_preprocessed_is_the_transform_per_image(image_folder: Path) -> None:
    data = load_image_set(image_folder, on_skip=lambda _: None)
    indices = np.array([6, 0, 3, 3])
    got = data.preprocessed(indices, SMALL)
    assert got.shape == (4, 3, 32, 32) and got.dtype == np.float32
    for row, i in zip(got, indices):
        np.testing.assert_array_equal(row, SMALL(data.image(int(i))))


def test_image_folder_split_folders(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("test", 1)):
        for k in range(n):
            path = tmp_path / split / f"c{k % 2}" / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            _photo(k, (20, 20)).save(path)
    assert len(load_image_set(tmp_path, split="train")) == 3
    assert len(load_image_set(tmp_path, split="test")) == 1
    with pytest.raises(DataError, match="val"):
        load_image_set(tmp_path, split="val")


def test_only_bad_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    skips = Skips()
    with pytest.raises(DataError, match="no usable images"):
        load_image_set(tmp_path, on_skip=skips)
    assert any("broken.jpg" in m for m in skips)


# --- CIFAR binary -----------------------------------------------------------------------------


def _cifar_records(n: int, labels: list[np.ndarray], seed: int) -> tuple[bytes, np.ndarray]:
    """`n` records of label bytes + R, G, B planes; returns the bytes and (n, 32, 32, 3) images."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    planes = images.transpose(0, 3, 1, 2).reshape(n, -1)
    header = np.stack(labels, axis=1).astype(np.uint8)
    return np.concatenate([header, planes], axis=1).tobytes(), images


def _write_cifar10(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for seed, (name, n) in enumerate((("data_batch_2", 4), ("data_batch_1", 5), ("test_batch", 3))):
        labels = np.random.default_rng(100 + seed).integers(0, 10, n)
        raw, images = _cifar_records(n, [labels], seed)
        (folder / f"{name}.bin").write_bytes(raw)
        written[name] = (images, labels)
    (folder / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n\n")
    return written


@pytest.mark.parametrize("given", ["batches", "archive_root"])
def test_cifar10_train_and_test(tmp_path: Path, given: str) -> None:
    """Batches 1, 2 in order, labels and pixels as written; the extracted-archive root works."""
    written = _write_cifar10(tmp_path / "cifar-10-batches-bin")
    path = tmp_path / "cifar-10-batches-bin" if given == "batches" else tmp_path
    train = load_image_set(path, split="train")
    images = np.concatenate([written["data_batch_1"][0], written["data_batch_2"][0]])
    labels = np.concatenate([written["data_batch_1"][1], written["data_batch_2"][1]])
    assert train.classes == [f"class{i}" for i in range(10)]
    np.testing.assert_array_equal(train.labels, labels)
    for i in (0, 4, 5, 8):  # both sides of the file boundary
        np.testing.assert_array_equal(np.asarray(train.image(i)), images[i])
    test = load_image_set(path, split="test")
    np.testing.assert_array_equal(test.labels, written["test_batch"][1])


def test_cifar_preprocessed_uses_the_pixels(tmp_path: Path) -> None:
    """At the model's size the fast path normalises the stored pixels, across file boundaries."""
    written = _write_cifar10(tmp_path)
    data = load_image_set(tmp_path)
    images = np.concatenate([written["data_batch_1"][0], written["data_batch_2"][0]])
    idx = np.array([8, 0, 5, 4])
    np.testing.assert_array_equal(data.preprocessed(idx, SMALL), SMALL.from_uint8(images[idx]))
    bigger = EvalTransform((48, 48), "bilinear", (0.5,) * 3, (0.25,) * 3, 0.875)
    want = bigger.batch([data.image(int(i)) for i in idx])
    np.testing.assert_array_equal(data.preprocessed(idx, bigger), want)


def test_cifar_file_of_wrong_size_is_skipped(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    (tmp_path / "data_batch_3.bin").write_bytes(bytes(3073 * 2 + 100))
    skips = Skips()
    data = load_image_set(tmp_path, on_skip=skips)
    assert len(data) == 9
    assert len(skips) == 1 and "data_batch_3.bin" in skips[0]


def test_cifar_with_no_good_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "test_batch.bin").write_bytes(bytes(1000))
    skips = Skips()
    with pytest.raises(DataError, match="no usable CIFAR"):
        load_image_set(tmp_path, split="test", on_skip=skips)
    assert "test_batch.bin" in skips[0]


def test_cifar100_uses_the_fine_label(tmp_path: Path) -> None:
    fine = np.array([99, 3, 42, 7])
    coarse = np.array([19, 0, 5, 1])
    raw, images = _cifar_records(4, [coarse, fine], seed=5)
    (tmp_path / "train.bin").write_bytes(raw)
    (tmp_path / "test.bin").write_bytes(raw[: 2 * 3074])
    data = load_image_set(tmp_path)
    np.testing.assert_array_equal(data.labels, fine)
    assert data.classes == [str(i) for i in range(100)]
    np.testing.assert_array_equal(np.asarray(data.image(2)), images[2])
    assert len(load_image_set(tmp_path, split="test")) == 2


# --- npz ----------------------------------------------------------------------------------------


def test_npz_uint8_with_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    labels = np.array([2, 0, 1, 2, 0, 1])
    np.savez(tmp_path / "d.npz", images=images, labels=labels, classes=np.array(["a", "b", "c"]))
    data = load_image_set(tmp_path / "d.npz")
    assert data.classes == ["a", "b", "c"]
    np.testing.assert_array_equal(data.labels, labels)
    np.testing.assert_array_equal(np.asarray(data.image(3)), images[3])
    np.testing.assert_array_equal(data.preprocessed(np.arange(6), SMALL), SMALL.from_uint8(images))


def test_npz_grey_float_other_size(tmp_path: Path) -> None:
    """Float [0, 1] grey images of another size: stored as uint8, each resized with Pillow."""
    images = np.random.default_rng(1).random((4, 20, 24))
    np.savez_compressed(tmp_path / "g.npz", images=images, labels=np.array([0, 3, 1, 1]))
    data = load_image_set(tmp_path / "g.npz")
    assert data.classes == ["0", "1", "2", "3"]
    pixels = np.rint(images * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(data.image(1))[..., 0], pixels[1])
    want = SMALL.batch([Image.fromarray(p) for p in pixels[[3, 1]]])
    np.testing.assert_array_equal(data.preprocessed(np.array([3, 1]), SMALL), want)


def test_npz_directory_by_split(tmp_path: Path) -> None:
    for split, n in (("train", 5), ("test", 2)):
        np.savez(
            tmp_path / f"{split}.npz",
            images=np.zeros((n, 8, 8, 3), np.uint8),
            labels=np.zeros(n, int),
        )
    assert len(load_image_set(tmp_path)) == 5
    assert len(load_image_set(tmp_path, split="test")) == 2
    with pytest.raises(DataError, match="val.npz"):
        load_image_set(tmp_path, split="val")


@pytest.mark.parametrize(
    ("arrays", "named"),
    [
        ({"images": np.zeros((3, 8, 8, 3), np.uint8)}, "labels"),
        (
            {"images": np.zeros((3, 8, 8, 3), np.uint8), "labels": np.zeros(4, int)},
            "3 images but 4",
        ),
        ({"images": np.full((2, 8, 8), 1.5), "labels": np.zeros(2, int)}, r"\[0, 1\]"),
        ({"images": np.zeros((2, 8, 8, 2), np.uint8), "labels": np.zeros(2, int)}, "C = 1, 3 or 4"),
        ({"images": np.zeros((2, 8, 8), np.uint8), "labels": np.zeros(2)}, "integers"),
        (
            {
                "images": np.zeros((2, 8, 8), np.uint8),
                "labels": np.array([0, 2]),
                "classes": np.array(["a"]),
            },
            "class names",
        ),
        (
            {
                "images": np.zeros((2, 8, 8), np.uint8),
                "labels": np.zeros(2, int),
                "classes": np.array([{}]),
            },
            "cannot read",
        ),
    ],
)
def test_bad_npz_names_the_file_and_the_problem(tmp_path: Path, arrays: dict, named: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # an object array is pickled here, and refused when read
    with pytest.raises(DataError, match=named) as err:
        load_image_set(path)
    assert "bad.npz" in str(err.value)


def test_empty_npz_is_an_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "e.npz", images=np.zeros((0, 8, 8, 3), np.uint8), labels=np.zeros(0, int))
    with pytest.raises(DataError, match="no usable images"):
        load_image_set(tmp_path / "e.npz")


# --- layout, subsets ----------------------------------------------------------------------------


def test_unknown_layouts_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no data set found"):
        load_image_set(tmp_path)
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="not an .npz"):
        load_image_set(tmp_path / "x.txt")
    with pytest.raises(DataError, match="no such file"):
        load_image_set(tmp_path / "missing")
    with pytest.raises(DataError, match="split"):
        load_image_set(tmp_path, split="training")


def test_subset_keeps_order_labels_and_classes(tmp_path: Path) -> None:
    images = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    data = ImageSet.from_arrays(images, np.arange(10) % 3, ["a", "b", "c"])
    part = data.subset(np.array([7, 2, 9]))
    assert len(part) == 3 and part.classes == data.classes
    np.testing.assert_array_equal(part.labels, [1, 2, 0])
    assert np.asarray(part.image(0))[0, 0, 0] == 7
    inner = part.subset(np.array([2, 0]))
    assert [np.asarray(inner.image(i))[0, 0, 0] for i in range(2)] == [9, 7]
    np.testing.assert_array_equal(
        inner.preprocessed(np.array([0]), SMALL), data.preprocessed(np.array([9]), SMALL)
    )
    assert len(data.subset(np.array([], np.int64))) == 0
    with pytest.raises(IndexError):
        part.subset(np.array([3]))
    with pytest.raises(IndexError):
        part.image(3)


def test_subset_of_image_folder_reads_the_right_files(image_folder: Path) -> None:
    data = load_image_set(image_folder, on_skip=lambda _: None)
    part = data.subset(np.array([5, 1]))
    np.testing.assert_array_equal(part.labels, data.labels[[5, 1]])
    np.testing.assert_array_equal(np.asarray(part.image(0)), np.asarray(data.image(5)))


def test_hidden_folders_and_files_are_not_data(tmp_path: Path) -> None:
    """Unlike torchvision, '.ipynb_checkpoints' is no class and '._x.png' (macOS) no image."""
    for name in ("a/one.png", ".ipynb_checkpoints/two.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        _photo(0, (16, 16)).save(tmp_path / name)
    (tmp_path / "a" / "._one.png").write_bytes(b"AppleDouble metadata")
    skips = Skips()
    data = load_image_set(tmp_path, on_skip=skips)
    assert data.classes == ["a"] and len(data) == 1 and not skips
