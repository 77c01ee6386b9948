"""Messages <-> safetensors bytes, through one table of message kinds.

A payload is a safetensors file: the tensors of the message, and every other field as a string
in `__metadata__` (envelope keys `version`, `kind`, `msg_id`, `device_id`, `round`, `step`, then
the kind's own fields by name; maps and settings as JSON). Nothing is ever unpickled: pickle would
let any peer run code on the receiver.

`decode` validates, in order: size limits, container layout, version (newer is refused), kind,
metadata keys, field values (through the message constructors), tensor names, wire dtypes,
finiteness, and the shapes the caller expects (from the bundle manifest). Every defect raises
`ProtocolError`; nothing else escapes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .bundle import BATCH, Manifest, TensorSpec
from .errors import (
    BAD_DTYPE,
    BAD_FIELD,
    BAD_SHAPE,
    INTERNAL,
    MALFORMED,
    UNKNOWN_KIND,
    UNSUPPORTED_VERSION,
    ProtocolError,
)
from .messages import (
    BodyOut,
    Chunk,
    Error,
    GradH,
    GradZ,
    Join,
    Message,
    PhaseSettings,
    Presence,
    ServerStatus,
    Smashed,
    Task,
    Update,
)
from .pool_messages import WorkerAssignment, WorkerPresence
from .tensor_codec import check_finite, decode_tensor, encode_tensor, wire_names
from .version import PROTOCOL_VERSION
from .wire import DEFAULT_LIMITS, Header, Limits, RawTensor, pack, read_header, unpack

CONTENT_TYPE = "application/vnd.sfprompt+safetensors"
"""MQTT v5 Content Type of every payload."""

ENVELOPE_KEYS = ("version", "kind", "msg_id", "device_id", "round", "step")
PARAM_PREFIX = "params/"


@dataclass(frozen=True)
class Expectations:
    """Tensor specs by message kind; kinds not listed are checked for layout only.

    For `task` and `update` the specs list every parameter: missing or extra names are refused.
    """

    by_kind: Mapping[str, tuple[TensorSpec, ...]] = field(default_factory=dict)

    def check(self, kind: str, tensors: Mapping[str, np.ndarray], exact: bool) -> None:
        specs = self.by_kind.get(kind)
        if specs is None:
            return
        names = {spec.name for spec in specs}
        if exact and set(tensors) != names:
            raise ProtocolError(BAD_SHAPE, "params", f"names {sorted(names)}", sorted(tensors))
        for spec in specs:
            if spec.name not in tensors:
                continue
            array = tensors[spec.name]
            if not spec.dtype_matches(array.dtype):
                raise ProtocolError(BAD_DTYPE, spec.name, spec.dtype, array.dtype)
            if not spec.shape_matches(array.shape):
                raise ProtocolError(BAD_SHAPE, spec.name, _wire_shape(spec), array.shape)


def _wire_shape(spec: TensorSpec) -> str:
    """The expected shape as ERROR texts have always given it: -1 for the batch size."""
    return str(tuple(-1 if n == BATCH else n for n in spec.shape))


def expectations_for(manifest: Manifest) -> Expectations:
    """The tensor shapes a bundle implies for every message that carries tensors, so that a
    receiver refuses a wrong shape at the boundary with an ERROR instead of failing later.
    Activations always decode to float32."""
    tokens, dim = manifest.tokens, manifest.embed_dim
    h: tuple[int | str, ...] = (BATCH, tokens, dim)
    tail = manifest.tail_input
    z = h if tail is None else tuple(BATCH if isinstance(n, str) else int(n) for n in tail.shape)
    params = tuple(
        TensorSpec(key, spec.dtype, tuple(int(n) for n in spec.shape))
        for key, spec in manifest.parameters.items()
    )
    return Expectations(
        {
            "smashed": (TensorSpec("h", "float32", h),),
            "grad_h": (TensorSpec("grad_h", "float32", h),),
            "body_out": (TensorSpec("z", "float32", z),),
            "grad_z": (TensorSpec("grad_z", "float32", z),),
            "task": params,
            "update": params,
        }
    )


# ---- field converters: (to metadata string, from metadata string) ----------------------------
Converter = tuple[Callable[[Any], str], Callable[[str, str], Any]]
_INT_TEXT = re.compile(r"-?[0-9]{1,18}\Z")


def _parse_int(name: str, text: str) -> int:
    if not _INT_TEXT.match(text):
        raise ProtocolError(BAD_FIELD, name, "a decimal integer", text)
    return int(text)


def _parse_float(name: str, text: str) -> float:
    try:
        value = float(text) if len(text) <= 40 else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ProtocolError(BAD_FIELD, name, "a finite number", text)
    return value


def _parse_bool(name: str, text: str) -> bool:
    if text not in ("true", "false"):
        raise ProtocolError(BAD_FIELD, name, "true or false", text)
    return text == "true"


def _parse_json_object(name: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text, parse_constant=_refuse)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise ProtocolError(BAD_FIELD, name, "a JSON object", text)
    return value


def _dump_json(value: Mapping[str, Any]) -> str:
    return json.dumps(dict(value), sort_keys=True, separators=(",", ":"), allow_nan=False)


def _parse_settings(name: str, text: str) -> PhaseSettings:
    values = _parse_json_object(name, text)
    known = {f.name for f in dataclasses.fields(PhaseSettings)}
    if not set(values) <= known:
        raise ProtocolError(BAD_FIELD, name, f"keys within {sorted(known)}", sorted(values))
    try:
        return PhaseSettings(**values)
    except TypeError as exc:  # a required key missing
        raise ProtocolError(BAD_FIELD, name, f"keys {sorted(known)}", str(exc)) from None


def _dump_settings(settings: PhaseSettings) -> str:
    """Settings as JSON, the optional ones left out at their default: a TASK that uses no
    setting newer than a device reads the same there (the defenses came later)."""
    values = dataclasses.asdict(settings)
    for f in dataclasses.fields(settings):
        if f.default is not dataclasses.MISSING and values[f.name] == f.default:
            del values[f.name]
    return _dump_json(values)


def _refuse(constant: str) -> None:
    raise ValueError(constant)


TEXT: Converter = (str, lambda name, text: text)
INT: Converter = (str, _parse_int)
FLOAT: Converter = (repr, _parse_float)
BOOL: Converter = (lambda value: "true" if value else "false", _parse_bool)
JSON_MAP: Converter = (_dump_json, _parse_json_object)
SETTINGS: Converter = (_dump_settings, _parse_settings)
# Device ids never hold a comma (check_device_id); the message checks each one.
ID_LIST: Converter = (",".join, lambda name, text: tuple(text.split(",")) if text else ())


@dataclass(frozen=True)
class _Kind:
    """How one message class maps onto a payload."""

    cls: type[Any]
    fields: Mapping[str, Converter]
    tensor: str | None = None  # an activation field, encoded per the message's `encoding`
    params: bool = False  # a `params` mapping, float32, under PARAM_PREFIX
    raw: str | None = None  # a uint8 field carried as U8 (chunks)
    # Fields added later: left out of the payload at their default, so that a peer of an
    # older release reads such a message, and read as their default when absent.
    optional: Mapping[str, Converter] = field(default_factory=dict)


KINDS: dict[str, _Kind] = {
    "join": _Kind(Join, {"bundle_hash": TEXT, "runtime": JSON_MAP, "hardware": JSON_MAP}),
    "task": _Kind(Task, {"settings": SETTINGS}, params=True, optional={"worker": TEXT}),
    "smashed": _Kind(Smashed, {"encoding": TEXT}, tensor="h"),
    "body_out": _Kind(BodyOut, {"encoding": TEXT}, tensor="z"),
    "grad_z": _Kind(GradZ, {"encoding": TEXT}, tensor="grad_z"),
    "grad_h": _Kind(GradH, {"encoding": TEXT}, tensor="grad_h"),
    "update": _Kind(Update, {"samples": INT, "metrics": JSON_MAP, "memory": JSON_MAP}, params=True),
    "error": _Kind(Error, {"code": TEXT, "text": TEXT, "answers": TEXT}),
    "presence": _Kind(Presence, {"online": BOOL, "since": FLOAT}),
    "server_status": _Kind(ServerStatus, {"state": TEXT, "devices_online": INT, "text": TEXT}),
    "chunk": _Kind(
        Chunk,
        {"index": INT, "count": INT, "chunk_size": INT, "total_bytes": INT, "sha256": TEXT},
        raw="data",
    ),
    "worker_presence": _Kind(
        WorkerPresence,
        {"online": BOOL, "capacity": FLOAT, "accelerator": TEXT, "applied": TEXT},
    ),
    "worker_assignment": _Kind(WorkerAssignment, {"devices": ID_LIST}),
}
assert all(spec.cls.kind == kind for kind, spec in KINDS.items())


def encode(msg: Message) -> bytes:
    """Serialise a message to safetensors bytes (one copy of the tensor data)."""
    spec = KINDS[msg.kind]
    metadata = {
        "version": str(msg.version),
        "kind": msg.kind,
        "msg_id": msg.msg_id,
        "device_id": msg.device_id,
        "round": str(msg.round),
        "step": str(msg.step),
    }
    for name, (to_text, _) in spec.fields.items():
        metadata[name] = to_text(getattr(msg, name))
    for name, (to_text, _) in spec.optional.items():
        value = getattr(msg, name)
        if value != _default_of(spec.cls, name):
            metadata[name] = to_text(value)
    tensors: dict[str, RawTensor] = {}
    if spec.tensor is not None:
        tensors = encode_tensor(spec.tensor, getattr(msg, spec.tensor), msg.encoding)  # type: ignore[union-attr]
    elif spec.params:
        params: Mapping[str, np.ndarray] = msg.params  # type: ignore[union-attr]
        tensors = {PARAM_PREFIX + key: RawTensor("F32", value) for key, value in params.items()}
    elif spec.raw is not None:
        tensors = {spec.raw: RawTensor("U8", getattr(msg, spec.raw))}
    return pack(tensors, metadata)


@dataclass(frozen=True)
class Peek:
    """The envelope of a payload, read without touching its tensors (for de-duplication and the
    sender check). `decode` given it does not parse the header again."""

    kind: str
    msg_id: str
    device_id: str
    header: Header = field(repr=False, compare=False)


def peek(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Peek:
    """Read kind, msg_id and device_id from the header only; raises ProtocolError."""
    header = read_header(data, limits)
    metadata = header[0]["__metadata__"]
    kind, msg_id, device_id = (metadata.get(key) for key in ("kind", "msg_id", "device_id"))
    if not (isinstance(kind, str) and isinstance(msg_id, str) and isinstance(device_id, str)):
        raise ProtocolError(BAD_FIELD, "__metadata__", "kind, msg_id and device_id", metadata)
    return Peek(kind, msg_id, device_id, header)


def decode(
    data: bytes | bytearray | memoryview,
    limits: Limits = DEFAULT_LIMITS,
    expect: Expectations | None = None,
    head: Peek | None = None,
) -> Message:
    """Parse and validate a payload; raises ProtocolError naming the first defect found.

    `head`: this payload's `peek`, if taken already: its header is not parsed again."""
    metadata, tensors = unpack(data, limits, None if head is None else head.header)
    version = _parse_int("version", metadata.get("version", ""))
    if not 1 <= version <= PROTOCOL_VERSION:
        raise ProtocolError(UNSUPPORTED_VERSION, "version", f"1..{PROTOCOL_VERSION}", version)
    kind = metadata.get("kind", "")
    spec = KINDS.get(kind)
    if spec is None:
        raise ProtocolError(UNKNOWN_KIND, "kind", f"one of {sorted(KINDS)}", kind)
    keys = set(ENVELOPE_KEYS) | set(spec.fields)
    if not keys <= set(metadata) <= keys | set(spec.optional):
        expected = f"keys {sorted(keys)}" + (
            f", optionally {sorted(spec.optional)}" * bool(spec.optional)
        )
        raise ProtocolError(MALFORMED, "__metadata__", expected, sorted(metadata))
    values: dict[str, Any] = {
        "version": version,
        "msg_id": metadata["msg_id"],
        "device_id": metadata["device_id"],
        "round": _parse_int("round", metadata["round"]),
        "step": _parse_int("step", metadata["step"]),
    }
    for name, (_, from_text) in spec.fields.items():
        values[name] = from_text(name, metadata[name])
    for name, (_, from_text) in spec.optional.items():
        if name in metadata:
            values[name] = from_text(name, metadata[name])
    if spec.tensor is not None:
        encoding = values["encoding"]
        expected_names = wire_names(spec.tensor, encoding) if isinstance(encoding, str) else set()
        _check_names(expected_names, tensors)
        values[spec.tensor] = decode_tensor(spec.tensor, encoding, tensors)
        if expect is not None:
            expect.check(kind, {spec.tensor: values[spec.tensor]}, exact=False)
    elif spec.params:
        values["params"] = _decode_params(tensors)
        if expect is not None:
            expect.check(kind, values["params"], exact=True)
    elif spec.raw is not None:
        _check_names({spec.raw}, tensors)
        raw = tensors[spec.raw]
        if raw.dtype != "U8":
            raise ProtocolError(BAD_DTYPE, spec.raw, "U8", raw.dtype)
        values[spec.raw] = raw.array
    else:
        _check_names(set(), tensors)
    message: Message = spec.cls(**values)
    return message


