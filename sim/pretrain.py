"""A small ViT pre-trained on the classes 5-9 of a data set, so prompt tuning has features to steer.

Offline there are no ImageNet weights, and prompt tuning of a random ViT learns next to nothing
(the frozen body has no features to steer). So, as the paper pre-trains on ImageNet-21k and
fine-tunes on CIFAR, the simulator pre-trains the default small ViT on the classes the federation
never sees (Fashion-MNIST's or the digits' 5-9, relabelled 0-4); the federation then fine-tunes on
0-4. The file name hashes everything that shapes the weights, so a changed model, recipe, data
set or seed never reuses a stale file. The Fashion-MNIST backbone ships with the package
(`sim/weights/`, made by `sfprompt-pretrain`, see docs/simulation.md), so a fresh machine does not
pre-train for minutes; any other setting is trained once and cached.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sfprompt.export.config import parse_model_args
from sfprompt.export.cut_manifest import preprocess_config
from sfprompt.export.model_loading import create_vit
from sfprompt.options import configs_from, opt, options_from

from .config import CACHE
from .datasets import DIGITS_PRETRAINING, pretraining_set, stratified_split

DEFAULT_MODEL = "vit_tiny_patch16_224"
# Per data set: the default small ViT's shape. Fashion-MNIST's 28 x 28 images in 7 x 7 patches
# give 16 tokens, so three seeds of every method fit `make demo`'s budget on two cores.
MODEL_ARGS: dict[str, dict[str, Any]] = {
    "digits": {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3},
    "fashion-mnist": {"img_size": 28, "patch_size": 7, "embed_dim": 96, "depth": 6, "num_heads": 3},
}
DEFAULT_MODEL_ARGS = MODEL_ARGS["digits"]
DEFAULT_EPOCHS = {"digits": 30, "fashion-mnist": 12}
RECIPE = "digits-vit/2"  # bump when the training below changes, so old caches are not reused
NUM_CLASSES = len(DIGITS_PRETRAINING)
SHIPPED = Path(__file__).parent / "weights"  # backbones that ship with the package
# file name -> sha256 of each shipped backbone (sim/weights/README.md says how it was made)
SHIPPED_SHA256 = {
    "fashion-mnist_vit_181700579b83561c.safetensors": (
        "4caedc740400ce49b741e891200c01c9373eb1ed60c14cb4c7492021e16f091a"
    ),
}
HELD_OUT = 0.1  # of the pre-training digits, for the accuracy stored in the metadata
BATCH = 64
LR = 1e-3
WEIGHT_DECAY = 0.05
WARMUP_EPOCHS = 1
MAX_SHIFT = 2  # pixels of random translation (augmentation)
# Train on a random half of the patch tokens (timm's PatchDropout; off in eval, no weights):
# twice the epochs in the same time, which on 2 CPU cores lifted held-out accuracy from 0.79
# (30 epochs, 70 s) to 0.88 (45 epochs, 62 s).
PATCH_DROP = 0.5


def pretrained_digits_vit(
    cache_dir: Path,
    model: str = DEFAULT_MODEL,
    model_args: dict[str, Any] | None = None,
    epochs: int = 30,
    seed: int = 0,
    progress: Callable[[str], None] = print,
) -> Path:
    """`pretrained_vit` on the digits 5-9 (the seconds-long setting of the tests)."""
    return pretrained_vit(cache_dir, "digits", model, model_args, epochs, seed, progress)


def pretrained_vit(
    cache_dir: Path,
    data: str = "fashion-mnist",
    model: str = DEFAULT_MODEL,
    model_args: dict[str, Any] | None = None,
    epochs: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] = print,
    root: Path | None = None,
) -> Path:
    """Path of a safetensors state dict (timm keys, a 5-way head) pre-trained on the classes 5-9
    of `data` ("fashion-mnist" or "digits").

    A shipped file (`sim/weights/`) or a cached one with the same key is returned as it is;
    otherwise it trains (and writes atomically to `cache_dir`). `model_args` / `epochs` None
    mean the data set's defaults. The file's metadata holds the recipe and the accuracy on
    held-out images of the pre-training classes (Fashion-MNIST's official test split; 10% of the
    digits). Raises `ValueError` for epochs < 1 and `ModelError` for a model timm cannot build.
    """
    epochs = DEFAULT_EPOCHS.get(data, 30) if epochs is None else epochs
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    args = dict(MODEL_ARGS.get(data, DEFAULT_MODEL_ARGS) if model_args is None else model_args)
    name = f"{data}_vit_{cache_key(model, args, epochs, seed, data)}.safetensors"
    for where, path in (("shipped", SHIPPED / name), ("cached", Path(cache_dir) / name)):
        if _readable(path) and _untouched(path):
            progress(f"pre-trained {data} ViT: {where} {path}")
            return path
    cache_dir = Path(cache_dir)
    path = cache_dir / name
    cache_dir.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(_cores())
    try:
        with torch.random.fork_rng(devices=[]):  # seed locally, leave the caller's RNG alone
            torch.manual_seed(seed)
            state, metadata = _train(model, args, data, root, epochs, seed, progress)
    finally:
        torch.set_num_threads(previous_threads)
    metadata.update(
        recipe=RECIPE,
        data=data,
        model=model,
        model_args=json.dumps(args, sort_keys=True),
        seed=str(seed),
    )
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)
    progress(
        f"pre-trained {data} ViT: held-out accuracy {float(metadata['heldout_accuracy']):.3f} "
        f"in {float(metadata['train_seconds']):.0f} s, saved {path}"
    )
    return path


def cache_key(
    model: str, model_args: dict[str, Any], epochs: int, seed: int, data: str = "digits"
) -> str:
    """16 hex digits naming everything that shapes the pre-trained weights."""
    spec: dict[str, Any] = {
        "recipe": RECIPE, "model": model, "args": model_args, "epochs": epochs, "seed": seed,
    }  # fmt: skip
    if data != "digits":  # digits keys stay those of the caches written before
        spec["data"] = data
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata a pre-trained file was written with (recipe, accuracy, seconds, ...)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def fresh_head_checkpoint(path: Path, seed: int = 0, out_dir: Path | None = None) -> Path:
    """A copy of `path` whose classifier (`head.*`) is freshly initialised, in `out_dir`
    (default: next to it).

    The federation's classes are not the pre-training classes, so it must not start from the
    pre-trained classifier; `create_vit` refuses a checkpoint missing `head.*` (strict keys),
    hence a fresh head rather than none: timm's own init (weights truncated normal, std 0.02;
    bias zero), seeded. Written once, atomically; later calls return the existing copy.
    """
    path = Path(path)
    out = Path(out_dir or path.parent) / f"{path.stem}_fresh_head_{seed}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    if _readable(out):
        return out
    state = load_file(str(path))
    metadata = read_metadata(path)
    if "head.weight" not in state:
        raise ValueError(f"{path} has no head.weight: not a timm ViT classifier checkpoint")
    generator = torch.Generator().manual_seed(seed)
    weight = torch.empty_like(state["head.weight"])
    # timm's trunc_normal_(std=.02): normal draws, the rare one beyond 2 std redrawn
    weight.normal_(0.0, 0.02, generator=generator)
    while (bad := weight.abs() > 0.04).any():
        weight[bad] = torch.empty(int(bad.sum())).normal_(0.0, 0.02, generator=generator)
    state["head.weight"] = weight
    if "head.bias" in state:
        state["head.bias"] = torch.zeros_like(state["head.bias"])
    metadata["head"] = f"fresh (seed {seed}), pre-trained classifier dropped"
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(out)
    return out


def _train(
    model: str,
    model_args: dict[str, Any],
    data: str,
    root: Path | None,
    epochs: int,
    seed: int,
    progress: Callable[[str], None],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """AdamW with warm-up and cosine decay, random shifts; returns (state dict, metadata)."""
    start = time.perf_counter()
    train_args = {"patch_drop_rate": PATCH_DROP, **model_args}  # same weights as model_args
    vit = create_vit(model, num_classes=NUM_CLASSES, model_args=train_args)
    config = preprocess_config(vit)  # the mean, std and size the federation's devices use
    size = int(config["input_size"][1])
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    x_train, y_train, x_held, y_held = _pretraining_tensors(data, size, root, seed)

    def normalise(batch: torch.Tensor) -> torch.Tensor:
        return (batch.float() / 255.0 - mean) / std

    for p in vit.parameters():
        p.requires_grad_(True)
    optimiser = torch.optim.AdamW(vit.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = math.ceil(len(y_train) / BATCH)
    total, warmup = epochs * steps_per_epoch, min(WARMUP_EPOCHS, epochs) * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: _lr_factor(s, warmup, total))
    generator = torch.Generator().manual_seed(seed)
    vit.train()
    for epoch in range(epochs):
        order = torch.randperm(len(y_train), generator=generator)
        losses = []
        for i in range(0, len(order), BATCH):
            rows = order[i : i + BATCH]
            batch = normalise(_shift(x_train[rows], MAX_SHIFT, generator))
            loss = torch.nn.functional.cross_entropy(vit(batch), y_train[rows])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
        if (epoch + 1) % 5 == 0 or epoch + 1 == epochs:
            progress(
                f"pre-training {data} ViT: epoch {epoch + 1}/{epochs} loss {np.mean(losses):.3f}"
            )
    vit.eval()
    with torch.no_grad():
        logits = torch.cat(
            [vit(normalise(x_held[i : i + 256])) for i in range(0, len(y_held), 256)]
        )
    accuracy = float((logits.argmax(1) == y_held).float().mean())
    state = {k: v.detach().contiguous() for k, v in vit.state_dict().items()}
    metadata = {
        "heldout_accuracy": f"{accuracy:.4f}",
        "heldout_samples": str(len(y_held)),
        "train_samples": str(len(y_train)),
        "epochs": str(epochs),
        "classes": "5,6,7,8,9",
        "train_seconds": f"{time.perf_counter() - start:.1f}",
    }
    return state, metadata


def _pretraining_tensors(
    data: str, size: int, root: Path | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, labels, held-out images, labels); images (N, 3, S, S) uint8. The held-out
    images are the official test split where there is one, else a stratified 10%."""

    def tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)

    if data == "digits":
        images, labels = pretraining_set(data, size)
        train, held = stratified_split(labels, HELD_OUT, np.random.default_rng(seed))
        return (*tensors(images[train], labels[train]), *tensors(images[held], labels[held]))
    train_set = pretraining_set(data, size, "train", root)
    return (*tensors(*train_set), *tensors(*pretraining_set(data, size, "test", root)))


