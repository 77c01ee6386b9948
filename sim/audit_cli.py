"""`sfprompt-audit CAPTURE_DIR --bundle SERVER_BUNDLE`: what a curious server learns from traffic
it captured (`sfprompt-cloud serve --capture DIR`). The logic is sim/audit_traffic.py."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console

from sfprompt.options import configs_from, opt, options_from


@dataclass(frozen=True)
class TrafficAuditConfig:
    """Everything `sfprompt-audit` takes besides CAPTURE_DIR."""

    bundle: Path = field(
        metadata=opt(
            "The server bundle the capture was served with (its head and tail are the "
            "attacker's; shapes are checked against it).",
            exists=True,
            file_okay=False,
        )
    )
    images: Path | None = field(
        default=None,
        metadata=opt(
            "The device's own data (.npz with images and labels) to score the attacks against; "
            "without it the reconstructions and labels are written unscored.",
            exists=True,
            dir_okay=False,
        ),
    )
    public: Path | None = field(
        default=None,
        metadata=opt(
            "Images the server holds and the devices do not (.npz with images, uint8 "
            "(N, H, W, 3)): trains the learned decoder; without it only the inversion runs.",
            exists=True,
            dir_okay=False,
        ),
    )
    out: Path | None = field(
        default=None,
        metadata=opt("Where the audit files go (default CAPTURE_DIR/audit).", file_okay=False),
    )
    steps: int = field(default=150, metadata=opt("Adam steps of the inversion of h."))
    decoder_epochs: int = field(default=15, metadata=opt("Epochs of the decoder's training."))
    max_images: int = field(
        default=32,
        metadata=opt("Captured samples the attacks on h reconstruct (labels: every sample)."),
    )

    def __post_init__(self) -> None:
        if self.steps < 1 or self.max_images < 1 or self.decoder_epochs < 0:
            raise ValueError("--steps and --max-images must be >= 1, --decoder-epochs >= 0")


def read_npz(path: Path, labels: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """`images` uint8 (N, H, W[, C]) and, if asked, `labels` (N,) of an .npz; raises
    click.ClickException naming what is missing."""
    try:
        with np.load(path, allow_pickle=False) as data:
            images = data.get("images")
            found = data["labels"] if labels and "labels" in data else None
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{path}: not a readable .npz ({exc})") from exc
    if images is None or images.dtype != np.uint8 or images.ndim not in (3, 4) or not len(images):
        raise click.ClickException(f"{path}: needs `images`, uint8 (N, H, W[, C]) with N >= 1")
    if labels and (found is None or found.shape != (len(images),)):
        raise click.ClickException(f"{path}: needs `labels` (N,) beside its images")
    return images, found


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("capture_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@options_from(TrafficAuditConfig)
@click.pass_context
def main(ctx: click.Context, capture_dir: Path, **values: Any) -> None:
    """Audit captured traffic: invert the h and read the labels off the dL/dz a server saw.

    CAPTURE_DIR is what `sfprompt-cloud serve --capture DIR` wrote. The attacks use only what
    the server knows (the bundle, each round's prompt and tail, the defense it asked for);
    --images, the device's own data, is only for scoring. Writes audit.md, audit.json,
    audit.png and reconstructions.safetensors.

    \b
      sfprompt-cloud serve --bundle b/server --capture runs/capture --rounds 1 ...
      sfprompt-audit runs/capture --bundle b/server --public public.npz --images device0.npz
    """
    from sfprompt.cloud_server.traffic_capture import CaptureError
    from sfprompt.protocol.bundle import BundleError

    from . import audit_traffic as at
    from .audit_traffic_report import write_traffic_audit

    try:
        (cfg,) = configs_from(ctx, values, TrafficAuditConfig)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
    try:
        model = at.load_server_model(cfg.bundle)
        capture = at.load_capture(capture_dir, model)
        public = at.unit_pixels(model, read_npz(cfg.public, False)[0]) if cfg.public else None
        device = None
        if cfg.images is not None:
            images, labels = read_npz(cfg.images, True)
            assert labels is not None
            device = (at.unit_pixels(model, images), labels.astype(np.int64))
        console.print(
            f"{len(capture.steps)} steps, {capture.samples} samples of "
            f"{len({s.device_id for s in capture.steps})} device(s), rounds "
            f"{', '.join(map(str, capture.rounds))}"
        )
        options = at.AuditOptions(cfg.steps, cfg.decoder_epochs, cfg.max_images)
        audit = at.audit_capture(capture, model, options, public, device, console)
    except (BundleError, CaptureError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    files = write_traffic_audit(cfg.out or capture_dir / "audit", audit)
    click.echo("\n".join(summary(audit)))
    click.echo(f"wrote {', '.join(str(f) for f in files)}")


def summary(audit: Any) -> list[str]:
    """The figures of audit.md worth a line on the terminal."""
    s = audit.scores
    if s is None:
        return [f"reconstructed {len(audit.inversions)} samples (no --images: not scored)"]
    lines = [f"inversion SSIM {s.inversion_ssim:.3f} (a random image: {s.baseline_ssim:.3f})"]
    if s.decoder_ssim is not None:
        lines.append(f"decoder SSIM {s.decoder_ssim:.3f}")
    if s.label_accuracy is not None:
        lines.append(f"labels from dL/dz {s.label_accuracy:.2f} (chance {1 / audit.classes:.2f})")
    return lines
