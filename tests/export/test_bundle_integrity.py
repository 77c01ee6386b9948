"""Bundles refuse to load when damaged, foreign or newer, and the CLI says why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from sfprompt.export.cli import main
from sfprompt.export.config import ModelError
from sfprompt.export.model_loading import create_vit, load_checkpoint
from sfprompt.export.split_vit import PROMPT_KEY
from sfprompt.protocol.bundle import BundleError, load_manifest
from sfprompt.protocol.version import PROTOCOL_VERSION
from tests.bundles import SMALL_VIT, Exported, ExportedCases


@pytest.fixture(scope="module")
def small(exported_cases: ExportedCases) -> Exported:
    return exported_cases["token_m0"]


def copy_bundle(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "device"
    shutil.copytree(src, dst)
    return dst


def test_a_clean_bundle_loads_with_its_cut_and_tail_input(small) -> None:
    manifest = load_manifest(small.result.device_dir, role="device")
    assert manifest.protocol_version == PROTOCOL_VERSION
    assert (manifest.head_blocks, manifest.tail_blocks, manifest.prompts) == (1, 0, 4)
    # With no tail blocks the tail reads only the class token: only it crosses the network.
    assert manifest.tail_input.kind == "prefix_tokens" and manifest.tail_input.count == 1
    assert manifest.preprocess["input_size"] == [3, 32, 32]
    order = [s.name for s in manifest.graphs["tail_step"].inputs if s.name.startswith("tail.")]
    assert [k for k in manifest.parameters if k != PROMPT_KEY] == order


def test_a_flipped_byte_is_refused_naming_the_file(small, tmp_path: Path) -> None:
    bundle = copy_bundle(small.result.device_dir, tmp_path)
    path = bundle / "head_vjp.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="head_vjp.onnx is corrupt"):
        load_manifest(bundle)


def test_a_missing_file_is_refused(small, tmp_path: Path) -> None:
    bundle = copy_bundle(small.result.device_dir, tmp_path)
    (bundle / "tail_step.onnx").unlink()
    with pytest.raises(BundleError, match="tail_step.onnx is missing"):
        load_manifest(bundle)


def test_a_bundle_from_a_newer_protocol_is_refused(small, tmp_path: Path) -> None:
    bundle = copy_bundle(small.result.device_dir, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["protocol_version"] = PROTOCOL_VERSION + 1
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="upgrade sfprompt"):
        load_manifest(bundle)


def test_a_server_bundle_is_not_taken_for_a_device_bundle(small) -> None:
    with pytest.raises(BundleError, match="is a server bundle"):
        load_manifest(small.result.server_dir, role="device")


def test_a_fitting_checkpoint_loads_and_a_foreign_one_is_refused(tmp_path: Path) -> None:
    source = create_vit("vit_tiny_patch16_224", 7, model_args=SMALL_VIT)
    path = tmp_path / "ok.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    target = create_vit("vit_tiny_patch16_224", 7, checkpoint=path, model_args=SMALL_VIT)
    assert torch.equal(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)

    wrong = create_vit("vit_tiny_patch16_224", 7, model_args={**SMALL_VIT, "depth": 3})
    pth = tmp_path / "wrong.pth"
    torch.save({"state_dict": wrong.state_dict()}, pth)
    with pytest.raises(ModelError, match=r"missing 12 keys \(e.g. blocks.3"):
        load_checkpoint(target, pth)


def test_cli_reports_user_mistakes_without_a_traceback(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        main, ["bundle", "--model", "vit_does_not_exist", "--out", str(tmp_path)]
    )
    assert result.exit_code != 0 and "unknown timm model" in result.output
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    result = runner.invoke(
        main, ["bundle", "--model", "vit_tiny_patch16_224", "--checkpoint", str(bad)]
    )
    assert result.exit_code != 0 and "could not be read" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_cli_writes_a_bundle_from_a_config_file_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "export.json"
    config.write_text(
        json.dumps(
            {
                "model": "vit_tiny_patch16_224",
                "prompts": 2,
                "model_args": SMALL_VIT,
                "num_classes": 3,
            }
        )
    )
    out = tmp_path / "b"
    result = CliRunner().invoke(
        main, ["bundle", "--config", str(config), "--prompts", "3", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out / "device")
    assert manifest.prompts == 3 and manifest.num_classes == 3  # the flag beats the file


def test_plan_recommends_a_cut_that_fits_and_refuses_an_impossible_budget() -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["plan", "--model", "vit_tiny_patch16_224", "--device-memory", "4000"])
    assert ok.exit_code == 0, ok.output
    assert "recommended: --head-blocks" in ok.output
    too_small = runner.invoke(
        main, ["plan", "--model", "vit_tiny_patch16_224", "--device-memory", "1"]
    )
    assert too_small.exit_code != 0 and "no cut fits" in too_small.output
