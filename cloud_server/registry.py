"""Which devices the server knows: who joined with a fitting bundle, and who is online now.

Bounded against made-up JOINs: a device counts as online only once its presence says so (a
device publishes it, retained, before it joins), so a JOIN alone is never selected; at most
`max_devices` are known, a full registry makes room by forgetting the device that has been
offline (or never online) longest, and refuses only when every known device is online; and a
device offline for `forget_after_s` is forgotten (it joins again when it comes back).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from sfprompt.protocol.messages import Join


class RegistryFull(RuntimeError):
    """Every one of the `max_devices` known devices is online: a new one must wait."""


@dataclass
class DeviceInfo:
    device_id: str
    bundle_hash: str
    hardware: dict[str, float | str | bool]
    runtime: dict[str, str]
    online: bool = False  # from its presence: a JOIN alone does not make a device online
    joined_at: float = field(default_factory=time.time)


class Registry:
    """Thread-safe: handlers update it, the round loop reads it."""

    def __init__(
        self,
        max_devices: int = 10_000,
        forget_after_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_devices < 1:
            raise ValueError(f"max_devices must be >= 1, got {max_devices}")
        self.max_devices = max_devices
        self.forget_after_s = forget_after_s
        self._clock = clock
        self._devices: dict[str, DeviceInfo] = {}
        # Known devices not online, by when they last were (or joined): the first to forget.
        self._offline: OrderedDict[str, float] = OrderedDict()
        # Presence of devices not (yet) joined, newest last: a device's retained presence
        # usually arrives before its JOIN.
        self._presence: OrderedDict[str, bool] = OrderedDict()
        self._lock = threading.Condition()
        self._offline_listeners: list[Callable[[str], None]] = []

    def join(self, msg: Join) -> DeviceInfo:
        """Register (or refresh) a device; raises RegistryFull if it is new and there is no
        room (every known device online)."""
        with self._lock:
            self._forget_stale()
            known = self._devices.get(msg.device_id)
            if known is None:
                self._make_room(msg.device_id)
                online = self._presence.pop(msg.device_id, False)
            else:
                online = known.online
            info = DeviceInfo(
                msg.device_id, msg.bundle_hash, dict(msg.hardware), dict(msg.runtime), online
            )
            self._devices[msg.device_id] = info
            if not online:
                self._offline[msg.device_id] = self._clock()
                self._offline.move_to_end(msg.device_id)
            self._lock.notify_all()
        return info

    def set_online(self, device_id: str, online: bool) -> None:
        with self._lock:
            info = self._devices.get(device_id)
            if info is None:
                self._remember_presence(device_id, online)
                return
            if info.online == online:
                return
            info.online = online
            if online:
                self._offline.pop(device_id, None)
            else:
                self._offline[device_id] = self._clock()
            self._lock.notify_all()
        if not online:
            for listener in self._offline_listeners:
                listener(device_id)

    def on_offline(self, listener: Callable[[str], None]) -> None:
        self._offline_listeners.append(listener)

    def online(self) -> list[str]:
        """Joined devices that are online, sorted (selection draws from this order)."""
        with self._lock:
            self._forget_stale()
            return sorted(d for d, info in self._devices.items() if info.online)

    def get(self, device_id: str) -> DeviceInfo | None:
        with self._lock:
            return self._devices.get(device_id)

    def __len__(self) -> int:
        with self._lock:
            return len(self._devices)

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

    # ---- bounds (the caller holds the lock) --------------------------------------------------
    def _make_room(self, device_id: str) -> None:
        if len(self._devices) < self.max_devices:
            return
        if not self._offline:
            raise RegistryFull(
                f"the server knows {self.max_devices} devices, all online (--max-devices); "
                f"{device_id} may join once one leaves"
            )
        oldest, _ = self._offline.popitem(last=False)
        del self._devices[oldest]

    def _forget_stale(self) -> None:
        """Forget devices offline (or never online) for longer than `forget_after_s`."""
        horizon = self._clock() - self.forget_after_s
        while self._offline:
            device_id, since = next(iter(self._offline.items()))
            if since > horizon:
                break
            del self._offline[device_id]
            del self._devices[device_id]

    def _remember_presence(self, device_id: str, online: bool) -> None:
        self._presence[device_id] = online
        self._presence.move_to_end(device_id)
        while len(self._presence) > self.max_devices:
            self._presence.popitem(last=False)
