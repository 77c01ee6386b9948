"""Exporter and device-step benchmark (issue: the foundation).

For vit_base_patch16_224 with K=1, M=0, P=10, B=8 it prints: the export time; one device
training step (head forward, tail step, head VJP, update) with onnxruntime and with PyTorch
eager, each in a fresh process, in --rounds side-by-side pairs (the machine's speed drifts:
only ratios within a pair mean much), their median ratio; and the peak RSS of each process.
Each for the local phase's step (the tail reads h; the bundle's local graphs compute only what
it reads) and the split phase's (the device's share; dL/dh dense: every row of h trained).
Goals (issue 13): onnxruntime at least as fast as eager; peak RSS <= 160 MB.

    python bench/bench_export.py [--model vit_base_patch16_224] [--batch 8] [--steps 6]
                                 [--rounds 3] [--head-weights int8] [--lean]
                                 [--micro-batch 4] [--phases local,split]

The least memory: `--head-weights fp16 --lean --micro-batch 1`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sfprompt.export.bundle_writer import export_bundle
from sfprompt.export.config import HEAD_WEIGHTS, ExportConfig

HERE = Path(__file__).parent
GOAL_MB = 160  # issue 13: half the memory of the first onnx runtime


def device_process(
    mode: str, bundle: Path, batch: int, steps: int, threads: int, choice: dict
) -> dict:
    """One fresh process of `mode` (onnx or torch); `choice` is read by device_process.py."""
    env = {**os.environ, "SFPROMPT_BENCH_ORT": json.dumps(choice)}
    out = subprocess.run(
        [
            sys.executable,
            str(HERE / "device_process.py"),
            mode,
            str(bundle),
            str(batch),
            str(steps),
            str(threads),
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--rounds", type=int, default=3, help="eager/onnx pairs (median)")
    parser.add_argument("--head-weights", choices=HEAD_WEIGHTS, default="fp32")
    parser.add_argument("--lean", action="store_true", help="the device's --lean setting")
    parser.add_argument("--micro-batch", type=int, default=4, help="samples per head-graph call")
    parser.add_argument("--phases", default="local,split", help="whose step: local, split")
    args = parser.parse_args()
    phases = args.phases.split(",")
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ExportConfig(
            model=args.model,
            num_classes=10,
            prompts=10,
            head_blocks=1,
            tail_blocks=0,
            batch=args.batch,
            head_weights=args.head_weights,
            out=Path(tmp),
        )
        start = time.perf_counter()
        result = export_bundle(cfg, progress=lambda _: None)
        export_s = time.perf_counter() - start
        runs = {(p, m): [] for p in phases for m in ("onnx", "torch")}
        for i in range(args.rounds):  # each pair side by side, its order alternating
            for phase in phases:
                choice = {"lean": args.lean, "micro_batch": args.micro_batch, "phase": phase}
                for mode in ("onnx", "torch") if i % 2 == 0 else ("torch", "onnx"):
                    fig = device_process(
                        mode, result.device_dir, args.batch, args.steps, args.threads, choice
                    )
                    runs[phase, mode].append(fig)
    setting = f"head weights {args.head_weights}" + (", --lean" if args.lean else "")
    setting += f", micro-batch {args.micro_batch}"
    table = Table(
        title=f"{args.model}, K=1 M=0 P=10, B={args.batch}, {args.threads} threads, {setting}"
    )
    table.add_column("figure")
    table.add_column(f"median of {args.rounds}", justify="right")
    table.add_column("each run", justify="right")
    table.add_row("export time (s)", f"{export_s:.1f}", "")
    verdicts = []
    for phase in phases:
        onnx, torch_runs = runs[phase, "onnx"], runs[phase, "torch"]
        for mode, figs in (("onnx", onnx), ("torch", torch_runs)):
            steps = [1000 * r["step_s"] for r in figs]
            peaks = [r["peak_rss_mb"] for r in figs]
            table.add_row(f"{phase} step, {mode}: time (ms)", f"{statistics.median(steps):.0f}",
                          " ".join(f"{v:.0f}" for v in steps))  # fmt: skip
            table.add_row(f"{phase} step, {mode}: peak RSS of a fresh process (MB)",
                          f"{statistics.median(peaks):.0f}",
                          " ".join(f"{v:.0f}" for v in peaks))  # fmt: skip
        ratios = [t["step_s"] / o["step_s"] for o, t in zip(onnx, torch_runs)]
        ratio = statistics.median(ratios)
        table.add_row(f"{phase} step: eager time / onnxruntime time", f"{ratio:.2f}x",
                      " ".join(f"{r:.2f}" for r in ratios))  # fmt: skip
        peak = statistics.median(r["peak_rss_mb"] for r in onnx)
        verdicts.append(
            f"{phase} step: peak RSS <= {GOAL_MB} MB {'met' if peak <= GOAL_MB else 'NOT met'}, "
            f"onnxruntime >= eager speed {'met' if ratio >= 1 else 'NOT met'}"
        )
    imported = any(r["torch_loaded"] for p in phases for r in runs[p, "onnx"])
    table.add_row("onnx process imported torch", str(imported), "")
    console.print(table)
    for verdict in verdicts:
        console.print(f"goals: {verdict}")


if __name__ == "__main__":
    main()
