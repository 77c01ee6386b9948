"""Payload bytes sent and received by message kind: what the metrics report of the network."""

from __future__ import annotations

import threading

from .topics import Topics


class Traffic:
    """Payload bytes sent and received, by message kind (`kind_of` the topic). Thread-safe:
    paho's network thread counts what arrives."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent: dict[str, int] = {}
        self.received: dict[str, int] = {}

    def add(self, direction: dict[str, int], kind: str, size: int) -> None:
        with self._lock:
            direction[kind] = direction.get(kind, 0) + size

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        """(sent, received), copied at one instant."""
        with self._lock:
            return dict(self.sent), dict(self.received)


def kind_of(topics: Topics, topic: str) -> str:
    """The message kind a topic carries ("smashed", "task", ...); "other" outside the tree."""
    try:
        route = topics.parse(topic)
    except ValueError:
        return "other"
    return route.kind or route.area
