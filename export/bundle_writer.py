"""Write the device bundle and the server bundle for one model and one cut.

device bundle: head_forward / head_vjp / tail_step / tail_forward as ONNX graphs and
TorchScript twins; ONNX only: head_tape_forward / head_tape_backward (the head's training pass
without recomputation) and, where the tail reads the first rows of h, head_local_forward /
head_local_backward (the local phase's head: those rows only); the initial prompt + tail
(safetensors), the preprocessing config and `manifest.json` with shapes, dtypes and the sha256
of every file.
server bundle: the frozen body and head weights, the initial prompt + tail, and its manifest.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from safetensors.torch import save_file

from sfprompt.protocol.bundle import (
    BATCH,
    HEAD_WEIGHTS_EXTRA,
    LOCAL_GRAPHS,
    PREFIX_TOKENS,
    TAPE_GRAPHS,
    GraphSpec,
    Manifest,
    TensorSpec,
    load_manifest,
    write_manifest,
)

from . import device_graphs as dg
from .config import ExportConfig
from .cut_manifest import base_manifest, preprocess_config
from .half_weights import halve_weights
from .head_rows import export_local_tape
from .head_tape import export_head_tape
from .int8_weights import quantize_weights
from .model_loading import create_vit
from .onnx_export import export_onnx
from .patch_product import patches_as_product
from .split_vit import PROMPT_KEY, SplitViT, init_prompt, select_tail_input
from .torchscript_export import export_torchscript

WEIGHTS_FILE = "prompt_tail.safetensors"
HEAD_GRAPHS = ("head_forward", "head_vjp", *TAPE_GRAPHS, *LOCAL_GRAPHS)  # where they exist


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


_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64"}  # of I/O


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
    head = patches_as_product(split.head)  # the same function; its int8 form is ~6x faster
    for spec in (
        dg.head_forward_function(head),
        dg.head_vjp_function(head),
        dg.tail_step_function(split.tail, keys),
        dg.tail_forward_function(split.tail, keys),
    ):
        progress(f"exporting {spec.name}.onnx")
        path = device_dir / f"{spec.name}.onnx"
        export_onnx(spec, example, path)
        graphs[spec.name] = graph_spec(path, twins[spec.name])
    progress("exporting the head's forward with its tape, and its backward")
    tape = export_head_tape(head, example["image"], prompt, device_dir)
    graphs.update({name: graph_spec(path, "") for name, path in tape.items()})
    if split.tail_input.kind == PREFIX_TOKENS:
        progress("exporting the head for the local phase: the rows the tail reads")
        rows = split.tail_input.count
        local = export_local_tape(head, rows, example["image"], prompt, device_dir)
        graphs.update({name: graph_spec(path, "") for name, path in local.items()})
    rewrite = {"fp16": halve_weights, "int8": quantize_weights}.get(cfg.head_weights)
    if rewrite is not None:
        progress(f"storing the head graphs' weights in {cfg.head_weights}")
        for name in (n for n in HEAD_GRAPHS if n in graphs):
            rewrite(device_dir / graphs[name].onnx)
            graphs[name] = graph_spec(device_dir / graphs[name].onnx, graphs[name].torchscript)

    save_file({k: v.contiguous() for k, v in weights.items()}, str(device_dir / WEIGHTS_FILE))
    param_specs = {k: TensorSpec(k, "float32", tuple(v.shape)) for k, v in weights.items()}
    device = Manifest(
        **base_manifest(cfg, split, "device"),
        graphs=graphs,
        weights={"initial": WEIGHTS_FILE},
        parameters=param_specs,
        preprocess=preprocess_config(vit),
        extra={HEAD_WEIGHTS_EXTRA: cfg.head_weights},
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
