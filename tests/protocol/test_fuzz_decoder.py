"""Property-based fuzzing of the decoder: thousands of malformed payloads (random bytes, mutated
valid messages, hand-built headers with hostile fields) yield a message or ProtocolError, never
another exception and never a hang (each test runs under a timeout)."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_fixtures import sample_messages

from sfprompt.protocol.bundle import BATCH, TensorSpec
from sfprompt.protocol.chunking import Reassembler
from sfprompt.protocol.codec import Expectations, decode, encode, peek
from sfprompt.protocol.errors import ProtocolError
from sfprompt.protocol.messages import Chunk
from sfprompt.protocol.wire import Limits

FUZZ = settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
LIMITS = Limits(max_payload_bytes=1 << 20, max_header_bytes=1 << 16)
EXPECT = Expectations({"smashed": (TensorSpec("h", "float32", (BATCH, 7, 8)),)})
VALID = [encode(m) for enc in ("fp32", "int8", "bf16") for m in sample_messages(enc)]


def _decode_only_protocol_errors(data: bytes) -> None:
    """The property: decoding returns a message or raises ProtocolError, nothing else."""
    try:
        message = decode(data, LIMITS, EXPECT)
    except ProtocolError:
        pass
    else:
        if isinstance(message, Chunk):
            with contextlib.suppress(ProtocolError):
                Reassembler(LIMITS).add(message)
    with contextlib.suppress(ProtocolError):
        peek(data, LIMITS)


@pytest.mark.timeout(120)
@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    _decode_only_protocol_errors(data)


@pytest.mark.slow
@pytest.mark.timeout(120)
@FUZZ
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 1 << 16),
    st.binary(max_size=64),
)
def test_mutated_valid_messages(
    data: bytes, flips: list[tuple[int, int]], cut: int, tail: bytes
) -> None:
    mutated = bytearray(data)
    for position, value in flips:
        mutated[position % len(mutated)] = value
    _decode_only_protocol_errors(bytes(mutated[: max(cut, 1)]) + tail)
    _decode_only_protocol_errors(bytes(mutated))


_json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 70), 1 << 70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
_dims = st.lists(st.one_of(st.integers(-2, 9), st.integers(0, 1 << 63), _json_scalar), max_size=10)
_entry = st.one_of(
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "F64", "I64", "", 3]),
            "shape": _dims,
            "data_offsets": st.lists(st.one_of(st.integers(-2, 4096), _json_scalar), max_size=3),
        }
    ),
    _json_scalar,
)
_meta_value = st.one_of(
    st.sampled_from(
        [
            "1",
            "2",
            "0",
            "-1",
            "fp32",
            "int8",
            "bf16",
            "cam-01",
            "*",
            "{}",
            "[]",
            "true",
            "nan",
            "1e999",
            '{"keep_ratio": 0.5}',
            "smashed",
            "chunk",
            "task",
            "update",
            "error",
        ]
    ),
    st.text(max_size=20),
)
_metadata = st.dictionaries(
    st.sampled_from(
        [
            "version",
            "kind",
            "msg_id",
            "device_id",
            "round",
            "step",
            "encoding",
            "settings",
            "samples",
            "metrics",
            "memory",
            "code",
            "text",
            "answers",
            "online",
            "since",
            "state",
            "index",
            "count",
            "chunk_size",
            "total_bytes",
            "sha256",
            "bundle_hash",
            "runtime",
            "hardware",
            "devices_online",
            "other",
        ]
    ),
    _meta_value,
    max_size=12,
)


@pytest.mark.slow
@pytest.mark.timeout(120)
@FUZZ
@given(
    _metadata,
    st.dictionaries(st.sampled_from(["h", "h.scale", "z", "data", "params/w", "x"]), _entry),
    st.binary(max_size=512),
    st.booleans(),
)
def test_hand_built_headers(metadata: dict, entries: dict, body: bytes, with_meta: bool) -> None:
    header = {"__metadata__": metadata, **entries} if with_meta else entries
    text = json.dumps(header).encode()
    _decode_only_protocol_errors(len(text).to_bytes(8, "little") + text + body)
