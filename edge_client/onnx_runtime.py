"""Run a device bundle's graphs with onnxruntime and numpy: no PyTorch anywhere.

Memory matters on a Raspberry Pi, so sessions are built lean: no memory-pattern planning or
arena over-allocation, no pre-packed weight copies, graphs opened only when first needed; the
head graphs run in micro-batches (their activations dominate the peak: at B=8 on ViT-Base the
head VJP alone holds ~130 MB), and glibc is told to hand large freed blocks straight back.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sfprompt.protocol.bundle import HEAD_WEIGHTS_EXTRA

from .bundle_runtime import TAPE_GRAPHS, BundleRuntime, HeadTape, Params, TailStepResult


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Options that trade a little speed for a much smaller resident set."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_mem_pattern = False
    opts.enable_cpu_mem_arena = False
    opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    return opts


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
        keep_tape: bool = True,
    ) -> None:
        """`micro_batch` bounds how many samples the head graphs see at once (None: all);
        `keep_tape` keeps the head forward's activations for its backward instead of
        recomputing them (faster, more memory; a bundle without tape graphs recomputes)."""
        super().__init__(bundle, micro_batch)
        self._options = session_options(threads)
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._half_weights = self.manifest.extra.get(HEAD_WEIGHTS_EXTRA) == "fp16"
        self.keeps_tape = keep_tape and all(g in self.manifest.graphs for g in TAPE_GRAPHS)
        if self.keeps_tape:
            outputs = self.manifest.graphs["head_tape_forward"].outputs
            self._tape_names = [spec.name for spec in outputs[1:]]

    def _session(self, name: str) -> ort.InferenceSession:
        if name not in self._sessions:
            path = self.directory / self.manifest.graphs[name].onnx
            half = self._half_weights and name.startswith("head_")
            self._sessions[name] = open_session(path, self._options, half)
        return self._sessions[name]

    def _run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self._check_inputs(name, feeds)
        return self._session(name).run(None, feeds)

    def head_forward(self, image: np.ndarray, prompt: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) images and the (P, D) prompt -> h, (B, T, D)."""
        parts = [
            self._run("head_forward", {"image": image[c], "prompt": prompt})[0]
            for c in self._chunks(len(image))
        ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def head_forward_taped(
        self, image: np.ndarray, prompt: np.ndarray
    ) -> tuple[np.ndarray, HeadTape]:
        """h as `head_forward` gives it, and the tape `head_vjp` will need for this batch."""
        if not self.keeps_tape:
            return self.head_forward(image, prompt), HeadTape(image, prompt)
        hs, saved = [], []
        for c in self._chunks(len(image)):
            h, *tape = self._run("head_tape_forward", {"image": image[c], "prompt": prompt})
            hs.append(h)
            saved.append(tape)
        return (hs[0] if len(hs) == 1 else np.concatenate(hs)), HeadTape(image, prompt, saved)

    def head_vjp(self, tape: HeadTape, grad_h: np.ndarray) -> np.ndarray:
        """dL/dh (B, T, D) -> dL/dprompt (P, D), from the tape or by recomputing the forward.

        The prompt is shared by every sample, so its gradient is the sum over micro-batches.
        """
        self._check_grad_h(tape, grad_h)
        total = np.zeros_like(tape.prompt)
        for c in self._chunks(len(tape.image)):
            if tape.saved is None:
                feeds = {"image": tape.image[c], "prompt": tape.prompt, "grad_h": grad_h[c]}
                total += self._run("head_vjp", feeds)[0]
            else:
                feeds = dict(zip(self._tape_names, tape.saved.pop(0)))  # freed as it goes
                feeds["grad_h"] = np.ascontiguousarray(grad_h[c])
                total += self._run("head_tape_backward", feeds)[0]
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
