"""The server's checkpoint after each round: global prompt + tail, history, random state.

One safetensors file: the parameters as tensors, everything else as one JSON string in the
safetensors metadata, so the file needs no pickle to read. It is written to a temporary file in the
same directory, fsync'd, then renamed over the old one (and the directory fsync'd), so a server
killed at any moment leaves either the previous complete checkpoint or the new complete one.
One writer per path: a second concurrent writer could remove the first's temporary file.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import safetensors.numpy

Params = dict[str, np.ndarray]
T = TypeVar("T")

FORMAT = "sfprompt.checkpoint/1"  # bump when the metadata layout changes
_META_KEY = "sfprompt.checkpoint"
_HEADER_LIMIT = 100_000_000  # safetensors' own cap on the JSON header


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be used: corrupt, incomplete, or another model's."""


@dataclass
class Checkpoint:
    round: int  # the last round whose aggregate `params` holds
    params: Params  # global prompt + tail, float32
    history: list[dict]  # one JSON-able dict of metrics per round so far
    rng_state: dict  # numpy Generator.bit_generator.state
    fingerprint: str  # of the model/config: a restart with another model is refused
    strikes: dict[str, int] = field(default_factory=dict)  # device -> refused rounds in a row
    excluded: list[str] = field(default_factory=list)  # devices no longer selected


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    """Write `ckpt` to `path` atomically (see the module docstring).

    Raises ValueError if history or rng_state is not JSON-able, or a parameter is not an array
    or not finite (a NaN model saved would poison every restart).
    """
    path = Path(path)
    for key, value in ckpt.params.items():
        if not isinstance(value, np.ndarray):
            raise ValueError(f"checkpoint param {key}: expected a numpy array, got {type(value)}")
        if not _finite(value):
            raise ValueError(f"checkpoint param {key} of round {ckpt.round} is not finite")
    meta = {
        "format": FORMAT,
        "round": ckpt.round,
        "history": ckpt.history,
        "rng_state": ckpt.rng_state,
        "fingerprint": ckpt.fingerprint,
        "strikes": ckpt.strikes,
        "excluded": ckpt.excluded,
    }
    try:
        text = json.dumps(meta)
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint of round {ckpt.round} is not JSON-able: {error}") from None
    tensors = {key: np.ascontiguousarray(value) for key, value in ckpt.params.items()}
    data = safetensors.numpy.save(tensors, metadata={_META_KEY: text})
    directory = path.parent
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def load_checkpoint(path: Path, fingerprint: str | None = None) -> Checkpoint | None:
    """Read the checkpoint at `path`; None if there is none.

    Raises CheckpointError naming the file if it is truncated, not safetensors, has bad or
    missing metadata, holds NaN or Inf, or (when `fingerprint` is given) was written for another
    configuration. `strikes` and `excluded` are optional (older checkpoints lack them).
    Temporary files left by a killed write are never read.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    meta = _read_metadata(path, data)
    try:
        params = safetensors.numpy.load(data)
    except Exception as error:  # safetensors raises its own SafetensorError for bad offsets
        raise CheckpointError(f"{path}: corrupt tensor data ({error})") from None
    ckpt = Checkpoint(
        round=_field(path, meta, "round", int),
        params=params,
        history=_field(path, meta, "history", list),
        rng_state=_field(path, meta, "rng_state", dict),
        fingerprint=_field(path, meta, "fingerprint", str),
        strikes=_field(path, {"strikes": {}, **meta}, "strikes", dict),
        excluded=_field(path, {"excluded": [], **meta}, "excluded", list),
    )
    if not all(isinstance(entry, dict) for entry in ckpt.history):
        raise CheckpointError(f"{path}: history must be a list of objects")
    if not all(isinstance(d, str) and _count(n) for d, n in ckpt.strikes.items()):
        raise CheckpointError(f"{path}: strikes must map device ids to counts >= 0")
    if not all(isinstance(d, str) for d in ckpt.excluded):
        raise CheckpointError(f"{path}: excluded must be a list of device ids")
    bad = sorted(key for key, value in params.items() if not _finite(value))
    if bad:
        raise CheckpointError(
            f"{path}: parameters {bad} hold NaN or Inf (a poisoned model); move the checkpoint "
            "away to start afresh"
        )
    if fingerprint is not None and ckpt.fingerprint != fingerprint:
        raise CheckpointError(
            f"{path}: written for configuration {ckpt.fingerprint[:16]}..., this server runs "
            f"{fingerprint[:16]}...; move the checkpoint away to start afresh"
        )
    return ckpt


def _read_metadata(path: Path, data: bytes) -> dict:
    """Parse the safetensors header ourselves: the numpy binding does not return metadata."""
    if len(data) < 8:
        raise CheckpointError(f"{path}: {len(data)} bytes, too short for a safetensors header")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(_HEADER_LIMIT, len(data) - 8):
        raise CheckpointError(
            f"{path}: header of {size} bytes does not fit in the file (truncated?)"
        )
    try:
        header = json.loads(data[8 : 8 + size])
        text = header["__metadata__"][_META_KEY]
        meta = json.loads(text)
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: no readable checkpoint metadata ({error!r})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: expected format {FORMAT!r}, got {got!r}")
    return meta


def _field(path: Path, meta: dict, name: str, kind: type[T]) -> T:
    if name not in meta:
        raise CheckpointError(f"{path}: metadata field {name!r} is missing")
    value = meta[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CheckpointError(
            f"{path}: metadata field {name!r} must be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _finite(value: np.ndarray) -> bool:
    return not np.issubdtype(value.dtype, np.floating) or bool(np.isfinite(value).all())


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _remove_stale_temps(path: Path) -> None:
    """Delete temporary files that killed writes of this checkpoint left behind."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable; not possible (nor needed) on Windows."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
