"""Build a timm Vision Transformer by name, with timm's weights or a local checkpoint.

Kept apart from the split so that loading foreign weights stays one pure step (as timm's own
`checkpoint_filter_fn` does) and the split code never worries about where weights came from.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from .config import ModelError

# How long to wait for the weights' host before calling it unreachable: huggingface_hub itself
# retries a failed request five times with back-off, about 25 s per file and a minute in all.
HUB_PROBE_TIMEOUT_S = 3.0
OFFLINE_HINT = (
    "without the network, pass --checkpoint FILE (a .safetensors or .pth state dict), or fill "
    "the Hugging Face cache on a machine that has the network and set HF_HUB_OFFLINE=1"
)
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def create_vit(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    checkpoint: Path | None = None,
    model_args: dict[str, Any] | None = None,
    seed: int | None = None,
) -> VisionTransformer:
    """Create `name` from timm in eval mode with fused attention off (it has no ONNX backward).

    With `seed`, the random initialisation (all weights without `pretrained` or `checkpoint`,
    else a resized classifier) comes from that seed, so two identical exports are identical;
    without it, from torch's global generator. Raises `ModelError` for an unknown name, a model
    that is not a plain ViT, or weights that cannot be had (fast when the hub is unreachable);
    a checkpoint is loaded with `load_checkpoint` (strict keys and shapes).
    """
    timm.layers.set_fused_attn(False)
    if name not in timm.list_models():
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ModelError(f"unknown timm model {name!r}{hint}")
    kwargs = dict(model_args or {})
    download = pretrained and checkpoint is None
    cached = offline_weights_file(name) if download else None
    if cached is not None:  # keep any other overlay the caller gave (e.g. crop_pct)
        kwargs["pretrained_cfg_overlay"] = {
            **kwargs.get("pretrained_cfg_overlay", {}),
            "file": cached,
        }
    try:
        with _seeded(seed):
            model = timm.create_model(name, pretrained=download, num_classes=num_classes, **kwargs)
    except (RuntimeError, OSError, ValueError) as exc:
        if download:
            raise ModelError(
                f"could not download or load the pre-trained weights of {name!r}: "
                f"{str(exc).rstrip('.')}; {OFFLINE_HINT}"
            ) from exc
        raise ModelError(f"could not build {name!r}: {exc}") from exc
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


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Draw from `seed` inside, leaving torch's global generator as it was (None: no change)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def offline_weights_file(name: str) -> str | None:
    """Where timm should read `name`'s weights when their host is unreachable: the cached file
    (timm would first retry the hub for about a minute), else a fast `ModelError` suggesting
    --checkpoint. None when the host answers, when HF_HUB_OFFLINE is set or a proxy is
    configured (timm then knows best), or when timm needs no network anyway.
    """
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # a wrong tag: timm's own error says it best
        return None
    if cfg is None or cfg.file or cfg.state_dict is not None:
        return None
    import huggingface_hub

    if cfg.hf_hub_id:
        url, cached = huggingface_hub.constants.ENDPOINT, _hf_cached(cfg)
    elif isinstance(cfg.url, str) and cfg.url:
        url, cached = cfg.url, None
        if (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name).is_file():
            return None  # timm reads torch's cache without asking the network
    else:
        return None
    if huggingface_hub.constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    host = urlparse(url).hostname or ""
    if reachable(host):
        return None
    if cached is not None:
        return cached
    raise ModelError(
        f"cannot reach {host} to download the pre-trained weights of {name!r}, and they are "
        f"not in the local cache; {OFFLINE_HINT}"
    )


def _hf_cached(cfg: Any) -> str | None:
    """The locally cached weights file of a hub model, in timm's order of preference, or None."""
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = cfg.hf_hub_id.partition("@")
    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
    names += ["model.safetensors", "pytorch_model.bin"]
    for filename in names:
        found = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(found, str):
            return found
    return None


def reachable(host: str, port: int = 443, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to `host` opens within `timeout` (no DNS answer: at once)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


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
