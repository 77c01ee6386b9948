"""Read a server bundle back into the cut model it was written from, with torch only.

The server runs the body in eager PyTorch and needs no ONNX, so reading lives here, apart from
`bundle_writer` (which imports onnx): torch, timm, safetensors and the protocol's manifest.
Everything read is checked before it is used: the manifest (version, sha256 of every file),
the weight files it names, and every key, shape and dtype of the body and head weights, so a
corrupt or foreign bundle fails with a `BundleError` that names the file and the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file as load_torch

from sfprompt.protocol.bundle import BundleError, Manifest, load_manifest

from .model_loading import create_vit, state_mismatches
from .split_vit import Cut, SplitViT

SERVER_WEIGHTS = ("body", "head", "initial")  # the weight roles a server bundle must name


@dataclass(frozen=True)
class ServerBundle:
    """A server bundle as read: the cut model with its frozen weights loaded, and the initial
    prompt + tail exactly as written (checked against the manifest by whoever serves them)."""

    split: SplitViT
    manifest: Manifest
    initial: dict[str, np.ndarray]  # by bundle key
    initial_path: Path  # where `initial` came from, for the messages of later checks


def read_server_bundle(directory: Path | str) -> ServerBundle:
    """Rebuild the model of a server bundle and load its body and head weights strictly.

    Raises `BundleError` for a missing, corrupt or foreign bundle, and for any weight file
    whose keys or shapes differ from the model's (naming them).
    """
    directory = Path(directory)
    manifest = load_manifest(directory, role="server")
    for role in SERVER_WEIGHTS:
        if role not in manifest.weights:
            raise BundleError(f"{directory}: the manifest names no {role!r} weights file")
    split = rebuild_split(directory, manifest)
    load_body(split, directory / manifest.weights["body"])
    load_head(split, directory / manifest.weights["head"])
    initial_path = directory / manifest.weights["initial"]
    return ServerBundle(split, manifest, read_numpy(initial_path), initial_path)


def rebuild_split(directory: Path, manifest: Manifest) -> SplitViT:
    """The timm model the manifest names, randomly initialised and cut as it says."""
    try:
        vit = create_vit(
            manifest.model,
            manifest.num_classes,
            pretrained=False,
            checkpoint=None,
            model_args=manifest.model_args,
        )
        cut = Cut(manifest.head_blocks, manifest.tail_blocks, manifest.prompts)
        return SplitViT.cut_model(vit, cut)
    except ValueError as exc:  # ModelError is one
        raise BundleError(f"{directory}: cannot rebuild {manifest.model!r}: {exc}") from exc


def load_body(split: SplitViT, path: Path) -> None:
    """Load the body weights (stored under timm's keys) into `split.body`, strictly."""
    got = read_torch(path)
    expected = split.body_state()  # timm keys, in the body module's key order
    check_state(path, expected, got)
    rename = dict(zip(expected, split.body.state_dict()))
    split.body.load_state_dict({rename[k]: v for k, v in got.items()}, strict=True)


def load_head(split: SplitViT, path: Path) -> None:
    """Load the head weights (stored under the head module's keys) into `split.head`."""
    got = read_torch(path)
    check_state(path, split.head.state_dict(), got)
    split.head.load_state_dict(got, strict=True)


def read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_torch(str(path))
    except (OSError, SafetensorError) as exc:
        raise BundleError(f"{path} could not be read: {exc}") from exc


def read_numpy(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_numpy(str(path))
    except (OSError, SafetensorError) as exc:
        raise BundleError(f"{path} could not be read: {exc}") from exc


def check_state(
    path: Path, expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]
) -> None:
    """Refuse a weights file with one message naming every missing, unexpected or odd key."""
    problems = state_mismatches(expected, got, "file", compare_dtype=True)
    if problems:
        raise BundleError(f"{path} does not fit the model: " + "; ".join(problems))
