"""The cached pre-trained digits ViT: written once, reused, loadable by create_vit."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sfprompt.export.model_loading import create_vit
from sfprompt.sim.pretrain import (
    DEFAULT_MODEL,
    cache_key,
    fresh_head_checkpoint,
    pretrained_digits_vit,
    read_metadata,
)

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str], float]:
    """One epoch of a tiny ViT, with the caller's torch RNG seeded before and drawn after."""
    cache = tmp_path_factory.mktemp("cache")
    messages: list[str] = []
    threads = torch.get_num_threads()
    torch.manual_seed(5)
    start = time.perf_counter()
    path = pretrained_digits_vit(cache, model_args=TINY, epochs=1, progress=messages.append)
    seconds = time.perf_counter() - start
    drawn = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(drawn, torch.rand(3)), "pre-training moved the caller's RNG"
    assert torch.get_num_threads() == threads, "pre-training left torch's thread count changed"
    return cache, path, messages, seconds


@pytest.mark.slow
def test_first_call_writes_the_cache_with_metadata(tiny_run) -> None:
    cache, path, messages, _ = tiny_run
    assert path.parent == cache and path.is_file()
    assert path.name == f"digits_vit_{cache_key(DEFAULT_MODEL, TINY, 1, 0)}.safetensors"
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary file left behind
    meta = read_metadata(path)
    assert 0.0 <= float(meta["heldout_accuracy"]) <= 1.0
    assert int(meta["heldout_samples"]) > 50 and meta["classes"] == "5,6,7,8,9"
    assert meta["model"] == DEFAULT_MODEL and meta["epochs"] == "1"
    assert any("held-out accuracy" in m for m in messages)


@pytest.mark.slow
def test_second_call_is_a_cache_hit(tiny_run) -> None:
    cache, path, _, first_seconds = tiny_run
    before = path.stat().st_mtime_ns
    messages: list[str] = []
    start = time.perf_counter()
    again = pretrained_digits_vit(cache, model_args=TINY, epochs=1, progress=messages.append)
    assert again == path and path.stat().st_mtime_ns == before
    assert time.perf_counter() - start < min(1.0, first_seconds / 2)
    assert messages and "cached" in messages[0]


def test_cache_key_names_every_setting() -> None:
    keys = {
        cache_key(DEFAULT_MODEL, TINY, 1, 0),
        cache_key(DEFAULT_MODEL, TINY, 2, 0),
        cache_key(DEFAULT_MODEL, TINY, 1, 1),
        cache_key(DEFAULT_MODEL, {**TINY, "depth": 3}, 1, 0),
        cache_key("vit_small_patch16_224", TINY, 1, 0),
    }
    assert len(keys) == 5
    assert cache_key(DEFAULT_MODEL, dict(reversed(TINY.items())), 1, 0) == cache_key(
        DEFAULT_MODEL, TINY, 1, 0
    )


@pytest.mark.slow
def test_file_loads_with_create_vit(tiny_run) -> None:
    """create_vit loads every weight (strict), and the model computes what the file holds."""
    _, path, _, _ = tiny_run
    vit = create_vit(DEFAULT_MODEL, num_classes=5, checkpoint=path, model_args=TINY)
    state = load_file(str(path))
    own = vit.state_dict()
    assert set(own) == set(state)
    assert all(torch.equal(own[k], state[k]) for k in state)
    assert vit(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.slow
def test_fresh_head_keeps_the_body_and_replaces_the_classifier(tiny_run) -> None:
    _, path, _, _ = tiny_run
    fresh = fresh_head_checkpoint(path)
    assert fresh != path and fresh_head_checkpoint(path) == fresh  # written once
    old, new = load_file(str(path)), load_file(str(fresh))
    assert set(old) == set(new)
    assert all(torch.equal(old[k], new[k]) for k in old if not k.startswith("head."))
    assert not torch.equal(old["head.weight"], new["head.weight"])
    assert new["head.weight"].abs().max() <= 0.04 and 0.005 < new["head.weight"].std() < 0.03
    assert torch.count_nonzero(new["head.bias"]) == 0
    vit = create_vit(DEFAULT_MODEL, num_classes=5, checkpoint=fresh, model_args=TINY)
    assert torch.equal(vit.state_dict()["head.weight"], new["head.weight"])
    # a classifier of another size keeps create_vit's own fresh init (the allowed mismatch)
    assert (
        create_vit(DEFAULT_MODEL, num_classes=3, checkpoint=path, model_args=TINY).head.out_features
        == 3
    )


def test_bad_epochs_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="epochs"):
        pretrained_digits_vit(tmp_path, model_args=TINY, epochs=0)


def test_the_shipped_fashion_backbone_is_the_recorded_file() -> None:
    """The backbone `make demo` uses ships with its digest and beats a linear model on raw
    pixels of its own classes (93.7%): a backbone worth tuning."""
    import hashlib

    from sfprompt.sim.pretrain import MODEL_ARGS, SHIPPED, SHIPPED_SHA256, pretrained_vit

    ((name, digest),) = SHIPPED_SHA256.items()
    path = SHIPPED / name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    meta = read_metadata(path)
    assert meta["data"] == "fashion-mnist" and meta["classes"] == "5,6,7,8,9"
    assert int(meta["heldout_samples"]) == 5000 and float(meta["heldout_accuracy"]) > 0.937
    found = pretrained_vit(Path("/nonexistent"), "fashion-mnist", progress=lambda m: None)
    assert found == path  # the simulator's default finds it without training
    vit = create_vit(
        DEFAULT_MODEL, num_classes=5, checkpoint=path, model_args=MODEL_ARGS["fashion-mnist"]
    )
    assert vit.patch_embed.num_patches == 16


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist missing"
)
def test_the_pretrain_command_still_runs(tmp_path: Path) -> None:
    """`sfprompt-pretrain`, the command that made the shipped file, on a tiny shape, 1 epoch."""
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    proc = subprocess.run(
        [str(bin_dir / "sfprompt-pretrain"), "--data", "fashion-mnist", "--epochs", "1",
         "--model-arg", "embed_dim=32", "--model-arg", "depth=1", "--model-arg", "num_heads=2",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (written,) = tmp_path.glob("fashion-mnist_vit_*.safetensors")
    meta = read_metadata(written)
    assert meta["epochs"] == "1" and int(meta["train_samples"]) == 30000
    assert "held-out accuracy" in proc.stdout and "sha256" in proc.stdout
