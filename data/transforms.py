"""timm's eval transform in numpy and Pillow, so a device without torch feeds the model exactly
what timm would.

`timm.data.create_transform(**resolve_data_config({}, model=vit))` (eval mode) is: resize
(torchvision rules, Pillow filters: torchvision resizes PIL images with Pillow), centre crop,
`ToTensor` (uint8 / 255 in float32), `Normalize` ((x - mean) / std in float32). Each step below
copies torchvision's and timm's arithmetic (including Python's `round` and `int` truncation), so
the result is the same to the bit on the same Pillow version.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .errors import DataError

# timm's interpolation names -> Pillow filters (timm/data/transforms.py, _pil_interpolation_to_str).
FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
CROP_MODES = ("center", "squash", "border")
DEFAULT_CROP_PCT = 0.875  # timm.data.constants.DEFAULT_CROP_PCT, used when crop_pct is null


@dataclass(frozen=True)
class EvalTransform:
    """Resize, centre-crop and normalise an image the way timm evaluates the model.

    Build it with `from_config` from the bundle manifest's `preprocess` dict.
    """

    size: tuple[int, int]  # (H, W) the model takes
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise DataError(f"preprocess input size must be two positive ints, got {self.size}")
        if self.interpolation not in FILTERS:
            raise DataError(
                f"preprocess interpolation {self.interpolation!r} is not one of {sorted(FILTERS)}"
            )
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != 3:
                raise DataError(f"preprocess {name} needs 3 values (RGB), got {list(values)}")
        if min(self.std) <= 0:
            raise DataError(f"preprocess std must be positive, got {list(self.std)}")
        if not self.crop_pct > 0:
            raise DataError(f"preprocess crop_pct must be positive, got {self.crop_pct}")
        if self.crop_mode not in CROP_MODES:
            raise DataError(f"preprocess crop_mode {self.crop_mode!r} is not one of {CROP_MODES}")

    @classmethod
    def from_config(cls, preprocess: Mapping[str, Any]) -> EvalTransform:
        """Read timm's `resolve_data_config` output (as the manifest stores it).

        Raises `DataError` naming a missing or malformed field; only 3-channel models are
        supported, as timm's loaders hand the model RGB images.
        """
        missing = [k for k in ("input_size", "interpolation", "mean", "std") if k not in preprocess]
        if missing:
            raise DataError(f"preprocess config lacks {missing}; it has {sorted(preprocess)}")
        input_size = list(preprocess["input_size"])
        if len(input_size) != 3 or input_size[0] != 3:
            raise DataError(f"preprocess input_size must be [3, H, W], got {input_size}")
        try:
            size = (int(input_size[1]), int(input_size[2]))
            mean = tuple(float(v) for v in preprocess["mean"])
            std = tuple(float(v) for v in preprocess["std"])
            crop_pct = float(preprocess.get("crop_pct") or DEFAULT_CROP_PCT)
        except (TypeError, ValueError) as err:
            raise DataError(f"preprocess config has a malformed value: {err}") from err
        return cls(
            size=size,
            interpolation=str(preprocess["interpolation"]),
            mean=mean,  # type: ignore[arg-type]  # length checked in __post_init__
            std=std,  # type: ignore[arg-type]
            crop_pct=crop_pct,
            crop_mode=str(preprocess.get("crop_mode") or "center"),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one output."""
        return (3, *self.size)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """(3, H, W) float32 from any Pillow image (made RGB first, as timm's loaders do)."""
        return self._normalise(np.asarray(self.resize_crop(image))[None])[0]

    def batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, 3, H, W) float32."""
        if not images:
            return np.empty((0, *self.shape), np.float32)
        pixels = np.stack([np.asarray(self.resize_crop(im)) for im in images])
        return self._normalise(pixels)

    def from_uint8(self, array: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 from an (N, H, W, C) or (N, H, W) uint8 array (C = 1, 3 or 4).

        Exactly what `batch` gives the same images as Pillow images, so that an .npz, CIFAR or
        IDX file feeds the model what an ImageFolder of the same pictures does (a model-size
        image too is enlarged by 1 / crop_pct and centre-cropped, as timm does). Where the
        transform leaves the images' geometry as it is (model-size images and crop_pct 1.0),
        Pillow is skipped and the pixels are only scaled and normalised.
        """
        array = np.asarray(array)
        if array.dtype != np.uint8 or array.ndim not in (3, 4):
            raise DataError(
                f"from_uint8 needs an (N, H, W[, C]) uint8 array, got {array.dtype} {array.shape}"
            )
        if array.ndim == 4 and array.shape[3] not in (1, 3, 4):
            raise DataError(f"from_uint8 needs 1, 3 or 4 channels, got shape {array.shape}")
        if not self.keeps_geometry(array.shape[1], array.shape[2]):
            return self.batch([to_pil(a) for a in array])
        if array.ndim == 3:
            array = array[..., None]
        if array.shape[3] == 1:  # grey -> RGB copies the value, as Pillow's convert("RGB") does
            array = np.repeat(array, 3, axis=3)
        return self._normalise(array[..., :3])  # RGBA -> RGB drops alpha, as Pillow does

    def resize_crop(self, image: Image.Image) -> Image.Image:
        """The geometric part: an RGB image of the model's size."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        image = _resize(image, self.resize_size(image.height, image.width), self.interpolation)
        fill: tuple[int, ...] = (0, 0, 0)
        if self.crop_mode == "border":
            fill = tuple(round(255 * v) for v in self.mean)
        return _center_crop_or_pad(image, self.size, fill)

    def resize_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) the resize step gives an image of this size, before the crop."""
        target_h, target_w = self.size
        scale = (math.floor(target_h / self.crop_pct), math.floor(target_w / self.crop_pct))
        if self.crop_mode == "squash":
            return scale
        if self.crop_mode == "border":
            return _keep_ratio(height, width, scale, 1.0)
        if scale[0] == scale[1]:  # torchvision Resize(int): shorter side to `scale`
            return _shorter_side(height, width, scale[0])
        return _keep_ratio(height, width, scale, 0.0)

    def keeps_geometry(self, height: int, width: int) -> bool:
        """Whether `resize_crop` returns an image of this size unchanged (neither resized nor
        cropped): it is the model's size and the resize target (crop_pct 1.0)."""
        size = (int(height), int(width))
        return size == self.size and self.resize_size(*size) == size

    def _normalise(self, pixels: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, in ToTensor's and Normalize's order."""
        x = pixels.astype(np.float32) / np.float32(255)
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        x = (x - mean) / std  # (N, H, W, 3)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def to_pil(pixels: np.ndarray) -> Image.Image:
    """An RGB Pillow image from one (H, W) or (H, W, C) uint8 array, C = 1, 3 or 4."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    return Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")


