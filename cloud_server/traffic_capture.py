"""`serve --capture DIR`: keep what a curious server receives, for `sfprompt-audit` to attack.

The leakage audit of `sfprompt-sim --audit` simulates the traffic; this writes the real one, as
the body service accepted it, so that the same attacks can run on a deployment's own h and
dL/dz (docs/threat-model.md, "Auditing captured traffic"). Files, all safetensors (never
pickle), the envelope in each file's metadata:

- `step-<device>-r<round>-s<step>.safetensors`: one per split step, `h` (B, T, D) float32 as
  decoded from the SMASHED, rewritten with `grad_z` beside it once the step's GRAD_Z is accepted.
- `round-<r>-params.safetensors`: the prompt + tail the round's TASKs carried (the attacker
  needs them), with the round's phase settings (its defense) as JSON in the metadata.

At most `limit` files in all (a restarted server counts those already there); the capture then
stops and says so once. Writing happens on a thread of its own behind a bounded queue: the
body service's handlers run on the MQTT network thread and must not wait on a disk.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from sfprompt.protocol.messages import GradZ, PhaseSettings, Smashed

log = logging.getLogger(__name__)

STEP_FORMAT = "sfprompt-capture-step/1"
ROUND_FORMAT = "sfprompt-capture-round/1"
STEP_GLOB = "step-*.safetensors"
ROUND_GLOB = "round-*-params.safetensors"
StepKey = tuple[str, int, int]  # device, round, step


class CaptureError(ValueError):
    """A capture file that is missing, unreadable or not what the capture writes."""


def step_path(folder: Path, device_id: str, round: int, step: int) -> Path:
    return folder / f"step-{device_id}-r{round}-s{step}.safetensors"


def round_path(folder: Path, round: int) -> Path:
    return folder / f"round-{round}-params.safetensors"


@dataclass(frozen=True)
class CapturedStep:
    """One split step as the server received it; `grad_z` is None if its GRAD_Z never came."""

    device_id: str
    round: int
    step: int
    h: np.ndarray  # (B, T, D) float32, decoded
    grad_z: np.ndarray | None  # (B, R', D) float32, decoded
    encoding: str  # how h travelled
    grad_encoding: str | None


@dataclass(frozen=True)
class StepInfo:
    """A step file's header: what `read_step` would return, without the tensors."""

    path: Path
    device_id: str
    round: int
    step: int
    h_shape: tuple[int, ...]
    grad_shape: tuple[int, ...] | None
    encoding: str
    grad_encoding: str | None

    @property
    def batch(self) -> int:
        return self.h_shape[0]


@dataclass(frozen=True)
class CapturedRound:
    """The prompt + tail a round's TASKs carried, and the settings they named."""

    round: int
    params: dict[str, np.ndarray]
    settings: dict[str, object]  # PhaseSettings' fields
    contract_hash: str  # of the bundle the server ran


@dataclass(frozen=True)
class _Write:
    path: Path
    tensors: dict[str, np.ndarray]
    metadata: dict[str, str]


class TrafficCapture:
    """Writes accepted split traffic and each round's params to `folder`, `limit` files at most.

    `smashed` and `grad_z` are called from the body service's handlers, `round_params` from the
    coordinator; all three only queue work. `close` writes what is queued and stops the thread.
    """

    def __init__(
        self, folder: Path, limit: int, contract_hash: str = "", backlog: int = 32
    ) -> None:
        if limit < 1:
            raise ValueError(f"capture limit: at least 1 file, got {limit}")
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.limit = limit
        self.contract_hash = contract_hash
        self.written = count_files(folder)  # files taken from the limit, those before included
        self.dropped = 0  # files the writer could not keep up with
        self._steps: dict[StepKey, str] = {}  # captured steps -> h's encoding
        self._rounds: set[int] = set()
        self._lock = threading.Lock()
        self._full_said = False
        self._queue: queue.Queue[_Write | None] = queue.Queue(backlog)
        self._thread = threading.Thread(target=self._drain, name="traffic-capture", daemon=True)

    def start(self) -> TrafficCapture:
        self._thread.start()
        log.warning(
            "capturing split traffic to %s (at most %d files): it holds what devices sent",
            self.folder,
            self.limit,
        )
        return self

    def close(self, timeout: float = 60.0) -> None:
        """Write what is queued, then stop the writer thread."""
        if self._thread.is_alive():
            self._queue.put(None, timeout=timeout)
            self._thread.join(timeout)

    # ---- what the server accepted --------------------------------------------------------
    def smashed(self, msg: Smashed) -> None:
        """A SMASHED the body service accepted: its h, as a new step file (within the limit)."""
        key = (msg.device_id, msg.round, msg.step)
        with self._lock:
            if key in self._steps or not self._admit():
                return
            self._steps[key] = msg.encoding
        self._put(self._step_write(key, msg.h, msg.encoding, None, None))

    def grad_z(self, msg: GradZ, h: np.ndarray) -> None:
        """A GRAD_Z the body service accepted for the step whose `h` it held: the step's file
        again with both, if that step was captured."""
        key = (msg.device_id, msg.round, msg.step)
        with self._lock:
            encoding = self._steps.get(key)
        if encoding is not None:
            self._put(self._step_write(key, h, encoding, msg.grad_z, msg.encoding))

    def round_params(self, number: int, params: Mapping[str, np.ndarray], settings: object) -> None:
        """The prompt + tail of round (or buffered version) `number`'s TASKs, once per round."""
        with self._lock:
            if number in self._rounds or not self._admit():
                return
            self._rounds.add(number)
        fields = dataclasses.asdict(settings) if isinstance(settings, PhaseSettings) else {}
        metadata = {
            "format": ROUND_FORMAT,
            "round": str(number),
            "contract_hash": self.contract_hash,
            "settings": json.dumps(fields),
        }
        tensors = {k: np.array(v, dtype=np.float32) for k, v in params.items()}  # a copy
        self._put(_Write(round_path(self.folder, number), tensors, metadata))

    # ---- internals -------------------------------------------------------------------------
    def _admit(self) -> bool:
        """Take one file from the limit (under the lock); False once it is spent."""
        if self.written < self.limit:
            self.written += 1
            return True
        if not self._full_said:
            self._full_said = True
            log.warning(
                "capture limit reached: %d files in %s; capturing nothing more (--capture-limit)",
                self.limit,
                self.folder,
            )
        return False

    def _step_write(
        self,
        key: StepKey,
        h: np.ndarray,
        encoding: str,
        grad_z: np.ndarray | None,
        grad_encoding: str | None,
    ) -> _Write:
        device_id, number, step = key
        metadata = {
            "format": STEP_FORMAT,
            "device_id": device_id,
            "round": str(number),
            "step": str(step),
            "encoding": encoding,
        }
        tensors = {"h": h}
        if grad_z is not None and grad_encoding is not None:
            tensors["grad_z"] = grad_z
            metadata["grad_encoding"] = grad_encoding
        return _Write(step_path(self.folder, device_id, number, step), tensors, metadata)

    def _put(self, write: _Write) -> None:
        try:
            self._queue.put_nowait(write)
        except queue.Full:
            with self._lock:
                self.dropped += 1
                first = self.dropped == 1
            if first:
                log.warning("capture: the disk is behind; dropping files (%s)", write.path.name)

    def _drain(self) -> None:
        while (write := self._queue.get()) is not None:
            tmp = write.path.with_name(f".{write.path.name}.tmp")  # replaced whole, never torn
            try:
                tensors = {k: np.ascontiguousarray(v) for k, v in write.tensors.items()}
                save_file(tensors, str(tmp), metadata=write.metadata)
                os.replace(tmp, write.path)
            except OSError:
                log.exception("capture: could not write %s", write.path)


