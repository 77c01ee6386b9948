"""Chunking: split payloads reassemble exactly despite duplicates and any order; contradictions,
bad hashes and oversize sets are refused; incomplete sets expire."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sfprompt.protocol.chunking import CHUNK_OVERHEAD, Reassembler, split
from sfprompt.protocol.codec import decode, encode
from sfprompt.protocol.errors import ProtocolError
from sfprompt.protocol.messages import Chunk, Smashed
from sfprompt.protocol.wire import Limits


def _chunks(size: int = 100_000, chunk_bytes: int = 9_000) -> tuple[Smashed, bytes, list[Chunk]]:
    h = np.random.default_rng(1).standard_normal((1, size // 4)).astype(np.float32)
    message = Smashed(device_id="cam-01", round=1, step=2, h=h)
    payload = encode(message)
    packets = split(payload, message, chunk_bytes)
    assert all(len(p) <= chunk_bytes for p in packets)
    chunks = [decode(p) for p in packets]
    assert all(isinstance(c, Chunk) for c in chunks)
    return message, payload, chunks  # type: ignore[return-value]


def test_reassembles_with_duplicates_in_any_order() -> None:
    message, payload, chunks = _chunks()
    stream = chunks + random.Random(0).sample(chunks, 5)  # duplicates
    random.Random(1).shuffle(stream)
    reassembler = Reassembler()
    done = [out for c in stream if (out := reassembler.add(c)) is not None]
    assert len(done) == 1 and bytes(done[0]) == payload
    back = decode(done[0])
    assert isinstance(back, Smashed) and np.array_equal(back.h, message.h)
    assert reassembler.pending == 0
    assert reassembler.add(chunks[0]) is None and reassembler.pending == 0  # late duplicate


def test_hash_mismatch_is_refused() -> None:
    _, _, chunks = _chunks()
    bad = chunks[0]
    flipped = bad.data.copy()
    flipped[0] ^= 1
    forged = Chunk(**{**vars(bad), "data": flipped})
    reassembler = Reassembler()
    with pytest.raises(ProtocolError, match="bad_chunk.*sha256"):
        for chunk in [forged, *chunks[1:]]:
            reassembler.add(chunk)
    assert reassembler.pending == 0


def test_contradicting_layout_is_refused() -> None:
    _, _, chunks = _chunks()
    reassembler = Reassembler()
    reassembler.add(chunks[0])
    other = Chunk(**{**vars(chunks[1]), "sha256": "0" * 64})
    with pytest.raises(ProtocolError, match="bad_chunk"):
        reassembler.add(other)


def test_incomplete_sets_expire() -> None:
    now = [0.0]
    _, _, chunks = _chunks()
    reassembler = Reassembler(ttl_s=10, clock=lambda: now[0])
    reassembler.add(chunks[0])
    now[0] = 5
    reassembler.add(chunks[1])  # progress does not extend the set's time: 10 s from its start
    now[0] = 9
    assert reassembler.expire() == [] and reassembler.pending == 1
    now[0] = 11
    assert reassembler.expire() == [("cam-01", chunks[0].msg_id)] and reassembler.pending == 0


def test_limits_bound_memory() -> None:
    _, _, chunks = _chunks()
    with pytest.raises(ProtocolError, match="too_large"):
        Reassembler(Limits(max_payload_bytes=50_000)).add(chunks[0])
    with pytest.raises(ProtocolError, match="too_large"):
        Reassembler(max_buffered_bytes=50_000).add(chunks[0])


def test_chunk_layout_is_checked_at_construction() -> None:
    _, _, chunks = _chunks()
    with pytest.raises(ProtocolError, match="data"):
        Chunk(**{**vars(chunks[0]), "data": chunks[0].data[:-1]})
    with pytest.raises(ProtocolError, match="count"):
        Chunk(**{**vars(chunks[0]), "count": 99})
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        split(b"x" * 10, chunks[0], CHUNK_OVERHEAD)
