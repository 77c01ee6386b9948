"""The device's peak RSS and step time by model and batch, fast and lean (issue 13's table).

    fast  the defaults: fp32 head weights, the head forward's tape kept for its backward, one
          shared memory arena, micro-batch 4 (and the same with `--head-weights fp16`, or at
          micro-batch 1)
    lean  `--head-weights fp16` at export, `sfprompt-edge start --lean --micro-batch 2`: the
          backward recomputes the forward, plain malloc
    int8  `--head-weights int8` at export, the tape kept, micro-batch 2 (and 1): the fastest
          and the least memory, at an accuracy cost (docs/edge.md)

Each cell is one fresh process running steps of both phases (`memory_budget.measure_step`,
the measurement `--memory-budget` makes: a local step, whose head computes only what the tail
reads where the bundle can, and the device's share of a split step, which trains every row of
h), onnx runtime, K=1 M=0 P=10. The peak is over both. GFLOP/s is the split step's analytic
FLOP count (export/plan.py) over its median time: the figure docs/edge.md scales to a Raspberry
Pi or a Jetson.

    python bench/bench_device_memory.py [--models vit_tiny_patch16_224,vit_base_patch16_224]
                                        [--batches 1,8,32] [--threads 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

from bench_edge import cached_bundle, default_cache
from rich.console import Console
from rich.table import Table

from sfprompt.edge_client.memory_budget import measure_step


@dataclass(frozen=True)
class Setting:
    head_weights: str
    lean: bool
    micro_batch: int


SETTINGS = {
    "fast": Setting("fp32", lean=False, micro_batch=4),
    "fast-fp16": Setting("fp16", lean=False, micro_batch=4),
    "fast-mb1": Setting("fp32", lean=False, micro_batch=1),
    "lean": Setting("fp16", lean=True, micro_batch=2),
    "lean-mb1": Setting("fp16", lean=True, micro_batch=1),
    "int8": Setting("int8", lean=False, micro_batch=2),
    "int8-mb1": Setting("int8", lean=False, micro_batch=1),
}
MODELS = "vit_tiny_patch16_224,vit_small_patch16_224,vit_base_patch16_224,vit_large_patch16_224"


def step_gflop(model: str, batch: int, lean: bool) -> float:
    """Analytic FLOPs of one local step of the whole batch (recomputing adds a head forward)."""
    from sfprompt.export.model_loading import create_vit  # torch: the parent only
    from sfprompt.export.plan import cut_cost
    from sfprompt.export.split_vit import Cut

    cost = cut_cost(create_vit(model, 10), Cut(1, 0, 10), batch)
    extra = cost.forward_flops if lean else 0.0  # the head's (the tail's share is tiny)
    return batch * (cost.forward_flops + cost.backward_flops + extra) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    console = Console()
    table = Table(title=f"device step, onnx runtime, K=1 M=0 P=10, {args.threads} threads")
    columns = ("model", "B", "setting", "peak RSS (MB)", "local step (ms)", "split step (ms)",
               "GFLOP/s")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "setting") else "right")
    rows = []
    for model in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            for name in args.settings.split(","):
                s = SETTINGS[name]
                bundle, _ = cached_bundle(model, args.cache, console, s.head_weights)
                m = measure_step(
                    bundle, "onnx", batch, min(s.micro_batch, batch), args.threads,
                    args.steps, lean=s.lean,
                )  # fmt: skip
                gflops = step_gflop(model, batch, s.lean) / m.split_step_s
                rows.append({"model": model, "batch": batch, "setting": name,
                             "peak_rss_mb": m.peak_rss_mb, "step_s": m.step_s,
                             "split_step_s": m.split_step_s, "gflops": gflops})  # fmt: skip
                table.add_row(model, str(batch), name, f"{m.peak_rss_mb:.0f}",
                              f"{1000 * m.step_s:.0f}", f"{1000 * m.split_step_s:.0f}",
                              f"{gflops:.0f}")  # fmt: skip
    console.print(table)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2))
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
