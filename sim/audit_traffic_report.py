"""`sfprompt-audit`'s files: audit.md, audit.json, audit.png and reconstructions.safetensors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from .audit_traffic import TrafficAudit
from .plots import plot_image_rows
from .results import fmt_number

SHOWN = 8  # samples in audit.png


def findings(audit: TrafficAudit) -> list[str]:
    """The table of audit.md, as lines: one per measured figure."""
    known = audit.guessed >= 0
    lines = [
        "| what | value |",
        "|:---|---:|",
        f"| captured steps / samples | {audit.steps} / {len(audit.rows)} |",
        f"| samples with dL/dz | {int(known.sum())} |",
        f"| samples reconstructed from h | {len(audit.inversions)} |",
        f"| public images for the decoder | {audit.public_images or 'none (no --public)'} |",
    ]
    s = audit.scores
    if s is None:
        lines.append("| scores | none: give --images, the device's own data |")
        return lines
    lines += [
        f"| inversion SSIM / PSNR (dB) | {s.inversion_ssim:.3f} / {fmt_number(s.inversion_psnr)} |",
        f"| decoder SSIM / PSNR (dB) | {_pair(s.decoder_ssim, s.decoder_psnr)} |",
        f"| SSIM of a random other device image | {s.baseline_ssim:.3f} |",
        f"| labels from dL/dz | {_share(s.label_accuracy)} (chance {1 / audit.classes:.2f}, "
        f"the commonest label {s.majority:.2f}) |",
        f"| labels the tail predicts from z | {_share(s.tail_accuracy)} |",
        f"| h matched to an image: median / max distance | {np.median(s.distance):.2g} / "
        f"{s.distance.max():.2g} |",
    ]
    return lines


def _pair(ssim: float | None, psnr: float | None) -> str:
    if ssim is None or psnr is None:
        return "not run (no --public)"
    return f"{ssim:.3f} / {fmt_number(psnr)}"


def _share(value: float | None) -> str:
    return "no dL/dz captured" if value is None else f"{value:.2f}"


def markdown(audit: TrafficAudit) -> str:
    defenses = [f"- round {n}: {d}" for n, d in sorted(audit.defenses.items())]
    lines = [
        "# Leakage audit of captured traffic",
        "",
        f"What a curious server recovers from the traffic captured in `{audit.folder}` "
        f"(devices {', '.join(audit.devices)}; rounds {', '.join(map(str, audit.rounds))}). "
        "The server knows the public head, each round's prompt and tail (from the capture), "
        "the defense it asked for, and z = body(h), which it computes. Inversion: Adam on an "
        "image from noise until head(x), clipped as the devices clip, matches the captured h. "
        "Decoder: a small network trained on the public images through the same defense. "
        "Labels: for each candidate, the dL/dz the device would send; the nearest wins.",
        "",
        *findings(audit),
        "",
    ]
    if audit.scores is not None:
        lines += [
            "Scoring matched each captured h to the device image (--images) whose h, with the "
            "round's global prompt, is nearest. That is for scoring only (the attacker does not "
            "hold these images); it assumes the device sent them unaugmented through the "
            "bundle's preprocessing. Its prompt had moved from the global one by local "
            "training, so the distances are small rather than 0. SSIM and PSNR on grey values "
            "in [0, 1]; a random other image of the device's sets the floor SSIM means nothing "
            "above.",
            "",
        ]
    lines += ["The defense each round's TASK asked of the devices:", "", *defenses, ""]
    return "\n".join(lines)


def to_json(audit: TrafficAudit) -> dict:
    s = audit.scores
    samples = []
    for i, (device, number, step, row) in enumerate(audit.rows):
        item = {"device_id": device, "round": number, "step": step, "row": row}
        item |= {"label_guessed": int(audit.guessed[i]), "label_predicted": int(audit.predicted[i])}
        if s is not None:
            item |= {"image": int(s.matched[i]), "label": int(s.true_labels[i])}
            item["match_distance"] = float(s.distance[i])
        samples.append(item)
    scores = None
    if s is not None:
        scores = {
            k: _finite(getattr(s, k))
            for k in (
                "inversion_ssim",
                "inversion_psnr",
                "decoder_ssim",
                "decoder_psnr",
                "baseline_ssim",
                "label_accuracy",
                "majority",
                "tail_accuracy",
            )
        }
    return {
        "capture": str(audit.folder),
        "devices": audit.devices,
        "rounds": audit.rounds,
        "steps": audit.steps,
        "reconstructed": len(audit.inversions),
        "public_images": audit.public_images,
        "chance": 1 / audit.classes,
        "defenses": {str(n): d for n, d in audit.defenses.items()},
        "scores": scores,
        "seconds": audit.seconds,
        "samples": samples,
    }


def _finite(value: float | None) -> float | str | None:
    """inf (a perfect PSNR) as a string, which JSON can hold."""
    return "inf" if isinstance(value, float) and math.isinf(value) else value


def plot(audit: TrafficAudit, path: Path) -> Path:
    """Real images (where known) above the inversion's and the decoder's reconstructions."""
    shown = min(SHOWN, len(audit.inversions))
    panels = []
    if audit.scores is not None:
        panels.append(("real", audit.scores.real))
    panels.append(("inversion", audit.inversions))
    if audit.decodings is not None:
        panels.append(("decoder", audit.decodings))
    title = "What the server reconstructs from captured h"
    return plot_image_rows(panels, max(shown, 1), title, path, fontsize=8)


def write_traffic_audit(folder: Path, audit: TrafficAudit) -> list[Path]:
    """audit.md, audit.json, audit.png and reconstructions.safetensors in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    md, js = folder / "audit.md", folder / "audit.json"
    md.write_text(markdown(audit))
    js.write_text(json.dumps(to_json(audit), indent=1))
    arrays = {
        "inversions": audit.inversions.astype(np.float32),
        "labels_guessed": audit.guessed.astype(np.int64),
        "labels_predicted": audit.predicted.astype(np.int64),
    }
    if audit.decodings is not None:
        arrays["decodings"] = audit.decodings.astype(np.float32)
    tensors = folder / "reconstructions.safetensors"
    save_file(arrays, str(tensors), metadata={"samples": "in audit.json's order"})
    return [md, js, plot(audit, folder / "audit.png"), tensors]
