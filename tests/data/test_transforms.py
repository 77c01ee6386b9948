"""EvalTransform (numpy + Pillow) gives the same model input as timm's own eval transform."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from timm.data import create_transform, resolve_data_config
from torchvision import transforms

from sfprompt.data.errors import DataError
from sfprompt.data.transforms import EvalTransform
from sfprompt.export.cut_manifest import preprocess_config
from sfprompt.export.model_loading import create_vit
from tests.bundles import SMALL_VIT


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """The two real JPEG photos sklearn ships, plus grey, RGBA, palette and odd-sized variants."""
    china, flower = (Image.fromarray(a) for a in load_sample_images().images)
    return [
        china,
        flower,
        china.convert("L"),
        flower.convert("RGBA"),
        china.convert("P"),
        flower.rotate(90, expand=True),  # portrait
        china.resize((31, 17)),  # smaller than the crop of a 32x32 model
    ]


def _manifest_config(model_args: dict) -> dict:
    """The `preprocess` dict exactly as a bundle manifest stores it (through JSON)."""
    vit = create_vit("vit_tiny_patch16_224", 10, model_args=model_args)
    return json.loads(json.dumps(preprocess_config(vit)))


MODEL_CONFIGS = {"vit_tiny_224": {}, "small_32": SMALL_VIT}


@pytest.fixture(scope="module", params=sorted(MODEL_CONFIGS))
def model_config(request: pytest.FixtureRequest) -> dict:
    return _manifest_config(MODEL_CONFIGS[request.param])


def _timm_input(transform: object, image: Image.Image) -> np.ndarray:
    """timm's transform on the image its loaders would give it (RGB)."""
    with torch.no_grad():
        return transform(image.convert("RGB")).numpy()  # type: ignore[operator]


@pytest.mark.slow
def test_the_224_config_is_timms_own() -> None:
    """The manifest of an unmodified 224 model holds what timm resolves (crop 0.9, bicubic)."""
    vit = create_vit("vit_tiny_patch16_224", 10)
    resolved = resolve_data_config({}, model=vit)
    config = _manifest_config({})
    assert config["input_size"] == list(resolved["input_size"]) == [3, 224, 224]
    assert config["crop_pct"] == resolved["crop_pct"] == 0.9
    assert config["interpolation"] == "bicubic"


def test_matches_timm_on_real_photos(model_config: dict, photos: list[Image.Image]) -> None:
    """Same values to float32 precision for both model configs and every image mode."""
    ours = EvalTransform.from_config(model_config)
    theirs = create_transform(**model_config)
    h, w = model_config["input_size"][1:]
    worst = 0.0
    for image in photos:
        got = ours(image)
        want = _timm_input(theirs, image)
        assert got.dtype == np.float32 and got.shape == (3, h, w)
        worst = max(worst, float(np.abs(got - want).max()))
    # Both resize with the same Pillow call and compute ToTensor/Normalize in float32, so the
    # difference measured is 0.0; allow float32 rounding of a differently ordered computation.
    assert worst <= 1e-6


SYNTHETIC = [
    {"crop_mode": "squash"},
    {"crop_mode": "border", "input_size": [3, 48, 32]},
    {"input_size": [3, 40, 56]},  # non-square: timm's ResizeKeepRatio path
    {"crop_pct": 1.3},  # resized image smaller than the crop: padded with black
    {"interpolation": "bilinear", "crop_pct": 0.875},
    {"interpolation": "nearest", "crop_pct": 1.0},
    {"interpolation": "lanczos", "input_size": [3, 17, 17], "crop_pct": None},
]


