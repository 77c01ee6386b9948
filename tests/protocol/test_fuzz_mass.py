"""Mass fuzzing of the decoder: 10^4 mutated valid messages in the fast set, 10^5 in the slow set,
each decoded (and reassembled if a chunk) with only `ProtocolError` allowed out.

Hypothesis (test_fuzz_decoder.py) searches cleverly but slowly; this loop trades cleverness for
volume with a seeded numpy generator and mutations aimed at what a hostile peer controls: bytes
anywhere, the length prefix, the JSON header's numbers and strings (shapes, offsets, dtypes,
metadata), truncation and trailing junk. A failure prints the seed and index to replay it.
"""

from __future__ import annotations

import contextlib
import re

import numpy as np
import pytest
from protocol_fixtures import sample_messages

from sfprompt.protocol.bundle import BATCH, TensorSpec
from sfprompt.protocol.chunking import Reassembler, split
from sfprompt.protocol.codec import Expectations, decode, encode
from sfprompt.protocol.errors import ProtocolError
from sfprompt.protocol.messages import Chunk, Smashed
from sfprompt.protocol.wire import Limits

LIMITS = Limits(max_payload_bytes=1 << 20, max_header_bytes=1 << 16)
EXPECT = Expectations({"smashed": (TensorSpec("h", "float32", (BATCH, 7, 8)),)})
HOSTILE = [
    b"-1", b"0", b"1e999", b"NaN", b"18446744073709551616", b"null", b"true", b"[]", b"{}",
    b'"F64"', b'"BF16"', b'"I8"', b'""', b'"\\u0000"', b"[1,2,3,4,5,6,7,8,9]", b"9" * 40,
]  # fmt: skip
# How often each edit is drawn: header tokens most, as they keep the JSON valid and so reach
# the checks past the parser (shapes, offsets, dtypes, metadata fields).
_EDITS = np.array([0.15, 0.1, 0.05, 0.25, 0.25, 0.05, 0.1, 0.05])
_NUMBER = re.compile(rb"-?\d+")
_STRING = re.compile(rb'"[^"\\]*"')


def _valid_messages() -> list[bytes]:
    messages = [encode(m) for enc in ("fp32", "fp16", "int8", "bf16") for m in sample_messages(enc)]
    big = Smashed(device_id="cam-01", round=1, step=2, h=np.ones((3, 7, 8), np.float32))
    payload = encode(big)
    messages += split(payload, big, max_chunk_bytes=1024 + 256)[:3]  # real chunks
    return messages


VALID = _valid_messages()


def _header_end(data: bytes) -> int:
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    return min(len(data), 8 + size)


def _mutate(rng: np.random.Generator, data: bytes) -> bytes:
    """One to three hostile edits of a valid message."""
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        how = int(rng.choice(8, p=_EDITS))
        end = _header_end(bytes(out))
        if how == 0 and out:  # random bytes anywhere
            for pos in rng.integers(0, len(out), size=int(rng.integers(1, 8))):
                out[int(pos)] = int(rng.integers(0, 256))
        elif how == 1 and end > 8:  # bytes of the JSON header
            for pos in rng.integers(8, end, size=int(rng.integers(1, 4))):
                out[int(pos)] = int(rng.choice(list(b'{}[]":,0123456789-e.\\ ')))
        elif how == 2:  # the length prefix
            value = int(rng.choice([0, 1, 7, 2**31, 2**63 - 1, 2**64 - 1, len(out), end]))
            value = max(0, value + int(rng.integers(-3, 4))) % 2**64
            out[:8] = value.to_bytes(8, "little")
        elif how == 3 and end > 8:  # a number of the header (shapes, offsets, versions...)
            out = _replace_token(rng, out, end, _NUMBER)
        elif how == 4 and end > 8:  # a string of the header (dtype, metadata values...)
            out = _replace_token(rng, out, end, _STRING)
        elif how == 5 and out:  # truncation
            out = out[: int(rng.integers(0, len(out)))]
        elif how == 6:  # trailing or inserted junk
            junk = rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
            pos = int(rng.integers(0, len(out) + 1))
            out = out[:pos] + junk + out[pos:]
        elif how == 7 and len(out) > 16:  # a slice of the data section duplicated or cut
            a, b = sorted(int(x) for x in rng.integers(0, len(out), size=2))
            out = out[:a] + out[a:b] * int(rng.integers(0, 3)) + out[b:]
    return bytes(out)


def _replace_token(
    rng: np.random.Generator, out: bytearray, end: int, pattern: re.Pattern[bytes]
) -> bytearray:
    """Swap one number or string of the header for a hostile one, fixing the length prefix so
    the decoder reads the new header rather than stopping at the prefix."""
    header = bytes(out[8:end])
    tokens = list(pattern.finditer(header))
    if not tokens:
        return out
    token = tokens[int(rng.integers(0, len(tokens)))]
    new = HOSTILE[int(rng.integers(0, len(HOSTILE)))]
    header = header[: token.start()] + new + header[token.end() :]
    return bytearray(len(header).to_bytes(8, "little") + header + bytes(out[end:]))


def _decode_only_protocol_errors(data: bytes, reassembler: Reassembler) -> None:
    try:
        message = decode(data, LIMITS, EXPECT)
    except ProtocolError:
        return
    if isinstance(message, Chunk):
        with contextlib.suppress(ProtocolError):
            reassembler.add(message)


def _fuzz(count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    reassembler = Reassembler(LIMITS)
    picks = rng.integers(0, len(VALID), size=count)
    for index, pick in enumerate(picks):
        data = _mutate(rng, VALID[int(pick)])
        try:
            _decode_only_protocol_errors(data, reassembler)
        except Exception as exc:
            raise AssertionError(
                f"mutation {index} of seed {seed} raised {type(exc).__name__}: {exc}; "
                f"input {data[:200]!r}..."
            ) from exc


def test_the_mutations_reach_the_decoder() -> None:
    """The fuzz means something only if mutated messages get past the first checks sometimes
    and are refused for many different reasons."""
    rng = np.random.default_rng(1)
    decoded, reasons = 0, set()
    for _ in range(2000):
        try:
            decode(_mutate(rng, VALID[int(rng.integers(0, len(VALID)))]), LIMITS, EXPECT)
            decoded += 1
        except ProtocolError as exc:
            reasons.add(exc.code)
    assert decoded > 20
    assert len(reasons) >= 5, reasons


@pytest.mark.timeout(300)
def test_ten_thousand_mutated_messages_raise_only_protocol_errors() -> None:
    _fuzz(10_000, seed=0)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_hundred_thousand_mutated_messages_raise_only_protocol_errors() -> None:
    _fuzz(100_000, seed=12345)