def _default_of(cls: type[Any], name: str) -> Any:
    """A message field's default (optional fields always have one)."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _check_names(expected: set[str], tensors: Mapping[str, RawTensor]) -> None:
    if set(tensors) != expected:
        raise ProtocolError(BAD_SHAPE, "tensors", f"names {sorted(expected)}", sorted(tensors))


def _decode_params(tensors: Mapping[str, RawTensor]) -> dict[str, np.ndarray]:
    params: dict[str, np.ndarray] = {}
    for name, raw in tensors.items():
        if not name.startswith(PARAM_PREFIX) or len(name) == len(PARAM_PREFIX):
            raise ProtocolError(BAD_SHAPE, "tensors", f"names '{PARAM_PREFIX}<name>'", name)
        if raw.dtype != "F32":
            raise ProtocolError(BAD_DTYPE, name, "F32", raw.dtype)
        check_finite(name, raw.array)
        params[name[len(PARAM_PREFIX) :]] = raw.array
    return params


def error_for(
    exc: Exception, device_id: str, answers: str = "", round: int = 0, step: int = 0
) -> Error:
    """The ERROR message that answers a refused payload (or a receiver's own failure)."""
    if isinstance(exc, ProtocolError):
        return Error(
            device_id=device_id,
            round=round,
            step=step,
            code=exc.code,
            text=str(exc)[:4096],
            answers=answers,
        )
    text = f"{type(exc).__name__}: {exc}"[:4096]
    return Error(
        device_id=device_id, round=round, step=step, code=INTERNAL, text=text, answers=answers
    )
