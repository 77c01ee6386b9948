"""Split payloads larger than one MQTT packet into chunks, and put them back together.

Each chunk is itself a safetensors message (kind "chunk", see `messages.Chunk`) carrying a slice
of the encoded message, its index, the chunk count and size, and the sha256 of the whole, so a
captured chunk is as readable as any other payload. Reassembly tolerates duplicate and
out-of-order chunks (QoS 1 may redeliver; nothing orders chunks across reconnects), verifies the
hash, and forgets sets that stop making progress so that a lost chunk cannot pin memory forever.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .codec import encode
from .errors import BAD_CHUNK, TOO_LARGE, ProtocolError
from .messages import Chunk, Envelope
from .wire import DEFAULT_LIMITS, Limits

CHUNK_OVERHEAD = 1024
"""Bytes reserved per chunk for its safetensors header (the actual header is ~400 bytes)."""


def split(payload: bytes, envelope: Envelope, max_chunk_bytes: int) -> list[bytes]:
    """Encode `payload` (the encoded `envelope` message) as chunks of <= `max_chunk_bytes`."""
    if max_chunk_bytes <= CHUNK_OVERHEAD:
        raise ValueError(f"max_chunk_bytes must exceed {CHUNK_OVERHEAD}, got {max_chunk_bytes}")
    size = max_chunk_bytes - CHUNK_OVERHEAD
    total = len(payload)
    digest = hashlib.sha256(payload).hexdigest()
    words = np.frombuffer(payload, np.uint8)
    count = -(-total // size)
    return [
        encode(
            Chunk(
                device_id=envelope.device_id,
                round=envelope.round,
                step=envelope.step,
                msg_id=envelope.msg_id,
                index=index,
                count=count,
                chunk_size=size,
                total_bytes=total,
                sha256=digest,
                data=words[index * size : (index + 1) * size],
            )
        )
        for index in range(count)
    ]


@dataclass
class _Partial:
    chunk: Chunk  # the first chunk seen: the set's declared layout
    buffer: bytearray
    received: set[int]
    touched: float


class Reassembler:
    """Collects chunk sets keyed by (device_id, msg_id); not thread-safe (one per consumer)."""

    def __init__(
        self,
        limits: Limits = DEFAULT_LIMITS,
        ttl_s: float = 120.0,
        max_buffered_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self.ttl_s = ttl_s
        self.max_buffered_bytes = max_buffered_bytes or 2 * limits.max_payload_bytes
        self._clock = clock
        self._partials: dict[tuple[str, str], _Partial] = {}
        self._done: OrderedDict[tuple[str, str], None] = OrderedDict()

    @property
    def pending(self) -> int:
        return len(self._partials)

    def add(self, chunk: Chunk) -> bytearray | None:
        """Store one chunk; returns the whole payload once complete and verified, else None.

        Raises ProtocolError (BAD_CHUNK, TOO_LARGE) for a chunk that contradicts its set, a set
        over the limits, or a hash mismatch (the set is then dropped).
        """
        self.expire()
        key = (chunk.device_id, chunk.msg_id)
        if key in self._done:
            return None  # a late duplicate of a set already delivered
        partial = self._partials.get(key)
        if partial is None:
            partial = self._start(key, chunk)
        else:
            first = partial.chunk
            layout = (first.count, first.chunk_size, first.total_bytes, first.sha256)
            if (chunk.count, chunk.chunk_size, chunk.total_bytes, chunk.sha256) != layout:
                raise ProtocolError(BAD_CHUNK, "chunk", f"layout {layout}", chunk.index)
        partial.touched = self._clock()
        if chunk.index in partial.received:
            return None
        start = chunk.index * chunk.chunk_size
        partial.buffer[start : start + chunk.data.size] = chunk.data.data
        partial.received.add(chunk.index)
        if len(partial.received) < chunk.count:
            return None
        del self._partials[key]
        if hashlib.sha256(partial.buffer).hexdigest() != chunk.sha256:
            raise ProtocolError(BAD_CHUNK, "sha256", chunk.sha256, "a different hash")
        self._done[key] = None
        if len(self._done) > 4096:
            self._done.popitem(last=False)
        return partial.buffer

    def expire(self) -> list[tuple[str, str]]:
        """Drop sets idle for longer than `ttl_s`; returns their keys."""
        now = self._clock()
        stale = [key for key, p in self._partials.items() if now - p.touched > self.ttl_s]
        for key in stale:
            del self._partials[key]
        return stale

    def _start(self, key: tuple[str, str], chunk: Chunk) -> _Partial:
        if chunk.total_bytes > self.limits.max_payload_bytes:
            raise ProtocolError(
                TOO_LARGE, "total_bytes", f"<= {self.limits.max_payload_bytes}", chunk.total_bytes
            )
        buffered = sum(len(p.buffer) for p in self._partials.values())
        if buffered + chunk.total_bytes > self.max_buffered_bytes:
            raise ProtocolError(
                TOO_LARGE,
                "chunk sets",
                f"<= {self.max_buffered_bytes} bytes buffered",
                buffered + chunk.total_bytes,
            )
        partial = _Partial(chunk, bytearray(chunk.total_bytes), set(), self._clock())
        self._partials[key] = partial
        return partial
