"""One fresh device process for the benchmark: run N training steps, print JSON figures.

    python bench/device_process.py onnx  BUNDLE_DIR BATCH STEPS THREADS
    python bench/device_process.py torch BUNDLE_DIR BATCH STEPS THREADS

A step is what the device computes per batch: head forward, tail step, head VJP, update. Of
the local phase (SFPROMPT_BENCH_ORT's "phase": "local", the default): the tail reads h and the
gradient reaches the head through what it read. Of the split phase ("split"): the device's
share, with the body's reply stood in by h itself and dL/dh by a fixed dense array (the body
mixes all rows, so the server's dL/dh is dense). The onnx process imports no torch; the torch
process does it the natural eager way (keep the head's graph, two backward passes) on the same
cut of the same model.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import numpy as np

from sfprompt.edge_client.memory import MemoryProfiler


def variant() -> dict:
    """What the parent varies (bench_export, bench_session_options), as JSON in the env."""
    return json.loads(os.environ.get("SFPROMPT_BENCH_ORT", "{}"))


def onnx_steps(bundle: str, batch: int, steps: int, threads: int) -> list[float]:
    from sfprompt.edge_client.local_step import local_step
    from sfprompt.edge_client.memory_budget import split_share_step
    from sfprompt.edge_client.onnx_runtime import OnnxDeviceRuntime
    from sfprompt.edge_client.optimizer import Sgd
    from sfprompt.edge_client.runtime import synthetic_batch

    choice = variant()
    micro_batch = choice.get("micro_batch", 4)
    rt = OnnxDeviceRuntime(bundle, threads, micro_batch, lean=choice.get("lean", False))
    apply_variant(rt, choice, threads)
    params = rt.initial_parameters()
    images, labels = synthetic_batch(rt, batch)
    weight = np.ones(batch, np.float32)
    sgd = Sgd(1e-4)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        if choice.get("phase", "local") == "local":
            local_step(rt, params, images, labels, weight, sgd)
        else:
            split_share_step(rt, params, images, labels, sgd)
        times.append(time.perf_counter() - t0)
    return times


def apply_variant(rt: object, variant: dict, threads: int) -> None:
    """Change one choice of the runtime's (before any session opens): what the bench varies."""
    import onnxruntime as ort

    from sfprompt.edge_client.onnx_runtime import session_options

    if "arena" in variant:  # False: plain malloc; "per-session": onnxruntime's own default
        rt._options = session_options(threads, arena=variant["arena"] is True)  # type: ignore[attr-defined]
        rt._options.enable_cpu_mem_arena = variant["arena"] == "per-session"  # type: ignore[attr-defined]
    opts = rt._options  # type: ignore[attr-defined]
    if "tape" in variant:
        rt.keeps_tape = rt.keeps_tape and variant["tape"]  # type: ignore[attr-defined]
    if "prepacking" in variant:
        opts.add_session_config_entry(
            "session.disable_prepacking", str(int(not variant["prepacking"]))
        )
    if "spinning" in variant:  # True: workers keep spinning after a call (onnxruntime's default)
        stop = str(int(not variant["spinning"]))
        opts.add_session_config_entry("session.force_spinning_stop", stop)
    if "mem_pattern" in variant:
        opts.enable_mem_pattern = bool(variant["mem_pattern"])
    if "mmap_threshold" in variant:  # glibc: blocks over it are mmapped and unmapped on free
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, int(variant["mmap_threshold"]))
    if variant.get("opt_level") == "basic":
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def torch_steps(bundle: str, batch: int, steps: int, threads: int) -> list[float]:
    import torch

    from sfprompt.edge_client.memory_budget import dense_grad_h
    from sfprompt.export.device_graphs import weighted_cross_entropy
    from sfprompt.export.model_loading import create_vit
    from sfprompt.export.split_vit import Cut, SplitViT, select_tail_input
    from sfprompt.protocol.bundle import load_manifest

    torch.set_num_threads(threads)
    m = load_manifest(bundle)
    vit = create_vit(m.model, m.num_classes, model_args=m.model_args)
    split = SplitViT.cut_model(vit, Cut(m.head_blocks, m.tail_blocks, m.prompts))
    prompt = torch.zeros(m.prompts, m.embed_dim, requires_grad=True)
    tail_params = [p.requires_grad_(True) for p in split.tail.parameters()]
    opt = torch.optim.SGD([prompt, *tail_params], lr=1e-4)
    images = torch.randn(batch, *m.preprocess["input_size"])
    labels = torch.randint(0, m.num_classes, (batch,))
    weight = torch.ones(batch)
    split_phase = variant().get("phase", "local") == "split"
    grad_h = None
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        h = split.head(images, prompt)
        t = select_tail_input(h, split.tail_input, split.skip_tokens).detach().requires_grad_(True)
        loss = weighted_cross_entropy(split.tail(t), labels, weight)
        loss.backward()
        if split_phase:
            if grad_h is None:
                grad_h = torch.from_numpy(dense_grad_h(tuple(h.shape)))
            h_grad = torch.autograd.grad(h, prompt, grad_h)
        else:
            selected = select_tail_input(h, split.tail_input, split.skip_tokens)
            h_grad = torch.autograd.grad(selected, prompt, t.grad)
        prompt.grad = h_grad[0]
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    mode, bundle, batch, steps, threads = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    run = onnx_steps if mode == "onnx" else torch_steps
    # Sampled, not ru_maxrss: that one inherits the parent's peak across fork + exec.
    with MemoryProfiler() as profiler, profiler.phase("steps"):
        times = run(bundle, batch, steps, threads)
    peak_mb = profiler.profile.peak_rss_mb
    print(
        json.dumps(
            {
                "mode": mode,
                "step_s": statistics.median(times[1:] or times),
                "peak_rss_mb": peak_mb,
                "torch_loaded": "torch" in sys.modules,
            }
        )
    )


if __name__ == "__main__":
    main()
