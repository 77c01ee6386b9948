"""Run a device bundle's TorchScript twins: for devices that have PyTorch (e.g. a Jetson).

The same four computations as `OnnxDeviceRuntime`, numpy in and numpy out, checked against the
same manifest, so `local_step`, the profiler and the client run on either unchanged. This is
the one edge_client module allowed to import torch; `open_runtime` imports it only when asked.
Twins are opened when first needed and the head runs in micro-batches, as in the onnx runtime.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from sfprompt.protocol.bundle import BundleError

from .bundle_runtime import GRAPHS, BundleRuntime, HeadTape, Params, TailStepResult


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing the array's memory where it can (a copy only if it is not contiguous).

    The twins never write to their inputs, so a read-only array is safe to share.
    """
    array = np.ascontiguousarray(array)
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": read only here
        return torch.from_numpy(array)


class TorchScriptDeviceRuntime(BundleRuntime):
    """The four device computations of one bundle, as TorchScript modules."""

    def __init__(
        self, bundle: Path | str, threads: int | None = None, micro_batch: int | None = 4
    ) -> None:
        """`micro_batch` bounds how many samples the head twins see at once (None: all).

        Raises `BundleError` when the manifest or a file fails its check, or a twin is missing.
        """
        super().__init__(bundle, micro_batch)
        no_twin = [g for g in GRAPHS if not self.manifest.graphs[g].torchscript]
        if no_twin:
            raise BundleError(f"{self.directory}: manifest names no TorchScript file for {no_twin}")
        # Process-wide in torch: the device runs one runtime per process.
        torch.set_num_threads(threads or min(4, os.cpu_count() or 1))
        self._modules: dict[str, torch.jit.ScriptModule] = {}

    def _module(self, name: str) -> torch.jit.ScriptModule:
        if name not in self._modules:
            path = self.directory / self.manifest.graphs[name].torchscript
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
                module = torch.jit.load(str(path), map_location="cpu")
            self._modules[name] = module.eval()
        return self._modules[name]

    def head_forward(self, image: np.ndarray, prompt: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) images and the (P, D) prompt -> h, (B, T, D)."""
        self._check_inputs("head_forward", {"image": image, "prompt": prompt})
        module = self._module("head_forward")
        with torch.no_grad():
            p = _tensor(prompt)
            parts = [module(_tensor(image[c]), p).numpy() for c in self._chunks(len(image))]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def head_forward_taped(
        self, image: np.ndarray, prompt: np.ndarray
    ) -> tuple[np.ndarray, HeadTape]:
        """h, and a tape from which `head_vjp` recomputes the forward (twins keep no tape)."""
        return self.head_forward(image, prompt), HeadTape(image, prompt)

    def head_vjp(self, tape: HeadTape, grad_h: np.ndarray) -> np.ndarray:
        """dL/dh (B, T, D) -> dL/dprompt (P, D), recomputing the head's forward pass.

        The prompt is shared by every sample, so its gradient is the sum over micro-batches.
        """
        image, prompt = tape.image, tape.prompt
        self._check_inputs("head_vjp", {"image": image, "prompt": prompt, "grad_h": grad_h})
        self._check_grad_h(tape, grad_h)
        module = self._module("head_vjp")
        p = _tensor(prompt)
        total = np.zeros_like(prompt)
        with torch.enable_grad():  # the twin differentiates through the head itself
            for c in self._chunks(len(image)):
                total += module(_tensor(image[c]), p, _tensor(grad_h[c])).numpy()
        return total

    def tail_step(
        self, params: Params, tail_input: np.ndarray, labels: np.ndarray, weight: np.ndarray
    ) -> TailStepResult:
        """Loss, logits and every gradient of the tail for one batch (weight 0 = padding)."""
        feeds = {k: params[k] for k in self.tail_keys if k in params}
        feeds.update(tail_input=tail_input, labels=labels, weight=weight)
        self._check_inputs("tail_step", feeds)
        args = [_tensor(params[k]) for k in self.tail_keys]
        with torch.enable_grad():
            out = self._module("tail_step")(args, *map(_tensor, (tail_input, labels, weight)))
        loss, logits, grad_input, *grads = (t.numpy() for t in out)
        return TailStepResult(float(loss), logits, grad_input, dict(zip(self._grad_keys, grads)))

    def tail_forward(self, params: Params, tail_input: np.ndarray) -> np.ndarray:
        """Logits (B, C) of the tail input under `params`."""
        feeds = {k: params[k] for k in self.tail_keys if k in params}
        feeds["tail_input"] = tail_input
        self._check_inputs("tail_forward", feeds)
        args = [_tensor(params[k]) for k in self.tail_keys]
        with torch.no_grad():
            return self._module("tail_forward")(args, _tensor(tail_input)).numpy()
