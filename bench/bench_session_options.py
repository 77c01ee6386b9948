"""Which onnxruntime session options make the device step fast without giving back its memory.

The device runtime keeps the head forward's tape for its backward, allocates from one arena
shared by its sessions, pre-packs weights and runs the head in micro-batches of 4; `--lean`
recomputes instead and uses plain malloc. For one bundle, each variant below changes one of
those choices and runs N device steps in a fresh process (bench/device_process.py); it prints
the median step time and peak RSS beside PyTorch eager's in the same run: the ratios are what
to read, not the absolute times.

    python bench/bench_session_options.py [--model vit_base_patch16_224] [--batch 8] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sfprompt.export.bundle_writer import export_bundle
from sfprompt.export.config import ExportConfig

HERE = Path(__file__).parent
VARIANTS: dict[str, dict] = {
    "defaults: tape, one shared arena, pre-packed": {},
    "--lean: recompute, malloc, not pre-packed": {"lean": True},
    "recompute the head forward (no tape)": {"tape": False},
    "malloc instead of the arena": {"arena": False},
    "an arena per session (onnxruntime's default)": {"arena": "per-session"},
    "weights not pre-packed": {"prepacking": False},
    "whole batch (no micro-batches)": {"micro_batch": None},
    "memory patterns": {"mem_pattern": True},
    "workers spin after each call (onnxruntime's default)": {"spinning": True},
    "basic graph optimisation": {"opt_level": "basic"},
}


def run(mode: str, bundle: Path, args: argparse.Namespace, variant: dict) -> dict:
    env = {**os.environ, "SFPROMPT_BENCH_ORT": json.dumps(variant)}
    command = [sys.executable, str(HERE / "device_process.py"), mode, str(bundle)]
    command += [str(args.batch), str(args.steps), str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bundle", type=Path, help="A device bundle (default: export --model).")
    parser.add_argument("--only", help="Run only the variants whose name contains this text.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            cfg = ExportConfig(model=args.model, num_classes=10, out=Path(tmp) / "b")
            bundle = export_bundle(cfg, progress=lambda _: None).device_dir
        eager = run("torch", bundle, args, {})
        table = Table(title=f"{args.model}, B={args.batch}, {args.threads} threads")
        for column in ("variant", "step (ms)", "eager / onnx", "peak RSS (MB)"):
            table.add_column(column)
        table.add_row("PyTorch eager", f"{1000 * eager['step_s']:.0f}", "1.00x",
                      f"{eager['peak_rss_mb']:.0f}")  # fmt: skip
        for name, variant in VARIANTS.items():
            if args.only and args.only not in name:
                continue
            fig = run("onnx", bundle, args, variant)
            ratio = eager["step_s"] / fig["step_s"]
            table.add_row(name, f"{1000 * fig['step_s']:.0f}", f"{ratio:.2f}x",
                          f"{fig['peak_rss_mb']:.0f}")  # fmt: skip
        Console().print(table)


if __name__ == "__main__":
    main()
