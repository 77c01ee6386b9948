"""`sfprompt-export bundle --classes` names the classes, and a device matches its folders to them
by name before it connects: a missing class is fine, an unknown folder stops it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sklearn.datasets import load_sample_images

from sfprompt.data.errors import DataError
from sfprompt.edge_client.config import EdgeConfig
from sfprompt.edge_client.device import EdgeDevice
from sfprompt.export.cli import main
from sfprompt.protocol.bundle import load_manifest
from tests.bundles import SMALL_VIT

NAMES = ["bird", "cat", "dog"]
UNUSED_BROKER = "mqtt://127.0.0.1:9"  # never dialled: the device fails before connecting


def _export(out: Path, *flags: str) -> CliRunner:
    args = ["bundle", "--model", "vit_tiny_patch16_224", "--prompts", "2", "--out", str(out)]
    for key, value in SMALL_VIT.items():
        args += ["--model-arg", f"{key}={value}"]
    return CliRunner().invoke(main, [*args, *flags])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bundle whose classes are named on the command line (no --num-classes)."""
    out = tmp_path_factory.mktemp("named") / "b"
    result = _export(out, "--classes", ",".join(NAMES))
    assert result.exit_code == 0, result.output
    return out


def _folder(root: Path, names: list[str]) -> Path:
    photo = load_sample_images().images[0]
    for i, name in enumerate(names):
        (root / name).mkdir(parents=True)
        Image.fromarray(photo[40 * i : 40 * i + 48, 0:48]).save(root / name / "0.png")
    return root


def _device(bundle: Path, data: Path) -> EdgeDevice:
    config = EdgeConfig(bundle=bundle / "device", data=data, device_id="d0", broker=UNUSED_BROKER)
    return EdgeDevice(config)


@pytest.mark.slow
def test_both_bundles_name_the_classes_and_share_the_contract(bundle: Path) -> None:
    device, server = load_manifest(bundle / "device"), load_manifest(bundle / "server")
    assert device.classes == server.classes == NAMES and device.num_classes == 3
    assert device.contract_hash() == server.contract_hash()


def test_class_count_that_disagrees_is_refused_before_export(tmp_path: Path) -> None:
    result = _export(tmp_path / "b", "--classes", "a,b", "--num-classes", "3")
    assert result.exit_code != 0 and "2 names for 3 classes" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_device_without_a_class_trains_the_others_with_the_bundles_labels(
    bundle: Path, tmp_path: Path
) -> None:
    device = _device(bundle, _folder(tmp_path / "data", ["bird", "dog"]))
    images = device.data.images
    assert images.classes == NAMES
    by_folder = {p.parent.name: int(y) for p, y in zip(images._source.paths, images.labels)}
    assert by_folder == {"bird": 0, "dog": 2}  # 'dog' would be 1 in the folder's own order


@pytest.mark.slow
def test_device_refuses_a_folder_the_bundle_does_not_know(bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'zebra'.*'bird', 'cat', 'dog'"):
        _device(bundle, _folder(tmp_path / "data", ["bird", "cat", "dog", "zebra"]))


@pytest.mark.slow
def test_a_bundle_exported_before_classes_loads_with_numbered_classes(
    bundle: Path, tmp_path: Path
) -> None:
    """Its manifest.json has no `classes`: the device takes npz labels by index."""
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    path = old / "device" / "manifest.json"
    data = json.loads(path.read_text())
    del data["classes"]
    path.write_text(json.dumps(data, indent=2))
    assert load_manifest(old / "device").classes == ["0", "1", "2"]
    pixels = load_sample_images().images[1][:32, :32]
    np.savez(tmp_path / "d.npz", images=np.stack([pixels] * 2), labels=np.array([2, 0]))
    assert _device(old, tmp_path / "d.npz").data.images.labels.tolist() == [2, 0]
    np.savez(tmp_path / "e.npz", images=np.stack([pixels] * 2), labels=np.array([3, 0]))
    with pytest.raises(DataError, match="3 classes"):
        _device(old, tmp_path / "e.npz")
