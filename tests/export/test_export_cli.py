"""`sfprompt-export bundle` as a user meets it: random weights are said and reproducible,
an earlier bundle is kept unless --force, and --pretrained without the network fails fast."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from sfprompt.export import model_loading
from sfprompt.export.cli import main
from sfprompt.export.model_loading import create_vit
from sfprompt.protocol.bundle import Manifest, load_manifest
from tests.bundles import SMALL_VIT

TINY = ["--model", "vit_tiny_patch16_224", "--num-classes", "3", "--prompts", "2", "--seed", "5"]
TINY += [arg for k, v in SMALL_VIT.items() for arg in ("--model-arg", f"{k}={v}")]
WEIGHTS = ("prompt_tail.safetensors", "body.safetensors", "head.safetensors")


def export(out: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["bundle", *TINY, "--out", str(out), *extra])
    return result.exit_code, result.output


def weight_sums(manifest: Manifest) -> dict[str, str]:
    return {name: sha for name, sha in manifest.files.items() if name in WEIGHTS}


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The TINY export, from a TOML file with keys spelled like the flags (the later re-export
    with flags must give the same bundle)."""
    root = tmp_path_factory.mktemp("export")
    config = root / "export.toml"
    model_args = ", ".join(f'"{k}={v}"' for k, v in SMALL_VIT.items())
    config.write_text(
        'model = "vit_tiny_patch16_224"\nnum-classes = 3\nprompts = 2\nseed = 5\n'
        f'model-arg = [{model_args}]\nout = "{root / "b"}"\n'
    )
    result = CliRunner().invoke(main, ["bundle", "--config", str(config)])
    assert result.exit_code == 0, result.output
    return root / "b", result.output


@pytest.mark.slow
def test_a_random_export_says_so(first: tuple[Path, str]) -> None:
    _, output = first
    assert "random weights" in output and "--pretrained or --checkpoint" in output


@pytest.mark.slow
def test_an_existing_bundle_is_kept_without_force(first: tuple[Path, str]) -> None:
    out, _ = first
    before = (out / "device" / "manifest.json").read_text()
    code, output = export(out)
    assert code != 0 and "not empty; pass --force" in output
    assert str(out / "device") in output and "Traceback" not in output
    assert (out / "device" / "manifest.json").read_text() == before


def test_an_empty_output_folder_is_fine_and_a_file_in_the_way_is_refused(tmp_path: Path) -> None:
    from sfprompt.export.bundle_writer import occupied_outputs

    (tmp_path / "device").mkdir()
    assert occupied_outputs(tmp_path) == []
    (tmp_path / "server").write_text("not a bundle")
    assert occupied_outputs(tmp_path) == [tmp_path / "server"]


@pytest.mark.slow
def test_two_identical_random_exports_give_the_same_bundle(first: tuple[Path, str]) -> None:
    """Devices holding the first bundle keep working with the server of the second."""
    out, _ = first
    old_device, old_server = load_manifest(out / "device"), load_manifest(out / "server")
    torch.manual_seed(1234)  # the global generator must not matter
    code, output = export(out, "--force")
    assert code == 0, output
    device, server = load_manifest(out / "device"), load_manifest(out / "server")
    assert device.contract_hash() == old_device.contract_hash() == server.contract_hash()
    assert device.frozen_sha256 == old_device.frozen_sha256
    assert weight_sums(device) == weight_sums(old_device) and len(weight_sums(device)) == 1
    assert weight_sums(server) == weight_sums(old_server) and len(weight_sums(server)) == 3


def test_the_seed_decides_the_random_weights() -> None:
    def qkv(seed: int) -> torch.Tensor:
        vit = create_vit("vit_tiny_patch16_224", 3, model_args=SMALL_VIT, seed=seed)
        return vit.blocks[0].attn.qkv.weight

    state = torch.random.get_rng_state()
    assert torch.equal(qkv(1), qkv(1)) and not torch.equal(qkv(1), qkv(2))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is untouched


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An unreachable hub and an empty Hugging Face cache (returned), whatever the network."""
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(model_loading, "reachable", lambda host: False)
    return tmp_path / "hub"


def test_pretrained_without_the_hub_fails_at_once_suggesting_checkpoint(
    no_hub: Path, tmp_path: Path
) -> None:
    start = time.monotonic()
    code, output = export(tmp_path / "b", "--pretrained")
    assert time.monotonic() - start < 20
    assert code == 1 and "cannot reach huggingface.co" in output
    assert "--checkpoint FILE" in output and "HF_HUB_OFFLINE=1" in output
    assert not (tmp_path / "b").exists()


def test_pretrained_without_the_hub_uses_the_cached_weights(no_hub: Path) -> None:
    """What timm would find in the cache after a minute of retries, taken at once."""
    source = create_vit("vit_tiny_patch16_224", 1000, model_args=SMALL_VIT, seed=9)
    snapshot = no_hub / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("abc123")
    (snapshot / "snapshots" / "abc123").mkdir(parents=True)
    weights = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(weights, str(snapshot / "snapshots" / "abc123" / "model.safetensors"))

    start = time.monotonic()
    overlay = {"pretrained_cfg_overlay": {"crop_pct": 1.0}}  # as sfprompt-sim gives it
    vit = create_vit("vit_tiny_patch16_224", 3, pretrained=True, model_args=SMALL_VIT | overlay)
    assert time.monotonic() - start < 20
    assert torch.equal(vit.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert vit.pretrained_cfg["crop_pct"] == 1.0  # the caller's overlay is kept


@pytest.mark.slow
def test_pretrained_in_offline_mode_exits_soon_suggesting_checkpoint(tmp_path: Path) -> None:
    """The real command, as a user without the network runs it (HF_HUB_OFFLINE=1)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    cli = "from sfprompt.export.cli import main; main()"
    command = [sys.executable, "-c", cli, "bundle", *TINY, "--pretrained"]
    start = time.monotonic()
    done = subprocess.run(
        [*command, "--out", str(tmp_path / "b")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert time.monotonic() - start < 60  # python and torch start in about 8 s
    assert done.returncode == 1, done.stdout + done.stderr
    assert "--checkpoint FILE" in done.stderr and "Traceback" not in done.stderr


def test_reachable_tells_an_open_port_from_a_closed_one() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert model_loading.reachable("127.0.0.1", port, timeout=1)
    assert not model_loading.reachable("127.0.0.1", port, timeout=1)


@pytest.mark.parametrize(
    "entries, expected",
    [
        ({"num-classes": "three"}, "num-classes = 'three' is not valid"),
        ({"num_classes": 3, "head_block": 2}, "unknown option(s) head_block (did you mean"),
        ({"model_args": "depth"}, "model_args must be a table"),
        ({"model-arg": ["depth"]}, "'depth' is not of the form key=value"),
    ],
)
def test_a_config_file_mistake_is_named_before_any_work(
    tmp_path: Path, entries: dict, expected: str
) -> None:
    config = tmp_path / "export.json"
    config.write_text(json.dumps(entries))
    result = CliRunner().invoke(main, ["bundle", "--config", str(config)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "export.json" in result.output and expected in result.output
