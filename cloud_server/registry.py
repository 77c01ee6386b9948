"""Which devices the server knows: who joined with a fitting bundle, and who is online now."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sfprompt.protocol.messages import Join


@dataclass
class DeviceInfo:
    device_id: str
    bundle_hash: str
    hardware: dict[str, float | str | bool]
    runtime: dict[str, str]
    online: bool = True
    joined_at: float = field(default_factory=time.time)


class Registry:
    """Thread-safe: handlers update it, the round loop reads it."""

    def __init__(self) -> None:
        self._devices: dict[str, DeviceInfo] = {}
        self._lock = threading.Condition()
        self._offline_listeners: list[Callable[[str], None]] = []

    def join(self, msg: Join) -> DeviceInfo:
        info = DeviceInfo(msg.device_id, msg.bundle_hash, dict(msg.hardware), dict(msg.runtime))
        with self._lock:
            self._devices[msg.device_id] = info
            self._lock.notify_all()
        return info

    def set_online(self, device_id: str, online: bool) -> None:
        with self._lock:
            info = self._devices.get(device_id)
            if info is None or info.online == online:
                return
            info.online = online
            self._lock.notify_all()
        if not online:
            for listener in self._offline_listeners:
                listener(device_id)

    def on_offline(self, listener: Callable[[str], None]) -> None:
        self._offline_listeners.append(listener)

    def online(self) -> list[str]:
        """Joined devices that are online, sorted (selection draws from this order)."""
        with self._lock:
            return sorted(d for d, info in self._devices.items() if info.online)

    def get(self, device_id: str) -> DeviceInfo | None:
        with self._lock:
            return self._devices.get(device_id)

    def wait_for(self, count: int, timeout: float, stop: threading.Event) -> list[str]:
        """Block until `count` devices are online (or timeout / stop); returns who is online."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.online()) < count and not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(min(left, 0.5))
            return self.online()
