"""The server's model: the frozen body it runs for every device, and the whole model it evaluates.

A split step asks the server for two things, both with numpy arrays in and out:

    body_forward: h (B, T, D) -> z_sel (B, R', D)      only what the tail reads goes back down
    body_vjp:     h, dL/dz_sel -> dL/dh (B, T, D)      no weight gradient is ever computed

The server keeps no autograd graph between the two calls of a step: `body_vjp` recomputes the
forward from h. That costs one more forward, but the state held per device step is h alone
(B*T*D floats) rather than every activation of every body block, and backward calls of many
devices can then run as one batch (see `batcher.py`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file as load_torch

from sfprompt.export.bundle_writer import ExportConfig, base_manifest, preprocess_config
from sfprompt.export.model_loading import create_vit, state_mismatches
from sfprompt.export.split_vit import Cut, SplitViT, init_prompt, select_tail_input
from sfprompt.protocol.bundle import (
    PROMPT_KEY,
    BundleError,
    Manifest,
    TensorSpec,
    load_manifest,
)

Params = dict[str, np.ndarray]


@dataclass(frozen=True)
class BodyConfig:
    """How the server runs the body; every field is a flag of `sfprompt-cloud serve`."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N; auto takes CUDA when it is available
    bf16: bool = False  # torch.autocast(bfloat16) around the body (CUDA, or CPU if asked)
    threads: int | None = None  # torch.set_num_threads when the body runs on the CPU
    # scaled_dot_product_attention in the body blocks: the server exports no ONNX, so the
    # reason the exporter turns it off does not apply here, and it saves memory and time.
    fused_attention: bool = True

    def resolve_device(self) -> torch.device:
        """The torch device to run on; raises ValueError for an unknown or absent one."""
        name = self.device.strip().lower()
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if name == "cpu":
            return torch.device("cpu")
        if name == "cuda" or name.startswith("cuda:"):
            if not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r} asked for, but CUDA is not available")
            return torch.device(name)
        raise ValueError(f"unknown device {self.device!r}: choose auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class EvalResult:
    """The whole model [head, body, tail] on a labelled set."""

    accuracy: float  # fraction correct, in [0, 1]
    loss: float  # mean cross-entropy
    samples: int


class ServerModel:
    """The split model on the server: frozen head and body, and the tail run with given params.

    Thread-safety: `body_forward` and `body_vjp` only read the model and may run on any thread;
    `evaluate`, `logits` and `features` swap the tail's parameters in under a lock.
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
        directory = Path(directory)
        manifest = load_manifest(directory, role="server")
        for role in ("body", "head", "initial"):
            if role not in manifest.weights:
                raise BundleError(f"{directory}: the manifest names no {role!r} weights file")
        try:
            vit = create_vit(
                manifest.model,
                manifest.num_classes,
                pretrained=False,
                checkpoint=None,
                model_args=manifest.model_args,
            )
            cut = Cut(manifest.head_blocks, manifest.tail_blocks, manifest.prompts)
            split = SplitViT.cut_model(vit, cut)
        except ValueError as exc:  # ModelError is one
            raise BundleError(f"{directory}: cannot rebuild {manifest.model!r}: {exc}") from exc

        body_path = directory / manifest.weights["body"]
        body_file = _read_torch(body_path)
        body_expected = split.body_state()  # timm keys, in the body module's key order
        _check_state(body_path, body_expected, body_file)
        rename = dict(zip(body_expected, split.body.state_dict()))
        split.body.load_state_dict({rename[k]: v for k, v in body_file.items()}, strict=True)

        head_path = directory / manifest.weights["head"]
        head_file = _read_torch(head_path)
        _check_state(head_path, split.head.state_dict(), head_file)
        split.head.load_state_dict(head_file, strict=True)

        initial_path = directory / manifest.weights["initial"]
        try:
            initial = load_numpy(str(initial_path))
        except (OSError, SafetensorError) as exc:
            raise BundleError(f"{initial_path} could not be read: {exc}") from exc
        try:
            return cls(split, manifest, initial, config)
        except _ParamsError as exc:
            raise BundleError(f"{initial_path}: {exc}") from exc

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
        with torch.inference_mode():
            z = self.run_body(self._tensor(h))
        return z.cpu().numpy()

    def body_vjp(self, h: np.ndarray, grad_z: np.ndarray) -> np.ndarray:
        """dL/dh (B, T, D) float32, recomputing the forward from h; no weight gradients."""
        self.check_grad_z(h, grad_z)
        with torch.enable_grad():
            h_t = self._tensor(h).requires_grad_(True)
            z = self.run_body(h_t)
            (grad_h,) = torch.autograd.grad(z, h_t, self._tensor(grad_z))
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

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        if not (array.flags.writeable and array.flags.c_contiguous):
            array = np.array(array)  # torch wants a writable, contiguous buffer
        return torch.from_numpy(array).to(self.device)

    # ------------------------------------------------------------------- the whole model

    def evaluate(
        self, params: Params, images: np.ndarray, labels: np.ndarray, batch_size: int = 256
    ) -> EvalResult:
        """Accuracy and mean cross-entropy of [head, body, tail] with `params` on a set.

        Raises ValueError for params, images or labels that do not fit the model.
        """
        images = self._check_images(images)
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels: expected integers of shape ({len(images)},), "
                f"got {labels.dtype} {labels.shape}"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= self.manifest.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.manifest.num_classes}), "
                f"got [{labels.min()}, {labels.max()}]"
            )
        prompt, tail = self._tensors(params)
        loss, correct = 0.0, 0
        for start, chunk in self._chunks(images, batch_size):
            logits = self._logits(prompt, tail, chunk)
            y = torch.from_numpy(labels[start : start + len(chunk)].astype(np.int64))
            y = y.to(self.device)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
        return EvalResult(correct / len(images), loss / len(images), len(images))

    def logits(self, params: Params, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(N, C) float32 logits of the whole model with the given prompt and tail."""
        images = self._check_images(images)
        prompt, tail = self._tensors(params)
        chunks = self._chunks(images, batch_size)
        return np.concatenate([self._logits(prompt, tail, c).cpu().numpy() for _, c in chunks])

    def features(self, params: Params, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(N, R', D) float32: what the tail reads for each image (e.g. for a t-SNE plot).
        Only the prompt of `params` is used."""
        images = self._check_images(images)
        if PROMPT_KEY not in params:
            raise ValueError(f"params: {PROMPT_KEY!r} is missing")
        spec = self.manifest.parameters[PROMPT_KEY]
        prompt = torch.from_numpy(_as_float32(PROMPT_KEY, params[PROMPT_KEY], spec.shape))
        prompt = prompt.to(self.device)
        with torch.no_grad():
            chunks = self._chunks(images, batch_size)
            return np.concatenate([self._features(prompt, c).cpu().numpy() for _, c in chunks])

    def _tensors(self, params: Params) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The prompt, and the tail's parameters by module name, checked and on the device."""
        checked = _check_params(self.manifest, params, "params")
        prompt = torch.from_numpy(checked[PROMPT_KEY]).to(self.device)
        tail = {n: torch.from_numpy(checked[k]).to(self.device) for n, k in self._tail_keys.items()}
        return prompt, tail

    def _features(self, prompt: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return self.run_body(self.split.head(images, prompt))

    def _logits(
        self, prompt: torch.Tensor, tail: dict[str, torch.Tensor], images: torch.Tensor
    ) -> torch.Tensor:
        with torch.no_grad():
            t = self._features(prompt, images)
            with self._tail_lock:  # functional_call swaps the parameters in for the call
                return torch.func.functional_call(self.split.tail, tail, (t,))

    def _check_images(self, images: Any) -> np.ndarray:
        embed = self.split.vit.patch_embed
        want = (embed.proj.in_channels, *embed.img_size)
        array = np.asarray(images)
        if (
            array.ndim != 4
            or array.shape[1:] != want
            or not np.issubdtype(array.dtype, np.floating)
        ):
            raise ValueError(
                f"images: expected a float array of shape (N, {', '.join(map(str, want))}), "
                f"got {array.dtype} {array.shape}"
            )
        if len(array) == 0:
            raise ValueError("images: the set is empty")
        return array.astype(np.float32, copy=False)

    def _chunks(self, images: np.ndarray, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(images), batch_size):
            yield start, self._tensor(images[start : start + batch_size])


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


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_torch(str(path))
    except (OSError, SafetensorError) as exc:
        raise BundleError(f"{path} could not be read: {exc}") from exc


def _check_state(
    path: Path, expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]
) -> None:
    """Refuse a weights file with one message naming every missing, unexpected or odd key."""
    problems = state_mismatches(expected, got, "file", compare_dtype=True)
    if problems:
        raise BundleError(f"{path} does not fit the model: " + "; ".join(problems))
