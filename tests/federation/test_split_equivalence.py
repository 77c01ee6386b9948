"""One split-training step across real processes equals one step of plain PyTorch training of
the whole model, with the same data, weights and learning rate (pruning and local loss off)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sfprompt.cloud_server.checkpoint import load_checkpoint
from sfprompt.data.datasets import load_image_set
from sfprompt.data.transforms import EvalTransform
from sfprompt.protocol.broker import EmbeddedBroker
from sfprompt.protocol.bundle import PROMPT_KEY
from tests.bundles import eager_split
from tests.federation.harness import (
    finish,
    start_device,
    start_server,
    stop_all,
    write_shards,
)

LR = 0.5
SAMPLES = 16


def torch_step(result, shard: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Initial params and params after one SGD step on the mean cross-entropy of the batch."""
    split, params = eager_split(result)
    images = load_image_set(shard)
    x = images.preprocessed(
        np.arange(len(images)), EvalTransform.from_config(result.device.preprocess)
    )
    y = torch.from_numpy(images.labels.astype(np.int64))
    prompt = params[PROMPT_KEY].clone().requires_grad_(True)
    tail_params = dict(split.tail.named_parameters())
    keys = split.tail_keys()
    for p in tail_params.values():
        p.requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(split.forward(torch.from_numpy(x), prompt), y)
    names = list(keys)
    grads = torch.autograd.grad(loss, [prompt, *(tail_params[n] for n in names)])
    before = {PROMPT_KEY: prompt.detach().numpy().copy()}
    after = {PROMPT_KEY: (prompt - LR * grads[0]).detach().numpy()}
    for name, grad in zip(names, grads[1:]):
        before[keys[name]] = tail_params[name].detach().numpy().copy()
        after[keys[name]] = (tail_params[name] - LR * grad).detach().numpy()
    return before, after


@pytest.mark.slow
def test_one_split_step_equals_pytorch_training_of_the_whole_model(small_export, tmp_path: Path):
    (shard,) = write_shards(tmp_path / "data", devices=1, per_device=SAMPLES)
    out = tmp_path / "server"
    with EmbeddedBroker(tmp_path / "broker") as broker:
        broker.start()
        server = start_server(
            "--bundle", str(small_export.server_dir), "--broker", broker.url, "--out", str(out),
            "--rounds", "1", "--keep-ratio", "1", "--local-epochs", "0",
            "--batch-size", str(SAMPLES), "--split-lr", str(LR), "--server-lr", "1",
            "--encoding", "fp32",  # exact activations: the default fp16 rounds them
            log=tmp_path / "server.log",
        )  # fmt: skip
        device = start_device(
            "--bundle", str(small_export.device_dir), "--data", str(shard), "--broker",
            broker.url, "--device-id", "solo", "--leave-when-server-stops",
            log=tmp_path / "device.log",
        )  # fmt: skip
        try:
            assert finish(server, 180, tmp_path / "server.log") == 0
            assert finish(device, 60, tmp_path / "device.log") == 0
        finally:
            stop_all(server, device)
    ckpt = load_checkpoint(out / "checkpoint.safetensors")
    assert ckpt is not None and ckpt.round == 1
    before, expected = torch_step(small_export, shard)
    assert set(ckpt.params) == set(expected)
    for key, want in expected.items():
        got = ckpt.params[key]
        change = np.linalg.norm(want - before[key])
        assert change > 0, f"{key} did not train in the reference"
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        rel_update = np.linalg.norm((got - before[key]) - (want - before[key])) / change
        assert rel <= 1e-4 and rel_update <= 1e-3, (key, rel, rel_update)
