"""Every message that crosses the wire, as frozen dataclasses holding numpy arrays.

The only behaviour here is checking invariants in `__post_init__`, so that a message that exists
is a message that may be sent; a violation raises `ProtocolError` (the decoder builds messages
through these constructors, so bad input from the network fails the same way). Scans over whole
tensors (NaN/Inf) are left to the decoder: they cost a pass over megabytes and the sender's own
arrays are trusted. Serialisation lives in `codec.py`.

Messages holding arrays compare by identity (`eq=False`): numpy arrays have no single truth value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, TypeAlias

import numpy as np

from .envelope import BROADCAST as BROADCAST
from .envelope import MSG_ID, Envelope, check_float, check_int, check_mapping, check_text
from .envelope import check_device_id as check_device_id
from .envelope import new_msg_id as new_msg_id
from .errors import BAD_DTYPE, BAD_FIELD, BAD_SHAPE, CODES, ProtocolError
from .pool_messages import WorkerAssignment, WorkerPresence

ENCODINGS = ("fp32", "fp16", "bf16", "int8")
"""Wire encodings of activations and gradients (see `tensor_codec.py`)."""

# "finished": every round is done (devices may leave); "stopped": the server went away (its
# Last Will) or was stopped early, and may come back.
SERVER_STATES = (
    "starting",
    "waiting",
    "training",
    "aggregating",
    "evaluating",
    "finished",
    "stopped",
)


def _check_activation(value: object, name: str) -> None:
    if not isinstance(value, np.ndarray):
        raise ProtocolError(BAD_DTYPE, name, "a numpy array", type(value).__name__)
    if value.dtype != np.float32:
        raise ProtocolError(BAD_DTYPE, name, "float32", value.dtype)
    if value.ndim < 1:
        raise ProtocolError(BAD_SHAPE, name, "at least one dimension (batch first)", value.shape)


def _check_params(value: object, name: str) -> None:
    """Prompt and tail weights: float32 arrays by name (aggregation runs in float32)."""
    if not isinstance(value, Mapping):
        raise ProtocolError(BAD_FIELD, name, "a mapping of name to array", type(value).__name__)
    for key, array in value.items():
        check_text(key, f"{name} key", allow_empty=False)
        if not isinstance(array, np.ndarray) or array.dtype != np.float32:
            got = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
            raise ProtocolError(BAD_DTYPE, f"{name}[{key}]", "a float32 numpy array", got)


@dataclass(frozen=True, kw_only=True)
class Join(Envelope):
    """Device -> server: who I am, which bundle I run, on what hardware."""

    kind: ClassVar[str] = "join"
    bundle_hash: str
    runtime: Mapping[str, str]  # e.g. {"python": "3.11.7", "onnxruntime": "1.17.1"}
    hardware: Mapping[str, float | str | bool]  # psutil profile: cpu_count, memory_total, ...

    def __post_init__(self) -> None:
        super().__post_init__()
        check_text(self.bundle_hash, "bundle_hash", allow_empty=False)
        check_mapping(self.runtime, "runtime", "text")
        check_mapping(self.hardware, "hardware", "scalar")


PRUNE_MODES = ("class", "global")


@dataclass(frozen=True, kw_only=True)
class PhaseSettings:
    """How a device runs one round: self-update, pruning to the hardest `keep_ratio`, split."""

    keep_ratio: float  # gamma: fraction of local samples kept by EL2N pruning, in (0, 1]
    local_epochs: int  # epochs of the self-update phase (head -> tail, no network)
    local_lr: float  # learning rate of the self-update phase (paper: 1e-4)
    split_lr: float  # learning rate of the split-training phase
    deadline: float  # unix time (s) by which the UPDATE must arrive
    # No defaults: the server states every setting, from its one definition (RoundConfig).
    split_epochs: int  # epochs of the split-training phase
    batch_size: int  # samples per split step
    encoding: str  # activations and gradients on the wire this round
    # "class": the hardest keep_ratio of each class; "global": of the whole local set (the
    # paper's rule, which drops whole classes while the classifier is biased: docs/simulation.md)
    prune: str
    # Defenses the device applies to what it sends (edge_client/defenses.py). An older TASK has
    # none of these keys and parses as "no defense"; the codec leaves them out while off.
    defense_clip: float | None = None  # C: each sample's h scaled to L2 norm <= C
    defense_noise: float = 0.0  # sigma: N(0, (sigma C)^2) added to each value of clipped h
    defense_grad_noise: float = 0.0  # dL/dz noise, in units of the batch's largest row norm
    defense_grad_max_norm: bool = False  # Li et al.'s max-norm noise on dL/dz

    def __post_init__(self) -> None:
        check_float(self.keep_ratio, "settings.keep_ratio", 0.0, 1.0, low_open=True)
        check_int(self.local_epochs, "settings.local_epochs", 0, 10_000)
        check_float(self.local_lr, "settings.local_lr", 0.0, 1e6)
        check_float(self.split_lr, "settings.split_lr", 0.0, 1e6)
        check_float(self.deadline, "settings.deadline", 0.0, 1e12)
        check_int(self.split_epochs, "settings.split_epochs", 0, 10_000)
        check_int(self.batch_size, "settings.batch_size", 1, 1 << 20)
        if self.prune not in PRUNE_MODES:
            raise ProtocolError(BAD_FIELD, "settings.prune", f"one of {PRUNE_MODES}", self.prune)
        if self.encoding not in ENCODINGS:
            expected = f"one of {ENCODINGS}"
            raise ProtocolError(BAD_FIELD, "settings.encoding", expected, self.encoding)
        self._check_defense()

    def _check_defense(self) -> None:
        if self.defense_clip is not None:
            check_float(self.defense_clip, "settings.defense_clip", 0.0, 1e12, low_open=True)
        check_float(self.defense_noise, "settings.defense_noise", 0.0, 1e6)
        check_float(self.defense_grad_noise, "settings.defense_grad_noise", 0.0, 1e6)
        if not isinstance(self.defense_grad_max_norm, bool):
            raise ProtocolError(
                BAD_FIELD, "settings.defense_grad_max_norm", "a bool", self.defense_grad_max_norm
            )
        if self.defense_noise > 0 and self.defense_clip is None:
            raise ProtocolError(
                BAD_FIELD, "settings.defense_noise", "0 without defense_clip (noise is sigma * C)",
                self.defense_noise,
            )  # fmt: skip


@dataclass(frozen=True, kw_only=True, eq=False)
class Task(Envelope):
    """Server -> device(s): the global prompt + tail and how to run this round."""

    kind: ClassVar[str] = "task"
    params: Mapping[str, np.ndarray]
    settings: PhaseSettings
    # The body worker serving this device's split training (elastic pool), "" for the server
    # itself or a static pool; for the device's log. Left out of the payload while "".
    worker: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_params(self.params, "params")
        if not isinstance(self.settings, PhaseSettings):
            raise ProtocolError(BAD_FIELD, "settings", "PhaseSettings", type(self.settings))
        if self.worker:
            check_device_id(self.worker, "worker")


@dataclass(frozen=True, kw_only=True, eq=False)
class _Activation(Envelope):
    """One tensor of split training; `encoding` says how it travels (and travelled)."""

    tensor_field: ClassVar[str] = ""
    encoding: str = "fp32"

    @property
    def tensor(self) -> np.ndarray:
        value: np.ndarray = getattr(self, self.tensor_field)
        return value

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoding not in ENCODINGS:
            raise ProtocolError(BAD_FIELD, "encoding", f"one of {ENCODINGS}", self.encoding)
        _check_activation(self.tensor, self.tensor_field)


@dataclass(frozen=True, kw_only=True, eq=False)
class Smashed(_Activation):
    """Device -> server: head output h, (B, N, D) with N = 1 + prompts + patches."""

    kind: ClassVar[str] = "smashed"
    tensor_field: ClassVar[str] = "h"
    h: np.ndarray


@dataclass(frozen=True, kw_only=True, eq=False)
class BodyOut(_Activation):
    """Server -> device: body output z, only the tokens the tail reads ((B, 1, D) if no blocks)."""

    kind: ClassVar[str] = "body_out"
    tensor_field: ClassVar[str] = "z"
    z: np.ndarray


@dataclass(frozen=True, kw_only=True, eq=False)
class GradZ(_Activation):
    """Device -> server: dL/dz, same shape as the BODY_OUT it answers."""

    kind: ClassVar[str] = "grad_z"
    tensor_field: ClassVar[str] = "grad_z"
    grad_z: np.ndarray


@dataclass(frozen=True, kw_only=True, eq=False)
class GradH(_Activation):
    """Server -> device: dL/dh, the body's vector-Jacobian product, shaped like h."""

    kind: ClassVar[str] = "grad_h"
    tensor_field: ClassVar[str] = "grad_h"
    grad_h: np.ndarray


