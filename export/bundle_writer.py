"""Write the device bundle and the server bundle for one model and one cut.

device bundle: head_forward / head_vjp / tail_step / tail_forward as ONNX graphs and
TorchScript twins, the initial prompt + tail (safetensors), the preprocessing config and
`manifest.json` with shapes, dtypes and the sha256 of every file.
server bundle: the frozen body and head weights, the initial prompt + tail, and its manifest.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from safetensors.torch import save_file
from timm.data import resolve_data_config

from sfprompt.options import opt
from sfprompt.protocol.bundle import (
    BATCH,
    GraphSpec,
    Manifest,
    TensorSpec,
    class_names_problem,
    default_class_names,
    load_manifest,
    write_manifest,
)
from sfprompt.protocol.version import PROTOCOL_VERSION

from . import device_graphs as dg
from .model_loading import create_vit, parse_model_args
from .onnx_export import OPSET, export_onnx
from .split_vit import PROMPT_KEY, Cut, SplitViT, init_prompt, select_tail_input
from .torchscript_export import export_torchscript

WEIGHTS_FILE = "prompt_tail.safetensors"


@dataclass
class ExportConfig:
    """What `sfprompt-export bundle` builds; every flag of the command is a field here."""

    model: str = field(
        default="vit_tiny_patch16_224",
        metadata=opt("timm model name, e.g. vit_base_patch16_224 or deit_small_patch16_224."),
    )
    num_classes: int | None = field(  # None: the count of `classes`, else 10
        default=None,
        metadata=opt("Classes of the task being tuned (default: the count of --classes, else 10)."),
    )
    classes: list[str] | None = field(  # the name of each logit; None: "0".."num_classes-1"
        default=None,
        metadata=opt(
            "Class names in logit order: a file with one a line, a data folder (its ImageFolder "
            "folders, CIFAR or .npz names) or a,b,c. Devices map their data to them by name "
            "(default: 0..N-1).",
            metavar="FILE|DIR|a,b,c",
        ),
    )
    pretrained: bool = field(
        default=False,
        metadata=opt(
            "Load timm's pre-trained weights (needs the network or a warm cache).",
            flag="--pretrained/--random-init",
        ),
    )
    checkpoint: Path | None = field(
        default=None,
        metadata=opt(
            "A local .safetensors or .pth state dict (read with weights_only=True).",
            exists=True,
            dir_okay=False,
        ),
    )
    model_args: dict[str, Any] = field(  # timm overrides, e.g. img_size
        default_factory=dict,
        metadata=opt(
            "timm override, repeatable: --model-arg img_size=32 --model-arg depth=4.",
            flag="--model-arg",
            metavar="KEY=VALUE",
            convert=parse_model_args,
        ),
    )
    prompts: int = field(default=10, metadata=opt("Learnable prompt tokens P."))
    head_blocks: int = field(
        default=1, metadata=opt("Blocks kept on the device before the body, K >= 1.")
    )
    tail_blocks: int = field(
        default=0, metadata=opt("Blocks kept on the device after the body, M >= 0.")
    )
    batch: int = field(  # the graphs accept any batch size
        default=8, metadata=opt("The device's planned batch size B (graphs take any).")
    )
    seed: int = field(
        default=0,
        metadata=opt("Seed of the prompt and of any random weights (same seed, same bundle)."),
    )
    out: Path = field(
        default=Path("bundle"), metadata=opt("Output folder; gets device/ and server/.")
    )

    def __post_init__(self) -> None:
        """Fix the class names before minutes of export, not after: the devices match their
        data to them by name, so there must be one unique name per logit."""
        if self.num_classes is None:
            self.num_classes = len(self.classes) if self.classes is not None else 10
        names = list(self.classes) if self.classes is not None else None
        self.classes = names or default_class_names(self.num_classes)
        problem = class_names_problem(self.classes, self.num_classes)
        if problem:
            raise ValueError(f"--classes: {problem} (--num-classes {self.num_classes})")

    @property
    def cut(self) -> Cut:
        return Cut(self.head_blocks, self.tail_blocks, self.prompts)


@dataclass(frozen=True)
class ExportResult:
    device_dir: Path
    server_dir: Path
    device: Manifest
    server: Manifest


def _trace_batch(tensors: list[torch.Tensor], at_least: int = 2) -> int:
    """A batch size equal to no other dimension, so symbolic tracing cannot confuse them."""
    taken = {d for t in tensors for d in t.shape}
    batch = at_least
    while batch in taken:
        batch += 1
    return batch


def example_inputs(
    split: SplitViT, prompt: torch.Tensor, params: dict[str, torch.Tensor], batch: int
) -> dict[str, torch.Tensor]:
    """Inputs of every device graph at batch size `batch`, from a random image."""
    gen = torch.Generator().manual_seed(0)
    size = split.vit.patch_embed.img_size
    image = torch.randn(batch, 3, size[0], size[1], generator=gen)
    h = split.head(image, prompt)
    t = select_tail_input(h, split.tail_input, split.skip_tokens)
    return {
        "image": image,
        "prompt": prompt,
        "grad_h": torch.randn(h.shape, generator=gen),
        "tail_input": torch.randn(t.shape, generator=gen),
        "labels": torch.randint(0, split.vit.num_classes, (batch,), generator=gen),
        "weight": torch.ones(batch),
        **params,
    }


_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64"}


def _specs(values: Any) -> tuple[TensorSpec, ...]:
    specs = []
    for v in values:
        dims = v.type.tensor_type.shape.dim
        shape = tuple(BATCH if d.dim_param else int(d.dim_value) for d in dims)
        specs.append(TensorSpec(v.name, _ONNX_DTYPES[v.type.tensor_type.elem_type], shape))
    return tuple(specs)


def graph_spec(onnx_path: Path, torchscript: str) -> GraphSpec:
    """Read names, dtypes and shapes straight from the written graph (the source of truth)."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return GraphSpec(onnx_path.name, torchscript, _specs(graph.input), _specs(graph.output))


