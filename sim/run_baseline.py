"""One baseline run from start to end: rounds of in-process training (sim/baselines.py for FL,
sim/sfl.py for SFL), evaluated after each round, with one device's memory measured in a real
torch process (sim/device_memory.py), as the split methods' devices are real processes."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from sfprompt.export.split_vit import Cut

from .baselines import (
    BASELINES,
    FEATURE_IMAGES,
    BaselineConfig,
    FlRun,
    Shard,
    evaluate,
    select_devices,
    tail_features,
    to_tensors,
)
from .costs import round_minutes
from .device_memory import ModelSpec, measure_device_memory
from .results import Features, MethodResult, RoundRecord
from .sfl import SflRun

MEMORY_NOTE = "device memory: peak RSS of a real torch process training one device's shard"


# ---------------------------------------------------------------------------------- one method


def device_peak_mb(
    method: str,
    spec: ModelSpec,
    vit: VisionTransformer,
    cut: Cut,
    shard: Shard,
    preprocess: dict,
    cfg: BaselineConfig,
) -> float:
    """The peak RSS of a real torch process playing one device of `method` on `shard` from
    `vit`'s (global) weights, with the method's optimiser, batch size and learning rate:
    measured as the split methods' device processes measure theirs, not estimated."""
    return measure_device_memory(
        method,
        spec,
        vit,
        cut,
        shard,
        preprocess,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        local_epochs=cfg.local_epochs,
        seed=cfg.seed,
    ).peak_rss_mb


def run_baseline(
    method: str,
    build_model: ModelSpec,
    preprocess: dict,
    shards: list[Shard],
    test: Shard,
    cfg: BaselineConfig,
    cut: Cut | None = None,
    progress: Callable[[str], None] = lambda m: None,
    known_peak_mb: float | None = None,
) -> tuple[MethodResult, Features | None]:
    """Run one baseline for `cfg.rounds` rounds; the per-round record and, for fl_full, the
    features of the final model on up to 500 test images.

    `cut` places SFL's split and fl_prompt's prompts, and decides what "the tail reads" for
    the features (default: Cut()). `build_model` is a ModelSpec, not any function, because a
    device process builds the same model to measure a device's memory (sim/device_memory.py).
    `known_peak_mb` is a figure measured before for this method and model (another seed or
    partition): given, no device process is started. Raises ValueError for an unknown method,
    no or empty shards, or labels the model cannot predict; RuntimeError naming the method
    when the device process fails.
    """
    if method not in BASELINES:
        raise ValueError(f"run_baseline runs {BASELINES}, not {method!r}")
    if not isinstance(build_model, ModelSpec):
        raise TypeError(
            f"run_baseline needs a ModelSpec to build the model, not {type(build_model).__name__}: "
            "a separate device process builds it too, to measure a device's memory"
        )
    if not shards:
        raise ValueError("run_baseline needs at least one shard")
    cut = cut or Cut()
    torch.manual_seed(cfg.seed)
    pick_rng = np.random.default_rng(cfg.seed)  # which devices, as the cloud server picks them
    train_rng = np.random.default_rng([cfg.seed, 1])  # batch order
    vit = build_model()
    data = {i: to_tensors(preprocess, im, lb, f"shard {i}") for i, (im, lb) in enumerate(shards)}
    test_x, test_y = to_tensors(preprocess, test[0], test[1], "test")
    for name, y in [*((f"shard {i}", y) for i, (_, y) in data.items()), ("test", test_y)]:
        if len(y) == 0:
            raise ValueError(f"{name} is empty: every device needs data, and so does the test")
        if int(y.min()) < 0 or int(y.max()) >= vit.num_classes:
            raise ValueError(f"{name}: labels must lie in [0, {vit.num_classes})")
    if method == "sfl":
        run: FlRun | SflRun = SflRun(vit, cut, cfg)
    else:
        run = FlRun(method, vit, cut, cfg)
    x, y = max(data.values(), key=lambda d: len(d[1]))
    run.probe(x[: cfg.batch_size], y[: cfg.batch_size])
    result = MethodResult(method, len(shards), notes=[*run.notes, MEMORY_NOTE])
    peak_mb = known_peak_mb
    for number in range(1, cfg.rounds + 1):
        selected = select_devices(len(shards), cfg.fraction, pick_rng)
        if peak_mb is None:  # round 1's first device: a device's footprint is the same each round
            peak_mb = device_peak_mb(
                method, build_model, vit, cut, shards[selected[0]], preprocess, cfg
            )
            progress(f"{method}: one device's process peaked at {peak_mb:.0f} MB of RSS")
        started = time.time()
        costs = run.round(number, {i: data[i] for i in selected}, train_rng)
        accuracy, loss = evaluate(run.forward, test_x, test_y)
        minutes = [
            round_minutes(c.device_flops, c.server_flops, c.bytes_up, c.bytes_down, cfg)
            for c in costs
        ]
        record = RoundRecord(
            round=number,
            accuracy=accuracy,
            loss=loss,
            bytes_up=float(np.mean([c.bytes_up for c in costs])),
            bytes_down=float(np.mean([c.bytes_down for c in costs])),
            device_flops=float(np.mean([c.device_flops for c in costs])),
            device_peak_mb=peak_mb,
            seconds=time.time() - started,
            est_round_minutes=float(np.mean(minutes)),
            measured={"memory": True, **run.measured},
        )
        result.rounds.append(record)
        progress(
            f"{method} round {number}/{cfg.rounds}: accuracy {accuracy:.3f}, test loss {loss:.3f}, "
            f"train loss {np.mean([c.loss for c in costs]):.3f} ({record.seconds:.1f} s)"
        )
    if method != "fl_full":
        return result, None
    n = FEATURE_IMAGES
    return result, Features("fl_full", tail_features(vit, cut, test_x[:n]), test_y[:n].numpy())