@pytest.mark.parametrize("change", SYNTHETIC, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_matches_timm_for_other_settings(change: dict, photos: list[Image.Image]) -> None:
    """Every crop mode, a non-square input and other filters follow timm too."""
    config = {
        "input_size": [3, 64, 64],
        "interpolation": "bicubic",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "crop_pct": 0.9,
        "crop_mode": "center",
        **change,
    }
    ours = EvalTransform.from_config(config)
    theirs = create_transform(**config)
    for image in photos:
        np.testing.assert_allclose(ours(image), _timm_input(theirs, image), rtol=0, atol=1e-6)


def test_batch_stacks_single_images(photos: list[Image.Image]) -> None:
    t = EvalTransform.from_config(_manifest_config(SMALL_VIT))
    out = t.batch(photos)
    assert out.shape == (len(photos), 3, 32, 32) and out.dtype == np.float32
    for got, image in zip(out, photos):
        np.testing.assert_array_equal(got, t(image))
    assert t.batch([]).shape == (0, 3, 32, 32)


def test_from_uint8_at_model_size_only_normalises() -> None:
    """With crop_pct 1.0 model-size arrays are neither resized nor cropped: ToTensor +
    Normalize of the pixels as they are."""
    t = EvalTransform.from_config({**_manifest_config(SMALL_VIT), "crop_pct": 1.0})
    assert t.keeps_geometry(32, 32)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    reference = transforms.Compose([transforms.ToTensor(), transforms.Normalize(t.mean, t.std)])
    want = np.stack([reference(p).numpy() for p in pixels])
    got = t.from_uint8(pixels)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("crop_pct", [0.9, 1.0])
def test_from_uint8_at_model_size_is_the_transform_of_the_same_images(crop_pct: float) -> None:
    """Model-size arrays get what the same pictures as files get: with crop_pct < 1 timm
    enlarges them and crops the centre, so arrays do too (they used to be only normalised)."""
    t = EvalTransform.from_config({**_manifest_config(SMALL_VIT), "crop_pct": crop_pct})
    photo = load_sample_images().images[0]
    pixels = np.stack([photo[i * 40 : i * 40 + 32, 100:132] for i in range(4)])
    want = t.batch([Image.fromarray(p) for p in pixels])
    np.testing.assert_array_equal(t.from_uint8(pixels), want)
    np.testing.assert_array_equal(
        t.from_uint8(pixels[..., 0]), t.batch([Image.fromarray(p[..., 0]) for p in pixels])
    )


def test_from_uint8_grey_and_rgba_become_rgb() -> None:
    t = EvalTransform.from_config(_manifest_config(SMALL_VIT))
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=3)
    np.testing.assert_array_equal(t.from_uint8(grey), t.from_uint8(rgb))
    np.testing.assert_array_equal(t.from_uint8(grey[..., None]), t.from_uint8(rgb))
    rgba = np.concatenate([rgb, rng.integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)], axis=3)
    np.testing.assert_array_equal(t.from_uint8(rgba), t.from_uint8(rgb))


@pytest.mark.parametrize("shape", [(4, 28, 28), (4, 40, 24, 3), (4, 40, 24, 4)])
def test_from_uint8_other_sizes_go_through_pillow(shape: tuple[int, ...]) -> None:
    """Arrays of another size get exactly what the same images as Pillow images get."""
    t = EvalTransform.from_config(_manifest_config(SMALL_VIT))
    pixels = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    want = t.batch([Image.fromarray(p) for p in pixels])
    np.testing.assert_array_equal(t.from_uint8(pixels), want)


def test_from_uint8_refuses_other_dtypes_and_channels() -> None:
    t = EvalTransform.from_config(_manifest_config(SMALL_VIT))
    with pytest.raises(DataError, match="uint8"):
        t.from_uint8(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(DataError, match="channels"):
        t.from_uint8(np.zeros((2, 32, 32, 2), np.uint8))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"mean": None}, "mean"),
        ({"interpolation": "cubic"}, "interpolation"),
        ({"input_size": [1, 32, 32]}, "input_size"),
        ({"crop_mode": "zoom"}, "crop_mode"),
        ({"std": [0.5, 0.0, 0.5]}, "std"),
        ({"mean": [0.5, 0.5]}, "mean"),
        ({"crop_pct": "wide"}, "malformed"),
    ],
)
def test_bad_config_names_the_field(change: dict, named: str) -> None:
    config = {**_manifest_config(SMALL_VIT), **change}
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(DataError, match=named):
        EvalTransform.from_config(config)
