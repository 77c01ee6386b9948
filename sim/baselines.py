"""The baselines that need no network, run in-process with PyTorch: FL full fine-tuning, FL prompt
tuning and SFL (SplitFed v2), on the same shards, test set, seed and rounds as the split methods.

Costs per device and round: FLOPs counted by torch's FlopCounterMode on one batch and scaled by
the samples trained; bytes as exact sizes (safetensors for weights, the protocol codec for SFL's
four activation messages per batch); device memory measured as the peak RSS of a fresh torch
process that plays one device of the method on its shard (sim/device_memory.py), as the split
methods' devices are real processes whose RSS is measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save as safetensors_save
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sfprompt.cloud_server.fedavg import Params, fedavg
from sfprompt.data.transforms import EvalTransform
from sfprompt.export.split_vit import (
    PROMPT_KEY,
    Cut,
    SplitViT,
    init_prompt,
    select_tail_input,
    tail_input_for,
)

from .results import Features

BASELINES = ("fl_full", "fl_prompt", "sfl")
FEATURE_IMAGES = 500  # test images whose features the report plots (t-SNE)
MOMENTUM = 0.9
Shard = tuple[np.ndarray, np.ndarray]  # images (N, H, W, 3) uint8, labels (N,)
Tensors = tuple[torch.Tensor, torch.Tensor]  # images (N, 3, H, W) float32, labels (N,) int64
DeviceData = dict[int, Tensors]  # device index -> its shard, preprocessed


@dataclass
class BaselineConfig:
    rounds: int = 5
    local_epochs: int = 1
    lr: float = 0.01  # SGD, momentum 0.9 (the SFL server's body too)
    batch_size: int = 32
    server_lr: float = 1.0  # FedAvg: new = old + eta_g * weighted mean(client - old)
    fraction: float = 1.0  # devices per round (at least one)
    seed: int = 0
    uplink_mbps: float = 12.0  # the paper's appendix Table 1
    downlink_mbps: float = 54.0
    device_gflops: float = 10.0
    server_gflops: float = 10000.0

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.local_epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"rounds, local_epochs and batch_size must be >= 1, got {self.rounds}, "
                f"{self.local_epochs}, {self.batch_size}"
            )
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"lr must be finite and >= 0, got {self.lr!r}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must lie in (0, 1], got {self.fraction!r}")


# ------------------------------------------------------------------------------------- the data


def to_tensors(preprocess: dict, images: np.ndarray, labels: np.ndarray, what: str) -> Tensors:
    """Images and labels as tensors, preprocessed as the devices do."""
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"{what}: {len(images)} images but labels of shape {labels.shape}")
    x = EvalTransform.from_config(preprocess).from_uint8(images)
    return torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))


def batches(count: int, size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """A shuffled pass over `count` samples in batches of `size` (the last may be smaller)."""
    order = rng.permutation(count)
    for start in range(0, count, size):
        yield order[start : start + size]


def select_devices(count: int, fraction: float, rng: np.random.Generator) -> list[int]:
    """ceil(fraction * count) devices (at least one), as the cloud server chooses them."""
    chosen = rng.choice(count, size=max(1, min(math.ceil(fraction * count), count)), replace=False)
    return sorted(int(i) for i in chosen)


@torch.no_grad()
def evaluate(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy on a set, in chunks of 256."""
    correct, loss = 0, 0.0
    for start in range(0, len(y), 256):
        logits = forward(x[start : start + 256])
        target = y[start : start + 256]
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    return correct / len(y), loss / len(y)


