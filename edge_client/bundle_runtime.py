"""What both device runtimes share: a device bundle opened and checked, and its conventions.

`OnnxDeviceRuntime` and `TorchScriptDeviceRuntime` run the same four computations of the same
bundle; this base opens the manifest, refuses a bundle that lacks a graph, knows the tail's
parameter and gradient order, checks inputs against the manifest, and splits a batch into the
micro-batches the head runs in. No torch here: the onnx runtime must not pull it in.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from sfprompt.protocol.bundle import BundleError, Manifest, load_manifest

from .tail_input import scatter_grad, select

Params = dict[str, np.ndarray]
GRAPHS = ("head_forward", "head_vjp", "tail_step", "tail_forward")  # every bundle, with twins


@dataclass(frozen=True)
class TailStepResult:
    loss: float
    logits: np.ndarray  # (B, C)
    grad_input: np.ndarray  # dL/d(tail input), (B, R, D)
    grads: Params  # dL/d(param) by bundle key


@dataclass
class HeadTape:
    """What `head_vjp` needs of one batch's head forward, held by the caller in between.

    `saved` holds the tape graphs' outputs, one list per micro-batch, and is emptied as the
    backward uses it (so a tape is freed chunk by chunk and cannot be applied twice); None
    means the runtime recomputes the forward from `image` and `prompt`. A tape is of h
    (`head_forward_taped`) or of t (`tail_input_taped`), and only that one's VJP takes it.
    """

    image: np.ndarray
    prompt: np.ndarray
    saved: list[list[np.ndarray]] | None = None
    backward: str = ""  # the graph that reads `saved`

    @property
    def nbytes(self) -> int:
        """Bytes the tape keeps alive beyond the images and prompt the caller holds anyway."""
        return sum(a.nbytes for chunk in self.saved or [] for a in chunk)


def return_freed_memory_promptly() -> None:
    """Make glibc mmap (and so unmap on free) every block over 256 KB.

    Without it glibc raises its mmap threshold after the first large free, and onnxruntime's
    activation buffers stay in the heap: RSS then creeps up step after step.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to tune
            ctypes.CDLL("libc.so.6").mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD


class BundleRuntime:
    """A device bundle, opened for one of the runtimes."""

    def __init__(self, bundle: Path | str, micro_batch: int | None) -> None:
        """`micro_batch` bounds how many samples the head sees at once (None: all).

        Raises `BundleError` when the manifest or a file fails its check, or a graph is missing.
        """
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"micro_batch must be at least 1 (or None for all), got {micro_batch}")
        return_freed_memory_promptly()
        self.directory = Path(bundle)
        self.micro_batch = micro_batch
        self.manifest: Manifest = load_manifest(self.directory, role="device")
        missing = set(GRAPHS) - set(self.manifest.graphs)
        if missing:
            raise BundleError(f"{self.directory}: manifest lists no graph for {sorted(missing)}")
        # tail_step outputs loss, logits, grad_tail_input, then grad.<key> for each parameter.
        outputs = self.manifest.graphs["tail_step"].outputs[3:]
        self._grad_keys = [s.name.removeprefix("grad.") for s in outputs]

    def initial_parameters(self) -> Params:
        """The exported prompt and tail, by bundle key."""
        return load_file(str(self.directory / self.manifest.weights["initial"]))

    @property
    def tail_keys(self) -> list[str]:
        """Tail parameter keys in the graphs' (and TorchScript twins') order."""
        return [k for k in self.manifest.parameters if k.startswith("tail.")]

    def head_forward(self, image: np.ndarray, prompt: np.ndarray) -> np.ndarray:
        raise NotImplementedError  # each runtime's own

    def head_forward_taped(
        self, image: np.ndarray, prompt: np.ndarray
    ) -> tuple[np.ndarray, HeadTape]:
        raise NotImplementedError

    def head_vjp(self, tape: HeadTape, grad_h: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # What the tail reads of h (t), for the local phase and the scoring, where h itself is not
    # needed; a runtime with graphs that compute t alone (LOCAL_GRAPHS) overrides these.
    def tail_input_forward(self, image: np.ndarray, prompt: np.ndarray) -> np.ndarray:
        """t of (B, 3, H, W) images: what the tail reads of h."""
        return select(self.head_forward(image, prompt), self.manifest)

    def tail_input_taped(
        self, image: np.ndarray, prompt: np.ndarray
    ) -> tuple[np.ndarray, HeadTape]:
        """t, and the tape `tail_input_vjp` will need for this batch."""
        h, tape = self.head_forward_taped(image, prompt)
        return select(h, self.manifest), tape

    def tail_input_vjp(self, tape: HeadTape, grad_t: np.ndarray) -> np.ndarray:
        """dL/dt -> dL/dprompt (P, D)."""
        return self.head_vjp(tape, scatter_grad(grad_t, self.manifest))

    def _check_inputs(self, name: str, feeds: dict[str, np.ndarray]) -> None:
        """Raise `BundleError` for a missing input or one that does not fit the manifest."""
        for spec in self.manifest.graphs[name].inputs:
            value = feeds.get(spec.name)
            if value is None:
                raise BundleError(f"{name}: input {spec.name} was not given")
            spec.check(value.shape, str(value.dtype))

    def _check_grad_h(self, tape: HeadTape, grad_h: np.ndarray) -> None:
        if len(grad_h) != len(tape.image):
            raise BundleError(
                f"head_vjp: {len(tape.image)} images but {len(grad_h)} rows of grad_h"
            )
        if tape.saved == []:
            raise BundleError("head_vjp: this tape was already used (one backward per forward)")

    @staticmethod
    def _check_tape_kind(tape: HeadTape, backwards: tuple[str, ...], vjp: str) -> None:
        if tape.saved is not None and tape.backward not in backwards:
            raise BundleError(f"{vjp}: this tape is for {tape.backward}, not for {vjp}")

    keeps_tape = False  # a runtime whose head backward reads its forward's tape says so

    def exchange_parts(self, batch: int) -> list[slice]:
        """How a split batch is cut into exchanges with the server: one per micro-batch where
        the head's backward reads a tape, so that only one micro-batch's tape lives while the
        server answers (~7.8 MB per ViT-Base sample and block); the whole batch at once where
        it recomputes (its tape is the images): fewer round trips."""
        return self._chunks(batch) if self.keeps_tape else [slice(0, batch)]

    def _chunks(self, batch: int) -> list[slice]:
        step = self.micro_batch or batch
        return [slice(i, i + step) for i in range(0, batch, step)]
