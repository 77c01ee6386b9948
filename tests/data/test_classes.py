"""align_classes: a data set's labels become the bundle's, by class name; the same pictures give
the same model input whether they come as image files or as arrays."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from sfprompt.data.classes import align_classes, read_class_names
from sfprompt.data.datasets import class_names, load_image_set
from sfprompt.data.errors import DataError
from sfprompt.data.transforms import EvalTransform

BUNDLE = ["bird", "cat", "dog"]  # the bundle's classes, in logit order
MODEL = EvalTransform(
    size=(32, 32), interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.9
)


class Reports(list):
    """Collects `report` messages."""

    def __call__(self, message: str) -> None:
        self.append(message)


def _pictures(count: int, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """(count, H, W, 3) uint8 crops of sklearn's real photos, different from each other."""
    photos = load_sample_images().images
    h, w = size
    return np.stack([photos[i % 2][7 * i : 7 * i + h, 11 * i : 11 * i + w] for i in range(count)])


def _image_folder(root: Path, layout: dict[str, int]) -> Path:
    """One folder per class with `layout[name]` PNGs (lossless: pixels survive the round trip)."""
    pictures = iter(_pictures(sum(layout.values())))
    for name, count in layout.items():
        (root / name).mkdir(parents=True)
        for k in range(count):
            Image.fromarray(next(pictures)).save(root / name / f"{k}.png")
    return root


def _labels_by_class(images, names: list[str]) -> dict[str, set[int]]:
    """The labels the images of each named class folder ended with."""
    paths = images._source.paths
    return {n: {int(y) for p, y in zip(paths, images.labels) if p.parent.name == n} for n in names}


def test_folder_missing_a_class_keeps_the_others_labels(tmp_path: Path) -> None:
    """No 'cat' folder: 'dog' stays label 2 (its own sorted order would make it 1)."""
    root = _image_folder(tmp_path / "data", {"bird": 2, "dog": 3})
    own = load_image_set(root)
    assert own.classes == ["bird", "dog"]  # what a device used to train with
    reports = Reports()
    aligned = align_classes(own, BUNDLE, reports)
    assert aligned.classes == BUNDLE
    assert _labels_by_class(aligned, ["bird", "dog"]) == {"bird": {0}, "dog": {2}}
    assert len(aligned) == len(own)
    assert reports == [f"{root}: no images of class 'cat'"]


def test_folder_in_another_order_is_matched_by_name(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "data", {"bird": 1, "cat": 1, "dog": 1})
    aligned = align_classes(load_image_set(root), ["dog", "bird", "cat"], Reports())
    assert _labels_by_class(aligned, BUNDLE) == {"bird": {1}, "cat": {2}, "dog": {0}}


def test_folder_the_bundle_does_not_know_is_refused(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "data", {"bird": 1, "cat": 1, "dog": 1, "zebra": 2})
    with pytest.raises(DataError, match="'zebra'") as err:
        align_classes(load_image_set(root), BUNDLE, Reports())
    assert "'bird', 'cat', 'dog'" in str(err.value)  # the bundle's classes, to compare with
    assert isinstance(err.value, ValueError)


def test_empty_unknown_folder_is_not_refused(tmp_path: Path) -> None:
    """Only images are labelled: an unknown folder holding none cannot mislabel anything."""
    root = _image_folder(tmp_path / "data", {"bird": 1, "cat": 1, "dog": 1})
    (root / "empty").mkdir()
    aligned = align_classes(load_image_set(root, on_skip=lambda _: None), BUNDLE, Reports())
    assert sorted(aligned.labels.tolist()) == [0, 1, 2]


