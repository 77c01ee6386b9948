"""Bounded memories that make QoS 1 (at least once) look like exactly once to the application."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass


class SeenIds:
    """The last `capacity` message keys seen; older ones are forgotten first."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[tuple[str, str], None] = OrderedDict()

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._keys

    def add(self, key: tuple[str, str]) -> bool:
        """Remember `key`; returns False if it was already there (a duplicate)."""
        if key in self._keys:
            return False
        self._keys[key] = None
        if len(self._keys) > self.capacity:
            self._keys.popitem(last=False)
        return True


@dataclass(frozen=True)
class CachedReply:
    topic: str
    packets: list[bytes]  # the encoded reply, already split into chunks if it needed it
    correlation: bytes | None


class ReplyCache:
    """Replies by request key, so a repeated request gets the same answer without rework.

    Bounded by total bytes: the newest reply always stays, older ones go first. Thread-safe:
    replies computed later (a batched body call) are filed from another thread.
    """

    def __init__(self, max_bytes: int = 128 << 20) -> None:
        self.max_bytes = max_bytes
        self._replies: OrderedDict[tuple[str, str], CachedReply] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> CachedReply | None:
        with self._lock:
            return self._replies.get(key)

    def put(self, key: tuple[str, str], reply: CachedReply) -> None:
        with self._lock:
            self._put(key, reply)

    def _put(self, key: tuple[str, str], reply: CachedReply) -> None:
        old = self._replies.pop(key, None)
        if old is not None:
            self._bytes -= _size(old)
        self._replies[key] = reply
        self._bytes += _size(reply)
        while self._bytes > self.max_bytes and len(self._replies) > 1:
            _, dropped = self._replies.popitem(last=False)
            self._bytes -= _size(dropped)


def _size(reply: CachedReply) -> int:
    return sum(len(packet) for packet in reply.packets)
