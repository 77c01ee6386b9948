"""Communication at the paper's scale: exact bytes per device and round, SFPrompt vs SFL vs FL.

The paper reports SFPrompt's communication as about 0.47x that of federated full fine-tuning for
ViT-Base. This builds vit_base_patch16_224 (random weights: only shapes matter), exports a real
device bundle with sfprompt's exporter at the paper's setting (K=1 head block, M=0 tail blocks,
10 prompts, 10 classes, batch 128), and counts with `sim/comm_model.py` the payload bytes one
device sends and receives in one round when 50,000 CIFAR-10 images are split evenly over N
devices, for each keep ratio gamma and each encoding of activations and gradients:

- SFPrompt: split training on the ceil(gamma n) samples a device keeps, plus TASK down and
  UPDATE up (prompt + tail);
- SFL: every sample through split training (a head without prompts), plus head + tail weights
  each way, at the same encoding;
- FL full fine-tuning: every weight each way (safetensors size).

Every size is the protocol's own encoding of a message of that shape (chunks included), the
quantity a real federation records in metrics.jsonl (MQTT payloads; a test holds the model to a
real federation's record to the byte).

    python bench/bench_comm.py [--clients 10,50,100] [--gammas 0.5,1.0]
        [--encodings fp32,fp16,int8] [--bundle DIR] [--out figures.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sfprompt.export.bundle_writer import write_bundles
from sfprompt.export.config import ExportConfig
from sfprompt.export.model_loading import create_vit
from sfprompt.export.split_vit import Cut, SplitViT
from sfprompt.protocol.bundle import Manifest, load_manifest
from sfprompt.sim.comm_model import (
    CommModel,
    RoundBytes,
    fl_full_weights_bytes,
    fl_round,
    kept_samples,
    ratio,
    sfl_weights_bytes,
    typical_settings,
)
from sfprompt.units import MB

PAPER_RATIO = 0.47  # SFPrompt / FL full fine-tuning, ViT-Base (the paper's communication figure)


def csv(kind: type, text: str) -> list[Any]:
    return [kind(item) for item in text.split(",") if item]


def device_bundle(args: argparse.Namespace, tmp: Path, console: Console) -> tuple[Manifest, Any]:
    """The device manifest and the timm model it was cut from: exported here, or read from
    `--bundle` (the model is then rebuilt from the manifest, with random weights)."""
    if args.bundle is not None:
        manifest = load_manifest(args.bundle, role="device")
        vit = create_vit(manifest.model, manifest.num_classes, model_args=manifest.model_args)
        return manifest, vit
    cfg = ExportConfig(
        model=args.model,
        num_classes=args.num_classes,
        prompts=args.prompts,
        head_blocks=args.head_blocks,
        tail_blocks=args.tail_blocks,
        batch=args.batch,
        out=tmp,
    )
    vit = create_vit(cfg.model, cfg.num_classes)  # random weights: no download
    start = time.perf_counter()
    result = write_bundles(SplitViT.cut_model(vit, cfg.cut), cfg, progress=lambda _: None)
    console.print(f"exported {args.model} in {time.perf_counter() - start:.0f} s")
    return load_manifest(result.device_dir, role="device"), vit


def figures(args: argparse.Namespace, model: CommModel, sfl_w: int, fl_w: int) -> list[dict]:
    """One row per (N, gamma, encoding): bytes per device and round, and the ratios."""
    rows = []
    for clients in args.clients:
        samples = args.images // clients
        for gamma in args.gammas:
            for encoding in args.encodings:
                settings = typical_settings(gamma, args.batch, encoding)
                sfprompt = model.sfprompt_round(samples, settings)
                sfl = model.sfl_round(samples, args.batch, encoding, sfl_w)
                fl = fl_round(fl_w)
                rows.append(
                    {
                        "clients": clients,
                        "samples_per_device": samples,
                        "gamma": gamma,
                        "kept": kept_samples(samples, gamma),
                        "encoding": encoding,
                        **{name: _bytes(rb) for name, rb in _methods(sfprompt, sfl, fl)},
                        "ratio_sfprompt_fl_full": ratio(sfprompt.total, fl.total),
                        "ratio_sfprompt_sfl": ratio(sfprompt.total, sfl.total),
                        "totals_all_clients": {
                            name: clients * rb.total for name, rb in _methods(sfprompt, sfl, fl)
                        },
                    }
                )
    return rows


def _methods(sfprompt: RoundBytes, sfl: RoundBytes, fl: RoundBytes) -> list[tuple[str, RoundBytes]]:
    return [("sfprompt", sfprompt), ("sfl", sfl), ("fl_full", fl)]


def _bytes(rb: RoundBytes) -> dict[str, int]:
    return {**asdict(rb), "up": rb.up, "down": rb.down, "total": rb.total}


def closest(rows: list[dict]) -> dict:
    """The fp32 row whose SFPrompt / FL full ratio is nearest the paper's (fp32 if present:
    the paper sends float32 activations)."""
    pool = [r for r in rows if r["encoding"] == "fp32"] or rows
    return min(pool, key=lambda r: abs(r["ratio_sfprompt_fl_full"] - PAPER_RATIO))


def print_table(console: Console, args: argparse.Namespace, rows: list[dict]) -> None:
    table = Table(
        title=(
            f"{args.model}, K={args.head_blocks} M={args.tail_blocks} P={args.prompts}, "
            f"batch {args.batch}: MB (1e6 B) per device per round, up + down"
        )
    )
    columns = ("N", "imgs/dev", "gamma", "enc", "SFPrompt", "SFL", "FL full")
    for column in (*columns, "SFP/FL", "SFP/SFL", "paper", "SFPrompt, all N (GB)"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            str(r["clients"]),
            str(r["samples_per_device"]),
            f"{r['gamma']:g}",
            r["encoding"],
            f"{r['sfprompt']['total'] / MB:,.1f}",
            f"{r['sfl']['total'] / MB:,.1f}",
            f"{r['fl_full']['total'] / MB:,.1f}",
            f"{r['ratio_sfprompt_fl_full']:.2f}x",
            f"{r['ratio_sfprompt_sfl']:.2f}x",
            f"{PAPER_RATIO:.2f}x",
            f"{r['totals_all_clients']['sfprompt'] / 1e9:,.1f}",
        )
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--head-blocks", type=int, default=1)
    parser.add_argument("--tail-blocks", type=int, default=0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--images", type=int, default=50_000, help="training images in all")
    parser.add_argument("--clients", type=lambda t: csv(int, t), default=[10, 50, 100])
    parser.add_argument("--gammas", type=lambda t: csv(float, t), default=[0.5, 1.0])
    parser.add_argument("--encodings", type=lambda t: csv(str, t), default=["fp32", "fp16", "int8"])
    parser.add_argument("--bundle", type=Path, help="an exported device bundle (skips the export)")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    console = Console(width=160)
    with tempfile.TemporaryDirectory(prefix="sfprompt-comm-") as tmp:
        manifest, vit = device_bundle(args, Path(tmp), console)
    cut = Cut(manifest.head_blocks, manifest.tail_blocks, manifest.prompts)
    args.model, args.prompts = manifest.model, manifest.prompts  # the bundle's, if given
    args.head_blocks, args.tail_blocks = manifest.head_blocks, manifest.tail_blocks
    sfl_w, fl_w = sfl_weights_bytes(vit, cut), fl_full_weights_bytes(vit)
    model = CommModel(manifest)
    start = time.perf_counter()
    rows = figures(args, model, sfl_w, fl_w)
    print_table(console, args, rows)
    best = closest(rows)
    h, z = model.sfprompt_shapes.h, model.sfprompt_shapes.z
    console.print(
        f"h per sample {h}, z {z}; SFL head + tail {sfl_w / MB:.1f} MB, all weights "
        f"{fl_w / MB:.1f} MB (each way); counted in {time.perf_counter() - start:.1f} s."
    )
    console.print(
        f"Paper: SFPrompt / FL full = {PAPER_RATIO}x for ViT-Base; it states neither N nor gamma "
        f"for it. Nearest in fp32: N = {best['clients']} ({best['samples_per_device']} images "
        f"per device), gamma = {best['gamma']:g}: {best['ratio_sfprompt_fl_full']:.3f}x "
        f"(up {best['sfprompt']['up'] / MB:.1f} MB, down {best['sfprompt']['down'] / MB:.1f} MB)."
    )
    near = [
        f"N = {r['clients']}, gamma = {r['gamma']:g}, {r['encoding']} "
        f"({r['ratio_sfprompt_fl_full']:.3f}x)"
        for r in rows
        if abs(r["ratio_sfprompt_fl_full"] - PAPER_RATIO) < 0.02 and r is not best
    ]
    if near:
        console.print("Also within 0.02 of it: " + "; ".join(near) + ".")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        setting = {
            "model": manifest.model,
            "head_blocks": manifest.head_blocks,
            "tail_blocks": manifest.tail_blocks,
            "prompts": manifest.prompts,
            "num_classes": manifest.num_classes,
            "batch": args.batch,
            "images": args.images,
            "h_per_sample": list(h),
            "z_per_sample": list(z),
            "link_limit_bytes": model.link.limit,
            "what": "MQTT payload bytes per device per round, as metrics.jsonl counts them",
        }
        out = {
            "setting": setting,
            "weights_bytes": {"sfl_head_tail": sfl_w, "fl_full": fl_w},
            "paper_ratio_sfprompt_fl_full": PAPER_RATIO,
            "nearest_to_paper": {k: best[k] for k in ("clients", "gamma", "encoding")},
            "rows": rows,
        }
        args.out.write_text(json.dumps(out, indent=2))
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
