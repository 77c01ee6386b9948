"""The server's model: the frozen body it runs for every device, and the whole model it evaluates.

A split step asks the server for two things, both with numpy arrays in and out:

    body_forward: h (B, T, D) -> z_sel (B, R', D)      only what the tail reads goes back down
    body_vjp:     h, dL/dz_sel -> dL/dh (B, T, D)      no weight gradient is ever computed

The server keeps no autograd graph between the two calls of a step: `body_vjp` recomputes the
forward from h. That costs one more forward, but the state held per device step is h alone
(B*T*D floats) rather than every activation of every body block, and backward calls of many
devices can then run as one batch (see `batcher.py`).

Reading a bundle is `export.bundle_reader`'s job; running the whole model on a test set is
`evaluation.py`'s. `body_forward` and `body_vjp` check their input; the `_checked` variants
are for a caller that already did (the batcher checks each request as it is queued).
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sfprompt.export.bundle_reader import read_server_bundle
from sfprompt.export.cut_manifest import base_manifest, preprocess_config
from sfprompt.export.model_loading import create_vit
from sfprompt.export.split_vit import SplitViT, init_prompt, select_tail_input
from sfprompt.protocol.bundle import PROMPT_KEY, BundleError, Manifest, TensorSpec

from .config import BodyConfig

if TYPE_CHECKING:
    from sfprompt.export.config import ExportConfig

Params = dict[str, np.ndarray]


class ServerModel:
    """The split model on the server: frozen head and body, and the tail run with given params.

    Thread-safety: `body_forward` and `body_vjp` only read the model and may run on any thread;
    `run_tail` (which `evaluation` uses) swaps the tail's parameters in under a lock.
    """

    manifest: Manifest
    device: torch.device

    def __init__(
        self,
        split: SplitViT,
        manifest: Manifest,
        initial: Params,
        config: BodyConfig = BodyConfig(),
    ) -> None:
        """Take over `split` (frozen, put in eval mode and moved to the device in place)."""
        if config.threads is not None and config.threads < 1:
            raise ValueError(f"threads must be >= 1, got {config.threads}")
        _check_fits(split, manifest)
        self.config = config
        self.device = config.resolve_device()
        if config.threads is not None and self.device.type == "cpu":
            torch.set_num_threads(config.threads)
        for module in (split.vit, split.head, split.body, split.tail):
            module.requires_grad_(False)
            module.eval()
            module.to(self.device)
        if config.fused_attention:
            for block in split.body.blocks:
                attn = getattr(block, "attn", None)
                if attn is not None and hasattr(attn, "fused_attn"):
                    attn.fused_attn = True
        self.split = split
        self.manifest = manifest
        self._initial = _check_params(manifest, initial, "initial parameters")
        self._tail_keys = split.tail_keys()  # tail module name -> bundle key
        self._tail_lock = threading.Lock()

    # ----------------------------------------------------------------------------- loading

    @classmethod
    def from_bundle(cls, directory: Path | str, config: BodyConfig = BodyConfig()) -> ServerModel:
        """Rebuild the model of a server bundle and load its body and head weights strictly.

        Raises `BundleError` for a missing, corrupt or foreign bundle, and for any weight file
        whose keys or shapes differ from the model's (naming them).
        """
        bundle = read_server_bundle(directory)
        try:
            return cls(bundle.split, bundle.manifest, bundle.initial, config)
        except _ParamsError as exc:
            raise BundleError(f"{bundle.initial_path}: {exc}") from exc

    @classmethod
    def from_timm(cls, export: ExportConfig, config: BodyConfig = BodyConfig()) -> ServerModel:
        """Build the model the way the exporter does, without writing or reading a bundle.

        Random initialisation comes from `export.seed`, as the exporter's does, so both give
        the same model. Raises `ModelError`.
        """
        vit = create_vit(
            export.model,
            export.num_classes,
            export.pretrained,
            export.checkpoint,
            export.model_args,
            seed=export.seed,
        )
        return cls.from_split(SplitViT.cut_model(vit, export.cut), export, config)

    @classmethod
    def from_split(
        cls, split: SplitViT, export: ExportConfig, config: BodyConfig = BodyConfig()
    ) -> ServerModel:
        """Serve an already cut model (taken over in place), with the manifest the exporter
        would write for it and `export`, and the same initial prompt and tail."""
        # The exporter's own description of a cut model, so that the contract hashes agree.
        vit = split.vit
        prompt = init_prompt(split.cut, vit.embed_dim, export.seed)
        tail_state = dict(split.tail.named_parameters())
        initial = {PROMPT_KEY: prompt.numpy()}
        for name, key in split.tail_keys().items():
            initial[key] = tail_state[name].detach().cpu().numpy().copy()
        manifest = Manifest(
            **base_manifest(export, split, "server"),
            parameters={k: TensorSpec(k, "float32", tuple(v.shape)) for k, v in initial.items()},
            preprocess=preprocess_config(vit),
            extra={"source": "timm (in memory, no bundle)"},
        )
        return cls(split, manifest, initial, config)

    # ------------------------------------------------------------------------ shapes, params

    def h_shape(self, batch: int) -> tuple[int, int, int]:
        """Shape of the head output h that the body takes: (B, T, D)."""
        return (batch, self.manifest.tokens, self.manifest.embed_dim)

    def z_shape(self, batch: int) -> tuple[int, ...]:
        """Shape of z_sel, what the tail reads of the body output: (B, R', D)."""
        assert self.manifest.tail_input is not None  # _check_fits made sure
        return (batch, *(int(d) for d in self.manifest.tail_input.shape[1:]))

    def check_h(self, h: Any) -> None:
        """Raise ValueError unless `h` is a float32 (B, T, D) array with B >= 1."""
        _check_array("h", h, self.h_shape(-1))

    def check_grad_z(self, h: Any, grad_z: Any) -> None:
        """Raise ValueError unless `h` fits and `grad_z` is float32 of z_sel's shape for it."""
        self.check_h(h)
        _check_array("grad_z", grad_z, self.z_shape(len(h)))

    def initial_parameters(self) -> Params:
        """The initial prompt and tail by bundle key (fresh copies)."""
        return {k: v.copy() for k, v in self._initial.items()}

    # ------------------------------------------------------------------------------ the body

    def body_forward(self, h: np.ndarray) -> np.ndarray:
        """z_sel = select(body(h)), float32; raises ValueError for an h that does not fit."""
        self.check_h(h)
        return self.body_forward_checked(h)

    def body_vjp(self, h: np.ndarray, grad_z: np.ndarray) -> np.ndarray:
        """dL/dh (B, T, D) float32, recomputing the forward from h; no weight gradients.
        Raises ValueError for an h or grad_z that does not fit."""
        self.check_grad_z(h, grad_z)
        return self.body_vjp_checked(h, grad_z)

    def body_forward_checked(self, h: np.ndarray) -> np.ndarray:
        """`body_forward` of an h its caller has checked (`check_h`), e.g. the batcher's
        stack of requests it checked one by one as they were queued."""
        assert h.dtype == np.float32 and h.shape[1:] == self.h_shape(-1)[1:]
        with torch.inference_mode():
            z = self.run_body(self.tensor(h))
        return z.cpu().numpy()

    def body_vjp_checked(self, h: np.ndarray, grad_z: np.ndarray) -> np.ndarray:
        """`body_vjp` of an h and grad_z its caller has checked (`check_grad_z`)."""
        assert h.dtype == grad_z.dtype == np.float32 and len(h) == len(grad_z)
        with torch.enable_grad():
            h_t = self.tensor(h).requires_grad_(True)
            z = self.run_body(h_t)
            (grad_h,) = torch.autograd.grad(z, h_t, self.tensor(grad_z))
        return grad_h.detach().float().cpu().numpy()

    def run_body(self, h: torch.Tensor) -> torch.Tensor:
        """z_sel (B, R', D) float32 of an h tensor already on the device, under the caller's
        grad mode (autocast as configured); for callers that need the graph, e.g. a benchmark."""
        autocast: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if self.config.bf16:
            autocast = torch.autocast(self.device.type, dtype=torch.bfloat16)
        with autocast:
            z = self.split.body(h)  # (B, T, D)
        return select_tail_input(z.float(), self.split.tail_input, self.split.skip_tokens)

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        """`array` as a tensor on the model's device."""
        if not (array.flags.writeable and array.flags.c_contiguous):
            array = np.array(array)  # torch wants a writable, contiguous buffer
        return torch.from_numpy(array).to(self.device)

    # ------------------------------------------------------------------------------ the tail

    def prompt_on_device(self, params: Params) -> torch.Tensor:
        """The prompt of `params`, checked against the manifest; raises ValueError."""
        if PROMPT_KEY not in params:
            raise ValueError(f"params: {PROMPT_KEY!r} is missing")
        spec = self.manifest.parameters[PROMPT_KEY]
        prompt = torch.from_numpy(_as_float32(PROMPT_KEY, params[PROMPT_KEY], spec.shape))
        return prompt.to(self.device)

    def params_on_device(self, params: Params) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The prompt, and the tail's parameters by module name, checked against the manifest
        (every key, nothing else, each of its shape) and on the device; raises ValueError."""
        checked = _check_params(self.manifest, params, "params")
        prompt = torch.from_numpy(checked[PROMPT_KEY]).to(self.device)
        tail = {n: torch.from_numpy(checked[k]).to(self.device) for n, k in self._tail_keys.items()}
        return prompt, tail

    def run_tail(self, tail: dict[str, torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) of the tail holding `tail` (from `params_on_device`) on its input t."""
        with self._tail_lock:  # functional_call swaps the parameters in for the call
            return torch.func.functional_call(self.split.tail, tail, (t,))


class _ParamsError(ValueError):
    """Prompt or tail parameters that do not fit the manifest."""


def _as_float32(name: str, value: Any, shape: tuple[int | str, ...]) -> np.ndarray:
    array = np.asarray(value)
    if array.shape != tuple(shape) or not np.issubdtype(array.dtype, np.floating):
        raise _ParamsError(
            f"{name}: expected float32 {list(shape)}, got {array.dtype} {list(array.shape)}"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


def _check_params(manifest: Manifest, params: Params, what: str) -> Params:
    """Every prompt and tail key of the manifest, nothing else, each of its shape."""
    missing = sorted(set(manifest.parameters) - set(params))
    unexpected = sorted(set(params) - set(manifest.parameters))
    if missing or unexpected:
        raise _ParamsError(
            f"{what} do not match the model: missing {missing}, unexpected {unexpected}"
        )
    return {k: _as_float32(k, params[k], s.shape) for k, s in manifest.parameters.items()}


def _check_array(name: str, array: Any, shape: tuple[int, ...]) -> None:
    """float32 of `shape`, where a -1 entry is the batch (any size >= 1)."""
    want = "(" + ", ".join("B" if d == -1 else str(d) for d in shape) + ")"
    if not isinstance(array, np.ndarray):
        raise ValueError(
            f"{name}: expected a float32 numpy array {want}, got {type(array).__name__}"
        )
    fits = array.ndim == len(shape) and all(
        (got >= 1) if d == -1 else got == d for d, got in zip(shape, array.shape)
    )
    if not fits or array.dtype != np.float32:
        raise ValueError(f"{name}: expected float32 {want}, got {array.dtype} {tuple(array.shape)}")


def _check_fits(split: SplitViT, manifest: Manifest) -> None:
    """The manifest must describe the model built: a different timm can build another one."""
    vit = split.vit
    built = {
        "depth": len(vit.blocks),
        "embed_dim": vit.embed_dim,
        "num_prefix_tokens": vit.num_prefix_tokens,
        "num_patches": vit.patch_embed.num_patches,
        "num_classes": vit.num_classes,
        "head_blocks": split.cut.head_blocks,
        "tail_blocks": split.cut.tail_blocks,
        "prompts": split.cut.prompts,
    }
    wrong = [
        f"{k}: manifest {getattr(manifest, k)}, model {v}"
        for k, v in built.items()
        if getattr(manifest, k) != v
    ]
    tail = manifest.tail_input
    if tail is None or (tail.kind, tail.count) != (split.tail_input.kind, split.tail_input.count):
        wrong.append(f"tail_input: manifest {tail}, model {split.tail_input}")
    if PROMPT_KEY not in manifest.parameters:
        wrong.append(f"parameters: {PROMPT_KEY!r} is missing")
    if wrong:
        raise BundleError(
            f"{manifest.model}: the manifest does not fit the model: {'; '.join(wrong)}"
        )
