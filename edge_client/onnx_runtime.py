"""Run a device bundle's graphs with onnxruntime and numpy: no PyTorch anywhere.

By default the head's backward reads the tape its forward kept (no recomputation) and the
sessions share one exactly-growing memory arena: at ViT-Base B=8 this is about as fast as
PyTorch eager at a fifth of its memory. `lean=True` (`--lean`) gives speed for memory: the
backward recomputes the forward, and plain malloc hands every buffer back (glibc is told to
return large freed blocks at once). Either way graphs open only when first needed and the head
graphs run in micro-batches (their activations dominate the peak).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sfprompt.protocol.bundle import HEAD_WEIGHTS_EXTRA, LOCAL_GRAPHS, TAPE_GRAPHS

from .bundle_runtime import BundleRuntime, HeadTape, Params, TailStepResult


def session_options(threads: int | None = None, arena: bool = True) -> ort.SessionOptions:
    """Options for the device's sessions, chosen by bench/bench_session_options.py.

    With `arena`, every session of the process allocates from one shared arena that grows by
    exactly what is asked (`shared_cpu_arena`): buffers are reused from call to call instead of
    mapped and zeroed anew, which made the ViT-Base step ~25% faster for ~25 MB more peak RSS
    than plain malloc; per-session arenas (onnxruntime's default) held ~20 MB more, as each
    kept its own high-water mark. Without it (`--lean`): plain malloc, no pre-packed weights.
    Never memory patterns: they plan a buffer per batch size and hold it.

    Every session's worker threads stop spinning when its call ends. A device alternates
    sessions (head forward, tail, head backward, per micro-batch), and onnxruntime's workers
    otherwise spin for work after each call: the idle sessions' spinning threads took the cores
    from the running one. Stopping them made the ViT-Base split step 1.5-2x faster on 2 cores
    (B=8: 311 -> 207 ms at micro-batch 4, 447 -> 215 ms at micro-batch 1).
    """
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_mem_pattern = False
    opts.enable_cpu_mem_arena = False
    if arena:
        shared_cpu_arena()
        opts.add_session_config_entry("session.use_env_allocators", "1")
    else:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    return opts


@functools.cache
def shared_cpu_arena() -> None:
    """Register, once per process, the CPU arena that sessions with use_env_allocators share."""
    kind, default = ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, ort.OrtMemType.DEFAULT
    same_as_requested = 1  # arena_extend_strategy: grow by the request, not the next power of 2
    config = ort.OrtArenaCfg(0, same_as_requested, -1, -1)
    ort.create_and_register_allocator(ort.OrtMemoryInfo("Cpu", kind, 0, default), config)


def open_session(
    path: Path, options: ort.SessionOptions, half_weights: bool
) -> ort.InferenceSession:
    """A CPU session; for a graph with fp16 weights (export/half_weights.py), one that keeps
    them fp16: no constant folding, and the "extended" level (the "all" level folds too)."""
    if not half_weights:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    level = options.graph_optimization_level
    if level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    try:
        return ort.InferenceSession(
            str(path),
            options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=["ConstantFolding"],
        )
    finally:
        options.graph_optimization_level = level


class OnnxDeviceRuntime(BundleRuntime):
    """The four device computations of one bundle, checked against its manifest."""

    def __init__(
        self,
        bundle: Path | str,
        threads: int | None = None,
        micro_batch: int | None = 4,
        lean: bool = False,
    ) -> None:
        """`micro_batch` bounds how many samples the head graphs see at once (None: all);
        `lean` trades speed for memory: the head's backward recomputes its forward instead of
        reading the tape the forward kept, and no memory arena is kept between calls. (A
        bundle exported without tape graphs always recomputes.)"""
        super().__init__(bundle, micro_batch)
        self._options = session_options(threads, arena=not lean)
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._half_weights = self.manifest.extra.get(HEAD_WEIGHTS_EXTRA) == "fp16"
        self.keeps_tape = not lean and all(g in self.manifest.graphs for g in TAPE_GRAPHS)
        self.local_graphs = all(g in self.manifest.graphs for g in LOCAL_GRAPHS)

    def _session(self, name: str) -> ort.InferenceSession:
        if name not in self._sessions:
            self._close_the_other_phase(name)
            path = self.directory / self.manifest.graphs[name].onnx
            half = self._half_weights and name.startswith("head_")
            self._sessions[name] = open_session(path, self._options, half)
        return self._sessions[name]

    def _close_the_other_phase(self, name: str) -> None:
        """Never hold the local phase's head graphs and the split phase's together: each pair
        holds the head's weights again (~60 MB at ViT-Base), and a round runs its phases one
        after the other, so this costs one session opening per graph per phase."""
        if name.startswith("head_"):
            local = name in LOCAL_GRAPHS
            for other in [n for n in self._sessions if n.startswith("head_")]:
                if (other in LOCAL_GRAPHS) != local:
                    del self._sessions[other]

    def _run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self._check_inputs(name, feeds)
        return self._session(name).run(None, feeds)

    def head_forward(self, image: np.ndarray, prompt: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) images and the (P, D) prompt -> h, (B, T, D).

        Where the tape graphs train, their forward serves here too (its tape dropped): a third
        session would hold the head's weights a third time (31 MB at ViT-Base) for the
        scoring and evaluation passes, which cost a little more this way.
        """
        graph = "head_tape_forward" if self.keeps_tape else "head_forward"
        return self._forward(graph, image, prompt)

    def head_forward_taped(
        self, image: np.ndarray, prompt: np.ndarray
    ) -> tuple[np.ndarray, HeadTape]:
        """h as `head_forward` gives it, and the tape `head_vjp` will need for this batch."""
        if not self.keeps_tape:
            return self.head_forward(image, prompt), HeadTape(image, prompt)
        return self._forward_taped(TAPE_GRAPHS, image, prompt)

    def head_vjp(self, tape: HeadTape, grad_h: np.ndarray) -> np.ndarray:
        """dL/dh (B, T, D) -> dL/dprompt (P, D), from the tape or by recomputing the forward."""
        self._check_tape_kind(tape, (TAPE_GRAPHS[1],), "head_vjp")
        return self._vjp(tape, grad_h)

    def tail_input_forward(self, image: np.ndarray, prompt: np.ndarray) -> np.ndarray:
        """t, computed without the rows of h the tail does not read where the bundle can."""
        if not self.local_graphs:
            return super().tail_input_forward(image, prompt)
        return self._forward(LOCAL_GRAPHS[0], image, prompt)

    def tail_input_taped(
        self, image: np.ndarray, prompt: np.ndarray
    ) -> tuple[np.ndarray, HeadTape]:
        """t and its tape (a small one: the rows the tail reads need little of the block)."""
        if not self.local_graphs:
            return super().tail_input_taped(image, prompt)
        return self._forward_taped(LOCAL_GRAPHS, image, prompt)

    def tail_input_vjp(self, tape: HeadTape, grad_t: np.ndarray) -> np.ndarray:
        if tape.backward != LOCAL_GRAPHS[1]:
            return super().tail_input_vjp(tape, grad_t)
        return self._vjp(tape, grad_t)

    def _forward(self, graph: str, image: np.ndarray, prompt: np.ndarray) -> np.ndarray:
        """The first output of `graph` (h or t), micro-batch by micro-batch; any tape dropped."""
        parts = [
            self._run(graph, {"image": image[c], "prompt": prompt})[0]
            for c in self._chunks(len(image))
        ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _forward_taped(
        self, graphs: tuple[str, str], image: np.ndarray, prompt: np.ndarray
    ) -> tuple[np.ndarray, HeadTape]:
        outs, saved = [], []
        for c in self._chunks(len(image)):
            out, *tape = self._run(graphs[0], {"image": image[c], "prompt": prompt})
            outs.append(out)
            saved.append(tape)
        joined = outs[0] if len(outs) == 1 else np.concatenate(outs)
        return joined, HeadTape(image, prompt, saved, backward=graphs[1])

    def _vjp(self, tape: HeadTape, grad: np.ndarray) -> np.ndarray:
        """The prompt's gradient from a tape (or recomputed): the prompt is shared by every
        sample, so it is the sum over micro-batches."""
        self._check_grad_h(tape, grad)
        total = np.zeros_like(tape.prompt)
        for c in self._chunks(len(tape.image)):
            if tape.saved is None:
                feeds = {"image": tape.image[c], "prompt": tape.prompt, "grad_h": grad[c]}
                total += self._run("head_vjp", feeds)[0]
            else:
                inputs = self.manifest.graphs[tape.backward].inputs
                grad_name, *tape_names = [spec.name for spec in inputs]
                feeds = dict(zip(tape_names, tape.saved.pop(0)))  # freed as it goes
                feeds[grad_name] = grad[c]
                total += self._run(tape.backward, feeds)[0]
        return total

    def tail_step(
        self, params: Params, tail_input: np.ndarray, labels: np.ndarray, weight: np.ndarray
    ) -> TailStepResult:
        """Loss, logits and every gradient of the tail for one batch (weight 0 = padding)."""
        feeds = {k: params[k] for k in self.tail_keys}
        feeds.update(tail_input=tail_input, labels=labels, weight=weight)
        loss, logits, grad_input, *grads = self._run("tail_step", feeds)
        return TailStepResult(float(loss), logits, grad_input, dict(zip(self._grad_keys, grads)))

    def tail_forward(self, params: Params, tail_input: np.ndarray) -> np.ndarray:
        feeds = {k: params[k] for k in self.tail_keys}
        feeds["tail_input"] = tail_input
        return self._run("tail_forward", feeds)[0]
