"""Bundles of a few model shapes and cuts, each exported once and shared by the tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sfprompt.export.bundle_writer import ExportConfig, ExportResult, write_bundles
from sfprompt.export.model_loading import create_vit
from sfprompt.export.split_vit import SplitViT
from tests.conftest import SMALL_VIT

CASES = {
    # name: (model, model_args, head_blocks, tail_blocks)
    "token_m0": ("vit_tiny_patch16_224", SMALL_VIT, 1, 0),
    "avg_m1": (
        "vit_tiny_patch16_224",
        {**SMALL_VIT, "global_pool": "avg", "class_token": False},
        1,
        1,
    ),
    "avg_m0": ("vit_tiny_patch16_224", {**SMALL_VIT, "global_pool": "avg"}, 2, 0),
    "vit_tiny_224": ("vit_tiny_patch16_224", {}, 1, 0),
}


@dataclass
class Exported:
    """An exported bundle and the eager split model it came from (same weights)."""

    result: ExportResult
    split: SplitViT
    batch: int


def export_case(name: str, root: Path) -> Exported:
    model, args, k, m = CASES[name]
    cfg = ExportConfig(
        model=model,
        num_classes=7,
        model_args=dict(args),
        prompts=4,
        head_blocks=k,
        tail_blocks=m,
        batch=4,
        out=root / name,
        seed=3,
    )
    torch.manual_seed(0)
    vit = create_vit(model, 7, model_args=dict(args))
    with torch.no_grad():  # timm zero-initialises the classifier: make its gradients telling
        vit.head.weight.normal_(0, 0.02)
        vit.head.bias.normal_(0, 0.02)
    split = SplitViT.cut_model(vit, cfg.cut)
    result = write_bundles(split, cfg, progress=lambda _: None)
    return Exported(result, split, cfg.batch)


@pytest.fixture(scope="session", params=["token_m0", "avg_m1", "avg_m0", "vit_tiny_224"])
def exported(request: pytest.FixtureRequest, bundles_root: Path) -> Exported:
    return export_case(request.param, bundles_root)
