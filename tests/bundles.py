"""The bundles the tests export, each written by the exporter's own `write_bundles`.

Exporting traces and checks every graph, which takes seconds, so the session fixtures in
tests/conftest.py write each distinct bundle once and share it; a test that damages files copies
the shared bundle into its own `tmp_path` first.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sfprompt.export.bundle_writer import ExportResult, write_bundles
from sfprompt.export.config import ExportConfig
from sfprompt.export.model_loading import create_vit
from sfprompt.export.split_vit import Cut, SplitViT

SMALL_VIT = {"img_size": 32, "patch_size": 8, "depth": 4}  # a ViT-Tiny cut down to 4 blocks

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
    "vit_tiny_224": ("vit_tiny_patch16_224", {}, 1, 0),  # real size: slow to export
}


@dataclass
class Exported:
    """An exported bundle and the eager split model it came from (same weights)."""

    result: ExportResult
    split: SplitViT
    batch: int


def export_case(name: str, root: Path) -> Exported:
    """Export the case `name` of CASES into `root / name` (7 classes, 4 prompts, seed 3)."""
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


def with_head_weights(
    device_dir: Path, out: Path, rewrite: Callable[[Path], int], kind: str
) -> Path:
    """A copy of `device_dir` at `out` whose head graphs `rewrite` (as `--head-weights kind`
    does), its manifest saying so; each graph must be rewritten."""
    from sfprompt.export.bundle_writer import HEAD_GRAPHS
    from sfprompt.protocol.bundle import HEAD_WEIGHTS_EXTRA, load_manifest, write_manifest

    shutil.copytree(device_dir, out)
    for name in HEAD_GRAPHS:
        assert rewrite(out / f"{name}.onnx") > 0, name
    manifest = load_manifest(out, verify=False)  # the rewritten files change their sha256
    write_manifest(out, dataclasses.replace(manifest, extra={HEAD_WEIGHTS_EXTRA: kind}))
    return out


def export_small_with_head_weights(out: Path, head_weights: str) -> ExportResult:
    """A 3-class, 2-prompt SMALL_VIT bundle written with `--head-weights head_weights`."""
    cfg = ExportConfig(
        model="vit_tiny_patch16_224",
        num_classes=3,
        model_args=dict(SMALL_VIT),
        prompts=2,
        head_weights=head_weights,
        out=out,
    )
    vit = create_vit(cfg.model, 3, model_args=cfg.model_args)
    return write_bundles(SplitViT.cut_model(vit, cfg.cut), cfg, progress=lambda _: None)


class ExportedCases:
    """Each case of CASES exported at most once, on first use, under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._done: dict[str, Exported] = {}

    def __getitem__(self, name: str) -> Exported:
        if name not in self._done:
            self._done[name] = export_case(name, self.root)
        return self._done[name]


def export_small(out: Path, num_classes: int = 10, seed: int = 0) -> ExportResult:
    """A 4-block 32x32 ViT cut K=1, M=0, with a non-zero classifier so gradients are telling:
    the bundle the federation and training tests run."""
    cfg = ExportConfig(
        model="vit_tiny_patch16_224",
        num_classes=num_classes,
        model_args=dict(SMALL_VIT),
        prompts=4,
        head_blocks=1,
        tail_blocks=0,
        batch=4,
        out=out,
        seed=seed,
    )
    torch.manual_seed(seed)
    vit = create_vit(cfg.model, num_classes, model_args=dict(SMALL_VIT))
    with torch.no_grad():
        vit.head.weight.normal_(0, 0.05)
        vit.head.bias.normal_(0, 0.05)
    return write_bundles(SplitViT.cut_model(vit, cfg.cut), cfg, progress=lambda _: None)


def eager_split(result: ExportResult) -> tuple[SplitViT, dict[str, torch.Tensor]]:
    """The exported model rebuilt in eager PyTorch from the server bundle's files, and the
    initial prompt + tail by bundle key: the reference the device and server must match."""
    from safetensors.torch import load_file

    manifest = result.server
    vit = create_vit(manifest.model, manifest.num_classes, model_args=dict(manifest.model_args))
    split = SplitViT.cut_model(
        vit, Cut(manifest.head_blocks, manifest.tail_blocks, manifest.prompts)
    )
    split.head.load_state_dict(load_file(str(result.server_dir / "head.safetensors")))
    body = load_file(str(result.server_dir / "body.safetensors"))
    first = manifest.head_blocks
    split.body.load_state_dict(
        {f"blocks.{int(k.split('.')[1]) - first}.{k.split('.', 2)[2]}": v for k, v in body.items()}
    )
    params = load_file(str(result.server_dir / "prompt_tail.safetensors"))
    tail_state = {name: params[key] for name, key in split.tail_keys().items()}
    split.tail.load_state_dict(tail_state, strict=False)
    for module in (split.head, split.body, split.tail):
        module.eval()
    return split, params
