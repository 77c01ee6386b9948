"""`sfprompt-export`: cut a timm ViT into device and server bundles, or plan where to cut."""

from __future__ import annotations

import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from sfprompt.config_file import config_values
from sfprompt.protocol.bundle import BundleError

from .model_loading import ModelError, create_vit, parse_model_args

console = Console()


def _config_file(path: Path | None) -> dict[str, Any]:
    """The file's options by ExportConfig field, keys spelled like the flags or the fields and
    values checked by the flags' types; `model_args` (a table of timm overrides, or a list of
    KEY=VALUE) and `classes` (a list of names is fine there) are kept as written."""
    from .bundle_writer import ExportConfig

    if path is None:
        return {}
    names = {f.name for f in fields(ExportConfig)}
    ctx = click.get_current_context()
    values = config_values(ctx, names, path, raw=("model_args", "classes"))
    model_args = values.get("model_args")
    if isinstance(model_args, (list, tuple)):
        try:
            values["model_args"] = parse_model_args([str(a) for a in model_args])
        except ModelError as exc:
            raise click.ClickException(f"{path}: {exc}") from exc
    elif model_args is not None and not isinstance(model_args, dict):
        raise click.ClickException(f"{path}: model_args must be a table of timm overrides")
    return values


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
@click.option(
    "--model", help="timm model name, e.g. vit_base_patch16_224 or deit_small_patch16_224."
)
@click.option(
    "--pretrained/--random-init",
    default=None,
    help="Load timm's pre-trained weights (needs the network or a warm cache).",
)
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A local .safetensors or .pth state dict (read with weights_only=True).",
)
@click.option(
    "--num-classes",
    type=int,
    help="Classes of the task being tuned.  [default: 10, or the count of --classes]",
)
@click.option(
    "--classes",
    metavar="FILE|DIR|a,b,c",
    help="Class names in logit order: a file with one a line, a data folder (its ImageFolder "
    "folders, CIFAR or .npz names) or a,b,c. Devices map their data to them by name.  "
    "[default: 0..N-1]",
)
@click.option("--prompts", type=int, help="Learnable prompt tokens P.  [default: 10]")
@click.option(
    "--head-blocks",
    type=int,
    help="Blocks kept on the device before the body, K >= 1.  [default: 1]",
)
@click.option(
    "--tail-blocks",
    type=int,
    help="Blocks kept on the device after the body, M >= 0.  [default: 0]",
)
@click.option(
    "--batch", type=int, help="The device's planned batch size B (graphs take any).  [default: 8]"
)
@click.option(
    "--model-arg",
    "model_args",
    multiple=True,
    metavar="KEY=VALUE",
    help="timm override, repeatable: --model-arg img_size=32 --model-arg depth=4.",
)
@click.option(
    "--seed",
    type=int,
    help="Seed of the prompt and of any random weights (same seed, same bundle).  [default: 0]",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Output folder; gets device/ and server/.  [default: bundle]",
)
@click.option(
    "--force", is_flag=True, help="Replace OUT/device and OUT/server if they hold a bundle."
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON or TOML file with any of these options (keys like the flags); flags win.",
)
def bundle(
    config_file: Path | None, model_args: tuple[str, ...], force: bool, **flags: Any
) -> None:
    """Export a device bundle (ONNX + TorchScript) and a server bundle (body weights)."""
    from .bundle_writer import ExportConfig, export_bundle

    values = _config_file(config_file)
    known = {f.name for f in fields(ExportConfig)}
    unknown = set(values) - known
    if unknown:
        raise click.ClickException(f"unknown config keys: {', '.join(sorted(unknown))}")
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        if model_args:
            values["model_args"] = {**values.get("model_args", {}), **parse_model_args(model_args)}
        for key in ("checkpoint", "out"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        _resolve_classes(values)
        cfg = ExportConfig(**values)
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
    """Read `--classes` (a string, or a list in a config file) into names; without
    `--num-classes` their count is the number of classes."""
    from sfprompt.data.classes import read_class_names

    if isinstance(values.get("classes"), str):
        values["classes"] = read_class_names(values["classes"])
    if values.get("classes") is not None and values.get("num_classes") is None:
        values["num_classes"] = len(values["classes"])


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


@main.command()
@click.option("--model", default="vit_base_patch16_224", show_default=True, help="timm model name.")
@click.option("--num-classes", default=10, show_default=True)
@click.option("--prompts", default=10, show_default=True)
@click.option("--batch", default=8, show_default=True, help="Batch size the memory is planned for.")
@click.option("--max-head-blocks", default=4, show_default=True)
@click.option("--max-tail-blocks", default=2, show_default=True)
@click.option("--device-memory", type=float, help="Memory the device can give us, MB.")
@click.option("--device-gflops", default=10.0, show_default=True, help="Device compute, GFLOP/s.")
@click.option("--uplink", default=12.0, show_default=True, help="Uplink, Mbps (paper: 12).")
@click.option("--downlink", default=54.0, show_default=True, help="Downlink, Mbps (paper: 54).")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE")
def plan(
    model: str,
    num_classes: int,
    prompts: int,
    batch: int,
    max_head_blocks: int,
    max_tail_blocks: int,
    device_memory: float | None,
    device_gflops: float,
    uplink: float,
    downlink: float,
    model_args: tuple[str, ...],
) -> None:
    """Print device cost of every cut and recommend one for the memory and links given."""
    from .plan import plan_cuts, recommend

    try:
        vit = create_vit(model, num_classes, model_args=parse_model_args(model_args))
    except ModelError as exc:
        raise click.ClickException(str(exc)) from exc
    costs = plan_cuts(vit, prompts, batch, max_head_blocks, max_tail_blocks)
    best = recommend(costs, device_memory, device_gflops, uplink, downlink)
    title = f"{model}, P={prompts}: per sample, fp32 bytes (fp16 halves them), memory at B={batch}"
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
            f"no cut fits {device_memory:.0f} MB; the smallest needs about "
            f"{smallest.peak_memory_mb:.0f} MB at batch {batch}: try a smaller --batch"
        )
    console.print(
        f"recommended: --head-blocks {best.head_blocks} --tail-blocks {best.tail_blocks} "
        f"({device_gflops:g} GFLOP/s device, {uplink:g} Mbps up, {downlink:g} Mbps down)"
    )
