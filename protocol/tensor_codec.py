"""Wire encodings of one float32 activation or gradient: fp32, fp16, bf16, int8 + per-row scales.

Lossy encodings cut bytes by 2x (fp16, bf16) or about 4x (int8); the bench reports the error each
adds. int8 keeps one float32 scale per row (all axes but the last flattened), the largest |x| of
the row over 127, so a row of small gradients keeps its resolution next to a row of large ones.
bf16 is rounded to nearest-even in numpy, so numpy alone (no ml_dtypes) reads and writes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .errors import BAD_DTYPE, BAD_SHAPE, NOT_FINITE, ProtocolError
from .messages import ENCODINGS
from .wire import RawTensor

SCALE_SUFFIX = ".scale"
_WIRE_DTYPE = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "int8": "I8"}


def encode_tensor(name: str, x: np.ndarray, encoding: str) -> dict[str, RawTensor]:
    """Encode a float32 array under `name` (int8 adds `name + ".scale"`)."""
    if encoding == "fp32":
        return {name: RawTensor("F32", x)}
    if encoding == "fp16":
        return {name: RawTensor("F16", x.astype(np.float16))}
    if encoding == "bf16":
        return {name: RawTensor("BF16", to_bf16_bits(x))}
    if encoding == "int8":
        q, scale = quantize_int8(x)
        return {name: RawTensor("I8", q), name + SCALE_SUFFIX: RawTensor("F32", scale)}
    raise ProtocolError(BAD_DTYPE, "encoding", f"one of {ENCODINGS}", encoding)


def decode_tensor(name: str, encoding: str, tensors: Mapping[str, RawTensor]) -> np.ndarray:
    """Decode `name` back to float32, checking the wire dtype, scale shape and finiteness.

    fp32 comes back as a read-only view of the payload (no copy); the others as new arrays.
    """
    if encoding not in _WIRE_DTYPE:
        raise ProtocolError(BAD_DTYPE, "encoding", f"one of {ENCODINGS}", encoding)
    raw = tensors.get(name)
    if raw is None:
        raise ProtocolError(BAD_SHAPE, name, "a tensor of that name", sorted(tensors))
    if raw.dtype != _WIRE_DTYPE[encoding]:
        raise ProtocolError(BAD_DTYPE, name, f"{_WIRE_DTYPE[encoding]} for {encoding}", raw.dtype)
    if raw.array.ndim < 1:
        raise ProtocolError(BAD_SHAPE, name, "at least one dimension", raw.array.shape)
    if encoding == "int8":
        scale = tensors.get(name + SCALE_SUFFIX)
        rows = math.prod(raw.array.shape[:-1])
        if scale is None or scale.dtype != "F32" or scale.array.shape != (rows,):
            got = None if scale is None else (scale.dtype, scale.array.shape)
            raise ProtocolError(BAD_SHAPE, name + SCALE_SUFFIX, f"F32 of shape ({rows},)", got)
        if not (np.isfinite(scale.array).all() and (scale.array > 0).all()):
            raise ProtocolError(
                NOT_FINITE,
                name + SCALE_SUFFIX,
                "finite scales > 0",
                "a NaN, Inf or non-positive scale",
            )
        with np.errstate(over="ignore"):  # a huge scale overflows to inf: refused just below
            x = dequantize_int8(raw.array, scale.array)
    elif encoding == "bf16":
        x = from_bf16_bits(raw.array)
    elif encoding == "fp16":
        x = raw.array.astype(np.float32)
    else:
        x = raw.array
    check_finite(name, x)
    return x


def wire_names(name: str, encoding: str) -> set[str]:
    """The tensor names one encoded array occupies in a payload."""
    return {name, name + SCALE_SUFFIX} if encoding == "int8" else {name}


def check_finite(name: str, x: np.ndarray) -> None:
    """Refuse NaN/Inf: one of them poisons a whole FedAvg round."""
    if not np.isfinite(x).all():
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        raise ProtocolError(NOT_FINITE, name, "finite values", f"{bad} NaN/Inf of {x.size}")


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest, ties to even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> float32 (exact)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one float32 scale per row; all-zero rows get scale 1."""
    if x.ndim < 1:
        raise ProtocolError(BAD_SHAPE, "tensor", "at least one dimension", x.shape)
    rows = x.reshape(-1, x.shape[-1]) if x.size else x.reshape(math.prod(x.shape[:-1]), 0)
    if rows.shape[1]:
        amax = np.abs(rows).max(axis=1)
    else:
        amax = np.zeros(rows.shape[0], np.float32)
    scale = (amax / np.float32(127.0)).astype(np.float32)
    scale[~(scale > 0)] = 1.0  # zero rows (and NaN rows, which the receiver refuses anyway)
    q = np.rint(rows / scale[:, None]).clip(-127, 127).astype(np.int8)
    return q.reshape(x.shape), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of `quantize_int8` (up to rounding)."""
    rows = q.reshape(scale.shape[0], -1) if q.size else q.reshape(scale.shape[0], 0)
    return (rows.astype(np.float32) * scale[:, None]).reshape(q.shape)
