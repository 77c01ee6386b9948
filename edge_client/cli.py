"""`sfprompt-edge`: what runs on the device. Imports no PyTorch."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from sfprompt.protocol.bundle import BundleError

console = Console()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train prompt + tail on this device, its images never leaving it.

    \b
    Check a device can hold a bundle before it joins a federation:
      sfprompt-edge profile --bundle bundle/device --batch 8 --out profile/
    """


@main.command()
@click.option(
    "--bundle",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The device bundle folder written by `sfprompt-export bundle`.",
)
@click.option("--batch", default=8, show_default=True, help="Batch size to profile.")
@click.option("--steps", default=5, show_default=True, help="Training steps to run.")
@click.option("--threads", type=int, help="onnxruntime threads (default: up to 4 cores).")
@click.option(
    "--micro-batch",
    default=4,
    show_default=True,
    help="Samples the head graphs process at once; smaller uses less memory.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write profile.json and memory_timeline.png here.",
)
def profile(
    bundle: Path, batch: int, steps: int, threads: int | None, micro_batch: int, out: Path | None
) -> None:
    """Run the device's training steps on synthetic input; print peak memory and time per phase."""
    from .profile import ProfileConfig, run_profile

    try:
        result = run_profile(ProfileConfig(bundle, batch, steps, threads, micro_batch, out=out))
    except BundleError as exc:
        raise click.ClickException(str(exc)) from exc
    table = Table(title=f"device profile of {bundle} at batch {batch} (onnxruntime)")
    for col in ("phase", "peak RSS MB", "USS MB", "ms / call", "CPU ms / call", "calls"):
        table.add_column(col, justify="right")
    for p in result.phases.values():
        table.add_row(
            p.name,
            f"{p.peak_rss_mb:.0f}",
            f"{p.uss_mb:.0f}",
            f"{1000 * p.seconds / p.calls:.1f}",
            f"{1000 * p.cpu_seconds / p.calls:.1f}",
            str(p.calls),
        )
    console.print(table)
    console.print(f"peak RSS {result.peak_rss_mb:.0f} MB")
    if out is not None:
        console.print(f"wrote {out / 'profile.json'} and {out / 'memory_timeline.png'}")
