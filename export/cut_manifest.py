"""The manifest fields of a cut model: what both bundles and the server's in-memory manifest
(`ServerModel.from_timm`) say of it, from one function, so that their contract hashes agree.
Torch and timm only: the server builds it without importing the ONNX exporter."""

from __future__ import annotations

from typing import Any

import torch
from timm.data import resolve_data_config

from sfprompt.protocol.bundle import default_class_names
from sfprompt.protocol.version import PROTOCOL_VERSION

from .config import ExportConfig
from .split_vit import SplitViT

OPSET = 18  # the ONNX opset the device graphs are written in


def base_manifest(cfg: ExportConfig, split: SplitViT, role: str) -> dict[str, Any]:
    """The manifest fields of a cut model, shared by both bundles and the server's in-memory
    manifest (`ServerModel.from_timm`), so their contract hashes agree."""
    vit = split.vit
    return dict(
        role=role,
        protocol_version=PROTOCOL_VERSION,
        model=cfg.model,
        model_args=dict(cfg.model_args),
        num_classes=cfg.num_classes,
        classes=list(cfg.classes or default_class_names(cfg.num_classes)),
        prompts=cfg.prompts,
        head_blocks=cfg.head_blocks,
        tail_blocks=cfg.tail_blocks,
        depth=len(vit.blocks),
        embed_dim=vit.embed_dim,
        num_prefix_tokens=vit.num_prefix_tokens,
        num_patches=vit.patch_embed.num_patches,
        export_batch=cfg.batch,
        opset=OPSET,
        tail_input=split.tail_input,
        frozen_sha256=split.frozen_fingerprint(),
    )


def preprocess_config(vit: torch.nn.Module) -> dict[str, Any]:
    """timm's eval transform settings, which the device reproduces in numpy and Pillow."""
    cfg = resolve_data_config({}, model=vit)
    # The pretrained config names the size timm's weights were trained at; the model built
    # (e.g. with an img_size override) is what the graphs accept.
    cfg["input_size"] = (vit.patch_embed.proj.in_channels, *vit.patch_embed.img_size)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
