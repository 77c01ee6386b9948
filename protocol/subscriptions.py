"""The handlers registered per topic filter, and which one takes a topic.

A topic goes to the first registered subscription whose filter matches it. Matching is paho's
own topic trie (`paho.mqtt.matcher.MQTTMatcher`, wildcards and `$` topics as the broker treats
them), passed in by `transport`, the one module that imports paho.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from .client_config import Handler


@dataclass(frozen=True)
class Subscription:
    filter: str
    handler: Handler
    inline: bool  # handled on paho's network thread, not the dispatcher's


class FilterTrie(Protocol):
    """What is used of paho's `MQTTMatcher`: values by topic filter, and those matching a topic."""

    def __setitem__(self, key: str, value: Any) -> None: ...
    def __getitem__(self, key: str) -> Any: ...
    def __delitem__(self, key: str) -> None: ...
    def iter_match(self, topic: str) -> Iterator[Any]: ...


class Subscriptions:
    """The registered subscriptions in the order they were made; thread-safe."""

    def __init__(self, trie: FilterTrie) -> None:
        self._lock = threading.Lock()
        self._all: list[Subscription] = []
        self._added = 0
        self._by_filter = trie  # filter -> [(order added, subscription), ...]

    def add(self, subscription: Subscription) -> None:
        with self._lock:
            self._all.append(subscription)
            self._added += 1
            entry = (self._added, subscription)
            try:
                self._by_filter[subscription.filter].append(entry)
            except KeyError:
                self._by_filter[subscription.filter] = [entry]

    def remove(self, subscription: Subscription) -> None:
        with self._lock:
            self._all.remove(subscription)
            same = self._by_filter[subscription.filter]
            same.remove(next(entry for entry in same if entry[1] == subscription))
            if not same:
                del self._by_filter[subscription.filter]

    def remove_filter(self, topic_filter: str) -> bool:
        """Forget every subscription on `topic_filter`; False if there was none."""
        with self._lock:
            gone = [sub for sub in self._all if sub.filter == topic_filter]
            for subscription in gone:
                self._all.remove(subscription)
            if gone:
                del self._by_filter[topic_filter]
        return bool(gone)

    def filters(self) -> list[str]:
        """Every registered filter, in order (what each (re)connect subscribes to)."""
        with self._lock:
            return [subscription.filter for subscription in self._all]

    def first_for(self, topic: str) -> Subscription | None:
        """The first registered subscription whose filter matches `topic`."""
        with self._lock:
            firsts = [entries[0] for entries in self._by_filter.iter_match(topic)]
        return min(firsts, key=lambda entry: entry[0])[1] if firsts else None
