"""`Registry` in-process, on a fake clock: who joined, who is online, and its bounds against
made-up JOINs (at most `max_devices` known, the longest offline forgotten first, refused only
when all are online; devices offline for `forget_after_s` forgotten). test_bounds.py floods it;
these pin down each promise of its docstring one by one."""

from __future__ import annotations

import threading
import time

import pytest

from sfprompt.cloud_server.registry import Registry, RegistryFull
from sfprompt.protocol.messages import Join


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def join(device_id: str, machine: str = "pi") -> Join:
    return Join(
        device_id=device_id,
        bundle_hash="ab" * 32,
        runtime={"python": "3.11"},
        hardware={"machine": machine},
    )


def online_device(registry: Registry, device_id: str) -> None:
    registry.join(join(device_id))
    registry.set_online(device_id, True)


def test_a_join_alone_is_known_but_not_online() -> None:
    registry = Registry()
    info = registry.join(join("cam-01", machine="aarch64"))
    assert info.online is False and info.hardware == {"machine": "aarch64"}
    assert registry.get("cam-01") == info and len(registry) == 1
    assert registry.online() == []
    registry.set_online("cam-01", True)
    assert registry.online() == ["cam-01"]


def test_a_presence_before_the_join_counts_once_the_device_joins() -> None:
    """A device's retained presence usually arrives before its JOIN."""
    registry = Registry()
    registry.set_online("cam-02", True)
    assert registry.get("cam-02") is None and registry.online() == []
    registry.join(join("cam-02"))
    assert registry.online() == ["cam-02"]


def test_a_join_again_keeps_the_device_online_and_refreshes_what_it_said() -> None:
    registry = Registry()
    online_device(registry, "cam-01")
    info = registry.join(join("cam-01", machine="x86_64"))
    assert info.online and info.hardware == {"machine": "x86_64"}
    assert registry.online() == ["cam-01"] and len(registry) == 1


def test_online_is_sorted_and_follows_presence() -> None:
    registry = Registry()
    for device in ("cam-03", "cam-01", "cam-02"):
        online_device(registry, device)
    assert registry.online() == ["cam-01", "cam-02", "cam-03"]
    registry.set_online("cam-02", False)
    assert registry.online() == ["cam-01", "cam-03"]
    assert registry.get("cam-02") is not None  # offline, still known


def test_offline_listeners_hear_each_going_offline_once() -> None:
    registry = Registry()
    heard: list[str] = []
    registry.on_offline(heard.append)
    online_device(registry, "cam-01")
    registry.set_online("cam-01", False)
    registry.set_online("cam-01", False)  # no change: not news
    registry.set_online("never-joined", False)  # not known: remembered, not announced
    assert heard == ["cam-01"]


def test_a_full_registry_forgets_the_device_offline_longest() -> None:
    clock = Clock()
    registry = Registry(max_devices=3, clock=clock)
    online_device(registry, "cam-01")
    registry.join(join("old"))  # never online, since t = 0
    clock.now = 1
    registry.join(join("newer"))  # never online, since t = 1
    clock.now = 2
    registry.join(join("cam-04"))  # full: "old" makes room
    assert registry.get("old") is None
    assert all(registry.get(d) is not None for d in ("cam-01", "newer", "cam-04"))


def test_a_full_registry_of_online_devices_refuses_a_new_one_but_not_a_known_one() -> None:
    registry = Registry(max_devices=2)
    online_device(registry, "cam-01")
    online_device(registry, "cam-02")
    with pytest.raises(RegistryFull, match="knows 2 devices, all online.*cam-03 may join"):
        registry.join(join("cam-03"))
    assert registry.get("cam-03") is None
    registry.join(join("cam-01"))  # a known device joining again needs no room
    registry.set_online("cam-02", False)
    registry.join(join("cam-03"))  # one left: room again
    assert registry.get("cam-02") is None and registry.get("cam-03") is not None


def test_devices_offline_for_forget_after_s_are_forgotten() -> None:
    clock = Clock()
    registry = Registry(forget_after_s=60, clock=clock)
    online_device(registry, "cam-01")
    clock.now = 10
    registry.set_online("cam-01", False)
    clock.now = 69.9
    assert registry.online() == [] and registry.get("cam-01") is not None
    clock.now = 70
    registry.online()  # looking forgets what is stale
    assert registry.get("cam-01") is None and len(registry) == 0


def test_an_online_device_is_never_forgotten() -> None:
    clock = Clock()
    registry = Registry(forget_after_s=60, clock=clock)
    online_device(registry, "cam-01")
    clock.now = 10_000
    assert registry.online() == ["cam-01"]


def test_remembered_presences_are_bounded() -> None:
    """Presences of devices that never join cannot grow without bound."""
    registry = Registry(max_devices=3)
    for i in range(100):
        registry.set_online(f"ghost-{i}", True)
    registry.join(join("ghost-0"))  # its presence was pushed out: not online
    registry.join(join("ghost-99"))  # the newest presences are kept
    assert registry.online() == ["ghost-99"]


def test_at_least_one_device() -> None:
    with pytest.raises(ValueError, match="max_devices must be >= 1"):
        Registry(max_devices=0)


def test_wait_for_returns_as_soon_as_enough_are_online() -> None:
    registry = Registry()
    stop = threading.Event()
    timer = threading.Timer(0.05, online_device, (registry, "cam-01"))
    timer.start()
    start = time.monotonic()
    assert registry.wait_for(1, 10.0, stop) == ["cam-01"]
    assert time.monotonic() - start < 5.0
    timer.join()


def test_wait_for_gives_up_at_the_timeout_or_when_stopped() -> None:
    registry = Registry()
    stop = threading.Event()
    start = time.monotonic()
    assert registry.wait_for(1, 0.1, stop) == []
    assert 0.05 < time.monotonic() - start < 5.0
    stop.set()
    start = time.monotonic()
    assert registry.wait_for(1, 10.0, stop) == []
    assert time.monotonic() - start < 1.0