def _shift(batch: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each (3, S, S) image moved by up to `max_shift` pixels each way, zeros (black) filled in."""
    if max_shift == 0:
        return batch
    n, _, h, w = batch.shape
    padded = torch.nn.functional.pad(batch, (max_shift,) * 4)  # (N, 3, S + 2m, S + 2m)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack(
        [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)]
    )


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _cores() -> int:
    """CPU cores this process may use (the affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _untouched(path: Path) -> bool:
    """A shipped file must hold the digest it shipped with (a cached one is trusted)."""
    digest = SHIPPED_SHA256.get(path.name) if path.parent == SHIPPED else None
    return digest is None or hashlib.sha256(path.read_bytes()).hexdigest() == digest


def _readable(path: Path) -> bool:
    """Whether `path` is a complete safetensors file (a torn or foreign file is rebuilt)."""
    if not path.is_file():
        return False
    try:
        return read_metadata(path).get("recipe") == RECIPE
    except Exception:  # safetensors raises several types for a damaged header
        return False


@dataclass(frozen=True)
class PretrainConfig:
    """Everything `sfprompt-pretrain` takes."""

    data: str = field(
        default="fashion-mnist",
        metadata=opt(
            "Pre-train on this data set's classes 5-9 (the federation gets 0-4).",
            choices=tuple(sorted(MODEL_ARGS)),
        ),
    )
    root: Path | None = field(default=None, metadata=opt("Where the data set's files are."))
    epochs: int | None = field(  # None: DEFAULT_EPOCHS of the data set
        default=None, metadata=opt("Default: 12 (fashion-mnist) or 30 (digits).")
    )
    model_args: dict[str, Any] = field(
        default_factory=dict,
        metadata=opt(
            "Override the default ViT's shape, e.g. depth=4 (repeatable).",
            flag="--model-arg",
            metavar="KEY=VALUE",
            convert=parse_model_args,
        ),
    )
    seed: int = field(default=0, metadata=opt("Seed of the weights and of the held-out split."))
    out: Path = field(
        default=CACHE,
        metadata=opt(
            "Folder to write the weights to (sim/weights/ to ship them with the package)."
        ),
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@options_from(PretrainConfig)
@click.pass_context
def main(ctx: click.Context, **values: Any) -> None:
    """Pre-train the simulator's small ViT on the classes 5-9 of a data set.

    `sfprompt-sim` does this by itself when no shipped or cached file matches; run it on its
    own to refresh the shipped backbone, e.g.

    \b
      sfprompt-pretrain --data fashion-mnist --out sim/weights
      sha256sum sim/weights/*.safetensors
    """
    (cfg,) = configs_from(ctx, values, PretrainConfig)
    args = {**MODEL_ARGS[cfg.data], **cfg.model_args}
    path = pretrained_vit(
        cfg.out, cfg.data, model_args=args, epochs=cfg.epochs, seed=cfg.seed, root=cfg.root
    )
    meta = read_metadata(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    click.echo(
        f"{path}\n  held-out accuracy {meta['heldout_accuracy']} on {meta['heldout_samples']} "
        f"images of classes {meta['classes']}, {meta['epochs']} epochs, sha256 {digest}"
    )


if __name__ == "__main__":
    main()
