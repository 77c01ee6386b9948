"""`sfprompt-export`: cut a timm ViT into device and server bundles, or plan where to cut."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from sfprompt.options import build, configs_from, merged_values, opt, options_from
from sfprompt.protocol.bundle import BundleError

from .config import ExportConfig, ModelError

console = Console()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Cut a timm Vision Transformer for split federated prompt tuning.

    \b
    Plan a cut for a 512 MB device on a 12/54 Mbps link:
      sfprompt-export plan --model vit_base_patch16_224 --device-memory 512
    Write the device and server bundles:
      sfprompt-export bundle --model vit_base_patch16_224 --pretrained --num-classes 10 --out b/
    """


@main.command()
@options_from(ExportConfig)
@click.option(
    "--force", is_flag=True, help="Replace OUT/device and OUT/server if they hold a bundle."
)
@click.pass_context
def bundle(ctx: click.Context, force: bool, **values: Any) -> None:
    """Export a device bundle (ONNX + TorchScript) and a server bundle (body weights)."""
    from .bundle_writer import export_bundle

    merged = merged_values(ctx, values)
    try:
        _resolve_classes(merged)
        cfg = build(ExportConfig, merged)
        _check_output(cfg.out, force)
        _warn_if_random(cfg)
        start = time.perf_counter()
        with console.status("exporting") as status:
            result = export_bundle(cfg, progress=lambda msg: status.update(msg))
    except (ModelError, BundleError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    elapsed = time.perf_counter() - start
    _print_bundle(result, elapsed)


def _resolve_classes(values: dict[str, Any]) -> None:
    """Read `--classes` given as a file, a folder or a,b,c into names (a config file may give
    the list itself)."""
    from sfprompt.data.classes import read_class_names

    if isinstance(values.get("classes"), str):
        values["classes"] = read_class_names(values["classes"])


def _check_output(out: Path, force: bool) -> None:
    """Refuse to delete an earlier bundle unasked: devices may still hold it."""
    from .bundle_writer import occupied_outputs

    occupied = occupied_outputs(out)
    if occupied and not force:
        verb = "exists and is" if len(occupied) == 1 else "exist and are"
        raise click.ClickException(
            f"{' and '.join(map(str, occupied))} {verb} not empty; pass --force to replace "
            "the bundle there (devices holding it then need the new one) or choose another --out"
        )


def _warn_if_random(cfg: Any) -> None:
    """Say so when the bundle is not a real model: timm's random initialisation trains to
    nothing useful, and nothing else in the output tells it apart from a pre-trained one."""
    if cfg.pretrained or cfg.checkpoint is not None:
        return
    click.secho(
        f"warning: random weights: {cfg.model} gets timm's random initialisation (seed "
        f"{cfg.seed}), not a trained model; use --pretrained or --checkpoint FILE for a real model",
        err=True,
        fg="yellow",
    )


def _print_bundle(result: Any, elapsed: float) -> None:
    table = Table(title=f"bundle written in {elapsed:.1f} s")
    table.add_column("file")
    table.add_column("MB", justify="right")
    for directory in (result.device_dir, result.server_dir):
        for path in sorted(directory.iterdir()):
            table.add_row(str(path), f"{path.stat().st_size / 2**20:.2f}")
    console.print(table)
    tail = result.device.tail_input
    console.print(f"the tail reads {tail.kind} {list(tail.shape)}: only that crosses the network")


@dataclass(frozen=True)
class PlanConfig:
    """What `sfprompt-export plan` weighs the cuts against; the model comes from ExportConfig."""

    max_head_blocks: int = field(default=4, metadata=opt("Largest K to try."))
    max_tail_blocks: int = field(default=2, metadata=opt("Largest M to try."))
    device_memory: float | None = field(
        default=None, metadata=opt("Memory the device can give us, MB.")
    )
    device_gflops: float = field(default=10.0, metadata=opt("Device compute, GFLOP/s."))
    uplink: float = field(default=12.0, metadata=opt("Uplink, Mbps (paper: 12)."))
    downlink: float = field(default=54.0, metadata=opt("Downlink, Mbps (paper: 54)."))


# plan reads the model and the prompt from ExportConfig's options, not the cut or the output
NOT_PLANNED = ("classes", "pretrained", "checkpoint", "head_blocks", "tail_blocks", "seed", "out")


@main.command()
@options_from(ExportConfig, PlanConfig, skip=NOT_PLANNED)
@click.pass_context
def plan(ctx: click.Context, **values: Any) -> None:
    """Print device cost of every cut and recommend one for the memory and links given."""
    from .model_loading import create_vit
    from .plan import plan_cuts, recommend

    export, cfg = configs_from(ctx, values, ExportConfig, PlanConfig)
    try:
        vit = create_vit(export.model, export.num_classes, model_args=export.model_args)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from exc
    prompts, batch = export.prompts, export.batch
    costs = plan_cuts(vit, prompts, batch, cfg.max_head_blocks, cfg.max_tail_blocks)
    device_gflops, uplink, downlink = cfg.device_gflops, cfg.uplink, cfg.downlink
    best = recommend(costs, cfg.device_memory, device_gflops, uplink, downlink)
    title = f"{export.model}, P={prompts}: per sample, fp32 bytes (fp16 halves them), "
    title += f"memory at B={batch}"
    table = Table(title=title)
    for col in (
        "K",
        "M",
        "params",
        "trained",
        "fwd GF",
        "bwd GF",
        "up KB",
        "down KB",
        "MB",
        "s/sample",
        "",
    ):
        table.add_column(col, justify="right")
    for c in costs:
        secs = c.round_seconds(device_gflops, uplink, downlink)
        table.add_row(
            str(c.head_blocks),
            str(c.tail_blocks),
            f"{c.device_params / 1e6:.2f}M",
            f"{c.trainable_params / 1e3:.1f}K",
            f"{c.forward_flops / 1e9:.2f}",
            f"{c.backward_flops / 1e9:.2f}",
            f"{c.up_bytes_fp32 / 1e3:.0f}",
            f"{c.down_bytes_fp32 / 1e3:.0f}",
            f"{c.peak_memory_mb:.0f}",
            f"{secs:.3f}",
            "<-" if c is best else "",
        )
    console.print(table)
    if best is None:
        smallest = min(costs, key=lambda c: c.peak_memory_mb)
        raise click.ClickException(
            f"no cut fits {cfg.device_memory:.0f} MB; the smallest needs about "
            f"{smallest.peak_memory_mb:.0f} MB at batch {batch}: try a smaller --batch"
        )
    console.print(
        f"recommended: --head-blocks {best.head_blocks} --tail-blocks {best.tail_blocks} "
        f"({device_gflops:g} GFLOP/s device, {uplink:g} Mbps up, {downlink:g} Mbps down)"
    )