def occupied_outputs(out: Path) -> list[Path]:
    """`out/device` and `out/server` where they exist and hold something: writing a bundle
    there deletes it, and a device may still hold a bundle exported there (the CLI asks first).
    """
    found = []
    for path in (Path(out) / "device", Path(out) / "server"):
        if path.is_symlink() or path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(path)
    return found


def _fresh_dir(path: Path) -> Path:
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


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


def export_bundle(cfg: ExportConfig, progress: Callable[[str], None] = print) -> ExportResult:
    """Build the model named by `cfg`, cut it and write `<out>/device` and `<out>/server`.

    Raises `ModelError` for a model or checkpoint that does not fit, ValueError for a bad cut.
    """
    progress(f"building {cfg.model}")
    vit = create_vit(
        cfg.model, cfg.num_classes, cfg.pretrained, cfg.checkpoint, cfg.model_args, seed=cfg.seed
    )
    return write_bundles(SplitViT.cut_model(vit, cfg.cut), cfg, progress)


def write_bundles(
    split: SplitViT, cfg: ExportConfig, progress: Callable[[str], None] = print
) -> ExportResult:
    """Write both bundles of an already cut model (its weights are taken as they are)."""
    vit = split.vit
    keys = split.tail_keys()
    prompt = init_prompt(cfg.cut, vit.embed_dim, cfg.seed)
    tail_state = dict(split.tail.named_parameters())
    params = {key: tail_state[name].detach().clone() for name, key in keys.items()}
    weights = {PROMPT_KEY: prompt, **params}

    out = Path(cfg.out)
    device_dir, server_dir = _fresh_dir(out / "device"), _fresh_dir(out / "server")
    batch = _trace_batch([*weights.values(), *split.head.state_dict().values()])
    example = example_inputs(split, prompt, params, batch)
    progress("writing TorchScript twins")
    twins = export_torchscript(split, device_dir)
    graphs = {}
    for spec in (
        dg.head_forward_function(split.head),
        dg.head_vjp_function(split.head),
        dg.tail_step_function(split.tail, keys),
        dg.tail_forward_function(split.tail, keys),
    ):
        progress(f"exporting {spec.name}.onnx")
        path = device_dir / f"{spec.name}.onnx"
        export_onnx(spec, example, path)
        graphs[spec.name] = graph_spec(path, twins[spec.name])

    save_file({k: v.contiguous() for k, v in weights.items()}, str(device_dir / WEIGHTS_FILE))
    param_specs = {k: TensorSpec(k, "float32", tuple(v.shape)) for k, v in weights.items()}
    device = Manifest(
        **base_manifest(cfg, split, "device"),
        graphs=graphs,
        weights={"initial": WEIGHTS_FILE},
        parameters=param_specs,
        preprocess=preprocess_config(vit),
    )
    write_manifest(device_dir, device)

    progress("writing the server bundle")
    save_file(
        {k: v.contiguous() for k, v in split.body_state().items()},
        str(server_dir / "body.safetensors"),
    )
    head_state = {k: v.contiguous() for k, v in split.head.state_dict().items()}
    save_file(head_state, str(server_dir / "head.safetensors"))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(server_dir / WEIGHTS_FILE))
    server = Manifest(
        **base_manifest(cfg, split, "server"),
        weights={"body": "body.safetensors", "head": "head.safetensors", "initial": WEIGHTS_FILE},
        parameters=param_specs,
        preprocess=preprocess_config(vit),
    )
    write_manifest(server_dir, server)
    return ExportResult(
        device_dir, server_dir, load_manifest(device_dir), load_manifest(server_dir)
    )