@dataclass(frozen=True, kw_only=True, eq=False)
class Update(Envelope):
    """Device -> server: trained prompt + tail, weighted in FedAvg by `samples`."""

    kind: ClassVar[str] = "update"
    params: Mapping[str, np.ndarray]
    samples: int
    metrics: Mapping[str, float] = field(default_factory=dict)  # e.g. local loss, accuracy
    memory: Mapping[str, float] = field(default_factory=dict)  # e.g. peak_rss_bytes

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_params(self.params, "params")
        check_int(self.samples, "samples")
        check_mapping(self.metrics, "metrics", "number")
        check_mapping(self.memory, "memory", "number")


@dataclass(frozen=True, kw_only=True)
class Error(Envelope):
    """Either side: the message `answers` (a msg_id, empty if unreadable) was refused."""

    kind: ClassVar[str] = "error"
    code: str
    text: str
    answers: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.code not in CODES:
            raise ProtocolError(BAD_FIELD, "code", f"one of {sorted(CODES)}", self.code)
        check_text(self.text, "text")
        if self.answers and not MSG_ID.match(self.answers):
            raise ProtocolError(BAD_FIELD, "answers", "a msg_id or empty", self.answers)


@dataclass(frozen=True, kw_only=True)
class Presence(Envelope):
    """Device online/offline, retained; the broker publishes `online=False` as the Last Will."""

    kind: ClassVar[str] = "presence"
    online: bool
    since: float = 0.0  # unix time (s) of the change, 0 if unknown (a Will is written at connect)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.online, bool):
            raise ProtocolError(BAD_FIELD, "online", "a bool", self.online)
        check_float(self.since, "since", 0.0, 1e12)