def count_files(folder: Path) -> int:
    """Capture files in `folder`: steps and round params."""
    return len(list(folder.glob(STEP_GLOB))) + len(list(folder.glob(ROUND_GLOB)))


# ---- reading a capture back ----------------------------------------------------------------


def _open(path: Path, fmt: str, arrays: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """The file's metadata and its tensors (`arrays`), else their (shape, dtype) only."""
    if not path.is_file():
        raise CaptureError(f"{path}: no such capture file")
    try:
        with safe_open(str(path), "np") as handle:
            metadata = handle.metadata() or {}
            names = handle.keys()  # the handle itself is not iterable
            if arrays:
                tensors: dict[str, Any] = {k: handle.get_tensor(k) for k in names}
            else:
                slices = {k: handle.get_slice(k) for k in names}
                tensors = {k: (tuple(v.get_shape()), v.get_dtype()) for k, v in slices.items()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CaptureError(f"{path}: not a readable safetensors file ({exc})") from exc
    if metadata.get("format") != fmt:
        raise CaptureError(f"{path}: format {metadata.get('format')!r}, expected {fmt!r}")
    return tensors, metadata


def _int(path: Path, metadata: dict[str, str], name: str) -> int:
    try:
        return int(metadata[name])
    except (KeyError, ValueError):
        raise CaptureError(f"{path}: metadata {name!r} missing or not an integer") from None


def step_info(path: Path) -> StepInfo:
    """What a step file holds, from its header alone (no tensor is read); raises CaptureError
    naming the file and what is wrong with it."""
    shapes, meta = _open(path, STEP_FORMAT, arrays=False)
    h, grad_z = shapes.get("h"), shapes.get("grad_z")
    if h is None or h[1] != "F32" or len(h[0]) != 3:
        got = "none" if h is None else f"{h[1]} {list(h[0])}"
        raise CaptureError(f"{path}: expected h float32 (B, T, D), got {got}")
    if grad_z is not None and (grad_z[1] != "F32" or grad_z[0][:1] != h[0][:1]):
        raise CaptureError(f"{path}: grad_z {grad_z[1]} {list(grad_z[0])} does not fit h {h[0]}")
    return StepInfo(
        path=path,
        device_id=meta.get("device_id", ""),
        round=_int(path, meta, "round"),
        step=_int(path, meta, "step"),
        h_shape=h[0],
        grad_shape=None if grad_z is None else grad_z[0],
        encoding=meta.get("encoding", ""),
        grad_encoding=meta.get("grad_encoding"),
    )


def read_step(path: Path) -> CapturedStep:
    """One step file with its tensors; raises CaptureError as `step_info` does."""
    info = step_info(path)
    tensors, _ = _open(path, STEP_FORMAT, arrays=True)
    return CapturedStep(
        device_id=info.device_id,
        round=info.round,
        step=info.step,
        h=tensors["h"],
        grad_z=tensors.get("grad_z"),
        encoding=info.encoding,
        grad_encoding=info.grad_encoding,
    )


def read_round(path: Path) -> CapturedRound:
    """One round's params file; raises CaptureError naming the file and the problem."""
    tensors, meta = _open(path, ROUND_FORMAT, arrays=True)
    try:
        settings = json.loads(meta.get("settings", "{}"))
    except json.JSONDecodeError as exc:
        raise CaptureError(f"{path}: settings are not JSON ({exc})") from exc
    return CapturedRound(
        round=_int(path, meta, "round"),
        params=tensors,
        settings=settings,
        contract_hash=meta.get("contract_hash", ""),
    )
