"""Device memory of the in-process baselines, measured the way the split devices measure theirs.

The devices of SFPrompt and SFL+Linear are real processes whose resident set is sampled while
they train (`edge_client/memory.py`). The baselines (fl_full, fl_prompt, sfl) train inside the
simulator, whose memory also holds the other devices, the server and the test set, so the
simulator's own figure says nothing about a device. Instead a fresh torch process plays one
device for the first batches of its real shard: the same model and global weights, the same
optimiser (SGD, momentum 0.9), batch size and learning rate, one compute thread as the split
devices are given, holding only what that method's device holds and training what it trains:

    fl_full     the whole model, every weight trained
    fl_prompt   the whole model, frozen; VPT-shallow prompts + the tail trained
    sfl         head + tail only, every weight of them trained; the body is on the server,
                whose replies (BODY_OUT, GRAD_H) the process receives as tensors of their shapes

Its peak RSS is sampled by the split devices' profiler at their interval. Only the first batches
are run: the peak is reached by the second step, once momentum exists, and a device's footprint
does not change from round to round, so one measurement per method serves every round.

    python -m sfprompt.sim.device_memory JOB.json

is the child's entry point (JOB.json: a `DeviceJob`); it prints one JSON line (`DeviceMemory`).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from sfprompt.export.model_loading import create_vit
from sfprompt.export.split_vit import Cut
from sfprompt.processes import child_cwd
from sfprompt.units import MIB

CHILD_MODULE = "sfprompt.sim.device_memory"
MAX_BATCHES = 4  # the peak comes at the second step (weights, gradients, momentum, activations)
SAMPLE_INTERVAL_S = 0.02  # as edge_client/device.py samples its rounds
Step = Callable[[torch.Tensor, torch.Tensor], None]  # one batch: forward and backward


@dataclass(frozen=True)
class ModelSpec:
    """A baseline's model by name rather than as a function, so that the device process can
    build the same architecture (a closure cannot cross a process boundary). Calling it builds
    the model as `create_vit` does; `seed` fixes the random initialisation of whatever no
    weights are loaded for (a classifier of new size, or a model with no weights at all)."""

    name: str
    num_classes: int
    pretrained: bool = False
    checkpoint: Path | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None

    def __call__(self) -> VisionTransformer:
        if self.seed is None:
            return self._create()
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left alone
            torch.manual_seed(self.seed)
            return self._create()

    def _create(self) -> VisionTransformer:
        args = dict(self.model_args)
        return create_vit(self.name, self.num_classes, self.pretrained, self.checkpoint, args)


@dataclass(frozen=True)
class DeviceJob:
    """What the device process is told (as JSON): the architecture, where the global weights
    and its shard are, and how it trains. Weights come from the simulator, not from timm or a
    checkpoint, so the process holds what a device receives and loads nothing twice."""

    method: str
    model: str
    num_classes: int
    model_args: dict[str, Any]
    cut: tuple[int, int, int]  # head_blocks, tail_blocks, prompts
    preprocess: dict[str, Any]
    batch_size: int
    lr: float
    local_epochs: int
    seed: int
    max_batches: int
    threads: int
    weights: str  # safetensors: the global model's state dict, timm's keys
    shard: str  # .npz: images (N, H, W, C) uint8, labels (N,)


@dataclass(frozen=True)
class DeviceMemory:
    """What the device process reports: its peak RSS while training, and for reading it, how
    many batches it ran and the MB of weights it held and trained."""

    method: str
    peak_rss_mb: float
    batches: int
    held_mb: float
    trained_mb: float


# ------------------------------------------------------------------------- the simulator's side


def measure_device_memory(
    method: str,
    spec: ModelSpec,
    vit: VisionTransformer,
    cut: Cut,
    shard: tuple[np.ndarray, np.ndarray],
    preprocess: dict[str, Any],
    *,
    batch_size: int,
    lr: float,
    local_epochs: int,
    seed: int,
    max_batches: int = MAX_BATCHES,
    threads: int = 1,
    timeout_s: float = 600,
) -> DeviceMemory:
    """Play one device of `method` in a fresh process, starting from `vit`'s weights on
    `shard` (uint8 images, labels), and return its measured peak RSS.

    Raises RuntimeError naming the method when the process fails or runs past `timeout_s`.
    """
    if method not in DEVICES:
        raise ValueError(f"device memory is measured for {tuple(DEVICES)}, not {method!r}")
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="sfprompt-device-memory-") as tmp:
        folder = Path(tmp)
        state = {k: v.detach().contiguous() for k, v in vit.state_dict().items()}
        save_file(state, str(folder / "weights.safetensors"))
        np.savez(folder / "shard.npz", images=shard[0], labels=shard[1])
        job = DeviceJob(
            method=method,
            model=spec.name,
            num_classes=spec.num_classes,
            model_args=dict(spec.model_args),
            cut=(cut.head_blocks, cut.tail_blocks, cut.prompts),
            preprocess=dict(preprocess),
            batch_size=batch_size,
            lr=lr,
            local_epochs=local_epochs,
            seed=seed,
            max_batches=max_batches,
            threads=threads,
            weights=str(folder / "weights.safetensors"),
            shard=str(folder / "shard.npz"),
        )
        (folder / "job.json").write_text(json.dumps(asdict(job)))
        return DeviceMemory(**_run_child(method, folder / "job.json", threads, timeout_s))


def _run_child(method: str, job: Path, threads: int, timeout_s: float) -> dict[str, Any]:
    """Run the device process; its last line of output is the JSON it reports."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", CHILD_MODULE, str(job.resolve())]
    what = f"{method}: the process playing one device to measure its memory"
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=child_cwd()
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{what} ran past {timeout_s:g} s") from exc
    if done.returncode != 0 or not done.stdout.strip():
        tail = "\n".join(done.stderr.strip().splitlines()[-8:])
        raise RuntimeError(f"{what} failed (exit code {done.returncode}):\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- the device's side


def fl_full_device(vit: VisionTransformer, cut: Cut, seed: int) -> tuple[list[torch.Tensor], Step]:
    """FL full fine-tuning: the whole model, every weight trained."""
    import torch.nn.functional as F

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        F.cross_entropy(vit(x), y).backward()

    return list(vit.parameters()), step


def fl_prompt_device(
    vit: VisionTransformer, cut: Cut, seed: int
) -> tuple[list[torch.Tensor], Step]:
    """FL prompt tuning: the whole model held, prompts + tail trained (as `FlRun` does)."""
    import torch.nn.functional as F

    from sfprompt.export.split_vit import SplitViT, init_prompt

    split = SplitViT.cut_model(vit, cut)
    prompt = torch.nn.Parameter(init_prompt(cut, vit.embed_dim, seed))

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        F.cross_entropy(split.forward(x, prompt), y).backward()

    return [prompt, *split.tail.parameters()], step


def sfl_device(vit: VisionTransformer, cut: Cut, seed: int) -> tuple[list[torch.Tensor], Step]:
    """SFL: head + tail (the body already dropped by `load_model`), as `SflRun`'s device runs
    them: head forward (SMASHED up), tail step on the body's output (BODY_OUT down, GRAD_Z
    up), then the head's backward from the server's GRAD_H. The server's replies are tensors
    of their real shapes: the body keeps h's shape, and the tail reads from it what it reads."""
    import torch.nn.functional as F

    from sfprompt.export.split_vit import Tail, select_tail_input, tail_input_for

    from .baselines import run_blocks

    cut = Cut(cut.head_blocks, cut.tail_blocks, 0)
    tail_input = tail_input_for(vit, cut)
    tail = Tail(vit, cut, tail_input)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        h = run_blocks(vit, cut.head_blocks, x)
        z = select_tail_input(h.detach(), tail_input, vit.num_prefix_tokens).clone()
        F.cross_entropy(tail(z.requires_grad_(True)), y).backward()
        h.backward(torch.zeros_like(h))

    return list(vit.parameters()), step


DEVICES = {"fl_full": fl_full_device, "fl_prompt": fl_prompt_device, "sfl": sfl_device}


def load_model(job: DeviceJob) -> VisionTransformer:
    """The architecture built without memory (on the meta device), then only the weights the
    device holds read from the simulator's file: for SFL the body's blocks are never made."""
    from safetensors import safe_open

    with torch.device("meta"):
        vit = create_vit(job.model, job.num_classes, model_args=dict(job.model_args))
    if job.method == "sfl":
        head_blocks, tail_blocks, _ = job.cut
        for index in range(head_blocks, len(vit.blocks) - tail_blocks):
            vit.blocks[index] = torch.nn.Identity()
    with safe_open(job.weights, framework="pt") as weights:
        state = {key: weights.get_tensor(key) for key in vit.state_dict()}
    vit.load_state_dict(state, assign=True)
    unmade = [
        n for n, t in itertools.chain(vit.named_parameters(), vit.named_buffers()) if t.is_meta
    ]
    if unmade:
        raise RuntimeError(f"no weights for {unmade[:5]} (not in the model's state dict)")
    return vit


def play_device(job: DeviceJob) -> DeviceMemory:
    """Train as one device of `job.method` for up to `job.max_batches` batches of its shard,
    its resident set sampled throughout each step."""
    from sfprompt.data.transforms import EvalTransform
    from sfprompt.edge_client.memory import MemoryProfiler

    from .baselines import MOMENTUM, batches

    torch.set_num_threads(job.threads)
    torch.manual_seed(job.seed)
    with np.load(job.shard) as shard:
        images, labels = shard["images"], shard["labels"].astype(np.int64)
    transform = EvalTransform.from_config(job.preprocess)
    vit = load_model(job)
    trained, step = DEVICES[job.method](vit, Cut(*job.cut), job.seed)
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(trained, lr=job.lr, momentum=MOMENTUM)
    rng = np.random.default_rng(job.seed)
    order = (i for _ in range(job.local_epochs) for i in batches(len(labels), job.batch_size, rng))
    count = 0
    vit.train()
    with MemoryProfiler(interval_s=SAMPLE_INTERVAL_S) as profiler:
        for idx in itertools.islice(order, job.max_batches):
            with profiler.phase("train"):
                x = torch.from_numpy(transform.from_uint8(images[idx]))
                optimizer.zero_grad(set_to_none=True)
                step(x, torch.from_numpy(labels[idx]))
                optimizer.step()
            count += 1
    held = {id(t): t for t in itertools.chain(vit.parameters(), trained)}
    return DeviceMemory(
        method=job.method,
        peak_rss_mb=profiler.profile.peak_rss_mb,
        batches=count,
        held_mb=sum(t.numel() * t.element_size() for t in held.values()) / MIB,
        trained_mb=sum(t.numel() * t.element_size() for t in trained) / MIB,
    )


def read_job(path: Path) -> DeviceJob:
    fields = json.loads(Path(path).read_text())
    return DeviceJob(**{**fields, "cut": tuple(fields["cut"])})


if __name__ == "__main__":
    print(json.dumps(asdict(play_device(read_job(Path(sys.argv[1]))))))