def _shorter_side(h: int, w: int, short: int) -> tuple[int, int]:
    """torchvision `_compute_resized_output_size` for one size: the longer side truncated."""
    if w <= h:
        return int(short * h / w), short
    return short, int(short * w / h)


def _keep_ratio(h: int, w: int, target: tuple[int, int], longest: float) -> tuple[int, int]:
    """timm `ResizeKeepRatio.get_params` without the random parts: the (H, W) to resize to."""
    ratio_h = h / target[0]
    ratio_w = w / target[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return round(h * 1.0 / ratio), round(w * 1.0 / ratio)


def _resize(image: Image.Image, size: tuple[int, int], interpolation: str) -> Image.Image:
    """Resize to (H, W); torchvision leaves an image already of that size untouched."""
    if (image.height, image.width) == size:
        return image
    return image.resize((size[1], size[0]), FILTERS[interpolation])


def _center_crop_or_pad(
    image: Image.Image, size: tuple[int, int], fill: tuple[int, ...]
) -> Image.Image:
    """torchvision `center_crop` (timm `center_crop_or_pad` with a fill): pad if too small."""
    crop_h, crop_w = size
    if crop_w > image.width or crop_h > image.height:
        left = (crop_w - image.width) // 2 if crop_w > image.width else 0
        top = (crop_h - image.height) // 2 if crop_h > image.height else 0
        right = (crop_w - image.width + 1) // 2 if crop_w > image.width else 0
        bottom = (crop_h - image.height + 1) // 2 if crop_h > image.height else 0
        padded_size = (image.width + left + right, image.height + top + bottom)
        padded = Image.new(image.mode, padded_size, fill)
        padded.paste(image, (left, top))
        image = padded
        if (image.height, image.width) == size:
            return image
    top = int(round((image.height - crop_h) / 2.0))
    left = int(round((image.width - crop_w) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))
