"""Build a timm Vision Transformer by name, with timm's weights or a local checkpoint.

Kept apart from the split so that loading foreign weights stays one pure step (as timm's own
`checkpoint_filter_fn` does) and the split code never worries about where weights came from.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer


class ModelError(ValueError):
    """The model name, its arguments or a checkpoint do not give a usable ViT."""


def parse_model_args(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Turn `key=value` strings into timm keyword arguments (ints, floats, bools kept)."""
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ModelError(f"model argument {pair!r} is not of the form key=value")
        args[key.replace("-", "_")] = _parse_value(raw)
    return args


def _parse_value(raw: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def create_vit(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    checkpoint: Path | None = None,
    model_args: dict[str, Any] | None = None,
) -> VisionTransformer:
    """Create `name` from timm in eval mode with fused attention off (it has no ONNX backward).

    Raises `ModelError` for an unknown name, a model that is not a plain ViT, or weights that
    cannot be had; a checkpoint is loaded with `load_checkpoint` (strict keys and shapes).
    """
    timm.layers.set_fused_attn(False)
    if name not in timm.list_models():
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ModelError(f"unknown timm model {name!r}{hint}")
    kwargs = dict(model_args or {})
    try:
        model = timm.create_model(
            name, pretrained=pretrained and checkpoint is None, num_classes=num_classes, **kwargs
        )
    except (RuntimeError, OSError, ValueError) as exc:
        what = "download or load its pre-trained weights" if pretrained else "build it"
        raise ModelError(f"could not {what} for {name!r}: {exc}") from exc
    if not isinstance(model, VisionTransformer):
        raise ModelError(f"{name!r} is a {type(model).__name__}, not a timm VisionTransformer")
    if getattr(model, "dynamic_img_size", False):
        raise ModelError(f"{name!r} uses dynamic image sizes, which a fixed bundle cannot hold")
    if model.global_pool not in ("token", "avg"):
        raise ModelError(
            f"{name!r} pools with {model.global_pool!r}; only 'token' and 'avg' are supported"
        )
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors or .pth/.pt state dict (`weights_only=True`: nothing is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # both readers raise many types for a damaged file
        raise ModelError(f"checkpoint {path} could not be read: {exc}") from exc
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ModelError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Load a checkpoint, refusing with one message that lists every key or shape that differs.

    A classifier of another size is the one mismatch allowed (fine-tuning to new classes
    replaces it): it is left at its fresh initialisation.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    skip = {
        k
        for k in ("head.weight", "head.bias")
        if k in state and k in own and state[k].shape != own[k].shape
    }
    problems = state_mismatches(own, state, "checkpoint", skip=skip)
    if problems:
        raise ModelError(f"checkpoint {path} does not fit this model: " + "; ".join(problems))
    model.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=False)


def state_mismatches(
    expected: Mapping[str, Any],
    got: Mapping[str, Any],
    source: str,
    compare_dtype: bool = False,
    skip: Collection[str] = (),
) -> list[str]:
    """Why state `got` (named `source` in the text) does not fit `expected`, as short phrases:
    missing and unexpected keys, and keys whose shape (with `compare_dtype`, or dtype) differs.
    Empty when it fits. Shared by checkpoint loading and the server's bundle check."""
    missing = sorted(set(expected) - set(got) - set(skip))
    unexpected = sorted(set(got) - set(expected))
    wrong = [
        f"{k}: {source} {got[k].dtype} {list(got[k].shape)}, model "
        f"{expected[k].dtype} {list(expected[k].shape)}"
        for k in sorted(set(got) & set(expected) - set(skip))
        if got[k].shape != expected[k].shape
        or (compare_dtype and got[k].dtype != expected[k].dtype)
    ]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys ({_some(missing, ', ')})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys ({_some(unexpected, ', ')})")
    if wrong:
        parts.append(f"wrong shape{' or dtype' if compare_dtype else ''}: {_some(wrong, '; ')}")
    return parts


def _some(items: list[str], separator: str, most: int = 4) -> str:
    """The first `most` items; "e.g." says when there are more."""
    shown = separator.join(items[:most])
    return shown if len(items) <= most else f"e.g. {shown}"
