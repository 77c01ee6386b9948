"""Body benchmark: cross-device batching against one request at a time, and per-step state.

--devices threads stand for devices; each sends a forward then a backward request of
--device-batch samples, again and again, for --seconds (a step begun by then is finished and
counted). It prints training samples per second through the body (one forward + one VJP
each) with cross-device batching (max_batch = devices x device batch) and one at a time
(max_batch = one device's batch), and their ratio, measured in this one run: goal >= 1.5x.
The two modes alternate in --repeats segments, so that a change in the load of a shared
machine hits both alike. Then the memory the per-step state of all devices holds: the inputs
h the server keeps (it recomputes the forward in the VJP) against the autograd graph it would
keep instead (the tensors autograd saves in one forward with grad, summed with
torch.autograd.graph.saved_tensors_hooks; weights not counted: the model holds them anyway).

    python bench/bench_body.py [--model vit_base_patch16_224] [--devices 8] [--device-batch 1]
        [--seconds 20] [--repeats 2] [--device auto|cpu|cuda] [--bf16] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from sfprompt.cloud_server.batcher import BodyBatcher
from sfprompt.cloud_server.body_model import ServerModel
from sfprompt.cloud_server.config import BodyConfig
from sfprompt.export.config import ExportConfig


class Device(threading.Thread):
    """One device: forward, wait, backward, wait, until the deadline."""

    def __init__(self, batcher: BodyBatcher, h: np.ndarray, grad_z: np.ndarray, until: float):
        super().__init__(daemon=True)
        self.batcher, self.h, self.grad_z, self.until = batcher, h, grad_z, until
        self.samples = 0
        self.error: Exception | None = None
        self._answered = threading.Event()

    def _done(self, result: np.ndarray | None, error: Exception | None) -> None:
        self.error = self.error or error
        self._answered.set()

    def _call(self, submit) -> None:  # noqa: ANN001 - a bound batcher method
        self._answered.clear()
        submit(self._done)
        self._answered.wait()

    def run(self) -> None:
        while time.monotonic() < self.until and self.error is None:
            self._call(lambda done: self.batcher.forward(self.h, done))
            self._call(lambda done: self.batcher.backward(self.h, self.grad_z, done))
            self.samples += len(self.h)


def run_devices(model: ServerModel, args: argparse.Namespace, max_batch: int, seconds: float):
    """One timed segment: (samples, wall seconds, batcher stats)."""
    rng = np.random.default_rng(0)
    batch = args.device_batch
    with BodyBatcher(model, max_batch, args.max_wait_ms / 1000).start() as batcher:
        until = time.monotonic() + seconds
        devices = [
            Device(
                batcher,
                rng.standard_normal(model.h_shape(batch)).astype(np.float32),
                rng.standard_normal(model.z_shape(batch)).astype(np.float32),
                until,
            )
            for _ in range(args.devices)
        ]
        started = time.perf_counter()
        for d in devices:
            d.start()
        for d in devices:
            d.join()
        wall = time.perf_counter() - started
        stats = batcher.stats
    errors = [d.error for d in devices if d.error is not None]
    if errors:
        raise RuntimeError(f"a body call failed: {errors[0]}")
    return sum(d.samples for d in devices), wall, stats


def throughput(model: ServerModel, args: argparse.Namespace) -> tuple[dict, dict]:
    """Training samples per second of `args.devices` concurrent devices, batched and one at a
    time, in alternating segments so that a change in the machine's load hits both alike."""
    modes = {"batched": args.device_batch * args.devices, "one_at_a_time": args.device_batch}
    totals = {name: [0, 0.0, 0, 0, 0.0] for name in modes}  # samples, wall, calls, in calls, busy
    for _ in range(args.repeats):
        for name, max_batch in modes.items():
            samples, wall, stats = run_devices(model, args, max_batch, args.seconds / args.repeats)
            for i, v in enumerate((samples, wall, stats.calls, stats.samples, stats.busy_s)):
                totals[name][i] += v
    results = []
    for name, max_batch in modes.items():
        samples, wall, calls, in_calls, busy = totals[name]
        results.append(
            {
                "max_batch": max_batch,
                "samples": samples,
                "wall_s": round(wall, 3),
                "samples_per_s": samples / wall,
                "body_calls": calls,
                "mean_batch": round(in_calls / calls, 2),
                "busy_fraction": round(busy / wall, 3),
            }
        )
    return results[0], results[1]


def graph_bytes(model: ServerModel, batch: int) -> int:
    """Bytes of the distinct storages autograd saves in one forward with grad, weights left out."""
    own = {t.untyped_storage().data_ptr() for t in model.split.vit.state_dict().values()}
    own |= {t.untyped_storage().data_ptr() for t in model.split.head.state_dict().values()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    h = torch.randn(model.h_shape(batch), device=model.device, requires_grad=True)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z = model.run_body(h)
    del z
    return sum(saved.values())


def warm_up(model: ServerModel, batches: list[int]) -> None:
    """First calls pay for kernel selection and allocation; keep them out of the timings."""
    for batch in batches:
        h = np.zeros(model.h_shape(batch), np.float32)
        model.body_vjp(h, np.zeros(model.z_shape(batch), np.float32))
        model.body_forward(h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--device-batch", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=20.0, help="per mode, all repeats")
    parser.add_argument("--repeats", type=int, default=2, help="alternating segments per mode")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    console = Console()

    cfg = ExportConfig(model=args.model, num_classes=10, prompts=10, head_blocks=1, tail_blocks=0)
    model = ServerModel.from_timm(cfg, BodyConfig(args.device, args.bf16, args.threads))
    where = str(model.device)
    if model.device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(model.device)})"
    else:
        where += f" ({torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f})"
    console.print(
        f"{args.model}, random weights, body of {len(model.split.body.blocks)} blocks, "
        f"T={model.manifest.tokens} on {where}{', bf16' if args.bf16 else ''}; "
        f"{args.devices} devices x {args.device_batch} samples"
    )
    batch = args.device_batch
    warm_up(model, [batch, batch * args.devices])
    batched, single = throughput(model, args)
    ratio = batched["samples_per_s"] / single["samples_per_s"]

    kept = args.devices * int(np.prod(model.h_shape(batch))) * 4
    graph = args.devices * graph_bytes(model, batch)

    table = Table(title="body throughput, training samples/s (forward + VJP)")
    for column in ("mode", "max batch", "samples/s", "body calls", "mean batch", "busy"):
        table.add_column(column, justify="right")
    for name, r in (("batched", batched), ("one at a time", single)):
        table.add_row(
            name,
            str(r["max_batch"]),
            f"{r['samples_per_s']:.2f}",
            str(r["body_calls"]),
            f"{r['mean_batch']:.1f}",
            f"{r['busy_fraction']:.0%}",
        )
    console.print(table)
    verdict = "meets" if ratio >= 1.5 else "misses"
    console.print(f"batching speed-up: {ratio:.2f}x ({verdict} the 1.5x goal)")
    console.print(
        f"per-step state for {args.devices} devices: kept h {kept / 2**20:.1f} MiB vs "
        f"autograd graph {graph / 2**20:.1f} MiB ({graph / kept:.0f}x)"
    )
    if args.json:
        figures = {
            "model": args.model,
            "device": where,
            "bf16": args.bf16,
            "devices": args.devices,
            "device_batch": batch,
            "seconds": args.seconds,
            "repeats": args.repeats,
            "max_wait_ms": args.max_wait_ms,
            "batched": batched,
            "one_at_a_time": single,
            "speedup": ratio,
            "state_bytes": {"kept_h": kept, "autograd_graph": graph},
        }
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
