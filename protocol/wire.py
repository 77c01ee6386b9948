"""The safetensors container: bytes in, bytes out, validated strictly before anything is read.

Written here rather than through `safetensors.numpy` for three reasons: bf16 has no numpy dtype
(it travels as raw 16-bit words labelled "BF16"), encoding must cost one copy (a 64 MB tensor
is joined straight into the payload), and decoding must turn every defect into `ProtocolError`
without trusting a parser with attacker bytes. The layout is the standard one (8-byte
little-endian header length, JSON header with `__metadata__`, contiguous data), so any
safetensors reader in any language opens a captured message; the tests check that against the
official reader.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import BAD_DTYPE, MALFORMED, TOO_LARGE, ProtocolError

# safetensors dtype -> numpy dtype of the raw words (BF16 is read as uint16 and widened later).
DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
}
_ALIGN = 8  # the header is padded so that data starts 8-byte aligned, as safetensors does


@dataclass(frozen=True)
class Limits:
    """Bounds that keep a hostile or broken peer from exhausting the receiver."""

    max_payload_bytes: int = 256 << 20  # a whole message, after chunk reassembly
    max_header_bytes: int = 1 << 20
    max_tensors: int = 4096
    max_ndim: int = 8
    # Chunk reassembly (chunking.py): a set costs its buffer plus its bookkeeping.
    max_reassembly_bytes: int | None = None  # every open set; None: two devices' shares
    max_device_reassembly_bytes: int | None = None  # one device's sets; None: one whole message
    max_device_chunk_sets: int = 16  # sets one device may have open at once

    def __post_init__(self) -> None:
        for name in ("max_payload_bytes", "max_header_bytes", "max_tensors", "max_ndim"):
            _check_positive(name, getattr(self, name))
        _check_positive("max_device_chunk_sets", self.max_device_chunk_sets)
        for name in ("max_reassembly_bytes", "max_device_reassembly_bytes"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))

    @property
    def device_reassembly_bytes(self) -> int:
        """One device's share: by default one message of the largest size, with the worst-case
        bookkeeping of one-byte chunks (a bit per chunk) and some slack."""
        if self.max_device_reassembly_bytes is not None:
            return self.max_device_reassembly_bytes
        return self.max_payload_bytes + self.max_payload_bytes // 8 + (64 << 10)

    @property
    def reassembly_bytes(self) -> int:
        """The budget for all devices' sets together."""
        if self.max_reassembly_bytes is not None:
            return self.max_reassembly_bytes
        return 2 * self.device_reassembly_bytes


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class RawTensor:
    """A tensor as it lies in the payload: safetensors dtype and a read-only view of its words."""

    dtype: str
    array: np.ndarray


def pack(tensors: Mapping[str, RawTensor], metadata: Mapping[str, str]) -> bytes:
    """Serialise to safetensors bytes; the data is copied once, into the result."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    # Widest items first keeps every tensor aligned to its item size.
    order = sorted(tensors, key=lambda name: (-tensors[name].array.itemsize, name))
    offset = 0
    buffers: list[Any] = []
    for name in order:
        raw = tensors[name]
        array = np.ascontiguousarray(raw.array, dtype=DTYPES[raw.dtype])
        header[name] = {
            "dtype": raw.dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        buffers.append(array.reshape(-1).view(np.uint8).data if array.nbytes else b"")
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-(len(text) + 8) % _ALIGN)
    return b"".join([len(text).to_bytes(8, "little"), text, *buffers])


Header = tuple[dict[str, Any], int]
"""A payload's parsed JSON header (with `__metadata__`) and the offset where its data begins."""


def read_header(data: bytes | bytearray | memoryview, limits: Limits) -> Header:
    """Parse and check the JSON header; returns it and the offset where the data begins."""
    size = len(data)
    if size > limits.max_payload_bytes:
        raise ProtocolError(TOO_LARGE, "payload", f"<= {limits.max_payload_bytes} bytes", size)
    if size < 8:
        raise ProtocolError(MALFORMED, "payload", "at least 8 bytes (safetensors)", size)
    length = int.from_bytes(bytes(data[:8]), "little")
    if length > limits.max_header_bytes or length > size - 8 or length < 2:
        raise ProtocolError(
            MALFORMED, "header length", f"2..{min(limits.max_header_bytes, size - 8)}", length
        )
    raw = bytes(data[8 : 8 + length])
    if raw[:1] != b"{":
        raise ProtocolError(MALFORMED, "header", "a JSON object", raw[:16])
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise ProtocolError(MALFORMED, "header", "UTF-8 JSON", str(exc)) from None
    if not isinstance(header, dict):
        raise ProtocolError(MALFORMED, "header", "a JSON object", type(header).__name__)
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ProtocolError(MALFORMED, "__metadata__", "an object of strings", metadata)
    if len(header) - 1 > limits.max_tensors:
        raise ProtocolError(TOO_LARGE, "tensors", f"<= {limits.max_tensors}", len(header) - 1)
    return header, 8 + length


def unpack(
    data: bytes | bytearray | memoryview, limits: Limits, header: Header | None = None
) -> tuple[dict[str, str], dict[str, RawTensor]]:
    """Parse safetensors bytes into metadata and zero-copy tensor views, refusing any defect.

    `header`: this payload's `read_header`, when the caller has read it already (it is not
    changed)."""
    fields, start = header if header is not None else read_header(data, limits)
    metadata: dict[str, str] = fields["__metadata__"]
    spans: list[tuple[int, int, str]] = []
    entries: dict[str, tuple[str, tuple[int, ...], int]] = {}
    for name, entry in fields.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _check_entry(name, entry, limits)
        spans.append((begin, end, name))
        entries[name] = (dtype, shape, begin)
    # As in the reference reader: tensors tile the data exactly, no gaps, no overlaps.
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise ProtocolError(MALFORMED, f"{name}.data_offsets", f"to start at {position}", begin)
        position = end
    if position != len(data) - start:
        raise ProtocolError(MALFORMED, "data", f"{position} bytes", len(data) - start)
    tensors: dict[str, RawTensor] = {}
    for name, (dtype, shape, begin) in entries.items():
        words = np.frombuffer(data, DTYPES[dtype], math.prod(shape), start + begin)
        tensors[name] = RawTensor(dtype, words.reshape(shape))
    return metadata, tensors


def _check_entry(name: str, entry: object, limits: Limits) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ProtocolError(MALFORMED, name, "{dtype, shape, data_offsets}", entry)
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:  # a list or dict is not even hashable
        raise ProtocolError(BAD_DTYPE, name, f"one of {sorted(DTYPES)}", dtype)
    shape, offsets = entry["shape"], entry["data_offsets"]
    if (
        not isinstance(shape, list)
        or len(shape) > limits.max_ndim
        or not all(_is_count(d) for d in shape)
    ):
        raise ProtocolError(MALFORMED, f"{name}.shape", f"<= {limits.max_ndim} sizes >= 0", shape)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise ProtocolError(MALFORMED, f"{name}.data_offsets", "[begin, end]", offsets)
    if math.prod(max(d, 1) for d in shape) > 2**48:  # numpy refuses such shapes, even empty
        raise ProtocolError(MALFORMED, f"{name}.shape", "fewer than 2**48 elements", shape)
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != nbytes:
        raise ProtocolError(MALFORMED, f"{name}.data_offsets", f"a span of {nbytes} bytes", offsets)
    return dtype, tuple(shape), begin, end


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62


def _refuse_constant(name: str) -> None:
    """JSON has no NaN or Infinity; Python's parser would accept them unless told not to."""
    raise ValueError(f"non-standard JSON constant {name}")
