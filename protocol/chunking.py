"""Split payloads larger than one MQTT packet into chunks, and put them back together.

Each chunk is itself a safetensors message (kind "chunk", see `messages.Chunk`) carrying a slice
of the encoded message, its index, the chunk count and size, and the sha256 of the whole, so a
captured chunk is as readable as any other payload. Reassembly tolerates duplicate and
out-of-order chunks (QoS 1 may redeliver; nothing orders chunks across reconnects), verifies the
hash, and forgets a set a fixed time after its first chunk, so that a lost chunk cannot pin
memory forever and a replayed one cannot keep a set alive.

Everything a peer can make the receiver hold is bounded (docs/protocol.md, "Bounds"): each open
set is counted with what it retains (buffer, received-bitmap and bookkeeping, never the packet
it came in), one device may hold a bounded share of the budget in a bounded number of sets, and
each chunk costs O(1) work whatever else is pending, since sets expire in the order they began.
A claim that can never fit is refused `too_large`; one that does not fit now is refused `busy`.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .codec import encode
from .errors import BAD_CHUNK, BUSY, TOO_LARGE, ProtocolError
from .messages import Chunk, Envelope, Message
from .wire import DEFAULT_LIMITS, Limits

CHUNK_OVERHEAD = 1024
"""Bytes reserved per chunk for its safetensors header (the actual header is ~400 bytes)."""
PACKET_OVERHEAD = 4096
"""Bytes reserved below the broker's Maximum Packet Size for a PUBLISH's fixed header, topic and
properties."""
SET_OVERHEAD = 1024
"""Bytes counted per open set beyond its buffer, bitmap and ids: the objects and dict entries
that track it (about 800 with tracemalloc; tests/protocol/test_exhaustion.py checks the bound)."""


def payload_limit(max_chunk_bytes: int, max_packet_bytes: int | None) -> int:
    """The largest payload sent whole: the client's own limit, or the broker's Maximum Packet
    Size (from its CONNACK; None or 0 when it announced none) less `PACKET_OVERHEAD`."""
    if max_packet_bytes:
        return min(max_chunk_bytes, max_packet_bytes - PACKET_OVERHEAD)
    return max_chunk_bytes


def packets_for(message: Message, limit: int) -> list[bytes]:
    """The payloads `message` travels as: itself encoded, or chunks if that exceeds `limit`."""
    payload = encode(message)
    if len(payload) <= limit:
        return [payload]
    return split(payload, message, max(limit, CHUNK_OVERHEAD + 1))


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


@dataclass(slots=True)
class _Partial:
    layout: tuple[int, int, int, str]  # (count, chunk_size, total_bytes, sha256) of the first
    buffer: bytearray
    received: bytearray  # one bit per chunk index
    missing: int  # chunks still to come
    due: float  # when the set expires: its first chunk's time + ttl, never extended
    cost: int  # bytes counted against the budgets


@dataclass(slots=True)
class _Share:
    """What one device holds open."""

    sets: int = 0
    bytes: int = 0


Key = tuple[str, str]  # (device_id, msg_id)


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
        self.max_buffered_bytes = max_buffered_bytes or limits.reassembly_bytes
        self.max_device_bytes = min(limits.device_reassembly_bytes, self.max_buffered_bytes)
        self._clock = clock
        self._partials: OrderedDict[Key, _Partial] = OrderedDict()  # oldest first = due first
        self._shares: dict[str, _Share] = {}
        self._bytes = 0
        self._done: OrderedDict[Key, None] = OrderedDict()

    @property
    def pending(self) -> int:
        return len(self._partials)

    @property
    def buffered_bytes(self) -> int:
        """What the open sets hold, as counted against the budgets."""
        return self._bytes

    def add(self, chunk: Chunk) -> bytearray | None:
        """Store one chunk; returns the whole payload once complete and verified, else None.

        Raises ProtocolError: BAD_CHUNK for a chunk that contradicts its set or a hash mismatch
        (the set is then dropped), TOO_LARGE for a set that can never fit the limits, BUSY for
        one that does not fit now (its device or the receiver holds too much: send it later).
        """
        self.expire()
        key = (chunk.device_id, chunk.msg_id)
        if key in self._done:
            return None  # a late duplicate of a set already delivered
        partial = self._partials.get(key)
        if partial is None:
            partial = self._start(key, chunk)
        elif (chunk.count, chunk.chunk_size, chunk.total_bytes, chunk.sha256) != partial.layout:
            raise ProtocolError(BAD_CHUNK, "chunk", f"layout {partial.layout}", chunk.index)
        byte, bit = divmod(chunk.index, 8)
        if partial.received[byte] >> bit & 1:
            return None  # a duplicate: changes nothing, not even the expiry
        start = chunk.index * chunk.chunk_size
        partial.buffer[start : start + chunk.data.size] = chunk.data.data
        partial.received[byte] |= 1 << bit
        partial.missing -= 1
        if partial.missing:
            return None
        self._release(key)
        if hashlib.sha256(partial.buffer).hexdigest() != chunk.sha256:
            raise ProtocolError(BAD_CHUNK, "sha256", chunk.sha256, "a different hash")
        self._done[key] = None
        if len(self._done) > 4096:
            self._done.popitem(last=False)
        return partial.buffer

    def expire(self) -> list[Key]:
        """Drop sets older than `ttl_s` since their first chunk; returns their keys.

        Sets are kept in the order they began and all live `ttl_s`, so only the expired ones at
        the front are looked at: O(1) per call when nothing is due."""
        now = self._clock()
        stale: list[Key] = []
        while self._partials:
            key, partial = next(iter(self._partials.items()))
            if partial.due >= now:
                break
            self._release(key)
            stale.append(key)
        return stale

    def _start(self, key: Key, chunk: Chunk) -> _Partial:
        device = chunk.device_id
        if chunk.total_bytes > self.limits.max_payload_bytes:
            raise ProtocolError(
                TOO_LARGE, "total_bytes", f"<= {self.limits.max_payload_bytes}", chunk.total_bytes
            )
        cost = chunk.total_bytes + (chunk.count + 7) // 8 + SET_OVERHEAD + len(device) + len(key[1])
        if cost > self.max_device_bytes:
            raise ProtocolError(
                TOO_LARGE, "chunk set", f"<= {self.max_device_bytes} bytes per device", cost
            )
        share = self._shares.get(device) or _Share()
        if share.sets >= self.limits.max_device_chunk_sets:
            raise ProtocolError(
                BUSY,
                f"chunk sets open for {device}",
                f"<= {self.limits.max_device_chunk_sets} (send again once they complete or "
                f"expire, {self.ttl_s:.0f}s after their first chunk)",
                share.sets + 1,
            )
        if share.bytes + cost > self.max_device_bytes:
            raise ProtocolError(
                BUSY,
                f"chunk sets buffered for {device}",
                f"<= {self.max_device_bytes} bytes (send again later)",
                share.bytes + cost,
            )
        if self._bytes + cost > self.max_buffered_bytes:
            raise ProtocolError(
                BUSY,
                "chunk sets",
                f"<= {self.max_buffered_bytes} bytes buffered by all devices (send again later)",
                self._bytes + cost,
            )
        partial = _Partial(
            (chunk.count, chunk.chunk_size, chunk.total_bytes, chunk.sha256),
            bytearray(chunk.total_bytes),
            bytearray((chunk.count + 7) // 8),
            chunk.count,
            self._clock() + self.ttl_s,
            cost,
        )
        self._partials[key] = partial
        self._shares[device] = share
        share.sets += 1
        share.bytes += cost
        self._bytes += cost
        return partial

    def _release(self, key: Key) -> None:
        partial = self._partials.pop(key)
        share = self._shares[key[0]]
        share.sets -= 1
        share.bytes -= partial.cost
        self._bytes -= partial.cost
        if not share.sets:
            del self._shares[key[0]]