@dataclass(frozen=True, kw_only=True)
class ServerStatus(Envelope):
    """Server state, retained so that a device connecting late learns it at once."""

    kind: ClassVar[str] = "server_status"
    state: str
    devices_online: int = 0
    text: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.state not in SERVER_STATES:
            raise ProtocolError(BAD_FIELD, "state", f"one of {SERVER_STATES}", self.state)
        check_int(self.devices_online, "devices_online")
        check_text(self.text, "text")


@dataclass(frozen=True, kw_only=True, eq=False)
class Chunk(Envelope):
    """One slice of an encoded message too large for one MQTT packet (see `chunking.py`).

    `msg_id` is the id of the whole message, so a chunk set is keyed like the message it carries.
    """

    kind: ClassVar[str] = "chunk"
    index: int
    count: int
    chunk_size: int  # bytes per chunk; the last one holds the rest
    total_bytes: int
    sha256: str  # of the whole encoded message
    data: np.ndarray  # uint8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.total_bytes, "total_bytes", 1)
        check_int(self.chunk_size, "chunk_size", 1)
        expected_count = -(-self.total_bytes // self.chunk_size)
        check_int(self.count, "count", expected_count, expected_count)
        check_int(self.index, "index", 0, self.count - 1)
        if not isinstance(self.sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ProtocolError(BAD_FIELD, "sha256", "64 lowercase hex digits", self.sha256)
        if not isinstance(self.data, np.ndarray) or self.data.dtype != np.uint8:
            raise ProtocolError(BAD_DTYPE, "data", "a uint8 numpy array", type(self.data))
        start = self.index * self.chunk_size
        expected = min(self.chunk_size, self.total_bytes - start)
        if self.data.shape != (expected,):
            raise ProtocolError(BAD_SHAPE, "data", f"({expected},)", self.data.shape)


Message: TypeAlias = (
    (Join | Task | Smashed | BodyOut | GradZ | GradH | Update | Error | Presence | ServerStatus)
    | Chunk
    | WorkerPresence
    | WorkerAssignment
)