def test_npz_without_names_is_taken_by_index(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", images=_pictures(3), labels=np.array([2, 0, 2]))
    reports = Reports()
    aligned = align_classes(load_image_set(tmp_path / "d.npz"), BUNDLE, reports)
    assert aligned.labels.tolist() == [2, 0, 2] and aligned.classes == BUNDLE
    assert reports == [f"{tmp_path / 'd.npz'}: no images of class 'cat'"]


def test_npz_label_past_the_bundles_classes_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", images=_pictures(3), labels=np.array([0, 3, 1]))
    with pytest.raises(DataError, match="label 3, but the bundle has 3 classes"):
        align_classes(load_image_set(tmp_path / "d.npz"), BUNDLE, Reports())


def test_npz_with_names_is_matched_by_name(tmp_path: Path) -> None:
    np.savez(
        tmp_path / "d.npz",
        images=_pictures(3),
        labels=np.array([0, 1, 1]),
        classes=np.array(["dog", "bird"]),
    )
    aligned = align_classes(load_image_set(tmp_path / "d.npz"), BUNDLE, Reports())
    assert aligned.labels.tolist() == [2, 0, 0]


def test_cifar_names_from_its_meta_file_are_matched_by_name(tmp_path: Path) -> None:
    """CIFAR-10 binary with batches.meta.txt; the bundle lists the ten names in reverse."""
    names = [f"class{i}" for i in range(10)]
    labels = np.array([0, 3, 9, 3], np.uint8)
    pixels = np.zeros((4, 3072), np.uint8)
    (tmp_path / "data_batch_1.bin").write_bytes(np.column_stack([labels, pixels]).tobytes())
    (tmp_path / "batches.meta.txt").write_text("\n".join(names) + "\n")
    aligned = align_classes(load_image_set(tmp_path), names[::-1], Reports())
    assert aligned.labels.tolist() == [9, 6, 0, 6]


def test_unnamed_bundle_takes_a_named_folder_by_position_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bundle exported without --classes ("0", "1", "2") keeps the old behaviour, loudly."""
    root = _image_folder(tmp_path / "data", {"bird": 1, "cat": 1, "dog": 1})
    with caplog.at_level(logging.WARNING, "sfprompt.data.classes"):
        aligned = align_classes(load_image_set(root), ["0", "1", "2"], Reports())
    assert _labels_by_class(aligned, BUNDLE) == {"bird": {0}, "cat": {1}, "dog": {2}}
    assert "--classes" in caplog.text
    extra = _image_folder(tmp_path / "more", {"a": 1, "b": 1, "c": 1, "d": 1})
    with pytest.raises(DataError, match="has 4 classes .* labels would shift"):
        align_classes(load_image_set(extra), ["0", "1", "2"], Reports())
    fewer = _image_folder(tmp_path / "fewer", {"cat": 1, "dog": 1})  # no bird: all would shift
    with pytest.raises(DataError, match="has 2 classes .* --classes"):
        align_classes(load_image_set(fewer), ["0", "1", "2"], Reports())


def test_npz_preprocess_equals_image_folder_preprocess(tmp_path: Path) -> None:
    """The same model-size photos as PNG files and as an .npz of their raw arrays give the same
    model input (arrays used to skip the resize-and-crop: mean difference 0.13 at 224 px)."""
    root = _image_folder(tmp_path / "data", {"bird": 2, "cat": 2, "dog": 2})
    folder = load_image_set(root)
    pixels = np.stack([np.asarray(Image.open(p)) for p in folder._source.paths])
    np.savez(tmp_path / "same.npz", images=pixels, labels=folder.labels)
    arrays = load_image_set(tmp_path / "same.npz")
    rows = np.arange(len(folder))
    np.testing.assert_array_equal(
        arrays.preprocessed(rows, MODEL), folder.preprocessed(rows, MODEL)
    )


def test_class_names_of_a_folder_are_read_without_decoding(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for name in ("dog", "Cat", "bird"):
        (root / name).mkdir(parents=True)
        (root / name / "broken.jpg").write_bytes(b"not decoded by class_names")
    assert class_names(root) == ["Cat", "bird", "dog"]  # torchvision's (byte) order


def test_read_class_names_from_a_list_a_file_or_a_data_folder(tmp_path: Path) -> None:
    assert read_class_names("bird, cat,dog") == BUNDLE
    (tmp_path / "names.txt").write_text("bird\ncat\n\ndog\n")
    assert read_class_names(str(tmp_path / "names.txt")) == BUNDLE
    root = _image_folder(tmp_path / "data", {"dog": 1, "bird": 1, "cat": 1})
    assert read_class_names(str(root)) == BUNDLE
    np.savez(tmp_path / "d.npz", images=_pictures(1), labels=[0], classes=np.array(BUNDLE))
    assert read_class_names(str(tmp_path / "d.npz")) == BUNDLE
    with pytest.raises(DataError, match="no such file"):
        read_class_names(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="empty"):
        read_class_names("bird,,dog")
