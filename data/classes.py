"""Class names: the bundle fixes which logit is which class, and every data set is mapped to it.

A data set numbers its own classes (an ImageFolder by its sorted folder names), so two devices
whose folders differ would number the same class differently. `align_classes` relabels a set
with the bundle's indices by name: a device without some class trains on the others with their
right labels, and a folder the bundle does not know stops the device before any training
instead of shifting every label or failing mid-round inside onnxruntime.

Data that names no classes (an .npz without `classes`, MNIST's IDX files: their names are the
label numbers "0".."k-1") is taken by index, and a label beyond the bundle's classes is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .datasets import class_names
from .errors import DataError
from .image_set import ImageSet

Report = Callable[[str], None]
_log = logging.getLogger(__name__)


def numbered(count: int) -> list[str]:
    """The names of classes nobody named: their indices, "0".."count-1"."""
    return [str(i) for i in range(count)]


def is_numbered(classes: Sequence[str]) -> bool:
    """Whether the names are just the label numbers, i.e. the data named no classes."""
    return list(classes) == numbered(len(classes))


def align_classes(images: ImageSet, classes: Sequence[str], report: Report) -> ImageSet:
    """`images` with labels that index `classes` (a bundle's), matched by name.

    Classes of the bundle that have no image are named through `report` (a device of a
    non-IID federation often lacks some). Raises `DataError` (a
    ValueError) for a class with images that the bundle does not know, or, for data that names
    no classes, a label past the bundle's last class. A bundle whose own names are only numbers
    (exported without `--classes`) takes named data by position, with a warning, and only when
    the data has exactly its number of classes (otherwise labels would shift: refused).
    """
    classes = list(classes)
    used = np.unique(images.labels)
    own = [images.classes[i] for i in used]
    unknown = [name for name in own if name not in classes]
    if is_numbered(images.classes) or (unknown and is_numbered(classes)):
        if unknown and not is_numbered(images.classes):
            _check_same_count(images, classes)
            _log.warning(
                "%s: the bundle names no classes, so %s are taken by position (label order); "
                "export with --classes to have them matched by name",
                images.description,
                _names(images.classes),
            )
        aligned = _by_index(images, classes)
    elif unknown:
        raise DataError(
            f"{images.description} has images of {_names(unknown)} that the bundle does not "
            f"know; its {len(classes)} classes are {_names(classes)}. Remove or rename those "
            "folders, or export a bundle with these classes (--classes)"
        )
    else:
        index = {name: i for i, name in enumerate(classes)}
        table = np.array([index.get(name, -1) for name in images.classes], np.int64)
        aligned = images.relabelled(table[images.labels], classes)
    _report_missing(aligned, classes, report)
    return aligned


def read_class_names(spec: str) -> list[str]:
    """Class names from `--classes`: a text file (one name a line), a data set (its ImageFolder
    folders, CIFAR's names, an .npz's `classes`) or names separated by commas."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() != ".npz":
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    elif path.exists():
        names = class_names(path)
    elif "," in spec:
        names = [name.strip() for name in spec.split(",")]
    else:
        raise DataError(
            f"--classes {spec!r}: no such file or folder; give a file with one name a line, "
            "a data folder, or the names separated by commas (a,b,c)"
        )
    if not names or not all(names):
        raise DataError(f"--classes {spec!r} gives an empty class name or none at all")
    return names


def _check_same_count(images: ImageSet, classes: list[str]) -> None:
    """Named data on a bundle that names no classes is taken by position, which is right only
    when the data has exactly the bundle's number of classes: one folder fewer or more shifts
    every label after it."""
    if len(images.classes) != len(classes):
        raise DataError(
            f"{images.description} has {len(images.classes)} classes ({_names(images.classes)}) "
            f"and the bundle {len(classes)} with no names: taken by position, labels would "
            "shift. Export the bundle with --classes (a names file, a data folder or a,b,c) "
            "so that devices map their folders by name"
        )


def _by_index(images: ImageSet, classes: list[str]) -> ImageSet:
    """Labels kept as they are, refused when one has no class in the bundle."""
    top = int(images.labels.max(initial=-1))
    if top >= len(classes):
        raise DataError(
            f"{images.description} has label {top}, but the bundle has {len(classes)} classes "
            f"(labels 0..{len(classes) - 1}): {_names(classes)}"
        )
    return images.relabelled(images.labels, classes)


def _report_missing(images: ImageSet, classes: list[str], report: Report) -> None:
    """Name the bundle's classes of which the set has no image (fine: others hold them)."""
    counts = np.bincount(images.labels, minlength=len(classes))
    missing = [classes[i] for i in np.flatnonzero(counts == 0)]
    if missing:
        what = "class" if len(missing) == 1 else "classes"
        report(f"{images.description}: no images of {what} {_names(missing)}")


def _names(names: Sequence[str], most: int = 20) -> str:
    """'a', 'b', 'c' (and N more)."""
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")
