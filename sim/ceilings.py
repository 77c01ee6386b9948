"""The ceilings of a comparison: the same backbone trained centrally on every device's data.

A federated method is judged against what its parameters could reach with all the data in one
place, on the same test set: a linear probe (the tail of a prompt-less cut: final norm and
classifier), prompt + tail (SFPrompt's parameters, VPT-shallow), and full fine-tuning (FL full's
parameters). Each trains with SGD (momentum 0.9) and a cosine-decayed learning rate for a few
epochs; the accuracy after the last epoch is the ceiling.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sfprompt.export.split_vit import Cut, SplitViT, init_prompt, select_tail_input

from .baselines import MOMENTUM, Shard, batches, evaluate, run_blocks, to_tensors
from .device_memory import ModelSpec

CEILINGS = ("linear_probe", "prompt_tail", "full")
LABELS = {
    "linear_probe": "Centralised linear probe",
    "prompt_tail": "Centralised prompt + tail",
    "full": "Centralised full fine-tuning",
}


@dataclass(frozen=True)
class CeilingConfig:
    epochs: int = 5
    batch_size: int = 32
    # per kind: the best of a short sweep (docs/simulation.md, "Choosing the learning rates")
    lr: tuple[tuple[str, float], ...] = (
        ("linear_probe", 0.05), ("prompt_tail", 0.05), ("full", 0.01),
    )  # fmt: skip
    seed: int = 0


@dataclass(frozen=True)
class Ceiling:
    kind: str
    accuracy: float  # on the test set after the last epoch
    epochs: int
    train_samples: int
    seconds: float

    @property
    def label(self) -> str:
        return LABELS[self.kind]


def run_ceiling(
    kind: str, spec: ModelSpec, preprocess: dict, train: Shard, test: Shard, cut: Cut,
    cfg: CeilingConfig,
) -> Ceiling:  # fmt: skip
    """Train `kind` on all of `train` from the backbone `spec` builds; its test accuracy."""
    if kind not in CEILINGS:
        raise ValueError(f"unknown ceiling {kind!r}: one of {', '.join(CEILINGS)}")
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    vit = spec().eval()
    for p in vit.parameters():
        p.requires_grad_(False)
    x, y = to_tensors(preprocess, train[0], train[1], "train")
    test_x, test_y = to_tensors(preprocess, test[0], test[1], "test")
    if kind == "linear_probe":  # the frozen part runs once: train the tail on its output
        split = SplitViT.cut_model(vit, Cut(cut.head_blocks, cut.tail_blocks, 0))
        read = partial(_tail_tokens, vit, split)
        with torch.no_grad():
            x, test_x = (torch.cat([read(a[i : i + 256]) for i in range(0, len(a), 256)])
                         for a in (x, test_x))  # fmt: skip
        trained, forward = list(split.tail.parameters()), split.tail
    elif kind == "prompt_tail":
        split = SplitViT.cut_model(vit, cut)
        prompt = nn.Parameter(init_prompt(cut, vit.embed_dim, cfg.seed))
        trained = [prompt, *split.tail.parameters()]
        forward = partial(split.forward, prompt=prompt)
    else:
        trained, forward = list(vit.parameters()), vit
    for p in trained:
        p.requires_grad_(True)
    _train(forward, vit, trained, x, y, dict(cfg.lr)[kind], cfg, rng)
    accuracy, _ = evaluate(forward, test_x, test_y)
    return Ceiling(kind, accuracy, cfg.epochs, len(y), time.perf_counter() - start)


def _tail_tokens(vit: nn.Module, split: SplitViT, x: torch.Tensor) -> torch.Tensor:
    z = run_blocks(vit, len(vit.blocks) - split.cut.tail_blocks, x)
    return select_tail_input(z, split.tail_input, vit.num_prefix_tokens)


def _train(forward, vit, trained, x, y, lr: float, cfg: CeilingConfig, rng) -> None:  # noqa: ANN001
    optimizer = torch.optim.SGD(trained, lr=lr, momentum=MOMENTUM)
    steps = cfg.epochs * math.ceil(len(y) / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    vit.train()
    for _ in range(cfg.epochs):
        for idx in batches(len(y), cfg.batch_size, rng):
            loss = F.cross_entropy(forward(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    vit.eval()
