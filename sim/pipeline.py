"""`sfprompt-sim`: data -> model -> bundles -> partition -> every method -> report.

Split methods run as real federations (sim/run_split.py); the FL baselines and SFL run
in-process (sim/baselines.py) on the same shards, seed and round budget. One function per
stage, so that each can be read (and replaced) on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from sfprompt.export.bundle_writer import ExportConfig, ExportResult, export_bundle
from sfprompt.export.split_vit import Cut

from .device_memory import ModelSpec
from .results import SPLIT_METHODS, Features, MethodResult

DEFAULT_METHODS = ("sfprompt", "sfl", "sfl_linear", "fl_full")
CACHE = Path.home() / ".cache" / "sfprompt"


@dataclass(frozen=True)
class SimConfig:
    """Every option of `sfprompt-sim`; `--config FILE` fills the same fields."""

    data: str = "digits"  # digits (offline), a torchvision set name, or an ImageFolder path
    root: Path | None = None  # where torchvision data sets live
    download: bool = False
    max_train: int | None = None
    max_test: int | None = None
    model: str | None = None  # None: the small ViT pre-trained on digits 5-9 (cached)
    model_args: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False  # timm weights for --model, when reachable
    checkpoint: Path | None = None  # local weights for --model
    pretrain_epochs: int = 30
    clients: tuple[int, ...] = (5,)  # several: a clients-count sweep
    rounds: int = 10
    partition: str = "dirichlet"  # or iid
    alpha: float = 0.1  # Dirichlet concentration over labels, as in the paper
    methods: tuple[str, ...] = DEFAULT_METHODS
    prompts: int = 10
    head_blocks: int = 1
    tail_blocks: int = 0
    keep_ratio: float = 0.5
    local_epochs: int = 1
    local_lr: float = 0.01
    split_lr: float = 0.1
    baseline_lr: float = 0.01  # SGD (momentum 0.9) of the in-process baselines
    batch_size: int = 32
    server_lr: float = 1.0
    uplink_mbps: float = 12.0
    downlink_mbps: float = 54.0
    device_gflops: float = 10.0
    server_gflops: float = 10000.0
    seed: int = 0
    out: Path = Path("runs/sim")
    cache: Path = CACHE


Progress = Callable[[str], None]


def run_simulation(cfg: SimConfig, say: Progress = print) -> tuple[list[MethodResult], Path]:
    """Run every method for every client count; returns the results (of the first client
    count) and the report folder."""
    from . import baselines, datasets, partition, report
    from .run_split import CostModel, SplitSettings, method_settings, run_split_method

    out = Path(cfg.out)
    model_name, model_args, checkpoint = prepare_model(cfg, say)
    size = int(model_args.get("img_size", 224))
    data = datasets.load_sim_data(
        cfg.data, cfg.root, size, cfg.download, cfg.max_train, cfg.max_test, cfg.seed
    )
    say(f"data: {data.name}, {len(data.train_labels)} training and {len(data.test_labels)} "
        f"test images, {data.num_classes} classes")  # fmt: skip
    bundles = export_bundles(cfg, model_name, model_args, checkpoint, data.num_classes, out, say)
    first = next(iter(bundles.values()))
    preprocess = first.device.preprocess

    build_model = ModelSpec(model_name, data.num_classes, cfg.pretrained, checkpoint, model_args)

    cut = Cut(cfg.head_blocks, cfg.tail_blocks, cfg.prompts)
    cost = CostModel(build_model(), cut, cfg)  # type: ignore[arg-type]
    base = SplitSettings(
        rounds=cfg.rounds,
        keep_ratio=cfg.keep_ratio,
        local_epochs=cfg.local_epochs,
        local_lr=cfg.local_lr,
        split_lr=cfg.split_lr,
        batch_size=cfg.batch_size,
        server_lr=cfg.server_lr,
        seed=cfg.seed,
    )
    baseline_cfg = baselines.BaselineConfig(
        rounds=cfg.rounds,
        lr=cfg.baseline_lr,
        batch_size=cfg.batch_size,
        server_lr=cfg.server_lr,
        seed=cfg.seed,
        uplink_mbps=cfg.uplink_mbps,
        downlink_mbps=cfg.downlink_mbps,
        device_gflops=cfg.device_gflops,
        server_gflops=cfg.server_gflops,
    )
    sweep: dict[int, list[MethodResult]] = {}
    features: list[Features] = []
    test_pair = (data.test_images, data.test_labels)
    for clients in cfg.clients:
        rng = np.random.default_rng(cfg.seed)
        parts = (
            partition.partition_iid(data.train_labels, clients, rng)
            if cfg.partition == "iid"
            else partition.partition_dirichlet(data.train_labels, clients, cfg.alpha, rng)
        )
        shard_paths, test_path = partition.write_shards(data, parts, out / f"data/clients{clients}")
        shards = [(data.train_images[p], data.train_labels[p]) for p in parts]
        results = []
        for method in cfg.methods:
            say(f"[{clients} clients] {method}: {cfg.rounds} rounds")
            if method in SPLIT_METHODS and method != "sfl":
                bundle = bundles["linear" if method == "sfl_linear" else "prompt"]
                result = run_split_method(
                    method,
                    bundle.server_dir,
                    bundle.device_dir,
                    shard_paths,
                    test_path,
                    method_settings(method, base),
                    cost,
                    out / f"runs/clients{clients}/{method}",
                    lambda done, acc, m=method: say(f"  {m} round {done}: accuracy {acc:.3f}"),
                )
                if clients == cfg.clients[0] and method in ("sfprompt", "sfl_linear"):
                    features.append(split_features(method, bundle, out, clients, data))
            else:
                result, feats = baselines.run_baseline(
                    method, build_model, preprocess, shards, test_pair, baseline_cfg,
                    cut if method != "sfl" else replace(cut, prompts=0), progress=say,
                )  # fmt: skip
                if feats is not None and clients == cfg.clients[0]:
                    features.append(feats)
            say(f"  {result.label}: final accuracy {result.final_accuracy:.3f}")
            results.append(result)
        sweep[clients] = results
    features.insert(0, baselines.untuned_features(build_model, preprocess, test_pair, cut))
    primary = sweep[cfg.clients[0]]
    settings = {k: str(v) for k, v in asdict(cfg).items()}
    written = report.write_report(
        out / "report", primary, features, sweep if len(cfg.clients) > 1 else None, settings
    )
    return primary, Path(written.files[0]).parent if written.files else out / "report"


def prepare_model(cfg: SimConfig, say: Progress) -> tuple[str, dict[str, Any], Path | None]:
    """The model to fine-tune: a timm name (pre-trained or from a checkpoint), or offline the
    small ViT pre-trained on digits 5-9, with a fresh classifier for the federation's classes."""
    if cfg.model is not None:
        return cfg.model, dict(cfg.model_args), cfg.checkpoint
    from .pretrain import (
        DEFAULT_MODEL,
        DEFAULT_MODEL_ARGS,
        fresh_head_checkpoint,
        pretrained_digits_vit,
    )

    args = {**DEFAULT_MODEL_ARGS, **cfg.model_args}
    path = pretrained_digits_vit(cfg.cache, DEFAULT_MODEL, args, cfg.pretrain_epochs, cfg.seed, say)
    return DEFAULT_MODEL, args, fresh_head_checkpoint(path, cfg.seed)


