"""Device benchmark: peak RSS and step time of the onnx and the TorchScript runtimes.

For vit_base_patch16_224 with K=1 head block, M=0 tail blocks, P=10 prompts and B=8 it prints,
side by side, what one device process holds at its peak and how long one local step takes
(head forward, tail step, head VJP, update) with each runtime, and their ratios. Each figure
comes from a fresh child process (`sfprompt.edge_client.memory_budget.measure_step`, the
same measurement `--memory-budget` uses): peak RSS is the kernel's high-water mark, so the
parent's memory, and its torch, do not count. The runs alternate onnx, torchscript, onnx,
torchscript: each step time is the better of two, each peak the worse. Goal: the onnx
process under 256 MB.

The bundle is exported once into a cache folder and reused while its checksums hold.

    python bench/bench_edge.py [--model vit_base_patch16_224] [--batch 8] [--steps 6]
                               [--micro-batch 4] [--threads N] [--head-weights int8]
                               [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sfprompt.edge_client.memory_budget import StepMeasurement, measure_step
from sfprompt.export.config import HEAD_WEIGHTS  # no torch: the exporter's options alone
from sfprompt.protocol.bundle import BundleError, load_manifest

RUNTIMES = ("onnx", "torchscript")
GOAL_MB = 256


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sfprompt" / "bench"


def cached_bundle(
    model: str, cache: Path, console: Console, head_weights: str = "fp32"
) -> tuple[Path, float | None]:
    """The device bundle of `model` at K=1, M=0, P=10; exported only if the cache lacks it.

    Returns the folder and the export time in seconds (None when it came from the cache).
    """
    out = cache / f"{model}_k1_m0_p10_c10" / head_weights
    try:
        load_manifest(out / "device", role="device")  # checks every file's sha256
        return out / "device", None
    except BundleError:
        pass
    from sfprompt.export.bundle_writer import export_bundle  # torch: only here
    from sfprompt.export.config import ExportConfig

    cfg = ExportConfig(
        model=model,
        num_classes=10,
        prompts=10,
        head_blocks=1,
        tail_blocks=0,
        head_weights=head_weights,
        out=out,
    )
    console.print(f"exporting {model} into {out}")
    start = time.perf_counter()
    result = export_bundle(cfg, progress=lambda _: None)
    return result.device_dir, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument(
        "--head-weights", choices=HEAD_WEIGHTS, default="fp32",
        help="the export's --head-weights (the TorchScript twins stay fp32)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    console = Console()
    bundle, export_s = cached_bundle(args.model, args.cache, console, args.head_weights)

    runs: dict[str, list[StepMeasurement]] = {kind: [] for kind in RUNTIMES}
    for kind in (*RUNTIMES, *RUNTIMES):  # interleaved, so drift in the machine hits both
        m = measure_step(bundle, kind, args.batch, args.micro_batch, args.threads, args.steps)
        runs[kind].append(m)
    step_s = {k: min(m.step_s for m in runs[k]) for k in RUNTIMES}
    peak_mb = {k: max(m.peak_rss_mb for m in runs[k]) for k in RUNTIMES}
    first_s = {k: min(m.first_step_s for m in runs[k]) for k in RUNTIMES}
    opened_mb = {k: max(m.opened_rss_mb for m in runs[k]) for k in RUNTIMES}

    title = (
        f"{args.model}, K=1 M=0 P=10, B={args.batch}, micro-batch {args.micro_batch}, "
        f"{args.threads} threads, head weights {args.head_weights}"
    )
    table = Table(title=title)
    for column in ("figure", "onnx", "torchscript", "torchscript / onnx"):
        table.add_column(column, justify="right" if column != "figure" else "left")
    rows = (
        ("peak RSS of the process (MB)", peak_mb, "{:.0f}"),
        ("RSS once opened, no graph loaded (MB)", opened_mb, "{:.0f}"),
        ("peak above that (MB)", {k: peak_mb[k] - opened_mb[k] for k in RUNTIMES}, "{:.0f}"),
        ("local step, median (ms)", {k: 1000 * v for k, v in step_s.items()}, "{:.0f}"),
        ("first step, opens graphs (ms)", {k: 1000 * v for k, v in first_s.items()}, "{:.0f}"),
    )
    for label, values, fmt in rows:
        ratio = values["torchscript"] / values["onnx"]
        table.add_row(
            label, fmt.format(values["onnx"]), fmt.format(values["torchscript"]), f"{ratio:.2f}x"
        )
    table.add_row("imported torch", *(str(runs[k][0].torch_loaded) for k in RUNTIMES), "")
    console.print(table)
    if export_s is not None:
        console.print(f"export took {export_s:.1f} s")
    ok = peak_mb["onnx"] < GOAL_MB
    console.print(f"goal: onnx peak RSS < {GOAL_MB} MB: {'met' if ok else 'NOT met'}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        figures = {
            "model": args.model,
            "batch": args.batch,
            "micro_batch": args.micro_batch,
            "threads": args.threads,
            "export_s": export_s,
            "peak_rss_mb": peak_mb,
            "opened_rss_mb": opened_mb,
            "step_s": step_s,
            "first_step_s": first_s,
            "goal_met": ok,
            "runs": {k: [asdict(m) for m in runs[k]] for k in RUNTIMES},
        }
        args.out.write_text(json.dumps(figures, indent=2))
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
