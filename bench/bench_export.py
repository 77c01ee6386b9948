"""Exporter and device-step benchmark (issue: the foundation).

For vit_base_patch16_224 with K=1, M=0, P=10, B=8 it prints: the export time; one device
training step (head forward, tail step, head VJP, update) with onnxruntime and with PyTorch
eager, each in a fresh process, and their ratio measured in this one run; and the peak RSS of
each process. Goal: the onnxruntime process under 256 MB and at least as fast as eager.

    python bench/bench_export.py [--model vit_base_patch16_224] [--batch 8] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sfprompt.export.bundle_writer import export_bundle
from sfprompt.export.config import ExportConfig

HERE = Path(__file__).parent


def device_process(mode: str, bundle: Path, batch: int, steps: int, threads: int) -> dict:
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
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ExportConfig(
            model=args.model,
            num_classes=10,
            prompts=10,
            head_blocks=1,
            tail_blocks=0,
            batch=args.batch,
            out=Path(tmp),
        )
        start = time.perf_counter()
        result = export_bundle(cfg, progress=lambda _: None)
        export_s = time.perf_counter() - start
        runs = {}
        for mode in ("onnx", "torch", "onnx", "torch"):  # interleaved, best of two each
            fig = device_process(mode, result.device_dir, args.batch, args.steps, args.threads)
            best = runs.get(mode)
            if best is None or fig["step_s"] < best["step_s"]:
                runs[mode] = fig
    table = Table(title=f"{args.model}, K=1 M=0 P=10, B={args.batch}, {args.threads} threads")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("export time (s)", f"{export_s:.1f}")
    for mode in ("onnx", "torch"):
        table.add_row(f"{mode}: device step (ms)", f"{1000 * runs[mode]['step_s']:.0f}")
        table.add_row(
            f"{mode}: peak RSS of a fresh process (MB)", f"{runs[mode]['peak_rss_mb']:.0f}"
        )
    ratio = runs["torch"]["step_s"] / runs["onnx"]["step_s"]
    table.add_row("eager step time / onnxruntime step time", f"{ratio:.2f}x")
    table.add_row("onnx process imported torch", str(runs["onnx"]["torch_loaded"]))
    console.print(table)
    ok_mem = runs["onnx"]["peak_rss_mb"] < 256
    console.print(
        f"goal < 256 MB peak RSS: {'met' if ok_mem else 'NOT met'}; "
        f"goal onnxruntime >= eager speed: {'met' if ratio >= 1 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