def export_bundles(
    cfg: SimConfig,
    model: str,
    model_args: dict[str, Any],
    checkpoint: Path | None,
    num_classes: int,
    out: Path,
    say: Progress,
) -> dict[str, ExportResult]:
    """The prompted bundle (SFPrompt and its ablations) and, for SFL+Linear, one without prompts."""
    wanted = {"prompt": cfg.prompts} if any(m.startswith("sfprompt") for m in cfg.methods) else {}
    if "sfl_linear" in cfg.methods or not wanted:
        wanted["linear"] = 0
    bundles = {}
    for name, prompts in wanted.items():
        say(f"exporting the {name} bundle ({prompts} prompts)")
        export = ExportConfig(
            model=model,
            num_classes=num_classes,
            pretrained=cfg.pretrained,
            checkpoint=checkpoint,
            model_args=dict(model_args),
            prompts=prompts,
            head_blocks=cfg.head_blocks,
            tail_blocks=cfg.tail_blocks,
            batch=cfg.batch_size,
            seed=cfg.seed,
            out=out / "bundles" / name,
        )
        bundles[name] = export_bundle(export, progress=lambda _: None)
    return bundles


def split_features(method: str, bundle: ExportResult, out: Path, clients: int, data) -> Features:  # noqa: ANN001
    """What the tail reads under the method's final global prompt, on up to 500 test images."""
    from sfprompt.cloud_server.body_model import ServerModel
    from sfprompt.cloud_server.checkpoint import load_checkpoint
    from sfprompt.data.transforms import EvalTransform

    ckpt = load_checkpoint(out / f"runs/clients{clients}/{method}/server/checkpoint.safetensors")
    assert ckpt is not None, "a finished run has a checkpoint"
    model = ServerModel.from_bundle(bundle.server_dir)
    images = data.test_images[:500]
    x = EvalTransform.from_config(bundle.device.preprocess).from_uint8(images)
    feats = model.features(ckpt.params, x)
    return Features(method, feats.reshape(len(feats), -1), data.test_labels[:500])