def run_blocks(vit: VisionTransformer, blocks: int, x: torch.Tensor) -> torch.Tensor:
    """timm's forward_features up to (not including) block `blocks`, without prompts:
    images (B, 3, H, W) -> tokens (B, R + N, D). Uses the model's own (trainable) embeddings."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    for block in vit.blocks[:blocks]:
        x = block(x)
    return x


@torch.no_grad()
def tail_features(vit: VisionTransformer, cut: Cut, x: torch.Tensor) -> np.ndarray:
    """What the tail of a prompt-less model reads, flattened: (N, R' * D) float32."""
    cut0 = Cut(cut.head_blocks, cut.tail_blocks, 0)
    parts = []
    for start in range(0, len(x), 256):
        z = run_blocks(vit, len(vit.blocks) - cut.tail_blocks, x[start : start + 256])
        t = select_tail_input(z, tail_input_for(vit, cut0), vit.num_prefix_tokens)
        parts.append(t.reshape(len(t), -1).numpy().astype(np.float32))
    return np.concatenate(parts)


def untuned_features(
    build_model: Callable[[], VisionTransformer],
    preprocess: dict,
    test: Shard,
    cut: Cut | None = None,
) -> Features:
    """The features of the pre-trained model before any tuning, on up to 500 test images."""
    vit = build_model().eval()
    x, y = to_tensors(preprocess, test[0][:FEATURE_IMAGES], test[1][:FEATURE_IMAGES], "test")
    return Features("untuned", tail_features(vit, cut or Cut(), x), y.numpy())


# ------------------------------------------------------------------------------ costs of a step


def weights_bytes(params: Params) -> int:
    """The exact serialized size of float32 weights (safetensors), as they would be sent."""
    return len(safetensors_save(params))


def count_flops(step: Callable[[], None], weights: Sequence[torch.Tensor]) -> float:
    """FLOPs of `step` (a forward and backward), counted by FlopCounterMode; the gradients it
    left on `weights` are dropped, so that counting does not move the first real step."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    for w in weights:
        w.grad = None
    return float(counter.get_total_flops())


@dataclass
class DeviceCost:
    """One device's share of a round."""

    loss: float  # mean training loss
    bytes_up: float
    bytes_down: float
    device_flops: float
    server_flops: float = 0.0


class Trained:
    """The weights a device trains and sends, by the key its update would carry."""

    measured: dict[str, bool] = {}
    notes: list[str] = []

    def __init__(self, trained: dict[str, nn.Parameter], cfg: BaselineConfig) -> None:
        for p in trained.values():
            p.requires_grad_(True)
        self.trained = trained
        self.cfg = cfg
        self.params = self.state()  # the global weights
        self.size = weights_bytes(self.params)

    def state(self) -> Params:
        return {k: p.detach().numpy().copy() for k, p in self.trained.items()}

    def load(self, params: Params) -> None:
        with torch.no_grad():
            for key, p in self.trained.items():
                p.copy_(torch.from_numpy(params[key]))

    def optimizer(self) -> torch.optim.Optimizer:
        """A device's optimiser: fresh momentum every round, as the devices start afresh."""
        return torch.optim.SGD(list(self.trained.values()), lr=self.cfg.lr, momentum=MOMENTUM)

    def aggregate(self, updates: list[tuple[Params, int]]) -> None:
        """Sample-weighted FedAvg with the server learning rate; the model holds the result."""
        self.params = fedavg(self.params, updates, self.cfg.server_lr)
        self.load(self.params)


class FlRun(Trained):
    """fl_full trains every weight; fl_prompt trains VPT-shallow prompts + the tail only.
    Every device holds the whole model; the server averages what they train."""

    measured = {"bytes": False, "flops": True}  # run_baseline measures the memory

    def __init__(self, method: str, vit: VisionTransformer, cut: Cut, cfg: BaselineConfig):
        if method not in ("fl_full", "fl_prompt"):
            raise ValueError(f"FlRun runs fl_full or fl_prompt, not {method!r}")
        self.vit = vit.eval()
        for p in vit.parameters():
            p.requires_grad_(False)
        if method == "fl_full":
            super().__init__(dict(vit.named_parameters()), cfg)
            self.forward: Callable[[torch.Tensor], torch.Tensor] = vit
        else:
            split = SplitViT.cut_model(vit, cut)
            prompt = nn.Parameter(init_prompt(cut, vit.embed_dim, cfg.seed))
            tail = dict(split.tail.named_parameters())
            keys = split.tail_keys().items()
            super().__init__({PROMPT_KEY: prompt, **{k: tail[n] for n, k in keys}}, cfg)
            self.forward = partial(split.forward, prompt=prompt)
        self.flops_per_sample = 0.0
        what = "every weight" if method == "fl_full" else "prompt + tail"
        self.notes = [
            f"bytes: exact safetensors size of {what} ({self.size} B) each way, not a wire count",
            "device FLOPs: FlopCounterMode on one training batch, scaled by samples",
        ]

    def probe(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Count the FLOPs per sample of a training step on one batch."""
        step = lambda: F.cross_entropy(self.forward(x), y).backward()  # noqa: E731
        self.flops_per_sample = count_flops(step, list(self.trained.values())) / len(y)

    def local_train(self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> float:
        """`local_epochs` of SGD on one shard from the weights loaded; the mean training loss."""
        optimizer, losses = self.optimizer(), []
        self.vit.train()
        for _ in range(self.cfg.local_epochs):
            for idx in batches(len(y), self.cfg.batch_size, rng):
                loss = F.cross_entropy(self.forward(x[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        self.vit.eval()
        return float(np.mean(losses))

    def round(self, number: int, data: DeviceData, rng: np.random.Generator) -> list[DeviceCost]:
        """Every device trains from the global weights; FedAvg of what they return."""
        updates, costs = [], []
        for x, y in data.values():
            self.load(self.params)
            loss = self.local_train(x, y, rng)
            updates.append((self.state(), len(y)))
            flops = self.flops_per_sample * len(y) * self.cfg.local_epochs
            costs.append(DeviceCost(loss, self.size, self.size, flops))
        self.aggregate(updates)
        return costs
