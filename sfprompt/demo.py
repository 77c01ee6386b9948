"""The main job behind `make demo`, until the federation (`sfprompt-sim`) exists.

It does the most complete thing that works end to end today: plan the cut of a ViT for a
small device, export the device and server bundles, and profile the device's training steps
in a fresh process that has no PyTorch. Every step prints what it did.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import click

DEFAULT_MODEL = "vit_tiny_patch16_224"


def _run(title: str, args: list[str]) -> None:
    click.secho(f"\n== {title}\n$ {' '.join(args)}", fg="cyan")
    start = time.perf_counter()
    subprocess.run(args, check=True)
    click.echo(f"({time.perf_counter() - start:.1f} s)")


@click.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="timm ViT to cut.")
@click.option("--batch", default=8, show_default=True)
def main(out: Path, model: str, batch: int) -> None:
    """Plan, export and profile one ViT cut for a device (randomly initialised offline)."""
    bin_dir = Path(sys.executable).parent
    bundle = out / "bundle"
    _run(
        "1. where to cut: device cost of each cut for a 512 MB device",
        [
            str(bin_dir / "sfprompt-export"),
            "plan",
            "--model",
            model,
            "--device-memory",
            "512",
            "--max-head-blocks",
            "3",
            "--batch",
            str(batch),
        ],
    )
    _run(
        "2. export the device bundle (ONNX + TorchScript) and the server bundle",
        [
            str(bin_dir / "sfprompt-export"),
            "bundle",
            "--model",
            model,
            "--num-classes",
            "10",
            "--prompts",
            "10",
            "--head-blocks",
            "1",
            "--tail-blocks",
            "0",
            "--batch",
            str(batch),
            "--out",
            str(bundle),
        ],
    )
    _run(
        "3. profile the device's training steps (onnxruntime + numpy, no PyTorch)",
        [
            str(bin_dir / "sfprompt-edge"),
            "profile",
            "--bundle",
            str(bundle / "device"),
            "--batch",
            str(batch),
            "--out",
            str(out / "profile"),
        ],
    )
    click.secho(f"\ndone: bundles in {bundle}, device profile in {out / 'profile'}", fg="green")
    click.echo("The federation itself (sfprompt-sim) is not built yet; see the open issues.")


if __name__ == "__main__":
    main()
